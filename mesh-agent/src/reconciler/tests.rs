//! Unit tests of [`plan`]: from cached Kubernetes objects to the wanted state, and of the whole
//! plan -> apply path on the fake datapath and routes.

use std::{net::SocketAddr, str::FromStr};

use ipnet::IpNet;
use k8s_openapi::{api::core::v1::PodIP, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use wiremesh_crds::MeshEncryptionSpec;
use wiremesh_keyexchange::{
    ANNOTATION_ENDPOINT, ANNOTATION_KEY_GENERATION, ANNOTATION_PUBLIC_KEY, PrivateKey,
};

use super::*;
use crate::{
    cached::{CachedPodSpec, CachedPodStatus},
    datapath::{Datapath, fake::FakeDatapath},
    routes::fake::FakeRoutes,
};

fn node(name: &str, ip: &str, cidr: &str, key: Option<&PublicKey>, port: u16) -> Arc<CachedNode> {
    let annotations = key.map(|k| {
        BTreeMap::from([
            (ANNOTATION_PUBLIC_KEY.to_string(), k.to_base64()),
            (ANNOTATION_ENDPOINT.to_string(), format!("{ip}:{port}")),
            (ANNOTATION_KEY_GENERATION.to_string(), "1".to_string()),
        ])
    });
    let mut node = CachedNode::clone(&crate::fixtures::node(name, ip, cidr));
    node.metadata.annotations = annotations;
    Arc::new(node)
}

fn pod(node: &str, ip: &str) -> Arc<CachedPod> {
    Arc::new(CachedPod {
        shared_labels: None,
        metadata: ObjectMeta::default(),
        spec: Some(CachedPodSpec {
            node_name: Some(node.into()),
            ..Default::default()
        }),
        status: Some(CachedPodStatus {
            phase: Some("Running".into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            ..Default::default()
        }),
    })
}

fn mesh_encryption(enabled: bool) -> MeshEncryption {
    let spec: MeshEncryptionSpec =
        serde_json::from_value(serde_json::json!({ "enabled": enabled })).unwrap();
    MeshEncryption::new("default", spec)
}

fn settings() -> PlanSettings {
    PlanSettings {
        node_name: "a".into(),
        listen_port: None,
        mtu: None,
        persistent_keepalive: 25,
    }
}

fn key() -> PublicKey {
    PrivateKey::generate().unwrap().public_key()
}

struct Cluster {
    me: PublicKey,
    kb: PublicKey,
    kc: PublicKey,
    nodes: Vec<Arc<CachedNode>>,
    pods: Vec<Arc<CachedPod>>,
}

fn cluster() -> Cluster {
    let (me, kb, kc) = (key(), key(), key());
    Cluster {
        nodes: vec![
            node("a", "10.0.0.1", "10.244.1.0/24", Some(&me), 51871),
            node("b", "10.0.0.2", "10.244.2.0/24", Some(&kb), 51871),
            node("c", "10.0.0.3", "10.244.3.0/24", Some(&kc), 51871),
        ],
        pods: vec![pod("b", "10.244.2.5"), pod("c", "10.244.3.7")],
        me,
        kb,
        kc,
    }
}

#[test]
fn enabled_mesh_wants_every_valid_remote_node() {
    let mut c = cluster();
    c.pods.push(pod("c", "10.99.0.7"));
    let me = mesh_encryption(true);
    let plan = plan(&settings(), &c.me, &c.nodes, &c.pods, Some(&me), Some(1500)).unwrap();
    assert!(plan.enabled);
    assert!(plan.own_patch.is_empty(), "{:?}", plan.own_patch);
    assert_eq!(plan.wanted.mtu, 1420);
    assert_eq!(plan.wanted.listen_port, 51871);
    let peers: Vec<_> = plan.wanted.peers.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(peers, ["b", "c"]);
    let b = &plan.wanted.peers[0].config;
    assert_eq!(b.public_key, c.kb);
    assert_eq!(
        b.endpoint,
        Some(SocketAddr::from_str("10.0.0.2:51871").unwrap())
    );
    assert_eq!(
        b.allowed_ips,
        vec![IpNet::from_str("10.244.2.0/24").unwrap()]
    );
    assert_eq!(b.persistent_keepalive, Some(25));
    // c's pod IP outside its podCIDR is refused (issue 13, finding 1): only c's range is routed.
    let c_ips = &plan.wanted.peers[1].config.allowed_ips;
    assert_eq!(c_ips, &vec![IpNet::from_str("10.244.3.0/24").unwrap()]);
    assert_eq!(plan.wanted.peers[1].config.public_key, c.kc);
    assert_eq!(plan.problems.len(), 1, "{:?}", plan.problems);
    assert_eq!(plan.problems[0].node, "c");
    assert_eq!(plan.problems[0].reason, "PodIPOutsideNodePodCIDRs");
}

#[test]
fn disabled_mode_installs_no_peers_or_routes() {
    // Issue 13, finding 8: on main `enabled: true, mode: Disabled` still configured every peer
    // and route (only the eBPF steering looked at the mode).
    let c = cluster();
    let spec: MeshEncryptionSpec =
        serde_json::from_value(serde_json::json!({ "enabled": true, "mode": "Disabled" })).unwrap();
    let me = MeshEncryption::new("default", spec);
    let plan = plan(&settings(), &c.me, &c.nodes, &c.pods, Some(&me), None).unwrap();
    assert!(!plan.enabled);
    assert!(plan.wanted.peers.is_empty());
}

#[test]
fn settings_problems_name_a_remembered_spec_and_node_encryption() {
    assert_eq!(settings_problem(None, false), None);
    let mut me = mesh_encryption(true);
    assert_eq!(settings_problem(Some(&me), false), None);
    let (reason, message) = settings_problem(Some(&me), true).unwrap();
    assert_eq!(reason, "MeshEncryptionMissing");
    assert!(message.contains("keeping the last spec"), "{message}");
    me.spec.node_encryption = true;
    assert_eq!(
        settings_problem(Some(&me), false).unwrap().0,
        "NodeEncryptionNotImplemented"
    );
}

#[test]
fn absent_or_disabled_mesh_wants_nothing_but_still_publishes() {
    let c = cluster();
    let mut nodes = c.nodes.clone();
    nodes[0] = node("a", "10.0.0.1", "10.244.1.0/24", None, 0);
    for me in [None, Some(mesh_encryption(false))] {
        let plan = plan(&settings(), &c.me, &nodes, &c.pods, me.as_ref(), None).unwrap();
        assert!(!plan.enabled);
        assert!(plan.wanted.peers.is_empty());
        assert_eq!(plan.wanted.mtu, FALLBACK_MTU);
        assert_eq!(plan.own_patch[ANNOTATION_PUBLIC_KEY], c.me.to_base64());
        assert_eq!(plan.own_patch[ANNOTATION_ENDPOINT], "10.0.0.1:51871");
        // The peer set is still computed, for status.
        assert_eq!(plan.peer_set.peers.len(), 2);
    }
}

#[test]
fn garbage_annotation_skips_only_that_node() {
    let c = cluster();
    let mut nodes = c.nodes.clone();
    let mut bad = (*nodes[2]).clone();
    bad.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(ANNOTATION_PUBLIC_KEY.into(), "!!!not-base64!!!".into());
    nodes[2] = Arc::new(bad);
    let me = mesh_encryption(true);
    let plan = plan(&settings(), &c.me, &nodes, &c.pods, Some(&me), None).unwrap();
    let peers: Vec<_> = plan.wanted.peers.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(peers, ["b"]);
    assert_eq!(plan.problems.len(), 1, "{:?}", plan.problems);
    assert_eq!(plan.problems[0].node, "c");
    assert_eq!(plan.problems[0].kind, ProblemKind::Rejected);
    assert!(!plan.problems[0].reason.is_empty());
    assert!(plan.problems[0].message.contains("node c"));
}

#[test]
fn readdressed_node_keeps_its_peer_and_route_at_its_new_address() {
    // Node c's InternalIP moved from 10.0.0.3 to 10.0.0.203; its agent has not republished its
    // endpoint yet (docs/faults.md, "underlay readdressed"). On main it was rejected
    // (EndpointNotNodeAddress) and its peer and route removed until it republished.
    let c = cluster();
    let mut nodes = c.nodes.clone();
    let mut moved = (*nodes[2]).clone();
    moved.status = crate::fixtures::node("c", "10.0.0.203", "10.244.3.0/24")
        .status
        .clone();
    nodes[2] = Arc::new(moved);
    let me = mesh_encryption(true);
    let plan = plan(&settings(), &c.me, &nodes, &c.pods, Some(&me), None).unwrap();
    let peer = plan
        .wanted
        .peers
        .iter()
        .find(|p| p.node == "c")
        .expect("c stays a peer");
    assert_eq!(peer.config.public_key, c.kc);
    assert_eq!(
        peer.config.endpoint,
        Some(SocketAddr::from_str("10.0.0.203:51871").unwrap())
    );
    assert!(
        peer.config
            .allowed_ips
            .contains(&IpNet::from_str("10.244.3.0/24").unwrap())
    );
    assert!(plan.peer_set.rejected.is_empty());
    assert_eq!(plan.problems.len(), 1, "{:?}", plan.problems);
    let problem = &plan.problems[0];
    assert_eq!(
        (problem.node.as_str(), problem.kind, problem.reason.as_str()),
        ("c", ProblemKind::StaleEndpoint, "StaleEndpoint")
    );
    assert!(
        problem.message.contains("10.0.0.3") && problem.message.contains("10.0.0.203:51871"),
        "{}",
        problem.message
    );
}

#[test]
fn node_claiming_our_key_is_rejected() {
    let c = cluster();
    let mut nodes = c.nodes.clone();
    nodes[2] = node("c", "10.0.0.3", "10.244.3.0/24", Some(&c.me), 51871);
    let me = mesh_encryption(true);
    let plan = plan(&settings(), &c.me, &nodes, &c.pods, Some(&me), None).unwrap();
    assert_eq!(plan.wanted.peers.len(), 1);
    assert!(
        plan.problems.iter().any(|p| p.node == "c"),
        "{:?}",
        plan.problems
    );
}

#[test]
fn settings_and_spec_pick_port_and_mtu() {
    let c = cluster();
    let mut spec_me = mesh_encryption(true);
    spec_me.spec.listen_port = 6000;
    spec_me.spec.mtu = Some(1380);
    let plan1 = plan(
        &settings(),
        &c.me,
        &c.nodes,
        &c.pods,
        Some(&spec_me),
        Some(9000),
    )
    .unwrap();
    assert_eq!((plan1.wanted.listen_port, plan1.wanted.mtu), (6000, 1380));
    // Our endpoint follows the port.
    assert_eq!(plan1.own_patch[ANNOTATION_ENDPOINT], "10.0.0.1:6000");

    let flags = PlanSettings {
        listen_port: Some(7000),
        mtu: Some(1300),
        ..settings()
    };
    let plan2 = plan(&flags, &c.me, &c.nodes, &c.pods, Some(&spec_me), Some(9000)).unwrap();
    assert_eq!((plan2.wanted.listen_port, plan2.wanted.mtu), (7000, 1300));

    let plan3 = plan(&settings(), &c.me, &c.nodes, &c.pods, None, Some(9000)).unwrap();
    assert_eq!(plan3.wanted.mtu, 8920);
}

#[test]
fn own_node_missing_is_an_error() {
    let c = cluster();
    let s = PlanSettings {
        node_name: "zz".into(),
        ..settings()
    };
    let err = plan(&s, &c.me, &c.nodes, &c.pods, None, None).unwrap_err();
    assert!(err.to_string().contains("zz"), "{err}");
}

#[tokio::test]
async fn plan_then_apply_follows_enable_disable_and_node_removal() {
    let c = cluster();
    let datapath = Arc::new(FakeDatapath::new("wm0"));
    let routes = Arc::new(FakeRoutes::new());
    let mut mesh = Mesh::new(
        datapath.clone(),
        routes.clone(),
        PrivateKey::generate().unwrap(),
    );
    let on = mesh_encryption(true);
    let off = mesh_encryption(false);

    let p = plan(&settings(), &c.me, &c.nodes, &c.pods, Some(&on), None).unwrap();
    assert!(mesh.apply(&p.wanted).await.errors.is_empty());
    assert_eq!(datapath.status().unwrap().peers.len(), 2);
    // Two podCIDRs; c's pod IP lies inside c's range, so no /32 of its own.
    assert_eq!(routes.routes("wm0").len(), 2);

    // Node c deleted: its peer and routes go, b stays.
    let p = plan(&settings(), &c.me, &c.nodes[..2], &c.pods, Some(&on), None).unwrap();
    assert!(mesh.apply(&p.wanted).await.errors.is_empty());
    assert!(datapath.peer(&c.kc).is_none());
    assert!(datapath.peer(&c.kb).is_some());
    assert_eq!(
        routes.routes("wm0"),
        [IpNet::from_str("10.244.2.0/24").unwrap()]
            .into_iter()
            .collect()
    );

    // Disabled: clean teardown.
    let p = plan(&settings(), &c.me, &c.nodes, &c.pods, Some(&off), None).unwrap();
    assert!(mesh.apply(&p.wanted).await.errors.is_empty());
    assert!(datapath.status().unwrap().peers.is_empty());
    assert!(routes.routes("wm0").is_empty());
    assert!(!routes.has_rule(), "disabled: our rule is gone");

    // Enabled again: back up.
    let p = plan(&settings(), &c.me, &c.nodes, &c.pods, Some(&on), None).unwrap();
    assert!(mesh.apply(&p.wanted).await.errors.is_empty());
    assert_eq!(datapath.status().unwrap().peers.len(), 2);
}

#[test]
fn retry_delay_grows_and_caps() {
    assert_eq!(retry_delay(1), Duration::from_secs(1));
    assert_eq!(retry_delay(2), Duration::from_secs(2));
    assert_eq!(retry_delay(5), Duration::from_secs(16));
    assert_eq!(retry_delay(50), Duration::from_secs(30));
}
