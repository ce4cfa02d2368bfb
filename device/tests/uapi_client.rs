//! `wiremesh_wgctrl::UapiDevice` (the agent's client of the wg(8) UAPI) against real device
//! processes: our device (`wiremesh-device`, the command behind `mesh-agent device`) and Debian's
//! wireguard-go, each in its own network namespace. Every field the `Datapath` trait sets is read
//! back, the two devices handshake with each other through the configuration the client wrote,
//! and handshake times and counters come back after traffic. Privileged: creates (and removes)
//! its own namespaces.

#[path = "device_support/netns.rs"]
mod netns;

use std::{net::UdpSocket, time::Duration};

use ipnet::IpNet;
use netns::*;
use wiremesh_keyexchange::PrivateKey;
use wiremesh_wgctrl::{
    Datapath, DatapathError, DeviceSettings, DeviceStatus, PeerConfig,
    uapi::{UapiClientError, UapiDevice},
};

const T_A: &str = "10.76.0.1";
const T_B: &str = "10.76.0.2";
const PORT_A: u16 = 50101;
const PORT_B: u16 = 50102;

fn net(s: &str) -> IpNet {
    s.parse().expect("prefix")
}

/// `status()` must run where the interface is (it looks up index and MTU there).
fn status_in(ns: &Netns, dev: &UapiDevice) -> DeviceStatus {
    let dev = dev.clone();
    ns.run(move || dev.status()).expect("status")
}

/// Configures `dev` through the `Datapath` trait and checks every field read back.
fn configure_and_read_back(
    ns: &Netns,
    dev: &UapiDevice,
    key: &PrivateKey,
    port: u16,
    peer_key: &PrivateKey,
    peer_endpoint: &str,
    peer_tunnel_ip: &str,
) {
    dev.configure(&DeviceSettings {
        private_key: Some(key.clone()),
        listen_port: Some(port),
        fwmark: Some(0x2a),
    })
    .expect("configure");
    let mut peer = PeerConfig::new(peer_key.public_key());
    peer.endpoint = Some(peer_endpoint.parse().expect("endpoint"));
    peer.allowed_ips = vec![
        net(&format!("{peer_tunnel_ip}/32")),
        net("10.99.0.0/16"),
        net("fd00:99::/64"),
    ];
    peer.persistent_keepalive = Some(7);
    peer.preshared_key = Some([0x42; 32]);
    dev.set_peer(&peer).expect("set_peer");

    let status = status_in(ns, dev);
    let link = ns.ip(&["-o", "link", "show", dev.ifname()]);
    assert!(
        link.starts_with(&format!("{}: {}:", status.ifindex, dev.ifname())),
        "ifindex {} vs {link}",
        status.ifindex
    );
    assert!(link.contains(&format!("mtu {}", status.mtu)), "{link}");
    // The liveness probe (connect, close without a request, the link's index) agrees, and
    // the device takes the empty connection as a client that is done: it answers on after it.
    let probed = {
        let dev = dev.clone();
        ns.run(move || dev.probe())
    };
    assert_eq!(probed.expect("probe"), status.ifindex);
    assert_eq!(status.public_key, Some(key.public_key()));
    assert_eq!(status.listen_port, port);
    assert_eq!(status.fwmark, 0x2a);
    assert_eq!(status.peers.len(), 1);
    let got = &status.peers[0];
    assert_eq!(got.public_key, peer.public_key);
    assert_eq!(got.endpoint, peer.endpoint);
    let mut allowed = got.allowed_ips.clone();
    allowed.sort();
    let mut want = peer.allowed_ips.clone();
    want.sort();
    assert_eq!(allowed, want);
    assert_eq!(got.persistent_keepalive, Some(7));
    assert!(got.has_preshared_key);
}

fn run_against(their_kind: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pair = Pair::new();
    let if_a = unique("ua");
    let if_b = unique("ub");
    let _ours = start_ours(&pair.a, dir.path(), &if_a, &[]);
    let _theirs = match their_kind {
        "ours" => start_ours(&pair.b, dir.path(), &if_b, &[]),
        _ => start_wireguard_go(&pair.b, dir.path(), &if_b),
    };
    let a = UapiDevice::new(&if_a);
    let b = UapiDevice::new(&if_b);
    let key_a = PrivateKey::generate().expect("key");
    let key_b = PrivateKey::generate().expect("key");
    let ep_a = format!("{UNDER_A}:{PORT_A}");
    let ep_b = format!("{UNDER_B}:{PORT_B}");
    configure_and_read_back(&pair.a, &a, &key_a, PORT_A, &key_b, &ep_b, T_B);
    configure_and_read_back(&pair.b, &b, &key_b, PORT_B, &key_a, &ep_a, T_A);

    // Traffic through the configuration the client wrote (same PSK on both ends).
    for (ns, ifname, ip) in [(&pair.a, &if_a, T_A), (&pair.b, &if_b, T_B)] {
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", ifname]);
        ns.ip(&["link", "set", ifname, "up"]);
    }
    wait_for("ping a -> b", Duration::from_secs(20), || {
        pair.a.ping(T_B).then_some(())
    });
    assert!(pair.b.ping(T_A), "ping b -> a");
    tcp_roundtrip(&pair.b, &pair.a, T_B, 1 << 20);
    for (ns, dev) in [(&pair.a, &a), (&pair.b, &b)] {
        let status = status_in(ns, dev);
        let peer = &status.peers[0];
        let handshake = peer.last_handshake.expect("a handshake after traffic");
        let age = handshake.elapsed().unwrap_or_default();
        assert!(age < Duration::from_secs(60), "handshake {age:?} ago");
        assert!(peer.rx_bytes > 1 << 20, "rx {}", peer.rx_bytes);
        assert!(peer.tx_bytes > 1 << 20, "tx {}", peer.tx_bytes);
    }

    // set_peer replaces: fewer allowed IPs, no PSK, no keepalive, same endpoint.
    let mut smaller = PeerConfig::new(key_b.public_key());
    smaller.endpoint = Some(ep_b.parse().expect("endpoint"));
    smaller.allowed_ips = vec![net(&format!("{T_B}/32"))];
    a.set_peer(&smaller).expect("set_peer again");
    let peer = status_in(&pair.a, &a).peers.remove(0);
    assert_eq!(peer.allowed_ips, smaller.allowed_ips);
    assert!(!peer.has_preshared_key);
    assert_eq!(peer.persistent_keepalive, None);

    // A listen port that is taken: the device's errno comes back, naming the socket.
    let blocker = pair.a.run(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
    let taken = blocker.local_addr().expect("addr").port();
    let err = a
        .configure(&DeviceSettings {
            listen_port: Some(taken),
            ..DeviceSettings::default()
        })
        .unwrap_err();
    assert!(
        matches!(
            &err,
            DatapathError::Uapi {
                source: UapiClientError::Errno { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains(&format!("{if_a}.sock")), "{err}");
    assert_eq!(
        status_in(&pair.a, &a).listen_port,
        PORT_A,
        "nothing changed"
    );
    drop(blocker);

    // remove_peer, twice (the second is a no-op, not an error).
    b.remove_peer(&key_a.public_key()).expect("remove");
    b.remove_peer(&key_a.public_key()).expect("remove again");
    assert!(status_in(&pair.b, &b).peers.is_empty());
}

#[test]
fn uapi_client_against_our_device() {
    require_root!();
    run_against("ours");
}

#[test]
fn uapi_client_against_wireguard_go() {
    require_root!();
    run_against("wireguard-go");
}

#[test]
fn a_stopped_device_is_reported_as_not_serving() {
    require_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    let ns = Netns::new("wmu");
    let ifname = unique("us");
    let mut device = start_ours(&ns, dir.path(), &ifname, &[]);
    let dev = UapiDevice::new(&ifname);
    assert!(dev.get().is_ok());
    assert!(device.terminate(Duration::from_secs(10)).success());
    let probed = {
        let dev = dev.clone();
        ns.run(move || dev.probe())
    };
    assert!(
        matches!(
            &probed,
            Err(DatapathError::Uapi {
                source: UapiClientError::NotServing { .. },
                ..
            })
        ),
        "a dead device fails the liveness probe: {probed:?}"
    );
    let err = dev.get().unwrap_err();
    assert!(
        matches!(
            &err,
            DatapathError::Uapi {
                source: UapiClientError::NotServing { .. },
                ..
            }
        ),
        "{err:?}"
    );
}
