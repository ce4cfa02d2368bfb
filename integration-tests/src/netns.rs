//! Nodes and pods as network namespaces.
//!
//! A node is a namespace attached to the underlay bridge by a veth (`eth0` inside, 10.213.<k>.(10+i)/24,
//! default route via the bridge IP, IPv4 forwarding on). A pod is a namespace behind a veth in its
//! node's namespace, wired the way the ptp CNI plugin does it: the pod's `eth0` has a /32 from the
//! node's podCIDR and a link-scope route to the gateway (the podCIDR's first address), which sits on
//! the node end of the veth; the node routes the pod's /32 to that veth.
//!
//! Between nodes the underlay can carry pod traffic in plaintext, as a cloud route table would: every
//! node routes each other node's podCIDR via that node's underlay IP with metric
//! [`PLAINTEXT_ROUTE_METRIC`], so a mesh route to the same prefix with a lower metric wins, and removing
//! it falls back to plaintext. An `unreachable` route for [`POD_SUPERNET`] in every node keeps pod
//! traffic without any route from leaving through the node's default route to the host.
//!
//! Dual stack ([`create_node`] with `dual_stack`): the node also gets a second podCIDR
//! fd00:10:244:<index>::/64 ([`pod_cidr6`]) and an IPv6 underlay address fd00:213:<k>::(10+i)/64
//! on the same bridge (for the plaintext routes only: tunnel endpoints stay IPv4); its pods get
//! fd00:10:244:<index>::(10+j)/128 behind the same veth, with the gateway fd00:10:244:<index>::1,
//! wired like the IPv4 side. Single stack keeps IPv6 off in every namespace.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::{
    command::{self, CommandError},
    ledger::{Ledger, Resource},
    names::ClusterId,
    underlay::UnderlayLease,
};

/// Why a node or pod network could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// An `ip` or `sysctl` command failed.
    #[error("{what}: {source}")]
    Command {
        /// What was being built.
        what: String,
        /// The failure.
        #[source]
        source: CommandError,
    },
    /// The address plan has no room for this index.
    #[error("{0}")]
    AddressPlan(String),
    /// A thread could not enter the namespace.
    #[error("entering network namespace {netns}: {source}")]
    Enter {
        /// The namespace.
        netns: String,
        /// The I/O error (open or setns).
        #[source]
        source: std::io::Error,
    },
}

/// All podCIDRs are inside this /16.
pub const POD_SUPERNET: &str = "10.244.0.0/16";

/// All IPv6 podCIDRs (dual stack) are inside this /48.
pub const POD_SUPERNET6: &str = "fd00:10:244::/48";

/// Metric of the plaintext underlay routes between nodes' podCIDRs (higher loses).
pub const PLAINTEXT_ROUTE_METRIC: u32 = 1000;

/// The network side of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNetwork {
    /// 1-based node index (address plan position).
    pub index: u32,
    /// Network namespace name.
    pub netns: String,
    /// Host end of the underlay veth (attached to the bridge).
    pub host_link: String,
    /// Underlay interface inside the node namespace.
    pub underlay_link: String,
    /// Underlay address.
    pub underlay_ip: Ipv4Addr,
    /// The node's podCIDR: 10.244.<index>.0/24.
    pub pod_cidr: Ipv4Net,
    /// Gateway address of its pods (first address of the podCIDR, on every pod veth in the node).
    pub pod_gateway: Ipv4Addr,
    /// Dual stack: the node's IPv6 podCIDR fd00:10:244:<index>::/64.
    pub pod_cidr6: Option<Ipv6Net>,
    /// Dual stack: its IPv6 underlay address (plaintext routes only).
    pub underlay_ip6: Option<Ipv6Addr>,
}

impl NodeNetwork {
    /// The IPv6 gateway of its pods (`::1` of the IPv6 podCIDR), if dual stack.
    pub fn pod_gateway6(&self) -> Option<Ipv6Addr> {
        self.pod_cidr6
            .map(|c| Ipv6Addr::from(u128::from(c.network()) | 1))
    }
}

/// The network side of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetwork {
    /// Network namespace name.
    pub netns: String,
    /// The node namespace it hangs off.
    pub node_netns: String,
    /// The veth end in the node namespace.
    pub node_link: String,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// Its IPv6 address (dual stack).
    pub ip6: Option<Ipv6Addr>,
}

/// The podCIDR of node `index`: 10.244.<index>.0/24.
pub fn pod_cidr(node_index: u32) -> Option<Ipv4Net> {
    let third = u8::try_from(node_index).ok()?;
    Ipv4Net::new(Ipv4Addr::new(10, 244, third, 0), 24).ok()
}

/// The IPv6 podCIDR of node `index` (dual stack): fd00:10:244:<index>::/64.
pub fn pod_cidr6(node_index: u32) -> Option<Ipv6Net> {
    let fourth = u16::try_from(node_index).ok()?;
    Ipv6Net::new(Ipv6Addr::new(0xfd00, 0x10, 0x244, fourth, 0, 0, 0, 0), 64).ok()
}

fn step<'a>(what: &'a str) -> impl Fn(CommandError) -> NetnsError + 'a {
    move |source| NetnsError::Command {
        what: what.to_owned(),
        source,
    }
}

/// `sysctl -w` inside a namespace (sysctls under /proc/sys/net are per network namespace).
fn sysctl_in(netns: &str, settings: &[&str]) -> Result<(), CommandError> {
    let mut argv = vec!["sysctl", "-q", "-w"];
    argv.extend_from_slice(settings);
    command::run_in(netns, argv).map(|_| ())
}

/// Creates node `index`'s namespace and underlay link, recording both in `ledger`; with
/// `dual_stack` also its IPv6 side (module docs).
pub fn create_node(
    id: &ClusterId,
    lease: &UnderlayLease,
    bridge: &str,
    index: u32,
    dual_stack: bool,
    ledger: &mut Ledger,
) -> Result<NodeNetwork, NetnsError> {
    let underlay_ip = lease.node_ip(index).ok_or_else(|| {
        NetnsError::AddressPlan(format!("node index {index} is outside the underlay /24"))
    })?;
    let pod_cidr = pod_cidr(index)
        .ok_or_else(|| NetnsError::AddressPlan(format!("node index {index} has no podCIDR")))?;
    let node = NodeNetwork {
        index,
        netns: id.node_netns(index),
        host_link: id.node_host_link(index),
        underlay_link: "eth0".to_owned(),
        underlay_ip,
        pod_cidr,
        pod_gateway: pod_cidr.hosts().next().unwrap_or(pod_cidr.network()),
        pod_cidr6: None,
        underlay_ip6: None,
    };
    let node = if dual_stack {
        let cidr6 = pod_cidr6(index).ok_or_else(|| {
            NetnsError::AddressPlan(format!("node index {index} has no IPv6 podCIDR"))
        })?;
        let host = u16::try_from(index + 10)
            .map_err(|_| NetnsError::AddressPlan(format!("node index {index} too large")))?;
        NodeNetwork {
            pod_cidr6: Some(cidr6),
            underlay_ip6: Some(Ipv6Addr::new(
                0xfd00,
                0x213,
                u16::from(lease.index()),
                0,
                0,
                0,
                0,
                host,
            )),
            ..node
        }
    } else {
        node
    };
    let what = format!("node namespace {}", node.netns);
    let err = step(&what);
    let ns = node.netns.as_str();

    command::ip(["netns", "add", ns]).map_err(&err)?;
    ledger.push(Resource::Netns {
        name: node.netns.clone(),
    });
    command::ip([
        "link",
        "add",
        &node.host_link,
        "type",
        "veth",
        "peer",
        "name",
        &node.underlay_link,
        "netns",
        ns,
    ])
    .map_err(&err)?;
    ledger.push(Resource::HostLink {
        name: node.host_link.clone(),
    });
    crate::underlay::disable_ipv6_host(&node.host_link);
    command::ip(["link", "set", &node.host_link, "master", bridge, "up"]).map_err(&err)?;

    if dual_stack {
        sysctl_in(
            ns,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                // No router solicitations or autoconfiguration on the underlay.
                "net.ipv6.conf.default.accept_ra=0",
                "net.ipv6.conf.all.accept_ra=0",
            ],
        )
        .map_err(&err)?;
    } else {
        sysctl_in(
            ns,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )
        .map_err(&err)?;
    }
    command::ip_in(ns, ["link", "set", "lo", "up"]).map_err(&err)?;
    command::ip_in(
        ns,
        [
            "addr",
            "add",
            &format!("{underlay_ip}/24"),
            "dev",
            &node.underlay_link,
        ],
    )
    .map_err(&err)?;
    command::ip_in(ns, ["link", "set", &node.underlay_link, "up"]).map_err(&err)?;
    command::ip_in(
        ns,
        [
            "route",
            "add",
            "default",
            "via",
            &lease.bridge_ip().to_string(),
        ],
    )
    .map_err(&err)?;
    command::ip_in(ns, ["route", "add", "unreachable", POD_SUPERNET]).map_err(&err)?;
    if let Some(ip6) = node.underlay_ip6 {
        command::ip_in(
            ns,
            [
                "-6",
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                &node.underlay_link,
                "nodad",
            ],
        )
        .map_err(&err)?;
        command::ip_in(ns, ["-6", "route", "add", "unreachable", POD_SUPERNET6]).map_err(&err)?;
    }
    tracing::info!(netns = ns, underlay_ip = %underlay_ip, pod_cidr = %pod_cidr,
        pod_cidr6 = ?node.pod_cidr6, "node network up");
    Ok(node)
}

/// Creates pod `pod_index` of `node` (address 10.244.<node>.(10 + pod_index)), recording its namespace.
/// `mtu` sets the pod veth MTU (both ends), e.g. the tunnel MTU; `None` keeps 1500.
pub fn create_pod(
    id: &ClusterId,
    node: &NodeNetwork,
    pod_index: u32,
    mtu: Option<u32>,
    ledger: &mut Ledger,
) -> Result<PodNetwork, NetnsError> {
    let host = pod_index
        .checked_add(10)
        .and_then(|h| u8::try_from(h).ok())
        .filter(|h| *h < 255)
        .ok_or_else(|| {
            NetnsError::AddressPlan(format!("pod index {pod_index} is outside the podCIDR"))
        })?;
    let octets = node.pod_cidr.network().octets();
    let pod = PodNetwork {
        netns: id.pod_netns(node.index, pod_index),
        node_netns: node.netns.clone(),
        node_link: format!("veth{pod_index}"),
        ip: Ipv4Addr::new(octets[0], octets[1], octets[2], host),
        ip6: node
            .pod_cidr6
            .map(|c| Ipv6Addr::from(u128::from(c.network()) | u128::from(host))),
    };
    let what = format!("pod namespace {}", pod.netns);
    let err = step(&what);
    let (ns, node_ns) = (pod.netns.as_str(), node.netns.as_str());
    let gateway = node.pod_gateway.to_string();
    let pod_ip = pod.ip.to_string();

    command::ip(["netns", "add", ns]).map_err(&err)?;
    // The veth pair dies with the pod namespace, so the namespace is the only record needed.
    ledger.push(Resource::Netns {
        name: pod.netns.clone(),
    });
    if pod.ip6.is_none() {
        sysctl_in(
            ns,
            &[
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )
        .map_err(&err)?;
    }
    command::ip_in(
        node_ns,
        [
            "link",
            "add",
            &pod.node_link,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ],
    )
    .map_err(&err)?;
    if let Some(mtu) = mtu {
        let mtu = mtu.to_string();
        command::ip_in(node_ns, ["link", "set", &pod.node_link, "mtu", &mtu]).map_err(&err)?;
        command::ip_in(ns, ["link", "set", "eth0", "mtu", &mtu]).map_err(&err)?;
    }

    // Node side: the gateway address on the veth, a host route to the pod through it.
    command::ip_in(
        node_ns,
        [
            "addr",
            "add",
            &format!("{gateway}/32"),
            "dev",
            &pod.node_link,
        ],
    )
    .map_err(&err)?;
    command::ip_in(node_ns, ["link", "set", &pod.node_link, "up"]).map_err(&err)?;
    command::ip_in(
        node_ns,
        [
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            &pod.node_link,
            "scope",
            "link",
        ],
    )
    .map_err(&err)?;

    // Pod side: its /32, a link route to the gateway, the default route via the gateway.
    command::ip_in(ns, ["link", "set", "lo", "up"]).map_err(&err)?;
    command::ip_in(ns, ["addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"]).map_err(&err)?;
    command::ip_in(ns, ["link", "set", "eth0", "up"]).map_err(&err)?;
    command::ip_in(
        ns,
        ["route", "add", &gateway, "dev", "eth0", "scope", "link"],
    )
    .map_err(&err)?;
    command::ip_in(
        ns,
        ["route", "add", "default", "via", &gateway, "dev", "eth0"],
    )
    .map_err(&err)?;
    if let (Some(ip6), Some(gateway6)) = (pod.ip6, node.pod_gateway6()) {
        let (ip6, gateway6) = (ip6.to_string(), gateway6.to_string());
        let link = pod.node_link.as_str();
        let gw = format!("{gateway6}/128");
        command::ip_in(node_ns, ["-6", "addr", "add", &gw, "dev", link, "nodad"]).map_err(&err)?;
        let host = format!("{ip6}/128");
        command::ip_in(node_ns, ["-6", "route", "add", &host, "dev", link]).map_err(&err)?;
        command::ip_in(ns, ["-6", "addr", "add", &host, "dev", "eth0", "nodad"]).map_err(&err)?;
        command::ip_in(ns, ["-6", "route", "add", &gateway6, "dev", "eth0"]).map_err(&err)?;
        command::ip_in(
            ns,
            [
                "-6", "route", "add", "default", "via", &gateway6, "dev", "eth0",
            ],
        )
        .map_err(&err)?;
    }
    tracing::info!(netns = ns, node = node_ns, ip = %pod.ip, ip6 = ?pod.ip6, "pod network up");
    Ok(pod)
}

/// Routes `remote`'s podCIDR (and IPv6 podCIDR, dual stack) from `node` over the underlay in
/// plaintext (metric [`PLAINTEXT_ROUTE_METRIC`]).
pub fn add_plaintext_route(node: &NodeNetwork, remote: &NodeNetwork) -> Result<(), NetnsError> {
    if let (Some(cidr6), Some(via6), Some(_)) =
        (remote.pod_cidr6, remote.underlay_ip6, node.underlay_ip6)
    {
        let what = format!("plaintext route {cidr6} in {}", node.netns);
        command::ip_in(
            &node.netns,
            [
                "-6",
                "route",
                "add",
                &cidr6.to_string(),
                "via",
                &via6.to_string(),
                "metric",
                &PLAINTEXT_ROUTE_METRIC.to_string(),
            ],
        )
        .map_err(step(&what))?;
    }
    let what = format!("plaintext route {} in {}", remote.pod_cidr, node.netns);
    command::ip_in(
        &node.netns,
        [
            "route",
            "add",
            &remote.pod_cidr.to_string(),
            "via",
            &remote.underlay_ip.to_string(),
            "metric",
            &PLAINTEXT_ROUTE_METRIC.to_string(),
        ],
    )
    .map(|_| ())
    .map_err(step(&what))
}

/// Removes the plaintext route to `remote`'s podCIDR from `node`; a missing route counts as removed.
pub fn remove_plaintext_route(node: &NodeNetwork, remote: &NodeNetwork) -> Result<(), NetnsError> {
    if let (Some(cidr6), Some(via6)) = (remote.pod_cidr6, remote.underlay_ip6) {
        let what = format!("plaintext route {cidr6} in {}", node.netns);
        let metric = PLAINTEXT_ROUTE_METRIC.to_string();
        let (cidr6, via6) = (cidr6.to_string(), via6.to_string());
        let argv = [
            "-6", "route", "del", &cidr6, "via", &via6, "metric", &metric,
        ];
        match command::ip_in(&node.netns, argv) {
            Err(e) if !e.stderr().contains("No such process") => {
                return Err(NetnsError::Command { what, source: e });
            }
            _ => {}
        }
    }
    let what = format!("plaintext route {} in {}", remote.pod_cidr, node.netns);
    let metric = PLAINTEXT_ROUTE_METRIC.to_string();
    match command::ip_in(
        &node.netns,
        [
            "route",
            "del",
            &remote.pod_cidr.to_string(),
            "via",
            &remote.underlay_ip.to_string(),
            "metric",
            &metric,
        ],
    ) {
        Err(e) if !e.stderr().contains("No such process") => {
            Err(NetnsError::Command { what, source: e })
        }
        _ => Ok(()),
    }
}

/// Runs `f` on a new thread that has entered network namespace `netns` (setns moves only the calling
/// thread), and returns its result; sockets `f` opens live in that namespace. For async code, build a
/// current-thread runtime inside `f` so every socket is opened on that thread. A panic in `f` is
/// propagated.
pub fn within<R, F>(netns: &str, f: F) -> Result<R, NetnsError>
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    use std::os::fd::AsRawFd;
    let enter = |source| NetnsError::Enter {
        netns: netns.to_owned(),
        source,
    };
    let file =
        std::fs::File::open(std::path::Path::new("/run/netns").join(netns)).map_err(enter)?;
    let handle = std::thread::Builder::new()
        .name(format!("netns-{netns}"))
        .spawn(move || {
            // SAFETY: setns(2) on an open namespace fd; it changes only this new thread's namespace,
            // which ends with the thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            drop(file);
            Ok(f())
        })
        .map_err(enter)?;
    match handle.join() {
        Ok(result) => result.map_err(enter),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
