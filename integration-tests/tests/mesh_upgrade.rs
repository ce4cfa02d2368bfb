//! Upgrading over pins of an older build: node-2's agent is killed, its pinned `wm_config` is
//! replaced by a map of another shape (as a build with another `struct wm_config` would have
//! left it) and the agent started again. It loads a new generation of maps beside the old ones,
//! fills them, swaps its programs into the pinned links and removes the old map pins; a probe
//! of a denied flow running through kill, downtime and upgrade never gets through.

#[path = "mesh_support/support.rs"]
mod support;

use std::{os::unix::ffi::OsStrExt, path::Path, time::Duration};

use meshctl::demo;
use serde_json::json;
use support::*;

/// Replaces the pin `path` with an empty array map of `value_size`-byte values. The map it
/// pinned before lives on while the attached programs use it.
fn pin_map_of_another_shape(path: &Path, value_size: u32) {
    std::fs::remove_file(path).unwrap_or_else(|e| panic!("unpin {}: {e}", path.display()));
    // union bpf_attr of BPF_MAP_CREATE: map_type (array), key_size, value_size, max_entries.
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[2, 4, value_size, 1]);
    // SAFETY: BPF_MAP_CREATE (0) with a zeroed 128-byte attr.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_mut_ptr(), 128) };
    assert!(fd >= 0, "map create: {}", std::io::Error::last_os_error());
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    // BPF_OBJ_PIN: pathname (u64), bpf_fd (u32).
    let mut pin = [0u64; 16];
    pin[0] = c_path.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: BPF_OBJ_PIN (6) with a valid path pointer and map fd.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 6, pin.as_mut_ptr(), 128) };
    assert_eq!(r, 0, "pin: {}", std::io::Error::last_os_error());
    // SAFETY: the fd is ours; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_upgrades_pins_of_another_shape_without_an_enforcement_gap() {
    if !have_root() {
        return;
    }
    let mut cluster = start_mesh(Shape {
        nodes: 2,
        pods_per_node: 2,
        spare_nodes: 0,
    })
    .await;
    set_mesh_mode(&cluster, "Strict").await;
    label_pod(&cluster, "pod-2-1", json!({"role": "web"})).await;
    label_pod(&cluster, "pod-2-2", json!({"role": "other"})).await;
    label_pod(&cluster, "pod-1-1", json!({"role": "client"})).await;
    create_web_from_clients(&cluster).await;
    let _server = EchoServer::start(&cluster, "pod-2-1", 80);
    let expected = [
        ("pod-1-1", "pod-2-1", 80, true),
        ("pod-2-2", "pod-2-1", 80, false),
    ];
    expect_reachability(
        &cluster,
        "policy enforced",
        Duration::from_secs(20),
        &expected,
    )
    .await;

    let probe = GapProbe::start(&cluster, "pod-2-2", "pod-2-1", 80);
    kill_agent(&mut cluster, "node-2");
    let pins = cluster.bpffs().join("wiremesh/node-2");
    pin_map_of_another_shape(&pins.join("wm_config"), 8);
    demo::start_agent(&mut cluster, "node-2", &agent_binary(), &[]).expect("restart");
    wait_converged(&cluster).await;
    expect_reachability(
        &cluster,
        "policy enforced after the upgrade",
        Duration::from_secs(30),
        &expected,
    )
    .await;
    wait_async("old map pins removed", Duration::from_secs(20), || {
        let pins = pins.clone();
        async move {
            let old = pins.join("wm_config").exists() || pins.join("wm_ipcache4").exists();
            let new = pins.join("gen-1/wm_config").exists();
            if !old && new {
                Ok(())
            } else {
                Err(format!("old pins present: {old}, gen-1 present: {new}"))
            }
        }
    })
    .await;
    probe.assert_never_through("kill and upgrade");
    let log = agent_log(&cluster, "node-2");
    assert!(
        log.contains("upgrade finished"),
        "the agent reports the finished upgrade"
    );
    // The new maps follow the API.
    delete_policy(&cluster, "web-from-clients").await;
    expect_reachability(
        &cluster,
        "policy deleted after the upgrade",
        Duration::from_secs(15),
        &[("pod-2-2", "pod-2-1", 80, true)],
    )
    .await;

    cluster.teardown().expect("teardown");
}
