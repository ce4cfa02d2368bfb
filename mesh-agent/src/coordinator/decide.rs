//! One coordinator pass over one KeyRotation, as a pure function: from the object (spec, recorded
//! status, abort annotation), the Nodes that exist now and the clock to the status to write and
//! the Events to record. The phase logic itself is `keyexchange::rotation::controller::evaluate`;
//! this module freezes the plan, translates between the CRD and the state machine, and keeps the
//! conditions. A restarted coordinator computes the same answer from the same inputs.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::core::{ObjectMeta, Selector, SelectorExt};
use wiremesh_crds::{
    ABORT_ANNOTATION, CONDITION_COMPLETE, CONDITION_FAILED, CONDITION_PROGRESSING, ConditionStatus,
    KeyRotation, KeyRotationStatus, RotationPhase as CrdPhase, new_condition, set_condition,
};
use wiremesh_keyexchange::{
    ANNOTATION_PUBLIC_KEY, ControllerInput, Failure, FailureReason, RotationMark, RotationPhase,
    RotationPlan, RotationStep, annotations::parse_key, rotation::controller::evaluate,
};

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Normal,
    Warning,
}

/// An Event to record on the KeyRotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationEvent {
    pub kind: EventKind,
    /// CamelCase reason.
    pub reason: &'static str,
    pub note: String,
}

/// What a pass decided for one rotation.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The status to write; `None` when the recorded one is already right.
    pub status: Option<KeyRotationStatus>,
    /// Events to record (phase changes, completion, failure).
    pub events: Vec<RotationEvent>,
    /// The phase after this pass.
    pub phase: CrdPhase,
}

/// The name the nodes' marks carry for `rotation`: its name and the first 8 hex digits of its UID.
pub fn rotation_id(rotation: &KeyRotation) -> Option<String> {
    let name = rotation.metadata.name.as_deref()?;
    let uid: String = rotation
        .metadata
        .uid
        .as_deref()?
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    (uid.len() == 8).then(|| format!("{name}.{uid}"))
}

/// Translates a CRD phase into the state machine's (same names).
pub fn machine_phase(phase: CrdPhase) -> RotationPhase {
    match phase {
        CrdPhase::Pending => RotationPhase::Pending,
        CrdPhase::Preparing => RotationPhase::Preparing,
        CrdPhase::Switching => RotationPhase::Switching,
        CrdPhase::Retiring => RotationPhase::Retiring,
        CrdPhase::Complete => RotationPhase::Complete,
        CrdPhase::Failed => RotationPhase::Failed,
    }
}

/// Translates a state-machine phase into the CRD's.
pub fn crd_phase(phase: RotationPhase) -> CrdPhase {
    match phase {
        RotationPhase::Pending => CrdPhase::Pending,
        RotationPhase::Preparing => CrdPhase::Preparing,
        RotationPhase::Switching => CrdPhase::Switching,
        RotationPhase::Retiring => CrdPhase::Retiring,
        RotationPhase::Complete => CrdPhase::Complete,
        RotationPhase::Failed => CrdPhase::Failed,
    }
}

/// Whether a rotation in `phase` holds the floor (the others wait in Pending).
pub fn is_active(phase: CrdPhase) -> bool {
    machine_phase(phase).is_active()
}

fn node_name(node: &ObjectMeta) -> Option<&str> {
    node.name.as_deref()
}

/// Nodes that joined the mesh: a valid public key published.
fn joined(nodes: &[ObjectMeta]) -> impl Iterator<Item = &ObjectMeta> {
    nodes.iter().filter(|n| {
        n.annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_PUBLIC_KEY))
            .is_some_and(|v| parse_key(ANNOTATION_PUBLIC_KEY, v).is_ok())
    })
}

/// Why a rotation cannot even start; it fails at once with this as the condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Unusable {
    #[error("spec.nodeSelector: {0}")]
    Selector(String),
    #[error("{0}")]
    PhaseTimeout(String),
    #[error("the object has no name or UID")]
    NoIdentity,
    #[error("{0}")]
    Name(String),
}

/// The plan of a Pending rotation if it started now.
fn fresh_plan(rotation: &KeyRotation, nodes: &[ObjectMeta]) -> Result<RotationPlan, Unusable> {
    let selector = Selector::try_from(rotation.spec.node_selector.clone())
        .map_err(|e| Unusable::Selector(e.to_string()))?;
    let id = rotation_id(rotation).ok_or(Unusable::NoIdentity)?;
    let joined: Vec<&ObjectMeta> = joined(nodes).collect();
    let empty = BTreeMap::new();
    let selected = joined
        .iter()
        .filter(|n| selector.matches(n.labels.as_ref().unwrap_or(&empty)));
    RotationPlan::new(
        &id,
        joined.iter().filter_map(|n| node_name(n)),
        selected.filter_map(|n| node_name(n)),
    )
    .map_err(|e| Unusable::Name(e.to_string()))
}

/// The plan recorded in the status of a rotation that left Pending.
fn recorded_plan(status: &KeyRotationStatus) -> Result<RotationPlan, Unusable> {
    let id = status.rotation_id.as_deref().ok_or(Unusable::NoIdentity)?;
    RotationPlan::new(
        id,
        status.participants.iter().cloned(),
        status.selected_nodes.iter().cloned(),
    )
    .map_err(|e| Unusable::Name(e.to_string()))
}

/// Every existing node with its step in the rotation `id`.
fn marks(id: &str, nodes: &[ObjectMeta]) -> BTreeMap<String, Option<RotationStep>> {
    nodes
        .iter()
        .filter_map(|n| {
            let name = node_name(n)?;
            let step = n
                .annotations
                .as_ref()
                .and_then(|a| RotationMark::from_annotations(a).ok().flatten())
                .filter(|m| m.rotation == id)
                .map(|m| m.step);
            Some((name.to_string(), step))
        })
        .collect()
}

fn elapsed_since(start: Option<&Time>, now: Timestamp) -> Duration {
    start
        .map(|t| now.as_millisecond().saturating_sub(t.0.as_millisecond()))
        .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
        .unwrap_or_default()
}

/// Sets one condition (`at`: the object's generation and the time of this pass).
fn put(
    conditions: &mut Vec<Condition>,
    type_: &str,
    state: ConditionStatus,
    reason: &str,
    message: String,
    at: (Option<i64>, Timestamp),
) {
    set_condition(
        conditions,
        condition(type_, state, reason, message, at.0, at.1),
    );
}

/// Failed True and Progressing False, both with `message`.
fn put_failed(
    conditions: &mut Vec<Condition>,
    reason: &str,
    message: &str,
    at: (Option<i64>, Timestamp),
) {
    put(
        conditions,
        CONDITION_FAILED,
        ConditionStatus::True,
        reason,
        message.to_string(),
        at,
    );
    put(
        conditions,
        CONDITION_PROGRESSING,
        ConditionStatus::False,
        "Failed",
        message.to_string(),
        at,
    );
}

fn condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    // Reasons and types here are constants that pass validation; the message is cut by the
    // helper's limits only in theory (it names at most ten nodes).
    new_condition(type_, status, reason, message.clone(), generation, now).unwrap_or(Condition {
        type_: type_.to_owned(),
        status: status.as_str().to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(now),
    })
}

fn waiting_message(phase: CrdPhase, waiting: &[String]) -> String {
    if waiting.is_empty() {
        return format!("{phase}");
    }
    let shown: Vec<&str> = waiting.iter().take(10).map(String::as_str).collect();
    let more = waiting.len() - shown.len();
    let tail = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!("{phase}: waiting for {}{tail}", shown.join(", "))
}

/// Decides one pass for `rotation`. `another_active`: some other rotation holds the floor (or an
/// older Pending one goes first), so this one must stay Pending.
pub fn decide(
    rotation: &KeyRotation,
    nodes: &[ObjectMeta],
    another_active: bool,
    now: Timestamp,
) -> Decision {
    let old = rotation.status.clone().unwrap_or_default();
    if old.phase.is_terminal() {
        return Decision {
            status: None,
            events: Vec::new(),
            phase: old.phase,
        };
    }
    let generation = rotation.metadata.generation;
    let abort = rotation
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ABORT_ANNOTATION));
    let mut status = old.clone();
    let mut events = Vec::new();

    let plan = match rotation.spec.phase_timeout() {
        Err(e) => Err(Unusable::PhaseTimeout(e.to_string())),
        Ok(_) if old.phase == CrdPhase::Pending => fresh_plan(rotation, nodes),
        Ok(_) => recorded_plan(&old),
    };
    let plan = match plan {
        Ok(plan) => plan,
        Err(unusable) => {
            // Nothing was started (or the recorded plan is unreadable): fail with the reason; a
            // failure outside Retiring keeps the old keys.
            let message = format!("{unusable}; old keys stay in force");
            status.failed_during = Some(old.phase);
            status.set_phase(CrdPhase::Failed, now);
            put_failed(
                &mut status.conditions,
                "InvalidRotation",
                &message,
                (generation, now),
            );
            events.push(RotationEvent {
                kind: EventKind::Warning,
                reason: "RotationFailed",
                note: message,
            });
            return Decision {
                status: Some(status),
                events,
                phase: CrdPhase::Failed,
            };
        }
    };
    let timeout = rotation
        .spec
        .phase_timeout()
        .unwrap_or(Duration::from_secs(600));
    let marks = marks(plan.name(), nodes);
    let input = ControllerInput {
        plan: &plan,
        phase: machine_phase(old.phase),
        elapsed_in_phase: elapsed_since(old.phase_start_time.as_ref(), now),
        phase_timeout: timeout,
        abort_requested: abort,
        another_rotation_active: another_active,
        marks: &marks,
    };
    let outcome = evaluate(&input);
    let phase = crd_phase(outcome.phase);

    if old.phase == CrdPhase::Pending && phase != CrdPhase::Pending {
        status.rotation_id = Some(plan.name().to_string());
        status.participants = plan.participants().iter().cloned().collect();
        status.selected_nodes = plan.rotating().iter().cloned().collect();
    }
    let counts = outcome.counts;
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    status.set_node_counts(
        count(counts.total),
        count(counts.prepared),
        count(counts.switched),
        count(counts.retired),
    );
    if outcome.changed {
        status.set_phase(phase, now);
    }
    if let Some(failure) = &outcome.failure {
        record_failure(&mut status, failure, timeout, generation, now, &mut events);
    } else if phase == CrdPhase::Complete {
        let message = format!(
            "{} of {} participants retired their old keys; {} nodes rotated",
            counts.retired, counts.total, counts.rotating
        );
        put(
            &mut status.conditions,
            CONDITION_COMPLETE,
            ConditionStatus::True,
            "Rotated",
            message.clone(),
            (generation, now),
        );
        put(
            &mut status.conditions,
            CONDITION_PROGRESSING,
            ConditionStatus::False,
            "Complete",
            message.clone(),
            (generation, now),
        );
        if outcome.changed {
            events.push(RotationEvent {
                kind: EventKind::Normal,
                reason: "RotationComplete",
                note: message,
            });
        }
    } else {
        let (state, message) = if phase == CrdPhase::Pending {
            (
                ConditionStatus::False,
                "waiting for the active rotation to end".to_string(),
            )
        } else {
            (
                ConditionStatus::True,
                waiting_message(phase, &outcome.waiting_on),
            )
        };
        put(
            &mut status.conditions,
            CONDITION_PROGRESSING,
            state,
            phase.as_str(),
            message,
            (generation, now),
        );
        if outcome.changed {
            events.push(RotationEvent {
                kind: EventKind::Normal,
                reason: phase_reason(phase),
                note: format!(
                    "{} -> {phase} ({} participants, {} rotating)",
                    old.phase, counts.total, counts.rotating
                ),
            });
        }
    }
    Decision {
        status: (status != old).then_some(status),
        events,
        phase,
    }
}

/// The Event reason of entering `phase`. One reason per phase: an event recorder aggregates
/// repeats of one reason into a series, which would hide the later transitions.
fn phase_reason(phase: CrdPhase) -> &'static str {
    match phase {
        CrdPhase::Pending => "RotationPending",
        CrdPhase::Preparing => "RotationPreparing",
        CrdPhase::Switching => "RotationSwitching",
        CrdPhase::Retiring => "RotationRetiring",
        CrdPhase::Complete => "RotationComplete",
        CrdPhase::Failed => "RotationFailed",
    }
}

fn record_failure(
    status: &mut KeyRotationStatus,
    failure: &Failure,
    timeout: Duration,
    generation: Option<i64>,
    now: Timestamp,
    events: &mut Vec<RotationEvent>,
) {
    let message = failure.message(timeout);
    status.failed_nodes = failure.stuck.clone();
    status.failed_during = Some(crd_phase(failure.during));
    let reason = failure.reason.as_str();
    put_failed(&mut status.conditions, reason, &message, (generation, now));
    events.push(RotationEvent {
        kind: if failure.reason == FailureReason::Aborted {
            EventKind::Normal
        } else {
            EventKind::Warning
        },
        reason: "RotationFailed",
        note: message,
    });
}
