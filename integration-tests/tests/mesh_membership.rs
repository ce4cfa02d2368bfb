//! Issue 4, "Done when" 2: a node added later is reachable from all others; a deleted node's peer
//! and routes disappear from every remaining node (checked with wg(8) and `ip route`, not only
//! through the agents' own reports).

#[path = "mesh_support/support.rs"]
mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_node_joins_and_deleted_node_is_pruned() {
    let Some(mut cluster) = start_mesh_or_skip(Shape::new(2, 1).with_spare_nodes(1)).await else {
        return;
    };
    let marker = marker("membership");

    // A node added later, with a pod and its own agent.
    let new = cluster.add_node().await.expect("add node").name.clone();
    assert_eq!(new, "node-3");
    let pod = cluster
        .add_pod(&new, None)
        .await
        .expect("add pod")
        .name
        .clone();
    meshctl::demo::start_agent(&mut cluster, &new, &agent_binary(), &[]).expect("start agent");
    let status = wait_converged(&cluster).await;
    assert_eq!(status.nodes.len(), 3);
    for other in ["pod-1-1", "pod-2-1"] {
        assert_reachable(&cluster, other, &pod, marker.as_bytes());
        assert_reachable(&cluster, &pod, other, marker.as_bytes());
    }
    for node in ["node-1", "node-2"] {
        let routes = mesh_routes(&cluster, node);
        assert!(
            routes.contains(&"10.244.3.0/24".to_string()),
            "{node} has no route to node-3's pods: {routes:?}"
        );
    }

    // Delete node-2: its peer and its routes go from node-1 and node-3.
    let gone_key = published_key(&cluster, "node-2")
        .await
        .expect("node-2 published a key");
    cluster.remove_node("node-2").await.expect("remove node-2");
    for node in ["node-1", "node-3"] {
        eventually(
            &format!("{node} pruned node-2"),
            Duration::from_secs(30),
            || {
                let peers = wg_peers(&cluster, node)?;
                let routes = mesh_routes(&cluster, node);
                if peers.contains(&gone_key) {
                    return Err(format!("peer {gone_key} still configured"));
                }
                if routes.contains(&"10.244.2.0/24".to_string()) {
                    return Err(format!("route to 10.244.2.0/24 still there: {routes:?}"));
                }
                if peers.len() != 1 {
                    return Err(format!("want exactly one peer left, have {peers:?}"));
                }
                Ok(())
            },
        )
        .await;
    }
    let status = wait_converged(&cluster).await;
    assert_eq!(status.nodes.len(), 2);
    assert_reachable(&cluster, "pod-1-1", &pod, marker.as_bytes());

    cluster.teardown().expect("teardown");
}
