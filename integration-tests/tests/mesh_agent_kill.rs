//! Issue 12, "Done when": the agent is killed with SIGKILL while a 10 ms ping and a TCP stream run
//! between pods on two nodes. The device is not the agent's (its own supervised process), so
//! nothing is lost: every ping is answered, the TCP stream sees no reset and delivers every byte,
//! and the restarted agent adopts the same device (same ifindex) with the same key.

#[path = "mesh_support/support.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;
use wiremesh_integration::Role;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_loses_nothing_and_the_device_is_adopted() {
    let Some(mut cluster) = start_mesh_or_skip(Shape::new(2, 1)).await else {
        return;
    };
    let ifindex_before = device_ifindex(&cluster, "node-1").expect("ifindex");
    let key_before = device_public_key(&cluster, "node-1").expect("device key");
    assert_eq!(
        Some(&key_before),
        published_key(&cluster, "node-1").await.as_ref(),
        "the device holds the published key"
    );

    // 10 ms ping for 12 s and a TCP stream, both across the nodes.
    let ping = PingRun::start(
        &cluster,
        "pod-1-1",
        "pod-2-1",
        Duration::from_millis(10),
        1200,
    );
    let tcp = TcpFlow::start(&cluster, "pod-1-1", "pod-2-1", 7070);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let killed = kill_agent(&mut cluster, "node-1");
    let killed_at = Instant::now();
    let restarted = wait_restarted(&cluster, "node-1", Role::Agent, killed);
    wait_agent_ready(&cluster, "node-1", Duration::from_secs(60)).await;
    let ready_after = killed_at.elapsed();

    let result = tokio::task::block_in_place(|| ping.finish());
    let (sent, received) = tokio::task::block_in_place(|| tcp.finish())
        .unwrap_or_else(|e| panic!("the TCP stream broke across the agent kill: {e}"));
    let ifindex_after = device_ifindex(&cluster, "node-1").expect("ifindex");
    let key_after = device_public_key(&cluster, "node-1").expect("device key");
    eprintln!(
        "agent kill -9 (pid {} -> {}), ready again after {:.1} s: ping {} sent, {} received, \
         {} lost, longest gap {:.0} ms; TCP {} bytes sent, {} received, no reset; \
         device ifindex {} -> {}",
        killed.pid,
        restarted.pid,
        ready_after.as_secs_f64(),
        result.transmitted,
        result.received,
        result.lost(),
        result.max_gap_ms,
        sent,
        received,
        ifindex_before,
        ifindex_after,
    );
    assert!(result.transmitted >= 1000, "ping ran: {result:?}");
    assert_eq!(result.lost(), 0, "no ping lost across the agent kill");
    assert!(
        sent > 0 && received == sent,
        "TCP: {sent} sent, {received} received"
    );
    assert_eq!(ifindex_after, ifindex_before, "the same device was adopted");
    assert_eq!(key_after, key_before, "the same key");
    assert_eq!(
        published_key(&cluster, "node-1").await,
        Some(key_before),
        "the same published key"
    );
    wait_converged(&cluster).await;
    cluster.teardown().expect("teardown");
}
