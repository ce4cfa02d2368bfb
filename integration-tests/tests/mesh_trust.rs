//! Issue 13, findings 1, 2, 8 and 13, attempted on one three-node virtual cluster in Strict mode
//! (real apiserver, one network namespace per node and pod, the agents under their node
//! credentials). Each step failed on the code before the fix:
//!
//! - **13** (fan-out): the agents' live status is in `MeshNode` objects, not on the Nodes; a
//!   status heartbeat does not touch the Node (its resourceVersion stays); no per-peer metric
//!   series by default. (Before: a `wiremesh.io/status` annotation rewritten by every agent.)
//! - **1** (any node can claim any address): Pods on node-2 whose status claims the metadata
//!   server (169.254.169.254), the apiserver's address (outside the pod CIDRs) or the DNS
//!   service's address (inside `spec.serviceCIDRs`). node-1 routes none of them into its tunnel
//!   (`ip route get`, table 87, WireGuard allowed IPs, its pinned ipcache); one Event per address
//!   on node-2 (from one agent for the whole cluster, 13) and `wiremesh_pod_claims_refused{reason}`
//!   name them. (Before: each became a /32 towards node-2.)
//! - **2** (one bad claim cuts a node off): a Pod on node-2 claiming an address inside node-3's
//!   podCIDR. node-3 keeps its range on every node, and traffic to its pod still flows
//!   encrypted (capture on the underlay). (Before: both prefixes were dropped and Strict mode
//!   dropped node-3's traffic.)
//! - **8** (losing MeshEncryption drops Strict to plaintext): `kubectl delete meshencryption
//!   default`; every agent keeps Strict (metrics, `SettingsApplied=False` reason
//!   `MeshEncryptionMissing`), also node-1's agent after a `kill -9` and restart (the remembered
//!   spec is a file in its state directory), and a marker between pods on different nodes never
//!   crosses the underlay in plaintext. Only an explicit `mode: Disabled` changes it, and it installs no
//!   routes and no peers. (Before: the deletion removed every tunnel and the marker crossed in
//!   plaintext.)

#[path = "mesh_support/support.rs"]
mod support;

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use meshctl::traffic;
use serde_json::json;
use support::*;
use wiremesh_crds::{CONDITION_SETTINGS_APPLIED, MeshEncryption, MeshNode};
use wiremesh_integration::{Role, VirtualCluster, objects};

/// The namespace of the hostile pods (the cluster's apiserver is this test's own).
const ATTACKER_NS: &str = "attacker";
/// The cluster's service range in this test; the DNS service conventionally gets its 10th
/// address.
const SERVICE_CIDR: &str = "10.96.0.0/12";
const DNS_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const METADATA_SERVER: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// Inside node-3's podCIDR (10.244.3.0/24) and held by no pod of node-3.
const STOLEN: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 77);

/// Warning Events about `node` from the wiremesh agents: (reason, note, reporting instance).
async fn warnings_about(cluster: &VirtualCluster, node: &str) -> Vec<(String, String, String)> {
    agent_events(cluster, node)
        .await
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .map(|e| {
            (
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
                e.reporting_instance.unwrap_or_default(),
            )
        })
        .collect()
}

/// The value of the metric line starting with `series ` in `node`'s `/metrics`.
async fn metric(cluster: &VirtualCluster, node: &str, series: &str) -> Option<f64> {
    let text = agent_metrics(cluster, node).await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

async fn mesh_node(cluster: &VirtualCluster, node: &str) -> MeshNode {
    Api::<MeshNode>::all(cluster.client().clone())
        .get(node)
        .await
        .unwrap_or_else(|e| panic!("MeshNode {node}: {e}"))
}

/// `wg show <if> allowed-ips` in `node`'s namespace, one line per peer.
fn allowed_ips(cluster: &VirtualCluster, node: &str) -> String {
    let out = cluster
        .exec_in_node(node, ["wg", "show", &ifname(cluster, node), "allowed-ips"])
        .expect("wg show allowed-ips");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -4 route get <address>` in `node`'s namespace (an error when nothing routes it).
fn route_get(cluster: &VirtualCluster, node: &str, address: Ipv4Addr) -> String {
    let out = cluster
        .exec_in_node(node, ["ip", "-4", "route", "get", &address.to_string()])
        .expect("ip route get");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `node`'s pinned IPv4 ipcache, read from the pins (the agent keeps running).
fn ipcache(
    cluster: &VirtualCluster,
    node: &str,
) -> std::collections::BTreeMap<ipnet::Ipv4Net, wiremesh_bpf::IpcacheValue> {
    let pins = wiremesh_bpf::node_pin_dir(cluster.bpffs(), node);
    wiremesh_bpf::pinned_ipcache_entries(&pins)
        .unwrap_or_else(|e| panic!("{node}'s ipcache: {e}"))
        .into_iter()
        .collect()
}

/// The kubectl `make clients` puts in `.cache/bin`, if present.
fn kubectl() -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/bin/kubectl");
    path.exists().then_some(path)
}

fn settings_reason(node: &MeshNode) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_SETTINGS_APPLIED && c.status == "False")
        .map(|c| c.reason.clone())
}

/// TCP both ways and UDP between pod-1-1 and pod-3-1 work, and a capture on the underlay bridge
/// sees only WireGuard: no plaintext pod packet, `marker` never.
fn encrypted_both_ways(cluster: &VirtualCluster, marker: &str, what: &str) {
    let (a1, a3) = (pod_end(cluster, "pod-1-1"), pod_end(cluster, "pod-3-1"));
    let ((to3, from3, udp), report) = capture_underlay(cluster, marker, || {
        let t = Duration::from_secs(3);
        (
            tcp_probe(cluster, "pod-1-1", "pod-3-1", 80, marker.as_bytes(), t),
            tcp_probe(cluster, "pod-3-1", "pod-1-1", 80, marker.as_bytes(), t),
            traffic::udp_echo(&a1, &a3, marker.as_bytes(), t, 2),
        )
    });
    eprintln!("{what}: {}", report.summary());
    assert!(
        report.marker_hits == 0 && report.violation_count == 0,
        "{what}: no plaintext pod traffic on the underlay: {}\n{}",
        report.summary(),
        report.violations.join("\n")
    );
    to3.unwrap_or_else(|e| panic!("{what}: pod-1-1 -> pod-3-1: {e}"));
    from3.unwrap_or_else(|e| panic!("{what}: pod-3-1 -> pod-1-1: {e}"));
    udp.unwrap_or_else(|e| panic!("{what}: UDP pod-1-1 <-> pod-3-1: {e}"));
    assert!(report.wireguard_data() > 0, "{what}: {}", report.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_claims_lost_settings_and_status_fan_out() {
    // A short heartbeat, so the status-write check below sees several writes.
    let Some(mut cluster) =
        start_mesh_or_skip_with_args(Shape::new(3, 1), &["--status-interval-secs", "3"]).await
    else {
        return;
    };
    let client = cluster.client().clone();
    let names = ["node-1", "node-2", "node-3"];
    let _servers: Vec<EchoServer> = ["pod-1-1", "pod-2-1", "pod-3-1"]
        .into_iter()
        .map(|pod| EchoServer::start(&cluster, pod, 80))
        .collect();
    let mesh: Api<MeshEncryption> = Api::all(client.clone());
    mesh.patch(
        "default",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {
            "enabled": true, "mode": "Strict",
            "podCIDRs": ["10.244.0.0/16"], "serviceCIDRs": [SERVICE_CIDR],
        }})),
    )
    .await
    .expect("Strict with the cluster's ranges");
    for node in names {
        let c = &cluster;
        wait_async(
            &format!("{node} strict"),
            Duration::from_secs(20),
            || async move {
                match metric(c, node, "wiremesh_ebpf_strict_mode").await {
                    Some(1.0) => Ok(()),
                    other => Err(format!("wiremesh_ebpf_strict_mode {other:?}")),
                }
            },
        )
        .await;
    }

    // --- Finding 13: status in MeshNode objects, never on the Node. ---
    let nodes: Api<Node> = Api::all(client.clone());
    let node1 = nodes.get("node-1").await.expect("node-1");
    let version = node1.metadata.resource_version.clone();
    let first = mesh_node(&cluster, "node-1").await;
    let first_at = first.status.as_ref().expect("node-1 status").updated_at;
    for node in names {
        let status = mesh_node(&cluster, node).await.status.expect("status");
        assert!(status.ready, "{node}: {status:?}");
        assert_eq!(status.peers_configured, 2, "{node}");
        let annotations = nodes
            .get(node)
            .await
            .expect("node")
            .metadata
            .annotations
            .unwrap_or_default();
        assert!(
            !annotations.contains_key("wiremesh.io/status"),
            "{node} carries no status annotation: {annotations:?}"
        );
    }
    let c = &cluster;
    wait_async(
        "two more heartbeats of node-1's MeshNode",
        Duration::from_secs(20),
        || async move {
            let at = mesh_node(c, "node-1")
                .await
                .status
                .map_or(0, |s| s.updated_at);
            if at >= first_at + 4 {
                Ok(())
            } else {
                Err(format!("updatedAt {at}, first {first_at}"))
            }
        },
    )
    .await;
    assert_eq!(
        nodes
            .get("node-1")
            .await
            .expect("node-1")
            .metadata
            .resource_version,
        version,
        "status writes do not touch the Node (every agent watches Nodes)"
    );
    let text = agent_metrics(&cluster, "node-1").await.expect("metrics");
    assert!(
        !text.contains("wiremesh_peer_last_handshake_timestamp_seconds{"),
        "no per-peer series by default:\n{text}"
    );
    assert!(
        text.contains("wiremesh_peers_by_handshake_age{"),
        "the bounded handshake-age series:\n{text}"
    );

    // --- Findings 1 and 2: hostile pod addresses on node-2. ---
    let apiserver = cluster.underlay().bridge_ip();
    let node2_ip = cluster.node("node-2").expect("node-2").network.underlay_ip;
    objects::ensure_namespace(&client, ATTACKER_NS)
        .await
        .expect("namespace");
    let hostile = [
        ("metadata", METADATA_SERVER, "PodAddressReserved"),
        ("apiserver", apiserver, "PodAddressOutsideClusterPodCIDRs"),
        ("dns", DNS_SERVICE_IP, "PodAddressInServiceCIDR"),
        ("steal", STOLEN, "PodIPOutsideNodePodCIDRs"),
    ];
    for (name, ip, _) in hostile {
        objects::create_pod(&client, ATTACKER_NS, name, "node-2", ip, node2_ip)
            .await
            .expect("hostile pod");
    }
    // Every agent has seen the claims once each has counted them (bounded, by reason).
    for node in names.into_iter().filter(|n| *n != "node-2") {
        for (_, _, reason) in hostile {
            let c = &cluster;
            let series = format!("wiremesh_pod_claims_refused{{reason=\"{reason}\"}}");
            wait_async(
                &format!("{node} counts {reason}"),
                Duration::from_secs(30),
                || {
                    let series = series.clone();
                    async move {
                        match metric(c, node, &series).await {
                            Some(v) if v >= 1.0 => Ok(()),
                            other => Err(format!("{series} {other:?}")),
                        }
                    }
                },
            )
            .await;
        }
    }

    let node3 = &cluster.node("node-3").expect("node-3").network;
    let (node3_cidr, node3_ip) = (node3.pod_cidr.to_string(), node3.underlay_ip);
    let if1 = ifname(&cluster, "node-1");
    // The stolen address is inside node-3's range: the tunnel is right for it, towards node-3's
    // peer (the allowed IPs below), not node-2's.
    for (name, ip, _) in hostile.into_iter().filter(|(_, ip, _)| *ip != STOLEN) {
        let route = route_get(&cluster, "node-1", ip);
        assert!(
            !route.contains(&format!("dev {if1}")),
            "node-1 routes {name} ({ip}) into its tunnel: {route}"
        );
    }
    let routes = mesh_routes(&cluster, "node-1");
    assert!(
        routes.contains(&node3_cidr),
        "node-3 keeps its range: {routes:?}"
    );
    for (_, ip, _) in hostile {
        assert!(
            !routes.iter().any(|r| r.starts_with(&format!("{ip}"))),
            "{ip} in table 87: {routes:?}"
        );
    }
    let allowed = allowed_ips(&cluster, "node-1");
    for (_, ip, _) in hostile {
        assert!(
            !allowed.contains(&format!("{ip}/32")),
            "{ip} is no allowed IP: {allowed}"
        );
    }
    assert!(
        allowed.contains(&node3_cidr),
        "node-3's peer keeps {node3_cidr}: {allowed}"
    );
    let entries = ipcache(&cluster, "node-1");
    for (_, ip, _) in hostile {
        let net = ipnet::Ipv4Net::from(ip);
        assert!(
            !entries.contains_key(&net),
            "{ip} has an ipcache entry: {:?}",
            entries.get(&net)
        );
    }
    let cidr3: ipnet::Ipv4Net = node3_cidr.parse().expect("cidr");
    let victim = entries.get(&cidr3).expect("node-3's range in the ipcache");
    assert_eq!(
        (Ipv4Addr::from(victim.node_ip), victim.flags),
        (
            node3_ip,
            wiremesh_bpf::ipcache_flags::REMOTE_POD | wiremesh_bpf::ipcache_flags::ENCRYPT
        ),
        "node-3's range stays encrypted towards node-3"
    );

    // One Event per refused address, on node-2, from one agent for the whole cluster.
    let c = &cluster;
    let events = wiremesh_integration::wait::until(
        "an Event per hostile address on node-2",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || async move {
            let events = warnings_about(c, "node-2").await;
            if hostile.iter().all(|(_, ip, _)| {
                events
                    .iter()
                    .any(|(_, note, _)| note.contains(&ip.to_string()))
            }) {
                Ok(events)
            } else {
                Err(format!("{events:?}"))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(events.len(), hostile.len(), "{events:#?}");
    for (_, ip, reason) in hostile {
        let matching: Vec<_> = events
            .iter()
            .filter(|(r, note, _)| r == reason && note.contains(&ip.to_string()))
            .collect();
        assert_eq!(matching.len(), 1, "{ip} ({reason}): {events:#?}");
        assert_eq!(matching[0].2, "mesh-agent-node-1", "the one emitter");
    }

    // Finding 2 end to end: node-3's pod is still reached, encrypted, from node-1.
    let marker = marker("trust");
    encrypted_both_ways(
        &cluster,
        &marker,
        "node-3 after node-2 claimed one of its addresses",
    );

    // --- Finding 8: the object is deleted; Strict stays until an explicit change. ---
    let before: Vec<f64> = {
        let mut v = Vec::new();
        for node in names {
            v.push(
                metric(&cluster, node, "wiremesh_reconciles_total{result=\"ok\"}")
                    .await
                    .unwrap_or(0.0),
            );
        }
        v
    };
    match kubectl() {
        Some(kubectl) => {
            let kubeconfig = cluster.kubeconfig_path().expect("admin kubeconfig");
            let out = std::process::Command::new(kubectl)
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .args(["delete", "meshencryption", "default"])
                .output()
                .expect("run kubectl");
            assert!(
                out.status.success(),
                "kubectl delete meshencryption default: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None => {
            mesh.delete("default", &DeleteParams::default())
                .await
                .expect("delete MeshEncryption default");
        }
    }
    for (node, before) in names.into_iter().zip(before) {
        let c = &cluster;
        wait_async(
            &format!("{node} saw the deletion"),
            Duration::from_secs(30),
            || async move {
                let passes = metric(c, node, "wiremesh_reconciles_total{result=\"ok\"}")
                    .await
                    .unwrap_or(0.0);
                let reason = settings_reason(&mesh_node(c, node).await);
                if passes > before
                    && reason.as_deref() == Some(mesh_agent::settings::REASON_REMEMBERED)
                {
                    Ok(())
                } else {
                    Err(format!(
                        "{passes} passes, SettingsApplied reason {reason:?}"
                    ))
                }
            },
        )
        .await;
        assert_eq!(
            metric(&cluster, node, "wiremesh_ebpf_strict_mode").await,
            Some(1.0),
            "{node} keeps Strict"
        );
        assert_eq!(
            metric(&cluster, node, "wiremesh_mesh_enabled").await,
            Some(1.0),
            "{node} keeps the mesh on"
        );
        assert_eq!(wg_peers(&cluster, node).expect("wg").len(), 2, "{node}");
    }
    // A restarted agent finds no object either: it keeps the remembered spec (the file in its
    // state directory), it does not tear the tunnels down.
    let killed = kill_agent(&mut cluster, "node-1");
    wait_restarted(&cluster, "node-1", Role::Agent, killed);
    let c = &cluster;
    wait_async(
        "the restarted node-1 agent keeps Strict",
        Duration::from_secs(30),
        || async move {
            let passes = metric(c, "node-1", "wiremesh_reconciles_total{result=\"ok\"}").await;
            let enabled = metric(c, "node-1", "wiremesh_mesh_enabled").await;
            let strict = metric(c, "node-1", "wiremesh_ebpf_strict_mode").await;
            if passes.is_some_and(|p| p >= 1.0) && enabled == Some(1.0) && strict == Some(1.0) {
                Ok(())
            } else {
                Err(format!(
                    "passes {passes:?}, enabled {enabled:?}, strict {strict:?}"
                ))
            }
        },
    )
    .await;
    assert_eq!(wg_peers(&cluster, "node-1").expect("wg").len(), 2);
    encrypted_both_ways(
        &cluster,
        &marker,
        "MeshEncryption deleted, node-1 restarted",
    );

    // An explicit change wins: mode Disabled installs no routes and no peers.
    let disabled: MeshEncryption = serde_json::from_value(json!({
        "apiVersion": "wiremesh.io/v1alpha1",
        "kind": "MeshEncryption",
        "metadata": {"name": "default"},
        "spec": {"enabled": true, "mode": "Disabled"},
    }))
    .expect("MeshEncryption");
    mesh.create(&PostParams::default(), &disabled)
        .await
        .expect("create MeshEncryption Disabled");
    for node in names {
        eventually(
            &format!("{node} removes its tunnel routes and peers"),
            Duration::from_secs(30),
            || {
                let routes = mesh_routes(&cluster, node);
                let peers = wg_peers(&cluster, node)?;
                if routes.is_empty() && peers.is_empty() {
                    Ok(())
                } else {
                    Err(format!("routes {routes:?}, peers {peers:?}"))
                }
            },
        )
        .await;
        assert_eq!(
            metric(&cluster, node, "wiremesh_mesh_enabled").await,
            Some(0.0),
            "{node}"
        );
    }

    cluster.teardown().expect("teardown");
}
