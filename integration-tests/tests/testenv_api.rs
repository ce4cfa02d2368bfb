//! testenv on loopback (no root needed): the admin creates Nodes and Pods with their status; a node
//! user patches annotations on its own Node and is forbidden to patch another Node; node users read
//! all Nodes only with the extra read RBAC; testenv stops cleanly.

use std::{net::Ipv4Addr, time::Duration};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;
use wiremesh_integration::{
    ProcessIdentity, Testenv, TestenvError, TestenvOptions, objects,
    testenv::client_from_kubeconfig, wait,
};

fn forbidden(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 403)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_objects_and_node_rbac() {
    let dir = std::env::temp_dir().join(format!("wm-testenv-api-{}", std::process::id()));
    let opts = TestenvOptions::new(
        Ipv4Addr::LOCALHOST,
        &dir,
        vec!["node-a".into(), "node-b".into()],
    );
    let env = tokio::task::spawn_blocking(move || Testenv::start(&opts))
        .await
        .expect("join")
        .expect("testenv starts");
    assert!(
        env.credentials().server.starts_with("https://127.0.0.1:"),
        "{}",
        env.credentials().server
    );
    let admin = env.admin_client().await.expect("admin client");

    // Admin: Nodes with podCIDRs and InternalIP, a Pod bound to a node with its podIPs.
    objects::create_node(
        &admin,
        "node-a",
        "10.244.1.0/24".parse().expect("cidr"),
        Ipv4Addr::new(10, 213, 0, 11),
    )
    .await
    .expect("create node-a");
    objects::create_node(
        &admin,
        "node-b",
        "10.244.2.0/24".parse().expect("cidr"),
        Ipv4Addr::new(10, 213, 0, 12),
    )
    .await
    .expect("create node-b");
    objects::ensure_namespace(&admin, "wm-test")
        .await
        .expect("namespace");
    objects::ensure_namespace(&admin, "wm-test")
        .await
        .expect("namespace again is fine");
    objects::create_pod(
        &admin,
        "wm-test",
        "pod-a",
        "node-a",
        Ipv4Addr::new(10, 244, 1, 10),
        Ipv4Addr::new(10, 213, 0, 11),
    )
    .await
    .expect("create pod");

    let nodes = Api::<Node>::all(admin.clone());
    let a = nodes.get("node-a").await.expect("get node-a");
    assert_eq!(
        a.spec.as_ref().and_then(|s| s.pod_cidrs.clone()),
        Some(vec!["10.244.1.0/24".to_owned()])
    );
    let addresses = a.status.and_then(|s| s.addresses).unwrap_or_default();
    assert!(
        addresses
            .iter()
            .any(|x| x.type_ == "InternalIP" && x.address == "10.213.0.11"),
        "InternalIP missing: {addresses:?}"
    );
    let pod = Api::<Pod>::namespaced(admin.clone(), "wm-test")
        .get("pod-a")
        .await
        .expect("get pod");
    assert_eq!(
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some("node-a")
    );
    let status = pod.status.expect("pod status");
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.10"));
    assert_eq!(
        status
            .pod_ips
            .unwrap_or_default()
            .first()
            .map(|p| p.ip.as_str()),
        Some("10.244.1.10")
    );
    assert_eq!(status.phase.as_deref(), Some("Running"));

    // Node credentials: own Node's annotations yes, another Node no.
    let kubeconfig = dir.join("node-a.kubeconfig");
    env.write_node_kubeconfig("node-a", &kubeconfig)
        .expect("node kubeconfig");
    assert!(matches!(
        env.write_node_kubeconfig("node-z", &dir.join("z")),
        Err(TestenvError::UnknownNode(_))
    ));
    let node_a = client_from_kubeconfig(&kubeconfig)
        .await
        .expect("node-a client");
    let as_node_a = Api::<Node>::all(node_a.clone());
    let patch = json!({"metadata": {"annotations": {"wiremesh.io/public-key": "test-value"}}});
    as_node_a
        .patch("node-a", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("node-a patches its own Node");
    let seen = nodes.get("node-a").await.expect("get node-a");
    assert_eq!(
        seen.metadata
            .annotations
            .unwrap_or_default()
            .get("wiremesh.io/public-key")
            .map(String::as_str),
        Some("test-value")
    );
    let err = as_node_a
        .patch("node-b", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect_err("node-a must not patch node-b");
    assert!(forbidden(&err), "want 403, got {err}");
    let b = nodes.get("node-b").await.expect("get node-b");
    assert!(
        !b.metadata
            .annotations
            .unwrap_or_default()
            .contains_key("wiremesh.io/public-key"),
        "node-b was modified"
    );

    // The Node authorizer alone lets a node read only itself; the read RBAC opens all Nodes and Pods.
    let err = as_node_a
        .list(&ListParams::default())
        .await
        .expect_err("listing all nodes needs the read RBAC");
    assert!(forbidden(&err), "want 403, got {err}");
    as_node_a
        .get("node-a")
        .await
        .expect("a node reads its own Node");
    objects::install_node_read_rbac(&admin)
        .await
        .expect("read RBAC");
    let listed = wait::until(
        "node-a to list all nodes",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let api = as_node_a.clone();
            async move {
                api.list(&ListParams::default())
                    .await
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await
    .expect("node list allowed after RBAC");
    assert_eq!(listed.items.len(), 2);
    Api::<Pod>::all(node_a.clone())
        .list(&ListParams::default())
        .await
        .expect("node-a lists all pods");
    let err = as_node_a
        .patch("node-b", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect_err("read RBAC must not let node-a patch node-b");
    assert!(forbidden(&err), "want 403, got {err}");

    let identity: ProcessIdentity = env.identity();
    tokio::task::spawn_blocking(move || env.stop())
        .await
        .expect("join")
        .expect("testenv exits cleanly");
    assert!(!identity.is_running(), "testenv still running after stop");
    std::fs::remove_dir_all(&dir).expect("remove test dir");
}

#[test]
fn dropping_testenv_stops_it() {
    let dir = std::env::temp_dir().join(format!("wm-testenv-drop-{}", std::process::id()));
    let env = Testenv::start(&TestenvOptions::new(Ipv4Addr::LOCALHOST, &dir, vec![]))
        .expect("testenv starts");
    let identity = env.identity();
    assert!(identity.is_running());
    drop(env);
    assert!(!identity.is_running(), "testenv still running after drop");
    std::fs::remove_dir_all(&dir).expect("remove test dir");
}

#[test]
fn missing_binary_is_a_clear_error() {
    let mut opts = TestenvOptions::new(Ipv4Addr::LOCALHOST, std::env::temp_dir(), vec![]);
    opts.binary = "/nonexistent/testenv".into();
    let err = Testenv::start(&opts).expect_err("no binary");
    assert!(err.to_string().contains("make testenv"), "{err}");
}
