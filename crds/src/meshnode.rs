//! `MeshNode` (`meshnodes.wiremesh.io/v1alpha1`, cluster-scoped): the live status of one node's
//! agent, named after its Node (with an owner reference to it, so it goes with the Node). Only
//! that node's agent writes it (status subresource); `meshctl status` and the rotation
//! coordinator read it. Agents do not watch MeshNodes, so a status write wakes nobody — unlike
//! the `wiremesh.io/status` Node annotation it replaces, whose every write reached every agent's
//! Node watch.
//!
//! The status is rewritten when something material changes and refreshed every
//! `intervalSecs` as a heartbeat: a status older than three intervals means the agent is not
//! running. Public facts only (key fingerprints, counts, handshake times, Event reasons); never key
//! material.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Version of the [`MeshNodeStatus`] layout.
pub const STATUS_VERSION: u32 = 1;

/// A handshake older than this means the session is gone (WireGuard's REJECT_AFTER_TIME is 180 s;
/// with persistent keepalive a live session re-handshakes every 2 minutes).
pub const HANDSHAKE_FRESH: Duration = Duration::from_secs(180);

/// Condition type on a [`MeshNodeStatus`]: the agent applies `MeshEncryption default` as
/// written. `False` names what it refuses (a setting not implemented) or why it runs on a
/// remembered spec (the object is gone).
pub const CONDITION_SETTINGS_APPLIED: &str = "SettingsApplied";

/// Label on a MeshNode, `"true"` or `"false"`: whether its agent has converged (see
/// [`MeshNodeStatus::converged`]). Written by the agent only when it changes, so the rotation
/// coordinator can count ready nodes from the MeshNodes' metadata alone (a status holds one entry
/// per peer: reading every status would cost O(N²) bytes).
pub const CONVERGED_LABEL: &str = "wiremesh.io/converged";

/// Annotation on a MeshNode: the agent's status refresh interval in seconds. A status write older
/// than three intervals (the time of the agent's entry in `managedFields`) means the agent is gone.
pub const STATUS_INTERVAL_ANNOTATION: &str = "wiremesh.io/status-interval-secs";

/// The node's agent and its view of the mesh. The spec is empty: everything is observed state.
#[allow(
    clippy::duplicated_attributes,
    reason = "printcolumn(..) entries repeat type_ by design"
)]
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "wiremesh.io",
    version = "v1alpha1",
    kind = "MeshNode",
    plural = "meshnodes",
    singular = "meshnode",
    category = "wiremesh",
    status = "MeshNodeStatus",
    derive = "PartialEq",
    doc = "Live status of one node's wiremesh agent (name = the Node's name), written only by that agent.",
    printcolumn(
        name = "Ready",
        type_ = "boolean",
        json_path = ".status.ready",
        description = "agent synced and reconciled"
    ),
    printcolumn(
        name = "Peers",
        type_ = "integer",
        json_path = ".status.peersConfigured",
        description = "peers configured on the device"
    ),
    printcolumn(
        name = "Datapath",
        type_ = "string",
        json_path = ".status.datapath",
        description = "userspace or kernel"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct MeshNodeSpec {}

/// One agent's view of its part of the mesh.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodeStatus {
    /// [`STATUS_VERSION`].
    #[schemars(extend("format" = "int32"))]
    pub version: u32,
    /// Unix seconds when the agent wrote this status.
    #[schemars(extend("format" = "int64"))]
    pub updated_at: u64,
    /// Seconds between periodic refreshes; readers treat a status older than three of these as
    /// stale.
    #[schemars(extend("format" = "int64"))]
    pub interval_secs: u64,
    /// `userspace` or `kernel`.
    pub datapath: String,
    /// Why the agent drives this datapath (`auto` picked the kernel module, fell back to the
    /// userspace device, adopted an existing device, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datapath_reason: Option<String>,
    /// The tunnel interface.
    pub interface: String,
    /// Fingerprint of the public key the device uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Unix seconds when the node's current key was generated or promoted by a rotation (its
    /// age in `meshctl status`; absent in statuses of older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "int64"))]
    pub key_created_at: Option<u64>,
    /// Whether the mesh is on, as this agent applies it (from `MeshEncryption default`, or the
    /// remembered spec when the object is gone).
    pub enabled: bool,
    /// Caches synced and the mesh reconciled at least once.
    pub ready: bool,
    /// Peers the mesh wants on this node.
    #[schemars(extend("format" = "int32"))]
    pub peers_expected: u32,
    /// Wanted peers configured on the device.
    #[schemars(extend("format" = "int32"))]
    pub peers_configured: u32,
    /// One entry per configured peer, sorted by node name.
    #[serde(default)]
    pub peers: Vec<MeshNodePeer>,
    /// Remote nodes this agent skips, with the Event reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<MeshNodeRejected>,
    /// The last reconcile error, if the last pass failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The eBPF datapath (absent with `--ebpf off`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebpf: Option<MeshNodeEbpf>,
    /// Conditions (type [`CONDITION_SETTINGS_APPLIED`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::conditions::conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// The eBPF datapath of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodeEbpf {
    /// The programs are loaded (maps and links pinned).
    pub loaded: bool,
    /// The config says strict mode.
    pub strict: bool,
    /// tc programs this agent attached.
    #[schemars(extend("format" = "int32"))]
    pub attached_programs: u32,
    /// The last failure (load, attach, map write), if the last pass failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One peer as the device sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodePeer {
    /// The peer's Node name.
    pub node: String,
    /// Fingerprint of the peer key configured on the device.
    pub key: String,
    /// Unix seconds of the last completed handshake, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "int64"))]
    pub last_handshake: Option<u64>,
}

/// A remote node this agent does not peer with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshNodeRejected {
    pub node: String,
    pub reason: String,
}

impl MeshNodeStatus {
    /// Whether two statuses differ in more than their timestamps: a change worth writing at once.
    pub fn differs_materially(&self, other: &Self) -> bool {
        self.enabled != other.enabled
            || self.ready != other.ready
            || self.peers_expected != other.peers_expected
            || self.peers_configured != other.peers_configured
            || self.key != other.key
            || self.datapath != other.datapath
            || self.datapath_reason != other.datapath_reason
            || self.rejected != other.rejected
            || self.error.is_some() != other.error.is_some()
            || self.ebpf != other.ebpf
            || self.peers.len() != other.peers.len()
            || self.peers.iter().zip(&other.peers).any(|(a, b)| {
                a.node != b.node
                    || a.key != b.key
                    || a.last_handshake.is_some() != b.last_handshake.is_some()
            })
            || conditions_differ(&self.conditions, &other.conditions)
    }

    /// Converged: caches synced, the mesh reconciled without error, every wanted peer configured.
    pub fn converged(&self) -> bool {
        self.ready && self.error.is_none() && self.peers_configured >= self.peers_expected
    }

    /// Whether the status is older than three refresh intervals at `now`.
    pub fn is_stale(&self, now: SystemTime) -> bool {
        let age = unix_seconds(now).saturating_sub(self.updated_at);
        age > self.interval_secs.saturating_mul(3).max(30)
    }
}

fn conditions_differ(a: &[Condition], b: &[Condition]) -> bool {
    a.len() != b.len()
        || a.iter()
            .zip(b)
            .any(|(x, y)| x.type_ != y.type_ || x.status != y.status || x.reason != y.reason)
}

/// Seconds since the Unix epoch (0 for times before it).
pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    fn report() -> MeshNodeStatus {
        MeshNodeStatus {
            version: STATUS_VERSION,
            updated_at: 1_000,
            interval_secs: 30,
            datapath: "userspace".into(),
            datapath_reason: None,
            interface: "wiremesh0".into(),
            key: Some("abcdefgh".into()),
            enabled: true,
            ready: true,
            peers_expected: 1,
            peers_configured: 1,
            peers: vec![MeshNodePeer {
                node: "b".into(),
                key: "12345678".into(),
                last_handshake: Some(990),
            }],
            ..MeshNodeStatus::default()
        }
    }

    #[test]
    fn roundtrips_and_uses_camel_case() {
        let r = report();
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"peersConfigured\":1"), "{text}");
        assert!(text.contains("\"lastHandshake\":990"), "{text}");
        assert!(!text.contains("rejected"), "{text}");
        assert_eq!(serde_json::from_str::<MeshNodeStatus>(&text).unwrap(), r);
    }

    #[test]
    fn newer_handshake_alone_is_not_material_but_first_handshake_is() {
        let a = report();
        let mut b = a.clone();
        b.updated_at = 2_000;
        b.peers[0].last_handshake = Some(1_990);
        assert!(!a.differs_materially(&b));
        b.peers[0].last_handshake = None;
        assert!(a.differs_materially(&b));
        let mut c = a.clone();
        c.peers_configured = 0;
        assert!(a.differs_materially(&c));
    }

    #[test]
    fn staleness_is_three_intervals() {
        let r = report();
        assert!(!r.is_stale(UNIX_EPOCH + Duration::from_secs(1_090)));
        assert!(r.is_stale(UNIX_EPOCH + Duration::from_secs(1_091)));
    }

    #[test]
    fn crd_is_cluster_scoped_with_a_status_subresource() {
        let crd = MeshNode::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.metadata.name.as_deref(), Some("meshnodes.wiremesh.io"));
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().unwrap().status.is_some());
    }
}
