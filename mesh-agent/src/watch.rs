//! The agent's view of the cluster: reflector caches of all Nodes, all Pods and the
//! `MeshEncryption` singleton, each fed by a watcher with `default_backoff()`. Objects are pruned
//! to the fields the mesh needs before they enter the cache (Node status images and conditions,
//! pod containers), which keeps memory flat on big clusters. Every watch event wakes the
//! reconciler through a shared [`Notify`].
//!
//! RBAC: Node credentials alone may not list other Nodes or all Pods (the Node authorizer limits
//! them to their own objects), so the agent's identity also needs `get/list/watch` on `nodes`,
//! `pods` and `meshencryptions.wiremesh.io` through RBAC; patching stays limited to its own Node
//! by the Node authorizer and the NodeRestriction admission plugin.

use std::{collections::BTreeMap, fmt::Debug, sync::Arc};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Container, Namespace, Node, NodeSpec, NodeStatus, Pod, PodSpec, PodStatus},
    networking::v1::NetworkPolicy,
};
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

use crate::{drain::Drain, settings::SettingsMemory};

/// The prefix of every annotation the mesh reads from Nodes.
const ANNOTATION_PREFIX: &str = "wiremesh.io/";

/// Read handles of the caches.
#[derive(Clone)]
pub struct Caches {
    pub nodes: Store<Node>,
    pub pods: Store<Pod>,
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
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            prune_node,
            node_writer,
            both.clone(),
        ),
        WatchTask::new(
            "pods",
            Api::<Pod>::all(client.clone()),
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

/// Keeps name, uid, resourceVersion, the `wiremesh.io/*` annotations, the pod CIDRs and the
/// addresses of a Node.
pub fn prune_node(node: &mut Node) {
    let meta = &mut node.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    meta.owner_references = None;
    meta.annotations = meta.annotations.take().map(|all| {
        all.into_iter()
            .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
            .collect::<BTreeMap<_, _>>()
    });
    node.spec = node.spec.take().map(|spec| NodeSpec {
        pod_cidr: spec.pod_cidr,
        pod_cidrs: spec.pod_cidrs,
        ..NodeSpec::default()
    });
    node.status = node.status.take().map(|status| NodeStatus {
        addresses: status.addresses,
        ..NodeStatus::default()
    });
}

/// Drops managed fields and annotations (Namespaces and NetworkPolicies keep their labels and
/// spec).
pub fn prune_meta<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
}

/// Keeps name, namespace, uid, resourceVersion, labels (policy identities), `spec.nodeName`,
/// `spec.hostNetwork`, the containers' ports (named ports), `status.phase` and the pod IPs of a
/// Pod.
///
/// Containers after the last one that declares ports are dropped: nothing reads them (only
/// ports are read from containers, and an earlier container keeps its index, which problem
/// reports name), and each costs a whole `Container` (~2 KiB inline) per cached Pod
/// (docs/benchmarks.md, "Agent memory").
pub fn prune_pod(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    pod.spec = pod.spec.take().map(|spec| {
        let mut containers: Vec<Container> = spec
            .containers
            .into_iter()
            .map(|c| Container {
                name: c.name,
                ports: c.ports,
                ..Container::default()
            })
            .collect();
        let keep = containers
            .iter()
            .rposition(|c| c.ports.as_ref().is_some_and(|p| !p.is_empty()))
            .map_or(0, |last| last + 1);
        containers.truncate(keep);
        containers.shrink_to_fit();
        PodSpec {
            node_name: spec.node_name,
            host_network: spec.host_network,
            containers,
            ..PodSpec::default()
        }
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        pod_ips: status.pod_ips,
        ..PodStatus::default()
    });
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{Container, ContainerImage, ContainerPort, NodeAddress, PodIP},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    #[test]
    fn pruning_keeps_what_the_mesh_reads() {
        let mut node = Node {
            metadata: ObjectMeta {
                name: Some("a".into()),
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
        prune_node(&mut node);
        assert_eq!(node.metadata.annotations.as_ref().unwrap().len(), 1);
        assert_eq!(node.spec.as_ref().unwrap().provider_id, None);
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
        assert_eq!(node.status.as_ref().unwrap().images, None);
        assert!(node.status.as_ref().unwrap().addresses.is_some());

        let mut pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("default".into()),
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
        assert_eq!(containers[1].image, None, "only name and ports are kept");
        assert_eq!(containers[1].ports.as_ref().unwrap()[0].container_port, 80);
        if let Some(spec) = portless.spec.as_mut() {
            spec.containers.remove(1);
        }
        prune_pod(&mut portless);
        assert!(portless.spec.as_ref().unwrap().containers.is_empty());
        assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some("a"));
        assert_eq!(
            pod.status.as_ref().unwrap().pod_ips.as_ref().unwrap().len(),
            1
        );
        assert_eq!(pod.metadata.namespace.as_deref(), Some("default"));
    }
}
