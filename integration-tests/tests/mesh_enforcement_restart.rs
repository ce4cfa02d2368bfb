//! Issue 5, "Done when" 3: an agent killed with SIGKILL leaves enforcement in place (maps and
//! links pinned in its bpffs directory): a denied flow stays denied, an allowed one stays
//! allowed, the tunnel (the device process is not the agent's) keeps carrying cross-node traffic,
//! and strict mode keeps pod traffic off the underlay in plaintext while it is down.
//! The restarted agent re-adopts the pins (the programs are swapped into the pinned links) and
//! a probe running through kill, downtime and restart never gets the denied flow through.

#[path = "mesh_support/support.rs"]
mod support;

use std::time::Duration;

use meshctl::{capture, demo, traffic};
use serde_json::json;
use support::*;
use wiremesh_integration::Role;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_leaves_enforcement_in_place_and_the_restart_re_adopts_it() {
    let Some(mut cluster) = start_mesh_or_skip(Shape::new(2, 3)).await else {
        return;
    };
    set_mesh_mode(&cluster, "Strict").await;
    label_pod(&cluster, "pod-2-1", json!({"role": "web"})).await;
    label_pod(&cluster, "pod-2-2", json!({"role": "client"})).await;
    label_pod(&cluster, "pod-2-3", json!({"role": "other"})).await;
    label_pod(&cluster, "pod-1-1", json!({"role": "client"})).await;
    create_web_from_clients(&cluster).await;
    let _servers: Vec<EchoServer> = [("pod-2-1", 80), ("pod-1-1", 80)]
        .into_iter()
        .map(|(pod, port)| EchoServer::start(&cluster, pod, port))
        .collect();
    let enforced = [
        ("pod-2-2", "pod-2-1", 80, true),
        ("pod-2-3", "pod-2-1", 80, false),
    ];
    let mut before: Vec<(&str, &str, u16, bool)> = enforced.to_vec();
    before.push(("pod-1-1", "pod-2-1", 80, true));
    expect_reachability(
        &cluster,
        "policy enforced before the kill",
        Duration::from_secs(20),
        &before,
    )
    .await;

    let probe = GapProbe::start(&cluster, "pod-2-3", "pod-2-1", 80);
    cluster
        .hold_restarts("node-2", Role::Agent, true)
        .expect("hold restarts");
    kill_agent(&mut cluster, "node-2");
    // The agent's pin directory, `<bpffs>/wiremesh/<node>` (wiremesh_bpf::node_pin_dir).
    let links = cluster.bpffs().join("wiremesh/node-2/links");
    let pins: Vec<String> = std::fs::read_dir(&links)
        .unwrap_or_else(|e| panic!("{}: {e}", links.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        pins.len() >= 8,
        "two programs per pod veth and two on the underlay stay pinned: {pins:?}"
    );

    // Agent down: the pinned programs keep deciding.
    expect_reachability(
        &cluster,
        "policy enforced while the agent is down",
        Duration::from_secs(10),
        &enforced,
    )
    .await;
    let description = cluster.description();
    let underlay = demo::underlay_of(&description).expect("underlay");
    let marker = marker("restart-strict");
    let (a, b) = (pod_end(&cluster, "pod-2-1"), pod_end(&cluster, "pod-1-1"));
    let c = &cluster;
    let ((tcp, udp), report) = tokio::task::block_in_place(|| {
        capture::during(
            &description.bridge,
            &underlay,
            marker.as_bytes(),
            Duration::from_millis(300),
            || {
                (
                    tcp_probe(
                        c,
                        "pod-2-1",
                        "pod-1-1",
                        80,
                        marker.as_bytes(),
                        Duration::from_millis(800),
                    ),
                    traffic::udp_echo(&a, &b, marker.as_bytes(), Duration::from_millis(500), 2),
                )
            },
        )
    })
    .expect("capture");
    // The device is not the agent's: its tunnel carries the traffic while the agent is down.
    tcp.expect("TCP through the tunnel while the agent is down");
    udp.expect("UDP through the tunnel while the agent is down");
    let plaintext: Vec<&String> = report
        .violations
        .iter()
        .filter(|v| v.starts_with("plaintext pod packet"))
        .collect();
    assert!(
        report.marker_hits == 0
            && plaintext.is_empty()
            && report.violation_count == report.violations.len(),
        "strict drops continue while the agent is down: {}\n{}",
        report.summary(),
        report.violations.join("\n")
    );

    // Restart: the pins are re-adopted and the mesh comes back.
    cluster
        .hold_restarts("node-2", Role::Agent, false)
        .expect("release restarts");
    wait_converged(&cluster).await;
    let mut after: Vec<(&str, &str, u16, bool)> = enforced.to_vec();
    after.push(("pod-1-1", "pod-2-1", 80, true));
    after.push(("pod-2-1", "pod-1-1", 80, true));
    expect_reachability(
        &cluster,
        "policy and tunnel after the restart",
        Duration::from_secs(30),
        &after,
    )
    .await;
    probe.assert_never_through("kill, downtime and restart");
    let log = agent_log(&cluster, "node-2");
    assert!(
        log.contains("replaced program in pinned link"),
        "the restarted agent swapped its programs into the pinned links"
    );

    // The re-adopted maps still follow the API: deleting the policy opens the denied flow.
    delete_policy(&cluster, "web-from-clients").await;
    expect_reachability(
        &cluster,
        "policy deleted after the restart",
        Duration::from_secs(15),
        &[("pod-2-3", "pod-2-1", 80, true)],
    )
    .await;

    cluster.teardown().expect("teardown");
}
