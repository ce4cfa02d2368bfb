//! Label selectors (`matchLabels` + `matchExpressions` with In, NotIn, Exists, DoesNotExist):
//! validated once, then matched against label maps.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A label selector that could not be parsed; `field` is the path inside the selector.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    /// An operator other than In, NotIn, Exists, DoesNotExist.
    #[error("{field}: unknown operator {operator:?} (want In, NotIn, Exists or DoesNotExist)")]
    UnknownOperator {
        /// Path of the offending expression.
        field: String,
        /// The operator as written.
        operator: String,
    },
    /// In/NotIn without values, or Exists/DoesNotExist with values.
    #[error("{field}: operator {operator} {problem}")]
    BadValues {
        /// Path of the offending expression.
        field: String,
        /// The operator as written.
        operator: String,
        /// What is wrong with the values.
        problem: &'static str,
    },
}

/// One requirement of a selector. All requirements of a selector must hold (AND).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requirement {
    /// The key is present and its value is one of the set (also used for `matchLabels`).
    In(String, BTreeSet<String>),
    /// The key is absent, or its value is not in the set.
    NotIn(String, BTreeSet<String>),
    /// The key is present (any value).
    Exists(String),
    /// The key is absent.
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// A validated label selector. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that matches every label set (`{}`).
    pub fn everything() -> Self {
        Self::default()
    }

    /// Builds a selector from requirements (all must hold).
    pub fn from_requirements(requirements: Vec<Requirement>) -> Self {
        Self { requirements }
    }

    /// The requirements, in the order they were written (`matchLabels` first).
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Parses a Kubernetes `LabelSelector`; `field` is its path, used in errors.
    pub fn parse(sel: &LabelSelector, field: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            requirements.push(Requirement::In(k.clone(), BTreeSet::from([v.clone()])));
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let field = format!("{field}.matchExpressions[{i}]");
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let bad = |problem| SelectorError::BadValues {
                field: field.clone(),
                operator: e.operator.clone(),
                problem,
            };
            let req = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => return Err(bad("needs values")),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(bad("must not have values"));
                }
                "In" => Requirement::In(e.key.clone(), values),
                "NotIn" => Requirement::NotIn(e.key.clone(), values),
                "Exists" => Requirement::Exists(e.key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
                other => {
                    return Err(SelectorError::UnknownOperator {
                        field,
                        operator: other.to_string(),
                    });
                }
            };
            requirements.push(req);
        }
        Ok(Self { requirements })
    }

    /// Whether every requirement holds for `labels`.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn operators() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                expr("tier", "In", &["a", "b"]),
                expr("env", "NotIn", &["prod"]),
                expr("team", "Exists", &[]),
                expr("legacy", "DoesNotExist", &[]),
            ]),
        };
        let s = Selector::parse(&sel, "spec.podSelector").unwrap();
        let base = [("app", "web"), ("tier", "a"), ("team", "x")];
        assert!(s.matches(&labels(&base)));
        let mut l = labels(&base);
        l.insert("env".into(), "dev".into());
        assert!(s.matches(&l), "NotIn with another value matches");
        l.insert("env".into(), "prod".into());
        assert!(!s.matches(&l), "NotIn with a listed value does not match");
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "c"), ("team", "x")])));
        assert!(
            !s.matches(&labels(&[("app", "web"), ("tier", "a")])),
            "Exists"
        );
        let mut l = labels(&base);
        l.insert("legacy".into(), String::new());
        assert!(!s.matches(&l), "DoesNotExist with an empty value present");
        assert!(
            !s.matches(&labels(&[("tier", "a"), ("team", "x")])),
            "matchLabels"
        );
        assert!(Selector::everything().matches(&labels(&[])));
    }

    #[test]
    fn invalid_expressions_name_the_field() {
        let sel = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("a", "Exists", &[]), expr("b", "Gt", &["1"])]),
        };
        let err = Selector::parse(&sel, "spec.podSelector").unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.podSelector.matchExpressions[1]: unknown operator \"Gt\" (want In, NotIn, Exists or DoesNotExist)"
        );
        let sel = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("a", "In", &[])]),
        };
        assert!(matches!(
            Selector::parse(&sel, "x").unwrap_err(),
            SelectorError::BadValues { .. }
        ));
        let sel = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("a", "DoesNotExist", &["v"])]),
        };
        assert!(Selector::parse(&sel, "x").is_err());
    }
}
