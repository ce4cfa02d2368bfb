//! Helpers shared by the unit tests: walking a generated CRD schema and fixed timestamps.

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    jiff::Timestamp,
};
use serde_json::Value;

/// The `openAPIV3Schema` of the single version of `crd`, as JSON.
pub fn schema(crd: &CustomResourceDefinition) -> Value {
    assert_eq!(crd.spec.versions.len(), 1, "one version expected");
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("CRD has a schema");
    serde_json::to_value(schema).expect("schema serializes")
}

/// The schema node at a dotted field path ("spec.listenPort"); "" is the root.
pub fn at<'a>(schema: &'a Value, path: &str) -> &'a Value {
    let mut node = schema;
    for field in path.split('.').filter(|f| !f.is_empty()) {
        node = node
            .get("properties")
            .and_then(|p| p.get(field))
            .unwrap_or_else(|| panic!("schema has no field {field:?} on the way to {path:?}"));
    }
    node
}

/// The CEL rules (`x-kubernetes-validations[].rule`) of a schema node.
pub fn rules(node: &Value) -> Vec<String> {
    node.get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .map(|rules| {
            rules
                .iter()
                .map(|r| r["rule"].as_str().expect("rule is a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `(name, type, jsonPath, priority)` of every printer column.
pub fn printer_columns(crd: &CustomResourceDefinition) -> Vec<(String, String, String, i32)> {
    crd.spec.versions[0]
        .additional_printer_columns
        .as_ref()
        .expect("printer columns")
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                c.type_.clone(),
                c.json_path.clone(),
                c.priority.unwrap_or(0),
            )
        })
        .collect()
}

/// A timestamp from RFC 3339 text.
pub fn ts(text: &str) -> Timestamp {
    text.parse().expect("valid RFC 3339 timestamp")
}
