use std::collections::BTreeMap;

use mesh_agent::{api::FlowsResponse, flows::Flow, history::Period};
use serde_json::json;

use super::{sign::*, *};
use crate::flows::tests::flow;

const A: (&str, &str, &str) = ("shop", "web-1", "10.244.1.11");
const B: (&str, &str, &str) = ("shop", "db-1", "10.244.2.11");
const C: (&str, &str, &str) = ("ops", "probe-1", "10.244.3.11");
const A2: (&str, &str, &str) = ("shop", "web-2", "10.244.1.12");

fn seen(mut f: Flow, peer: &str, ingress: bool, sport: u16) -> Flow {
    f.encryption.peer_node = Some(peer.into());
    if ingress {
        f.traffic_direction = "INGRESS".into();
        f.hook = "to-pod".into();
    }
    if let mesh_agent::flows::Layer4::Udp(p) = &mut f.l4 {
        p.source_port = sport;
    }
    f
}

fn node(name: &str) -> Node {
    serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
}

fn answer(node: &str, flows: Vec<Flow>, coverage: Vec<Period>) -> AgentAnswer {
    AgentAnswer {
        node: node.into(),
        answer: Ok(FlowsResponse {
            node_name: node.into(),
            now: 2_000,
            flows,
            window: Some(Period {
                from: 1_000,
                to: 2_000,
            }),
            coverage,
            key_created_at: Some(500),
        }),
    }
}

/// node-1 sends 2 encrypted flows to node-2 (both ends record them), 1 plaintext flow to
/// node-3 (no tunnel), 1 flow dropped by policy at node-2, and 1 same-node flow; node-3 does
/// not answer; node-2 was not recording for 100 s.
fn inputs() -> Inputs {
    let whole = vec![Period {
        from: 900,
        to: 2_000,
    }];
    let n1 = vec![
        seen(
            flow("node-1", A, B, 53, "forwarded-encrypted", 1_100),
            "node-2",
            false,
            1,
        ),
        seen(
            flow("node-1", A, B, 53, "forwarded-encrypted", 1_100),
            "node-2",
            false,
            2,
        ),
        seen(
            flow("node-1", A, C, 80, "forwarded-plain", 1_200),
            "node-3",
            false,
            3,
        ),
        seen(
            flow("node-1", A, B, 5432, "forwarded-encrypted", 1_300),
            "node-2",
            false,
            4,
        ),
        seen(
            flow("node-1", A, A2, 8080, "forwarded-local", 1_400),
            "node-1",
            false,
            5,
        ),
    ];
    let n2 = vec![
        seen(
            flow("node-2", A, B, 53, "forwarded-encrypted", 1_100),
            "node-1",
            true,
            1,
        ),
        seen(
            flow("node-2", A, B, 53, "forwarded-encrypted", 1_100),
            "node-1",
            true,
            2,
        ),
        seen(
            flow("node-2", A, B, 5432, "dropped-policy", 1_300),
            "node-1",
            true,
            4,
        ),
    ];
    Inputs {
        from: 1_000,
        to: 2_000,
        nodes: vec![
            (node("node-1"), None),
            (node("node-2"), None),
            (node("node-3"), None),
        ],
        mesh: None,
        rotations: vec![
            serde_json::from_value(json!({
                "apiVersion": "wiremesh.io/v1alpha1", "kind": "KeyRotation",
                "metadata": {"name": "r1"},
                "spec": {"reason": "quarterly"},
                "status": {"phase": "Complete", "selectedNodes": ["node-1"],
                           "startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:05:00Z"}
            }))
            .unwrap(),
        ],
        agents: vec![
            answer("node-1", n1, whole),
            answer("node-2", n2, vec![Period { from: 900, to: 1_500 }, Period { from: 1_600, to: 1_999 }]),
            AgentAnswer {
                node: "node-3".into(),
                answer: Err("connection refused".into()),
            },
        ],
    }
}

#[test]
fn counts_each_flow_once_and_classifies_it() {
    let r = build(&inputs(), 2_000);
    let s = &r.summary;
    assert_eq!(
        (
            s.cross_node_flows,
            s.encrypted_flows,
            s.plaintext_flows,
            s.dropped_flows,
            s.other_flows
        ),
        (3, 2, 1, 1, 1),
        "{s:?}"
    );
    assert_eq!(s.coverage_percent, "66.67%");
    assert!((s.coverage.unwrap() - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!((s.nodes_total, s.nodes_reached), (3, 2));
    assert_eq!(r.plaintext_flow_list.len(), 1);
    let p = &r.plaintext_flow_list[0];
    assert_eq!(
        (p.source.as_str(), p.destination.as_str()),
        ("shop/web-1", "ops/probe-1")
    );
    assert_eq!(
        (p.source_node.as_str(), p.destination_node.as_str()),
        ("node-1", "node-3")
    );
    assert_eq!(p.reason, "permissive-no-tunnel");
    assert_eq!(
        r.dropped_by_reason,
        BTreeMap::from([(
            "dropped-policy".to_string(),
            DropCount {
                flows: 1,
                packets: 3
            }
        )])
    );
    assert_eq!(r.rotations.len(), 1);
    assert_eq!(r.rotations[0].phase, "Complete");
    assert_eq!(r.rotations[0].end.as_deref(), Some("2026-01-01T00:05:00Z"));
    assert_eq!(r.cipher_suite, mesh_agent::flows::CIPHER_SUITE);
    let n1 = &r.nodes[0];
    assert_eq!(
        (n1.name.as_str(), n1.key_age_seconds, n1.reached),
        ("node-1", Some(1_500), true)
    );
    assert!(!r.nodes[2].reached);
    let pair = |s: &str, d: &str| {
        r.node_pairs
            .iter()
            .find(|p| p.source_node == s && p.destination_node == d)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(pair("node-1", "node-2").encrypted_flows, 2);
    assert_eq!(pair("node-1", "node-2").dropped_flows, 1);
    assert_eq!(pair("node-1", "node-3").plaintext_flows, 1);
    let edge = r
        .services
        .iter()
        .find(|e| e.source == "shop/web-1" && e.destination == "shop/db-1")
        .unwrap();
    assert_eq!((edge.encrypted_flows, edge.dropped_flows), (2, 1));
}

#[test]
fn gaps_name_unreachable_nodes_and_periods_without_data() {
    let r = build(&inputs(), 2_000);
    let kinds: Vec<(String, Option<String>)> = r
        .gaps
        .iter()
        .map(|g| (g.kind.clone(), g.node.clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("no-data".to_string(), Some("node-2".to_string())),
            ("node-unreachable".to_string(), Some("node-3".to_string())),
        ],
        "{:?}",
        r.gaps
    );
    assert!(r.gaps[0].detail.contains("100 s"), "{:?}", r.gaps[0]);
    assert!(r.gaps[1].detail.contains("connection refused"));
    // With a gap the transit controls cannot be satisfied; with plaintext they are not.
    assert!(
        r.controls
            .iter()
            .any(|c| c.id == "CC6.7" && c.status == "not-satisfied")
    );
    let none = build(
        &Inputs {
            agents: vec![answer(
                "node-1",
                Vec::new(),
                vec![Period {
                    from: 900,
                    to: 2_000,
                }],
            )],
            nodes: vec![(node("node-1"), None)],
            ..inputs()
        },
        2_000,
    );
    assert_eq!(none.summary.coverage, None);
    assert_eq!(none.gaps[0].kind, "no-cross-node-traffic");
    assert!(none.controls.iter().all(|c| c.status != "satisfied"));
}

#[test]
fn the_digest_covers_the_canonical_body() {
    let r = build(&inputs(), 2_000);
    assert!(r.digest.starts_with("sha256:") && r.digest.len() == 7 + 64);
    let value = serde_json::to_value(&r).unwrap();
    assert_eq!(digest_of_value(&value), r.digest);
    let body = canonical_body(&value);
    assert!(
        !body.contains("\"digest\":\"sha256"),
        "the digest is not in its own body"
    );
    assert!(
        body.starts_with("{\"apiVersion\""),
        "keys sorted: {}",
        &body[..40]
    );
    assert!(
        !body.contains("\": ") && !body.contains('\n'),
        "no whitespace between tokens"
    );
    let mut without = value.clone();
    without.as_object_mut().unwrap().remove("digest");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        without
    );
    let mut changed = value.clone();
    changed["summary"]["encryptedFlows"] = json!(3);
    assert_ne!(digest_of_value(&changed), r.digest);
}

#[test]
fn pae_matches_the_dsse_specification_vector() {
    assert_eq!(
        pae("http://example.com/HelloWorld", b"hello world"),
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
    );
}

#[test]
fn keys_round_trip_through_pem() {
    let (key, pem) = SigningKey::generate().unwrap();
    let again = SigningKey::from_pem(&pem, "test").unwrap();
    assert_eq!(again.public(), key.public());
    let public = PublicKey::from_pem(&key.public().to_pem(), "test").unwrap();
    assert_eq!(public, key.public());
    assert!(SigningKey::from_pem("garbage", "x").is_err());
    assert!(
        PublicKey::from_pem(&pem, "x").is_err(),
        "a private key is not a public key"
    );
    assert!(
        !format!("{key:?}").contains(&pem[30..60]),
        "Debug shows no key material"
    );
}

#[test]
fn verify_accepts_the_signed_report_and_names_each_failure() {
    let dir = tempfile::tempdir().unwrap();
    let report = build(&inputs(), 2_000);
    let (key, _) = SigningKey::generate().unwrap();
    let written = write(dir.path(), &report, &key).unwrap();
    let bytes = std::fs::read(&written.json).unwrap();
    let envelope = std::fs::read(&written.envelope).unwrap();
    let public = key.public();
    let ok = verify(&bytes, &envelope, &public).expect("verifies");
    assert_eq!(ok.digest, report.digest);

    // One changed byte anywhere in the report: the digest or the signed subject fails.
    for at in [bytes.len() / 3, bytes.len() / 2, bytes.len() - 2] {
        let mut tampered = bytes.clone();
        tampered[at] = if tampered[at] == b'1' { b'2' } else { b'1' };
        let err = verify(&tampered, &envelope, &public).unwrap_err();
        assert!(
            matches!(
                err,
                SignError::Digest { .. } | SignError::Subject { .. } | SignError::ReportJson(_)
            ),
            "byte {at}: {err}"
        );
    }
    // Someone without the key changes the numbers and recomputes the digest.
    let mut value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    value["summary"]["plaintextFlows"] = json!(0);
    value["plaintextFlowList"] = json!([]);
    value["digest"] = json!(digest_of_value(&value));
    let redigested = serde_json::to_vec_pretty(&value).unwrap();
    let err = verify(&redigested, &envelope, &public).unwrap_err();
    assert!(matches!(err, SignError::Subject { .. }), "{err}");
    assert!(err.to_string().starts_with("statement:"), "{err}");
    // ... and signs it with a key of their own: not the trusted key.
    let (other, _) = SigningKey::generate().unwrap();
    let forged: Report = serde_json::from_value(value).unwrap();
    let forged_envelope = serde_json::to_vec(&other.sign(&redigested, &forged)).unwrap();
    let err = verify(&redigested, &forged_envelope, &public).unwrap_err();
    assert!(matches!(err, SignError::Signature { .. }), "{err}");
    // A changed envelope.
    let mut env: Envelope = serde_json::from_slice(&envelope).unwrap();
    env.payload_type = "application/json".into();
    let err = verify(&bytes, &serde_json::to_vec(&env).unwrap(), &public).unwrap_err();
    assert!(err.to_string().contains("payloadType"), "{err}");
}

#[test]
fn the_page_is_self_contained_and_shows_the_headline() {
    let report = build(&inputs(), 2_000);
    let page = html::render(&report);
    assert!(page.contains("Encryption coverage 66.67%"), "headline");
    assert!(page.contains("<svg") && page.contains("shop/web-1"));
    assert!(page.contains("permissive-no-tunnel") && page.contains("dropped-policy"));
    assert!(page.contains("class=\"plain\"") && page.contains("class=\"enc\""));
    for fetch in ["<script", "src=", "href=\"http", "@import", "url(http"] {
        assert!(!page.contains(fetch), "fetches nothing: {fetch}");
    }
    assert!(coverage_line(&report).starts_with("coverage 66.67%: 2 of 3"));
}

#[test]
fn workloads_drop_generated_pod_name_suffixes() {
    let ip = std::net::IpAddr::from([10, 0, 0, 1]);
    let pod = |name: &str| mesh_agent::flows::Endpoint {
        namespace: "shop".into(),
        pod_name: name.into(),
        ..Default::default()
    };
    assert_eq!(workload(&pod("web-7d9f8b6c5-x2k4q"), ip), "shop/web");
    assert_eq!(workload(&pod("agent-b7x2q"), ip), "shop/agent");
    assert_eq!(workload(&pod("pod-1-1"), ip), "shop/pod-1-1");
    assert_eq!(workload(&pod("db-0"), ip), "shop/db-0");
    assert_eq!(
        workload(&mesh_agent::flows::Endpoint::default(), ip),
        "10.0.0.1"
    );
}

#[test]
fn ipv6_flows_count_like_ipv4_ones() {
    // The same pods as A -> C over IPv6 (dual stack): another flow, plaintext to node-3 too.
    let a6 = ("shop", "web-1", "fd00:10:244:1::11");
    let c6 = ("ops", "probe-1", "fd00:10:244:3::11");
    let mut inputs = inputs();
    let Ok(n1) = &mut inputs.agents[0].answer else {
        panic!("node-1 answers")
    };
    n1.flows.push(seen(
        flow("node-1", a6, c6, 80, "forwarded-plain", 1_200),
        "node-3",
        false,
        3,
    ));
    let r = build(&inputs, 2_000);
    assert_eq!(
        (r.summary.cross_node_flows, r.summary.plaintext_flows),
        (4, 2),
        "{:?}",
        r.summary
    );
    let p = r
        .plaintext_flow_list
        .iter()
        .find(|p| p.source_ip == "fd00:10:244:1::11")
        .expect("the IPv6 flow is listed");
    assert_eq!(
        (
            p.source.as_str(),
            p.destination.as_str(),
            p.destination_ip.as_str()
        ),
        ("shop/web-1", "ops/probe-1", "fd00:10:244:3::11")
    );
    assert_eq!(p.destination_node, "node-3");
    // Without a pod name, the workload is the IPv6 address.
    let ip: std::net::IpAddr = "fd00:10:244:3::11".parse().unwrap();
    assert_eq!(
        workload(&mesh_agent::flows::Endpoint::default(), ip),
        "fd00:10:244:3::11"
    );
}
