//! Unit tests of the convergence rules of `meshctl status`.

use std::time::UNIX_EPOCH;

use k8s_openapi::{
    api::core::v1::{NodeAddress, NodeStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use mesh_agent::nodestatus::{MeshNodePeer, STATUS_VERSION};
use wiremesh_crds::MeshEncryptionSpec;
use wiremesh_keyexchange::{
    ANNOTATION_ENDPOINT, ANNOTATION_KEY_GENERATION, ANNOTATION_PUBLIC_KEY, PrivateKey, PublicKey,
};

use super::*;

const NOW: u64 = 1_000_000;

struct Member {
    name: String,
    ip: String,
    key: PublicKey,
}

fn members(n: usize) -> Vec<Member> {
    (1..=n)
        .map(|i| Member {
            name: format!("node-{i}"),
            ip: format!("10.0.0.{i}"),
            key: PrivateKey::generate().unwrap().public_key(),
        })
        .collect()
}

fn report_for(me: &Member, all: &[Member], handshake_age: Option<u64>) -> MeshNodeStatus {
    let peers: Vec<MeshNodePeer> = all
        .iter()
        .filter(|m| m.name != me.name)
        .map(|m| MeshNodePeer {
            node: m.name.clone(),
            key: m.key.fingerprint(),
            last_handshake: handshake_age.map(|a| NOW - a),
        })
        .collect();
    MeshNodeStatus {
        ebpf: None,
        version: STATUS_VERSION,
        updated_at: NOW - 5,
        interval_secs: 30,
        datapath: "userspace".into(),
        datapath_reason: Some("auto: no wireguard kernel module".into()),
        interface: "wm0".into(),
        key: Some(me.key.fingerprint()),
        key_created_at: Some(NOW - 3600),
        enabled: true,
        ready: true,
        peers_expected: peers.len() as u32,
        peers_configured: peers.len() as u32,
        peers,
        rejected: vec![],
        error: None,
        conditions: vec![],
    }
}

fn node(m: &Member, report: Option<&MeshNodeStatus>) -> (Node, Option<MeshNodeStatus>) {
    let annotations = BTreeMap::from([
        (ANNOTATION_PUBLIC_KEY.to_string(), m.key.to_base64()),
        (ANNOTATION_ENDPOINT.to_string(), format!("{}:51871", m.ip)),
        (ANNOTATION_KEY_GENERATION.to_string(), "3".to_string()),
    ]);
    let node = Node {
        metadata: ObjectMeta {
            name: Some(m.name.clone()),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: None,
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: m.ip.clone(),
            }]),
            ..Default::default()
        }),
    };
    (node, report.cloned())
}

/// Every member with a report of fresh handshakes with all the others.
fn fresh_mesh(all: &[Member]) -> Vec<(Node, Option<MeshNodeStatus>)> {
    all.iter()
        .map(|m| node(m, Some(&report_for(m, all, Some(10)))))
        .collect()
}

fn enabled() -> MeshEncryption {
    let spec: MeshEncryptionSpec =
        serde_json::from_value(serde_json::json!({"enabled": true})).unwrap();
    MeshEncryption::new("default", spec)
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

#[test]
fn full_mesh_with_fresh_handshakes_is_converged() {
    let all = members(3);
    let nodes = fresh_mesh(&all);
    let status = evaluate(&nodes, Some(&enabled()), now());
    assert!(status.converged(), "{:?}", status.all_problems());
    let n1 = status.node("node-1").unwrap();
    assert_eq!(n1.key_generation, Some(3));
    assert_eq!(n1.key_fingerprint, Some(all[0].key.fingerprint()));
    assert_eq!(n1.peers.len(), 2);
    assert_eq!(n1.peers[0].handshake_age_secs, Some(10));
    let text = render(&status);
    assert!(text.contains("mesh converged: 3/3 nodes"), "{text}");
    assert!(text.contains("node-2"), "{text}");
}

#[test]
fn disabled_or_absent_mesh_is_not_converged() {
    let all = members(2);
    let nodes = fresh_mesh(&all);
    assert!(!evaluate(&nodes, None, now()).converged());
    let mut off = enabled();
    off.spec.enabled = false;
    let status = evaluate(&nodes, Some(&off), now());
    assert!(!status.converged());
    assert!(status.problems[0].contains("enabled: false"));
}

#[test]
fn missing_handshake_stale_report_and_wrong_key_are_reported() {
    let all = members(3);
    let mut nodes = fresh_mesh(&all);
    nodes[0] = node(&all[0], Some(&report_for(&all[0], &all, None)));
    let mut stale = report_for(&all[1], &all, Some(10));
    stale.updated_at = NOW - 1_000;
    nodes[1] = node(&all[1], Some(&stale));
    let mut wrong = report_for(&all[2], &all, Some(10));
    wrong.peers[0].key = "XXXXXXXX".into();
    nodes[2] = node(&all[2], Some(&wrong));

    let status = evaluate(&nodes, Some(&enabled()), now());
    assert!(!status.converged());
    let problems = status.all_problems().join("\n");
    assert!(
        problems.contains("node-1: peer node-2: no handshake yet"),
        "{problems}"
    );
    assert!(
        problems.contains("node-2: status report is 1000s old"),
        "{problems}"
    );
    assert!(
        problems.contains("node-3: peer node-1: configured with key XXXXXXXX"),
        "{problems}"
    );
}

#[test]
fn node_with_garbage_annotation_is_excluded_from_expectations() {
    let all = members(3);
    let good = &all[..2];
    let mut nodes: Vec<(Node, Option<MeshNodeStatus>)> = good
        .iter()
        .map(|m| node(m, Some(&report_for(m, good, Some(10)))))
        .collect();
    let mut bad = node(&all[2], None);
    bad.0
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(ANNOTATION_PUBLIC_KEY.into(), "garbage".into());
    nodes.push(bad);
    let status = evaluate(&nodes, Some(&enabled()), now());
    assert!(!status.converged());
    assert!(status.node("node-1").unwrap().converged());
    assert!(status.node("node-2").unwrap().converged());
    let n3 = status.node("node-3").unwrap();
    assert!(
        n3.problems[0].contains("invalid annotations"),
        "{:?}",
        n3.problems
    );
}

#[test]
fn readdressed_node_with_a_stale_endpoint_stays_a_peer_and_is_reported() {
    // node-3 moved to 10.0.0.203 (an ExternalIP listed first must not be picked); its
    // annotation still names 10.0.0.3. Its peers keep it: the others converge, node-3 is
    // reported until its agent republishes.
    let all = members(3);
    let mut nodes = fresh_mesh(&all);
    nodes[2].0.status.as_mut().unwrap().addresses = Some(vec![
        NodeAddress {
            type_: "ExternalIP".into(),
            address: "203.0.113.3".into(),
        },
        NodeAddress {
            type_: "InternalIP".into(),
            address: "10.0.0.203".into(),
        },
    ]);
    let status = evaluate(&nodes, Some(&enabled()), now());
    assert!(status.node("node-1").unwrap().converged());
    assert!(status.node("node-2").unwrap().converged());
    let n3 = status.node("node-3").unwrap();
    assert_eq!(n3.key_fingerprint, Some(all[2].key.fingerprint()));
    assert!(!n3.converged());
    assert!(
        n3.problems.iter().any(|p| p.contains("stale endpoint")
            && p.contains("10.0.0.3")
            && p.contains("10.0.0.203:51871")),
        "{:?}",
        n3.problems
    );
}

#[test]
fn node_without_key_or_report_is_not_converged() {
    let all = members(2);
    let mut n2 = node(&all[1], None);
    n2.0.metadata.annotations = None;
    let nodes = vec![
        node(&all[0], Some(&report_for(&all[0], &all[..1], Some(1)))),
        n2,
    ];
    let status = evaluate(&nodes, Some(&enabled()), now());
    let n2 = status.node("node-2").unwrap();
    assert!(n2.problems.iter().any(|p| p.contains("no public key")));
    assert!(n2.problems.iter().any(|p| p.contains("no status report")));
    // node-1 has no valid peer to expect.
    assert!(status.node("node-1").unwrap().converged());
}

#[test]
fn an_ebpf_failure_in_the_report_is_a_problem() {
    let all = members(2);
    let mut broken = report_for(&all[0], &all, Some(10));
    broken.ebpf = Some(mesh_agent::nodestatus::MeshNodeEbpf {
        loaded: false,
        strict: false,
        attached_programs: 0,
        error: Some("/sys/fs/bpf/wiremesh/node-1 is not on a bpf filesystem".into()),
    });
    let nodes = vec![
        node(&all[0], Some(&broken)),
        node(&all[1], Some(&report_for(&all[1], &all, Some(10)))),
    ];
    let status = evaluate(&nodes, Some(&enabled()), now());
    assert!(!status.converged());
    let n1 = status.node("node-1").unwrap();
    assert!(
        n1.problems
            .iter()
            .any(|p| p.contains("eBPF datapath") && p.contains("not on a bpf filesystem")),
        "{:?}",
        n1.problems
    );
}
