//! Finding the interfaces the programs go on, in the node's network namespace: the host side of
//! each local pod's veth (the interface of the most specific route to the pod's address, IPv4
//! or IPv6, as a ptp-style CNI installs it) and the underlay device (the one holding the node's
//! address). One rtnetlink dump of links, addresses and routes per pass; [`LinkWatch`] wakes the
//! task the moment a link or a route (either family) appears or changes (a new pod veth), so a
//! new pod does not wait for the periodic pass.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use futures::StreamExt;
use rtnetlink::{
    MulticastGroup, RouteMessageBuilder,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        address::AddressAttribute,
        link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    },
};
use tokio::{sync::Notify, task::AbortHandle};

use crate::netlink;

/// A netlink failure while reading the namespace's interfaces.
#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error("open rtnetlink: {0}")]
    Connection(#[source] std::io::Error),
    #[error("subscribe to link and route events: {0}")]
    Subscribe(#[source] std::io::Error),
    #[error("{what}: {source}")]
    Dump {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
}

/// Interfaces, addresses and routes of the namespace at one moment.
#[derive(Debug, Clone, Default)]
pub struct LinkSnapshot {
    /// ifindex -> name.
    pub names: BTreeMap<u32, String>,
    /// ifindex -> MTU.
    pub mtus: BTreeMap<u32, u32>,
    /// ifindexes of the veth links that are not a bridge's port (a ptp pod veth, or one the
    /// CNI has not wired yet).
    pub veths: BTreeSet<u32>,
    /// IPv4 address -> ifindex holding it.
    pub addresses: BTreeMap<Ipv4Addr, u32>,
    /// Unicast IPv4 routes with an output interface: (destination, prefix length, oif).
    pub routes: Vec<(Ipv4Addr, u8, u32)>,
    /// Unicast IPv6 routes with an output interface: (destination, prefix length, oif).
    pub routes6: Vec<(Ipv6Addr, u8, u32)>,
}

impl LinkSnapshot {
    /// The interface of the most specific unicast route covering `ip`, unless it is `exclude`
    /// (the tunnel) or the device holding the node's own address.
    pub fn route_iface(&self, ip: impl Into<IpAddr>, exclude: &[u32]) -> Option<(u32, &str)> {
        let ip = ip.into();
        let routes = self
            .routes
            .iter()
            .map(|(dst, len, oif)| (IpAddr::V4(*dst), *len, *oif))
            .chain(
                self.routes6
                    .iter()
                    .map(|(dst, len, oif)| (IpAddr::V6(*dst), *len, *oif)),
            );
        let mut best: Option<(u8, u32)> = None;
        for (dst, len, oif) in routes {
            let Ok(net) = ipnet::IpNet::new(dst, len) else {
                continue;
            };
            if net.contains(&ip) && best.is_none_or(|(l, _)| len > l) {
                best = Some((len, oif));
            }
        }
        let (_, oif) = best?;
        if exclude.contains(&oif) {
            return None;
        }
        self.names.get(&oif).map(|n| (oif, n.as_str()))
    }

    /// The interface holding `ip`.
    pub fn address_iface(&self, ip: Ipv4Addr) -> Option<(u32, &str)> {
        let index = *self.addresses.get(&ip)?;
        self.names.get(&index).map(|n| (index, n.as_str()))
    }
}

/// An rtnetlink connection in the namespace of the thread that opened it.
#[derive(Debug)]
pub struct Links {
    netlink: netlink::Connection,
}

/// Names the dump that failed.
fn dump_error(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> LinksError {
    move |source| LinksError::Dump { what, source }
}

/// A unicast route with an output interface: (destination, `None` for a default route;
/// prefix length; oif).
fn unicast_route(r: &RouteMessage) -> Option<(Option<IpAddr>, u8, u32)> {
    if r.header.kind != RouteType::Unicast {
        return None;
    }
    let mut dst = None;
    let mut oif = None;
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    Some((dst, r.header.destination_prefix_length, oif?))
}

fn link_name(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

impl Links {
    /// Opens the connection on the current tokio runtime.
    pub fn new() -> Result<Self, LinksError> {
        let netlink = netlink::Connection::open().map_err(LinksError::Connection)?;
        Ok(Self { netlink })
    }

    /// Dumps links, IPv4 addresses and IPv4 unicast routes.
    pub async fn snapshot(&self) -> Result<LinkSnapshot, LinksError> {
        let mut out = LinkSnapshot::default();
        let links = self
            .netlink
            .links()
            .await
            .map_err(dump_error("list links"))?;
        for link in &links {
            if let Some(name) = link_name(link) {
                out.names.insert(link.header.index, name);
            }
            if let Some(mtu) = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            }) {
                out.mtus.insert(link.header.index, mtu);
            }
            let veth = link.attributes.iter().any(|a| {
                matches!(a, LinkAttribute::LinkInfo(infos)
                    if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
            });
            let port = link
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Controller(_)));
            if veth && !port {
                out.veths.insert(link.header.index);
            }
        }
        let addresses = self
            .netlink
            .addresses()
            .await
            .map_err(dump_error("list addresses"))?;
        for a in &addresses {
            for attr in &a.attributes {
                if let AddressAttribute::Address(std::net::IpAddr::V4(ip))
                | AddressAttribute::Local(std::net::IpAddr::V4(ip)) = attr
                {
                    out.addresses.insert(*ip, a.header.index);
                }
            }
        }
        let routes = self
            .netlink
            .routes(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .await
            .map_err(dump_error("list IPv4 routes"))?;
        for (dst, len, oif) in routes.iter().filter_map(unicast_route) {
            match dst {
                None => out.routes.push((Ipv4Addr::UNSPECIFIED, len, oif)),
                Some(IpAddr::V4(a)) => out.routes.push((a, len, oif)),
                Some(IpAddr::V6(_)) => {}
            }
        }
        // A namespace with IPv6 disabled has no IPv6 routes to name pods by.
        let routes6 = self
            .netlink
            .routes(RouteMessageBuilder::<Ipv6Addr>::new().build())
            .await;
        for (dst, len, oif) in routes6.iter().flatten().filter_map(unicast_route) {
            match dst {
                None => out.routes6.push((Ipv6Addr::UNSPECIFIED, len, oif)),
                Some(IpAddr::V6(a)) => out.routes6.push((a, len, oif)),
                Some(IpAddr::V4(_)) => {}
            }
        }
        Ok(out)
    }
}

/// Wakes a [`Notify`] whenever a link or a route of the namespace is added or changed (the
/// rtnetlink link, IPv4 route and IPv6 route multicast groups), until dropped.
#[derive(Debug)]
pub struct LinkWatch {
    tasks: [AbortHandle; 2],
}

impl LinkWatch {
    /// Subscribes in the namespace of the calling thread, on the current tokio runtime.
    pub fn start(changed: Arc<Notify>) -> Result<Self, LinksError> {
        let (connection, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Route,
        ])
        .map_err(LinksError::Subscribe)?;
        let driver = tokio::spawn(connection).abort_handle();
        let reader = tokio::spawn(async move {
            while let Some((message, _)) = messages.next().await {
                if let NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::NewRoute(_),
                ) = message.payload
                {
                    changed.notify_one();
                }
            }
            tracing::warn!("link event subscription ended; new veths wait for the next pass");
        })
        .abort_handle();
        Ok(Self {
            tasks: [driver, reader],
        })
    }
}

impl Drop for LinkWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_route_names_the_pod_veth() {
        let snap = LinkSnapshot {
            names: BTreeMap::from([(2, "eth0".into()), (5, "veth1".into()), (9, "wm0".into())]),
            mtus: BTreeMap::new(),
            addresses: BTreeMap::from([(Ipv4Addr::new(10, 213, 0, 11), 2)]),
            routes: vec![
                (Ipv4Addr::UNSPECIFIED, 0, 2),
                (Ipv4Addr::new(10, 244, 1, 0), 24, 2),
                (Ipv4Addr::new(10, 244, 1, 11), 32, 5),
                (Ipv4Addr::new(10, 244, 2, 0), 24, 9),
            ],
            ..LinkSnapshot::default()
        };
        assert_eq!(
            snap.route_iface(Ipv4Addr::new(10, 244, 1, 11), &[9]),
            Some((5, "veth1"))
        );
        // A pod without its own route (not wired yet) falls to the broader one, which is
        // excluded when it is the tunnel.
        assert_eq!(snap.route_iface(Ipv4Addr::new(10, 244, 2, 7), &[9]), None);
        assert_eq!(
            snap.address_iface(Ipv4Addr::new(10, 213, 0, 11)),
            Some((2, "eth0"))
        );
    }
}
