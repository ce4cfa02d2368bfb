//! Interoperability with wireguard-go (Debian), both configured with wg(8): ping and TCP both
//! ways with us as initiator and as responder, a preshared key, roaming, rekey, and `wg show`
//! against our socket. Privileged: creates (and removes) its own namespaces.

#[path = "device_support/netns.rs"]
mod netns;

use std::time::Duration;

use netns::*;

const T_A: &str = "10.77.0.1";
const T_B: &str = "10.77.0.2";

/// Our device in `a` (port 51001), wireguard-go in `b` (port 51002). `endpoints` says which
/// side knows the other's endpoint.
/// Field order is drop order: processes first, then namespaces, then the log directory.
struct Setup {
    ours: Proc,
    theirs: Proc,
    pair: Pair,
    dir: tempfile::TempDir,
    our_if: String,
    their_if: String,
    our_keys: Keys,
    their_keys: Keys,
}

fn setup(
    we_know_endpoint: bool,
    they_know_endpoint: bool,
    psk: bool,
    env: &[(&str, &str)],
) -> Setup {
    let pair = Pair::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let our_if = unique("wo");
    let their_if = unique("wg");
    let ours = start_ours(&pair.a, dir.path(), &our_if, env);
    let theirs = start_wireguard_go(&pair.b, dir.path(), &their_if);
    let our_keys = keys(dir.path(), "ours");
    let their_keys = keys(dir.path(), "theirs");
    let psk_file = dir.path().join("psk");
    std::fs::write(&psk_file, sh(&["wg", "genpsk"]).trim()).expect("psk");
    let psk = psk.then_some(psk_file.as_path());
    let ep_b = format!("{UNDER_B}:51002");
    let ep_a = format!("{UNDER_A}:51001");
    configure(
        &pair.a,
        &our_if,
        &our_keys,
        51001,
        &their_keys,
        we_know_endpoint.then_some(ep_b.as_str()),
        T_B,
        T_A,
        psk,
    );
    configure(
        &pair.b,
        &their_if,
        &their_keys,
        51002,
        &our_keys,
        they_know_endpoint.then_some(ep_a.as_str()),
        T_A,
        T_B,
        psk,
    );
    Setup {
        ours,
        theirs,
        pair,
        dir,
        our_if,
        their_if,
        our_keys,
        their_keys,
    }
}

fn wait_ping(from: &Netns, to: &str) {
    wait_for(
        &format!("ping {to} from {}", from.name),
        Duration::from_secs(20),
        || from.ping(to).then_some(()),
    );
}

#[test]
fn we_initiate_with_psk_ping_tcp_and_wg_show() {
    require_root!();
    let s = setup(true, false, true, &[]);
    // We initiate: wireguard-go does not know our endpoint until our handshake arrives.
    wait_ping(&s.pair.a, T_B);
    wait_ping(&s.pair.b, T_A);
    tcp_roundtrip(&s.pair.b, &s.pair.a, T_B, 4 << 20);
    tcp_roundtrip(&s.pair.a, &s.pair.b, T_A, 4 << 20);

    let peers = dump_peers(&s.pair.a, &s.our_if);
    assert_eq!(peers.len(), 1, "{peers:?}");
    let p = &peers[0];
    assert_eq!(p.public_key, s.their_keys.public);
    assert_eq!(p.endpoint, format!("{UNDER_B}:51002"));
    assert!(unix_now().abs_diff(p.latest_handshake) < 60, "{p:?}");
    assert!(p.rx > 8 << 20 && p.tx > 8 << 20, "transfer counters {p:?}");
    // The human-readable form too.
    let show = s.pair.a.exec_ok(&["wg", "show", &s.our_if]);
    assert!(show.contains("latest handshake:"), "{show}");
    assert!(show.contains("preshared key: (hidden)"), "{show}");
    // wireguard-go agrees on the other side.
    let theirs = dump_peers(&s.pair.b, &s.their_if);
    assert_eq!(theirs[0].public_key, s.our_keys.public);
    assert!(theirs[0].rx > 8 << 20, "{theirs:?}");
    let _ = (&s.ours, &s.theirs, &s.dir);
}

#[test]
fn we_respond_ping_and_tcp() {
    require_root!();
    // Only wireguard-go knows where we are: it must initiate, we answer.
    let s = setup(false, true, false, &[]);
    wait_ping(&s.pair.b, T_A);
    wait_ping(&s.pair.a, T_B);
    tcp_roundtrip(&s.pair.a, &s.pair.b, T_A, 4 << 20);
    tcp_roundtrip(&s.pair.b, &s.pair.a, T_B, 4 << 20);
    // We learned wireguard-go's endpoint from its authenticated handshake.
    let peers = dump_peers(&s.pair.a, &s.our_if);
    assert_eq!(peers[0].endpoint, format!("{UNDER_B}:51002"));
}

#[test]
fn roaming_peer_changes_address_and_port() {
    require_root!();
    let s = setup(true, true, false, &[]);
    wait_ping(&s.pair.a, T_B);
    // wireguard-go moves to a new underlay address and port, then talks first.
    let new_ip = "192.168.77.3";
    // (Delete first: deleting a primary address also deletes the secondaries of its subnet.)
    s.pair.b.ip(&[
        "addr",
        "del",
        &format!("{UNDER_B}/24"),
        "dev",
        &s.pair.veth_b,
    ]);
    s.pair.b.ip(&[
        "addr",
        "add",
        &format!("{new_ip}/24"),
        "dev",
        &s.pair.veth_b,
    ]);
    s.pair
        .b
        .exec_ok(&["wg", "set", &s.their_if, "listen-port", "51003"]);
    wait_ping(&s.pair.b, T_A);
    let want = format!("{new_ip}:51003");
    wait_for(
        "our device to learn the new endpoint",
        Duration::from_secs(10),
        || (dump_peers(&s.pair.a, &s.our_if)[0].endpoint == want).then_some(()),
    );
    // And traffic we originate now goes to the new place.
    wait_ping(&s.pair.a, T_B);
    tcp_roundtrip(&s.pair.b, &s.pair.a, T_B, 1 << 20);
}

#[test]
fn rekey_as_initiator_and_as_responder() {
    require_root!();
    // Test hook: our device starts a new handshake once the session is 2 s old.
    let s = setup(
        true,
        true,
        true,
        &[("MESH_AGENT_TEST_REKEY_AFTER_SECS", "2")],
    );
    wait_ping(&s.pair.a, T_B);
    let first = dump_peers(&s.pair.a, &s.our_if)[0].latest_handshake;
    // Handshake times have 1 s resolution: wait for a strictly newer one while traffic flows.
    wait_for("a rekey initiated by us", Duration::from_secs(20), || {
        s.pair.a.ping(T_B);
        (dump_peers(&s.pair.a, &s.our_if)[0].latest_handshake > first).then_some(())
    });
    tcp_roundtrip(&s.pair.b, &s.pair.a, T_B, 1 << 20);
    let go_log = s.theirs.log_text();
    assert!(
        go_log.matches("Received handshake initiation").count() >= 2,
        "wireguard-go saw fewer than two initiations:\n{go_log}"
    );

    // Responder side: wireguard-go forgets its sessions (peer removed and re-added), so it
    // must initiate again and we answer with a new session.
    let before = dump_peers(&s.pair.a, &s.our_if)[0].latest_handshake;
    let psk = s.dir.path().join("psk");
    s.pair.b.exec_ok(&[
        "wg",
        "set",
        &s.their_if,
        "peer",
        &s.our_keys.public,
        "remove",
    ]);
    s.pair.b.exec_ok(&[
        "wg",
        "set",
        &s.their_if,
        "peer",
        &s.our_keys.public,
        "allowed-ips",
        &format!("{T_A}/32"),
        "endpoint",
        &format!("{UNDER_A}:51001"),
        "preshared-key",
        psk.to_str().expect("utf8"),
    ]);
    wait_for(
        "a handshake initiated by wireguard-go",
        Duration::from_secs(20),
        || {
            s.pair.b.ping(T_A);
            (dump_peers(&s.pair.a, &s.our_if)[0].latest_handshake > before).then_some(())
        },
    );
    tcp_roundtrip(&s.pair.a, &s.pair.b, T_A, 1 << 20);
}

#[test]
fn persistent_keepalive_reaches_wireguard_go() {
    require_root!();
    let s = setup(true, true, false, &[]);
    wait_ping(&s.pair.a, T_B);
    s.pair.a.exec_ok(&[
        "wg",
        "set",
        &s.our_if,
        "peer",
        &s.their_keys.public,
        "persistent-keepalive",
        "1",
    ]);
    let show = s.pair.a.exec_ok(&["wg", "show", &s.our_if]);
    assert!(
        show.contains("persistent keepalive: every 1 second"),
        "{show}"
    );
    // With no traffic at all, wireguard-go keeps receiving 32-byte keepalives from us.
    let start = dump_peers(&s.pair.b, &s.their_if)[0].rx;
    wait_for(
        "three keepalives at wireguard-go",
        Duration::from_secs(10),
        || (dump_peers(&s.pair.b, &s.their_if)[0].rx >= start + 3 * 32).then_some(()),
    );
}
