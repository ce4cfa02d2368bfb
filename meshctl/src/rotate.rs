//! `meshctl rotate`: create a KeyRotation (every node, or those a label selector picks; optionally
//! `revokeImmediately`), follow it to Complete or Failed with a live progress line, or ask the
//! coordinator to abort one. Everything goes through the API server; the rotation itself is
//! driven by the coordinator and the agents.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use wiremesh_crds::{
    ABORT_ANNOTATION, CONDITION_FAILED, DEFAULT_PHASE_TIMEOUT, KeyRotation, KeyRotationSpec,
    RotationPhase, find_condition,
};

/// Field manager of meshctl's writes.
pub const FIELD_MANAGER: &str = "meshctl";
/// `generateName` of the rotations meshctl creates.
pub const GENERATE_NAME: &str = "rotation-";

/// Why a rotate command failed.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("--nodes {selector:?}: {message}")]
    Selector { selector: String, message: String },
    #[error("create KeyRotation: {0}")]
    Create(#[source] kube::Error),
    #[error("KeyRotation {name}: {source}")]
    Api {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("KeyRotation {name} did not finish within {timeout:?}; last: {last}")]
    Timeout {
        name: String,
        timeout: Duration,
        last: String,
    },
}

/// What to rotate.
#[derive(Debug, Clone, Default)]
pub struct RotateOptions {
    /// A label selector in kubectl syntax (`role=edge,zone in (a,b)`); `None`: every node.
    pub nodes: Option<String>,
    /// Compromised keys: no overlap for the old keys.
    pub revoke: bool,
    /// Why (shown in the report's rotation history).
    pub reason: String,
    /// Per-phase timeout as a Go duration; `None`: the default.
    pub phase_timeout: Option<String>,
}

/// Parses a kubectl-style label selector (`role=edge,zone in (a,b),!legacy,tier!=db`) into the
/// API's `LabelSelector`.
pub fn parse_selector(text: &str) -> Result<LabelSelector, RotateError> {
    let bad = |message: &str| RotateError::Selector {
        selector: text.to_string(),
        message: message.to_string(),
    };
    let mut labels = BTreeMap::new();
    let mut expressions = Vec::new();
    for term in split_terms(text).map_err(&bad)? {
        let term = term.trim();
        let requirement = |key: &str, operator: &str, values: Option<Vec<String>>| {
            if !valid_key(key) {
                return Err(bad("a label key is empty or has invalid characters"));
            }
            Ok(LabelSelectorRequirement {
                key: key.to_string(),
                operator: operator.to_string(),
                values,
            })
        };
        if let Some(key) = term.strip_prefix('!') {
            expressions.push(requirement(key.trim(), "DoesNotExist", None)?);
        } else if let Some((key, values)) = set_term(term, " notin ") {
            expressions.push(requirement(key, "NotIn", Some(values.map_err(&bad)?))?);
        } else if let Some((key, values)) = set_term(term, " in ") {
            expressions.push(requirement(key, "In", Some(values.map_err(&bad)?))?);
        } else if let Some((key, value)) = term.split_once("!=") {
            let value = checked_value(value).map_err(&bad)?;
            expressions.push(requirement(key.trim(), "NotIn", Some(vec![value]))?);
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            let key = key.trim();
            requirement(key, "In", None)?;
            labels.insert(key.to_string(), checked_value(value).map_err(&bad)?);
        } else {
            expressions.push(requirement(term, "Exists", None)?);
        }
    }
    if labels.is_empty() && expressions.is_empty() {
        return Err(bad("selects every node; leave --nodes out for that"));
    }
    Ok(LabelSelector {
        match_labels: (!labels.is_empty()).then_some(labels),
        match_expressions: (!expressions.is_empty()).then_some(expressions),
    })
}

/// Splits on commas outside parentheses.
fn split_terms(text: &str) -> Result<Vec<&str>, &'static str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0u32, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or("unbalanced parentheses")?,
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced parentheses");
    }
    terms.push(&text[start..]);
    Ok(terms.into_iter().filter(|t| !t.trim().is_empty()).collect())
}

/// `key in (a,b)`: the key and the values.
fn set_term<'a>(
    term: &'a str,
    operator: &str,
) -> Option<(&'a str, Result<Vec<String>, &'static str>)> {
    let (key, rest) = term.split_once(operator)?;
    let values = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or("a set needs parentheses: key in (a,b)")
        .and_then(|inner| {
            inner
                .split(',')
                .map(checked_value)
                .collect::<Result<Vec<_>, _>>()
        });
    Some((key.trim(), values))
}

fn checked_value(value: &str) -> Result<String, &'static str> {
    let value = value.trim();
    let ok = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(value.to_string())
    } else {
        Err("a label value has invalid characters")
    }
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

/// Creates the KeyRotation and returns it (with its generated name).
pub async fn create(client: &Client, options: &RotateOptions) -> Result<KeyRotation, RotateError> {
    let node_selector = match options.nodes.as_deref() {
        Some(text) => parse_selector(text)?,
        None => LabelSelector::default(),
    };
    let mut rotation = KeyRotation::new(
        "",
        KeyRotationSpec {
            node_selector,
            reason: options.reason.clone(),
            phase_timeout: options
                .phase_timeout
                .clone()
                .unwrap_or_else(|| DEFAULT_PHASE_TIMEOUT.to_string()),
            revoke_immediately: options.revoke,
        },
    );
    rotation.metadata.name = None;
    rotation.metadata.generate_name = Some(GENERATE_NAME.to_string());
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PostParams::default()
    };
    Api::<KeyRotation>::all(client.clone())
        .create(&params, &rotation)
        .await
        .map_err(RotateError::Create)
}

/// Asks the coordinator to stop `name` (the annotation `wiremesh.io/abort`). A finished rotation
/// is left as it is; the returned object says which.
pub async fn abort(client: &Client, name: &str, by: &str) -> Result<KeyRotation, RotateError> {
    let body = serde_json::json!({"metadata": {"annotations": {ABORT_ANNOTATION: by}}});
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    Api::<KeyRotation>::all(client.clone())
        .patch(name, &params, &Patch::Merge(&body))
        .await
        .map_err(|source| RotateError::Api {
            name: name.to_string(),
            source,
        })
}

/// The phase of `rotation` (Pending without a status).
pub fn phase(rotation: &KeyRotation) -> RotationPhase {
    rotation
        .status
        .as_ref()
        .map(|s| s.phase)
        .unwrap_or_default()
}

/// One line about where `rotation` stands: `rotation-x7k2p  Switching  2/3 nodes  41s` and, for a
/// failed one, the reason from its Failed condition.
pub fn progress_line(rotation: &KeyRotation, elapsed: Duration) -> String {
    let status = rotation.status.clone().unwrap_or_default();
    let done = status.nodes_done();
    let mut line = format!(
        "{}  {}  {done}/{} nodes  {}s",
        rotation.name_any(),
        status.phase,
        status.nodes_total,
        elapsed.as_secs()
    );
    if status.phase == RotationPhase::Failed
        && let Some(failed) = find_condition(&status.conditions, CONDITION_FAILED)
    {
        line.push_str(&format!("  {}: {}", failed.reason, failed.message));
    }
    line
}

/// Follows `name` until it is Complete or Failed, calling `progress` whenever the line changes.
/// Returns the final object.
pub async fn follow(
    client: &Client,
    name: &str,
    timeout: Duration,
    mut progress: impl FnMut(&str),
) -> Result<KeyRotation, RotateError> {
    let api = Api::<KeyRotation>::all(client.clone());
    let started = Instant::now();
    let mut shown = String::new();
    loop {
        let rotation = api.get(name).await.map_err(|source| RotateError::Api {
            name: name.to_string(),
            source,
        })?;
        // Compare without the clock so the line is printed on changes (and every 5 s).
        let elapsed = started.elapsed();
        let line = progress_line(&rotation, elapsed);
        let key = progress_line(&rotation, Duration::from_secs(elapsed.as_secs() / 5 * 5));
        if key != shown {
            progress(&line);
            shown = key;
        }
        if phase(&rotation).is_terminal() {
            return Ok(rotation);
        }
        if elapsed >= timeout {
            return Err(RotateError::Timeout {
                name: name.to_string(),
                timeout,
                last: line,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use wiremesh_crds::KeyRotationStatus;

    use super::*;

    #[test]
    fn selectors_in_kubectl_syntax() {
        let s = parse_selector("role=edge,zone in (a,b),!legacy,tier!=db").expect("parses");
        assert_eq!(
            s.match_labels,
            Some(BTreeMap::from([("role".into(), "edge".into())]))
        );
        let exprs = s.match_expressions.expect("expressions");
        let ops: Vec<(&str, &str)> = exprs
            .iter()
            .map(|e| (e.key.as_str(), e.operator.as_str()))
            .collect();
        assert_eq!(
            ops,
            vec![
                ("zone", "In"),
                ("legacy", "DoesNotExist"),
                ("tier", "NotIn")
            ]
        );
        assert!(parse_selector("").is_err(), "empty selects everything");
        assert!(parse_selector("a in b").is_err());
        assert!(parse_selector("a in (b").is_err());
        assert!(parse_selector("a=b c").is_err());
        let hostname = parse_selector("kubernetes.io/hostname=node-3").expect("parses");
        assert_eq!(
            hostname.match_labels,
            Some(BTreeMap::from([(
                "kubernetes.io/hostname".into(),
                "node-3".into()
            )]))
        );
    }

    #[test]
    fn progress_line_names_phase_counts_and_failure() {
        let mut r = KeyRotation::new("rotation-abc", KeyRotationSpec::default());
        let mut status = KeyRotationStatus {
            phase: RotationPhase::Switching,
            ..KeyRotationStatus::default()
        };
        status.set_node_counts(3, 3, 2, 0);
        r.status = Some(status.clone());
        assert_eq!(
            progress_line(&r, Duration::from_secs(41)),
            "rotation-abc  Switching  2/3 nodes  41s"
        );
        status.phase = RotationPhase::Failed;
        status.conditions.push(
            wiremesh_crds::new_condition(
                CONDITION_FAILED,
                wiremesh_crds::ConditionStatus::True,
                "PhaseTimeout",
                "Switching did not finish within 10s; waiting for n3; old keys stay in force",
                None,
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            )
            .expect("condition"),
        );
        r.status = Some(status);
        assert_eq!(
            progress_line(&r, Duration::from_secs(12)),
            "rotation-abc  Failed  2/3 nodes  12s  PhaseTimeout: Switching did not finish within \
             10s; waiting for n3; old keys stay in force"
        );
    }
}
