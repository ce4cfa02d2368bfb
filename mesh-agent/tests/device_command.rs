//! `mesh-agent device`: the agent binary runs the userspace device of crate `wiremesh-device` as a
//! subcommand (the device tests there start `wiremesh-device`, the same command). Here: detached
//! start (the re-executed child must get the `device` subcommand back), configuration and
//! read-back through the agent's UAPI client, and shutdown on SIGTERM. Privileged: creates (and
//! removes) its own namespace.

#[path = "../../device/tests/device_support/netns.rs"]
mod netns;

use std::{process::Command, time::Duration};

use netns::*;
use wiremesh_keyexchange::PrivateKey;
use wiremesh_wgctrl::{Datapath, DeviceSettings, PeerConfig, UapiDevice};

/// Kills the detached device by PID if an assertion fails before it is stopped.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill by the PID this test started; harmless if already gone.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

#[test]
fn mesh_agent_device_detaches_serves_uapi_and_stops_on_sigterm() {
    require_root!();
    let ns = Netns::new("wmad");
    let ifname = unique("wad");
    let device = device_command();
    assert_eq!(device[1], "device", "this crate runs `mesh-agent device`");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(&device)
        .args([ifname.as_str(), "--mtu", "1380"])
        .output()
        .expect("run mesh-agent device");
    assert!(
        out.status.success(),
        "mesh-agent device failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pid: i32 = stdout
        .split("pid ")
        .nth(1)
        .and_then(|s| s.trim().trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no pid in {stdout:?}"));
    let _guard = KillOnDrop(pid);

    let dev = UapiDevice::new(&ifname);
    let key = PrivateKey::generate().expect("key");
    let peer_key = PrivateKey::generate().expect("key").public_key();
    dev.configure(&DeviceSettings {
        private_key: Some(key.clone()),
        listen_port: Some(50201),
        fwmark: None,
    })
    .expect("configure");
    let mut peer = PeerConfig::new(peer_key);
    peer.allowed_ips = vec!["10.75.0.2/32".parse().expect("net")];
    peer.endpoint = Some("192.0.2.1:50202".parse().expect("endpoint"));
    dev.set_peer(&peer).expect("set_peer");
    let reader = dev.clone();
    let status = ns.run(move || reader.status()).expect("status");
    assert_eq!(status.public_key, Some(key.public_key()));
    assert_eq!(status.listen_port, 50201);
    assert_eq!(status.mtu, 1380, "the detached child got --mtu");
    assert_eq!(status.peers.len(), 1);
    assert_eq!(status.peers[0].allowed_ips, peer.allowed_ips);
    assert_eq!(status.peers[0].endpoint, peer.endpoint);

    // SAFETY: signal to the PID this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_for("detached device to exit", Duration::from_secs(10), || {
        // SAFETY: signal 0 only probes for existence.
        (unsafe { libc::kill(pid, 0) } != 0).then_some(())
    });
    assert!(!uapi_path(&ifname).exists(), "socket left behind");
}
