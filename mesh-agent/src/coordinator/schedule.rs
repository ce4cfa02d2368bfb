//! Scheduled rotation: `MeshEncryption.spec.keyRotationInterval` creates a KeyRotation of every
//! node when the last one is that old. Pure: from the mesh settings, the existing rotations and
//! the clock to the object to create, if any. At most one rotation is ever open: nothing is
//! scheduled while one is Pending or active. The name is derived from the due time, so two
//! coordinators that both decide to create it (a takeover race) create the same object once.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use wiremesh_crds::{KeyRotation, KeyRotationSpec, MeshEncryption, RotationPhase};

/// Label on the KeyRotations the schedule creates.
pub const SCHEDULED_LABEL: &str = "wiremesh.io/scheduled";

/// When `rotation` last changed the keys or tried to: its completion for a Complete one, its
/// creation otherwise (a failed attempt waits a whole interval before the next).
fn last_activity(rotation: &KeyRotation) -> Option<Timestamp> {
    let status = rotation.status.as_ref();
    let completed = status
        .filter(|s| s.phase == RotationPhase::Complete)
        .and_then(|s| s.completion_time.as_ref())
        .map(|t| t.0);
    completed.or_else(|| rotation.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// The KeyRotation to create now, if one is due. The mesh must be enabled with a non-zero
/// interval; the interval counts from the last rotation (see [`last_activity`]), or from the
/// creation of `MeshEncryption default` when there was none.
pub fn due_rotation(
    mesh: Option<&MeshEncryption>,
    rotations: &[KeyRotation],
    now: Timestamp,
) -> Option<KeyRotation> {
    let mesh = mesh.filter(|m| m.spec.enabled)?;
    let interval: Duration = mesh.spec.key_rotation_interval().ok()??;
    let open = rotations.iter().any(|r| {
        !r.status
            .as_ref()
            .map(|s| s.phase)
            .unwrap_or_default()
            .is_terminal()
    });
    if open {
        return None;
    }
    let since = rotations
        .iter()
        .filter_map(last_activity)
        .max()
        .or_else(|| mesh.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
    let interval_secs = i64::try_from(interval.as_secs()).ok()?;
    let due = since.as_second().checked_add(interval_secs)?;
    if now.as_second() < due {
        return None;
    }
    let mut rotation = KeyRotation::new(
        &format!("scheduled-{due}"),
        KeyRotationSpec {
            reason: format!(
                "scheduled: keyRotationInterval {}",
                mesh.spec.key_rotation_interval
            ),
            ..KeyRotationSpec::default()
        },
    );
    rotation.metadata.labels = Some(
        [(SCHEDULED_LABEL.to_string(), "true".to_string())]
            .into_iter()
            .collect(),
    );
    Some(rotation)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use wiremesh_crds::{KeyRotationStatus, MeshEncryptionSpec};

    use super::*;

    fn at(hours: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + hours * 3600).expect("time")
    }

    fn mesh(interval: &str, enabled: bool) -> MeshEncryption {
        let spec: MeshEncryptionSpec = serde_json::from_value(serde_json::json!({
            "enabled": enabled, "keyRotationInterval": interval,
        }))
        .expect("spec");
        let mut m = MeshEncryption::new("default", spec);
        m.metadata.creation_timestamp = Some(Time(at(0)));
        m
    }

    fn rotation(created: i64, phase: RotationPhase, completed: Option<i64>) -> KeyRotation {
        let mut r = KeyRotation::new(&format!("r{created}"), KeyRotationSpec::default());
        r.metadata.creation_timestamp = Some(Time(at(created)));
        r.status = Some(KeyRotationStatus {
            phase,
            completion_time: completed.map(|c| Time(at(c))),
            ..KeyRotationStatus::default()
        });
        r
    }

    #[test]
    fn first_rotation_is_due_one_interval_after_the_mesh_was_created() {
        let m = mesh("24h", true);
        assert!(due_rotation(Some(&m), &[], at(23)).is_none());
        let due = due_rotation(Some(&m), &[], at(24)).expect("due");
        assert_eq!(
            due.metadata.name.as_deref(),
            Some(format!("scheduled-{}", at(24).as_second()).as_str())
        );
        assert_eq!(due.spec.reason, "scheduled: keyRotationInterval 24h");
        assert_eq!(due.spec.node_selector, Default::default(), "every node");
        // The same state gives the same name (two coordinators create one object).
        assert_eq!(due_rotation(Some(&m), &[], at(30)).expect("due"), due);
    }

    #[test]
    fn counts_from_the_last_completion_or_failed_attempt() {
        let m = mesh("24h", true);
        let done = rotation(10, RotationPhase::Complete, Some(11));
        assert!(due_rotation(Some(&m), std::slice::from_ref(&done), at(34)).is_none());
        assert!(due_rotation(Some(&m), std::slice::from_ref(&done), at(35)).is_some());
        let failed = rotation(20, RotationPhase::Failed, None);
        assert!(due_rotation(Some(&m), &[done.clone(), failed.clone()], at(43)).is_none());
        assert!(due_rotation(Some(&m), &[done, failed], at(44)).is_some());
    }

    #[test]
    fn nothing_while_a_rotation_is_open_or_the_schedule_is_off() {
        let m = mesh("24h", true);
        for phase in [RotationPhase::Pending, RotationPhase::Switching] {
            assert!(due_rotation(Some(&m), &[rotation(1, phase, None)], at(100)).is_none());
        }
        assert!(due_rotation(Some(&mesh("0s", true)), &[], at(1000)).is_none());
        assert!(due_rotation(Some(&mesh("24h", false)), &[], at(1000)).is_none());
        assert!(due_rotation(None, &[], at(1000)).is_none());
    }
}
