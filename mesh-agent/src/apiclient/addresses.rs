//! The agent's watch of its own addresses (rtnetlink IPv4 and IPv6 address multicast groups):
//! when an address leaves the node, the API connections from it are closed at once
//! ([`super::Connections::close_from`]) instead of when keepalive gives up on them, so the
//! agent's watches reconnect from the node's current address and see its Node's new address
//! within about a second (docs/faults.md, the underlay readdress).

use std::net::IpAddr;

use futures::StreamExt;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use rtnetlink::{
    MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        address::{AddressAttribute, AddressMessage},
    },
};

use super::Connections;
use crate::drain::Drain;

/// Why API connections were closed by the agent.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

const ADDRESS_REMOVED: ReasonLabels = ReasonLabels {
    reason: "address_removed",
};

/// The metrics of the agent's API connections.
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    closed: Family<ReasonLabels, Counter>,
}

impl ConnectionMetrics {
    /// Registers `api_connections_closed_total{reason}` (`address_removed`, present from the
    /// start at 0).
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        // Shown at 0 before anything is closed.
        let _ = metrics.closed.get_or_create(&ADDRESS_REMOVED);
        registry.register(
            "api_connections_closed",
            "API server connections the agent closed itself, by reason",
            metrics.closed.clone(),
        );
        metrics
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct AddressWatch {
    connections: Connections,
    metrics: ConnectionMetrics,
}

impl AddressWatch {
    /// Closes connections of `connections` whose address goes.
    pub fn new(connections: Connections, metrics: ConnectionMetrics) -> Self {
        Self {
            connections,
            metrics,
        }
    }

    /// Subscribes in the namespace of the calling thread and closes connections until the
    /// drain. Without the subscription (or when it ends) the agent relies on TCP keepalive
    /// alone, as it did before; that is logged and the task waits for the drain.
    pub async fn run(self, mut drain: Drain) {
        let subscribed = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
        ]);
        let (connection, _handle, mut messages) = match subscribed {
            Ok(subscribed) => subscribed,
            Err(error) => {
                tracing::warn!(%error, "no address event subscription; API connections from a removed address wait for keepalive");
                drain.signaled().await;
                return;
            }
        };
        let driver = tokio::spawn(connection).abort_handle();
        loop {
            tokio::select! {
                () = drain.signaled() => break,
                message = messages.next() => match message {
                    Some((message, _)) => {
                        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(removed)) = message.payload {
                            for ip in addresses(&removed) {
                                self.address_removed(ip);
                            }
                        }
                    }
                    None => {
                        tracing::warn!("address event subscription ended; API connections from a removed address wait for keepalive");
                        drain.signaled().await;
                        break;
                    }
                },
            }
        }
        driver.abort();
    }

    fn address_removed(&self, ip: IpAddr) {
        let closed = self.connections.close_from(ip);
        if closed > 0 {
            self.metrics
                .closed
                .get_or_create(&ADDRESS_REMOVED)
                .inc_by(closed as u64);
            tracing::info!(
                address = %ip,
                connections = closed,
                "address removed: closed the API connections from it; their watches reconnect from the node's current address"
            );
        }
    }
}

/// The addresses an address message names: the local one and (the same but on point-to-point
/// links) the address attribute.
fn addresses(message: &AddressMessage) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for attribute in &message.attributes {
        if let AddressAttribute::Local(ip) | AddressAttribute::Address(ip) = attribute
            && !out.contains(ip)
        {
            out.push(*ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use tokio::net::{TcpListener, TcpSocket};

    use super::*;

    #[test]
    fn a_removed_address_is_read_from_local_and_address_attributes() {
        let mut message = AddressMessage::default();
        let v4: IpAddr = Ipv4Addr::new(10, 213, 0, 13).into();
        message.attributes = vec![
            AddressAttribute::Address(v4),
            AddressAttribute::Local(v4),
            AddressAttribute::Label("eth0".into()),
        ];
        assert_eq!(addresses(&message), vec![v4]);
        let v6: IpAddr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 13).into();
        message.attributes = vec![AddressAttribute::Address(v6)];
        assert_eq!(addresses(&message), vec![v6]);
    }

    #[tokio::test]
    async fn a_removed_address_closes_its_connections_counts_them_once_each() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let removed = Ipv4Addr::new(127, 0, 0, 2);
        let connections = Connections::default();
        let mut tracked = Vec::new();
        for _ in 0..2 {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind((removed, 0).into()).unwrap();
            let (client, _) = tokio::join!(
                socket.connect(listener.local_addr().unwrap()),
                listener.accept()
            );
            tracked.push(connections.track(client.unwrap()).unwrap());
        }
        let mut registry = Registry::default();
        let metrics = ConnectionMetrics::new(&mut registry);
        let watch = AddressWatch::new(connections, metrics.clone());
        watch.address_removed(removed.into());
        watch.address_removed(removed.into());
        assert_eq!(metrics.closed.get_or_create(&ADDRESS_REMOVED).get(), 2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("api_connections_closed_total{reason=\"address_removed\"} 2"),
            "{text}"
        );
    }
}
