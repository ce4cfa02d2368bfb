//! The agent's Kubernetes client: kube's own middleware stack (base URI, retries of 429/503/504,
//! authentication, extra headers) over an HTTPS connector whose TCP connections detect a dead
//! API server path within seconds: keepalive probes after [`KEEPALIVE_IDLE`] idle, every
//! [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_RETRIES`] times, and `TCP_USER_TIMEOUT`
//! ([`USER_TIMEOUT`]) for data that is never acknowledged.
//!
//! Every connection is registered by its local address ([`Connections`]): when an address
//! leaves the node, [`AddressWatch`] closes the connections from it at once rather than when
//! keepalive gives up on them.
//!
//! Why: kube's default client has neither, and an HTTP/1.1 watch carries nothing while nothing
//! changes, so a connection whose path died silently (the node's address changed, a NAT or
//! load balancer forgot it, the API server host vanished) stays "open" until the watcher's
//! idle timeout (~5 minutes): the agent would miss every change meanwhile, its own Node's new
//! address included (docs/faults.md, the underlay readdress fault). client-go closes the same
//! gap with HTTP/2 health-check pings.

mod addresses;
mod connections;

use std::time::Duration;

use hyper_util::{
    client::legacy::{Builder, connect::HttpConnector},
    rt::TokioExecutor,
};
use kube::{Client, Config, client::ConfigExt};
use tower::ServiceBuilder;

pub use self::{
    addresses::{AddressWatch, ConnectionMetrics},
    connections::{Connections, Tracked, TrackingConnector},
};

/// Idle time before the first keepalive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the connection is dropped.
pub const KEEPALIVE_RETRIES: u32 = 3;
/// How long sent data may stay unacknowledged before the connection is dropped.
pub const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for `config` over connections with keepalive and a user timeout, registered in
/// [`Connections::shared`] (see the module docs).
pub fn client(config: Config) -> Result<Client, kube::Error> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    http.set_keepalive(Some(KEEPALIVE_IDLE));
    http.set_keepalive_interval(Some(KEEPALIVE_INTERVAL));
    http.set_keepalive_retries(Some(KEEPALIVE_RETRIES));
    http.set_tcp_user_timeout(Some(USER_TIMEOUT));
    let tracking = TrackingConnector::new(http, Connections::shared().clone());
    let https = config.rustls_https_connector_with_connector(tracking)?;
    let hyper = Builder::new(TokioExecutor::new()).build(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then_some(tower::retry::RetryLayer::new(
                    kube::client::retry::RetryPolicy::server_retry(),
                )),
        )
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(hyper);
    Ok(kube::client::ClientBuilder::new(service, config.default_namespace).build())
}
