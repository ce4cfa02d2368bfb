//! Issue 17, "Hostile input": no private key, preshared key or signing key leaks. A demo-like run
//! of the virtual cluster (3 nodes, pods on each): traffic and a rotation of every node under
//! traffic (`meshctl demo rotate`'s code), a preshared key set by hand on one device (which the
//! agent's drift correction removes), `meshctl status` and `meshctl report`. Then every API
//! object of the apiserver (every listable resource of every group, all namespaces: Nodes,
//! MeshNodes, KeyRotations, Events, Leases, ConfigMaps, Secrets ...), every log line of the
//! agents, devices and supervisors, every node's `/metrics` and the report's files are scanned
//! for the bytes of every node's private keys before and after the rotation, of the preshared
//! key and of the report signing key, in base64 (any alignment, standard and URL-safe, also
//! inside decoded base64 such as a Secret's data) and hex (see `wiremesh_integration::keyscan`,
//! whose unit tests show the scan finds planted keys).
//!
//! Excluded, by decision: the signing key's own Secret (`kube-system/wiremesh-report-signing`,
//! where `meshctl report` keeps it; access to it is what signing means) and the nodes' keystore
//! files (where the private keys live, root-only on the node). Nothing else is excluded.

#[path = "mesh_support/support.rs"]
mod support;

use std::{path::Path, process::Command, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use kube::{
    Api,
    api::{DynamicObject, ListParams},
    discovery::{Discovery, verbs},
};
use meshctl::demo;
use support::*;
use wiremesh_integration::{VirtualCluster, keyscan::KeyScanner};
use wiremesh_keyexchange::Keystore;

/// The Secret that holds the report signing key (namespace, name).
const SIGNING_SECRET: (&str, &str) = ("kube-system", "wiremesh-report-signing");

fn meshctl() -> std::path::PathBuf {
    workspace_binary("meshctl", "WIREMESH_MESHCTL")
}

/// Every key of `node`'s keystore (current, and next/previous while a rotation holds them).
fn add_keystore(
    scanner: &mut KeyScanner,
    cluster: &VirtualCluster,
    node: &str,
    when: &str,
) -> String {
    let keys = Keystore::new(cluster.work_dir().join("state").join(node))
        .load()
        .expect("keystore")
        .keys;
    scanner.add(
        format!("{node} private key ({when})"),
        &*keys.current.to_bytes(),
    );
    for (slot, key) in [("next", &keys.next), ("previous", &keys.previous)] {
        if let Some(key) = key {
            scanner.add(
                format!("{node} {slot} private key ({when})"),
                &*key.to_bytes(),
            );
        }
    }
    keys.current.public_key().to_base64()
}

fn run(args: &[&str]) -> String {
    let out = Command::new(meshctl())
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run meshctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // `meshctl status` exits 1 while the mesh is not converged: its output is scanned anyway.
    assert!(
        out.status.success() || args[0] == "status",
        "meshctl {args:?}: {text}"
    );
    text
}

/// Every object of every listable resource, as JSON text named `kind namespace/name`.
async fn api_objects(client: &kube::Client) -> Vec<(String, String)> {
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("API discovery");
    let mut out = Vec::new();
    for group in discovery.groups() {
        for (resource, caps) in group.recommended_resources() {
            if !caps.supports_operation(verbs::LIST) {
                continue;
            }
            // Cluster-scoped and namespaced alike: every object of every namespace.
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
            let list = match api.list(&ListParams::default()).await {
                Ok(list) => list,
                // Some aggregated or virtual resources list nothing for an admin here.
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 405 => continue,
                Err(e) => panic!("list {}: {e}", resource.plural),
            };
            for object in list.items {
                let ns = object.metadata.namespace.clone().unwrap_or_default();
                let name = object.metadata.name.clone().unwrap_or_default();
                if resource.kind == "Secret" && (ns.as_str(), name.as_str()) == SIGNING_SECRET {
                    continue;
                }
                let text = serde_json::to_string(&object).expect("JSON");
                out.push((format!("{} {ns}/{name}", resource.kind), text));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_material_in_api_objects_logs_metrics_or_reports() {
    let Some(cluster) =
        start_mesh_or_skip_with_args(Shape::new(3, 1), &["--resync-interval-secs", "5"]).await
    else {
        return;
    };
    let started = std::time::Instant::now();
    let nodes: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    let mut scanner = KeyScanner::new();
    let mut old_public = Vec::new();
    for node in &nodes {
        old_public.push(add_keystore(
            &mut scanner,
            &cluster,
            node,
            "before the rotation",
        ));
    }

    // Traffic and a rotation of every node under traffic, as `make demo` runs them.
    assert_reachable(&cluster, "pod-1-1", "pod-2-1", b"key scan");
    let clean = demo::rotate_under_traffic(&cluster.description())
        .await
        .expect("demo rotate");
    // Loss during the rotation is `rotation_traffic`'s business; here the rotation only has to
    // happen (every keystore holds a new key, waited for below).
    eprintln!("rotation under traffic clean: {clean}");
    for (node, old) in nodes.iter().zip(&old_public) {
        let c = &cluster;
        wait_async(
            &format!("{node}'s keystore holds its new key"),
            Duration::from_secs(60),
            || async move {
                let keys = Keystore::new(c.work_dir().join("state").join(node))
                    .load()
                    .map_err(|e| e.to_string())?
                    .keys;
                if keys.current.public_key().to_base64() != *old {
                    Ok(())
                } else {
                    Err("still the old key".to_string())
                }
            },
        )
        .await;
        add_keystore(&mut scanner, &cluster, node, "after the rotation");
    }
    eprintln!("[{:?}] rotated", started.elapsed());

    // A preshared key set by hand on node-1's device; the agent's drift correction removes it.
    let mut psk = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut psk))
        .expect("/dev/urandom");
    scanner.add("preshared key set on node-1", &psk);
    let psk_file = cluster.work_dir().join("key-scan.psk");
    std::fs::write(&psk_file, format!("{}\n", STANDARD.encode(psk))).expect("psk file");
    // After the rotation the node's traffic may be on either slot's device (a or b).
    let base = ifname(&cluster, "node-1");
    let (ifname, peer) = [base.clone(), format!("{base}b")]
        .into_iter()
        .find_map(|dev| {
            let out = cluster
                .exec_in_node("node-1", ["wg", "show", dev.as_str(), "peers"])
                .ok()?;
            let first = String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()?
                .to_string();
            Some((dev, first))
        })
        .expect("a device of node-1 with a peer");
    let out = cluster
        .exec_in_node(
            "node-1",
            [
                "wg",
                "set",
                ifname.as_str(),
                "peer",
                peer.as_str(),
                "preshared-key",
                psk_file.to_str().expect("utf-8"),
            ],
        )
        .expect("wg set");
    assert!(out.status.success(), "wg set: {out:?}");
    std::fs::remove_file(&psk_file).expect("remove the psk file");
    let c = &cluster;
    let (ifn, p) = (&ifname, &peer);
    eventually(
        "node-1's agent removes the hand-set preshared key",
        Duration::from_secs(60),
        || {
            let out = c
                .exec_in_node("node-1", ["wg", "show", ifn.as_str(), "preshared-keys"])
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let line = text
                .lines()
                .find(|l| l.starts_with(p.as_str()))
                .ok_or_else(|| format!("no line for peer {p}"))?;
            if line.ends_with("(none)") {
                Ok(())
            } else {
                Err("preshared key still set".to_string())
            }
        },
    )
    .await;
    eprintln!(
        "[{:?}] preshared key removed by the agent",
        started.elapsed()
    );

    // meshctl status and report (which creates the signing key on first use).
    let kubeconfig = cluster.kubeconfig_path().expect("kubeconfig").to_path_buf();
    let kc = kubeconfig.to_str().expect("utf-8");
    let mut texts: Vec<(String, String)> = Vec::new();
    texts.push((
        "meshctl status".into(),
        run(&["status", "--kubeconfig", kc]),
    ));
    let out_dir = tempfile::tempdir().expect("tempdir");
    let dir = out_dir.path().to_str().expect("utf-8");
    let window = format!("{}s", started.elapsed().as_secs() + 60);
    texts.push((
        "meshctl report".into(),
        run(&[
            "report",
            "--kubeconfig",
            kc,
            "--since",
            &window,
            "--out",
            dir,
        ]),
    ));
    for entry in std::fs::read_dir(out_dir.path()).expect("report dir") {
        let path = entry.expect("entry").path();
        texts.push((
            path.display().to_string(),
            String::from_utf8_lossy(&std::fs::read(&path).expect("read")).into_owned(),
        ));
    }
    texts.push((
        "meshctl flows".into(),
        run(&[
            "flows",
            "--kubeconfig",
            kc,
            "--since",
            &window,
            "-o",
            "json",
        ]),
    ));
    let secret: k8s_openapi::api::core::v1::Secret =
        Api::namespaced(cluster.client().clone(), SIGNING_SECRET.0)
            .get(SIGNING_SECRET.1)
            .await
            .expect("the signing Secret");
    let pem = String::from_utf8(
        secret.data.expect("data")[meshctl::report::sign::SECRET_PRIVATE]
            .0
            .clone(),
    )
    .expect("PEM");
    let der = STANDARD
        .decode(
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .expect("PEM body");
    scanner.add("report signing key (PKCS#8)", &der);
    // The Ed25519 seed follows the 16-byte PKCS#8 header (v1 and v2; v2 ends with the public key).
    scanner.add("report signing key (seed)", &der[16..48]);

    for node in &nodes {
        texts.push((
            format!("{node} /metrics"),
            agent_metrics(&cluster, node).await.expect("metrics"),
        ));
    }
    let logs = cluster.work_dir().join("logs");
    let mut log_lines = 0;
    for entry in std::fs::read_dir(&logs).expect("logs") {
        let path = entry.expect("entry").path();
        let text = String::from_utf8_lossy(&std::fs::read(&path).expect("read log")).into_owned();
        log_lines += text.lines().count();
        texts.push((path.display().to_string(), text));
    }
    let objects = api_objects(cluster.client()).await;
    let kinds: std::collections::BTreeSet<String> = objects
        .iter()
        .map(|(name, _)| name.split(' ').next().unwrap_or_default().to_string())
        .collect();
    for kind in [
        "Node",
        "MeshNode",
        "KeyRotation",
        "MeshEncryption",
        "Lease",
        "Pod",
    ] {
        assert!(kinds.contains(kind), "no {kind} objects listed: {kinds:?}");
    }
    let object_count = objects.len();
    let count = |kind: &str| {
        objects
            .iter()
            .filter(|(n, _)| n.starts_with(&format!("{kind} ")))
            .count()
    };
    eprintln!(
        "API objects: {} Events, {} Secrets (the signing key's own left out), {} MeshNodes",
        count("Event"),
        count("Secret"),
        count("MeshNode")
    );
    texts.extend(objects);

    let mut findings = Vec::new();
    for (name, text) in &texts {
        findings.extend(scanner.scan(name, text));
    }
    eprintln!(
        "[{:?}] scanned {} texts ({} API objects of {} kinds, {} log lines in {}, {} metrics scrapes, the report) for {} secrets",
        started.elapsed(),
        scanner.scanned(),
        object_count,
        kinds.len(),
        log_lines,
        Path::new(&logs).display(),
        nodes.len(),
        scanner.secrets()
    );
    assert!(
        findings.is_empty(),
        "key material found:\n{}",
        findings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
