use mesh_agent::flows::Flow;
use serde_json::json;

use super::*;

/// A flow record as an agent serves it.
pub(crate) fn flow(
    node: &str,
    src: (&str, &str, &str),
    dst: (&str, &str, &str),
    dport: u16,
    wiremesh_verdict: &str,
    last_seen: u64,
) -> Flow {
    let dropped = wiremesh_verdict.starts_with("dropped");
    let encrypted = wiremesh_verdict == "forwarded-encrypted";
    let cross = wiremesh_verdict != "forwarded-local";
    let reason = match wiremesh_verdict {
        "forwarded-encrypted" => "wireguard-tunnel",
        "forwarded-local" => "same-node",
        "forwarded-plain" => "permissive-no-tunnel",
        "dropped-policy" => "dropped-policy",
        _ => "dropped-plaintext-strict",
    };
    let endpoint =
        |(ns, pod, _): (&str, &str, &str)| json!({"identity": 0, "namespace": ns, "pod_name": pod});
    serde_json::from_value(json!({
        "time": mesh_agent::flows::rfc3339(last_seen),
        "verdict": if dropped { "DROPPED" } else { "FORWARDED" },
        "drop_reason_desc": if wiremesh_verdict == "dropped-policy" { Some("POLICY_DENIED") } else { None },
        "IP": {"source": src.2, "destination": dst.2, "ipVersion": if src.2.contains(':') { "IPv6" } else { "IPv4" }, "encrypted": encrypted},
        "l4": {"UDP": {"source_port": 40000, "destination_port": dport}},
        "source": endpoint(src),
        "destination": endpoint(dst),
        "node_name": node,
        "traffic_direction": "EGRESS",
        "Type": "L3_L4",
        "encryption": {"encrypted": encrypted, "reason": reason, "peer_node": if cross { Some("node-2") } else { None }},
        "wiremesh_verdict": wiremesh_verdict,
        "hook": "from-pod",
        "cross_node": cross,
        "packets": 3,
        "bytes": 300,
        "first_seen": last_seen - 1,
        "last_seen": last_seen,
    }))
    .expect("a flow record")
}

const A: (&str, &str, &str) = ("shop", "web-1", "10.244.1.11");
const B: (&str, &str, &str) = ("shop", "db-1", "10.244.2.11");
const C: (&str, &str, &str) = ("ops", "probe-1", "10.244.3.11");

fn sample() -> Vec<Flow> {
    vec![
        flow("node-1", A, B, 5432, "forwarded-encrypted", 1_000),
        flow("node-1", A, C, 80, "forwarded-plain", 1_001),
        flow("node-2", C, B, 5432, "dropped-policy", 1_002),
        flow("node-1", A, A, 8080, "forwarded-local", 1_003),
    ]
}

fn ports(filter: &Filter) -> Vec<u16> {
    sample()
        .iter()
        .filter(|f| filter.matches(f))
        .map(|f| f.l4.destination_port())
        .collect()
}

#[test]
fn every_filter_narrows_as_documented() {
    assert_eq!(ports(&Filter::default()), [5432, 80, 5432, 8080]);
    let ns = Filter {
        namespace: Some("ops".into()),
        ..Filter::default()
    };
    assert_eq!(ports(&ns), [80, 5432]);
    let pod = Filter {
        pod: Some("db-1".into()),
        ..Filter::default()
    };
    assert_eq!(ports(&pod), [5432, 5432]);
    let qualified = Filter {
        pod: Some("ops/db-1".into()),
        ..Filter::default()
    };
    assert_eq!(ports(&qualified), Vec::<u16>::new());
    let node = Filter {
        node: Some("node-2".into()),
        ..Filter::default()
    };
    assert_eq!(ports(&node), [5432]);
    let dropped = Filter {
        verdict: Some("dropped".into()),
        ..Filter::default()
    };
    assert_eq!(ports(&dropped), [5432]);
    let plain = Filter {
        verdict: Some("forwarded-plain".into()),
        ..Filter::default()
    };
    assert_eq!(ports(&plain), [80]);
    let unencrypted = Filter {
        unencrypted: true,
        ..Filter::default()
    };
    assert_eq!(ports(&unencrypted), [80, 5432], "cross-node, not encrypted");
    let port = Filter {
        port: Some(40000),
        namespace: Some("shop".into()),
        verdict: Some("FORWARDED".into()),
        ..Filter::default()
    };
    assert_eq!(ports(&port), [5432, 80, 8080], "source port matches too");
}

#[test]
fn a_misspelt_verdict_is_an_error_naming_the_choices() {
    let bad = Filter {
        verdict: Some("allowed".into()),
        ..Filter::default()
    };
    let err = bad.validate().unwrap_err().to_string();
    assert!(
        err.contains("allowed") && err.contains("dropped-policy"),
        "{err}"
    );
    for ok in ["forwarded", "DROPPED", "too-big"] {
        Filter {
            verdict: Some(ok.into()),
            ..Filter::default()
        }
        .validate()
        .unwrap();
    }
}

#[test]
fn the_table_reads_at_a_glance() {
    let text = render(&sample(), Format::Table, true);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    for column in [
        "TIME",
        "SOURCE",
        "DESTINATION",
        "PORT",
        "VERDICT",
        "ENCRYPTED",
        "PEER",
    ] {
        assert!(lines[0].contains(column), "{}", lines[0]);
    }
    assert!(
        lines[1].contains("shop/web-1") && lines[1].contains("shop/db-1"),
        "{}",
        lines[1]
    );
    assert!(
        lines[1].contains("udp/5432") && lines[1].contains(" yes "),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains("no (permissive-no-tunnel)"),
        "{}",
        lines[2]
    );
    assert!(lines[3].contains("DROPPED POLICY_DENIED"), "{}", lines[3]);
    assert!(lines[1].starts_with("Jan  1 00:16:40"), "{}", lines[1]);
}

#[test]
fn json_and_json_lines_round_trip() {
    let flows = sample();
    let lines = render(&flows, Format::Jsonl, true);
    let back: Vec<Flow> = lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("one flow per line"))
        .collect();
    assert_eq!(back, flows);
    let array: Vec<Flow> = serde_json::from_str(&render(&flows, Format::Json, true)).unwrap();
    assert_eq!(array, flows);
}

#[test]
fn follow_prints_a_record_once_and_again_when_it_moves() {
    let mut follower = Follower::default();
    assert_eq!(follower.fresh(sample()).len(), 4);
    assert_eq!(follower.fresh(sample()).len(), 0);
    let mut moved = sample();
    moved[1].packets += 1;
    moved[1].last_seen += 1;
    let fresh = follower.fresh(moved);
    assert_eq!(fresh.len(), 1);
    assert_eq!(fresh[0].l4.destination_port(), 80);
}
