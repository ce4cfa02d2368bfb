//! Faults injected into a running virtual cluster, from its [`ClusterDescription`] alone, so
//! the scenario tests and `meshctl demo fault ...` (against a detached `meshctl demo up`) run the
//! very same steps (docs/faults.md):
//!
//! - the API server stopped ([`apiserver_stop`]/[`apiserver_start`]): testenv frozen (SIGSTOP)
//!   and the fault proxy in front of it resetting every agent connection;
//! - the API server slow ([`apiserver_slow`]): the proxy holds every chunk back;
//! - a node rebooted ([`reboot_node`]): its device and agent processes killed, everything the
//!   mesh left in its namespace (routes, rule, pinned eBPF state) removed, optionally its
//!   keystore lost, then the processes started again by their supervisors;
//! - its underlay link down and up ([`underlay_link`]) or readdressed ([`underlay_readdress`]);
//! - its agent gone for good ([`agent_gone`]).
//!
//! Requests of the agents are counted from the API server's audit log ([`audit_requests`]) and
//! the proxy's per-node connection counters ([`proxy_stats`]).

use std::{
    collections::BTreeMap,
    io::{BufRead, Seek},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use crate::{
    ClusterDescription, ProcessIdentity, Resource,
    apiproxy::{self, ProxyMode, ProxyStats},
    command::{self, CommandError},
};

/// Why a fault could not be injected or undone.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// Something the fault needs is not in the description.
    #[error("{0}")]
    Missing(String),
    /// A command failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The proxy could not be controlled or read.
    #[error(transparent)]
    Proxy(#[from] apiproxy::ProxyError),
    /// A process could not be signalled.
    #[error(transparent)]
    Process(#[from] crate::ProcessError),
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A Kubernetes call failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: kube::Error,
    },
}

/// The supervised processes of a node, in the order a node starts them.
pub const NODE_ROLES: [&str; 3] = ["device", "device-b", "agent"];

fn missing(what: impl Into<String>) -> FaultError {
    FaultError::Missing(what.into())
}

fn node<'a>(
    description: &'a ClusterDescription,
    name: &str,
) -> Result<&'a crate::NodeDescription, FaultError> {
    description
        .node(name)
        .ok_or_else(|| missing(format!("no node {name:?} in this cluster")))
}

fn proxy(description: &ClusterDescription) -> Result<&crate::ApiProxyDescription, FaultError> {
    description.api_proxy.as_ref().ok_or_else(|| {
        missing("this cluster runs no API proxy (start it with ClusterOptions::api_proxy)")
    })
}

fn testenv(description: &ClusterDescription) -> Result<ProcessIdentity, FaultError> {
    description
        .resources
        .resources()
        .iter()
        .find_map(|r| match r {
            Resource::Process { label, identity } if label == "testenv" => Some(*identity),
            _ => None,
        })
        .filter(ProcessIdentity::is_running)
        .ok_or_else(|| missing("testenv is not running"))
}

/// Stops the API server: every agent connection is reset and new ones are refused (the proxy
/// goes down), and testenv (apiserver + etcd) is frozen with SIGSTOP so nothing is served or
/// written until [`apiserver_start`].
pub fn apiserver_stop(description: &ClusterDescription) -> Result<(), FaultError> {
    let testenv = testenv(description)?;
    apiproxy::set_mode(&proxy(description)?.control, ProxyMode::Down)?;
    wait_mode(description, ProxyMode::Down)?;
    testenv.signal(libc::SIGSTOP)?;
    Ok(())
}

/// Undoes [`apiserver_stop`] (and [`apiserver_slow`]): testenv continues, the proxy passes.
pub fn apiserver_start(description: &ClusterDescription) -> Result<(), FaultError> {
    testenv(description)?.signal(libc::SIGCONT)?;
    apiproxy::set_mode(&proxy(description)?.control, ProxyMode::Pass)?;
    wait_mode(description, ProxyMode::Pass)
}

/// Makes every agent request take `delay` longer in each direction (`None`: back to normal).
pub fn apiserver_slow(
    description: &ClusterDescription,
    delay: Option<Duration>,
) -> Result<(), FaultError> {
    let mode = delay.map_or(ProxyMode::Pass, |d| {
        ProxyMode::Delay(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    });
    apiproxy::set_mode(&proxy(description)?.control, mode)?;
    wait_mode(description, mode)
}

/// The proxy's counters now.
pub fn proxy_stats(description: &ClusterDescription) -> Result<ProxyStats, FaultError> {
    Ok(ProxyStats::read(&proxy(description)?.stats)?)
}

fn wait_mode(description: &ClusterDescription, mode: ProxyMode) -> Result<(), FaultError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if proxy_stats(description)?.mode == mode {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(missing(format!("the API proxy did not switch to {mode:?}")));
        }
        std::thread::sleep(apiproxy::POLL);
    }
}

/// SIGSTOP (`hold`) or SIGCONT to the supervisors of `node`'s processes: held, a supervisor
/// restarts nothing.
fn hold(description: &ClusterDescription, node: &str, hold: bool) -> Result<(), FaultError> {
    for role in NODE_ROLES {
        if let Some(supervisor) = description.supervisor(node, role) {
            supervisor.signal(if hold { libc::SIGSTOP } else { libc::SIGCONT })?;
        }
    }
    Ok(())
}

/// The current run of `node`'s `role` process.
fn current(description: &ClusterDescription, node: &str, role: &str) -> Option<ProcessIdentity> {
    let n = description.node(node)?;
    let file = match role {
        "agent" => n.agent_pid_file.clone(),
        "device" => n.device_pid_file.clone(),
        _ => n
            .device_pid_file
            .as_ref()
            .map(|f| f.with_file_name(format!("{role}-{node}.pid"))),
    }?;
    crate::supervise::current(&file)
}

fn kill_and_wait(process: ProcessIdentity) -> Result<(), FaultError> {
    process.signal(libc::SIGKILL)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while process.is_running() {
        if Instant::now() >= deadline {
            return Err(missing(format!("pid {} did not die", process.pid)));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The state directory of `node`'s agent (its keystore): `<work dir>/state/<node>`.
pub fn state_dir(description: &ClusterDescription, node: &str) -> PathBuf {
    description.work_dir.join("state").join(node)
}

fn bpffs(description: &ClusterDescription) -> Option<PathBuf> {
    description
        .resources
        .resources()
        .iter()
        .find_map(|r| match r {
            Resource::Mount { path } => Some(path.clone()),
            _ => None,
        })
}

/// What [`reboot_node`] did.
#[derive(Clone, Debug)]
pub struct Reboot {
    /// When the node went down (its processes killed).
    pub down_at: Instant,
    /// When its supervisors were let go to start the processes again.
    pub up_at: Instant,
}

/// "Reboots" `node`: its device and agent processes are killed (restarts held), everything the
/// mesh keeps in the node's namespace and memory is removed as a reboot removes it (the mesh's
/// routes and policy rule, the node's pinned eBPF maps and links; the TUN devices die with the
/// device processes), and with `lose_keystore` its state directory (the key) is deleted; after
/// `down_for` the supervisors start device and agent again. The namespace itself, with the pods'
/// veths, is kept: the pods are not part of the fault.
pub fn reboot_node(
    description: &ClusterDescription,
    node_name: &str,
    lose_keystore: bool,
    down_for: Duration,
) -> Result<Reboot, FaultError> {
    let n = node(description, node_name)?;
    hold(description, node_name, true)?;
    let result = (|| -> Result<Reboot, FaultError> {
        let down_at = Instant::now();
        for role in NODE_ROLES.iter().rev() {
            if let Some(process) = current(description, node_name, role) {
                kill_and_wait(process)?;
            }
        }
        // Routes through the tunnel went with the TUN device; whatever else is in the mesh's
        // table, and its rule, would not survive a reboot either.
        let table = "87";
        // (Fails when the table is gone already.)
        let _ = command::ip_in(&n.netns, ["-4", "route", "flush", "table", table]);
        while command::ip_in(&n.netns, ["-4", "rule", "del", "table", table]).is_ok() {}
        if let Some(bpffs) = bpffs(description) {
            let pins = bpffs.join("wiremesh").join(node_name);
            remove_dir(&pins)?;
        }
        if lose_keystore {
            remove_dir(&state_dir(description, node_name))?;
        }
        std::thread::sleep(down_for);
        Ok(Reboot {
            down_at,
            up_at: Instant::now(),
        })
    })();
    hold(description, node_name, false)?;
    result
}

fn remove_dir(path: &Path) -> Result<(), FaultError> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(FaultError::Io {
            what: "removing",
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Takes `node`'s underlay "switch port" down or up: the bridge end of its veth, so the node
/// sees its link lose carrier as with a pulled cable; its addresses and routes stay.
pub fn underlay_link(
    description: &ClusterDescription,
    node_name: &str,
    up: bool,
) -> Result<(), FaultError> {
    let link = node(description, node_name)?
        .underlay_host_link
        .clone()
        .ok_or_else(|| missing(format!("no underlay link recorded for {node_name}")))?;
    command::ip(["link", "set", &link, if up { "up" } else { "down" }])?;
    Ok(())
}

/// An unused address of the underlay for `node` to move to: the first from .200 up that no node
/// has.
pub fn spare_underlay_ip(description: &ClusterDescription) -> Result<Ipv4Addr, FaultError> {
    let subnet: ipnet::Ipv4Net = description
        .underlay_subnet
        .parse()
        .map_err(|e| missing(format!("underlay subnet: {e}")))?;
    let base = u32::from(subnet.network());
    (200..250)
        .map(|h| Ipv4Addr::from(base + h))
        .find(|ip| subnet.contains(ip) && description.nodes.iter().all(|n| n.underlay_ip != *ip))
        .ok_or_else(|| missing("no spare underlay address"))
}

/// What [`underlay_readdress`] did.
#[derive(Clone, Copy, Debug)]
pub struct Readdress {
    /// The node's address before.
    pub old: Ipv4Addr,
    /// Just before the old address was deleted.
    pub unaddressed_from: std::time::SystemTime,
    /// Just after the new address was added: in between the node had no underlay address, so
    /// whatever reached it then was lost, whatever the mesh does.
    pub unaddressed_until: std::time::SystemTime,
}

/// Moves `node` to underlay address `new_ip`: the address of its underlay interface changes
/// (routes that went with the old one are put back: the default route, and the plaintext
/// "cloud route table" both ways), and its Node's `status.addresses` InternalIP follows, as the
/// kubelet reports it. `description` is updated.
pub async fn underlay_readdress(
    client: &Client,
    description: &mut ClusterDescription,
    node_name: &str,
    new_ip: Ipv4Addr,
) -> Result<Readdress, FaultError> {
    let n = node(description, node_name)?.clone();
    let old = n.underlay_ip;
    let gateway = description
        .api_server
        .trim_start_matches("https://")
        .rsplit_once(':')
        .map(|(h, _)| h.to_owned())
        .ok_or_else(|| missing("no API server address"))?;
    let dev = "eth0";
    // The old address first: deleting a primary address takes its secondaries with it.
    let unaddressed_from = std::time::SystemTime::now();
    command::ip_in(&n.netns, ["addr", "del", &format!("{old}/24"), "dev", dev])?;
    command::ip_in(
        &n.netns,
        ["addr", "add", &format!("{new_ip}/24"), "dev", dev],
    )?;
    let unaddressed_until = std::time::SystemTime::now();
    command::ip_in(
        &n.netns,
        ["route", "replace", "default", "via", &gateway, "dev", dev],
    )?;
    let metric = crate::netns::PLAINTEXT_ROUTE_METRIC.to_string();
    for other in description.nodes.iter().filter(|o| o.name != node_name) {
        let via = other.underlay_ip.to_string();
        command::ip_in(
            &n.netns,
            [
                "route",
                "replace",
                &other.pod_cidr,
                "via",
                &via,
                "metric",
                &metric,
            ],
        )?;
        let _ = command::ip_in(
            &other.netns,
            ["route", "del", &n.pod_cidr, "via", &old.to_string()],
        );
        command::ip_in(
            &other.netns,
            [
                "route",
                "replace",
                &n.pod_cidr,
                "via",
                &new_ip.to_string(),
                "metric",
                &metric,
            ],
        )?;
    }
    let patch = serde_json::json!({"status": {"addresses": [
        {"type": "InternalIP", "address": new_ip.to_string()},
        {"type": "Hostname", "address": node_name},
    ]}});
    Api::<Node>::all(client.clone())
        .patch_status(node_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| FaultError::Kube {
            what: format!("patching the addresses of Node {node_name}"),
            source,
        })?;
    if let Some(n) = description.nodes.iter_mut().find(|n| n.name == node_name) {
        n.underlay_ip = new_ip;
    }
    Ok(Readdress {
        old,
        unaddressed_from,
        unaddressed_until,
    })
}

/// Ends `node`'s agent for good: its supervisor is held, the agent killed (as a crash, nothing
/// cleaned up), and the supervisor ended, so nothing restarts it. The device keeps running.
pub fn agent_gone(description: &ClusterDescription, node_name: &str) -> Result<(), FaultError> {
    node(description, node_name)?;
    let supervisor = description
        .supervisor(node_name, "agent")
        .ok_or_else(|| missing(format!("{node_name} has no supervised agent")))?;
    supervisor.signal(libc::SIGSTOP)?;
    if let Some(agent) = current(description, node_name, "agent") {
        kill_and_wait(agent)?;
    }
    supervisor.signal(libc::SIGKILL)?;
    Ok(())
}

/// Deletes the Node object `node` (as an operator or the cloud controller does for a node that is
/// gone).
pub async fn delete_node(client: &Client, node_name: &str) -> Result<(), FaultError> {
    crate::objects::delete_node(client, node_name)
        .await
        .map_err(|e| missing(e.to_string()))
}

/// Requests one agent made, from the audit log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// All requests.
    pub total: u64,
    /// Lists of a collection (`verb: list`): a relist when they follow a watch.
    pub lists: u64,
    /// Watches.
    pub watches: u64,
    /// Watches that resumed from a resourceVersion (no relist needed).
    pub watches_resumed: u64,
    /// Requests by verb.
    pub by_verb: BTreeMap<String, u64>,
}

/// Where the audit log ends now (to count only what comes later with [`audit_requests`]).
pub fn audit_offset(description: &ClusterDescription) -> Result<u64, FaultError> {
    let path = audit_path(description)?;
    Ok(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0))
}

fn audit_path(description: &ClusterDescription) -> Result<&Path, FaultError> {
    description.audit_log.as_deref().ok_or_else(|| {
        missing("this cluster writes no audit log (start it with ClusterOptions::audit_log)")
    })
}

/// The agents' requests in the audit log after byte `offset`, by node (the node a request's
/// ServiceAccount token is bound to).
pub fn audit_requests(
    description: &ClusterDescription,
    offset: u64,
) -> Result<BTreeMap<String, RequestCounts>, FaultError> {
    let path = audit_path(description)?;
    let io = |source| FaultError::Io {
        what: "reading the audit log",
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    file.seek(std::io::SeekFrom::Start(offset)).map_err(io)?;
    let mut out: BTreeMap<String, RequestCounts> = BTreeMap::new();
    for line in std::io::BufReader::new(file).lines() {
        let Ok(line) = line else { break };
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let Some(node) = event["user"]["extra"]["authentication.kubernetes.io/node-name"][0]
            .as_str()
            .filter(|_| {
                event["user"]["username"]
                    .as_str()
                    .is_some_and(|u| u.starts_with("system:serviceaccount:"))
            })
        else {
            continue;
        };
        let verb = event["verb"].as_str().unwrap_or_default().to_owned();
        let uri = event["requestURI"].as_str().unwrap_or_default();
        let c = out.entry(node.to_owned()).or_default();
        c.total += 1;
        match verb.as_str() {
            "list" => c.lists += 1,
            "watch" => {
                c.watches += 1;
                if uri
                    .split(['?', '&'])
                    .any(|p| p.starts_with("resourceVersion=") && p != "resourceVersion=")
                {
                    c.watches_resumed += 1;
                }
            }
            _ => {}
        }
        *c.by_verb.entry(verb).or_default() += 1;
    }
    Ok(out)
}
