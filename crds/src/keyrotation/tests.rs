//! KeyRotation: wire format, defaults, phase bookkeeping, progress text and the generated schema.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
use kube::{CustomResourceExt, Resource};
use serde_json::json;

use super::*;
use crate::{
    conditions::{ConditionStatus, new_condition},
    test_support::{at, printer_columns, rules, schema, ts},
};

const T0: &str = "2026-11-24T10:00:00Z";
const T1: &str = "2026-11-24T10:01:00Z";
const T2: &str = "2026-11-24T10:02:30Z";

#[test]
fn empty_spec_selects_every_node_with_default_timeout() {
    let spec: KeyRotationSpec = serde_json::from_value(json!({})).unwrap();
    assert_eq!(spec, KeyRotationSpec::default());
    assert_eq!(spec.node_selector, LabelSelector::default());
    assert_eq!(spec.reason, "");
    assert_eq!(spec.phase_timeout, DEFAULT_PHASE_TIMEOUT);
    assert_eq!(spec.phase_timeout(), Ok(Duration::from_secs(600)));
}

#[test]
fn full_object_round_trips_in_camel_case() {
    let mut object = KeyRotation::new(
        "rotate-2026-11-24",
        KeyRotationSpec {
            node_selector: LabelSelector {
                match_labels: Some(BTreeMap::from([("pool".into(), "edge".into())])),
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "zone".into(),
                    operator: "In".into(),
                    values: Some(vec!["a".into(), "b".into()]),
                }]),
            },
            reason: "suspected compromise, INC-42".into(),
            phase_timeout: "5m".into(),
            revoke_immediately: false,
        },
    );
    let mut status = KeyRotationStatus {
        selected_nodes: vec!["node-a".into(), "node-b".into(), "node-c".into()],
        ..Default::default()
    };
    status.set_phase(RotationPhase::Preparing, ts(T0));
    status.set_phase(RotationPhase::Switching, ts(T1));
    status.set_node_counts(3, 3, 2, 0);
    status.conditions.push(
        new_condition(
            CONDITION_PROGRESSING,
            ConditionStatus::True,
            "Switching",
            "2 of 3 nodes switched",
            Some(1),
            ts(T1),
        )
        .unwrap(),
    );
    object.status = Some(status);

    let value = serde_json::to_value(&object).unwrap();
    assert_eq!(value["apiVersion"], "wiremesh.io/v1alpha1");
    assert_eq!(value["kind"], "KeyRotation");
    assert_eq!(
        value["spec"],
        json!({
            "nodeSelector": {
                "matchLabels": {"pool": "edge"},
                "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}],
            },
            "reason": "suspected compromise, INC-42",
            "phaseTimeout": "5m",
        })
    );
    let status = &value["status"];
    assert_eq!(status["phase"], "Switching");
    assert_eq!(status["nodesTotal"], 3);
    assert_eq!(status["nodesPrepared"], 3);
    assert_eq!(status["nodesSwitched"], 2);
    assert_eq!(status["nodesRetired"], 0);
    assert_eq!(status["progress"], "2/3");
    assert_eq!(
        status["selectedNodes"],
        json!(["node-a", "node-b", "node-c"])
    );
    assert_eq!(status["failedNodes"], json!([]));
    assert_eq!(status["startTime"], T0);
    assert_eq!(status["phaseStartTime"], T1);
    assert!(status.get("completionTime").is_none(), "{status}");

    let back: KeyRotation = serde_json::from_value(value).unwrap();
    assert_eq!(back, object);
    let back: KeyRotation = serde_yaml::from_str(&serde_yaml::to_string(&object).unwrap()).unwrap();
    assert_eq!(back, object);
}

#[test]
fn revoke_immediately_is_written_only_when_set() {
    let spec: KeyRotationSpec = serde_json::from_value(json!({"revokeImmediately": true})).unwrap();
    assert!(spec.revoke_immediately);
    assert_eq!(
        serde_json::to_value(&spec).unwrap()["revokeImmediately"],
        true
    );
    let value = serde_json::to_value(KeyRotationSpec::default()).unwrap();
    assert!(value.get("revokeImmediately").is_none(), "{value}");
}

#[test]
fn frozen_plan_round_trips() {
    let status = KeyRotationStatus {
        rotation_id: Some("weekly.3f2a9c1d".into()),
        participants: vec!["a".into(), "b".into()],
        selected_nodes: vec!["a".into()],
        failed_during: Some(RotationPhase::Switching),
        ..Default::default()
    };
    let value = serde_json::to_value(&status).unwrap();
    assert_eq!(value["rotationId"], "weekly.3f2a9c1d");
    assert_eq!(value["participants"], json!(["a", "b"]));
    assert_eq!(value["failedDuring"], "Switching");
    let back: KeyRotationStatus = serde_json::from_value(value).unwrap();
    assert_eq!(back, status);
}

#[test]
fn empty_status_parses_as_pending() {
    let status: KeyRotationStatus = serde_json::from_value(json!({})).unwrap();
    assert_eq!(status.phase, RotationPhase::Pending);
    assert_eq!(status, KeyRotationStatus::default());
}

#[test]
fn phase_wire_names() {
    let all = [
        RotationPhase::Pending,
        RotationPhase::Preparing,
        RotationPhase::Switching,
        RotationPhase::Retiring,
        RotationPhase::Complete,
        RotationPhase::Failed,
    ];
    for phase in all {
        assert_eq!(serde_json::to_value(phase).unwrap(), phase.as_str());
        assert_eq!(phase.to_string(), phase.as_str());
        assert_eq!(
            serde_json::from_value::<RotationPhase>(json!(phase.as_str())).unwrap(),
            phase
        );
        assert_eq!(
            phase.is_terminal(),
            matches!(phase, RotationPhase::Complete | RotationPhase::Failed)
        );
    }
    assert!(serde_json::from_value::<RotationPhase>(json!("preparing")).is_err());
}

#[test]
fn set_phase_stamps_times() {
    let mut status = KeyRotationStatus::default();
    status.set_node_counts(3, 0, 0, 0);
    assert_eq!(status.progress.as_deref(), Some("0/3"));

    assert!(status.set_phase(RotationPhase::Preparing, ts(T0)));
    assert_eq!(status.start_time, Some(Time(ts(T0))));
    assert_eq!(status.phase_start_time, Some(Time(ts(T0))));
    assert_eq!(status.completion_time, None);

    assert!(
        !status.set_phase(RotationPhase::Preparing, ts(T1)),
        "same phase is no change"
    );
    assert_eq!(status.phase_start_time, Some(Time(ts(T0))));

    assert!(status.set_phase(RotationPhase::Switching, ts(T1)));
    assert_eq!(status.start_time, Some(Time(ts(T0))), "start time stays");
    assert_eq!(status.phase_start_time, Some(Time(ts(T1))));

    assert!(status.set_phase(RotationPhase::Complete, ts(T2)));
    assert_eq!(status.completion_time, Some(Time(ts(T2))));
}

#[test]
fn failing_from_pending_stamps_start_and_completion() {
    let mut status = KeyRotationStatus::default();
    assert!(status.set_phase(RotationPhase::Failed, ts(T0)));
    assert_eq!(status.start_time, Some(Time(ts(T0))));
    assert_eq!(status.completion_time, Some(Time(ts(T0))));
}

#[test]
fn progress_counts_the_current_phase() {
    let mut status = KeyRotationStatus::default();
    status.set_node_counts(3, 2, 1, 0);
    let cases = [
        (RotationPhase::Pending, "0/3"),
        (RotationPhase::Preparing, "2/3"),
        (RotationPhase::Switching, "1/3"),
        (RotationPhase::Retiring, "0/3"),
    ];
    for (phase, want) in cases {
        status.phase = phase;
        status.refresh_progress();
        assert_eq!(status.progress.as_deref(), Some(want), "{phase}");
    }
    status.set_phase(RotationPhase::Complete, ts(T0));
    status.set_node_counts(3, 3, 3, 3);
    assert_eq!(status.progress.as_deref(), Some("3/3"));
}

#[test]
fn progress_of_a_failed_rotation_counts_the_phase_it_failed_in() {
    let failed = |prepared, switched, retired| {
        let mut status = KeyRotationStatus {
            phase: RotationPhase::Failed,
            ..Default::default()
        };
        status.set_node_counts(4, prepared, switched, retired);
        status.progress.unwrap()
    };
    assert_eq!(failed(3, 0, 0), "3/4", "stuck in Preparing");
    assert_eq!(failed(4, 1, 0), "1/4", "stuck in Switching");
    assert_eq!(failed(4, 4, 2), "2/4", "stuck in Retiring");
}

#[test]
fn phase_timeout_accessor() {
    let with = |timeout: &str| KeyRotationSpec {
        phase_timeout: timeout.into(),
        ..Default::default()
    };
    assert_eq!(with("90s").phase_timeout(), Ok(Duration::from_secs(90)));
    assert_eq!(with("10s").phase_timeout(), Ok(MIN_PHASE_TIMEOUT));
    assert_eq!(
        with("9s").phase_timeout(),
        Err(SpecError::PhaseTimeoutTooShort { value: "9s".into() })
    );
    assert_eq!(
        with("0s").phase_timeout(),
        Err(SpecError::PhaseTimeoutTooShort { value: "0s".into() }),
        "unlike keyRotationInterval, zero does not switch the timeout off"
    );
    let err = with("ten minutes").phase_timeout().unwrap_err();
    assert!(
        err.to_string().contains("phaseTimeout \"ten minutes\""),
        "{err}"
    );
}

#[test]
fn resource_identity() {
    assert_eq!(KeyRotation::group(&()), "wiremesh.io");
    assert_eq!(KeyRotation::plural(&()), "keyrotations");
    let crd = KeyRotation::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("keyrotations.wiremesh.io")
    );
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.versions[0].name, "v1alpha1");
    assert!(
        crd.spec.versions[0]
            .subresources
            .as_ref()
            .unwrap()
            .status
            .is_some()
    );
}

#[test]
fn schema_makes_the_spec_immutable() {
    let schema = schema(&KeyRotation::crd());
    assert_eq!(rules(at(&schema, "spec")), ["self == oldSelf"]);
    assert!(
        rules(&schema).is_empty(),
        "any name is fine for a KeyRotation"
    );
    assert_eq!(
        rules(at(&schema, "spec.phaseTimeout")),
        ["duration(self) >= duration('10s')"]
    );
    assert_eq!(at(&schema, "spec.reason")["maxLength"], MAX_REASON_LEN);
    assert_eq!(
        at(&schema, "spec.phaseTimeout")["default"],
        DEFAULT_PHASE_TIMEOUT
    );
    assert_eq!(at(&schema, "spec.nodeSelector")["default"], json!({}));
    assert_eq!(
        at(&schema, "spec.nodeSelector.matchLabels")["additionalProperties"]["type"],
        "string"
    );
}

#[test]
fn schema_status_fields() {
    let schema = schema(&KeyRotation::crd());
    assert_eq!(
        at(&schema, "status.phase")["enum"],
        json!([
            "Pending",
            "Preparing",
            "Switching",
            "Retiring",
            "Complete",
            "Failed"
        ])
    );
    for field in [
        "nodesTotal",
        "nodesPrepared",
        "nodesSwitched",
        "nodesRetired",
    ] {
        let node = at(&schema, &format!("status.{field}"));
        assert_eq!(node["type"], "integer", "{field}");
        assert_eq!(node["minimum"].as_f64(), Some(0.0), "{field}");
    }
    for field in ["failedNodes", "selectedNodes"] {
        let node = at(&schema, &format!("status.{field}"));
        assert_eq!(node["x-kubernetes-list-type"], "set", "{field}");
        assert_eq!(node["items"]["type"], "string", "{field}");
    }
    for field in ["startTime", "phaseStartTime", "completionTime"] {
        assert_eq!(
            at(&schema, &format!("status.{field}"))["format"],
            "date-time",
            "{field}"
        );
    }
    assert_eq!(
        at(&schema, "status.conditions")["x-kubernetes-list-type"],
        "map"
    );
}

#[test]
fn printer_columns_show_phase_done_and_age() {
    let columns = printer_columns(&KeyRotation::crd());
    let default_view: Vec<_> = columns
        .iter()
        .filter(|c| c.3 == 0)
        .map(|(name, type_, path, _)| (name.as_str(), type_.as_str(), path.as_str()))
        .collect();
    assert_eq!(
        default_view,
        [
            ("Phase", "string", ".status.phase"),
            ("Done", "string", ".status.progress"),
            ("Age", "date", ".metadata.creationTimestamp"),
        ]
    );
    let wide: Vec<_> = columns
        .iter()
        .filter(|c| c.3 == 1)
        .map(|c| c.0.as_str())
        .collect();
    assert_eq!(wide, ["Reason", "Failed"]);
    let schema = schema(&KeyRotation::crd());
    for (name, _, path, _) in &columns {
        if !path.starts_with(".metadata.") {
            assert!(
                at(&schema, path.trim_start_matches('.'))
                    .get("type")
                    .is_some(),
                "{name}"
            );
        }
    }
}
