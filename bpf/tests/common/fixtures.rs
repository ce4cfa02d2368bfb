//! Fixtures shared by the privileged bpf tests (`tests/datapath.rs`, `tests/retain.rs`, both
//! include this file with `#[path]`): the root check, command runners, a private bpffs and the
//! Kubernetes manifests of the two test pods.

use std::{path::PathBuf, process::Command};

/// Whether privileged tests can run; panics under CI without root (the check the mesh tests
/// use too).
pub fn root_or_skip(test: &str) -> bool {
    wiremesh_integration::have_root(&format!("netns, bpf; test {test}"))
}

/// Runs a command, panicking with its output on failure.
pub fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private bpffs mounted on a temporary directory (unmounted on drop, also when a test
/// panics).
pub struct Bpffs {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Bpffs {
    /// Mounts a bpffs on a new temporary directory named after `id` (unique per test).
    pub fn new(id: &str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("wmb-bpffs-{id}-"))
            .tempdir()
            .expect("tempdir");
        let dir = tmp.path().to_owned();
        run(&[
            "mount",
            "-t",
            "bpf",
            "bpf",
            dir.to_str().expect("utf-8 path"),
        ]);
        Bpffs { dir, _tmp: tmp }
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// Namespace `t` with pods `a` (label app=a, address `ip_a`) and `b` (app=b, `ip_b`): the
/// start of every test manifest; policies are appended as further YAML documents.
pub fn two_pods(ip_a: &str, ip_b: &str) -> String {
    let pod = |name: &str, ip: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\n\
             metadata: {{name: {name}, namespace: t, labels: {{app: {name}}}}}\n\
             spec: {{containers: [{{name: c, image: x}}]}}\n\
             status: {{podIP: \"{ip}\"}}\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: t}}\n{}{}",
        pod("a", ip_a),
        pod("b", ip_b)
    )
}

/// The IPv4 pods of the datapath topology: a 10.201.1.2, b 10.201.2.2.
pub fn pods_v4() -> String {
    two_pods("10.201.1.2", "10.201.2.2")
}

/// One more YAML document: NetworkPolicy `name` in namespace t for the pods labelled
/// app=`app`, with `policyTypes: [types]` (left out when empty) and the `rules` (`ingress:` /
/// `egress:` lists, indented by two spaces).
pub fn net_policy(name: &str, app: &str, types: &str, rules: &str) -> String {
    let types = if types.is_empty() {
        String::new()
    } else {
        format!("  policyTypes: [{types}]\n")
    };
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: {name}, namespace: t}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n{types}{rules}"
    )
}
