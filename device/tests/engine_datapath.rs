//! The engine in-process through the agent's `Datapath` API, in namespaces: two engines
//! configured without wg(8), ping between them, status/counters, cryptokey routing, and the
//! hostile-input paths (malformed datagrams, unknown peers, bad MACs, a handshake flood that
//! must trigger cookie replies) — all dropped with counters, the tunnel still working after.
//! Privileged: creates (and removes) its own namespaces.

#[path = "device_support/engines.rs"]
mod engines;
#[path = "device_support/netns.rs"]
mod netns;

use std::{net::UdpSocket, sync::Arc, time::Duration};

use boringtun::{
    noise::{Tunn, TunnResult},
    x25519::{PublicKey as XPublic, StaticSecret},
};
use engines::*;
use netns::*;
use wiremesh_device::engine::EngineConfig;
use wiremesh_wgctrl::datapath::{Datapath, DatapathKind};

#[test]
fn datapath_api_status_and_cryptokey_routing() {
    require_root!();
    let t = two(|ifname| EngineConfig::new(ifname));
    // The agent holds the engine as a trait object.
    let datapath: Arc<dyn Datapath> = t.a.clone();
    assert_eq!(datapath.kind(), DatapathKind::Userspace);
    let links = t.pair.a.ip(&["-o", "link", "show", t.a.ifname()]);
    assert!(
        links.contains(&format!("{}:", t.a.ifindex())),
        "ifindex {} not in {links}",
        t.a.ifindex()
    );
    assert!(links.contains("mtu 1420"), "{links}");

    wait_for("ping a -> b", Duration::from_secs(20), || {
        t.pair.a.ping(T_B).then_some(())
    });
    tcp_roundtrip(&t.pair.b, &t.pair.a, T_B, 2 << 20);

    // A full-MTU packet with DF set crosses the tunnel: 1420 inner + WireGuard overhead fits
    // the 1500-byte underlay (the engine's UDP socket also sets DF, so an oversized outer
    // packet would be dropped, not fragmented).
    let full = t.pair.a.exec(&[
        "ping", "-c", "2", "-i", "0.2", "-W", "2", "-M", "do", "-s", "1392", T_B,
    ]);
    assert!(
        full.status.success(),
        "full-MTU ping failed: {}",
        String::from_utf8_lossy(&full.stdout)
    );
    let over = t
        .pair
        .a
        .exec(&["ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1393", T_B]);
    assert!(
        !over.status.success(),
        "a packet above the tunnel MTU went through"
    );

    let status = t.a.status().expect("status");
    assert_eq!(status.public_key, Some(t.key_a.public_key()));
    assert_eq!(status.listen_port, 53001);
    assert_eq!(status.ifindex, t.a.ifindex());
    let peer = &status.peers[0];
    assert_eq!(peer.public_key, t.key_b.public_key());
    assert!(peer.last_handshake.is_some());
    assert!(
        peer.rx_bytes > 2 << 20 && peer.tx_bytes > 2 << 20,
        "{peer:?}"
    );
    // b learned a's endpoint by roaming.
    let b_status = t.b.status().expect("status");
    assert_eq!(
        b_status.peers[0].endpoint,
        Some(format!("{UNDER_A}:53001").parse().expect("ep"))
    );

    // An inner source address b does not own (not in a's allowed IPs for b) is dropped.
    t.pair
        .b
        .ip(&["addr", "add", "10.79.0.99/24", "dev", t.b.ifname()]);
    let before = t.a.counters().rx_src_not_allowed;
    let _ = t.pair.b.exec(&[
        "ping",
        "-c",
        "2",
        "-i",
        "0.2",
        "-W",
        "1",
        "-I",
        "10.79.0.99",
        T_A,
    ]);
    assert!(
        t.a.counters().rx_src_not_allowed >= before + 2,
        "{:?}",
        t.a.counters()
    );

    // No route for a destination without a peer.
    let before = t.a.counters().tx_no_route;
    let _ = t.pair.a.exec(&["ping", "-c", "1", "-W", "1", "10.79.0.50"]);
    assert!(t.a.counters().tx_no_route > before);

    // Removing the peer stops traffic; re-adding restores it.
    t.a.remove_peer(&t.key_b.public_key()).expect("remove");
    assert!(t.a.status().expect("status").peers.is_empty());
    assert!(!t.pair.a.ping(T_B));
    t.a.remove_peer(&t.key_b.public_key())
        .expect("removing twice is fine");
}

#[test]
fn hostile_datagrams_are_counted_and_dropped() {
    require_root!();
    let t = two(|ifname| EngineConfig::new(ifname));
    wait_for("ping a -> b", Duration::from_secs(20), || {
        t.pair.a.ping(T_B).then_some(())
    });
    let target: std::net::SocketAddr = format!("{UNDER_A}:53001").parse().expect("addr");
    let sock = t.pair.b.run(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
    sock.set_read_timeout(Some(Duration::from_millis(200))).ok();
    let c0 = t.a.counters();

    // Malformed: too short, unknown type, non-zero reserved bytes, wrong handshake size.
    for d in [
        &[1u8][..],
        &[9, 0, 0, 0, 1, 2, 3, 4][..],
        &[
            4, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0,
        ][..],
        &[1, 0, 0, 0, 5, 5, 5][..],
    ] {
        sock.send_to(d, target).expect("send");
    }
    // Data for a receiver index nobody has.
    let mut data = vec![0u8; 96];
    data[0] = 4;
    data[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    for _ in 0..5 {
        sock.send_to(&data, target).expect("send");
    }
    // A handshake initiation with a garbage mac1.
    let mut init = vec![7u8; 148];
    init[..4].copy_from_slice(&[1, 0, 0, 0]);
    sock.send_to(&init, target).expect("send");
    wait_for("drop counters", Duration::from_secs(5), || {
        let c = t.a.counters();
        (c.rx_malformed >= c0.rx_malformed + 4
            && c.rx_unknown_peer >= c0.rx_unknown_peer + 5
            && c.rx_invalid_mac > c0.rx_invalid_mac)
            .then_some(())
    });

    // A flood of valid-looking initiations from a key a does not know: the first ones are
    // dropped as unknown peers, then a goes under load and answers with cookie replies.
    let stranger = StaticSecret::from([0x42; 32]);
    let a_public = XPublic::from(*t.key_a.public_key().as_bytes());
    let mut tunn = Tunn::new(stranger, a_public, None, None, 1, None);
    let mut buf = [0u8; 256];
    for _ in 0..600 {
        if let TunnResult::WriteToNetwork(p) = tunn.format_handshake_initiation(&mut buf, true) {
            sock.send_to(p, target).expect("send");
        }
    }
    let c = wait_for("cookie replies", Duration::from_secs(10), || {
        let c = t.a.counters();
        (c.rx_cookie_replies > 0 && c.rx_unknown_peer > c0.rx_unknown_peer + 5).then_some(c)
    });
    // The cookie replies reach the sender.
    let mut got = [0u8; 256];
    let (n, _) = sock.recv_from(&mut got).expect("a cookie reply");
    assert_eq!((n, got[0]), (64, 3), "expected a cookie reply message");
    eprintln!("counters after the flood: {c:?}");

    // The tunnel still works once the flood stops (the limiter resets every second).
    wait_for("ping after flood", Duration::from_secs(20), || {
        t.pair.a.ping(T_B).then_some(())
    });
    let _ = &t.b;
}
