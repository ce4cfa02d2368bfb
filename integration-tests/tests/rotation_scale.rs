//! Issue 14 target: a rotation of 100 nodes completes in <= 30 s. 100 simulated agents, each with
//! its own node credentials (a real kube client and KeyRotation watch per node), move their
//! node's `wiremesh.io/rotation` mark as the phases advance; one real coordinator (Lease, watches,
//! status writes) drives the phases. This measures the control plane of a rotation (API round
//! trips, watch fan-out, coordinator passes), not the datapath. The time is printed (and kept in
//! docs/benchmarks.md), not asserted; completion is.

#[path = "rotation_support/support.rs"]
mod support;

use std::time::{Duration, Instant};

use kube::{Api, Client};
use meshctl::rotate::{self, RotateOptions};
use support::*;
use wiremesh_crds::{KeyRotation, RotationPhase};

const NODE_COUNT: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_node_rotation_completes() {
    let nodes: Vec<String> = (1..=NODE_COUNT).map(|i| format!("sim-{i:03}")).collect();
    let setup = setup("rotation-scale", &nodes, |_| "all").await;
    let admin = setup.admin.clone();
    objects_read_rbac(&admin).await;

    let agents = setup.spawn_simulated_agents(&nodes).await;
    let lease = format!("wm-scale-{}", std::process::id());
    let coordinator = start(&setup.coordinator_client().await, "sim-001", &lease);
    wiremesh_integration::wait::until(
        "the coordinator to hold the Lease",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || holder(&admin, &lease),
    )
    .await
    .expect("leader");

    let started = Instant::now();
    let created = rotate::create(&admin, &RotateOptions::default())
        .await
        .expect("create");
    let name = kube::ResourceExt::name_any(&created);
    let mut phases = Vec::new();
    for phase in [
        RotationPhase::Preparing,
        RotationPhase::Switching,
        RotationPhase::Retiring,
        RotationPhase::Complete,
    ] {
        wait_phase(&admin, &name, phase, Duration::from_secs(120)).await;
        phases.push((phase, started.elapsed()));
    }
    let total = started.elapsed();
    let done = Api::<KeyRotation>::all(admin.clone())
        .get(&name)
        .await
        .expect("get");
    let status = done.status.expect("status");
    assert_eq!(
        status.nodes_total,
        i32::try_from(NODE_COUNT).expect("small")
    );
    assert_eq!(status.progress.as_deref(), Some("100/100"));
    println!(
        "rotation of {NODE_COUNT} simulated nodes: Complete after {:.2} s; phase reached at {}",
        total.as_secs_f64(),
        phases
            .iter()
            .map(|(p, t)| format!("{p} {:.2} s", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );

    coordinator.trigger.start();
    let _ = tokio::time::timeout(Duration::from_secs(10), coordinator.task).await;
    for agent in agents {
        agent.abort();
    }
    setup.teardown().await;
}

/// Node users read Nodes and KeyRotations through the read RBAC the DaemonSet ships.
async fn objects_read_rbac(admin: &Client) {
    wiremesh_integration::objects::install_node_read_rbac(admin)
        .await
        .expect("read RBAC");
}
