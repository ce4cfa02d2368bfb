//! The DaemonSet's capabilities are enough, measured: the agents of a virtual cluster run as root
//! with their capability bounding set cut down (setpriv) to exactly what the rendered chart gives the
//! `agent` container — NET_ADMIN, BPF, PERFMON, no SYS_ADMIN — and the mesh still converges, the eBPF
//! datapath loads in Strict mode and pods talk across nodes. (The userspace device the agent starts
//! inherits the same set; its container gets NET_ADMIN only, a subset checked by the chart test.)

#[path = "deploy_support/support.rs"]
mod deploy;
#[path = "mesh_support/support.rs"]
mod mesh;

use std::time::Duration;

use meshctl::demo;
use wiremesh_integration::{ClusterOptions, Role, VirtualCluster, have_root};

/// Capability numbers (linux/capability.h) of the names the chart uses.
fn cap_bit(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other} not in this test's table"),
    }
}

/// The `CapEff` mask of process `pid`.
fn effective_caps(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff line")
        .trim();
    u64::from_str_radix(hex, 16).expect("hex mask")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_run_with_only_the_daemonset_capabilities() {
    if !have_root("network namespaces, TUN devices, setpriv") {
        return;
    }
    let docs = deploy::yaml_docs(&deploy::helm_template("wiremesh", "kube-system", &[]));
    let ds = deploy::only(&docs, "DaemonSet");
    let agent = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "agent")
        .expect("agent container");
    let caps: Vec<String> = agent["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("added capabilities")
        .iter()
        .map(|c| c.as_str().expect("name").to_owned())
        .collect();
    assert!(!caps.iter().any(|c| c == "SYS_ADMIN"), "{caps:?}");
    let mask: u64 = caps.iter().map(|c| 1u64 << cap_bit(c)).sum();
    let bounding = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");

    let mut cluster = VirtualCluster::start(ClusterOptions {
        nodes: 2,
        pods_per_node: 1,
        ..ClusterOptions::default()
    })
    .await
    .expect("start the virtual cluster");
    let client = cluster.client().clone();
    demo::install_crds(&client).await.expect("install CRDs");
    demo::set_mesh_enabled(&client, true).await.expect("enable");
    mesh::set_mesh_mode(&cluster, "Strict").await;
    let agent_bin = mesh::agent_binary();
    let env = vec![("RUST_LOG".into(), "info,kube=warn".into())];
    for node in ["node-1", "node-2"] {
        let setpriv = || -> Vec<std::ffi::OsString> {
            vec![
                "--bounding-set".into(),
                bounding.clone().into(),
                "--inh-caps".into(),
                "-all".into(),
                "--".into(),
                agent_bin.clone().into(),
            ]
        };
        // The DaemonSet's `device` container: the userspace device under the same capabilities.
        let mut device = setpriv();
        device.extend(demo::device_args(&cluster, node).expect("device args"));
        cluster
            .spawn_supervised(
                node,
                Role::Device,
                std::path::Path::new("/usr/bin/setpriv"),
                device,
                env.clone(),
            )
            .expect("spawn device under setpriv");
        let mut args = setpriv();
        args.extend(demo::agent_args(&cluster, node).expect("agent args"));
        cluster
            .spawn_agent(
                node,
                std::path::Path::new("/usr/bin/setpriv"),
                args,
                env.clone(),
            )
            .expect("spawn agent under setpriv");
    }
    mesh::wait_converged(&cluster).await;

    for node in ["node-1", "node-2"] {
        let pid = mesh::agent_pid(&cluster, node);
        assert_eq!(
            effective_caps(pid),
            mask,
            "{node}'s agent runs with exactly {caps:?}"
        );
        mesh::eventually(
            &format!("{node} eBPF datapath loaded"),
            Duration::from_secs(60),
            || {
                let metrics = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(mesh::agent_metrics(&cluster, node))
                })?;
                if metrics.lines().any(|l| l == "wiremesh_ebpf_loaded 1") {
                    Ok(())
                } else {
                    Err(metrics
                        .lines()
                        .filter(|l| l.contains("ebpf"))
                        .collect::<Vec<_>>()
                        .join("; "))
                }
            },
        )
        .await;
    }
    // Strict mode: pod traffic crosses only through the tunnel, redirected by the eBPF programs.
    mesh::assert_reachable(&cluster, "pod-1-1", "pod-2-1", b"capabilities");
    mesh::assert_reachable(&cluster, "pod-2-1", "pod-1-1", b"capabilities");

    cluster.teardown().expect("teardown");
}
