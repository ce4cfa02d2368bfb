//! Kernel routing state the agent owns: the tunnel interface's link state (up, MTU) and one route
//! per remote pod prefix pointing at the tunnel interface. Behind the small [`Routes`] trait so the
//! reconciler can be unit-tested with [`fake::FakeRoutes`]; [`netlink::NetlinkRoutes`] is the
//! rtnetlink implementation.
//!
//! Our routes are marked with the route protocol [`ROUTE_PROTOCOL`] so that listing (restore) and
//! garbage collection never touch routes that someone else installed.

use std::{future::Future, io, net::IpAddr};

use ipnet::IpNet;

pub mod fake;
pub mod netlink;

/// `rtm_protocol` of every route the agent installs (`ip route show proto 87`).
pub const ROUTE_PROTOCOL: u8 = 87;

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
}

/// Routing operations on one network namespace (the one the agent runs in).
pub trait Routes: Send + Sync + 'static {
    /// Sets the interface up with the given MTU.
    fn link_up(
        &self,
        ifname: &str,
        mtu: u32,
    ) -> impl Future<Output = Result<(), RoutesError>> + Send;

    /// The destination prefixes of our routes (by [`ROUTE_PROTOCOL`]) through `ifname` in the main
    /// table. An absent interface has no routes.
    fn list(&self, ifname: &str) -> impl Future<Output = Result<Vec<IpNet>, RoutesError>> + Send;

    /// Routes `dst` to `ifname` (replacing a route to the same prefix).
    fn add(&self, ifname: &str, dst: IpNet)
    -> impl Future<Output = Result<(), RoutesError>> + Send;

    /// Removes our route to `dst` through `ifname`; a route that is already gone is not an error.
    fn del(&self, ifname: &str, dst: IpNet)
    -> impl Future<Output = Result<(), RoutesError>> + Send;

    /// The MTU of the interface that holds `address` (the underlay), to size the tunnel MTU.
    fn mtu_of_address(
        &self,
        address: IpAddr,
    ) -> impl Future<Output = Result<u32, RoutesError>> + Send;
}
