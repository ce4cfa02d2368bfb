//! The rotation coordinator against a real kube-apiserver (testenv on loopback, no root): two
//! candidates, one holds the Lease; `meshctl rotate` creates a KeyRotation; the leader moves it
//! through its phases as the nodes' marks advance (the marks are written here, standing in for
//! the agents); the leader's task is killed mid-rotation (no Lease release, as a SIGKILL) and the
//! other candidate takes over and continues from the recorded status to Complete, with Events.
//! A second rotation whose node never prepares fails after its phase timeout naming that node,
//! and `kubectl get keyrotations`' columns (the API's Table) show phase, progress and age;
//! `meshctl rotate --abort` fails a running rotation with reason Aborted.

#[path = "rotation_support/support.rs"]
mod support;

use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
};
use meshctl::rotate::{self, RotateOptions};
use serde_json::json;
use support::*;
use wiremesh_crds::{
    CONDITION_FAILED, KeyRotation, KeyRotationSpec, MeshEncryption, RotationPhase, find_condition,
    is_condition_true,
};
use wiremesh_integration::wait;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_failover_mid_rotation_and_phase_timeout() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("mesh_agent=info,kube_lease_manager=info")
        .with_test_writer()
        .try_init();
    let nodes: Vec<String> = NODES.iter().map(|n| n.to_string()).collect();
    let setup = setup("rotation-coord", &nodes, |n| {
        if n == "n3" { "edge" } else { "core" }
    })
    .await;
    let admin = setup.admin.clone();
    let lease = format!("wm-coord-{}", std::process::id());
    let mut candidates = Vec::new();
    for node in ["n1", "n2"] {
        // Each candidate has its own client (connection), as two agents would.
        let client = setup.coordinator_client().await;
        candidates.push((node, start(&client, node, &lease)));
    }
    let first = wait::until(
        "a coordinator to hold the Lease",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || holder(&admin, &lease),
    )
    .await
    .expect("leader elected");
    assert!(first == "n1" || first == "n2", "holder {first}");

    // meshctl rotate: every node.
    let created = rotate::create(
        &admin,
        &RotateOptions {
            reason: "coordinator test".into(),
            phase_timeout: Some("60s".into()),
            ..RotateOptions::default()
        },
    )
    .await
    .expect("create rotation");
    let name = kube::ResourceExt::name_any(&created);
    assert!(name.starts_with(rotate::GENERATE_NAME), "{name}");
    let r = wait_phase(
        &admin,
        &name,
        RotationPhase::Preparing,
        Duration::from_secs(30),
    )
    .await;
    let status = r.status.clone().expect("status");
    assert_eq!(status.participants, NODES);
    assert_eq!(status.selected_nodes, NODES);
    assert_eq!(status.progress.as_deref(), Some("0/3"));
    let id = rotation_id(&r);
    assert!(id.starts_with(&format!("{name}.")), "{id}");

    advance(&admin, &name, &id, "prepared", RotationPhase::Switching).await;

    // The Event of that phase change is recorded after the status write; let it land before the
    // kill (a coordinator killed between the two loses that Event, not the phase).
    wait_event(&admin, &name, "Preparing -> Switching").await;

    // Kill the leader's task: no release, its Lease must expire first.
    let killed_at = Instant::now();
    let index = candidates
        .iter()
        .position(|(n, _)| *n == first)
        .expect("leader is a candidate");
    let (_, leader) = candidates.remove(index);
    leader.task.abort();
    let _ = leader.task.await;
    let r = advance(&admin, &name, &id, "switched", RotationPhase::Retiring).await;
    let takeover = killed_at.elapsed();
    let second = holder(&admin, &lease).await.expect("holder");
    assert_ne!(second, first, "the surviving candidate took the Lease");
    assert_eq!(rotation_id(&r), id, "the plan survived the takeover");
    println!("takeover after the leader was killed: {takeover:?} (lease 4 s)");

    let r = advance(&admin, &name, &id, "retired", RotationPhase::Complete).await;
    let status = r.status.expect("status");
    assert_eq!(status.progress.as_deref(), Some("3/3"));
    assert!(is_condition_true(&status.conditions, "Complete"));
    assert!(status.completion_time.is_some());

    // Events on the rotation: every phase change, and the completion.
    for note in [
        "Pending -> Preparing",
        "Switching -> Retiring",
        "3 of 3 participants retired",
    ] {
        wait_event(&admin, &name, note).await;
    }

    // A second rotation of the edge pool whose node never prepares: fails after the timeout
    // naming it; the printer columns show it.
    let second_rotation = rotate::create(
        &admin,
        &RotateOptions {
            nodes: Some("pool=edge".into()),
            phase_timeout: Some("10s".into()),
            ..RotateOptions::default()
        },
    )
    .await
    .expect("create");
    let name2 = kube::ResourceExt::name_any(&second_rotation);
    let r = wait_phase(
        &admin,
        &name2,
        RotationPhase::Preparing,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(r.status.as_ref().expect("status").selected_nodes, ["n3"]);
    let id2 = rotation_id(&r);
    mark(&admin, "n1", &format!("{id2}=prepared")).await;
    mark(&admin, "n2", &format!("{id2}=prepared")).await;
    let failed = wait_phase(
        &admin,
        &name2,
        RotationPhase::Failed,
        Duration::from_secs(40),
    )
    .await;
    let status = failed.status.clone().expect("status");
    assert_eq!(status.failed_nodes, ["n3"]);
    assert_eq!(status.failed_during, Some(RotationPhase::Preparing));
    let condition = find_condition(&status.conditions, CONDITION_FAILED).expect("Failed");
    assert_eq!(condition.reason, "PhaseTimeout");
    assert!(
        condition.message.contains("n3") && condition.message.contains("old keys stay"),
        "{}",
        condition.message
    );
    let line = rotate::progress_line(&failed, Duration::from_secs(10));
    assert!(
        line.contains("Failed  2/3 nodes") && line.contains("PhaseTimeout"),
        "{line}"
    );

    let table = table(&admin).await;
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        ["Name", "Phase", "Done", "Reason", "Failed", "Age"]
    );
    let rows: Vec<Vec<String>> = table["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            r["cells"]
                .as_array()
                .expect("cells")
                .iter()
                .map(|c| match c {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .collect();
    println!("kubectl get keyrotations -o wide (API table): {rows:?}");
    assert!(
        rows.iter()
            .any(|r| r[0] == name && r[1] == "Complete" && r[2] == "3/3"),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .any(|r| r[0] == name2 && r[1] == "Failed" && r[2] == "2/3" && r[4] == "[\"n3\"]"),
        "{rows:?}"
    );

    // meshctl rotate --abort: a running rotation fails with reason Aborted, old keys kept.
    let third = rotate::create(&admin, &RotateOptions::default())
        .await
        .expect("create");
    let name3 = kube::ResourceExt::name_any(&third);
    wait_phase(
        &admin,
        &name3,
        RotationPhase::Preparing,
        Duration::from_secs(30),
    )
    .await;
    rotate::abort(&admin, &name3, "the test")
        .await
        .expect("abort");
    let aborted = wait_phase(
        &admin,
        &name3,
        RotationPhase::Failed,
        Duration::from_secs(30),
    )
    .await;
    let status = aborted.status.expect("status");
    let condition = find_condition(&status.conditions, CONDITION_FAILED).expect("Failed");
    assert_eq!(condition.reason, "Aborted");
    assert!(
        condition.message.contains("old keys stay in force"),
        "{}",
        condition.message
    );
    let again = rotate::abort(&admin, &name3, "the test")
        .await
        .expect("abort");
    assert_eq!(
        rotate::phase(&again),
        RotationPhase::Failed,
        "a finished rotation stays"
    );

    // The surviving candidate releases the Lease on drain.
    let (_, survivor) = candidates.pop().expect("one candidate left");
    survivor.trigger.start();
    tokio::time::timeout(Duration::from_secs(10), survivor.task)
        .await
        .expect("coordinator drains in time")
        .expect("coordinator task");
    assert!(
        holder(&admin, &lease).await.is_err(),
        "the Lease is released on drain"
    );
    setup.teardown().await;
}

/// `MeshEncryption.spec.keyRotationInterval`: with the last rotation completed two hours ago and
/// an interval of one hour, the coordinator creates one scheduled rotation of every node, and no
/// second one while it is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_rotation_when_the_interval_has_passed() {
    let nodes: Vec<String> = vec!["s1".into(), "s2".into()];
    let setup = setup("rotation-sched", &nodes, |_| "all").await;
    let admin = setup.admin.clone();
    let rotations = Api::<KeyRotation>::all(admin.clone());
    rotations
        .create(
            &Default::default(),
            &KeyRotation::new("past", KeyRotationSpec::default()),
        )
        .await
        .expect("create past rotation");
    let two_hours_ago = Timestamp::from_second(Timestamp::now().as_second() - 7200).expect("time");
    let status =
        json!({"status": {"phase": "Complete", "completionTime": two_hours_ago.to_string()}});
    rotations
        .patch_status("past", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("past rotation completed");
    Api::<MeshEncryption>::all(admin.clone())
        .create(
            &Default::default(),
            &serde_json::from_value(json!({
                "apiVersion": "wiremesh.io/v1alpha1", "kind": "MeshEncryption",
                "metadata": {"name": "default"},
                "spec": {"enabled": true, "keyRotationInterval": "1h"},
            }))
            .expect("mesh"),
        )
        .await
        .expect("MeshEncryption default");

    let lease = format!("wm-sched-{}", std::process::id());
    let coordinator = start(&setup.coordinator_client().await, "s1", &lease);
    let scheduled = wait::until(
        "a scheduled rotation",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let rotations = rotations.clone();
            async move {
                let list = rotations
                    .list(&ListParams::default().labels("wiremesh.io/scheduled=true"))
                    .await
                    .map_err(|e| e.to_string())?;
                list.items
                    .into_iter()
                    .next()
                    .ok_or_else(|| "none yet".to_string())
            }
        },
    )
    .await
    .expect("scheduled rotation created");
    let name = kube::ResourceExt::name_any(&scheduled);
    assert!(name.starts_with("scheduled-"), "{name}");
    assert_eq!(scheduled.spec.reason, "scheduled: keyRotationInterval 1h");
    let r = wait_phase(
        &admin,
        &name,
        RotationPhase::Preparing,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(r.status.expect("status").selected_nodes, ["s1", "s2"]);
    // Several passes later there is still exactly one open rotation.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = rotations.list(&ListParams::default()).await.expect("list");
    assert_eq!(all.items.len(), 2, "past + one scheduled: {:?}", all.items);

    coordinator.trigger.start();
    let _ = tokio::time::timeout(Duration::from_secs(10), coordinator.task).await;
    setup.teardown().await;
}
