//! Issue 15, "Done when": in the virtual cluster (3 nodes, Permissive) the test sends known UDP
//! traffic — encrypted flows node-1 -> node-2, one flow node-1 -> node-2 that a NetworkPolicy
//! drops, and, after node-3's tunnel is removed (its agent and device stopped, its key
//! withdrawn), plaintext flows node-1 -> node-3 — with one agent restart in between; then
//! `meshctl report` (the binary, with only the admin kubeconfig) counts exactly that traffic,
//! including what node-1 recorded before its restart; `meshctl flows` reads the same history;
//! `meshctl report verify` accepts the report and rejects one changed byte and a re-digested
//! report; headless Chromium renders report.html (screenshot kept); and no node private key or
//! the report signing key appears in flows, reports, logs or metrics.
//!
//! Flows are counted at request time: asked right after the datagrams left the pod, node-1's
//! history holds every packet of the encrypted flows (the first as a ring-buffer record, the
//! rest still in the kernel's `wm_flows` backlog), with no reader poll or 2 s flush in between.
//!
//! Metrics: node-1 and node-2 export the tunnel bytes (node-2 received at least what was sent
//! to it; per peer, since the agents run with `--per-peer-metrics`), the coverage of the flows
//! each recorded (node-1: 5 encrypted of 7 cross-node, node-2: 4 of 4, the denied flow dropped),
//! their own rotation state (`Idle`, key generation as published) and the oldest handshake; the
//! Grafana dashboard queries only metrics the agents export, and the check rejects a dashboard
//! that names one they do not.
//!
//! Every flow is one-way UDP from a fixed source port to a bound (silent) socket, so each one is
//! exactly one 5-tuple: the expected numbers follow from what was sent.

#[path = "mesh_support/support.rs"]
mod support;

use std::{net::UdpSocket, path::Path, process::Command, time::Duration};

use base64::Engine as _;

use meshctl::agents::Agents;
use serde_json::{Value, json};
use support::*;
use wiremesh_integration::Role;

const ENCRYPTED_PORT: u16 = 7001;
const PLAINTEXT_PORT: u16 = 7002;
const DENIED_PORT: u16 = 7003;
const ENCRYPTED_SPORTS: [u16; 4] = [41001, 41002, 41003, 41004];
const PLAINTEXT_SPORTS: [u16; 2] = [42001, 42002];
const DENIED_SPORT: u16 = 43001;

fn meshctl() -> std::path::PathBuf {
    workspace_binary("meshctl", "WIREMESH_MESHCTL")
}

/// A UDP socket bound in `pod` on `port` that never answers (no ICMP port unreachable).
fn sink(cluster: &wiremesh_integration::VirtualCluster, pod: &str, port: u16) -> UdpSocket {
    let p = cluster.pod(pod).expect("pod");
    let ip = p.network.ip;
    wiremesh_integration::netns::within(&p.network.netns, move || UdpSocket::bind((ip, port)))
        .expect("enter pod namespace")
        .unwrap_or_else(|e| panic!("bind {ip}:{port}: {e}"))
}

/// `count` datagrams from `from`'s `sport` to `to`'s `dport`.
fn send(
    cluster: &wiremesh_integration::VirtualCluster,
    from: &str,
    to: &str,
    sport: u16,
    dport: u16,
    count: u32,
) -> u64 {
    let p = cluster.pod(from).expect("pod");
    let (src, dst) = (p.network.ip, cluster.pod(to).expect("pod").network.ip);
    wiremesh_integration::netns::within(&p.network.netns, move || -> std::io::Result<u64> {
        let s = UdpSocket::bind((src, sport))?;
        let mut ip_bytes = 0;
        for i in 0..count {
            let payload = format!("compliance {i}");
            s.send_to(payload.as_bytes(), (dst, dport))?;
            ip_bytes += 28 + payload.len() as u64;
        }
        Ok(ip_bytes)
    })
    .expect("enter pod namespace")
    .unwrap_or_else(|e| panic!("send {src}:{sport} -> {dst}:{dport}: {e}"))
}

/// Packets of `node`'s `from-pod` records of `sport` -> `dport` in `flows`.
fn from_pod_packets(flows: &[mesh_agent::flows::Flow], sport: u16, dport: u16) -> u64 {
    flows
        .iter()
        .filter(|f| {
            f.hook == "from-pod" && f.l4.source_port() == sport && f.l4.destination_port() == dport
        })
        .map(|f| f.packets)
        .sum()
}

/// `node`'s history since `since` holds a record of each `(sport, dport, wiremesh_verdict)`.
async fn wait_recorded(agents: &Agents, node: &str, since: u64, wanted: &[(u16, u16, &str)]) {
    let what = format!("{node}'s flow history records {wanted:?}");
    wait_async(&what, Duration::from_secs(30), || async {
        let flows = agents
            .flows(node, Some(since), None)
            .await
            .map_err(|e| e.to_string())?
            .flows;
        let missing: Vec<_> = wanted
            .iter()
            .filter(|(s, d, v)| {
                !flows.iter().any(|f| {
                    f.l4.source_port() == *s
                        && f.l4.destination_port() == *d
                        && f.wiremesh_verdict == *v
                })
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("missing {missing:?}"))
        }
    })
    .await;
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(meshctl())
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run meshctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_counts_exactly_the_traffic_sent() {
    let Some(mut cluster) = start_mesh_or_skip_with_args(
        Shape::new(3, 1),
        &["--per-peer-metrics", "--flow-coverage-window-secs", "900"],
    )
    .await
    else {
        return;
    };
    let started = std::time::Instant::now();
    let since = meshctl::report::unix(std::time::SystemTime::now());
    let kubeconfig = cluster
        .kubeconfig_path()
        .expect("admin kubeconfig")
        .to_path_buf();
    let kc = kubeconfig.to_str().expect("utf-8").to_string();
    let agents = Agents::connect(cluster.client().clone(), Some(&kubeconfig))
        .await
        .expect("admin token");
    set_mesh_mode(&cluster, "Permissive").await;
    let _sinks = [
        sink(&cluster, "pod-2-1", ENCRYPTED_PORT),
        sink(&cluster, "pod-2-1", DENIED_PORT),
        sink(&cluster, "pod-3-1", PLAINTEXT_PORT),
    ];
    label_pod(&cluster, "pod-2-1", json!({"role": "db"})).await;
    create_policy(
        &cluster,
        "db-only-7001",
        json!({
            "podSelector": {"matchLabels": {"role": "db"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"protocol": "UDP", "port": ENCRYPTED_PORT}]}],
        }),
    )
    .await;

    eprintln!("[{:?}] phase 1", started.elapsed());
    // Phase 1: encrypted flows, and one flow the policy drops (sent until node-2 drops it:
    // the same 5-tuple every time, so it stays one flow).
    let mut sent_to_node2 = 0;
    for sport in ENCRYPTED_SPORTS {
        sent_to_node2 += send(&cluster, "pod-1-1", "pod-2-1", sport, ENCRYPTED_PORT, 3);
    }
    // At once, no wait: the live table and the history count all 3 packets of every flow.
    let live = agents
        .flows("node-1", None, None)
        .await
        .expect("node-1 flows");
    let history = agents
        .flows("node-1", Some(since), None)
        .await
        .expect("node-1 flow history");
    for sport in ENCRYPTED_SPORTS {
        assert_eq!(
            (
                from_pod_packets(&live.flows, sport, ENCRYPTED_PORT),
                from_pod_packets(&history.flows, sport, ENCRYPTED_PORT)
            ),
            (3, 3),
            "node-1's packets of {sport} -> {ENCRYPTED_PORT} (live, history) asked right after \
             sending: {:#?}",
            history.flows
        );
    }
    eprintln!(
        "[{:?}] request-time counts exact: {} flows x 3 packets (live and history)",
        started.elapsed(),
        ENCRYPTED_SPORTS.len()
    );
    let c = &cluster;
    let denied_sent = std::sync::atomic::AtomicU64::new(0);
    let denied = &denied_sent;
    wait_async(
        "node-2 drops the denied flow",
        Duration::from_secs(30),
        || async {
            denied.fetch_add(
                send(c, "pod-1-1", "pod-2-1", DENIED_SPORT, DENIED_PORT, 1),
                std::sync::atomic::Ordering::Relaxed,
            );
            let flows = agents
                .flows("node-2", Some(since), None)
                .await
                .map_err(|e| e.to_string())?
                .flows;
            if flows.iter().any(|f| {
                f.l4.source_port() == DENIED_SPORT && f.wiremesh_verdict == "dropped-policy"
            }) {
                Ok(())
            } else {
                Err("no dropped-policy record yet".to_string())
            }
        },
    )
    .await;
    let encrypted: Vec<(u16, u16, &str)> = ENCRYPTED_SPORTS
        .iter()
        .map(|s| (*s, ENCRYPTED_PORT, "forwarded-encrypted"))
        .collect();
    wait_recorded(&agents, "node-1", since, &encrypted).await;

    eprintln!("[{:?}] restart", started.elapsed());
    // Restart node-1's agent (kill -9): what it recorded before must still be counted.
    let killed = kill_agent(&mut cluster, "node-1");
    wait_restarted(&cluster, "node-1", Role::Agent, killed);
    wait_recorded(&agents, "node-1", since, &encrypted).await;
    let window = format!("{}s", started.elapsed().as_secs() + 60);
    let (code, out, err) = run(&[
        "flows",
        "--kubeconfig",
        &kc,
        "--since",
        &window,
        "--node",
        "node-1",
        "--port",
        "7001",
        "-o",
        "jsonl",
    ]);
    assert_eq!(code, 0, "meshctl flows: {err}");
    let before_restart: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert_eq!(
        before_restart.len(),
        ENCRYPTED_SPORTS.len(),
        "node-1's history after its restart: {out}"
    );
    assert!(
        before_restart
            .iter()
            .all(|f| f["encryption"]["encrypted"] == true)
    );
    let (code, table, _) = run(&[
        "flows",
        "--kubeconfig",
        &kc,
        "--since",
        &window,
        "--verdict",
        "dropped-policy",
    ]);
    assert_eq!(code, 0);
    assert!(
        table
            .lines()
            .next()
            .unwrap_or_default()
            .contains("ENCRYPTED"),
        "{table}"
    );
    assert!(table.contains("DROPPED POLICY_DENIED"), "{table}");

    eprintln!("[{:?}] phase 2", started.elapsed());
    // Phase 2: remove node-3's tunnel (Permissive: its traffic goes in plaintext).
    remove_tunnels_to(&mut cluster, "node-3").await;
    let c = &cluster;
    eventually(
        "node-1 drops its tunnel to node-3",
        Duration::from_secs(30),
        || {
            let peers = wg_peers(c, "node-1")?;
            if peers.len() == 1 {
                Ok(())
            } else {
                Err(format!("peers {peers:?}"))
            }
        },
    )
    .await;
    for sport in PLAINTEXT_SPORTS {
        send(&cluster, "pod-1-1", "pod-3-1", sport, PLAINTEXT_PORT, 2);
    }
    let plaintext: Vec<(u16, u16, &str)> = PLAINTEXT_SPORTS
        .iter()
        .map(|s| (*s, PLAINTEXT_PORT, "forwarded-plain"))
        .collect();
    wait_recorded(&agents, "node-1", since, &plaintext).await;

    eprintln!("[{:?}] report", started.elapsed());
    // The report, with nothing but the kubeconfig.
    let out_dir = tempfile::tempdir().expect("tempdir");
    let dir = out_dir.path().to_str().expect("utf-8").to_string();
    let window = format!("{}s", started.elapsed().as_secs() + 5);
    let (code, out, err) = run(&[
        "report",
        "--kubeconfig",
        &kc,
        "--since",
        &window,
        "--out",
        &dir,
    ]);
    assert_eq!(code, 0, "meshctl report: {out}{err}");
    eprintln!("{out}");
    let json_path = out_dir.path().join("report.json");
    let bytes = std::fs::read(&json_path).expect("report.json");
    let report: Value = serde_json::from_slice(&bytes).expect("JSON");
    let s = &report["summary"];
    let expected = json!({
        "crossNodeFlows": ENCRYPTED_SPORTS.len() + PLAINTEXT_SPORTS.len(),
        "encryptedFlows": ENCRYPTED_SPORTS.len(),
        "plaintextFlows": PLAINTEXT_SPORTS.len(),
        "droppedFlows": 1,
    });
    for (k, v) in expected.as_object().unwrap() {
        assert_eq!(
            &s[k],
            v,
            "summary.{k}: {}",
            serde_json::to_string_pretty(&report).unwrap()
        );
    }
    let coverage =
        ENCRYPTED_SPORTS.len() as f64 / (ENCRYPTED_SPORTS.len() + PLAINTEXT_SPORTS.len()) as f64;
    let percent = format!("{:.2}%", coverage * 100.0);
    assert_eq!(s["coveragePercent"], percent.as_str());
    assert!(out.contains(&format!("coverage {percent}")), "{out}");
    let listed: Vec<(u64, String)> = report["plaintextFlowList"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["sourcePort"].as_u64().unwrap(),
                p["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        PLAINTEXT_SPORTS
            .iter()
            .map(|p| (u64::from(*p), "permissive-no-tunnel".to_string()))
            .collect::<Vec<_>>()
    );
    assert_eq!(report["droppedByReason"]["dropped-policy"]["flows"], 1);
    assert!(
        report["gaps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["kind"] == "node-unreachable" && g["node"] == "node-3"),
        "{}",
        report["gaps"]
    );
    assert_eq!(report["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(report["nodes"][0]["mode"], "Permissive");
    assert!(report["nodes"][0]["keyAgeSeconds"].is_u64());
    assert_eq!(report["controls"][0]["status"], "not-satisfied");

    eprintln!("[{:?}] metrics", started.elapsed());
    sent_to_node2 += denied_sent.load(std::sync::atomic::Ordering::Relaxed);
    check_metrics(&cluster, sent_to_node2).await;

    eprintln!("[{:?}] verify", started.elapsed());
    // Verify: accepted with the public key written beside it and with the one in the Secret;
    // one changed byte and a re-digested report are rejected.
    let pub_key = format!("{dir}/report.pub");
    let file = json_path.to_str().unwrap().to_string();
    let (code, out, _) = run(&["report", "verify", &file, "--key", &pub_key]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("OK:"), "{out}");
    let (code, out, err) = run(&["report", "verify", &file, "--kubeconfig", &kc]);
    assert_eq!(code, 0, "the key in the Secret: {out}{err}");
    let tampered_path = out_dir.path().join("report.json.tampered");
    let at = bytes
        .windows(16)
        .position(|w| w == b"\"encryptedFlows\"")
        .expect("the field")
        + 18;
    let mut tampered = bytes.clone();
    tampered[at] = if tampered[at] == b'9' { b'8' } else { b'9' };
    std::fs::write(&tampered_path, &tampered).unwrap();
    let envelope = format!("{dir}/report.dsse.json");
    let tp = tampered_path.to_str().unwrap();
    let verify_tampered = || {
        run(&[
            "report",
            "verify",
            tp,
            "--key",
            &pub_key,
            "--signature",
            &envelope,
        ])
    };
    let (code, out, _) = verify_tampered();
    assert_eq!(code, 1, "one changed byte: {out}");
    assert!(out.contains("FAILED") && out.contains("digest"), "{out}");
    let mut forged = report.clone();
    forged["summary"]["plaintextFlows"] = json!(0);
    forged["plaintextFlowList"] = json!([]);
    forged["digest"] = json!(meshctl::report::digest_of_value(&forged));
    std::fs::write(&tampered_path, serde_json::to_vec_pretty(&forged).unwrap()).unwrap();
    let (code, out, _) = verify_tampered();
    assert_eq!(code, 1, "re-digested without the key: {out}");
    assert!(out.contains("statement:"), "{out}");

    eprintln!("[{:?}] chromium", started.elapsed());
    // report.html in headless Chromium.
    render_in_chromium(&out_dir.path().join("report.html"), &percent);

    eprintln!("[{:?}] key scan", started.elapsed());
    // No key material anywhere.
    let secret: k8s_openapi::api::core::v1::Secret =
        kube::Api::namespaced(cluster.client().clone(), "kube-system")
            .get("wiremesh-report-signing")
            .await
            .expect("the signing Secret created on first use");
    let signing_pem = String::from_utf8(secret.data.unwrap()["ed25519.key"].0.clone()).unwrap();
    // The scanner looks for the key bytes in base64 (any alignment, also inside decoded base64)
    // and hex: the signing key's PKCS#8 document and its seed, every node's private key.
    let mut scanner = wiremesh_integration::keyscan::KeyScanner::new();
    let der = base64::engine::general_purpose::STANDARD
        .decode(
            signing_pem
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .expect("PEM body");
    scanner.add("report signing key (PKCS#8)", &der);
    scanner.add("report signing key (seed)", &der[16..48]);
    for node in ["node-1", "node-2", "node-3"] {
        let keys = wiremesh_keyexchange::Keystore::new(cluster.work_dir().join("state").join(node))
            .load()
            .unwrap_or_else(|e| panic!("{node}'s keystore: {e}"))
            .keys;
        scanner.add(format!("{node} private key"), &*keys.current.to_bytes());
    }
    let mut texts: Vec<(String, String)> = Vec::new();
    for name in [
        "report.json",
        "report.html",
        "report.dsse.json",
        "report.pub",
    ] {
        texts.push((
            name.into(),
            std::fs::read_to_string(out_dir.path().join(name)).unwrap(),
        ));
    }
    let (_, flows_json, _) = run(&[
        "flows",
        "--kubeconfig",
        &kc,
        "--since",
        &window,
        "-o",
        "json",
    ]);
    texts.push(("meshctl flows".into(), flows_json));
    for node in ["node-1", "node-2"] {
        texts.push((format!("{node} metrics"), metrics_of(&cluster, node)));
    }
    for entry in std::fs::read_dir(cluster.work_dir().join("logs")).expect("logs") {
        let path = entry.unwrap().path();
        texts.push((
            path.display().to_string(),
            String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned(),
        ));
    }
    let mut findings = Vec::new();
    for (name, text) in &texts {
        findings.extend(scanner.scan(name, text));
    }
    assert!(findings.is_empty(), "key material found: {findings:?}");
    eprintln!(
        "scanned {} texts for {} keys",
        scanner.scanned(),
        scanner.secrets()
    );

    // The Grafana dashboard queries only metrics the agents export, and the check can fail.
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/wiremesh-dashboard.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the dashboard"))
            .expect("JSON");
    for node in ["node-1", "node-2"] {
        let metrics = metrics_of(&cluster, node);
        let checked = dashboard_names_exported_metrics(&dashboard, &metrics)
            .unwrap_or_else(|e| panic!("{node}: {e}"));
        assert!(checked >= 20, "the dashboard queries {checked} metrics");
        eprintln!(
            "[{:?}] dashboard: {checked} metric names exported by {node}",
            started.elapsed()
        );
        for wrong in [
            // Not exported at all.
            "sum(rate(wiremesh_not_exported_total[5m]))",
            // A gauge queried with a counter's suffix.
            "sum(rate(wiremesh_flow_events_lost_total[5m]))",
        ] {
            let mut bad = dashboard.clone();
            bad["panels"][0]["targets"][0]["expr"] = json!(wrong);
            let error = dashboard_names_exported_metrics(&bad, &metrics)
                .expect_err("a query naming a metric the agent does not export");
            eprintln!("rejected as expected: {error}");
        }
    }
}

/// The value of `series` (name with its labels as exposed, e.g. `wiremesh_x{a="b"}`) in the
/// OpenMetrics text `metrics`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// node-1's and node-2's metrics: tunnel bytes (node-2 received at least `sent_to_node2`
/// bytes of IP packets from node-1), coverage of the flows each recorded, own rotation state,
/// the oldest handshake.
async fn check_metrics(cluster: &wiremesh_integration::VirtualCluster, sent_to_node2: u64) {
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> =
        kube::Api::all(cluster.client().clone());
    // (node, encrypted, plaintext, dropped) flows within the coverage window.
    let expected = [
        // The denied flow left node-1 encrypted; node-2 dropped it.
        (
            "node-1",
            ENCRYPTED_SPORTS.len() + 1,
            PLAINTEXT_SPORTS.len(),
            0,
        ),
        ("node-2", ENCRYPTED_SPORTS.len(), 0, 1),
    ];
    for (node, encrypted, plaintext, dropped) in expected {
        let ratio = encrypted as f64 / (encrypted + plaintext) as f64;
        let what = format!(
            "{node}'s coverage metrics: {encrypted} encrypted, {plaintext} plaintext, {dropped} \
             dropped, ratio {ratio:.4}"
        );
        let text = eventually(&what, Duration::from_secs(20), || {
            let text = metrics_of(cluster, node);
            let got = (
                sample(&text, "wiremesh_flow_coverage_flows{class=\"encrypted\"}"),
                sample(&text, "wiremesh_flow_coverage_flows{class=\"plaintext\"}"),
                sample(&text, "wiremesh_flow_coverage_flows{class=\"dropped\"}"),
                sample(&text, "wiremesh_flow_coverage_ratio"),
            );
            let want = (
                Some(encrypted as f64),
                Some(plaintext as f64),
                Some(dropped as f64),
                Some(ratio),
            );
            let close = got.3.is_some_and(|r| (r - ratio).abs() < 1e-9);
            if (got.0, got.1, got.2) == (want.0, want.1, want.2) && close {
                Ok(text)
            } else {
                Err(format!("{got:?}"))
            }
        })
        .await;
        eprintln!("{what}: ok");
        assert_eq!(
            sample(&text, "wiremesh_rotation_phase{phase=\"Idle\"}"),
            Some(1.0),
            "{node} is not in a rotation"
        );
        for phase in ["Preparing", "Switching", "Retiring", "Complete", "Failed"] {
            let series = format!("wiremesh_rotation_phase{{phase=\"{phase}\"}}");
            assert_eq!(sample(&text, &series), Some(0.0), "{series}");
        }
        assert_eq!(
            sample(&text, "wiremesh_rotation_step{step=\"none\"}"),
            Some(1.0)
        );
        let published: f64 = nodes
            .get(node)
            .await
            .expect("the Node")
            .metadata
            .annotations
            .unwrap_or_default()
            .get("wiremesh.io/key-generation")
            .and_then(|g| g.parse().ok())
            .expect("a published key generation");
        assert_eq!(sample(&text, "wiremesh_key_generation"), Some(published));
        let oldest = sample(&text, "wiremesh_peer_oldest_handshake_timestamp_seconds")
            .expect("a handshake with a peer");
        let age = meshctl::report::unix(std::time::SystemTime::now()) as f64 - oldest;
        assert!(
            (0.0..=180.0).contains(&age),
            "{node}'s oldest handshake is {age} s old"
        );
    }
    // node-2 was not restarted: it counted everything node-1 sent it (IP packets; WireGuard
    // adds its own header and padding, handshakes and keepalives).
    let text = metrics_of(cluster, "node-2");
    let total = sample(&text, "wiremesh_tunnel_receive_bytes_total").expect("tunnel bytes");
    let from_node1 = sample(&text, "wiremesh_peer_receive_bytes_total{peer=\"node-1\"}")
        .expect("per-peer bytes (--per-peer-metrics)");
    eprintln!(
        "node-2 received {total} tunnel bytes, {from_node1} from node-1; node-1 sent {sent_to_node2} \
         bytes of IP packets"
    );
    assert!(from_node1 >= sent_to_node2 as f64, "{text}");
    assert!(total >= from_node1, "{text}");
    assert!(
        sample(&text, "wiremesh_peer_transmit_bytes_total{peer=\"node-1\"}").is_some(),
        "{text}"
    );
}

/// `node`'s `/metrics`, read with curl (the body comes chunked).
fn metrics_of(cluster: &wiremesh_integration::VirtualCluster, node: &str) -> String {
    let ip = cluster.node(node).expect("node").network.underlay_ip;
    let url = format!("http://{ip}:{}/metrics", meshctl::demo::AGENT_HTTP_PORT);
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "10", &url])
        .output()
        .expect("curl runs (Debian package curl)");
    assert!(out.status.success(), "curl {url}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// Every `wiremesh_*` name in a query of `dashboard` (deploy/grafana/wiremesh-dashboard.json) is
/// a series `metrics` (OpenMetrics text) can hold: a sample it has, or the sample name of a
/// family it declares (`# TYPE`): `NAME_total` of a counter, `NAME_bucket|_sum|_count` of a
/// histogram, `NAME` of a gauge. A family without a series is not exposed at all, so a panel
/// of an opt-in metric (per peer) needs agents with the option. Returns how many names were
/// checked, or the names that are not exported.
fn dashboard_names_exported_metrics(dashboard: &Value, metrics: &str) -> Result<usize, String> {
    let mut exported: std::collections::BTreeSet<String> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    for l in metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let mut parts = l.split_whitespace();
        let (Some(family), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        exported.extend(suffixes.iter().map(|s| format!("{family}{s}")));
    }
    let mut names = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().ok_or("no panels")? {
        for target in panel["targets"]
            .as_array()
            .ok_or("a panel without targets")?
        {
            let expr = target["expr"].as_str().ok_or("a target without expr")?;
            let mut rest = expr;
            while let Some(at) = rest.find("wiremesh_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                names.insert(name);
            }
        }
    }
    let missing: Vec<&String> = names.iter().filter(|n| !exported.contains(*n)).collect();
    if missing.is_empty() {
        Ok(names.len())
    } else {
        Err(format!(
            "the dashboard queries {missing:?}, which the agent does not export"
        ))
    }
}

/// Renders `page` with Debian's chromium (headless): the screenshot is not blank and the page
/// text holds `coverage`. The screenshot is kept in `target/test-artifacts/`.
fn render_in_chromium(page: &Path, coverage: &str) {
    let Some(chromium) = ["chromium", "chromium-browser"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium missing (make deps installs it)"
        );
        eprintln!("SKIPPED: no chromium (Debian package chromium; make deps installs it)");
        return;
    };
    let artifacts = workspace_binary("meshctl", "WIREMESH_MESHCTL")
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("compliance-report.png");
    let _ = std::fs::remove_file(&shot);
    let profile = tempfile::tempdir().unwrap();
    let url = format!("file://{}", page.display());
    let common = [
        "--headless".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--no-first-run".into(),
        format!("--user-data-dir={}", profile.path().display()),
    ];
    let out = Command::new(chromium)
        .args(&common)
        .args([
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,2000".into(),
            url.clone(),
        ])
        .output()
        .expect("run chromium");
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    // A blank page compresses to almost nothing; text, tables and the graph do not.
    assert!(
        png.len() > 20_000,
        "the screenshot looks blank: {} bytes",
        png.len()
    );
    let dom = Command::new(chromium)
        .args(&common)
        .args(["--dump-dom".to_string(), url])
        .output()
        .expect("run chromium");
    let text = String::from_utf8_lossy(&dom.stdout);
    assert!(
        text.contains(&format!("Encryption coverage {coverage}")),
        "page text: {}",
        &text[..text.len().min(2000)]
    );
    eprintln!("report.html rendered: {}", shot.display());
}
