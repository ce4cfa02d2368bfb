//! Fuzzing entry point of the engine's receive path, shared by the `engine_packets` cargo-fuzz
//! target in `device/fuzz/` and by `tests/fuzz_corpus.rs`, which replays the committed corpus.
//! Panics when an invariant breaks; that is how the fuzzer reports a finding.
//!
//! A device with a fixed key pair (no TUN: the receive path as a worker runs it, see
//! [`super::worker::handle_datagram`]) and one peer played by boringtun with the other key. The
//! input is a script of operations: genuine handshakes started by either side, genuine data
//! packets, replays and bit flips of anything recorded so far, and raw datagrams from the input.
//! Checks, besides "no panic":
//! - a message the device accepted once is never accepted again (replay protection: data
//!   packets, handshake initiations and responses);
//! - a recorded message with any byte changed is never accepted;
//! - raw datagrams from the input are never accepted (no forgery without the keys);
//! - nothing but an accepted message moves the peer's endpoint;
//! - a decrypted packet is exactly what the peer encrypted.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use boringtun::{
    noise::{Tunn, TunnResult},
    x25519::{PublicKey as XPublic, StaticSecret},
};
use wiremesh_keyexchange::PrivateKey;
use wiremesh_wgctrl::{
    convert,
    datapath::{DeviceSettings, PeerConfig},
};

use super::{
    Shared, UapiHandler,
    io::UdpEndpoint,
    outbox::Outbox,
    worker::{self, RxCache},
};

/// The device's and the peer's fixed private keys (test keys, never used elsewhere).
const DEVICE_KEY: [u8; 32] = [0x11; 32];
const PEER_KEY: [u8; 32] = [0x22; 32];
/// The peer's tunnel address (its allowed IP) and the device's.
const PEER_TUNNEL: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const DEVICE_TUNNEL: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// Where the peer's datagrams come from, and where an attacker's do. Nothing is ever sent to
/// them: replies are taken from the outbox.
const PEER_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)), 51820);
const OTHER_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 66)), 4444);
/// Operations per input, so one input stays cheap.
const MAX_OPS: usize = 64;

/// One message the peer sent, and whether the device accepted it the first time.
struct Recorded {
    bytes: Vec<u8>,
    accepted: bool,
}

/// What feeding one datagram did.
struct Outcome {
    /// The decrypted packet, if any.
    packet: Option<Vec<u8>>,
    /// Replies the device staged (handshake responses, keepalives, cookie replies).
    replies: Vec<(SocketAddr, Vec<u8>)>,
    /// Whether the peer's endpoint changed.
    endpoint_moved: bool,
    /// Whether the device took the datagram as the peer's: the peer's receive counter moves
    /// only for authenticated messages (a decrypted packet or keepalive, a handshake message
    /// answered), never for a cookie reply or a rejection.
    accepted: bool,
}

struct Harness {
    device: Arc<Shared>,
    peer: Tunn,
    recorded: Vec<Recorded>,
    scratch: Vec<u8>,
    dst: Vec<u8>,
}

impl Harness {
    fn new() -> Self {
        let device = detached_device();
        let device_key = PrivateKey::from_bytes(DEVICE_KEY);
        let peer_key = PrivateKey::from_bytes(PEER_KEY);
        let mut config = PeerConfig::new(peer_key.public_key());
        config.endpoint = Some(PEER_ADDR);
        config.allowed_ips = vec![format!("{PEER_TUNNEL}/32").parse().expect("net")];
        device
            .uapi_set(&convert::set_peer_request(&config).expect("request"))
            .expect("set the peer");
        let peer = Tunn::new(
            StaticSecret::from(PEER_KEY),
            XPublic::from(*device_key.public_key().as_bytes()),
            None,
            None,
            1,
            None,
        );
        Self {
            device,
            peer,
            recorded: Vec::new(),
            scratch: vec![0; 2048],
            dst: vec![0; 65536],
        }
    }

    /// The peer's endpoint and receive counter.
    fn peer_state(&self) -> (Option<SocketAddr>, u64) {
        self.device
            .peer_statuses()
            .into_iter()
            .next()
            .map(|(p, _)| (p.endpoint, p.rx_bytes))
            .expect("the peer is configured")
    }

    /// Runs `datagram` from `src` through the receive path as a worker does.
    fn feed(&mut self, src: SocketAddr, datagram: &[u8]) -> Outcome {
        let (endpoint, rx_bytes) = self.peer_state();
        let mut out = Outbox::with_capacity(1024);
        let packet = {
            let state = self.device.read_state();
            let mut cache = RxCache::default();
            worker::handle_datagram(
                &self.device,
                &state,
                &mut out,
                src,
                datagram,
                &mut self.dst,
                &mut self.scratch,
                &mut cache,
            )
            .map(|len| self.dst[..len].to_vec())
        };
        let after = self.peer_state();
        Outcome {
            accepted: packet.is_some() || after.1 != rx_bytes,
            packet,
            replies: out.take(),
            endpoint_moved: after.0 != endpoint,
        }
    }

    /// Feeds a genuine message of the peer and records it; answers go back to the peer.
    fn genuine(&mut self, datagram: Vec<u8>, sent: Option<&[u8]>) {
        let outcome = self.feed(PEER_ADDR, &datagram);
        if let (Some(got), Some(sent)) = (&outcome.packet, sent) {
            assert_eq!(
                got.as_slice(),
                sent,
                "decrypted packet differs from the sent one"
            );
        }
        self.recorded.push(Recorded {
            bytes: datagram,
            accepted: outcome.accepted,
        });
        self.deliver_to_peer(outcome.replies);
    }

    /// Delivers the device's replies to the peer; the peer's answers go back to the device
    /// (and are recorded), a few rounds at most.
    fn deliver_to_peer(&mut self, replies: Vec<(SocketAddr, Vec<u8>)>) {
        let mut queue = replies;
        for _ in 0..4 {
            let mut answers = Vec::new();
            for (to, bytes) in queue.drain(..) {
                if to != PEER_ADDR {
                    continue;
                }
                let mut buf = vec![0u8; 2048];
                if let TunnResult::WriteToNetwork(r) =
                    self.peer
                        .decapsulate(Some(DEVICE_ADDR_IP), &bytes, &mut buf)
                {
                    answers.push(r.to_vec());
                    while let TunnResult::WriteToNetwork(r) =
                        self.peer.decapsulate(None, &[], &mut buf)
                    {
                        answers.push(r.to_vec());
                    }
                }
            }
            if answers.is_empty() {
                break;
            }
            for answer in answers {
                let outcome = self.feed(PEER_ADDR, &answer);
                self.recorded.push(Recorded {
                    bytes: answer,
                    accepted: outcome.accepted,
                });
                queue.extend(outcome.replies);
            }
        }
    }

    fn peer_initiates(&mut self) {
        let mut buf = vec![0u8; 2048];
        if let TunnResult::WriteToNetwork(init) =
            self.peer.format_handshake_initiation(&mut buf, true)
        {
            let init = init.to_vec();
            self.genuine(init, None);
        }
    }

    fn device_initiates(&mut self) {
        let peer = PrivateKey::from_bytes(PEER_KEY).public_key();
        let mut out = Outbox::with_capacity(256);
        self.device
            .stage_handshake(&peer, &mut out)
            .expect("the peer is configured");
        let replies = out.take();
        self.deliver_to_peer(replies);
    }

    fn peer_sends(&mut self, payload: &[u8]) {
        let packet = ipv4(PEER_TUNNEL, DEVICE_TUNNEL, payload);
        let mut buf = vec![0u8; packet.len() + 64];
        if let TunnResult::WriteToNetwork(datagram) = self.peer.encapsulate(&packet, &mut buf) {
            let datagram = datagram.to_vec();
            self.genuine(datagram, Some(&packet));
        }
    }

    /// A recorded message again, from the peer's address or another one.
    fn replay(&mut self, index: usize, src: SocketAddr) {
        if self.recorded.is_empty() {
            return;
        }
        let index = index % self.recorded.len();
        let bytes = self.recorded[index].bytes.clone();
        let outcome = self.feed(src, &bytes);
        if self.recorded[index].accepted {
            assert!(
                !outcome.accepted,
                "replayed message {index} (type {}) accepted again",
                bytes[0]
            );
        }
        if !outcome.accepted {
            assert!(
                !outcome.endpoint_moved,
                "a rejected replay moved the endpoint"
            );
        }
    }

    /// A recorded message with one byte changed.
    fn flip(&mut self, index: usize, at: usize, xor: u8) {
        if self.recorded.is_empty() || xor == 0 {
            return;
        }
        let index = index % self.recorded.len();
        let mut bytes = self.recorded[index].bytes.clone();
        let at = at % bytes.len();
        bytes[at] ^= xor;
        let outcome = self.feed(OTHER_ADDR, &bytes);
        // mac2 (the last 16 bytes of a handshake message) is only checked under load: with it
        // changed the message is the same one again, which must not be accepted twice.
        let handshake = matches!((bytes[0], bytes.len()), (1, 148) | (2, 92));
        let in_mac2 = handshake && at >= bytes.len() - 16;
        if !in_mac2 || self.recorded[index].accepted {
            assert!(
                !outcome.accepted,
                "message {index} (type {}) with byte {at} changed was accepted",
                bytes[0]
            );
        }
        if !outcome.accepted {
            assert!(
                !outcome.endpoint_moved,
                "a rejected message moved the endpoint"
            );
        }
    }

    fn raw(&mut self, datagram: &[u8], from_peer: bool) {
        let src = if from_peer { PEER_ADDR } else { OTHER_ADDR };
        let outcome = self.feed(src, datagram);
        assert!(
            !outcome.accepted,
            "a datagram made without the keys was accepted"
        );
        assert!(
            !outcome.endpoint_moved,
            "an unauthenticated datagram moved the endpoint"
        );
    }
}

/// The address the peer believes the device has (only for boringtun's cookie bookkeeping).
const DEVICE_ADDR_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

/// A minimal IPv4/UDP-protocol packet from `src` to `dst` carrying `payload`.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let payload = &payload[..payload.len().min(1200)];
    let len = 20 + payload.len();
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// The receive path on a script of operations (see the module docs). Input: a sequence of
/// operations, each one opcode byte (`op % 8`) and its arguments:
/// 0 the peer starts a handshake; 1 the device starts one; 2 `len` + payload: the peer sends a
/// data packet; 3 `i`: replay recorded message `i` from the peer's address; 4 `i`: replay it
/// from another address; 5 `i`, `at`, `xor`: send it with byte `at` xored; 6/7 `len` + bytes:
/// a raw datagram from the peer's address (6) or another (7).
pub fn engine_packets(data: &[u8]) {
    let mut h = Harness::new();
    let mut input = data.iter().copied();
    fn take(n: usize, input: &mut impl Iterator<Item = u8>) -> Vec<u8> {
        input.take(n).collect()
    }
    for _ in 0..MAX_OPS {
        let Some(op) = input.next() else { break };
        match op % 8 {
            0 => h.peer_initiates(),
            1 => h.device_initiates(),
            2 => {
                let len = input.next().unwrap_or(0) as usize;
                let payload = take(len, &mut input);
                h.peer_sends(&payload);
            }
            3 | 4 => {
                let index = input.next().unwrap_or(0) as usize;
                let src = if op % 8 == 3 { PEER_ADDR } else { OTHER_ADDR };
                h.replay(index, src);
            }
            5 => {
                let index = input.next().unwrap_or(0) as usize;
                let at = u16::from_le_bytes([input.next().unwrap_or(0), input.next().unwrap_or(0)]);
                let xor = input.next().unwrap_or(1);
                h.flip(index, at as usize, xor);
            }
            _ => {
                let len =
                    u16::from_le_bytes([input.next().unwrap_or(0), input.next().unwrap_or(0)]);
                let datagram = take(len as usize % 2048, &mut input);
                h.raw(&datagram, op % 8 == 6);
            }
        }
    }
}

/// A device with the fixed key and no peers, for the UAPI server harness.
pub(crate) fn detached_device() -> Arc<Shared> {
    let udp = UdpEndpoint::bind(0, 0, 1).expect("bind a loopback UDP socket");
    let device = Arc::new(Shared::detached("wmfuzz", udp));
    device
        .apply(&convert::configure_request(&DeviceSettings {
            private_key: Some(PrivateKey::from_bytes(DEVICE_KEY)),
            listen_port: None,
            fwmark: None,
        }))
        .expect("configure the device");
    device
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness's checks are live: a genuine handshake and data packet are accepted (so the
    /// replay check applies to them), and their replays are rejected by the engine.
    #[test]
    fn genuine_messages_are_accepted_once() {
        let mut h = Harness::new();
        h.peer_initiates();
        h.peer_sends(b"abc");
        let accepted: Vec<(u8, bool)> = h
            .recorded
            .iter()
            .map(|r| (r.bytes[0], r.accepted))
            .collect();
        // The initiation, the peer's keepalive confirming the session, the data packet.
        assert_eq!(accepted, vec![(1, true), (4, true), (4, true)]);
        for i in 0..h.recorded.len() {
            let bytes = h.recorded[i].bytes.clone();
            let again = h.feed(PEER_ADDR, &bytes);
            assert!(!again.accepted, "replay of message {i} accepted");
        }
    }

    /// The other direction: the device initiates, the peer's response is accepted once.
    #[test]
    fn a_replayed_response_is_rejected() {
        let mut h = Harness::new();
        h.device_initiates();
        assert_eq!(
            h.recorded.first().map(|r| (r.bytes[0], r.accepted)),
            Some((2, true))
        );
        let response = h.recorded[0].bytes.clone();
        assert!(!h.feed(PEER_ADDR, &response).accepted);
    }
}
