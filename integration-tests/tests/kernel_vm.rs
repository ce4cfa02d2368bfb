//! Kernel WireGuard on a real kernel: the host's kernel has no WireGuard module, so
//! `kernel_vm_guest_tests` boots Debian's stock kernel in the VM harness (`vm`) and runs the
//! guest tests of this file there in one boot. They use the host's own `ip` and `wg` (iproute2,
//! wireguard-tools), seen through the guest's read-only view of the host's root.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use wiremesh_integration::{
    command::{ip, ip_in, run, run_in},
    vm,
    wait::until_blocking,
};

/// The guest tests of this file (each `#[ignore]`d on the host: they need the VM's kernel).
const GUEST_TESTS: [&str; 3] = [
    "guest_runs_the_stock_kernel_with_what_the_tests_need",
    "guest_wireguard_link_is_configured_and_read_back",
    "guest_two_wireguard_links_handshake_and_carry_a_ping",
];

#[test]
fn kernel_vm_guest_tests() {
    vm::rerun_tests_in_vm(&GUEST_TESTS);
}

/// The harness itself: exit code, stdout, stderr, the environment and a read-write share under
/// the host's /tmp (which the guest's own tmpfs would hide) come back from one boot.
#[test]
fn vm_command_output_exit_code_and_shares_come_back() {
    let Some(kvm) = vm::prepare_for_test() else {
        return;
    };
    let results = tempfile_dir("results");
    let script = format!(
        "echo out; echo err >&2; echo \"$X $WIREMESH_IN_VM $(uname -r)\" > {}/seen; exit 7",
        results.display()
    );
    let out = kvm
        .run(
            &vm::VmCommand::new(["/bin/sh", "-c", &script])
                .env("X", "from-host")
                .share_rw(&results)
                .memory_mib(512),
        )
        .expect("run in the VM");
    assert_eq!(out.exit_code, 7, "{out:?}");
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");
    let seen = std::fs::read_to_string(results.join("seen")).expect("written by the guest");
    assert_eq!(seen.trim(), format!("from-host 1 {}", kvm.release()));
    assert!(out.boot_time < out.wall_time);
    let _ = std::fs::remove_dir_all(&results);
}

/// A guest that does not reach the command in time, and a command that does not finish, are
/// errors that say where it stopped; qemu is killed either way.
#[test]
fn vm_timeouts_kill_the_guest_and_say_where_it_stopped() {
    let Some(kvm) = vm::prepare_for_test() else {
        return;
    };
    let err = kvm
        .run(&vm::VmCommand::new(["true"]).boot_timeout(Duration::from_millis(1)))
        .expect_err("no guest boots in 1 ms");
    assert!(matches!(err, vm::VmError::BootTimeout { .. }), "{err}");
    let err = kvm
        .run(
            &vm::VmCommand::new(["/bin/sh", "-c", "echo started; exec sleep 600"])
                .timeout(Duration::from_secs(2)),
        )
        .expect_err("sleep 600 outlives a 2 s timeout");
    match err {
        vm::VmError::CommandTimeout { stdout_tail, .. } => assert_eq!(stdout_tail, "started"),
        other => panic!("expected a command timeout: {other}"),
    }
}

/// A fresh directory under the host's /tmp (hidden in the guest unless shared).
fn tempfile_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wm-vm-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

const IN_VM: &str = "runs inside the kernel VM: kernel_vm_guest_tests boots it";

fn guest_only() {
    assert!(vm::in_guest(), "{IN_VM}");
}

/// Namespaces and a key directory of one guest test, removed on drop.
struct Scratch {
    netns: Vec<String>,
    dir: PathBuf,
}

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("wm-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self {
            netns: Vec::new(),
            dir,
        }
    }

    fn netns(&mut self, name: &str) -> String {
        let name = format!("wmvm{}-{name}", std::process::id());
        ip(["netns", "add", &name]).expect("ip netns add");
        ip_in(&name, ["link", "set", "lo", "up"]).expect("lo up");
        self.netns.push(name.clone());
        name
    }

    /// A fresh private key in a 0600 file (never printed) and its public key.
    fn keypair(&self, name: &str) -> (PathBuf, String) {
        let path = self.dir.join(format!("{name}.key"));
        let key = run(Command::new("wg").arg("genkey")).expect("wg genkey");
        write_private(&path, key.trim());
        let public = pubkey(&path);
        (path, public)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for ns in self.netns.drain(..).rev() {
            let _ = ip(["netns", "del", &ns]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_private(path: &Path, key: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .expect("key file");
    std::io::Write::write_all(&mut f, key.as_bytes()).expect("write key");
}

fn pubkey(private: &Path) -> String {
    let f = std::fs::File::open(private).expect("key file");
    let out = Command::new("wg")
        .arg("pubkey")
        .stdin(f)
        .output()
        .expect("wg pubkey");
    assert!(out.status.success(), "wg pubkey failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
#[ignore = "runs inside the kernel VM: kernel_vm_guest_tests boots it"]
fn guest_runs_the_stock_kernel_with_what_the_tests_need() {
    guest_only();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(release.starts_with("6.1."), "guest kernel {release}");
    for module in [
        "wireguard",
        "veth",
        "tun",
        "bridge",
        "sch_ingress",
        "cls_bpf",
    ] {
        assert!(
            Path::new("/sys/module").join(module).exists(),
            "module {module} not loaded"
        );
    }
    assert!(Path::new("/dev/net/tun").exists(), "/dev/net/tun");
    assert!(Path::new("/sys/kernel/btf/vmlinux").exists(), "BTF");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        mounts.lines().any(|l| l.starts_with("bpf /sys/fs/bpf bpf")),
        "bpffs on /sys/fs/bpf: {mounts}"
    );
    assert!(
        mounts.lines().any(|l| l.starts_with("tmp /tmp tmpfs")),
        "guest tmpfs on /tmp"
    );
    // The root is the host's, read-only.
    let probe = Path::new(env!("CARGO_MANIFEST_DIR")).join(".vm-write-probe");
    let err = std::fs::write(&probe, b"x").expect_err("host root must be read-only");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert_eq!(std::env::var("WG_COLOR_MODE").as_deref(), Ok("never"));
    let path = std::env::var("PATH").unwrap();
    assert!(path.split(':').any(|d| d == "/usr/sbin"), "PATH {path}");
}

#[test]
#[ignore = "runs inside the kernel VM: kernel_vm_guest_tests boots it"]
fn guest_wireguard_link_is_configured_and_read_back() {
    guest_only();
    let mut s = Scratch::new("readback");
    let ns = s.netns("rb");
    ip_in(&ns, ["link", "add", "wg0", "type", "wireguard"]).expect("kernel wireguard link");
    let details = ip_in(&ns, ["-d", "link", "show", "wg0"]).unwrap();
    assert!(details.contains("wireguard"), "{details}");
    let (key, public) = s.keypair("own");
    let (_, peer) = s.keypair("peer");
    let key = key.to_str().unwrap();
    run_in(
        &ns,
        [
            "wg",
            "set",
            "wg0",
            "private-key",
            key,
            "listen-port",
            "51820",
            "fwmark",
            "0x57",
            "peer",
            &peer,
            "allowed-ips",
            "10.9.0.0/24,fd00:9::/64",
            "endpoint",
            "192.0.2.7:51821",
            "persistent-keepalive",
            "25",
        ],
    )
    .expect("wg set");
    // `wg show dump`: the interface line (private key, public key, port, fwmark), then one line
    // per peer (public key, psk, endpoint, allowed ips, handshake, rx, tx, keepalive).
    let dump = run_in(&ns, ["wg", "show", "wg0", "dump"]).expect("wg show dump");
    let lines: Vec<Vec<&str>> = dump.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 2, "one interface line and one peer");
    assert_eq!(
        lines[0][1], public,
        "public key derived from the private key"
    );
    assert_eq!(lines[0][2], "51820");
    assert_eq!(lines[0][3], "0x57");
    let p = &lines[1];
    assert_eq!(p[0], peer);
    assert_eq!(p[1], "(none)", "no preshared key");
    assert_eq!(p[2], "192.0.2.7:51821");
    let mut allowed: Vec<&str> = p[3].split(',').collect();
    allowed.sort_unstable();
    assert_eq!(allowed, ["10.9.0.0/24", "fd00:9::/64"]);
    assert_eq!(p[4], "0", "no handshake yet");
    assert_eq!(p[7], "25");
    // Removing the peer and the link.
    run_in(&ns, ["wg", "set", "wg0", "peer", &peer, "remove"]).expect("remove peer");
    let peers = run_in(&ns, ["wg", "show", "wg0", "peers"]).unwrap();
    assert!(peers.trim().is_empty(), "peer removed: {peers}");
    ip_in(&ns, ["link", "del", "wg0"]).expect("delete link");
    assert!(ip_in(&ns, ["link", "show", "wg0"]).is_err(), "link gone");
}

#[test]
#[ignore = "runs inside the kernel VM: kernel_vm_guest_tests boots it"]
fn guest_two_wireguard_links_handshake_and_carry_a_ping() {
    guest_only();
    let mut s = Scratch::new("ping");
    let a = s.netns("a");
    let b = s.netns("b");
    ip([
        "link", "add", "va", "netns", &a, "type", "veth", "peer", "name", "vb", "netns", &b,
    ])
    .expect("veth between the namespaces");
    ip_in(&a, ["addr", "add", "10.200.0.1/24", "dev", "va"]).unwrap();
    ip_in(&b, ["addr", "add", "10.200.0.2/24", "dev", "vb"]).unwrap();
    ip_in(&a, ["link", "set", "va", "up"]).unwrap();
    ip_in(&b, ["link", "set", "vb", "up"]).unwrap();
    let (key_a, pub_a) = s.keypair("a");
    let (key_b, pub_b) = s.keypair("b");
    for (ns, key, peer, peer_ip, own) in [
        (&a, &key_a, &pub_b, "10.200.0.2", "10.201.0.1/24"),
        (&b, &key_b, &pub_a, "10.200.0.1", "10.201.0.2/24"),
    ] {
        let tunnel_peer = if own.starts_with("10.201.0.1") {
            "10.201.0.2/32"
        } else {
            "10.201.0.1/32"
        };
        ip_in(ns, ["link", "add", "wg0", "type", "wireguard"]).unwrap();
        run_in(
            ns,
            [
                "wg",
                "set",
                "wg0",
                "private-key",
                key.to_str().unwrap(),
                "listen-port",
                "51820",
                "peer",
                peer,
                "allowed-ips",
                tunnel_peer,
                "endpoint",
                &format!("{peer_ip}:51820"),
            ],
        )
        .expect("wg set");
        ip_in(ns, ["addr", "add", own, "dev", "wg0"]).unwrap();
        ip_in(ns, ["link", "set", "wg0", "up"]).unwrap();
    }
    // The first packet triggers the handshake; retry until the tunnel carries a ping.
    until_blocking(
        "a ping from a to b through the tunnel",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || run_in(&a, ["ping", "-c", "1", "-W", "2", "10.201.0.2"]).map_err(|e| e.to_string()),
    )
    .unwrap();
    let hs = run_in(&a, ["wg", "show", "wg0", "latest-handshakes"]).unwrap();
    let when: u64 = hs.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(when > 0, "handshake recorded: {hs}");
    let transfer = run_in(&b, ["wg", "show", "wg0", "transfer"]).unwrap();
    let rx: u64 = transfer.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(rx > 0, "b received over wg0: {transfer}");
}
