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

/// Decodes from the document's own parser when there is one (errors then carry the field path
/// and position), else from the already parsed value.
fn decode_typed<T: serde::de::DeserializeOwned>(
    de: Option<serde_yaml::Deserializer<'_>>,
    value: serde_yaml::Value,
) -> Result<T, serde_yaml::Error> {
    match de {
        Some(de) => T::deserialize(de),
        None => serde_yaml::from_value(value),
    }
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
    // Decoding straight from the parser (second iterator) keeps the field path in errors, which
    // decoding from a `Value` loses; the `Value` pass reads the kind first.
    let mut typed = serde_yaml::Deserializer::from_str(text);
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let typed_de = typed.next();
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
                let ns: core::Namespace = decode_typed(typed_de, value).map_err(decode)?;
                namespaces.push(Namespace::from_k8s(&ns).map_err(object)?);
            }
            "Pod" => {
                let pod: core::Pod = decode_typed(typed_de, value).map_err(decode)?;
                pods.push(Pod::from_k8s(&pod).map_err(object)?);
            }
            _ => {
                let np: net::NetworkPolicy = decode_typed(typed_de, value).map_err(decode)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {ns: x}}\n";

    fn err(text: &str) -> String {
        load_manifest(text).unwrap_err().to_string()
    }

    #[test]
    fn loads_objects_and_skips_empty_documents() {
        let c = load_manifest(&format!(
            "---\n{NS}---\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: x}}\n\
             spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 80}}]}}]}}\n\
             status: {{podIP: 10.0.0.1}}\n"
        ))
        .unwrap();
        assert_eq!(c.pods().len(), 1);
        assert_eq!(
            c.pods()[0].named_port("http", crate::Protocol::Tcp),
            Some(80)
        );
        assert_eq!(c.namespaces()["x"].labels["ns"], "x");
    }

    #[test]
    fn errors_name_document_and_field() {
        let bad_cidr = format!(
            "{NS}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: p, namespace: x}}\nspec:\n  podSelector: {{}}\n  ingress:\n  \
             - from: [{{ipBlock: {{cidr: 10.0.0/8}}}}]\n"
        );
        assert_eq!(
            err(&bad_cidr),
            "document 2 (NetworkPolicy x/p): spec.ingress[0].from[0].ipBlock.cidr: invalid value \
             \"10.0.0/8\": not a CIDR (like 10.0.0.0/8 or fd00::/64)"
        );
        let bad_ip = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: nope}\n";
        assert_eq!(
            err(bad_ip),
            "document 1 (Pod default/a): status.podIP: invalid value \"nope\": not an IP address"
        );
        let bad_type = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\n\
                        spec: {containers: [{name: c, ports: [{containerPort: eighty}]}]}\n";
        let e = err(bad_type);
        assert!(e.starts_with("document 1 (Pod x/a): "), "{e}");
        assert!(
            e.contains("spec.containers[0].ports[0].containerPort"),
            "{e}"
        );
        assert_eq!(
            err("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"),
            "document 1 (Service default/s): kind: \"Service\" is not supported (want Namespace, Pod or NetworkPolicy)"
        );
        assert_eq!(
            err("kind: Pod\nmetadata: {name: a}\n"),
            "document 1 (Pod default/a): apiVersion: \"\" for Pod, want \"v1\""
        );
        assert!(
            err("{NS}---\n: : :\n").starts_with("document "),
            "yaml syntax"
        );
        let dup = format!("{NS}---\n{NS}");
        assert_eq!(
            err(&dup),
            "document 1 (Namespace x), document 2 (Namespace x): namespace x is defined twice"
        );
        let same_ip = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: 10.0.0.1}\n---\n\
                       apiVersion: v1\nkind: Pod\nmetadata: {name: b}\nstatus: {podIP: 10.0.0.1}\n";
        assert_eq!(
            err(same_ip),
            "document 1 (Pod default/a), document 2 (Pod default/b): pods default/a and default/b both have IP 10.0.0.1"
        );
        let bad_sel = format!(
            "{NS}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: p, namespace: x}}\nspec:\n  podSelector:\n    matchExpressions:\n    \
             - {{key: a, operator: In}}\n"
        );
        assert_eq!(
            err(&bad_sel),
            "document 2 (NetworkPolicy x/p): spec.podSelector.matchExpressions[0]: operator In needs values"
        );
        let bad_end = format!(
            "{NS}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: p, namespace: x}}\nspec:\n  egress:\n  \
             - ports: [{{port: http, endPort: 90}}]\n"
        );
        assert_eq!(
            err(&bad_end),
            "document 2 (NetworkPolicy x/p): spec.egress[0].ports[0].endPort: invalid value \"90\": endPort needs a numeric port"
        );
    }
}
