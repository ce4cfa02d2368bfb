//! Privileged datapath tests (root): real namespaces, veths, a TUN tunnel and a private bpffs;
//! the programs are loaded and attached with the crate's loader and driven with real traffic.

#[path = "common/fixtures.rs"]
mod fixtures;
#[path = "datapath/harness.rs"]
mod harness;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use fixtures::{net_policy, pods_v4, run, two_pods};
use harness::{
    PEER_NODE, POD_A, POD_B, REMOTE_POD, Topo, Tun, TunPipe, ifindex, in_ns, ip, wait_event,
};
use ipnet::Ipv4Net;
use wiremesh_bpf::{
    Attached, Config, EndpointValue, Hook, IpcacheValue, Loader, Mode, Verdict, ipcache_flags,
};
use wiremesh_integration::{pin_map_of_another_shape, vm};
use wiremesh_policy::{Compiled, Identity, compile, load_manifest};

/// Every other test of this binary again on Debian's kernel 6.1 in the kernel VM (one boot): there
/// the programs attach through netlink and a clsact qdisc, as TCX arrived in 6.6, which is what
/// production kernels 5.15-6.1 need.
#[test]
fn datapath_tests_on_kernel_6_1() {
    vm::rerun_all_in_vm(&["datapath_tests_on_kernel_6_1"]);
}
#[path = "datapath/trust.rs"]
mod trust;

/// b is isolated for ingress with no rules.
fn deny_b() -> String {
    net_policy("deny-b", "b", "Ingress", "")
}

/// a is isolated for ingress with no rules.
fn deny_a() -> String {
    net_policy("deny-a", "a", "Ingress", "")
}

/// b isolated both ways with no rules.
fn deny_b_both_ways() -> String {
    net_policy("b-udp", "b", "Ingress, Egress", "")
}

/// Both pods isolated both ways; only a -> b tcp/8080 is allowed (replies need conntrack).
fn allow_a_to_b_8080() -> String {
    let b_in = r#"  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{protocol: TCP, port: 8080}]
"#;
    let a_out = r#"  egress:
  - to: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{protocol: TCP, port: 8080}]
"#;
    net_policy("b-in", "b", "Ingress, Egress", b_in)
        + &net_policy("a-out", "a", "Ingress, Egress", a_out)
}

/// a -> b udp/7777 allowed; b is isolated for egress, so b -> a passes only as a reply.
fn udp_a_to_b_only() -> String {
    let rules = r#"  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{protocol: UDP, port: 7777}]
"#;
    net_policy("b-udp", "b", "Ingress, Egress", rules)
}

fn compiled(policies: &str) -> Compiled {
    let c = compile(&load_manifest(&format!("{}{policies}", pods_v4())).expect("manifest"));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    c
}

fn local(_: Ipv4Addr, id: Identity) -> IpcacheValue {
    IpcacheValue::new(id.0, 0, Ipv4Addr::UNSPECIFIED, ipcache_flags::LOCAL)
}

fn load(t: &Topo, hooks: Vec<(String, Hook)>) -> Loader {
    load_expect(t, hooks, Attached::fresh())
}

/// Loads and attaches `hooks`; like the agent, writes the anti-spoofing entry of a pod veth
/// (its pod's IPv4 and IPv6 address) before attaching `from_pod` to it.
fn load_expect(t: &Topo, hooks: Vec<(String, Hook)>, how: Attached) -> Loader {
    let pin = t.pin_dir();
    let pods = [
        (t.host_a.clone(), POD_A, "fd00:201:1::2"),
        (t.host_b.clone(), POD_B, "fd00:201:2::2"),
    ];
    in_ns(&t.node, move || {
        let mut l = Loader::load(&pin).expect("load");
        for (iface, hook) in hooks {
            if let Some((_, ip4, ip6)) = pods.iter().find(|(h, _, _)| *h == iface)
                && hook == Hook::FromPod
            {
                let ep = EndpointValue::new(Some(*ip4), Some(ip6.parse().expect("v6")));
                let index = ifindex(&iface);
                l.maps().upsert_endpoint(index, ep).expect("endpoint");
            }
            let got = l.attach(&iface, hook).expect("attach");
            assert_eq!(got, how, "{iface} {hook:?}");
        }
        l
    })
}

fn pod_hooks(t: &Topo) -> Vec<(String, Hook)> {
    let mut v = Vec::new();
    for h in [&t.host_a, &t.host_b] {
        v.push((h.clone(), Hook::FromPod));
        v.push((h.clone(), Hook::ToPod));
    }
    v
}

fn listen(ns: &str, port: u16) -> TcpListener {
    in_ns(ns, move || {
        TcpListener::bind(("0.0.0.0", port)).expect("bind")
    })
}

fn connect(ns: &str, dst: Ipv4Addr, port: u16) -> bool {
    in_ns(ns, move || {
        TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_millis(700))
            .is_ok()
    })
}

fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
    }
    false
}

/// Packets of the flows from source port `sport` seen by `hook`: the records read so far (kept
/// in `seen` across calls) plus those flows' backlog in the map.
fn flows_of(
    reader: &mut wiremesh_bpf::FlowReader,
    seen: &mut Vec<wiremesh_bpf::FlowEvent>,
    loader: &Loader,
    sport: u16,
    hook: Hook,
) -> u64 {
    seen.extend(reader.read(Duration::from_millis(50)).expect("read"));
    let reported: u64 = seen
        .iter()
        .filter(|e| e.sport() == sport && e.hook() == Some(hook))
        .map(|e| e.packets)
        .sum();
    let backlog: u64 = loader
        .maps_ref()
        .flow_backlog()
        .expect("flows")
        .iter()
        .filter(|(k, _)| u16::from_be_bytes(k.src_port) == sport && k.hook == hook as u8)
        .map(|(_, s)| s.packets)
        .sum();
    reported + backlog
}

fn udp_socket(ns: &str, bind: impl Into<SocketAddr>) -> UdpSocket {
    let bind: SocketAddr = bind.into();
    in_ns(ns, move || {
        let s = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        s.set_read_timeout(Some(Duration::from_millis(150)))
            .expect("timeout");
        s
    })
}

/// Sends from `from` to `to` until `rx` receives a datagram or `timeout` passes.
fn udp_delivered(
    from: &UdpSocket,
    to: impl Into<SocketAddr> + Copy,
    rx: &UdpSocket,
    timeout: Duration,
) -> bool {
    let mut buf = [0u8; 64];
    eventually(timeout, || {
        // A send may fail while IPv6 neighbours are resolved; the loop retries.
        let _ = from.send_to(b"wiremesh", to.into());
        rx.recv_from(&mut buf).is_ok()
    })
}

/// Plaintext UDP both ways between pod a and the remote pod: `out` (pod -> remote pod) and
/// `back` (remote pod -> pod), each a sender, its destination and the receiving socket there.
struct CrossNode<'a> {
    out: (&'a UdpSocket, SocketAddr, &'a UdpSocket),
    back: (&'a UdpSocket, SocketAddr, &'a UdpSocket),
}

impl CrossNode<'_> {
    /// Asserts that both directions pass (`want`) or are dropped, each tried for `timeout`; the
    /// receivers are drained first when a drop is expected. `what` starts the messages.
    #[track_caller]
    fn assert(&self, want: bool, timeout: Duration, what: &str) {
        if !want {
            drain(&[self.out.2, self.back.2]);
        }
        let outcome = if want { "passes" } else { "is dropped" };
        for (dir, (tx, to, rx)) in [
            ("pod -> remote pod", self.out),
            ("remote pod -> pod", self.back),
        ] {
            assert_eq!(
                udp_delivered(tx, to, rx, timeout),
                want,
                "{what}: {dir} plaintext {outcome}"
            );
        }
    }
}

/// Reads and discards what is queued on the `sockets` (each read waits their read timeout).
fn drain(sockets: &[&UdpSocket]) {
    let mut buf = [0u8; 64];
    for s in sockets {
        while s.recv_from(&mut buf).is_ok() {}
    }
}

/// Creates the TUN "tunnel" `wt<id>` in the node namespace; returns its name, the device and
/// its ifindex.
fn node_tun(t: &Topo) -> (String, Tun, u32) {
    let name = format!("wt{}", &t.host_a[2..]);
    let n = name.clone();
    let (tun, index) = in_ns(&t.node, move || {
        let tun = Tun::create(&n);
        (tun, ifindex(&n))
    });
    (name, tun, index)
}

/// The ifindex of pod a's veth in the node namespace.
fn host_a_ifindex(t: &Topo) -> u32 {
    let host_a = t.host_a.clone();
    in_ns(&t.node, move || {
        wiremesh_bpf::if_index(&host_a).expect("ifindex")
    })
}

/// Ipcache value of the peer node's pod range without the encrypt flag.
fn remote_plain() -> IpcacheValue {
    IpcacheValue::new(0, 2, PEER_NODE, ipcache_flags::REMOTE_POD)
}

/// Ipcache value of the remote pods (identity 300) behind the tunnel.
fn remote_encrypted() -> IpcacheValue {
    IpcacheValue::new(
        300,
        2,
        PEER_NODE,
        ipcache_flags::REMOTE_POD | ipcache_flags::ENCRYPT,
    )
}

#[test]
fn policy_drops_with_isolation_and_passes_with_allow_rule() {
    let Some(t) = Topo::for_test("policy") else {
        return;
    };
    let cfg = Config::new(0, Mode::Permissive, 1, 0);
    let (mut loader, mut flows, none) = loaded_with(&t, cfg, "");
    let _l80 = listen(&t.pod_b, 8080);
    let _l81 = listen(&t.pod_b, 8081);

    // Without policy the path works (so a later failure is the policy's doing).
    assert!(
        eventually(Duration::from_secs(5), || connect(&t.pod_a, POD_B, 8080)),
        "a -> b tcp/8080 without policy"
    );
    let e = wait_event(&mut flows, Duration::from_secs(3), |e| {
        e.verdict() == Some(Verdict::ForwardedLocal) && e.dst() == POD_B && e.dport() == 8080
    })
    .expect("forwarded-local record");
    assert_eq!(e.src(), POD_A);
    assert_eq!(e.src_identity, none.endpoints[&POD_A.into()].0);
    assert_eq!(e.dst_identity, none.endpoints[&POD_B.into()].0);
    assert_eq!(e.protocol, 6);

    let deny = compiled(&deny_b());
    let applied = loader
        .maps()
        .apply_policy(&deny.diff(&none), local)
        .expect("deny");
    assert_eq!(applied.written, 1, "one isolation entry, no rules");
    assert!(
        !connect(&t.pod_a, POD_B, 8080),
        "isolated b must drop tcp/8080"
    );
    let e = wait_event(&mut flows, Duration::from_secs(3), |e| {
        e.verdict() == Some(Verdict::DroppedPolicy) && e.dst() == POD_B && e.dport() == 8080
    })
    .expect("dropped-policy record");
    assert_eq!(e.src(), POD_A);
    assert_eq!(e.hook(), Some(Hook::FromPod));
    assert!(e.packets >= 1 && e.bytes >= 40, "{e:?}");

    let allow = compiled(&allow_a_to_b_8080());
    loader
        .maps()
        .apply_policy(&allow.diff(&deny), local)
        .expect("allow");
    assert!(
        eventually(Duration::from_secs(5), || connect(&t.pod_a, POD_B, 8080)),
        "allowed a -> b tcp/8080 (replies through conntrack)"
    );
    assert!(!connect(&t.pod_a, POD_B, 8081), "tcp/8081 is not allowed");
    assert!(!connect(&t.pod_b, POD_A, 8080), "b -> a is not allowed");
    wait_event(&mut flows, Duration::from_secs(3), |e| {
        e.verdict() == Some(Verdict::DroppedPolicy) && e.dst() == POD_B && e.dport() == 8081
    })
    .expect("dropped-policy record for 8081");
    assert_eq!(loader.maps().events_lost().expect("stats"), 0);
}

#[test]
fn remote_pod_is_redirected_into_the_tunnel() {
    let Some(t) = Topo::for_test("redirect") else {
        return;
    };
    let (tun_name, tun, tun_index) = node_tun(&t);
    ip(&t.node, &["link", "set", &tun_name, "up"]);
    let mut loader = load(&t, pod_hooks(&t));
    let mut flows = loader.take_flow_reader().expect("reader");
    let maps = loader.maps();
    maps.set_config(&Config::new(tun_index, Mode::Permissive, 1, 0))
        .expect("config");
    maps.upsert_ipcache(Ipv4Net::from(POD_A), local(POD_A, Identity(256)))
        .expect("ipcache");
    let range: Ipv4Net = "10.201.9.0/24".parse().expect("net");
    maps.upsert_ipcache(range, remote_encrypted())
        .expect("ipcache");

    let tx = udp_socket(&t.pod_a, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let peer_rx = udp_socket(&t.peer, SocketAddrV4::new(REMOTE_POD, 5555));
    let dst = SocketAddrV4::new(REMOTE_POD, 5555);
    let seen = eventually(Duration::from_secs(5), || {
        tx.send_to(b"to-remote", dst).expect("send");
        tun.wait_packet(Duration::from_millis(200), |p| {
            p.len() >= 28
                && p[0] >> 4 == 4
                && p[9] == 17
                && p[16..20] == REMOTE_POD.octets()
                && p[22..24] == 5555u16.to_be_bytes()
        })
    });
    assert!(seen, "the tunnel device never saw the pod's packet");
    let mut buf = [0u8; 64];
    assert!(
        peer_rx.recv_from(&mut buf).is_err(),
        "redirected traffic must not also go out on the underlay"
    );
    let e = wait_event(&mut flows, Duration::from_secs(3), |e| {
        e.verdict() == Some(Verdict::ForwardedEncrypted) && e.dst() == REMOTE_POD
    })
    .expect("forwarded-encrypted record");
    assert_eq!(e.peer_node(), Some(PEER_NODE));
    assert_eq!((e.src_identity, e.dst_identity), (256, 300));

    // Without the encrypt flag: permissive passes in plaintext over the underlay ...
    let plain = IpcacheValue::new(300, 2, PEER_NODE, ipcache_flags::REMOTE_POD);
    loader.maps().upsert_ipcache(range, plain).expect("ipcache");
    assert!(
        udp_delivered(&tx, dst, &peer_rx, Duration::from_secs(5)),
        "permissive: plaintext reaches the peer"
    );
    // ... and strict drops it at the pod.
    set_config(&mut loader, Config::new(tun_index, Mode::Strict, 1, 0));
    drain(&[&peer_rx]);
    assert!(
        !udp_delivered(&tx, dst, &peer_rx, Duration::from_secs(1)),
        "strict: plaintext must not reach the peer"
    );
    wait_event(&mut flows, Duration::from_secs(3), |e| {
        e.verdict() == Some(Verdict::DroppedPlaintext) && e.hook() == Some(Hook::FromPod)
    })
    .expect("dropped-plaintext record from from_pod");
}

/// Key rotation (docs/rotation.md): an ENCRYPT entry flagged `ALT_TUNNEL` goes into
/// `alt_tunnel_ifindex` (the next world's device); with `alt_tunnel_ifindex` 0 the flag falls back
/// to `tunnel_ifindex`. The agent relies on the fallback when a rotation completes: it writes the
/// config (the next world becomes `tunnel_ifindex`, no alt) before it clears the flags, so no
/// packet is sent into the old world's device in between.
#[test]
fn alt_tunnel_flag_redirects_into_the_next_world_and_falls_back_to_the_tunnel() {
    let Some(t) = Topo::for_test("alt") else {
        return;
    };
    let (tun_name, tun, tun_index) = node_tun(&t);
    let alt_name = format!("wx{}", &t.host_a[2..]);
    let n = alt_name.clone();
    let (alt, alt_index) = in_ns(&t.node, move || {
        let tun = Tun::create(&n);
        (tun, ifindex(&n))
    });
    ip(&t.node, &["link", "set", &tun_name, "up"]);
    ip(&t.node, &["link", "set", &alt_name, "up"]);
    let mut loader = load(&t, pod_hooks(&t));
    let maps = loader.maps();
    maps.set_config(&Config::new(tun_index, Mode::Permissive, 1, 0).with_alt_tunnel(alt_index))
        .expect("config");
    maps.upsert_ipcache(Ipv4Net::from(POD_A), local(POD_A, Identity(256)))
        .expect("ipcache");
    let range: Ipv4Net = "10.201.9.0/24".parse().expect("net");
    let flagged = IpcacheValue::new(
        300,
        2,
        PEER_NODE,
        ipcache_flags::REMOTE_POD | ipcache_flags::ENCRYPT | ipcache_flags::ALT_TUNNEL,
    );
    maps.upsert_ipcache(range, flagged).expect("ipcache");

    let tx = udp_socket(&t.pod_a, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let dst = SocketAddrV4::new(REMOTE_POD, 5555);
    let to_remote = |p: &[u8]| {
        p.len() >= 28 && p[0] >> 4 == 4 && p[9] == 17 && p[16..20] == REMOTE_POD.octets()
    };
    let seen_on = |device: &Tun| {
        // Packets queued before the change do not count.
        for d in [&tun, &alt] {
            d.wait_packet(Duration::from_millis(200), |_| false);
        }
        eventually(Duration::from_secs(5), || {
            tx.send_to(b"to-remote", dst).expect("send");
            device.wait_packet(Duration::from_millis(200), to_remote)
        })
    };
    assert!(seen_on(&alt), "flagged: into the alt tunnel");
    // The completion order: config first (the alt device is the tunnel now, no alt), flags still
    // set.
    set_config(&mut loader, Config::new(alt_index, Mode::Permissive, 1, 0));
    assert!(
        seen_on(&alt),
        "flagged with no alt tunnel: into tunnel_ifindex (the new world)"
    );
    // And a flagged entry with alt 0 and the old tunnel as tunnel_ifindex goes there too.
    set_config(&mut loader, Config::new(tun_index, Mode::Permissive, 1, 0));
    assert!(
        seen_on(&tun),
        "flagged with no alt tunnel: into tunnel_ifindex"
    );
}

#[test]
fn strict_underlay_drops_plaintext_pod_traffic() {
    let Some(t) = Topo::for_test("strict underlay") else {
        return;
    };
    let mut loader = load(
        &t,
        vec![
            (t.underlay.clone(), Hook::UnderlayIngress),
            (t.underlay.clone(), Hook::UnderlayEgress),
        ],
    );
    let mut flows = loader.take_flow_reader().expect("reader");
    let maps = loader.maps();
    maps.set_config(&Config::new(0, Mode::Strict, 1, 51820))
        .expect("config");
    let local_range: Ipv4Net = "10.201.1.0/24".parse().expect("net");
    maps.upsert_ipcache(local_range, local(Ipv4Addr::UNSPECIFIED, Identity(0)))
        .expect("ipcache");
    maps.upsert_ipcache("10.201.9.0/24".parse().expect("net"), remote_plain())
        .expect("ipcache");

    // Ingress: remote pod -> local pod.
    let pod_rx = udp_socket(&t.pod_a, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7777));
    let to_pod = SocketAddrV4::new(POD_A, 7777);
    let remote_plain = udp_socket(&t.peer, SocketAddrV4::new(REMOTE_POD, 40000));
    assert!(
        !udp_delivered(&remote_plain, to_pod, &pod_rx, Duration::from_secs(1)),
        "strict: plaintext pod traffic must be dropped on underlay ingress"
    );
    let e = wait_event(&mut flows, Duration::from_secs(3), |e| {
        e.verdict() == Some(Verdict::DroppedPlaintext) && e.hook() == Some(Hook::UnderlayIngress)
    })
    .expect("dropped-plaintext record (ingress)");
    assert_eq!((e.src(), e.dst(), e.dport()), (REMOTE_POD, POD_A, 7777));
    assert_eq!(e.peer_node(), Some(PEER_NODE));
    // Accounting: records plus the not-yet-reported backlog add up to every packet sent.
    let mut seen = Vec::new();
    let before = flows_of(&mut flows, &mut seen, &loader, 40000, Hook::UnderlayIngress);
    for _ in 0..5 {
        remote_plain.send_to(b"count", to_pod).expect("send");
    }
    let mut last = 0;
    assert!(
        eventually(Duration::from_secs(3), || {
            last = flows_of(&mut flows, &mut seen, &loader, 40000, Hook::UnderlayIngress);
            last == before + 5
        }),
        "5 dropped packets: records + backlog went from {before} to {last}"
    );
    // Egress: local pod address -> remote pod.
    let peer_rx = udp_socket(&t.peer, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7777));
    let to_remote = SocketAddrV4::new(REMOTE_POD, 7777);
    let gw = Ipv4Addr::new(10, 201, 1, 1);
    let node_plain = udp_socket(&t.node, SocketAddrV4::new(gw, 40001));
    assert!(
        !udp_delivered(&node_plain, to_remote, &peer_rx, Duration::from_secs(1)),
        "strict: plaintext pod traffic must be dropped on underlay egress"
    );
    wait_event(&mut flows, Duration::from_secs(3), |e| {
        e.verdict() == Some(Verdict::DroppedPlaintext)
            && e.hook() == Some(Hook::UnderlayEgress)
            && e.dst() == REMOTE_POD
    })
    .expect("dropped-plaintext record (egress)");

    // Permissive lets the same plaintext through: the drop above was strict mode's.
    set_config(&mut loader, Config::new(0, Mode::Permissive, 1, 51820));
    assert!(
        udp_delivered(&node_plain, to_remote, &peer_rx, Duration::from_secs(5)),
        "permissive: plaintext passes"
    );
}

#[test]
fn pinned_maps_and_links_survive_the_loader() {
    let Some(t) = Topo::for_test("pinning") else {
        return;
    };
    let _l = listen(&t.pod_b, 8080);
    let none = compiled("");
    let deny = compiled(&deny_b());
    {
        let mut first = load(&t, pod_hooks(&t));
        write_config_and_policy(&mut first, &Config::new(0, Mode::Permissive, 1, 0), &none);
        assert!(
            eventually(Duration::from_secs(5), || connect(&t.pod_a, POD_B, 8080)),
            "a -> b without policy"
        );
        first
            .maps()
            .apply_policy(&deny.diff(&none), local)
            .expect("deny");
        assert!(!connect(&t.pod_a, POD_B, 8080), "deny while loaded");
    }
    // The loader is gone; programs (pinned links) and maps (pinned) still enforce.
    assert!(
        !connect(&t.pod_a, POD_B, 8080),
        "deny must hold with no loader alive"
    );
    if wiremesh_bpf::tcx_available() {
        let links = t.pin_dir().join("links");
        assert!(links.join(format!("from_pod-{}", t.host_a)).exists());
    } else {
        assert_eq!(
            our_filters(&t, &t.host_a, "ingress"),
            ["from_pod"],
            "one filter of ours, in our slot"
        );
    }

    // A second loader reuses the maps and swaps its programs into the pinned links.
    let mut second = load_expect(&t, pod_hooks(&t), Attached::replaced());
    let maps = second.maps();
    let entries = maps.ipcache_entries().expect("ipcache");
    for ip in [POD_A, POD_B] {
        let (_, v) = entries
            .iter()
            .find(|(n, _)| *n == Ipv4Net::from(ip))
            .unwrap_or_else(|| panic!("{ip} missing after reload: {entries:?}"));
        assert_eq!(v.identity, deny.endpoints[&ip.into()].0);
    }
    assert_eq!(
        maps.policy_counts(),
        (deny.isolated.len(), deny.rules.len())
    );
    assert_eq!(maps.config().expect("config").mode, Mode::Permissive as u32);
    assert!(!connect(&t.pod_a, POD_B, 8080), "deny after re-attach");
    let allow = compiled(&allow_a_to_b_8080());
    maps.apply_policy(&allow.diff(&deny), local).expect("allow");
    assert!(
        eventually(Duration::from_secs(5), || connect(&t.pod_a, POD_B, 8080)),
        "the reloaded loader's maps drive the attached programs"
    );

    // A device deleted and recreated under the same name leaves a defunct pinned link: the
    // loader notices and attaches afresh.
    let dev = format!("wd{}", &t.host_a[2..]);
    let peer = format!("wp{}", &t.host_a[2..]);
    run(&[
        "ip", "-n", &t.node, "link", "add", &dev, "type", "veth", "peer", "name", &peer,
    ]);
    let (d1, d2) = (dev.clone(), dev.clone());
    let mut second = in_ns(&t.node, move || {
        assert_eq!(
            second.attach(&d1, Hook::UnderlayIngress).expect("attach"),
            Attached::fresh()
        );
        second
    });
    run(&["ip", "-n", &t.node, "link", "del", &dev]);
    run(&[
        "ip", "-n", &t.node, "link", "add", &dev, "type", "veth", "peer", "name", &peer,
    ]);
    let got = in_ns(&t.node, move || {
        second.attach(&d2, Hook::UnderlayIngress).expect("attach")
    });
    assert_eq!(
        got,
        Attached::fresh(),
        "a stale pinned link is replaced by a new one (netlink: the filter went with the device)"
    );
}

/// The names of the bpf filters at our netlink priority/handle on `iface` (`tc filter show`,
/// kernels before 6.6).
fn our_filters(t: &Topo, iface: &str, direction: &str) -> Vec<String> {
    let out = std::process::Command::new("tc")
        .args(["-n", &t.node, "filter", "show", "dev", iface, direction])
        .output()
        .expect("tc filter show");
    assert!(out.status.success(), "{out:?}");
    let slot = format!(
        "pref {} bpf chain 0 handle {:#x}",
        wiremesh_bpf::NETLINK_PRIORITY,
        wiremesh_bpf::NETLINK_HANDLE
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&slot))
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "handle").nth(2))
        .map(|name| name.split(':').next().unwrap_or(name).to_owned())
        .collect()
}

#[test]
fn detach_stops_enforcement_and_attach_after_it_starts_afresh() {
    let Some(t) = Topo::for_test("detach") else {
        return;
    };
    let _l = listen(&t.pod_b, 8080);
    let deny = compiled(&deny_b());
    let mut loader = load(&t, pod_hooks(&t));
    write_config_and_policy(&mut loader, &Config::new(0, Mode::Permissive, 1, 0), &deny);
    assert!(!connect(&t.pod_a, POD_B, 8080), "deny while attached");
    let hooks = pod_hooks(&t);
    let loader = in_ns(&t.node, move || {
        let mut loader = loader;
        for (iface, hook) in hooks {
            loader.detach(&iface, hook).expect("detach");
            loader
                .detach(&iface, hook)
                .expect("a second detach is harmless");
        }
        loader
    });
    assert!(
        eventually(Duration::from_secs(5), || connect(&t.pod_a, POD_B, 8080)),
        "nothing enforces once detached"
    );
    if !wiremesh_bpf::tcx_available() {
        assert!(our_filters(&t, &t.host_b, "egress").is_empty());
    }
    drop(loader);
    // The maps kept the policy: attaching again enforces it at once, in a fresh attachment.
    let again = load_expect(&t, pod_hooks(&t), Attached::fresh());
    assert!(!connect(&t.pod_a, POD_B, 8080), "deny after re-attaching");
    drop(again);
}

/// A remote pod `r` (10.201.9.5, app=r, on the peer node) and pod b, whose ingress allows only
/// udp/7777 from r.
fn remote_to_b() -> String {
    let r = r#"---
apiVersion: v1
kind: Pod
metadata: {name: r, namespace: t, labels: {app: r}}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.201.9.5}
"#;
    let rules = r#"  ingress:
  - from: [{podSelector: {matchLabels: {app: r}}}]
    ports: [{protocol: UDP, port: 7777}]
"#;
    format!("{r}{}", net_policy("b-from-r", "b", "", rules))
}

#[test]
fn to_pod_enforces_ingress_for_traffic_from_other_nodes() {
    let Some(t) = Topo::for_test("to_pod ingress") else {
        return;
    };
    let mut loader = load(&t, pod_hooks(&t));
    let mut flows = loader.take_flow_reader().expect("reader");
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
    let policy = compiled(&remote_to_b());
    maps.apply_policy(&policy.diff(&Compiled::default()), place)
        .expect("policy");
    let remote_id = policy.endpoints[&REMOTE_POD.into()].0;
    let entries = maps.ipcache_entries().expect("ipcache");
    assert!(entries.iter().any(|(n, v)| *n == Ipv4Net::from(REMOTE_POD)
        && v.flags == ipcache_flags::REMOTE_POD
        && v.node_ip == PEER_NODE.octets()));

    let rx7777 = udp_socket(&t.pod_b, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7777));
    let rx7778 = udp_socket(&t.pod_b, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7778));
    let tx = udp_socket(&t.peer, SocketAddrV4::new(REMOTE_POD, 0));
    let (to7777, to7778) = (
        SocketAddrV4::new(POD_B, 7777),
        SocketAddrV4::new(POD_B, 7778),
    );
    assert!(
        udp_delivered(&tx, to7777, &rx7777, Duration::from_secs(5)),
        "r -> b udp/7777 is allowed"
    );
    let e = wait_event(&mut flows, Duration::from_secs(3), |e| {
        e.hook() == Some(Hook::ToPod) && e.dport() == 7777
    })
    .expect("to_pod record");
    assert_eq!(e.verdict(), Some(Verdict::ForwardedPlain), "{e:?}");
    assert_eq!(
        (e.src_identity, e.peer_node()),
        (remote_id, Some(PEER_NODE))
    );
    assert!(
        !udp_delivered(&tx, to7778, &rx7778, Duration::from_secs(1)),
        "r -> b udp/7778 is not allowed"
    );
    let e = wait_event(&mut flows, Duration::from_secs(3), |e| {
        e.verdict() == Some(Verdict::DroppedPolicy) && e.dport() == 7778
    })
    .expect("dropped-policy record from to_pod");
    assert_eq!(e.hook(), Some(Hook::ToPod));
    assert_eq!((e.src(), e.dst()), (REMOTE_POD, POD_B));
}

#[test]
fn load_outside_bpffs_fails_with_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = Loader::load(tmp.path()).expect_err("a tmpfs is not a bpffs");
    assert!(
        matches!(err, wiremesh_bpf::Error::NotBpffs { .. }),
        "unexpected error: {err}"
    );
    assert!(err.to_string().contains("mount -t bpf"), "{err}");
}

/// CLOCK_MONOTONIC in ns (what `bpf_ktime_get_ns` reads).
fn monotonic_ns() -> u64 {
    // SAFETY: zeroed timespec is a valid out-parameter.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid clock id and pointer.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The conntrack entry of src:sport -> dst:dport, if any.
fn ct_entry(
    loader: &Loader,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
) -> Option<wiremesh_bpf::CtValue> {
    let entries = loader.maps_ref().ct_entries().expect("ct");
    entries
        .into_iter()
        .find(|(k, _)| {
            (k.src_ip, k.dst_ip, k.src_port, k.dst_port)
                == (
                    src.octets(),
                    dst.octets(),
                    sport.to_be_bytes(),
                    dport.to_be_bytes(),
                )
        })
        .map(|(_, v)| v)
}

/// Waits (bounded) until the conntrack entry of the tuple is older than `age`.
fn wait_ct_age(loader: &Loader, tuple: (Ipv4Addr, u16, Ipv4Addr, u16), age: Duration) {
    let (s, sp, d, dp) = tuple;
    let aged = eventually(age + Duration::from_secs(10), || {
        let v = ct_entry(loader, s, sp, d, dp).expect("conntrack entry vanished");
        std::thread::yield_now();
        monotonic_ns().saturating_sub(v.last_ns) > age.as_nanos() as u64
    });
    assert!(aged, "conntrack entry {tuple:?} never got {age:?} old");
}

/// Loads with the pod hooks, writes `cfg` and the compiled `policies` (from nothing); returns
/// the loader, its flow reader and the compiled policy.
fn loaded_with(
    t: &Topo,
    cfg: Config,
    policies: &str,
) -> (Loader, wiremesh_bpf::FlowReader, Compiled) {
    let mut loader = load(t, pod_hooks(t));
    let flows = loader.take_flow_reader().expect("reader");
    let policy = compiled(policies);
    write_config_and_policy(&mut loader, &cfg, &policy);
    (loader, flows, policy)
}

/// Writes `cfg` into the loader's config map.
fn set_config(loader: &mut Loader, cfg: Config) {
    loader.maps().set_config(&cfg).expect("config");
}

/// Writes `cfg` and `policy` (from nothing) into the loader's maps.
fn write_config_and_policy(loader: &mut Loader, cfg: &Config, policy: &Compiled) {
    let maps = loader.maps();
    maps.set_config(cfg).expect("config");
    maps.apply_policy(&policy.diff(&Compiled::default()), local)
        .expect("policy");
}

#[test]
fn conntrack_entries_expire_after_their_lifetime_and_refresh_on_use() {
    let Some(t) = Topo::for_test("conntrack expiry") else {
        return;
    };
    let lifetime = Duration::from_secs(3);
    let cfg = Config::new(0, Mode::Permissive, 1, 0)
        .with_ct_timeouts(Duration::from_secs(3600), lifetime);
    assert_eq!(cfg.ct_other_timeout_s, 3);
    let (loader, mut flows, _) = loaded_with(&t, cfg, &udp_a_to_b_only());

    let a = udp_socket(&t.pod_a, SocketAddrV4::new(POD_A, 40100));
    let b = udp_socket(&t.pod_b, SocketAddrV4::new(POD_B, 7777));
    let (to_a, to_b) = (
        SocketAddrV4::new(POD_A, 40100),
        SocketAddrV4::new(POD_B, 7777),
    );
    assert!(
        !udp_delivered(&b, to_a, &a, Duration::from_secs(1)),
        "b -> a without a conversation is denied (b is isolated for egress)"
    );
    assert!(
        udp_delivered(&a, to_b, &b, Duration::from_secs(5)),
        "a -> b udp/7777 is allowed"
    );
    assert!(
        udp_delivered(&b, to_a, &a, Duration::from_secs(5)),
        "b -> a as a reply passes"
    );
    let tuple = (POD_A, 40100, POD_B, 7777);
    let first = ct_entry(&loader, POD_A, 40100, POD_B, 7777).expect("entry");

    // A reply within the lifetime passes and refreshes the entry.
    wait_ct_age(&loader, tuple, Duration::from_secs(1));
    assert!(
        udp_delivered(&b, to_a, &a, Duration::from_secs(1)),
        "a reply within the lifetime passes"
    );
    let refreshed = ct_entry(&loader, POD_A, 40100, POD_B, 7777).expect("entry");
    assert!(
        refreshed.last_ns > first.last_ns,
        "the reply refreshed the entry: {first:?} -> {refreshed:?}"
    );

    // After the lifetime the same reply is a new b -> a flow, which b's egress denies.
    wait_ct_age(&loader, tuple, lifetime + Duration::from_millis(200));
    assert!(
        !udp_delivered(&b, to_a, &a, Duration::from_secs(1)),
        "a reply after the lifetime must be decided by policy (denied)"
    );
    wait_event(&mut flows, Duration::from_secs(3), |e| {
        e.verdict() == Some(Verdict::DroppedPolicy)
            && (e.src(), e.sport(), e.dst(), e.dport()) == (POD_B, 7777, POD_A, 40100)
    })
    .expect("dropped-policy record of the expired reply");

    // a talking again re-creates the entry.
    assert!(udp_delivered(&a, to_b, &b, Duration::from_secs(5)));
    assert!(
        udp_delivered(&b, to_a, &a, Duration::from_secs(5)),
        "replies pass again once a has talked"
    );
}

/// A TCP connection pod a -> pod b:8080 (client with a 1.5 s read timeout, server, client
/// port).
fn tcp_a_to_b(t: &Topo) -> (TcpStream, TcpStream, u16) {
    let listener = listen(&t.pod_b, 8080);
    let client = in_ns(&t.pod_a, move || {
        TcpStream::connect_timeout(&SocketAddr::from((POD_B, 8080)), Duration::from_secs(3))
            .expect("a -> b tcp/8080 is allowed")
    });
    client
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("timeout");
    let (server, _) = listener.accept().expect("accept");
    let sport = client.local_addr().expect("addr").port();
    (client, server, sport)
}

/// Waits until the connection's entry is idle past `lifetime`, then checks that server data
/// (the reply direction; b's egress denies it as a new flow) is dropped and recorded.
fn late_reply_is_dropped(
    loader: &Loader,
    flows: &mut wiremesh_bpf::FlowReader,
    (client, server, sport): (&mut TcpStream, &mut TcpStream, u16),
    lifetime: Duration,
) {
    use std::io::{Read, Write};
    wait_ct_age(
        loader,
        (POD_A, sport, POD_B, 8080),
        lifetime + Duration::from_millis(200),
    );
    server.write_all(b"2").expect("write");
    let mut buf = [0u8; 1];
    assert!(
        client.read_exact(&mut buf).is_err(),
        "server data after the entry's lifetime must be dropped (b's egress denies it)"
    );
    wait_event(flows, Duration::from_secs(3), |e| {
        e.verdict() == Some(Verdict::DroppedPolicy)
            && (e.src(), e.sport(), e.dport()) == (POD_B, 8080, sport)
    })
    .expect("dropped-policy record of the server's late data");
}

#[test]
fn tcp_reply_after_the_tcp_lifetime_is_decided_by_policy() {
    use std::io::{Read, Write};
    let Some(t) = Topo::for_test("tcp conntrack expiry") else {
        return;
    };
    let lifetime = Duration::from_secs(2);
    let cfg =
        Config::new(0, Mode::Permissive, 1, 0).with_ct_timeouts(lifetime, Duration::from_secs(60));
    let (loader, mut flows, _) = loaded_with(&t, cfg, &allow_a_to_b_8080());
    let (mut client, mut server, sport) = tcp_a_to_b(&t);
    server.write_all(b"1").expect("write");
    let mut buf = [0u8; 1];
    client
        .read_exact(&mut buf)
        .expect("server data within the lifetime reaches the client");

    let late = (&mut client, &mut server, sport);
    late_reply_is_dropped(&loader, &mut flows, late, lifetime);
}

#[test]
fn a_tcp_fin_shortens_the_conntrack_lifetime() {
    use std::io::{Read, Write};
    let Some(t) = Topo::for_test("tcp close") else {
        return;
    };
    let cfg = Config::new(0, Mode::Permissive, 1, 0);
    let (loader, mut flows, _) = loaded_with(&t, cfg, &allow_a_to_b_8080());
    let (mut client, mut server, sport) = tcp_a_to_b(&t);
    let entry = || ct_entry(&loader, POD_A, sport, POD_B, 8080).expect("entry");
    assert_eq!(entry().flags, 0, "an open connection");

    // The client half-closes: its FIN marks the entry, replies still pass for now.
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    assert!(
        eventually(Duration::from_secs(5), || entry().flags
            == wiremesh_bpf::CtValue::CLOSING),
        "the FIN marks the entry closing: {:?}",
        entry()
    );
    server.write_all(b"1").expect("write");
    let mut buf = [0u8; 1];
    client
        .read_exact(&mut buf)
        .expect("a reply right after the FIN passes");

    // Idle past the close lifetime (far below the 6 h TCP default): replies are new flows.
    let late = (&mut client, &mut server, sport);
    late_reply_is_dropped(
        &loader,
        &mut flows,
        late,
        wiremesh_bpf::CT_TCP_CLOSE_TIMEOUT,
    );
}

#[test]
fn a_policy_change_applies_to_established_flows() {
    let Some(t) = Topo::for_test("policy epoch") else {
        return;
    };
    let cfg = Config::new(0, Mode::Permissive, 1, 0);
    let (mut loader, _flows, allow) = loaded_with(&t, cfg, &udp_a_to_b_only());
    let a = udp_socket(&t.pod_a, SocketAddrV4::new(POD_A, 40200));
    let b = udp_socket(&t.pod_b, SocketAddrV4::new(POD_B, 7777));
    let to_b = SocketAddrV4::new(POD_B, 7777);
    assert!(udp_delivered(&a, to_b, &b, Duration::from_secs(5)));
    let epoch = loader.maps_ref().policy_epoch().expect("epoch");
    let entry = ct_entry(&loader, POD_A, 40200, POD_B, 7777).expect("entry");
    assert_eq!(
        entry.epoch, epoch,
        "the flow was decided in the current epoch"
    );

    let to_a = SocketAddrV4::new(POD_A, 40200);
    assert!(
        udp_delivered(&b, to_a, &a, Duration::from_secs(5)),
        "b replies while a -> b is allowed"
    );

    // Same tuple, policy now denies b's ingress (b stays isolated for egress): the cached
    // decision must not survive, and b's replies stop with it.
    let deny = compiled(&deny_b_both_ways());
    loader
        .maps()
        .apply_policy(&deny.diff(&allow), local)
        .expect("deny");
    assert_ne!(loader.maps_ref().policy_epoch().expect("epoch"), epoch);
    drain(&[&b]);
    assert!(
        !udp_delivered(&a, to_b, &b, Duration::from_secs(1)),
        "an established flow is denied after the policy change"
    );
    assert!(
        ct_entry(&loader, POD_A, 40200, POD_B, 7777).is_none(),
        "the denied flow's conntrack entry is removed"
    );
    drain(&[&a]);
    assert!(
        !udp_delivered(&b, to_a, &a, Duration::from_secs(1)),
        "replies of the denied flow stop too"
    );
    loader
        .maps()
        .apply_policy(&allow.diff(&deny), local)
        .expect("allow again");
    assert!(udp_delivered(&a, to_b, &b, Duration::from_secs(5)));

    // An ipcache write (a pod's identity changed) through the MapWriter methods also starts a
    // new epoch.
    let before = loader.maps_ref().policy_epoch().expect("epoch");
    let moved = local(POD_B, Identity(999));
    wiremesh_bpf::MapWriter::put_ipcache(loader.maps(), Ipv4Net::from(POD_B), moved)
        .expect("ipcache");
    assert_ne!(loader.maps_ref().policy_epoch().expect("epoch"), before);
}

#[test]
fn spoofed_source_addresses_are_dropped_at_from_pod() {
    let Some(t) = Topo::for_test("anti-spoofing") else {
        return;
    };
    let cfg = Config::new(0, Mode::Permissive, 1, 0);
    let (mut loader, mut flows, _) = loaded_with(&t, cfg, "");
    let spoofed = Ipv4Addr::new(10, 201, 1, 99);
    run(&[
        "ip",
        "-n",
        &t.pod_a,
        "addr",
        "add",
        "10.201.1.99/24",
        "dev",
        "eth0",
    ]);
    let honest = udp_socket(&t.pod_a, SocketAddrV4::new(POD_A, 40300));
    let liar = udp_socket(&t.pod_a, SocketAddrV4::new(spoofed, 40301));
    let b = udp_socket(&t.pod_b, SocketAddrV4::new(POD_B, 7777));
    let to_b = SocketAddrV4::new(POD_B, 7777);
    let ifindex_a = host_a_ifindex(&t);
    loader
        .maps()
        .remove_endpoint(ifindex_a)
        .expect("remove endpoint");
    assert!(
        udp_delivered(&liar, to_b, &b, Duration::from_secs(5)),
        "without an endpoint entry the source is not checked"
    );

    loader
        .maps()
        .upsert_endpoint(ifindex_a, EndpointValue::new(Some(POD_A), None))
        .expect("endpoint");
    assert!(
        loader
            .maps_ref()
            .endpoint_entries()
            .expect("endpoints")
            .contains(&(ifindex_a, EndpointValue::new(Some(POD_A), None)))
    );
    drain(&[&b]);
    assert!(
        !udp_delivered(&liar, to_b, &b, Duration::from_secs(1)),
        "a source that is not the pod's address is dropped"
    );
    let e = wait_event(&mut flows, Duration::from_secs(3), |e| {
        e.verdict() == Some(Verdict::DroppedPolicy) && e.src() == spoofed
    })
    .expect("dropped-policy record of the spoofed packet");
    assert_eq!((e.hook(), e.ifindex), (Some(Hook::FromPod), ifindex_a));
    assert!(
        udp_delivered(&honest, to_b, &b, Duration::from_secs(5)),
        "the pod's own address still passes"
    );
    loader
        .maps()
        .remove_endpoint(ifindex_a)
        .expect("remove endpoint");
    assert!(udp_delivered(&liar, to_b, &b, Duration::from_secs(5)));
}

/// Ipcache of the strict tests: pods a and b local, the peer's 10.201.9.0/24 a remote pod
/// range without the encrypt flag (no tunnel).
fn strict_ipcache(maps: &mut wiremesh_bpf::Maps) {
    for range in ["10.201.1.0/24", "10.201.2.0/24"] {
        let local_range = range.parse().expect("net");
        maps.upsert_ipcache(local_range, local(Ipv4Addr::UNSPECIFIED, Identity(0)))
            .expect("ipcache");
    }
    maps.upsert_ipcache("10.201.9.0/24".parse().expect("net"), remote_plain())
        .expect("ipcache");
}

fn all_hooks(t: &Topo) -> Vec<(String, Hook)> {
    let mut v = pod_hooks(t);
    v.push((t.underlay.clone(), Hook::UnderlayIngress));
    v.push((t.underlay.clone(), Hook::UnderlayEgress));
    v
}

#[test]
fn strict_drops_continue_with_the_agent_gone() {
    let Some(t) = Topo::for_test("strict without agent") else {
        return;
    };
    let pod_rx = udp_socket(&t.pod_a, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7777));
    let remote_tx = udp_socket(&t.peer, SocketAddrV4::new(REMOTE_POD, 40400));
    let peer_rx = udp_socket(&t.peer, SocketAddrV4::new(REMOTE_POD, 7777));
    let pod_tx = udp_socket(&t.pod_a, SocketAddrV4::new(POD_A, 40401));
    let paths = CrossNode {
        out: (&pod_tx, SocketAddr::from((REMOTE_POD, 7777)), &peer_rx),
        back: (&remote_tx, SocketAddr::from((POD_A, 7777)), &pod_rx),
    };
    {
        let mut agent = load(&t, all_hooks(&t));
        strict_ipcache(agent.maps());
        set_config(&mut agent, Config::new(0, Mode::Permissive, 1, 51820));
        paths.assert(true, Duration::from_secs(5), "permissive");
        set_config(&mut agent, Config::new(0, Mode::Strict, 1, 51820));
    }
    // The agent (loader, map and program fds) is gone; the pinned links and maps enforce.
    paths.assert(false, Duration::from_secs(2), "strict, agent gone");
    // A restarted agent finds the drops recorded in the pinned flow state.
    let restarted = load_expect(&t, all_hooks(&t), Attached::replaced());
    let backlog = restarted.maps_ref().flow_backlog().expect("flows");
    for hook in [Hook::FromPod, Hook::UnderlayIngress] {
        assert!(
            backlog
                .iter()
                .any(|(k, _)| k.hook == hook as u8 && k.verdict == Verdict::DroppedPlaintext as u8),
            "no dropped-plaintext flow state from {hook:?}: {backlog:?}"
        );
    }
}

#[test]
fn never_written_config_fails_closed_for_plaintext() {
    let Some(t) = Topo::for_test("unset config") else {
        return;
    };
    let mut loader = load(&t, all_hooks(&t));
    strict_ipcache(loader.maps());
    assert_eq!(
        loader.maps_ref().config().expect("config"),
        Config::default(),
        "config never written"
    );
    let _l = listen(&t.pod_b, 8080);
    assert!(
        eventually(Duration::from_secs(5), || connect(&t.pod_a, POD_B, 8080)),
        "pod-to-pod traffic on the node passes without a config"
    );
    let peer_rx = udp_socket(&t.peer, SocketAddrV4::new(REMOTE_POD, 7777));
    let pod_tx = udp_socket(&t.pod_a, SocketAddrV4::new(POD_A, 40500));
    let to_remote = SocketAddrV4::new(REMOTE_POD, 7777);
    assert!(
        !udp_delivered(&pod_tx, to_remote, &peer_rx, Duration::from_secs(2)),
        "unset config: cross-node plaintext is dropped (strict)"
    );
    let pod_rx = udp_socket(&t.pod_a, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7777));
    let remote_tx = udp_socket(&t.peer, SocketAddrV4::new(REMOTE_POD, 40501));
    assert!(
        !udp_delivered(
            &remote_tx,
            SocketAddrV4::new(POD_A, 7777),
            &pod_rx,
            Duration::from_secs(2)
        ),
        "unset config: plaintext from a remote pod is dropped on the underlay"
    );
    set_config(&mut loader, Config::new(0, Mode::Permissive, 1, 51820));
    assert!(
        udp_delivered(&pod_tx, to_remote, &peer_rx, Duration::from_secs(5)),
        "an explicit permissive config lets it through"
    );
}

/// IPv6-only pods a and b; b's ingress allows udp/7777 from a and udp/7778 from the remote
/// pod range (ipBlock), and b is isolated for egress (replies only).
fn v6_policy() -> String {
    let rules = r#"  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{protocol: UDP, port: 7777}]
  - from: [{ipBlock: {cidr: "fd00:201:9::/64"}}]
    ports: [{protocol: UDP, port: 7778}]
"#;
    let pods = two_pods("fd00:201:1::2", "fd00:201:2::2");
    pods + &net_policy("b-v6", "b", "Ingress, Egress", rules)
}

/// IPv6 flow records read so far (kept, so waits in any order find them).
struct Flows6 {
    reader: wiremesh_bpf::FlowReader,
    seen: Vec<wiremesh_bpf::FlowEvent6>,
}

impl Flows6 {
    /// Keeps the IPv6 records the ring holds now (waiting at most 50 ms).
    fn read_now(&mut self) {
        for f in self
            .reader
            .read_any(Duration::from_millis(50))
            .expect("ring")
        {
            if let wiremesh_bpf::Flow::V6(e) = f {
                self.seen.push(e);
            }
        }
    }

    /// Reads until an IPv6 record (read now or earlier) satisfies `pred` or `timeout` passes.
    fn wait(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&wiremesh_bpf::FlowEvent6) -> bool,
    ) -> Option<wiremesh_bpf::FlowEvent6> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.seen.iter().find(|e| pred(e)) {
                return Some(*e);
            }
            if Instant::now() >= deadline {
                eprintln!("IPv6 records seen without a match: {:#?}", self.seen);
                return None;
            }
            self.read_now();
        }
    }
}

#[test]
fn ipv6_policy_conntrack_spoofing_and_strict_mode() {
    use std::net::{Ipv6Addr, SocketAddrV6};
    let v6 = |s: &str, port: u16| SocketAddrV6::new(s.parse().expect("v6"), port, 0, 0);
    let Some(t) = Topo::for_test("ipv6") else {
        return;
    };
    t.add_ipv6();
    let mut loader = load(&t, all_hooks(&t));
    let mut flows = Flows6 {
        reader: loader.take_flow_reader().expect("reader"),
        seen: Vec::new(),
    };
    set_config(&mut loader, Config::new(0, Mode::Permissive, 1, 51820));
    let policy = compile(&load_manifest(&v6_policy()).expect("manifest"));
    assert!(policy.warnings.is_empty(), "{:?}", policy.warnings);
    let local6 = |_: Ipv6Addr, id: Identity| IpcacheValue::new(id.0, 0, Ipv4Addr::UNSPECIFIED, 2);
    let applied = loader
        .maps()
        .apply_policy_dual(&policy.diff(&Compiled::default()), local, local6)
        .expect("policy");
    assert_eq!(applied.skipped_ipv6, 0);
    loader
        .maps()
        .upsert_ipcache6("fd00:201:9::/64".parse().expect("net"), remote_plain())
        .expect("ipcache6");
    assert_eq!(
        loader
            .maps_ref()
            .ipcache6_entries()
            .expect("ipcache6")
            .len(),
        3
    );

    let a = udp_socket(&t.pod_a, v6("fd00:201:1::2", 40600));
    let b = udp_socket(&t.pod_b, v6("fd00:201:2::2", 7777));
    let b8 = udp_socket(&t.pod_b, v6("::", 7778));
    let (to_a, to_b, to_b8) = (
        v6("fd00:201:1::2", 40600),
        v6("fd00:201:2::2", 7777),
        v6("fd00:201:2::2", 7778),
    );
    // Policy with identities (pod rule), conntrack for replies, default deny.
    assert!(
        udp_delivered(&a, to_b, &b, Duration::from_secs(5)),
        "v6 a -> b udp/7777 is allowed"
    );
    assert!(
        udp_delivered(&b, to_a, &a, Duration::from_secs(5)),
        "v6 reply b -> a passes (ct6)"
    );
    assert!(
        !udp_delivered(&a, to_b8, &b8, Duration::from_secs(1)),
        "v6 a -> b udp/7778 is denied"
    );
    let b_new = udp_socket(&t.pod_b, v6("fd00:201:2::2", 7000));
    assert!(
        !udp_delivered(&b_new, to_a, &a, Duration::from_secs(1)),
        "v6 b -> a outside a conversation is denied (b isolated for egress)"
    );
    // ipBlock (cidrs6) on traffic from the remote pod, decided by to_pod.
    let remote = udp_socket(&t.peer, v6("fd00:201:9::5", 40601));
    assert!(
        udp_delivered(&remote, to_b8, &b8, Duration::from_secs(5)),
        "v6 remote -> b udp/7778 is allowed by the ipBlock (IPv6 verdicts {:?}, cidrs {:?})",
        loader.maps_ref().ipv6_verdicts(),
        policy.cidrs
    );
    drain(&[&b]);
    assert!(
        !udp_delivered(&remote, to_b, &b, Duration::from_secs(1)),
        "v6 remote -> b udp/7777 is denied"
    );
    let counts = loader.maps_ref().ipv6_verdicts().expect("stats6");
    assert!(counts[Verdict::DroppedPolicy as usize] >= 3, "{counts:?}");
    assert!(counts[Verdict::ForwardedLocal as usize] >= 2, "{counts:?}");
    let b_id = policy.endpoints[&IpAddr::from(*to_b.ip())].0;
    let e = flows
        .wait(Duration::from_secs(3), |e| {
            e.verdict() == Some(Verdict::ForwardedLocal) && e.dport() == 7777 && e.sport() == 40600
        })
        .expect("v6 forwarded-local record");
    assert_eq!(
        (e.src(), e.dst(), e.dst_identity),
        (*to_a.ip(), *to_b.ip(), b_id)
    );
    assert_eq!((e.hook(), e.protocol), (Some(Hook::FromPod), 17));
    // Accounting through the request-time handle (issue 15): records plus its IPv6 backlog
    // (`wm_flows6`) add up to every packet sent.
    let backlog = loader.flow_backlog_handle().expect("backlog handle");
    let pending = || -> u64 {
        backlog
            .read6()
            .expect("wm_flows6")
            .iter()
            .filter(|(k, _)| {
                (
                    u16::from_be_bytes(k.src_port),
                    u16::from_be_bytes(k.dst_port),
                    k.hook,
                ) == (40600, 7777, Hook::FromPod as u8)
            })
            .map(|(_, s)| s.packets)
            .sum()
    };
    let counted = |flows: &mut Flows6| {
        flows.read_now();
        let reported: u64 = flows
            .seen
            .iter()
            .filter(|e| e.sport() == 40600 && e.dport() == 7777 && e.hook() == Some(Hook::FromPod))
            .map(|e| e.packets)
            .sum();
        reported + pending()
    };
    let before = counted(&mut flows);
    for _ in 0..5 {
        a.send_to(b"count", to_b).expect("send");
    }
    let mut last = before;
    assert!(
        eventually(Duration::from_secs(3), || {
            last = counted(&mut flows);
            last == before + 5
        }),
        "5 IPv6 packets: records + wm_flows6 backlog went from {before} to {last}"
    );
    // At most one record a second per flow: at least 4 of the 5 wait in wm_flows6.
    assert!(pending() >= 4, "wm_flows6 holds {} packets", pending());
    drain(&[&b]);
    flows
        .wait(Duration::from_secs(3), |e| {
            e.verdict() == Some(Verdict::DroppedPolicy) && e.dport() == 7778 && e.sport() == 40600
        })
        .expect("v6 dropped-policy record of a -> b udp/7778");
    let e = flows
        .wait(Duration::from_secs(3), |e| {
            e.verdict() == Some(Verdict::ForwardedPlain) && e.hook() == Some(Hook::ToPod)
        })
        .expect("v6 to_pod record of remote -> b udp/7778");
    assert_eq!((e.dport(), e.peer_node()), (7778, Some(PEER_NODE)));

    // Anti-spoofing of IPv6 sources.
    let ifindex_a = host_a_ifindex(&t);
    let own6: Ipv6Addr = "fd00:201:1::2".parse().expect("v6");
    loader
        .maps()
        .upsert_endpoint(ifindex_a, EndpointValue::new(Some(POD_A), Some(own6)))
        .expect("endpoint");
    run(&[
        "ip",
        "-n",
        &t.pod_a,
        "addr",
        "add",
        "fd00:201:1::99/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    let liar = udp_socket(&t.pod_a, v6("fd00:201:1::99", 40602));
    assert!(
        !udp_delivered(&liar, to_b, &b, Duration::from_secs(1)),
        "v6 spoofed source is dropped"
    );
    assert!(
        udp_delivered(&a, to_b, &b, Duration::from_secs(5)),
        "the pod's own v6 address (and neighbour discovery) still works"
    );
    let counts = loader.maps_ref().ipv6_verdicts().expect("stats6");
    assert!(counts[wiremesh_bpf::STATS6_SPOOFED] >= 1, "{counts:?}");

    // Strict: v6 cross-node plaintext is dropped at from_pod and on the underlay.
    let peer_rx = udp_socket(&t.peer, v6("fd00:201:9::5", 7777));
    let a_rx = udp_socket(&t.pod_a, v6("fd00:201:1::2", 7777));
    let remote_tx = udp_socket(&t.peer, v6("fd00:201:9::5", 40603));
    let to_a7 = v6("fd00:201:1::2", 7777);
    let paths = CrossNode {
        out: (&a, v6("fd00:201:9::5", 7777).into(), &peer_rx),
        back: (&remote_tx, to_a7.into(), &a_rx),
    };
    paths.assert(true, Duration::from_secs(5), "permissive, v6");
    set_config(&mut loader, Config::new(0, Mode::Strict, 1, 51820));
    // Dropped at from_pod and on the underlay.
    paths.assert(false, Duration::from_secs(1), "strict, v6");
    let counts = loader.maps_ref().ipv6_verdicts().expect("stats6");
    assert!(
        counts[Verdict::DroppedPlaintext as usize] >= 2,
        "{counts:?}"
    );
    for hook in [Hook::FromPod, Hook::UnderlayIngress] {
        flows
            .wait(Duration::from_secs(3), |e| {
                e.verdict() == Some(Verdict::DroppedPlaintext) && e.hook() == Some(hook)
            })
            .unwrap_or_else(|| panic!("v6 dropped-plaintext record from {hook:?}"));
    }
    // Finding 5 (docs/threat-model.md): the WireGuard port exempts no pod traffic.
    let remote_wg = udp_socket(&t.peer, v6("fd00:201:9::5", 51820));
    drain(&[&a_rx]);
    assert!(
        !udp_delivered(&remote_wg, to_a7, &a_rx, Duration::from_secs(1)),
        "strict: v6 pod UDP from the WireGuard port is dropped too"
    );
}

#[test]
fn test_run_decides_like_real_traffic() {
    use wiremesh_bpf::frame::{tcp_flags, tcp4};
    let Some(t) = Topo::for_test("test run") else {
        return;
    };
    let mut loader = load(&t, Vec::new());
    let deny = compiled(&deny_b());
    write_config_and_policy(&mut loader, &Config::new(0, Mode::Permissive, 1, 0), &deny);
    let (a, b) = (
        SocketAddrV4::new(POD_A, 40700),
        SocketAddrV4::new(POD_B, 8080),
    );
    let syn = tcp4(a, b, tcp_flags::SYN, 0);
    let host_a = t.host_a.clone();
    let (loader, denied, ifindex_a) = in_ns(&t.node, move || {
        let ifindex_a = ifindex(&host_a);
        let r = loader
            .test_run(Hook::FromPod, &syn, ifindex_a, 10)
            .expect("test run");
        (loader, r, ifindex_a)
    });
    assert_eq!(denied.retval, 2, "TC_ACT_SHOT: b is isolated");
    let mut loader = loader;
    let allow = compiled(&allow_a_to_b_8080());
    loader
        .maps()
        .apply_policy(&allow.diff(&deny), local)
        .expect("allow");
    let syn = tcp4(a, b, tcp_flags::SYN, 0);
    let spoofed = tcp4(
        SocketAddrV4::new(Ipv4Addr::new(10, 201, 1, 99), 40700),
        b,
        tcp_flags::SYN,
        0,
    );
    loader
        .maps()
        .upsert_endpoint(ifindex_a, EndpointValue::new(Some(POD_A), None))
        .expect("endpoint");
    let (loader, allowed, spoof) = in_ns(&t.node, move || {
        let allowed = loader
            .test_run(Hook::FromPod, &syn, ifindex_a, 1000)
            .expect("test run");
        let spoof = loader
            .test_run(Hook::FromPod, &spoofed, ifindex_a, 1)
            .expect("test run");
        (loader, allowed, spoof)
    });
    assert_eq!(allowed.retval, 0, "TC_ACT_OK: a -> b tcp/8080 is allowed");
    assert!(allowed.per_run > Duration::ZERO);
    assert_eq!(spoof.retval, 2, "a spoofed source is dropped");

    // IPv6 link-local sources: fine on the link, spoofing towards anything else.
    let mut loader = loader;
    let own6: std::net::Ipv6Addr = "fd00:201:1::2".parse().expect("v6");
    loader
        .maps()
        .upsert_endpoint(ifindex_a, EndpointValue::new(Some(POD_A), Some(own6)))
        .expect("endpoint");
    let v6 = |s: &str, port| std::net::SocketAddrV6::new(s.parse().expect("v6"), port, 0, 0);
    let on_link = wiremesh_bpf::frame::udp6(v6("fe80::99", 546), v6("ff02::1:2", 547), 0);
    let off_link = wiremesh_bpf::frame::udp6(v6("fe80::99", 4000), v6("fd00:201:2::2", 53), 0);
    let own = wiremesh_bpf::frame::udp6(v6("fd00:201:1::2", 4000), v6("fd00:201:2::2", 53), 0);
    let (loader, r) = in_ns(&t.node, move || {
        let r: Vec<u32> = [on_link, off_link, own]
            .iter()
            .map(|f| {
                loader
                    .test_run(Hook::FromPod, f, ifindex_a, 1)
                    .expect("test run")
                    .retval
            })
            .collect();
        (loader, r)
    });
    assert_eq!(
        r,
        vec![0, 2, 0],
        "link-local source: on-link passes, off-link is spoofing; the pod's address passes"
    );
    let entry = ct_entry(&loader, POD_A, 40700, POD_B, 8080).expect("conntrack entry");
    assert_eq!(
        entry.epoch,
        loader.maps_ref().policy_epoch().expect("epoch")
    );
}

/// Sends `len` bytes from pod `from` to `to` over TCP and returns what the receiver counted
/// when the sender finished or `timeout` passed.
fn bulk_tcp(t: &Topo, from: &str, to: SocketAddr, len: usize, timeout: Duration) -> usize {
    use std::io::{Read, Write};
    let listener = in_ns(&t.peer, move || TcpListener::bind(to).expect("bind"));
    let receiver = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(timeout)).expect("timeout");
        let mut buf = vec![0u8; 65536];
        let mut got = 0;
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 {
                break;
            }
            got += n;
        }
        got
    });
    let sent = in_ns(from, move || -> Result<(), String> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .map_err(|e| format!("connect {to}: {e}"))?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.write_all(&vec![0x5a; len])
            .map_err(|e| format!("send: {e}"))?;
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())
    });
    let got = receiver.join().expect("receiver");
    if let Err(e) = sent {
        eprintln!("bulk sender: {e}");
    }
    got
}

#[test]
fn packets_above_the_tunnel_mtu_get_pmtu_errors_instead_of_a_redirect() {
    let Some(t) = Topo::for_test("mtu") else {
        return;
    };
    // Pod veths keep MTU 1500 (checked), the tunnel has 1420 and its "underlay" (a pipe into
    // a TUN in the peer) carries nothing larger, like a real WireGuard tunnel.
    let link = std::process::Command::new("ip")
        .args(["-n", &t.pod_a, "-o", "link", "show", "eth0"])
        .output()
        .expect("ip link");
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains(" mtu 1500 "), "pod a's eth0: {link}");
    let peer_tun = format!("wr{}", &t.host_a[2..]);
    let (tun_name, tun, tun_index) = node_tun(&t);
    for k in [
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ] {
        run(&["ip", "netns", "exec", &t.peer, "sysctl", "-qw", k]);
    }
    let pt = peer_tun.clone();
    let rx_tun = in_ns(&t.peer, move || Tun::create(&pt));
    run(&[
        "ip", "-n", &t.node, "link", "set", &tun_name, "mtu", "1420", "up",
    ]);
    run(&["ip", "-n", &t.peer, "link", "set", &peer_tun, "up"]);
    // The agent's route: remote pods into the tunnel.
    run(&[
        "ip",
        "-n",
        &t.node,
        "route",
        "replace",
        "10.201.9.0/24",
        "dev",
        &tun_name,
    ]);
    let pipe = TunPipe::start(tun, rx_tun, 1420);

    let cfg = Config::new(tun_index, Mode::Permissive, 1, 0);
    let (mut loader, mut flows, none) = loaded_with(&t, cfg, "");
    loader
        .maps()
        .upsert_ipcache("10.201.9.0/24".parse().expect("net"), remote_encrypted())
        .expect("ipcache");

    const LEN: usize = 4 << 20;
    let started = Instant::now();
    let got = bulk_tcp(
        &t,
        &t.pod_a,
        SocketAddr::from((REMOTE_POD, 7001)),
        LEN,
        Duration::from_secs(20),
    );
    eprintln!(
        "4 MiB from a 1500-MTU pod through a 1420 tunnel in {:?} ({} oversized packets reached \
         the pipe)",
        started.elapsed(),
        pipe.dropped()
    );
    assert_eq!(
        got, LEN,
        "the bulk transfer through the redirect must complete"
    );
    assert_eq!(
        pipe.dropped(),
        0,
        "no packet above the tunnel MTU is redirected into the tunnel"
    );
    // Both records of the flow: its first packets above the tunnel MTU were handed to the
    // stack (too-big, not claimed as encrypted), the rest was redirected (forwarded-encrypted).
    let (mut too_big, mut encrypted) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !(too_big && encrypted) && Instant::now() < deadline {
        for e in flows.read(Duration::from_millis(200)).expect("ring read") {
            if e.dst() == REMOTE_POD {
                too_big |= e.verdict() == Some(Verdict::TooBig);
                encrypted |= e.verdict() == Some(Verdict::ForwardedEncrypted);
            }
        }
    }
    assert!(
        too_big,
        "the packets above the tunnel MTU were recorded as too-big"
    );
    assert!(
        encrypted,
        "the transfer was redirected (forwarded-encrypted)"
    );

    // The PMTU error also reaches a pod isolated for ingress (it is no reply of the flow's
    // tuple): forget the learned PMTU and send again.
    let deny = compiled(&deny_a());
    loader
        .maps()
        .apply_policy(&deny.diff(&none), local)
        .expect("deny a");
    run(&["ip", "-n", &t.pod_a, "route", "flush", "cache"]);
    let got = bulk_tcp(
        &t,
        &t.pod_a,
        SocketAddr::from((REMOTE_POD, 7002)),
        LEN,
        Duration::from_secs(20),
    );
    assert_eq!(
        got, LEN,
        "isolated pod: the bulk transfer must complete too"
    );
    assert_eq!(pipe.dropped(), 0);
}

#[test]
fn maps_of_another_shape_are_upgraded_without_an_enforcement_gap() {
    let Some(t) = Topo::for_test("upgrade") else {
        return;
    };
    let _l = listen(&t.pod_b, 8080);
    let deny = compiled(&deny_b());
    {
        let mut old = load(&t, pod_hooks(&t));
        write_config_and_policy(&mut old, &Config::new(0, Mode::Permissive, 1, 0), &deny);
        assert!(!connect(&t.pod_a, POD_B, 8080), "deny with the old build");
    }
    // "An older build": its wm_config pin has another value size.
    pin_map_of_another_shape(&t.pin_dir().join("wm_config"), 8)
        .expect("pin a map of another shape");
    assert!(
        !connect(&t.pod_a, POD_B, 8080),
        "old programs still enforce"
    );

    let pin = t.pin_dir();
    let mut new = in_ns(&t.node, move || {
        Loader::load(&pin).expect("load a new generation")
    });
    assert_eq!(new.map_dir(), t.pin_dir().join("gen-1"));
    assert_eq!(new.previous_generations(), [t.pin_dir()]);
    assert!(t.pin_dir().join("gen-1/wm_ipcache4").exists());
    assert_eq!(
        new.maps_ref().policy_counts(),
        (0, 0),
        "new maps start empty"
    );
    // Loaded, not attached: the old programs and maps still decide.
    assert!(
        !connect(&t.pod_a, POD_B, 8080),
        "deny while the new maps are empty"
    );
    write_config_and_policy(&mut new, &Config::new(0, Mode::Permissive, 1, 0), &deny);
    let hooks = pod_hooks(&t);
    let mut new = in_ns(&t.node, move || {
        for (iface, hook) in hooks {
            let how = new.attach(&iface, hook).expect("attach");
            assert_eq!(
                how,
                Attached::replaced(),
                "{iface} {hook:?}: swapped in place"
            );
        }
        new
    });
    assert!(!connect(&t.pod_a, POD_B, 8080), "deny after the swap");
    // The new maps drive the attached programs now.
    let allow = compiled(&allow_a_to_b_8080());
    new.maps()
        .apply_policy(&allow.diff(&deny), local)
        .expect("allow in the new maps");
    assert!(
        eventually(Duration::from_secs(5), || connect(&t.pod_a, POD_B, 8080)),
        "the new generation's maps decide after the swap"
    );
    let removed = new.remove_previous_generations().expect("remove old pins");
    assert!(removed >= 10, "old map pins removed: {removed}");
    assert!(!t.pin_dir().join("wm_ipcache4").exists());
    assert!(!t.pin_dir().join("wm_config").exists());
    assert!(t.pin_dir().join("links").exists(), "links stay");
    assert!(new.previous_generations().is_empty());
    drop(new);

    // The next start reuses generation 1 with its entries.
    let pin = t.pin_dir();
    let again = in_ns(&t.node, move || Loader::load(&pin).expect("reload"));
    assert_eq!(again.map_dir(), t.pin_dir().join("gen-1"));
    assert!(again.previous_generations().is_empty());
    assert_eq!(
        again.maps_ref().policy_counts(),
        (allow.isolated.len(), allow.rules.len())
    );
}
