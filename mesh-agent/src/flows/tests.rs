use super::*;

fn event(src: [u8; 4], dst: [u8; 4], dport: u16, verdict: u8, packets: u64) -> FlowEvent {
    FlowEvent {
        packets,
        bytes: packets * 100,
        src_ip: src,
        dst_ip: dst,
        src_identity: 256,
        dst_identity: 257,
        peer_node_ip: [10, 213, 0, 12],
        src_port: 40000u16.to_be_bytes(),
        dst_port: dport.to_be_bytes(),
        protocol: 6,
        verdict,
        hook: 1,
        ..FlowEvent::default()
    }
}

fn names() -> Names {
    let mut names = Names {
        node_name: "node-1".into(),
        ..Names::default()
    };
    names.pods.insert(
        Ipv4Addr::new(10, 244, 1, 11).into(),
        Arc::new(PodInfo {
            namespace: "default".into(),
            name: "a".into(),
            labels: vec!["k8s:app=a".to_string()].into(),
            ..PodInfo::default()
        }),
    );
    names.pods.insert(
        Ipv4Addr::new(10, 244, 2, 11).into(),
        Arc::new(PodInfo {
            namespace: "shop".into(),
            name: "db".into(),
            ingress_policies: vec!["shop/deny-all".into()],
            ..PodInfo::default()
        }),
    );
    names
        .nodes
        .insert(Ipv4Addr::new(10, 213, 0, 12).into(), "node-2".into());
    names.peers.insert(
        "node-2".into(),
        PeerInfo {
            key_fingerprint: Some("AbCdEfGh".into()),
            key_generation: Some(3),
            last_handshake: Some(1_000),
        },
    );
    names
}

#[test]
fn records_aggregate_per_flow_and_verdict_and_carry_names() {
    let names = names();
    let mut t = FlowTable::new(10);
    let got = t.ingest(
        &[
            event([10, 244, 1, 11], [10, 244, 2, 11], 80, 1, 2),
            event([10, 244, 1, 11], [10, 244, 2, 11], 80, 1, 3),
            event([10, 244, 1, 11], [10, 244, 2, 11], 81, 3, 1),
        ],
        &names,
    );
    assert_eq!(got.new_flows["forwarded-encrypted"], 1);
    assert_eq!(got.new_flows["dropped-policy"], 1);
    assert_eq!(got.packets["forwarded-encrypted"], 5);
    // One history record per event, each with that event's packets only.
    let per_event: Vec<u64> = got.records.iter().map(|r| r.packets).collect();
    assert_eq!(per_event, vec![2, 3, 1]);
    assert_eq!(t.len(), 2);
    let flows = t.snapshot();
    let enc = flows
        .iter()
        .find(|f| f.wiremesh_verdict == "forwarded-encrypted")
        .unwrap();
    assert_eq!((enc.packets, enc.bytes), (5, 500));
    assert_eq!(enc.source_name(), "default/a");
    assert_eq!(enc.source.labels, vec!["k8s:app=a".to_string()]);
    assert_eq!(enc.destination.pod_name, "db");
    assert_eq!(
        enc.l4,
        Layer4::Tcp(Ports {
            source_port: 40000,
            destination_port: 80
        })
    );
    assert_eq!(enc.hook, "from-pod");
    assert_eq!(enc.traffic_direction, "EGRESS");
    assert_eq!(enc.node_name, "node-1");
    // Most recent first.
    assert_eq!(flows[0].wiremesh_verdict, "dropped-policy");
    assert_eq!(
        flows[0].id(),
        Event::from(event([10, 244, 1, 11], [10, 244, 2, 11], 81, 3, 1)).id()
    );

    // Packets the kernel has not reported yet count too, and are replaced, not added up.
    let key = FlowKey {
        src_ip: [10, 244, 1, 11],
        dst_ip: [10, 244, 2, 11],
        src_port: 40000u16.to_be_bytes(),
        dst_port: 80u16.to_be_bytes(),
        protocol: 6,
        verdict: 1,
        hook: 1,
        ..FlowKey::default()
    };
    let state = FlowState {
        packets: 4,
        bytes: 400,
        ..FlowState::default()
    };
    let backlog = Backlog {
        v4: vec![(key, state)],
        v6: Vec::new(),
    };
    t.set_backlog(&backlog);
    t.set_backlog(&backlog);
    let enc = t
        .snapshot()
        .into_iter()
        .find(|f| f.wiremesh_verdict == "forwarded-encrypted")
        .unwrap();
    assert_eq!((enc.packets, enc.pending_packets, enc.bytes), (9, 4, 900));
}

/// `f` went through the tunnel to node-2 with the evidence of [`names`] at time 1042.
fn assert_tunnel_evidence(f: &Flow) {
    assert!(f.ip.encrypted && f.cross_node);
    let e = &f.encryption;
    assert!(e.encrypted);
    assert_eq!(e.reason, reason::TUNNEL);
    assert_eq!(e.peer_node.as_deref(), Some("node-2"));
    assert_eq!(e.peer_key_fingerprint.as_deref(), Some("AbCdEfGh"));
    assert_eq!(e.peer_key_generation, Some(3));
    assert_eq!(e.handshake_age_seconds, Some(42));
    assert_eq!(e.cipher_suite.as_deref(), Some(CIPHER_SUITE));
}

#[test]
fn encrypted_flows_carry_the_peer_key_generation_handshake_age_and_cipher() {
    let mut t = FlowTable::new(10);
    let got = t.ingest_at(
        &[event([10, 244, 1, 11], [10, 244, 2, 11], 80, 1, 1)],
        &names(),
        1_042,
    );
    let f = &got.records[0];
    assert_eq!(f.verdict, "FORWARDED");
    assert_tunnel_evidence(f);
    assert_eq!(f.time, "1970-01-01T00:17:22Z");
    let json = serde_json::to_value(f).unwrap();
    assert_eq!(json["l4"]["TCP"]["destination_port"], 80, "{json}");
    assert_eq!(json["IP"]["encrypted"], true, "{json}");
    assert_eq!(json["source"]["pod_name"], "a", "{json}");
    assert_eq!(json["Type"], "L3_L4", "{json}");
    let back: Flow = serde_json::from_value(json).unwrap();
    assert_eq!(&back, f);
}

#[test]
fn plaintext_and_dropped_flows_say_why() {
    let names = names();
    let mut t = FlowTable::new(10);
    let mut to_host = event([10, 244, 1, 11], [10, 213, 0, 12], 22, 5, 1);
    to_host.peer_node_ip = [0; 4];
    let mut local = event([10, 244, 1, 11], [10, 244, 1, 12], 80, 2, 1);
    local.peer_node_ip = [0; 4];
    let got = t.ingest_at(
        &[
            event([10, 244, 1, 11], [10, 244, 2, 11], 80, 5, 1),
            to_host,
            event([10, 244, 1, 11], [10, 244, 2, 11], 81, 4, 1),
            event([10, 244, 1, 11], [10, 244, 2, 11], 82, 3, 1),
            event([10, 244, 1, 11], [10, 244, 2, 11], 83, 6, 1),
            local,
        ],
        &names,
        2_000,
    );
    let by_port = |p: u16| {
        got.records
            .iter()
            .find(|f| f.l4.destination_port() == p)
            .unwrap()
    };
    let plain = by_port(80);
    assert_eq!(
        (
            plain.encryption.reason.as_str(),
            plain.cross_node,
            plain.verdict.as_str()
        ),
        (reason::PERMISSIVE_NO_TUNNEL, true, "FORWARDED")
    );
    assert_eq!(plain.encryption.peer_node.as_deref(), Some("node-2"));
    assert_eq!(plain.encryption.cipher_suite, None);
    assert_eq!(plain.encryption.handshake_age_seconds, None);
    let host = by_port(22);
    assert_eq!(
        (host.encryption.reason.as_str(), host.cross_node),
        (reason::EXCLUDED, false)
    );
    let strict = by_port(81);
    assert_eq!(strict.encryption.reason, reason::DROPPED_PLAINTEXT);
    assert_eq!(
        strict.drop_reason_desc.as_deref(),
        Some("UNENCRYPTED_TRAFFIC")
    );
    let denied = by_port(82);
    assert_eq!(denied.drop_reason_desc.as_deref(), Some("POLICY_DENIED"));
    assert_eq!(
        denied.ingress_denied_by,
        vec![PolicyRef {
            name: "deny-all".into(),
            namespace: "shop".into(),
            kind: "NetworkPolicy".into()
        }]
    );
    assert!(denied.egress_denied_by.is_empty());
    let big = by_port(83);
    assert_eq!(
        (big.encryption.reason.as_str(), big.ip.encrypted),
        (reason::TOO_BIG, false)
    );
    let same = got.records.last().unwrap();
    assert_eq!(
        (same.encryption.reason.as_str(), same.cross_node),
        (reason::SAME_NODE, false)
    );
}

#[test]
fn the_table_is_bounded_and_evicts_the_least_recently_seen() {
    let mut t = FlowTable::new(2);
    let names = Names::default();
    t.ingest(&[event([1, 1, 1, 1], [2, 2, 2, 2], 1, 2, 1)], &names);
    t.ingest(&[event([1, 1, 1, 1], [2, 2, 2, 2], 2, 2, 1)], &names);
    // Touch the first again: the second is now the oldest.
    t.ingest(&[event([1, 1, 1, 1], [2, 2, 2, 2], 1, 2, 1)], &names);
    let got = t.ingest(&[event([1, 1, 1, 1], [2, 2, 2, 2], 3, 2, 1)], &names);
    assert_eq!(got.evicted, 1);
    assert_eq!(t.len(), 2);
    let ports: Vec<u16> = t
        .snapshot()
        .iter()
        .map(|f| f.l4.destination_port())
        .collect();
    assert_eq!(ports, vec![3, 1]);
}

/// An IPv6 record of `src` -> `dst` (`fd00:10:244:<n>::11`, pods on node <n>) seen from the pod
/// on node-1, crossing to node-2 over the IPv4 underlay.
fn event6(src: u16, dst: u16, protocol: u8, dport: u16, verdict: u8) -> FlowEvent6 {
    FlowEvent6 {
        packets: 2,
        bytes: 240,
        src_ip: pod6(src).octets(),
        dst_ip: pod6(dst).octets(),
        src_identity: 256,
        dst_identity: 257,
        peer_node_ip: [10, 213, 0, 12],
        src_port: 40000u16.to_be_bytes(),
        dst_port: dport.to_be_bytes(),
        protocol,
        verdict,
        hook: 1,
        family: 6,
        ..FlowEvent6::default()
    }
}

fn pod6(node: u16) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0xfd00, 0x10, 0x244, node, 0, 0, 0, 0x11)
}

/// The dual-stack names: each pod of [`names`] also has its IPv6 address.
fn names6() -> Names {
    let mut names = names();
    for (node, v4) in [(1, [10, 244, 1, 11]), (2, [10, 244, 2, 11])] {
        let pod = names.pods[&IpAddr::from(v4)].clone();
        names.pods.insert(pod6(node).into(), pod);
    }
    names
}

#[test]
fn ipv6_records_become_flows_with_names_and_encryption_evidence() {
    let names = names6();
    let mut t = FlowTable::new(10);
    let got = t.ingest_at(
        &[
            wiremesh_bpf::Flow::V6(event6(1, 2, 6, 80, 1)),
            // The same ports over IPv4: another flow.
            wiremesh_bpf::Flow::V4(event([10, 244, 1, 11], [10, 244, 2, 11], 80, 1, 1)),
            wiremesh_bpf::Flow::V6(event6(1, 2, 58, 0, 4)),
        ],
        &names,
        1_042,
    );
    assert_eq!(t.len(), 3);
    assert_eq!(got.new_flows["forwarded-encrypted"], 2);
    let enc = &got.records[0];
    assert_eq!(enc.ip.source, IpAddr::from(pod6(1)));
    assert_eq!(enc.ip.destination, IpAddr::from(pod6(2)));
    assert_eq!(enc.ip.ip_version, "IPv6");
    assert_eq!(
        (enc.source_name(), enc.destination_name()),
        ("default/a".to_string(), "shop/db".to_string())
    );
    assert_eq!(enc.source.labels, vec!["k8s:app=a".to_string()]);
    assert_tunnel_evidence(enc);
    assert_eq!(got.records[1].ip.ip_version, "IPv4");
    assert_ne!(got.records[1].five_tuple(), enc.five_tuple());
    // Strict: cross-node IPv6 outside the tunnel is dropped and says so.
    let dropped = &got.records[2];
    assert_eq!(dropped.l4, Layer4::Icmpv6 {});
    assert_eq!(dropped.l4.protocol(), "icmpv6");
    assert_eq!(dropped.verdict, "DROPPED");
    assert_eq!(dropped.encryption.reason, reason::DROPPED_PLAINTEXT);
    assert_eq!(dropped.encryption.peer_node.as_deref(), Some("node-2"));
    assert_eq!(FlowClass::of(dropped), FlowClass::Dropped);
    assert_eq!(dropped.id().4, 58);
    // The JSON keeps Hubble's string form of the addresses and reads back.
    let json = serde_json::to_value(enc).unwrap();
    assert_eq!(json["IP"]["source"], "fd00:10:244:1::11", "{json}");
    assert_eq!(json["IP"]["ipVersion"], "IPv6", "{json}");
    let back: Flow = serde_json::from_value(json).unwrap();
    assert_eq!(&back, enc);
    let json = serde_json::to_value(dropped).unwrap();
    assert!(json["l4"].get("ICMPv6").is_some(), "{json}");
    let back: Flow = serde_json::from_value(json).unwrap();
    assert_eq!(&back, dropped);
    // Aggregated per flow like IPv4.
    t.ingest_at(&[event6(1, 2, 6, 80, 1)], &names, 1_043);
    let snap = t.snapshot();
    assert_eq!(
        (snap[0].packets, snap[0].ip.ip_version.as_str()),
        (4, "IPv6")
    );
}
