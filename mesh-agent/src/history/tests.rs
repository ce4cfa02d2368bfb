use std::net::Ipv4Addr;

use wiremesh_bpf::FlowEvent;

use super::*;
use crate::flows::{FlowTable, Names};

fn records(dport: u16, packets: u64, now: u64) -> Vec<Flow> {
    let e = FlowEvent {
        packets,
        bytes: packets * 100,
        src_ip: [10, 244, 1, 11],
        dst_ip: [10, 244, 2, 11],
        peer_node_ip: [10, 213, 0, 12],
        src_port: 40000u16.to_be_bytes(),
        dst_port: dport.to_be_bytes(),
        protocol: 6,
        verdict: 1,
        hook: 1,
        ..FlowEvent::default()
    };
    FlowTable::new(16)
        .ingest_at(&[e], &Names::default(), now)
        .records
}

const T0: u64 = 1_800_000_000;

#[test]
fn records_aggregate_per_bucket_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::open(dir.path(), Limits::default(), T0).unwrap();
    h.add(&records(80, 2, T0 + 1));
    h.add(&records(80, 3, T0 + 5));
    h.add(&records(81, 1, T0 + 7));
    let done = h.flush(T0 + 10).unwrap();
    assert_eq!((done.written, done.records), (2, 2));
    // A later bucket of the same flow is its own record, merged again by the query.
    h.add(&records(80, 4, T0 + BUCKET_SECS + 1));
    h.flush(T0 + BUCKET_SECS + 2).unwrap();
    drop(h);

    let h = History::open(dir.path(), Limits::default(), T0 + 500).unwrap();
    let flows = h.query(T0, T0 + 1000).unwrap();
    assert_eq!(flows.len(), 2, "{flows:#?}");
    let f80 = flows
        .iter()
        .find(|f| f.l4.destination_port() == 80)
        .unwrap();
    assert_eq!((f80.packets, f80.bytes), (9, 900));
    assert_eq!(
        (f80.first_seen, f80.last_seen),
        (T0 + 1, T0 + BUCKET_SECS + 1)
    );
    // A window that covers only the second bucket sees only its packets.
    let later = h.query(T0 + BUCKET_SECS, T0 + 1000).unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].packets, 4);
    // Before the data: nothing.
    assert!(h.query(T0 - 1000, T0 - 100).unwrap().is_empty());
    // Two recording periods: the first process's and the reopened one.
    h.flush(T0 + 600).unwrap();
    let cov = h.coverage(T0, T0 + 1000).unwrap();
    assert_eq!(
        cov,
        vec![
            Period {
                from: T0,
                to: T0 + BUCKET_SECS + 2
            },
            Period {
                from: T0 + 500,
                to: T0 + 600
            }
        ]
    );
}

#[test]
fn retention_and_the_size_bound_delete_the_oldest_records_and_count_them() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        retention: Duration::from_secs(3600),
        max_records: 3,
    };
    let h = History::open(dir.path(), limits, T0).unwrap();
    for i in 0..4u64 {
        h.add(&records(80 + i as u16, 1, T0 + i * BUCKET_SECS));
    }
    let done = h.flush(T0 + 4 * BUCKET_SECS).unwrap();
    assert_eq!((done.written, done.evicted, done.records), (4, 1, 3));
    let ports: Vec<u16> = h
        .query(T0, T0 + 3600)
        .unwrap()
        .iter()
        .map(|f| f.l4.destination_port())
        .collect();
    assert_eq!(ports, vec![83, 82, 81], "the oldest bucket went first");

    // Two hours later the retention removes what is older than an hour.
    h.add(&records(90, 1, T0 + 7200));
    let done = h.flush(T0 + 7200).unwrap();
    assert_eq!((done.expired, done.records), (3, 1));
    assert!(
        h.coverage(T0, T0 + 7200)
            .unwrap()
            .iter()
            .all(|p| p.to >= T0 + 3600)
    );
}

#[test]
fn an_unreadable_record_is_an_error_not_a_silent_gap() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::open(dir.path(), Limits::default(), T0).unwrap();
    h.write(|flows, _| {
        flows.insert(
            key(
                T0,
                &(
                    Ipv4Addr::LOCALHOST.into(),
                    Ipv4Addr::LOCALHOST.into(),
                    1,
                    2,
                    6,
                    1,
                    1,
                ),
            )
            .as_slice(),
            b"not json".as_slice(),
        )?;
        Ok(())
    })
    .unwrap();
    let err = h.query(T0, T0 + 60).unwrap_err().to_string();
    assert!(err.contains("decode"), "{err}");
}

#[test]
fn a_query_counts_records_not_flushed_yet() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::open(dir.path(), Limits::default(), T0).unwrap();
    h.add(&records(80, 2, T0 + 1));
    h.flush(T0 + 2).unwrap();
    // Queued after the last flush: counted at once, merged with what is on disk.
    h.add(&records(80, 3, T0 + 3));
    h.add(&records(81, 1, T0 + 3));
    let flows = h.query(T0, T0 + 10).unwrap();
    let packets = |port| {
        flows
            .iter()
            .find(|f| f.l4.destination_port() == port)
            .map(|f| f.packets)
    };
    assert_eq!((packets(80), packets(81)), (Some(5), Some(1)), "{flows:#?}");
    // Outside the window: not counted.
    assert!(
        h.query(T0 + 2 * BUCKET_SECS, T0 + 3 * BUCKET_SECS)
            .unwrap()
            .is_empty()
    );
    // Flushing changes nothing in the answer.
    h.flush(T0 + 4).unwrap();
    assert_eq!(h.query(T0, T0 + 10).unwrap(), flows);
}

/// A record of an IPv6 flow fd00:10:244:1::11:40000 -> fd00:10:244:2::11:`dport`/tcp, forwarded
/// encrypted to node-2.
fn records6(dport: u16, packets: u64, now: u64) -> Vec<Flow> {
    let e = wiremesh_bpf::FlowEvent6 {
        packets,
        bytes: packets * 100,
        src_ip: "fd00:10:244:1::11"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
        dst_ip: "fd00:10:244:2::11"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
        peer_node_ip: [10, 213, 0, 12],
        src_port: 40000u16.to_be_bytes(),
        dst_port: dport.to_be_bytes(),
        protocol: 6,
        verdict: 1,
        hook: 1,
        family: 6,
        ..wiremesh_bpf::FlowEvent6::default()
    };
    FlowTable::new(16)
        .ingest_at(&[e], &Names::default(), now)
        .records
}

#[test]
fn ipv6_records_round_trip_next_to_ipv4_ones() {
    let dir = tempfile::tempdir().unwrap();
    let h = History::open(dir.path(), Limits::default(), T0).unwrap();
    h.add(&records6(80, 2, T0 + 1));
    h.add(&records6(80, 3, T0 + 2));
    h.add(&records(80, 1, T0 + 3));
    let done = h.flush(T0 + 4).unwrap();
    assert_eq!((done.written, done.records), (2, 2));
    drop(h);
    let h = History::open(dir.path(), Limits::default(), T0 + 10).unwrap();
    let flows = h.query(T0, T0 + 60).unwrap();
    assert_eq!(flows.len(), 2, "{flows:#?}");
    let v6 = flows.iter().find(|f| f.ip.ip_version == "IPv6").unwrap();
    assert_eq!(v6.ip.source.to_string(), "fd00:10:244:1::11");
    assert_eq!(v6.ip.destination.to_string(), "fd00:10:244:2::11");
    assert_eq!((v6.packets, v6.bytes), (5, 500));
    assert_eq!(v6.encryption.peer_node.as_deref(), Some("10.213.0.12"));
    let v4 = flows.iter().find(|f| f.ip.ip_version == "IPv4").unwrap();
    assert_eq!(v4.packets, 1);
}

#[test]
fn ipv4_keys_and_records_keep_what_older_agents_wrote() {
    // The key layout before IPv6 flows: bucket, 4 + 4 address bytes, ports, proto/verdict/hook.
    let id = records(80, 1, T0)[0].id();
    let mut old = T0.to_be_bytes().to_vec();
    old.extend_from_slice(&[10, 244, 1, 11, 10, 244, 2, 11]);
    old.extend_from_slice(&40000u16.to_be_bytes());
    old.extend_from_slice(&80u16.to_be_bytes());
    old.extend_from_slice(&[6, 1, 1]);
    assert_eq!(key(T0, &id), old);
    assert_eq!(key(T0, &records6(80, 1, T0)[0].id()).len(), 47);
    // A record as an older agent stored it (addresses as IPv4 strings) merges with a new one.
    let dir = tempfile::tempdir().unwrap();
    let h = History::open(dir.path(), Limits::default(), T0).unwrap();
    let json = serde_json::to_string(&records(80, 2, T0 + 1)[0]).unwrap();
    assert!(
        json.contains(
            r#""IP":{"source":"10.244.1.11","destination":"10.244.2.11","ipVersion":"IPv4""#
        ),
        "{json}"
    );
    h.write(|flows, _| {
        flows.insert(old.as_slice(), json.as_bytes())?;
        Ok(())
    })
    .unwrap();
    h.add(&records(80, 3, T0 + 5));
    let done = h.flush(T0 + 6).unwrap();
    assert_eq!(done.records, 1);
    let flows = h.query(T0, T0 + 60).unwrap();
    assert_eq!((flows.len(), flows[0].packets), (1, 5), "{flows:#?}");
}
