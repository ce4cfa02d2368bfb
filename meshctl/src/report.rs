//! `meshctl report`: the compliance report. [`gather`] asks the API server (Nodes,
//! `MeshEncryption default`, KeyRotations) and every agent's flow history over the window
//! (through the node proxy, [`crate::agents`]); [`build`] turns that into a [`Report`] (pure, so
//! tests compute it from known inputs); [`sign`] signs it (an in-toto Statement in a DSSE
//! envelope, Ed25519); [`html`] renders the page an auditor reads.
//!
//! Counting: a *flow* is one direction of one 5-tuple (source and destination address and port,
//! protocol) over the window, however many records and nodes saw it. A flow any record shows
//! dropped is *dropped* (by the reason of that record); otherwise a pod-to-pod flow between two
//! nodes is *cross-node*, and it is *encrypted* only when every record of it says it went
//! through a WireGuard session, else *plaintext* (with the reason). `coverage` = encrypted /
//! cross-node. Anything the report could not see (an agent that did not answer, a stretch of the
//! window an agent was not recording) is listed in `gaps`, never skipped.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client, api::ListParams};
use mesh_agent::{
    api::FlowsResponse,
    flows::{CIPHER_SUITE, FiveTuple, Flow, FlowClass as Class, rfc3339},
    history::Period,
};
use serde::{Deserialize, Serialize};
use wiremesh_crds::{KeyRotation, MESH_ENCRYPTION_NAME, MeshEncryption, MeshNodeStatus};

use crate::agents::Agents;

pub mod html;
pub mod sign;

/// `apiVersion` of report.json.
pub const REPORT_API_VERSION: &str = "wiremesh.io/compliance-report/v1";
/// Uncovered stretches of a node's window shorter than this are not gaps: an agent writes its
/// history every 2 s, so the last seconds before the report are always still in memory.
pub const GAP_TOLERANCE_SECS: u64 = 5;

/// Why the report could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("read Nodes and MeshNodes: {0}")]
    Nodes(#[source] crate::status::StatusError),
    #[error("get MeshEncryption {MESH_ENCRYPTION_NAME}: {0}")]
    MeshEncryption(#[source] kube::Error),
    #[error("list KeyRotations: {0}")]
    KeyRotations(#[source] kube::Error),
}

/// `window`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub from: String,
    pub to: String,
}

/// `summary`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub cross_node_flows: u64,
    pub encrypted_flows: u64,
    pub plaintext_flows: u64,
    pub dropped_flows: u64,
    /// Pod flows that stayed on one node or were not pod-to-pod (out of scope).
    pub other_flows: u64,
    /// encrypted / cross-node; `null` without cross-node flows.
    pub coverage: Option<f64>,
    /// `coverage` as people read it: `"100.00%"`, `"n/a"`.
    pub coverage_percent: String,
    pub nodes_total: u64,
    pub nodes_reached: u64,
}

/// `nodes[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeEntry {
    pub name: String,
    pub public_key_fingerprint: Option<String>,
    pub key_generation: Option<u64>,
    pub key_age_seconds: Option<u64>,
    pub peers_expected: u32,
    pub peers_up: u32,
    pub datapath: Option<String>,
    pub mode: String,
    /// The agent answered for the window.
    pub reached: bool,
}

/// `plaintextFlowList[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlaintextFlow {
    pub source: String,
    pub destination: String,
    pub source_ip: String,
    pub destination_ip: String,
    pub protocol: String,
    pub source_port: u16,
    pub destination_port: u16,
    pub source_node: String,
    pub destination_node: String,
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
    pub first_seen: String,
    pub last_seen: String,
}

/// A value of `droppedByReason`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCount {
    pub flows: u64,
    pub packets: u64,
}

/// `rotations[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationEntry {
    pub name: String,
    pub phase: String,
    pub start: Option<String>,
    pub end: Option<String>,
    pub selected_nodes: Vec<String>,
    pub reason: String,
}

/// `controls[]`: one control of a framework and what the report shows for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Control {
    pub id: String,
    pub framework: String,
    pub title: String,
    /// `satisfied`, `not-satisfied` or `insufficient-evidence`.
    pub status: String,
    pub evidence: Vec<String>,
}

/// `gaps[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Gap {
    /// `node-unreachable`, `no-data` or `no-cross-node-traffic`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    pub detail: String,
}

/// `nodePairs[]`: the node-pair matrix (source node to destination node).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePair {
    pub source_node: String,
    pub destination_node: String,
    pub encrypted_flows: u64,
    pub plaintext_flows: u64,
    pub dropped_flows: u64,
}

/// `services[]`: which workloads talk to which (the dependency graph).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEdge {
    pub source: String,
    pub destination: String,
    pub encrypted_flows: u64,
    pub plaintext_flows: u64,
    pub dropped_flows: u64,
    /// Both ends on one node.
    pub local_flows: u64,
}

/// report.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub api_version: String,
    pub generated_at: String,
    pub window: Window,
    pub summary: Summary,
    pub cipher_suite: String,
    /// `MeshEncryption default` `spec.mode` (`Strict` / `Permissive`), `unknown` without it.
    pub mode: String,
    /// `spec.keyRotationInterval` (Go duration; empty: no scheduled rotation).
    pub key_rotation_interval: String,
    pub nodes: Vec<NodeEntry>,
    pub plaintext_flow_list: Vec<PlaintextFlow>,
    pub dropped_by_reason: BTreeMap<String, DropCount>,
    pub rotations: Vec<RotationEntry>,
    pub controls: Vec<Control>,
    pub gaps: Vec<Gap>,
    pub node_pairs: Vec<NodePair>,
    pub services: Vec<ServiceEdge>,
    /// `sha256:<hex>` over the canonical body ([`canonical_body`]).
    pub digest: String,
}

/// One agent's answer for the window.
#[derive(Debug, Clone)]
pub struct AgentAnswer {
    pub node: String,
    pub answer: Result<FlowsResponse, String>,
}

/// Everything a report is made of.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Unix seconds.
    pub from: u64,
    pub to: u64,
    /// Every Node with the status of its MeshNode.
    pub nodes: Vec<(Node, Option<MeshNodeStatus>)>,
    pub mesh: Option<MeshEncryption>,
    pub rotations: Vec<KeyRotation>,
    pub agents: Vec<AgentAnswer>,
}

/// Reads everything for the window `since` before now up to now.
pub async fn gather(
    client: &Client,
    agents: &Agents,
    since: Duration,
) -> Result<Inputs, ReportError> {
    let to = unix(SystemTime::now());
    let from = to.saturating_sub(since.as_secs());
    let nodes = crate::status::nodes_with_reports(client)
        .await
        .map_err(ReportError::Nodes)?;
    let mesh = Api::<MeshEncryption>::all(client.clone())
        .get_opt(MESH_ENCRYPTION_NAME)
        .await
        .map_err(ReportError::MeshEncryption)?;
    let rotations = Api::<KeyRotation>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(ReportError::KeyRotations)?
        .items;
    let mut answers = Vec::new();
    for node in nodes.iter().filter_map(|(n, _)| n.metadata.name.clone()) {
        let answer = agents
            .flows(&node, Some(from), Some(to))
            .await
            .map_err(|e| e.to_string());
        answers.push(AgentAnswer { node, answer });
    }
    Ok(Inputs {
        from,
        to,
        nodes,
        mesh,
        rotations,
        agents: answers,
    })
}

/// Unix seconds of `t`.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// (source node, destination node) of a record: the observer is the source for traffic seen
/// leaving a pod, else the destination.
fn node_ends(f: &Flow) -> (String, String) {
    let peer = f.encryption.peer_node.clone().unwrap_or_default();
    if f.traffic_direction == "EGRESS" {
        (f.node_name.clone(), peer)
    } else {
        (peer, f.node_name.clone())
    }
}

/// The workload of an endpoint, `namespace/name`: the pod name without a ReplicaSet's
/// `-<hash>-<suffix>` or a bare `-<suffix>` of five lower-case alphanumerics (Deployment and
/// DaemonSet pods), else the pod name; a non-pod address as itself.
pub fn workload(e: &mesh_agent::flows::Endpoint, ip: std::net::IpAddr) -> String {
    if e.pod_name.is_empty() {
        return ip.to_string();
    }
    let generated = |part: &str, lens: &[usize]| {
        lens.contains(&part.len())
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && part.chars().any(|c| c.is_ascii_digit())
    };
    let mut name = e.pod_name.as_str();
    if let Some((head, tail)) = name.rsplit_once('-')
        && generated(tail, &[5])
    {
        name = head;
        if let Some((head, tail)) = name.rsplit_once('-')
            && generated(tail, &[8, 9, 10])
        {
            name = head;
        }
    }
    format!("{}/{name}", e.namespace)
}

/// How one flow is counted: the agent's rule, shared with its coverage metric.
fn classify(records: &[&Flow]) -> Class {
    Class::of_records(records.iter().copied())
}

fn mode_of(mesh: Option<&MeshEncryption>) -> String {
    mesh.map_or_else(
        || "unknown".to_string(),
        |m| {
            serde_json::to_value(m.spec.mode)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| "unknown".into())
        },
    )
}

/// Builds the report of `inputs` made at `now` (Unix seconds), digest included.
pub fn build(inputs: &Inputs, now: u64) -> Report {
    let mesh = inputs.mesh.as_ref();
    let mode = mode_of(mesh);
    let status = crate::status::evaluate(
        &inputs.nodes,
        mesh,
        SystemTime::UNIX_EPOCH + Duration::from_secs(now),
    );
    let answers: BTreeMap<&str, &AgentAnswer> =
        inputs.agents.iter().map(|a| (a.node.as_str(), a)).collect();
    let mut gaps = Vec::new();

    // Every record of every agent that answered, by 5-tuple.
    let mut by_flow: BTreeMap<FiveTuple, Vec<&Flow>> = BTreeMap::new();
    for a in &inputs.agents {
        match &a.answer {
            Ok(r) => {
                for f in &r.flows {
                    by_flow.entry(f.five_tuple()).or_default().push(f);
                }
                gaps.extend(no_data(&a.node, &r.coverage, inputs.from, inputs.to));
            }
            Err(e) => gaps.push(Gap {
                kind: "node-unreachable".into(),
                node: Some(a.node.clone()),
                from: Some(rfc3339(inputs.from)),
                to: Some(rfc3339(inputs.to)),
                detail: format!("the agent's flow history could not be read: {e}"),
            }),
        }
    }

    let mut summary = Summary {
        cross_node_flows: 0,
        encrypted_flows: 0,
        plaintext_flows: 0,
        dropped_flows: 0,
        other_flows: 0,
        coverage: None,
        coverage_percent: "n/a".into(),
        nodes_total: inputs.nodes.len() as u64,
        nodes_reached: inputs.agents.iter().filter(|a| a.answer.is_ok()).count() as u64,
    };
    let mut plaintext = Vec::new();
    let mut dropped: BTreeMap<String, DropCount> = BTreeMap::new();
    let mut pairs: BTreeMap<(String, String), NodePair> = BTreeMap::new();
    let mut services: BTreeMap<(String, String), ServiceEdge> = BTreeMap::new();
    for records in by_flow.values() {
        let class = classify(records);
        // The record that tells the most: the sender's, else any.
        let main = records
            .iter()
            .find(|r| r.traffic_direction == "EGRESS")
            .unwrap_or(&records[0]);
        let packets = records.iter().map(|r| r.packets).max().unwrap_or(0);
        let bytes = records.iter().map(|r| r.bytes).max().unwrap_or(0);
        let edge = services
            .entry((
                workload(&main.source, main.ip.source),
                workload(&main.destination, main.ip.destination),
            ))
            .or_insert_with_key(|(s, d)| ServiceEdge {
                source: s.clone(),
                destination: d.clone(),
                ..ServiceEdge::default()
            });
        let pair = || -> Option<(String, String)> {
            records
                .iter()
                .find(|r| r.cross_node)
                .map(|r| node_ends(r))
                .filter(|(s, d)| !s.is_empty() && !d.is_empty())
        };
        let mut count_pair = |f: fn(&mut NodePair)| {
            if let Some((s, d)) = pair() {
                f(pairs.entry((s.clone(), d.clone())).or_insert(NodePair {
                    source_node: s,
                    destination_node: d,
                    ..NodePair::default()
                }));
            }
        };
        match class {
            Class::Dropped => {
                summary.dropped_flows += 1;
                edge.dropped_flows += 1;
                count_pair(|p| p.dropped_flows += 1);
                let drop = records.iter().find(|r| r.dropped()).unwrap_or(main);
                let entry = dropped.entry(drop.encryption.reason.clone()).or_default();
                entry.flows += 1;
                entry.packets += drop.packets;
            }
            Class::Other => {
                summary.other_flows += 1;
                edge.local_flows += 1;
            }
            Class::Encrypted => {
                summary.cross_node_flows += 1;
                summary.encrypted_flows += 1;
                edge.encrypted_flows += 1;
                count_pair(|p| p.encrypted_flows += 1);
            }
            Class::Plaintext => {
                summary.cross_node_flows += 1;
                summary.plaintext_flows += 1;
                edge.plaintext_flows += 1;
                count_pair(|p| p.plaintext_flows += 1);
                let why = records
                    .iter()
                    .find(|r| r.cross_node && !r.encryption.encrypted)
                    .unwrap_or(main);
                let (source_node, destination_node) = node_ends(why);
                plaintext.push(PlaintextFlow {
                    source: main.source_name(),
                    destination: main.destination_name(),
                    source_ip: main.ip.source.to_string(),
                    destination_ip: main.ip.destination.to_string(),
                    protocol: main.l4.protocol(),
                    source_port: main.l4.source_port(),
                    destination_port: main.l4.destination_port(),
                    source_node,
                    destination_node,
                    reason: why.encryption.reason.clone(),
                    packets,
                    bytes,
                    first_seen: rfc3339(records.iter().map(|r| r.first_seen).min().unwrap_or(0)),
                    last_seen: rfc3339(records.iter().map(|r| r.last_seen).max().unwrap_or(0)),
                });
            }
        }
    }
    if summary.cross_node_flows > 0 {
        let c = summary.encrypted_flows as f64 / summary.cross_node_flows as f64;
        summary.coverage = Some(c);
        summary.coverage_percent = format!("{:.2}%", c * 100.0);
    } else {
        gaps.push(Gap {
            kind: "no-cross-node-traffic".into(),
            node: None,
            from: Some(rfc3339(inputs.from)),
            to: Some(rfc3339(inputs.to)),
            detail: "no pod-to-pod flow between nodes was recorded in the window: coverage \
                     cannot be computed"
                .into(),
        });
    }

    let nodes: Vec<NodeEntry> = status
        .nodes
        .iter()
        .map(|n| {
            let answer = answers
                .get(n.name.as_str())
                .and_then(|a| a.answer.as_ref().ok());
            NodeEntry {
                name: n.name.clone(),
                public_key_fingerprint: n.key_fingerprint.clone(),
                key_generation: n.key_generation,
                key_age_seconds: answer
                    .and_then(|r| r.key_created_at)
                    .map(|k| now.saturating_sub(k)),
                peers_expected: n.peers_expected,
                peers_up: n.peers.iter().filter(|p| p.problem.is_none()).count() as u32,
                datapath: n.datapath.clone(),
                mode: mode.clone(),
                reached: answer.is_some(),
            }
        })
        .collect();
    let mut rotations: Vec<RotationEntry> = inputs
        .rotations
        .iter()
        .map(|r| {
            let status = r.status.clone().unwrap_or_default();
            RotationEntry {
                name: kube::ResourceExt::name_any(r),
                phase: status.phase.as_str().to_string(),
                start: status.start_time.as_ref().map(|t| t.0.to_string()),
                end: status.completion_time.as_ref().map(|t| t.0.to_string()),
                selected_nodes: status.selected_nodes.clone(),
                reason: r.spec.reason.clone(),
            }
        })
        .collect();
    rotations.sort_by(|a, b| (&a.start, &a.name).cmp(&(&b.start, &b.name)));
    let key_rotation_interval = mesh
        .map(|m| m.spec.key_rotation_interval.clone())
        .unwrap_or_default();
    let controls = controls(&summary, &nodes, &gaps, &mode, &key_rotation_interval);

    let mut report = Report {
        api_version: REPORT_API_VERSION.into(),
        generated_at: rfc3339(now),
        window: Window {
            from: rfc3339(inputs.from),
            to: rfc3339(inputs.to),
        },
        summary,
        cipher_suite: CIPHER_SUITE.into(),
        mode,
        key_rotation_interval,
        nodes,
        plaintext_flow_list: plaintext,
        dropped_by_reason: dropped,
        rotations,
        controls,
        gaps,
        node_pairs: pairs.into_values().collect(),
        services: services.into_values().collect(),
        digest: String::new(),
    };
    report.digest = digest_of(&report);
    report
}

/// Stretches of `from..=to` that `coverage` leaves out (longer than [`GAP_TOLERANCE_SECS`]).
fn no_data(node: &str, coverage: &[Period], from: u64, to: u64) -> Vec<Gap> {
    let mut periods = coverage.to_vec();
    periods.sort_by_key(|p| p.from);
    let mut holes = Vec::new();
    let mut cursor = from;
    for p in periods {
        if p.from > cursor {
            holes.push((cursor, p.from.min(to)));
        }
        cursor = cursor.max(p.to);
        if cursor >= to {
            break;
        }
    }
    if cursor < to {
        holes.push((cursor, to));
    }
    holes
        .into_iter()
        .filter(|(a, b)| b.saturating_sub(*a) > GAP_TOLERANCE_SECS)
        .map(|(a, b)| Gap {
            kind: "no-data".into(),
            node: Some(node.to_string()),
            from: Some(rfc3339(a)),
            to: Some(rfc3339(b)),
            detail: format!("the agent was not recording for {} s", b - a),
        })
        .collect()
}

/// The encryption-in-transit controls and their status from this report's evidence.
fn controls(
    summary: &Summary,
    nodes: &[NodeEntry],
    gaps: &[Gap],
    mode: &str,
    rotation_interval: &str,
) -> Vec<Control> {
    let mut evidence = vec![
        format!(
            "{} of {} cross-node pod flows encrypted (coverage {})",
            summary.encrypted_flows, summary.cross_node_flows, summary.coverage_percent
        ),
        format!("cipher suite {CIPHER_SUITE} (WireGuard)"),
        format!("MeshEncryption mode {mode}"),
        format!(
            "{} of {} nodes' agents reached; {} gap(s) listed",
            summary.nodes_reached,
            summary.nodes_total,
            gaps.len()
        ),
    ];
    if summary.plaintext_flows > 0 {
        evidence.push(format!(
            "{} plaintext flow(s) listed in plaintextFlowList",
            summary.plaintext_flows
        ));
    }
    let transit = if summary.plaintext_flows > 0 {
        "not-satisfied"
    } else if !gaps.is_empty() || summary.cross_node_flows == 0 {
        "insufficient-evidence"
    } else {
        "satisfied"
    };
    let interval = wiremesh_crds::parse_go_duration(rotation_interval).ok();
    let keyed: Vec<&NodeEntry> = nodes
        .iter()
        .filter(|n| n.public_key_fingerprint.is_some())
        .collect();
    let oldest = nodes.iter().filter_map(|n| n.key_age_seconds).max();
    let mut key_evidence = vec![format!(
        "{} of {} nodes publish a WireGuard key",
        keyed.len(),
        nodes.len()
    )];
    if let Some(age) = oldest {
        key_evidence.push(format!("oldest key in force: {age} s"));
    }
    let keys = match (interval, oldest) {
        _ if keyed.len() != nodes.len() => "not-satisfied",
        (Some(limit), Some(age)) if age <= limit.as_secs() => {
            key_evidence.push(format!(
                "every key younger than keyRotationInterval {rotation_interval}"
            ));
            "satisfied"
        }
        (Some(_), Some(_)) => {
            key_evidence.push(format!(
                "a key is older than keyRotationInterval {rotation_interval}"
            ));
            "not-satisfied"
        }
        _ => {
            key_evidence.push("no keyRotationInterval set, or key ages not read".into());
            "insufficient-evidence"
        }
    };
    let transit_control = |id: &str, framework: &str, title: &str| Control {
        id: id.into(),
        framework: framework.into(),
        title: title.into(),
        status: transit.into(),
        evidence: evidence.clone(),
    };
    vec![
        transit_control(
            "CC6.7",
            "SOC 2",
            "Restricts the transmission of information to authorised parties and protects it in transit",
        ),
        transit_control(
            "A.8.24",
            "ISO/IEC 27001:2022",
            "Use of cryptography (encryption of information in transit)",
        ),
        Control {
            id: "A.8.24-keys".into(),
            framework: "ISO/IEC 27001:2022".into(),
            title: "Use of cryptography: cryptographic key management (key ages, rotation)".into(),
            status: keys.into(),
            evidence: key_evidence,
        },
        transit_control(
            "4.2.1",
            "PCI DSS 4.0",
            "Strong cryptography protects data during transmission",
        ),
        transit_control(
            "164.312(e)(1)",
            "HIPAA",
            "Transmission security: guard against unauthorised access to data in transit",
        ),
    ]
}

/// The canonical body the digest covers: report.json without `digest`, as JSON with object
/// members sorted by key (byte order), no whitespace.
pub fn canonical_body(report: &serde_json::Value) -> String {
    let mut body = report.clone();
    if let Some(o) = body.as_object_mut() {
        o.remove("digest");
    }
    let mut out = String::new();
    write_canonical(&body, &mut out);
    out
}

fn write_canonical(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// `sha256:<hex>` of the canonical body of `report`.
pub fn digest_of(report: &Report) -> String {
    let value = serde_json::to_value(report).unwrap_or_default();
    digest_of_value(&value)
}

/// [`digest_of`] for report.json as read back.
pub fn digest_of_value(report: &serde_json::Value) -> String {
    format!(
        "sha256:{}",
        sign::sha256_hex(canonical_body(report).as_bytes())
    )
}

/// The files `meshctl report` writes.
#[derive(Debug, Clone)]
pub struct Written {
    pub json: std::path::PathBuf,
    pub envelope: std::path::PathBuf,
    pub public_key: std::path::PathBuf,
    pub html: std::path::PathBuf,
}

/// The envelope file next to a report.json.
pub fn envelope_path(report_json: &std::path::Path) -> std::path::PathBuf {
    report_json.with_file_name("report.dsse.json")
}

/// Writes report.json, its signed envelope report.dsse.json, the public key report.pub (a
/// convenience: verify against a key from a trusted source) and report.html into `dir`.
pub fn write(
    dir: &std::path::Path,
    report: &Report,
    key: &sign::SigningKey,
) -> std::io::Result<Written> {
    std::fs::create_dir_all(dir)?;
    let written = Written {
        json: dir.join("report.json"),
        envelope: envelope_path(&dir.join("report.json")),
        public_key: dir.join("report.pub"),
        html: dir.join("report.html"),
    };
    let mut bytes = serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    std::fs::write(&written.json, &bytes)?;
    let envelope = key.sign(&bytes, report);
    let mut env = serde_json::to_vec_pretty(&envelope).map_err(std::io::Error::other)?;
    env.push(b'\n');
    std::fs::write(&written.envelope, env)?;
    std::fs::write(&written.public_key, key.public().to_pem())?;
    std::fs::write(&written.html, html::render(report))?;
    Ok(written)
}

/// The line `meshctl report` (and `make demo`) prints.
pub fn coverage_line(report: &Report) -> String {
    format!(
        "coverage {}: {} of {} cross-node flows encrypted, {} plaintext, {} dropped, {} gap(s)",
        report.summary.coverage_percent,
        report.summary.encrypted_flows,
        report.summary.cross_node_flows,
        report.summary.plaintext_flows,
        report.summary.dropped_flows,
        report.gaps.len()
    )
}

#[cfg(test)]
mod tests;
