//! Issue 4, "Done when" 4: a node with a garbage key annotation gets a Warning Event, is counted
//! in `wiremesh_invalid_annotations_total`, and is skipped; the other nodes stay fully meshed.
//! When the node's own agent starts, it replaces the garbage with its real key and the node joins.
//!
//! Issue 13, finding 13: exactly one Event cluster-wide (one emitter, node-1, not one per agent;
//! main produced one from each agent), the metric series on that agent only, and the series gone
//! once the node is fixed.

#[path = "mesh_support/support.rs"]
mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use meshctl::demo;
use serde_json::json;
use support::*;

/// `wiremesh_reconciles_total{result="ok"}` of `node`'s agent.
async fn reconciles(cluster: &wiremesh_integration::VirtualCluster, node: &str) -> u64 {
    let text = agent_metrics(cluster, node).await.expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix("wiremesh_reconciles_total{result=\"ok\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_annotation_is_reported_and_skipped_while_others_stay_meshed() {
    let Some(mut cluster) = start_mesh_or_skip(Shape::new(2, 1).with_spare_nodes(1)).await else {
        return;
    };
    let marker = marker("invalid");

    // node-3 exists (namespace, pod, Node) but runs no agent; someone writes garbage on it.
    let bad = cluster.add_node().await.expect("add node").name.clone();
    cluster.add_pod(&bad, None).await.expect("add pod");
    let ip = cluster.node(&bad).expect("node").network.underlay_ip;
    let nodes: Api<Node> = Api::all(cluster.client().clone());
    nodes
        .patch(
            &bad,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "wiremesh.io/public-key": "this is !!! not base64",
                "wiremesh.io/endpoint": format!("{ip}:51871"),
                "wiremesh.io/key-generation": "1",
            }}})),
        )
        .await
        .expect("patch garbage");

    // Exactly one agent (node-1, the lowest-named healthy node) records one Warning Event.
    let cluster_ref = &cluster;
    let events = wiremesh_integration::wait::until(
        "an Event on node-3",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || async move {
            let events = agent_events(cluster_ref, "node-3").await;
            let instances: std::collections::BTreeSet<_> = events
                .iter()
                .filter_map(|e| e.reporting_instance.clone())
                .collect();
            if !events.is_empty() {
                Ok((events, instances))
            } else {
                Err(format!("{} events from {instances:?}", events.len()))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (events, instances) = events;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(
        instances.into_iter().collect::<Vec<_>>(),
        ["mesh-agent-node-1".to_string()]
    );
    for event in &events {
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        let reason = event.reason.as_deref().unwrap_or_default();
        assert!(reason.starts_with("Invalid"), "reason {reason}");
        let note = event.note.as_deref().unwrap_or_default();
        assert!(note.contains("wiremesh.io/public-key"), "note {note}");
    }

    // The metric counts it on the emitter only (one series cluster-wide, not one per agent).
    let series = |text: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("wiremesh_invalid_annotations_total{")
                    && l.contains("node=\"node-3\"")
            })
            .map(str::to_string)
    };
    let text = agent_metrics(&cluster, "node-1").await.expect("metrics");
    let line = series(&text)
        .unwrap_or_else(|| panic!("node-1: no invalid-annotation metric for node-3:\n{text}"));
    assert!(line.ends_with(" 1"), "node-1: {line}");
    let text = agent_metrics(&cluster, "node-2").await.expect("metrics");
    assert_eq!(series(&text), None, "node-2 is not the emitter");

    // node-3 is skipped: no peer, no route; node-1 and node-2 stay meshed and converged.
    for node in ["node-1", "node-2"] {
        assert_eq!(wg_peers(&cluster, node).expect("wg").len(), 1, "{node}");
        assert!(!mesh_routes(&cluster, node).contains(&"10.244.3.0/24".to_string()));
    }
    let status = meshctl::status::collect(cluster.client())
        .await
        .expect("status");
    assert!(
        status.node("node-1").expect("node-1").converged(),
        "{:?}",
        status.all_problems()
    );
    assert!(
        status.node("node-2").expect("node-2").converged(),
        "{:?}",
        status.all_problems()
    );
    assert!(!status.node("node-3").expect("node-3").converged());
    assert_reachable(&cluster, "pod-1-1", "pod-2-1", marker.as_bytes());

    // Many more reconciles (every Node change wakes every agent) do not add Events.
    let mut passes_before = Vec::new();
    for node in ["node-1", "node-2"] {
        passes_before.push(reconciles(&cluster, node).await);
    }
    for i in 0..5 {
        nodes
            .patch(
                &bad,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"touch": i.to_string()}}})),
            )
            .await
            .expect("touch node-3");
    }
    for (node, before) in ["node-1", "node-2"].into_iter().zip(passes_before) {
        let cluster_ref = &cluster;
        wiremesh_integration::wait::until(
            &format!("{node} reconciled after the touches"),
            Duration::from_secs(30),
            Duration::from_millis(250),
            || async move {
                let now = reconciles(cluster_ref, node).await;
                if now > before {
                    Ok(())
                } else {
                    Err(format!("{now} passes"))
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let after = agent_events(&cluster, "node-3").await;
    assert_eq!(after.len(), events.len(), "events were not deduplicated");

    // node-3's own agent replaces the garbage (new key, generation 2) and the node joins.
    demo::start_agent(&mut cluster, &bad, &agent_binary(), &[]).expect("start agent");
    let status = wait_converged(&cluster).await;
    assert_eq!(
        status.node("node-3").expect("node-3").key_generation,
        Some(2)
    );
    assert_reachable(&cluster, "pod-1-1", "pod-3-1", marker.as_bytes());
    // Fixed: the series is gone.
    let cluster_ref = &cluster;
    wiremesh_integration::wait::until(
        "node-1 drops the invalid-annotation series of node-3",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async move {
            let text = agent_metrics(cluster_ref, "node-1")
                .await
                .map_err(|e| e.to_string())?;
            match series(&text) {
                None => Ok(()),
                Some(line) => Err(line),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    cluster.teardown().expect("teardown");
}
