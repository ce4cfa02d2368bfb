//! `#[repr(C)]` mirrors of `include/wiremesh.h` (keep both in step: every struct has a size
//! assert here), and the conversions from the policy compiler's entries to map keys.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use aya::maps::lpm_trie::Key;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use wiremesh_policy::{CidrEntry, IsolationKey, RULE_KEY_FIXED_BITS, RuleKey};

/// Flags of an [`IpcacheValue`] (`WM_IPCACHE_*`).
pub mod ipcache_flags {
    /// Traffic to this prefix goes through the tunnel device.
    pub const ENCRYPT: u8 = 0x1;
    /// A pod on this node.
    pub const LOCAL: u8 = 0x2;
    /// A pod (or a pod range) on another node.
    pub const REMOTE_POD: u8 = 0x4;
    /// A node's own address (/32; identity HOST for this node, REMOTE_NODE for another): never a
    /// pod address, also inside a pod CIDR, so strict mode never drops node-to-node traffic.
    pub const NODE: u8 = 0x8;
}

/// Errors converting policy entries into map entries.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AbiError {
    /// An IPv6 entry where only IPv4 is supported (the IPv4 helpers, or a [`crate::MapWriter`]
    /// without IPv6 maps).
    #[error("{0}: IPv6 entries are not supported here")]
    Ipv6(IpNet),
}

/// `struct wm_ipcache_val`: where a prefix lives and who it is.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IpcacheValue {
    /// Pod identity or a reserved one; 0 = unknown (treated as world).
    pub identity: u32,
    /// Agent-assigned node number (0 = this node / none).
    pub node_id: u32,
    /// Underlay IPv4 of the node hosting the prefix (octets, network order).
    pub node_ip: [u8; 4],
    /// [`ipcache_flags`].
    pub flags: u8,
    /// Zero.
    pub pad: [u8; 3],
}

impl IpcacheValue {
    /// A value with the given fields and zero padding.
    pub fn new(identity: u32, node_id: u32, node_ip: Ipv4Addr, flags: u8) -> Self {
        Self {
            identity,
            node_id,
            node_ip: node_ip.octets(),
            flags,
            pad: [0; 3],
        }
    }
}

/// `struct wm_isolation_key` (value: `u8` 1).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IsolationKeyRaw {
    /// Subject identity.
    pub identity: u32,
    /// 0 = ingress, 1 = egress.
    pub direction: u8,
    /// Zero.
    pub pad: [u8; 3],
}

impl From<&IsolationKey> for IsolationKeyRaw {
    fn from(k: &IsolationKey) -> Self {
        Self {
            identity: k.identity.0,
            direction: k.direction as u8,
            pad: [0; 3],
        }
    }
}

/// The part of `struct wm_rule_key` after `prefixlen` (aya's [`Key`] supplies the prefix
/// length; `Key<RuleData>` is the whole 16-byte C key).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RuleData {
    /// Subject identity.
    pub subject: u32,
    /// Peer identity (pod, CIDR or ANY).
    pub peer: u32,
    /// 0 = ingress, 1 = egress.
    pub direction: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// Port, big-endian bytes.
    pub port: [u8; 2],
}

/// The rules LPM key of a compiled rule.
pub fn rule_key(k: &RuleKey) -> Key<RuleData> {
    Key::new(
        k.prefixlen(),
        RuleData {
            subject: k.subject.0,
            peer: k.peer.0,
            direction: k.direction as u8,
            protocol: k.protocol.number(),
            port: k.port.to_be_bytes(),
        },
    )
}

/// The LPM key of an IPv4 prefix (`struct wm_lpm4_key`).
pub fn lpm4_key(net: Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix_len()), net.trunc().addr().octets())
}

/// The LPM key of an IPv6 prefix (`struct wm_lpm6_key`).
pub fn lpm6_key(net: Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(net.prefix_len()), net.trunc().addr().octets())
}

/// The prefix an IPv6 LPM key stands for.
pub fn lpm6_net(key: &Key<[u8; 16]>) -> Option<Ipv6Net> {
    let len = u8::try_from(key.prefix_len()).ok()?;
    Ipv6Net::new(Ipv6Addr::from(key.data()), len).ok()
}

/// The prefix an LPM key stands for.
pub fn lpm4_net(key: &Key<[u8; 4]>) -> Option<Ipv4Net> {
    let len = u8::try_from(key.prefix_len()).ok()?;
    Ipv4Net::new(Ipv4Addr::from(key.data()), len).ok()
}

/// The cidrs4 entry (key, identity) of a compiled CIDR entry.
pub fn cidr_entry(e: &CidrEntry) -> Result<(Key<[u8; 4]>, u32), AbiError> {
    match e.prefix {
        IpNet::V4(net) => Ok((lpm4_key(net), e.identity.0)),
        IpNet::V6(_) => Err(AbiError::Ipv6(e.prefix)),
    }
}

/// The ipcache /32 of a pod address.
pub fn endpoint_net(ip: IpAddr) -> Result<Ipv4Net, AbiError> {
    match ip {
        IpAddr::V4(a) => Ok(Ipv4Net::from(a)),
        IpAddr::V6(_) => Err(AbiError::Ipv6(IpNet::from(ip))),
    }
}

/// Strict or permissive handling of unencrypted cross-node pod traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u32)]
pub enum Mode {
    /// Unencrypted pod traffic passes when no tunnel is available.
    #[default]
    Permissive = 0,
    /// Cross-node pod traffic outside WireGuard is dropped.
    Strict = 1,
}

/// Flags of a [`Config`] (`WM_CONFIG_*`).
pub mod config_flags {
    /// The entry was written by an agent. Without it (an array entry never written reads as
    /// zeros) the programs act as strict mode without a tunnel: fail closed.
    pub const SET: u32 = 0x1;
}

/// Conntrack idle lifetime of TCP entries when [`Config::ct_tcp_timeout_s`] is 0.
pub const CT_TCP_TIMEOUT_DEFAULT: Duration = Duration::from_secs(21600);
/// Conntrack idle lifetime of other entries when [`Config::ct_other_timeout_s`] is 0.
pub const CT_OTHER_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

/// `struct wm_config` (the single entry of the config array).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Config {
    /// ifindex of the tunnel device in the node's namespace; 0 = none.
    pub tunnel_ifindex: u32,
    /// [`Mode`] as u32.
    pub mode: u32,
    /// Identity of this node's own addresses.
    pub node_identity: u32,
    /// WireGuard UDP port on the underlay (host order); 0 = none.
    pub wg_port: u16,
    /// Zero.
    pub pad: u16,
    /// Idle lifetime of TCP conntrack entries in seconds; 0 = [`CT_TCP_TIMEOUT_DEFAULT`].
    pub ct_tcp_timeout_s: u32,
    /// Idle lifetime of other conntrack entries in seconds; 0 = [`CT_OTHER_TIMEOUT_DEFAULT`].
    pub ct_other_timeout_s: u32,
    /// [`config_flags`]; [`Config::new`] sets [`config_flags::SET`].
    pub flags: u32,
    /// Zero.
    pub reserved: u32,
}

impl Config {
    /// A config with zero padding, default conntrack lifetimes and [`config_flags::SET`].
    pub fn new(tunnel_ifindex: u32, mode: Mode, node_identity: u32, wg_port: u16) -> Self {
        Self {
            tunnel_ifindex,
            mode: mode as u32,
            node_identity,
            wg_port,
            flags: config_flags::SET,
            ..Self::default()
        }
    }

    /// The same config with these conntrack idle lifetimes (whole seconds, at least 1; a
    /// reply or a packet of an allowed flow after that much idleness is decided by policy
    /// again).
    pub fn with_ct_timeouts(mut self, tcp: Duration, other: Duration) -> Self {
        let secs = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
        self.ct_tcp_timeout_s = secs(tcp);
        self.ct_other_timeout_s = secs(other);
        self
    }
}

/// `struct wm_endpoint_val`: the addresses of the pod behind a veth (anti-spoofing in
/// from_pod, keyed by the ifindex of the host side).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndpointValue {
    /// The pod's IPv4 octets; zero = the pod has none (every IPv4 source is then spoofed).
    pub ip4: [u8; 4],
    /// The pod's IPv6 octets; zero = none (not checked by the programs yet).
    pub ip6: [u8; 16],
    /// [`EndpointValue::PENDING`] or 0.
    pub flags: u32,
}

impl EndpointValue {
    /// `WM_EP_PENDING`: the veth's pod has no entries yet while policy isolates a local pod
    /// without entries: `from_pod` and `to_pod` drop every IP packet on it (fail closed).
    pub const PENDING: u32 = 0x1;

    /// The pod's addresses.
    pub fn new(ip4: Option<Ipv4Addr>, ip6: Option<Ipv6Addr>) -> Self {
        Self {
            ip4: ip4.map(|a| a.octets()).unwrap_or_default(),
            ip6: ip6.map(|a| a.octets()).unwrap_or_default(),
            flags: 0,
        }
    }

    /// The entry of a veth whose pod is not known yet ([`EndpointValue::PENDING`]).
    pub fn pending() -> Self {
        Self {
            flags: Self::PENDING,
            ..Self::default()
        }
    }

    /// Whether this is a [`EndpointValue::pending`] entry.
    pub fn is_pending(&self) -> bool {
        self.flags & Self::PENDING != 0
    }
}

/// `struct wm_frag_key`: a fragmented datagram (IPv4 addresses in the first 4 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FragKey {
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Identification (network order).
    pub id: [u8; 4],
    /// IP protocol.
    pub protocol: u8,
    /// 4 or 6.
    pub family: u8,
    /// Zero.
    pub pad: [u8; 2],
}

/// `struct wm_frag_val`: the ports of the datagram's first fragment (network order).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FragValue {
    /// Source port.
    pub src_port: [u8; 2],
    /// Destination port.
    pub dst_port: [u8; 2],
}

/// `struct wm_ct_val`: the last use and the policy epoch of a conntrack entry.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtValue {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last use.
    pub last_ns: u64,
    /// Policy epoch of the decision.
    pub epoch: u32,
    /// [`CtValue::CLOSING`] or 0.
    pub flags: u32,
}

impl CtValue {
    /// A TCP FIN or RST passed: the entry lives at most [`CT_TCP_CLOSE_TIMEOUT`] idle.
    pub const CLOSING: u32 = 0x1;
}

/// Idle lifetime of a TCP conntrack entry once a FIN or RST passed (or the TCP lifetime, if
/// shorter).
pub const CT_TCP_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Verdict of a flow record (`WM_VERDICT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Redirected into the tunnel (from_pod) or arrived from it (to_pod).
    ForwardedEncrypted = 1,
    /// Pod to pod on this node.
    ForwardedLocal = 2,
    /// Dropped by NetworkPolicy.
    DroppedPolicy = 3,
    /// Strict mode: cross-node pod traffic outside WireGuard.
    DroppedPlaintext = 4,
    /// Passed unencrypted: non-pod peer, or permissive mode without a tunnel.
    ForwardedPlain = 5,
    /// Larger than the tunnel MTU: handed to the routing stack (which answers with a PMTU
    /// error or fragments it into the tunnel) instead of being redirected.
    TooBig = 6,
}

impl Verdict {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::ForwardedEncrypted,
            2 => Self::ForwardedLocal,
            3 => Self::DroppedPolicy,
            4 => Self::DroppedPlaintext,
            5 => Self::ForwardedPlain,
            6 => Self::TooBig,
            _ => return None,
        })
    }
}

/// Where a program runs (`WM_HOOK_*`); also selects the program to attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// tc ingress of the host side of a pod veth (packets leaving the pod).
    FromPod = 1,
    /// tc egress of the host side of a pod veth (packets entering the pod).
    ToPod = 2,
    /// tc ingress of the underlay device.
    UnderlayIngress = 3,
    /// tc egress of the underlay device.
    UnderlayEgress = 4,
}

impl Hook {
    /// All hooks.
    pub const ALL: [Hook; 4] = [
        Hook::FromPod,
        Hook::ToPod,
        Hook::UnderlayIngress,
        Hook::UnderlayEgress,
    ];

    /// The program (C function) name.
    pub fn program(self) -> &'static str {
        match self {
            Hook::FromPod => "from_pod",
            Hook::ToPod => "to_pod",
            Hook::UnderlayIngress => "underlay_ingress",
            Hook::UnderlayEgress => "underlay_egress",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|h| *h as u8 == v)
    }
}

/// The accessors both record families share.
macro_rules! flow_accessors {
    ($t:ty) => {
        impl $t {
            /// Source port (host order).
            pub fn sport(&self) -> u16 {
                u16::from_be_bytes(self.src_port)
            }
            /// Destination port (host order).
            pub fn dport(&self) -> u16 {
                u16::from_be_bytes(self.dst_port)
            }
            /// The remote node, if any.
            pub fn peer_node(&self) -> Option<Ipv4Addr> {
                (self.peer_node_ip != [0; 4]).then(|| Ipv4Addr::from(self.peer_node_ip))
            }
            /// The verdict, `None` for a value this build does not know.
            pub fn verdict(&self) -> Option<Verdict> {
                Verdict::from_u8(self.verdict)
            }
            /// The reporting program.
            pub fn hook(&self) -> Option<Hook> {
                Hook::from_u8(self.hook)
            }
        }
    };
}

flow_accessors!(FlowEvent);
flow_accessors!(FlowEvent6);

/// `struct wm_flow_event`: one ring-buffer record.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Packets since the previous record of this flow and verdict.
    pub packets: u64,
    /// Bytes (skb length) since the previous record.
    pub bytes: u64,
    /// Source address octets.
    pub src_ip: [u8; 4],
    /// Destination address octets.
    pub dst_ip: [u8; 4],
    /// Source identity.
    pub src_identity: u32,
    /// Destination identity.
    pub dst_identity: u32,
    /// Underlay IPv4 of the remote node, zero if none.
    pub peer_node_ip: [u8; 4],
    /// Device the program ran on.
    pub ifindex: u32,
    /// Source port, big-endian bytes.
    pub src_port: [u8; 2],
    /// Destination port, big-endian bytes.
    pub dst_port: [u8; 2],
    /// IP protocol number.
    pub protocol: u8,
    /// `WM_VERDICT_*`.
    pub verdict: u8,
    /// `WM_HOOK_*`.
    pub hook: u8,
    /// Zero.
    pub pad: u8,
}

impl FlowEvent {
    /// Decodes a ring-buffer record; `None` if it has the wrong size.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != size_of::<Self>() {
            return None;
        }
        // SAFETY: the length matches and FlowEvent is plain old data for any bit pattern.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Self>()) })
    }
    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.src_ip)
    }
    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.dst_ip)
    }
}

/// `struct wm_flow_event6`: the IPv6 ring-buffer record (80 bytes; same fields as
/// [`FlowEvent`] with 16-byte addresses).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowEvent6 {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Packets since the previous record of this flow and verdict.
    pub packets: u64,
    /// Bytes (skb length) since the previous record.
    pub bytes: u64,
    /// Source address octets.
    pub src_ip: [u8; 16],
    /// Destination address octets.
    pub dst_ip: [u8; 16],
    /// Source identity.
    pub src_identity: u32,
    /// Destination identity.
    pub dst_identity: u32,
    /// Underlay IPv4 of the remote node, zero if none.
    pub peer_node_ip: [u8; 4],
    /// Device the program ran on.
    pub ifindex: u32,
    /// Source port, big-endian bytes.
    pub src_port: [u8; 2],
    /// Destination port, big-endian bytes.
    pub dst_port: [u8; 2],
    /// IP protocol (next header).
    pub protocol: u8,
    /// `WM_VERDICT_*`.
    pub verdict: u8,
    /// `WM_HOOK_*`.
    pub hook: u8,
    /// 6.
    pub family: u8,
}

impl FlowEvent6 {
    /// Decodes a ring-buffer record; `None` if it has the wrong size or family.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != size_of::<Self>() {
            return None;
        }
        // SAFETY: the length matches and FlowEvent6 is plain old data for any bit pattern.
        let e: Self = unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Self>()) };
        (e.family == 6).then_some(e)
    }
    /// Source address.
    pub fn src(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.src_ip)
    }
    /// Destination address.
    pub fn dst(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.dst_ip)
    }
}

/// A flow record of either family ([`crate::FlowReader::read_any`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// An IPv4 record.
    V4(FlowEvent),
    /// An IPv6 record.
    V6(FlowEvent6),
}

impl Flow {
    /// Decodes a ring-buffer record by its size; `None` for an unknown record.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        FlowEvent::from_bytes(b)
            .map(Self::V4)
            .or_else(|| FlowEvent6::from_bytes(b).map(Self::V6))
    }
}

/// `struct wm_flow_key` ([`FlowKey`], 4-byte addresses) and `struct wm_flow6_key` ([`FlowKey6`],
/// 16-byte addresses): the aggregation key of flow records. `A` is the address octet array.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FlowKeyOf<A> {
    /// Source address octets.
    pub src_ip: A,
    /// Destination address octets.
    pub dst_ip: A,
    /// Source port, big-endian.
    pub src_port: [u8; 2],
    /// Destination port, big-endian.
    pub dst_port: [u8; 2],
    /// IP protocol.
    pub protocol: u8,
    /// `WM_VERDICT_*`.
    pub verdict: u8,
    /// `WM_HOOK_*`.
    pub hook: u8,
    /// Zero.
    pub pad: u8,
    /// Device the program ran on.
    pub ifindex: u32,
}

/// `struct wm_flow_key`: the aggregation key of IPv4 flow records.
pub type FlowKey = FlowKeyOf<[u8; 4]>;
/// `struct wm_flow6_key`: the aggregation key of IPv6 flow records.
pub type FlowKey6 = FlowKeyOf<[u8; 16]>;

impl FlowKey {
    /// Whether `e` is a record of this flow.
    pub fn matches(&self, e: &FlowEvent) -> bool {
        (
            self.src_ip,
            self.dst_ip,
            self.src_port,
            self.dst_port,
            self.protocol,
            self.verdict,
            self.hook,
            self.ifindex,
        ) == (
            e.src_ip, e.dst_ip, e.src_port, e.dst_port, e.protocol, e.verdict, e.hook, e.ifindex,
        )
    }
}

/// `struct wm_flow_state`: what a flow has not reported yet.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowState {
    /// When the last record was written (`bpf_ktime_get_ns`).
    pub last_report_ns: u64,
    /// Packets since that record.
    pub packets: u64,
    /// Bytes since that record.
    pub bytes: u64,
}

/// `struct wm_ct_key` ([`CtKey`], 4-byte addresses) and `struct wm_ct6_key` ([`Ct6Key`],
/// 16-byte addresses): a conntrack key (value: [`CtValue`]). `A` is the address octet array.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CtKeyOf<A> {
    /// Source address octets.
    pub src_ip: A,
    /// Destination address octets.
    pub dst_ip: A,
    /// Source port, big-endian.
    pub src_port: [u8; 2],
    /// Destination port, big-endian.
    pub dst_port: [u8; 2],
    /// IP protocol (IPv6: next header).
    pub protocol: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// `struct wm_ct_key`: the IPv4 conntrack key (value: [`CtValue`]).
pub type CtKey = CtKeyOf<[u8; 4]>;
/// `struct wm_ct6_key`: the IPv6 conntrack key (value: [`CtValue`]).
pub type Ct6Key = CtKeyOf<[u8; 16]>;

/// `struct wm_stats6`: IPv6 packets by verdict, summed over CPUs by
/// [`crate::Maps::ipv6_verdicts`]. Index `v as usize` for a [`Verdict`] `v`;
/// [`STATS6_SPOOFED`] counts spoofed sources (also counted as dropped-policy).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats6 {
    /// Packets per verdict index.
    pub by_verdict: [u64; 8],
}

/// Index of spoofed IPv6 sources in [`Stats6::by_verdict`].
pub const STATS6_SPOOFED: usize = 0;

// Sizes of the C structs in include/wiremesh.h.
const _: () = assert!(size_of::<Key<[u8; 4]>>() == 8); // wm_lpm4_key
const _: () = assert!(size_of::<IpcacheValue>() == 16); // wm_ipcache_val
const _: () = assert!(size_of::<IsolationKeyRaw>() == 8); // wm_isolation_key
const _: () = assert!(size_of::<Key<RuleData>>() == 16); // wm_rule_key
const _: () = assert!(size_of::<Config>() == 32); // wm_config
const _: () = assert!(size_of::<EndpointValue>() == 24); // wm_endpoint_val
const _: () = assert!(size_of::<CtValue>() == 16); // wm_ct_val
const _: () = assert!(size_of::<Key<[u8; 16]>>() == 20); // wm_lpm6_key
const _: () = assert!(size_of::<Ct6Key>() == 40); // wm_ct6_key
const _: () = assert!(size_of::<Stats6>() == 64); // wm_stats6
const _: () = assert!(size_of::<FlowEvent6>() == 80); // wm_flow_event6
const _: () = assert!(size_of::<FlowKey6>() == 44); // wm_flow6_key
const _: () = assert!(size_of::<FlowEvent>() == 56); // wm_flow_event
const _: () = assert!(size_of::<CtKey>() == 16); // wm_ct_key
const _: () = assert!(size_of::<FlowKey>() == 20); // wm_flow_key
const _: () = assert!(size_of::<FlowState>() == 24); // wm_flow_state
const _: () = assert!(size_of::<FragKey>() == 40); // wm_frag_key
const _: () = assert!(size_of::<FragValue>() == 4); // wm_frag_val
const _: () = assert!(RULE_KEY_FIXED_BITS == 80); // WM_RULE_KEY_FIXED_BITS

// SAFETY: all of these are #[repr(C)] structs of integers and byte arrays with explicit
// padding fields, so every bit pattern is valid and there are no implicit holes.
unsafe impl aya::Pod for IpcacheValue {}
// SAFETY: as above.
unsafe impl aya::Pod for IsolationKeyRaw {}
// SAFETY: as above.
unsafe impl aya::Pod for RuleData {}
// SAFETY: as above.
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowEvent {}
// SAFETY: as above.
unsafe impl aya::Pod for EndpointValue {}
// SAFETY: as above.
unsafe impl aya::Pod for CtValue {}
// SAFETY: as above.
unsafe impl aya::Pod for Ct6Key {}
// SAFETY: as above.
unsafe impl aya::Pod for Stats6 {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowEvent6 {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowKey6 {}
// SAFETY: as above.
unsafe impl aya::Pod for CtKey {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowState {}

#[cfg(test)]
mod tests;
