//! `MeshEncryption default`'s status, written by the active coordinator so that `kubectl get
//! meshencryptions` tells an operator whether the mesh is up (READY `2/3`, conditions `Ready` and
//! `Degraded`), as `kubectl get daemonset` does for pods.
//!
//! A node counts as ready when its MeshNode carries [`CONVERGED_LABEL`]` = "true"` and its agent's
//! last status write (the time of the agent's `status` entry in `managedFields`) is younger than
//! three of its refresh intervals ([`STATUS_INTERVAL_ANNOTATION`], at least 30 s): the coordinator
//! reads only the MeshNodes' metadata, O(N) bytes per pass, never the per-peer statuses. Every
//! Node counts towards the total: one without a MeshNode has no agent running.
//!
//! Pure functions here; the coordinator lists, calls [`summarize`] and [`next_status`], and writes
//! only when the status changed in more than its timestamps.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use kube::api::PartialObjectMeta;
use wiremesh_crds::{
    CONDITION_DEGRADED, CONDITION_READY, ConditionStatus, MeshEncryptionStatus, MeshNode,
    meshnode::{CONVERGED_LABEL, STATUS_INTERVAL_ANNOTATION},
    new_condition, set_condition,
};

/// The field manager of the agents' MeshNode writes (`nodestatus::FIELD_MANAGER`).
const AGENT_FIELD_MANAGER: &str = "wiremesh-agent";
/// Most nodes named in a condition message.
const NAMED: usize = 10;

/// Why a node does not count as ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// No MeshNode: no agent has run on the node (or not since the Node was recreated).
    NoAgent,
    /// The agent's last status write is older than three of its intervals.
    Stale { age_secs: i64 },
    /// The agent reports it has not converged.
    NotConverged,
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoAgent => f.write_str("no agent status"),
            Self::Stale { age_secs } => write!(f, "agent status {age_secs}s old"),
            Self::NotConverged => f.write_str("not converged"),
        }
    }
}

/// Ready and not-ready nodes of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Summary {
    pub ready: Vec<String>,
    pub not_ready: BTreeMap<String, NotReady>,
}

impl Summary {
    pub fn total(&self) -> usize {
        self.ready.len() + self.not_ready.len()
    }
}

/// Classifies every node in `nodes` from the MeshNodes' metadata at `now`.
pub fn summarize(
    nodes: &[String],
    meshnodes: &[PartialObjectMeta<MeshNode>],
    now: Timestamp,
) -> Summary {
    let by_name: BTreeMap<&str, &PartialObjectMeta<MeshNode>> = meshnodes
        .iter()
        .filter_map(|m| m.metadata.name.as_deref().map(|n| (n, m)))
        .collect();
    let mut summary = Summary::default();
    let mut names: Vec<&String> = nodes.iter().collect();
    names.sort();
    names.dedup();
    for node in names {
        match classify(by_name.get(node.as_str()).copied(), now) {
            None => summary.ready.push(node.clone()),
            Some(why) => {
                summary.not_ready.insert(node.clone(), why);
            }
        }
    }
    summary
}

fn classify(meshnode: Option<&PartialObjectMeta<MeshNode>>, now: Timestamp) -> Option<NotReady> {
    let Some(meta) = meshnode.map(|m| &m.metadata) else {
        return Some(NotReady::NoAgent);
    };
    let interval: i64 = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(STATUS_INTERVAL_ANNOTATION))
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let last_write = meta
        .managed_fields
        .iter()
        .flatten()
        .filter(|f| {
            f.manager.as_deref() == Some(AGENT_FIELD_MANAGER)
                && f.subresource.as_deref() == Some("status")
        })
        .filter_map(|f| f.time.as_ref().map(|t| t.0))
        .max();
    let Some(last_write) = last_write else {
        return Some(NotReady::NoAgent);
    };
    let age_secs = now.as_second() - last_write.as_second();
    if age_secs > interval.saturating_mul(3).max(30) {
        return Some(NotReady::Stale { age_secs });
    }
    let converged = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(CONVERGED_LABEL))
        .is_some_and(|v| v == "true");
    (!converged).then_some(NotReady::NotConverged)
}

/// The status to write from `summary`, keeping the transition times of `old`'s conditions whose
/// status did not change. `generation` is the MeshEncryption's `metadata.generation`.
pub fn next_status(
    old: Option<&MeshEncryptionStatus>,
    summary: &Summary,
    generation: Option<i64>,
    now: Timestamp,
) -> MeshEncryptionStatus {
    let mut status = old.cloned().unwrap_or_default();
    let ready = i32::try_from(summary.ready.len()).unwrap_or(i32::MAX);
    let total = i32::try_from(summary.total()).unwrap_or(i32::MAX);
    status.set_node_counts(ready, total);
    status.observed_generation = generation;
    let named: Vec<String> = summary
        .not_ready
        .iter()
        .take(NAMED)
        .map(|(node, why)| format!("{node} ({why})"))
        .collect();
    let more = summary.not_ready.len().saturating_sub(NAMED);
    let listed = if more > 0 {
        format!("{} and {more} more", named.join(", "))
    } else {
        named.join(", ")
    };
    let all_ready = summary.not_ready.is_empty() && total > 0;
    let (reason, message) = if all_ready {
        ("AllNodesReady", format!("{ready}/{total} nodes converged"))
    } else if total == 0 {
        ("NoNodes", "the cluster has no nodes".to_owned())
    } else {
        (
            "NodesNotReady",
            format!("{ready}/{total} nodes converged; not ready: {listed}"),
        )
    };
    let degraded = !summary.not_ready.is_empty() && !summary.ready.is_empty();
    for (type_, value, reason, message) in [
        (CONDITION_READY, all_ready, reason, message.clone()),
        (
            CONDITION_DEGRADED,
            degraded,
            if degraded {
                "NodesNotReady"
            } else {
                "AsExpected"
            },
            if degraded {
                format!("not ready: {listed}")
            } else {
                String::new()
            },
        ),
    ] {
        if let Ok(condition) = new_condition(
            type_,
            ConditionStatus::from_bool(value),
            reason,
            message,
            generation,
            now,
        ) {
            set_condition(&mut status.conditions, condition);
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time};
    use kube::core::{ObjectMeta, PartialObjectMetaExt};
    use wiremesh_crds::find_condition;

    use super::*;

    fn meshnode(name: &str, converged: bool, written: Timestamp) -> PartialObjectMeta<MeshNode> {
        ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                CONVERGED_LABEL.to_owned(),
                converged.to_string(),
            )])),
            annotations: Some(BTreeMap::from([(
                STATUS_INTERVAL_ANNOTATION.to_owned(),
                "30".to_owned(),
            )])),
            managed_fields: Some(vec![
                ManagedFieldsEntry {
                    manager: Some(AGENT_FIELD_MANAGER.to_owned()),
                    subresource: Some("status".to_owned()),
                    time: Some(Time(written)),
                    ..ManagedFieldsEntry::default()
                },
                // The object itself, applied long ago: not the heartbeat.
                ManagedFieldsEntry {
                    manager: Some(AGENT_FIELD_MANAGER.to_owned()),
                    time: Some(Time(Timestamp::UNIX_EPOCH)),
                    ..ManagedFieldsEntry::default()
                },
            ]),
            ..ObjectMeta::default()
        }
        .into_response_partial()
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("timestamp")
    }

    #[test]
    fn every_node_is_classified() {
        let nodes: Vec<String> = ["n1", "n2", "n3", "n4"].map(String::from).to_vec();
        let meshnodes = [
            meshnode("n1", true, at(0)),
            meshnode("n2", false, at(0)),
            meshnode("n3", true, at(-91)),
            // A MeshNode whose Node is gone does not count.
            meshnode("gone", true, at(0)),
        ];
        let summary = summarize(&nodes, &meshnodes, at(0));
        assert_eq!(summary.ready, ["n1"]);
        assert_eq!(
            summary.not_ready,
            BTreeMap::from([
                ("n2".to_owned(), NotReady::NotConverged),
                ("n3".to_owned(), NotReady::Stale { age_secs: 91 }),
                ("n4".to_owned(), NotReady::NoAgent),
            ])
        );
    }

    #[test]
    fn status_counts_and_conditions() {
        let nodes: Vec<String> = ["n1", "n2"].map(String::from).to_vec();
        let partial = summarize(
            &nodes,
            &[meshnode("n1", true, at(0)), meshnode("n2", false, at(0))],
            at(0),
        );
        let status = next_status(None, &partial, Some(3), at(0));
        assert_eq!(status.ready.as_deref(), Some("1/2"));
        assert_eq!((status.nodes_ready, status.nodes_total), (1, 2));
        assert_eq!(status.observed_generation, Some(3));
        let ready = find_condition(&status.conditions, CONDITION_READY).expect("Ready");
        assert_eq!(ready.status, "False");
        assert!(ready.message.contains("n2 (not converged)"), "{ready:?}");
        let degraded = find_condition(&status.conditions, CONDITION_DEGRADED).expect("Degraded");
        assert_eq!(degraded.status, "True");

        // n2 converges later: Ready turns True with a new transition time.
        let full = summarize(
            &nodes,
            &[meshnode("n1", true, at(20)), meshnode("n2", true, at(20))],
            at(20),
        );
        let next = next_status(Some(&status), &full, Some(3), at(20));
        assert_eq!(next.ready.as_deref(), Some("2/2"));
        let ready = find_condition(&next.conditions, CONDITION_READY).expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.last_transition_time.0),
            ("True", at(20))
        );
        // The same state again keeps the transition time: nothing to write.
        let again = next_status(Some(&next), &full, Some(3), at(40));
        assert_eq!(again, next);
    }

    #[test]
    fn many_nodes_are_named_up_to_a_limit() {
        let nodes: Vec<String> = (0..25).map(|i| format!("n{i:02}")).collect();
        let summary = summarize(&nodes, &[], at(0));
        let status = next_status(None, &summary, None, at(0));
        let ready = find_condition(&status.conditions, CONDITION_READY).expect("Ready");
        assert!(ready.message.ends_with("and 15 more"), "{}", ready.message);
        assert_eq!(status.ready.as_deref(), Some("0/25"));
    }
}
