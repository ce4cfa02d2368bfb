//! The agent's view of the cluster: reflector caches of all Nodes, all Pods and the
//! `MeshEncryption` singleton, each fed by a watcher with `default_backoff()`. Nodes and Pods
//! are decoded as the compact [`CachedNode`]/[`CachedPod`] (only the fields the mesh reads) and
//! pruned further before they enter the cache (foreign annotations, managed fields, containers
//! without ports), which keeps memory flat on big clusters. Every watch event wakes the
//! reconciler through a shared [`Notify`].
//!
//! RBAC: Node credentials alone may not list other Nodes or all Pods (the Node authorizer limits
//! them to their own objects), so the agent's identity also needs `get/list/watch` on `nodes`,
//! `pods` and `meshencryptions.wiremesh.io` through RBAC; patching stays limited to its own Node
//! by the Node authorizer and the NodeRestriction admission plugin.

use std::{collections::BTreeMap, fmt::Debug, sync::Arc};

use futures::StreamExt;
use k8s_openapi::api::{core::v1::Namespace, networking::v1::NetworkPolicy};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use wiremesh_crds::{KeyRotation, MESH_ENCRYPTION_NAME, MeshEncryption};

use crate::{
    cached::{CachedNode, CachedPod},
    drain::Drain,
    settings::SettingsMemory,
};

/// The prefix of every annotation the mesh reads from Nodes.
const ANNOTATION_PREFIX: &str = "wiremesh.io/";

/// Read handles of the caches.
#[derive(Clone)]
pub struct Caches {
    pub nodes: Store<CachedNode>,
    pub pods: Store<CachedPod>,
    pub mesh_encryption: Store<MeshEncryption>,
    /// Namespaces (labels, for policy identities).
    pub namespaces: Store<Namespace>,
    /// NetworkPolicies of all namespaces.
    pub policies: Store<NetworkPolicy>,
    /// The last spec applied, standing in for a deleted `MeshEncryption default`
    /// ([`crate::settings`]); `None`: a missing object means off (tests).
    pub settings: Option<Arc<SettingsMemory>>,
    /// KeyRotations (the agent's part of a rotation; not waited for by [`Caches::wait_synced`]:
    /// see [`Caches::rotations_synced`]).
    pub keyrotations: Store<KeyRotation>,
}

impl Caches {
    /// Completes when every cache has finished its initial list.
    pub async fn wait_synced(&self) {
        // An error means the writer is gone, i.e. the agent is shutting down: nothing to wait for.
        let _ = futures::join!(
            self.nodes.wait_until_ready(),
            self.pods.wait_until_ready(),
            self.mesh_encryption.wait_until_ready(),
        );
    }

    /// Completes when the Namespace and NetworkPolicy caches have finished their initial list.
    /// Separate from [`Caches::wait_synced`]: the mesh must not wait on policy RBAC.
    pub async fn wait_policy_synced(&self) {
        let _ = futures::join!(
            self.namespaces.wait_until_ready(),
            self.policies.wait_until_ready(),
        );
    }

    /// Whether the KeyRotation cache has its first list (without it, a node in the middle of a
    /// rotation must not act: it would read "no rotation" and roll back).
    pub fn rotations_synced(&self) -> bool {
        futures::FutureExt::now_or_never(self.keyrotations.wait_until_ready()).is_some()
    }

    /// The `MeshEncryption default` to apply: the object, or while it is missing the last spec
    /// this node applied (see [`crate::settings`]).
    pub fn mesh_encryption(&self) -> Option<Arc<MeshEncryption>> {
        self.mesh_encryption_effective().0
    }

    /// [`Caches::mesh_encryption`], and whether it is the remembered spec of a missing object.
    pub fn mesh_encryption_effective(&self) -> (Option<Arc<MeshEncryption>>, bool) {
        let live = self
            .mesh_encryption
            .find(|m| m.metadata.name.as_deref() == Some(MESH_ENCRYPTION_NAME));
        match &self.settings {
            Some(memory) => memory.effective(live),
            None => (live, false),
        }
    }

    /// Uses `memory` for a missing `MeshEncryption default`.
    pub fn with_settings_memory(mut self, memory: Arc<SettingsMemory>) -> Self {
        self.settings = Some(memory);
        self
    }
}

/// The watch tasks that fill [`Caches`]; run each with `run` in the app's JoinSet.
pub struct Watchers {
    pub caches: Caches,
    pub tasks: Vec<WatchTask>,
}

/// One watcher feeding one cache.
pub struct WatchTask {
    name: &'static str,
    stream: futures::stream::BoxStream<'static, Result<(), watcher::Error>>,
}

impl WatchTask {
    fn new<K>(
        name: &'static str,
        api: Api<K>,
        config: watcher::Config,
        prune: fn(&mut K),
        writer: reflector::store::Writer<K>,
        notify: Vec<Arc<Notify>>,
    ) -> Self
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        let stream = watcher(api, config)
            .default_backoff()
            .modify(prune)
            .reflect(writer)
            .map(move |event| {
                // Every applied, deleted or re-listed object can change the mesh.
                for n in &notify {
                    n.notify_one();
                }
                event.map(|_| ())
            })
            .boxed();
        Self { name, stream }
    }

    /// Which watch this is (`nodes`, `pods`, `meshencryptions`, `namespaces`,
    /// `networkpolicies`, `keyrotations`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Drives the watcher until the drain starts. Watch errors are logged; the backoff retries.
    pub async fn run(mut self, mut drain: Drain) {
        loop {
            tokio::select! {
                item = self.stream.next() => match item {
                    Some(Ok(())) => {}
                    Some(Err(error)) => {
                        tracing::warn!(
                            watch = self.name,
                            %error,
                            hint = hint(&error),
                            "watch failed; retrying with backoff"
                        );
                    }
                    None => {
                        tracing::warn!(watch = self.name, "watch stream ended");
                        return;
                    }
                },
                () = drain.signaled() => return,
            }
        }
    }
}

/// What an operator should check for common watch failures.
fn hint(error: &watcher::Error) -> &'static str {
    let status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code,
        watcher::Error::WatchError(status) => status.code,
        _ => 0,
    };
    match status {
        404 => "resource not served: are the wiremesh CRDs installed (deploy/crds)?",
        401 => "credentials rejected: check the kubeconfig or service account token",
        403 => {
            "forbidden: the agent needs get/list/watch on nodes, pods, namespaces, \
             networkpolicies.networking.k8s.io and meshencryptions.wiremesh.io"
        }
        _ => "",
    }
}

/// Builds the watchers. Every event signals `notify` (the mesh reconciler) and `steer` (the
/// eBPF steering task); Namespace and NetworkPolicy events only `steer`.
pub fn watchers(client: &Client, notify: Arc<Notify>, steer: Arc<Notify>) -> Watchers {
    let (nodes, node_writer) = reflector::store();
    let (pods, pod_writer) = reflector::store();
    let (mesh_encryption, me_writer) = reflector::store();
    let (namespaces, ns_writer) = reflector::store();
    let (policies, np_writer) = reflector::store();
    let (keyrotations, kr_writer) = reflector::store();
    let both = vec![notify.clone(), steer.clone()];
    let tasks = vec![
        WatchTask::new(
            "nodes",
            Api::<CachedNode>::all(client.clone()),
            watcher::Config::default(),
            prune_node,
            node_writer,
            both.clone(),
        ),
        WatchTask::new(
            "pods",
            Api::<CachedPod>::all(client.clone()),
            watcher::Config::default(),
            prune_pod,
            pod_writer,
            both.clone(),
        ),
        WatchTask::new(
            "meshencryptions",
            Api::<MeshEncryption>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={MESH_ENCRYPTION_NAME}")),
            |_| {},
            me_writer,
            both,
        ),
        WatchTask::new(
            "namespaces",
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            prune_meta,
            ns_writer,
            vec![steer.clone()],
        ),
        WatchTask::new(
            "networkpolicies",
            Api::<NetworkPolicy>::all(client.clone()),
            watcher::Config::default(),
            prune_meta,
            np_writer,
            vec![steer.clone()],
        ),
        WatchTask::new(
            "keyrotations",
            Api::<KeyRotation>::all(client.clone()),
            watcher::Config::default(),
            prune_meta,
            kr_writer,
            vec![notify],
        ),
    ];
    Watchers {
        caches: Caches {
            nodes,
            pods,
            mesh_encryption,
            namespaces,
            policies,
            settings: None,
            keyrotations,
        },
        tasks,
    }
}

/// Drops a Node's managed fields, labels, owner references and every annotation but the
/// `wiremesh.io/*` ones (the rest of a [`CachedNode`] is what the mesh reads).
pub fn prune_node(node: &mut CachedNode) {
    let meta = &mut node.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    meta.owner_references = None;
    meta.annotations = meta.annotations.take().map(|all| {
        all.into_iter()
            .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
            .collect::<BTreeMap<_, _>>()
    });
}

/// Drops managed fields and annotations (Namespaces and NetworkPolicies keep their labels and
/// spec).
pub fn prune_meta<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
}

/// Drops a Pod's managed fields, annotations and owner references, moves its labels (policy
/// identities) into the set shared by the Pods with equal ones
/// ([`crate::cached::intern_labels`], read by [`CachedPod::labels`]), and drops the
/// containers after the last one that declares ports.
///
/// Nothing reads those containers (only ports are read from containers, and an earlier
/// container keeps its index, which problem reports name).
pub fn prune_pod(pod: &mut CachedPod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    if let Some(labels) = meta.labels.take() {
        pod.shared_labels = Some(crate::cached::intern_labels(labels));
    }
    if let Some(spec) = pod.spec.as_mut() {
        let keep = spec
            .containers
            .iter()
            .rposition(|c| c.ports.as_ref().is_some_and(|p| !p.is_empty()))
            .map_or(0, |last| last + 1);
        spec.containers.truncate(keep);
        spec.containers.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{
            Container, ContainerImage, ContainerPort, Node, NodeAddress, NodeSpec, NodeStatus, Pod,
            PodIP, PodSpec, PodStatus,
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };
    use serde::Serialize;

    use super::*;

    /// What the watcher does: the API's JSON of a full object decoded as the cached type.
    fn decode<T: DeserializeOwned>(full: &impl Serialize) -> T {
        serde_json::from_value(serde_json::to_value(full).unwrap()).unwrap()
    }

    #[test]
    fn pruning_keeps_what_the_mesh_reads() {
        let node = Node {
            metadata: ObjectMeta {
                name: Some("a".into()),
                labels: Some(BTreeMap::from([("zone".to_string(), "z".to_string())])),
                annotations: Some(BTreeMap::from([
                    ("wiremesh.io/public-key".to_string(), "k".to_string()),
                    ("other.io/x".to_string(), "y".to_string()),
                ])),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidrs: Some(vec!["10.244.1.0/24".into()]),
                provider_id: Some("p".into()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: "10.0.0.1".into(),
                }]),
                images: Some(vec![ContainerImage::default()]),
                ..Default::default()
            }),
        };
        let mut node: CachedNode = decode(&node);
        prune_node(&mut node);
        assert_eq!(
            node.metadata
                .annotations
                .as_ref()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["wiremesh.io/public-key"]
        );
        assert_eq!(node.metadata.labels, None);
        assert_eq!(
            node.spec
                .as_ref()
                .unwrap()
                .pod_cidrs
                .as_ref()
                .unwrap()
                .len(),
            1
        );
        assert!(node.status.as_ref().unwrap().addresses.is_some());

        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("default".into()),
                labels: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
                annotations: Some(BTreeMap::from([("a".to_string(), "b".to_string())])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("a".into()),
                containers: vec![
                    Container {
                        name: "sidecar".into(),
                        ..Default::default()
                    },
                    Container {
                        name: "app".into(),
                        image: Some("x".into()),
                        ports: Some(vec![ContainerPort {
                            name: Some("http".into()),
                            container_port: 80,
                            ..Default::default()
                        }]),
                        ..Default::default()
                    },
                    Container {
                        name: "logger".into(),
                        ports: Some(vec![]),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ips: Some(vec![PodIP {
                    ip: "10.244.1.5".into(),
                }]),
                ..Default::default()
            }),
        };
        let mut portless = pod.clone();
        let mut pod: CachedPod = decode(&pod);
        prune_pod(&mut pod);
        let containers = &pod.spec.as_ref().unwrap().containers;
        // The port-less container before the one with ports keeps its place (its index is in
        // problem reports); the one after it goes.
        assert_eq!(
            containers
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["sidecar", "app"]
        );
        assert_eq!(containers[1].ports.as_ref().unwrap()[0].container_port, 80);
        if let Some(spec) = portless.spec.as_mut() {
            spec.containers.remove(1);
        }
        let mut portless: CachedPod = decode(&portless);
        prune_pod(&mut portless);
        assert!(portless.spec.as_ref().unwrap().containers.is_empty());
        assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some("a"));
        assert_eq!(
            pod.status.as_ref().unwrap().pod_ips.as_ref().unwrap().len(),
            1
        );
        assert_eq!(pod.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(pod.labels().unwrap().len(), 1);
        // Moved into the set shared with the other pod that has equal labels.
        assert_eq!(pod.metadata.labels, None);
        assert!(Arc::ptr_eq(
            pod.shared_labels.as_ref().unwrap(),
            portless.shared_labels.as_ref().unwrap()
        ));
        assert_eq!(pod.metadata.annotations, None);
    }
}
