//! Shared setup of the mesh scenario tests (`tests/mesh_*.rs`, included with `#[path]`): a virtual
//! cluster with the wiremesh CRDs, `MeshEncryption default` enabled and one real `mesh-agent run`
//! per node (the same helpers `meshctl demo up` uses), plus independent views of a node's tunnel
//! (wg(8) over the engine's UAPI socket, `ip route`) and of the agents' metrics.
//!
//! The agent binary is `target/debug/mesh-agent` next to the test binary's `deps/` directory
//! (`make test` builds the workspace first) or `$WIREMESH_AGENT_BIN`.

#![allow(dead_code)]

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use meshctl::{demo, status, traffic::PodEnd};
use wiremesh_integration::{ClusterOptions, VirtualCluster, wait};

/// Privileged tests need root: under CI (root) a missing privilege is a failure, elsewhere a loud
/// skip.
pub fn have_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "privileged test run without root under CI"
    );
    eprintln!("SKIPPED: needs root (network namespaces, TUN devices)");
    false
}

/// The mesh-agent executable under test.
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WIREMESH_AGENT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> -> target/debug/mesh-agent
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("mesh-agent"))
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        path.exists(),
        "{} not found: build it first (`cargo build -p mesh-agent`, or `make test`), \
         or set WIREMESH_AGENT_BIN",
        path.display()
    );
    path
}

/// Cluster size of a scenario.
pub struct Shape {
    pub nodes: u32,
    pub pods_per_node: u32,
    pub spare_nodes: u32,
}

/// How long a mesh may take to converge (testenv on 2 shared cores, debug build).
pub const CONVERGE: Duration = Duration::from_secs(90);

/// Starts the cluster, installs the CRDs, enables the mesh, starts every agent and waits until
/// `meshctl status` reports the mesh converged.
pub async fn start_mesh(shape: Shape) -> VirtualCluster {
    let mut cluster = VirtualCluster::start(ClusterOptions {
        nodes: shape.nodes,
        pods_per_node: shape.pods_per_node,
        spare_nodes: shape.spare_nodes,
        ..ClusterOptions::default()
    })
    .await
    .expect("start the virtual cluster");
    let client = cluster.client().clone();
    demo::install_crds(&client).await.expect("install CRDs");
    demo::set_mesh_enabled(&client, true)
        .await
        .expect("enable the mesh");
    let agent = agent_binary();
    let names: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    for node in &names {
        demo::start_agent(&mut cluster, node, &agent, &[]).expect("start agent");
    }
    wait_converged(&cluster).await;
    cluster
}

/// Waits until `meshctl status` calls the mesh converged; on timeout prints the agent logs.
pub async fn wait_converged(cluster: &VirtualCluster) -> status::MeshStatus {
    let started = std::time::Instant::now();
    let mut last_print = started;
    let progress = |s: &status::MeshStatus| {
        // Slow convergence is worth seeing with --nocapture.
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = std::time::Instant::now();
            eprintln!(
                "[{:>3}s] not converged yet: {}",
                started.elapsed().as_secs(),
                s.all_problems().join("; ")
            );
        }
    };
    match demo::wait_converged(cluster.client(), CONVERGE, progress).await {
        Ok(s) => s,
        Err(e) => {
            print_agent_logs(cluster);
            panic!("{e}");
        }
    }
}

/// Prints the tail of every agent log (for failures).
pub fn print_agent_logs(cluster: &VirtualCluster) {
    for node in cluster.nodes() {
        let Some(log) = &node.agent_log else { continue };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("--- {} ({} lines), last 30:", log.display(), lines.len());
        for line in &lines[lines.len().saturating_sub(30)..] {
            eprintln!("{line}");
        }
    }
}

/// The tunnel interface of `node` (named after its namespace by `demo::agent_args`).
pub fn ifname(cluster: &VirtualCluster, node: &str) -> String {
    cluster.node(node).expect("node").network.netns.clone()
}

/// Public keys of the peers on `node`'s device, read with wg(8) through the UAPI socket.
pub fn wg_peers(cluster: &VirtualCluster, node: &str) -> Result<Vec<String>, String> {
    let out = cluster
        .exec_in_node(node, ["wg", "show", &ifname(cluster, node), "peers"])
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "wg show failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut peers: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    peers.sort();
    Ok(peers)
}

/// Destinations of the agent's routes (protocol 87) in `node`'s namespace.
pub fn mesh_routes(cluster: &VirtualCluster, node: &str) -> Vec<String> {
    let out = cluster
        .exec_in_node(node, ["ip", "-4", "route", "show", "proto", "87"])
        .expect("ip route");
    let mut routes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    routes.sort();
    routes
}

/// The `wiremesh.io/public-key` annotation of `node`.
pub async fn published_key(cluster: &VirtualCluster, node: &str) -> Option<String> {
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> =
        kube::Api::all(cluster.client().clone());
    nodes
        .get(node)
        .await
        .expect("get node")
        .metadata
        .annotations
        .and_then(|a| a.get("wiremesh.io/public-key").cloned())
}

/// The agent's `/metrics` text, fetched from the host at the node's underlay address.
pub async fn agent_metrics(cluster: &VirtualCluster, node: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ip: Ipv4Addr = cluster.node(node).expect("node").network.underlay_ip;
    let mut stream = tokio::net::TcpStream::connect((ip, demo::AGENT_HTTP_PORT))
        .await
        .map_err(|e| format!("connect {ip}: {e}"))?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .await
        .map_err(|e| e.to_string())?;
    Ok(text)
}

/// A pod as a traffic end.
pub fn pod_end(cluster: &VirtualCluster, pod: &str) -> PodEnd {
    let p = cluster.pod(pod).expect("pod");
    PodEnd {
        name: p.name.clone(),
        netns: p.network.netns.clone(),
        ip: p.network.ip,
    }
}

/// TCP and UDP echo (and ping) from `from` to `to`, panicking with the reason on failure.
pub fn assert_reachable(cluster: &VirtualCluster, from: &str, to: &str, payload: &[u8]) {
    let (a, b) = (pod_end(cluster, from), pod_end(cluster, to));
    let timeout = Duration::from_secs(5);
    tokio::task::block_in_place(|| {
        meshctl::traffic::ping(&a, &b, 3).unwrap_or_else(|e| panic!("{e}"));
        meshctl::traffic::tcp_echo(&a, &b, payload, timeout).unwrap_or_else(|e| panic!("{e}"));
        meshctl::traffic::udp_echo(&a, &b, payload, timeout, 3).unwrap_or_else(|e| panic!("{e}"));
    });
}

/// Polls `check` until it holds.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    check: impl FnMut() -> Result<T, String>,
) -> T {
    let mut check = check;
    wait::until(what, timeout, Duration::from_millis(250), || {
        let r = check();
        async move { r }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A payload marker unique to this test process.
pub fn marker(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("wiremesh-marker-{test}-{}-{nanos}", std::process::id())
}
