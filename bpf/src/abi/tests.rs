//! The mirrors produce exactly the bytes the policy compiler documents.

use std::net::IpAddr;

use ipnet::IpNet;
use wiremesh_policy::{CidrEntry, Direction, Identity, IsolationKey, Protocol, RuleKey};

use super::*;

fn bytes<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: only used on the #[repr(C)] Pod types of this module, which have no holes.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

#[test]
fn rule_key_matches_policy_bytes() {
    for (port, len) in [(0u16, 0u8), (8080, 16), (0x8000, 1), (443, 16)] {
        let k = RuleKey {
            subject: Identity(300),
            direction: Direction::Egress,
            protocol: Protocol::Udp,
            peer: Identity((1 << 24) + 7),
            port,
            port_prefix_len: len,
        };
        assert_eq!(bytes(&rule_key(&k)), k.to_bytes().to_vec(), "{k:?}");
    }
}

#[test]
fn isolation_key_matches_policy_bytes() {
    let k = IsolationKey {
        identity: Identity(257),
        direction: Direction::Ingress,
    };
    assert_eq!(bytes(&IsolationKeyRaw::from(&k)), k.to_bytes().to_vec());
}

#[test]
fn cidr_key_matches_policy_bytes_and_rejects_ipv6() {
    let e = CidrEntry {
        prefix: "10.1.0.0/16".parse().unwrap(),
        identity: Identity((1 << 24) + 1),
    };
    let (key, id) = cidr_entry(&e).unwrap();
    assert_eq!(bytes(&key), e.key_bytes());
    assert_eq!(id, (1 << 24) + 1);
    assert_eq!(lpm4_net(&key), Some("10.1.0.0/16".parse().unwrap()));
    let v6: IpNet = "fd00::/8".parse().unwrap();
    let e6 = CidrEntry {
        prefix: v6,
        identity: Identity::WORLD,
    };
    assert!(matches!(cidr_entry(&e6), Err(AbiError::Ipv6(p)) if p == v6));
    assert!(endpoint_net("fd00::1".parse::<IpAddr>().unwrap()).is_err());
}

#[test]
fn flow_event_decodes_and_rejects_wrong_size() {
    let e = FlowEvent {
        ts_ns: 5,
        packets: 2,
        bytes: 120,
        src_ip: [10, 0, 0, 1],
        dst_ip: [10, 0, 1, 1],
        src_identity: 256,
        dst_identity: 257,
        peer_node_ip: [192, 168, 0, 2],
        ifindex: 4,
        src_port: 40000u16.to_be_bytes(),
        dst_port: 80u16.to_be_bytes(),
        protocol: 6,
        verdict: 3,
        hook: 1,
        pad: 0,
    };
    let b = bytes(&e);
    let d = FlowEvent::from_bytes(&b).unwrap();
    assert_eq!(d, e);
    assert_eq!(d.verdict(), Some(Verdict::DroppedPolicy));
    assert_eq!(d.hook(), Some(Hook::FromPod));
    assert_eq!((d.sport(), d.dport()), (40000, 80));
    assert_eq!(d.peer_node(), Some("192.168.0.2".parse().unwrap()));
    assert!(FlowEvent::from_bytes(&b[..55]).is_none());
    assert_eq!(FlowEvent { verdict: 9, ..e }.verdict(), None);
}

#[test]
fn config_new_marks_the_entry_set_and_timeouts_are_whole_seconds() {
    let c = Config::new(7, Mode::Strict, 1, 51820);
    assert_eq!(c.flags, config_flags::SET);
    assert_eq!(
        (c.ct_tcp_timeout_s, c.ct_other_timeout_s),
        (0, 0),
        "0 = defaults"
    );
    assert_eq!(
        Config::default().flags,
        0,
        "a never-written entry reads as unset"
    );
    let t = c.with_ct_timeouts(Duration::from_millis(300), Duration::from_secs(90));
    assert_eq!((t.ct_tcp_timeout_s, t.ct_other_timeout_s), (1, 90));
    assert_eq!((t.tunnel_ifindex, t.mode, t.wg_port), (7, 1, 51820));
}

#[test]
fn lpm6_keys_round_trip() {
    let net: Ipv6Net = "fd00:201:9::1/64".parse().expect("net");
    let k = lpm6_key(net);
    assert_eq!(k.prefix_len(), 64);
    assert_eq!(lpm6_net(&k), Some(net.trunc()));
    let ep = EndpointValue::new(None, Some("fd00::5".parse().expect("v6")));
    assert_eq!(ep.ip4, [0; 4]);
    assert_eq!(ep.ip6[15], 5);
}

#[test]
fn flow_records_are_told_apart_by_size_and_family() {
    let v4 = FlowEvent {
        verdict: 2,
        ..FlowEvent::default()
    };
    let mut v6 = FlowEvent6 {
        src_ip: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        src_port: 7777u16.to_be_bytes(),
        verdict: 4,
        hook: 3,
        family: 6,
        ..FlowEvent6::default()
    };
    assert_eq!(Flow::from_bytes(&bytes(&v4)), Some(Flow::V4(v4)));
    let f = Flow::from_bytes(&bytes(&v6));
    assert_eq!(f, Some(Flow::V6(v6)));
    assert_eq!(v6.src(), "fd00::1".parse::<Ipv6Addr>().expect("v6"));
    assert_eq!(
        (v6.sport(), v6.verdict(), v6.hook()),
        (
            7777,
            Some(Verdict::DroppedPlaintext),
            Some(Hook::UnderlayIngress)
        )
    );
    v6.family = 4;
    assert_eq!(Flow::from_bytes(&bytes(&v6)), None, "wrong family");
    assert_eq!(Flow::from_bytes(&[0u8; 57]), None, "unknown size");
}
