//! `KeyRotation` (`keyrotations.wiremesh.io/v1alpha1`, cluster-scoped): one rotation of the static
//! WireGuard keys of the selected nodes. Creating one starts the two-phase rotation (prepare,
//! switch, retire); its status is the progress an operator watches with
//! `kubectl get keyrotations`. The spec is immutable: a different rotation is a new object.

use std::time::Duration;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time},
    jiff::Timestamp,
};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::{self, DurationError, Zero};

/// Per-phase timeout when `phaseTimeout` is not set.
pub const DEFAULT_PHASE_TIMEOUT: &str = "10m";
/// Shortest per-phase timeout the API accepts.
pub const MIN_PHASE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `reason` the API accepts.
pub const MAX_REASON_LEN: usize = 256;

/// Condition type: the rotation is moving through its phases.
pub const CONDITION_PROGRESSING: &str = "Progressing";
/// Condition type: every selected node switched to its new key and retired the old one.
pub const CONDITION_COMPLETE: &str = "Complete";
/// Condition type: the rotation stopped; the message names the nodes that did not progress. The
/// old keys stay in force.
pub const CONDITION_FAILED: &str = "Failed";

/// A request to rotate the static keys of the selected nodes.
#[allow(
    clippy::duplicated_attributes,
    reason = "printcolumn(..) entries repeat type_ and priority by design"
)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wiremesh.io",
    version = "v1alpha1",
    kind = "KeyRotation",
    plural = "keyrotations",
    singular = "keyrotation",
    shortname = "keyrot",
    category = "wiremesh",
    status = "KeyRotationStatus",
    derive = "PartialEq",
    doc = "One rotation of the static WireGuard keys of the selected nodes (prepare, switch, retire). The spec is immutable.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Preparing, Switching, Retiring, Complete or Failed"
    ),
    printcolumn(
        name = "Done",
        type_ = "string",
        json_path = ".status.progress",
        description = "nodes done with the current phase / selected nodes"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".spec.reason",
        priority = 1,
        description = "why the keys are rotated"
    ),
    printcolumn(
        name = "Failed",
        type_ = "string",
        json_path = ".status.failedNodes",
        priority = 1,
        description = "nodes that did not progress in time"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf")
    .message("KeyRotation spec is immutable: create a new KeyRotation instead"))]
pub struct KeyRotationSpec {
    /// Nodes whose keys are rotated. Empty selects every node. The selection is fixed when the
    /// rotation starts; nodes that join later keep their key.
    #[serde(default)]
    pub node_selector: LabelSelector,

    /// Why the keys are rotated ("periodic", "suspected compromise", a ticket number); shown in
    /// the compliance report's rotation history.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub reason: String,

    /// How long a phase may wait for a node before the rotation fails with that node named, as a
    /// Go duration. At least 10s.
    #[serde(default = "default_phase_timeout")]
    #[schemars(length(max = 32), regex(pattern = duration::GO_DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10s')")
        .message("phaseTimeout must be at least 10s"))]
    pub phase_timeout: String,

    /// Emergency rotation of a compromised key: peers stop accepting the selected nodes' old keys
    /// as soon as the new ones are announced (no overlap), accepting the packets this loses.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoke_immediately: bool,
}

/// Annotation on a KeyRotation asking the coordinator to stop it (`meshctl rotate --abort`). The
/// spec is immutable, so the request is metadata; its value is free text (who asked, when).
pub const ABORT_ANNOTATION: &str = "wiremesh.io/abort";

/// Where a rotation stands. Moves forward only: Pending -> Preparing -> Switching -> Retiring ->
/// Complete, or to Failed from any phase before Complete.
#[derive(
    Serialize,
    Deserialize,
    JsonSchema,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
pub enum RotationPhase {
    /// Accepted, not started.
    #[default]
    Pending,
    /// Selected nodes generate and publish their next key; peers start accepting it.
    Preparing,
    /// Selected nodes initiate with the new key and publish it as current.
    Switching,
    /// Sessions have rekeyed; old identities are dropped.
    Retiring,
    /// Every selected node runs on its new key only.
    Complete,
    /// Stopped; the old keys stay in force.
    Failed,
}

impl RotationPhase {
    /// The wire form, as shown by `kubectl get`.
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

    /// Complete and Failed: nothing more happens to this rotation.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Complete | Self::Failed)
    }
}

impl std::fmt::Display for RotationPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Progress of a rotation, written by the rotation controller.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyRotationStatus {
    /// Current phase.
    #[serde(default)]
    pub phase: RotationPhase,

    /// The name in every node's `wiremesh.io/rotation` mark for this rotation:
    /// `<metadata.name>.<first 8 hex digits of metadata.uid>`, so that marks left by a deleted
    /// rotation of the same name are never read as progress. Fixed when it leaves Pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_id: Option<String>,

    /// Every node of the mesh when the rotation started (a valid public key published); each
    /// acknowledges every step. Fixed when it leaves Pending, sorted.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub participants: Vec<String>,

    /// The participants whose keys change (those the nodeSelector matched), fixed when it leaves
    /// Pending, sorted.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub selected_nodes: Vec<String>,

    /// Number of participants that still exist.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub nodes_total: i32,

    /// Participants that announced their next identity and accept everyone's.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub nodes_prepared: i32,

    /// Participants that send to every peer under its new identity.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub nodes_switched: i32,

    /// Participants that no longer use the old identities.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub nodes_retired: i32,

    /// Nodes done with the current phase over selected nodes as text ("2/3"), shown by
    /// `kubectl get`. For a failed rotation: the phase it failed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,

    /// Nodes that did not progress within the phase timeout (set when the phase is Failed),
    /// sorted.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub failed_nodes: Vec<String>,

    /// For a Failed rotation: the phase that failed. A failure before Retiring rolls every node
    /// back to its old key; a failure in Retiring keeps the new keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_during: Option<RotationPhase>,

    /// When the rotation left Pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the current phase began; the phase timeout counts from here, also across restarts
    /// of the controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_start_time: Option<Time>,

    /// When the rotation reached Complete or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// Current state in the Kubernetes condition conventions (types `Progressing`, `Complete`,
    /// `Failed`).
    #[serde(default)]
    #[schemars(schema_with = "crate::conditions::conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// A spec field that the schema accepts but that cannot be used as written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("KeyRotation spec.phaseTimeout {:?}: {source}", crate::duration::shown(.value))]
    PhaseTimeout {
        value: String,
        #[source]
        source: DurationError,
    },
    #[error("KeyRotation spec.phaseTimeout {:?} is shorter than the minimum of 10s", crate::duration::shown(.value))]
    PhaseTimeoutTooShort { value: String },
}

impl Default for KeyRotationSpec {
    /// Every node, no reason, the default phase timeout: what the API server makes of `spec: {}`.
    fn default() -> Self {
        Self {
            node_selector: LabelSelector::default(),
            reason: String::new(),
            phase_timeout: default_phase_timeout(),
            revoke_immediately: false,
        }
    }
}

impl KeyRotationSpec {
    /// The per-phase timeout, checked by the same rules as the API server applies.
    pub fn phase_timeout(&self) -> Result<Duration, SpecError> {
        duration::parse_spec_duration(
            &self.phase_timeout,
            MIN_PHASE_TIMEOUT,
            Zero::Rejected,
            |value, source| SpecError::PhaseTimeout { value, source },
            |value| SpecError::PhaseTimeoutTooShort { value },
        )
    }
}

impl KeyRotationStatus {
    /// Moves to `phase` at `now`: stamps `phaseStartTime`, `startTime` on leaving Pending,
    /// `completionTime` on reaching Complete or Failed, and refreshes `progress`. Setting the
    /// phase it already has changes nothing and returns `false`.
    pub fn set_phase(&mut self, phase: RotationPhase, now: Timestamp) -> bool {
        if self.phase == phase {
            return false;
        }
        self.phase = phase;
        self.phase_start_time = Some(Time(now));
        if phase != RotationPhase::Pending && self.start_time.is_none() {
            self.start_time = Some(Time(now));
        }
        if phase.is_terminal() {
            self.completion_time = Some(Time(now));
        }
        self.refresh_progress();
        true
    }

    /// Sets the per-phase node counts and refreshes `progress`.
    pub fn set_node_counts(&mut self, total: i32, prepared: i32, switched: i32, retired: i32) {
        self.nodes_total = total;
        self.nodes_prepared = prepared;
        self.nodes_switched = switched;
        self.nodes_retired = retired;
        self.refresh_progress();
    }

    /// Nodes done with the phase the rotation is in. For a failed rotation: the phase it failed
    /// in, the first one not every node finished.
    pub fn nodes_done(&self) -> i32 {
        match self.phase {
            RotationPhase::Pending => 0,
            RotationPhase::Preparing => self.nodes_prepared,
            RotationPhase::Switching => self.nodes_switched,
            RotationPhase::Retiring | RotationPhase::Complete => self.nodes_retired,
            RotationPhase::Failed => {
                if self.nodes_prepared < self.nodes_total {
                    self.nodes_prepared
                } else if self.nodes_switched < self.nodes_total {
                    self.nodes_switched
                } else {
                    self.nodes_retired
                }
            }
        }
    }

    /// Recomputes the `progress` text from the phase and the counts.
    pub fn refresh_progress(&mut self) {
        self.progress = Some(format!("{}/{}", self.nodes_done(), self.nodes_total));
    }
}

fn default_phase_timeout() -> String {
    DEFAULT_PHASE_TIMEOUT.to_owned()
}

#[cfg(test)]
mod tests;
