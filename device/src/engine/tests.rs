//! Engine state and receive/timer paths without a TUN device (unprivileged): a [`Shared`] on a
//! loopback UDP endpoint, with the test playing the remote peer through boringtun. Covers the
//! endpoint rule (only authenticated packets move an endpoint; threat-model finding 7) and the
//! lock rule (no lock held across a blocking send; finding 9).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    sync::{Arc, mpsc},
    time::Duration,
};

use boringtun::{
    noise::{Tunn, TunnResult, rate_limiter::RateLimiter},
    x25519::{PublicKey as XPublic, StaticSecret},
};
use wiremesh_keyexchange::{PrivateKey, PublicKey};
use wiremesh_wgctrl::{
    convert,
    datapath::{DeviceSettings, PeerConfig},
    uapi::parse::GetPeer,
};

use super::{
    Shared, UapiHandler,
    io::{SendGate, UdpEndpoint},
    outbox::Outbox,
    timers::Timers,
    worker::{self, RxCache},
};

/// Long enough for any step on a loaded 2-core machine; only ever a deadline for a failure.
const DEADLINE: Duration = Duration::from_secs(10);
const B_TUNNEL: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 2);

/// A device with key `key` on a loopback endpoint (`gate` installed on its sends), no TUN.
fn device(key: &PrivateKey, gate: Option<Arc<SendGate>>) -> Arc<Shared> {
    let mut udp = UdpEndpoint::bind(0, 0, 1).expect("bind UDP");
    udp.gate = gate;
    let shared = Arc::new(Shared::detached("wmtest", udp));
    shared
        .apply(&convert::configure_request(&DeviceSettings {
            private_key: Some(key.clone()),
            listen_port: None,
            fwmark: None,
        }))
        .expect("configure");
    shared
}

fn set_peer(shared: &Shared, key: PublicKey, endpoint: SocketAddr, keepalive: Option<u16>) {
    let mut peer = PeerConfig::new(key);
    peer.endpoint = Some(endpoint);
    // B's tunnel address and the destination of gso::tests::tso_frame.
    peer.allowed_ips = vec![
        format!("{B_TUNNEL}/32").parse().expect("net"),
        "10.0.0.2/32".parse().expect("net"),
    ];
    peer.persistent_keepalive = keepalive;
    shared
        .uapi_set(&convert::set_peer_request(&peer).expect("request"))
        .expect("set peer");
}

/// The peer as UAPI `get` reports it.
fn uapi_peer(shared: &Shared, key: &PublicKey) -> GetPeer {
    shared
        .uapi_get()
        .peers
        .into_iter()
        .find(|p| p.public_key == *key.as_bytes())
        .expect("peer in UAPI get")
}

/// Runs `datagram` from `src` through the receive path as a worker does (state read lock for
/// the batch, replies sent after it is released); the decrypted packet, if any.
fn receive(shared: &Shared, src: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
    let mut out = Outbox::with_capacity(1024);
    let (mut dst, mut scratch) = (vec![0u8; 65536], vec![0u8; 2048]);
    let (packet, udp) = {
        let state = shared.read_state();
        let mut cache = RxCache::default();
        let packet = worker::handle_datagram(
            shared,
            &state,
            &mut out,
            src,
            datagram,
            &mut dst,
            &mut scratch,
            &mut cache,
        )
        .map(|len| dst[..len].to_vec());
        (packet, state.udp.clone())
    };
    out.send(&udp, 0, shared);
    packet
}

fn recv(sock: &UdpSocket) -> Vec<u8> {
    sock.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut buf = vec![0u8; 2048];
    let (n, _) = sock
        .recv_from(&mut buf)
        .expect("a datagram from the device");
    buf.truncate(n);
    buf
}

fn loopback(ip: [u8; 4]) -> (UdpSocket, SocketAddr) {
    let sock = UdpSocket::bind(SocketAddr::from((ip, 0))).expect("bind");
    let addr = sock.local_addr().expect("addr");
    (sock, addr)
}

/// Completes a handshake that `a` initiates towards b (at `b_sock`); b's side of the session.
fn handshake(a: &Shared, key_a: &PrivateKey, key_b: &PrivateKey, b_sock: &UdpSocket) -> Tunn {
    let b_addr = b_sock.local_addr().expect("addr");
    a.force_handshake(&key_b.public_key()).expect("handshake");
    let init = recv(b_sock);
    let mut b = Tunn::new(
        StaticSecret::from(*key_b.to_bytes()),
        XPublic::from(*key_a.public_key().as_bytes()),
        None,
        None,
        7,
        None,
    );
    let mut out = vec![0u8; 2048];
    let response = match b.decapsulate(Some(b_addr.ip()), &init, &mut out) {
        TunnResult::WriteToNetwork(r) => r.to_vec(),
        _ => panic!("b answers a's initiation"),
    };
    assert_eq!(receive(a, b_addr, &response), None);
    let keepalive = recv(b_sock);
    assert!(matches!(
        b.decapsulate(Some(b_addr.ip()), &keepalive, &mut out),
        TunnResult::Done
    ));
    b
}

/// A minimal IPv4 packet from B's tunnel address.
fn ipv4_from_b() -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&28u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&B_TUNNEL.octets());
    p[16..20].copy_from_slice(&[10, 80, 0, 1]);
    p
}

#[test]
fn cookie_replies_from_elsewhere_do_not_move_the_endpoint() {
    let (key_a, key_b) = (
        PrivateKey::generate().expect("key"),
        PrivateKey::generate().expect("key"),
    );
    let a = device(&key_a, None);
    let b_public = XPublic::from(*key_b.public_key().as_bytes());
    let (b_sock, b_addr) = loopback([127, 0, 0, 1]);
    // Another address, as an on-path attacker (or anyone who saw the initiation) would use.
    let (forger, forger_addr) = loopback([127, 0, 0, 2]);
    forger.set_nonblocking(true).expect("nonblocking");
    set_peer(&a, key_b.public_key(), b_addr, None);

    // a starts a handshake towards b's real address.
    a.force_handshake(&key_b.public_key()).expect("handshake");
    let init = recv(&b_sock);
    assert_eq!((init.len(), init[0]), (148, 1), "a handshake initiation");

    // b is under load and answers with a genuine cookie reply; it is delivered from another
    // address (redirected or replayed), as the paper's attacker does.
    let mut buf = [0u8; 256];
    let cookie = match RateLimiter::new(&b_public, 0).verify_packet(
        Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        &init,
        &mut buf,
    ) {
        Err(TunnResult::WriteToNetwork(c)) => c.to_vec(),
        _ => panic!("a rate limiter at limit 0 answers with a cookie reply"),
    };
    assert_eq!((cookie.len(), cookie[0]), (64, 3));
    let before = a.counters.snapshot();
    assert_eq!(receive(&a, forger_addr, &cookie), None);
    // The cookie was valid (accepted without an error counted)...
    assert_eq!(
        a.counters.snapshot(),
        before,
        "the cookie reply was refused"
    );
    // ...and still did not move the endpoint.
    assert_eq!(
        uapi_peer(&a, &key_b.public_key()).endpoint,
        Some(b_addr),
        "a cookie reply moved the endpoint"
    );

    // Traffic continues with b at its real address: a's next initiation (with the cookie's
    // mac2 now) goes there, b answers, a's keepalive comes back, b's data decrypts.
    let mut b = handshake(&a, &key_a, &key_b, &b_sock);
    let mut out = vec![0u8; 2048];
    let inner = ipv4_from_b();
    let data = match b.encapsulate(&inner, &mut out) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("b has a session"),
    };
    assert_eq!(receive(&a, b_addr, &data), Some(inner));

    // Replays from the other address afterwards: the cookie reply (no handshake in flight
    // now) and b's data packet (a duplicate counter). Neither moves the endpoint.
    let before = a.counters.snapshot();
    assert_eq!(receive(&a, forger_addr, &cookie), None);
    assert_eq!(receive(&a, forger_addr, &data), None);
    let after = a.counters.snapshot();
    assert!(
        after.rx_decrypt_failed > before.rx_decrypt_failed,
        "{after:?}"
    );
    assert_eq!(uapi_peer(&a, &key_b.public_key()).endpoint, Some(b_addr));
    let mut stray = [0u8; 256];
    assert!(
        forger.recv_from(&mut stray).is_err(),
        "the device sent something to the forger's address"
    );
}

/// Once `gate` holds a send made by `sender` (as a full socket buffer would), adds a peer owning
/// `net` through UAPI `set` and asserts that the write completed while the send was still held;
/// then lets the send go and waits for `sender`.
fn write_while_held(
    a: &Arc<Shared>,
    gate: &SendGate,
    sender: std::thread::JoinHandle<()>,
    net: &str,
    what: &str,
) {
    assert!(
        gate.wait_held(DEADLINE),
        "{what}: no send reached the socket"
    );
    let (done_tx, done_rx) = mpsc::channel();
    let extra = PrivateKey::generate().expect("key").public_key();
    let mut peer = PeerConfig::new(extra);
    peer.allowed_ips = vec![net.parse().expect("net")];
    let writer = {
        let a = a.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(a.uapi_set(&convert::set_peer_request(&peer).expect("request")));
        })
    };
    let written = done_rx.recv_timeout(DEADLINE);
    let held_meanwhile = gate.held() > 0;
    gate.set_closed(false);
    sender.join().expect("sender thread");
    writer.join().expect("writer thread");
    assert_eq!(
        written,
        Ok(Ok(())),
        "{what}: the UAPI set did not complete while a send was blocked"
    );
    assert!(held_meanwhile, "{what}: the send was not blocked meanwhile");
    assert!(
        a.uapi_get()
            .peers
            .iter()
            .any(|p| p.public_key == *extra.as_bytes())
    );
}

#[test]
fn config_writes_do_not_wait_for_a_blocked_send() {
    let key_a = PrivateKey::generate().expect("key");
    let key_b = PrivateKey::generate().expect("key");
    let gate = SendGate::closed();
    let a = device(&key_a, Some(gate.clone()));
    let (b_sock, b_addr) = loopback([127, 0, 0, 1]);
    // A persistent keepalive just switched on: the next timer tick sends (a handshake
    // initiation, as there is no session yet).
    set_peer(&a, key_b.public_key(), b_addr, Some(25));

    type Sender = Box<dyn FnOnce(&Arc<Shared>) + Send>;
    let senders: [(&str, Sender); 2] = [
        (
            "timer tick",
            Box::new(|shared: &Arc<Shared>| Timers::new(shared.clone()).tick()),
        ),
        (
            "forced handshake",
            Box::new(move |shared: &Arc<Shared>| {
                shared
                    .force_handshake(&key_b.public_key())
                    .expect("handshake")
            }),
        ),
    ];
    for (round, (what, send)) in senders.into_iter().enumerate() {
        gate.set_closed(true);
        let sender = {
            let a = a.clone();
            std::thread::spawn(move || send(&a))
        };
        write_while_held(&a, &gate, sender, &format!("10.80.1.{round}/32"), what);
        // The held datagram goes out once the socket lets it.
        let sent = recv(&b_sock);
        assert_eq!((sent.len(), sent[0]), (148, 1), "{what}: an initiation");
    }
}

#[test]
fn a_frame_larger_than_the_send_buffer_is_sent_with_no_lock_held() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIP a_frame_larger_than_the_send_buffer_is_sent_with_no_lock_held: needs root (CI runs it as root)"
        );
        return;
    }
    // The encrypt path needs a TUN queue: create it in a network namespace of this thread's
    // own (nothing is left behind), with loopback up for the test's peer socket.
    std::thread::spawn(|| {
        // SAFETY: a new network namespace for this thread only.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("ip");
        assert!(up.success());
        large_frame_in_namespace();
    })
    .join()
    .expect("test thread");
}

fn large_frame_in_namespace() {
    let (key_a, key_b) = (
        PrivateKey::generate().expect("key"),
        PrivateKey::generate().expect("key"),
    );
    let gate = SendGate::closed();
    gate.set_closed(false);
    let a = device(&key_a, Some(gate.clone()));
    let (b_sock, b_addr) = loopback([127, 0, 0, 1]);
    set_peer(&a, key_b.public_key(), b_addr, None);
    let _b = handshake(&a, &key_a, &key_b, &b_sock);

    let tun = super::io::open_tun("wmtx0", 1420, 1)
        .expect("TUN")
        .remove(0);
    let mut worker = worker::TunWorker::new(a.clone(), Arc::new(tun), 0);
    // A TSO frame cut into 8-byte segments: ~7,400 datagrams of 148 bytes, more than twice
    // the send buffer, so it has to be flushed in the middle of the frame.
    let payload: Vec<u8> = (0..59_000u32).map(|i| i as u8).collect();
    let frame = super::gso::tests::tso_frame(false, &payload, 8, 0x10);
    let segments = payload.len().div_ceil(8) as u64;
    let n = worker.load_frame(&frame);
    let udp = a.read_state().udp.clone();
    let before = a.counters.snapshot();

    gate.set_closed(true);
    let sender = std::thread::spawn(move || {
        worker.encrypt_frame(n, &udp);
        worker.flush(&udp);
    });
    write_while_held(&a, &gate, sender, "10.80.9.9/32", "the encrypt path");
    // Every segment went out, none lost to the multi-pass staging.
    let after = a.counters.snapshot();
    assert_eq!(after.tx_errors, before.tx_errors, "{after:?}");
    assert_eq!(after.tun_malformed, before.tun_malformed, "{after:?}");
    assert_eq!(
        after.tx_datagrams - before.tx_datagrams,
        segments,
        "{after:?}"
    );
}
