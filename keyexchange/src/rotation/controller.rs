//! The controller half of the rotation: the KeyRotation status as a function of the recorded
//! status, the participants' marks and the time spent in the current phase. No clock, no memory:
//! a restarted controller recomputes the same answer from the same status and Nodes.

use std::{collections::BTreeMap, time::Duration};

use super::{Failure, FailureReason, RotationPhase, RotationPlan};
use crate::annotations::RotationStep;

/// What the controller knows when it evaluates one KeyRotation.
#[derive(Debug, Clone)]
pub struct ControllerInput<'a> {
    /// The frozen plan (from status; for a Pending rotation, the plan it would start with now).
    pub plan: &'a RotationPlan,
    /// `status.phase` as recorded.
    pub phase: RotationPhase,
    /// Time since the recorded phase began (now - the phase's transition time).
    pub elapsed_in_phase: Duration,
    /// How long each active phase may take.
    pub phase_timeout: Duration,
    /// The operator asked to stop (e.g. an abort annotation on the KeyRotation).
    pub abort_requested: bool,
    /// Another KeyRotation is active: this one stays Pending. Rotations run one at a time.
    pub another_rotation_active: bool,
    /// Every Node that exists now, with its step in *this* rotation (`None`: no mark for it).
    /// Participants missing here were removed.
    pub marks: &'a BTreeMap<String, Option<RotationStep>>,
}

/// Node counts for the status (present participants only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PhaseCounts {
    /// Participants that still exist.
    pub total: usize,
    /// Rotating nodes that still exist.
    pub rotating: usize,
    /// Participants at `prepared` or later.
    pub prepared: usize,
    /// Participants at `switched` or later.
    pub switched: usize,
    /// Participants at `retired`.
    pub retired: usize,
    /// Participants that rolled back after a failure.
    pub aborted: usize,
}

impl PhaseCounts {
    /// Nodes done with `phase` (the "done" of the `done/total` printer column).
    pub fn done(&self, phase: RotationPhase) -> usize {
        match phase {
            RotationPhase::Pending => 0,
            RotationPhase::Preparing => self.prepared,
            RotationPhase::Switching => self.switched,
            RotationPhase::Retiring | RotationPhase::Complete => self.retired,
            RotationPhase::Failed => self.aborted,
        }
    }
}

/// The status to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerOutcome {
    /// The phase to record.
    pub phase: RotationPhase,
    /// True when `phase` differs from the input: record a new transition time (the elapsed time
    /// of a new phase starts at zero).
    pub changed: bool,
    /// Set when this evaluation moved the rotation to Failed; store it in the status.
    pub failure: Option<Failure>,
    /// Counts over the participants that still exist.
    pub counts: PhaseCounts,
    /// Participants that no longer exist, sorted.
    pub removed: Vec<String>,
    /// Present participants not yet at the step of `phase`, sorted (empty when not active).
    pub waiting_on: Vec<String>,
}

/// Computes the next status. Phases only move forward; several may be crossed at once (a
/// restarted controller finding every node already retired goes straight to Complete).
pub fn evaluate(input: &ControllerInput<'_>) -> ControllerOutcome {
    let plan = input.plan;
    let present: BTreeMap<&str, Option<RotationStep>> = plan
        .participants()
        .iter()
        .filter_map(|n| input.marks.get(n).map(|step| (n.as_str(), *step)))
        .collect();
    let removed: Vec<String> = plan
        .participants()
        .iter()
        .filter(|n| !input.marks.contains_key(*n))
        .cloned()
        .collect();
    let reached = |step: RotationStep| {
        present
            .values()
            .filter(|s| s.is_some_and(|s| s.reached(step)))
            .count()
    };
    let counts = PhaseCounts {
        total: present.len(),
        rotating: plan
            .rotating()
            .iter()
            .filter(|n| present.contains_key(n.as_str()))
            .count(),
        prepared: reached(RotationStep::Prepared),
        switched: reached(RotationStep::Switched),
        retired: reached(RotationStep::Retired),
        aborted: present
            .values()
            .filter(|s| **s == Some(RotationStep::Aborted))
            .count(),
    };
    let waiting = |phase: RotationPhase| -> Vec<String> {
        let Some(target) = phase.target_step() else {
            return Vec::new();
        };
        present
            .iter()
            .filter(|(_, s)| !s.is_some_and(|s| s.reached(target)))
            .map(|(n, _)| n.to_string())
            .collect()
    };

    let mut phase = input.phase;
    let mut failure = None;
    let mut elapsed = input.elapsed_in_phase;
    loop {
        match phase {
            RotationPhase::Pending => {
                if input.abort_requested {
                    failure = Some(fail(phase, FailureReason::Aborted, Vec::new()));
                    phase = RotationPhase::Failed;
                } else if input.another_rotation_active {
                    break;
                } else if counts.rotating == 0 {
                    failure = Some(fail(phase, FailureReason::NoNodes, Vec::new()));
                    phase = RotationPhase::Failed;
                } else {
                    phase = phase.next();
                    elapsed = Duration::ZERO;
                    continue;
                }
                break;
            }
            RotationPhase::Preparing | RotationPhase::Switching | RotationPhase::Retiring => {
                let stuck = waiting(phase);
                if input.abort_requested {
                    failure = Some(fail(phase, FailureReason::Aborted, stuck));
                    phase = RotationPhase::Failed;
                } else if counts.rotating == 0 {
                    failure = Some(fail(phase, FailureReason::NoNodes, Vec::new()));
                    phase = RotationPhase::Failed;
                } else if stuck.is_empty() {
                    phase = phase.next();
                    elapsed = Duration::ZERO;
                    continue;
                } else if elapsed > input.phase_timeout {
                    failure = Some(fail(phase, FailureReason::Timeout, stuck));
                    phase = RotationPhase::Failed;
                }
                break;
            }
            RotationPhase::Complete | RotationPhase::Failed => break,
        }
    }
    ControllerOutcome {
        changed: phase != input.phase,
        waiting_on: if phase.is_active() {
            waiting(phase)
        } else {
            Vec::new()
        },
        phase,
        failure,
        counts,
        removed,
    }
}

fn fail(during: RotationPhase, reason: FailureReason, stuck: Vec<String>) -> Failure {
    Failure {
        during,
        reason,
        stuck,
    }
}
