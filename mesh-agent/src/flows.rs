//! The agent's flow table: flow records from the eBPF ring buffer, aggregated per flow and
//! verdict, named (pods, nodes) with what the agent knew when the record arrived, bounded in size
//! (the least recently seen flow goes first), and served as JSON on `/flows`.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::{Arc, Mutex, RwLock},
    time::SystemTime,
};

use serde::Serialize;
use wiremesh_bpf::{FlowEvent, FlowKey, FlowState, Hook, Verdict};

/// The names the agent knows for addresses: pods (`namespace/name`) and nodes (underlay IPs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names {
    /// Pod IP -> `namespace/name`.
    pub pods: BTreeMap<Ipv4Addr, String>,
    /// Node underlay IP -> node name.
    pub nodes: BTreeMap<Ipv4Addr, String>,
}

/// Names shared between the steering task (writer) and the flow reader.
pub type SharedNames = Arc<RwLock<Names>>;

/// The verdict as a stable string (the wire format of `/flows` and the metric label).
pub fn verdict_str(v: Option<Verdict>) -> &'static str {
    match v {
        Some(Verdict::ForwardedEncrypted) => "forwarded-encrypted",
        Some(Verdict::ForwardedLocal) => "forwarded-local",
        Some(Verdict::DroppedPolicy) => "dropped-policy",
        Some(Verdict::DroppedPlaintext) => "dropped-plaintext",
        Some(Verdict::ForwardedPlain) => "forwarded-plain",
        Some(Verdict::TooBig) => "too-big",
        None => "unknown",
    }
}

fn hook_str(h: Option<Hook>) -> &'static str {
    match h {
        Some(Hook::FromPod) => "from-pod",
        Some(Hook::ToPod) => "to-pod",
        Some(Hook::UnderlayIngress) => "underlay-ingress",
        Some(Hook::UnderlayEgress) => "underlay-egress",
        None => "unknown",
    }
}

fn protocol_str(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

/// One flow and verdict as `/flows` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FlowRecord {
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    /// `namespace/name` of the source pod, if it is one.
    pub src_pod: Option<String>,
    pub dst_pod: Option<String>,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: String,
    /// `forwarded-encrypted`, `forwarded-local`, `forwarded-plain`, `dropped-policy`,
    /// `dropped-plaintext`, `too-big` (above the tunnel MTU, handed to the routing stack for
    /// its PMTU error or fragmentation).
    pub verdict: &'static str,
    /// The program that decided: `from-pod`, `to-pod`, `underlay-ingress`, `underlay-egress`.
    pub hook: &'static str,
    /// The remote node (name when known, else its underlay IP).
    pub peer_node: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    /// Of `packets`/`bytes`, what the kernel counted but has not written as a record yet (a
    /// flow writes at most one record per second; an idle flow keeps the rest in `wm_flows`).
    pub pending_packets: u64,
    pub pending_bytes: u64,
    /// Unix seconds of the first and the last record.
    pub first_seen: u64,
    pub last_seen: u64,
}

type FlowId = (Ipv4Addr, Ipv4Addr, u16, u16, u8, u8, u8);

#[derive(Debug)]
struct Entry {
    record: FlowRecord,
    /// Monotonic counter of the last update, for eviction.
    touched: u64,
}

/// What one batch of records changed, for the metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ingested {
    /// New flows per verdict.
    pub new_flows: BTreeMap<&'static str, u64>,
    /// Packets per verdict.
    pub packets: BTreeMap<&'static str, u64>,
    /// Flows evicted to stay within the bound.
    pub evicted: u64,
}

/// A bounded table of flows. See the module docs.
#[derive(Debug)]
pub struct FlowTable {
    capacity: usize,
    entries: HashMap<FlowId, Entry>,
    clock: u64,
}

/// The table shared between the reader (writer) and the HTTP server.
pub type SharedFlows = Arc<Mutex<FlowTable>>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl FlowTable {
    /// An empty table holding at most `capacity` flows (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            clock: 0,
        }
    }

    /// Number of flows held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a batch of ring-buffer records.
    pub fn ingest(&mut self, events: &[FlowEvent], names: &Names) -> Ingested {
        let now = unix_now();
        let mut out = Ingested::default();
        for e in events {
            self.clock += 1;
            let verdict = verdict_str(e.verdict());
            *out.packets.entry(verdict).or_default() += e.packets;
            let id = (
                e.src(),
                e.dst(),
                e.sport(),
                e.dport(),
                e.protocol,
                e.verdict,
                e.hook,
            );
            if let Some(entry) = self.entries.get_mut(&id) {
                entry.record.packets += e.packets;
                entry.record.bytes += e.bytes;
                entry.record.last_seen = now;
                entry.touched = self.clock;
                continue;
            }
            *out.new_flows.entry(verdict).or_default() += 1;
            if self.entries.len() >= self.capacity
                && let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, v)| v.touched)
                    .map(|(k, _)| *k)
            {
                self.entries.remove(&oldest);
                out.evicted += 1;
            }
            let peer_node = e.peer_node().map(|ip| {
                names
                    .nodes
                    .get(&ip)
                    .cloned()
                    .unwrap_or_else(|| ip.to_string())
            });
            self.entries.insert(
                id,
                Entry {
                    record: FlowRecord {
                        src_ip: e.src(),
                        dst_ip: e.dst(),
                        src_pod: names.pods.get(&e.src()).cloned(),
                        dst_pod: names.pods.get(&e.dst()).cloned(),
                        src_identity: e.src_identity,
                        dst_identity: e.dst_identity,
                        src_port: e.sport(),
                        dst_port: e.dport(),
                        protocol: protocol_str(e.protocol),
                        verdict,
                        hook: hook_str(e.hook()),
                        peer_node,
                        packets: e.packets,
                        bytes: e.bytes,
                        pending_packets: 0,
                        pending_bytes: 0,
                        first_seen: now,
                        last_seen: now,
                    },
                    touched: self.clock,
                },
            );
        }
        out
    }

    /// Sets what each flow has counted in the kernel but not reported yet
    /// (`Maps::flow_backlog`); replaces the previous backlog.
    pub fn set_backlog(&mut self, backlog: &[(FlowKey, FlowState)]) {
        let mut sums: HashMap<FlowId, (u64, u64)> = HashMap::new();
        for (k, st) in backlog {
            let id = (
                Ipv4Addr::from(k.src_ip),
                Ipv4Addr::from(k.dst_ip),
                u16::from_be_bytes(k.src_port),
                u16::from_be_bytes(k.dst_port),
                k.protocol,
                k.verdict,
                k.hook,
            );
            let e = sums.entry(id).or_default();
            e.0 += st.packets;
            e.1 += st.bytes;
        }
        for (id, entry) in &mut self.entries {
            let (p, b) = sums.get(id).copied().unwrap_or_default();
            entry.record.pending_packets = p;
            entry.record.pending_bytes = b;
        }
    }

    /// Every flow, most recently updated first; `packets`/`bytes` include the backlog.
    pub fn snapshot(&self) -> Vec<FlowRecord> {
        let mut v: Vec<&Entry> = self.entries.values().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.touched));
        v.into_iter()
            .map(|e| {
                let mut r = e.record.clone();
                r.packets += r.pending_packets;
                r.bytes += r.pending_bytes;
                r
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn records_aggregate_per_flow_and_verdict_and_carry_names() {
        let mut names = Names::default();
        names
            .pods
            .insert(Ipv4Addr::new(10, 244, 1, 11), "default/a".into());
        names
            .nodes
            .insert(Ipv4Addr::new(10, 213, 0, 12), "node-2".into());
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
        assert_eq!(t.len(), 2);
        let flows = t.snapshot();
        let enc = flows
            .iter()
            .find(|f| f.verdict == "forwarded-encrypted")
            .unwrap();
        assert_eq!(enc.packets, 5);
        assert_eq!(enc.bytes, 500);
        assert_eq!(enc.src_pod.as_deref(), Some("default/a"));
        assert_eq!(enc.dst_pod, None);
        assert_eq!(enc.peer_node.as_deref(), Some("node-2"));
        assert_eq!(enc.protocol, "tcp");
        assert_eq!(enc.hook, "from-pod");
        // Most recent first.
        assert_eq!(flows[0].verdict, "dropped-policy");

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
        t.set_backlog(&[(key, state)]);
        t.set_backlog(&[(key, state)]);
        let enc = t
            .snapshot()
            .into_iter()
            .find(|f| f.verdict == "forwarded-encrypted")
            .unwrap();
        assert_eq!((enc.packets, enc.pending_packets, enc.bytes), (9, 4, 900));
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
        let ports: Vec<u16> = t.snapshot().iter().map(|f| f.dst_port).collect();
        assert_eq!(ports, vec![3, 1]);
    }
}
