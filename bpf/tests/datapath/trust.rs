//! Attacks and failures of issue 13 that are local to the programs (docs/threat-model.md names
//! the finding each test covers): a spoofed local source from the underlay (4), pod traffic on
//! the WireGuard port in strict mode (5), a new veth before its pod's entries exist (6), IPv4
//! fragments towards isolated pods (11) and the node's own traffic to isolated pods with a
//! ptp-style and a bridge-style CNI (12).

use std::collections::BTreeSet;

use super::*;

/// Sends one `len`-byte datagram from `from` to `to` until `rx` receives one of exactly `len`
/// bytes or `timeout` passes.
fn big_udp_delivered(
    from: &UdpSocket,
    to: SocketAddr,
    rx: &UdpSocket,
    len: usize,
    timeout: Duration,
) -> bool {
    let payload = vec![0x5a; len];
    let mut buf = vec![0u8; len + 1];
    eventually(timeout, || {
        let _ = from.send_to(&payload, to);
        matches!(rx.recv_from(&mut buf), Ok((n, _)) if n == len)
    })
}

/// A TCP connect from source address `src` (any port) to `dst` within 700 ms, in the calling
/// thread's namespace.
fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> bool {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            },
            sin_zero: [0; 8],
        }
    }
    // SAFETY: plain socket call; the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 700_000,
    };
    let local = sockaddr(SocketAddrV4::new(src, 0));
    let remote = sockaddr(dst);
    // SAFETY: valid fd, option and sockaddr pointers with their sizes.
    unsafe {
        let r = libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "SO_SNDTIMEO: {}", std::io::Error::last_os_error());
        let r = libc::bind(fd.as_raw_fd(), (&raw const local).cast(), len);
        assert_eq!(r, 0, "bind {src}: {}", std::io::Error::last_os_error());
        libc::connect(fd.as_raw_fd(), (&raw const remote).cast(), len) == 0
    }
}

/// Runs `ip -n <ns> addr add <addr> dev <dev>`.
fn add_addr(ns: &str, addr: &str, dev: &str) {
    ip(ns, &["addr", "add", addr, "dev", dev]);
}

/// Finding 4: a packet from the underlay that claims pod a's address must not skip pod b's
/// ingress policy (b admits only a); the real a still gets through.
#[test]
fn a_local_pod_source_arriving_from_the_underlay_is_not_trusted() {
    let Some(t) = Topo::for_test("spoofed local source") else {
        return;
    };
    let cfg = Config::new(0, Mode::Permissive, 1, 0);
    let (_loader, mut flows, _) = loaded_with(&t, cfg, &udp_a_to_b_only());
    let b = udp_socket(&t.pod_b, SocketAddrV4::new(POD_B, 7777));
    let to_b = SocketAddr::from((POD_B, 7777));
    let a = udp_socket(&t.pod_a, SocketAddrV4::new(POD_A, 40800));
    assert!(
        udp_delivered(&a, to_b, &b, Duration::from_secs(5)),
        "a -> b udp/7777 is allowed"
    );
    // The underlay peer claims pod a's address (a host-network process elsewhere, or a
    // compromised node on the underlay).
    add_addr(&t.peer, "10.201.1.2/32", "lo");
    let liar = udp_socket(&t.peer, SocketAddrV4::new(POD_A, 40801));
    drain(&[&b]);
    assert!(
        !udp_delivered(&liar, to_b, &b, Duration::from_secs(1)),
        "a local pod's address arriving on the underlay skips no ingress policy"
    );
    let e = wait_event(&mut flows, Duration::from_secs(3), |e| {
        e.verdict() == Some(Verdict::DroppedPolicy) && e.sport() == 40801
    })
    .expect("dropped-policy record of the spoofed packet");
    assert_eq!(e.hook(), Some(Hook::ToPod), "{e:?}");
    assert_eq!(e.src_identity, Identity::WORLD.0, "judged as world: {e:?}");
    assert!(
        udp_delivered(&a, to_b, &b, Duration::from_secs(5)),
        "the real pod a still reaches b"
    );
}

/// Finding 5: in strict mode pod-to-pod UDP on the WireGuard port is plaintext pod traffic
/// like any other; only node addresses (their own ipcache entries, also inside a pod range)
/// pass the underlay, whatever the port.
#[test]
fn strict_underlay_drops_pod_udp_on_the_wireguard_port() {
    let Some(t) = Topo::for_test("strict wireguard port") else {
        return;
    };
    let mut loader = load(
        &t,
        vec![
            (t.underlay.clone(), Hook::UnderlayIngress),
            (t.underlay.clone(), Hook::UnderlayEgress),
        ],
    );
    let maps = loader.maps();
    maps.set_config(&Config::new(0, Mode::Strict, 1, 51820))
        .expect("config");
    strict_ipcache(maps);
    // Node addresses inside the pod ranges (a bridge gateway here, one on the peer there).
    let node = |id: Identity, ip: Ipv4Addr| IpcacheValue::new(id.0, 0, ip, ipcache_flags::NODE);
    let (gw, peer_in_range) = (Ipv4Addr::new(10, 201, 1, 1), Ipv4Addr::new(10, 201, 9, 1));
    maps.upsert_ipcache(Ipv4Net::from(gw), node(Identity::HOST, gw))
        .expect("ipcache");
    maps.upsert_ipcache(
        Ipv4Net::from(peer_in_range),
        node(Identity::REMOTE_NODE, peer_in_range),
    )
    .expect("ipcache");
    add_addr(&t.peer, "10.201.9.1/32", "lo");

    let pod_rx = udp_socket(&t.pod_a, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7777));
    let remote_wg = udp_socket(&t.peer, SocketAddrV4::new(REMOTE_POD, 51820));
    assert!(
        !udp_delivered(
            &remote_wg,
            SocketAddrV4::new(POD_A, 7777),
            &pod_rx,
            Duration::from_secs(1)
        ),
        "strict: remote pod -> local pod from the WireGuard port is dropped"
    );
    let peer_rx = remote_wg;
    let pod_wg = udp_socket(&t.pod_a, SocketAddrV4::new(POD_A, 40900));
    assert!(
        !udp_delivered(
            &pod_wg,
            SocketAddrV4::new(REMOTE_POD, 51820),
            &peer_rx,
            Duration::from_secs(1)
        ),
        "strict: local pod -> remote pod to the WireGuard port is dropped"
    );

    // WireGuard between node addresses passes: the underlay addresses, and node addresses
    // that lie inside pod ranges.
    for (src, dst) in [
        (Ipv4Addr::new(192, 168, 77, 1), PEER_NODE),
        (gw, peer_in_range),
    ] {
        let node_wg = udp_socket(&t.node, SocketAddrV4::new(src, 51820));
        let peer_wg = udp_socket(&t.peer, SocketAddrV4::new(dst, 51820));
        assert!(
            udp_delivered(
                &node_wg,
                SocketAddrV4::new(dst, 51820),
                &peer_wg,
                Duration::from_secs(5)
            ),
            "strict: node {src} -> node {dst} WireGuard passes"
        );
        assert!(
            udp_delivered(
                &peer_wg,
                SocketAddrV4::new(src, 51820),
                &node_wg,
                Duration::from_secs(5)
            ),
            "strict: node {dst} -> node {src} WireGuard passes"
        );
    }
}

/// Finding 11: a 4000-byte UDP datagram (EDNS-sized, three IPv4 fragments) reaches an isolated
/// pod whose policy allows it, from a pod on the node (from_pod decides) and from another node
/// (to_pod decides); a port the policy does not name stays closed for fragments too.
#[test]
fn fragmented_udp_reaches_an_isolated_pod_allowed_by_policy() {
    let Some(t) = Topo::for_test("fragments") else {
        return;
    };
    // b admits a and the remote pod r on udp/7777 only.
    let rules = r#"  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}, {podSelector: {matchLabels: {app: r}}}]
    ports: [{protocol: UDP, port: 7777}]
"#;
    let r = r#"---
apiVersion: v1
kind: Pod
metadata: {name: r, namespace: t, labels: {app: r}}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.201.9.5}
"#;
    let policy = compiled(&format!("{r}{}", net_policy("b-in", "b", "Ingress", rules)));
    let mut loader = load(&t, pod_hooks(&t));
    let place = |ip: Ipv4Addr, id: Identity| {
        if ip == REMOTE_POD {
            IpcacheValue::new(id.0, 2, PEER_NODE, ipcache_flags::REMOTE_POD)
        } else {
            local(ip, id)
        }
    };
    let maps = loader.maps();
    maps.set_config(&Config::new(0, Mode::Permissive, 1, 0))
        .expect("config");
    maps.apply_policy(&policy.diff(&Compiled::default()), place)
        .expect("policy");

    let b = udp_socket(&t.pod_b, SocketAddrV4::new(POD_B, 7777));
    let b8 = udp_socket(&t.pod_b, SocketAddrV4::new(POD_B, 7778));
    let a = udp_socket(&t.pod_a, SocketAddrV4::new(POD_A, 41000));
    let remote = udp_socket(&t.peer, SocketAddrV4::new(REMOTE_POD, 41001));
    let (to_b, to_b8) = (
        SocketAddr::from((POD_B, 7777)),
        SocketAddr::from((POD_B, 7778)),
    );
    assert!(
        udp_delivered(&a, to_b, &b, Duration::from_secs(5)),
        "small a -> b udp/7777 passes"
    );
    drain(&[&b]);
    assert!(
        big_udp_delivered(&a, to_b, &b, 4000, Duration::from_secs(5)),
        "4000-byte a -> b udp/7777 (fragmented) passes from_pod"
    );
    assert!(
        big_udp_delivered(&remote, to_b, &b, 4000, Duration::from_secs(5)),
        "4000-byte remote -> b udp/7777 (fragmented) passes to_pod"
    );
    assert!(
        !big_udp_delivered(&a, to_b8, &b8, 4000, Duration::from_secs(1)),
        "4000-byte a -> b udp/7778 stays closed"
    );
    assert!(
        !big_udp_delivered(&remote, to_b8, &b8, 4000, Duration::from_secs(1)),
        "4000-byte remote -> b udp/7778 stays closed"
    );
}

/// Finding 6 (datapath side): a veth whose entry is pending passes no IP packet in either
/// direction, even with no policy at all, until the agent writes the pod's entry.
#[test]
fn a_pending_veth_passes_nothing_until_its_entry_is_written() {
    let Some(t) = Topo::for_test("pending veth") else {
        return;
    };
    let cfg = Config::new(0, Mode::Permissive, 1, 0);
    let (mut loader, mut flows, _) = loaded_with(&t, cfg, "");
    let host_b = t.host_b.clone();
    let ifindex_b = in_ns(&t.node, move || ifindex(&host_b));
    loader
        .maps()
        .upsert_endpoint(ifindex_b, EndpointValue::pending())
        .expect("pending entry");
    let a = udp_socket(&t.pod_a, SocketAddrV4::new(POD_A, 7777));
    let b = udp_socket(&t.pod_b, SocketAddrV4::new(POD_B, 7777));
    let remote = udp_socket(&t.peer, SocketAddrV4::new(REMOTE_POD, 41100));
    let (to_a, to_b) = (
        SocketAddr::from((POD_A, 7777)),
        SocketAddr::from((POD_B, 7777)),
    );
    assert!(
        !udp_delivered(&a, to_b, &b, Duration::from_secs(1)),
        "pending: a -> b is dropped"
    );
    assert!(
        !udp_delivered(&remote, to_b, &b, Duration::from_secs(1)),
        "pending: remote -> b is dropped"
    );
    assert!(
        !udp_delivered(&b, to_a, &a, Duration::from_secs(1)),
        "pending: b -> a is dropped"
    );
    let _l = listen(&t.pod_b, 8080);
    assert!(
        !connect(&t.node, POD_B, 8080),
        "pending: even the node does not reach b"
    );
    let hooks = std::cell::RefCell::new(BTreeSet::new());
    wait_event(&mut flows, Duration::from_secs(3), |e| {
        if e.verdict() == Some(Verdict::DroppedPolicy) && e.ifindex == ifindex_b {
            hooks.borrow_mut().extend(e.hook().map(|h| h as u8));
        }
        hooks.borrow().len() == 2
    })
    .unwrap_or_else(|| panic!("dropped-policy records of the pending veth: {hooks:?}"));
    loader
        .maps()
        .upsert_endpoint(ifindex_b, EndpointValue::new(Some(POD_B), None))
        .expect("entry");
    assert!(
        udp_delivered(&a, to_b, &b, Duration::from_secs(5)),
        "entry written: a -> b passes"
    );
    assert!(
        udp_delivered(&b, to_a, &a, Duration::from_secs(5)),
        "entry written: b -> a passes"
    );
}

/// Finding 12: the node's own traffic (kubelet probes) reaches an isolated pod whatever source
/// address it uses, the underlay's included; traffic from elsewhere stays denied. `bridge`:
/// pod b sits behind a bridge in the node namespace (the programs on the bridge, as the agent
/// places them when one interface routes to several pods) instead of a ptp veth route.
fn node_reaches_isolated_pod(bridge: bool) {
    let Some(t) = Topo::for_test("host identity") else {
        return;
    };
    let hooks = if bridge {
        let br = format!("wr{}", &t.host_b[2..]);
        let node = t.node.as_str();
        ip(node, &["addr", "del", "10.201.2.1/24", "dev", &t.host_b]);
        ip(node, &["link", "add", &br, "type", "bridge"]);
        ip(node, &["link", "set", &t.host_b, "master", &br]);
        ip(node, &["addr", "add", "10.201.2.1/24", "dev", &br]);
        ip(node, &["link", "set", &br, "up"]);
        vec![
            (t.host_a.clone(), Hook::FromPod),
            (t.host_a.clone(), Hook::ToPod),
            (br.clone(), Hook::FromPod),
            (br, Hook::ToPod),
        ]
    } else {
        pod_hooks(&t)
    };
    let mut loader = load(&t, hooks);
    write_config_and_policy(
        &mut loader,
        &Config::new(0, Mode::Permissive, 1, 0),
        &compiled(&deny_b()),
    );
    let underlay = Ipv4Addr::new(192, 168, 77, 1);
    loader
        .maps()
        .upsert_ipcache(
            Ipv4Net::from(underlay),
            IpcacheValue::new(Identity::HOST.0, 0, underlay, ipcache_flags::NODE),
        )
        .expect("node entry");
    let _l = listen(&t.pod_b, 8080);
    let b = SocketAddrV4::new(POD_B, 8080);
    for src in [underlay, Ipv4Addr::new(10, 201, 2, 1)] {
        assert!(
            eventually(Duration::from_secs(5), || in_ns(&t.node, move || {
                connect_from(src, b)
            })),
            "bridge {bridge}: the node's probe from {src} reaches isolated b"
        );
    }
    let world = udp_socket(&t.peer, SocketAddrV4::new(PEER_NODE, 41200));
    let rx = udp_socket(&t.pod_b, SocketAddrV4::new(POD_B, 7777));
    assert!(
        !udp_delivered(
            &world,
            SocketAddrV4::new(POD_B, 7777),
            &rx,
            Duration::from_secs(1)
        ),
        "bridge {bridge}: another node's address is world and stays denied"
    );
    let a = udp_socket(&t.pod_a, SocketAddrV4::new(POD_A, 41201));
    assert!(
        !udp_delivered(
            &a,
            SocketAddrV4::new(POD_B, 7777),
            &rx,
            Duration::from_secs(1)
        ),
        "bridge {bridge}: pod a stays denied"
    );
}

#[test]
fn the_node_reaches_isolated_pods_behind_ptp_veths() {
    node_reaches_isolated_pod(false);
}

#[test]
fn the_node_reaches_isolated_pods_behind_a_bridge() {
    node_reaches_isolated_pod(true);
}
