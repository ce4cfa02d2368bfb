//! The control-plane scale harness (issue 17), shared by the benchmark
//! (`examples/scale_bench.rs`, `make bench-scale`) and its correctness test
//! (`tests/scale_harness.rs`, a small N under `make test`), included with `#[path]`.
//!
//! One virtual cluster node runs a real `mesh-agent run` with its userspace device (persistent
//! keepalive off: the synthetic peers' endpoints are never contacted). Against the same testenv
//! apiserver the harness then creates `nodes` synthetic Node objects (published key, endpoint in
//! 198.18.0.0/15, the RFC 2544 benchmarking range, a pod CIDR in 10.128.0.0/10) with
//! `pods_per_node` running Pods each, and runs `agents` simulated agents in this process: each a
//! separate kube client driving the agent's own watchers (`mesh_agent::watch::watchers`: the same
//! watch, backoff, pruning and reflector code) and reading a node out of its cache with the
//! agent's view code (`views::node_addresses`, `NodeAnnotations::parse`).
//!
//! Measured: the time for a new node's key to reach every simulated agent (and the real agent's
//! device), p50/p99; apiserver requests per agent per minute at steady state (the apiserver's own
//! `apiserver_request_total`); apiserver, simulated-agent and real-agent CPU; the real agent's RSS;
//! its eBPF maps (from `/proc/<pid>/fdinfo`); and the time the real agent takes to apply the full
//! peer set into a fresh device (its device process killed and restarted empty).

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::reflector::ObjectRef,
};
use mesh_agent::{drain, views, watch};
use tokio::sync::Notify;
use wiremesh_integration::{Role, VirtualCluster, objects};
use wiremesh_keyexchange::{NodeAnnotations, PrivateKey};

use crate::support::{Shape, ifname, start_mesh_with_args};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Synthetic Node objects.
    pub nodes: usize,
    /// Simulated agents (each with its own client and watches).
    pub agents: usize,
    pub pods_per_node: usize,
    /// New nodes whose key propagation is timed.
    pub new_nodes: usize,
    /// Length of the steady-state window.
    pub steady: Duration,
    /// Which of the agent's watches the simulated agents run (`None`: all of them).
    pub sim_watches: Option<Vec<String>>,
    /// Concurrent object creations.
    pub concurrency: usize,
}

/// One eBPF map of the real agent.
#[derive(Debug, Clone)]
pub struct BpfMap {
    pub map_type: u32,
    pub max_entries: u64,
    pub key_size: u64,
    pub value_size: u64,
    pub memlock: u64,
}

/// What was measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub nodes: usize,
    pub agents: usize,
    pub pods: usize,
    pub create_secs: f64,
    /// Per (new node, simulated agent): seconds from the annotation write to the agent's cache.
    pub propagation: Vec<f64>,
    /// Per new node: seconds until the real agent's device has the peer.
    pub real_propagation: Vec<f64>,
    pub missed: usize,
    pub requests_per_agent_min: f64,
    pub requests_total_min: f64,
    pub steady_secs: f64,
    pub apiserver_cpu: f64,
    pub sim_cpu: f64,
    pub agent_cpu: f64,
    pub agent_rss_kib: u64,
    pub agent_hwm_kib: u64,
    /// `RssAnon` (heap, stacks) and `RssFile` (mostly the binary's own code) of the agent.
    pub agent_anon_kib: u64,
    pub agent_file_kib: u64,
    pub sim_rss_kib: u64,
    pub device_peers: usize,
    pub full_apply_secs: f64,
    pub bpf_maps: Vec<BpfMap>,
}

impl Report {
    pub fn percentile(samples: &[f64], p: f64) -> f64 {
        if samples.is_empty() {
            return f64::NAN;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
        s[rank.clamp(1, s.len()) - 1]
    }

    /// A Markdown table row set for docs/benchmarks.md.
    pub fn print(&self) {
        let p = |v: &[f64], q| Self::percentile(v, q);
        let bpf_bytes: u64 = self.bpf_maps.iter().map(|m| m.memlock).sum();
        let bpf_entries: u64 = self.bpf_maps.iter().map(|m| m.max_entries).sum();
        println!("| measure | value |");
        println!("|---|---|");
        println!(
            "| Node objects / simulated agents / pods | {} / {} / {} (created in {:.1} s) |",
            self.nodes, self.agents, self.pods, self.create_secs
        );
        println!(
            "| new node's key in every simulated agent's cache, p50 / p99 / max ({} samples, {} missed) | {:.3} / {:.3} / {:.3} s |",
            self.propagation.len(),
            self.missed,
            p(&self.propagation, 50.0),
            p(&self.propagation, 99.0),
            p(&self.propagation, 100.0)
        );
        println!(
            "| new node's peer on the real agent's device, p50 / max ({} samples) | {:.3} / {:.3} s |",
            self.real_propagation.len(),
            p(&self.real_propagation, 50.0),
            p(&self.real_propagation, 100.0)
        );
        println!(
            "| apiserver requests at steady state ({:.0} s window) | {:.1}/min total, {:.2}/min per agent |",
            self.steady_secs, self.requests_total_min, self.requests_per_agent_min
        );
        println!(
            "| CPU at steady state (cores): apiserver / simulated agents / real agent | {:.3} / {:.3} / {:.4} |",
            self.apiserver_cpu, self.sim_cpu, self.agent_cpu
        );
        println!(
            "| real agent RSS (now / peak) with {} peers | {:.1} / {:.1} MiB (anonymous {:.1}, file-backed {:.1}) |",
            self.device_peers,
            self.agent_rss_kib as f64 / 1024.0,
            self.agent_hwm_kib as f64 / 1024.0,
            self.agent_anon_kib as f64 / 1024.0,
            self.agent_file_kib as f64 / 1024.0
        );
        println!(
            "| simulated agents' process RSS | {:.0} MiB ({:.2} MiB per agent) |",
            self.sim_rss_kib as f64 / 1024.0,
            self.sim_rss_kib as f64 / 1024.0 / self.agents.max(1) as f64
        );
        println!(
            "| full peer set ({} peers) applied into a fresh device by the agent | {:.2} s |",
            self.device_peers, self.full_apply_secs
        );
        println!(
            "| eBPF maps of the agent: count / sum of max_entries / memlock | {} / {} / {:.1} MiB |",
            self.bpf_maps.len(),
            bpf_entries,
            bpf_bytes as f64 / 1048576.0
        );
        for m in &self.bpf_maps {
            println!(
                "|   map type {} key {} B value {} B | max_entries {} memlock {} KiB |",
                m.map_type,
                m.key_size,
                m.value_size,
                m.max_entries,
                m.memlock / 1024
            );
        }
    }
}

/// Synthetic node `i` (0-based): name, pod CIDR, address.
fn synthetic(i: usize) -> (String, Ipv4Net, Ipv4Addr) {
    let (hi, lo) = ((i / 256) as u8, (i % 256) as u8);
    (
        format!("scale-{i:05}"),
        Ipv4Net::new(Ipv4Addr::new(10, 128 + hi, lo, 0), 24).expect("net"),
        Ipv4Addr::new(198, 18 + hi / 128, hi % 128 * 2 + lo / 128, lo % 128 + 1),
    )
}

/// A fresh key and the annotations publishing it with an endpoint at `ip`.
fn fresh_identity(ip: Ipv4Addr) -> (wiremesh_keyexchange::PublicKey, BTreeMap<String, String>) {
    let key = PrivateKey::generate().expect("key").public_key();
    let annotations = NodeAnnotations {
        public_key: key,
        endpoint: (IpAddr::V4(ip), 51871).into(),
        key_generation: 1,
        next_public_key: None,
        next_endpoint: None,
        rotation: None,
    }
    .render();
    (key, annotations)
}

/// Creates synthetic node `i` with a fresh key; returns (name, public key, time of the
/// annotation write).
async fn create_node(client: &Client, i: usize) -> (String, String, Instant) {
    let (name, cidr, ip) = synthetic(i);
    objects::create_node(client, &name, cidr, ip)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (key, annotations) = fresh_identity(ip);
    let at = Instant::now();
    Api::<Node>::all(client.clone())
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": annotations}})),
        )
        .await
        .unwrap_or_else(|e| panic!("annotating {name}: {e}"));
    (name, key.to_base64(), at)
}

async fn create_pods(client: &Client, i: usize, per_node: usize) {
    let (name, cidr, ip) = synthetic(i);
    for p in 0..per_node {
        let pod_ip = cidr.hosts().nth(p + 1).expect("pod ip");
        objects::create_pod(client, "scale", &format!("{name}-{p}"), &name, pod_ip, ip)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The probe the simulated agents look for: a node name and the key it must carry.
#[derive(Default)]
struct Probe {
    target: Option<(String, String, Instant)>,
    seen: Vec<Option<f64>>,
}

struct SimAgents {
    probe: Arc<Mutex<Probe>>,
    trigger: drain::Trigger,
    tasks: tokio::task::JoinSet<()>,
    synced: Arc<std::sync::atomic::AtomicUsize>,
}

async fn start_sim_agents(kubeconfig: &Path, opts: &Options) -> SimAgents {
    let probe = Arc::new(Mutex::new(Probe {
        target: None,
        seen: vec![None; opts.agents],
    }));
    let (trigger, drain) = drain::channel();
    let mut tasks = tokio::task::JoinSet::new();
    let synced = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for a in 0..opts.agents {
        let client = mesh_agent::app::kube_client_from(Some(kubeconfig))
            .await
            .expect("client");
        let notify = Arc::new(Notify::new());
        let steer = Arc::new(Notify::new());
        let watchers = watch::watchers(&client, notify.clone(), steer);
        for task in watchers.tasks {
            if let Some(only) = &opts.sim_watches
                && !only.iter().any(|w| w == task.name())
            {
                continue;
            }
            tasks.spawn(task.run(drain.clone()));
        }
        let nodes = watchers.caches.nodes.clone();
        let probe = probe.clone();
        let synced = synced.clone();
        let mut drain = drain.clone();
        tasks.spawn(async move {
            if nodes.wait_until_ready().await.is_err() {
                return;
            }
            synced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            loop {
                tokio::select! {
                    () = notify.notified() => {}
                    () = drain.signaled() => return,
                }
                let target = probe.lock().expect("probe").target.clone();
                let Some((name, key, at)) = target else {
                    continue;
                };
                let Some(node) = nodes.get(&ObjectRef::new(&name)) else {
                    continue;
                };
                let annotations = node.metadata.annotations.clone().unwrap_or_default();
                let parsed = NodeAnnotations::parse(&annotations, &views::node_addresses(&node));
                if parsed.is_ok_and(|n| n.public_key.to_base64() == key) {
                    let mut p = probe.lock().expect("probe");
                    if p.target.as_ref().is_some_and(|t| t.0 == name) && p.seen[a].is_none() {
                        p.seen[a] = Some(at.elapsed().as_secs_f64());
                    }
                }
            }
        });
    }
    SimAgents {
        probe,
        trigger,
        tasks,
        synced,
    }
}

/// `utime + stime` of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields after the command: state is index 0, utime 11, stime 12.
    (ticks(11) + ticks(12)) / 100.0
}

fn status_kib(pid: u32, field: &str) -> u64 {
    status_field_kib(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(),
        field,
    )
}

/// A `kB` field of a `/proc/<pid>/status` text.
fn status_field_kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The eBPF maps `pid` holds, from fdinfo.
fn bpf_maps(pid: u32) -> Vec<BpfMap> {
    let mut out = Vec::new();
    let mut seen_ids = std::collections::BTreeSet::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for fd in fds.flatten() {
        let is_map = std::fs::read_link(fd.path())
            .map(|l| l.to_string_lossy() == "anon_inode:bpf-map")
            .unwrap_or(false);
        if !is_map {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let kv: BTreeMap<&str, u64> = info
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim(), v.trim().parse().ok()?))
            })
            .collect();
        let id = kv.get("map_id").copied().unwrap_or(0);
        if !seen_ids.insert(id) {
            continue;
        }
        out.push(BpfMap {
            map_type: kv.get("map_type").copied().unwrap_or(0) as u32,
            max_entries: kv.get("max_entries").copied().unwrap_or(0),
            key_size: kv.get("key_size").copied().unwrap_or(0),
            value_size: kv.get("value_size").copied().unwrap_or(0),
            memlock: kv.get("memlock").copied().unwrap_or(0),
        });
    }
    out
}

/// The sum of `apiserver_request_total` over all labels.
async fn apiserver_requests(client: &Client) -> f64 {
    let text = client
        .request_text(
            http::Request::get("/metrics")
                .body(Vec::new())
                .expect("request"),
        )
        .await
        .expect("apiserver /metrics");
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn device_peers(cluster: &VirtualCluster, node: &str) -> Option<Vec<String>> {
    let out = cluster
        .exec_in_node(node, ["wg", "show", &ifname(cluster, node), "peers"])
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    })
}

async fn wait_peers(cluster: &VirtualCluster, node: &str, wanted: usize, timeout: Duration) -> f64 {
    let started = Instant::now();
    loop {
        if device_peers(cluster, node).is_some_and(|p| p.len() >= wanted) {
            return started.elapsed().as_secs_f64();
        }
        assert!(
            started.elapsed() < timeout,
            "{node}'s device did not reach {wanted} peers in {timeout:?} (has {:?})",
            device_peers(cluster, node).map(|p| p.len())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the whole measurement; the cluster is torn down before returning.
pub async fn run(opts: &Options) -> Report {
    let mut report = Report {
        nodes: opts.nodes,
        agents: opts.agents,
        pods: opts.nodes * opts.pods_per_node,
        ..Report::default()
    };
    let cluster = start_mesh_with_args(Shape::new(1, 1), &["--persistent-keepalive", "0"]).await;
    let real = "node-1";
    let admin = cluster.client().clone();
    let kubeconfig = cluster.kubeconfig_path().expect("kubeconfig").to_path_buf();
    objects::ensure_namespace(&admin, "scale")
        .await
        .expect("namespace");

    // The cluster: nodes, then pods.
    let started = Instant::now();
    let created: Vec<_> = stream::iter(0..opts.nodes)
        .map(|i| {
            let c = admin.clone();
            async move { create_node(&c, i).await }
        })
        .buffer_unordered(opts.concurrency)
        .collect()
        .await;
    assert_eq!(created.len(), opts.nodes);
    stream::iter(0..opts.nodes)
        .map(|i| {
            let c = admin.clone();
            let per = opts.pods_per_node;
            async move { create_pods(&c, i, per).await }
        })
        .buffer_unordered(opts.concurrency)
        .collect::<Vec<()>>()
        .await;
    report.create_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "[{:.0} s] {} nodes and {} pods created",
        report.create_secs, opts.nodes, report.pods
    );
    let converge = Duration::from_secs(120 + opts.nodes as u64 / 5);
    wait_peers(&cluster, real, opts.nodes, converge).await;
    eprintln!(
        "[{:.0} s] the real agent's device has {} peers",
        started.elapsed().as_secs_f64(),
        opts.nodes
    );

    // The full peer set into a fresh device: the device process is killed, its supervisor
    // restarts it empty, the agent configures every peer again.
    let killed = cluster
        .kill_supervised(real, Role::Device)
        .expect("kill device");
    let t = Instant::now();
    cluster
        .wait_restarted(real, Role::Device, killed, Duration::from_secs(30))
        .expect("device restarted");
    wait_peers(&cluster, real, opts.nodes, converge).await;
    report.full_apply_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "[{:.0} s] full peer set re-applied in {:.2} s",
        started.elapsed().as_secs_f64(),
        report.full_apply_secs
    );

    // The simulated agents.
    let mut sims = start_sim_agents(&kubeconfig, opts).await;
    let t = Instant::now();
    while sims.synced.load(std::sync::atomic::Ordering::Relaxed) < opts.agents {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "simulated agents did not sync"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "[{:.0} s] {} simulated agents synced in {:.1} s",
        started.elapsed().as_secs_f64(),
        opts.agents,
        t.elapsed().as_secs_f64()
    );
    // Let the initial lists settle before the steady-state window.
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Steady state: no object changes.
    let agent = cluster
        .supervised_pid(real, Role::Agent)
        .expect("agent pid")
        .pid;
    let apiserver = cluster.testenv().expect("testenv").pid();
    let me = std::process::id();
    let (r0, a0, s0, g0) = (
        apiserver_requests(&admin).await,
        cpu_secs(apiserver),
        cpu_secs(me),
        cpu_secs(agent),
    );
    let t = Instant::now();
    tokio::time::sleep(opts.steady).await;
    let secs = t.elapsed().as_secs_f64();
    let r1 = apiserver_requests(&admin).await;
    report.steady_secs = secs;
    // Minus the two /metrics reads of this measurement.
    report.requests_total_min = (r1 - r0 - 1.0).max(0.0) * 60.0 / secs;
    report.requests_per_agent_min = report.requests_total_min / (opts.agents + 1) as f64;
    report.apiserver_cpu = (cpu_secs(apiserver) - a0) / secs;
    report.sim_cpu = (cpu_secs(me) - s0) / secs;
    report.agent_cpu = (cpu_secs(agent) - g0) / secs;
    // One read of /proc/<pid>/status, so that the parts add up to the total.
    let status = std::fs::read_to_string(format!("/proc/{agent}/status")).unwrap_or_default();
    report.agent_rss_kib = status_field_kib(&status, "VmRSS:");
    report.agent_hwm_kib = status_field_kib(&status, "VmHWM:");
    report.agent_anon_kib = status_field_kib(&status, "RssAnon:");
    report.agent_file_kib = status_field_kib(&status, "RssFile:");
    report.sim_rss_kib = status_kib(me, "VmRSS:");
    report.bpf_maps = bpf_maps(agent);
    report.device_peers = device_peers(&cluster, real).map_or(0, |p| p.len());

    // Propagation of new nodes' keys.
    for k in 0..opts.new_nodes {
        {
            let mut p = sims.probe.lock().expect("probe");
            p.target = None;
            p.seen = vec![None; opts.agents];
        }
        let i = opts.nodes + k;
        let (name, cidr, ip) = synthetic(i);
        objects::create_node(&admin, &name, cidr, ip)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let (key, annotations) = fresh_identity(ip);
        let at = Instant::now();
        sims.probe.lock().expect("probe").target = Some((name.clone(), key.to_base64(), at));
        Api::<Node>::all(admin.clone())
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"annotations": annotations}})),
            )
            .await
            .expect("annotate");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut real_secs = None;
        loop {
            if real_secs.is_none()
                && device_peers(&cluster, real)
                    .is_some_and(|p| p.iter().any(|k| *k == key.to_base64()))
            {
                real_secs = Some(at.elapsed().as_secs_f64());
            }
            let all = sims
                .probe
                .lock()
                .expect("probe")
                .seen
                .iter()
                .all(Option::is_some);
            if (all && real_secs.is_some()) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let p = sims.probe.lock().expect("probe");
        report.missed += p.seen.iter().filter(|s| s.is_none()).count();
        report.propagation.extend(p.seen.iter().flatten());
        report.real_propagation.extend(real_secs);
        eprintln!(
            "new node {name}: p99 {:.3} s over {} agents, real agent's device {:?}",
            Report::percentile(&p.seen.iter().flatten().copied().collect::<Vec<_>>(), 99.0),
            opts.agents,
            real_secs
        );
    }

    sims.trigger.start();
    let stop = tokio::time::timeout(Duration::from_secs(20), async {
        while sims.tasks.join_next().await.is_some() {}
    })
    .await;
    if stop.is_err() {
        sims.tasks.abort_all();
    }
    cluster.teardown().expect("teardown");
    report
}
