//! The committed manifests, writing and checking them, and the structural-schema checker.

use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps;
use serde_json::json;

use super::*;

/// `deploy/crds/` of this repository.
fn committed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds")
}

#[test]
fn committed_manifests_match_the_types() {
    if let Err(err) = check_dir(&committed_dir()) {
        panic!("{err}");
    }
}

#[test]
fn every_crd_is_listed_once_with_its_file() {
    let all = manifests().unwrap();
    let names: Vec<_> = all
        .iter()
        .map(|m| (m.file_name, m.crd.metadata.name.clone().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            (
                "meshencryption.yaml",
                "meshencryptions.wiremesh.io".to_owned()
            ),
            ("keyrotation.yaml", "keyrotations.wiremesh.io".to_owned()),
            ("meshnode.yaml", "meshnodes.wiremesh.io".to_owned()),
        ]
    );
}

#[test]
fn rendered_yaml_has_the_header_and_parses_back_to_the_same_crd() {
    for manifest in manifests().unwrap() {
        let text = render_yaml(&manifest.crd).unwrap();
        assert!(text.starts_with(HEADER), "{}", manifest.file_name);
        assert!(text.contains("make crds"));
        let back: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
        assert_eq!(back, manifest.crd, "{}", manifest.file_name);
        assert_eq!(
            render_yaml(&back).unwrap(),
            text,
            "rendering is deterministic"
        );
    }
}

#[test]
fn write_then_check_passes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested/crds");
    let written = write_dir(&out).unwrap();
    assert_eq!(written.len(), 3);
    check_dir(&out).unwrap();
}

#[test]
fn check_names_a_changed_file_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path()).unwrap();
    let path = dir.path().join("keyrotation.yaml");
    let edited = fs::read_to_string(&path)
        .unwrap()
        .replace("plural: keyrotations", "plural: rotations");
    fs::write(&path, edited).unwrap();

    let err = check_dir(dir.path()).unwrap_err();
    let ManifestError::Drift { drifted, .. } = &err else {
        panic!("want Drift, got {err}");
    };
    assert_eq!(drifted.len(), 1);
    assert_eq!(drifted[0].file_name, "keyrotation.yaml");
    assert!(
        drifted[0]
            .detail
            .contains("committed `plural: rotations`, generated `plural: keyrotations`"),
        "{}",
        drifted[0].detail
    );
    let text = err.to_string();
    assert!(
        text.contains("keyrotation.yaml") && text.contains("run `make crds`"),
        "{text}"
    );
    assert!(!text.contains("meshencryption.yaml"), "{text}");
}

#[test]
fn check_names_missing_and_truncated_files() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path()).unwrap();
    fs::remove_file(dir.path().join("meshencryption.yaml")).unwrap();
    let path = dir.path().join("keyrotation.yaml");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, &text[..text.len() / 2]).unwrap();

    let ManifestError::Drift { drifted, .. } = check_dir(dir.path()).unwrap_err() else {
        panic!("want Drift");
    };
    assert_eq!(drifted[0].file_name, "meshencryption.yaml");
    assert_eq!(drifted[0].detail, "file is missing");
    assert_eq!(drifted[1].file_name, "keyrotation.yaml");
    assert!(drifted[1].detail.contains("line"), "{}", drifted[1].detail);
}

#[test]
fn check_notices_a_missing_final_newline() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path()).unwrap();
    let path = dir.path().join("keyrotation.yaml");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.trim_end()).unwrap();
    let ManifestError::Drift { drifted, .. } = check_dir(dir.path()).unwrap_err() else {
        panic!("want Drift");
    };
    assert_eq!(drifted[0].detail, "line endings or trailing bytes differ");
}

// --- structural schema checker ---

/// A CRD whose root schema is `root` (as JSON), to feed the checker.
fn crd_with_schema(root: serde_json::Value) -> CustomResourceDefinition {
    let mut crd = manifests().unwrap().remove(0).crd;
    let schema: JSONSchemaProps = serde_json::from_value(root).expect("test schema parses");
    crd.spec.versions[0]
        .schema
        .as_mut()
        .unwrap()
        .open_api_v3_schema = Some(schema);
    crd
}

fn object_with(field: serde_json::Value) -> serde_json::Value {
    json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {"f": field}}}})
}

fn rejection(root: serde_json::Value) -> (String, String) {
    match check_structural(&crd_with_schema(root)) {
        Err(ManifestError::NotStructural { path, problem, .. }) => (path, problem),
        other => panic!("want NotStructural, got {other:?}"),
    }
}

#[test]
fn generated_schemas_are_structural() {
    for manifest in manifests().unwrap() {
        check_structural(&manifest.crd).unwrap();
    }
}

#[test]
fn rejects_a_node_without_type() {
    let (path, problem) = rejection(object_with(json!({"description": "no type"})));
    assert_eq!(path, "versions[v1alpha1].openAPIV3Schema.spec.f");
    assert!(problem.contains("non-empty type"), "{problem}");
    // ...unless it is int-or-string or preserves unknown fields.
    check_structural(&crd_with_schema(object_with(
        json!({"x-kubernetes-int-or-string": true}),
    )))
    .unwrap();
    check_structural(&crd_with_schema(object_with(
        json!({"x-kubernetes-preserve-unknown-fields": true}),
    )))
    .unwrap();
}

#[test]
fn rejects_junctors_and_refs() {
    let (_, problem) = rejection(object_with(
        json!({"type": "string", "anyOf": [{"type": "string"}, {"type": "integer"}]}),
    ));
    assert!(problem.contains("anyOf"), "{problem}");
    let (_, problem) = rejection(object_with(json!({"type": "object", "$ref": "#/x"})));
    assert!(problem.contains("$ref"), "{problem}");
}

#[test]
fn rejects_unknown_formats() {
    let (_, problem) = rejection(object_with(json!({"type": "integer", "format": "uint16"})));
    assert!(problem.contains("uint16"), "{problem}");
}

#[test]
fn rejects_bad_enum_and_default() {
    let (_, problem) = rejection(object_with(json!({"type": "string", "enum": ["A", 1]})));
    assert!(problem.contains("enum value 1"), "{problem}");
    let (_, problem) = rejection(object_with(
        json!({"type": "string", "enum": ["A", "B"], "default": "C"}),
    ));
    assert!(problem.contains("not one of the enum values"), "{problem}");
    let (_, problem) = rejection(object_with(json!({"type": "integer", "default": "1"})));
    assert!(problem.contains("not of type"), "{problem}");
}

#[test]
fn rejects_arrays_without_items_and_bad_list_types() {
    let (_, problem) = rejection(object_with(json!({"type": "array"})));
    assert!(problem.contains("items"), "{problem}");
    let (_, problem) = rejection(object_with(json!({
        "type": "array", "x-kubernetes-list-type": "set",
        "items": {"type": "object", "properties": {"a": {"type": "string"}}},
    })));
    assert!(problem.contains("scalar items"), "{problem}");
    let (_, problem) = rejection(object_with(json!({
        "type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
        "items": {"type": "object", "properties": {"name": {"type": "string"}}},
    })));
    assert!(problem.contains("required or defaulted"), "{problem}");
}

#[test]
fn rejects_properties_with_additional_properties() {
    let (_, problem) = rejection(object_with(json!({
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "additionalProperties": {"type": "string"},
    })));
    assert!(problem.contains("mutually exclusive"), "{problem}");
}

#[test]
fn rejects_metadata_restrictions_beyond_name() {
    let (path, problem) = rejection(json!({
        "type": "object",
        "properties": {"metadata": {"type": "object", "properties": {"labels": {"type": "object"}}}},
    }));
    assert!(path.ends_with("metadata.labels"), "{path}");
    assert!(problem.contains("name and generateName"), "{problem}");
    check_structural(&crd_with_schema(json!({
        "type": "object",
        "properties": {"metadata": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 7}}}},
    })))
    .unwrap();
}

#[test]
fn rejects_a_root_that_is_not_an_object() {
    let (_, problem) = rejection(json!({"type": "string"}));
    assert!(problem.contains("root"), "{problem}");
}

#[test]
fn reflow_joins_lines_and_keeps_paragraphs() {
    assert_eq!(reflow("one line"), "one line");
    assert_eq!(reflow("first\nsecond\nthird"), "first second third");
    assert_eq!(reflow("a\nb\n\nc\n d"), "a b\n\nc d");
}

#[test]
fn manifests_have_no_line_breaks_inside_paragraphs() {
    for manifest in manifests().unwrap() {
        let schema = serde_json::to_value(
            manifest.crd.spec.versions[0]
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema
                .as_ref()
                .unwrap(),
        )
        .unwrap();
        let mut descriptions = Vec::new();
        collect_descriptions(&schema, &mut descriptions);
        assert!(descriptions.len() > 10, "{}", manifest.file_name);
        for text in descriptions {
            assert!(
                !text.replace("\n\n", "").contains('\n'),
                "{}: {text:?}",
                manifest.file_name
            );
        }
    }
}

fn collect_descriptions(node: &serde_json::Value, out: &mut Vec<String>) {
    if let Some(text) = node.get("description").and_then(|d| d.as_str()) {
        out.push(text.to_owned());
    }
    if let Some(properties) = node.get("properties").and_then(|p| p.as_object()) {
        properties
            .values()
            .for_each(|child| collect_descriptions(child, out));
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = node.get(key) {
            collect_descriptions(child, out);
        }
    }
}
