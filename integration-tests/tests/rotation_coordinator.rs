//! The rotation coordinator against a real kube-apiserver (testenv on loopback, no root): two
//! candidates, one holds the Lease; `meshctl rotate` creates a KeyRotation; the leader moves it
//! through its phases as the nodes' marks advance (the marks are written here, standing in for
//! the agents); the leader's task is killed mid-rotation (no Lease release, as a SIGKILL) and the
//! other candidate takes over and continues from the recorded status to Complete, with Events.
//! A second rotation whose node never prepares fails after its phase timeout naming that node,
//! and `kubectl get keyrotations`' columns (the API's Table) show phase, progress and age.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node, events::v1::Event};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};
use mesh_agent::{
    coordinator::{Coordinator, CoordinatorMetrics, CoordinatorSettings},
    drain,
};
use meshctl::rotate::{self, RotateOptions};
use prometheus_client::registry::Registry;
use serde_json::json;
use wiremesh_crds::{
    CONDITION_FAILED, KeyRotation, RotationPhase, find_condition, is_condition_true,
};
use wiremesh_integration::{
    Testenv, TestenvOptions, objects,
    testenv::{UserCredential, client_from_kubeconfig},
    wait,
};
use wiremesh_keyexchange::{ANNOTATION_PUBLIC_KEY, ANNOTATION_ROTATION, PrivateKey};

const NAMESPACE: &str = "wiremesh-system";
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const SERVICE_ACCOUNT: &str = "wiremesh-agent";

fn settings(identity: &str, lease: &str) -> CoordinatorSettings {
    let mut s = CoordinatorSettings::new(identity, NAMESPACE);
    s.lease_name = lease.to_string();
    s.lease_duration = Duration::from_secs(4);
    s.lease_grace = Duration::from_secs(2);
    s.interval = Duration::from_millis(200);
    s
}

struct Candidate {
    task: tokio::task::JoinHandle<()>,
    trigger: drain::Trigger,
}

fn start(client: &Client, identity: &str, lease: &str) -> Candidate {
    let (trigger, drain) = drain::channel();
    let coordinator = Coordinator::new(
        settings(identity, lease),
        client.clone(),
        CoordinatorMetrics::new(&mut Registry::default()),
    );
    Candidate {
        task: tokio::spawn(coordinator.run(drain)),
        trigger,
    }
}

async fn holder(client: &Client, lease: &str) -> Result<String, String> {
    let lease = Api::<Lease>::namespaced(client.clone(), NAMESPACE)
        .get(lease)
        .await
        .map_err(|e| e.to_string())?;
    lease
        .spec
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
        .ok_or_else(|| "no holder".to_string())
}

async fn mark(client: &Client, node: &str, value: &str) {
    let body = json!({"metadata": {"annotations": {ANNOTATION_ROTATION: value}}});
    Api::<Node>::all(client.clone())
        .patch(node, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .unwrap_or_else(|e| panic!("mark {node} {value}: {e}"));
}

async fn wait_phase(
    client: &Client,
    name: &str,
    phase: RotationPhase,
    timeout: Duration,
) -> KeyRotation {
    let api = Api::<KeyRotation>::all(client.clone());
    wait::until(
        &format!("{name} in {phase}"),
        timeout,
        Duration::from_millis(100),
        || {
            let api = api.clone();
            async move {
                let r = api.get(name).await.map_err(|e| e.to_string())?;
                let now = rotate::phase(&r);
                if now == phase {
                    Ok(r)
                } else {
                    Err(format!("{now}: {:?}", r.status))
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn rotation_id(r: &KeyRotation) -> String {
    r.status
        .as_ref()
        .and_then(|s| s.rotation_id.clone())
        .expect("rotationId recorded")
}

/// Waits for an Event on the KeyRotation `name` whose note starts with `note`.
async fn wait_event(client: &Client, name: &str, note: &str) {
    wait::until(
        &format!("Event {note:?} on {name}"),
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let api = Api::<Event>::all(client.clone());
            async move {
                let list = api
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let notes: Vec<String> = list
                    .items
                    .into_iter()
                    .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
                    .filter_map(|e| e.note)
                    .collect();
                if notes.iter().any(|n| n.starts_with(note)) {
                    Ok(())
                } else {
                    Err(format!("{notes:?}"))
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// `kubectl get keyrotations` as the API server renders it (the Table the printer columns make).
async fn table(client: &Client) -> serde_json::Value {
    let request = http::Request::get("/apis/wiremesh.io/v1alpha1/keyrotations")
        .header(
            "Accept",
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        )
        .body(Vec::new())
        .expect("request");
    let text = client.request_text(request).await.expect("table");
    serde_json::from_str(&text).expect("table json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_failover_mid_rotation_and_phase_timeout() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("mesh_agent=info,kube_lease_manager=info")
        .with_test_writer()
        .try_init();
    let dir = std::env::temp_dir().join(format!("wm-rotation-coord-{}", std::process::id()));
    let nodes = NODES.iter().map(|n| n.to_string()).collect();
    let opts = TestenvOptions::new(Ipv4Addr::LOCALHOST, &dir, nodes);
    let env = tokio::task::spawn_blocking(move || Testenv::start(&opts))
        .await
        .expect("join")
        .expect("testenv starts");
    let admin = env.admin_client().await.expect("admin client");
    meshctl::demo::install_crds(&admin).await.expect("CRDs");
    objects::ensure_namespace(&admin, NAMESPACE)
        .await
        .expect("namespace");
    for (i, name) in NODES.iter().enumerate() {
        let octet = u8::try_from(i + 1).expect("small");
        objects::create_node(
            &admin,
            name,
            format!("10.244.{octet}.0/24").parse().expect("cidr"),
            Ipv4Addr::new(10, 213, 0, octet),
        )
        .await
        .expect("node");
        let key = PrivateKey::generate()
            .expect("key")
            .public_key()
            .to_base64();
        let body = json!({"metadata": {
            "labels": {"pool": if *name == "n3" { "edge" } else { "core" }},
            "annotations": {ANNOTATION_PUBLIC_KEY: key},
        }});
        Api::<Node>::all(admin.clone())
            .patch(name, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .expect("publish key");
    }

    // Node credentials cannot hold a shared Lease (NodeRestriction: only the node's own Lease in
    // kube-node-lease); the coordinator uses the agent pod's ServiceAccount, with only the RBAC
    // the DaemonSet ships.
    let node_kubeconfig = dir.join("n1.kubeconfig");
    env.write_node_kubeconfig("n1", &node_kubeconfig)
        .expect("node kubeconfig");
    let as_node = client_from_kubeconfig(&node_kubeconfig)
        .await
        .expect("node client");
    let refused = Api::<Lease>::namespaced(as_node, NAMESPACE)
        .create(
            &Default::default(),
            &serde_json::from_value(json!({"metadata": {"name": "wm-node-lease-probe"}}))
                .expect("lease"),
        )
        .await
        .expect_err("a node may not create a Lease outside kube-node-lease");
    assert!(
        matches!(&refused, kube::Error::Api(s) if s.code == 403),
        "{refused}"
    );
    objects::install_coordinator_rbac(&admin, NAMESPACE, SERVICE_ACCOUNT)
        .await
        .expect("coordinator RBAC");
    let token = objects::service_account_token(&admin, NAMESPACE, SERVICE_ACCOUNT)
        .await
        .expect("token");
    let sa_kubeconfig = dir.join("coordinator.kubeconfig");
    let user = UserCredential {
        user: format!("system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"),
        groups: Vec::new(),
        token,
    };
    env.credentials()
        .write_kubeconfig("coordinator", &user, &sa_kubeconfig)
        .expect("service account kubeconfig");
    let lease = format!("wm-coord-{}", std::process::id());
    let mut candidates = Vec::new();
    for node in ["n1", "n2"] {
        // Each candidate has its own client (connection), as two agents would.
        let client = client_from_kubeconfig(&sa_kubeconfig)
            .await
            .expect("service account client");
        candidates.push((node, start(&client, node, &lease)));
    }
    let first = wait::until(
        "a coordinator to hold the Lease",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || holder(&admin, &lease),
    )
    .await
    .expect("leader elected");
    assert!(first == "n1" || first == "n2", "holder {first}");

    // meshctl rotate: every node.
    let created = rotate::create(
        &admin,
        &RotateOptions {
            reason: "coordinator test".into(),
            phase_timeout: Some("60s".into()),
            ..RotateOptions::default()
        },
    )
    .await
    .expect("create rotation");
    let name = kube::ResourceExt::name_any(&created);
    assert!(name.starts_with(rotate::GENERATE_NAME), "{name}");
    let r = wait_phase(
        &admin,
        &name,
        RotationPhase::Preparing,
        Duration::from_secs(30),
    )
    .await;
    let status = r.status.clone().expect("status");
    assert_eq!(status.participants, NODES);
    assert_eq!(status.selected_nodes, NODES);
    assert_eq!(status.progress.as_deref(), Some("0/3"));
    let id = rotation_id(&r);
    assert!(id.starts_with(&format!("{name}.")), "{id}");

    for node in NODES {
        mark(&admin, node, &format!("{id}=prepared")).await;
    }
    wait_phase(
        &admin,
        &name,
        RotationPhase::Switching,
        Duration::from_secs(30),
    )
    .await;

    // The Event of that phase change is recorded after the status write; let it land before the
    // kill (a coordinator killed between the two loses that Event, not the phase).
    wait_event(&admin, &name, "Preparing -> Switching").await;

    // Kill the leader's task: no release, its Lease must expire first.
    let killed_at = Instant::now();
    let index = candidates
        .iter()
        .position(|(n, _)| *n == first)
        .expect("leader is a candidate");
    let (_, leader) = candidates.remove(index);
    leader.task.abort();
    let _ = leader.task.await;
    for node in NODES {
        mark(&admin, node, &format!("{id}=switched")).await;
    }
    let r = wait_phase(
        &admin,
        &name,
        RotationPhase::Retiring,
        Duration::from_secs(30),
    )
    .await;
    let takeover = killed_at.elapsed();
    let second = holder(&admin, &lease).await.expect("holder");
    assert_ne!(second, first, "the surviving candidate took the Lease");
    assert_eq!(rotation_id(&r), id, "the plan survived the takeover");
    println!("takeover after the leader was killed: {takeover:?} (lease 4 s)");

    for node in NODES {
        mark(&admin, node, &format!("{id}=retired")).await;
    }
    let r = wait_phase(
        &admin,
        &name,
        RotationPhase::Complete,
        Duration::from_secs(30),
    )
    .await;
    let status = r.status.expect("status");
    assert_eq!(status.progress.as_deref(), Some("3/3"));
    assert!(is_condition_true(&status.conditions, "Complete"));
    assert!(status.completion_time.is_some());

    // Events on the rotation: every phase change, and the completion.
    for note in [
        "Pending -> Preparing",
        "Switching -> Retiring",
        "3 of 3 participants retired",
    ] {
        wait_event(&admin, &name, note).await;
    }

    // A second rotation of the edge pool whose node never prepares: fails after the timeout
    // naming it; the printer columns show it.
    let second_rotation = rotate::create(
        &admin,
        &RotateOptions {
            nodes: Some("pool=edge".into()),
            phase_timeout: Some("10s".into()),
            ..RotateOptions::default()
        },
    )
    .await
    .expect("create");
    let name2 = kube::ResourceExt::name_any(&second_rotation);
    let r = wait_phase(
        &admin,
        &name2,
        RotationPhase::Preparing,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(r.status.as_ref().expect("status").selected_nodes, ["n3"]);
    let id2 = rotation_id(&r);
    mark(&admin, "n1", &format!("{id2}=prepared")).await;
    mark(&admin, "n2", &format!("{id2}=prepared")).await;
    let failed = wait_phase(
        &admin,
        &name2,
        RotationPhase::Failed,
        Duration::from_secs(40),
    )
    .await;
    let status = failed.status.clone().expect("status");
    assert_eq!(status.failed_nodes, ["n3"]);
    assert_eq!(status.failed_during, Some(RotationPhase::Preparing));
    let condition = find_condition(&status.conditions, CONDITION_FAILED).expect("Failed");
    assert_eq!(condition.reason, "PhaseTimeout");
    assert!(
        condition.message.contains("n3") && condition.message.contains("old keys stay"),
        "{}",
        condition.message
    );
    let line = rotate::progress_line(&failed, Duration::from_secs(10));
    assert!(
        line.contains("Failed  2/3 nodes") && line.contains("PhaseTimeout"),
        "{line}"
    );

    let table = table(&admin).await;
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        ["Name", "Phase", "Done", "Reason", "Failed", "Age"]
    );
    let rows: Vec<Vec<String>> = table["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            r["cells"]
                .as_array()
                .expect("cells")
                .iter()
                .map(|c| match c {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .collect();
    println!("kubectl get keyrotations -o wide (API table): {rows:?}");
    assert!(
        rows.iter()
            .any(|r| r[0] == name && r[1] == "Complete" && r[2] == "3/3"),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .any(|r| r[0] == name2 && r[1] == "Failed" && r[2] == "2/3" && r[4] == "[\"n3\"]"),
        "{rows:?}"
    );

    // The surviving candidate releases the Lease on drain.
    let (_, survivor) = candidates.pop().expect("one candidate left");
    survivor.trigger.start();
    tokio::time::timeout(Duration::from_secs(10), survivor.task)
        .await
        .expect("coordinator drains in time")
        .expect("coordinator task");
    assert!(
        holder(&admin, &lease).await.is_err(),
        "the Lease is released on drain"
    );
    tokio::task::spawn_blocking(move || env.stop())
        .await
        .expect("join")
        .expect("testenv stops");
    std::fs::remove_dir_all(&dir).expect("remove test dir");
}
