//! Kernel routing state the agent owns: the tunnel interface's link state (up, MTU), one route per
//! remote pod prefix pointing at the tunnel interface, and the policy rule that makes the kernel
//! consult those routes. Behind the small [`Routes`] trait so the reconciler can be unit-tested
//! with [`fake::FakeRoutes`]; [`netlink::NetlinkRoutes`] is the rtnetlink implementation.
//!
//! Routes of others are never overwritten: ours live in a routing table of our own (default
//! [`DEFAULT_ROUTE_TABLE`]), each marked with the route protocol [`ROUTE_PROTOCOL`], and an `ip
//! rule` of ours ([`RULE_PRIORITY`], ahead of the main table's 32766) sends every lookup through
//! that table first; a prefix with no route there falls through to the main table, where a CNI's
//! routes stay untouched. Listing and garbage collection only ever touch routes with our protocol
//! in our table, adding never replaces a route of someone else (one of ours through the other
//! tunnel device is moved with a `replace`: a rotation), and disabling the mesh removes our rule
//! and table so the previous routing is back as it was.

use std::{future::Future, io, net::IpAddr};

use ipnet::IpNet;

pub mod fake;
pub mod netlink;

/// `rtm_protocol` of every route and rule the agent installs (`ip route show table 87 proto 87`).
pub const ROUTE_PROTOCOL: u8 = 87;

/// The routing table of the agent's routes unless `--route-table` says otherwise.
pub const DEFAULT_ROUTE_TABLE: u32 = 87;

/// Priority of the agent's `ip rule` (`lookup <table>`): after the local table (0), before the
/// main table (32766).
pub const RULE_PRIORITY: u32 = 32087;

/// A failed routing operation, with the interface and prefix it concerned.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("interface {ifname} not found")]
    NoSuchInterface { ifname: String },
    #[error("no interface holds address {address}")]
    NoSuchAddress { address: IpAddr },
    #[error("{operation} on {ifname}: {source}")]
    Netlink {
        operation: String,
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("netlink connection: {0}")]
    Connection(#[source] io::Error),
    #[error("{operation} on {ifname}: {message}")]
    Invalid {
        operation: String,
        ifname: String,
        message: String,
    },
    #[error(
        "route table {table} already holds a route to {dst} that wiremesh did not create; \
         it is left alone (pick another table with --route-table)"
    )]
    Foreign { table: u32, dst: IpNet },
}

/// `rp_filter` the agent sets on every tunnel device: loose (a source must be routable through
/// some interface, not necessarily this one). During a key rotation a peer's packets arrive on the
/// next world's device while this node still routes that peer's prefixes through the current one
/// (each side switches each peer on its own, docs/rotation.md); strict mode (1, the default of
/// some distributions) would drop them. The kernel uses the larger of `conf/all` and the device's
/// value, so 2 on the device is loose whatever `all` says — but only on a device with an IPv4
/// address: the kernel's reverse-path check (`fib_validate_source`) drops a packet whose source
/// is routed through another device when the ingress device has no address, for any non-zero
/// `rp_filter`. Hence [`TUNNEL_ADDRESS`].
pub const RP_FILTER_LOOSE: u32 = 2;

/// The address the agent puts on every tunnel device (`/32`, `scope host`) so that loose
/// reverse-path filtering is loose there (see [`RP_FILTER_LOOSE`]). Host scope: the kernel never
/// picks it as the source of a packet routed through the tunnel (our routes are link scope).
/// Link-local, the same on both tunnel devices; only a local route to itself comes with it.
pub const TUNNEL_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 87, 1);

/// The tunnel interface as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    pub ifindex: u32,
    pub up: bool,
    pub mtu: u32,
    /// The device's own IPv4 `rp_filter` (`None`: the kernel reported no IPv4 settings).
    pub rp_filter: Option<u32>,
    /// The device holds [`TUNNEL_ADDRESS`].
    pub tunnel_address: bool,
}

impl LinkState {
    /// Up, with `mtu`, a loose `rp_filter` and [`TUNNEL_ADDRESS`]: what every tunnel device of
    /// the agent must be.
    pub fn is_ready(&self, mtu: u32) -> bool {
        self.up && self.mtu == mtu && self.rp_filter == Some(RP_FILTER_LOOSE) && self.tunnel_address
    }
}

/// Routing operations on one network namespace (the one the agent runs in), in the agent's own
/// routing table.
pub trait Routes: Send + Sync + 'static {
    /// The interface's index, administrative state and MTU; `None` when it does not exist.
    fn link(
        &self,
        ifname: &str,
    ) -> impl Future<Output = Result<Option<LinkState>, RoutesError>> + Send;

    /// Sets the interface up with the given MTU, a loose `rp_filter` ([`RP_FILTER_LOOSE`]) and
    /// [`TUNNEL_ADDRESS`].
    fn link_up(
        &self,
        ifname: &str,
        mtu: u32,
    ) -> impl Future<Output = Result<(), RoutesError>> + Send;

    /// The destination prefixes of our routes (by [`ROUTE_PROTOCOL`]) through `ifname` in our
    /// table, as the kernel holds them now. An absent interface has no routes.
    fn list(&self, ifname: &str) -> impl Future<Output = Result<Vec<IpNet>, RoutesError>> + Send;

    /// Routes `dst` to `ifname` in our table. An identical route of ours is success; one of ours
    /// through another interface is replaced in one step (a rotation moving a peer between its
    /// two tunnel devices); any other route to `dst` in the table is [`RoutesError::Foreign`].
    fn add(&self, ifname: &str, dst: IpNet)
    -> impl Future<Output = Result<(), RoutesError>> + Send;

    /// Removes our route to `dst` through `ifname`; a route that is already gone is not an error.
    fn del(&self, ifname: &str, dst: IpNet)
    -> impl Future<Output = Result<(), RoutesError>> + Send;

    /// Makes sure our rule (`lookup <table>` at [`RULE_PRIORITY`]) exists for IPv4 and IPv6;
    /// returns how many rules it had to add.
    fn ensure_rule(&self) -> impl Future<Output = Result<usize, RoutesError>> + Send;

    /// Removes our rule and every route of ours in our table (through any interface); returns how
    /// many rules and routes it removed.
    fn remove_rule_and_table(&self) -> impl Future<Output = Result<usize, RoutesError>> + Send;

    /// The MTU of the interface that holds `address` (the underlay), to size the tunnel MTU.
    fn mtu_of_address(
        &self,
        address: IpAddr,
    ) -> impl Future<Output = Result<u32, RoutesError>> + Send;
}
