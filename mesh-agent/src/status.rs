//! The status publisher task: joins the reconciler's [`MeshSnapshot`] with the device's live peer
//! state (handshake times) into a [`MeshNodeStatus`], keeps the handshake metrics current (bounded by
//! age; per peer only with `--per-peer-metrics`), serves it on `/status`, and writes it
//! as the status of this node's `MeshNode` ([`crate::nodestatus`]): at once (at most every
//! [`MIN_WRITE_SPACING`]) when it changes materially, otherwise every status interval as a
//! heartbeat. Nothing is written to the Node object, so no agent's Node watch wakes up. On drain
//! it writes a last status saying the agent stopped, so `meshctl status` does not wait for the
//! status to go stale.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Client;
use tokio::sync::watch;
use wiremesh_keyexchange::PublicKey;

use crate::{
    datapath::{Datapath, DeviceStatus},
    drain::Drain,
    metrics::{AgeLabels, Metrics, PeerLabels, ResultLabels},
    nodestatus::{
        CONDITION_SETTINGS_APPLIED, HANDSHAKE_FRESH, MeshNodeEbpf, MeshNodePeer, MeshNodeRejected,
        MeshNodeStatus, NodeStatusWriter, STATUS_VERSION, unix_seconds,
    },
    reconciler::{API_WRITE_TIMEOUT, MeshSnapshot},
    select::Worlds,
    tunnelstats::TunnelStats,
};

/// Minimum time between two writes of the status annotation.
pub const MIN_WRITE_SPACING: Duration = Duration::from_secs(2);

/// How often the device is polled for handshakes.
const POLL: Duration = Duration::from_secs(2);

/// The latest status, shared with the HTTP server.
pub type SharedStatus = Arc<Mutex<Option<MeshNodeStatus>>>;

/// Builds the status from the reconciler's snapshot and the device's status.
pub fn build_status(
    snapshot: &MeshSnapshot,
    device: Result<&DeviceStatus, String>,
    interface: &str,
    datapath_kind: &str,
    interval: Duration,
    now: SystemTime,
) -> MeshNodeStatus {
    let (key, peers, device_error) = match device {
        Ok(status) => {
            // One lookup per configured peer: a scan of the device's peers for each would be
            // O(N^2) on every poll (25 M key comparisons at 5,000 peers, docs/benchmarks.md).
            let handshakes: HashMap<&PublicKey, Option<SystemTime>> = status
                .peers
                .iter()
                .map(|p| (&p.public_key, p.last_handshake))
                .collect();
            let peers = snapshot
                .configured
                .iter()
                .map(|(node, key)| MeshNodePeer {
                    node: node.clone(),
                    key: key.fingerprint(),
                    last_handshake: handshakes.get(key).copied().flatten().map(unix_seconds),
                })
                .collect();
            (status.public_key.map(|k| k.fingerprint()), peers, None)
        }
        Err(error) => (None, Vec::new(), Some(format!("datapath status: {error}"))),
    };
    MeshNodeStatus {
        version: STATUS_VERSION,
        updated_at: unix_seconds(now),
        interval_secs: interval.as_secs(),
        datapath: snapshot
            .datapath
            .as_ref()
            .map_or(datapath_kind, |s| s.kind.as_str())
            .to_string(),
        datapath_reason: snapshot.datapath.as_ref().map(|s| s.message.clone()),
        interface: interface.to_string(),
        key,
        key_created_at: snapshot.key_since.map(unix_seconds),
        enabled: snapshot.enabled,
        ready: snapshot.synced && snapshot.reconciled,
        peers_expected: u32::try_from(snapshot.expected.len()).unwrap_or(u32::MAX),
        peers_configured: u32::try_from(snapshot.configured.len()).unwrap_or(u32::MAX),
        peers,
        rejected: snapshot
            .rejected
            .iter()
            .map(|(node, reason)| MeshNodeRejected {
                node: node.clone(),
                reason: reason.clone(),
            })
            .collect(),
        error: device_error.or_else(|| snapshot.error.clone()),
        ebpf: None,
        conditions: vec![settings_condition(snapshot, now)],
    }
}

/// The `SettingsApplied` condition: `True` when `MeshEncryption default` is applied as written,
/// `False` naming what is refused or that a remembered spec is in force.
fn settings_condition(snapshot: &MeshSnapshot, now: SystemTime) -> Condition {
    let (status, reason, message) = match &snapshot.settings_problem {
        None => (
            "True",
            "Applied".to_string(),
            "MeshEncryption default is applied".to_string(),
        ),
        Some((reason, message)) => ("False", reason.clone(), message.clone()),
    };
    Condition {
        type_: CONDITION_SETTINGS_APPLIED.to_string(),
        status: status.to_string(),
        reason,
        message,
        observed_generation: None,
        last_transition_time: Time(
            k8s_openapi::jiff::Timestamp::from_second(
                i64::try_from(unix_seconds(now)).unwrap_or(0),
            )
            .unwrap_or_default(),
        ),
    }
}

/// See the module docs.
pub struct StatusPublisher {
    datapath: Arc<dyn Datapath>,
    writer: NodeStatusWriter,
    per_peer_metrics: bool,
    snapshot: watch::Receiver<MeshSnapshot>,
    metrics: Metrics,
    interval: Duration,
    shared: SharedStatus,
    written: Option<(MeshNodeStatus, Instant)>,
    handshake_peers: Vec<String>,
    ebpf: Option<watch::Receiver<MeshNodeEbpf>>,
    /// Both worlds, for the tunnel byte counters (the next world carries traffic too).
    worlds: Option<Arc<Worlds>>,
    tunnel: TunnelStats,
}

impl StatusPublisher {
    pub fn new(
        node_name: String,
        datapath: Arc<dyn Datapath>,
        client: Client,
        snapshot: watch::Receiver<MeshSnapshot>,
        metrics: Metrics,
        interval: Duration,
        shared: SharedStatus,
    ) -> Self {
        Self {
            writer: NodeStatusWriter::new(client, &node_name),
            per_peer_metrics: false,
            datapath,
            snapshot,
            metrics,
            interval,
            shared,
            written: None,
            handshake_peers: Vec::new(),
            ebpf: None,
            worlds: None,
            tunnel: TunnelStats::new(false),
        }
    }

    /// Also exports the handshake and byte series per peer (`--per-peer-metrics`).
    pub fn with_per_peer_metrics(mut self, on: bool) -> Self {
        self.per_peer_metrics = on;
        self.tunnel = TunnelStats::new(on);
        self
    }

    /// Counts tunnel bytes on the other world's device too (during a rotation).
    pub fn with_worlds(mut self, worlds: Arc<Worlds>) -> Self {
        self.worlds = Some(worlds);
        self
    }

    /// Includes the eBPF datapath's state (from the steering task) in every status.
    pub fn with_ebpf(mut self, ebpf: watch::Receiver<MeshNodeEbpf>) -> Self {
        self.ebpf = Some(ebpf);
        self
    }

    fn current(&mut self) -> MeshNodeStatus {
        let snapshot = self.snapshot.borrow_and_update().clone();
        let device = self.datapath.status().map_err(|e| e.to_string());
        let mut report = build_status(
            &snapshot,
            device.as_ref().map_err(Clone::clone),
            self.datapath.ifname(),
            self.datapath.kind().as_str(),
            self.interval,
            SystemTime::now(),
        );
        report.ebpf = self.ebpf.as_ref().map(|e| e.borrow().clone());
        if let Ok(current) = &device {
            let other = self.worlds.as_ref().and_then(|w| {
                w.slot(1 - w.current_index())
                    .status()
                    .ok()
                    .filter(|o| o.ifname != current.ifname)
            });
            let devices: Vec<&DeviceStatus> = std::iter::once(current).chain(&other).collect();
            self.tunnel
                .observe(&devices, &snapshot.configured, &self.metrics);
        }
        if let Some(since) = snapshot.key_since {
            let age = SystemTime::now()
                .duration_since(since)
                .map_or(0, |d| d.as_secs());
            self.metrics
                .key_age_seconds
                .set(i64::try_from(age).unwrap_or(i64::MAX));
        }
        self.update_metrics(&report);
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
        report
    }

    fn update_metrics(&mut self, report: &MeshNodeStatus) {
        let mut ages: [(&'static str, i64); 3] = [("fresh", 0), ("stale", 0), ("never", 0)];
        for peer in &report.peers {
            let slot = match peer.last_handshake {
                None => 2,
                Some(at) if report.updated_at.saturating_sub(at) <= HANDSHAKE_FRESH.as_secs() => 0,
                Some(_) => 1,
            };
            ages[slot].1 += 1;
        }
        for (age, count) in ages {
            self.metrics
                .peers_by_handshake_age
                .get_or_create(&AgeLabels { age })
                .set(count);
        }
        self.metrics.peer_oldest_handshake.set(
            report
                .peers
                .iter()
                .filter_map(|p| p.last_handshake)
                .min()
                .map(|t| t as f64),
        );
        let mut seen = Vec::new();
        for peer in report.peers.iter().filter(|_| self.per_peer_metrics) {
            if let Some(at) = peer.last_handshake {
                let labels = PeerLabels {
                    peer: peer.node.clone(),
                };
                self.metrics
                    .peer_last_handshake
                    .get_or_create(&labels)
                    .set(at as f64);
                seen.push(peer.node.clone());
            }
        }
        for gone in self.handshake_peers.iter().filter(|p| !seen.contains(p)) {
            self.metrics
                .peer_last_handshake
                .remove(&PeerLabels { peer: gone.clone() });
        }
        self.handshake_peers = seen;
    }

    fn due(&self, report: &MeshNodeStatus, now: Instant) -> bool {
        match &self.written {
            None => true,
            Some((last, at)) => {
                let since = now.duration_since(*at);
                since >= self.interval
                    || (since >= MIN_WRITE_SPACING && report.differs_materially(last))
            }
        }
    }

    async fn write(&mut self, report: &MeshNodeStatus) -> Result<(), String> {
        let call = self.writer.write(report);
        let (result, label) = match tokio::time::timeout(API_WRITE_TIMEOUT, call).await {
            Ok(Ok(_)) => (Ok(()), "ok"),
            Ok(Err(error)) => (Err(error.to_string()), "error"),
            Err(_) => (
                Err(format!("no answer within {API_WRITE_TIMEOUT:?}")),
                "timeout",
            ),
        };
        self.metrics
            .status_writes
            .get_or_create(&ResultLabels { result: label })
            .inc();
        result
    }

    /// Publishes until the drain starts, then writes a final "stopped" status.
    pub async fn run(mut self, mut drain: Drain) {
        let mut failures_logged = false;
        loop {
            let report = self.current();
            let now = Instant::now();
            if self.due(&report, now) {
                tracing::debug!(
                    peers_configured = report.peers_configured,
                    peers_expected = report.peers_expected,
                    "writing status"
                );
                let result = self.write(&report).await;
                tracing::debug!(elapsed = ?now.elapsed(), ok = result.is_ok(), "wrote status");
                match result {
                    Ok(()) => {
                        failures_logged = false;
                        self.written = Some((report, now));
                    }
                    Err(error) => {
                        if !failures_logged {
                            tracing::warn!(%error, "could not write the MeshNode status");
                            failures_logged = true;
                        }
                    }
                }
            }
            tokio::select! {
                changed = self.snapshot.changed() => {
                    if changed.is_err() {
                        // The reconciler is gone: the agent is stopping.
                        drain.signaled().await;
                        break;
                    }
                    // Coalesce a pass's updates; the spacing check above limits writes.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                () = tokio::time::sleep(POLL) => {}
                () = drain.signaled() => break,
            }
        }
        let mut last = self.current();
        last.ready = false;
        last.error = Some("agent stopped".to_string());
        match tokio::time::timeout(Duration::from_secs(2), self.write(&last)).await {
            Ok(Ok(())) => tracing::info!("wrote final status"),
            Ok(Err(error)) => tracing::warn!(%error, "could not write the final status"),
            Err(_) => tracing::warn!("writing the final status timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use wiremesh_keyexchange::PrivateKey;

    use super::*;
    use crate::datapath::{DatapathKind, PeerStatus};

    #[test]
    fn report_joins_snapshot_with_device_handshakes() {
        let me = PrivateKey::generate().unwrap().public_key();
        let (kb, kc) = (
            PrivateKey::generate().unwrap().public_key(),
            PrivateKey::generate().unwrap().public_key(),
        );
        let snapshot = MeshSnapshot {
            synced: true,
            reconciled: true,
            enabled: true,
            expected: vec![("b".into(), kb), ("c".into(), kc)],
            configured: vec![("b".into(), kb), ("c".into(), kc)],
            rejected: vec![("d".into(), "InvalidKeyEncoding".into())],
            error: None,
            datapath: Some(crate::select::Selection {
                choice: crate::config::DatapathChoice::Auto,
                kind: DatapathKind::Userspace,
                reason: "no-kernel-module",
                message: "auto: no wireguard kernel module".into(),
            }),
            ..MeshSnapshot::default()
        };
        let peer = |key, hs: Option<u64>| PeerStatus {
            public_key: key,
            endpoint: None,
            allowed_ips: vec![],
            persistent_keepalive: None,
            has_preshared_key: false,
            last_handshake: hs.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
            rx_bytes: 0,
            tx_bytes: 0,
        };
        let device = DeviceStatus {
            kind: DatapathKind::Userspace,
            ifname: "wm0".into(),
            ifindex: 3,
            public_key: Some(me),
            listen_port: 51871,
            fwmark: 0,
            mtu: 1420,
            peers: vec![peer(kb, Some(5_000)), peer(kc, None)],
        };
        let now = UNIX_EPOCH + Duration::from_secs(5_010);
        let report = build_status(
            &snapshot,
            Ok(&device),
            "wm0",
            "userspace",
            Duration::from_secs(30),
            now,
        );
        assert!(report.ready && report.enabled);
        assert_eq!(report.key, Some(me.fingerprint()));
        assert_eq!((report.peers_expected, report.peers_configured), (2, 2));
        assert_eq!(report.peers[0].last_handshake, Some(5_000));
        assert_eq!(report.peers[1].last_handshake, None);
        assert_eq!(report.peers[1].key, kc.fingerprint());
        assert_eq!(report.rejected[0].node, "d");
        assert_eq!(report.updated_at, 5_010);
        assert_eq!(
            report.datapath_reason.as_deref(),
            Some("auto: no wireguard kernel module")
        );

        let broken = build_status(
            &snapshot,
            Err("closed".to_string()),
            "wm0",
            "userspace",
            Duration::from_secs(30),
            now,
        );
        assert!(broken.error.unwrap().contains("closed"));
        assert!(broken.peers.is_empty());
    }
}
