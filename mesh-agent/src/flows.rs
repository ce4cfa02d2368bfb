//! The agent's flow table: flow records from the eBPF ring buffer, aggregated per flow and
//! verdict, named (pods, nodes) and annotated with the encryption evidence the agent had when the
//! record arrived (peer node, its key fingerprint and generation, the session's handshake age, the
//! cipher suite; or why the flow was not encrypted), bounded in size (the least recently seen flow
//! goes first), and served as JSON in the shape of Hubble's flow schema (`flow.proto`: `time`,
//! `verdict`, `drop_reason_desc`, `IP`, `l4`, `source`/`destination` endpoints, `node_name`,
//! `traffic_direction`, `*_denied_by`), extended with an `encryption` object and counters.
//! Both address families: IPv4 and IPv6 records of the ring buffer ([`Event`]) become the same
//! [`Flow`] (`IP.ipVersion` tells them apart; the peer node is the IPv4 underlay either way).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex, RwLock},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use wiremesh_bpf::{FlowEvent, FlowEvent6, FlowKey, FlowKey6, FlowKeyOf, FlowState, Hook, Verdict};

/// The cipher suite of every WireGuard session (the only one the protocol has).
pub const CIPHER_SUITE: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";

/// What the agent knows about a pod address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// `k8s:key=value`, as Hubble writes pod labels; shared by the pods of one label set.
    pub labels: Arc<[String]>,
    /// NetworkPolicies (`namespace/name`) that isolate the pod for ingress / egress: when a
    /// packet to / from it is dropped by policy, these are the policies that left it unallowed.
    pub ingress_policies: Vec<String>,
    pub egress_policies: Vec<String>,
}

/// What the agent knows about a peer node's tunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// Fingerprint of the peer key configured on the device.
    pub key_fingerprint: Option<String>,
    /// The peer's `wiremesh.io/key-generation`.
    pub key_generation: Option<u64>,
    /// Unix seconds of the session's last handshake.
    pub last_handshake: Option<u64>,
}

/// The names and evidence the agent knows for addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names {
    /// This node.
    pub node_name: String,
    /// Pod IP (both families) -> pod.
    /// One shared record per pod, under each of its addresses.
    pub pods: BTreeMap<IpAddr, Arc<PodInfo>>,
    /// Node IP (both families; records name the peer by its IPv4 underlay) -> node name.
    pub nodes: BTreeMap<IpAddr, String>,
    /// Node name -> tunnel evidence.
    pub peers: BTreeMap<String, PeerInfo>,
}

/// Names shared between the steering task (writer) and the flow reader.
pub type SharedNames = Arc<RwLock<Names>>;

/// The datapath verdict as a stable string (the metric label and `wiremesh_verdict`).
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

/// Why a flow was or was not encrypted (`encryption.reason`).
pub mod reason {
    /// Sent into (or received from) a WireGuard session with the peer node.
    pub const TUNNEL: &str = "wireguard-tunnel";
    /// Both pods on this node: never left the node.
    pub const SAME_NODE: &str = "same-node";
    /// Cross-node pod traffic without a tunnel to the peer, passed in plaintext (Permissive).
    pub const PERMISSIVE_NO_TUNNEL: &str = "permissive-no-tunnel";
    /// Not pod-to-pod traffic between nodes (host, service or external peer): out of scope.
    pub const EXCLUDED: &str = "excluded-not-pod-to-pod";
    /// Cross-node pod traffic outside WireGuard, dropped (Strict).
    pub const DROPPED_PLAINTEXT: &str = "dropped-plaintext-strict";
    /// Dropped by NetworkPolicy (or a spoofed source).
    pub const DROPPED_POLICY: &str = "dropped-policy";
    /// Above the tunnel MTU: handed to the routing stack (PMTU error or fragmented into the
    /// tunnel); not claimed as encrypted.
    pub const TOO_BIG: &str = "too-big";
    /// A verdict this build does not know.
    pub const UNKNOWN: &str = "unknown";
}

/// Hubble's `Endpoint`, the fields wiremesh knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub identity: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

/// Hubble's `IP` (addresses as strings, either family).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ip {
    pub source: IpAddr,
    pub destination: IpAddr,
    /// `IPv4` or `IPv6`.
    #[serde(rename = "ipVersion")]
    pub ip_version: String,
    pub encrypted: bool,
}

/// Ports of Hubble's `TCP`/`UDP`/`SCTP` layer-4 messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    pub source_port: u16,
    pub destination_port: u16,
}

/// Hubble's `Layer4` (one of).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layer4 {
    #[serde(rename = "TCP")]
    Tcp(Ports),
    #[serde(rename = "UDP")]
    Udp(Ports),
    #[serde(rename = "SCTP")]
    Sctp(Ports),
    #[serde(rename = "ICMPv4")]
    Icmpv4 {},
    #[serde(rename = "ICMPv6")]
    Icmpv6 {},
    /// Another IP protocol, by number.
    #[serde(rename = "protocol")]
    Other(u8),
}

impl Layer4 {
    fn new(protocol: u8, source_port: u16, destination_port: u16) -> Self {
        let ports = Ports {
            source_port,
            destination_port,
        };
        match protocol {
            1 => Self::Icmpv4 {},
            58 => Self::Icmpv6 {},
            6 => Self::Tcp(ports),
            17 => Self::Udp(ports),
            132 => Self::Sctp(ports),
            n => Self::Other(n),
        }
    }

    /// The destination port (0 without one).
    pub fn destination_port(&self) -> u16 {
        match self {
            Self::Tcp(p) | Self::Udp(p) | Self::Sctp(p) => p.destination_port,
            _ => 0,
        }
    }

    /// The source port (0 without one).
    pub fn source_port(&self) -> u16 {
        match self {
            Self::Tcp(p) | Self::Udp(p) | Self::Sctp(p) => p.source_port,
            _ => 0,
        }
    }

    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6` or the protocol number.
    pub fn protocol(&self) -> String {
        match self {
            Self::Tcp(_) => "tcp".into(),
            Self::Udp(_) => "udp".into(),
            Self::Sctp(_) => "sctp".into(),
            Self::Icmpv4 {} => "icmp".into(),
            Self::Icmpv6 {} => "icmpv6".into(),
            Self::Other(n) => n.to_string(),
        }
    }
}

/// Hubble's `Policy` (as in `ingress_denied_by`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    pub name: String,
    pub namespace: String,
    pub kind: String,
}

/// Why wiremesh believes the flow was (not) encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    pub encrypted: bool,
    /// One of [`reason`].
    pub reason: String,
    /// The other node of a cross-node pod flow (name when known, else its underlay IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_node: Option<String>,
    /// Fingerprint of the peer's public key configured on the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_key_fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_key_generation: Option<u64>,
    /// Seconds since the session's last handshake when the flow was first recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_age_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher_suite: Option<String>,
}

/// One flow and datapath verdict, in Hubble's field names where Hubble has one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// RFC 3339 time of the last record.
    pub time: String,
    /// `FORWARDED` or `DROPPED`.
    pub verdict: String,
    /// Hubble's drop reason name (`POLICY_DENIED`, `UNENCRYPTED_TRAFFIC`, `FRAG_NEEDED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason_desc: Option<String>,
    #[serde(rename = "IP")]
    pub ip: Ip,
    pub l4: Layer4,
    pub source: Endpoint,
    pub destination: Endpoint,
    /// The node that observed the flow.
    pub node_name: String,
    /// `EGRESS` (seen leaving a pod) or `INGRESS` (seen arriving at a pod or on the underlay).
    pub traffic_direction: String,
    #[serde(rename = "Type")]
    pub flow_type: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_denied_by: Vec<PolicyRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_denied_by: Vec<PolicyRef>,
    pub encryption: Encryption,
    /// The datapath's own verdict: `forwarded-encrypted`, `forwarded-local`, `forwarded-plain`,
    /// `dropped-policy`, `dropped-plaintext`, `too-big`.
    pub wiremesh_verdict: String,
    /// The program that decided: `from-pod`, `to-pod`, `underlay-ingress`, `underlay-egress`.
    pub hook: String,
    /// Pod-to-pod traffic between two nodes (the scope of encryption).
    pub cross_node: bool,
    pub packets: u64,
    pub bytes: u64,
    /// Of `packets`/`bytes`, what the kernel counted but has not written as a record yet (a
    /// flow writes at most one record per second; an idle flow keeps the rest in `wm_flows`).
    #[serde(default)]
    pub pending_packets: u64,
    #[serde(default)]
    pub pending_bytes: u64,
    /// Unix seconds of the first and the last record.
    pub first_seen: u64,
    pub last_seen: u64,
}

/// The identity of a flow and verdict: (src, dst, sport, dport, protocol, verdict, hook).
pub type FlowId = (IpAddr, IpAddr, u16, u16, u8, u8, u8);

/// One direction of one 5-tuple (src, dst, sport, dport, protocol): what the compliance report
/// and the coverage metric count as *a flow*, however many records (verdicts, hooks, nodes)
/// saw it.
pub type FiveTuple = (IpAddr, IpAddr, u16, u16, u8);

/// How a flow counts for encryption coverage, in increasing precedence: a flow is the
/// greatest class of any of its records (one dropped record makes it dropped; otherwise one
/// plaintext cross-node record makes it plaintext).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FlowClass {
    /// Not pod-to-pod between two nodes (same node, host, external): out of scope.
    Other,
    /// Cross-node pod traffic through a WireGuard session.
    Encrypted,
    /// Cross-node pod traffic not encrypted (and not dropped).
    Plaintext,
    /// Dropped (by policy, Strict mode, too big).
    Dropped,
}

impl FlowClass {
    /// Every class, in order.
    pub const ALL: [FlowClass; 4] = [Self::Other, Self::Encrypted, Self::Plaintext, Self::Dropped];

    /// The class of one record.
    pub fn of(record: &Flow) -> Self {
        if record.dropped() {
            Self::Dropped
        } else if !record.cross_node {
            Self::Other
        } else if record.encryption.encrypted {
            Self::Encrypted
        } else {
            Self::Plaintext
        }
    }

    /// The class of a flow from all its records (`Other` without records).
    pub fn of_records<'a>(records: impl IntoIterator<Item = &'a Flow>) -> Self {
        records
            .into_iter()
            .map(Self::of)
            .max()
            .unwrap_or(Self::Other)
    }

    /// The metric label: `other`, `encrypted`, `plaintext`, `dropped`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Other => "other",
            Self::Encrypted => "encrypted",
            Self::Plaintext => "plaintext",
            Self::Dropped => "dropped",
        }
    }
}

impl Flow {
    /// The flow's id (what the table aggregates by).
    pub fn id(&self) -> FlowId {
        let verdict = VERDICTS
            .iter()
            .position(|v| *v == self.wiremesh_verdict)
            .map_or(0, |i| i as u8 + 1);
        let hook = HOOKS
            .iter()
            .position(|h| *h == self.hook)
            .map_or(0, |i| i as u8 + 1);
        let protocol = match &self.l4 {
            Layer4::Tcp(_) => 6,
            Layer4::Udp(_) => 17,
            Layer4::Sctp(_) => 132,
            Layer4::Icmpv4 {} => 1,
            Layer4::Icmpv6 {} => 58,
            Layer4::Other(n) => *n,
        };
        (
            self.ip.source,
            self.ip.destination,
            self.l4.source_port(),
            self.l4.destination_port(),
            protocol,
            verdict,
            hook,
        )
    }

    /// The flow's 5-tuple (what the report and the coverage count as one flow).
    pub fn five_tuple(&self) -> FiveTuple {
        let (src, dst, sport, dport, proto, _, _) = self.id();
        (src, dst, sport, dport, proto)
    }

    /// The source as `namespace/pod` (or its IP when it is not a pod).
    pub fn source_name(&self) -> String {
        endpoint_name(&self.source, self.ip.source)
    }

    /// The destination as `namespace/pod` (or its IP when it is not a pod).
    pub fn destination_name(&self) -> String {
        endpoint_name(&self.destination, self.ip.destination)
    }

    /// Whether the flow was dropped.
    pub fn dropped(&self) -> bool {
        self.verdict == "DROPPED"
    }
}

fn endpoint_name(e: &Endpoint, ip: IpAddr) -> String {
    if e.pod_name.is_empty() {
        ip.to_string()
    } else {
        format!("{}/{}", e.namespace, e.pod_name)
    }
}

/// Datapath verdicts in `WM_VERDICT_*` order (1-based).
const VERDICTS: [&str; 6] = [
    "forwarded-encrypted",
    "forwarded-local",
    "dropped-policy",
    "dropped-plaintext",
    "forwarded-plain",
    "too-big",
];
/// Hooks in `WM_HOOK_*` order (1-based).
const HOOKS: [&str; 4] = ["from-pod", "to-pod", "underlay-ingress", "underlay-egress"];

/// RFC 3339 (UTC) of Unix seconds.
pub fn rfc3339(unix: u64) -> String {
    jiff::Timestamp::from_second(i64::try_from(unix).unwrap_or(i64::MAX))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn policy_refs(keys: &[String]) -> Vec<PolicyRef> {
    keys.iter()
        .map(|k| {
            let (namespace, name) = k.split_once('/').unwrap_or(("", k));
            PolicyRef {
                name: name.to_string(),
                namespace: namespace.to_string(),
                kind: "NetworkPolicy".to_string(),
            }
        })
        .collect()
}

fn endpoint(names: &Names, ip: IpAddr, identity: u32) -> Endpoint {
    match names.pods.get(&ip) {
        Some(p) => Endpoint {
            identity,
            namespace: p.namespace.clone(),
            pod_name: p.name.clone(),
            labels: p.labels.to_vec(),
        },
        None => Endpoint {
            identity,
            ..Endpoint::default()
        },
    }
}

/// A ring-buffer record of either family ([`FlowEvent`], [`FlowEvent6`]) as the flow table
/// reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// `WM_VERDICT_*` and `WM_HOOK_*` as written (part of the [`FlowId`]).
    pub verdict: u8,
    pub hook: u8,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The remote node's IPv4 underlay (records of both families carry it).
    pub peer_node: Option<Ipv4Addr>,
    pub packets: u64,
    pub bytes: u64,
    known_verdict: Option<Verdict>,
    known_hook: Option<Hook>,
}

macro_rules! event_from {
    ($t:ty) => {
        impl From<$t> for Event {
            fn from(e: $t) -> Self {
                Self {
                    src: e.src().into(),
                    dst: e.dst().into(),
                    sport: e.sport(),
                    dport: e.dport(),
                    protocol: e.protocol,
                    verdict: e.verdict,
                    hook: e.hook,
                    src_identity: e.src_identity,
                    dst_identity: e.dst_identity,
                    peer_node: e.peer_node(),
                    packets: e.packets,
                    bytes: e.bytes,
                    known_verdict: e.verdict(),
                    known_hook: e.hook(),
                }
            }
        }
    };
}

event_from!(FlowEvent);
event_from!(FlowEvent6);

impl From<wiremesh_bpf::Flow> for Event {
    fn from(f: wiremesh_bpf::Flow) -> Self {
        match f {
            wiremesh_bpf::Flow::V4(e) => e.into(),
            wiremesh_bpf::Flow::V6(e) => e.into(),
        }
    }
}

impl Event {
    fn id(&self) -> FlowId {
        (
            self.src,
            self.dst,
            self.sport,
            self.dport,
            self.protocol,
            self.verdict,
            self.hook,
        )
    }
}

/// Builds the record of a ring-buffer event (its packets and bytes only) with what `names` says
/// at `now` (Unix seconds).
pub fn describe(e: &Event, names: &Names, now: u64) -> Flow {
    let verdict = e.known_verdict;
    let hook = e.known_hook;
    let peer_ip = e.peer_node;
    let peer_node = peer_ip.map(|ip| {
        names
            .nodes
            .get(&IpAddr::V4(ip))
            .cloned()
            .unwrap_or_else(|| ip.to_string())
    });
    let cross_node = peer_ip.is_some() && verdict != Some(Verdict::ForwardedLocal);
    let (encrypted, why) = match verdict {
        Some(Verdict::ForwardedEncrypted) => (true, reason::TUNNEL),
        Some(Verdict::ForwardedLocal) => (false, reason::SAME_NODE),
        Some(Verdict::ForwardedPlain) if cross_node => (false, reason::PERMISSIVE_NO_TUNNEL),
        Some(Verdict::ForwardedPlain) => (false, reason::EXCLUDED),
        Some(Verdict::DroppedPlaintext) => (false, reason::DROPPED_PLAINTEXT),
        Some(Verdict::DroppedPolicy) => (false, reason::DROPPED_POLICY),
        Some(Verdict::TooBig) => (false, reason::TOO_BIG),
        None => (false, reason::UNKNOWN),
    };
    let peer = peer_node.as_ref().and_then(|n| names.peers.get(n));
    let (fingerprint, generation, age) = match (cross_node, peer) {
        (true, Some(p)) => (
            p.key_fingerprint.clone(),
            p.key_generation,
            p.last_handshake.map(|h| now.saturating_sub(h)),
        ),
        _ => (None, None, None),
    };
    let (drop_reason, denied) = match verdict {
        Some(Verdict::DroppedPolicy) => (Some("POLICY_DENIED"), true),
        Some(Verdict::DroppedPlaintext) => (Some("UNENCRYPTED_TRAFFIC"), false),
        Some(Verdict::TooBig) => (Some("FRAG_NEEDED"), false),
        _ => (None, false),
    };
    let (egress_denied_by, ingress_denied_by) = if denied {
        let src = names.pods.get(&e.src);
        let dst = names.pods.get(&e.dst);
        (
            policy_refs(src.map(|p| p.egress_policies.as_slice()).unwrap_or(&[])),
            policy_refs(dst.map(|p| p.ingress_policies.as_slice()).unwrap_or(&[])),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    Flow {
        time: rfc3339(now),
        verdict: if drop_reason.is_some() {
            "DROPPED"
        } else {
            "FORWARDED"
        }
        .to_string(),
        drop_reason_desc: drop_reason.map(str::to_string),
        ip: Ip {
            source: e.src,
            destination: e.dst,
            ip_version: if e.src.is_ipv6() { "IPv6" } else { "IPv4" }.to_string(),
            encrypted,
        },
        l4: Layer4::new(e.protocol, e.sport, e.dport),
        source: endpoint(names, e.src, e.src_identity),
        destination: endpoint(names, e.dst, e.dst_identity),
        node_name: names.node_name.clone(),
        traffic_direction: match hook {
            Some(Hook::FromPod | Hook::UnderlayEgress) => "EGRESS",
            _ => "INGRESS",
        }
        .to_string(),
        flow_type: "L3_L4".to_string(),
        egress_denied_by,
        ingress_denied_by,
        encryption: Encryption {
            encrypted,
            reason: why.to_string(),
            peer_node: if cross_node { peer_node } else { None },
            peer_key_fingerprint: fingerprint,
            peer_key_generation: generation,
            handshake_age_seconds: if encrypted { age } else { None },
            cipher_suite: encrypted.then(|| CIPHER_SUITE.to_string()),
        },
        wiremesh_verdict: verdict_str(verdict).to_string(),
        hook: hook_str(hook).to_string(),
        cross_node,
        packets: e.packets,
        bytes: e.bytes,
        pending_packets: 0,
        pending_bytes: 0,
        first_seen: now,
        last_seen: now,
    }
}

#[derive(Debug)]
struct Entry {
    record: Flow,
    /// Monotonic counter of the last update, for eviction.
    touched: u64,
}

/// What one batch of records changed, for the metrics and the flow history.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ingested {
    /// New flows per verdict.
    pub new_flows: BTreeMap<&'static str, u64>,
    /// Packets per verdict.
    pub packets: BTreeMap<&'static str, u64>,
    /// Flows evicted to stay within the bound.
    pub evicted: u64,
    /// Each event of the batch as a record holding that event's packets and bytes (with the
    /// evidence of the flow's first record), for the flow history.
    pub records: Vec<Flow>,
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

/// The kernel's backlog of both families: what each flow has counted but not written as a
/// record yet (`Maps::flow_backlog`/`flow_backlog6`, one entry per flow, verdict, hook and
/// interface).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backlog {
    /// `wm_flows`.
    pub v4: Vec<(FlowKey, FlowState)>,
    /// `wm_flows6`.
    pub v6: Vec<(FlowKey6, FlowState)>,
}

/// The kernel's backlog summed per [`FlowId`]: (packets, bytes).
pub fn backlog_sums(backlog: &Backlog) -> HashMap<FlowId, (u64, u64)> {
    fn add<A: Copy + Into<IpAddr>>(
        sums: &mut HashMap<FlowId, (u64, u64)>,
        entries: &[(FlowKeyOf<A>, FlowState)],
    ) {
        for (k, st) in entries {
            let id = (
                k.src_ip.into(),
                k.dst_ip.into(),
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
    }
    let mut sums = HashMap::new();
    add(&mut sums, &backlog.v4);
    add(&mut sums, &backlog.v6);
    sums
}

/// Seconds since the Unix epoch now.
pub fn unix_now() -> u64 {
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

    /// Adds a batch of ring-buffer records (either family) received at `now` (Unix seconds).
    pub fn ingest_at<E: Copy + Into<Event>>(
        &mut self,
        events: &[E],
        names: &Names,
        now: u64,
    ) -> Ingested {
        let mut out = Ingested::default();
        for e in events {
            let e: Event = (*e).into();
            self.clock += 1;
            let verdict = verdict_str(e.known_verdict);
            *out.packets.entry(verdict).or_default() += e.packets;
            let id = e.id();
            if let Some(entry) = self.entries.get_mut(&id) {
                entry.record.packets += e.packets;
                entry.record.bytes += e.bytes;
                entry.record.last_seen = now;
                entry.record.time = rfc3339(now);
                entry.touched = self.clock;
                let mut delta = entry.record.clone();
                (delta.packets, delta.bytes) = (e.packets, e.bytes);
                (delta.pending_packets, delta.pending_bytes) = (0, 0);
                delta.first_seen = now;
                out.records.push(delta);
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
            let record = describe(&e, names, now);
            out.records.push(record.clone());
            self.entries.insert(
                id,
                Entry {
                    record,
                    touched: self.clock,
                },
            );
        }
        out
    }

    /// [`FlowTable::ingest_at`] now.
    pub fn ingest<E: Copy + Into<Event>>(&mut self, events: &[E], names: &Names) -> Ingested {
        self.ingest_at(events, names, unix_now())
    }

    /// Sets what each flow (either family) has counted in the kernel but not reported yet
    /// (read when the table is served); replaces the previous backlog.
    pub fn set_backlog(&mut self, backlog: &Backlog) {
        let sums = backlog_sums(backlog);
        for (id, entry) in &mut self.entries {
            let (p, b) = sums.get(id).copied().unwrap_or_default();
            entry.record.pending_packets = p;
            entry.record.pending_bytes = b;
        }
    }

    /// Every flow, most recently updated first; `packets`/`bytes` include the backlog.
    pub fn snapshot(&self) -> Vec<Flow> {
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
mod tests;
