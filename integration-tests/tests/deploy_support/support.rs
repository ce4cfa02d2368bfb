//! Shared setup of the deploy tests (`tests/deploy_*.rs`, included with `#[path]`): testenv on
//! loopback (no root needed), the real kubectl and helm of `make clients`, and the checkout's deploy/.

#![allow(dead_code)]

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use wiremesh_integration::{Testenv, TestenvOptions, clients};

/// The checkout's deploy/ folder.
pub fn deploy_dir() -> PathBuf {
    clients::repo_root().join("deploy")
}

/// The Helm chart.
pub fn chart_dir() -> PathBuf {
    deploy_dir().join("helm/wiremesh")
}

/// The kubectl of `make clients` (the test fails with the make target to run when it is missing).
pub fn kubectl_path() -> PathBuf {
    clients::kubectl().unwrap_or_else(|e| panic!("{e}"))
}

/// The helm of `make clients`.
pub fn helm_path() -> PathBuf {
    clients::helm().unwrap_or_else(|e| panic!("{e}"))
}

/// `kubectl --kubeconfig <kubeconfig> args...`, stdout; panics with stderr on failure.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    clients::run(
        Command::new(kubectl_path())
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// `helm template <release> <chart> --namespace <ns> args...`, stdout; panics on failure.
pub fn helm_template(release: &str, namespace: &str, args: &[&str]) -> String {
    clients::run(
        Command::new(helm_path())
            .args(["template", release])
            .arg(chart_dir())
            .args(["--namespace", namespace])
            .args(args),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Every document of a multi-document YAML text as JSON (empty documents skipped).
pub fn yaml_docs(text: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| serde_json::Value::deserialize(doc).expect("YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The one document of `kind` (panics when there is not exactly one).
pub fn only<'a>(docs: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    let found: Vec<&serde_json::Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "want exactly one {kind}, got {}",
        found.len()
    );
    found[0]
}

/// A testenv on loopback with system:node tokens for `nodes`, in a fresh directory removed at drop.
pub struct Env {
    pub testenv: Option<Testenv>,
    pub dir: PathBuf,
}

impl Env {
    pub async fn start(label: &str, nodes: &[&str]) -> Env {
        let dir = std::env::temp_dir().join(format!("wm-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let opts = TestenvOptions::new(
            Ipv4Addr::LOCALHOST,
            &dir,
            nodes.iter().map(|n| n.to_string()).collect(),
        );
        let testenv = tokio::task::spawn_blocking(move || Testenv::start(&opts))
            .await
            .expect("join")
            .expect("testenv starts");
        Env {
            testenv: Some(testenv),
            dir,
        }
    }

    pub fn testenv(&self) -> &Testenv {
        self.testenv.as_ref().expect("testenv running")
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.testenv().kubeconfig_path().to_owned()
    }

    pub async fn admin(&self) -> kube::Client {
        self.testenv().admin_client().await.expect("admin client")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(t) = self.testenv.take()
            && let Err(e) = t.stop()
        {
            eprintln!("testenv stop: {e}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `kubectl apply --server-side -k deploy/` then `-f deploy/meshencryption.yaml` (after the CRDs
/// exist), as docs/install.md says; returns the names kubectl reported applied.
pub fn apply_deploy_dir(kubeconfig: &Path) -> Vec<String> {
    let deploy = deploy_dir();
    let mut applied = applied_names(&kubectl(
        kubeconfig,
        &[
            "apply",
            "--server-side",
            "-k",
            deploy.to_str().expect("utf-8 path"),
        ],
    ));
    kubectl(
        kubeconfig,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ],
    );
    applied.extend(applied_names(&kubectl(
        kubeconfig,
        &[
            "apply",
            "--server-side",
            "-f",
            deploy
                .join("meshencryption.yaml")
                .to_str()
                .expect("utf-8 path"),
        ],
    )));
    applied
}

/// `kind.group/name` of every "... serverside-applied" line of kubectl's output.
pub fn applied_names(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.strip_suffix(" serverside-applied"))
        .map(str::to_owned)
        .collect()
}
