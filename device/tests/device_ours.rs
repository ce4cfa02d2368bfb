//! Our device (`wiremesh-device`, the command behind `mesh-agent device`) against itself, configured with wg(8): ping and TCP both ways,
//! `wg show`/`wg showconf`, shutdown on SIGTERM and on interface deletion (socket removed),
//! and the detached (daemon) mode. Privileged: creates (and removes) its own namespaces.

#[path = "device_support/netns.rs"]
mod netns;

use std::{process::Command, time::Duration};

use netns::*;

const T_A: &str = "10.78.0.1";
const T_B: &str = "10.78.0.2";

#[test]
fn our_device_to_our_device() {
    require_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    let if_a = unique("wa");
    let if_b = unique("wb");
    let pair = Pair::new();
    let mut a = start_ours(&pair.a, dir.path(), &if_a, &[]);
    let mut b = start_ours(&pair.b, dir.path(), &if_b, &[]);
    let ka = keys(dir.path(), "a");
    let kb = keys(dir.path(), "b");
    let ep_b = format!("{UNDER_B}:52002");
    configure(&pair.a, &if_a, &ka, 52001, &kb, Some(&ep_b), T_B, T_A, None);
    configure(&pair.b, &if_b, &kb, 52002, &ka, None, T_A, T_B, None);
    wait_for("ping a -> b", Duration::from_secs(20), || {
        pair.a.ping(T_B).then_some(())
    });
    assert!(pair.b.ping(T_A), "ping b -> a");
    tcp_roundtrip(&pair.b, &pair.a, T_B, 8 << 20);
    tcp_roundtrip(&pair.a, &pair.b, T_A, 8 << 20);

    let conf = pair.a.exec_ok(&["wg", "showconf", &if_a]);
    assert!(
        conf.contains(&format!("PublicKey = {}", kb.public)),
        "{conf}"
    );
    assert!(conf.contains("ListenPort = 52001"), "{conf}");
    assert!(conf.contains(&format!("AllowedIPs = {T_B}/32")), "{conf}");
    let peers = dump_peers(&pair.b, &if_b);
    assert_eq!(
        peers[0].endpoint,
        format!("{UNDER_A}:52001"),
        "learned endpoint"
    );
    assert!(
        peers[0].rx > 16 << 20 && peers[0].tx > 16 << 20,
        "{peers:?}"
    );

    // `wg set ... remove` drops the peer: no more traffic.
    pair.b
        .exec_ok(&["wg", "set", &if_b, "peer", &ka.public, "remove"]);
    assert!(dump_peers(&pair.b, &if_b).is_empty());
    assert!(!pair.a.ping(T_B), "ping worked after the peer was removed");

    // SIGTERM: clean exit, socket gone, interface gone.
    let status = a.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(!uapi_path(&if_a).exists(), "socket left behind");
    let links = pair.a.ip(&["-o", "link", "show"]);
    assert!(!links.contains(&if_a), "interface left behind: {links}");

    // Deleting the interface stops the other device and removes its socket.
    pair.b.ip(&["link", "del", &if_b]);
    let status = b.wait(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(!uapi_path(&if_b).exists(), "socket left behind");
}

#[test]
fn detached_device_reports_ready_and_stops_on_sigterm() {
    require_root!();
    let ns = Netns::new("wmd");
    let ifname = unique("wd");
    let device = device_command();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(&device)
        .arg(&ifname)
        .output()
        .expect("run device");
    assert!(
        out.status.success(),
        "device failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pid: i32 = stdout
        .split("pid ")
        .nth(1)
        .and_then(|s| s.trim().trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no pid in {stdout:?}"));
    // Make sure the detached child is killed even if an assertion below fails.
    struct KillOnDrop(i32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            // SAFETY: kill by the PID this test started; harmless if already gone.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let _guard = KillOnDrop(pid);
    assert!(uapi_path(&ifname).exists(), "socket missing after ready");
    let show = ns.exec_ok(&["wg", "show", &ifname]);
    assert!(show.contains(&format!("interface: {ifname}")), "{show}");

    // A second device with the same name must fail, not steal the socket.
    let again = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(&device)
        .arg(&ifname)
        .output()
        .expect("run device");
    assert!(
        !again.status.success(),
        "second device with the same name started"
    );

    // SAFETY: signal to the PID this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_for("detached device to exit", Duration::from_secs(10), || {
        // SAFETY: signal 0 only probes for existence.
        (unsafe { libc::kill(pid, 0) } != 0).then_some(())
    });
    assert!(!uapi_path(&ifname).exists(), "socket left behind");
}

#[test]
fn bad_set_requests_get_an_errno_and_change_nothing() {
    require_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    let ns = Netns::new("wme");
    let ifname = unique("we");
    let _dev = start_ours(&ns, dir.path(), &ifname, &[]);
    let k = keys(dir.path(), "k");
    let out = ns.exec(&[
        "wg",
        "set",
        &ifname,
        "peer",
        &k.public,
        "allowed-ips",
        "10.0.0.0/24",
    ]);
    assert!(out.status.success());
    // A port already in use: wg(8) reports the errno, the old port stays.
    let holder = ns.run(|| std::net::UdpSocket::bind("0.0.0.0:0").expect("bind"));
    let busy = holder.local_addr().expect("addr").port().to_string();
    let out = ns.exec(&["wg", "set", &ifname, "listen-port", &busy]);
    assert!(!out.status.success(), "binding a busy port succeeded");
    let port = ns.exec_ok(&["wg", "show", &ifname, "listen-port"]);
    assert_ne!(port.trim(), busy);
    // A raw request with a garbage line.
    let reply = uapi_request(&ifname, "set=1\nlisten_port=1\nbogus_key=1\n\n");
    assert_eq!(reply, "errno=-22\n\n");
    let reply = uapi_request(&ifname, "get=1\n\n");
    assert!(reply.contains("allowed_ip=10.0.0.0/24\n"), "{reply}");
    assert!(!reply.contains("listen_port=1\n"), "{reply}");
    assert!(reply.ends_with("errno=0\n\n"), "{reply}");
}

fn uapi_request(ifname: &str, req: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(uapi_path(ifname)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(req.as_bytes()).expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the blank line that ends every answer.
    while !out.ends_with(b"\n\n") {
        let n = s.read(&mut buf).expect("read");
        assert!(
            n > 0,
            "socket closed early: {:?}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(out).expect("utf8")
}

#[test]
fn ipv6_underlay_and_ipv6_inside_the_tunnel() {
    require_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    let if_a = unique("w6a");
    let if_b = unique("w6b");
    let pair = Pair::new();
    pair.a
        .ip(&["addr", "add", "fd10::1/64", "dev", &pair.veth_a, "nodad"]);
    pair.b
        .ip(&["addr", "add", "fd10::2/64", "dev", &pair.veth_b, "nodad"]);
    let _a = start_ours(&pair.a, dir.path(), &if_a, &[]);
    let _b = start_ours(&pair.b, dir.path(), &if_b, &[]);
    let ka = keys(dir.path(), "a");
    let kb = keys(dir.path(), "b");
    let key_a = ka.private_file.to_str().expect("utf8");
    let key_b = kb.private_file.to_str().expect("utf8");
    pair.a.exec_ok(&[
        "wg",
        "set",
        &if_a,
        "private-key",
        key_a,
        "listen-port",
        "54001",
        "peer",
        &kb.public,
        "endpoint",
        "[fd10::2]:54002",
        "allowed-ips",
        "fd00::2/128",
    ]);
    pair.b.exec_ok(&[
        "wg",
        "set",
        &if_b,
        "private-key",
        key_b,
        "listen-port",
        "54002",
        "peer",
        &ka.public,
        "allowed-ips",
        "fd00::1/128",
    ]);
    for (ns, ifname, addr) in [
        (&pair.a, &if_a, "fd00::1/64"),
        (&pair.b, &if_b, "fd00::2/64"),
    ] {
        ns.ip(&["addr", "add", addr, "dev", ifname, "nodad"]);
        ns.ip(&["link", "set", ifname, "up"]);
    }
    wait_for("ping6 through the tunnel", Duration::from_secs(20), || {
        pair.a.ping("fd00::2").then_some(())
    });
    // 1420-byte inner IPv6 packets fit a 1500-byte IPv6 underlay with DF (80 bytes overhead).
    let full = pair.a.exec(&[
        "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1372", "fd00::2",
    ]);
    assert!(full.status.success(), "full-MTU ping6 failed");
    tcp_roundtrip(&pair.b, &pair.a, "fd00::2", 2 << 20);
    let peers = dump_peers(&pair.b, &if_b);
    assert_eq!(peers[0].endpoint, "[fd10::1]:54001");
}
