//! The compact types decode what the API server sends for a full object.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Container, ContainerImage, ContainerPort, EnvVar, Node, NodeAddress, NodeCondition,
        NodeSpec, NodeStatus, Pod, PodCondition, PodIP, PodSpec, PodStatus, Toleration, Volume,
    },
    apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta, OwnerReference},
};
use kube::Resource;

use super::*;

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        uid: Some(format!("uid-{name}")),
        resource_version: Some("42".into()),
        labels: Some(BTreeMap::from([("app".into(), "web".into())])),
        annotations: Some(BTreeMap::from([
            ("wiremesh.io/public-key".into(), "k".into()),
            ("other.io/x".into(), "y".into()),
        ])),
        owner_references: Some(vec![OwnerReference {
            name: "rs".into(),
            kind: "ReplicaSet".into(),
            ..Default::default()
        }]),
        managed_fields: Some(vec![ManagedFieldsEntry {
            manager: Some("kubelet".into()),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

#[test]
fn pod_info_decodes_a_full_pod() {
    let pod = Pod {
        metadata: meta("p", Some("default")),
        spec: Some(PodSpec {
            node_name: Some("a".into()),
            host_network: Some(true),
            service_account_name: Some("sa".into()),
            tolerations: Some(vec![Toleration::default()]),
            volumes: Some(vec![Volume {
                name: "v".into(),
                ..Default::default()
            }]),
            containers: vec![
                Container {
                    name: "sidecar".into(),
                    image: Some("img".into()),
                    env: Some(vec![EnvVar {
                        name: "E".into(),
                        value: Some("1".into()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
                Container {
                    name: "app".into(),
                    args: Some(vec!["--x".into()]),
                    ports: Some(vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: 80,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.244.1.5".into()),
            pod_ips: Some(vec![
                PodIP {
                    ip: "10.244.1.5".into(),
                },
                PodIP {
                    ip: "fd00::5".into(),
                },
            ]),
            host_ip: Some("10.0.0.1".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    };
    let json = serde_json::to_value(&pod).unwrap();
    let info: CachedPod = serde_json::from_value(json).unwrap();
    assert_eq!(info.metadata, pod.metadata, "metadata is kept whole");
    let spec = info.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some("a"));
    assert_eq!(spec.host_network, Some(true));
    let full = pod.spec.as_ref().unwrap();
    assert_eq!(
        spec.containers,
        full.containers
            .iter()
            .map(|c| CachedContainer {
                name: c.name.clone(),
                ports: c.ports.clone(),
            })
            .collect::<Vec<_>>()
    );
    let status = info.status.as_ref().unwrap();
    let full = pod.status.as_ref().unwrap();
    assert_eq!(status.phase, full.phase);
    assert_eq!(status.pod_ip, full.pod_ip);
    assert_eq!(status.pod_ips, full.pod_ips);

    // The field names on the wire are the API's: the compact object reads back as a Pod.
    let back: Pod = serde_json::from_value(serde_json::to_value(&info).unwrap()).unwrap();
    assert_eq!(back.status.unwrap().pod_ips, full.pod_ips);
    assert_eq!(back.spec.unwrap().node_name.as_deref(), Some("a"));
}

#[test]
fn node_info_decodes_a_full_node() {
    let node = Node {
        metadata: meta("a", None),
        spec: Some(NodeSpec {
            pod_cidr: Some("10.244.1.0/24".into()),
            pod_cidrs: Some(vec!["10.244.1.0/24".into(), "fd00:1::/64".into()]),
            provider_id: Some("p".into()),
            unschedulable: Some(true),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: "10.0.0.1".into(),
            }]),
            images: Some(vec![ContainerImage {
                names: Some(vec!["img".into()]),
                ..Default::default()
            }]),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    };
    let info: CachedNode = serde_json::from_value(serde_json::to_value(&node).unwrap()).unwrap();
    assert_eq!(info.metadata, node.metadata);
    let spec = info.spec.as_ref().unwrap();
    let full = node.spec.as_ref().unwrap();
    assert_eq!(spec.pod_cidr, full.pod_cidr);
    assert_eq!(spec.pod_cidrs, full.pod_cidrs);
    assert_eq!(
        info.status.as_ref().unwrap().addresses,
        node.status.as_ref().unwrap().addresses
    );
}

#[test]
fn compact_types_address_the_real_kinds() {
    assert_eq!(
        CachedPod::url_path(&(), Some("ns")),
        Pod::url_path(&(), Some("ns"))
    );
    assert_eq!(CachedNode::url_path(&(), None), Node::url_path(&(), None));
    assert_eq!(CachedPod::api_version(&()), "v1");
    assert_eq!(CachedNode::kind(&()), "Node");
    assert_eq!(CachedPod::plural(&()), "pods");
}

#[test]
fn compact_types_are_much_smaller_inline() {
    // What the cache holds per object before any heap string: the reason for these types.
    for (compact, full) in [
        (size_of::<CachedPod>(), size_of::<Pod>()),
        (size_of::<CachedContainer>(), size_of::<Container>()),
        (size_of::<CachedNode>(), size_of::<Node>()),
    ] {
        assert!(
            compact * 2 < full,
            "compact {compact} B vs full {full} B inline"
        );
    }
}

#[test]
fn equal_label_sets_are_shared_and_dropped_sets_are_swept() {
    let set = |i: usize| BTreeMap::from([("app".to_string(), format!("intern-test-{i}"))]);
    let a = intern_labels(set(0));
    let b = intern_labels(set(0));
    assert!(Arc::ptr_eq(&a, &b), "equal labels: one map");
    assert!(
        !Arc::ptr_eq(&a, &intern_labels(set(1))),
        "other labels: another"
    );
    // 1,000 sets no pod keeps: the table sweeps them as it grows (other tests of this process
    // hold a few sets of their own meanwhile).
    for i in 2..1_002 {
        drop(intern_labels(set(i)));
    }
    let held = label_sets_held();
    assert!(
        held < 200,
        "{held} label sets held after 1,000 dropped ones"
    );
    assert!(
        Arc::ptr_eq(&a, &intern_labels(set(0))),
        "a set still held survives the sweeps"
    );
}
