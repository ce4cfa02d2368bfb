//! The live state an agent reports about itself, for operators: a compact JSON document in the
//! `wiremesh.io/status` annotation of the agent's own Node. `meshctl status` reads it with nothing
//! but a kubeconfig (no network path to the nodes needed), and `GET /status` on the agent's HTTP
//! port serves the same document.
//!
//! The agent rewrites it when the peer counts change (at most every 2 s) and otherwise refreshes it
//! every status interval (30 s by default), so `updatedAt` doubles as a heartbeat: a report older
//! than a few intervals means the agent is not running. It holds public facts only (key
//! fingerprints, counts, handshake times, Event reasons); never key material.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The Node annotation holding the [`NodeReport`] as JSON.
pub const ANNOTATION_STATUS: &str = "wiremesh.io/status";

/// Version of the [`NodeReport`] layout.
pub const REPORT_VERSION: u32 = 1;

/// A handshake older than this means the session is gone (WireGuard's REJECT_AFTER_TIME is 180 s;
/// with persistent keepalive a live session re-handshakes every 2 minutes).
pub const HANDSHAKE_FRESH: Duration = Duration::from_secs(180);

/// One agent's view of its part of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    /// [`REPORT_VERSION`].
    pub version: u32,
    /// Unix seconds when the agent wrote this report.
    pub updated_at: u64,
    /// Seconds between periodic refreshes; readers treat a report older than three of these as
    /// stale.
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
    pub key: Option<String>,
    /// Whether `MeshEncryption default` has `enabled: true` (as seen by this agent).
    pub enabled: bool,
    /// Caches synced and the mesh reconciled at least once.
    pub ready: bool,
    /// Peers the mesh wants on this node.
    pub peers_expected: u32,
    /// Wanted peers configured on the device.
    pub peers_configured: u32,
    /// One entry per configured peer, sorted by node name.
    pub peers: Vec<PeerReport>,
    /// Remote nodes this agent skips, with the Event reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<RejectedReport>,
    /// The last reconcile error, if the last pass failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The eBPF datapath (absent with `--ebpf off` and in reports of older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebpf: Option<EbpfReport>,
}

/// The eBPF datapath of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EbpfReport {
    /// The programs are loaded (maps and links pinned).
    pub loaded: bool,
    /// The config says strict mode.
    pub strict: bool,
    /// tc programs this agent attached.
    pub attached_programs: u32,
    /// The last failure (load, attach, map write), if the last pass failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One peer as the device sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerReport {
    /// The peer's Node name.
    pub node: String,
    /// Fingerprint of the peer key configured on the device.
    pub key: String,
    /// Unix seconds of the last completed handshake, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handshake: Option<u64>,
}

/// A remote node this agent does not peer with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RejectedReport {
    pub node: String,
    pub reason: String,
}

impl NodeReport {
    /// Whether two reports differ in more than their timestamps: a change worth writing at once.
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
    }

    /// Whether the report is older than three refresh intervals at `now`.
    pub fn is_stale(&self, now: SystemTime) -> bool {
        let age = unix_seconds(now).saturating_sub(self.updated_at);
        age > self.interval_secs.saturating_mul(3).max(30)
    }

    /// Parses the annotation value.
    pub fn from_annotation(value: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(value)
    }

    /// The annotation value.
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).expect("a NodeReport always serializes")
    }
}

/// Seconds since the Unix epoch (0 for times before it).
pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> NodeReport {
        NodeReport {
            ebpf: None,
            version: REPORT_VERSION,
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
            peers: vec![PeerReport {
                node: "b".into(),
                key: "12345678".into(),
                last_handshake: Some(990),
            }],
            rejected: vec![],
            error: None,
        }
    }

    #[test]
    fn roundtrips_and_uses_camel_case() {
        let r = report();
        let text = r.to_annotation();
        assert!(text.contains("\"peersConfigured\":1"), "{text}");
        assert!(text.contains("\"lastHandshake\":990"), "{text}");
        assert!(!text.contains("rejected"), "{text}");
        assert_eq!(NodeReport::from_annotation(&text).unwrap(), r);
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
}
