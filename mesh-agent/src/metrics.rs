//! Prometheus metrics of the agent (prefix `wiremesh`), registered once in a
//! prometheus-client [`Registry`] and served on `/metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Labels of [`Metrics::invalid_annotations`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InvalidAnnotationLabels {
    pub node: String,
    pub reason: String,
}

/// Labels of [`Metrics::reconciles`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Labels of [`Metrics::peer_last_handshake`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

/// Every metric the agent exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Times a distinct invalid annotation set of another node was seen (once per node and
    /// rejected value, not once per reconcile).
    pub invalid_annotations: Family<InvalidAnnotationLabels, Counter>,
    /// Reconcile passes by outcome.
    pub reconciles: Family<ResultLabels, Counter>,
    /// Duration of reconcile passes.
    pub reconcile_duration: Histogram,
    /// Peers configured on the device.
    pub peers_configured: Gauge,
    /// Peers the mesh wants (valid remote nodes).
    pub peers_expected: Gauge,
    /// Remote nodes skipped because of invalid annotations.
    pub nodes_rejected: Gauge,
    /// Routes the agent installed through the tunnel.
    pub routes: Gauge,
    /// 1 when `MeshEncryption default` has `enabled: true`.
    pub mesh_enabled: Gauge,
    /// Unix time of the last handshake with each peer node (absent: none yet).
    pub peer_last_handshake: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    /// Writes of this node's annotations (key publication and status) to the API server.
    pub node_patches: Family<ResultLabels, Counter>,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            invalid_annotations: Family::default(),
            reconciles: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.0005, 4.0, 10)),
            peers_configured: Gauge::default(),
            peers_expected: Gauge::default(),
            nodes_rejected: Gauge::default(),
            routes: Gauge::default(),
            mesh_enabled: Gauge::default(),
            peer_last_handshake: Family::default(),
            node_patches: Family::default(),
        };
        registry.register(
            "invalid_annotations",
            "Invalid wiremesh annotations seen on other nodes (by node and reason)",
            metrics.invalid_annotations.clone(),
        );
        registry.register(
            "reconciles",
            "Reconcile passes of the mesh by result",
            metrics.reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconcile passes",
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "peers_configured",
            "WireGuard peers configured on this node's device",
            metrics.peers_configured.clone(),
        );
        registry.register(
            "peers_expected",
            "WireGuard peers this node should have (valid remote nodes)",
            metrics.peers_expected.clone(),
        );
        registry.register(
            "nodes_rejected",
            "Remote nodes skipped because of invalid annotations",
            metrics.nodes_rejected.clone(),
        );
        registry.register(
            "routes",
            "Routes through the tunnel interface installed by the agent",
            metrics.routes.clone(),
        );
        registry.register(
            "mesh_enabled",
            "1 when MeshEncryption default is enabled",
            metrics.mesh_enabled.clone(),
        );
        registry.register(
            "peer_last_handshake_timestamp_seconds",
            "Unix time of the last completed handshake with each peer node",
            metrics.peer_last_handshake.clone(),
        );
        registry.register(
            "node_patches",
            "Patches of this node's annotations by result",
            metrics.node_patches.clone(),
        );
        metrics
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn names_carry_the_prefix_and_labels() {
        let mut registry = Registry::with_prefix("wiremesh");
        let metrics = Metrics::new(&mut registry);
        metrics
            .invalid_annotations
            .get_or_create(&InvalidAnnotationLabels {
                node: "n2".into(),
                reason: "InvalidPublicKey".into(),
            })
            .inc();
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"wiremesh_invalid_annotations_total{node="n2",reason="InvalidPublicKey"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("wiremesh_peers_configured 0"), "{text}");
    }
}
