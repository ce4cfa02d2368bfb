//! The coordinator's pure pass: plan freezing, phase moves with counts, conditions and Events,
//! timeouts naming the stuck nodes, abort, queueing behind an active rotation, and idempotence
//! (a second pass over its own output writes nothing).

use std::collections::BTreeMap;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{LabelSelector, Time},
    jiff::Timestamp,
};
use kube::core::ObjectMeta;
use wiremesh_crds::{
    ABORT_ANNOTATION, CONDITION_COMPLETE, CONDITION_FAILED, CONDITION_PROGRESSING, KeyRotation,
    KeyRotationSpec, RotationPhase as Phase, find_condition,
};
use wiremesh_keyexchange::{ANNOTATION_PUBLIC_KEY, ANNOTATION_ROTATION, PrivateKey};

use super::decide::{Decision, EventKind, decide, rotation_id};

const UID: &str = "3f2a9c1d-0000-4000-8000-000000000001";

fn node(name: &str, labels: &[(&str, &str)], mark: Option<&str>) -> ObjectMeta {
    let mut annotations = BTreeMap::from([(
        ANNOTATION_PUBLIC_KEY.to_string(),
        PrivateKey::generate()
            .expect("key")
            .public_key()
            .to_base64(),
    )]);
    if let Some(mark) = mark {
        annotations.insert(ANNOTATION_ROTATION.to_string(), mark.to_string());
    }
    ObjectMeta {
        name: Some(name.to_string()),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        annotations: Some(annotations),
        ..ObjectMeta::default()
    }
}

fn unjoined(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        ..ObjectMeta::default()
    }
}

fn rotation(spec: KeyRotationSpec) -> KeyRotation {
    let mut r = KeyRotation::new("weekly", spec);
    r.metadata.uid = Some(UID.to_string());
    r.metadata.generation = Some(1);
    r
}

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).expect("time")
}

/// Applies a decision's status to the object, as the coordinator's write does.
fn applied(mut r: KeyRotation, d: &Decision) -> KeyRotation {
    if let Some(status) = &d.status {
        r.status = Some(status.clone());
    }
    r
}

fn id() -> String {
    "weekly.3f2a9c1d".to_string()
}

fn mark(step: &str) -> String {
    format!("{}={step}", id())
}

#[test]
fn rotation_id_is_name_and_uid_prefix() {
    assert_eq!(
        rotation_id(&rotation(KeyRotationSpec::default())),
        Some(id())
    );
    let mut no_uid = rotation(KeyRotationSpec::default());
    no_uid.metadata.uid = None;
    assert_eq!(rotation_id(&no_uid), None);
}

#[test]
fn pending_freezes_the_plan_and_walks_the_phases() {
    let spec = KeyRotationSpec {
        node_selector: LabelSelector {
            match_labels: Some(BTreeMap::from([("pool".into(), "edge".into())])),
            ..LabelSelector::default()
        },
        ..KeyRotationSpec::default()
    };
    let r = rotation(spec);
    let nodes = vec![
        node("a", &[("pool", "edge")], None),
        node("b", &[("pool", "core")], None),
        unjoined("c"),
    ];
    let d = decide(&r, &nodes, false, at(0));
    assert_eq!(d.phase, Phase::Preparing);
    let status = d.status.clone().expect("status written");
    assert_eq!(status.rotation_id, Some(id()));
    assert_eq!(status.participants, vec!["a", "b"], "c has not joined");
    assert_eq!(status.selected_nodes, vec!["a"]);
    assert_eq!(status.nodes_total, 2);
    assert_eq!(status.progress.as_deref(), Some("0/2"));
    assert_eq!(status.start_time, Some(Time(at(0))));
    assert_eq!(status.phase_start_time, Some(Time(at(0))));
    let progressing = find_condition(&status.conditions, CONDITION_PROGRESSING).expect("cond");
    assert_eq!(progressing.status, "True");
    assert_eq!(progressing.message, "Preparing: waiting for a, b");
    assert_eq!(d.events.len(), 1);
    assert_eq!(d.events[0].reason, "RotationPreparing");
    assert_eq!(
        d.events[0].note,
        "Pending -> Preparing (2 participants, 1 rotating)"
    );

    // Nothing new: a second pass writes nothing and records nothing.
    let r = applied(r, &d);
    let again = decide(&r, &nodes, false, at(1));
    assert_eq!(again.status, None);
    assert!(again.events.is_empty());

    // One prepared: counts move, phase does not.
    let nodes = vec![
        node("a", &[("pool", "edge")], Some(&mark("prepared"))),
        node("b", &[("pool", "core")], None),
        unjoined("c"),
    ];
    let d = decide(&r, &nodes, false, at(2));
    assert_eq!(d.phase, Phase::Preparing);
    let status = d.status.clone().expect("counts changed");
    assert_eq!(status.nodes_prepared, 1);
    assert_eq!(status.progress.as_deref(), Some("1/2"));
    assert_eq!(status.phase_start_time, Some(Time(at(0))), "same phase");
    let r = applied(r, &d);

    // Everyone retired at once (a coordinator that was away): straight to Complete.
    let nodes = vec![
        node("a", &[], Some(&mark("retired"))),
        node("b", &[], Some(&mark("retired"))),
    ];
    let d = decide(&r, &nodes, false, at(3));
    assert_eq!(d.phase, Phase::Complete);
    let status = d.status.clone().expect("status");
    assert_eq!(status.completion_time, Some(Time(at(3))));
    assert_eq!(status.progress.as_deref(), Some("2/2"));
    assert_eq!(
        find_condition(&status.conditions, CONDITION_COMPLETE).map(|c| c.status.as_str()),
        Some("True")
    );
    assert_eq!(
        find_condition(&status.conditions, CONDITION_PROGRESSING).map(|c| c.status.as_str()),
        Some("False")
    );
    assert_eq!(d.events.last().map(|e| e.reason), Some("RotationComplete"));

    // Terminal: never touched again.
    let r = applied(r, &d);
    let d = decide(&r, &[], false, at(4));
    assert_eq!((d.status, d.events.len()), (None, 0));
}

#[test]
fn marks_of_another_rotation_do_not_count() {
    let r = rotation(KeyRotationSpec::default());
    let nodes = vec![node("a", &[], None)];
    let r = applied(r.clone(), &decide(&r, &nodes, false, at(0)));
    // A mark with the same object name but another UID (a deleted rotation of that name).
    let stale = vec![node("a", &[], Some("weekly.00000000=retired"))];
    let d = decide(&r, &stale, false, at(1));
    assert_eq!(d.phase, Phase::Preparing);
    assert_eq!(d.status, None);
}

#[test]
fn a_phase_timeout_fails_naming_the_stuck_nodes() {
    let r = rotation(KeyRotationSpec {
        phase_timeout: "30s".into(),
        ..KeyRotationSpec::default()
    });
    let nodes = vec![node("a", &[], None), node("b", &[], None)];
    let r = applied(r.clone(), &decide(&r, &nodes, false, at(0)));
    let nodes = vec![
        node("a", &[], Some(&mark("prepared"))),
        node("b", &[], None),
    ];
    let d = decide(&r, &nodes, false, at(30));
    assert_eq!(d.phase, Phase::Preparing, "at the limit, not past it");
    let r = applied(r, &d);
    let d = decide(&r, &nodes, false, at(31));
    assert_eq!(d.phase, Phase::Failed);
    let status = d.status.expect("status");
    assert_eq!(status.failed_nodes, vec!["b"]);
    assert_eq!(status.failed_during, Some(Phase::Preparing));
    let failed = find_condition(&status.conditions, CONDITION_FAILED).expect("Failed");
    assert_eq!(failed.reason, "PhaseTimeout");
    assert_eq!(
        failed.message,
        "Preparing did not finish within 30s; waiting for b; old keys stay in force"
    );
    assert_eq!(d.events.len(), 1);
    assert_eq!(d.events[0].kind, EventKind::Warning);
    assert_eq!(d.events[0].reason, "RotationFailed");
    assert_eq!(d.events[0].note, failed.message);
}

#[test]
fn the_timeout_counts_from_the_recorded_phase_start() {
    // A coordinator that takes over 40 s into a 30 s phase fails it at once.
    let r = rotation(KeyRotationSpec {
        phase_timeout: "30s".into(),
        ..KeyRotationSpec::default()
    });
    let nodes = vec![node("a", &[], None)];
    let r = applied(r.clone(), &decide(&r, &nodes, false, at(0)));
    let d = decide(&r, &nodes, false, at(40));
    assert_eq!(d.phase, Phase::Failed);
}

#[test]
fn abort_fails_with_the_old_keys_and_a_normal_event() {
    let r = rotation(KeyRotationSpec::default());
    let nodes = vec![node("a", &[], None)];
    let mut r = applied(r.clone(), &decide(&r, &nodes, false, at(0)));
    r.metadata.annotations = Some(BTreeMap::from([(
        ABORT_ANNOTATION.to_string(),
        "operator".to_string(),
    )]));
    let d = decide(&r, &nodes, false, at(1));
    assert_eq!(d.phase, Phase::Failed);
    let status = d.status.expect("status");
    assert_eq!(status.failed_during, Some(Phase::Preparing));
    assert_eq!(
        find_condition(&status.conditions, CONDITION_FAILED).map(|c| c.reason.as_str()),
        Some("Aborted")
    );
    assert_eq!(d.events[0].kind, EventKind::Normal);
}

#[test]
fn pending_waits_behind_an_active_rotation() {
    let r = rotation(KeyRotationSpec::default());
    let nodes = vec![node("a", &[], None)];
    let d = decide(&r, &nodes, true, at(0));
    assert_eq!(d.phase, Phase::Pending);
    let status = d.status.expect("condition written once");
    assert!(
        status.rotation_id.is_none(),
        "plan not frozen while waiting"
    );
    let progressing = find_condition(&status.conditions, CONDITION_PROGRESSING).expect("cond");
    assert_eq!(progressing.status, "False");
    assert!(d.events.is_empty());
}

#[test]
fn a_selector_that_matches_no_joined_node_fails() {
    let r = rotation(KeyRotationSpec {
        node_selector: LabelSelector {
            match_labels: Some(BTreeMap::from([("pool".into(), "none".into())])),
            ..LabelSelector::default()
        },
        ..KeyRotationSpec::default()
    });
    let d = decide(&r, &[node("a", &[], None)], false, at(0));
    assert_eq!(d.phase, Phase::Failed);
    let status = d.status.expect("status");
    assert_eq!(
        find_condition(&status.conditions, CONDITION_FAILED).map(|c| c.reason.as_str()),
        Some("NoNodesToRotate")
    );
}

#[test]
fn an_invalid_selector_fails_with_a_clear_reason() {
    let r = rotation(KeyRotationSpec {
        node_selector: LabelSelector {
            match_expressions: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                    key: "pool".into(),
                    operator: "Sideways".into(),
                    values: None,
                },
            ]),
            ..LabelSelector::default()
        },
        ..KeyRotationSpec::default()
    });
    let d = decide(&r, &[node("a", &[], None)], false, at(0));
    assert_eq!(d.phase, Phase::Failed);
    let status = d.status.expect("status");
    let failed = find_condition(&status.conditions, CONDITION_FAILED).expect("Failed");
    assert_eq!(failed.reason, "InvalidRotation");
    assert!(
        failed.message.contains("nodeSelector"),
        "{}",
        failed.message
    );
}

#[test]
fn a_removed_participant_does_not_hold_the_rotation() {
    let r = rotation(KeyRotationSpec::default());
    let nodes = vec![node("a", &[], None), node("b", &[], None)];
    let r = applied(r.clone(), &decide(&r, &nodes, false, at(0)));
    let only_a = vec![node("a", &[], Some(&mark("prepared")))];
    let d = decide(&r, &only_a, false, at(1));
    assert_eq!(d.phase, Phase::Switching);
    assert_eq!(d.status.expect("status").nodes_total, 1);
}
