//! Issue 4, "Done when" 3: an agent killed with SIGKILL and restarted (by its supervisor) keeps its
//! key (same public key, same generation) and the mesh reconverges. Also: SIGTERM drains cleanly
//! (exit 0), the agent's last status report says it stopped, so `meshctl status` flags the node at
//! once, and the device (not the agent's) keeps its peers.

#[path = "mesh_support/support.rs"]
mod support;

use std::time::Duration;

use support::*;
use wiremesh_integration::Role;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_keeps_its_key_and_the_mesh_reconverges() {
    let Some(mut cluster) = start_mesh_or_skip(Shape::new(2, 1)).await else {
        return;
    };
    let marker = marker("restart");
    let key_before = published_key(&cluster, "node-1").await.expect("key");

    // kill -9: no drain; the device keeps its peers and routes, the supervisor restarts the agent.
    let killed = kill_agent(&mut cluster, "node-1");
    wait_restarted(&cluster, "node-1", Role::Agent, killed);
    let status = wait_converged(&cluster).await;
    let key_after = published_key(&cluster, "node-1").await.expect("key");
    assert_eq!(
        key_before, key_after,
        "the restarted agent must keep its key"
    );
    let node1 = status.node("node-1").expect("node-1 in status");
    assert_eq!(node1.key_generation, Some(1), "same key, same generation");
    assert_reachable(&cluster, "pod-1-1", "pod-2-1", marker.as_bytes());
    assert_reachable(&cluster, "pod-2-1", "pod-1-1", marker.as_bytes());
    let peers = wg_peers(&cluster, "node-2").expect("wg show");
    assert_eq!(peers, vec![key_after.clone()]);

    // SIGTERM: a clean drain with exit status 0 and a last report that says so.
    let exit = cluster
        .stop_supervised("node-1", Role::Agent, Duration::from_secs(15))
        .expect("stop agent");
    assert!(exit.success(), "agent exit after SIGTERM: {exit:?}");
    let status = meshctl::status::collect(cluster.client())
        .await
        .expect("status");
    let node1 = status.node("node-1").expect("node-1");
    assert!(
        node1.problems.iter().any(|p| p.contains("agent stopped")),
        "status must show the stopped agent at once: {:?}",
        node1.problems
    );
    assert!(!status.converged());
    // The device is not the agent's: it keeps its peer after the agent is gone.
    assert_eq!(
        wg_peers(&cluster, "node-1")
            .expect("the device outlives the agent")
            .len(),
        1
    );

    cluster.teardown().expect("teardown");
}
