//! Test support for the privileged engine/device tests: network namespaces joined by a veth,
//! processes killed by PID, unique names per test, deadline-bounded waits. Everything a test
//! creates is removed by `Drop`, also when the test panics.

#![allow(dead_code)]

use std::{
    fs::File,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// True when running as root; privileged tests print a loud SKIP otherwise (CI is root, where
/// they always run).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[macro_export]
macro_rules! require_root {
    () => {
        if !netns::is_root() {
            eprintln!("SKIP {}: needs root (CI runs it as root)", module_path!());
            return;
        }
    };
}

/// A short name unique to this process and call: `<prefix><pid><n>`, at most 15 bytes.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id() % 100_000;
    let name = format!("{prefix}{pid}x{n}");
    assert!(name.len() <= 15, "name {name} too long");
    name
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = cmd(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn cmd(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// `ip netns exec <ns> ...`
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        cmd(&full)
    }

    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "in {}: {args:?} failed: {}\n{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Pings `addr` once with a short timeout; true on a reply.
    pub fn ping(&self, addr: &str) -> bool {
        self.exec(&["ping", "-c", "1", "-W", "1", addr])
            .status
            .success()
    }

    /// Runs `f` on a thread that has joined this namespace (sockets it opens live there).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    }

    /// Spawns `f` on a thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }
}

fn enter(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on an open namespace fd; affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = cmd(&["ip", "netns", "del", &self.name]);
    }
}

/// Two namespaces joined by a veth: `a` has 192.168.77.1/24, `b` has 192.168.77.2/24.
pub struct Pair {
    pub a: Netns,
    pub b: Netns,
    pub veth_a: String,
    pub veth_b: String,
}

pub const UNDER_A: &str = "192.168.77.1";
pub const UNDER_B: &str = "192.168.77.2";

impl Pair {
    pub fn new() -> Self {
        let a = Netns::new("wma");
        let b = Netns::new("wmb");
        let veth_a = unique("va");
        let veth_b = unique("vb");
        sh(&[
            "ip", "link", "add", &veth_a, "netns", &a.name, "type", "veth", "peer", "name",
            &veth_b, "netns", &b.name,
        ]);
        a.ip(&["addr", "add", &format!("{UNDER_A}/24"), "dev", &veth_a]);
        b.ip(&["addr", "add", &format!("{UNDER_B}/24"), "dev", &veth_b]);
        a.ip(&["link", "set", &veth_a, "up"]);
        b.ip(&["link", "set", &veth_b, "up"]);
        Self {
            a,
            b,
            veth_a,
            veth_b,
        }
    }
}

/// A child process killed by PID on drop.
pub struct Proc {
    pub child: Child,
    pub what: String,
    pub log: PathBuf,
    /// A UAPI socket this process serves; removed on drop if the process left it behind.
    pub socket: Option<PathBuf>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        // SAFETY: kill on the PID of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait(timeout)
    }

    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let what = self.what.clone();
        wait_for(&format!("{what} to exit"), timeout, || {
            self.child.try_wait().expect("try_wait")
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGTERM first so the process can clean up, SIGKILL if it does not go.
            // SAFETY: signal to the PID of our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(sock) = &self.socket {
            let _ = std::fs::remove_file(sock);
        }
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.what, self.log_text());
        }
    }
}

pub fn uapi_path(ifname: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"))
}

/// Starts a process in `ns` with stdout/stderr to a log file in `dir`.
pub fn spawn_in(ns: &Netns, dir: &Path, what: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let log = dir.join(format!("{what}.log"));
    let file = File::create(&log).expect("log file");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name]).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let child = c
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {args:?}: {e}"));
    Proc {
        child,
        what: what.to_string(),
        log,
        socket: None,
    }
}

/// The command line of our device: this package's `wiremesh-device` binary in the device
/// crate's tests, `mesh-agent device` in the agent's (the two run the same command).
pub fn device_command() -> Vec<&'static str> {
    if let Some(bin) = option_env!("CARGO_BIN_EXE_wiremesh-device") {
        vec![bin]
    } else if let Some(bin) = option_env!("CARGO_BIN_EXE_mesh-agent") {
        vec![bin, "device"]
    } else {
        panic!("this test crate has no device binary")
    }
}

/// Our device in `ns` in the foreground (see [`device_command`]), waited for until its socket
/// exists.
pub fn start_ours(ns: &Netns, dir: &Path, ifname: &str, env: &[(&str, &str)]) -> Proc {
    let mut env = env.to_vec();
    env.push(("RUST_LOG", "debug"));
    let mut args = device_command();
    args.extend_from_slice(&[ifname, "--foreground"]);
    let mut p = spawn_in(ns, dir, ifname, &args, &env);
    wait_socket(&mut p, ifname);
    p
}

/// wireguard-go in the foreground in `ns`, waited for until its socket exists.
pub fn start_wireguard_go(ns: &Netns, dir: &Path, ifname: &str) -> Proc {
    let mut p = spawn_in(
        ns,
        dir,
        ifname,
        &["wireguard-go", "-f", ifname],
        &[
            ("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1"),
            ("LOG_LEVEL", "verbose"),
        ],
    );
    wait_socket(&mut p, ifname);
    p
}

fn wait_socket(p: &mut Proc, ifname: &str) {
    let path = uapi_path(ifname);
    p.socket = Some(path.clone());
    wait_for(
        &format!("{} socket", p.what),
        Duration::from_secs(10),
        || {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("{} exited early ({status}):\n{}", p.what, p.log_text());
            }
            path.exists().then_some(())
        },
    );
}

/// A WireGuard key pair made with wg(8), with the private key in a file for `wg set`.
pub struct Keys {
    pub private_file: PathBuf,
    pub public: String,
}

pub fn keys(dir: &Path, name: &str) -> Keys {
    let private = sh(&["wg", "genkey"]);
    let private_file = dir.join(format!("{name}.key"));
    std::fs::write(&private_file, private.trim()).expect("write key");
    let out = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin
                .take()
                .expect("stdin")
                .write_all(private.as_bytes())?;
            c.wait_with_output()
        })
        .expect("wg pubkey");
    Keys {
        private_file,
        public: String::from_utf8_lossy(&out.stdout).trim().to_string(),
    }
}

/// Configures one end with wg(8) and gives the interface its tunnel address.
#[allow(clippy::too_many_arguments)]
pub fn configure(
    ns: &Netns,
    ifname: &str,
    me: &Keys,
    port: u16,
    peer: &Keys,
    endpoint: Option<&str>,
    peer_tunnel_ip: &str,
    my_tunnel_ip: &str,
    psk: Option<&Path>,
) {
    let port = port.to_string();
    let key = me.private_file.to_str().expect("utf8");
    let allowed = format!("{peer_tunnel_ip}/32");
    let mut args = vec![
        "wg",
        "set",
        ifname,
        "private-key",
        key,
        "listen-port",
        &port,
        "peer",
        &peer.public,
        "allowed-ips",
        &allowed,
    ];
    if let Some(ep) = endpoint {
        args.extend_from_slice(&["endpoint", ep]);
    }
    let psk_s;
    if let Some(p) = psk {
        psk_s = p.to_str().expect("utf8").to_string();
        args.extend_from_slice(&["preshared-key", &psk_s]);
    }
    ns.exec_ok(&args);
    ns.ip(&["addr", "add", &format!("{my_tunnel_ip}/24"), "dev", ifname]);
    ns.ip(&["link", "set", ifname, "up"]);
}

/// One peer line of `wg show <if> dump`.
#[derive(Debug)]
pub struct DumpPeer {
    pub public_key: String,
    pub endpoint: String,
    pub latest_handshake: u64,
    pub rx: u64,
    pub tx: u64,
}

pub fn dump_peers(ns: &Netns, ifname: &str) -> Vec<DumpPeer> {
    let out = ns.exec_ok(&["wg", "show", ifname, "dump"]);
    out.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert!(f.len() >= 8, "bad dump line {l:?}");
            DumpPeer {
                public_key: f[0].to_string(),
                endpoint: f[2].to_string(),
                latest_handshake: f[4].parse().expect("handshake"),
                rx: f[5].parse().expect("rx"),
                tx: f[6].parse().expect("tx"),
            }
        })
        .collect()
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Sends `len` pseudo-random bytes over TCP from `client_ns` to a server in `server_ns`
/// listening on `server_ip`, which echoes them back; checks every byte.
pub fn tcp_roundtrip(server_ns: &Netns, client_ns: &Netns, server_ip: &str, len: usize) {
    let ip: std::net::IpAddr = server_ip.parse().expect("server ip");
    let bind = SocketAddr::new(ip, 0);
    let listener = server_ns.run(move || TcpListener::bind(bind).expect("bind"));
    let addr = listener.local_addr().expect("local addr");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).expect("server read");
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).expect("server write");
        }
        s.shutdown(Shutdown::Write).ok();
    });
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    let sent = data.clone();
    let echoed = client_ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).ok();
        let mut r = s.try_clone().expect("clone");
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            r.read_to_end(&mut got).expect("client read");
            got
        });
        s.write_all(&sent).expect("client write");
        s.shutdown(Shutdown::Write).expect("shutdown");
        reader.join().expect("reader")
    });
    server.join().expect("server");
    assert_eq!(echoed.len(), data.len(), "echo length");
    assert!(echoed == data, "echoed data differs");
}
