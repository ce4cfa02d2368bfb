//! From Kubernetes objects to the plain views the key-exchange logic works on: a Node plus the pods
//! scheduled on it become a [`NodeView`]; this node's own annotations to publish are computed here
//! too. No I/O: the watchers feed these functions from their caches.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use ipnet::IpNet;
use wiremesh_keyexchange::{
    ANNOTATION_ENDPOINT, ANNOTATION_KEY_GENERATION, ANNOTATION_PUBLIC_KEY, NodeView, PublicKey,
};

use crate::cached::{CachedNode, CachedPod};

/// Node address types that can carry the underlay, in order of preference for our endpoint.
const ADDRESS_TYPES: [&str; 2] = ["InternalIP", "ExternalIP"];

/// The IPs in `status.addresses` (InternalIP first, then ExternalIP), without duplicates.
pub fn node_addresses(node: &CachedNode) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    for wanted in ADDRESS_TYPES {
        for address in addresses.iter().filter(|a| a.type_ == wanted) {
            if let Ok(ip) = IpAddr::from_str(address.address.trim())
                && !out.contains(&ip)
            {
                out.push(ip);
            }
        }
    }
    out
}

/// `spec.podCIDRs` (or the legacy `spec.podCIDR`); unparsable entries are skipped.
pub fn node_pod_cidrs(node: &CachedNode) -> Vec<IpNet> {
    let Some(spec) = node.spec.as_ref() else {
        return Vec::new();
    };
    let listed = spec.pod_cidrs.clone().unwrap_or_default();
    let raw: Vec<String> = if listed.is_empty() {
        spec.pod_cidr.iter().cloned().collect()
    } else {
        listed
    };
    raw.iter()
        .filter_map(|cidr| IpNet::from_str(cidr.trim()).ok())
        .map(|net| net.trunc())
        .collect()
}

/// The IPs a pod holds on the pod network: `status.podIPs` of a pod that is bound to a node, is
/// not hostNetwork (those share the node's address) and has not terminated (its IP may already
/// belong to another pod).
pub fn pod_network_ips(pod: &CachedPod) -> Vec<IpAddr> {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let terminated = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    if host_network || terminated {
        return Vec::new();
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| IpAddr::from_str(p.ip.trim()).ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status
            .pod_ip
            .as_deref()
            .and_then(|ip| IpAddr::from_str(ip.trim()).ok())
    {
        ips.push(ip);
    }
    ips
}

/// One [`NodeView`] per Node, with the pod IPs of the pods scheduled on it.
pub fn node_views<'a>(
    nodes: impl IntoIterator<Item = &'a CachedNode>,
    pods: impl IntoIterator<Item = &'a CachedPod>,
) -> Vec<NodeView> {
    let mut pod_ips: BTreeMap<&str, BTreeSet<IpAddr>> = BTreeMap::new();
    let mut created: BTreeMap<&str, BTreeMap<IpAddr, i64>> = BTreeMap::new();
    for pod in pods {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
            continue;
        };
        let ips = pod_network_ips(pod);
        // The oldest pod holding an address decides a duplicate claim; unknown: the newest.
        let at = pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(i64::MAX, |t| t.0.as_second());
        let node_created = created.entry(node).or_default();
        for ip in &ips {
            let entry = node_created.entry(*ip).or_insert(at);
            *entry = (*entry).min(at);
        }
        pod_ips.entry(node).or_default().extend(ips);
    }
    let mut views: Vec<NodeView> = nodes
        .into_iter()
        .filter_map(|node| {
            let name = node.metadata.name.clone()?;
            Some(NodeView {
                annotations: node.metadata.annotations.clone().unwrap_or_default(),
                addresses: node_addresses(node),
                pod_cidrs: node_pod_cidrs(node),
                pod_ips: pod_ips
                    .get(name.as_str())
                    .map(|ips| ips.iter().copied().collect())
                    .unwrap_or_default(),
                pod_ip_created: created.remove(name.as_str()).unwrap_or_default(),
                name,
            })
        })
        .collect();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    views
}

/// Why this node's own annotations cannot be computed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    #[error(
        "node {node} has no InternalIP or ExternalIP in status.addresses to publish as endpoint"
    )]
    NoAddress { node: String },
}

/// The key-exchange annotations this node must carry: the public key, the endpoint (first
/// InternalIP, else ExternalIP, plus `listen_port`) and the key generation. The generation is kept
/// while the published key equals ours and goes up by one when the key changes (a node whose
/// keystore was lost comes back with a new identity).
pub fn own_annotations(
    node: &CachedNode,
    public_key: &PublicKey,
    listen_port: u16,
) -> Result<BTreeMap<String, String>, PublishError> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let address = node_addresses(node)
        .into_iter()
        .next()
        .ok_or(PublishError::NoAddress { node: name })?;
    let existing = node.metadata.annotations.clone().unwrap_or_default();
    let published_key = existing
        .get(ANNOTATION_PUBLIC_KEY)
        .and_then(|v| PublicKey::from_base64(v).ok());
    let published_generation = existing
        .get(ANNOTATION_KEY_GENERATION)
        .and_then(|v| v.trim().parse::<u64>().ok());
    let generation = match (published_key, published_generation) {
        (Some(key), Some(generation)) if key == *public_key && generation > 0 => generation,
        (Some(key), _) if key == *public_key => 1,
        (_, Some(generation)) => generation.saturating_add(1),
        (_, None) => 1,
    };
    Ok(BTreeMap::from([
        (ANNOTATION_PUBLIC_KEY.to_string(), public_key.to_base64()),
        (
            ANNOTATION_ENDPOINT.to_string(),
            SocketAddr::new(address, listen_port).to_string(),
        ),
        (
            ANNOTATION_KEY_GENERATION.to_string(),
            generation.to_string(),
        ),
    ]))
}

/// The entries of `wanted` that `node` does not carry with the same value (empty: nothing to
/// patch).
pub fn missing_annotations(
    node: &CachedNode,
    wanted: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let current = node.metadata.annotations.as_ref();
    wanted
        .iter()
        .filter(|(k, v)| current.and_then(|c| c.get(*k)) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{api::core::v1::PodIP, apimachinery::pkg::apis::meta::v1::ObjectMeta};
    use wiremesh_keyexchange::PrivateKey;

    use super::*;
    use crate::cached::{CachedPodSpec, CachedPodStatus};
    use crate::fixtures::node_with_addresses;

    /// A Node whose InternalIP comes after a Hostname and an ExternalIP address.
    fn node(name: &str, ip: &str, cidr: &str) -> CachedNode {
        node_with_addresses(
            name,
            cidr,
            &[
                ("Hostname", name),
                ("ExternalIP", "203.0.113.9"),
                ("InternalIP", ip),
            ],
        )
    }

    fn pod(node: &str, ips: &[&str], host_network: bool, phase: &str) -> CachedPod {
        CachedPod {
            shared_labels: None,
            metadata: ObjectMeta::default(),
            spec: Some(CachedPodSpec {
                node_name: Some(node.into()),
                host_network: Some(host_network),
                ..Default::default()
            }),
            status: Some(CachedPodStatus {
                phase: Some(phase.into()),
                pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn views_collect_addresses_cidrs_and_live_pod_ips() {
        let nodes = [
            node("b", "10.0.0.2", "10.244.2.0/24"),
            node("a", "10.0.0.1", "10.244.1.7/24"),
        ];
        let pods = [
            pod("a", &["10.244.1.5"], false, "Running"),
            pod("a", &["10.0.0.1"], true, "Running"),
            pod("a", &["10.244.1.6"], false, "Succeeded"),
            pod("b", &["10.99.0.4", "fd00::4"], false, "Running"),
            pod("gone", &["10.99.9.9"], false, "Running"),
        ];
        let views = node_views(&nodes, &pods);
        assert_eq!(views.len(), 2);
        assert_eq!(views[0].name, "a");
        assert_eq!(
            views[0].addresses,
            vec![IpAddr::from([10, 0, 0, 1]), IpAddr::from([203, 0, 113, 9])]
        );
        assert_eq!(
            views[0].pod_cidrs,
            vec![IpNet::from_str("10.244.1.0/24").unwrap()]
        );
        assert_eq!(views[0].pod_ips, vec![IpAddr::from([10, 244, 1, 5])]);
        assert_eq!(
            views[1].pod_ips,
            vec![
                IpAddr::from([10, 99, 0, 4]),
                IpAddr::from_str("fd00::4").unwrap()
            ]
        );
    }

    #[test]
    fn own_annotations_keep_generation_for_same_key_and_bump_for_new_key() {
        let key = PrivateKey::generate().unwrap().public_key();
        let mut n = node("a", "10.0.0.1", "10.244.1.0/24");
        let first = own_annotations(&n, &key, 51871).unwrap();
        assert_eq!(first[ANNOTATION_ENDPOINT], "10.0.0.1:51871");
        assert_eq!(first[ANNOTATION_KEY_GENERATION], "1");
        assert_eq!(first[ANNOTATION_PUBLIC_KEY], key.to_base64());
        assert_eq!(missing_annotations(&n, &first), first);

        n.metadata.annotations = Some(first.clone());
        let again = own_annotations(&n, &key, 51871).unwrap();
        assert_eq!(again, first);
        assert!(missing_annotations(&n, &again).is_empty());

        let new_key = PrivateKey::generate().unwrap().public_key();
        let rotated = own_annotations(&n, &new_key, 51871).unwrap();
        assert_eq!(rotated[ANNOTATION_KEY_GENERATION], "2");
        let missing = missing_annotations(&n, &rotated);
        assert_eq!(missing.len(), 2, "{missing:?}");

        let moved = own_annotations(&n, &key, 6000).unwrap();
        assert_eq!(
            missing_annotations(&n, &moved),
            BTreeMap::from([(ANNOTATION_ENDPOINT.to_string(), "10.0.0.1:6000".to_string())])
        );
    }

    #[test]
    fn own_annotations_need_an_address() {
        let mut n = node("a", "10.0.0.1", "10.244.1.0/24");
        n.status = None;
        let key = PrivateKey::generate().unwrap().public_key();
        assert_eq!(
            own_annotations(&n, &key, 1).unwrap_err(),
            PublishError::NoAddress { node: "a".into() }
        );
    }
}
