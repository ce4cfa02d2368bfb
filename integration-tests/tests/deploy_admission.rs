//! Node-bound key annotations, applied for real from deploy/: a request may change node X's
//! `wiremesh.io/*` annotations only with node X's identity (a ServiceAccount token bound to a pod on
//! X, or system:node:X), and the agent's ServiceAccount may change nothing but its own node's
//! wiremesh.io annotations. Tokens are issued with TokenRequest and a boundObjectRef to a Pod on each
//! node, as the kubelet does for the DaemonSet's pod.

#[path = "deploy_support/support.rs"]
mod support;

use std::{net::Ipv4Addr, path::Path, time::Duration};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use support::*;
use wiremesh_integration::{agentidentity, objects, testenv::client_from_kubeconfig, wait};

const KEY_A: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const KEY_B: &str = "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA=";

/// Merge-patches `node`'s annotations (or `body`) as `client`; `Err(message)` when denied.
async fn patch(client: &Client, node: &str, body: serde_json::Value) -> Result<(), String> {
    match Api::<Node>::all(client.clone())
        .patch(node, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 403 => Err(status.message),
        Err(other) => panic!("patching {node}: unexpected error {other}"),
    }
}

fn key(value: &str) -> serde_json::Value {
    json!({"metadata": {"annotations": {"wiremesh.io/public-key": value}}})
}

/// A client for ServiceAccount `namespace/sa` with a token bound to `pod` (created on `node`).
async fn bound_client(
    admin: &Client,
    env: &Env,
    namespace: &str,
    sa: &str,
    pod: &str,
    node: &str,
) -> Client {
    let pod = agentidentity::ensure_node_pod(admin, namespace, pod, sa, node)
        .await
        .expect("pod on node");
    let token = agentidentity::bound_token(admin, namespace, sa, &pod)
        .await
        .expect("bound token");
    client_with_token(env, &format!("{sa}-{node}"), token).await
}

async fn client_with_token(env: &Env, name: &str, token: String) -> Client {
    let path = env.dir.join(format!("{name}.kubeconfig"));
    agentidentity::write_token_kubeconfig(env.testenv().credentials(), name, name, token, &path)
        .expect("kubeconfig");
    client_from_kubeconfig(&path).await.expect("client")
}

async fn key_of(admin: &Client, node: &str) -> Option<String> {
    objects::node_annotation(admin, node, "wiremesh.io/public-key")
        .await
        .expect("get node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_annotations_are_bound_to_their_node() {
    let env = Env::start("deploy-admission", &["node-a", "node-b"]).await;
    let admin = env.admin().await;
    apply_deploy_dir(&env.kubeconfig());
    for (i, node) in ["node-a", "node-b"].into_iter().enumerate() {
        let i = u8::try_from(i).expect("small");
        objects::create_node(
            &admin,
            node,
            format!("10.244.{i}.0/24").parse().expect("cidr"),
            Ipv4Addr::new(10, 213, 0, 11 + i),
        )
        .await
        .expect("create node");
    }

    // A workload on node-a with RBAC to patch every Node (so only admission can stop it), as a
    // compromised node's pod might have.
    objects::ensure_namespace(&admin, "wm-other")
        .await
        .expect("ns");
    kubectl(
        &env.kubeconfig(),
        &["create", "serviceaccount", "patcher", "-n", "wm-other"],
    );
    kubectl(
        &env.kubeconfig(),
        &[
            "create",
            "clusterrole",
            "wm-node-patcher",
            "--verb=patch,get",
            "--resource=nodes",
        ],
    );
    kubectl(
        &env.kubeconfig(),
        &[
            "create",
            "clusterrolebinding",
            "wm-node-patcher",
            "--clusterrole=wm-node-patcher",
            "--serviceaccount=wm-other:patcher",
        ],
    );
    let on_a = bound_client(&admin, &env, "wm-other", "patcher", "patcher-a", "node-a").await;

    // The policies take effect once the apiserver's admission plugin has seen them.
    let denied = wait::until(
        "node-bound-keys policy in force",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async {
            match patch(&on_a, "node-b", key(KEY_A)).await {
                Err(message) => Ok(message),
                Ok(()) => Err("node-a's pod changed node-b's key".to_owned()),
            }
        },
    )
    .await;
    // Had the policy not been in force at first, node-b's key would have been written: check it
    // was not, whatever the timing.
    let message = denied.expect("a pod on node-a must not change node-b's key");
    assert!(
        message.contains("wiremesh-node-bound-keys") && message.contains("comes from node node-a"),
        "{message}"
    );
    assert_eq!(
        key_of(&admin, "node-b").await,
        None,
        "node-b's key untouched"
    );

    // The same pod may change node-a's key; other annotations of node-b are not this policy's.
    patch(&on_a, "node-a", key(KEY_A))
        .await
        .expect("a pod on node-a changes node-a's key");
    assert_eq!(key_of(&admin, "node-a").await.as_deref(), Some(KEY_A));
    patch(
        &on_a,
        "node-b",
        json!({"metadata": {"annotations": {"example.com/x": "1"}}}),
    )
    .await
    .expect("non-wiremesh annotations are not node-bound");
    // Removing another node's key is a change too.
    let on_b = bound_client(&admin, &env, "wm-other", "patcher", "patcher-b", "node-b").await;
    patch(&on_b, "node-b", key(KEY_B))
        .await
        .expect("node-b's own key");
    let removed = patch(
        &on_a,
        "node-b",
        json!({"metadata": {"annotations": {"wiremesh.io/public-key": null}}}),
    )
    .await;
    assert!(removed.is_err(), "node-a removed node-b's key");
    assert_eq!(key_of(&admin, "node-b").await.as_deref(), Some(KEY_B));

    // A token of the same account that is not bound to a pod carries no node: denied everywhere.
    let unbound = agentidentity_token_unbound(&admin, "wm-other", "patcher").await;
    let unbound = client_with_token(&env, "patcher-unbound", unbound).await;
    let message = patch(&unbound, "node-a", key(KEY_B))
        .await
        .expect_err("a token without a node must not change keys");
    assert!(message.contains("carries no node identity"), "{message}");

    // The kubelet's identity, system:node:node-a, may change node-a's keys.
    let node_a_kubeconfig = env.dir.join("node-a.kubeconfig");
    env.testenv()
        .write_node_kubeconfig("node-a", &node_a_kubeconfig)
        .expect("node kubeconfig");
    let kubelet_a = client_from_kubeconfig(&node_a_kubeconfig)
        .await
        .expect("client");
    patch(&kubelet_a, "node-a", key(KEY_B))
        .await
        .expect("system:node:node-a changes node-a's key");

    // Cluster administrators are exempt (cleanup after an uninstall).
    patch(&admin, "node-b", key(KEY_A))
        .await
        .expect("system:masters may change any key");

    // The agent's ServiceAccount, with a token bound to its pod on node-a: its own node's wiremesh
    // annotations only.
    let identity = agentidentity::identity_in(
        &agentidentity::read_manifest(&deploy_dir().join("wiremesh.yaml")).expect("manifest"),
        Path::new("deploy/wiremesh.yaml"),
    )
    .expect("agent identity");
    let agent_kubeconfig = env.dir.join("agent-a.kubeconfig");
    agentidentity::write_agent_kubeconfig(
        &admin,
        &identity,
        env.testenv().credentials(),
        "node-a",
        &agent_kubeconfig,
    )
    .await
    .expect("agent kubeconfig");
    let agent_a = client_from_kubeconfig(&agent_kubeconfig)
        .await
        .expect("client");
    patch(&agent_a, "node-a", key(KEY_A))
        .await
        .expect("the agent publishes its own key");
    patch(
        &agent_a,
        "node-a",
        json!({"metadata": {"annotations": {"wiremesh.io/endpoint": "10.213.0.11:51871"}}}),
    )
    .await
    .expect("and its own endpoint");
    let cases = [
        // Both policies deny this one; the apiserver reports whichever it evaluated first.
        ("node-b", key(KEY_B), "node-a"),
        (
            "node-a",
            json!({"metadata": {"labels": {"node-role.kubernetes.io/x": ""}}}),
            "only the wiremesh.io/* annotations",
        ),
        (
            "node-a",
            json!({"metadata": {"annotations": {"example.com/x": "1"}}}),
            "only the wiremesh.io/* annotations",
        ),
        (
            "node-a",
            json!({"spec": {"unschedulable": true}}),
            "only the wiremesh.io/* annotations",
        ),
        (
            "node-a",
            json!({"spec": {"taints": [{"key": "x", "effect": "NoSchedule"}]}}),
            "only the wiremesh.io/* annotations",
        ),
    ];
    for (node, body, want) in cases {
        let message = patch(&agent_a, node, body.clone())
            .await
            .expect_err(&format!("agent on node-a: {body} on {node} must be denied"));
        assert!(message.contains(want), "{body} on {node}: {message}");
    }
}

/// A token of `namespace/sa` without a bound object.
async fn agentidentity_token_unbound(admin: &Client, namespace: &str, sa: &str) -> String {
    use k8s_openapi::api::{authentication::v1::TokenRequest, core::v1::ServiceAccount};
    let request: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
            .expect("TokenRequest literal");
    Api::<ServiceAccount>::namespaced(admin.clone(), namespace)
        .create_subresource::<TokenRequest, TokenRequest>(
            "token",
            sa,
            &Default::default(),
            &request,
        )
        .await
        .expect("unbound token")
        .status
        .and_then(|s| s.token)
        .expect("token")
}
