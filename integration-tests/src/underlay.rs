//! The underlay: which 10.213.<k>.0/24 a virtual cluster uses, and its bridge in the host namespace.
//!
//! Parallel clusters (parallel tests, a demo next to a test run) must not share a subnet. A cluster
//! claims `k` by binding the abstract Unix socket `@wiremesh-underlay-<k>` (released by the kernel when
//! the process exits, so nothing goes stale), and additionally skips any `k` with an address or route
//! already on the host (a detached demo cluster whose creator has exited keeps its bridge address).

use std::{
    net::Ipv4Addr,
    os::{linux::net::SocketAddrExt, unix::net::UnixListener},
};

use ipnet::Ipv4Net;

use crate::{
    command::{self, CommandError},
    ledger::{Ledger, Resource},
    names::ClusterId,
};

/// Why the underlay could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UnderlayError {
    /// All 256 subnets are in use.
    #[error(
        "no free underlay subnet in 10.213.0.0/16 (all 256 /24s are claimed or have host addresses)"
    )]
    Exhausted,
    /// `ip` failed.
    #[error("underlay bridge {bridge}: {source}")]
    Command {
        /// The bridge name.
        bridge: String,
        /// The failure.
        #[source]
        source: CommandError,
    },
}

/// A claimed 10.213.<k>.0/24; the claim lasts as long as this value (or this process).
#[derive(Debug)]
pub struct UnderlayLease {
    index: u8,
    _claim: UnixListener,
}

fn host_uses_subnet(net: Ipv4Net) -> Result<bool, CommandError> {
    let addrs = command::ip(["-4", "-o", "addr", "show"])?;
    for line in addrs.lines() {
        let mut words = line.split_whitespace();
        while let Some(word) = words.next() {
            if word == "inet"
                && let Some(addr) = words.next().and_then(|a| a.parse::<Ipv4Net>().ok())
                && (net.contains(&addr.addr()) || addr.contains(&net.network()))
            {
                return Ok(true);
            }
        }
    }
    let routes = command::ip([
        "-4",
        "route",
        "show",
        "table",
        "all",
        "root",
        &net.to_string(),
    ])?;
    Ok(!routes.trim().is_empty())
}

impl UnderlayLease {
    /// Claims a free 10.213.<k>.0/24, trying from a PID-dependent start so parallel processes rarely
    /// race for the same one.
    pub fn claim() -> Result<Self, UnderlayError> {
        let start = (std::process::id() % 256) as u8;
        for offset in 0..=255u8 {
            let index = start.wrapping_add(offset);
            let name = format!("wiremesh-underlay-{index}");
            let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            else {
                continue;
            };
            let Ok(claim) = UnixListener::bind_addr(&addr) else {
                continue;
            };
            let lease = Self {
                index,
                _claim: claim,
            };
            match host_uses_subnet(lease.subnet()) {
                Ok(false) => {
                    tracing::debug!(subnet = %lease.subnet(), "underlay subnet claimed");
                    return Ok(lease);
                }
                Ok(true) => continue,
                Err(source) => {
                    return Err(UnderlayError::Command {
                        bridge: String::new(),
                        source,
                    });
                }
            }
        }
        Err(UnderlayError::Exhausted)
    }

    /// The `k` of 10.213.<k>.0/24.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The subnet.
    pub fn subnet(&self) -> Ipv4Net {
        Ipv4Net::new(Ipv4Addr::new(10, 213, self.index, 0), 24).unwrap_or_default()
    }

    /// The bridge's address: the nodes' default gateway, and where testenv listens.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.index, 1)
    }

    /// Underlay address of node `node_index` (1-based): 10.213.<k>.(10 + index).
    pub fn node_ip(&self, node_index: u32) -> Option<Ipv4Addr> {
        let host = u8::try_from(node_index.checked_add(10)?)
            .ok()
            .filter(|h| *h < 255)?;
        Some(Ipv4Addr::new(10, 213, self.index, host))
    }
}

/// Creates the underlay bridge `id.bridge()` with the lease's bridge IP, records it in `ledger`.
pub fn create_bridge(
    id: &ClusterId,
    lease: &UnderlayLease,
    ledger: &mut Ledger,
) -> Result<String, UnderlayError> {
    let bridge = id.bridge();
    let err = |source| UnderlayError::Command {
        bridge: bridge.clone(),
        source,
    };
    // A fixed (locally administered) MAC: a bridge without one takes the lowest MAC of its ports
    // and changes it when that port leaves, and the nodes' ARP entries for the API server then
    // point at a stale MAC for up to a minute (requests hang while watches keep working).
    let mac = format!("02:77:6d:00:{:02x}:01", lease.index());
    command::ip(["link", "add", &bridge, "address", &mac, "type", "bridge"]).map_err(err)?;
    ledger.push(Resource::HostLink {
        name: bridge.clone(),
    });
    // No IPv6 on the underlay: router and neighbour solicitations would only clutter captures.
    disable_ipv6_host(&bridge);
    let cidr = format!("{}/24", lease.bridge_ip());
    command::ip(["addr", "add", &cidr, "dev", &bridge]).map_err(err)?;
    command::ip(["link", "set", &bridge, "up"]).map_err(err)?;
    tracing::info!(bridge = %bridge, address = %cidr, "underlay bridge up");
    Ok(bridge)
}

/// Turns IPv6 off on a host interface; best effort (IPv6 may be disabled or absent already).
pub(crate) fn disable_ipv6_host(link: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{link}/disable_ipv6");
    if let Err(err) = std::fs::write(&path, "1") {
        tracing::debug!(link, %err, "could not disable IPv6");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_exclusive_and_addresses_follow_the_plan() {
        let a = UnderlayLease::claim().expect("first lease");
        let b = UnderlayLease::claim().expect("second lease");
        assert_ne!(a.index(), b.index(), "two live leases share a subnet");
        assert_eq!(a.subnet().to_string(), format!("10.213.{}.0/24", a.index()));
        assert_eq!(a.bridge_ip(), Ipv4Addr::new(10, 213, a.index(), 1));
        assert_eq!(a.node_ip(1), Some(Ipv4Addr::new(10, 213, a.index(), 11)));
        assert_eq!(a.node_ip(244), Some(Ipv4Addr::new(10, 213, a.index(), 254)));
        assert_eq!(a.node_ip(245), None);
        let index = a.index();
        drop(a);
        // Released with the value: the same subnet can be claimed again by name.
        let name = format!("wiremesh-underlay-{index}");
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        UnixListener::bind_addr(&addr).expect("released lease can be re-claimed");
    }
}
