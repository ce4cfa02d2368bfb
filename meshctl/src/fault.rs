//! `meshctl demo fault <kind>`: one fault of docs/faults.md injected into a running virtual
//! cluster while a 10 ms ping and a TCP stream run across nodes, with what was lost and how long
//! recovery took measured, and the expected behaviour checked. The fault tests
//! (`integration-tests/tests/mesh_faults*.rs`) run the same [`run`] and assert on its
//! [`FaultReport`]; the faults themselves are [`wiremesh_integration::faults`].

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use kube::Client;
use wiremesh_integration::{ClusterDescription, NodeDescription, PodDescription, faults};

use crate::traffic::{LongPing, PingCount, TcpRun};

/// One fault and its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The API server stopped for `duration`.
    ApiserverStop { duration: Duration },
    /// Every API request delayed by `delay` each way, for `duration`.
    ApiserverSlow { delay: Duration, duration: Duration },
    /// `node` rebooted (down for `down_for`), with or without its keystore.
    NodeReboot {
        node: String,
        lose_keystore: bool,
        down_for: Duration,
    },
    /// `node`'s underlay link down for `down_for`, then up.
    UnderlayFlap { node: String, down_for: Duration },
    /// `node` moved to another underlay address (`None`: a spare one).
    UnderlayReaddress { node: String, ip: Option<Ipv4Addr> },
    /// `node`'s agent gone for good; its Node object deleted after `delete_after`.
    AgentGone {
        node: String,
        delete_after: Duration,
    },
}

impl Fault {
    /// The command that runs it by hand against `meshctl demo up`.
    pub fn command(&self) -> String {
        let secs = |d: &Duration| format!("{}", d.as_secs_f64());
        match self {
            Self::ApiserverStop { duration } => {
                format!(
                    "meshctl demo fault apiserver-stop --duration {}",
                    secs(duration)
                )
            }
            Self::ApiserverSlow { delay, duration } => format!(
                "meshctl demo fault apiserver-slow --delay {} --duration {}",
                secs(delay),
                secs(duration)
            ),
            Self::NodeReboot {
                node,
                lose_keystore,
                ..
            } => format!(
                "meshctl demo fault node-reboot {node}{}",
                if *lose_keystore {
                    " --lose-keystore"
                } else {
                    ""
                }
            ),
            Self::UnderlayFlap { node, down_for } => {
                format!(
                    "meshctl demo fault underlay-down {node} --for {}",
                    secs(down_for)
                )
            }
            Self::UnderlayReaddress { node, .. } => {
                format!("meshctl demo fault underlay-readdress {node}")
            }
            Self::AgentGone { node, delete_after } => format!(
                "meshctl demo fault agent-gone {node} --delete-node-after {}",
                secs(delete_after)
            ),
        }
    }

    fn node(&self) -> Option<&str> {
        match self {
            Self::ApiserverStop { .. } | Self::ApiserverSlow { .. } => None,
            Self::NodeReboot { node, .. }
            | Self::UnderlayFlap { node, .. }
            | Self::UnderlayReaddress { node, .. }
            | Self::AgentGone { node, .. } => Some(node),
        }
    }
}

/// What one flow saw.
#[derive(Debug)]
pub struct FlowReport {
    /// `pod -> pod (node -> node)`.
    pub name: String,
    pub ping: PingCount,
    /// (bytes sent, bytes received) of the TCP stream, or why it broke.
    pub tcp: Result<(u64, u64), String>,
}

impl FlowReport {
    /// Whether nothing was lost: no ping, no byte, no reset.
    pub fn lossless(&self) -> bool {
        self.ping.lost() == 0 && matches!(&self.tcp, Ok((s, r)) if s == r)
    }

    fn line(&self) -> String {
        format!(
            "{}: ping {} sent, {} lost, longest gap {} ms; TCP {}",
            self.name,
            self.ping.sent,
            self.ping.lost(),
            self.ping.longest_gap_time().as_millis(),
            match &self.tcp {
                Ok((s, r)) => format!("{s} bytes sent, {r} received"),
                Err(e) => format!("FAILED: {e}"),
            }
        )
    }
}

/// What [`run`] measured.
#[derive(Debug)]
pub struct FaultReport {
    /// The command that reproduces it.
    pub command: String,
    /// Between two nodes the fault does not touch: must lose nothing.
    pub other: FlowReport,
    /// To the node the fault hits (node faults only).
    pub own: Option<FlowReport>,
    /// From the end of the fault until the mesh was back (kind-specific: the own flow's first
    /// reply, every agent's resync, every peer's convergence).
    pub recovery: Option<Duration>,
    /// Kind-specific measured figures (printed, asserted by the tests).
    pub figures: BTreeMap<String, f64>,
    /// Deviations from the expected behaviour; empty when the fault was survived as specified.
    pub problems: Vec<String>,
}

impl FaultReport {
    /// The report as lines for people.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!("fault: {}", self.command), self.other.line()];
        out.extend(self.own.iter().map(FlowReport::line));
        if let Some(r) = self.recovery {
            out.push(format!("recovery: {:.2} s", r.as_secs_f64()));
        }
        out.extend(self.figures.iter().map(|(k, v)| format!("{k}: {v}")));
        out.extend(self.problems.iter().map(|p| format!("PROBLEM: {p}")));
        out
    }
}

/// Bounds of the expected behaviour, checked by [`run`] (docs/faults.md says why each).
pub mod bounds {
    /// Lists one agent may make in the minute after the API server returns: one per watched
    /// resource at most (watches resume from their resourceVersion, so normally none).
    pub const LISTS_AFTER_RETURN: u64 = 6;
    /// Requests of any kind one agent may make in that window.
    pub const REQUESTS_AFTER_RETURN: u64 = 40;
    /// Connections one agent may open on top of those it held before the API server became slow:
    /// its watches stay open, and each of its tasks that writes (key publisher, status
    /// heartbeat, coordinator Lease and status, Events) may wait on one request at a time; a
    /// task that piles up requests would open more.
    pub const EXTRA_OPEN_WHILE_SLOW: u64 = 8;
    /// Connection attempts per second one agent may make while the API server is down (its
    /// watchers back off exponentially to 30 s: a few per watcher per minute).
    pub const RECONNECTS_PER_SECOND_WHILE_DOWN: f64 = 5.0;
    /// Requests one agent may make per second of a slow API server.
    pub const REQUESTS_PER_SECOND_WHILE_SLOW: f64 = 1.0;
    /// Around the time a readdressed node had no underlay address: one ping interval (10 ms)
    /// and the node's next packet from its new address, which its peers roam to.
    pub const UNADDRESSED_SLACK: std::time::Duration = std::time::Duration::from_millis(20);
}

/// How long recovery may take before [`run`] gives up waiting.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);

struct Flow {
    name: String,
    ping: LongPing,
    tcp: TcpRun,
}

impl Flow {
    fn start(from: &PodDescription, to: &PodDescription, port: u16) -> anyhow::Result<Self> {
        Ok(Self {
            name: format!(
                "{} -> {} ({} -> {})",
                from.name, to.name, from.node, to.node
            ),
            ping: LongPing::start(&from.netns, to.ip).context("start ping")?,
            // The stream runs the other way, so both directions of both tunnels carry data.
            tcp: TcpRun::start(&from.netns, &to.netns, from.ip, port).context("start TCP")?,
        })
    }

    fn stop(self) -> anyhow::Result<FlowReport> {
        Ok(FlowReport {
            name: self.name,
            ping: self.ping.stop().context("ping output")?,
            tcp: self.tcp.finish(),
        })
    }
}

/// Public keys of `node`'s peers and their endpoints (`wg show <if> endpoints`).
pub fn wg_endpoints(node: &NodeDescription) -> Result<BTreeMap<String, String>, String> {
    let out = wiremesh_integration::command::exec_in(
        &node.netns,
        ["wg", "show", node.netns.as_str(), "endpoints"],
    )
    .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_owned(), w.next().unwrap_or("").to_owned()))
        })
        .collect())
}

/// The mesh's routes (table 87, protocol 87) in `node`'s namespace.
pub fn mesh_routes(node: &NodeDescription) -> Vec<String> {
    let out = wiremesh_integration::command::exec_in(
        &node.netns,
        ["ip", "-4", "route", "show", "table", "87", "proto", "87"],
    );
    let mut routes: Vec<String> = out
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    routes.sort();
    routes
}

async fn public_key(client: &Client, node: &str) -> Option<String> {
    wiremesh_integration::objects::node_annotation(client, node, "wiremesh.io/public-key")
        .await
        .ok()
        .flatten()
}

/// Polls `check` every 100 ms until it returns `Ok`, at most `timeout`; returns how long it
/// took, or the last reason.
async fn until<F, Fut>(timeout: Duration, mut check: F) -> Result<Duration, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    loop {
        match check().await {
            Ok(()) => return Ok(started.elapsed()),
            Err(why) if started.elapsed() >= timeout => return Err(why),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn pod_on<'a>(
    description: &'a ClusterDescription,
    node: &str,
) -> anyhow::Result<&'a PodDescription> {
    description
        .pods
        .iter()
        .find(|p| p.node == node)
        .with_context(|| format!("no pod on {node}"))
}

/// Runs `fault` against the cluster of `description` under traffic (see the module docs) and
/// reports. `description` is updated where the fault changes it (a readdressed node).
/// `progress` gets a line at each step.
pub async fn run(
    client: &Client,
    description: &mut ClusterDescription,
    fault: &Fault,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<FaultReport> {
    let hit = fault.node().map(str::to_owned);
    if let Some(hit) = &hit {
        description
            .node(hit)
            .with_context(|| format!("no node {hit} in this cluster"))?;
    }
    let others: Vec<String> = description
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .filter(|n| Some(n) != hit.as_ref())
        .collect();
    anyhow::ensure!(
        others.len() >= 2,
        "the fault needs two nodes besides the one it hits (the cluster has {})",
        description.nodes.len()
    );
    let (a, b) = (
        pod_on(description, &others[0])?,
        pod_on(description, &others[1])?,
    );
    let other = Flow::start(a, b, 7101)?;
    let own = match &hit {
        Some(hit) => Some(Flow::start(a, pod_on(description, hit)?, 7102)?),
        None => None,
    };
    progress(&format!("traffic: {}", other.name));
    if let Some(own) = &own {
        progress(&format!("traffic: {}", own.name));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let before: BTreeMap<String, BTreeMap<String, String>> = description
        .nodes
        .iter()
        .map(|n| (n.name.clone(), wg_endpoints(n).unwrap_or_default()))
        .collect();
    let mut figures = BTreeMap::new();
    let mut problems = Vec::new();
    let mut recovery = None;
    let mut own = own;
    let mut own_report = None;
    let fault_end: SystemTime;
    // The readdress: while the node had no underlay address (the old one deleted, the new one
    // not added yet), to tell the packets lost there from losses of the mesh.
    let mut unaddressed: Option<(SystemTime, SystemTime)> = None;

    match fault {
        Fault::ApiserverStop { duration } => {
            let stats_before = faults::proxy_stats(description)?;
            progress(&format!(
                "API server stopped for {:.0} s",
                duration.as_secs_f64()
            ));
            faults::apiserver_stop(description)?;
            let stopped = Instant::now();
            let result = watch_peers_kept(description, &before, *duration, &mut problems).await;
            faults::apiserver_start(description)?;
            result?;
            fault_end = SystemTime::now();
            let offset = faults::audit_offset(description)?;
            progress(&format!(
                "API server back after {:.1} s; waiting for every agent to resync",
                stopped.elapsed().as_secs_f64()
            ));
            let stats_down = faults::proxy_stats(description)?;
            let mut retries = 0u64;
            for n in &description.nodes {
                let ip = n.underlay_ip.into();
                let attempts = stats_down.client(ip).refused - stats_before.client(ip).refused;
                retries = retries.max(attempts);
                let rate = attempts as f64 / duration.as_secs_f64();
                if rate > bounds::RECONNECTS_PER_SECOND_WHILE_DOWN {
                    problems.push(format!(
                        "{} tried {attempts} connections while the API server was down ({rate:.1}/s): it spins",
                        n.name
                    ));
                }
            }
            figures.insert(
                "max reconnect attempts per agent while down".into(),
                retries as f64,
            );
            // Resynced: every agent watches Nodes again.
            let desc = &*description;
            let back = until(RECOVERY_TIMEOUT, || async move {
                let requests = faults::audit_requests(desc, offset).map_err(|e| e.to_string())?;
                let missing: Vec<&str> = desc
                    .nodes
                    .iter()
                    .filter(|n| requests.get(&n.name).is_none_or(|c| c.watches == 0))
                    .map(|n| n.name.as_str())
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!("no watch yet from {}", missing.join(", ")))
                }
            })
            .await;
            match back {
                Ok(took) => recovery = Some(took),
                Err(why) => problems.push(format!("agents did not resync: {why}")),
            }
            // Count what the agents send in the window after the return.
            // ... until 10 s after the last agent came back.
            tokio::time::sleep(Duration::from_secs(10)).await;
            let window = recovery.unwrap_or_default() + Duration::from_secs(10);
            let requests = faults::audit_requests(description, offset)?;
            let max =
                |f: fn(&faults::RequestCounts) -> u64| requests.values().map(f).max().unwrap_or(0);
            figures.insert("window after return (s)".into(), window.as_secs_f64());
            figures.insert(
                "max requests per agent in window".into(),
                max(|c| c.total) as f64,
            );
            figures.insert(
                "max lists per agent in window".into(),
                max(|c| c.lists) as f64,
            );
            figures.insert(
                "max watches per agent in window".into(),
                max(|c| c.watches) as f64,
            );
            for (node, c) in &requests {
                progress(&format!(
                    "{node}: {} requests after the return ({} lists, {} watches, {} resumed from a resourceVersion; {:?})",
                    c.total, c.lists, c.watches, c.watches_resumed, c.by_verb
                ));
                if c.lists > bounds::LISTS_AFTER_RETURN {
                    problems.push(format!(
                        "{node} relisted {} times after the return (list storm)",
                        c.lists
                    ));
                }
                if c.total > bounds::REQUESTS_AFTER_RETURN {
                    problems.push(format!(
                        "{node} made {} requests in {window:?} after the return",
                        c.total
                    ));
                }
            }
        }
        Fault::ApiserverSlow { delay, duration } => {
            let offset = faults::audit_offset(description)?;
            let stats_before = faults::proxy_stats(description)?;
            progress(&format!(
                "API server slow: {:.1} s each way, for {:.0} s",
                delay.as_secs_f64(),
                duration.as_secs_f64()
            ));
            faults::apiserver_slow(description, Some(*delay))?;
            let result = watch_peers_kept(description, &before, *duration, &mut problems).await;
            let stats = faults::proxy_stats(description)?;
            faults::apiserver_slow(description, None)?;
            result?;
            fault_end = SystemTime::now();
            let requests = faults::audit_requests(description, offset)?;
            let (mut max_open, mut max_extra, mut max_new, mut max_req) = (0u64, 0u64, 0u64, 0u64);
            for n in &description.nodes {
                let ip = n.underlay_ip.into();
                let (now, then) = (stats.client(ip), stats_before.client(ip));
                let new = now.connections - then.connections;
                let extra = now.max_open.saturating_sub(then.open);
                let req = requests.get(&n.name).map_or(0, |c| c.total);
                progress(&format!(
                    "{}: {} API connections open before, at most {} at once while slow, {} new; {} requests reached the API server",
                    n.name, then.open, now.max_open, new, req
                ));
                max_open = max_open.max(now.max_open);
                max_extra = max_extra.max(extra);
                max_new = max_new.max(new);
                max_req = max_req.max(req);
                if extra > bounds::EXTRA_OPEN_WHILE_SLOW {
                    problems.push(format!(
                        "{} opened {extra} more connections at once than before ({} -> {}): requests pile up",
                        n.name, then.open, now.max_open
                    ));
                }
                let per_second = req as f64 / duration.as_secs_f64();
                if per_second > bounds::REQUESTS_PER_SECOND_WHILE_SLOW {
                    problems.push(format!(
                        "{} sent {per_second:.1} requests/s to a slow API server",
                        n.name
                    ));
                }
            }
            figures.insert("max open connections per agent".into(), max_open as f64);
            figures.insert(
                "max extra open connections per agent".into(),
                max_extra as f64,
            );
            figures.insert("max new connections per agent".into(), max_new as f64);
            figures.insert("max requests per agent".into(), max_req as f64);
        }
        Fault::NodeReboot {
            node,
            lose_keystore,
            down_for,
        } => {
            let old_key = public_key(client, node).await;
            progress(&format!(
                "rebooting {node} ({})",
                if *lose_keystore {
                    "keystore lost"
                } else {
                    "keystore kept"
                }
            ));
            let reboot = faults::reboot_node(description, node, *lose_keystore, *down_for)?;
            fault_end = SystemTime::now();
            figures.insert(
                "down: processes killed to restarts released (s)".into(),
                (reboot.up_at - reboot.down_at).as_secs_f64(),
            );
            let desc = &*description;
            let before = &before;
            let converged = until(RECOVERY_TIMEOUT, || {
                let old_key = old_key.clone();
                async move {
                    let key = public_key(client, node).await.ok_or("no key published")?;
                    if *lose_keystore && Some(&key) == old_key.as_ref() {
                        return Err("old key still published".to_owned());
                    }
                    converged_on(desc, before, node, &key, old_key.as_deref())
                }
            })
            .await;
            match converged {
                Ok(took) => {
                    figures.insert(
                        "peers converged after restart (s)".into(),
                        took.as_secs_f64(),
                    );
                }
                Err(why) => problems.push(format!("mesh did not converge after the reboot: {why}")),
            }
        }
        Fault::UnderlayFlap { node, down_for } => {
            progress(&format!(
                "{node}: underlay down for {:.1} s",
                down_for.as_secs_f64()
            ));
            faults::underlay_link(description, node, false)?;
            tokio::time::sleep(*down_for).await;
            faults::underlay_link(description, node, true)?;
            fault_end = SystemTime::now();
            check_peers_kept(description, &before, &mut problems);
        }
        Fault::UnderlayReaddress { node, ip } => {
            let new_ip = match ip {
                Some(ip) => *ip,
                None => faults::spare_underlay_ip(description)?,
            };
            progress(&format!("{node}: underlay address -> {new_ip}"));
            let key = public_key(client, node).await.context("no key published")?;
            let readdress = faults::underlay_readdress(client, description, node, new_ip).await?;
            let old = readdress.old;
            unaddressed = Some((readdress.unaddressed_from, readdress.unaddressed_until));
            fault_end = SystemTime::now();
            let changed = Instant::now();
            // Peers follow the Node's new address at once (its stale endpoint annotation is
            // replaced with its InternalIP, same port), then its agent republishes the
            // annotation when its API connections notice the move. Until then no node may drop
            // a peer (checked every second).
            let desc = &*description;
            let key = &key;
            let peers = until(RECOVERY_TIMEOUT, || async move {
                for n in desc.nodes.iter().filter(|n| n.name != *node) {
                    let endpoints = wg_endpoints(n)?;
                    let e = endpoints.get(key).map_or("", String::as_str);
                    if !e.starts_with(&format!("{new_ip}:")) {
                        return Err(format!("{} has endpoint {e:?} for {node}", n.name));
                    }
                }
                Ok(())
            })
            .await;
            match peers {
                Ok(_) => {
                    figures.insert(
                        "peers' endpoints followed (s)".into(),
                        changed.elapsed().as_secs_f64(),
                    );
                }
                Err(why) => problems.push(format!("peers kept the old endpoint {old}: {why}")),
            }
            let mut checked: Option<Instant> = None;
            let annotation = loop {
                if checked.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    check_peers_kept(description, &before, &mut problems);
                    checked = Some(Instant::now());
                }
                let endpoint = wiremesh_integration::objects::node_annotation(
                    client,
                    node,
                    "wiremesh.io/endpoint",
                )
                .await
                .map_err(|e| e.to_string())
                .map(Option::unwrap_or_default);
                match endpoint {
                    Ok(e) if e.starts_with(&format!("{new_ip}:")) => break Ok(changed.elapsed()),
                    Ok(e) if changed.elapsed() >= RECOVERY_TIMEOUT => {
                        break Err(format!("endpoint annotation {e}"));
                    }
                    Err(e) if changed.elapsed() >= RECOVERY_TIMEOUT => break Err(e),
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            check_peers_kept(description, &before, &mut problems);
            match annotation {
                Ok(t) => {
                    figures.insert("endpoint annotation followed (s)".into(), t.as_secs_f64());
                }
                Err(why) => problems.push(format!("endpoint annotation did not follow: {why}")),
            }
        }
        Fault::AgentGone { node, delete_after } => {
            progress(&format!(
                "{node}: agent gone for good; Node deleted after {:.0} s",
                delete_after.as_secs_f64()
            ));
            faults::agent_gone(description, node)?;
            watch_peers_kept(description, &before, *delete_after, &mut problems).await?;
            // The node's datapath kept running on its last configuration: its flow lost
            // nothing up to here. Deleting the Node ends it by design.
            if let Some(flow) = own.take() {
                own_report = Some(flow.stop()?);
            }
            let key = public_key(client, node).await.context("no key published")?;
            let cidr = description
                .node(node)
                .map(|n| n.pod_cidr.clone())
                .unwrap_or_default();
            faults::delete_node(client, node).await?;
            fault_end = SystemTime::now();
            let desc = &*description;
            let (key, cidr) = (&key, &cidr);
            let removed = until(RECOVERY_TIMEOUT, || async move {
                for n in desc.nodes.iter().filter(|n| n.name != *node) {
                    if wg_endpoints(n)?.contains_key(key) {
                        return Err(format!("{} still has {node} as a peer", n.name));
                    }
                    if mesh_routes(n).contains(cidr) {
                        return Err(format!("{} still routes {cidr}", n.name));
                    }
                }
                Ok(())
            })
            .await;
            match removed {
                Ok(t) => recovery = Some(t),
                Err(why) => problems.push(format!("the deleted node was not removed: {why}")),
            }
        }
    }

    // Let the flows run a moment past recovery, so a late loss is seen.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let other = other.stop()?;
    if let Some(flow) = own.take() {
        own_report = Some(flow.stop()?);
    }
    if let Some(own) = &own_report
        && recovery.is_none()
        && matches!(
            fault,
            Fault::NodeReboot { .. } | Fault::UnderlayFlap { .. } | Fault::UnderlayReaddress { .. }
        )
    {
        // Until the flow's longest outage ended, if it ended after the fault (an outage that
        // starts after the fault, as when peers dropped a readdressed node until its endpoint
        // annotation followed), else until its first reply after the fault.
        let back = own
            .ping
            .longest_gap_end()
            .filter(|end| *end >= fault_end)
            .or_else(|| own.ping.first_reply_after(fault_end));
        match back {
            Some(t) => recovery = Some(t.duration_since(fault_end).unwrap_or_default()),
            None => problems.push(format!("{}: no reply after the fault", own.name)),
        }
    }
    if let (Some((from, until)), Some(own)) = (unaddressed, &own_report) {
        // A request sent while the node had no address, or in the ping interval after the new
        // one came (the peer still sends to the old one until the node's next packet from the
        // new address roams it, or the Node's status reaches it), cannot arrive.
        let window = (
            from - bounds::UNADDRESSED_SLACK,
            until + bounds::UNADDRESSED_SLACK,
        );
        let (during, outside): (Vec<SystemTime>, Vec<SystemTime>) = own
            .ping
            .lost_at()
            .into_iter()
            .partition(|at| *at >= window.0 && *at <= window.1);
        figures.insert(
            "node without an underlay address (ms)".into(),
            until.duration_since(from).unwrap_or_default().as_secs_f64() * 1000.0,
        );
        figures.insert(
            "own pings lost while the node had no address".into(),
            during.len() as f64,
        );
        figures.insert(
            "own pings lost outside the address switch".into(),
            outside.len() as f64,
        );
        if !outside.is_empty() {
            problems.push(format!(
                "{}: {} ping(s) lost outside the address switch",
                own.name,
                outside.len()
            ));
        }
        if !matches!(&own.tcp, Ok((s, r)) if s == r) {
            problems.push(format!("{}: TCP stream broke: {:?}", own.name, own.tcp));
        }
    }
    if !other.lossless() {
        problems.push(format!(
            "a flow the fault does not touch lost something: {}",
            other.line()
        ));
    }
    Ok(FaultReport {
        command: fault.command(),
        other,
        own: own_report,
        recovery,
        figures,
        problems,
    })
}

/// Whether `node`'s peers have its `key` (and not `old_key`, when it changed) with its routes,
/// and `node` has every peer it had before.
fn converged_on(
    description: &ClusterDescription,
    before: &BTreeMap<String, BTreeMap<String, String>>,
    node: &str,
    key: &str,
    old_key: Option<&str>,
) -> Result<(), String> {
    let cidr = description
        .node(node)
        .map(|n| n.pod_cidr.clone())
        .unwrap_or_default();
    for n in &description.nodes {
        let peers = wg_endpoints(n)?;
        if n.name == node {
            let wanted = before.get(node).map(|b| b.len()).unwrap_or(0);
            if peers.len() != wanted {
                return Err(format!("{node} has {} peers, had {wanted}", peers.len()));
            }
            continue;
        }
        if !peers.contains_key(key) {
            return Err(format!("{} does not have {node}'s key yet", n.name));
        }
        if let Some(old) = old_key.filter(|o| *o != key)
            && peers.contains_key(old)
        {
            return Err(format!("{} still has {node}'s old key", n.name));
        }
        if peers.len() != before.get(&n.name).map_or(0, BTreeMap::len) {
            return Err(format!("{} has {} peers", n.name, peers.len()));
        }
        if !mesh_routes(n).contains(&cidr) {
            return Err(format!("{} has no route to {cidr}", n.name));
        }
    }
    Ok(())
}

/// Checks every second for `duration` that every node still has every peer it had `before`
/// (the last good configuration stays), recording removals in `problems`.
async fn watch_peers_kept(
    description: &ClusterDescription,
    before: &BTreeMap<String, BTreeMap<String, String>>,
    duration: Duration,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + duration;
    loop {
        check_peers_kept(description, before, problems);
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
}

fn check_peers_kept(
    description: &ClusterDescription,
    before: &BTreeMap<String, BTreeMap<String, String>>,
    problems: &mut Vec<String>,
) {
    for n in &description.nodes {
        let Some(had) = before.get(&n.name) else {
            continue;
        };
        let now = match wg_endpoints(n) {
            Ok(now) => now,
            // A node whose device is down on purpose (reboot) is not asked.
            Err(_) => continue,
        };
        for key in had.keys() {
            let problem = format!("{} removed peer {key}", n.name);
            if !now.contains_key(key) && !problems.contains(&problem) {
                problems.push(problem);
            }
        }
    }
}
