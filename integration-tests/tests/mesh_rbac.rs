//! Issue 16: the agents run the way the DaemonSet runs them — as the ServiceAccount of
//! deploy/wiremesh.yaml with a token bound to a Pod on their node, under deploy/'s RBAC and admission
//! policies, not with node credentials — and the mesh converges: the agent needs no more than that.
//! That identity patches only its own Node (the admission policy; RBAC alone would allow any Node),
//! deletes nothing and reads the mesh settings without writing them.

#[path = "mesh_support/support.rs"]
mod support;

use k8s_openapi::api::{authentication::v1::SelfSubjectReview, core::v1::Node};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use support::*;
use wiremesh_crds::MeshEncryption;
use wiremesh_integration::testenv::client_from_kubeconfig;

fn forbidden(result: Result<impl std::fmt::Debug, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(ref status)) if status.code == 403)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_service_account_can_patch_only_its_own_node() {
    let Some(cluster) = start_mesh_or_skip(Shape::new(2, 1)).await else {
        return;
    };

    // The agents ran with these kubeconfigs (spawn_agent sets KUBECONFIG to them) and published
    // their keys: the mesh converged in start_mesh under exactly these permissions.
    let kubeconfig = cluster.node("node-1").expect("node-1").kubeconfig.clone();
    let node1 = client_from_kubeconfig(&kubeconfig)
        .await
        .expect("node-1 client");
    // Who the agent is, as the apiserver sees it: the deploy/ ServiceAccount, bound to node-1.
    let review: SelfSubjectReview = Api::all(node1.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview");
    let user = review.status.and_then(|s| s.user_info).expect("user info");
    assert_eq!(
        user.username.as_deref(),
        Some(cluster.agent_identity().username().as_str())
    );
    assert_eq!(
        user.extra
            .as_ref()
            .and_then(|e| e.get("authentication.kubernetes.io/node-name")),
        Some(&vec!["node-1".to_owned()]),
        "the agent's token is bound to a pod on node-1"
    );

    let nodes: Api<Node> = Api::all(node1.clone());
    let patch = |value: &str| {
        Patch::Merge(json!({"metadata": {"annotations": {"wiremesh.io/rbac-test": value}}}))
    };

    nodes
        .patch("node-1", &PatchParams::default(), &patch("own"))
        .await
        .expect("a node may patch its own Node");
    assert!(
        forbidden(
            nodes
                .patch("node-2", &PatchParams::default(), &patch("other"))
                .await
        ),
        "node-1's agent must not patch node-2"
    );
    // Not even the key annotations of another node.
    assert!(forbidden(
        nodes
            .patch(
                "node-2",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {
                    "wiremesh.io/public-key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
                }}})),
            )
            .await
    ));
    assert!(forbidden(nodes.delete("node-2", &Default::default()).await));

    // Reads the agent needs work; the mesh settings are read-only to it.
    let listed = nodes.list(&Default::default()).await.expect("list nodes");
    assert_eq!(listed.items.len(), 2);
    let mesh: Api<MeshEncryption> = Api::all(node1);
    assert!(
        mesh.get("default")
            .await
            .expect("read MeshEncryption")
            .spec
            .enabled
    );
    assert!(forbidden(
        mesh.patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"enabled": false}})),
        )
        .await
    ));

    // The key annotations on node-2 were written by node-2's own agent and are intact.
    let key2 = published_key(&cluster, "node-2").await.expect("node-2 key");
    assert_eq!(wg_peers(&cluster, "node-1").expect("wg"), vec![key2]);

    cluster.teardown().expect("teardown");
}
