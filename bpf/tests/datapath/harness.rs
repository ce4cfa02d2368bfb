//! Test harness: network namespaces ("node", "pods", an underlay peer) joined by veths, a
//! private bpffs for pins ([`Bpffs`] of `tests/common/fixtures.rs`), a TUN "tunnel", and helpers
//! to run code inside a namespace. Every name carries the PID and a counter; everything is
//! removed on drop.

use std::{
    fs::File,
    io::Read,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use wiremesh_bpf::{FlowEvent, FlowReader};

use crate::fixtures::{Bpffs, root_or_skip, run};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs `ip -n <ns> <args>`, panicking with its output on failure.
pub fn ip(ns: &str, args: &[&str]) {
    let mut all = vec!["ip", "-n", ns];
    all.extend_from_slice(args);
    run(&all);
}

/// Runs `f` on a new thread that has joined namespace `ns` and returns its result.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: a valid netns fd; only this thread moves.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A node namespace with two pod namespaces behind veths and an underlay peer namespace.
///
/// - pod A: 10.201.1.2/24 on `eth0`, gateway 10.201.1.1 (`host_a` in the node)
/// - pod B: 10.201.2.2/24, gateway 10.201.2.1 (`host_b`)
/// - underlay: node `underlay` 192.168.77.1/24 <-> peer namespace 192.168.77.2/24, the peer
///   also owns the "remote pod" 10.201.9.5; the node routes 10.201.9.0/24 via the peer.
pub struct Topo {
    pub node: String,
    pub pod_a: String,
    pub pod_b: String,
    pub peer: String,
    pub host_a: String,
    pub host_b: String,
    pub underlay: String,
    pub bpffs: Bpffs,
}

pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 2);
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 201, 9, 5);
pub const PEER_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);

impl Topo {
    /// The topology of privileged test `test`, or `None` (the test returns) when it may not run
    /// as root ([`root_or_skip`]).
    pub fn for_test(test: &str) -> Option<Self> {
        root_or_skip(test).then(Topo::new)
    }

    pub fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{n}", std::process::id());
        let t = Topo {
            node: format!("wmb-{id}-node"),
            pod_a: format!("wmb-{id}-a"),
            pod_b: format!("wmb-{id}-b"),
            peer: format!("wmb-{id}-peer"),
            host_a: format!("wa{id}"),
            host_b: format!("wb{id}"),
            underlay: format!("wu{id}"),
            bpffs: Bpffs::new(&id),
        };
        for ns in [&t.node, &t.pod_a, &t.pod_b, &t.peer] {
            run(&["ip", "netns", "add", ns]);
        }
        let node = t.node.as_str();
        for (ns, host, addr, gw) in [
            (&t.pod_a, &t.host_a, "10.201.1.2/24", "10.201.1.1"),
            (&t.pod_b, &t.host_b, "10.201.2.2/24", "10.201.2.1"),
        ] {
            let veth: [&str; 10] = [
                "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ];
            ip(node, &veth);
            ip(ns, &["addr", "add", addr, "dev", "eth0"]);
            ip(ns, &["link", "set", "eth0", "up"]);
            ip(ns, &["link", "set", "lo", "up"]);
            ip(ns, &["route", "add", "default", "via", gw]);
            ip(node, &["addr", "add", &format!("{gw}/24"), "dev", host]);
            ip(node, &["link", "set", host, "up"]);
        }
        let (underlay, peer) = (t.underlay.as_str(), t.peer.as_str());
        let veth: [&str; 10] = [
            "link", "add", underlay, "type", "veth", "peer", "name", "eth0", "netns", peer,
        ];
        ip(node, &veth);
        ip(node, &["addr", "add", "192.168.77.1/24", "dev", underlay]);
        ip(node, &["link", "set", underlay, "up"]);
        ip(
            node,
            &["route", "add", "10.201.9.0/24", "via", "192.168.77.2"],
        );
        ip(peer, &["addr", "add", "192.168.77.2/24", "dev", "eth0"]);
        ip(peer, &["addr", "add", "10.201.9.5/32", "dev", "lo"]);
        ip(peer, &["link", "set", "eth0", "up"]);
        ip(peer, &["link", "set", "lo", "up"]);
        ip(
            peer,
            &["route", "add", "10.201.0.0/16", "via", "192.168.77.1"],
        );
        for k in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            run(&["ip", "netns", "exec", node, "sysctl", "-qw", k]);
        }
        t
    }

    /// Adds IPv6 beside the IPv4 plan (no DAD, so addresses are usable at once): pod a
    /// `fd00:201:1::2/64` (gateway `::1` on `host_a`), pod b `fd00:201:2::2/64`, underlay
    /// `fd00:77::1` <-> `fd00:77::2`, remote pod `fd00:201:9::5` on the peer, routed both ways.
    pub fn add_ipv6(&self) {
        let node = self.node.as_str();
        let forwarding = "net.ipv6.conf.all.forwarding=1";
        run(&["ip", "netns", "exec", node, "sysctl", "-qw", forwarding]);
        for (ns, host, n) in [
            (&self.pod_a, &self.host_a, 1),
            (&self.pod_b, &self.host_b, 2),
        ] {
            let (addr, gw) = (format!("fd00:201:{n}::2/64"), format!("fd00:201:{n}::1"));
            ip(ns, &["addr", "add", &addr, "dev", "eth0", "nodad"]);
            ip(ns, &["-6", "route", "add", "default", "via", &gw]);
            ip(
                node,
                &["addr", "add", &format!("{gw}/64"), "dev", host, "nodad"],
            );
        }
        let (underlay, peer) = (self.underlay.as_str(), self.peer.as_str());
        ip(
            node,
            &["addr", "add", "fd00:77::1/64", "dev", underlay, "nodad"],
        );
        ip(
            node,
            &["-6", "route", "add", "fd00:201:9::/64", "via", "fd00:77::2"],
        );
        ip(
            peer,
            &["addr", "add", "fd00:77::2/64", "dev", "eth0", "nodad"],
        );
        ip(peer, &["addr", "add", "fd00:201:9::5/128", "dev", "lo"]);
        ip(
            peer,
            &["-6", "route", "add", "fd00:201::/32", "via", "fd00:77::1"],
        );
    }

    /// The per-node pin directory on this test's bpffs.
    pub fn pin_dir(&self) -> PathBuf {
        wiremesh_bpf::node_pin_dir(&self.bpffs.dir, "node-1")
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        for ns in [&self.pod_a, &self.pod_b, &self.peer, &self.node] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Reads flow records until one satisfies `pred` or `timeout` passes.
pub fn wait_event(
    reader: &mut FlowReader,
    timeout: Duration,
    pred: impl Fn(&FlowEvent) -> bool,
) -> Option<FlowEvent> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        for e in reader
            .read(left.min(Duration::from_millis(200)))
            .expect("ring read")
        {
            if pred(&e) {
                return Some(e);
            }
            seen.push(e);
        }
    }
    eprintln!("events seen without a match: {seen:#?}");
    None
}

/// A TUN device (IFF_TUN | IFF_NO_PI) created in the calling thread's namespace.
pub struct Tun {
    fd: OwnedFd,
}

impl Tun {
    pub fn create(name: &str) -> Self {
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        let path = c"/dev/net/tun";
        // SAFETY: valid path; we own the returned fd.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK) };
        assert!(
            raw >= 0,
            "open /dev/net/tun: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed ifreq is valid; the name fits (checked below).
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        assert!(name.len() < libc::IFNAMSIZ);
        for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF takes a pointer to an ifreq.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut ifr) };
        assert_eq!(
            r,
            0,
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        );
        Tun { fd }
    }

    /// Reads packets until one satisfies `pred` or `timeout` passes.
    pub fn wait_packet(&self, timeout: Duration, pred: impl Fn(&[u8]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut file = File::from(self.fd.try_clone().expect("dup tun fd"));
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            match file.read(&mut buf) {
                Ok(n) if pred(&buf[..n]) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd {
                        fd: self.fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                }
                Err(e) => panic!("reading tun: {e}"),
            }
        }
        false
    }
}

/// A thread carrying the packets of one TUN into another, as a tunnel whose underlay carries
/// at most `mtu`-byte inner packets: larger ones are dropped (counted), as a WireGuard
/// tunnel's oversized UDP datagrams would be. Stops on drop.
pub struct TunPipe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    dropped: std::sync::Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TunPipe {
    pub fn start(from: Tun, to: Tun, mtu: usize) -> Self {
        use std::io::Write;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dropped = std::sync::Arc::new(AtomicU32::new(0));
        let (flag, count) = (stop.clone(), dropped.clone());
        let thread = std::thread::spawn(move || {
            let mut rx = File::from(from.fd);
            let mut tx = File::from(to.fd);
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                match rx.read(&mut buf) {
                    Ok(n) if n > mtu => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(n) => {
                        // The receiving TUN is non-blocking too; a full queue loses the
                        // packet like a congested link (TCP retransmits).
                        let _ = tx.write(&buf[..n]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let mut pfd = libc::pollfd {
                            fd: rx.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one valid pollfd.
                        unsafe { libc::poll(&mut pfd, 1, 50) };
                    }
                    Err(e) => panic!("reading tun: {e}"),
                }
            }
        });
        TunPipe {
            stop,
            dropped,
            thread: Some(thread),
        }
    }

    /// Packets dropped for exceeding the MTU so far.
    pub fn dropped(&self) -> u32 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for TunPipe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The ifindex of `iface` in the calling thread's namespace.
pub fn ifindex(iface: &str) -> u32 {
    let c = std::ffi::CString::new(iface).expect("name");
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {iface}");
    i
}
