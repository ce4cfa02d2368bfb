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

/// Labels of [`Metrics::pod_claims_refused`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
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

/// Labels of [`Metrics::peers_by_handshake_age`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgeLabels {
    pub age: &'static str,
}

/// Labels of [`Metrics::ebpf_errors`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

/// Labels of the flow metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub verdict: &'static str,
}

/// Labels of [`Metrics::flow_history_evicted`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvictionLabels {
    pub reason: &'static str,
}

/// Labels of [`Metrics::api_requests`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub path: &'static str,
    pub code: u16,
}

/// Labels of [`Metrics::map_entries`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

/// Labels of [`Metrics::invalid_objects`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InvalidObjectLabels {
    pub kind: &'static str,
    pub reason: &'static str,
}

/// Labels of [`Metrics::datapath_info`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatapathLabels {
    pub kind: &'static str,
    pub reason: &'static str,
}

/// Labels of [`Metrics::datapath_repairs`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepairLabels {
    pub what: &'static str,
}

/// Labels of [`Metrics::rotation_phase`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

/// Labels of [`Metrics::rotation_step`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub step: &'static str,
}

/// Labels of [`Metrics::flow_coverage_flows`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: &'static str,
}

/// A gauge that is absent while it has no value (a family whose one series has no labels).
#[derive(Debug, Clone, Default)]
pub struct OptionalGauge(Family<Vec<(&'static str, &'static str)>, Gauge<f64, AtomicU64>>);

impl OptionalGauge {
    /// Sets the value (`None`: no series).
    pub fn set(&self, value: Option<f64>) {
        match value {
            Some(v) => {
                self.0.get_or_create(&Vec::new()).set(v);
            }
            None => self.0.clear(),
        }
    }

    /// The value, if set.
    pub fn get(&self) -> Option<f64> {
        self.0.get(&Vec::new()).map(|g| g.get())
    }
}

/// The agent's own place in key rotation (`wiremesh_rotation_phase{phase}`): `Idle` outside a
/// rotation, the KeyRotation phase (`Preparing`, `Switching`, `Retiring`) while it takes part in
/// an active one, `Complete` while moving into the new world after it, `Failed` while rolling back.
pub const ROTATION_PHASES: [&str; 6] = [
    "Idle",
    "Preparing",
    "Switching",
    "Retiring",
    "Complete",
    "Failed",
];

/// The agent's own rotation mark (`wiremesh_rotation_step{step}`): `none` without one.
pub const ROTATION_STEPS: [&str; 5] = ["none", "prepared", "switched", "retired", "aborted"];

/// Every metric the agent exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Times a distinct invalid annotation set of another node was seen (once per node and
    /// rejected value, not once per reconcile). Only the agent that reports the node
    /// ([`crate::events::is_emitter`]) exports it, and the series goes when the node is fixed or
    /// gone: one series per broken node cluster-wide.
    pub invalid_annotations: Family<InvalidAnnotationLabels, Counter>,
    /// Pod address claims refused or dropped (issue 13, findings 1 and 2), by Event reason.
    pub pod_claims_refused: Family<ReasonLabels, Gauge>,
    /// Peers by the age of their last handshake (`age`: `fresh` within 180 s, `stale`, `never`):
    /// bounded, unlike the per-peer series behind `--per-peer-metrics`.
    pub peers_by_handshake_age: Family<AgeLabels, Gauge>,
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
    /// Peers whose endpoint annotation names an address their Node no longer has (an underlay
    /// readdress not republished yet), sent to at their node address instead.
    pub stale_endpoints: Gauge,
    /// Routes the agent installed through the tunnel.
    pub routes: Gauge,
    /// Seconds since this node's current key was generated or promoted by a rotation.
    pub key_age_seconds: Gauge,
    /// 1 when `MeshEncryption default` has `enabled: true`.
    pub mesh_enabled: Gauge,
    /// 1 for the selected datapath, labelled with its kind and the reason it was chosen.
    pub datapath_info: Family<DatapathLabels, Gauge>,
    /// 1 while the selected device answers (0: the device process is gone, the link deleted).
    pub datapath_up: Gauge,
    /// Differences between the wanted state and what the device and routing table held, repaired
    /// by a resync (peers or routes missing or changed behind the agent's back, a recreated device,
    /// another key on the device).
    pub datapath_repairs: Family<RepairLabels, Counter>,
    /// Unix time of the last handshake with each peer node (absent: none yet). Only with
    /// `--per-peer-metrics`: N agents times N-1 peers is N² series cluster-wide.
    pub peer_last_handshake: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    /// Writes of this node's key annotations to its Node.
    pub node_patches: Family<ResultLabels, Counter>,
    /// Writes of this node's `MeshNode` status.
    pub status_writes: Family<ResultLabels, Counter>,
    /// 1 once the eBPF datapath is loaded.
    pub ebpf_loaded: Gauge,
    /// Local pods whose veth MTU exceeds the tunnel MTU (information: their packets too big for
    /// the tunnel get a PMTU error from the node, so they pay a round trip of path MTU discovery).
    pub pods_mtu_above_tunnel: Gauge,
    /// 1 while the eBPF config says strict mode.
    pub ebpf_strict: Gauge,
    /// eBPF failures by stage (load, netlink).
    pub ebpf_errors: Family<StageLabels, Counter>,
    /// Programs attached by this agent (two per pod veth, two on the underlay).
    pub bpf_attached_programs: Gauge,
    /// Entries of the policy maps and the ipcache as last written.
    pub map_entries: Family<MapLabels, Gauge>,
    /// Writes of a changed policy or ipcache to the maps, by result.
    pub policy_updates: Family<ResultLabels, Counter>,
    /// From reading the caches to the maps written, for passes that changed the maps.
    pub policy_apply_duration: Histogram,
    /// Steering passes by result.
    pub steering_passes: Family<ResultLabels, Counter>,
    /// Duration of steering passes.
    pub steering_duration: Histogram,
    /// Namespaces, Pods and NetworkPolicies left out of enforcement (once per distinct problem).
    pub invalid_objects: Family<InvalidObjectLabels, Counter>,
    /// New flows in the flow table by verdict.
    pub flows: Family<VerdictLabels, Counter>,
    /// Packets of flow records by verdict (drops included).
    pub flow_packets: Family<VerdictLabels, Counter>,
    /// Flows evicted from the bounded flow table.
    pub flows_evicted: Counter,
    /// Flows in the flow table.
    pub flow_table_flows: Gauge,
    /// Flow records the kernel dropped because the ring buffer was full.
    pub flow_events_lost: Gauge,
    /// (flow, minute) records deleted from the flow history, by reason (`retention`, `size`).
    pub flow_history_evicted: Family<EvictionLabels, Counter>,
    /// (flow, minute) records held in the flow history.
    pub flow_history_records: Gauge,
    /// Requests to the authenticated API listener by path and status code.
    pub api_requests: Family<ApiLabels, Counter>,
    /// Bytes received from all peers through the tunnel devices (both worlds during a
    /// rotation), from the devices' per-peer counters; a counter reset on the device (peer
    /// re-added, device restarted) is not a decrease.
    pub tunnel_receive_bytes: Counter,
    /// Bytes sent to all peers through the tunnel devices.
    pub tunnel_transmit_bytes: Counter,
    /// Bytes received from each peer node: only with `--per-peer-metrics`.
    pub peer_receive_bytes: Family<PeerLabels, Counter>,
    /// Bytes sent to each peer node: only with `--per-peer-metrics`.
    pub peer_transmit_bytes: Family<PeerLabels, Counter>,
    /// Unix time of the oldest last handshake among the configured peers that had one (the
    /// session closest to expiring; absent without any): bounded, for every node.
    pub peer_oldest_handshake: OptionalGauge,
    /// The `wiremesh.io/key-generation` this node publishes for its key in force.
    pub key_generation: Gauge,
    /// 1 for this node's rotation phase (one of [`ROTATION_PHASES`]), 0 for the others.
    pub rotation_phase: Family<PhaseLabels, Gauge>,
    /// 1 for this node's rotation mark (one of [`ROTATION_STEPS`]), 0 for the others.
    pub rotation_step: Family<StepLabels, Gauge>,
    /// Encrypted / cross-node pod flows this node recorded within the coverage window
    /// (`--flow-coverage-window-secs`); absent without a cross-node flow in the window.
    pub flow_coverage_ratio: OptionalGauge,
    /// Flows (5-tuples) this node recorded within the coverage window, by class (`encrypted`,
    /// `plaintext`, `dropped`, `other`).
    pub flow_coverage_flows: Family<ClassLabels, Gauge>,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            invalid_annotations: Family::default(),
            pod_claims_refused: Family::default(),
            peers_by_handshake_age: Family::default(),
            reconciles: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.0005, 4.0, 10)),
            peers_configured: Gauge::default(),
            peers_expected: Gauge::default(),
            nodes_rejected: Gauge::default(),
            stale_endpoints: Gauge::default(),
            routes: Gauge::default(),
            key_age_seconds: Gauge::default(),
            mesh_enabled: Gauge::default(),
            datapath_info: Family::default(),
            datapath_up: Gauge::default(),
            datapath_repairs: Family::default(),
            peer_last_handshake: Family::default(),
            node_patches: Family::default(),
            status_writes: Family::default(),
            ebpf_loaded: Gauge::default(),
            ebpf_strict: Gauge::default(),
            pods_mtu_above_tunnel: Gauge::default(),
            ebpf_errors: Family::default(),
            bpf_attached_programs: Gauge::default(),
            map_entries: Family::default(),
            policy_updates: Family::default(),
            policy_apply_duration: Histogram::new(exponential_buckets(0.0005, 4.0, 10)),
            steering_passes: Family::default(),
            steering_duration: Histogram::new(exponential_buckets(0.0005, 4.0, 10)),
            invalid_objects: Family::default(),
            flows: Family::default(),
            flow_packets: Family::default(),
            flows_evicted: Counter::default(),
            flow_table_flows: Gauge::default(),
            flow_history_evicted: Family::default(),
            flow_history_records: Gauge::default(),
            api_requests: Family::default(),
            flow_events_lost: Gauge::default(),
            tunnel_receive_bytes: Counter::default(),
            tunnel_transmit_bytes: Counter::default(),
            peer_receive_bytes: Family::default(),
            peer_transmit_bytes: Family::default(),
            peer_oldest_handshake: OptionalGauge::default(),
            key_generation: Gauge::default(),
            rotation_phase: Family::default(),
            rotation_step: Family::default(),
            flow_coverage_ratio: OptionalGauge::default(),
            flow_coverage_flows: Family::default(),
        };
        metrics.set_rotation("Idle", "none");
        metrics.set_coverage(&crate::coverage::CoverageCounts::default());
        registry.register(
            "invalid_annotations",
            "Invalid wiremesh annotations seen on other nodes (by node and reason)",
            metrics.invalid_annotations.clone(),
        );
        registry.register(
            "pod_claims_refused",
            "Pod address claims refused or dropped (outside the pod ranges, reserved, a node address, overlapping), by reason",
            metrics.pod_claims_refused.clone(),
        );
        registry.register(
            "peers_by_handshake_age",
            "Configured peers by the age of their last handshake (fresh: within 180 s, stale, never)",
            metrics.peers_by_handshake_age.clone(),
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
            "stale_endpoints",
            "Peers whose endpoint annotation names an address their Node no longer has, sent to \
             at their node address until they republish",
            metrics.stale_endpoints.clone(),
        );
        registry.register(
            "routes",
            "Routes through the tunnel interface installed by the agent",
            metrics.routes.clone(),
        );
        registry.register(
            "key_age_seconds",
            "Seconds since this node's current WireGuard key was generated or promoted by a key \
             rotation",
            metrics.key_age_seconds.clone(),
        );
        registry.register(
            "mesh_enabled",
            "1 when MeshEncryption default is enabled",
            metrics.mesh_enabled.clone(),
        );
        registry.register(
            "datapath_info",
            "The WireGuard device the agent drives (kind: kernel or userspace) and why",
            metrics.datapath_info.clone(),
        );
        registry.register(
            "datapath_up",
            "1 while the WireGuard device answers",
            metrics.datapath_up.clone(),
        );
        registry.register(
            "datapath_repairs",
            "Drift between the wanted state and the device or routing table repaired by a pass",
            metrics.datapath_repairs.clone(),
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
        registry.register(
            "meshnode_status_writes",
            "Writes of this node's MeshNode status by result",
            metrics.status_writes.clone(),
        );
        metrics.register_ebpf(registry);
        metrics.register_tunnel(registry);
        metrics
    }

    fn register_tunnel(&self, registry: &mut Registry) {
        registry.register(
            "tunnel_receive_bytes",
            "Bytes received from all peers through the WireGuard devices",
            self.tunnel_receive_bytes.clone(),
        );
        registry.register(
            "tunnel_transmit_bytes",
            "Bytes sent to all peers through the WireGuard devices",
            self.tunnel_transmit_bytes.clone(),
        );
        registry.register(
            "peer_receive_bytes",
            "Bytes received from each peer node through the WireGuard devices (--per-peer-metrics)",
            self.peer_receive_bytes.clone(),
        );
        registry.register(
            "peer_transmit_bytes",
            "Bytes sent to each peer node through the WireGuard devices (--per-peer-metrics)",
            self.peer_transmit_bytes.clone(),
        );
        registry.register(
            "peer_oldest_handshake_timestamp_seconds",
            "Unix time of the oldest last handshake among the configured peers",
            self.peer_oldest_handshake.0.clone(),
        );
        registry.register(
            "key_generation",
            "wiremesh.io/key-generation of this node's key in force",
            self.key_generation.clone(),
        );
        registry.register(
            "rotation_phase",
            "1 for the key rotation phase this node is in (Idle outside a rotation)",
            self.rotation_phase.clone(),
        );
        registry.register(
            "rotation_step",
            "1 for this node's key rotation mark (none without one)",
            self.rotation_step.clone(),
        );
        registry.register(
            "flow_coverage_ratio",
            "Encrypted / cross-node pod flows this node recorded within the coverage window",
            self.flow_coverage_ratio.0.clone(),
        );
        registry.register(
            "flow_coverage_flows",
            "Flows (5-tuples) this node recorded within the coverage window, by class",
            self.flow_coverage_flows.clone(),
        );
    }

    /// Sets the rotation state sets: `phase` (one of [`ROTATION_PHASES`]) and `step` (one of
    /// [`ROTATION_STEPS`]) to 1, every other value to 0 (a fixed set of series).
    pub fn set_rotation(&self, phase: &'static str, step: &'static str) {
        for p in ROTATION_PHASES {
            self.rotation_phase
                .get_or_create(&PhaseLabels { phase: p })
                .set(i64::from(p == phase));
        }
        for s in ROTATION_STEPS {
            self.rotation_step
                .get_or_create(&StepLabels { step: s })
                .set(i64::from(s == step));
        }
    }

    /// Sets the coverage metrics from the window's counts.
    pub fn set_coverage(&self, counts: &crate::coverage::CoverageCounts) {
        for class in crate::flows::FlowClass::ALL {
            self.flow_coverage_flows
                .get_or_create(&ClassLabels {
                    class: class.as_str(),
                })
                .set(i64::try_from(counts.get(class)).unwrap_or(i64::MAX));
        }
        self.flow_coverage_ratio.set(counts.ratio());
    }

    fn register_ebpf(&self, registry: &mut Registry) {
        registry.register(
            "ebpf_loaded",
            "1 once the eBPF datapath is loaded",
            self.ebpf_loaded.clone(),
        );
        registry.register(
            "pods_mtu_above_tunnel",
            "Local pods whose veth MTU exceeds the tunnel MTU (they rely on path MTU discovery)",
            self.pods_mtu_above_tunnel.clone(),
        );
        registry.register(
            "ebpf_strict_mode",
            "1 while the eBPF datapath drops cross-node pod traffic outside WireGuard",
            self.ebpf_strict.clone(),
        );
        registry.register(
            "ebpf_errors",
            "eBPF datapath failures by stage",
            self.ebpf_errors.clone(),
        );
        registry.register(
            "bpf_attached_programs",
            "tc programs attached by this agent",
            self.bpf_attached_programs.clone(),
        );
        registry.register(
            "bpf_map_entries",
            "Entries of the policy maps and the ipcache as last written",
            self.map_entries.clone(),
        );
        registry.register(
            "policy_updates",
            "Writes of changed policy or ipcache entries to the eBPF maps by result",
            self.policy_updates.clone(),
        );
        registry.register(
            "policy_apply_duration_seconds",
            "From reading the caches to the eBPF maps written, for passes that changed them",
            self.policy_apply_duration.clone(),
        );
        registry.register(
            "steering_passes",
            "eBPF steering passes by result",
            self.steering_passes.clone(),
        );
        registry.register(
            "steering_duration_seconds",
            "Duration of eBPF steering passes",
            self.steering_duration.clone(),
        );
        registry.register(
            "invalid_objects",
            "Namespaces, Pods and NetworkPolicies left out of enforcement (by kind and reason)",
            self.invalid_objects.clone(),
        );
        registry.register(
            "flows",
            "New flows in the flow table by verdict",
            self.flows.clone(),
        );
        registry.register(
            "flow_packets",
            "Packets of eBPF flow records by verdict (drops included)",
            self.flow_packets.clone(),
        );
        registry.register(
            "flows_evicted",
            "Flows evicted from the bounded flow table",
            self.flows_evicted.clone(),
        );
        registry.register(
            "flow_table_flows",
            "Flows held in the flow table",
            self.flow_table_flows.clone(),
        );
        registry.register(
            "flow_events_lost",
            "Flow records the kernel dropped because the ring buffer was full",
            self.flow_events_lost.clone(),
        );
        registry.register(
            "flow_history_evicted",
            "Flow history records (per flow and minute) deleted, by reason",
            self.flow_history_evicted.clone(),
        );
        registry.register(
            "flow_history_records",
            "Flow history records (per flow and minute) held on disk",
            self.flow_history_records.clone(),
        );
        registry.register(
            "api_requests",
            "Requests to the authenticated API listener by path and status code",
            self.api_requests.clone(),
        );
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

    fn encoded(registry: &Registry) -> String {
        let mut text = String::new();
        encode(&mut text, registry).unwrap();
        text
    }

    #[test]
    fn new_series_follow_the_naming_conventions_and_stay_bounded() {
        let mut registry = Registry::with_prefix("wiremesh");
        let metrics = Metrics::new(&mut registry);
        let text = encoded(&registry);
        // Fixed sets from the start: one phase and one step are 1.
        for phase in ROTATION_PHASES {
            let v = i32::from(phase == "Idle");
            assert!(
                text.contains(&format!("wiremesh_rotation_phase{{phase=\"{phase}\"}} {v}")),
                "{text}"
            );
        }
        assert!(
            text.contains("wiremesh_rotation_step{step=\"none\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("wiremesh_tunnel_receive_bytes_total 0"),
            "{text}"
        );
        assert!(
            text.contains("wiremesh_tunnel_transmit_bytes_total 0"),
            "{text}"
        );
        assert!(text.contains("wiremesh_key_generation 0"), "{text}");
        assert!(
            text.contains("wiremesh_flow_coverage_flows{class=\"plaintext\"} 0"),
            "{text}"
        );
        // Without a value the optional gauges are absent (an empty family is not exposed).
        assert!(!text.contains("wiremesh_flow_coverage_ratio"), "{text}");
        assert!(
            !text.contains("wiremesh_peer_oldest_handshake_timestamp_seconds"),
            "{text}"
        );

        metrics.set_rotation("Switching", "prepared");
        metrics.set_rotation("Switching", "switched");
        metrics.flow_coverage_ratio.set(Some(0.75));
        metrics.peer_oldest_handshake.set(Some(1.8e9));
        let text = encoded(&registry);
        assert_eq!(
            text.matches("wiremesh_rotation_phase{").count(),
            ROTATION_PHASES.len()
        );
        assert_eq!(
            text.matches("wiremesh_rotation_step{").count(),
            ROTATION_STEPS.len()
        );
        assert!(
            text.contains("wiremesh_rotation_phase{phase=\"Switching\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("wiremesh_rotation_phase{phase=\"Idle\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("wiremesh_rotation_step{step=\"prepared\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("wiremesh_rotation_step{step=\"switched\"} 1"),
            "{text}"
        );
        assert!(text.contains("wiremesh_flow_coverage_ratio 0.75"), "{text}");
        assert!(
            text.contains("wiremesh_peer_oldest_handshake_timestamp_seconds 1800000000"),
            "{text}"
        );
        metrics.flow_coverage_ratio.set(None);
        assert!(!encoded(&registry).contains("wiremesh_flow_coverage_ratio "));
        assert_eq!(metrics.flow_coverage_ratio.get(), None);
    }
}
