//! The single writer of this node's mesh state. One task wakes on every watch event (debounced),
//! on a periodic resync and on error retries, and runs one pass:
//!
//! 1. publish this node's key annotations on its own Node if they are missing or stale;
//! 2. [`plan`]: from the cached Nodes, Pods and `MeshEncryption` to the wanted peers, routes, MTU
//!    and listen port (nothing when the mesh is disabled or `MeshEncryption default` is absent);
//! 3. [`Mesh::apply`] that to the device and the routing table;
//! 4. report skipped nodes and peers kept at their node address because their endpoint
//!    annotation is stale (Event + metric, once per distinct problem) and publish a
//!    [`MeshSnapshot`] for the status publisher and the HTTP server.
//!
//! Nothing is applied before every cache has synced: pruning against a half-filled cache would
//! tear down healthy tunnels after a restart.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::events::EventType,
};
use tokio::sync::{Notify, watch};
use wiremesh_crds::{MeshEncryption, MeshEncryptionSpecError};
use wiremesh_keyexchange::{
    AddressPolicy, KeySet, Keystore, KeystoreError, PeerSet, PodClaims, PublicKey,
    annotations::ANNOTATION_NEXT_ENDPOINT, desired_peers_with_claims, pod_claims,
};

use crate::{
    cached::{CachedNode, CachedPod},
    config::{DEFAULT_LISTEN_PORT, DatapathChoice},
    datapath::{Datapath, PeerConfig},
    drain::Drain,
    events::{EventSender, NodeEvents, Problem, ProblemKind, RejectionTracker, is_emitter},
    mesh::{ApplyOutcome, Mesh, Wanted, WantedPeer},
    metrics::{
        DatapathLabels, InvalidAnnotationLabels, Metrics, ReasonLabels, RepairLabels, ResultLabels,
    },
    rotation::{self, Mode, Progress, RotationView, Slot},
    routes::Routes,
    select::{SelectError, Selection, Selector, Worlds, effective_choice},
    steering::SteeredTunnels,
    views::{PublishError, missing_annotations, node_addresses, node_views, own_annotations},
    watch::Caches,
};

/// WireGuard's overhead on top of the underlay MTU (IPv6 outer header, UDP, WireGuard header and
/// tag), as the kernel implementation assumes.
pub const WIREGUARD_OVERHEAD: u32 = 80;

/// Tunnel MTU when the underlay MTU cannot be found: a 1500-byte underlay.
pub const FALLBACK_MTU: u32 = 1420;

/// How soon the next pass comes while this node waits for a step of an active rotation.
const ROTATION_POLL: Duration = Duration::from_millis(300);
/// How long the reconciler waits for the eBPF maps to follow it (normally one steering pass,
/// ~0.1 s; longer only when steering cannot write its maps): before a flush of the other world
/// (until no redirect names its device) and before a `switched` mark (until the ipcache sends
/// every switched peer through the next world).
const STEERING_WAIT_MAX: Duration = Duration::from_secs(10);

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
    #[error("MeshEncryption default is unusable, keeping the current mesh: {0}")]
    Spec(#[from] MeshEncryptionSpecError),
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error("keystore: {0}")]
    Keystore(#[from] KeystoreError),
    #[error(
        "this node is in a key rotation (it announces a next world) and the KeyRotation cache \
         has not synced yet: waiting before acting on it"
    )]
    RotationsNotSynced,
    #[error(
        "key rotation {rotation}: the next world's device {ifname} is not available: {message}"
    )]
    NextWorld {
        rotation: String,
        ifname: String,
        message: String,
    },
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
    /// `MeshEncryption default` (or the remembered spec) steers traffic: `enabled: true` and a
    /// mode other than `Disabled`.
    pub enabled: bool,
    /// The pod prefixes every node may hold (allowed IPs, routes and ENCRYPT ipcache entries all
    /// come from this one decision).
    pub claims: Arc<PodClaims>,
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
    nodes: &[Arc<CachedNode>],
    pods: &[Arc<CachedPod>],
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
    // `mode: Disabled` steers nothing: no peers, no routes (issue 13, finding 8).
    let enabled = spec.is_some_and(|s| s.steers_traffic());
    let policy = match spec {
        Some(spec) => AddressPolicy::new(&spec.pod_cidrs()?, &spec.service_cidrs()?),
        None => AddressPolicy::default(),
    };
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
    let claims = pod_claims(&settings.node_name, &policy, &views);
    let peer_set = desired_peers_with_claims(&settings.node_name, &[*local_key], &views, &claims);

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
        claims: Arc::new(claims),
        wanted: Wanted {
            enabled,
            peers,
            mtu,
            listen_port,
            unrouted: Default::default(),
        },
        peer_set,
        problems,
        own_patch,
        own_address,
    })
}

/// Why the settings in force differ from `MeshEncryption default` as written (condition reason,
/// message), for the `SettingsApplied` condition; `None`: applied as written.
pub fn settings_problem(
    mesh_encryption: Option<&MeshEncryption>,
    remembered: bool,
) -> Option<(String, String)> {
    let spec = &mesh_encryption?.spec;
    if remembered {
        return Some((
            crate::settings::REASON_REMEMBERED.to_string(),
            format!(
                "MeshEncryption default is gone; keeping the last spec this node applied (enabled: {}, mode: {:?}) until an object says otherwise",
                spec.enabled, spec.mode
            ),
        ));
    }
    if spec.node_encryption {
        return Some((
            "NodeEncryptionNotImplemented".to_string(),
            "spec.nodeEncryption: true is not implemented: host-to-host traffic is not encrypted (pod traffic is)".to_string(),
        ));
    }
    None
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
        .chain(peer_set.stale_endpoints.iter().map(|s| Problem {
            node: s.node.clone(),
            kind: ProblemKind::StaleEndpoint,
            reason: s.reason().to_string(),
            message: format!("wiremesh keeps node {}: {}", s.node, s.endpoint),
        }))
        .collect();
    out.sort();
    out
}

/// What the last pass produced, for the status publisher and `/readyz`.
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
    /// The pod prefixes each node may hold, as the last pass decided (for the ipcache).
    pub claims: Arc<PodClaims>,
    /// Why `MeshEncryption default` is not applied exactly as written: (condition reason,
    /// message). `None`: applied.
    pub settings_problem: Option<(String, String)>,
    /// The device the agent drives and why (None until one is selected).
    pub datapath: Option<Selection>,
    /// The current world's tunnel interface (the slot whose port is in the published endpoint;
    /// empty before the first pass).
    pub tunnel: String,
    /// During a rotation: the next world's tunnel interface.
    pub alt_tunnel: Option<String>,
    /// During a rotation: the peers sent to through the next world (`alt_tunnel`).
    pub alt_nodes: Vec<String>,
    /// When the current key was generated or promoted (the keystore file's modification time).
    pub key_since: Option<std::time::SystemTime>,
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

/// How the reconciler reaches the devices: the two slots (their current world is what everyone
/// else uses), and how to (re)select each.
pub struct DatapathControl {
    pub worlds: Arc<Worlds>,
    /// Selectors of slot a and slot b.
    pub selectors: [Arc<dyn Selector>; 2],
    /// `--datapath`: wins over `MeshEncryption.spec.datapath`.
    pub flag: Option<DatapathChoice>,
}

/// The reconciler task. See the module docs.
pub struct Reconciler<R: Routes> {
    settings: PlanSettings,
    local_key: PublicKey,
    keystore: Keystore,
    keys: KeySet,
    caches: Caches,
    nodes_api: Api<Node>,
    /// The meshes of slot a and slot b.
    meshes: [Mesh<R>; 2],
    /// During a rotation: peers sent to through the next world (and the rotation they belong
    /// to); seeded from the routing table after a restart.
    switched: Option<(String, std::collections::BTreeSet<String>)>,
    /// This node's mark has not reached the active rotation's step: it waits for something no
    /// watch event announces (a handshake in the next world), so the next pass comes soon.
    rotation_waiting: bool,
    routes: Arc<R>,
    /// Problems with remote objects, published in the background.
    events: EventSender,
    /// Events about this node itself (datapath selection, device key), awaited with a deadline.
    own_events: NodeEvents,
    tracker: RejectionTracker,
    /// Reasons of the `pod_claims_refused` series last set (to zero the ones that went away).
    claim_reasons: Vec<String>,
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
    /// The tunnels the eBPF config redirects into (`None` with `--ebpf off`).
    steered: Option<watch::Receiver<Option<SteeredTunnels>>>,
    /// Since when a flush of the other world waits for the eBPF config (see [`STEERING_WAIT_MAX`]).
    flush_deferred: Option<Instant>,
    /// Since when the `switched` mark waits for the eBPF ipcache (see [`STEERING_WAIT_MAX`]).
    mark_held: Option<Instant>,
}

impl<R: Routes> Reconciler<R> {
    /// Wires a reconciler; `meshes` are those of slot a and slot b on the same `routes`, both
    /// holding the keystore's current key.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: PlanSettings,
        keystore: Keystore,
        keys: KeySet,
        client: Client,
        caches: Caches,
        meshes: [Mesh<R>; 2],
        routes: Arc<R>,
        metrics: Metrics,
        snapshot: watch::Sender<MeshSnapshot>,
        notify: Arc<Notify>,
        resync_interval: Duration,
        datapath: DatapathControl,
    ) -> Self {
        Self {
            events: EventSender::spawn(
                NodeEvents::new(client.clone(), &settings.node_name),
                API_WRITE_TIMEOUT,
            ),
            own_events: NodeEvents::new(client.clone(), &settings.node_name),
            claim_reasons: Vec::new(),
            nodes_api: Api::all(client),
            settings,
            local_key: keys.current.public_key(),
            keystore,
            keys,
            caches,
            meshes,
            switched: None,
            rotation_waiting: false,
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
            steered: None,
            flush_deferred: None,
            mark_held: None,
        }
    }

    /// Makes flushes of the other world wait until the eBPF config no longer redirects into it.
    #[must_use]
    pub fn with_steering(mut self, steered: watch::Receiver<Option<SteeredTunnels>>) -> Self {
        self.steered = Some(steered);
        self
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
            // The pass's plan and views are dropped: give their pages back (crate::memory).
            crate::memory::release_free();
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
                    if self.rotation_waiting
                        || self.flush_deferred.is_some()
                        || self.mark_held.is_some()
                    {
                        ROTATION_POLL
                    } else {
                        self.resync_interval
                    }
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
            let deferred =
                self.flush_deferred.is_some() || self.mark_held.is_some() || self.rotation_waiting;
            tokio::select! {
                () = self.notify.notified() => {
                    // Let a burst of watch events settle into one pass.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // A deferred flush goes as soon as steering has rewritten its config.
                () = steering_changed(self.steered.as_mut().filter(|_| deferred)) => {}
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
        let (mesh_encryption, remembered) = self.caches.mesh_encryption_effective();
        let settings_problem = settings_problem(mesh_encryption.as_deref(), remembered);
        let me = self.settings.node_name.clone();
        let own_node = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(me.as_str()))
            .cloned();
        let own_annotations: BTreeMap<String, String> = own_node
            .as_ref()
            .and_then(|n| n.metadata.annotations.clone())
            .unwrap_or_default();

        // The underlay MTU only matters when neither flag nor spec sets the MTU; look it up once
        // per address.
        let own_address = own_node
            .as_ref()
            .and_then(|n| node_addresses(n).into_iter().next());
        let underlay = if self.settings.mtu.is_none()
            && mesh_encryption.as_ref().and_then(|m| m.spec.mtu).is_none()
        {
            self.underlay_mtu(own_address).await
        } else {
            None
        };

        // The rotation this node takes part in decides the keystore, the slots and the worlds.
        if !self.caches.rotations_synced() && own_annotations.contains_key(ANNOTATION_NEXT_ENDPOINT)
        {
            let error = ReconcileError::RotationsNotSynced;
            self.snapshot
                .send_modify(|s| s.error = Some(error.to_string()));
            return Err(error);
        }
        let rotations: Vec<RotationView> = self
            .caches
            .keyrotations
            .state()
            .iter()
            .filter_map(|k| RotationView::from_object(k))
            .collect();
        let mode = rotation::mode(&me, &own_annotations, &rotations);
        self.keystore_steps(mode)?;

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
        let base = plan.wanted.listen_port;
        let address = plan
            .own_address
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let keys = self.public_keys();
        let slots = rotation::own_rotation_annotations(
            &me,
            mode,
            &own_annotations,
            &keys,
            None,
            address,
            base,
        );
        let (current, next) = (slots.current, slots.next);
        let ci = current.index();
        self.datapath.worlds.set_current(ci);

        let mut first_error: Option<ReconcileError> = None;
        let choice = effective_choice(
            self.datapath.flag,
            mesh_encryption.as_ref().map(|m| m.spec.datapath),
        );
        if self.datapath.worlds.slot(ci).selection().map(|s| s.choice) != Some(choice)
            && let Err(error) = self.select_datapath(ci, choice, &nodes).await
        {
            if self.datapath.worlds.slot(ci).selection().is_none() {
                self.snapshot
                    .send_modify(|s| s.error = Some(error.to_string()));
                return Err(error);
            }
            // A re-selection failed: keep driving the device we have, and say why.
            first_error.get_or_insert(error);
        }

        // The current world: every peer under the identity that stays in force for it.
        let annotations_of: BTreeMap<&str, &BTreeMap<String, String>> = nodes
            .iter()
            .filter_map(|n| {
                Some((
                    n.metadata.name.as_deref()?,
                    n.metadata.annotations.as_ref()?,
                ))
            })
            .collect();
        let empty = BTreeMap::new();
        let ann = |node: &str| annotations_of.get(node).copied().unwrap_or(&empty);
        let active = match mode {
            Mode::Active(r) => Some(r),
            _ => None,
        };
        let mut current_wanted = plan.wanted.clone();
        current_wanted.listen_port = current.port(base);
        current_wanted.peers = world_peers(&plan, |desired| {
            if active.is_some_and(|r| rotation::is_revoked(desired, r)) {
                return None;
            }
            Some(rotation::current_identity(
                desired,
                ann(&desired.node),
                &rotations,
            ))
        });

        // The next world, while a rotation is active.
        let mut progress = Progress::default();
        if let (Some(r), Some(next)) = (active, next) {
            let ni = next.index();
            let mut next_wanted = current_wanted.clone();
            next_wanted.listen_port = next.port(base);
            next_wanted.peers = world_peers(&plan, |desired| {
                rotation::next_identity(desired, ann(&desired.node), r, &rotations)
            });
            progress.participants = r
                .participants
                .iter()
                .filter(|p| **p != me && plan.peer_set.peer(p).is_some())
                .cloned()
                .collect();
            self.seed_switched(r, ni, &plan.peer_set).await;
            {
                let fresh = next_wanted
                    .peers
                    .iter()
                    .filter(|wp| progress.participants.contains(&wp.node))
                    .filter(|wp| rotation::may_switch(r, &me, &wp.node))
                    .filter(|wp| {
                        self.meshes[ni].is_applied(wp)
                            && self.meshes[ni]
                                .last_handshake(&wp.config.public_key)
                                .is_some_and(|t| {
                                    t.elapsed().map_or(true, |e| e < rotation::FRESH_HANDSHAKE)
                                })
                    })
                    .map(|wp| wp.node.clone())
                    .collect::<Vec<_>>();
                if let Some((_, switched)) = &mut self.switched {
                    for node in fresh {
                        if switched.insert(node.clone()) {
                            tracing::info!(
                                rotation = %r.id,
                                peer = %node,
                                "next world has a handshake with the peer: sending through it"
                            );
                        }
                    }
                }
            }
            let switched = self
                .switched
                .as_ref()
                .map(|(_, s)| s.clone())
                .unwrap_or_default();
            next_wanted.unrouted = next_wanted
                .peers
                .iter()
                .map(|p| p.node.clone())
                .filter(|n| !switched.contains(n))
                .collect();
            current_wanted.unrouted = switched.clone();
            progress.switched = switched;
            progress.peer_steps = progress
                .participants
                .iter()
                .map(|p| (p.clone(), rotation::peer_step(ann(p), &r.id)))
                .collect();
            let next_key = if r.rotates(&me) {
                self.keys.next.clone()
            } else {
                Some(self.keys.current.clone())
            };
            match (next_key, self.ensure_next_device(r, ni, ci).await) {
                (Some(key), Ok(())) => {
                    self.meshes[ni].set_private_key(key);
                    let out = self.meshes[ni].apply(&next_wanted).await;
                    if out.device_unreachable {
                        self.datapath.worlds.slot(ni).clear();
                    }
                    for error in &out.errors {
                        tracing::warn!(%error, rotation = %r.id, "next world step failed");
                    }
                    // Prepared: every participant that announced its next world is in ours. One
                    // that never announces (its agent is down) is the one the rotation names;
                    // a late one is added before anyone sends to it there (a switch waits for a
                    // handshake in the next world, which needs both sides).
                    progress.next_ready = out.errors.is_empty()
                        && next_wanted
                            .peers
                            .iter()
                            .filter(|w| progress.participants.contains(&w.node))
                            .all(|w| self.meshes[ni].is_applied(w));
                    if let Some(error) = out.errors.first()
                        && first_error.is_none()
                    {
                        first_error = Some(ReconcileError::Apply {
                            count: out.errors.len(),
                            first: format!("next world: {error}"),
                        });
                    }
                }
                (None, _) => tracing::warn!(
                    rotation = %r.id,
                    "the next key is not in the keystore: this node cannot prepare"
                ),
                (Some(_), Err(error)) => {
                    tracing::warn!(%error, "next world unavailable");
                    first_error.get_or_insert(error);
                }
            }
        } else {
            self.switched = None;
        }

        self.meshes[ci].set_private_key(self.keys.current.clone());
        let outcome = self.meshes[ci].apply(&current_wanted).await;
        if outcome.device_unreachable {
            // The device process is gone or the link was deleted: select again next pass (waits
            // for the restarted device process, or creates the kernel link again).
            self.datapath.worlds.slot(ci).clear();
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
                interface = self.meshes[ci].ifname(),
                peers = current_wanted.peers.len(),
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

        // What this node publishes: its identity on the current slot, its next world, its mark.
        let mark_progress = self.steered_progress(&progress, next);
        let step = active.and_then(|r| {
            let mine = rotation::peer_step(&own_annotations, &r.id);
            rotation::next_step(r, mine, &mark_progress)
        });
        let own_rotation = rotation::own_rotation_annotations(
            &me,
            mode,
            &own_annotations,
            &keys,
            step,
            address,
            base,
        );
        let (phase, step_label) = rotation::state_labels(
            mode,
            own_rotation
                .annotations
                .get(wiremesh_keyexchange::annotations::ANNOTATION_ROTATION)
                .and_then(|m| m.as_deref()),
        );
        self.metrics.set_rotation(phase, step_label);
        self.rotation_waiting = active.is_some_and(|r| {
            r.phase
                .target_step()
                .is_some_and(|target| !step.is_some_and(|s| s.reached(target)))
        });
        if let Some(own_node) = &own_node {
            if let Some(generation) =
                crate::views::own_annotations(own_node, &self.local_key, current.port(base))
                    .ok()
                    .and_then(|a| {
                        a.get(wiremesh_keyexchange::ANNOTATION_KEY_GENERATION)?
                            .parse::<i64>()
                            .ok()
                    })
            {
                self.metrics.key_generation.set(generation);
            }
            match own_patch(
                own_node,
                &own_annotations,
                &self.local_key,
                current.port(base),
                &own_rotation,
            ) {
                Ok(patch) if patch.is_empty() => {}
                Ok(patch) => {
                    if let Err(error) = self.publish_own(patch).await {
                        first_error.get_or_insert(error);
                    }
                }
                Err(error) => {
                    first_error.get_or_insert(error.into());
                }
            }
        }
        if next.is_none() {
            self.flush_other_slot(current).await;
        }

        self.report_problems(&plan, &nodes);

        let configured: Vec<(String, PublicKey)> = current_wanted
            .peers
            .iter()
            .filter(|p| self.meshes[ci].is_applied(p))
            .map(|p| (p.node.clone(), p.config.public_key))
            .collect();
        let expected: Vec<(String, PublicKey)> = current_wanted
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
            .stale_endpoints
            .set(plan.peer_set.stale_endpoints.len() as i64);
        self.metrics
            .routes
            .set(self.meshes[ci].applied_routes().len() as i64);
        let error = first_error.as_ref().map(ToString::to_string);
        let selection = self.datapath.worlds.slot(ci).selection();
        let tunnel = self.meshes[ci].ifname().to_string();
        let alt_tunnel = next.map(|n| self.meshes[n.index()].ifname().to_string());
        let alt_nodes: Vec<String> = progress.switched.iter().cloned().collect();
        let key_since = std::fs::metadata(
            self.keystore
                .path(wiremesh_keyexchange::keystore::PRIVATE_KEY_FILE),
        )
        .and_then(|m| m.modified())
        .ok();
        self.snapshot.send_modify(|s| {
            s.datapath = selection;
            s.reconciled = true;
            s.enabled = plan.enabled;
            s.claims = Arc::clone(&plan.claims);
            s.settings_problem = settings_problem;
            s.expected = expected;
            s.configured = configured;
            s.rejected = plan
                .problems
                .iter()
                .filter(|p| p.kind == ProblemKind::Rejected)
                .map(|p| (p.node.clone(), p.reason.clone()))
                .collect();
            s.error = error;
            s.tunnel = tunnel;
            s.alt_tunnel = alt_tunnel;
            s.alt_nodes = alt_nodes;
            s.key_since = key_since;
        });
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// The public halves of the keystore.
    fn public_keys(&self) -> rotation::Keys {
        let p = self.keys.public();
        rotation::Keys {
            current: p.current,
            next: p.next,
            previous: p.previous,
        }
    }

    /// Applies the keystore steps `mode` needs (at most a few: generate, or promote then retire),
    /// reloading the keystore after each.
    fn keystore_steps(&mut self, mode: Mode<'_>) -> Result<(), ReconcileError> {
        for _ in 0..4 {
            let Some(step) =
                rotation::keystore_step(&self.settings.node_name, mode, &self.public_keys())
            else {
                break;
            };
            self.keystore.apply(step)?;
            self.keys = self.keystore.load()?.keys;
            self.local_key = self.keys.current.public_key();
            tracing::info!(
                ?step,
                public_key = %self.local_key,
                next_public_key = ?self.keys.next.as_ref().map(|k| k.public_key().to_base64()),
                "keystore step for the key rotation"
            );
        }
        Ok(())
    }

    /// After a restart mid-rotation, the peers already sent to through the next world are those
    /// whose prefixes are routed through its device.
    async fn seed_switched(&mut self, r: &RotationView, ni: usize, peer_set: &PeerSet) {
        if self.switched.as_ref().is_some_and(|(id, _)| *id == r.id) {
            return;
        }
        let ifname = self.meshes[ni].ifname().to_string();
        let routed: std::collections::BTreeSet<ipnet::IpNet> = match self.routes.list(&ifname).await
        {
            Ok(routes) => routes.into_iter().collect(),
            Err(_) => Default::default(),
        };
        let switched = peer_set
            .peers
            .iter()
            .filter(|p| p.allowed_ips.iter().any(|ip| routed.contains(ip)))
            .map(|p| p.node.clone())
            .collect();
        self.switched = Some((r.id.clone(), switched));
    }

    /// Selects the next world's device (of the same kind as the current one) if it is not yet.
    async fn ensure_next_device(
        &mut self,
        r: &RotationView,
        ni: usize,
        ci: usize,
    ) -> Result<(), ReconcileError> {
        let slot = self.datapath.worlds.slot(ni).clone();
        if slot.selection().is_some() {
            return Ok(());
        }
        let choice = match self.datapath.worlds.slot(ci).selection().map(|s| s.kind) {
            Some(crate::datapath::DatapathKind::Kernel) => DatapathChoice::Kernel,
            _ => DatapathChoice::Userspace,
        };
        match self.datapath.selectors[ni].select(choice).await {
            Ok((device, selection)) => {
                tracing::info!(
                    rotation = %r.id,
                    interface = slot.ifname(),
                    kind = selection.kind.as_str(),
                    "next world's device selected"
                );
                slot.set(device, selection);
                Ok(())
            }
            Err(error) => Err(ReconcileError::NextWorld {
                rotation: r.id.clone(),
                ifname: slot.ifname().to_string(),
                message: error.to_string(),
            }),
        }
    }

    /// `progress` as the datapath has it: a peer counts as switched (and so toward this node's
    /// `switched` mark, after which its peers may retire the old world) only once the eBPF
    /// ipcache sends it through the next world's device, not just once the reconciler decided
    /// so. An agent killed between the two would otherwise have published a mark its pinned
    /// maps do not honour.
    fn steered_progress(&mut self, progress: &Progress, next: Option<Slot>) -> Progress {
        let (Some(next), Some(steered)) = (next, &self.steered) else {
            self.mark_held = None;
            return progress.clone();
        };
        let next_if = self.meshes[next.index()].ifname();
        let held: Vec<String> = match steered.borrow().as_ref() {
            Some(s) => progress
                .switched
                .iter()
                .filter(|n| !s.sends_through(n, next_if))
                .cloned()
                .collect(),
            None => progress.switched.iter().cloned().collect(),
        };
        if held.is_empty() {
            self.mark_held = None;
            return progress.clone();
        }
        let since = *self.mark_held.get_or_insert_with(|| {
            tracing::info!(
                ?held,
                "the eBPF ipcache does not yet send these peers through the next world; \
                 the switched mark waits for steering"
            );
            Instant::now()
        });
        if since.elapsed() >= STEERING_WAIT_MAX {
            tracing::warn!(?held, waited = ?since.elapsed(), "steering did not follow; marking anyway");
            return progress.clone();
        }
        let mut steered_progress = progress.clone();
        steered_progress.switched.retain(|n| !held.contains(n));
        steered_progress
    }

    /// Out of a rotation, the slot that is not current carries nothing: its peers and routes go
    /// (the old world after a completed rotation, the next world after a rolled-back one).
    async fn flush_other_slot(&mut self, current: Slot) {
        let other = current.other().index();
        if self.datapath.worlds.slot(other).selection().is_none() {
            self.flush_deferred = None;
            return;
        }
        if let Some(steered) = &self.steered {
            let ifname = self.meshes[other].ifname();
            let redirected = steered.borrow().as_ref().is_none_or(|s| s.names(ifname));
            if redirected {
                let since = *self.flush_deferred.get_or_insert_with(|| {
                    tracing::info!(
                        interface = ifname,
                        "the eBPF config still redirects into the other world's device; \
                         its flush waits for steering"
                    );
                    Instant::now()
                });
                if since.elapsed() < STEERING_WAIT_MAX {
                    return;
                }
                tracing::warn!(
                    interface = ifname,
                    waited = ?since.elapsed(),
                    "steering did not rewrite its config; flushing the other world anyway"
                );
            }
        }
        self.flush_deferred = None;
        match self.meshes[other].flush().await {
            Ok(0) => {}
            Ok(changed) => tracing::info!(
                interface = self.meshes[other].ifname(),
                removed = changed,
                "took the other world's device out of service"
            ),
            Err(error) => tracing::warn!(%error, "could not flush the other world's device"),
        }
    }

    async fn publish_own(
        &self,
        patch: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), ReconcileError> {
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
        index: usize,
        choice: DatapathChoice,
        nodes: &[Arc<CachedNode>],
    ) -> Result<(), ReconcileError> {
        match self.datapath.selectors[index].select(choice).await {
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
                self.datapath.worlds.slot(index).set(device, selection);
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
        nodes: &[Arc<CachedNode>],
        type_: EventType,
        reason: &str,
        note: &str,
        action: &str,
    ) {
        let reference = self.own_reference(nodes);
        let publish = self
            .own_events
            .publish_on(&reference, type_, reason, note, action);
        match tokio::time::timeout(API_WRITE_TIMEOUT, publish).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, reason, "could not record Event"),
            Err(_) => tracing::warn!(reason, "recording the Event timed out"),
        }
    }

    fn own_reference(&self, nodes: &[Arc<CachedNode>]) -> ObjectReference {
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
    async fn report_device_changes(&self, outcome: &ApplyOutcome, nodes: &[Arc<CachedNode>]) {
        if let Some((old, new)) = outcome.device_replaced {
            tracing::warn!(
                interface = self.meshes[self.datapath.worlds.current_index()].ifname(),
                old_ifindex = old,
                new_ifindex = new,
                "the device was recreated (its process restarted or the link was replaced); \
                 re-applied its whole configuration"
            );
        }
        match &outcome.key_replaced {
            None => {}
            Some(None) => tracing::info!(
                interface = self.meshes[self.datapath.worlds.current_index()].ifname(),
                key = %self.local_key.fingerprint(),
                "the device had no key (a fresh device): gave it the keystore's key"
            ),
            Some(Some(other)) => {
                let message = format!(
                    "the WireGuard device {} held the key {} instead of this node's key {} from \
                     the keystore; the keystore wins and the device now uses {}",
                    self.meshes[self.datapath.worlds.current_index()].ifname(),
                    other.fingerprint(),
                    self.local_key.fingerprint(),
                    self.local_key.fingerprint(),
                );
                tracing::warn!(
                    interface = self.meshes[self.datapath.worlds.current_index()].ifname(),
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

    /// Reports the problems this agent is the emitter of ([`is_emitter`]): one Event each
    /// (queued, never awaited here) and, for a rejected node, an `invalid_annotations{node,reason}`
    /// series that is removed once the problem is gone (a stale endpoint is no invalid
    /// annotation: a Normal Event only, counted in `stale_endpoints`). Refused pod claims are also counted by reason on every
    /// agent (`pod_claims_refused{reason}`: bounded, no per-node series).
    fn report_problems(&mut self, plan: &Plan, nodes: &[Arc<CachedNode>]) {
        let mut by_reason: BTreeMap<String, i64> = BTreeMap::new();
        for conflict in &plan.peer_set.conflicts {
            *by_reason.entry(conflict.reason().to_string()).or_default() += 1;
        }
        for reason in self.claim_reasons.drain(..) {
            if !by_reason.contains_key(&reason) {
                self.metrics
                    .pod_claims_refused
                    .remove(&ReasonLabels { reason });
            }
        }
        for (reason, count) in &by_reason {
            self.metrics
                .pod_claims_refused
                .get_or_create(&ReasonLabels {
                    reason: reason.clone(),
                })
                .set(*count);
        }
        self.claim_reasons = by_reason.into_keys().collect();

        let own = self.settings.node_name.as_str();
        let healthy: Vec<&str> = plan
            .peer_set
            .peers
            .iter()
            .map(|p| p.node.as_str())
            .collect();
        let mine: Vec<Problem> = plan
            .problems
            .iter()
            .filter(|p| is_emitter(own, &p.node, healthy.iter().copied()))
            .cloned()
            .collect();
        let (fresh, gone) = self.tracker.observe_changes(&mine);
        for (node, kind, reason) in gone {
            if kind == ProblemKind::Rejected {
                self.metrics
                    .invalid_annotations
                    .remove(&InvalidAnnotationLabels { node, reason });
            }
        }
        for problem in fresh {
            if problem.kind == ProblemKind::StaleEndpoint {
                tracing::info!(
                    node = %problem.node,
                    reason = %problem.reason,
                    message = %problem.message,
                    "remote node's endpoint follows its address"
                );
            } else {
                tracing::warn!(
                    node = %problem.node,
                    reason = %problem.reason,
                    message = %problem.message,
                    "skipping remote node configuration"
                );
            }
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
            self.events.send(problem, uid);
        }
    }
}

/// The plan's wanted peers as one world sees them: `identity` gives each peer's key and endpoint
/// there (`None`: not in that world); prefixes, keepalive and PSK stay.
fn world_peers(
    plan: &Plan,
    identity: impl Fn(&wiremesh_keyexchange::DesiredPeer) -> Option<(PublicKey, std::net::SocketAddr)>,
) -> Vec<WantedPeer> {
    plan.wanted
        .peers
        .iter()
        .filter_map(|wp| {
            let (key, endpoint) = identity(plan.peer_set.peer(&wp.node)?)?;
            let mut out = wp.clone();
            out.config.public_key = key;
            out.config.endpoint = Some(endpoint);
            Some(out)
        })
        .collect()
}

/// The merge patch that brings this node's owned annotations to what it must publish: its
/// identity on the current slot (`public-key`, `endpoint`, `key-generation`, see
/// [`own_annotations`]) and its rotation annotations (removed with `null`). Empty: up to date.
pub fn own_patch(
    own_node: &CachedNode,
    published: &BTreeMap<String, String>,
    local_key: &PublicKey,
    port: u16,
    own_rotation: &rotation::OwnRotation,
) -> Result<serde_json::Map<String, serde_json::Value>, PublishError> {
    let mut patch = serde_json::Map::new();
    for (k, v) in own_annotations(own_node, local_key, port)? {
        if published.get(&k) != Some(&v) {
            patch.insert(k, serde_json::Value::String(v));
        }
    }
    for (k, v) in &own_rotation.annotations {
        match v {
            Some(v) if published.get(*k) != Some(v) => {
                patch.insert(k.to_string(), serde_json::Value::String(v.clone()));
            }
            None if published.contains_key(*k) => {
                patch.insert(k.to_string(), serde_json::Value::Null);
            }
            _ => {}
        }
    }
    Ok(patch)
}

/// 1 s, 2 s, 4 s ... capped at 30 s.
/// Resolves when `steered` changes; never without one (or once its sender is gone).
async fn steering_changed(steered: Option<&mut watch::Receiver<Option<SteeredTunnels>>>) {
    if let Some(rx) = steered
        && rx.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

fn retry_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(5);
    Duration::from_secs((1u64 << exp).min(30))
}

#[cfg(test)]
mod tests;
