//! `meshctl status`: the mesh as the API server shows it, with nothing but a kubeconfig. Each
//! node's key fingerprint and generation come from its key annotations; peers, handshakes and the
//! datapath from the [`MeshNodeStatus`] its agent keeps in the status of its `MeshNode`. The mesh is
//! converged when `MeshEncryption default` is enabled and every node has a valid key, a fresh
//! report from a ready agent, and a configured peer with a recent handshake for every other valid
//! node, under the key that node publishes.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    str::FromStr,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client, api::ListParams};
use mesh_agent::nodestatus::{HANDSHAKE_FRESH, MeshNode, MeshNodeStatus, unix_seconds};
use serde::Serialize;
use wiremesh_crds::{MESH_ENCRYPTION_NAME, MeshEncryption};
use wiremesh_keyexchange::{AnnotationError, MovedEndpoint, NodeAnnotations};

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("list Nodes: {0}")]
    ListNodes(#[source] kube::Error),
    #[error("list MeshNodes (is the meshnodes.wiremesh.io CRD installed?): {0}")]
    ListMeshNodes(#[source] kube::Error),
    #[error("get MeshEncryption {MESH_ENCRYPTION_NAME}: {0}")]
    GetMeshEncryption(#[source] kube::Error),
}

/// One peer of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerView {
    pub node: String,
    /// Key fingerprint configured on the device.
    pub key: String,
    /// Seconds since the last handshake, if any.
    pub handshake_age_secs: Option<u64>,
    /// Empty when the peer is healthy.
    pub problem: Option<String>,
}

/// One node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub name: String,
    pub key_fingerprint: Option<String>,
    pub key_generation: Option<u64>,
    /// Seconds since the node's current key was generated or promoted by a rotation.
    pub key_age_secs: Option<u64>,
    pub datapath: Option<String>,
    /// Why the agent drives this datapath.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datapath_reason: Option<String>,
    pub peers_configured: Option<u32>,
    /// Valid other nodes, as meshctl sees them.
    pub peers_expected: u32,
    pub ready: bool,
    pub peers: Vec<PeerView>,
    /// Why this node is not converged (empty: converged).
    pub problems: Vec<String>,
}

impl NodeView {
    pub fn converged(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The whole mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// `MeshEncryption default` exists.
    pub mesh_encryption: bool,
    pub enabled: bool,
    pub nodes: Vec<NodeView>,
    /// Cluster-wide problems (mesh disabled, no nodes).
    pub problems: Vec<String>,
}

impl MeshStatus {
    /// Converged: no cluster-wide problem and every node converged.
    pub fn converged(&self) -> bool {
        self.problems.is_empty() && self.nodes.iter().all(NodeView::converged)
    }

    /// Every problem, prefixed with its node.
    pub fn all_problems(&self) -> Vec<String> {
        let mut out = self.problems.clone();
        for node in &self.nodes {
            out.extend(node.problems.iter().map(|p| format!("{}: {p}", node.name)));
        }
        out
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// Reads Nodes and `MeshEncryption default` and evaluates them at the current time.
pub async fn collect(client: &Client) -> Result<MeshStatus, StatusError> {
    let nodes = nodes_with_reports(client).await?;
    let mesh_encryption = Api::<MeshEncryption>::all(client.clone())
        .get_opt(MESH_ENCRYPTION_NAME)
        .await
        .map_err(StatusError::GetMeshEncryption)?;
    Ok(evaluate(
        &nodes,
        mesh_encryption.as_ref(),
        SystemTime::now(),
    ))
}

/// Every Node (sorted by name) with the status of its `MeshNode`, if any.
pub async fn nodes_with_reports(
    client: &Client,
) -> Result<Vec<(Node, Option<MeshNodeStatus>)>, StatusError> {
    let mut nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(StatusError::ListNodes)?
        .items;
    nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let reports: BTreeMap<String, MeshNodeStatus> = Api::<MeshNode>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(StatusError::ListMeshNodes)?
        .items
        .into_iter()
        .filter_map(|m| Some((m.metadata.name?, m.status?)))
        .collect();
    let nodes: Vec<(Node, Option<MeshNodeStatus>)> = nodes
        .into_iter()
        .map(|n| {
            let report = n
                .metadata
                .name
                .as_ref()
                .and_then(|name| reports.get(name).cloned());
            (n, report)
        })
        .collect();
    Ok(nodes)
}

/// InternalIPs, then ExternalIPs: the agents' order (`mesh_agent::views::node_addresses`), which
/// decides the address a stale endpoint is replaced with.
fn addresses(node: &Node) -> Vec<IpAddr> {
    let all = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    ["InternalIP", "ExternalIP"]
        .iter()
        .flat_map(|wanted| all.iter().filter(move |a| a.type_ == *wanted))
        .filter_map(|a| IpAddr::from_str(a.address.trim()).ok())
        .collect()
}

/// Pure evaluation of the mesh status (see the module docs): each Node with the status of its
/// `MeshNode`, if any.
pub fn evaluate(
    nodes: &[(Node, Option<MeshNodeStatus>)],
    mesh_encryption: Option<&MeshEncryption>,
    now: SystemTime,
) -> MeshStatus {
    let mut problems = Vec::new();
    let enabled = mesh_encryption.is_some_and(|m| m.spec.enabled);
    match mesh_encryption {
        None => problems.push(format!(
            "MeshEncryption {MESH_ENCRYPTION_NAME} does not exist: the mesh is off"
        )),
        Some(_) if !enabled => problems.push(format!(
            "MeshEncryption {MESH_ENCRYPTION_NAME} has enabled: false: the mesh is off"
        )),
        Some(_) => {}
    }
    if nodes.is_empty() {
        problems.push("no Nodes".to_string());
    }

    // Key annotations of every node, validated as the agents validate them (a stale endpoint
    // is replaced with the node's address, as peers do).
    let mut moved: BTreeMap<String, Vec<MovedEndpoint>> = BTreeMap::new();
    let parsed: BTreeMap<String, Result<NodeAnnotations, AnnotationError>> = nodes
        .iter()
        .filter_map(|(n, _)| {
            let name = n.metadata.name.clone()?;
            let annotations = n.metadata.annotations.clone().unwrap_or_default();
            let parsed = NodeAnnotations::parse_for_peering(&annotations, &addresses(n)).map(
                |(parsed, stale)| {
                    moved.insert(name.clone(), stale);
                    parsed
                },
            );
            Some((name, parsed))
        })
        .collect();
    let valid: BTreeMap<&str, &NodeAnnotations> = parsed
        .iter()
        .filter_map(|(name, p)| p.as_ref().ok().map(|a| (name.as_str(), a)))
        .collect();

    let mut views: Vec<NodeView> = nodes
        .iter()
        .filter_map(|(node, report)| {
            let name = node.metadata.name.clone()?;
            Some(evaluate_node(
                report.as_ref(),
                &name,
                &parsed[&name],
                moved.get(&name).map(Vec::as_slice).unwrap_or_default(),
                &valid,
                enabled,
                now,
            ))
        })
        .collect();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    MeshStatus {
        mesh_encryption: mesh_encryption.is_some(),
        enabled,
        nodes: views,
        problems,
    }
}

fn evaluate_node(
    report: Option<&MeshNodeStatus>,
    name: &str,
    annotations: &Result<NodeAnnotations, AnnotationError>,
    moved: &[MovedEndpoint],
    valid: &BTreeMap<&str, &NodeAnnotations>,
    enabled: bool,
    now: SystemTime,
) -> NodeView {
    let mut problems: Vec<String> = moved
        .iter()
        .map(|m| format!("stale endpoint, peers keep it: {m}"))
        .collect();
    let (key_fingerprint, key_generation) = match annotations {
        Ok(a) => (Some(a.public_key.fingerprint()), Some(a.key_generation)),
        Err(AnnotationError::NotPublished) => {
            problems.push("no public key published (is its agent running?)".to_string());
            (None, None)
        }
        Err(e) => {
            problems.push(format!("invalid annotations, peers skip it: {e}"));
            (None, None)
        }
    };
    let others: Vec<(&str, &NodeAnnotations)> = valid
        .iter()
        .filter(|(n, _)| **n != name)
        .map(|(n, a)| (*n, *a))
        .collect();
    let peers_expected = u32::try_from(others.len()).unwrap_or(u32::MAX);

    if report.is_none() {
        problems.push("no status report (agent not running or not started yet)".to_string());
    }

    let mut peers = Vec::new();
    let mut view = NodeView {
        name: name.to_string(),
        key_fingerprint,
        key_generation,
        key_age_secs: report
            .and_then(|r| r.key_created_at)
            .map(|t| unix_seconds(now).saturating_sub(t)),
        datapath: report.map(|r| r.datapath.clone()),
        datapath_reason: report.and_then(|r| r.datapath_reason.clone()),
        peers_configured: report.map(|r| r.peers_configured),
        peers_expected,
        ready: report.is_some_and(|r| r.ready),
        peers: Vec::new(),
        problems: Vec::new(),
    };
    if let Some(report) = report {
        if report.is_stale(now) {
            problems.push(format!(
                "status report is {}s old (agent stopped?)",
                unix_seconds(now).saturating_sub(report.updated_at)
            ));
        }
        if let Some(error) = &report.error {
            problems.push(format!("agent reports: {error}"));
        }
        if let Some(error) = report.ebpf.as_ref().and_then(|e| e.error.as_ref()) {
            problems.push(format!("eBPF datapath: {error}"));
        }
        for condition in report.conditions.iter().filter(|c| c.status == "False") {
            problems.push(format!(
                "settings not applied as written ({}): {}",
                condition.reason, condition.message
            ));
        }
        if !report.ready {
            problems.push("agent not ready".to_string());
        }
        if enabled && !report.enabled {
            problems.push("agent has not seen the mesh enabled yet".to_string());
        }
        if report.key.is_some() && report.key != view.key_fingerprint {
            problems.push(format!(
                "device key {} differs from the published key",
                report.key.as_deref().unwrap_or("-")
            ));
        }
        if enabled {
            for (other, other_annotations) in &others {
                let want = other_annotations.public_key.fingerprint();
                let peer = report.peers.iter().find(|p| p.node == *other);
                let view_peer = match peer {
                    None => PeerView {
                        node: other.to_string(),
                        key: "-".into(),
                        handshake_age_secs: None,
                        problem: Some("not configured".into()),
                    },
                    Some(p) => {
                        let age = p
                            .last_handshake
                            .map(|at| unix_seconds(now).saturating_sub(at));
                        let problem = if p.key != want {
                            Some(format!(
                                "configured with key {}, node publishes {want}",
                                p.key
                            ))
                        } else {
                            match age {
                                None => Some("no handshake yet".to_string()),
                                Some(a) if Duration::from_secs(a) > HANDSHAKE_FRESH => {
                                    Some(format!("last handshake {a}s ago"))
                                }
                                Some(_) => None,
                            }
                        };
                        PeerView {
                            node: other.to_string(),
                            key: p.key.clone(),
                            handshake_age_secs: age,
                            problem,
                        }
                    }
                };
                if let Some(problem) = &view_peer.problem {
                    problems.push(format!("peer {other}: {problem}"));
                }
                peers.push(view_peer);
            }
            if report.peers_configured != peers_expected || report.peers_expected != peers_expected
            {
                problems.push(format!(
                    "agent has {}/{} peers configured, {} valid nodes to peer with",
                    report.peers_configured, report.peers_expected, peers_expected
                ));
            }
        }
    }
    view.peers = peers;
    view.problems = problems;
    view
}

/// The status as a table for people.
/// The table cells of one node: name, key fingerprint, generation, key age, datapath, peers
/// (configured/expected), ready, converged state.
pub fn node_cells(node: &NodeView) -> [String; 8] {
    [
        node.name.clone(),
        node.key_fingerprint.as_deref().unwrap_or("-").to_string(),
        node.key_generation
            .map_or_else(|| "-".to_string(), |g| g.to_string()),
        node.key_age_secs.map_or_else(|| "-".to_string(), age),
        node.datapath.as_deref().unwrap_or("-").to_string(),
        format!(
            "{}/{}",
            node.peers_configured
                .map_or_else(|| "-".to_string(), |c| c.to_string()),
            node.peers_expected
        ),
        if node.ready { "yes" } else { "no" }.to_string(),
        if node.converged() {
            "converged"
        } else {
            "NOT CONVERGED"
        }
        .to_string(),
    ]
}

/// The header of the columns [`node_row`] lays out.
pub fn row_header() -> String {
    format!(
        "{:<14} {:<9} {:>4} {:>7}  {:<10} {:>6}  {:<5}",
        "NODE", "KEY", "GEN", "KEY AGE", "DATAPATH", "PEERS", "READY"
    )
}

/// A node's columns under [`row_header`], and its converged state.
pub fn node_row(node: &NodeView) -> (String, String) {
    let [
        name,
        key,
        generation,
        key_age,
        datapath,
        peers,
        ready,
        state,
    ] = node_cells(node);
    (
        format!(
            "{name:<14} {key:<9} {generation:>4} {key_age:>7}  {datapath:<10} {peers:>6}  {ready:<5}"
        ),
        state,
    )
}

/// A duration for people: `42s`, `17m`, `5h`, `12d`.
fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

pub fn render(status: &MeshStatus) -> String {
    let mut out = String::new();
    let mesh = if !status.mesh_encryption {
        "MeshEncryption default: absent (mesh off)".to_string()
    } else if status.enabled {
        "MeshEncryption default: enabled".to_string()
    } else {
        "MeshEncryption default: disabled".to_string()
    };
    let _ = writeln!(out, "{mesh}");
    let _ = writeln!(out, "{}  STATUS", row_header());
    for node in &status.nodes {
        let (row, state) = node_row(node);
        let _ = writeln!(out, "{row}  {state}");
        if let Some(reason) = &node.datapath_reason {
            let _ = writeln!(out, "    datapath: {reason}");
        }
        for peer in &node.peers {
            let handshake = peer
                .handshake_age_secs
                .map_or_else(|| "never".to_string(), |a| format!("{a}s ago"));
            let _ = writeln!(
                out,
                "    -> {:<14} key {:<9} last handshake {:<10}{}",
                peer.node,
                peer.key,
                handshake,
                peer.problem
                    .as_ref()
                    .map(|p| format!("  ({p})"))
                    .unwrap_or_default()
            );
        }
    }
    let converged = status.nodes.iter().filter(|n| n.converged()).count();
    if status.converged() {
        let _ = writeln!(
            out,
            "mesh converged: {converged}/{} nodes",
            status.nodes.len()
        );
    } else {
        let _ = writeln!(
            out,
            "mesh NOT converged ({converged}/{} nodes converged):",
            status.nodes.len()
        );
        for problem in status.all_problems() {
            let _ = writeln!(out, "  - {problem}");
        }
    }
    out
}

#[cfg(test)]
mod tests;
