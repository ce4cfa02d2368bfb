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
) {
    let p = cluster.pod(from).expect("pod");
    let (src, dst) = (p.network.ip, cluster.pod(to).expect("pod").network.ip);
    wiremesh_integration::netns::within(&p.network.netns, move || -> std::io::Result<()> {
        let s = UdpSocket::bind((src, sport))?;
        for i in 0..count {
            s.send_to(format!("compliance {i}").as_bytes(), (dst, dport))?;
        }
        Ok(())
    })
    .expect("enter pod namespace")
    .unwrap_or_else(|e| panic!("send {src}:{sport} -> {dst}:{dport}: {e}"));
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
    let Some(mut cluster) = start_mesh_or_skip(Shape::new(3, 1)).await else {
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
    for sport in ENCRYPTED_SPORTS {
        send(&cluster, "pod-1-1", "pod-2-1", sport, ENCRYPTED_PORT, 3);
    }
    let c = &cluster;
    wait_async(
        "node-2 drops the denied flow",
        Duration::from_secs(30),
        || async {
            send(c, "pod-1-1", "pod-2-1", DENIED_SPORT, DENIED_PORT, 1);
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

    // The Grafana dashboard queries only metrics this agent exports.
    let metrics = metrics_of(&cluster, "node-1");
    let checked = dashboard_names_exported_metrics(&metrics);
    eprintln!(
        "[{:?}] dashboard: {checked} metric names checked",
        started.elapsed()
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

/// Every `wiremesh_*` name in a query of deploy/grafana/wiremesh-dashboard.json is a sample of
/// `metrics` (OpenMetrics text) or the sample of a family it declares (`# TYPE` with the
/// `_total`, `_bucket`, `_sum`, `_count` suffix removed). Returns how many names were checked.
fn dashboard_names_exported_metrics(metrics: &str) -> usize {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/wiremesh-dashboard.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the dashboard"))
            .expect("JSON");
    let families: Vec<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let samples: Vec<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let mut names = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
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
    assert!(names.len() >= 10, "the dashboard queries {names:?}");
    for name in &names {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            samples.contains(&name.as_str()) || families.contains(&family),
            "the dashboard queries {name}, which the agent does not export; it exports {families:?}"
        );
    }
    names.len()
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
