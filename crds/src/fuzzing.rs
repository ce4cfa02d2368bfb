//! Fuzzing entry point of the custom resources, shared by the cargo-fuzz target in `crds/fuzz/`
//! and by `tests/fuzz_corpus.rs`, which replays the committed corpus so `cargo test` runs
//! exactly what the fuzzer runs. Panics when an invariant breaks; that is how the fuzzer reports
//! a finding.
//!
//! The agent and the coordinator read `MeshEncryption`, `KeyRotation` and `MeshNode` objects as
//! JSON from the API server. The schema rejects most bad values there, but objects can reach us
//! another way (an older CRD, a restored backup, a hand-edited status), so the spec accessors
//! re-apply the rules; this drives them with whatever JSON the fuzzer makes.

use std::time::{Duration, SystemTime};

use serde::{Serialize, de::DeserializeOwned};

use crate::{
    KeyRotation, KeyRotationSpec, KeyRotationStatus, MeshEncryption, MeshEncryptionSpec,
    MeshEncryptionStatus, MeshNode, MeshNodeStatus, parse_go_duration, validate_condition,
};

/// Longest error text allowed: spec errors end up in Events, conditions and logs, however long
/// the hostile value is.
pub const MAX_ERROR_LEN: usize = 300;

/// The input as a JSON document of every kind (whole objects, bare specs and statuses), and as a
/// Go duration string. Checks: no panic; every accepted value survives a JSON round trip
/// unchanged; every spec accessor either succeeds or fails with a short error; an accepted
/// interval or timeout respects its minimum; derived status values stay consistent.
pub fn specs(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    duration(&text);
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Some(object) = round_trip::<MeshEncryption>(&value) {
        mesh_encryption_spec(&object.spec);
        if let Some(status) = &object.status {
            mesh_encryption_status(status);
        }
    }
    if let Some(spec) = round_trip::<MeshEncryptionSpec>(&value) {
        mesh_encryption_spec(&spec);
    }
    if let Some(status) = round_trip::<MeshEncryptionStatus>(&value) {
        mesh_encryption_status(&status);
    }
    if let Some(object) = round_trip::<KeyRotation>(&value) {
        key_rotation_spec(&object.spec);
        if let Some(status) = object.status {
            key_rotation_status(status);
        }
    }
    if let Some(spec) = round_trip::<KeyRotationSpec>(&value) {
        key_rotation_spec(&spec);
    }
    if let Some(status) = round_trip::<KeyRotationStatus>(&value) {
        key_rotation_status(status);
    }
    if let Some(object) = round_trip::<MeshNode>(&value)
        && let Some(status) = &object.status
    {
        mesh_node_status(status);
    }
    if let Some(status) = round_trip::<MeshNodeStatus>(&value) {
        mesh_node_status(&status);
    }
}

/// Deserializes `value` as `T`; an accepted value must serialize and deserialize to itself.
fn round_trip<T>(value: &serde_json::Value) -> Option<T>
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let parsed: T = serde_json::from_value(value.clone()).ok()?;
    let rendered = serde_json::to_value(&parsed).expect("an accepted value serializes");
    let again: T = serde_json::from_value(rendered).expect("a rendered value parses");
    assert_eq!(again, parsed, "JSON round trip changed the value");
    Some(parsed)
}

fn short(error: &dyn std::error::Error) {
    let message = error.to_string();
    assert!(
        message.len() <= MAX_ERROR_LEN,
        "error message of {} bytes: {message}",
        message.len()
    );
}

fn duration(text: &str) {
    match parse_go_duration(text) {
        Ok(d) => {
            // Every group is a number and a unit: at least as long as "0s".
            assert!(text.len() >= 2, "{text:?} parsed as {d:?}");
        }
        Err(e) => short(&e),
    }
}

fn mesh_encryption_spec(spec: &MeshEncryptionSpec) {
    match spec.key_rotation_interval() {
        Ok(Some(interval)) => assert!(interval >= crate::MIN_KEY_ROTATION_INTERVAL),
        Ok(None) => {}
        Err(e) => short(&e),
    }
    for cidrs in [spec.pod_cidrs(), spec.service_cidrs()] {
        match cidrs {
            Ok(nets) => {
                for net in nets {
                    assert_eq!(net, net.trunc(), "host bits cleared");
                }
            }
            Err(e) => short(&e),
        }
    }
    let _ = spec.steers_traffic();
}

fn mesh_encryption_status(status: &MeshEncryptionStatus) {
    for condition in &status.conditions {
        if let Err(e) = validate_condition(condition) {
            short(&e);
        }
    }
    let mut status = status.clone();
    status.set_node_counts(status.nodes_ready, status.nodes_total);
    assert_eq!(
        status.ready.as_deref(),
        Some(format!("{}/{}", status.nodes_ready, status.nodes_total).as_str())
    );
}

fn key_rotation_spec(spec: &KeyRotationSpec) {
    match spec.phase_timeout() {
        Ok(timeout) => assert!(timeout >= crate::MIN_PHASE_TIMEOUT),
        Err(e) => short(&e),
    }
}

fn key_rotation_status(mut status: KeyRotationStatus) {
    for condition in &status.conditions {
        if let Err(e) = validate_condition(condition) {
            short(&e);
        }
    }
    status.refresh_progress();
    let progress = status.progress.clone().expect("progress set");
    assert_eq!(
        progress,
        format!("{}/{}", status.nodes_done(), status.nodes_total)
    );
    let phase = status.phase;
    let now = k8s_openapi::jiff::Timestamp::UNIX_EPOCH;
    for next in [phase, crate::RotationPhase::Failed] {
        let changed = status.set_phase(next, now);
        assert_eq!(status.phase, next);
        if changed && next.is_terminal() {
            assert!(status.completion_time.is_some());
        }
    }
}

fn mesh_node_status(status: &MeshNodeStatus) {
    for condition in &status.conditions {
        if let Err(e) = validate_condition(condition) {
            short(&e);
        }
    }
    assert!(!status.differs_materially(status));
    let _ = status.converged();
    for now in [SystemTime::UNIX_EPOCH, SystemTime::now()] {
        let _ = status.is_stale(now);
    }
    let _ = status.is_stale(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 4));
}
