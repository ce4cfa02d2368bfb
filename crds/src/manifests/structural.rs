//! The rules the API server applies to a CRD's `openAPIV3Schema` before it accepts it: the
//! "structural schema" rules, plus the ones kube-derive and schemars output could break (a
//! `type` list for an `Option`, `$ref`s, unknown integer formats, list types on the wrong items).
//! Checked here so a bad schema fails `cargo test`, not the first `kubectl apply`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Map, Value};

use super::ManifestError;

/// Formats the API server knows; anything else draws a warning and is not validated.
const KNOWN_FORMATS: &[&str] = &[
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "date-time",
    "int32",
    "int64",
    "float",
    "double",
];

const TYPES: &[&str] = &["object", "array", "string", "integer", "number", "boolean"];
const JUNCTORS: &[&str] = &["allOf", "anyOf", "oneOf", "not"];

/// Checks every version's schema of `crd`; the error names the CRD, the JSON path and the rule.
pub fn check_structural(crd: &CustomResourceDefinition) -> Result<(), ManifestError> {
    let crd_name = crd.metadata.name.clone().unwrap_or_default();
    let fail = |path: &str, problem: String| ManifestError::NotStructural {
        crd: crd_name.clone(),
        path: path.to_owned(),
        problem,
    };
    for version in &crd.spec.versions {
        let root_path = format!("versions[{}].openAPIV3Schema", version.name);
        let Some(schema) = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
        else {
            return Err(fail(&root_path, "no schema".to_owned()));
        };
        let value = serde_json::to_value(schema)
            .map_err(|e| fail(&root_path, format!("schema does not serialize: {e}")))?;
        let Value::Object(root) = &value else {
            return Err(fail(&root_path, "schema is not an object".to_owned()));
        };
        if root.get("type").and_then(Value::as_str) != Some("object") {
            return Err(fail(&root_path, "root must have type object".to_owned()));
        }
        check_node(root, &root_path).map_err(|(path, problem)| fail(&path, problem))?;
        check_metadata(root, &root_path).map_err(|(path, problem)| fail(&path, problem))?;
    }
    Ok(())
}

type Violation = (String, String);

/// One schema node and, recursively, everything under it.
fn check_node(node: &Map<String, Value>, path: &str) -> Result<(), Violation> {
    let problem = |text: &str| Err((path.to_owned(), text.to_owned()));
    let int_or_string = node.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve_unknown =
        node.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));

    for key in [
        "$ref",
        "definitions",
        "$defs",
        "$schema",
        "const",
        "examples",
    ] {
        if node.contains_key(key) {
            return Err((
                path.to_owned(),
                format!("`{key}` is not allowed in a CRD schema"),
            ));
        }
    }
    for junctor in JUNCTORS {
        if node.contains_key(*junctor) && !int_or_string {
            return Err((
                path.to_owned(),
                format!(
                    "`{junctor}` is not used by wiremesh schemas and needs the structural rules for junctors"
                ),
            ));
        }
    }

    let type_ = match node.get("type") {
        Some(Value::String(t)) if TYPES.contains(&t.as_str()) => Some(t.as_str()),
        Some(Value::String(t)) => return Err((path.to_owned(), format!("unknown type {t:?}"))),
        Some(other) => {
            return Err((
                path.to_owned(),
                format!("type must be one string, not {other} (an Option needs `nullable: true`)"),
            ));
        }
        None => None,
    };
    if type_.is_none() && !int_or_string && !preserve_unknown {
        return problem("every node needs a non-empty type");
    }

    if let Some(format) = node.get("format").and_then(Value::as_str)
        && !KNOWN_FORMATS.contains(&format)
    {
        return Err((
            path.to_owned(),
            format!("format {format:?} is unknown to the API server"),
        ));
    }

    if node.get("uniqueItems") == Some(&Value::Bool(true)) {
        return problem("uniqueItems: true is forbidden; use x-kubernetes-list-type: set");
    }

    if let Some(Value::Array(rules)) = node.get("x-kubernetes-validations") {
        for rule in rules {
            if rule
                .get("rule")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return problem("x-kubernetes-validations entry without a rule");
            }
        }
    }

    if let Some(values) = node.get("enum") {
        let Value::Array(values) = values else {
            return problem("enum must be a list");
        };
        if values.is_empty() {
            return problem("enum must not be empty");
        }
        for value in values {
            if !value_matches_type(value, type_) && !value.is_null() {
                return Err((
                    path.to_owned(),
                    format!("enum value {value} is not of type {type_:?}"),
                ));
            }
        }
    }

    if let Some(default) = node.get("default") {
        if !value_matches_type(default, type_) {
            return Err((
                path.to_owned(),
                format!("default {default} is not of type {type_:?}"),
            ));
        }
        if let Some(Value::Array(values)) = node.get("enum")
            && !values.contains(default)
        {
            return Err((
                path.to_owned(),
                format!("default {default} is not one of the enum values"),
            ));
        }
    }

    let properties = node.get("properties");
    let additional = node.get("additionalProperties");
    if properties.is_some() && additional.is_some() {
        return problem("properties and additionalProperties are mutually exclusive");
    }
    if (properties.is_some() || additional.is_some()) && type_ != Some("object") {
        return problem("properties need type object");
    }
    if let Some(properties) = properties {
        let Value::Object(properties) = properties else {
            return problem("properties must be a map");
        };
        for (name, child) in properties {
            let Value::Object(child) = child else {
                return Err((
                    format!("{path}.{name}"),
                    "schema is not an object".to_owned(),
                ));
            };
            check_node(child, &format!("{path}.{name}"))?;
        }
        if let Some(Value::Array(required)) = node.get("required") {
            for name in required {
                let name = name.as_str().unwrap_or_default();
                if !properties.contains_key(name) {
                    return Err((
                        path.to_owned(),
                        format!("required field {name:?} has no schema"),
                    ));
                }
            }
        }
    }
    match additional {
        None => {}
        Some(Value::Object(child)) => check_node(child, &format!("{path}.additionalProperties"))?,
        Some(Value::Bool(true)) => {
            return problem("additionalProperties: true; use x-kubernetes-preserve-unknown-fields");
        }
        Some(_) => return problem("additionalProperties must be a schema"),
    }

    if type_ == Some("array") {
        let Some(Value::Object(items)) = node.get("items") else {
            return problem("arrays need one items schema");
        };
        check_node(items, &format!("{path}[]"))?;
        check_list_type(node, items, path)?;
    } else if node.contains_key("items") {
        return problem("items need type array");
    }
    Ok(())
}

/// `x-kubernetes-list-type`: `set` holds scalars, `map` holds objects whose keys are required.
fn check_list_type(
    node: &Map<String, Value>,
    items: &Map<String, Value>,
    path: &str,
) -> Result<(), Violation> {
    let problem = |text: String| Err((path.to_owned(), text));
    let item_type = items.get("type").and_then(Value::as_str);
    match node.get("x-kubernetes-list-type").and_then(Value::as_str) {
        None | Some("atomic") => Ok(()),
        Some("set") if matches!(item_type, Some("string" | "integer" | "number" | "boolean")) => {
            Ok(())
        }
        Some("set") => problem("x-kubernetes-list-type set needs scalar items".to_owned()),
        Some("map") => {
            if item_type != Some("object") {
                return problem("x-kubernetes-list-type map needs object items".to_owned());
            }
            let Some(Value::Array(keys)) = node.get("x-kubernetes-list-map-keys") else {
                return problem(
                    "x-kubernetes-list-type map needs x-kubernetes-list-map-keys".to_owned(),
                );
            };
            let required: Vec<&str> = items
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for key in keys {
                let key = key.as_str().unwrap_or_default();
                let has_default = items
                    .get("properties")
                    .and_then(|p| p.get(key))
                    .is_some_and(|p| p.get("default").is_some());
                if !required.contains(&key) && !has_default {
                    return problem(format!(
                        "list map key {key:?} must be required or defaulted"
                    ));
                }
            }
            Ok(())
        }
        Some(other) => problem(format!("unknown x-kubernetes-list-type {other:?}")),
    }
}

/// The root may restrict only `metadata.name` and `metadata.generateName`; the rest of
/// `metadata` is the API server's.
fn check_metadata(root: &Map<String, Value>, path: &str) -> Result<(), Violation> {
    let Some(metadata) = root.get("properties").and_then(|p| p.get("metadata")) else {
        return Ok(());
    };
    let Value::Object(metadata) = metadata else {
        return Err((
            format!("{path}.metadata"),
            "schema is not an object".to_owned(),
        ));
    };
    for key in metadata.keys() {
        if !matches!(key.as_str(), "type" | "properties" | "description") {
            return Err((
                format!("{path}.metadata"),
                format!("`{key}` is not allowed on metadata"),
            ));
        }
    }
    if let Some(Value::Object(properties)) = metadata.get("properties") {
        for name in properties.keys() {
            if !matches!(name.as_str(), "name" | "generateName") {
                return Err((
                    format!("{path}.metadata.{name}"),
                    "only name and generateName may be restricted".to_owned(),
                ));
            }
        }
    }
    Ok(())
}

fn value_matches_type(value: &Value, type_: Option<&str>) -> bool {
    match type_ {
        None => true,
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some(_) => false,
    }
}
