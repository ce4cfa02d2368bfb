//! The single writer of this node's mesh state. One task wakes on every watch event (debounced),
//! on a periodic resync and on error retries, and runs one pass:
//!
//! 1. publish this node's key annotations on its own Node if they are missing or stale;
//! 2. [`plan`]: from the cached Nodes, Pods and `MeshEncryption` to the wanted peers, routes, MTU
//!    and listen port (nothing when the mesh is disabled or `MeshEncryption default` is absent);
//! 3. [`Mesh::apply`] that to the device and the routing table;
//! 4. report skipped nodes (Event + metric, once per distinct problem) and publish a
//!    [`MeshSnapshot`] for the status reporter and the HTTP server.
//!
//! Nothing is applied before every cache has synced: pruning against a half-filled cache would
//! tear down healthy tunnels after a restart.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::events::EventType,
};
use tokio::sync::{Notify, watch};
use wiremesh_crds::MeshEncryption;
use wiremesh_keyexchange::{PeerSet, PublicKey, desired_peers_with_local_keys};

use crate::{
    config::{DEFAULT_LISTEN_PORT, DatapathChoice},
    datapath::PeerConfig,
    drain::Drain,
    events::{NodeEvents, Problem, ProblemKind, RejectionTracker},
    mesh::{ApplyOutcome, Mesh, Wanted, WantedPeer},
    metrics::{DatapathLabels, InvalidAnnotationLabels, Metrics, RepairLabels, ResultLabels},
    routes::Routes,
    select::{DatapathSlot, SelectError, Selection, Selector, effective_choice},
    views::{PublishError, missing_annotations, node_addresses, node_views, own_annotations},
    watch::Caches,
};

/// WireGuard's overhead on top of the underlay MTU (IPv6 outer header, UDP, WireGuard header and
/// tag), as the kernel implementation assumes.
pub const WIREGUARD_OVERHEAD: u32 = 80;

/// Tunnel MTU when the underlay MTU cannot be found: a 1500-byte underlay.
pub const FALLBACK_MTU: u32 = 1420;

/// Field manager of the agent's patches.
pub const FIELD_MANAGER: &str = "wiremesh-agent";

/// Deadline of one write to the API server (own annotations, Events, status). A write that hangs
/// (a stalled connection) must not hold up the reconciler: it fails and is retried.
pub const API_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a pass could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("own Node {node} is not in the cache (wrong --node-name, or the Node was deleted)")]
    OwnNodeMissing { node: String },
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("patch annotations of own Node {node}: {source}")]
    PatchOwnNode {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("patch annotations of own Node {node}: no answer within {API_WRITE_TIMEOUT:?}")]
    PatchOwnNodeTimeout { node: String },
    #[error("{count} step(s) failed, first: {first}")]
    Apply { count: usize, first: String },
    #[error(transparent)]
    Select(#[from] SelectError),
}

/// The settings of a pass that come from the agent's flags.
#[derive(Debug, Clone)]
pub struct PlanSettings {
    pub node_name: String,
    pub listen_port: Option<u16>,
    pub mtu: Option<u32>,
    pub persistent_keepalive: u16,
}

/// Everything a pass decides, before touching anything.
#[derive(Debug)]
pub struct Plan {
    /// `MeshEncryption default` exists with `enabled: true`.
    pub enabled: bool,
    pub wanted: Wanted,
    /// The full peer set, also when the mesh is disabled (for status only).
    pub peer_set: PeerSet,
    /// Skipped nodes and dropped prefixes (empty when the mesh is disabled: nothing to warn about).
    pub problems: Vec<Problem>,
    /// Annotations of our own Node that must be written (empty: up to date).
    pub own_patch: BTreeMap<String, String>,
    /// Our address on the underlay (first InternalIP), to find the underlay MTU.
    pub own_address: Option<IpAddr>,
}

/// Decides a pass from cached objects. Pure: unit-tested without a cluster.
pub fn plan(
    settings: &PlanSettings,
    local_key: &PublicKey,
    nodes: &[Arc<Node>],
    pods: &[Arc<Pod>],
    mesh_encryption: Option<&MeshEncryption>,
    underlay_mtu: Option<u32>,
) -> Result<Plan, ReconcileError> {
    let own = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(settings.node_name.as_str()))
        .ok_or_else(|| ReconcileError::OwnNodeMissing {
            node: settings.node_name.clone(),
        })?;
    let spec = mesh_encryption.map(|m| &m.spec);
    let enabled = spec.is_some_and(|s| s.enabled);
    let listen_port = settings
        .listen_port
        .or(spec.map(|s| s.listen_port))
        .filter(|p| *p != 0)
        .unwrap_or(DEFAULT_LISTEN_PORT);
    let mtu = settings
        .mtu
        .or(spec.and_then(|s| s.mtu).map(u32::from))
        .unwrap_or_else(|| {
            underlay_mtu
                .map(|m| m.saturating_sub(WIREGUARD_OVERHEAD).max(1280))
                .unwrap_or(FALLBACK_MTU)
        });

    let wanted_annotations = own_annotations(own, local_key, listen_port)?;
    let own_patch = missing_annotations(own, &wanted_annotations);
    let own_address = node_addresses(own).into_iter().next();

    let views = node_views(
        nodes.iter().map(|n| n.as_ref()),
        pods.iter().map(|p| p.as_ref()),
    );
    let peer_set = desired_peers_with_local_keys(&settings.node_name, &[*local_key], &views);

    let keepalive = Some(settings.persistent_keepalive).filter(|k| *k > 0);
    let peers = if enabled {
        peer_set
            .peers
            .iter()
            .map(|p| WantedPeer {
                node: p.node.clone(),
                config: PeerConfig {
                    public_key: p.public_key,
                    endpoint: Some(p.endpoint),
                    allowed_ips: p.allowed_ips.clone(),
                    persistent_keepalive: keepalive,
                    preshared_key: None,
                },
            })
            .collect()
    } else {
        Vec::new()
    };
    let problems = if enabled {
        problems(&peer_set)
    } else {
        Vec::new()
    };
    Ok(Plan {
        enabled,
        wanted: Wanted {
            enabled,
            peers,
            mtu,
            listen_port,
        },
        peer_set,
        problems,
        own_patch,
        own_address,
    })
}

/// Skipped nodes and dropped prefixes as reportable problems.
fn problems(peer_set: &PeerSet) -> Vec<Problem> {
    let mut out: Vec<Problem> = peer_set
        .rejected
        .iter()
        .map(|r| Problem {
            node: r.node.clone(),
            kind: ProblemKind::Rejected,
            reason: r.error.reason().to_string(),
            message: format!("wiremesh skips node {}: {}", r.node, r.error),
        })
        .chain(peer_set.conflicts.iter().map(|c| Problem {
            node: c.node.clone(),
            kind: ProblemKind::PrefixConflict,
            reason: c.reason().to_string(),
            message: c.to_string(),
        }))
        .collect();
    out.sort();
    out
}

/// What the last pass produced, for the status reporter and `/readyz`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshSnapshot {
    /// Every cache has synced.
    pub synced: bool,
    /// A pass has completed since the caches synced.
    pub reconciled: bool,
    pub enabled: bool,
    /// Wanted peers (node, key), by node name.
    pub expected: Vec<(String, PublicKey)>,
    /// Wanted peers that are on the device with exactly the wanted configuration.
    pub configured: Vec<(String, PublicKey)>,
    /// Skipped nodes and their Event reasons.
    pub rejected: Vec<(String, String)>,
    /// The last pass's error.
    pub error: Option<String>,
    /// The device the agent drives and why (None until one is selected).
    pub datapath: Option<Selection>,
}

impl MeshSnapshot {
    /// Converged: caches synced, a pass completed without error, and every wanted peer is on the
    /// device as wanted (what `/readyz` reports, with the datapath's health).
    pub fn converged(&self) -> bool {
        self.synced
            && self.reconciled
            && self.error.is_none()
            && self.datapath.is_some()
            && self.configured.len() == self.expected.len()
    }
}

/// How the reconciler reaches the device: the slot everyone uses, and how to (re)select it.
pub struct DatapathControl {
    pub slot: Arc<DatapathSlot>,
    pub selector: Arc<dyn Selector>,
    /// `--datapath`: wins over `MeshEncryption.spec.datapath`.
    pub flag: Option<DatapathChoice>,
}

/// The reconciler task. See the module docs.
pub struct Reconciler<R: Routes> {
    settings: PlanSettings,
    local_key: PublicKey,
    caches: Caches,
    nodes_api: Api<Node>,
    mesh: Mesh<R>,
    routes: Arc<R>,
    events: NodeEvents,
    tracker: RejectionTracker,
    metrics: Metrics,
    snapshot: watch::Sender<MeshSnapshot>,
    notify: Arc<Notify>,
    resync_interval: Duration,
    underlay_mtu: Option<(IpAddr, u32)>,
    datapath: DatapathControl,
    /// The last selection failure reported as an Event (reported once until it changes).
    datapath_problem: Option<String>,
    /// The selection last reported as an Event.
    datapath_announced: Option<(crate::datapath::DatapathKind, &'static str)>,
}

impl<R: Routes> Reconciler<R> {
    /// Wires a reconciler; `mesh` must come from [`Mesh::restore`] on the same `routes`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: PlanSettings,
        local_key: PublicKey,
        client: Client,
        caches: Caches,
        mesh: Mesh<R>,
        routes: Arc<R>,
        metrics: Metrics,
        snapshot: watch::Sender<MeshSnapshot>,
        notify: Arc<Notify>,
        resync_interval: Duration,
        datapath: DatapathControl,
    ) -> Self {
        Self {
            events: NodeEvents::new(client.clone(), &settings.node_name),
            nodes_api: Api::all(client),
            settings,
            local_key,
            caches,
            mesh,
            routes,
            tracker: RejectionTracker::default(),
            metrics,
            snapshot,
            notify,
            resync_interval,
            underlay_mtu: None,
            datapath,
            datapath_problem: None,
            datapath_announced: None,
        }
    }

    /// Runs passes until the drain starts.
    pub async fn run(mut self, mut drain: Drain) {
        tokio::select! {
            () = self.caches.wait_synced() => {}
            () = drain.signaled() => return,
        }
        tracing::info!(
            nodes = self.caches.nodes.len(),
            pods = self.caches.pods.len(),
            mesh_encryption = self.caches.mesh_encryption().is_some(),
            "caches synced"
        );
        self.snapshot.send_modify(|s| s.synced = true);

        let mut failures: u32 = 0;
        loop {
            let started = Instant::now();
            let result = self.reconcile_once().await;
            let elapsed = started.elapsed();
            self.metrics
                .reconcile_duration
                .observe(elapsed.as_secs_f64());
            let delay = match &result {
                Ok(()) => {
                    failures = 0;
                    self.metrics
                        .reconciles
                        .get_or_create(&ResultLabels { result: "ok" })
                        .inc();
                    self.resync_interval
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    self.metrics
                        .reconciles
                        .get_or_create(&ResultLabels { result: "error" })
                        .inc();
                    let delay = retry_delay(failures);
                    tracing::warn!(%error, retry_in = ?delay, "reconcile failed");
                    delay
                }
            };
            tokio::select! {
                () = self.notify.notified() => {
                    // Let a burst of watch events settle into one pass.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                () = tokio::time::sleep(delay) => {}
                () = drain.signaled() => return,
            }
        }
    }

    async fn underlay_mtu(&mut self, address: Option<IpAddr>) -> Option<u32> {
        let address = address?;
        if let Some((cached, mtu)) = self.underlay_mtu
            && cached == address
        {
            return Some(mtu);
        }
        match self.routes.mtu_of_address(address).await {
            Ok(mtu) => {
                self.underlay_mtu = Some((address, mtu));
                Some(mtu)
            }
            Err(error) => {
                tracing::warn!(%address, %error, fallback = FALLBACK_MTU, "underlay MTU unknown");
                None
            }
        }
    }

    async fn reconcile_once(&mut self) -> Result<(), ReconcileError> {
        let nodes = self.caches.nodes.state();
        let pods = self.caches.pods.state();
        let mesh_encryption = self.caches.mesh_encryption();

        // The underlay MTU only matters when neither flag nor spec sets the MTU; look it up once
        // per address.
        let own_address = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.settings.node_name.as_str()))
            .and_then(|n| node_addresses(n).into_iter().next());
        let underlay = if self.settings.mtu.is_none()
            && mesh_encryption.as_ref().and_then(|m| m.spec.mtu).is_none()
        {
            self.underlay_mtu(own_address).await
        } else {
            None
        };

        let plan = match plan(
            &self.settings,
            &self.local_key,
            &nodes,
            &pods,
            mesh_encryption.as_deref(),
            underlay,
        ) {
            Ok(plan) => plan,
            Err(error) => {
                self.snapshot
                    .send_modify(|s| s.error = Some(error.to_string()));
                return Err(error);
            }
        };

        let mut first_error: Option<ReconcileError> = None;
        if !plan.own_patch.is_empty()
            && let Err(error) = self.publish_own(&plan.own_patch).await
        {
            first_error = Some(error);
        }

        let choice = effective_choice(
            self.datapath.flag,
            mesh_encryption.as_ref().map(|m| m.spec.datapath),
        );
        if self.datapath.slot.selection().map(|s| s.choice) != Some(choice)
            && let Err(error) = self.select_datapath(choice, &nodes).await
        {
            if self.datapath.slot.selection().is_none() {
                self.snapshot
                    .send_modify(|s| s.error = Some(error.to_string()));
                return Err(error);
            }
            // A re-selection failed: keep driving the device we have, and say why.
            first_error.get_or_insert(error);
        }

        let outcome = self.mesh.apply(&plan.wanted).await;
        if outcome.device_unreachable {
            // The device process is gone or the link was deleted: select again next pass (waits
            // for the restarted device process, or creates the kernel link again).
            self.datapath.slot.clear();
            self.metrics.datapath_up.set(0);
        }
        for (what, count) in [
            ("peer", outcome.peers_repaired),
            ("route", outcome.routes_repaired),
            ("device", usize::from(outcome.device_replaced.is_some())),
            (
                "key",
                usize::from(matches!(outcome.key_replaced, Some(Some(_)))),
            ),
        ] {
            if count > 0 {
                self.metrics
                    .datapath_repairs
                    .get_or_create(&RepairLabels { what })
                    .inc_by(count as u64);
            }
        }
        if outcome.changed() {
            tracing::info!(
                enabled = plan.enabled,
                peers = plan.wanted.peers.len(),
                peers_set = outcome.peers_set,
                peers_removed = outcome.peers_removed,
                routes_added = outcome.routes_added,
                routes_removed = outcome.routes_removed,
                "mesh updated"
            );
        }
        if first_error.is_none()
            && let Some(error) = outcome.errors.first()
        {
            first_error = Some(ReconcileError::Apply {
                count: outcome.errors.len(),
                first: error.to_string(),
            });
        }
        for error in &outcome.errors {
            tracing::warn!(%error, "mesh step failed");
        }
        self.report_device_changes(&outcome, &nodes).await;

        self.report_problems(&plan, &nodes).await;

        let configured: Vec<(String, PublicKey)> = plan
            .wanted
            .peers
            .iter()
            .filter(|p| self.mesh.is_applied(p))
            .map(|p| (p.node.clone(), p.config.public_key))
            .collect();
        let expected: Vec<(String, PublicKey)> = plan
            .wanted
            .peers
            .iter()
            .map(|p| (p.node.clone(), p.config.public_key))
            .collect();
        self.metrics.mesh_enabled.set(i64::from(plan.enabled));
        self.metrics.peers_expected.set(expected.len() as i64);
        self.metrics.peers_configured.set(configured.len() as i64);
        self.metrics
            .nodes_rejected
            .set(plan.peer_set.rejected.len() as i64);
        self.metrics
            .routes
            .set(self.mesh.applied_routes().len() as i64);
        let error = first_error.as_ref().map(ToString::to_string);
        let selection = self.datapath.slot.selection();
        self.snapshot.send_modify(|s| {
            s.datapath = selection;
            s.reconciled = true;
            s.enabled = plan.enabled;
            s.expected = expected;
            s.configured = configured;
            s.rejected = plan
                .problems
                .iter()
                .filter(|p| p.kind == ProblemKind::Rejected)
                .map(|p| (p.node.clone(), p.reason.clone()))
                .collect();
            s.error = error;
        });
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    async fn publish_own(&self, patch: &BTreeMap<String, String>) -> Result<(), ReconcileError> {
        let body = serde_json::json!({ "metadata": { "annotations": patch } });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        let patch = Patch::Merge(&body);
        let call = self
            .nodes_api
            .patch(&self.settings.node_name, &params, &patch);
        let Ok(result) = tokio::time::timeout(API_WRITE_TIMEOUT, call).await else {
            self.metrics
                .node_patches
                .get_or_create(&ResultLabels { result: "timeout" })
                .inc();
            return Err(ReconcileError::PatchOwnNodeTimeout {
                node: self.settings.node_name.clone(),
            });
        };
        let label = ResultLabels {
            result: if result.is_ok() { "ok" } else { "error" },
        };
        self.metrics.node_patches.get_or_create(&label).inc();
        match result {
            Ok(_) => {
                tracing::info!(node = %self.settings.node_name, annotations = ?body, "published key annotations");
                Ok(())
            }
            Err(source) => Err(ReconcileError::PatchOwnNode {
                node: self.settings.node_name.clone(),
                source,
            }),
        }
    }

    /// Selects (or re-selects, when the choice changed) the device, publishing the outcome as a
    /// log line, the `wiremesh_datapath_info` metric and one Event on the own Node.
    async fn select_datapath(
        &mut self,
        choice: DatapathChoice,
        nodes: &[Arc<Node>],
    ) -> Result<(), ReconcileError> {
        match self.datapath.selector.select(choice).await {
            Ok((device, selection)) => {
                tracing::info!(
                    choice = ?choice,
                    kind = selection.kind.as_str(),
                    reason = selection.reason,
                    message = %selection.message,
                    "datapath selected"
                );
                self.metrics.datapath_info.clear();
                self.metrics
                    .datapath_info
                    .get_or_create(&DatapathLabels {
                        kind: selection.kind.as_str(),
                        reason: selection.reason,
                    })
                    .set(1);
                self.metrics.datapath_up.set(1);
                // One Event per new selection, not per re-adoption of the same device.
                let announce = (selection.kind, selection.reason);
                if self.datapath_announced != Some(announce) {
                    self.datapath_announced = Some(announce);
                    self.own_event(
                        nodes,
                        EventType::Normal,
                        "DatapathSelected",
                        &selection.message,
                        "SelectDatapath",
                    )
                    .await;
                }
                self.datapath_problem = None;
                self.datapath.slot.set(device, selection);
                Ok(())
            }
            Err(error) => {
                let message = error.to_string();
                if self.datapath_problem.as_deref() != Some(message.as_str()) {
                    self.own_event(
                        nodes,
                        EventType::Warning,
                        "DatapathUnavailable",
                        &message,
                        "SelectDatapath",
                    )
                    .await;
                    self.datapath_problem = Some(message);
                }
                Err(error.into())
            }
        }
    }

    /// Records an Event on the own Node; a failure (or a hang past [`API_WRITE_TIMEOUT`]) is only
    /// logged.
    async fn own_event(
        &self,
        nodes: &[Arc<Node>],
        type_: EventType,
        reason: &str,
        note: &str,
        action: &str,
    ) {
        let reference = self.own_reference(nodes);
        let publish = self
            .events
            .publish_on(&reference, type_, reason, note, action);
        match tokio::time::timeout(API_WRITE_TIMEOUT, publish).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, reason, "could not record Event"),
            Err(_) => tracing::warn!(reason, "recording the Event timed out"),
        }
    }

    fn own_reference(&self, nodes: &[Arc<Node>]) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".to_string()),
            kind: Some("Node".to_string()),
            name: Some(self.settings.node_name.clone()),
            uid: nodes
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(self.settings.node_name.as_str()))
                .and_then(|n| n.metadata.uid.clone()),
            ..ObjectReference::default()
        }
    }

    /// Logs a recreated device and a key put back on it; another key found on the device (the
    /// keystore wins) is also a Warning Event on the own Node.
    async fn report_device_changes(&self, outcome: &ApplyOutcome, nodes: &[Arc<Node>]) {
        if let Some((old, new)) = outcome.device_replaced {
            tracing::warn!(
                interface = self.mesh.ifname(),
                old_ifindex = old,
                new_ifindex = new,
                "the device was recreated (its process restarted or the link was replaced); \
                 re-applied its whole configuration"
            );
        }
        match &outcome.key_replaced {
            None => {}
            Some(None) => tracing::info!(
                interface = self.mesh.ifname(),
                key = %self.local_key.fingerprint(),
                "the device had no key (a fresh device): gave it the keystore's key"
            ),
            Some(Some(other)) => {
                let message = format!(
                    "the WireGuard device {} held the key {} instead of this node's key {} from \
                     the keystore; the keystore wins and the device now uses {}",
                    self.mesh.ifname(),
                    other.fingerprint(),
                    self.local_key.fingerprint(),
                    self.local_key.fingerprint(),
                );
                tracing::warn!(
                    interface = self.mesh.ifname(),
                    device_key = %other.fingerprint(),
                    keystore_key = %self.local_key.fingerprint(),
                    "device held another key; the keystore wins"
                );
                self.own_event(
                    nodes,
                    EventType::Warning,
                    "DeviceKeyReplaced",
                    &message,
                    "ReplaceDeviceKey",
                )
                .await;
            }
        }
    }

    async fn report_problems(&mut self, plan: &Plan, nodes: &[Arc<Node>]) {
        for problem in self.tracker.observe(&plan.problems) {
            tracing::warn!(
                node = %problem.node,
                reason = %problem.reason,
                message = %problem.message,
                "skipping remote node configuration"
            );
            if problem.kind == ProblemKind::Rejected {
                self.metrics
                    .invalid_annotations
                    .get_or_create(&InvalidAnnotationLabels {
                        node: problem.node.clone(),
                        reason: problem.reason.clone(),
                    })
                    .inc();
            }
            let uid = nodes
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(problem.node.as_str()))
                .and_then(|n| n.metadata.uid.clone());
            match tokio::time::timeout(API_WRITE_TIMEOUT, self.events.publish(&problem, uid)).await
            {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(node = %problem.node, %error, "could not record Event");
                }
                Err(_) => tracing::warn!(node = %problem.node, "recording the Event timed out"),
            }
        }
    }
}

/// 1 s, 2 s, 4 s ... capped at 30 s.
fn retry_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(5);
    Duration::from_secs((1u64 << exp).min(30))
}

#[cfg(test)]
mod tests;
