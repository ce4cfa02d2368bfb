//! Issue 4, "Done when" 1: on 3 nodes x 2 pods every cross-node pod pair exchanges TCP and UDP
//! through the mesh, and a capture on the underlay during that traffic finds only WireGuard UDP
//! between node addresses (control-plane traffic to the API server aside) and the payload marker
//! nowhere. A negative control proves the capture would see plaintext: with the mesh disabled the
//! same traffic takes the cluster's plaintext routes and the capture finds the marker.

#[path = "mesh_support/support.rs"]
mod support;

use std::time::Duration;

use meshctl::{demo, traffic};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cross_node_pod_pair_is_encrypted_on_the_underlay() {
    let Some(cluster) = start_mesh_or_skip(Shape::new(3, 2)).await else {
        return;
    };
    let marker = marker("traffic");

    let (results, _) = all_pairs_encrypted(&cluster, "mesh on", &marker);
    // 6 pods, each talks to the 4 pods on other nodes.
    assert_eq!(results.len(), 24);

    // Negative control: mesh off -> agents remove peers and routes -> plaintext on the wire.
    let client = cluster.client().clone();
    demo::set_mesh_enabled(&client, false)
        .await
        .expect("disable");
    for node in ["node-1", "node-2", "node-3"] {
        eventually(
            &format!("{node} torn down"),
            Duration::from_secs(30),
            || {
                let peers = wg_peers(&cluster, node)?;
                let routes = mesh_routes(&cluster, node);
                if peers.is_empty() && routes.is_empty() {
                    Ok(())
                } else {
                    Err(format!("peers {peers:?}, routes {routes:?}"))
                }
            },
        )
        .await;
    }
    let from = pod_end(&cluster, "pod-1-1");
    let to = pod_end(&cluster, "pod-2-1");
    let payload = format!("{marker} plaintext control");
    let (echo, plain) = capture_underlay(&cluster, &marker, || {
        traffic::tcp_echo(&from, &to, payload.as_bytes(), Duration::from_secs(5))
    });
    echo.expect("plaintext routes still carry traffic with the mesh off");
    assert!(
        plain.marker_hits > 0 && plain.violation_count > 0,
        "the capture must see plaintext pod traffic with the mesh off: {}",
        plain.summary()
    );

    // And back on.
    demo::set_mesh_enabled(&client, true).await.expect("enable");
    wait_converged(&cluster).await;
    assert_reachable(&cluster, "pod-3-2", "pod-1-2", marker.as_bytes());

    cluster.teardown().expect("teardown");
}
