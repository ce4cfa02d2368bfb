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
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use meshctl::{
    capture::{self, CaptureReport},
    demo, status,
    traffic::PodEnd,
};
use wiremesh_integration::{
    ClusterOptions, ProcessIdentity, Role, VirtualCluster, have_root, wait,
};

/// The mesh-agent executable under test.
pub fn agent_binary() -> PathBuf {
    workspace_binary("mesh-agent", "WIREMESH_AGENT_BIN")
}

/// The workspace binary `name` next to the test binary's `deps/` directory, or `$env`.
pub fn workspace_binary(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> -> target/debug/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        path.exists(),
        "{} not found: build it first (`cargo build -p {name}`, or `make test`), or set {env}",
        path.display()
    );
    path
}

/// Cluster size of a scenario.
pub struct Shape {
    pub nodes: u32,
    pub pods_per_node: u32,
    /// Node names and subnets reserved for nodes the test adds later.
    pub spare_nodes: u32,
    /// Pods and nodes get IPv6 addresses and podCIDRs too.
    pub dual_stack: bool,
    /// The agents reach the API server through the fault proxy, and the API server writes an
    /// audit log (`ClusterOptions::api_proxy`, `audit_log`).
    pub api_proxy: bool,
}

impl Shape {
    /// `nodes` nodes with `pods_per_node` pods each, no spare nodes.
    pub fn new(nodes: u32, pods_per_node: u32) -> Self {
        Shape {
            nodes,
            pods_per_node,
            spare_nodes: 0,
            dual_stack: false,
            api_proxy: false,
        }
    }

    /// Dual stack (see [`ClusterOptions::dual_stack`]).
    pub fn dual_stack(self) -> Self {
        Shape {
            dual_stack: true,
            ..self
        }
    }

    /// Runs the fault proxy and the audit log (the control-plane faults).
    pub fn with_api_proxy(self) -> Self {
        Shape {
            api_proxy: true,
            ..self
        }
    }

    /// Reserves `spare_nodes` more nodes for [`VirtualCluster::add_node`].
    pub fn with_spare_nodes(self, spare_nodes: u32) -> Self {
        Shape {
            spare_nodes,
            ..self
        }
    }
}

/// How long a mesh may take to converge (testenv on 2 shared cores, debug build).
pub const CONVERGE: Duration = Duration::from_secs(90);

/// The start of every mesh scenario: `None` (the test returns at once) when it may not run
/// privileged (see [`wiremesh_integration::have_root`]), else the converged mesh of
/// [`start_mesh`].
///
/// It lives here and not in the `wiremesh_integration` library because it drives
/// `meshctl::demo`, and `meshctl` depends on that library.
pub async fn start_mesh_or_skip(shape: Shape) -> Option<VirtualCluster> {
    start_mesh_or_skip_with_args(shape, &[]).await
}

/// [`start_mesh_or_skip`] with extra `mesh-agent run` arguments for every agent.
pub async fn start_mesh_or_skip_with_args(
    shape: Shape,
    agent_args: &[&str],
) -> Option<VirtualCluster> {
    if !have_root("network namespaces, TUN devices") {
        return None;
    }
    Some(start_mesh_with_args(shape, agent_args).await)
}

/// Starts the cluster, installs the CRDs, enables the mesh, starts every agent and waits until
/// `meshctl status` reports the mesh converged.
pub async fn start_mesh(shape: Shape) -> VirtualCluster {
    start_mesh_with_args(shape, &[]).await
}

/// [`start_mesh`] with extra `mesh-agent run` arguments for every agent.
pub async fn start_mesh_with_args(shape: Shape, agent_args: &[&str]) -> VirtualCluster {
    start_mesh_on(shape, demo::NodeDevice::Userspace, agent_args).await
}

/// [`start_mesh_with_args`] with every node on `device` ([`demo::NodeDevice::Kernel`]: kernel
/// WireGuard links, only in the kernel VM).
pub async fn start_mesh_on(
    shape: Shape,
    device: demo::NodeDevice,
    agent_args: &[&str],
) -> VirtualCluster {
    let started = std::time::Instant::now();
    let mut cluster = VirtualCluster::start(cluster_options(&shape))
        .await
        .expect("start the virtual cluster");
    eprintln!(
        "virtual cluster (testenv ready, {} nodes) in {:.1?}",
        shape.nodes,
        started.elapsed()
    );
    let client = cluster.client().clone();
    demo::install_crds(&client).await.expect("install CRDs");
    demo::set_mesh_enabled(&client, true)
        .await
        .expect("enable the mesh");
    let agent = agent_binary();
    let names: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    for node in &names {
        demo::start_node(&mut cluster, node, &agent, device, agent_args).expect("start agent");
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

/// Prints the tail of every agent and device log (for failures).
pub fn print_agent_logs(cluster: &VirtualCluster) {
    for log in cluster
        .nodes()
        .iter()
        .flat_map(|n| n.agent_log.iter().chain(n.device_log.iter()))
    {
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

/// Destinations of the agent's routes (table 87, protocol 87) in `node`'s namespace.
pub fn mesh_routes(cluster: &VirtualCluster, node: &str) -> Vec<String> {
    let out = cluster
        .exec_in_node(
            node,
            ["ip", "-4", "route", "show", "table", "87", "proto", "87"],
        )
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
    wiremesh_integration::objects::node_annotation(cluster.client(), node, "wiremesh.io/public-key")
        .await
        .expect("get node")
}

/// The agent's `/metrics` text, fetched from the host at the node's underlay address.
pub async fn agent_metrics(cluster: &VirtualCluster, node: &str) -> Result<String, String> {
    agent_http(cluster, node, "/metrics").await
}

/// The address family a probe uses (a dual-stack cluster's pods have one address of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The cluster options of a mesh scenario of `shape`.
pub fn cluster_options(shape: &Shape) -> ClusterOptions {
    ClusterOptions {
        nodes: shape.nodes,
        pods_per_node: shape.pods_per_node,
        spare_nodes: shape.spare_nodes,
        dual_stack: shape.dual_stack,
        api_proxy: shape.api_proxy,
        audit_log: shape.api_proxy,
        ..ClusterOptions::default()
    }
}

/// `pod`'s address of `family` (panics when a single-stack pod has no IPv6).
pub fn pod_ip(cluster: &VirtualCluster, pod: &str, family: Family) -> std::net::IpAddr {
    let p = cluster.pod(pod).expect("pod");
    match family {
        Family::V4 => p.network.ip.into(),
        Family::V6 => p
            .network
            .ip6
            .unwrap_or_else(|| panic!("{pod} has no IPv6 address (not a dual-stack cluster)"))
            .into(),
    }
}

/// `node`'s IPv6 podCIDR (panics in a single-stack cluster).
pub fn pod_cidr6(cluster: &VirtualCluster, node: &str) -> String {
    cluster
        .node(node)
        .expect("node")
        .network
        .pod_cidr6
        .unwrap_or_else(|| panic!("{node} has no IPv6 podCIDR (not a dual-stack cluster)"))
        .to_string()
}

/// A pod as a traffic end.
pub fn pod_end(cluster: &VirtualCluster, pod: &str) -> PodEnd {
    pod_end_in(cluster, pod, Family::V4)
}

/// A pod as a traffic end over `family`.
pub fn pod_end_in(cluster: &VirtualCluster, pod: &str, family: Family) -> PodEnd {
    let p = cluster.pod(pod).expect("pod");
    PodEnd {
        name: p.name.clone(),
        netns: p.network.netns.clone(),
        ip: pod_ip(cluster, pod, family),
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

/// The body of `GET <path>` on `node`'s agent HTTP server (from the host, at the node's
/// underlay address).
pub async fn agent_http(
    cluster: &VirtualCluster,
    node: &str,
    path: &str,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ip: Ipv4Addr = cluster.node(node).expect("node").network.underlay_ip;
    let mut stream = tokio::net::TcpStream::connect((ip, demo::AGENT_HTTP_PORT))
        .await
        .map_err(|e| format!("connect {ip}: {e}"))?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .await
        .map_err(|e| e.to_string())?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP body from {ip}{path}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "{ip}{path}: {}",
            head.lines().next().unwrap_or_default()
        ));
    }
    Ok(body.to_string())
}

/// The body of `GET <path>` on `node`'s authenticated agent API, through the API server's node
/// proxy as the cluster admin (the way meshctl reaches agents).
pub async fn agent_api(cluster: &VirtualCluster, node: &str, path: &str) -> Result<String, String> {
    let token = cluster
        .testenv()
        .map(|t| t.credentials().admin.token.clone());
    meshctl::agents::Agents::new(cluster.client().clone(), token)
        .get(node, path)
        .await
        .map_err(|e| format!("{e:#}"))
}

/// The agent's flow table (`GET /flows` on its API).
pub async fn agent_flows(cluster: &VirtualCluster, node: &str) -> Vec<serde_json::Value> {
    let body = agent_api(cluster, node, "/flows")
        .await
        .unwrap_or_else(|e| panic!("/flows of {node}: {e}"));
    let json: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/flows of {node}: {e}: {body}"));
    json["flows"].as_array().cloned().unwrap_or_default()
}

/// Whether `flows` holds a record from `from` to `to` (pod names) on TCP port `port` (any port
/// when `None`) with `verdict`.
pub fn has_flow(
    flows: &[serde_json::Value],
    from: &str,
    to: &str,
    port: Option<u16>,
    verdict: &str,
) -> bool {
    flows.iter().any(|f| {
        f["source"]["pod_name"] == from
            && f["destination"]["pod_name"] == to
            && port.is_none_or(|p| flow_dport(f) == Some(p))
            && f["wiremesh_verdict"] == verdict
    })
}

/// The destination port of a flow record (`l4.TCP`/`l4.UDP`).
pub fn flow_dport(f: &serde_json::Value) -> Option<u16> {
    ["TCP", "UDP", "SCTP"]
        .iter()
        .find_map(|p| f["l4"][p]["destination_port"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
}

/// Sets labels on a pod of the cluster's pod namespace.
pub async fn label_pod(cluster: &VirtualCluster, pod: &str, labels: serde_json::Value) {
    let p = cluster.pod(pod).expect("pod");
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(cluster.client().clone(), &p.namespace);
    api.patch(
        pod,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"metadata": {"labels": labels}})),
    )
    .await
    .unwrap_or_else(|e| panic!("label pod {pod}: {e}"));
}

/// Creates a NetworkPolicy in the `default` namespace from its spec.
pub async fn create_policy(cluster: &VirtualCluster, name: &str, spec: serde_json::Value) {
    let api: kube::Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        kube::Api::namespaced(cluster.client().clone(), "default");
    let np = serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))
    .expect("NetworkPolicy");
    api.create(&kube::api::PostParams::default(), &np)
        .await
        .unwrap_or_else(|e| panic!("create NetworkPolicy {name}: {e}"));
}

/// Deletes a NetworkPolicy of the `default` namespace.
pub async fn delete_policy(cluster: &VirtualCluster, name: &str) {
    let api: kube::Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        kube::Api::namespaced(cluster.client().clone(), "default");
    api.delete(name, &kube::api::DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete NetworkPolicy {name}: {e}"));
}

/// Sets `MeshEncryption default` `spec.mode` (`Permissive` or `Strict`), keeping it enabled.
pub async fn set_mesh_mode(cluster: &VirtualCluster, mode: &str) {
    let api: kube::Api<wiremesh_crds::MeshEncryption> = kube::Api::all(cluster.client().clone());
    api.patch(
        "default",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"spec": {"enabled": true, "mode": mode}})),
    )
    .await
    .unwrap_or_else(|e| panic!("set mode {mode}: {e}"));
}

/// Removes the tunnels to `node`: stops its agent and its device process (the TUN goes with it;
/// the pinned programs stay) and withdraws its key, so the other nodes remove the peer and its
/// routes.
pub async fn remove_tunnels_to(cluster: &mut VirtualCluster, node: &str) {
    for role in [Role::Agent, Role::Device] {
        cluster
            .stop_supervised(node, role, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("stop {node}'s processes: {e}"));
    }
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> =
        kube::Api::all(cluster.client().clone());
    nodes
        .patch(
            node,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"metadata": {"annotations": {
                "wiremesh.io/public-key": null, "wiremesh.io/endpoint": null,
            }}})),
        )
        .await
        .unwrap_or_else(|e| panic!("withdraw {node}'s key: {e}"));
}

/// The PID of `node`'s agent (its current run: the supervisor restarts it).
pub fn agent_pid(cluster: &VirtualCluster, node: &str) -> u32 {
    cluster
        .supervised_pid(node, Role::Agent)
        .unwrap_or_else(|| panic!("{node} has no agent running"))
        .pid
}

/// `kill -9` of `node`'s agent: no drain. The device process, its peers and routes and the pinned
/// eBPF state stay; the supervisor restarts the agent (unless held with
/// [`VirtualCluster::hold_restarts`]). Returns the killed run.
pub fn kill_agent(cluster: &mut VirtualCluster, node: &str) -> ProcessIdentity {
    cluster
        .kill_supervised(node, Role::Agent)
        .expect("kill -9 the agent")
}

/// Waits until the supervisor restarted `node`'s `role` process after `killed`.
pub fn wait_restarted(
    cluster: &VirtualCluster,
    node: &str,
    role: Role,
    killed: ProcessIdentity,
) -> ProcessIdentity {
    cluster
        .wait_restarted(node, role, killed, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A TCP echo server on `port` in a pod's namespace, serving until dropped.
pub struct EchoServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on the pod's IPv4 address, and on its IPv6 address when it has one.
    pub fn start(cluster: &VirtualCluster, pod: &str, port: u16) -> Self {
        use std::io::{Read, Write};
        let p = cluster.pod(pod).expect("pod");
        let ips: Vec<std::net::IpAddr> = std::iter::once(p.network.ip.into())
            .chain(p.network.ip6.map(Into::into))
            .collect();
        let listeners: Vec<std::net::TcpListener> = ips
            .into_iter()
            .map(|ip| {
                let listener = wiremesh_integration::netns::within(&p.network.netns, move || {
                    std::net::TcpListener::bind((ip, port))
                })
                .expect("enter pod namespace")
                .unwrap_or_else(|e| panic!("listen on {ip}:{port}: {e}"));
                listener.set_nonblocking(true).expect("nonblocking");
                listener
            })
            .collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let mut idle = true;
                for listener in &listeners {
                    if let Ok((mut conn, _)) = listener.accept() {
                        idle = false;
                        std::thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                            let mut buf = [0u8; 256];
                            if let Ok(n) = conn.read(&mut buf) {
                                let _ = conn.write_all(&buf[..n]);
                            }
                        });
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One TCP exchange from pod `from` to pod `to` on `port` (an [`EchoServer`] must listen):
/// connect, send `payload`, read it back, all within `timeout`.
pub fn tcp_probe(
    cluster: &VirtualCluster,
    from: &str,
    to: &str,
    port: u16,
    payload: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    tcp_probe_in(cluster, Family::V4, from, to, port, payload, timeout)
}

/// [`tcp_probe`] over `family`.
pub fn tcp_probe_in(
    cluster: &VirtualCluster,
    family: Family,
    from: &str,
    to: &str,
    port: u16,
    payload: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    use std::io::{Read, Write};
    let netns = cluster
        .pod(from)
        .map_err(|e| e.to_string())?
        .network
        .netns
        .clone();
    let addr = std::net::SocketAddr::from((pod_ip(cluster, to, family), port));
    let payload = payload.to_vec();
    wiremesh_integration::netns::within(&netns, move || -> Result<(), String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.write_all(&payload).map_err(|e| format!("send: {e}"))?;
        let mut back = vec![0u8; payload.len()];
        s.read_exact(&mut back).map_err(|e| format!("echo: {e}"))?;
        if back == payload {
            Ok(())
        } else {
            Err("echo differs".into())
        }
    })
    .map_err(|e| e.to_string())?
}

/// Polls until every `(from, to, port, allowed)` probe gives its expected answer.
pub async fn expect_reachability(
    cluster: &VirtualCluster,
    what: &str,
    timeout: Duration,
    probes: &[(&str, &str, u16, bool)],
) {
    expect_reachability_in(cluster, &[Family::V4], what, timeout, probes).await;
}

/// [`expect_reachability`] with every probe over each of `families`.
pub async fn expect_reachability_in(
    cluster: &VirtualCluster,
    families: &[Family],
    what: &str,
    timeout: Duration,
    probes: &[(&str, &str, u16, bool)],
) {
    let started = std::time::Instant::now();
    eventually(what, timeout, || {
        let mut wrong = Vec::new();
        for family in families {
            for (from, to, port, allowed) in probes {
                let got = tokio::task::block_in_place(|| {
                    tcp_probe_in(
                        cluster,
                        *family,
                        from,
                        to,
                        *port,
                        b"probe",
                        Duration::from_millis(700),
                    )
                });
                if got.is_ok() != *allowed {
                    wrong.push(format!(
                        "{family:?} {from} -> {to}:{port} expected {}, got {got:?}",
                        if *allowed { "allowed" } else { "denied" }
                    ));
                }
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("; "))
        }
    })
    .await;
    eprintln!("{what}: as expected after {:?}", started.elapsed());
}

/// Polls an async `check` until it holds.
pub async fn wait_async<F, Fut>(what: &str, timeout: Duration, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    wait::until(what, timeout, Duration::from_millis(250), check)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Probes `from -> to:port` over and over until stopped, counting attempts and successes.
pub struct GapProbe {
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicU32>,
    successes: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GapProbe {
    pub fn start(
        cluster: &wiremesh_integration::VirtualCluster,
        from: &str,
        to: &str,
        port: u16,
    ) -> Self {
        let netns = cluster.pod(from).expect("pod").network.netns.clone();
        let addr = std::net::SocketAddr::from((cluster.pod(to).expect("pod").network.ip, port));
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicU32::new(0));
        let successes = Arc::new(AtomicU32::new(0));
        let (s, a, ok) = (stop.clone(), attempts.clone(), successes.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let connected = wiremesh_integration::netns::within(&netns, move || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                })
                .unwrap_or(false);
                a.fetch_add(1, Ordering::Relaxed);
                if connected {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            stop,
            attempts,
            successes,
            thread: Some(thread),
        }
    }

    /// Attempts so far.
    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Stops the probe and asserts it ran and never got through (`what`: the window it covered).
    pub fn assert_never_through(self, what: &str) {
        let (attempts, successes) = self.finish();
        eprintln!("denied-flow probe through {what}: {attempts} attempts");
        assert!(attempts >= 5, "the probe ran: {attempts} attempts");
        assert_eq!(
            successes, 0,
            "the denied flow got through {successes} of {attempts} times around {what}"
        );
    }

    /// Stops the probe; returns (attempts, successes).
    pub fn finish(mut self) -> (u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("probe thread");
        }
        (
            self.attempts.load(Ordering::Relaxed),
            self.successes.load(Ordering::Relaxed),
        )
    }
}

/// The log of `node`'s agent so far.
pub fn agent_log(cluster: &VirtualCluster, node: &str) -> String {
    let path = cluster
        .node(node)
        .expect("node")
        .agent_log
        .clone()
        .expect("the agent logs to a file");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The NetworkPolicy `web-from-clients`: pods labelled `role=web` accept port 80 from
/// `role=client` pods only.
pub async fn create_web_from_clients(cluster: &VirtualCluster) {
    create_policy(
        cluster,
        "web-from-clients",
        serde_json::json!({
            "podSelector": {"matchLabels": {"role": "web"}},
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                "ports": [{"port": 80}],
            }],
        }),
    )
    .await;
}

/// The ifindex of `node`'s tunnel interface (`ip -o link show`).
pub fn device_ifindex(cluster: &VirtualCluster, node: &str) -> Result<u32, String> {
    let out = cluster
        .exec_in_node(node, ["ip", "-o", "link", "show", &ifname(cluster, node)])
        .map_err(|e| e.to_string())?;
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .ok_or_else(|| format!("no tunnel interface on {node}"))
}

/// The public key `node`'s device holds (`wg show <if> public-key`).
pub fn device_public_key(cluster: &VirtualCluster, node: &str) -> Result<String, String> {
    let out = cluster
        .exec_in_node(node, ["wg", "show", &ifname(cluster, node), "public-key"])
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `ping -D -i <interval>` from one pod to another, running in the background.
pub struct PingRun {
    child: std::process::Child,
}

/// What a [`PingRun`] saw.
#[derive(Clone)]
pub struct PingResult {
    pub transmitted: u32,
    pub received: u32,
    /// The longest time between two consecutive replies (the outage), in milliseconds.
    pub max_gap_ms: f64,
    /// When each reply came (`ping -D`: seconds since the Unix epoch), in order.
    pub reply_times: Vec<f64>,
    /// The highest `icmp_seq` answered.
    pub last_seq: u32,
    /// Requests without a reply yet when [`PingRun::interrupt`] stopped ping.
    pub in_flight_at_stop: u32,
}

impl std::fmt::Debug for PingResult {
    // The reply times are thousands of numbers: their count is enough in a failure message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PingResult")
            .field("transmitted", &self.transmitted)
            .field("received", &self.received)
            .field("max_gap_ms", &self.max_gap_ms)
            .field("last_seq", &self.last_seq)
            .field("in_flight_at_stop", &self.in_flight_at_stop)
            .field("reply_times", &self.reply_times.len())
            .finish()
    }
}

impl PingResult {
    pub fn lost(&self) -> u32 {
        self.transmitted.saturating_sub(self.received)
    }

    /// Replies that came between `from` and `to` (wall clock).
    pub fn replies_between(&self, from: std::time::SystemTime, to: std::time::SystemTime) -> usize {
        let secs = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        };
        let (from, to) = (secs(from), secs(to));
        self.reply_times
            .iter()
            .filter(|t| (from..=to).contains(*t))
            .count()
    }
}

impl PingRun {
    /// Starts `count` pings every `interval` from pod `from` to pod `to`.
    pub fn start(
        cluster: &VirtualCluster,
        from: &str,
        to: &str,
        interval: Duration,
        count: u32,
    ) -> Self {
        let netns = cluster.pod(from).expect("pod").network.netns.clone();
        let ip = cluster.pod(to).expect("pod").network.ip.to_string();
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &netns, "ping", "-D", "-n", "-W", "2"])
            .arg("-i")
            .arg(format!("{:.3}", interval.as_secs_f64()))
            .arg("-c")
            .arg(count.to_string())
            .arg(&ip)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start ping");
        Self { child }
    }

    /// Stops ping (SIGINT: it prints its summary) and reads what it saw, as [`PingRun::finish`].
    /// For a run that must cover an event of unknown length: start with a large count. Requests
    /// sent after the last answered one were in flight when ping stopped (it does not wait for
    /// them): they are counted in `in_flight_at_stop`, not as transmitted, so `lost()` is the
    /// requests before the last reply that never got one.
    pub fn interrupt(self) -> PingResult {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child, which has not been waited for (its PID is ours).
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGINT) },
            0,
            "SIGINT to ping"
        );
        let mut result = self.finish();
        // icmp_seq counts from 1.
        let answered_up_to = result.last_seq.min(result.transmitted);
        result.in_flight_at_stop = result.transmitted - answered_up_to;
        result.transmitted = answered_up_to;
        result
    }

    /// Waits for ping to finish and reads its counts and the longest gap between replies.
    pub fn finish(self) -> PingResult {
        let out = self.child.wait_with_output().expect("ping output");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut times: Vec<f64> = text
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
            .collect();
        times.sort_by(f64::total_cmp);
        let last_seq = text
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("icmp_seq="))?
                    .parse::<u32>()
                    .ok()
            })
            .max()
            .unwrap_or(0);
        let max_gap_ms = times
            .windows(2)
            .map(|w| (w[1] - w[0]) * 1000.0)
            .fold(0.0, f64::max);
        let summary = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no ping summary in: {text}"));
        let number = |word: &str| -> u32 {
            summary
                .split(',')
                .find(|part| part.contains(word))
                .and_then(|part| part.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {word} count in {summary:?}"))
        };
        PingResult {
            transmitted: number("transmitted"),
            received: number("received"),
            max_gap_ms,
            reply_times: times,
            last_seq,
            in_flight_at_stop: 0,
        }
    }
}

/// A TCP stream from one pod to another ([`meshctl::traffic::TcpRun`]): the client writes
/// 16 KiB every 10 ms until finished; any error (a reset) is kept.
pub struct TcpFlow;

impl TcpFlow {
    pub fn start(
        cluster: &VirtualCluster,
        from: &str,
        to: &str,
        port: u16,
    ) -> meshctl::traffic::TcpRun {
        let server = cluster.pod(to).expect("pod").network.clone();
        let client_ns = cluster.pod(from).expect("pod").network.netns.clone();
        meshctl::traffic::TcpRun::start(&server.netns, &client_ns, server.ip, port)
            .unwrap_or_else(|e| panic!("TCP stream {from} -> {to}:{port}: {e}"))
    }
}

/// Waits until `node`'s agent answers `/readyz` with 200.
pub async fn wait_agent_ready(cluster: &VirtualCluster, node: &str, timeout: Duration) {
    wait_async(&format!("{node}'s agent ready"), timeout, || async move {
        agent_http(cluster, node, "/readyz").await.map(|_| ())
    })
    .await;
}

/// What [`kill_agent_under_traffic`] measured.
#[derive(Debug, Clone)]
pub struct AgentKill {
    pub ping: PingResult,
    /// Ping replies between the kill and the restarted agent's readiness: the datapath carried
    /// traffic while no agent (or a starting one) ran.
    pub replies_while_down: usize,
    /// Bytes the TCP stream delivered (all it sent).
    pub tcp_bytes: u64,
    /// From the kill until the restarted agent answered `/readyz`.
    pub ready_after: Duration,
    pub ifindex: u32,
}

/// Issue 12, "Done when": `kill -9` of `node`'s agent while a 10 ms ping and a TCP stream run
/// from pod `from` to pod `to` (on different nodes). Asserts nothing is lost (every ping
/// answered, the stream delivers every byte without a reset) and the restarted agent keeps the
/// device (same ifindex) and the key, published and on the device. The ping runs from 2 s before
/// the kill until 1 s after the restarted agent is ready (however long that takes), 12 s at
/// least, and must have had replies while the agent was down or starting.
pub async fn kill_agent_under_traffic(
    cluster: &mut VirtualCluster,
    node: &str,
    from: &str,
    to: &str,
    port: u16,
) -> AgentKill {
    let ifindex_before = device_ifindex(cluster, node).expect("ifindex");
    let key_before = device_public_key(cluster, node).expect("device key");
    assert_eq!(
        Some(&key_before),
        published_key(cluster, node).await.as_ref(),
        "the device holds the published key"
    );

    let ping = PingRun::start(cluster, from, to, Duration::from_millis(10), 1_000_000);
    let ping_started = std::time::Instant::now();
    let tcp = TcpFlow::start(cluster, from, to, port);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let killed = kill_agent(cluster, node);
    let (killed_at, killed_wall) = (std::time::Instant::now(), std::time::SystemTime::now());
    let restarted = wait_restarted(cluster, node, Role::Agent, killed);
    wait_agent_ready(cluster, node, Duration::from_secs(120)).await;
    let (ready_after, ready_wall) = (killed_at.elapsed(), std::time::SystemTime::now());
    // Traffic through the new agent's first passes too, and 12 s of pings at least.
    let rest = Duration::from_secs(12).saturating_sub(ping_started.elapsed());
    tokio::time::sleep(rest.max(Duration::from_secs(1))).await;

    let result = tokio::task::block_in_place(|| ping.interrupt());
    let (sent, received) = tokio::task::block_in_place(|| tcp.finish())
        .unwrap_or_else(|e| panic!("the TCP stream broke across the agent kill: {e}"));
    let ifindex_after = device_ifindex(cluster, node).expect("ifindex");
    let key_after = device_public_key(cluster, node).expect("device key");
    let replies_while_down = result.replies_between(killed_wall, ready_wall);
    eprintln!(
        "agent kill -9 on {node} (pid {} -> {}), ready again after {:.1} s: ping {} sent, {} \
         received, {} lost ({} in flight when ping stopped), {} replies between the kill and \
         the new agent's readiness, longest gap {:.0} ms; TCP {} bytes sent, {} received, no \
         reset; device ifindex {} -> {}",
        killed.pid,
        restarted.pid,
        ready_after.as_secs_f64(),
        result.transmitted,
        result.received,
        result.lost(),
        result.in_flight_at_stop,
        replies_while_down,
        result.max_gap_ms,
        sent,
        received,
        ifindex_before,
        ifindex_after,
    );
    // The ping ran (an emulated guest sends far fewer than one per 10 ms); that it covered the
    // kill and the restart is the reply count between them, below.
    assert!(result.transmitted >= 100, "ping ran: {result:?}");
    assert_eq!(result.lost(), 0, "no ping lost across the agent kill");
    assert!(
        replies_while_down > 0,
        "the ping covered the agent's absence: {result:?}"
    );
    assert!(
        result.replies_between(ready_wall, std::time::SystemTime::now()) > 0,
        "replies after the restarted agent was ready: {result:?}"
    );
    // A round trip's worth of requests at most (an emulated guest's can be long), not an outage.
    assert!(
        result.in_flight_at_stop <= 100,
        "requests unanswered at the end: {result:?}"
    );
    assert!(
        sent > 0 && received == sent,
        "TCP: {sent} sent, {received} received"
    );
    assert_eq!(ifindex_after, ifindex_before, "the same device was adopted");
    assert_eq!(key_after, key_before, "the same key");
    assert_eq!(
        published_key(cluster, node).await,
        Some(key_before),
        "the same published key"
    );
    AgentKill {
        ping: result,
        replies_while_down,
        tcp_bytes: received,
        ready_after,
        ifindex: ifindex_after,
    }
}

/// The kind of `node`'s tunnel interface as `ip -d link` names it: `wireguard` for a kernel
/// link, `tun` for the userspace device.
pub fn device_kind(cluster: &VirtualCluster, node: &str) -> Result<String, String> {
    link_kind(cluster, node, &ifname(cluster, node))
}

/// [`device_kind`] of the interface `ifname` in `node` (a rotation's second slot).
pub fn link_kind(cluster: &VirtualCluster, node: &str, ifname: &str) -> Result<String, String> {
    let out = cluster
        .exec_in_node(node, ["ip", "-d", "-o", "link", "show", ifname])
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    ["wireguard", "tun"]
        .into_iter()
        .find(|kind| text.split_whitespace().any(|w| w == *kind))
        .map(str::to_string)
        .ok_or_else(|| format!("no wireguard or tun link on {node}: {text}"))
}

/// Traffic between every pair of pods on different nodes (ping, TCP and UDP echo carrying a
/// marker) under a capture of the underlay bridge; asserts every flow worked and the capture
/// saw only WireGuard between nodes. Returns the flows and the capture.
pub fn all_pairs_encrypted(
    cluster: &VirtualCluster,
    what: &str,
    marker: &str,
) -> (Vec<demo::FlowResult>, CaptureReport) {
    let description = cluster.description();
    let (results, report) =
        capture_underlay(cluster, marker, || demo::traffic(&description, marker));
    let failures: Vec<String> = results
        .iter()
        .flat_map(|r| [&r.icmp, &r.tcp, &r.udp])
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .collect();
    if !failures.is_empty() {
        print_agent_logs(cluster);
    }
    assert!(
        failures.is_empty(),
        "{what}: flows failed:\n{}",
        failures.join("\n")
    );
    assert!(
        report.clean(),
        "{what}: underlay not clean: {}\n{}",
        report.summary(),
        report.violations.join("\n")
    );
    // A request and a reply per TCP and UDP flow at least, encrypted.
    assert!(
        report.wireguard_data() >= results.len() * 4,
        "{what}: too little WireGuard data for {} flows: {}",
        results.len(),
        report.summary()
    );
    eprintln!("{what}: {} flows; {}", results.len(), report.summary());
    (results, report)
}
/// Runs `traffic` while capturing on the cluster's underlay bridge, and classifies what crossed
/// it (WireGuard between nodes, plaintext pod packets, hits of `marker`); see
/// `meshctl::capture::during`.
pub fn capture_underlay<T>(
    cluster: &VirtualCluster,
    marker: &str,
    traffic: impl FnOnce() -> T,
) -> (T, CaptureReport) {
    let description = cluster.description();
    let underlay = demo::underlay_of(&description).expect("underlay");
    tokio::task::block_in_place(|| {
        capture::during(
            &description.bridge,
            &underlay,
            marker.as_bytes(),
            Duration::from_millis(300),
            traffic,
        )
    })
    .expect("capture on the underlay bridge")
}

/// The Events the wiremesh agents recorded about Node `node`.
pub async fn agent_events(
    cluster: &VirtualCluster,
    node: &str,
) -> Vec<k8s_openapi::api::events::v1::Event> {
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(cluster.client().clone(), "default");
    events
        .list(&kube::api::ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(node)
                && e.reporting_controller.as_deref() == Some("wiremesh.io/mesh-agent")
        })
        .collect()
}
