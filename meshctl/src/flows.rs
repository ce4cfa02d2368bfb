//! `meshctl flows` (like `hubble observe`): the agents' flow records, gathered through the API
//! server's node proxy ([`crate::agents`]), filtered, and printed as a table a person reads at a
//! glance or as JSON / JSON lines in Hubble's field names. Without `--since` each agent's live
//! flow table is read; with it, each agent's on-disk flow history for the window. `--follow`
//! polls the live tables and prints every record that is new or moved since the last poll.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::Node;
use kube::{Api, api::ListParams};
use mesh_agent::flows::Flow;

use crate::agents::{AgentError, Agents};

/// Why flows could not be gathered at all (one unreachable agent is not this: see [`Gathered`]).
#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    #[error("list Nodes: {0}")]
    ListNodes(#[source] kube::Error),
    #[error("no node named {0:?}")]
    NoSuchNode(String),
    #[error("--verdict {0:?}: not FORWARDED, DROPPED or a wiremesh verdict ({1})")]
    Verdict(String, String),
}

/// The wiremesh verdicts `--verdict` accepts besides Hubble's `FORWARDED` / `DROPPED`.
pub const WIREMESH_VERDICTS: [&str; 6] = [
    "forwarded-encrypted",
    "forwarded-local",
    "forwarded-plain",
    "dropped-policy",
    "dropped-plaintext",
    "too-big",
];

/// Which flows to show. Every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Source or destination pod in this namespace.
    pub namespace: Option<String>,
    /// Source or destination pod `name` or `namespace/name`.
    pub pod: Option<String>,
    /// Observed by this node (only its agent is asked).
    pub node: Option<String>,
    /// `FORWARDED`, `DROPPED` (Hubble) or one of [`WIREMESH_VERDICTS`].
    pub verdict: Option<String>,
    /// Only pod-to-pod flows between nodes that were not encrypted.
    pub unencrypted: bool,
    /// Source or destination port.
    pub port: Option<u16>,
}

impl Filter {
    /// Checks the values that can be wrong before asking anything.
    pub fn validate(&self) -> Result<(), FlowsError> {
        if let Some(v) = &self.verdict {
            let upper = v.to_ascii_uppercase();
            if upper != "FORWARDED"
                && upper != "DROPPED"
                && !WIREMESH_VERDICTS.contains(&v.as_str())
            {
                return Err(FlowsError::Verdict(v.clone(), WIREMESH_VERDICTS.join(", ")));
            }
        }
        Ok(())
    }

    /// Whether `flow` passes every set field.
    pub fn matches(&self, flow: &Flow) -> bool {
        let ends = [&flow.source, &flow.destination];
        if let Some(ns) = &self.namespace
            && !ends.iter().any(|e| &e.namespace == ns)
        {
            return false;
        }
        if let Some(pod) = &self.pod {
            let hit = ends.iter().any(|e| match pod.split_once('/') {
                Some((ns, name)) => e.namespace == ns && e.pod_name == name,
                None => e.pod_name == *pod,
            });
            if !hit {
                return false;
            }
        }
        if let Some(node) = &self.node
            && &flow.node_name != node
        {
            return false;
        }
        if let Some(v) = &self.verdict
            && !flow.verdict.eq_ignore_ascii_case(v)
            && flow.wiremesh_verdict != *v
        {
            return false;
        }
        if self.unencrypted && (!flow.cross_node || flow.encryption.encrypted) {
            return false;
        }
        if let Some(port) = self.port
            && flow.l4.destination_port() != port
            && flow.l4.source_port() != port
        {
            return false;
        }
        true
    }
}

/// What the agents returned: the flows (oldest first) and the agents that could not be asked.
#[derive(Debug, Default)]
pub struct Gathered {
    pub flows: Vec<Flow>,
    pub unreachable: Vec<(String, AgentError)>,
}

/// The nodes to ask: every Node, or only `filter.node` (which must exist).
pub async fn nodes(agents: &Agents, filter: &Filter) -> Result<Vec<String>, FlowsError> {
    let mut names: Vec<String> = Api::<Node>::all(agents.client().clone())
        .list(&ListParams::default())
        .await
        .map_err(FlowsError::ListNodes)?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    names.sort();
    if let Some(only) = &filter.node {
        if !names.contains(only) {
            return Err(FlowsError::NoSuchNode(only.clone()));
        }
        names.retain(|n| n == only);
    }
    Ok(names)
}

/// Each node's flows (live without `since`, else the history from `since` Unix seconds) that
/// pass `filter`, oldest first.
pub async fn gather(
    agents: &Agents,
    nodes: &[String],
    since: Option<u64>,
    filter: &Filter,
) -> Gathered {
    let mut out = Gathered::default();
    for node in nodes {
        match agents.flows(node, since, None).await {
            Ok(r) => out
                .flows
                .extend(r.flows.into_iter().filter(|f| filter.matches(f))),
            Err(e) => out.unreachable.push((node.clone(), e)),
        }
    }
    out.flows.sort_by(|a, b| {
        (a.last_seen, &a.node_name, a.id()).cmp(&(b.last_seen, &b.node_name, b.id()))
    });
    out
}

/// `--follow`: remembers what was printed and yields only records that are new or moved.
#[derive(Debug, Default)]
pub struct Follower {
    seen: BTreeMap<(String, mesh_agent::flows::FlowId), (u64, u64)>,
}

impl Follower {
    /// The flows of `batch` not printed yet in this state (new flow, or more packets or a later
    /// record than last time).
    pub fn fresh(&mut self, batch: Vec<Flow>) -> Vec<Flow> {
        batch
            .into_iter()
            .filter(|f| {
                let key = (f.node_name.clone(), f.id());
                let now = (f.last_seen, f.packets);
                match self.seen.insert(key, now) {
                    Some(before) => before != now,
                    None => true,
                }
            })
            .collect()
    }
}

/// Output formats of `meshctl flows`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    /// One JSON array.
    Json,
    /// One JSON object per line (for `jq`, log shippers).
    Jsonl,
}

/// The header line of the table.
pub fn table_header() -> String {
    format!(
        "{:<15} {:<8} {:<28} {:<28} {:<10} {:<20} {:<26} {:<8} {:>7}\n",
        "TIME", "NODE", "SOURCE", "DESTINATION", "PORT", "VERDICT", "ENCRYPTED", "PEER", "PACKETS"
    )
}

/// `Dec  7 17:35:09` in UTC, as `hubble observe` prints times.
fn short_time(unix: u64) -> String {
    jiff::Timestamp::from_second(i64::try_from(unix).unwrap_or(i64::MAX))
        .map(|t| t.strftime("%b %e %H:%M:%S").to_string())
        .unwrap_or_else(|_| unix.to_string())
}

/// One table row.
pub fn table_row(f: &Flow) -> String {
    let port = match f.l4.destination_port() {
        0 => f.l4.protocol(),
        p => format!("{}/{p}", f.l4.protocol()),
    };
    let verdict = match &f.drop_reason_desc {
        Some(why) => format!("DROPPED {why}"),
        None => f.verdict.clone(),
    };
    let encrypted = if f.encryption.encrypted {
        "yes".to_string()
    } else {
        format!("no ({})", f.encryption.reason)
    };
    let peer = f.encryption.peer_node.clone().unwrap_or_else(|| "-".into());
    format!(
        "{:<15} {:<8} {:<28} {:<28} {:<10} {:<20} {:<26} {:<8} {:>7}\n",
        short_time(f.last_seen),
        f.node_name,
        f.source_name(),
        f.destination_name(),
        port,
        verdict,
        encrypted,
        peer,
        f.packets + f.pending_packets
    )
}

/// `flows` in `format` (`header`: the table's header line first).
pub fn render(flows: &[Flow], format: Format, header: bool) -> String {
    let mut out = String::new();
    match format {
        Format::Table => {
            if header {
                out.push_str(&table_header());
            }
            for f in flows {
                out.push_str(&table_row(f));
            }
        }
        Format::Json => {
            out = serde_json::to_string_pretty(flows).unwrap_or_default();
            out.push('\n');
        }
        Format::Jsonl => {
            for f in flows {
                let _ = writeln!(out, "{}", serde_json::to_string(f).unwrap_or_default());
            }
        }
    }
    out
}

/// Unix seconds `ago` before now.
pub fn since_unix(ago: Duration) -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        .saturating_sub(ago.as_secs())
}

#[cfg(test)]
pub(crate) mod tests;
