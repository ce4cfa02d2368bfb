//! What the eBPF maps should hold, from the cached API objects. Pure: unit-tested without a
//! kernel or a cluster.
//!
//! - The ipcache, both families (issue 13, finding 3: IPv6 used to have no entries, so IPv6 pod
//!   traffic was world to policy and not pod traffic to strict mode): every Node's podCIDRs
//!   (this node's `LOCAL`, others' `REMOTE_POD`, plus `ENCRYPT` while the tunnel to that node is
//!   configured) and one /32 or /128 per pod IP carrying the pod's identity and the same node
//!   fields (the node's IPv4 underlay address: tunnel endpoints are IPv4). A remote podCIDR stays `REMOTE_POD` when its
//!   tunnel is gone, so in strict mode the programs keep treating it as pod traffic and drop it.
//!   Only prefixes the reconciler's [`PodClaims`] accept for that node get an entry (issue 13,
//!   finding 1): a pod "at" 169.254.169.254, a node or a service address is not a pod address,
//!   neither encrypted nor dropped as one.
//!   Every Node's address (each family) gets a /32 or /128 `NODE` entry: identity host for
//!   this node, remote-node for the others (never a pod address, so strict mode never drops
//!   node-to-node WireGuard).
//! - The policy model: Namespaces, Pods (labels, named ports, every pod-network address) and
//!   NetworkPolicies for the `wiremesh-policy` compiler; objects it cannot use are reported as
//!   [`ObjectProblem`]s and left out (a pod keeps its identity without its bad ports).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use ipnet::IpNet;
use k8s_openapi::api::{
    core::v1::{ContainerPort, Namespace},
    networking::v1::NetworkPolicy,
};
use wiremesh_bpf::{IpcacheValue, ipcache_flags};
use wiremesh_keyexchange::PodClaims;
use wiremesh_policy::{Cluster, ClusterError, Identity, IdentityAllocator, PodFields, Policy};

use crate::{
    cached::{CachedNode, CachedPod},
    views::{node_addresses, node_pod_cidrs, pod_network_ips},
};

/// A cached object the agent could not use, for an Event and a metric.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectProblem {
    /// `NetworkPolicy`, `Pod` or `Namespace`.
    pub kind: &'static str,
    /// Namespace of a namespaced object.
    pub namespace: Option<String>,
    pub name: String,
    pub uid: Option<String>,
    /// CamelCase Event reason.
    pub reason: &'static str,
    pub message: String,
}

/// The underlay IPv4 of a Node (first InternalIP/ExternalIP that is IPv4).
pub fn node_ipv4(node: &CachedNode) -> Option<Ipv4Addr> {
    node_addresses(node).into_iter().find_map(|ip| match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    })
}

/// A stable number for a node (FNV-1a of its name, never 0 which means "this node / none").
pub fn node_id(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

fn pod_node(pod: &CachedPod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

/// Sends the encrypted prefixes of `alt_nodes` through the next world's tunnel (a key rotation
/// moved those peers there): sets [`ipcache_flags::ALT_TUNNEL`] on their entries.
pub fn mark_alt_tunnel(ipcache: &mut BTreeMap<IpNet, IpcacheValue>, alt_nodes: &[String]) {
    let ids: BTreeSet<u32> = alt_nodes.iter().map(|n| node_id(n)).collect();
    for value in ipcache.values_mut() {
        if value.flags & ipcache_flags::ENCRYPT != 0 && ids.contains(&value.node_id) {
            value.flags |= ipcache_flags::ALT_TUNNEL;
        }
    }
}

/// The whole ipcache. `encrypted` names the nodes whose tunnel is configured (empty when the
/// mesh does not steer traffic); `endpoints` are the compiler's pod identities; `claims` the
/// pod prefixes each node may hold (a podCIDR or pod IP it does not accept gets no entry).
pub fn desired_ipcache(
    own_node: &str,
    nodes: &[Arc<CachedNode>],
    pods: &[Arc<CachedPod>],
    endpoints: &BTreeMap<IpAddr, Identity>,
    encrypted: &BTreeSet<String>,
    claims: &PodClaims,
) -> BTreeMap<IpNet, IpcacheValue> {
    let place: BTreeMap<&str, (u32, Ipv4Addr, u8)> = nodes
        .iter()
        .filter_map(|n| {
            let name = n.metadata.name.as_deref()?;
            let ip = node_ipv4(n).unwrap_or(Ipv4Addr::UNSPECIFIED);
            let (id, flags) = if name == own_node {
                (0, ipcache_flags::LOCAL)
            } else if encrypted.contains(name) {
                (
                    node_id(name),
                    ipcache_flags::REMOTE_POD | ipcache_flags::ENCRYPT,
                )
            } else {
                (node_id(name), ipcache_flags::REMOTE_POD)
            };
            Some((name, (id, ip, flags)))
        })
        .collect();
    let mut out = BTreeMap::new();
    for n in nodes {
        let Some((id, ip, flags)) = n.metadata.name.as_deref().and_then(|m| place.get(m)) else {
            continue;
        };
        let accepted = claims.prefixes(n.metadata.name.as_deref().unwrap_or_default());
        for cidr in node_pod_cidrs(n) {
            if accepted.contains(&cidr) {
                out.insert(cidr, IpcacheValue::new(0, *id, *ip, *flags));
            }
        }
    }
    for pod in pods {
        let node = pod_node(pod);
        for ip in pod_network_ips(pod) {
            // A pod whose node is unknown is still a pod: strict mode must not let it leak; a
            // pod address its node may not claim is not one.
            if let Some(node) = node.filter(|n| place.contains_key(n))
                && !claims.accepts(node, ip)
            {
                continue;
            }
            let (id, node_ip, flags) = node.and_then(|n| place.get(n).copied()).unwrap_or((
                0,
                Ipv4Addr::UNSPECIFIED,
                ipcache_flags::REMOTE_POD,
            ));
            let identity = endpoints.get(&ip).copied().unwrap_or(Identity::UNKNOWN);
            out.insert(
                IpNet::from(ip),
                IpcacheValue::new(identity.0, id, node_ip, flags),
            );
        }
    }
    // Node addresses last, so no pod claim overrides them: this node's is the host identity
    // (always allowed to and from its pods), the others' remote-node; `NODE` keeps them out of
    // strict mode's pod-to-pod drop even inside a pod CIDR (WireGuard between nodes).
    for n in nodes {
        let Some(name) = n.metadata.name.as_deref() else {
            continue;
        };
        let (identity, id) = if name == own_node {
            (Identity::HOST, 0)
        } else {
            (Identity::REMOTE_NODE, node_id(name))
        };
        let underlay = node_ipv4(n).unwrap_or(Ipv4Addr::UNSPECIFIED);
        for ip in node_addresses(n) {
            out.insert(
                IpNet::from(ip),
                IpcacheValue::new(identity.0, id, underlay, ipcache_flags::NODE),
            );
        }
    }
    out
}

fn problem(
    kind: &'static str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    reason: &'static str,
    message: String,
) -> ObjectProblem {
    ObjectProblem {
        kind,
        namespace: meta.namespace.clone(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone(),
        reason,
        message,
    }
}

/// One shared copy of each distinct label set of a pass (the pods of a workload share theirs),
/// so the policy model clones no label map per pod.
#[derive(Default)]
struct LabelSets<'a> {
    shared: BTreeMap<&'a BTreeMap<String, String>, Arc<BTreeMap<String, String>>>,
    empty: Arc<BTreeMap<String, String>>,
}

impl<'a> LabelSets<'a> {
    fn get(
        &mut self,
        labels: Option<&'a BTreeMap<String, String>>,
    ) -> Arc<BTreeMap<String, String>> {
        match labels {
            None => Arc::clone(&self.empty),
            Some(labels) => Arc::clone(
                self.shared
                    .entry(labels)
                    .or_insert_with(|| Arc::new(labels.clone())),
            ),
        }
    }
}

/// The policy model's form of a cached Pod; `with_ports: false` leaves out the containers'
/// ports (after they failed to convert).
fn policy_pod(
    pod: &CachedPod,
    labels: Arc<BTreeMap<String, String>>,
    with_ports: bool,
) -> Result<wiremesh_policy::Pod, ClusterError> {
    let status = pod.status.as_ref();
    let container_ports: Vec<&[ContainerPort]> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| match &c.ports {
            Some(ports) if with_ports => ports.as_slice(),
            _ => &[],
        })
        .collect();
    wiremesh_policy::Pod::from_fields(&PodFields {
        metadata: &pod.metadata,
        labels,
        pod_ip: status.and_then(|s| s.pod_ip.as_deref()),
        pod_ips: status
            .and_then(|s| s.pod_ips.as_deref())
            .unwrap_or_default(),
        container_ports: &container_ports,
    })
}

/// The policy model of the cluster, and what had to be left out. `previous` is the identity
/// assignment of the last model (empty at the start): label sets keep their ids across
/// compiles, so a label change rewrites only the entries of the identities it touches.
pub fn policy_cluster(
    namespaces: &[Arc<Namespace>],
    pods: &[Arc<CachedPod>],
    policies: &[Arc<NetworkPolicy>],
    previous: &IdentityAllocator,
) -> Result<(Cluster, Vec<ObjectProblem>), ClusterError> {
    let mut problems = Vec::new();
    let mut ns_out = Vec::new();
    for ns in namespaces {
        match wiremesh_policy::Namespace::from_k8s(ns) {
            Ok(n) => ns_out.push(n),
            Err(e) => problems.push(problem(
                "Namespace",
                &ns.metadata,
                "InvalidNamespace",
                e.to_string(),
            )),
        }
    }
    let mut pods_out = Vec::new();
    let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut label_sets = LabelSets::default();
    for pod in pods {
        // Only pods on the pod network have an address of their own (each family).
        let ips = pod_network_ips(pod);
        if ips.is_empty() {
            continue;
        }
        let labels = label_sets.get(pod.labels());
        let converted = match policy_pod(pod, Arc::clone(&labels), true) {
            Ok(p) => p,
            Err(e) => {
                problems.push(problem(
                    "Pod",
                    &pod.metadata,
                    "InvalidPodPorts",
                    format!("{e}; the pod's named ports are ignored by NetworkPolicy"),
                ));
                match policy_pod(pod, labels, false) {
                    Ok(p) => p,
                    Err(e) => {
                        problems.push(problem("Pod", &pod.metadata, "InvalidPod", e.to_string()));
                        continue;
                    }
                }
            }
        };
        let mut converted = converted;
        converted.ip = ips.first().copied();
        converted.other_ips = ips[1..].to_vec();
        if let Some((ip, first)) = ips
            .iter()
            .find_map(|ip| owners.get(ip).map(|first| (ip, first)))
        {
            problems.push(problem(
                "Pod",
                &pod.metadata,
                "DuplicatePodIP",
                format!("pod IP {ip} is also held by {first}; this pod is left out of policy"),
            ));
            continue;
        }
        for ip in &ips {
            owners.insert(*ip, converted.key());
        }
        pods_out.push(converted);
    }
    let mut policies_out = Vec::new();
    for np in policies {
        match Policy::from_k8s(np) {
            Ok(p) => policies_out.push(p),
            Err(e) => problems.push(problem(
                "NetworkPolicy",
                &np.metadata,
                "InvalidNetworkPolicy",
                format!("{e}; this policy is not enforced"),
            )),
        }
    }
    let cluster = Cluster::with_identities(ns_out, pods_out, policies_out, previous)?;
    problems.sort();
    Ok((cluster, problems))
}

#[cfg(test)]
mod tests;
