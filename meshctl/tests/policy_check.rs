//! `meshctl policy check` end to end: the real binary on the committed example
//! (examples/policy/shop.yaml) and on broken input.

use std::{
    collections::BTreeSet,
    io::Write,
    path::PathBuf,
    process::{Command, Output, Stdio},
};

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/shop.yaml")
}

fn meshctl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meshctl starts");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or("").as_bytes())
        .expect("write stdin");
    drop(input);
    child.wait_with_output().expect("meshctl finishes")
}

const PORTS: [&str; 6] = [
    "--port", "tcp/8080", "--port", "tcp/5432", "--port", "tcp/9090",
];

#[test]
fn json_lists_every_ordered_pair_and_port() {
    let example = example();
    let mut args = vec![
        "policy",
        "check",
        "-f",
        example.to_str().unwrap(),
        "-o",
        "json",
    ];
    args.extend(PORTS);
    let out = meshctl(&args, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    let obj = v.as_object().unwrap();
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["probes"]);
    let probes = obj["probes"].as_array().unwrap();
    // 4 pods -> 12 ordered pairs without self, times 3 ports.
    assert_eq!(probes.len(), 36);
    let mut allowed = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for p in probes {
        let p = p.as_object().unwrap();
        let mut keys: Vec<_> = p.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["allowed", "family", "from", "port", "to"]);
        assert_eq!(p["family"], "ipv4", "the example's pods are IPv4 only");
        let (from, to, port) = (
            p["from"].as_str().unwrap().to_string(),
            p["to"].as_str().unwrap().to_string(),
            p["port"].as_str().unwrap().to_string(),
        );
        assert_ne!(from, to, "a pod to itself is not probed");
        assert!(
            seen.insert((from.clone(), to.clone(), port.clone())),
            "duplicate probe"
        );
        if p["allowed"].as_bool().unwrap() {
            allowed.insert((from, to, port));
        }
    }
    let want: BTreeSet<(String, String, String)> = [
        ("prod/frontend", "prod/api", "tcp/8080"),
        ("prod/api", "prod/db", "tcp/5432"),
        ("monitoring/prometheus", "prod/frontend", "tcp/9090"),
        ("monitoring/prometheus", "prod/api", "tcp/9090"),
        ("monitoring/prometheus", "prod/db", "tcp/9090"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(allowed, want);
    assert_eq!(
        probes[0],
        serde_json::json!({"from": "prod/frontend", "to": "prod/api", "port": "tcp/8080", "family": "ipv4", "allowed": true})
    );
}

#[test]
fn table_shows_a_matrix_per_port() {
    let example = example();
    let mut args = vec!["policy", "check", "-f", example.to_str().unwrap()];
    args.extend(PORTS);
    let out = meshctl(&args, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for line in [
        "tcp/8080: 1 of 12 pairs allowed",
        "tcp/5432: 1 of 12 pairs allowed",
        "tcp/9090: 3 of 12 pairs allowed",
        "  1  prod/frontend          - x . .",
        "  4  monitoring/prometheus  x x x -",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn default_port_and_stdin() {
    let yaml = std::fs::read_to_string(example()).unwrap();
    let out = meshctl(&["policy", "check", "-f", "-", "-o", "json"], Some(&yaml));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let probes = v["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 12);
    assert!(
        probes
            .iter()
            .all(|p| p["port"] == "tcp/80" && p["allowed"] == false)
    );
}

/// Issue 13 leftover: a dual-stack pair is probed once per family, each pod at its address of
/// that family; an ipBlock holding only api's IPv6 address admits only the IPv6 probe
/// (examples/policy/dual-stack.yaml).
#[test]
fn a_dual_stack_pair_gets_a_verdict_per_family() {
    let example =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/policy/dual-stack.yaml");
    let file = example.to_str().unwrap();
    let args = ["policy", "check", "-f", file, "--port", "tcp/5432"];
    let out = meshctl(&[&args[..], &["-o", "json"]].concat(), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let api_to_db: Vec<(String, bool)> = v["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["from"] == "shop/api" && p["to"] == "shop/db")
        .map(|p| {
            (
                p["family"].as_str().unwrap().to_string(),
                p["allowed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        api_to_db,
        [("ipv4".to_string(), false), ("ipv6".to_string(), true)]
    );
    let pending: Vec<&serde_json::Value> = v["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["from"] == "shop/pending" && p["to"] == "shop/db")
        .collect();
    assert_eq!(pending.len(), 1);
    assert!(pending[0]["family"].is_null(), "{pending:?}");
    let out = meshctl(&args, None);
    let text = String::from_utf8(out.stdout).unwrap();
    for line in [
        "10.244.1.10, fd00:10:244:1::a",
        "tcp/5432: 9 of 12 pairs allowed, 1 over one family only",
        "  1  shop/api      - 6 x x",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn errors_name_the_document_and_field() {
    let bad = "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n---\n\
               apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
               metadata: {name: bad, namespace: prod}\nspec:\n  ingress:\n  \
               - ports: [{port: 0}]\n";
    let out = meshctl(&["policy", "check", "-f", "-"], Some(bad));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("document 2 (NetworkPolicy prod/bad): spec.ingress[0].ports[0].port: invalid value \"0\": must be 1..65535"),
        "{err}"
    );
    let out = meshctl(
        &["policy", "check", "-f", "-", "--port", "tcp/http"],
        Some(""),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("port must be 1..65535"));
    let out = meshctl(
        &["policy", "check", "-f", "/nonexistent/wiremesh.yaml"],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading /nonexistent/wiremesh.yaml"));
}
