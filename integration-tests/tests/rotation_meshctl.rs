//! The `meshctl rotate` binary against a real kube-apiserver with a running coordinator: with no
//! agent acting, `--wait` follows the rotation to Failed (phase timeout naming both nodes) and
//! exits 1; with simulated agents moving the marks, it follows it to Complete and exits 0. The
//! progress lines (one per change when stdout is not a terminal) show phase and nodes done.

#[path = "rotation_support/support.rs"]
mod support;

use std::{path::PathBuf, process::Output, time::Duration};

use support::*;

/// The meshctl executable (built next to the test's deps: `cargo build -p meshctl`), or
/// `WIREMESH_MESHCTL_BIN`.
fn meshctl_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WIREMESH_MESHCTL_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let path = exe
        .parent()
        .and_then(std::path::Path::parent)
        .map(|dir| dir.join("meshctl"))
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        path.exists(),
        "{} not found: build it first (`cargo build -p meshctl`), or set WIREMESH_MESHCTL_BIN",
        path.display()
    );
    path
}

async fn meshctl(setup: &Setup, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(meshctl_binary());
    command
        .args(args)
        .env("KUBECONFIG", setup.env.kubeconfig_path())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .expect("meshctl finishes")
        .expect("meshctl runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_wait_reports_failure_and_completion() {
    let nodes: Vec<String> = vec!["m1".into(), "m2".into()];
    let setup = setup("rotation-meshctl", &nodes, |_| "all").await;
    wiremesh_integration::objects::install_node_read_rbac(&setup.admin)
        .await
        .expect("read RBAC");
    let lease = format!("wm-meshctl-{}", std::process::id());
    let coordinator = start(&setup.coordinator_client().await, "m1", &lease);

    // Nobody acts on it: Failed after the 10 s phase timeout, both nodes named, exit 1.
    let out = meshctl(
        &setup,
        &[
            "rotate",
            "--wait",
            "--timeout",
            "60s",
            "--phase-timeout",
            "10s",
            "--reason",
            "cli test",
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("meshctl rotate --wait (no agents):\n{stdout}");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("keyrotation.wiremesh.io/rotation-"),
        "{stdout}"
    );
    assert!(stdout.contains("Preparing  0/2 nodes"), "{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.contains("Failed") && last.contains("PhaseTimeout") && last.contains("m1, m2"),
        "{last}"
    );

    // Simulated agents move the marks: Complete, exit 0.
    let agents = setup.spawn_simulated_agents(&nodes).await;
    let out = meshctl(&setup, &["rotate", "--wait", "--timeout", "60s"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("meshctl rotate --wait (simulated agents):\n{stdout}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.contains("Complete  2/2 nodes"), "{last}");

    for agent in agents {
        agent.abort();
    }
    coordinator.trigger.start();
    let _ = tokio::time::timeout(Duration::from_secs(10), coordinator.task).await;
    setup.teardown().await;
}
