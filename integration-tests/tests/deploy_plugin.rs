//! meshctl as the kubectl plugin `kubectl-wiremesh`, run through the real kubectl of `make clients`
//! against a virtual cluster: `kubectl wiremesh status` with kubectl's `--kubeconfig`, `--context`,
//! `-n` and `-o json|yaml|wide`.

#[path = "mesh_support/support.rs"]
mod mesh;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use mesh::{Shape, start_mesh_or_skip};
use wiremesh_integration::clients;

/// The meshctl executable under test.
fn meshctl_binary() -> PathBuf {
    mesh::workspace_binary("meshctl", "WIREMESH_MESHCTL_BIN")
}

/// `kubectl wiremesh args...` with only `plugins` on PATH besides the system directories, so the
/// plugin found is ours.
fn kubectl_wiremesh(plugins: &Path, args: &[&str]) -> Output {
    let kubectl = clients::kubectl().unwrap_or_else(|e| panic!("{e}"));
    Command::new(kubectl)
        .arg("wiremesh")
        .args(args)
        .env(
            "PATH",
            format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", plugins.display()),
        )
        .env_remove("KUBECONFIG")
        .output()
        .expect("run kubectl")
}

fn stdout_of(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_wiremesh_status_through_the_real_kubectl() {
    let Some(cluster) = start_mesh_or_skip(Shape::new(2, 1)).await else {
        return;
    };
    let kubeconfig = cluster
        .kubeconfig_path()
        .expect("admin kubeconfig")
        .display()
        .to_string();
    let plugins = cluster.work_dir().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    // What `make install-plugin` does.
    std::os::unix::fs::symlink(meshctl_binary(), plugins.join("kubectl-wiremesh"))
        .expect("plugin symlink");

    let list = stdout_of(
        &Command::new(clients::kubectl().expect("kubectl"))
            .args(["plugin", "list", "--name-only"])
            .env("PATH", plugins.display().to_string())
            .output()
            .expect("kubectl plugin list"),
        "kubectl plugin list",
    );
    assert!(list.contains("kubectl-wiremesh"), "{list}");

    let json = stdout_of(
        &kubectl_wiremesh(
            &plugins,
            &["status", "--kubeconfig", &kubeconfig, "-o", "json"],
        ),
        "status -o json",
    );
    let status: serde_json::Value = serde_json::from_str(&json).expect("JSON status");
    let nodes: Vec<&str> = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["name"].as_str().expect("name"))
        .collect();
    assert_eq!(nodes, ["node-1", "node-2"]);

    let yaml = stdout_of(
        &kubectl_wiremesh(
            &plugins,
            &[
                "status",
                "--kubeconfig",
                &kubeconfig,
                "--context",
                "testenv",
                "-o",
                "yaml",
            ],
        ),
        "status -o yaml",
    );
    let from_yaml: serde_json::Value = serde_yaml::from_str(&yaml).expect("YAML status");
    // Two invocations, so the ages may have ticked in between: compare all but them.
    assert_eq!(
        without_ages(from_yaml["nodes"].clone()),
        without_ages(status["nodes"].clone()),
        "YAML and JSON agree"
    );

    let wide = stdout_of(
        &kubectl_wiremesh(
            &plugins,
            &[
                "status",
                "--kubeconfig",
                &kubeconfig,
                "-n",
                "kube-system",
                "-o",
                "wide",
            ],
        ),
        "status -o wide",
    );
    assert!(wide.starts_with("NODE"), "{wide}");
    assert!(wide.contains("PROBLEMS"), "{wide}");
    assert_eq!(
        wide.lines().filter(|l| l.contains("converged")).count(),
        2,
        "{wide}"
    );

    // The default table, with KUBECONFIG from the environment as kubectl users have it.
    let kubectl = clients::kubectl().expect("kubectl");
    let table = stdout_of(
        &Command::new(kubectl)
            .args(["wiremesh", "status"])
            .env("PATH", format!("{}:/usr/bin:/bin", plugins.display()))
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .expect("kubectl wiremesh status"),
        "status (table)",
    );
    assert!(table.contains("MeshEncryption default: enabled"), "{table}");

    // A context the kubeconfig does not have is an error, not a silent fallback.
    let bad = kubectl_wiremesh(
        &plugins,
        &[
            "status",
            "--kubeconfig",
            &kubeconfig,
            "--context",
            "no-such-context",
        ],
    );
    assert!(!bad.status.success(), "an unknown context must fail");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("no-such-context"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    cluster.teardown().expect("teardown");
}

/// `value` without its `...AgeSecs` fields (at any depth).
fn without_ages(mut value: serde_json::Value) -> serde_json::Value {
    match &mut value {
        serde_json::Value::Object(map) => {
            map.retain(|k, _| !k.ends_with("AgeSecs"));
            for v in map.values_mut() {
                *v = without_ages(v.take());
            }
        }
        serde_json::Value::Array(items) => {
            for v in items.iter_mut() {
                *v = without_ages(v.take());
            }
        }
        _ => {}
    }
    value
}
