//! The opt-in readiness taint (issue 16): nodes registered with `wiremesh.io/not-ready:NoSchedule`
//! keep it while their agent has not converged (here: its device is not running yet) and lose it,
//! and only it, once the mesh is up, in Strict mode. The agent runs with the deploy/ RBAC and
//! admission policies under a token bound to its node, so the removal passes the real `agent-scope`
//! policy, which still refuses the agent any other change of a Node's spec (removing another
//! taint, touching another node's taint). A node whose agent runs without the flag keeps its taint.

#[path = "mesh_support/support.rs"]
mod mesh;

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use meshctl::demo;
use serde_json::json;
use wiremesh_crds::{MeshEncryption, find_condition};
use wiremesh_integration::{
    ClusterOptions, Role, VirtualCluster, have_root, testenv::client_from_kubeconfig,
};

const NOT_READY: &str = "wiremesh.io/not-ready";
const OTHER: &str = "example.com/dedicated";

async fn taint_keys(client: &Client, node: &str) -> Vec<String> {
    let node = Api::<Node>::all(client.clone())
        .get(node)
        .await
        .expect("get node");
    node.spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .map(|t| t.key)
        .collect()
}

async fn set_taints(client: &Client, node: &str, keys: &[&str]) {
    let taints: Vec<_> = keys
        .iter()
        .map(|k| json!({"key": k, "effect": "NoSchedule"}))
        .collect();
    Api::<Node>::all(client.clone())
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": taints}})),
        )
        .await
        .unwrap_or_else(|e| panic!("taint {node}: {e}"));
}

/// Merge-patches `node`'s taints to `keys` as `client`; the denial message when refused.
async fn try_set_taints(client: &Client, node: &str, keys: &[&str]) -> Result<(), String> {
    let taints: Vec<_> = keys
        .iter()
        .map(|k| json!({"key": k, "effect": "NoSchedule"}))
        .collect();
    match Api::<Node>::all(client.clone())
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": taints}})),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 403 || status.code == 422 => {
            Err(status.message)
        }
        Err(other) => panic!("patching {node}: unexpected error {other}"),
    }
}

/// Waits until `MeshEncryption default` reports `ready` nodes and its Ready condition `ready_status`.
async fn wait_mesh_status(client: &Client, ready: &str, ready_status: &str) {
    let api = Api::<MeshEncryption>::all(client.clone());
    mesh::wait_async(
        &format!("MeshEncryption status ready {ready}, Ready={ready_status}"),
        Duration::from_secs(90),
        || {
            let api = api.clone();
            let client = client.clone();
            async move {
                let mesh = api.get("default").await.map_err(|e| e.to_string())?;
                let status = mesh.status.unwrap_or_default();
                let condition = find_condition(&status.conditions, "Ready")
                    .map(|c| c.status.clone())
                    .unwrap_or_default();
                if status.ready.as_deref() == Some(ready) && condition == ready_status {
                    Ok(())
                } else {
                    let meshnodes = Api::<wiremesh_crds::MeshNode>::all(client.clone())
                        .list_metadata(&Default::default())
                        .await
                        .map(|l| {
                            l.items
                                .iter()
                                .map(|m| {
                                    format!(
                                        "{:?} {:?}",
                                        m.metadata.labels, m.metadata.managed_fields
                                    )
                                })
                                .collect::<Vec<_>>()
                        });
                    Err(format!("status {status:?}; meshnodes {meshnodes:?}"))
                }
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readiness_taint_stays_until_the_mesh_converged() {
    if !have_root("network namespaces, TUN devices") {
        return;
    }
    let mut cluster = VirtualCluster::start(ClusterOptions {
        nodes: 2,
        pods_per_node: 1,
        ..ClusterOptions::default()
    })
    .await
    .expect("start the virtual cluster");
    let admin = cluster.client().clone();
    demo::install_crds(&admin).await.expect("install CRDs");
    demo::set_mesh_enabled(&admin, true).await.expect("enable");
    mesh::set_mesh_mode(&cluster, "Strict").await;
    // As kubelet --register-with-taints would leave them; node-1 also carries a taint of someone else.
    set_taints(&admin, "node-1", &[OTHER, NOT_READY]).await;
    set_taints(&admin, "node-2", &[NOT_READY]).await;

    let agent = mesh::agent_binary();
    // node-2: device and agent, without the flag.
    demo::start_agent(&mut cluster, "node-2", &agent, &[]).expect("start node-2");
    // node-1: the agent with the flag but no device yet, so it cannot converge.
    let mut args = demo::agent_args(&cluster, "node-1").expect("agent args");
    args.extend(["--readiness-taint".into(), "true".into()]);
    cluster
        .spawn_supervised("node-1", Role::Agent, &agent, args, vec![])
        .expect("start node-1's agent");
    mesh::wait_async(
        "node-1's agent running, reporting its MeshNode status, not ready (no device)",
        Duration::from_secs(60),
        || async {
            let reported = Api::<wiremesh_crds::MeshNode>::all(admin.clone())
                .get_opt("node-1")
                .await
                .map_err(|e| e.to_string())?
                .and_then(|m| m.status);
            if reported.is_none() {
                return Err("no MeshNode status from node-1's agent yet".to_owned());
            }
            match mesh::agent_http(&cluster, "node-1", "/readyz").await {
                Ok(_) => Err("ready without a device".to_owned()),
                Err(e) if e.contains("503") => Ok(()),
                Err(e) => Err(e),
            }
        },
    )
    .await;
    assert_eq!(
        taint_keys(&admin, "node-1").await,
        [OTHER, NOT_READY],
        "an agent that has not converged keeps its node tainted"
    );
    // The coordinator (one of the agents, under the deploy/ RBAC) counts ready nodes for
    // `kubectl get meshencryptions`.
    wait_mesh_status(&admin, "1/2", "False").await;

    // The device comes up: node-1 converges and its agent removes exactly its taint.
    let device = demo::device_args(&cluster, "node-1").expect("device args");
    cluster
        .spawn_supervised("node-1", Role::Device, &agent, device, vec![])
        .expect("start node-1's device");
    mesh::wait_converged(&cluster).await;
    mesh::wait_async(
        "node-1's readiness taint removed",
        Duration::from_secs(60),
        || async {
            let keys = taint_keys(&admin, "node-1").await;
            if keys == [OTHER] {
                Ok(())
            } else {
                Err(format!("taints {keys:?}"))
            }
        },
    )
    .await;
    wait_mesh_status(&admin, "2/2", "True").await;
    // Converged and reachable across nodes in Strict mode.
    mesh::assert_reachable(&cluster, "pod-1-1", "pod-2-1", b"readiness-taint");
    // Opt-in: node-2's agent runs without the flag.
    assert_eq!(taint_keys(&admin, "node-2").await, [NOT_READY]);

    // The agent's own credentials may not do more than that one removal.
    let as_agent = client_from_kubeconfig(&cluster.node("node-1").expect("node-1").kubeconfig)
        .await
        .expect("agent client");
    let denied = try_set_taints(&as_agent, "node-1", &[])
        .await
        .expect_err("the agent removes another taint of its node");
    assert!(denied.contains("agent-scope"), "{denied}");
    let denied = try_set_taints(&as_agent, "node-2", &[])
        .await
        .expect_err("the agent removes another node's readiness taint");
    assert!(denied.contains("agent-scope"), "{denied}");
    let denied = try_set_taints(&as_agent, "node-1", &[OTHER, NOT_READY])
        .await
        .expect_err("the agent adds a taint");
    assert!(denied.contains("agent-scope"), "{denied}");
    assert_eq!(taint_keys(&admin, "node-1").await, [OTHER]);
    assert_eq!(taint_keys(&admin, "node-2").await, [NOT_READY]);

    cluster.teardown().expect("teardown");
}
