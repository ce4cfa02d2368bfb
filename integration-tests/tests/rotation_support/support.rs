//! Shared by the rotation tests: a testenv with Nodes that have published keys, the CRDs, the
//! coordinator's ServiceAccount with the RBAC the DaemonSet ships, coordinator candidates, and
//! waits on KeyRotation phases, Events and the Lease.
#![allow(dead_code, reason = "each test binary uses a part of the helpers")]

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node, events::v1::Event};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use mesh_agent::{
    coordinator::{Coordinator, CoordinatorMetrics, CoordinatorSettings},
    drain,
};
use meshctl::rotate;
use prometheus_client::registry::Registry;
use serde_json::json;
use wiremesh_crds::{KeyRotation, RotationPhase};
use wiremesh_integration::{
    Testenv, TestenvOptions, objects,
    testenv::{UserCredential, client_from_kubeconfig},
    wait,
};
use wiremesh_keyexchange::{ANNOTATION_PUBLIC_KEY, ANNOTATION_ROTATION, PrivateKey};

pub const NAMESPACE: &str = "wiremesh-system";
pub const NODES: [&str; 3] = ["n1", "n2", "n3"];
pub const SERVICE_ACCOUNT: &str = "wiremesh-agent";

pub fn settings(identity: &str, lease: &str) -> CoordinatorSettings {
    let mut s = CoordinatorSettings::new(identity, NAMESPACE);
    s.lease_name = lease.to_string();
    s.lease_duration = Duration::from_secs(4);
    s.lease_grace = Duration::from_secs(2);
    s.interval = Duration::from_millis(200);
    s
}

pub struct Candidate {
    pub task: tokio::task::JoinHandle<()>,
    pub trigger: drain::Trigger,
}

pub fn start(client: &Client, identity: &str, lease: &str) -> Candidate {
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

pub async fn holder(client: &Client, lease: &str) -> Result<String, String> {
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

pub async fn mark(client: &Client, node: &str, value: &str) {
    let body = json!({"metadata": {"annotations": {ANNOTATION_ROTATION: value}}});
    Api::<Node>::all(client.clone())
        .patch(node, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .unwrap_or_else(|e| panic!("mark {node} {value}: {e}"));
}

pub async fn wait_phase(
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

/// Moves every node of [`NODES`] to `step` of the rotation `id` and waits for `name` to reach
/// `phase`.
pub async fn advance(
    client: &Client,
    name: &str,
    id: &str,
    step: &str,
    phase: RotationPhase,
) -> KeyRotation {
    for node in NODES {
        mark(client, node, &format!("{id}={step}")).await;
    }
    wait_phase(client, name, phase, Duration::from_secs(30)).await
}

pub fn rotation_id(r: &KeyRotation) -> String {
    r.status
        .as_ref()
        .and_then(|s| s.rotation_id.clone())
        .expect("rotationId recorded")
}

/// Waits for an Event on the KeyRotation `name` whose note starts with `note`.
pub async fn wait_event(client: &Client, name: &str, note: &str) {
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
pub async fn table(client: &Client) -> serde_json::Value {
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

/// One simulated agent: on every KeyRotation event, the step its node must reach for the active
/// rotation it takes part in, patched onto its own Node once.
pub async fn simulated_agent(client: Client, node: String) {
    let rotations = watcher(
        Api::<KeyRotation>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .applied_objects();
    let nodes = Api::<Node>::all(client);
    let mut written = String::new();
    futures::pin_mut!(rotations);
    while let Some(event) = rotations.next().await {
        let Ok(rotation) = event else { continue };
        let Some(status) = rotation.status else {
            continue;
        };
        let step = match status.phase {
            RotationPhase::Preparing => "prepared",
            RotationPhase::Switching => "switched",
            RotationPhase::Retiring => "retired",
            _ => continue,
        };
        let (Some(id), true) = (status.rotation_id, status.participants.contains(&node)) else {
            continue;
        };
        let mark = format!("{id}={step}");
        if mark == written {
            continue;
        }
        let body = serde_json::json!({"metadata": {"annotations": {ANNOTATION_ROTATION: mark}}});
        if nodes
            .patch(&node, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .is_ok()
        {
            written = mark;
        }
    }
}

/// A running testenv prepared for rotation tests.
pub struct Setup {
    pub env: Testenv,
    pub admin: Client,
    pub dir: PathBuf,
    /// Kubeconfig of the coordinator's ServiceAccount.
    pub sa_kubeconfig: PathBuf,
}

/// Starts testenv with `nodes` (each with a published key and the label `pool` from `pool`),
/// the CRDs, the agent namespace and the coordinator's ServiceAccount and RBAC.
pub async fn setup(tag: &str, nodes: &[String], pool: impl Fn(&str) -> &'static str) -> Setup {
    let dir = std::env::temp_dir().join(format!("wm-{tag}-{}", std::process::id()));
    let node_names = nodes.to_vec();
    let opts = TestenvOptions::new(Ipv4Addr::LOCALHOST, &dir, node_names);
    let env = tokio::task::spawn_blocking(move || Testenv::start(&opts))
        .await
        .expect("join")
        .expect("testenv starts");
    let admin = env.admin_client().await.expect("admin client");
    meshctl::demo::install_crds(&admin).await.expect("CRDs");
    objects::ensure_namespace(&admin, NAMESPACE)
        .await
        .expect("namespace");
    for (i, name) in nodes.iter().enumerate() {
        let (hi, lo) = (
            u8::try_from((i + 1) / 250).expect("small"),
            u8::try_from((i + 1) % 250).expect("small"),
        );
        objects::create_node(
            &admin,
            name,
            format!("10.{}.{lo}.0/24", 100 + hi).parse().expect("cidr"),
            Ipv4Addr::new(10, 213, hi, lo),
        )
        .await
        .expect("node");
        let key = PrivateKey::generate()
            .expect("key")
            .public_key()
            .to_base64();
        let body = json!({"metadata": {
            "labels": {"pool": pool(name)},
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
    env.write_node_kubeconfig(&nodes[0], &node_kubeconfig)
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
    Setup {
        env,
        admin,
        dir,
        sa_kubeconfig,
    }
}

impl Setup {
    /// A new client of the coordinator's ServiceAccount (its own connection).
    pub async fn coordinator_client(&self) -> Client {
        client_from_kubeconfig(&self.sa_kubeconfig)
            .await
            .expect("service account client")
    }

    /// Starts a [`simulated_agent`] for each of `nodes`, each with its node's own credentials.
    pub async fn spawn_simulated_agents(
        &self,
        nodes: &[String],
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut agents = Vec::new();
        for node in nodes {
            let kubeconfig = self.dir.join(format!("{node}.kubeconfig"));
            self.env
                .write_node_kubeconfig(node, &kubeconfig)
                .expect("node kubeconfig");
            let client = client_from_kubeconfig(&kubeconfig)
                .await
                .expect("node client");
            agents.push(tokio::spawn(simulated_agent(client, node.clone())));
        }
        agents
    }

    /// Stops testenv and removes the test directory.
    pub async fn teardown(self) {
        let env = self.env;
        tokio::task::spawn_blocking(move || env.stop())
            .await
            .expect("join")
            .expect("testenv stops");
        std::fs::remove_dir_all(&self.dir).expect("remove test dir");
    }
}
