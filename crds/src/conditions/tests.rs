//! Condition building, validation, updating and the conditions schema.

use serde_json::json;

use super::*;
use crate::test_support::ts;

const T0: &str = "2026-11-24T10:00:00Z";
const T1: &str = "2026-11-24T11:30:00Z";

fn ready(status: ConditionStatus, reason: &str, message: &str, at: &str) -> Condition {
    new_condition("Ready", status, reason, message, Some(3), ts(at)).expect("valid condition")
}

#[test]
fn new_condition_fills_every_field() {
    let c = ready(
        ConditionStatus::True,
        "AllNodesReady",
        "3 of 3 nodes ready",
        T0,
    );
    assert_eq!(c.type_, "Ready");
    assert_eq!(c.status, "True");
    assert_eq!(c.reason, "AllNodesReady");
    assert_eq!(c.message, "3 of 3 nodes ready");
    assert_eq!(c.observed_generation, Some(3));
    assert_eq!(c.last_transition_time, Time(ts(T0)));
}

#[test]
fn condition_serializes_in_the_kubernetes_wire_format() {
    let c = ready(
        ConditionStatus::False,
        "NodesNotReady",
        "1 of 3 nodes ready",
        T0,
    );
    assert_eq!(
        serde_json::to_value(&c).unwrap(),
        json!({
            "type": "Ready",
            "status": "False",
            "reason": "NodesNotReady",
            "message": "1 of 3 nodes ready",
            "observedGeneration": 3,
            "lastTransitionTime": "2026-11-24T10:00:00Z",
        })
    );
    let without_generation = new_condition(
        "Ready",
        ConditionStatus::Unknown,
        "Starting",
        "",
        None,
        ts(T0),
    )
    .unwrap();
    let value = serde_json::to_value(&without_generation).unwrap();
    assert!(value.get("observedGeneration").is_none(), "{value}");
    assert_eq!(value["message"], "", "empty message stays present: {value}");
    let back: Condition = serde_json::from_value(value).unwrap();
    assert_eq!(back, without_generation);
}

#[test]
fn status_helpers() {
    assert_eq!(ConditionStatus::from_bool(true), ConditionStatus::True);
    assert_eq!(ConditionStatus::from_bool(false), ConditionStatus::False);
    assert_eq!(ConditionStatus::Unknown.to_string(), "Unknown");
}

#[test]
fn accepts_conventional_types_and_reasons() {
    for type_ in [
        "Ready",
        "Degraded",
        "wiremesh.io/KeysPublished",
        "a",
        "Ready-2",
        "x.y_z",
    ] {
        assert!(is_valid_type(type_), "{type_}");
    }
    for reason in [
        "AllNodesReady",
        "A",
        "Nodes_Ready",
        "Waiting:Prepare,Switch",
        "Timeout2",
    ] {
        assert!(is_valid_reason(reason), "{reason}");
    }
}

#[test]
fn rejects_bad_type_with_reason() {
    for type_ in [
        "",
        "-Ready",
        "Ready-",
        "has space",
        "Wiremesh.io/Ready",
        "/Ready",
        "wiremesh.io/",
        "bad..prefix/Ready",
    ] {
        let err = new_condition(type_, ConditionStatus::True, "Ok", "", None, ts(T0)).unwrap_err();
        assert_eq!(
            err,
            ConditionError::InvalidType {
                type_: type_.to_owned()
            },
            "{type_:?}"
        );
        assert!(err.to_string().contains("CamelCase"), "{err}");
    }
    let long = "R".repeat(MAX_TYPE_LEN + 1);
    assert!(new_condition(&long, ConditionStatus::True, "Ok", "", None, ts(T0)).is_err());
}

#[test]
fn rejects_bad_reason_with_reason() {
    for reason in [
        "",
        "1Starts",
        "has space",
        "Trailing:",
        "Trailing,",
        "dash-ed",
    ] {
        let err =
            new_condition("Ready", ConditionStatus::True, reason, "", None, ts(T0)).unwrap_err();
        assert_eq!(
            err,
            ConditionError::InvalidReason {
                type_: "Ready".into(),
                reason: reason.into()
            },
            "{reason:?}"
        );
        assert!(
            err.to_string().contains("must start with a letter"),
            "{err}"
        );
    }
    let long = "R".repeat(MAX_REASON_LEN + 1);
    assert!(new_condition("Ready", ConditionStatus::True, &long, "", None, ts(T0)).is_err());
}

#[test]
fn rejects_bad_status_message_and_generation() {
    let mut c = ready(ConditionStatus::True, "Ok", "", T0);
    c.status = "true".into();
    assert_eq!(
        validate_condition(&c),
        Err(ConditionError::InvalidStatus {
            type_: "Ready".into(),
            status: "true".into()
        })
    );

    let message = "x".repeat(MAX_MESSAGE_LEN + 1);
    let err =
        new_condition("Ready", ConditionStatus::True, "Ok", message, None, ts(T0)).unwrap_err();
    assert_eq!(
        err,
        ConditionError::MessageTooLong {
            type_: "Ready".into(),
            len: MAX_MESSAGE_LEN + 1
        }
    );

    let err =
        new_condition("Ready", ConditionStatus::True, "Ok", "", Some(-1), ts(T0)).unwrap_err();
    assert!(err.to_string().contains("negative"), "{err}");
}

#[test]
fn set_condition_inserts_new_types() {
    let mut conditions = Vec::new();
    assert!(set_condition(
        &mut conditions,
        ready(ConditionStatus::True, "Ok", "", T0)
    ));
    let degraded = new_condition(
        "Degraded",
        ConditionStatus::False,
        "Ok",
        "",
        Some(3),
        ts(T0),
    )
    .unwrap();
    assert!(set_condition(&mut conditions, degraded));
    let types: Vec<_> = conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, ["Ready", "Degraded"]);
}

#[test]
fn set_condition_with_nothing_new_changes_nothing() {
    let mut conditions = vec![ready(ConditionStatus::True, "Ok", "all good", T0)];
    let before = conditions.clone();
    assert!(!set_condition(
        &mut conditions,
        ready(ConditionStatus::True, "Ok", "all good", T1)
    ));
    assert_eq!(conditions, before, "time must not move without a change");
}

#[test]
fn set_condition_keeps_transition_time_when_status_is_unchanged() {
    let mut conditions = vec![ready(ConditionStatus::False, "Waiting", "0 of 3", T0)];
    assert!(set_condition(
        &mut conditions,
        ready(ConditionStatus::False, "Waiting", "2 of 3", T1)
    ));
    assert_eq!(conditions.len(), 1);
    assert_eq!(conditions[0].message, "2 of 3");
    assert_eq!(conditions[0].last_transition_time, Time(ts(T0)));
}

#[test]
fn set_condition_updates_generation_and_reason_without_transition() {
    let mut conditions = vec![ready(ConditionStatus::False, "Waiting", "", T0)];
    let mut update = ready(ConditionStatus::False, "HandshakeFailed", "", T1);
    update.observed_generation = Some(4);
    assert!(set_condition(&mut conditions, update));
    assert_eq!(conditions[0].reason, "HandshakeFailed");
    assert_eq!(conditions[0].observed_generation, Some(4));
    assert_eq!(conditions[0].last_transition_time, Time(ts(T0)));
}

#[test]
fn set_condition_moves_transition_time_when_status_changes() {
    let mut conditions = vec![ready(ConditionStatus::False, "Waiting", "", T0)];
    assert!(set_condition(
        &mut conditions,
        ready(ConditionStatus::True, "AllNodesReady", "", T1)
    ));
    assert_eq!(conditions[0].status, "True");
    assert_eq!(conditions[0].reason, "AllNodesReady");
    assert_eq!(conditions[0].last_transition_time, Time(ts(T1)));
}

#[test]
fn find_is_true_and_remove() {
    let mut conditions = vec![
        ready(ConditionStatus::True, "Ok", "", T0),
        new_condition("Degraded", ConditionStatus::False, "Ok", "", None, ts(T0)).unwrap(),
    ];
    assert_eq!(
        find_condition(&conditions, "Degraded").unwrap().status,
        "False"
    );
    assert!(find_condition(&conditions, "Missing").is_none());
    assert!(is_condition_true(&conditions, "Ready"));
    assert!(!is_condition_true(&conditions, "Degraded"));
    assert!(!is_condition_true(&conditions, "Missing"));
    assert!(remove_condition(&mut conditions, "Ready"));
    assert!(!remove_condition(&mut conditions, "Ready"));
    assert_eq!(conditions.len(), 1);
}

#[test]
fn conditions_schema_carries_the_upstream_checks() {
    let mut generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| s.inline_subschemas = true)
        .into_generator();
    let schema = serde_json::to_value(conditions_schema(&mut generator)).unwrap();
    assert_eq!(schema["type"], "array");
    assert_eq!(schema["x-kubernetes-list-type"], "map");
    assert_eq!(schema["x-kubernetes-list-map-keys"], json!(["type"]));
    let props = &schema["items"]["properties"];
    assert_eq!(props["type"]["pattern"], TYPE_PATTERN);
    assert_eq!(props["type"]["maxLength"], MAX_TYPE_LEN);
    assert_eq!(props["reason"]["pattern"], REASON_PATTERN);
    assert_eq!(props["reason"]["minLength"], 1);
    assert_eq!(props["status"]["enum"], json!(["True", "False", "Unknown"]));
    assert_eq!(props["message"]["maxLength"], MAX_MESSAGE_LEN);
    assert_eq!(props["lastTransitionTime"]["format"], "date-time");
    assert_eq!(props["observedGeneration"]["minimum"], 0);
    let required: Vec<_> = schema["items"]["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for field in ["type", "status", "reason", "message", "lastTransitionTime"] {
        assert!(required.contains(&field), "{field} must be required");
    }
}

#[test]
fn hand_written_checks_agree_with_the_schema_patterns() {
    let type_re = regex::Regex::new(TYPE_PATTERN).unwrap();
    let reason_re = regex::Regex::new(REASON_PATTERN).unwrap();
    let samples = [
        "",
        "Ready",
        "ready",
        "-Ready",
        "Ready-",
        "a",
        "A1",
        "wiremesh.io/Ready",
        "Wiremesh.io/Ready",
        "/Ready",
        "io/",
        "a.b/c",
        "a..b/c",
        "x_y",
        "x.y",
        "has space",
        "Trailing:",
        "Trailing,",
        "A:B,C_D",
        "1x",
        "_x",
        "x_",
        "é",
    ];
    for sample in samples {
        assert_eq!(
            is_valid_type(sample),
            type_re.is_match(sample),
            "type {sample:?}"
        );
        assert_eq!(
            is_valid_reason(sample),
            reason_re.is_match(sample),
            "reason {sample:?}"
        );
    }
}
