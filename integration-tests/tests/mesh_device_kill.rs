//! Issue 12, "Done when": the userspace device process is killed with SIGKILL. Its agent's
//! `/healthz` fails while the device is gone; the supervisor restarts the device (a fresh TUN,
//! another ifindex, no key, no peers), the agent re-adopts it and applies its whole configuration,
//! and traffic recovers. The outage seen by a 10 ms ping is printed and bounded (loss, not a
//! timing benchmark; the figure goes to docs/benchmarks.md).

#[path = "mesh_support/support.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;
use wiremesh_integration::Role;

/// A generous bound on the outage: device restart, the agent noticing (0.5 s probes), a full
/// reconfiguration, a new handshake and the eBPF steering picking up the new ifindex (2 s passes).
const MAX_GAP: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_device_process_is_restarted_and_re_adopted() {
    let Some(cluster) = start_mesh_or_skip(Shape::new(2, 1)).await else {
        return;
    };
    let marker = marker("device-kill");
    let key = device_public_key(&cluster, "node-1").expect("device key");
    let ifindex_before = device_ifindex(&cluster, "node-1").expect("ifindex");
    let node2_key = published_key(&cluster, "node-2").await.expect("key");

    // Health: with restarts held, the dead device makes the agent unhealthy and unready.
    cluster
        .hold_restarts("node-1", Role::Device, true)
        .expect("hold");
    let killed = cluster
        .kill_supervised("node-1", Role::Device)
        .expect("kill -9 the device");
    let c = &cluster;
    wait_async(
        "node-1 /healthz fails",
        Duration::from_secs(10),
        || async move {
            match agent_http(c, "node-1", "/healthz").await {
                Err(e) if e.contains("503") => Ok(()),
                other => Err(format!("/healthz: {other:?}")),
            }
        },
    )
    .await;
    assert!(
        agent_http(c, "node-1", "/readyz").await.is_err(),
        "not ready without a device"
    );
    cluster
        .hold_restarts("node-1", Role::Device, false)
        .expect("release");
    wait_restarted(&cluster, "node-1", Role::Device, killed);
    wait_agent_ready(&cluster, "node-1", Duration::from_secs(60)).await;
    let c = &cluster;
    wait_async(
        "node-1 /healthz ok",
        Duration::from_secs(10),
        || async move { agent_http(c, "node-1", "/healthz").await.map(|_| ()) },
    )
    .await;
    let ifindex_after = device_ifindex(&cluster, "node-1").expect("ifindex");
    assert_ne!(ifindex_after, ifindex_before, "a fresh device (a new TUN)");
    assert_eq!(
        device_public_key(&cluster, "node-1").expect("key"),
        key,
        "the fresh device got the keystore's key"
    );
    assert_eq!(wg_peers(&cluster, "node-1").expect("wg"), vec![node2_key]);
    let metrics = agent_metrics(&cluster, "node-1").await.expect("metrics");
    assert!(
        metrics.contains("wiremesh_datapath_repairs_total{what=\"device\"}"),
        "the re-adoption is counted"
    );
    assert_reachable(&cluster, "pod-1-1", "pod-2-1", marker.as_bytes());

    // The outage of an unheld kill, under a 10 ms ping.
    let ping = PingRun::start(
        &cluster,
        "pod-1-1",
        "pod-2-1",
        Duration::from_millis(10),
        2000,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = cluster
        .kill_supervised("node-1", Role::Device)
        .expect("kill -9 the device");
    let killed_at = Instant::now();
    let restarted = wait_restarted(&cluster, "node-1", Role::Device, killed);
    let restarted_after = killed_at.elapsed();
    wait_agent_ready(&cluster, "node-1", Duration::from_secs(60)).await;
    let ready_after = killed_at.elapsed();
    let result = tokio::task::block_in_place(|| ping.finish());
    eprintln!(
        "device kill -9 (pid {} -> {}): restarted after {:.0} ms, agent ready after {:.1} s; \
         ping every 10 ms: {} sent, {} received, {} lost, longest gap {:.0} ms",
        killed.pid,
        restarted.pid,
        restarted_after.as_secs_f64() * 1000.0,
        ready_after.as_secs_f64(),
        result.transmitted,
        result.received,
        result.lost(),
        result.max_gap_ms,
    );
    assert!(result.transmitted >= 1500, "ping ran: {result:?}");
    assert!(
        result.max_gap_ms > 0.0 && result.max_gap_ms < MAX_GAP.as_secs_f64() * 1000.0,
        "outage {:.0} ms, bound {MAX_GAP:?}",
        result.max_gap_ms
    );
    assert!(
        result.received > result.transmitted / 2,
        "traffic recovered: {result:?}"
    );
    assert_reachable(&cluster, "pod-1-1", "pod-2-1", marker.as_bytes());
    assert_reachable(&cluster, "pod-2-1", "pod-1-1", marker.as_bytes());
    cluster.teardown().expect("teardown");
}
