//! The Helm chart deploy/helm/wiremesh is the one source of truth of deploy/: `helm lint --strict`
//! passes, `helm template` renders what the values say, and the committed deploy/*.yaml are exactly
//! what `make deploy-manifests` renders from it. No cluster needed.

#[path = "deploy_support/support.rs"]
mod support;

use std::process::Command;

use serde_json::{Value, json};
use support::*;
use wiremesh_integration::clients;

#[test]
fn helm_lint_passes_strict() {
    let out = clients::run(
        Command::new(helm_path())
            .args(["lint", "--strict"])
            .arg(chart_dir()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn deploy_dir_is_rendered_from_the_chart() {
    let out = std::env::temp_dir().join(format!("wm-deploy-render-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    clients::run(
        Command::new(clients::repo_root().join("hack/render-deploy.sh"))
            .arg(helm_path())
            .arg(&out),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for file in ["wiremesh.yaml", "meshencryption.yaml", "kustomization.yaml"] {
        let fresh = std::fs::read_to_string(out.join(file)).expect("rendered file");
        let committed = std::fs::read_to_string(deploy_dir().join(file)).unwrap_or_default();
        assert!(
            fresh == committed,
            "deploy/{file} differs from what the chart renders: run `make deploy-manifests` and commit"
        );
    }
    std::fs::remove_dir_all(&out).expect("remove render dir");
}

fn container<'a>(ds: &'a Value, name: &str) -> Option<&'a Value> {
    ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| &e["value"])
}

#[test]
fn default_values_render_a_least_privilege_daemonset() {
    let docs = yaml_docs(&helm_template("wiremesh", "kube-system", &[]));
    let ds = only(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], "wiremesh-agent");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(
        ds["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}})
    );

    let agent = container(ds, "agent").expect("agent container");
    assert_eq!(agent["args"], json!(["run"]));
    assert_eq!(
        agent["securityContext"]["capabilities"],
        json!({"drop": ["ALL"], "add": ["NET_ADMIN", "BPF", "PERFMON"]})
    );
    assert_eq!(agent["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                agent["resources"][kind][resource].is_string(),
                "agent {kind}.{resource}"
            );
        }
    }
    assert_eq!(
        env(agent, "WIREMESH_METRICS_ADDR"),
        Some(&json!("0.0.0.0:9871"))
    );
    assert_eq!(env(agent, "WIREMESH_DATAPATH"), Some(&json!("auto")));
    let mounts: Vec<&str> = agent["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| m["mountPath"].as_str().expect("path"))
        .collect();
    assert_eq!(
        mounts,
        ["/var/lib/wiremesh", "/sys/fs/bpf", "/var/run/wireguard"]
    );

    // The userspace device in its own container, sharing the UAPI socket folder.
    let device = container(ds, "device").expect("device container");
    assert_eq!(
        device["args"],
        json!(["device", "wiremesh0", "--foreground", "--threads=0"])
    );
    assert_eq!(
        device["securityContext"]["capabilities"],
        json!({"drop": ["ALL"], "add": ["NET_ADMIN"]})
    );
    assert!(
        device["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .any(|m| m["mountPath"] == "/dev/net/tun")
    );

    // The second tunnel slot's device (key rotation's next world), the same but for its interface.
    let device_b = container(ds, "device-b").expect("device-b container");
    assert_eq!(
        device_b["args"],
        json!(["device", "wiremesh1", "--foreground", "--threads=0"])
    );
    assert_eq!(
        device_b["securityContext"], device["securityContext"],
        "both devices run alike"
    );
    assert_eq!(
        env(agent, "WIREMESH_INTERFACE_B"),
        Some(&json!("wiremesh1"))
    );

    let mesh = only(&docs, "MeshEncryption");
    assert_eq!(
        mesh["spec"],
        json!({"enabled": true, "mode": "Permissive", "nodeEncryption": false, "datapath": "Auto",
               "listenPort": 51871, "keyRotationInterval": "720h"})
    );
    assert_eq!(
        docs.iter()
            .filter(|d| d["kind"] == "ValidatingAdmissionPolicy")
            .count(),
        2
    );
}

#[test]
fn values_reach_the_objects() {
    let text = helm_template(
        "edge",
        "wiremesh-edge",
        &[
            "--set",
            "meshEncryption.mode=Strict,meshEncryption.datapath=Kernel,meshEncryption.mtu=1380",
            "--set",
            "meshEncryption.listenPort=51999,meshEncryption.keyRotationInterval=24h",
            "--set",
            "meshEncryption.podCIDRs={10.0.0.0/16,fd00::/64}",
            "--set",
            "image.repository=registry.example/wm,image.tag=v9,admissionPolicy.enabled=false",
            "--set",
            "agent.resources.limits.memory=1Gi",
        ],
    );
    let docs = yaml_docs(&text);
    let ds = only(&docs, "DaemonSet");
    assert_eq!(ds["metadata"]["name"], "edge-wiremesh-agent");
    assert_eq!(ds["metadata"]["namespace"], "wiremesh-edge");
    // Kernel datapath: no userspace device container, no TUN.
    assert!(container(ds, "device").is_none(), "no device with Kernel");
    assert!(
        container(ds, "device-b").is_none(),
        "no device-b with Kernel"
    );
    let agent = container(ds, "agent").expect("agent");
    assert_eq!(agent["image"], "registry.example/wm:v9");
    assert_eq!(env(agent, "WIREMESH_DATAPATH"), Some(&json!("kernel")));
    assert_eq!(agent["resources"]["limits"]["memory"], "1Gi");
    let mesh = only(&docs, "MeshEncryption");
    assert_eq!(
        mesh["spec"],
        json!({"enabled": true, "mode": "Strict", "nodeEncryption": false, "datapath": "Kernel",
               "listenPort": 51999, "mtu": 1380, "keyRotationInterval": "24h",
               "podCIDRs": ["10.0.0.0/16", "fd00::/64"]})
    );
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "ValidatingAdmissionPolicy"),
        "admissionPolicy.enabled=false renders no policy"
    );
    let binding = only(&docs, "ClusterRoleBinding");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "wiremesh-agent", "namespace": "wiremesh-edge"}])
    );

    // The userspace device gets the MTU.
    let docs = yaml_docs(&helm_template(
        "wiremesh",
        "kube-system",
        &["--set", "meshEncryption.mtu=1380"],
    ));
    let device = container(only(&docs, "DaemonSet"), "device").expect("device");
    assert_eq!(
        device["args"],
        json!([
            "device",
            "wiremesh0",
            "--foreground",
            "--threads=0",
            "--mtu=1380"
        ])
    );
}

#[test]
fn a_bad_datapath_value_fails_the_render() {
    let err = clients::run(
        Command::new(helm_path())
            .args(["template", "wiremesh"])
            .arg(chart_dir())
            .args(["--set", "meshEncryption.datapath=ebpf"]),
    )
    .expect_err("an unknown datapath must not render");
    assert!(
        err.to_string()
            .contains("meshEncryption.datapath must be Auto, Kernel or Userspace"),
        "{err}"
    );
}
