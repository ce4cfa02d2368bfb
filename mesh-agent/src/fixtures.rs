//! Nodes and pods for unit tests.

use std::sync::Arc;

use k8s_openapi::{
    api::core::v1::{NodeAddress, PodIP},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::cached::{
    CachedNode, CachedNodeSpec, CachedNodeStatus, CachedPod, CachedPodSpec, CachedPodStatus,
};

/// A Node with one InternalIP and one podCIDR.
pub fn node(name: &str, ip: &str, cidr: &str) -> Arc<CachedNode> {
    Arc::new(node_with_addresses(name, cidr, &[("InternalIP", ip)]))
}

/// A Node with one podCIDR and `status.addresses` given as `(type, address)` pairs, in order.
pub fn node_with_addresses(name: &str, cidr: &str, addresses: &[(&str, &str)]) -> CachedNode {
    CachedNode {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(CachedNodeSpec {
            pod_cidrs: Some(vec![cidr.into()]),
            ..Default::default()
        }),
        status: Some(CachedNodeStatus {
            addresses: Some(
                addresses
                    .iter()
                    .map(|&(type_, address)| NodeAddress {
                        type_: type_.into(),
                        address: address.into(),
                    })
                    .collect(),
            ),
        }),
    }
}

/// A running pod `default/<name>` on `node` with one IP and the label `<key>=<value>`.
pub fn pod(name: &str, node: &str, ip: &str, (key, value): (&str, &str)) -> Arc<CachedPod> {
    Arc::new(CachedPod {
        shared_labels: None,
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some([(key.to_string(), value.to_string())].into()),
            ..Default::default()
        },
        spec: Some(CachedPodSpec {
            node_name: Some(node.into()),
            ..Default::default()
        }),
        status: Some(CachedPodStatus {
            phase: Some("Running".into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            pod_ip: Some(ip.into()),
        }),
    })
}

/// A dual-stack Node: InternalIP `ip`, podCIDRs `cidr` and `cidr6`.
pub fn node_dual(name: &str, ip: &str, cidr: &str, cidr6: &str) -> Arc<CachedNode> {
    let mut n = node_with_addresses(name, cidr, &[("InternalIP", ip)]);
    if let Some(spec) = n.spec.as_mut() {
        spec.pod_cidrs = Some(vec![cidr.into(), cidr6.into()]);
    }
    Arc::new(n)
}

/// A dual-stack [`pod`]: `status.podIPs` = [`ip`, `ip6`].
pub fn pod_dual(
    name: &str,
    node: &str,
    ip: &str,
    ip6: &str,
    label: (&str, &str),
) -> Arc<CachedPod> {
    let mut p = CachedPod::clone(&pod(name, node, ip, label));
    if let Some(status) = p.status.as_mut() {
        status.pod_ips = Some(vec![PodIP { ip: ip.into() }, PodIP { ip: ip6.into() }]);
    }
    Arc::new(p)
}

/// The pod claims the reconciler would decide for `own` with the default address policy.
pub fn claims(
    own: &str,
    nodes: &[std::sync::Arc<crate::cached::CachedNode>],
    pods: &[std::sync::Arc<crate::cached::CachedPod>],
) -> wiremesh_keyexchange::PodClaims {
    let views = crate::views::node_views(
        nodes.iter().map(|n| n.as_ref()),
        pods.iter().map(|p| p.as_ref()),
    );
    wiremesh_keyexchange::pod_claims(own, &wiremesh_keyexchange::AddressPolicy::default(), &views)
}
