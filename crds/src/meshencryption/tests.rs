//! MeshEncryption: wire format, defaults, spec accessors and the generated schema.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResourceExt, Resource};
use serde_json::{Value, json};

use super::*;
use crate::{
    conditions::{ConditionStatus, new_condition},
    test_support::{at, printer_columns, rules, schema, ts},
};

fn crd() -> CustomResourceDefinition {
    MeshEncryption::crd()
}

#[test]
fn enabled_alone_is_a_complete_spec() {
    let spec: MeshEncryptionSpec = serde_json::from_value(json!({"enabled": true})).unwrap();
    assert_eq!(
        spec,
        MeshEncryptionSpec {
            enabled: true,
            mode: EncryptionMode::Permissive,
            node_encryption: false,
            key_rotation_interval: "720h".into(),
            listen_port: 51871,
            mtu: None,
            datapath: DatapathMode::Auto,
            pod_cidrs: vec![],
            service_cidrs: vec![],
        }
    );
    assert_eq!(
        spec,
        MeshEncryptionSpec {
            enabled: true,
            ..MeshEncryptionSpec::default()
        }
    );
}

#[test]
fn enabled_is_required() {
    let err = serde_json::from_value::<MeshEncryptionSpec>(json!({"mode": "Strict"})).unwrap_err();
    assert!(err.to_string().contains("enabled"), "{err}");
}

#[test]
fn unknown_enum_values_are_rejected() {
    for (field, value) in [("mode", "strict"), ("mode", "Off"), ("datapath", "Ebpf")] {
        let result =
            serde_json::from_value::<MeshEncryptionSpec>(json!({"enabled": true, field: value}));
        assert!(result.is_err(), "{field}={value} must not parse");
    }
}

#[test]
fn full_object_round_trips_in_camel_case() {
    let mut object = MeshEncryption::new(
        MESH_ENCRYPTION_NAME,
        MeshEncryptionSpec {
            enabled: true,
            mode: EncryptionMode::Strict,
            node_encryption: true,
            key_rotation_interval: "168h".into(),
            listen_port: 51820,
            mtu: Some(1420),
            datapath: DatapathMode::Userspace,
            pod_cidrs: vec!["10.244.0.0/16".into()],
            service_cidrs: vec!["10.96.0.0/12".into()],
        },
    );
    let mut status = MeshEncryptionStatus {
        observed_generation: Some(2),
        ..Default::default()
    };
    status.set_node_counts(2, 3);
    status.conditions.push(
        new_condition(
            CONDITION_READY,
            ConditionStatus::False,
            "NodesNotReady",
            "node-c has no handshake",
            Some(2),
            ts("2026-11-24T10:00:00Z"),
        )
        .unwrap(),
    );
    object.status = Some(status);

    let value = serde_json::to_value(&object).unwrap();
    assert_eq!(value["apiVersion"], "wiremesh.io/v1alpha1");
    assert_eq!(value["kind"], "MeshEncryption");
    assert_eq!(value["metadata"]["name"], "default");
    assert_eq!(
        value["spec"],
        json!({
            "enabled": true,
            "mode": "Strict",
            "nodeEncryption": true,
            "keyRotationInterval": "168h",
            "listenPort": 51820,
            "mtu": 1420,
            "datapath": "Userspace",
            "podCIDRs": ["10.244.0.0/16"],
            "serviceCIDRs": ["10.96.0.0/12"],
        })
    );
    assert_eq!(value["status"]["nodesReady"], 2);
    assert_eq!(value["status"]["nodesTotal"], 3);
    assert_eq!(value["status"]["ready"], "2/3");
    assert_eq!(value["status"]["observedGeneration"], 2);
    assert_eq!(value["status"]["conditions"][0]["reason"], "NodesNotReady");

    let back: MeshEncryption = serde_json::from_value(value).unwrap();
    assert_eq!(back, object);
    let yaml = serde_yaml::to_string(&object).unwrap();
    let back: MeshEncryption = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(back, object);
}

#[test]
fn unset_mtu_is_omitted_and_empty_status_parses() {
    let value = serde_json::to_value(MeshEncryptionSpec::default()).unwrap();
    assert!(value.get("mtu").is_none(), "{value}");
    let status: MeshEncryptionStatus = serde_json::from_value(json!({})).unwrap();
    assert_eq!(status, MeshEncryptionStatus::default());
}

#[test]
fn example_manifest_from_the_docs_parses() {
    let object: MeshEncryption = serde_yaml::from_str(
        "apiVersion: wiremesh.io/v1alpha1\n\
         kind: MeshEncryption\n\
         metadata:\n  name: default\n\
         spec:\n  enabled: true\n  mode: Strict\n  keyRotationInterval: 1h30m\n",
    )
    .unwrap();
    assert_eq!(object.metadata.name.as_deref(), Some("default"));
    assert_eq!(object.spec.mode, EncryptionMode::Strict);
    assert_eq!(
        object.spec.key_rotation_interval(),
        Ok(Some(Duration::from_secs(5400)))
    );
    assert!(object.status.is_none());
}

#[test]
fn key_rotation_interval_accessor() {
    let with = |interval: &str| MeshEncryptionSpec {
        enabled: true,
        key_rotation_interval: interval.into(),
        ..Default::default()
    };
    assert_eq!(
        with("720h").key_rotation_interval(),
        Ok(Some(Duration::from_secs(720 * 3600)))
    );
    assert_eq!(
        with("1h").key_rotation_interval(),
        Ok(Some(MIN_KEY_ROTATION_INTERVAL))
    );
    assert_eq!(with("0s").key_rotation_interval(), Ok(None));
    assert_eq!(
        with("59m59s").key_rotation_interval(),
        Err(SpecError::KeyRotationIntervalTooShort {
            value: "59m59s".into()
        })
    );
    let err = with("30d").key_rotation_interval().unwrap_err();
    assert!(
        matches!(err, SpecError::KeyRotationInterval { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("keyRotationInterval \"30d\""),
        "{err}"
    );
}

#[test]
fn traffic_is_steered_only_when_enabled_and_not_disabled() {
    let spec = |enabled, mode| MeshEncryptionSpec {
        enabled,
        mode,
        ..Default::default()
    };
    assert!(spec(true, EncryptionMode::Permissive).steers_traffic());
    assert!(spec(true, EncryptionMode::Strict).steers_traffic());
    assert!(!spec(true, EncryptionMode::Disabled).steers_traffic());
    assert!(!spec(false, EncryptionMode::Strict).steers_traffic());
}

#[test]
fn node_counts_and_ready_text_move_together() {
    let mut status = MeshEncryptionStatus::default();
    status.set_node_counts(0, 5);
    assert_eq!(status.ready.as_deref(), Some("0/5"));
    status.set_node_counts(5, 5);
    assert_eq!((status.nodes_ready, status.nodes_total), (5, 5));
    assert_eq!(status.ready.as_deref(), Some("5/5"));
}

#[test]
fn resource_identity() {
    assert_eq!(MeshEncryption::group(&()), "wiremesh.io");
    assert_eq!(MeshEncryption::version(&()), "v1alpha1");
    assert_eq!(MeshEncryption::plural(&()), "meshencryptions");
    let crd = crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("meshencryptions.wiremesh.io")
    );
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.versions[0].name, "v1alpha1");
    assert!(crd.spec.versions[0].served && crd.spec.versions[0].storage);
    let subresources = crd.spec.versions[0].subresources.as_ref().unwrap();
    assert!(
        subresources.status.is_some(),
        "status must be a subresource"
    );
}

#[test]
fn schema_enforces_the_singleton_name() {
    let schema = schema(&crd());
    assert_eq!(rules(&schema), ["self.metadata.name == 'default'"]);
    let message = &schema["x-kubernetes-validations"][0]["message"];
    assert!(message.as_str().unwrap().contains("singleton"), "{message}");
}

#[test]
fn schema_enums_and_defaults() {
    let schema = schema(&crd());
    let spec = at(&schema, "spec");
    assert_eq!(spec["required"], json!(["enabled"]));
    assert_eq!(at(&schema, "spec.enabled")["type"], "boolean");
    assert_eq!(
        at(&schema, "spec.mode")["enum"],
        json!(["Disabled", "Permissive", "Strict"])
    );
    assert_eq!(at(&schema, "spec.mode")["default"], "Permissive");
    assert_eq!(
        at(&schema, "spec.datapath")["enum"],
        json!(["Auto", "Kernel", "Userspace"])
    );
    assert_eq!(at(&schema, "spec.datapath")["default"], "Auto");
    assert_eq!(at(&schema, "spec.nodeEncryption")["default"], false);
    assert_eq!(at(&schema, "spec.keyRotationInterval")["default"], "720h");
    assert_eq!(at(&schema, "spec.listenPort")["default"], 51871);
    assert!(at(&schema, "spec.mtu").get("default").is_none());
}

#[test]
fn schema_ranges() {
    let schema = schema(&crd());
    let port = at(&schema, "spec.listenPort");
    assert_eq!(
        (port["type"].as_str(), port["format"].as_str()),
        (Some("integer"), Some("int32"))
    );
    assert_eq!(port["minimum"].as_f64(), Some(1.0));
    assert_eq!(port["maximum"].as_f64(), Some(65535.0));
    let mtu = at(&schema, "spec.mtu");
    assert_eq!(mtu["minimum"].as_f64(), Some(f64::from(MIN_MTU)));
    assert_eq!(mtu["maximum"].as_f64(), Some(f64::from(MAX_MTU)));
    assert_eq!(mtu["nullable"], true);
    for field in ["status.nodesReady", "status.nodesTotal"] {
        assert_eq!(at(&schema, field)["minimum"].as_f64(), Some(0.0), "{field}");
    }
}

#[test]
fn schema_validates_the_rotation_interval() {
    let schema = schema(&crd());
    let interval = at(&schema, "spec.keyRotationInterval");
    assert_eq!(
        rules(interval),
        ["duration(self) == duration('0s') || duration(self) >= duration('1h')"]
    );
    assert_eq!(interval["maxLength"], 32);
    assert!(interval["pattern"].is_string());
}

/// The API server checks the pattern, agents use the parser: they must accept the same strings.
#[test]
fn duration_pattern_and_parser_agree() {
    let schema = schema(&crd());
    let pattern = at(&schema, "spec.keyRotationInterval")["pattern"]
        .as_str()
        .unwrap()
        .to_owned();
    let re = regex::Regex::new(&pattern).unwrap();
    let samples = [
        "720h",
        "1h30m",
        "1.5h",
        "0s",
        "90m",
        "45s",
        "250ms",
        "7us",
        "7µs",
        "7μs",
        "3ns",
        "2h45m30.5s",
        "",
        "h",
        "720",
        "-5m",
        "+5m",
        "1.h",
        ".5h",
        "3d",
        "1 h",
        "1H",
        "1h ",
        " 1h",
        "1e3h",
        "0",
    ];
    for sample in samples {
        assert_eq!(
            re.is_match(sample),
            crate::duration::parse_go_duration(sample).is_ok(),
            "{sample:?}"
        );
    }
}

#[test]
fn printer_columns_show_enabled_mode_ready_and_age() {
    let columns = printer_columns(&crd());
    let default_view: Vec<_> = columns
        .iter()
        .filter(|c| c.3 == 0)
        .map(|(name, type_, path, _)| (name.as_str(), type_.as_str(), path.as_str()))
        .collect();
    assert_eq!(
        default_view,
        [
            ("Enabled", "boolean", ".spec.enabled"),
            ("Mode", "string", ".spec.mode"),
            ("Ready", "string", ".status.ready"),
            ("Age", "date", ".metadata.creationTimestamp"),
        ]
    );
    assert!(columns.iter().any(|c| c.0 == "Datapath" && c.3 == 1));
}

#[test]
fn printer_column_paths_exist_in_the_schema() {
    let crd = crd();
    let schema = schema(&crd);
    for (name, _, path, _) in printer_columns(&crd) {
        if path.starts_with(".metadata.") {
            continue;
        }
        let node: &Value = at(&schema, path.trim_start_matches('.'));
        assert!(
            node.get("type").is_some(),
            "column {name}: {path} has no type"
        );
    }
}

#[test]
fn status_conditions_are_a_list_map() {
    let schema = schema(&crd());
    let conditions = at(&schema, "status.conditions");
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
}

#[test]
fn pod_and_service_cidrs_parse_with_host_bits_cleared() {
    let spec: MeshEncryptionSpec = serde_json::from_value(json!({
        "enabled": true,
        "podCIDRs": ["10.244.1.7/16", "fd00::/48"],
        "serviceCIDRs": ["10.96.0.0/12"],
    }))
    .unwrap();
    assert_eq!(
        spec.pod_cidrs().unwrap(),
        vec![
            "10.244.0.0/16".parse::<ipnet::IpNet>().unwrap(),
            "fd00::/48".parse().unwrap()
        ]
    );
    assert_eq!(spec.service_cidrs().unwrap().len(), 1);
    let bad = MeshEncryptionSpec {
        pod_cidrs: vec!["10.244.0.0".into()],
        ..MeshEncryptionSpec::default()
    };
    assert!(
        bad.pod_cidrs()
            .unwrap_err()
            .to_string()
            .contains("podCIDRs")
    );
    let schema = schema(&crd());
    let rules = rules(at(&schema, "spec.podCIDRs"));
    assert!(rules.iter().any(|r| r.contains("isCIDR")), "{rules:?}");
}
