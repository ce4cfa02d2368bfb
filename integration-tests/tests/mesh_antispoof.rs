//! Anti-spoofing in the virtual cluster: the agent declares each local pod's veth in
//! `wm_endpoints`, so a pod that sends with another pod's source address (the address added
//! inside its own namespace) is dropped by `from_pod` on its veth and `/flows` records the
//! attempt as `dropped-policy`, while the pod's own traffic keeps flowing.

#[path = "mesh_support/support.rs"]
mod support;

use std::{net::UdpSocket, time::Duration};

use support::*;

const DEADLINE: Duration = Duration::from_secs(20);
const SPOOF_PORT: u16 = 9977;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_sending_with_another_pods_address_is_dropped_on_its_veth() {
    let Some(cluster) = start_mesh_or_skip(Shape::new(2, 2)).await else {
        return;
    };
    let _server = EchoServer::start(&cluster, "pod-2-1", 80);
    // The pod's own traffic works (and the agents have attached their programs).
    expect_reachability(
        &cluster,
        "own address: open",
        DEADLINE,
        &[("pod-1-1", "pod-2-1", 80, true)],
    )
    .await;

    // pod-1-1 takes pod-1-2's address as a second one and sends from it.
    let attacker = cluster.pod("pod-1-1").expect("pod").network.clone();
    let victim_ip = cluster.pod("pod-1-2").expect("pod").network.ip;
    let target = cluster.pod("pod-2-1").expect("pod").network.ip;
    wiremesh_integration::command::ip_in(
        &attacker.netns,
        ["addr", "add", &format!("{victim_ip}/32"), "dev", "eth0"],
    )
    .expect("add the other pod's address inside the attacker's namespace");
    let spoofed_flow = |flows: &[serde_json::Value]| {
        flows.iter().any(|f| {
            f["IP"]["source"] == victim_ip.to_string()
                && f["IP"]["destination"] == target.to_string()
                && flow_dport(f) == Some(SPOOF_PORT)
                && f["wiremesh_verdict"] == "dropped-policy"
                && f["hook"] == "from-pod"
        })
    };
    let c = &cluster;
    let netns = attacker.netns.clone();
    wait_async(
        "the spoofed packets show as dropped-policy",
        DEADLINE,
        || {
            let netns = netns.clone();
            async move {
                tokio::task::block_in_place(|| {
                    wiremesh_integration::netns::within(&netns, move || {
                        let s = UdpSocket::bind((victim_ip, 0))?;
                        s.send_to(b"spoofed", (target, SPOOF_PORT)).map(|_| ())
                    })
                })
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("send from {victim_ip}: {e}"))?;
                let flows = agent_flows(c, "node-1").await;
                if spoofed_flow(&flows) {
                    Ok(())
                } else {
                    Err(format!("no dropped-policy from-pod record yet: {flows:#?}"))
                }
            }
        },
    )
    .await;
    // The spoofed datagrams never left node-1.
    let node2 = agent_flows(&cluster, "node-2").await;
    assert!(
        !node2
            .iter()
            .any(|f| f["IP"]["source"] == victim_ip.to_string()
                && f["IP"]["destination"] == target.to_string()),
        "node-2 saw none of the spoofed packets: {node2:#?}"
    );
    // The pod's own traffic still flows.
    expect_reachability(
        &cluster,
        "own address still open",
        DEADLINE,
        &[("pod-1-1", "pod-2-1", 80, true)],
    )
    .await;
    let node1 = agent_flows(&cluster, "node-1").await;
    assert!(
        has_flow(
            &node1,
            "pod-1-1",
            "pod-2-1",
            Some(80),
            "forwarded-encrypted"
        ),
        "the attacker's own traffic is forwarded: {node1:#?}"
    );

    cluster.teardown().expect("teardown");
}
