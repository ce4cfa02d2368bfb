//! Telling operators about remote nodes the mesh skips: a Warning Event on the offending Node
//! (events.k8s.io/v1 through kube's Recorder) and a metric. Reconciles run often; a broken node
//! must not produce an Event per pass, so [`RejectionTracker`] reports a problem only when it
//! appears or changes, and forgets it once the node is fixed (a later breakage is news again).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};

/// The controller name in the Events' `reportingController`.
pub const REPORTING_CONTROLLER: &str = "wiremesh.io/mesh-agent";

/// Event `action` of a skipped node.
const ACTION: &str = "SkipPeer";

/// Kinds of problem, for the metric to pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProblemKind {
    /// The node's annotations are invalid or its key collides: the whole node is skipped.
    Rejected,
    /// One pod prefix of the node overlaps another's and was dropped.
    PrefixConflict,
}

/// One problem with a remote node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub node: String,
    pub kind: ProblemKind,
    /// CamelCase Event reason.
    pub reason: String,
    /// Human-readable description (no key material: public keys and annotation values only).
    pub message: String,
}

/// Remembers which problems were already reported. See the module docs.
#[derive(Debug, Default)]
pub struct RejectionTracker {
    reported: BTreeMap<(String, ProblemKind, String), String>,
}

impl RejectionTracker {
    /// Takes the full list of current problems and returns those not reported before (new, or with
    /// a different message). Problems that are gone are forgotten.
    pub fn observe(&mut self, current: &[Problem]) -> Vec<Problem> {
        let mut fresh = Vec::new();
        let mut next = BTreeMap::new();
        for problem in current {
            let key = (problem.node.clone(), problem.kind, problem.reason.clone());
            if self.reported.get(&key) != Some(&problem.message) {
                fresh.push(problem.clone());
            }
            next.insert(key, problem.message.clone());
        }
        self.reported = next;
        fresh
    }
}

/// Publishes Warning Events about Nodes.
pub struct NodeEvents {
    recorder: Recorder,
}

impl NodeEvents {
    /// `instance` names this agent in `reportingInstance` (the node name).
    pub fn new(client: Client, instance: &str) -> Self {
        Self {
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: REPORTING_CONTROLLER.to_string(),
                    instance: Some(format!("mesh-agent-{instance}")),
                },
            ),
        }
    }

    /// Records `problem` on its Node (`uid` when known makes `kubectl describe node` find it).
    pub async fn publish(&self, problem: &Problem, uid: Option<String>) -> Result<(), kube::Error> {
        let reference = ObjectReference {
            api_version: Some("v1".to_string()),
            kind: Some("Node".to_string()),
            name: Some(problem.node.clone()),
            uid,
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: problem.reason.clone(),
            note: Some(truncate(&problem.message, 1000)),
            action: ACTION.to_string(),
            secondary: None,
        };
        self.recorder.publish(&event, &reference).await
    }

    /// Records a Warning about any object; `action` says what the agent did about it.
    pub async fn warn(
        &self,
        reference: &ObjectReference,
        reason: &str,
        note: &str,
        action: &str,
    ) -> Result<(), kube::Error> {
        self.publish_on(reference, EventType::Warning, reason, note, action)
            .await
    }

    /// Records an Event of `type_` (e.g. Normal: which datapath the agent selected) about any
    /// object.
    pub async fn publish_on(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
        action: &str,
    ) -> Result<(), kube::Error> {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(truncate(note, 1000)),
            action: action.to_string(),
            secondary: None,
        };
        self.recorder.publish(&event, reference).await
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(node: &str, reason: &str, message: &str) -> Problem {
        Problem {
            node: node.into(),
            kind: ProblemKind::Rejected,
            reason: reason.into(),
            message: message.into(),
        }
    }

    #[test]
    fn a_problem_is_reported_once_until_it_changes_or_returns() {
        let mut tracker = RejectionTracker::default();
        let bad = problem("n3", "InvalidPublicKeyBase64", "bad base64");
        assert_eq!(
            tracker.observe(std::slice::from_ref(&bad)),
            vec![bad.clone()]
        );
        for _ in 0..5 {
            assert!(tracker.observe(std::slice::from_ref(&bad)).is_empty());
        }
        let changed = problem("n3", "InvalidPublicKeyBase64", "other bad base64");
        assert_eq!(
            tracker.observe(std::slice::from_ref(&changed)),
            vec![changed.clone()]
        );
        // Fixed, then broken again: reported again.
        assert!(tracker.observe(&[]).is_empty());
        assert_eq!(
            tracker.observe(std::slice::from_ref(&changed)),
            vec![changed]
        );
        // A second node is independent.
        let other = problem("n4", "MissingEndpoint", "no endpoint");
        let fresh = tracker.observe(&[
            problem("n3", "InvalidPublicKeyBase64", "other bad base64"),
            other.clone(),
        ]);
        assert_eq!(fresh, vec![other]);
    }

    #[test]
    fn notes_are_truncated_on_char_boundaries() {
        let long = "é".repeat(600);
        let short = truncate(&long, 1000);
        assert!(short.len() <= 1003);
        assert!(short.ends_with("..."));
    }
}
