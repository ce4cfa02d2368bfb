//! The two-phase key rotation of DESIGN.md as pure logic, in two halves that share no memory:
//!
//! - [`controller::evaluate`] computes the KeyRotation status (phase, per-phase counts, stuck
//!   nodes) from the recorded status, the marks observed on the Nodes and the time spent in the
//!   current phase. Only the controller moves the phase; it is the one place that decides
//!   "everyone is prepared, switch now" and "too slow, fail".
//! - [`agent::plan`] computes the one next thing a node's agent must do (a keystore step or an
//!   annotation patch) from its keystore, its own Node's annotations, the KeyRotation phase and
//!   the peers it sees. The agent runs it after every watch event and after each step it takes,
//!   so a restart at any point resumes from what is on disk and in the API.
//!
//! # Protocol
//! A rotation has a frozen [`RotationPlan`]: the *participants* (every node that had joined the
//! mesh when it started) and the *rotating* nodes among them (those the nodeSelector picked).
//! Each participant walks through the steps of its `wiremesh.io/rotation` mark:
//!
//! | phase (controller) | rotating node | every participant | phase ends when |
//! |---|---|---|---|
//! | Preparing | generate K', persist it, publish `next-public-key` | sees every rotating peer's K' (so it accepts them), marks `prepared` | all marked `prepared` |
//! | Switching | promote K' (K kept as *previous* for answering), publish `public-key = K'`, generation + 1, mark `switched` in one patch | non-rotating: mark `switched` | all marked `switched` |
//! | Retiring | | sees every rotating peer switched (so it initiates only to new keys), marks `retired` | all marked `retired` |
//! | Complete | drops K once every participant is `retired` (or the phase is Complete) | | |
//!
//! So a node never initiates with K' before every participant accepts K', and never drops K
//! while a participant may still initiate to it: no handshake is lost.
//!
//! Failure (a phase timeout or an abort) before Retiring rolls back: rotating nodes restore K,
//! discard K', publish K again (generation + 1: generations only grow) and every participant
//! marks `aborted`. A failure in Retiring keeps the new keys: every rotating node already
//! published K', so going back would be a second rotation.
//!
//! Nodes removed mid-rotation are dropped from every barrier. Nodes that join mid-rotation are not
//! participants; they read the current keys like any new node.

use std::{collections::BTreeSet, fmt, str::FromStr};

use crate::annotations::{RotationStep, is_dns1123_subdomain};

pub mod agent;
pub mod controller;
#[cfg(test)]
mod simulation;
#[cfg(test)]
mod tests;

/// The phase of a KeyRotation (its `status.phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RotationPhase {
    /// Created, waiting for the rotation before it to end.
    Pending,
    /// Nodes generate and announce their next keys.
    Preparing,
    /// Rotating nodes switch to their next keys.
    Switching,
    /// Every node moves to the new keys; then old identities are dropped.
    Retiring,
    /// Done: every participant retired the old keys.
    Complete,
    /// A phase timed out or the rotation was aborted; see [`Failure`].
    Failed,
}

impl RotationPhase {
    /// Every phase, in order.
    pub const ALL: [RotationPhase; 6] = [
        Self::Pending,
        Self::Preparing,
        Self::Switching,
        Self::Retiring,
        Self::Complete,
        Self::Failed,
    ];

    /// The spelling in `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Preparing => "Preparing",
            Self::Switching => "Switching",
            Self::Retiring => "Retiring",
            Self::Complete => "Complete",
            Self::Failed => "Failed",
        }
    }

    /// Preparing, Switching or Retiring: nodes are acting on it.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Preparing | Self::Switching | Self::Retiring)
    }

    /// Complete or Failed.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Complete | Self::Failed)
    }

    /// The step every participant must reach for an active phase to end.
    pub fn target_step(self) -> Option<RotationStep> {
        match self {
            Self::Preparing => Some(RotationStep::Prepared),
            Self::Switching => Some(RotationStep::Switched),
            Self::Retiring => Some(RotationStep::Retired),
            _ => None,
        }
    }

    /// Whether a failure in this phase rolls every node back to its old key. Only a failure in
    /// Retiring keeps the new keys.
    pub fn failure_keeps_old_keys(self) -> bool {
        self != Self::Retiring
    }

    fn next(self) -> Self {
        match self {
            Self::Pending => Self::Preparing,
            Self::Preparing => Self::Switching,
            Self::Switching => Self::Retiring,
            Self::Retiring | Self::Complete => Self::Complete,
            Self::Failed => Self::Failed,
        }
    }
}

impl fmt::Display for RotationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RotationPhase {
    type Err = RotationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| RotationError::UnknownPhase(s.chars().take(32).collect()))
    }
}

/// Errors building rotation inputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotationError {
    /// The KeyRotation name cannot appear in a rotation mark.
    #[error("rotation name {0:?} is not a DNS-1123 subdomain")]
    InvalidName(String),
    /// `status.phase` holds something else.
    #[error("unknown rotation phase {0:?}")]
    UnknownPhase(String),
}

/// Who takes part in one rotation, frozen when it leaves Pending and stored in its status, so
/// every agent and a restarted controller agree on the barriers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationPlan {
    name: String,
    participants: BTreeSet<String>,
    rotating: BTreeSet<String>,
}

impl RotationPlan {
    /// A plan for the rotation `name`: every node that had joined the mesh takes part; the
    /// selected ones among them rotate (selected nodes that have not joined have no key to rotate).
    ///
    /// `name` is what the marks carry, so it must never be reused: marks of a deleted KeyRotation
    /// stay on the Nodes, and a new object with the same name would read them as progress. The
    /// controller should use the object's name plus a short UID suffix (`weekly.3f2a9c1d`) and
    /// store it in the status with the node lists.
    pub fn new<J, S>(name: &str, joined: J, selected: S) -> Result<Self, RotationError>
    where
        J: IntoIterator,
        J::Item: Into<String>,
        S: IntoIterator,
        S::Item: Into<String>,
    {
        if !is_dns1123_subdomain(name) {
            return Err(RotationError::InvalidName(name.chars().take(64).collect()));
        }
        let participants: BTreeSet<String> = joined.into_iter().map(Into::into).collect();
        let rotating = selected
            .into_iter()
            .map(Into::into)
            .filter(|n| participants.contains(n))
            .collect();
        Ok(Self {
            name: name.to_string(),
            participants,
            rotating,
        })
    }

    /// The KeyRotation name (also the name in every mark).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every node that must acknowledge each step.
    pub fn participants(&self) -> &BTreeSet<String> {
        &self.participants
    }

    /// The nodes whose key changes.
    pub fn rotating(&self) -> &BTreeSet<String> {
        &self.rotating
    }

    /// Whether `node` must acknowledge the steps.
    pub fn is_participant(&self, node: &str) -> bool {
        self.participants.contains(node)
    }

    /// Whether `node`'s key changes.
    pub fn is_rotating(&self, node: &str) -> bool {
        self.rotating.contains(node)
    }
}

/// Why a rotation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// Some participants did not reach the phase's step in time.
    Timeout,
    /// Someone asked to stop it.
    Aborted,
    /// No selected node has joined the mesh, or all of them were removed.
    NoNodes,
}

impl FailureReason {
    /// The `reason` of the Failed condition (CamelCase).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "PhaseTimeout",
            Self::Aborted => "Aborted",
            Self::NoNodes => "NoNodesToRotate",
        }
    }
}

/// How a rotation failed; stored in its status next to `phase: Failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The phase that failed; decides which keys stay ([`RotationPhase::failure_keeps_old_keys`]).
    pub during: RotationPhase,
    /// Why.
    pub reason: FailureReason,
    /// Participants that had not reached the phase's step, sorted.
    pub stuck: Vec<String>,
}

impl Failure {
    /// Whether every node goes back to the key it had before the rotation.
    pub fn keeps_old_keys(&self) -> bool {
        self.during.failure_keeps_old_keys()
    }

    /// A one-line message for the Failed condition, naming at most ten stuck nodes.
    pub fn message(&self, timeout: std::time::Duration) -> String {
        let keys = if self.keeps_old_keys() {
            "old keys stay in force"
        } else {
            "new keys stay in force"
        };
        let what = match self.reason {
            FailureReason::Timeout => format!(
                "{} did not finish within {}s",
                self.during,
                timeout.as_secs()
            ),
            FailureReason::Aborted => format!("aborted during {}", self.during),
            FailureReason::NoNodes => "no selected node is in the mesh".to_string(),
        };
        if self.stuck.is_empty() {
            return format!("{what}; {keys}");
        }
        let shown: Vec<&str> = self.stuck.iter().take(10).map(String::as_str).collect();
        let more = self.stuck.len().saturating_sub(shown.len());
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        format!("{what}; waiting for {}{tail}; {keys}", shown.join(", "))
    }
}
