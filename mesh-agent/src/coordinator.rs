//! The rotation coordinator: one active per cluster, elected among the agents with a
//! `coordination.k8s.io` Lease (the kept crate `kube-lease-manager`, server-side apply on the
//! Lease). The active one moves every KeyRotation's status through its phases
//! ([`decide`] over `keyexchange::rotation::controller::evaluate`): the frozen plan, per-phase
//! node counts, transition times, conditions and Events; a phase that outlives `phaseTimeout`
//! fails the rotation naming the nodes. It keeps no state of its own: a coordinator that takes
//! over mid-rotation continues from the recorded status and the nodes' marks.
//!
//! Everything (the two watchers, the Lease loop, the passes) runs inside the one future of
//! [`Coordinator::run`], so aborting its task stops the renewals too (as a SIGKILL would): the
//! Lease then expires and another agent takes over. On drain the Lease is released so the
//! takeover is immediate.
//!
//! Status writes carry the object's resourceVersion: a coordinator that lost the Lease without
//! noticing yet gets a conflict instead of overwriting its successor's work.

pub mod decide;
pub mod meshstatus;
pub mod schedule;
#[cfg(test)]
mod tests;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Node, ObjectReference},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, PartialObjectMeta, Patch, PatchParams, PostParams},
    core::ObjectMeta,
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, Store},
        watcher,
    },
};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::{Notify, watch};
use wiremesh_crds::{
    KeyRotation, MESH_ENCRYPTION_NAME, MeshEncryption, MeshNode, RotationPhase as CrdPhase,
};

use self::decide::{Decision, EventKind, decide, is_active};
use crate::{drain::Drain, events::REPORTING_CONTROLLER, reconciler::API_WRITE_TIMEOUT};

/// Name of the Lease the agents compete for.
pub const LEASE_NAME: &str = "wiremesh-rotation-coordinator";
/// Field manager of the Lease and of the status writes.
pub const FIELD_MANAGER: &str = "wiremesh-coordinator";

/// How the coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    /// This candidate's identity in the Lease (the node name).
    pub identity: String,
    /// Namespace of the Lease (the agent's namespace).
    pub namespace: String,
    /// Lease name.
    pub lease_name: String,
    /// How long a Lease holds without renewal (whole seconds, > `lease_grace`).
    pub lease_duration: Duration,
    /// The holder renews this long before the Lease expires.
    pub lease_grace: Duration,
    /// A pass runs at least this often while leading (phase timeouts are checked on it).
    pub interval: Duration,
    /// The MeshEncryption status (nodes ready / total) is recomputed this often while leading.
    pub mesh_status_interval: Duration,
}

impl CoordinatorSettings {
    /// Production defaults: Lease `wiremesh-rotation-coordinator`, 15 s, renewed 5 s early, a
    /// pass every second.
    pub fn new(identity: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            identity: identity.into(),
            namespace: namespace.into(),
            lease_name: LEASE_NAME.to_string(),
            lease_duration: Duration::from_secs(15),
            lease_grace: Duration::from_secs(5),
            interval: Duration::from_secs(1),
            mesh_status_interval: Duration::from_secs(10),
        }
    }
}

/// A failed step of a pass.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("write status of KeyRotation {name}: {source}")]
    WriteStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("write status of KeyRotation {name}: no answer within {API_WRITE_TIMEOUT:?}")]
    WriteTimeout { name: String },
    #[error("create scheduled KeyRotation {name}: {source}")]
    CreateScheduled {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("list MeshNodes (metadata) for the MeshEncryption status: {source}")]
    ListMeshNodes {
        #[source]
        source: kube::Error,
    },
    #[error("write status of MeshEncryption {MESH_ENCRYPTION_NAME}: {source}")]
    WriteMeshStatus {
        #[source]
        source: kube::Error,
    },
    #[error(
        "write status of MeshEncryption {MESH_ENCRYPTION_NAME}: no answer within {API_WRITE_TIMEOUT:?}"
    )]
    WriteMeshStatusTimeout,
    #[error("Lease {namespace}/{name}: {source}")]
    Lease {
        namespace: String,
        name: String,
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

/// The coordinator's metrics.
#[derive(Clone, Default)]
pub struct CoordinatorMetrics {
    leader: Gauge,
    passes: Family<ResultLabels, Counter>,
    transitions: Family<PhaseLabels, Counter>,
}

impl CoordinatorMetrics {
    /// Registers `rotation_coordinator_leader`, `rotation_coordinator_passes_total{result}` and
    /// `rotation_phase_transitions_total{phase}`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "rotation_coordinator_leader",
            "1 while this agent is the active rotation coordinator",
            metrics.leader.clone(),
        );
        registry.register(
            "rotation_coordinator_passes",
            "Coordinator passes over the KeyRotations, by result",
            metrics.passes.clone(),
        );
        registry.register(
            "rotation_phase_transitions",
            "KeyRotation phase changes made by this coordinator, by new phase",
            metrics.transitions.clone(),
        );
        metrics
    }
}

/// See the module docs.
pub struct Coordinator {
    settings: CoordinatorSettings,
    client: Client,
    recorder: Recorder,
    metrics: CoordinatorMetrics,
}

type NodeMeta = PartialObjectMeta<Node>;

/// The coordinator's caches.
struct Stores {
    rotations: Store<KeyRotation>,
    nodes: Store<NodeMeta>,
    mesh: Store<MeshEncryption>,
}

impl Coordinator {
    pub fn new(settings: CoordinatorSettings, client: Client, metrics: CoordinatorMetrics) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: REPORTING_CONTROLLER.to_string(),
                instance: Some(format!("mesh-agent-{}", settings.identity)),
            },
        );
        Self {
            settings,
            client,
            recorder,
            metrics,
        }
    }

    /// Runs until the drain starts; see the module docs.
    pub async fn run(self, drain: Drain) {
        let notify = Arc::new(Notify::new());
        let (nodes, node_writer) = reflector::store::<NodeMeta>();
        let (rotations, rotation_writer) = reflector::store::<KeyRotation>();
        let node_events = follow(
            watcher(
                Api::<NodeMeta>::all(self.client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .modify(prune_node_meta)
            .reflect(node_writer),
            notify.clone(),
            "node",
        );
        let rotation_events = follow(
            watcher(
                Api::<KeyRotation>::all(self.client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .modify(|r: &mut KeyRotation| r.metadata.managed_fields = None)
            .reflect(rotation_writer),
            notify.clone(),
            "KeyRotation",
        );
        let (mesh, mesh_writer) = reflector::store::<MeshEncryption>();
        let mesh_events = {
            let config =
                watcher::Config::default().fields(&format!("metadata.name={MESH_ENCRYPTION_NAME}"));
            follow(
                watcher(Api::<MeshEncryption>::all(self.client.clone()), config)
                    .default_backoff()
                    .modify(|m: &mut MeshEncryption| m.metadata.managed_fields = None)
                    .reflect(mesh_writer),
                notify.clone(),
                "MeshEncryption",
            )
        };
        let stores = Stores {
            rotations,
            nodes,
            mesh,
        };
        let (leader_tx, leader_rx) = watch::channel(false);
        tokio::select! {
            () = node_events => tracing::warn!("coordinator: node watch ended"),
            () = rotation_events => tracing::warn!("coordinator: KeyRotation watch ended"),
            () = mesh_events => tracing::warn!("coordinator: MeshEncryption watch ended"),
            () = self.hold_lease(leader_tx, drain) => {}
            () = self.coordinate(leader_rx, &stores, &notify) => {}
        }
        self.metrics.leader.set(0);
    }

    async fn lease_manager(&self) -> Result<LeaseManager, CoordinatorError> {
        LeaseManagerBuilder::new(self.client.clone(), &self.settings.lease_name)
            .with_namespace(&self.settings.namespace)
            .with_identity(&self.settings.identity)
            .with_duration(self.settings.lease_duration.as_secs().max(2))
            .with_grace(self.settings.lease_grace.as_secs().max(1))
            .with_field_manager(FIELD_MANAGER)
            .build()
            .await
            .map_err(|source| self.lease_error(source))
    }

    fn lease_error(&self, source: kube_lease_manager::LeaseManagerError) -> CoordinatorError {
        CoordinatorError::Lease {
            namespace: self.settings.namespace.clone(),
            name: self.settings.lease_name.clone(),
            source,
        }
    }

    /// Competes for the Lease and keeps `leader` true while this candidate holds it. An error
    /// from the Lease manager counts as "not leader" (fail closed) and the manager is rebuilt,
    /// which re-reads who holds the Lease. Returns on drain after releasing the Lease.
    async fn hold_lease(&self, leader: watch::Sender<bool>, mut drain: Drain) {
        let set = |value: bool| {
            if leader.send_replace(value) != value {
                tracing::info!(
                    identity = %self.settings.identity,
                    lease = %self.settings.lease_name,
                    leader = value,
                    "rotation coordinator leadership changed"
                );
            }
            self.metrics.leader.set(i64::from(value));
        };
        let mut failures: u32 = 0;
        loop {
            match self.lease_manager().await {
                Ok(manager) => loop {
                    tokio::select! {
                        changed = manager.changed() => match changed {
                            Ok(holding) => {
                                failures = 0;
                                set(holding);
                            }
                            Err(source) => {
                                let error = self.lease_error(source);
                                tracing::warn!(%error, "coordinator lease check failed; standing down");
                                set(false);
                                break;
                            }
                        },
                        () = drain.signaled() => {
                            set(false);
                            if let Err(source) = manager.release().await {
                                let error = self.lease_error(source);
                                tracing::warn!(%error, "could not release the coordinator lease");
                            }
                            return;
                        }
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, "coordinator lease unavailable; retrying");
                    set(false);
                }
            }
            // 1 s, 2 s, 4 s ... 30 s between attempts while the Lease cannot be used (missing
            // RBAC must not flood the log).
            failures = failures.saturating_add(1);
            let delay = Duration::from_secs((1u64 << failures.saturating_sub(1).min(5)).min(30));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = drain.signaled() => return,
            }
        }
    }

    /// Runs passes while `leader` is true.
    async fn coordinate(
        &self,
        mut leader: watch::Receiver<bool>,
        stores: &Stores,
        notify: &Notify,
    ) {
        let mut mesh_status_due = tokio::time::Instant::now();
        loop {
            while !*leader.borrow_and_update() {
                if leader.changed().await.is_err() {
                    return;
                }
            }
            // Never decide on a half-filled cache: a missing Node reads as removed.
            let _ = futures::join!(
                stores.rotations.wait_until_ready(),
                stores.nodes.wait_until_ready(),
                stores.mesh.wait_until_ready(),
            );
            let result = self.pass(stores).await;
            let label = ResultLabels {
                result: if result.is_ok() { "ok" } else { "error" },
            };
            self.metrics.passes.get_or_create(&label).inc();
            if let Err(error) = result {
                tracing::warn!(%error, "coordinator pass failed; retrying");
            }
            if tokio::time::Instant::now() >= mesh_status_due {
                mesh_status_due = tokio::time::Instant::now() + self.settings.mesh_status_interval;
                if let Err(error) = self.write_mesh_status(stores).await {
                    tracing::warn!(%error, "MeshEncryption status not written; retrying");
                }
            }
            tokio::select! {
                () = notify.notified() => {
                    // Let a burst of mark updates settle into one pass.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                () = tokio::time::sleep(self.settings.interval) => {}
                changed = leader.changed() => if changed.is_err() { return },
            }
        }
    }

    /// One pass over every KeyRotation, oldest first, so that Pending ones start in creation
    /// order and only one is ever active. Every rotation is handled even if another fails.
    async fn pass(&self, stores: &Stores) -> Result<(), CoordinatorError> {
        let mut all = stores.rotations.state();
        all.sort_by(|a, b| {
            (
                a.metadata.creation_timestamp.as_ref().map(|t| t.0),
                a.name_any(),
            )
                .cmp(&(
                    b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    b.name_any(),
                ))
        });
        // Only a rotation still running reads the Nodes (`decide` returns at once for a finished
        // one): at steady state a pass copies no Node metadata (every Node's, every second, was
        // an eighth of the idle agent's CPU at 5,000 Nodes; docs/benchmarks.md).
        let node_meta: Vec<ObjectMeta> = if all.iter().any(|r| !phase_of(r).is_terminal()) {
            stores
                .nodes
                .state()
                .iter()
                .map(|n| n.metadata.clone())
                .collect()
        } else {
            Vec::new()
        };
        let mut active = all.iter().any(|r| is_active(phase_of(r)));
        let mut first_error = None;
        for rotation in &all {
            let phase = phase_of(rotation);
            let decision = decide(
                rotation,
                &node_meta,
                phase == CrdPhase::Pending && active,
                Timestamp::now(),
            );
            if is_active(decision.phase) {
                active = true;
            }
            if let Err(error) = self.apply(rotation, decision).await {
                first_error.get_or_insert(error);
            }
        }
        let rotations: Vec<KeyRotation> = all.iter().map(|r| r.as_ref().clone()).collect();
        let mesh = stores
            .mesh
            .find(|m| m.metadata.name.as_deref() == Some(MESH_ENCRYPTION_NAME));
        if let Some(due) = schedule::due_rotation(mesh.as_deref(), &rotations, Timestamp::now())
            && let Err(error) = self.create_scheduled(&due).await
        {
            first_error.get_or_insert(error);
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Recomputes `MeshEncryption default`'s status from the Nodes and the MeshNodes' metadata
    /// ([`meshstatus`]) and writes it when it changed (merge patch of the status subresource).
    async fn write_mesh_status(&self, stores: &Stores) -> Result<(), CoordinatorError> {
        let Some(mesh) = stores
            .mesh
            .find(|m| m.metadata.name.as_deref() == Some(MESH_ENCRYPTION_NAME))
        else {
            return Ok(());
        };
        let nodes: Vec<String> = stores.nodes.state().iter().map(|n| n.name_any()).collect();
        let meshnodes = Api::<MeshNode>::all(self.client.clone())
            .list_metadata(&ListParams::default())
            .await
            .map_err(|source| CoordinatorError::ListMeshNodes { source })?;
        let summary = meshstatus::summarize(&nodes, &meshnodes.items, Timestamp::now());
        let status = meshstatus::next_status(
            mesh.status.as_ref(),
            &summary,
            mesh.metadata.generation,
            Timestamp::now(),
        );
        if mesh.status.as_ref() == Some(&status) {
            return Ok(());
        }
        let patch = serde_json::json!({ "status": status });
        tokio::time::timeout(
            API_WRITE_TIMEOUT,
            Api::<MeshEncryption>::all(self.client.clone()).patch_status(
                MESH_ENCRYPTION_NAME,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ),
        )
        .await
        .map_err(|_| CoordinatorError::WriteMeshStatusTimeout)?
        .map_err(|source| CoordinatorError::WriteMeshStatus { source })?;
        tracing::info!(
            ready = status.nodes_ready,
            total = status.nodes_total,
            "MeshEncryption status written"
        );
        Ok(())
    }

    /// Creates a scheduled rotation; one that exists already (another coordinator was faster)
    /// is fine.
    async fn create_scheduled(&self, rotation: &KeyRotation) -> Result<(), CoordinatorError> {
        let name = rotation.name_any();
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PostParams::default()
        };
        match Api::<KeyRotation>::all(self.client.clone())
            .create(&params, rotation)
            .await
        {
            Ok(_) => {
                tracing::info!(rotation = %name, reason = %rotation.spec.reason, "scheduled rotation created");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(source) => Err(CoordinatorError::CreateScheduled { name, source }),
        }
    }

    async fn apply(
        &self,
        rotation: &KeyRotation,
        decision: Decision,
    ) -> Result<(), CoordinatorError> {
        let name = rotation.name_any();
        if let Some(status) = decision.status {
            let mut updated = rotation.clone();
            updated.status = Some(status);
            let api = Api::<KeyRotation>::all(self.client.clone());
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.to_string()),
                ..PostParams::default()
            };
            let call = api.replace_status(&name, &params, &updated);
            match tokio::time::timeout(API_WRITE_TIMEOUT, call).await {
                Err(_) => return Err(CoordinatorError::WriteTimeout { name }),
                Ok(Err(source)) => return Err(CoordinatorError::WriteStatus { name, source }),
                Ok(Ok(_)) => {}
            }
            if decision.phase != phase_of(rotation) {
                tracing::info!(
                    rotation = %name,
                    from = %phase_of(rotation),
                    to = %decision.phase,
                    "rotation phase changed"
                );
                self.metrics
                    .transitions
                    .get_or_create(&PhaseLabels {
                        phase: decision.phase.as_str(),
                    })
                    .inc();
            }
        }
        // Events only after the status that they describe was written (a conflict retries the
        // whole decision, and with it the Event).
        let reference = rotation.object_ref(&());
        for event in decision.events {
            self.record(&reference, event).await;
        }
        Ok(())
    }

    async fn record(&self, reference: &ObjectReference, event: decide::RotationEvent) {
        let event = Event {
            type_: match event.kind {
                EventKind::Normal => EventType::Normal,
                EventKind::Warning => EventType::Warning,
            },
            reason: event.reason.to_string(),
            note: Some(event.note),
            action: "CoordinateRotation".to_string(),
            secondary: None,
        };
        match tokio::time::timeout(API_WRITE_TIMEOUT, self.recorder.publish(&event, reference))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "could not record rotation Event"),
            Err(_) => tracing::warn!("recording a rotation Event timed out"),
        }
    }
}

/// Drives a reflected watch stream, waking the passes on every event; errors are logged (the
/// stream's backoff retries).
async fn follow<T, E: std::fmt::Display>(
    stream: impl futures::Stream<Item = Result<T, E>>,
    notify: Arc<Notify>,
    what: &'static str,
) {
    stream
        .for_each(|event| {
            notify.notify_one();
            if let Err(error) = event {
                tracing::warn!(%error, watch = what, "coordinator watch failed; retrying");
            }
            std::future::ready(())
        })
        .await;
}

fn phase_of(rotation: &KeyRotation) -> CrdPhase {
    rotation
        .status
        .as_ref()
        .map(|s| s.phase)
        .unwrap_or_default()
}

/// Keeps what the coordinator reads of a Node: name, uid, labels (nodeSelector) and the
/// `wiremesh.io/` annotations (marks, keys).
fn prune_node_meta(node: &mut NodeMeta) {
    let meta = &mut node.metadata;
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.annotations = meta.annotations.take().map(|all| {
        all.into_iter()
            .filter(|(k, _)| k.starts_with("wiremesh.io/"))
            .collect()
    });
}
