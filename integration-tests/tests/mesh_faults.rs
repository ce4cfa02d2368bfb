//! Issue 17, "Faults in the virtual cluster": each fault of docs/faults.md is injected with
//! `meshctl::fault::run` (what `meshctl demo fault <kind>` runs against `meshctl demo up`) while a
//! 10 ms ping and a TCP stream run across nodes, and its loss and recovery figures are asserted
//! and printed (docs/benchmarks.md, "Faults"). Two clusters of three nodes, one per test, each
//! reused for several faults:
//!
//! - the control plane: the API server stopped for `$WIREMESH_FAULT_APISERVER_STOP_SECS` (60 s by
//!   default, as the issue says), then slow, then one agent gone for good until its Node goes;
//! - the nodes: a reboot with the keystore kept, one with it lost, the underlay link down and up,
//!   the underlay address changed; first of all an agent crash, to measure the supervisor.

#[path = "mesh_support/support.rs"]
mod support;

use std::time::Duration;

use meshctl::fault::{self, Fault, FaultReport};
use support::*;
use wiremesh_integration::{ClusterDescription, Role, VirtualCluster};

async fn inject(cluster: &VirtualCluster, fault: Fault) -> (FaultReport, ClusterDescription) {
    let mut description = cluster.description();
    let started = std::time::Instant::now();
    let report = fault::run(cluster.client(), &mut description, &fault, |line| {
        eprintln!("[{:>5.1}s] {line}", started.elapsed().as_secs_f64());
    })
    .await
    .unwrap_or_else(|e| {
        print_agent_logs(cluster);
        panic!("{}: {e:#}", fault.command())
    });
    for line in report.lines() {
        eprintln!("    {line}");
    }
    if !report.problems.is_empty() {
        print_agent_logs(cluster);
    }
    assert!(
        report.problems.is_empty(),
        "{}: {:?}",
        report.command,
        report.problems
    );
    // Flows between nodes the fault does not touch lose nothing, whatever the fault.
    assert_eq!(report.other.ping.lost(), 0, "{}", report.command);
    assert!(
        report.other.ping.sent > 100,
        "the ping ran: {:?}",
        report.other.ping.sent
    );
    (report, description)
}

/// Lines of `node`'s agent log that contain every one of `parts`.
fn agent_log_lines(cluster: &VirtualCluster, node: &str, parts: &[&str]) -> usize {
    let log = cluster
        .node(node)
        .ok()
        .and_then(|n| n.agent_log.clone())
        .expect("agent log");
    std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("{}: {e}", log.display()))
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}

/// Lines of `node`'s agent log where the steering task says `what` (`program attached` /
/// `program detached`) about an underlay program.
fn underlay_program_lines(cluster: &VirtualCluster, node: &str, what: &str) -> usize {
    agent_log_lines(cluster, node, &[what, "program=\"underlay_"])
}

/// What node-3's agent logs when it closes the API connections from an address that left.
const CLOSED_FROM_REMOVED: &str = "address removed: closed the API connections from it";

/// `wiremesh_api_connections_closed_total{reason="address_removed"}` of `node`'s agent.
async fn connections_closed_for_removed_address(cluster: &VirtualCluster, node: &str) -> f64 {
    let series = "wiremesh_api_connections_closed_total{reason=\"address_removed\"} ";
    let metrics = agent_metrics(cluster, node).await.expect("metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{node}: no {series:?} in /metrics"))
}

fn figure(report: &FaultReport, name: &str) -> f64 {
    *report
        .figures
        .get(name)
        .unwrap_or_else(|| panic!("{}: no figure {name:?}", report.command))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_faults_keep_the_mesh_on_its_last_configuration() {
    let Some(cluster) = start_mesh_or_skip(Shape::new(3, 1).with_api_proxy()).await else {
        return;
    };
    let stop_secs: f64 = std::env::var("WIREMESH_FAULT_APISERVER_STOP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);

    // 1. The API server stopped: traffic flows on, no peer goes, every agent resyncs without
    //    relisting.
    let (report, _) = inject(
        &cluster,
        Fault::ApiserverStop {
            duration: Duration::from_secs_f64(stop_secs),
        },
    )
    .await;
    assert!(report.other.lossless(), "{:?}", report.other.tcp);
    assert!(report.recovery.is_some(), "every agent watched again");
    assert!(
        figure(&report, "max lists per agent in window")
            <= fault::bounds::LISTS_AFTER_RETURN as f64
    );
    assert!(
        figure(&report, "max requests per agent in window")
            <= fault::bounds::REQUESTS_AFTER_RETURN as f64
    );

    // 4. The API server slow: nothing lost, no pile-up of requests or connections.
    let (report, _) = inject(
        &cluster,
        Fault::ApiserverSlow {
            delay: Duration::from_secs(2),
            duration: Duration::from_secs(15),
        },
    )
    .await;
    assert!(report.other.lossless(), "{:?}", report.other.tcp);
    assert!(
        figure(&report, "max extra open connections per agent")
            <= fault::bounds::EXTRA_OPEN_WHILE_SLOW as f64
    );

    // 5. node-3's agent gone for good: its peers keep it (its datapath too: its flow loses
    //    nothing) until its Node is deleted, then remove it.
    let (report, _) = inject(
        &cluster,
        Fault::AgentGone {
            node: "node-3".into(),
            delete_after: Duration::from_secs(10),
        },
    )
    .await;
    let own = report.own.as_ref().expect("flow to node-3");
    assert_eq!(
        own.ping.lost(),
        0,
        "node-3 kept forwarding on its last configuration"
    );
    assert!(own.lossless(), "{:?}", own.tcp);
    assert!(
        report.recovery.is_some(),
        "node-3 removed after its Node went"
    );
    cluster.teardown().expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_faults_recover_and_other_nodes_lose_nothing() {
    let Some(mut cluster) = start_mesh_or_skip(Shape::new(3, 1)).await else {
        return;
    };

    // The supervisor restarts a crashed agent, and cluster.json's agentPid follows.
    let killed = cluster
        .kill_supervised("node-2", Role::Agent)
        .expect("kill agent");
    let killed_at = std::time::Instant::now();
    let restarted = wait_restarted(&cluster, "node-2", Role::Agent, killed);
    let restart = killed_at.elapsed();
    let json = cluster.work_dir().join("cluster-faults.json");
    cluster.description().write(&json).expect("write");
    let read = ClusterDescription::read(&json).expect("read");
    eprintln!(
        "supervisor: agent of node-2 restarted {:.0} ms after kill -9 (pid {} -> {}); cluster.json agentPid {:?}",
        restart.as_secs_f64() * 1000.0,
        killed.pid,
        restarted.pid,
        read.node("node-2").and_then(|n| n.agent_pid)
    );
    assert_eq!(
        read.node("node-2").and_then(|n| n.agent_pid),
        Some(restarted.pid),
        "agentPid follows the restart"
    );
    wait_converged(&cluster).await;

    // 2. node-3 rebooted with its keystore (same key), then with it lost (a new key; the stale
    //    peer goes everywhere): its flows come back, the others lose nothing.
    for lose_keystore in [false, true] {
        let (report, _) = inject(
            &cluster,
            Fault::NodeReboot {
                node: "node-3".into(),
                lose_keystore,
                down_for: Duration::from_secs(1),
            },
        )
        .await;
        assert!(report.other.lossless(), "{:?}", report.other.tcp);
        assert!(report.recovery.is_some());
        wait_converged(&cluster).await;
    }

    // 3. node-3's underlay link down for 3 s and up: its TCP stream survives, its ping resumes.
    let (report, _) = inject(
        &cluster,
        Fault::UnderlayFlap {
            node: "node-3".into(),
            down_for: Duration::from_secs(3),
        },
    )
    .await;
    let own = report.own.as_ref().expect("flow to node-3");
    assert!(
        matches!(&own.tcp, Ok((s, r)) if s == r),
        "the TCP stream survived the link flap: {:?}",
        own.tcp
    );
    assert!(report.recovery.is_some());

    // ... and node-3 moved to another underlay address: every peer follows its Node's new
    // address at once (its stale endpoint annotation is replaced with its InternalIP), no peer
    // is removed, its flows lose nothing but what was in flight while it had no address (no
    // TCP reset); its own agent republishes the annotation later.
    let attached_before = underlay_program_lines(&cluster, "node-3", "program attached");
    assert!(
        attached_before > 0,
        "node-3 runs the eBPF underlay programs"
    );
    let detached_before = underlay_program_lines(&cluster, "node-3", "program detached");
    let closed_before = agent_log_lines(&cluster, "node-3", &[CLOSED_FROM_REMOVED]);
    let (report, description) = inject(
        &cluster,
        Fault::UnderlayReaddress {
            node: "node-3".into(),
            ip: None,
        },
    )
    .await;
    assert!(report.other.lossless(), "{:?}", report.other.tcp);
    let own = report.own.as_ref().expect("flow to node-3");
    if !own.lossless() {
        print_agent_logs(&cluster);
    }
    assert!(own.ping.sent > 100, "the ping ran: {}", own.ping.sent);
    // What reached node-3 while it had no underlay address at all (the old one deleted, the
    // new one not added: a few ms) is lost whatever the mesh does; nothing else may be.
    assert_eq!(
        figure(&report, "own pings lost outside the address switch"),
        0.0,
        "the readdressed node's ping lost nothing the mesh could deliver (longest gap {:?})",
        own.ping.longest_gap_time()
    );
    assert_eq!(
        f64::from(own.ping.lost()),
        figure(&report, "own pings lost while the node had no address")
    );
    assert!(
        matches!(&own.tcp, Ok((s, r)) if s == r),
        "the readdressed node's TCP stream survived: {:?}",
        own.tcp
    );
    assert!(report.recovery.is_some());
    // node-3's agent knows its Node's old address until the annotation follows: its Strict
    // mode underlay guard stays attached meanwhile (it was detached for those ~22 s).
    assert_eq!(
        underlay_program_lines(&cluster, "node-3", "program detached"),
        detached_before,
        "node-3 detached its underlay programs after the readdress"
    );
    let peers = figure(&report, "peers' endpoints followed (s)");
    let annotation = figure(&report, "endpoint annotation followed (s)");
    assert!(
        peers <= annotation,
        "peers follow the Node's address, not only the annotation: {peers} s vs {annotation} s"
    );
    // node-3's agent learnt its Node's new address because it closed its API connections from
    // the removed one when the address went (not when keepalive gave up on them, ~22 s).
    assert!(
        agent_log_lines(&cluster, "node-3", &[CLOSED_FROM_REMOVED]) > closed_before,
        "node-3's agent closed its API connections from the removed address"
    );
    let new_ip = description.node("node-3").expect("node-3").underlay_ip;
    cluster.set_underlay_ip("node-3", new_ip).expect("node-3");
    assert!(
        connections_closed_for_removed_address(&cluster, "node-3").await >= 1.0,
        "counted in node-3's metrics"
    );
    wait_converged(&cluster).await;
    cluster.teardown().expect("teardown");
}
