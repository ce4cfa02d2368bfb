//! The agent's own compact forms of the Pods and Nodes it caches: the object's metadata plus
//! only the fields the mesh reads, deserialized straight from the API (unknown fields are
//! skipped while decoding, so they are never allocated). A k8s-openapi `Pod` carries every
//! field of `PodSpec`/`PodStatus`/`Container` inline, set or not (~2.4 KiB per object before
//! any string); at 10,000 pods that was most of the agent's heap (docs/benchmarks.md, "Agent
//! memory").
//!
//! The field names and nesting mirror the Kubernetes types (`pod.spec.node_name`,
//! `node.status.addresses`, ...), and [`Resource`] is implemented with the group, version,
//! kind and plural of the real kinds, so `Api::<CachedPod>::all`, the watcher and the reflector
//! work as with `Pod`. Writes (patches of the own Node) keep using the full k8s-openapi types.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashSet},
    sync::{Arc, LazyLock, Mutex},
};

use k8s_openapi::{
    api::core::v1::{ContainerPort, Node, NodeAddress, Pod, PodIP},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::Resource;
use serde::{Deserialize, Serialize};

/// What the mesh reads of a Pod (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct CachedPod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The labels once the watch's pruning ([`crate::watch::prune_pod`]) moved them out of
    /// `metadata` into a set shared with every cached Pod that has equal ones ([`intern_labels`]:
    /// the replicas of a workload): read them with [`CachedPod::labels`].
    #[serde(skip)]
    pub shared_labels: Option<Arc<BTreeMap<String, String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<CachedPodSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<CachedPodStatus>,
}

impl CachedPod {
    /// The Pod's labels: the shared set, or those still in `metadata` (an object not pruned).
    pub fn labels(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata
            .labels
            .as_ref()
            .or(self.shared_labels.as_deref())
    }
}

/// Equal label sets of cached Pods as one shared map each (10,000 pods of one workload held
/// 10,000 copies of the same map: 7.2 MiB, docs/benchmarks.md). Sets no cached Pod holds any
/// more are dropped when the table has doubled since the last sweep, so it stays within twice
/// the live sets.
struct LabelSets {
    sets: HashSet<Arc<BTreeMap<String, String>>>,
    sweep_at: usize,
}

static LABEL_SETS: LazyLock<Mutex<LabelSets>> = LazyLock::new(|| {
    Mutex::new(LabelSets {
        sets: HashSet::new(),
        sweep_at: 64,
    })
});

/// How many label sets the table holds.
#[cfg(test)]
pub(crate) fn label_sets_held() -> usize {
    LABEL_SETS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .sets
        .len()
}

/// `labels` as the set shared by every cached Pod with equal labels.
pub fn intern_labels(labels: BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
    // Nothing panics while the table is locked; a poisoned one is still consistent.
    let mut table = LABEL_SETS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(shared) = table.sets.get(&labels) {
        return Arc::clone(shared);
    }
    if table.sets.len() >= table.sweep_at {
        // Only the table holds a set no Pod has (and only under this lock can it be cloned).
        table.sets.retain(|set| Arc::strong_count(set) > 1);
        table.sweep_at = (table.sets.len() * 2).max(64);
    }
    let shared = Arc::new(labels);
    table.sets.insert(Arc::clone(&shared));
    shared
}

/// `spec.nodeName`, `spec.hostNetwork` and the containers' ports of a Pod.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedPodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_network: Option<bool>,
    #[serde(default)]
    pub containers: Vec<CachedContainer>,
}

/// A container's name and ports (named ports of policies).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct CachedContainer {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<ContainerPort>>,
}

/// `status.phase`, `status.podIP` and `status.podIPs` of a Pod.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedPodStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs", skip_serializing_if = "Option::is_none")]
    pub pod_ips: Option<Vec<PodIP>>,
}

/// What the mesh reads of a Node (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct CachedNode {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<CachedNodeSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<CachedNodeStatus>,
}

/// `spec.podCIDR` and `spec.podCIDRs` of a Node.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct CachedNodeSpec {
    #[serde(default, rename = "podCIDR", skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<String>,
    #[serde(default, rename = "podCIDRs", skip_serializing_if = "Option::is_none")]
    pub pod_cidrs: Option<Vec<String>>,
}

/// `status.addresses` of a Node.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct CachedNodeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<NodeAddress>>,
}

/// Implements [`Resource`] for a compact type with the identity of the full kind `$full`.
macro_rules! resource_as {
    ($compact:ty, $full:ty) => {
        impl Resource for $compact {
            type DynamicType = ();
            type Scope = <$full as Resource>::Scope;

            fn kind((): &()) -> Cow<'_, str> {
                <$full as Resource>::kind(&())
            }

            fn group((): &()) -> Cow<'_, str> {
                <$full as Resource>::group(&())
            }

            fn version((): &()) -> Cow<'_, str> {
                <$full as Resource>::version(&())
            }

            fn plural((): &()) -> Cow<'_, str> {
                <$full as Resource>::plural(&())
            }

            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

resource_as!(CachedPod, Pod);
resource_as!(CachedNode, Node);

#[cfg(test)]
mod tests;
