//! Loading a cluster from a multi-document YAML manifest of Namespaces, Pods and
//! NetworkPolicies (what `meshctl policy check -f` reads). Errors name the document (1-based
//! index, kind and name) and the field.

use std::fmt;

use k8s_openapi::api::{core::v1 as core, networking::v1 as net};
use serde::Deserialize;

use crate::{
    model::{Cluster, ClusterError, Namespace, Pod},
    rules::{Policy, PolicyError},
};

/// Which document of the manifest an error is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentRef {
    /// 1-based position in the file.
    pub index: usize,
    /// `kind` (empty if unknown).
    pub kind: String,
    /// `namespace/name` or `name` (empty if unknown).
    pub name: String,
}

impl fmt::Display for DocumentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.index)?;
        match (self.kind.is_empty(), self.name.is_empty()) {
            (true, _) => Ok(()),
            (false, true) => write!(f, " ({})", self.kind),
            (false, false) => write!(f, " ({} {})", self.kind, self.name),
        }
    }
}

/// A manifest that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not valid YAML.
    #[error("{doc}: {source}")]
    Yaml {
        /// The document.
        doc: DocumentRef,
        /// The parser error.
        source: serde_yaml::Error,
    },
    /// `kind` or `apiVersion` missing or not supported.
    #[error("{doc}: {field}: {problem}")]
    Header {
        /// The document.
        doc: DocumentRef,
        /// `kind` or `apiVersion`.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The document does not have the shape of its kind.
    #[error("{doc}: {source}")]
    Decode {
        /// The document.
        doc: DocumentRef,
        /// The decoder error (names the field).
        source: serde_yaml::Error,
    },
    /// A Namespace or Pod field is invalid.
    #[error("{doc}: {source}")]
    Object {
        /// The document.
        doc: DocumentRef,
        /// What is wrong.
        source: ClusterError,
    },
    /// A NetworkPolicy field is invalid.
    #[error("{doc}: {source}")]
    Policy {
        /// The document.
        doc: DocumentRef,
        /// What is wrong.
        source: PolicyError,
    },
    /// Objects conflict with each other (duplicates).
    #[error("{}: {source}", docs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    Conflict {
        /// The documents involved.
        docs: Vec<DocumentRef>,
        /// What conflicts.
        source: ClusterError,
    },
}

fn str_field<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

/// Parses a multi-document YAML manifest into a [`Cluster`]. Empty documents are skipped.
#[allow(
    clippy::result_large_err,
    reason = "called once per file; the error carries the document and field for the user"
)]
pub fn load_manifest(text: &str) -> Result<Cluster, ManifestError> {
    let mut namespaces = Vec::new();
    let mut pods = Vec::new();
    let mut policies = Vec::new();
    let mut docs: Vec<DocumentRef> = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let mut doc = DocumentRef {
            index: i + 1,
            kind: String::new(),
            name: String::new(),
        };
        let value = serde_yaml::Value::deserialize(de).map_err(|source| ManifestError::Yaml {
            doc: doc.clone(),
            source,
        })?;
        if value.is_null() {
            continue;
        }
        let header = |doc: &DocumentRef, field, problem: String| ManifestError::Header {
            doc: doc.clone(),
            field,
            problem,
        };
        let Some(kind) = str_field(&value, &["kind"]) else {
            return Err(header(&doc, "kind", "missing".into()));
        };
        doc.kind = kind.to_string();
        let name = str_field(&value, &["metadata", "name"]).unwrap_or("");
        doc.name = match (kind, str_field(&value, &["metadata", "namespace"])) {
            ("Namespace", _) | (_, None) if name.is_empty() => String::new(),
            ("Namespace", _) => name.to_string(),
            (_, ns) => format!("{}/{name}", ns.unwrap_or("default")),
        };
        let api = str_field(&value, &["apiVersion"]).unwrap_or("");
        let want = match kind {
            "Namespace" | "Pod" => "v1",
            "NetworkPolicy" => "networking.k8s.io/v1",
            other => {
                return Err(header(
                    &doc,
                    "kind",
                    format!("{other:?} is not supported (want Namespace, Pod or NetworkPolicy)"),
                ));
            }
        };
        if api != want {
            return Err(header(
                &doc,
                "apiVersion",
                format!("{api:?} for {kind}, want {want:?}"),
            ));
        }
        let decode = |source| ManifestError::Decode {
            doc: doc.clone(),
            source,
        };
        let object = |source| ManifestError::Object {
            doc: doc.clone(),
            source,
        };
        match kind {
            "Namespace" => {
                let ns: core::Namespace = serde_yaml::from_value(value).map_err(decode)?;
                namespaces.push(Namespace::from_k8s(&ns).map_err(object)?);
            }
            "Pod" => {
                let pod: core::Pod = serde_yaml::from_value(value).map_err(decode)?;
                pods.push(Pod::from_k8s(&pod).map_err(object)?);
            }
            _ => {
                let np: net::NetworkPolicy = serde_yaml::from_value(value).map_err(decode)?;
                policies.push(
                    Policy::from_k8s(&np).map_err(|source| ManifestError::Policy {
                        doc: doc.clone(),
                        source,
                    })?,
                );
            }
        }
        docs.push(doc);
    }
    Cluster::new(namespaces, pods, policies).map_err(|source| {
        let named = |kind: &str, name: &str| {
            docs.iter()
                .filter(|d| d.kind == kind && d.name == name)
                .cloned()
                .collect::<Vec<_>>()
        };
        let docs = match &source {
            ClusterError::DuplicatePod { namespace, name } => {
                named("Pod", &format!("{namespace}/{name}"))
            }
            ClusterError::DuplicateNamespace { name } => named("Namespace", name),
            ClusterError::DuplicateIp { first, second, .. } => {
                let mut d = named("Pod", first);
                d.extend(named("Pod", second));
                d
            }
            _ => Vec::new(),
        };
        ManifestError::Conflict { docs, source }
    })
}
