//! Telling operators about remote nodes the mesh skips: a Warning Event on the offending Node
//! (events.k8s.io/v1 through kube's Recorder) and a metric. Reconciles run often; a broken node
//! must not produce an Event per pass, so [`RejectionTracker`] reports a problem only when it
//! appears or changes, and forgets it once the node is fixed (a later breakage is news again).
//!
//! Every agent sees the same bad remote object; only one of them reports it (issue 13, finding
//! 13): [`is_emitter`] picks the same agent on every node. Events are published by a background
//! task ([`EventSender`]), so a slow API server never holds up a reconcile.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};

/// The controller name in the Events' `reportingController`.
pub const REPORTING_CONTROLLER: &str = "wiremesh.io/mesh-agent";

/// Event `action` of a skipped node or a dropped prefix.
const ACTION: &str = "SkipPeer";

/// Event `action` of a peer whose stale endpoint was replaced by its node address.
const ACTION_STALE_ENDPOINT: &str = "UseNodeAddress";

/// Kinds of problem, for the metric to pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProblemKind {
    /// The node's annotations are invalid or its key collides: the whole node is skipped.
    Rejected,
    /// One pod prefix of the node overlaps another's and was dropped.
    PrefixConflict,
    /// The node's endpoint annotation names an address it no longer has (its underlay address
    /// changed, its agent has not republished yet): it stays a peer, sent to at its node
    /// address. Not an invalid annotation: a Normal Event, no `invalid_annotations` count.
    StaleEndpoint,
}

impl ProblemKind {
    /// The Event type and `action` of a problem of this kind.
    fn event(self) -> (EventType, &'static str) {
        match self {
            Self::Rejected | Self::PrefixConflict => (EventType::Warning, ACTION),
            Self::StaleEndpoint => (EventType::Normal, ACTION_STALE_ENDPOINT),
        }
    }
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
    reported: BTreeMap<ProblemKey, String>,
}

/// What makes two problems the same one: node, kind, reason and, for a pod prefix, the prefix's
/// own message (one node may have several refused claims with the same reason, each its own
/// problem; a rejected node has one reason at a time, whose message may change).
type ProblemKey = (String, ProblemKind, String, String);

fn key_of(problem: &Problem) -> ProblemKey {
    let subject = match problem.kind {
        ProblemKind::Rejected | ProblemKind::StaleEndpoint => String::new(),
        ProblemKind::PrefixConflict => problem.message.clone(),
    };
    (
        problem.node.clone(),
        problem.kind,
        problem.reason.clone(),
        subject,
    )
}

impl RejectionTracker {
    /// Takes the full list of current problems and returns those not reported before (new, or with
    /// a different message). Problems that are gone are forgotten.
    pub fn observe(&mut self, current: &[Problem]) -> Vec<Problem> {
        self.observe_changes(current).0
    }

    /// [`RejectionTracker::observe`], also returning the (node, kind, reason) of problems that
    /// were reported before and are gone now (fixed, or the node deleted).
    pub fn observe_changes(
        &mut self,
        current: &[Problem],
    ) -> (Vec<Problem>, Vec<(String, ProblemKind, String)>) {
        let mut fresh = Vec::new();
        let mut next = BTreeMap::new();
        for problem in current {
            let key = key_of(problem);
            if self.reported.get(&key) != Some(&problem.message) {
                fresh.push(problem.clone());
            }
            next.insert(key, problem.message.clone());
        }
        let gone = self
            .reported
            .keys()
            .filter(|k| !next.contains_key(*k))
            .map(|(node, kind, reason, _)| (node.clone(), *kind, reason.clone()))
            .collect();
        self.reported = next;
        (fresh, gone)
    }
}

/// Whether this agent (`own`) is the one that reports problems about `concerned`: the
/// lowest-named node other than `concerned` among this node and `healthy` (the nodes this agent
/// peers with). Every agent with the same caches computes the same answer, so each bad object
/// gets one Event cluster-wide instead of one per agent; the node at fault never reports itself
/// (its agent may be the one that is broken).
pub fn is_emitter<'a>(
    own: &'a str,
    concerned: &str,
    healthy: impl IntoIterator<Item = &'a str>,
) -> bool {
    let candidates: BTreeSet<&str> = healthy
        .into_iter()
        .chain(std::iter::once(own))
        .filter(|n| *n != concerned)
        .collect();
    candidates.first() == Some(&own)
}

/// Most Events waiting for the background publisher; more are dropped (and logged).
const EVENT_QUEUE: usize = 256;

/// The reconciler's handle on the background Event publisher. See the module docs.
#[derive(Clone)]
pub struct EventSender {
    queue: tokio::sync::mpsc::Sender<(Problem, Option<String>)>,
}

impl EventSender {
    /// Spawns the publisher task on the current runtime; it ends when every sender is dropped.
    pub fn spawn(events: NodeEvents, timeout: std::time::Duration) -> Self {
        let (queue, mut rx) = tokio::sync::mpsc::channel::<(Problem, Option<String>)>(EVENT_QUEUE);
        tokio::spawn(async move {
            while let Some((problem, uid)) = rx.recv().await {
                match tokio::time::timeout(timeout, events.publish(&problem, uid)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(node = %problem.node, %error, "could not record Event");
                    }
                    Err(_) => {
                        tracing::warn!(node = %problem.node, "recording the Event timed out");
                    }
                }
            }
        });
        Self { queue }
    }

    /// Queues an Event; never waits.
    pub fn send(&self, problem: Problem, uid: Option<String>) {
        if let Err(error) = self.queue.try_send((problem, uid)) {
            tracing::warn!(%error, "Event queue full or closed; Event dropped");
        }
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

    /// Records `problem` on its Node (`uid` when known makes `kubectl describe node` find it): a
    /// Warning, or Normal for a stale endpoint the mesh followed ([`ProblemKind::StaleEndpoint`]).
    pub async fn publish(&self, problem: &Problem, uid: Option<String>) -> Result<(), kube::Error> {
        let reference = ObjectReference {
            api_version: Some("v1".to_string()),
            kind: Some("Node".to_string()),
            name: Some(problem.node.clone()),
            uid,
            ..ObjectReference::default()
        };
        let (type_, action) = problem.kind.event();
        let event = Event {
            type_,
            reason: problem.reason.clone(),
            note: Some(truncate(&problem.message, 1000)),
            action: action.to_string(),
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
    fn exactly_one_agent_reports_a_bad_node() {
        // Issue 13, finding 13: on main every agent published the Event (N copies).
        let healthy = ["node-1", "node-2", "node-4"];
        let emitters: Vec<&str> = ["node-1", "node-2", "node-4"]
            .into_iter()
            .filter(|own| {
                let peers = healthy.iter().copied().filter(|n| n != own);
                is_emitter(own, "node-3", peers)
            })
            .collect();
        assert_eq!(emitters, ["node-1"]);
        // The node at fault is never its own reporter; the next one is.
        let peers = ["node-2", "node-3"];
        assert!(!is_emitter("node-1", "node-1", peers));
        assert!(is_emitter("node-2", "node-1", ["node-1", "node-3"]));
    }

    #[test]
    fn several_refused_claims_of_one_node_with_one_reason_are_each_reported_once() {
        // Two pods on n2 outside the cluster's pod CIDRs: same node, kind and reason. Keyed
        // without the prefix, each pass reported one of them again (an Event per pass).
        let claim = |message: &str| Problem {
            node: "n2".into(),
            kind: ProblemKind::PrefixConflict,
            reason: "PodAddressOutsideClusterPodCIDRs".into(),
            message: message.into(),
        };
        let both = [
            claim("10.99.0.5/32 refused"),
            claim("10.213.0.1/32 refused"),
        ];
        let mut tracker = RejectionTracker::default();
        assert_eq!(tracker.observe(&both).len(), 2);
        for _ in 0..3 {
            assert!(tracker.observe(&both).is_empty());
        }
    }

    #[test]
    fn fixed_problems_are_returned_as_gone() {
        let mut tracker = RejectionTracker::default();
        let bad = problem("n3", "InvalidPublicKeyBase64", "bad base64");
        let (fresh, gone) = tracker.observe_changes(std::slice::from_ref(&bad));
        assert_eq!((fresh.len(), gone.len()), (1, 0));
        let (fresh, gone) = tracker.observe_changes(&[]);
        assert!(fresh.is_empty());
        assert_eq!(
            gone,
            [(
                "n3".to_string(),
                ProblemKind::Rejected,
                "InvalidPublicKeyBase64".to_string()
            )]
        );
    }

    #[test]
    fn a_stale_endpoint_is_a_normal_event_not_a_skipped_peer() {
        assert_eq!(
            ProblemKind::StaleEndpoint.event(),
            (EventType::Normal, "UseNodeAddress")
        );
        for kind in [ProblemKind::Rejected, ProblemKind::PrefixConflict] {
            assert_eq!(kind.event(), (EventType::Warning, "SkipPeer"));
        }
        // Reported once per node until its address moves again (a new message).
        let stale = |message: &str| Problem {
            node: "n3".into(),
            kind: ProblemKind::StaleEndpoint,
            reason: "StaleEndpoint".into(),
            message: message.into(),
        };
        let mut tracker = RejectionTracker::default();
        assert_eq!(tracker.observe(&[stale("10.0.0.3 -> 10.0.0.203")]).len(), 1);
        assert!(
            tracker
                .observe(&[stale("10.0.0.3 -> 10.0.0.203")])
                .is_empty()
        );
        assert_eq!(
            tracker.observe(&[stale("10.0.0.203 -> 10.0.0.204")]).len(),
            1
        );
    }

    #[test]
    fn notes_are_truncated_on_char_boundaries() {
        let long = "é".repeat(600);
        let short = truncate(&long, 1000);
        assert!(short.len() <= 1003);
        assert!(short.ends_with("..."));
    }
}
