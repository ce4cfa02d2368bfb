//! Issue 12, "Done when": the agent is killed with SIGKILL while a 10 ms ping and a TCP stream run
//! between pods on two nodes. The device is not the agent's (its own supervised process), so
//! nothing is lost: every ping is answered, the TCP stream sees no reset and delivers every byte,
//! and the restarted agent adopts the same device (same ifindex) with the same key. The kernel
//! datapath's variant runs in the kernel VM (`mesh_kernel_vm.rs`).

#[path = "mesh_support/support.rs"]
mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_loses_nothing_and_the_device_is_adopted() {
    let Some(mut cluster) = start_mesh_or_skip(Shape::new(2, 1)).await else {
        return;
    };
    assert_eq!(device_kind(&cluster, "node-1").as_deref(), Ok("tun"));
    kill_agent_under_traffic(&mut cluster, "node-1", "pod-1-1", "pod-2-1", 7070).await;
    wait_converged(&cluster).await;
    cluster.teardown().expect("teardown");
}
