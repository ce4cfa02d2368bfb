//! Issue 12, "Done when" (drift): every resync reads the device and the routing table back and
//! repairs them. A peer removed by hand with `wg set` and a route deleted with `ip route del` come
//! back within one resync. A CNI's route for a remote pod prefix in the main table is never
//! overwritten or deleted; disabling the mesh removes the agent's rule and table, so that route
//! carries the traffic again, and enabling it brings the tunnel back. `MeshEncryption.spec.datapath`
//! is acted on at run time (Kernel where the userspace device holds the interface: an error in
//! status and an Event, the running device kept; Auto: ready again).

#[path = "mesh_support/support.rs"]
mod support;

use std::time::{Duration, Instant};

use meshctl::demo;
use support::*;

/// The agents' resync interval in this test.
const RESYNC: Duration = Duration::from_secs(3);

/// The device `ip route get` picks from `node` to `ip`.
fn route_dev(cluster: &wiremesh_integration::VirtualCluster, node: &str, ip: &str) -> String {
    let out = cluster
        .exec_in_node(node, ["ip", "-o", "route", "get", ip])
        .expect("ip route get");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

fn run_in_node(cluster: &wiremesh_integration::VirtualCluster, node: &str, argv: &[&str]) {
    let out = cluster.exec_in_node(node, argv).expect("exec");
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn show(cluster: &wiremesh_integration::VirtualCluster, node: &str, argv: &[&str]) -> String {
    String::from_utf8_lossy(&cluster.exec_in_node(node, argv).expect("exec").stdout).to_string()
}

/// node-1's routes to `cidr` with protocol static (the test's "CNI route").
fn static_routes(cluster: &wiremesh_integration::VirtualCluster, cidr: &str) -> String {
    show(
        cluster,
        "node-1",
        &["ip", "route", "show", cidr, "proto", "static"],
    )
}

async fn set_datapath(cluster: &wiremesh_integration::VirtualCluster, mode: &str) {
    let api: kube::Api<wiremesh_crds::MeshEncryption> = kube::Api::all(cluster.client().clone());
    api.patch(
        "default",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"spec": {"datapath": mode}})),
    )
    .await
    .unwrap_or_else(|e| panic!("set datapath {mode}: {e}"));
}

async fn ok_passes(cluster: &wiremesh_integration::VirtualCluster, node: &str) -> u64 {
    let metrics = agent_metrics(cluster, node).await.expect("metrics");
    metrics
        .lines()
        .find(|l| l.starts_with("wiremesh_reconciles_total{result=\"ok\"}"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_repaired_and_routes_of_others_are_left_alone() {
    let resync = RESYNC.as_secs().to_string();
    let Some(cluster) =
        start_mesh_or_skip_with_args(Shape::new(2, 1), &["--resync-interval-secs", &resync]).await
    else {
        return;
    };
    let tunnel = ifname(&cluster, "node-1");
    let node2 = cluster.node("node-2").expect("node-2").network.clone();
    let cidr2 = node2.pod_cidr.to_string();
    let pod2 = cluster.pod("pod-2-1").expect("pod").network.ip.to_string();
    let key2 = published_key(&cluster, "node-2").await.expect("key");
    let one_resync = RESYNC + Duration::from_secs(2);

    // A peer removed by hand comes back within one resync.
    run_in_node(
        &cluster,
        "node-1",
        &["wg", "set", &tunnel, "peer", &key2, "remove"],
    );
    assert!(wg_peers(&cluster, "node-1").expect("wg").is_empty());
    let started = Instant::now();
    eventually("peer repaired", one_resync * 2, || {
        let peers = wg_peers(&cluster, "node-1")?;
        if peers == [key2.clone()] {
            Ok(())
        } else {
            Err(format!("peers {peers:?}"))
        }
    })
    .await;
    let peer_repair = started.elapsed();

    // A route deleted by hand comes back within one resync.
    run_in_node(
        &cluster,
        "node-1",
        &["ip", "route", "del", &cidr2, "table", "87"],
    );
    assert!(!mesh_routes(&cluster, "node-1").contains(&cidr2));
    let started = Instant::now();
    eventually("route repaired", one_resync * 2, || {
        let routes = mesh_routes(&cluster, "node-1");
        if routes.contains(&cidr2) {
            Ok(())
        } else {
            Err(format!("routes {routes:?}"))
        }
    })
    .await;
    let route_repair = started.elapsed();
    eprintln!(
        "drift repaired with --resync-interval-secs {}: peer after {:.1} s, route after {:.1} s",
        RESYNC.as_secs(),
        peer_repair.as_secs_f64(),
        route_repair.as_secs_f64()
    );
    assert!(
        peer_repair <= one_resync,
        "peer repaired in {peer_repair:?}"
    );
    assert!(
        route_repair <= one_resync,
        "route repaired in {route_repair:?}"
    );
    let metrics = agent_metrics(&cluster, "node-1").await.expect("metrics");
    for what in ["peer", "route"] {
        assert!(
            metrics.contains(&format!(
                "wiremesh_datapath_repairs_total{{what=\"{what}\"}} 1"
            )),
            "repair of a {what} counted: {metrics}"
        );
    }

    // A CNI's route to the same remote pod prefix in the main table, at metric 0 (what the agent
    // used to replace): left alone through resyncs, while our rule sends the traffic to the tunnel.
    let via = node2.underlay_ip.to_string();
    run_in_node(
        &cluster,
        "node-1",
        &[
            "ip", "route", "add", &cidr2, "via", &via, "metric", "0", "proto", "static",
        ],
    );
    let cni_route = static_routes(&cluster, &cidr2);
    assert!(cni_route.contains(&via), "{cni_route}");
    let before = ok_passes(&cluster, "node-1").await;
    let c = &cluster;
    wait_async("two more passes", one_resync * 3, || async move {
        if ok_passes(c, "node-1").await >= before + 2 {
            Ok(())
        } else {
            Err("waiting for resyncs".to_string())
        }
    })
    .await;
    assert_eq!(
        static_routes(&cluster, &cidr2),
        cni_route,
        "the CNI route is untouched"
    );
    assert!(
        show(&cluster, "node-1", &["ip", "rule", "show"]).contains("lookup 87"),
        "our rule"
    );
    assert_eq!(
        route_dev(&cluster, "node-1", &pod2),
        tunnel,
        "mesh on: tunnel"
    );

    // Disabled: our rule and table go, the CNI route is in force again and carries the traffic.
    demo::set_mesh_enabled(cluster.client(), false)
        .await
        .expect("disable the mesh");
    eventually("rule and table removed", Duration::from_secs(30), || {
        let rules = show(&cluster, "node-1", &["ip", "rule", "show"]);
        let table = show(&cluster, "node-1", &["ip", "route", "show", "table", "87"]);
        if !rules.contains("lookup 87") && table.trim().is_empty() {
            Ok(())
        } else {
            Err(format!("rules {rules:?}, table 87 {table:?}"))
        }
    })
    .await;
    assert_eq!(
        static_routes(&cluster, &cidr2),
        cni_route,
        "the CNI route survives the disable"
    );
    assert_eq!(
        route_dev(&cluster, "node-1", &pod2),
        "eth0",
        "mesh off: the CNI route"
    );
    let marker = marker("drift");
    assert_reachable(&cluster, "pod-1-1", "pod-2-1", marker.as_bytes());

    // Enabled again: rule, routes and tunnel are back.
    demo::set_mesh_enabled(cluster.client(), true)
        .await
        .expect("enable the mesh");
    wait_converged(&cluster).await;
    eventually("tunnel route back", Duration::from_secs(30), || {
        let dev = route_dev(&cluster, "node-1", &pod2);
        if dev == tunnel {
            Ok(())
        } else {
            Err(format!("route via {dev}"))
        }
    })
    .await;
    assert_reachable(&cluster, "pod-1-1", "pod-2-1", marker.as_bytes());
    assert_eq!(static_routes(&cluster, &cidr2), cni_route);

    // `spec.datapath` acts at run time: Kernel while the userspace device holds the interface is
    // an error (status, Event), the running device keeps the tunnels; Auto again is ready again.
    set_datapath(&cluster, "Kernel").await;
    let c = &cluster;
    wait_async(
        "node-1 reports the kernel datapath unavailable",
        Duration::from_secs(30),
        || async move {
            match agent_http(c, "node-1", "/readyz").await {
                Err(e) if e.contains("503") => {}
                other => return Err(format!("/readyz: {other:?}")),
            }
            let status = agent_api(c, "node-1", "/status").await?;
            if status.contains("not a kernel wireguard link") {
                Ok(())
            } else {
                Err(format!("/status: {status}"))
            }
        },
    )
    .await;
    assert_reachable(&cluster, "pod-1-1", "pod-2-1", marker.as_bytes());
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::all(cluster.client().clone());
    let reasons: Vec<String> = events
        .list(&kube::api::ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("node-1"))
        .filter_map(|e| e.reason)
        .collect();
    for reason in ["DatapathSelected", "DatapathUnavailable"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "Event {reason} on node-1: {reasons:?}"
        );
    }
    set_datapath(&cluster, "Auto").await;
    wait_agent_ready(&cluster, "node-1", Duration::from_secs(30)).await;
    let metrics = agent_metrics(&cluster, "node-1").await.expect("metrics");
    assert!(
        metrics.contains(
            "wiremesh_datapath_info{kind=\"userspace\",reason=\"adopted-userspace-device\"} 1"
        ),
        "{metrics}"
    );
    cluster.teardown().expect("teardown");
}
