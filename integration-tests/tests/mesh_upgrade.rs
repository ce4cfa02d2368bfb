//! Upgrading over pins of an older build: node-2's agent is killed, its pinned `wm_config` is
//! replaced by a map of another shape (as a build with another `struct wm_config` would have
//! left it) and the agent started again. It loads a new generation of maps beside the old ones,
//! fills them, swaps its programs into the pinned links and removes the old map pins; a probe
//! of a denied flow running through kill, downtime and upgrade never gets through.

#[path = "mesh_support/support.rs"]
mod support;

use std::time::Duration;

use serde_json::json;
use support::*;
use wiremesh_integration::{Role, pin_map_of_another_shape};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_upgrades_pins_of_another_shape_without_an_enforcement_gap() {
    let Some(mut cluster) = start_mesh_or_skip(Shape::new(2, 2)).await else {
        return;
    };
    set_mesh_mode(&cluster, "Strict").await;
    label_pod(&cluster, "pod-2-1", json!({"role": "web"})).await;
    label_pod(&cluster, "pod-2-2", json!({"role": "other"})).await;
    label_pod(&cluster, "pod-1-1", json!({"role": "client"})).await;
    create_web_from_clients(&cluster).await;
    let _server = EchoServer::start(&cluster, "pod-2-1", 80);
    let expected = [
        ("pod-1-1", "pod-2-1", 80, true),
        ("pod-2-2", "pod-2-1", 80, false),
    ];
    expect_reachability(
        &cluster,
        "policy enforced",
        Duration::from_secs(20),
        &expected,
    )
    .await;

    let probe = GapProbe::start(&cluster, "pod-2-2", "pod-2-1", 80);
    // The agent is stopped while the new build's pins are put in place, then restarted.
    cluster
        .hold_restarts("node-2", Role::Agent, true)
        .expect("hold restarts");
    kill_agent(&mut cluster, "node-2");
    let pins = cluster.bpffs().join("wiremesh/node-2");
    pin_map_of_another_shape(&pins.join("wm_config"), 8).expect("pin a map of another shape");
    // The pinned programs keep enforcing while the agent is down.
    eventually(
        "the probe ran while the agent was down",
        Duration::from_secs(10),
        || {
            let attempts = probe.attempts();
            if attempts >= 5 {
                Ok(())
            } else {
                Err(format!("{attempts} attempts"))
            }
        },
    )
    .await;
    cluster
        .hold_restarts("node-2", Role::Agent, false)
        .expect("release restarts");
    wait_converged(&cluster).await;
    expect_reachability(
        &cluster,
        "policy enforced after the upgrade",
        Duration::from_secs(30),
        &expected,
    )
    .await;
    wait_async("old map pins removed", Duration::from_secs(20), || {
        let pins = pins.clone();
        async move {
            let old = pins.join("wm_config").exists() || pins.join("wm_ipcache4").exists();
            let new = pins.join("gen-1/wm_config").exists();
            if !old && new {
                Ok(())
            } else {
                Err(format!("old pins present: {old}, gen-1 present: {new}"))
            }
        }
    })
    .await;
    probe.assert_never_through("kill and upgrade");
    let log = agent_log(&cluster, "node-2");
    assert!(
        log.contains("upgrade finished"),
        "the agent reports the finished upgrade"
    );
    // The new maps follow the API.
    delete_policy(&cluster, "web-from-clients").await;
    expect_reachability(
        &cluster,
        "policy deleted after the upgrade",
        Duration::from_secs(15),
        &[("pod-2-2", "pod-2-1", 80, true)],
    )
    .await;

    cluster.teardown().expect("teardown");
}
