use std::sync::{Arc, Mutex};

use prometheus_client::{encoding::text::encode, registry::Registry};
use wiremesh_bpf::{FlowEvent, FlowEvent6, FlowKey, FlowKey6, FlowKeyOf, FlowState};

use super::*;
use crate::history::Limits;

/// A kernel in memory: a ring of records and the backlog maps of both families; optionally it
/// writes the backlog as records right after the backlog is read (the race a request must not
/// count twice).
#[derive(Default)]
struct Fake {
    ring: Vec<FlowEvent>,
    ring6: Vec<FlowEvent6>,
    backlog: Vec<(FlowKey, FlowState)>,
    backlog6: Vec<(FlowKey6, FlowState)>,
    emit_after_backlog_read: bool,
    backlog_reads: usize,
}

struct FakeKernel(Arc<Mutex<Fake>>);

impl KernelFlows for FakeKernel {
    fn read_ready(&mut self) -> Vec<wiremesh_bpf::Flow> {
        let mut f = self.0.lock().unwrap();
        let ring = std::mem::take(&mut f.ring);
        let ring6 = std::mem::take(&mut f.ring6);
        ring.into_iter()
            .map(wiremesh_bpf::Flow::V4)
            .chain(ring6.into_iter().map(wiremesh_bpf::Flow::V6))
            .collect()
    }

    fn backlog(&self) -> Result<Backlog, String> {
        let mut f = self.0.lock().unwrap();
        f.backlog_reads += 1;
        let out = Backlog {
            v4: f.backlog.clone(),
            v6: f.backlog6.clone(),
        };
        if f.emit_after_backlog_read {
            f.emit_after_backlog_read = false;
            let moved: Vec<_> = f.backlog.drain(..).collect();
            for (k, st) in moved {
                f.ring
                    .push(event(u16::from_be_bytes(k.src_port), st.packets));
            }
            let moved: Vec<_> = f.backlog6.drain(..).collect();
            for (k, st) in moved {
                f.ring6
                    .push(event6(u16::from_be_bytes(k.src_port), st.packets));
            }
        }
        Ok(out)
    }
}

/// A record of flow 10.244.1.11:`sport` -> 10.244.2.11:7001/udp, forwarded encrypted from the
/// pod, of `packets` packets of 100 bytes.
fn event(sport: u16, packets: u64) -> FlowEvent {
    FlowEvent {
        packets,
        bytes: packets * 100,
        src_ip: [10, 244, 1, 11],
        dst_ip: [10, 244, 2, 11],
        peer_node_ip: [10, 213, 0, 12],
        src_port: sport.to_be_bytes(),
        dst_port: 7001u16.to_be_bytes(),
        protocol: 17,
        verdict: 1,
        hook: 1,
        ..FlowEvent::default()
    }
}

fn pending(sport: u16, packets: u64) -> (FlowKey, FlowState) {
    pending_at([10, 244, 1, 11], [10, 244, 2, 11], sport, packets)
}

/// `packets` packets of 100 bytes of flow `src`:`sport` -> `dst`:7001/udp (forwarded encrypted
/// from the pod) waiting in the backlog map of their family.
fn pending_at<A: Default>(src: A, dst: A, sport: u16, packets: u64) -> (FlowKeyOf<A>, FlowState) {
    (
        FlowKeyOf {
            src_ip: src,
            dst_ip: dst,
            src_port: sport.to_be_bytes(),
            dst_port: 7001u16.to_be_bytes(),
            protocol: 17,
            verdict: 1,
            hook: 1,
            ifindex: 7,
            ..FlowKeyOf::default()
        },
        FlowState {
            packets,
            bytes: packets * 100,
            ..FlowState::default()
        },
    )
}

/// Pod addresses of the IPv6 flows: 10.244.1.11's and 10.244.2.11's IPv6 twins.
const SRC6: &str = "fd00:10:244:1::b";
const DST6: &str = "fd00:10:244:2::b";

fn octets6(ip: &str) -> [u8; 16] {
    ip.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

/// [`event`] over IPv6: `SRC6`:`sport` -> `DST6`:7001/udp.
fn event6(sport: u16, packets: u64) -> FlowEvent6 {
    let e = event(sport, packets);
    FlowEvent6 {
        packets: e.packets,
        bytes: e.bytes,
        src_ip: octets6(SRC6),
        dst_ip: octets6(DST6),
        peer_node_ip: e.peer_node_ip,
        src_port: e.src_port,
        dst_port: e.dst_port,
        protocol: e.protocol,
        verdict: e.verdict,
        hook: e.hook,
        family: 6,
        ..FlowEvent6::default()
    }
}

/// [`pending`] over IPv6 (`wm_flows6`).
fn pending6(sport: u16, packets: u64) -> (FlowKey6, FlowState) {
    pending_at(octets6(SRC6), octets6(DST6), sport, packets)
}

fn packets_of(flows: &[Flow], sport: u16) -> Option<(u64, u64)> {
    flows
        .iter()
        .find(|f| f.l4.source_port() == sport)
        .map(|f| (f.packets, f.bytes))
}

fn source(history: Option<Arc<History>>) -> (FlowSource, Arc<Mutex<Fake>>, Registry) {
    let mut registry = Registry::with_prefix("wiremesh");
    let metrics = Metrics::new(&mut registry);
    let mut s = FlowSource::new(64, Duration::from_secs(300), metrics);
    if let Some(h) = history {
        s = s.with_history(h);
    }
    let fake = Arc::new(Mutex::new(Fake::default()));
    s.attach(Box::new(FakeKernel(fake.clone())));
    (s, fake, registry)
}

#[test]
fn a_request_counts_what_the_ring_and_the_backlog_hold_now() {
    let (s, fake, _) = source(None);
    // Nothing read by a reader thread yet: the first record (1 packet, as the datapath writes
    // a new flow's first packet at once) is still in the ring, 4 more wait in the backlog.
    {
        let mut f = fake.lock().unwrap();
        f.ring.push(event(41001, 1));
        f.backlog.push(pending(41001, 4));
        f.ring.push(event(41002, 3));
    }
    let flows = s.live();
    assert_eq!(packets_of(&flows, 41001), Some((5, 500)), "{flows:#?}");
    assert_eq!(packets_of(&flows, 41002), Some((3, 300)));
    let f = flows.iter().find(|f| f.l4.source_port() == 41001).unwrap();
    assert_eq!((f.pending_packets, f.pending_bytes), (4, 400));
    // Asked again: the same numbers (the backlog replaces, never adds up).
    assert_eq!(packets_of(&s.live(), 41001), Some((5, 500)));
}

/// Issue 15 leftover: an IPv6 flow's backlog (`wm_flows6`) is read at request time like an
/// IPv4 one, each added to its own flow (before, an IPv6 flow counted only its records: 1
/// packet here instead of 5).
#[test]
fn a_request_counts_the_ipv6_backlog_too() {
    let dir = tempfile::tempdir().unwrap();
    let history = Arc::new(History::open(dir.path(), Limits::default(), unix_now()).unwrap());
    let (s, fake, _) = source(Some(history));
    {
        let mut f = fake.lock().unwrap();
        f.ring6.push(event6(41601, 1));
        f.backlog6.push(pending6(41601, 4));
        // An IPv4 flow with the same ports: the families' backlogs stay apart.
        f.ring.push(event(41601, 1));
        f.backlog.push(pending(41601, 2));
    }
    let flows = s.live();
    let of = |flows: &[Flow], v6: bool| {
        flows
            .iter()
            .find(|f| f.l4.source_port() == 41601 && (f.ip.ip_version == "IPv6") == v6)
            .map(|f| (f.packets, f.bytes, f.pending_packets))
    };
    assert_eq!(of(&flows, true), Some((5, 500, 4)), "{flows:#?}");
    assert_eq!(of(&flows, false), Some((3, 300, 2)), "{flows:#?}");
    let now = unix_now();
    let (flows, _) = s.history(now - 60, now).unwrap();
    assert_eq!(of(&flows, true), Some((5, 500, 4)), "{flows:#?}");
    assert_eq!(of(&flows, false), Some((3, 300, 2)), "{flows:#?}");
}

#[test]
fn a_record_written_while_the_backlog_is_read_is_not_counted_twice() {
    let (s, fake, _) = source(None);
    {
        let mut f = fake.lock().unwrap();
        f.ring.push(event(41001, 1));
        f.backlog.push(pending(41001, 4));
        f.ring6.push(event6(41601, 1));
        f.backlog6.push(pending6(41601, 4));
        f.emit_after_backlog_read = true;
    }
    let flows = s.live();
    assert_eq!(packets_of(&flows, 41001), Some((5, 500)), "{flows:#?}");
    assert_eq!(packets_of(&flows, 41601), Some((5, 500)), "{flows:#?}");
    let f = fake.lock().unwrap();
    assert!(
        f.backlog_reads >= 2,
        "the backlog is read again after the record"
    );
}

#[test]
fn the_history_is_exact_at_request_time_without_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let history = Arc::new(History::open(dir.path(), Limits::default(), unix_now()).unwrap());
    let (s, fake, registry) = source(Some(history.clone()));
    {
        let mut f = fake.lock().unwrap();
        f.ring.push(event(41001, 1));
        f.backlog.push(pending(41001, 2));
    }
    let now = unix_now();
    let (flows, coverage) = s.history(now - 60, now).unwrap();
    assert_eq!(packets_of(&flows, 41001), Some((3, 300)), "{flows:#?}");
    assert_eq!(coverage.len(), 1);
    // What the request saw is on disk already (it survives a crash right after): nothing is
    // left to write.
    assert_eq!(history.flush(now).unwrap().written, 0);
    // A window that ends before the current bucket: the backlog (packets counted now) is not
    // part of it.
    let (flows, _) = s.history(0, now - now % BUCKET_SECS - 1).unwrap();
    assert_eq!(packets_of(&flows, 41001), None);

    // The flush writes the history and refreshes the coverage metrics: one encrypted flow.
    s.flush();
    let mut text = String::new();
    encode(&mut text, &registry).unwrap();
    assert!(text.contains("wiremesh_flow_coverage_ratio 1.0"), "{text}");
    assert!(
        text.contains("wiremesh_flow_coverage_flows{class=\"encrypted\"} 1"),
        "{text}"
    );
    // A restarted agent's coverage window starts from the history.
    drop(s);
    let (s2, _, registry2) = source(Some(history));
    s2.flush();
    let mut text = String::new();
    encode(&mut text, &registry2).unwrap();
    assert!(
        text.contains("wiremesh_flow_coverage_flows{class=\"encrypted\"} 1"),
        "{text}"
    );
}

#[test]
fn without_a_datapath_the_table_is_served_as_it_is() {
    let mut registry = Registry::default();
    let s = FlowSource::new(8, Duration::from_secs(60), Metrics::new(&mut registry));
    assert_eq!(s.drain(), 0);
    s.ingest(&[event(41001, 2)]);
    assert_eq!(packets_of(&s.live(), 41001), Some((2, 200)));
}
