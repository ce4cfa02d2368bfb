//! wiremesh custom resources (group `wiremesh.io`, version `v1alpha1`): `MeshEncryption`, the
//! cluster-wide settings singleton, `KeyRotation`, one rotation of the nodes' static keys, and
//! `MeshNode`, the live status of one node's agent;
//! helpers for their status conditions; and the CRD manifests generated from the types.
#![forbid(unsafe_code)]

mod conditions;
mod duration;
#[doc(hidden)]
pub mod fuzzing;
mod keyrotation;
mod manifests;
mod meshencryption;
pub mod meshnode;
#[cfg(test)]
mod test_support;

pub use conditions::{
    ConditionError, ConditionStatus, conditions_schema, find_condition, is_condition_true,
    new_condition, remove_condition, set_condition, validate_condition,
};
pub use duration::{DurationError, parse_go_duration};
pub use keyrotation::{
    ABORT_ANNOTATION, CONDITION_COMPLETE, CONDITION_FAILED, CONDITION_PROGRESSING,
    DEFAULT_PHASE_TIMEOUT, KeyRotation, KeyRotationSpec, KeyRotationStatus, MAX_REASON_LEN,
    MIN_PHASE_TIMEOUT, RotationPhase, SpecError as KeyRotationSpecError,
};
pub use manifests::{
    Drift, Manifest, ManifestError, check_dir, check_structural, manifests, render_yaml, write_dir,
};
pub use meshencryption::{
    CONDITION_DEGRADED, CONDITION_READY, DEFAULT_KEY_ROTATION_INTERVAL, DEFAULT_LISTEN_PORT,
    DatapathMode, EncryptionMode, MAX_MTU, MESH_ENCRYPTION_NAME, MIN_KEY_ROTATION_INTERVAL,
    MIN_MTU, MeshEncryption, MeshEncryptionSpec, MeshEncryptionStatus,
    SpecError as MeshEncryptionSpecError,
};
pub use meshnode::{CONDITION_SETTINGS_APPLIED, MeshNode, MeshNodeSpec, MeshNodeStatus};
