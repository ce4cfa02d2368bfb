//! `meshctl demo up|down`: a local multi-node cluster on this machine. `up` starts the testenv
//! kube-apiserver and a [`VirtualCluster`] (nodes and pods as network namespaces), installs the
//! wiremesh CRDs, enables the mesh with `MeshEncryption default`, starts per node inside the node's
//! namespace two supervised processes, the userspace device (`mesh-agent device`) and the agent
//! (`mesh-agent run`, with the node's own credentials), waits until
//! `meshctl status` calls the mesh converged, and leaves it running, described in
//! `/run/wiremesh-demo/cluster.json`. `down` reads that file and removes everything it lists
//! (processes by PID and start time, namespaces and links by their recorded names).
//!
//! The helpers here ([`install_crds`], [`set_mesh_enabled`], [`start_agent`]) are also what the
//! scenario tests use, so the demo and the tests build the mesh the same way.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use wiremesh_crds::{MESH_ENCRYPTION_NAME, MeshEncryption, manifests};
use wiremesh_integration::{
    ClusterDescription, ClusterOptions, ProcessIdentity, Role, VirtualCluster,
};

use crate::{
    capture::{self, CaptureReport, Underlay},
    rotate,
    status::{self, MeshStatus},
    traffic::{LongPing, PodEnd, TcpRun, TrafficError, ping, tcp_echo, udp_echo},
};

/// Where `demo up` writes the cluster description.
pub const DEMO_DIR: &str = "/run/wiremesh-demo";

/// The demo directory in use: `$WIREMESH_DEMO_DIR`, else [`DEMO_DIR`] (two demos side by side
/// on one machine need two directories).
pub fn demo_dir() -> PathBuf {
    std::env::var_os("WIREMESH_DEMO_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from(DEMO_DIR), PathBuf::from)
}

/// Field manager of meshctl's server-side applies.
const FIELD_MANAGER: &str = "meshctl";

/// Port of each agent's metrics server (inside its node namespace, on every address).
pub const AGENT_HTTP_PORT: u16 = 9871;

/// Port of each agent's authenticated API (reached through the API server's node proxy).
pub const AGENT_API_PORT: u16 = 9872;

/// Why a demo step failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the CRD manifests cannot be generated: {0}")]
    Manifests(#[from] wiremesh_crds::ManifestError),
    #[error("apply CRD {name}: {source}")]
    ApplyCrd {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("CRD {name} not established within {timeout:?}")]
    NotEstablished { name: String, timeout: Duration },
    #[error("apply MeshEncryption {MESH_ENCRYPTION_NAME}: {0}")]
    ApplyMeshEncryption(#[source] kube::Error),
    #[error("start the agent of {node}: {source}")]
    StartAgent {
        node: String,
        #[source]
        source: wiremesh_integration::ClusterError,
    },
    #[error("mesh not converged within {timeout:?}:\n  - {}", problems.join("\n  - "))]
    NotConverged {
        timeout: Duration,
        problems: Vec<String>,
    },
    #[error("read mesh status: {0}")]
    Status(#[from] status::StatusError),
}

/// Applies every wiremesh CRD (the same definitions as `deploy/crds/`, which a test keeps in
/// sync) and waits until the API server serves them.
pub async fn install_crds(client: &Client) -> Result<(), DemoError> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut names = Vec::new();
    for manifest in manifests()? {
        let name = manifest.crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &params, &Patch::Apply(&manifest.crd))
            .await
            .map_err(|source| DemoError::ApplyCrd {
                name: name.clone(),
                source,
            })?;
        names.push(name);
    }
    let timeout = Duration::from_secs(60);
    for name in names {
        let established = wiremesh_integration::wait::until(
            &format!("CRD {name} established"),
            timeout,
            Duration::from_millis(200),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let crd = api.get(&name).await.map_err(|e| e.to_string())?;
                    let ok = crd
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    if ok {
                        Ok(())
                    } else {
                        Err("not established".into())
                    }
                }
            },
        )
        .await;
        if established.is_err() {
            return Err(DemoError::NotEstablished { name, timeout });
        }
    }
    Ok(())
}

/// Creates or updates `MeshEncryption default` with `enabled` (other fields keep their defaults).
pub async fn set_mesh_enabled(client: &Client, enabled: bool) -> Result<(), DemoError> {
    let api = Api::<MeshEncryption>::all(client.clone());
    let body = serde_json::json!({
        "apiVersion": "wiremesh.io/v1alpha1",
        "kind": "MeshEncryption",
        "metadata": { "name": MESH_ENCRYPTION_NAME },
        "spec": { "enabled": enabled },
    });
    api.patch(
        MESH_ENCRYPTION_NAME,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(DemoError::ApplyMeshEncryption)?;
    Ok(())
}

/// The `mesh-agent` arguments for `node`: state (the key) under the cluster's work dir, the
/// tunnel interface named after the node's namespace (unique on the host, so the wg(8) UAPI
/// sockets in /var/run/wireguard never collide) and the HTTP server on every address of the node
/// namespace (reachable from the host at the node's underlay IP).
pub fn agent_args(cluster: &VirtualCluster, node: &str) -> Result<Vec<OsString>, DemoError> {
    let n = cluster.node(node).map_err(|source| DemoError::StartAgent {
        node: node.to_string(),
        source,
    })?;
    let state_dir = cluster.work_dir().join("state").join(node);
    Ok(vec![
        "run".into(),
        "--state-dir".into(),
        state_dir.into_os_string(),
        "--interface".into(),
        n.network.netns.clone().into(),
        "--interface-b".into(),
        format!("{}b", n.network.netns).into(),
        "--metrics-addr".into(),
        format!("0.0.0.0:{AGENT_HTTP_PORT}").into(),
        "--bpffs".into(),
        cluster.bpffs().as_os_str().to_owned(),
        // Every agent stands for rotation coordinator with its own pod-bound ServiceAccount token,
        // under the RBAC of deploy/ (the Lease in the ServiceAccount's namespace), as in the
        // DaemonSet where the in-cluster token is that same identity.
        "--coordinator-kubeconfig".into(),
        n.kubeconfig.clone().into_os_string(),
        "--lease-namespace".into(),
        cluster.agent_identity().namespace.clone().into(),
        "--api-addr".into(),
        format!("0.0.0.0:{AGENT_API_PORT}").into(),
        "--client-ca-file".into(),
        cluster.proxy_client_ca().into_os_string(),
    ])
}

/// The second slot's tunnel interface of `node` (its namespace's name + `b`), where a key rotation
/// brings up the next world.
pub fn interface_b(cluster: &VirtualCluster, node: &str) -> Result<String, DemoError> {
    let n = cluster.node(node).map_err(|source| DemoError::StartAgent {
        node: node.to_string(),
        source,
    })?;
    Ok(format!("{}b", n.network.netns))
}

/// The `mesh-agent device` arguments for `node`: the userspace WireGuard device named like the
/// agent's `--interface`, in the foreground (its supervisor restarts it).
pub fn device_args(cluster: &VirtualCluster, node: &str) -> Result<Vec<OsString>, DemoError> {
    let n = cluster.node(node).map_err(|source| DemoError::StartAgent {
        node: node.to_string(),
        source,
    })?;
    Ok(vec![
        "device".into(),
        n.network.netns.clone().into(),
        "--foreground".into(),
    ])
}

/// Which WireGuard device a node's agent drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeDevice {
    /// The userspace device process (`mesh-agent device`), supervised next to the agent; the
    /// agent's datapath choice is left to `--datapath`/`MeshEncryption.spec.datapath`.
    Userspace,
    /// A kernel `wireguard` link the agent creates or adopts (`--datapath kernel`); no device
    /// process runs. Needs the WireGuard module (the kernel VM has it, this host does not).
    Kernel,
}

/// Starts the two processes of `node` in its namespace, each under a supervisor that restarts it
/// within a second (as the two containers of the wiremesh pod on a real node): the userspace
/// device (`mesh-agent device`, unless one runs already) and the agent (`mesh-agent run` with the
/// node's own kubeconfig). Returns the agent's first run. Log filter: `$WIREMESH_AGENT_LOG`
/// (default `info,kube=warn`).
pub fn start_agent(
    cluster: &mut VirtualCluster,
    node: &str,
    agent_binary: &Path,
    extra_args: &[&str],
) -> Result<ProcessIdentity, DemoError> {
    start_node(
        cluster,
        node,
        agent_binary,
        NodeDevice::Userspace,
        extra_args,
    )
}

/// [`start_agent`] with the node's device chosen: with [`NodeDevice::Kernel`] only the agent
/// runs, with `--datapath kernel` after `extra_args`.
pub fn start_node(
    cluster: &mut VirtualCluster,
    node: &str,
    agent_binary: &Path,
    device: NodeDevice,
    extra_args: &[&str],
) -> Result<ProcessIdentity, DemoError> {
    let log_filter = || {
        vec![(
            OsString::from("RUST_LOG"),
            std::env::var_os("WIREMESH_AGENT_LOG").unwrap_or_else(|| "info,kube=warn".into()),
        )]
    };
    let failed = |source| DemoError::StartAgent {
        node: node.to_string(),
        source,
    };
    if device == NodeDevice::Userspace && cluster.supervised_pid(node, Role::Device).is_none() {
        let args = device_args(cluster, node)?;
        cluster
            .spawn_supervised(node, Role::Device, agent_binary, args, log_filter())
            .map_err(failed)?;
    }
    // The second slot's device: a key rotation brings up the next world there (a kernel node
    // creates the second link itself).
    if device == NodeDevice::Userspace && cluster.supervised_pid(node, Role::DeviceB).is_none() {
        let args: Vec<OsString> = vec![
            "device".into(),
            interface_b(cluster, node)?.into(),
            "--foreground".into(),
        ];
        cluster
            .spawn_supervised(node, Role::DeviceB, agent_binary, args, log_filter())
            .map_err(failed)?;
    }
    let mut args = agent_args(cluster, node)?;
    args.extend(extra_args.iter().map(OsString::from));
    if device == NodeDevice::Kernel {
        args.extend(["--datapath".into(), "kernel".into()]);
    }
    cluster
        .spawn_supervised(node, Role::Agent, agent_binary, args, log_filter())
        .map_err(failed)
}

/// `demo rotate`: a rotation of every node while a 10 ms ping and a TCP stream run between pods on
/// different nodes; prints the keys before and after and what was lost. Returns whether it
/// completed with nothing lost.
pub async fn rotate_under_traffic(description: &ClusterDescription) -> anyhow::Result<bool> {
    use anyhow::Context as _;
    let client = mesh_agent::app::kube_client_from(Some(&description.kubeconfig)).await?;
    let from = description.pods.first().context("the demo has no pod")?;
    let to = description
        .pods
        .iter()
        .find(|p| p.node != from.node)
        .context("the demo has no pods on two nodes")?;
    let print_keys = |title: &str, status: &MeshStatus| {
        println!("    {title}:");
        for n in &status.nodes {
            println!(
                "      {:<10} key {:<9} generation {}",
                n.name,
                n.key_fingerprint.as_deref().unwrap_or("-"),
                n.key_generation.map_or("-".to_string(), |g| g.to_string())
            );
        }
    };
    let before = status::collect(&client).await?;
    print_keys("keys before", &before);
    println!(
        "    traffic: ping every 10 ms {} -> {}, TCP stream {} -> {}",
        from.name, to.name, to.name, from.name
    );
    let ping_run = LongPing::start(&from.netns, to.ip).context("start ping")?;
    let tcp = TcpRun::start(&from.netns, &to.netns, from.ip, 7014).context("start TCP")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let created = rotate::create(
        &client,
        &rotate::RotateOptions {
            nodes: None,
            revoke: false,
            reason: "make demo".into(),
            phase_timeout: Some("60s".into()),
        },
    )
    .await?;
    let name = created.metadata.name.clone().unwrap_or_default();
    let done = rotate::follow(&client, &name, Duration::from_secs(180), |line| {
        println!("    [{:>4.1}s] {line}", started.elapsed().as_secs_f64())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let count = ping_run.stop().context("ping")?;
    let stream = tcp.finish();
    let complete = rotate::phase(&done) == wiremesh_crds::RotationPhase::Complete;
    // Each agent publishes its new identity in its first pass after Complete.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut after = status::collect(&client).await?;
    while complete
        && std::time::Instant::now() < deadline
        && after.nodes.iter().any(|n| {
            before
                .node(&n.name)
                .is_some_and(|b| b.key_fingerprint == n.key_fingerprint)
        })
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = status::collect(&client).await?;
    }
    print_keys("keys after", &after);
    println!(
        "    ping: {} sent, {} received, {} lost{}; TCP stream: {}",
        count.sent,
        count.received,
        count.lost(),
        count.first_lost.map_or(String::new(), |s| format!(
            " (first: icmp_seq {s}, 10 ms apart from 1)"
        )),
        match &stream {
            Ok((sent, received)) => format!("{sent} bytes sent, {received} received, no reset"),
            Err(e) => format!("FAILED: {e}"),
        }
    );
    let changed = after.nodes.iter().all(|n| {
        before
            .node(&n.name)
            .is_some_and(|b| b.key_fingerprint != n.key_fingerprint)
    });
    Ok(complete && changed && count.lost() == 0 && stream.is_ok_and(|(s, r)| s == r))
}

/// Polls `meshctl status` until the mesh is converged, printing progress through `progress`.
pub async fn wait_converged(
    client: &Client,
    timeout: Duration,
    mut progress: impl FnMut(&MeshStatus),
) -> Result<MeshStatus, DemoError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let status = status::collect(client).await?;
        progress(&status);
        if status.converged() {
            return Ok(status);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DemoError::NotConverged {
                timeout,
                problems: status.all_problems(),
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `mesh-agent` next to the running executable (both come from the same `cargo build`).
pub fn default_agent_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("mesh-agent")))
        .unwrap_or_else(|| PathBuf::from("mesh-agent"))
}

/// Options of `demo up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub nodes: u32,
    pub pods_per_node: u32,
    pub agent_binary: PathBuf,
    pub timeout: Duration,
    pub demo_dir: PathBuf,
    /// Pods and nodes get an IPv6 address and podCIDR too (`ClusterOptions::dual_stack`).
    pub dual_stack: bool,
}

/// `demo up`: see the module docs. Returns the description written to `cluster.json`.
pub async fn up(opts: &UpOptions) -> anyhow::Result<ClusterDescription> {
    use anyhow::Context as _;

    let description_path = opts.demo_dir.join("cluster.json");
    if description_path.exists() {
        anyhow::bail!(
            "{} exists: a demo is already running (run `meshctl demo down` first)",
            description_path.display()
        );
    }
    if !opts.agent_binary.exists() {
        anyhow::bail!(
            "agent binary {} not found (build it with `cargo build -p mesh-agent`, or pass --agent-bin)",
            opts.agent_binary.display()
        );
    }
    let supervisor = wiremesh_integration::supervise::default_binary();
    if !supervisor.exists() {
        anyhow::bail!(
            "supervisor binary {} not found (build it with `cargo build -p wiremesh-integration`, \
             or set WIREMESH_SUPERVISOR_BIN)",
            supervisor.display()
        );
    }
    std::fs::create_dir_all(&opts.demo_dir)
        .with_context(|| format!("create {}", opts.demo_dir.display()))?;

    println!(
        "==> starting kube-apiserver (testenv) and {} nodes x {} pods as network namespaces",
        opts.nodes, opts.pods_per_node
    );
    let mut cluster = VirtualCluster::start(ClusterOptions {
        nodes: opts.nodes,
        pods_per_node: opts.pods_per_node,
        outlive_parent: true,
        dual_stack: opts.dual_stack,
        // `meshctl demo fault apiserver-stop|apiserver-slow` act on the agents' API traffic
        // through the proxy and count their requests in the audit log.
        api_proxy: true,
        audit_log: true,
        ..ClusterOptions::default()
    })
    .await
    .context("start the virtual cluster")?;

    // From here on a failure tears the cluster down (VirtualCluster's Drop).
    let client = cluster.client().clone();
    println!("==> installing the wiremesh CRDs and enabling the mesh (MeshEncryption default)");
    install_crds(&client).await?;
    set_mesh_enabled(&client, true).await?;

    let node_names: Vec<String> = cluster.nodes().iter().map(|n| n.name.clone()).collect();
    for node in &node_names {
        let identity = start_agent(&mut cluster, node, &opts.agent_binary, &[])?;
        let device = cluster
            .supervised_pid(node, Role::Device)
            .map_or_else(|| "?".to_string(), |d| d.pid.to_string());
        let n = cluster.node(node)?;
        println!(
            "    {node}: mesh-agent pid {}, device pid {device} in netns {} (underlay {}, pods {})",
            identity.pid, n.network.netns, n.network.underlay_ip, n.network.pod_cidr
        );
    }

    println!("==> waiting for the mesh to converge (keys published, peers configured, handshakes)");
    let mut last = String::new();
    let status = wait_converged(&client, opts.timeout, |s| {
        let done = s.nodes.iter().filter(|n| n.converged()).count();
        let line = format!("    {done}/{} nodes converged", s.nodes.len());
        if line != last {
            println!("{line}");
            last = line;
        }
    })
    .await;
    if let Err(error) = status {
        for node in cluster.nodes() {
            if let Some(log) = &node.agent_log {
                eprintln!("--- last lines of {}", log.display());
                if let Ok(text) = std::fs::read_to_string(log) {
                    for line in text
                        .lines()
                        .rev()
                        .take(15)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                    {
                        eprintln!("{line}");
                    }
                }
            }
        }
        return Err(error.into());
    }

    let description = cluster.detach();
    description
        .write(&description_path)
        .with_context(|| format!("write {}", description_path.display()))?;
    Ok(description)
}

/// `demo down`: removes everything listed in `cluster.json`, then the file.
pub fn down(demo_dir: &Path) -> anyhow::Result<bool> {
    use anyhow::Context as _;

    let path = demo_dir.join("cluster.json");
    if !path.exists() {
        return Ok(false);
    }
    let description = ClusterDescription::read(&path)?;
    description
        .teardown()
        .with_context(|| format!("tear down the cluster of {}", path.display()))?;
    std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    // The directory is ours; leave it if someone put other files there.
    let _ = std::fs::remove_dir(demo_dir);
    Ok(true)
}

/// Reads `cluster.json` of the running demo.
pub fn running(demo_dir: &Path) -> anyhow::Result<ClusterDescription> {
    let path = demo_dir.join("cluster.json");
    if !path.exists() {
        anyhow::bail!(
            "no demo is running ({} absent; start one with `meshctl demo up`)",
            path.display()
        );
    }
    Ok(ClusterDescription::read(&path)?)
}

/// One cross-node flow of [`traffic`] and its outcome per protocol.
#[derive(Debug)]
pub struct FlowResult {
    pub from: PodEnd,
    pub from_node: String,
    pub to: PodEnd,
    pub to_node: String,
    pub icmp: Result<(), TrafficError>,
    pub tcp: Result<(), TrafficError>,
    pub udp: Result<(), TrafficError>,
}

impl FlowResult {
    pub fn ok(&self) -> bool {
        self.icmp.is_ok() && self.tcp.is_ok() && self.udp.is_ok()
    }
}

/// The payload marker of demo traffic; the underlay capture must never see it.
pub const DEMO_MARKER: &str = "wiremesh-demo-plaintext-marker";

/// The underlay of a described cluster, for [`capture::classify`].
pub fn underlay_of(description: &ClusterDescription) -> anyhow::Result<Underlay> {
    let control_plane_ip = description
        .api_server
        .trim_start_matches("https://")
        .rsplit_once(':')
        .and_then(|(host, _)| host.parse().ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot read the API server address {:?}",
                description.api_server
            )
        })?;
    let pod_cidrs = description
        .nodes
        .iter()
        .map(|n| n.pod_cidr.parse())
        .collect::<Result<Vec<Ipv4Net>, _>>()
        .map_err(|e| anyhow::anyhow!("bad podCIDR in the description: {e}"))?;
    let pod_cidrs6 = description
        .nodes
        .iter()
        .filter_map(|n| n.pod_cidr6.as_deref())
        .map(str::parse)
        .collect::<Result<Vec<Ipv6Net>, _>>()
        .map_err(|e| anyhow::anyhow!("bad IPv6 podCIDR in the description: {e}"))?;
    Ok(Underlay {
        node_ips: description.nodes.iter().map(|n| n.underlay_ip).collect(),
        control_plane_ip,
        pod_cidrs,
        pod_cidrs6,
        wireguard_port: wiremesh_keyexchange::DEFAULT_LISTEN_PORT,
    })
}

/// Ping, TCP echo and UDP echo between every ordered pair of pods on different nodes (over
/// IPv4, and over IPv6 too between dual-stack pods); each payload carries `marker`.
pub fn traffic(description: &ClusterDescription, marker: &str) -> Vec<FlowResult> {
    let ends: Vec<(PodEnd, String)> = description
        .pods
        .iter()
        .flat_map(|p| {
            std::iter::once(std::net::IpAddr::from(p.ip))
                .chain(p.ip6.map(Into::into))
                .map(|ip| {
                    (
                        PodEnd {
                            name: p.name.clone(),
                            netns: p.netns.clone(),
                            ip,
                        },
                        p.node.clone(),
                    )
                })
        })
        .collect();
    let timeout = Duration::from_secs(5);
    let mut results = Vec::new();
    for (from, from_node) in &ends {
        for (to, to_node) in &ends {
            if from_node == to_node || from.ip.is_ipv4() != to.ip.is_ipv4() {
                continue;
            }
            let payload = format!("{marker} {} -> {}", from.name, to.name);
            results.push(FlowResult {
                icmp: ping(from, to, 3),
                tcp: tcp_echo(from, to, payload.as_bytes(), timeout),
                udp: udp_echo(from, to, payload.as_bytes(), timeout, 3),
                from: from.clone(),
                from_node: from_node.clone(),
                to: to.clone(),
                to_node: to_node.clone(),
            });
        }
    }
    results
}

/// The live flow table of every agent of the demo (through the API server's node proxy), by
/// node.
pub async fn agent_flows(
    agents: &crate::agents::Agents,
    description: &ClusterDescription,
) -> Vec<(
    String,
    Result<Vec<mesh_agent::flows::Flow>, crate::agents::AgentError>,
)> {
    let mut out = Vec::new();
    for n in &description.nodes {
        let flows = agents.flows(&n.name, None, None).await.map(|r| r.flows);
        out.push((n.name.clone(), flows));
    }
    out
}

/// [`traffic`] with a capture on the underlay bridge running throughout.
pub fn traffic_with_capture(
    description: &ClusterDescription,
) -> anyhow::Result<(Vec<FlowResult>, CaptureReport)> {
    let underlay = underlay_of(description)?;
    let (results, report) = capture::during(
        &description.bridge,
        &underlay,
        DEMO_MARKER.as_bytes(),
        Duration::from_millis(300),
        || traffic(description, DEMO_MARKER),
    )?;
    Ok((results, report))
}
