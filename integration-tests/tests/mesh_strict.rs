//! Issue 5, "Done when" 2 (strict mode): with `MeshEncryption` in Strict mode and the tunnel to
//! one node removed (its agent stopped, its key withdrawn so the other nodes drop the peer and
//! its routes), pod traffic to and from that node is dropped, a capture on the underlay bridge
//! sees none of it in plaintext, and the other nodes still talk through their tunnels. A
//! negative control switches to Permissive and the same traffic shows up in plaintext.

#[path = "mesh_support/support.rs"]
mod support;

use std::time::Duration;

use meshctl::traffic;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_drops_pod_traffic_to_a_node_without_a_tunnel() {
    let Some(mut cluster) = start_mesh_or_skip(Shape::new(3, 1)).await else {
        return;
    };
    let _servers: Vec<EchoServer> = ["pod-1-1", "pod-2-1", "pod-3-1"]
        .into_iter()
        .map(|pod| EchoServer::start(&cluster, pod, 80))
        .collect();
    set_mesh_mode(&cluster, "Strict").await;
    for node in ["node-1", "node-2", "node-3"] {
        let metrics_of = node.to_string();
        let c = &cluster;
        support::wait_async(
            &format!("{node} in strict mode"),
            Duration::from_secs(20),
            || {
                let node = metrics_of.clone();
                async move {
                    let m = agent_metrics(c, &node).await?;
                    if m.contains("wiremesh_ebpf_strict_mode 1") {
                        Ok(())
                    } else {
                        Err("eBPF config not strict yet".to_string())
                    }
                }
            },
        )
        .await;
    }
    expect_reachability(
        &cluster,
        "strict mode with every tunnel up",
        Duration::from_secs(15),
        &[
            ("pod-1-1", "pod-3-1", 80, true),
            ("pod-3-1", "pod-1-1", 80, true),
            ("pod-1-1", "pod-2-1", 80, true),
        ],
    )
    .await;

    // Remove the tunnel to node-3 (its agent and device stopped, its key withdrawn).
    remove_tunnels_to(&mut cluster, "node-3").await;
    let node3_cidr = cluster
        .node("node-3")
        .expect("node-3")
        .network
        .pod_cidr
        .to_string();
    for node in ["node-1", "node-2"] {
        eventually(
            &format!("{node} drops its tunnel to node-3"),
            Duration::from_secs(30),
            || {
                let peers = wg_peers(&cluster, node)?;
                let routes = mesh_routes(&cluster, node);
                if peers.len() == 1 && !routes.contains(&node3_cidr) {
                    Ok(())
                } else {
                    Err(format!("peers {peers:?}, routes {routes:?}"))
                }
            },
        )
        .await;
    }

    let marker = marker("strict");
    let (a1, a3) = (pod_end(&cluster, "pod-1-1"), pod_end(&cluster, "pod-3-1"));
    let c = &cluster;
    let ((to3, from3, udp3, ping3, to2, from2), report) =
        capture_underlay(&cluster, &marker, || {
            let short = Duration::from_millis(800);
            (
                tcp_probe(c, "pod-1-1", "pod-3-1", 80, marker.as_bytes(), short),
                tcp_probe(c, "pod-3-1", "pod-1-1", 80, marker.as_bytes(), short),
                traffic::udp_echo(&a1, &a3, marker.as_bytes(), short, 2),
                traffic::ping(&a1, &a3, 2),
                tcp_probe(c, "pod-1-1", "pod-2-1", 80, marker.as_bytes(), short * 4),
                tcp_probe(c, "pod-2-1", "pod-1-1", 80, marker.as_bytes(), short * 4),
            )
        });
    assert!(to3.is_err(), "pod-1-1 -> pod-3-1 must be dropped: {to3:?}");
    assert!(from3.is_err(), "pod-3-1 -> pod-1-1 must be dropped");
    assert!(udp3.is_err(), "UDP to pod-3-1 must be dropped");
    assert!(ping3.is_err(), "ICMP to pod-3-1 must be dropped");
    to2.expect("node-1 <-> node-2 still works");
    from2.expect("node-2 <-> node-1 still works");
    assert!(
        report.violation_count == 0 && report.marker_hits == 0,
        "no plaintext pod traffic on the underlay in strict mode: {}\n{}",
        report.summary(),
        report.violations.join("\n")
    );
    assert!(
        report.wireguard_data() > 0,
        "the working pair was encrypted: {}",
        report.summary()
    );
    eprintln!("strict, tunnel to node-3 gone: {}", report.summary());
    let flows = agent_flows(&cluster, "node-1").await;
    assert!(
        has_flow(&flows, "pod-1-1", "pod-3-1", Some(80), "dropped-plaintext"),
        "node-1 records the strict drop: {flows:#?}"
    );

    // Negative control: Permissive lets node-1 send it in plaintext (the capture sees it).
    set_mesh_mode(&cluster, "Permissive").await;
    let c = &cluster;
    support::wait_async(
        "node-1 permissive",
        Duration::from_secs(20),
        || async move {
            let m = agent_metrics(c, "node-1").await?;
            if m.contains("wiremesh_ebpf_strict_mode 0") {
                Ok(())
            } else {
                Err("still strict".to_string())
            }
        },
    )
    .await;
    let (_, plain) = capture_underlay(&cluster, &marker, || {
        traffic::udp_echo(&a1, &a3, marker.as_bytes(), Duration::from_millis(500), 2)
    });
    assert!(
        plain.marker_hits > 0,
        "permissive mode without a tunnel sends plaintext, which the capture must see: {}",
        plain.summary()
    );

    cluster.teardown().expect("teardown");
}
