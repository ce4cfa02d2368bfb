//! Status conditions in the Kubernetes API conventions (`metav1.Condition`): building them with
//! the conventions checked, updating a condition list without churning `lastTransitionTime`, and
//! the schema of a `conditions` list (the checks `metav1.Condition` carries upstream, plus
//! list-map semantics keyed by `type` for server-side apply).

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use schemars::{Schema, SchemaGenerator, json_schema};

/// Longest `type` the API accepts (a 253-character prefix, `/`, a 62-character name).
const MAX_TYPE_LEN: usize = 316;
/// Longest `reason` the API accepts.
const MAX_REASON_LEN: usize = 1024;
/// Longest `message` the API accepts.
const MAX_MESSAGE_LEN: usize = 32768;

/// Pattern of a condition `type`, as in `metav1.Condition`.
const TYPE_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$";
/// Pattern of a condition `reason`, as in `metav1.Condition`.
const REASON_PATTERN: &str = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$";

/// The `status` of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    /// The wire form: "True", "False" or "Unknown".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }

    /// `True` for `true`, `False` for `false`.
    pub fn from_bool(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

impl std::fmt::Display for ConditionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A condition that the API server would reject.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConditionError {
    #[error(
        "condition type {:?} is not a CamelCase name with an optional DNS prefix (at most {MAX_TYPE_LEN} characters)",
        crate::duration::shown(.type_)
    )]
    InvalidType { type_: String },
    #[error(
        "condition {:?}: reason {:?} must start with a letter and hold only letters, digits, '_', ',' and ':' (at most {MAX_REASON_LEN} characters)",
        crate::duration::shown(.type_),
        crate::duration::shown(.reason)
    )]
    InvalidReason { type_: String, reason: String },
    #[error(
        "condition {:?}: status {:?} is not True, False or Unknown",
        crate::duration::shown(.type_),
        crate::duration::shown(.status)
    )]
    InvalidStatus { type_: String, status: String },
    #[error(
        "condition {:?}: message is {len} bytes long, at most {MAX_MESSAGE_LEN} allowed",
        crate::duration::shown(.type_)
    )]
    MessageTooLong { type_: String, len: usize },
    #[error(
        "condition {:?}: observedGeneration {generation} is negative",
        crate::duration::shown(.type_)
    )]
    NegativeGeneration { type_: String, generation: i64 },
}

/// Builds a condition stamped with `now`, checked against the rules the API server enforces.
pub fn new_condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> Result<Condition, ConditionError> {
    let condition = Condition {
        type_: type_.to_owned(),
        status: status.as_str().to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation,
        last_transition_time: Time(now),
    };
    validate_condition(&condition)?;
    Ok(condition)
}

/// Checks a condition against the rules of `metav1.Condition`.
pub fn validate_condition(condition: &Condition) -> Result<(), ConditionError> {
    let type_ = &condition.type_;
    if !is_valid_type(type_) {
        return Err(ConditionError::InvalidType {
            type_: type_.clone(),
        });
    }
    if !matches!(condition.status.as_str(), "True" | "False" | "Unknown") {
        return Err(ConditionError::InvalidStatus {
            type_: type_.clone(),
            status: condition.status.clone(),
        });
    }
    if !is_valid_reason(&condition.reason) {
        return Err(ConditionError::InvalidReason {
            type_: type_.clone(),
            reason: condition.reason.clone(),
        });
    }
    if condition.message.len() > MAX_MESSAGE_LEN {
        return Err(ConditionError::MessageTooLong {
            type_: type_.clone(),
            len: condition.message.len(),
        });
    }
    if let Some(generation) = condition.observed_generation.filter(|g| *g < 0) {
        return Err(ConditionError::NegativeGeneration {
            type_: type_.clone(),
            generation,
        });
    }
    Ok(())
}

/// Inserts `condition`, or updates the condition of the same type in place. The existing
/// `lastTransitionTime` is kept when the status did not change, so a controller that re-asserts
/// the same state does not look like a transition. Returns whether the list changed, so the
/// caller can skip a status write that would change nothing.
pub fn set_condition(conditions: &mut Vec<Condition>, condition: Condition) -> bool {
    let Some(existing) = conditions.iter_mut().find(|c| c.type_ == condition.type_) else {
        conditions.push(condition);
        return true;
    };
    let transition = existing.status != condition.status;
    let changed = transition
        || existing.reason != condition.reason
        || existing.message != condition.message
        || existing.observed_generation != condition.observed_generation;
    if !changed {
        return false;
    }
    let kept_time = existing.last_transition_time.clone();
    *existing = condition;
    if !transition {
        existing.last_transition_time = kept_time;
    }
    true
}

/// The condition of the given type, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of the given type is present with status `True`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == ConditionStatus::True.as_str())
}

/// Removes the condition of the given type; returns whether one was there.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}

/// Schema of a `conditions` list: `metav1.Condition` items with the checks the upstream type
/// declares (patterns, lengths, status enum), merged by `type` under server-side apply.
/// Use with `#[schemars(schema_with = "crate::conditions::conditions_schema")]`.
pub fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut item = generator.subschema_for::<Condition>();
    let constraints = [
        (
            "type",
            json_schema!({"maxLength": MAX_TYPE_LEN, "pattern": TYPE_PATTERN}),
        ),
        (
            "status",
            json_schema!({"enum": ["True", "False", "Unknown"]}),
        ),
        (
            "reason",
            json_schema!({"minLength": 1, "maxLength": MAX_REASON_LEN, "pattern": REASON_PATTERN}),
        ),
        ("message", json_schema!({"maxLength": MAX_MESSAGE_LEN})),
        ("observedGeneration", json_schema!({"minimum": 0})),
    ];
    if let Some(properties) = item
        .ensure_object()
        .get_mut("properties")
        .and_then(|p| p.as_object_mut())
    {
        for (name, extra) in constraints {
            if let (Some(prop), Some(extra)) = (
                properties.get_mut(name).and_then(|p| p.as_object_mut()),
                extra.as_object(),
            ) {
                prop.extend(extra.clone());
            }
        }
    }
    json_schema!({
        "type": "array",
        "description": "Current state in the Kubernetes condition conventions, one entry per type.",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

/// `type`: an optional lowercase DNS-subdomain prefix and `/`, then a name of letters, digits,
/// `-`, `_` and `.` that starts and ends alphanumeric.
fn is_valid_type(type_: &str) -> bool {
    if type_.is_empty() || type_.len() > MAX_TYPE_LEN {
        return false;
    }
    let (prefix, name) = match type_.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, type_),
    };
    if let Some(prefix) = prefix
        && !prefix.split('.').all(is_dns_label)
    {
        return false;
    }
    let bytes = name.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    first.is_ascii_alphanumeric()
        && last.is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A lowercase RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
fn is_dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    let lower_alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            lower_alnum(first)
                && lower_alnum(last)
                && bytes.iter().all(|b| lower_alnum(b) || *b == b'-')
        }
        _ => false,
    }
}

/// `reason`: a letter, then letters, digits, `_`, `,` and `:`, not ending in `,` or `:`.
fn is_valid_reason(reason: &str) -> bool {
    let bytes = reason.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    reason.len() <= MAX_REASON_LEN
        && first.is_ascii_alphabetic()
        && (last.is_ascii_alphanumeric() || *last == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b',' | b':'))
}

#[cfg(test)]
mod tests;
