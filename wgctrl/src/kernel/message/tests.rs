//! Message-level tests of the WireGuard generic netlink layer, no root or module needed: SET
//! messages are checked byte by byte against the constants of the kernel's
//! `include/uapi/linux/wireguard.h` with a TLV walker of our own (not the crate's parser), the
//! splitting against size limits with thousands of peers and allowed IPs, and GET dumps are
//! synthesised byte by byte the way the kernel writes them (a peer continued across messages).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, UNIX_EPOCH},
};

use ipnet::IpNet;
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::WireguardMessage;

use super::*;
use crate::{
    kernel::{Borrowed, KernelError, set_bytes},
    netlink,
};

// include/uapi/linux/wireguard.h
const WG_GENL_VERSION: u8 = 1;
const WG_CMD_GET_DEVICE: u8 = 0;
const WG_CMD_SET_DEVICE: u8 = 1;
const WGDEVICE_F_REPLACE_PEERS: u32 = 1 << 0;
const WGDEVICE_A_IFINDEX: u16 = 1;
const WGDEVICE_A_IFNAME: u16 = 2;
const WGDEVICE_A_PRIVATE_KEY: u16 = 3;
const WGDEVICE_A_PUBLIC_KEY: u16 = 4;
const WGDEVICE_A_FLAGS: u16 = 5;
const WGDEVICE_A_LISTEN_PORT: u16 = 6;
const WGDEVICE_A_FWMARK: u16 = 7;
const WGDEVICE_A_PEERS: u16 = 8;
const WGPEER_F_REMOVE_ME: u32 = 1 << 0;
const WGPEER_F_REPLACE_ALLOWEDIPS: u32 = 1 << 1;
const WGPEER_F_UPDATE_ONLY: u32 = 1 << 2;
const WGPEER_A_PUBLIC_KEY: u16 = 1;
const WGPEER_A_PRESHARED_KEY: u16 = 2;
const WGPEER_A_FLAGS: u16 = 3;
const WGPEER_A_ENDPOINT: u16 = 4;
const WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL: u16 = 5;
const WGPEER_A_LAST_HANDSHAKE_TIME: u16 = 6;
const WGPEER_A_RX_BYTES: u16 = 7;
const WGPEER_A_TX_BYTES: u16 = 8;
const WGPEER_A_ALLOWEDIPS: u16 = 9;
const WGPEER_A_PROTOCOL_VERSION: u16 = 10;
const WGALLOWEDIP_A_FAMILY: u16 = 1;
const WGALLOWEDIP_A_IPADDR: u16 = 2;
const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;
// include/uapi/linux/netlink.h, linux/socket.h
const NLA_F_NESTED: u16 = 1 << 15;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_MULTI: u16 = 2;
const NLM_F_ACK: u16 = 4;
const NLMSG_DONE: u16 = 3;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

const FAMILY: u16 = 0x1b;
const IFNAME: &str = "wm-test0";

fn key(n: u32) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&n.to_be_bytes());
    k[31] = 0x5a;
    k
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// One attribute as found on the wire.
#[derive(Debug, Clone)]
struct Attr {
    kind: u16,
    nested_flag: bool,
    value: Vec<u8>,
}

/// Walks a run of attributes, checking lengths and 4-byte alignment on the way.
fn walk(mut buf: &[u8]) -> Vec<Attr> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        assert!(buf.len() >= 4, "truncated attribute header: {buf:?}");
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]);
        assert!(
            len >= 4 && len <= buf.len(),
            "attribute length {len} of {}",
            buf.len()
        );
        out.push(Attr {
            kind: kind & !NLA_F_NESTED,
            nested_flag: kind & NLA_F_NESTED != 0,
            value: buf[4..len].to_vec(),
        });
        let padded = (len + 3) & !3;
        buf = &buf[padded.min(buf.len())..];
    }
    out
}

fn find(attrs: &[Attr], kind: u16) -> Option<&Attr> {
    attrs.iter().find(|a| a.kind == kind)
}

fn u16_of(a: &Attr) -> u16 {
    assert_eq!(a.value.len(), 2, "{a:?}");
    u16::from_ne_bytes([a.value[0], a.value[1]])
}

fn u32_of(a: &Attr) -> u32 {
    assert_eq!(a.value.len(), 4, "{a:?}");
    u32::from_ne_bytes(a.value[..4].try_into().unwrap())
}

/// A whole serialized request: checks the netlink and generic netlink headers, returns the
/// top-level attributes.
fn request_attrs(bytes: &[u8], seq: u32) -> Vec<Attr> {
    assert!(bytes.len() >= 20);
    let len = u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize;
    assert_eq!(len, bytes.len(), "nlmsg_len");
    assert_eq!(
        u16::from_ne_bytes([bytes[4], bytes[5]]),
        FAMILY,
        "nlmsg_type"
    );
    assert_eq!(
        u16::from_ne_bytes([bytes[6], bytes[7]]),
        NLM_F_REQUEST | NLM_F_ACK,
        "nlmsg_flags"
    );
    assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), seq);
    assert_eq!(bytes[16], WG_CMD_SET_DEVICE, "genl cmd");
    assert_eq!(bytes[17], WG_GENL_VERSION, "genl version");
    walk(&bytes[20..])
}

/// A peer entry of a SET message as the kernel reads it.
#[derive(Debug, Default)]
struct WirePeer {
    public_key: [u8; 32],
    flags: u32,
    attr_kinds: Vec<u16>,
    allowed_ips: Vec<IpNet>,
}

fn wire_peers(top: &[Attr]) -> Vec<WirePeer> {
    let Some(peers) = find(top, WGDEVICE_A_PEERS) else {
        return Vec::new();
    };
    assert!(peers.nested_flag, "WGDEVICE_A_PEERS without NLA_F_NESTED");
    walk(&peers.value)
        .into_iter()
        .map(|entry| {
            assert_eq!(entry.kind, 0, "peer entries are type 0");
            assert!(entry.nested_flag, "peer entry without NLA_F_NESTED");
            let attrs = walk(&entry.value);
            let mut peer = WirePeer {
                attr_kinds: attrs.iter().map(|a| a.kind).collect(),
                ..WirePeer::default()
            };
            for a in &attrs {
                match a.kind {
                    WGPEER_A_PUBLIC_KEY => peer.public_key = a.value[..].try_into().unwrap(),
                    WGPEER_A_FLAGS => peer.flags = u32_of(a),
                    WGPEER_A_ALLOWEDIPS => {
                        assert!(a.nested_flag, "WGPEER_A_ALLOWEDIPS without NLA_F_NESTED");
                        for ip in walk(&a.value) {
                            assert_eq!(ip.kind, 0);
                            assert!(ip.nested_flag, "allowed IP entry without NLA_F_NESTED");
                            let ip_attrs = walk(&ip.value);
                            let family = u16_of(find(&ip_attrs, WGALLOWEDIP_A_FAMILY).unwrap());
                            let addr = &find(&ip_attrs, WGALLOWEDIP_A_IPADDR).unwrap().value;
                            let cidr = find(&ip_attrs, WGALLOWEDIP_A_CIDR_MASK).unwrap();
                            assert_eq!(cidr.value.len(), 1, "CIDR_MASK is a u8");
                            let addr: IpAddr = match family {
                                AF_INET => <[u8; 4]>::try_from(&addr[..]).unwrap().into(),
                                AF_INET6 => <[u8; 16]>::try_from(&addr[..]).unwrap().into(),
                                other => panic!("family {other}"),
                            };
                            peer.allowed_ips
                                .push(IpNet::new(addr, cidr.value[0]).unwrap());
                        }
                    }
                    _ => {}
                }
            }
            peer
        })
        .collect()
}

fn serialize_all(req: &SetRequest, limit: usize) -> Vec<Vec<u8>> {
    set_messages(IFNAME, req, limit)
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, m)| set_bytes(m, FAMILY, i as u32 + 1).to_vec())
        .collect()
}

#[test]
fn set_message_matches_the_kernel_header_attribute_by_attribute() {
    let mut first = PeerUpdate::new(key(1));
    first.preshared_key = Some(SecretKey(Zeroizing::new([7; 32])));
    first.endpoint = Some("192.0.2.7:51871".parse().unwrap());
    first.persistent_keepalive = Some(25);
    first.replace_allowed_ips = true;
    first.allowed_ips = vec![net("10.42.1.0/24"), net("fd00:42::/64")];
    let mut second = PeerUpdate::new(key(2));
    second.remove = true;
    let mut third = PeerUpdate::new(key(3));
    third.update_only = true;
    third.endpoint = Some("[2001:db8::9]:4000".parse().unwrap());
    let req = SetRequest {
        private_key: Some(SecretKey(Zeroizing::new([9; 32]))),
        listen_port: Some(51871),
        fwmark: Some(0x1e7),
        replace_peers: true,
        peers: vec![first, second, third],
    };
    let messages = serialize_all(&req, SET_MESSAGE_LIMIT);
    assert_eq!(messages.len(), 1);
    let top = request_attrs(&messages[0], 1);

    let kinds: Vec<u16> = top.iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds,
        [
            WGDEVICE_A_IFNAME,
            WGDEVICE_A_PRIVATE_KEY,
            WGDEVICE_A_LISTEN_PORT,
            WGDEVICE_A_FWMARK,
            WGDEVICE_A_FLAGS,
            WGDEVICE_A_PEERS
        ]
    );
    assert_eq!(find(&top, WGDEVICE_A_IFNAME).unwrap().value, b"wm-test0\0");
    assert_eq!(find(&top, WGDEVICE_A_PRIVATE_KEY).unwrap().value, [9; 32]);
    assert_eq!(u16_of(find(&top, WGDEVICE_A_LISTEN_PORT).unwrap()), 51871);
    assert_eq!(u32_of(find(&top, WGDEVICE_A_FWMARK).unwrap()), 0x1e7);
    assert_eq!(
        u32_of(find(&top, WGDEVICE_A_FLAGS).unwrap()),
        WGDEVICE_F_REPLACE_PEERS
    );
    for a in &top[..5] {
        assert!(!a.nested_flag, "{a:?} must not be nested");
    }

    let peers = walk(&find(&top, WGDEVICE_A_PEERS).unwrap().value);
    assert_eq!(peers.len(), 3);
    let p1 = walk(&peers[0].value);
    assert_eq!(
        p1.iter().map(|a| a.kind).collect::<Vec<_>>(),
        [
            WGPEER_A_PUBLIC_KEY,
            WGPEER_A_FLAGS,
            WGPEER_A_PRESHARED_KEY,
            WGPEER_A_ENDPOINT,
            WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
            WGPEER_A_ALLOWEDIPS
        ]
    );
    assert_eq!(find(&p1, WGPEER_A_PUBLIC_KEY).unwrap().value, key(1));
    assert_eq!(
        u32_of(find(&p1, WGPEER_A_FLAGS).unwrap()),
        WGPEER_F_REPLACE_ALLOWEDIPS
    );
    assert_eq!(find(&p1, WGPEER_A_PRESHARED_KEY).unwrap().value, [7; 32]);
    // struct sockaddr_in: family (host order), port (network order), address, 8 bytes zero.
    let ep = &find(&p1, WGPEER_A_ENDPOINT).unwrap().value;
    assert_eq!(ep.len(), 16);
    assert_eq!(u16::from_ne_bytes([ep[0], ep[1]]), AF_INET);
    assert_eq!(u16::from_be_bytes([ep[2], ep[3]]), 51871);
    assert_eq!(ep[4..8], [192, 0, 2, 7]);
    assert_eq!(ep[8..16], [0; 8]);
    assert_eq!(
        u16_of(find(&p1, WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL).unwrap()),
        25
    );
    let ips = walk(&find(&p1, WGPEER_A_ALLOWEDIPS).unwrap().value);
    assert_eq!(ips.len(), 2);
    let v4 = walk(&ips[0].value);
    assert_eq!(
        v4.iter().map(|a| a.kind).collect::<Vec<_>>(),
        [
            WGALLOWEDIP_A_FAMILY,
            WGALLOWEDIP_A_IPADDR,
            WGALLOWEDIP_A_CIDR_MASK
        ]
    );
    assert_eq!(u16_of(&v4[0]), AF_INET);
    assert_eq!(v4[1].value, [10, 42, 1, 0]);
    assert_eq!(v4[2].value, [24]);
    let v6 = walk(&ips[1].value);
    assert_eq!(u16_of(&v6[0]), AF_INET6);
    assert_eq!(
        v6[1].value,
        Ipv6Addr::new(0xfd00, 0x42, 0, 0, 0, 0, 0, 0).octets()
    );
    assert_eq!(v6[2].value, [64]);

    let p2 = walk(&peers[1].value);
    assert_eq!(
        p2.iter().map(|a| a.kind).collect::<Vec<_>>(),
        [WGPEER_A_PUBLIC_KEY, WGPEER_A_FLAGS]
    );
    assert_eq!(u32_of(&p2[1]), WGPEER_F_REMOVE_ME);

    let p3 = walk(&peers[2].value);
    assert_eq!(
        u32_of(find(&p3, WGPEER_A_FLAGS).unwrap()),
        WGPEER_F_UPDATE_ONLY
    );
    // struct sockaddr_in6: family, port, flowinfo, address, scope id.
    let ep = &find(&p3, WGPEER_A_ENDPOINT).unwrap().value;
    assert_eq!(ep.len(), 28);
    assert_eq!(u16::from_ne_bytes([ep[0], ep[1]]), AF_INET6);
    assert_eq!(u16::from_be_bytes([ep[2], ep[3]]), 4000);
    assert_eq!(
        ep[8..24],
        "2001:db8::9".parse::<Ipv6Addr>().unwrap().octets()
    );
}

#[test]
fn a_request_without_changes_still_names_the_device() {
    let messages = serialize_all(&SetRequest::default(), SET_MESSAGE_LIMIT);
    assert_eq!(messages.len(), 1);
    let top = request_attrs(&messages[0], 1);
    assert_eq!(top.len(), 1);
    assert_eq!(top[0].kind, WGDEVICE_A_IFNAME);
}

/// Splits `req` at `limit` and checks every rule of the header's "several messages" paragraph.
/// Returns, per message, the peers it carries.
fn check_split(req: &SetRequest, limit: usize) -> Vec<Vec<WirePeer>> {
    let messages = serialize_all(req, limit);
    let mut per_message = Vec::new();
    let mut seen: Vec<([u8; 32], Vec<IpNet>)> = Vec::new();
    for (i, bytes) in messages.iter().enumerate() {
        assert!(
            bytes.len() <= limit,
            "message {i}: {} > {limit}",
            bytes.len()
        );
        let top = request_attrs(bytes, i as u32 + 1);
        assert_eq!(
            top[0].kind, WGDEVICE_A_IFNAME,
            "message {i} names the device first"
        );
        for kind in [
            WGDEVICE_A_PRIVATE_KEY,
            WGDEVICE_A_LISTEN_PORT,
            WGDEVICE_A_FWMARK,
            WGDEVICE_A_FLAGS,
        ] {
            assert_eq!(
                find(&top, kind).is_some(),
                i == 0 && kind_set(req, kind),
                "message {i}: device attribute {kind} belongs to the first message only"
            );
        }
        let peers = wire_peers(&top);
        for (j, peer) in peers.iter().enumerate() {
            let continued = j == 0 && seen.last().is_some_and(|(k, _)| *k == peer.public_key);
            let input = req
                .peers
                .iter()
                .find(|p| p.public_key == peer.public_key)
                .expect("a peer of the request");
            let mut want_flags = 0;
            if input.remove {
                want_flags |= WGPEER_F_REMOVE_ME;
            }
            if input.update_only {
                want_flags |= WGPEER_F_UPDATE_ONLY;
            }
            if input.replace_allowed_ips && !continued {
                want_flags |= WGPEER_F_REPLACE_ALLOWEDIPS;
            }
            assert_eq!(
                peer.flags, want_flags,
                "message {i} peer {j} (continued {continued})"
            );
            if continued {
                assert!(
                    peer.attr_kinds.iter().all(|k| [
                        WGPEER_A_PUBLIC_KEY,
                        WGPEER_A_FLAGS,
                        WGPEER_A_ALLOWEDIPS
                    ]
                    .contains(k)),
                    "a continued peer carries only key, flags and allowed IPs: {:?}",
                    peer.attr_kinds
                );
                assert!(
                    !peer.allowed_ips.is_empty(),
                    "a continuation carries allowed IPs"
                );
                seen.last_mut()
                    .unwrap()
                    .1
                    .extend(peer.allowed_ips.iter().copied());
            } else {
                seen.push((peer.public_key, peer.allowed_ips.clone()));
            }
        }
        per_message.push(peers);
    }
    // The union of all parts, in order, is exactly the input.
    let want: Vec<([u8; 32], Vec<IpNet>)> = req
        .peers
        .iter()
        .map(|p| (p.public_key, p.allowed_ips.clone()))
        .collect();
    assert_eq!(seen.len(), want.len(), "peer count after coalescing");
    assert!(seen == want, "coalesced peers differ from the input");
    per_message
}

fn kind_set(req: &SetRequest, kind: u16) -> bool {
    match kind {
        WGDEVICE_A_PRIVATE_KEY => req.private_key.is_some(),
        WGDEVICE_A_LISTEN_PORT => req.listen_port.is_some(),
        WGDEVICE_A_FWMARK => req.fwmark.is_some(),
        WGDEVICE_A_FLAGS => req.replace_peers,
        _ => unreachable!(),
    }
}

fn many_peers(peers: u32, ips_per_peer: u32) -> SetRequest {
    let mut req = SetRequest {
        private_key: Some(SecretKey(Zeroizing::new([3; 32]))),
        listen_port: Some(51871),
        fwmark: Some(0),
        replace_peers: true,
        peers: Vec::new(),
    };
    let mut n: u32 = 0;
    for p in 0..peers {
        let mut peer = PeerUpdate::new(key(p + 100));
        peer.replace_allowed_ips = true;
        peer.preshared_key = Some(SecretKey(Zeroizing::new([0; 32])));
        peer.endpoint = Some(SocketAddr::new(
            Ipv4Addr::from(0xc000_0200 + p).into(),
            51871,
        ));
        peer.persistent_keepalive = Some(25);
        for _ in 0..ips_per_peer {
            // Alternate families so both entry sizes are exercised.
            let ip = if n % 5 == 4 {
                IpNet::new(
                    Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(n) << 64).into(),
                    64,
                )
            } else {
                IpNet::new(Ipv4Addr::from(0x0a00_0000 + (n << 8)).into(), 24)
            };
            peer.allowed_ips.push(ip.unwrap());
            n += 1;
        }
        req.peers.push(peer);
    }
    req
}

#[test]
fn five_thousand_peers_and_twenty_thousand_allowed_ips_split_under_the_limit() {
    let req = many_peers(5_000, 4);
    let per_message = check_split(&req, SET_MESSAGE_LIMIT);
    let total: usize = req.peers.iter().map(|p| p.allowed_ips.len()).sum();
    assert_eq!(total, 20_000);
    assert!(per_message.len() > 50, "{} messages", per_message.len());
    // Messages are filled: all but the last carry at least half the limit.
    let messages = serialize_all(&req, SET_MESSAGE_LIMIT);
    for bytes in &messages[..messages.len() - 1] {
        assert!(bytes.len() > SET_MESSAGE_LIMIT / 2, "{}", bytes.len());
    }
}

#[test]
fn one_peer_with_twenty_thousand_allowed_ips_continues_across_messages() {
    let req = many_peers(1, 20_000);
    let per_message = check_split(&req, SET_MESSAGE_LIMIT);
    assert!(per_message.len() > 50);
    for (i, peers) in per_message.iter().enumerate() {
        assert_eq!(peers.len(), 1, "message {i}");
        let want = if i == 0 {
            WGPEER_F_REPLACE_ALLOWEDIPS
        } else {
            0
        };
        assert_eq!(peers[0].flags, want, "message {i}");
    }
}

#[test]
fn small_limits_split_everywhere_and_an_impossible_limit_is_an_error() {
    // Removals and update-only flags repeat on continuations; replace does not.
    let mut req = many_peers(40, 7);
    req.peers[3].update_only = true;
    req.peers[5].remove = true;
    req.peers[5].allowed_ips.clear();
    for limit in [400, 512, 1000, 4096] {
        check_split(&req, limit);
    }
    let err = set_messages(IFNAME, &req, 100)
        .err()
        .expect("100 bytes cannot hold a peer");
    assert_eq!(err.limit, 100);
    assert!(err.needed > 100);
}

#[test]
fn set_messages_do_not_leak_keys_through_debug() {
    let req = many_peers(1, 1);
    let messages = set_messages(IFNAME, &req, SET_MESSAGE_LIMIT).unwrap();
    let err = KernelError::TooLarge {
        source: TooSmall {
            needed: 1,
            limit: 0,
        },
    };
    assert!(!err.to_string().contains("3, 3, 3"));
    // SetMessage has no Debug; the borrowed form used for sending redacts.
    let shown = format!("{:?}", Borrowed(messages[0].message()));
    assert!(
        shown.contains("redacted") && !shown.contains("3, 3, 3"),
        "{shown}"
    );
}

// ---- GET dumps synthesised the way the kernel writes them ----

fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut out = Vec::with_capacity((len + 3) & !3);
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize((len + 3) & !3, 0);
    out
}

fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
    nla(kind | NLA_F_NESTED, &parts.concat())
}

fn dump_message(seq: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
    let payload = attrs.concat();
    let len = 16 + 4 + payload.len();
    let mut out = Vec::new();
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&FAMILY.to_ne_bytes());
    out.extend_from_slice(&NLM_F_MULTI.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&4242u32.to_ne_bytes());
    out.extend_from_slice(&[WG_CMD_GET_DEVICE, WG_GENL_VERSION, 0, 0]);
    out.extend_from_slice(&payload);
    out
}

fn done_message(seq: u32, code: i32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&20u32.to_ne_bytes());
    out.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    out.extend_from_slice(&NLM_F_MULTI.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&4242u32.to_ne_bytes());
    out.extend_from_slice(&code.to_ne_bytes());
    out
}

fn allowed(ip: IpNet) -> Vec<u8> {
    let (family, addr) = match ip.addr() {
        IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
    };
    nested(
        0,
        &[
            nla(WGALLOWEDIP_A_FAMILY, &family.to_ne_bytes()),
            nla(WGALLOWEDIP_A_IPADDR, &addr),
            nla(WGALLOWEDIP_A_CIDR_MASK, &[ip.prefix_len()]),
        ],
    )
}

fn sockaddr_in6(addr: Ipv6Addr, port: u16) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&AF_INET6.to_ne_bytes());
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&addr.octets());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out
}

fn timespec(secs: i64, nanos: i64) -> Vec<u8> {
    [secs.to_ne_bytes(), nanos.to_ne_bytes()].concat()
}

/// Every datagram parsed as the socket would, then coalesced.
fn parse_stream(datagrams: &[Vec<u8>], seq: u32) -> Result<DeviceDump, String> {
    let mut parts = Vec::new();
    let mut done = false;
    for d in datagrams {
        for reply in netlink::parse_datagram::<GenlMessage<WireguardMessage>>(d, seq)
            .map_err(|e| e.to_string())?
        {
            match reply {
                netlink::Reply::Message(m) => parts.push(m.payload),
                netlink::Reply::Done => done = true,
                netlink::Reply::Ack => panic!("a dump is not acknowledged"),
            }
        }
    }
    assert!(done, "no NLMSG_DONE");
    parse_dump(parts).map_err(|e| e.to_string())
}

#[test]
fn a_dump_with_a_peer_continued_across_messages_is_coalesced() {
    let seq = 77;
    let big: Vec<IpNet> = (0..300u32)
        .map(|i| IpNet::new(Ipv4Addr::from(0x0a80_0000 + (i << 8)).into(), 24).unwrap())
        .collect();
    let ifindex = 12u32;
    let first = dump_message(
        seq,
        &[
            nla(WGDEVICE_A_IFINDEX, &ifindex.to_ne_bytes()),
            nla(WGDEVICE_A_IFNAME, b"wm-test0\0"),
            nla(WGDEVICE_A_PRIVATE_KEY, &[0x11; 32]),
            nla(WGDEVICE_A_PUBLIC_KEY, &[0x22; 32]),
            nla(WGDEVICE_A_LISTEN_PORT, &51871u16.to_ne_bytes()),
            nla(WGDEVICE_A_FWMARK, &0x1e7u32.to_ne_bytes()),
            nested(
                WGDEVICE_A_PEERS,
                &[
                    nested(
                        0,
                        &[
                            nla(WGPEER_A_PUBLIC_KEY, &key(1)),
                            nla(WGPEER_A_PRESHARED_KEY, &[0; 32]),
                            nla(
                                WGPEER_A_ENDPOINT,
                                &sockaddr_in6("2001:db8::1".parse().unwrap(), 51871),
                            ),
                            nla(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, &25u16.to_ne_bytes()),
                            nla(WGPEER_A_LAST_HANDSHAKE_TIME, &timespec(1_700_000_000, 5)),
                            nla(WGPEER_A_RX_BYTES, &1000u64.to_ne_bytes()),
                            nla(WGPEER_A_TX_BYTES, &2000u64.to_ne_bytes()),
                            nested(WGPEER_A_ALLOWEDIPS, &[allowed(net("10.1.0.0/16"))]),
                            nla(WGPEER_A_PROTOCOL_VERSION, &1u32.to_ne_bytes()),
                        ],
                    ),
                    nested(
                        0,
                        &[
                            nla(WGPEER_A_PUBLIC_KEY, &key(2)),
                            nla(WGPEER_A_PRESHARED_KEY, &[0x33; 32]),
                            nla(WGPEER_A_LAST_HANDSHAKE_TIME, &timespec(0, 0)),
                            nla(WGPEER_A_RX_BYTES, &0u64.to_ne_bytes()),
                            nla(WGPEER_A_TX_BYTES, &0u64.to_ne_bytes()),
                            nla(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, &0u16.to_ne_bytes()),
                            nested(
                                WGPEER_A_ALLOWEDIPS,
                                &big[..100].iter().map(|n| allowed(*n)).collect::<Vec<_>>(),
                            ),
                        ],
                    ),
                ],
            ),
        ],
    );
    // Peer 2 continues: only its key and more allowed IPs, twice; then peer 3 in the last part.
    let continued = |range: std::ops::Range<usize>| {
        dump_message(
            seq,
            &[
                nla(WGDEVICE_A_IFNAME, b"wm-test0\0"),
                nested(
                    WGDEVICE_A_PEERS,
                    &[nested(
                        0,
                        &[
                            nla(WGPEER_A_PUBLIC_KEY, &key(2)),
                            nested(
                                WGPEER_A_ALLOWEDIPS,
                                &big[range].iter().map(|n| allowed(*n)).collect::<Vec<_>>(),
                            ),
                        ],
                    )],
                ),
            ],
        )
    };
    let second = continued(100..200);
    let mut third = continued(200..300);
    // The third message also starts a new peer after the continuation.
    let peer3 = nested(
        0,
        &[
            nla(WGPEER_A_PUBLIC_KEY, &key(3)),
            nested(WGPEER_A_ALLOWEDIPS, &[allowed(net("fd00:3::/64"))]),
        ],
    );
    third = {
        let top = walk(&third[20..]);
        let mut peers = walk(&find(&top, WGDEVICE_A_PEERS).unwrap().value)
            .into_iter()
            .map(|a| nested(0, &[a.value]))
            .collect::<Vec<_>>();
        peers.push(peer3);
        dump_message(
            seq,
            &[
                nla(WGDEVICE_A_IFNAME, b"wm-test0\0"),
                nested(WGDEVICE_A_PEERS, &peers),
            ],
        )
    };
    // A stale answer to an earlier request (other sequence number) in the same datagram is
    // skipped; two messages may share a datagram.
    let stale = dump_message(seq - 1, &[nla(WGDEVICE_A_IFNAME, b"stale\0")]);
    let datagrams = vec![
        [stale, first].concat(),
        second,
        [third, done_message(seq, 0)].concat(),
    ];
    let dump = parse_stream(&datagrams, seq).unwrap();

    assert_eq!(dump.ifindex, ifindex);
    assert_eq!(dump.ifname, "wm-test0");
    assert_eq!(dump.public_key, Some([0x22; 32]));
    assert_eq!(*dump.get.private_key.as_ref().unwrap().0, [0x11; 32]);
    assert_eq!(dump.get.listen_port, 51871);
    assert_eq!(dump.get.fwmark, 0x1e7);
    let peers = &dump.get.peers;
    assert_eq!(peers.len(), 3, "{peers:?}");
    let p1 = &peers[0];
    assert_eq!(p1.public_key, key(1));
    assert!(p1.preshared_key.is_none(), "an all-zero PSK is no PSK");
    assert_eq!(p1.endpoint, Some("[2001:db8::1]:51871".parse().unwrap()));
    assert_eq!(p1.persistent_keepalive, 25);
    assert_eq!(
        p1.last_handshake,
        Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5))
    );
    assert_eq!((p1.rx_bytes, p1.tx_bytes), (1000, 2000));
    assert_eq!(p1.allowed_ips, vec![net("10.1.0.0/16")]);
    let p2 = &peers[1];
    assert_eq!(p2.public_key, key(2));
    assert_eq!(*p2.preshared_key.as_ref().unwrap().0, [0x33; 32]);
    assert_eq!(p2.last_handshake, None);
    assert_eq!(p2.allowed_ips, big, "all 300 allowed IPs, in order, once");
    assert_eq!(peers[2].public_key, key(3));
    assert_eq!(peers[2].allowed_ips, vec![net("fd00:3::/64")]);
    // Debug of the dump never shows the keys.
    let shown = format!("{dump:?}");
    assert!(
        !shown.contains("17, 17, 17") && !shown.contains("51, 51, 51"),
        "{shown}"
    );
}

#[test]
fn a_dump_ending_in_an_error_code_is_an_error() {
    let seq = 9;
    let msg = dump_message(seq, &[nla(WGDEVICE_A_IFNAME, b"wm-test0\0")]);
    let err = netlink::parse_datagram::<GenlMessage<WireguardMessage>>(
        &[msg, done_message(seq, -libc::ENODEV)].concat(),
        seq,
    )
    .unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENODEV), "{err}");
    assert!(parse_dump(Vec::new()).is_err(), "an empty dump is an error");
}

#[test]
fn a_peer_without_a_key_or_an_allowed_ip_without_a_prefix_is_rejected() {
    let no_key = dump_message(
        1,
        &[nested(
            WGDEVICE_A_PEERS,
            &[nested(0, &[nla(WGPEER_A_RX_BYTES, &1u64.to_ne_bytes())])],
        )],
    );
    let err = parse_stream(&[[no_key, done_message(1, 0)].concat()], 1).unwrap_err();
    assert!(err.contains("public key"), "{err}");
    let no_prefix = dump_message(
        1,
        &[nested(
            WGDEVICE_A_PEERS,
            &[nested(
                0,
                &[
                    nla(WGPEER_A_PUBLIC_KEY, &key(1)),
                    nested(
                        WGPEER_A_ALLOWEDIPS,
                        &[nested(
                            0,
                            &[
                                nla(WGALLOWEDIP_A_FAMILY, &AF_INET.to_ne_bytes()),
                                nla(WGALLOWEDIP_A_IPADDR, &[10, 0, 0, 0]),
                            ],
                        )],
                    ),
                ],
            )],
        )],
    );
    let err = parse_stream(&[[no_prefix, done_message(1, 0)].concat()], 1).unwrap_err();
    assert!(err.contains("allowed IP"), "{err}");
}

#[test]
fn what_we_send_the_kernel_parses_back_to_the_same_request() {
    // Our SET messages, reinterpreted as dump parts (same attribute tree), coalesce to the input:
    // a cross-check of the builder against the crate's parser, independent of the walker above.
    let req = many_peers(300, 9);
    let messages = set_messages(IFNAME, &req, 2048).unwrap();
    let parts: Vec<WireguardMessage> = messages.iter().map(|m| m.message().clone()).collect();
    let dump = parse_dump(parts).unwrap();
    let got: BTreeMap<[u8; 32], Vec<IpNet>> = dump
        .get
        .peers
        .iter()
        .map(|p| (p.public_key, p.allowed_ips.clone()))
        .collect();
    let want: BTreeMap<[u8; 32], Vec<IpNet>> = req
        .peers
        .iter()
        .map(|p| (p.public_key, p.allowed_ips.clone()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(dump.get.listen_port, 51871);
}
