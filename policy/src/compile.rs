//! The compiler: turns the cluster model into flat entries the eBPF programs look up, and a
//! lookup simulator that decides exactly as the eBPF side will (checked against the evaluator).
//!
//! Maps (byte layouts in `docs/policy.md`, encoders on each key type):
//! - `endpoints` (ipcache part): pod IP (every address of a dual-stack pod) -> pod identity. A
//!   miss means [`Identity::WORLD`].
//! - `cidrs` (LPM, one trie per address family): prefix -> CIDR identity. Every prefix named by
//!   any ipBlock `cidr` or `except` has an entry; its identity stands for the exact set of
//!   ipBlocks that contain the addresses whose longest match it is ([`Identity::WORLD`] for none),
//!   so overlapping blocks and excepts need one lookup.
//! - `isolated` (hash): (subject identity, direction) present = default deny for that direction.
//! - `rules` (LPM): (subject, peer, direction, protocol, port/prefix) -> allow. Port ranges are
//!   split into aligned power-of-two blocks, named ports are resolved to numbers, and an empty
//!   peer list is the wildcard peer [`Identity::ANY`].
//!
//! Per direction the datapath does at most: one `isolated` lookup, one `cidrs` lookup of the peer
//! address, and three `rules` lookups (peer pod identity, peer CIDR identity, ANY).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;

use crate::{
    identity::{Identity, IdentityLabels},
    model::{Cluster, Protocol},
    rules::{IpBlock, NamespaceMatch, Peer, PortValue, Rule},
};

#[cfg(test)]
mod tests;

/// Traffic direction relative to the subject pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Into the subject (the subject is the destination).
    Ingress = 0,
    /// Out of the subject (the subject is the source).
    Egress = 1,
}

/// Key of the `isolated` map: presence means default deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IsolationKey {
    /// The subject pod identity.
    pub identity: Identity,
    /// The direction it is isolated in.
    pub direction: Direction,
}

impl IsolationKey {
    /// `struct { u32 identity; u8 direction; u8 pad[3]; }`, native byte order.
    pub fn to_bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.identity.0.to_ne_bytes());
        b[4] = self.direction as u8;
        b
    }
}

/// Bits of a [`RuleKey`] before the port (subject, peer, direction, protocol).
pub const RULE_KEY_FIXED_BITS: u32 = 80;

/// Key of the `rules` LPM map (value: allow). The port is matched on its top
/// `port_prefix_len` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleKey {
    /// The pod the policy selects.
    pub subject: Identity,
    /// Ingress (peer = source) or egress (peer = destination).
    pub direction: Direction,
    /// The protocol.
    pub protocol: Protocol,
    /// Peer: a pod identity, a CIDR identity, or [`Identity::ANY`].
    pub peer: Identity,
    /// The port with the bits below the prefix cleared.
    pub port: u16,
    /// How many leading bits of the port must match (0..=16).
    pub port_prefix_len: u8,
}

impl RuleKey {
    /// The LPM `prefixlen` of this key.
    pub fn prefixlen(&self) -> u32 {
        RULE_KEY_FIXED_BITS + u32::from(self.port_prefix_len)
    }

    /// `struct { u32 prefixlen; u32 subject; u32 peer; u8 direction; u8 protocol; __be16 port; }`:
    /// prefixlen and identities in native order, the port big-endian so that its prefix bits come
    /// first.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&self.prefixlen().to_ne_bytes());
        b[4..8].copy_from_slice(&self.subject.0.to_ne_bytes());
        b[8..12].copy_from_slice(&self.peer.0.to_ne_bytes());
        b[12] = self.direction as u8;
        b[13] = self.protocol.number();
        b[14..16].copy_from_slice(&self.port.to_be_bytes());
        b
    }
}

/// An entry of the `cidrs` LPM map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CidrEntry {
    /// The prefix (host bits cleared).
    pub prefix: IpNet,
    /// The CIDR identity, or [`Identity::WORLD`] when no ipBlock covers the region.
    pub identity: Identity,
}

impl CidrEntry {
    /// `struct { u32 prefixlen; u8 addr[4 or 16]; }` (8 bytes for IPv4, 20 for IPv6).
    pub fn key_bytes(&self) -> Vec<u8> {
        let mut b = u32::from(self.prefix.prefix_len()).to_ne_bytes().to_vec();
        match self.prefix.addr() {
            IpAddr::V4(a) => b.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => b.extend_from_slice(&a.octets()),
        }
        b
    }
}

/// Something the compiler could not express exactly; it fails closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompileWarning {
    /// Pods of one identity disagree on a named port (a different number, or absent on some).
    /// Rules naming it do not match that identity at all.
    NamedPortConflict {
        /// The identity.
        identity: Identity,
        /// The port name.
        name: String,
        /// The protocol.
        protocol: Protocol,
        /// The pods (`ns/name`) of that identity.
        pods: Vec<String>,
    },
}

/// One end of a packet as the datapath sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketEnd {
    /// Pod identity from the ipcache, or [`Identity::WORLD`].
    pub identity: Identity,
    /// The address, if known.
    pub ip: Option<IpAddr>,
}

/// The compiled maps.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    /// Pod IP -> identity.
    pub endpoints: BTreeMap<IpAddr, Identity>,
    /// CIDR LPM entries, sorted by prefix.
    pub cidrs: Vec<CidrEntry>,
    /// (identity, direction) pairs with default deny.
    pub isolated: BTreeSet<IsolationKey>,
    /// Allow rules.
    pub rules: BTreeSet<RuleKey>,
    /// Where the compilation is not exact.
    pub warnings: Vec<CompileWarning>,
    cidr_index: BTreeMap<IpNet, Identity>,
}

/// Splits an inclusive port range into aligned blocks `(first port, prefix length)`: at most 30
/// for any range; `(0, 0)` is every port.
pub fn port_range_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut start, hi) = (u32::from(lo), u32::from(hi));
    while start <= hi {
        let mut size_log = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while start + (1 << size_log) - 1 > hi {
            size_log -= 1;
        }
        out.push((start as u16, (16 - size_log) as u8));
        start += 1 << size_log;
    }
    out
}

#[derive(Clone, Copy)]
enum Target {
    Pod(Identity),
    Cidr(Identity),
    Any,
}

struct Builder<'a> {
    cluster: &'a Cluster,
    out: Compiled,
    /// Per pod identity: resolved named ports (conflicts left out).
    named: BTreeMap<Identity, BTreeMap<(String, Protocol), u16>>,
    /// Per ipBlock: the CIDR identities whose regions are in it.
    block_ids: BTreeMap<IpBlock, Vec<Identity>>,
}

/// Compiles the cluster's policies into map entries.
pub fn compile(cluster: &Cluster) -> Compiled {
    let mut b = Builder {
        cluster,
        out: Compiled::default(),
        named: BTreeMap::new(),
        block_ids: BTreeMap::new(),
    };
    b.endpoints();
    b.named_ports();
    b.cidrs();
    b.rules();
    b.out
}

impl Builder<'_> {
    fn endpoints(&mut self) {
        for (i, p) in self.cluster.pods().iter().enumerate() {
            for ip in p.ips() {
                self.out
                    .endpoints
                    .insert(ip, self.cluster.identity(crate::model::PodId(i)));
            }
        }
    }

    fn named_ports(&mut self) {
        let mut by_identity: BTreeMap<Identity, Vec<usize>> = BTreeMap::new();
        for i in 0..self.cluster.pods().len() {
            by_identity
                .entry(self.cluster.identity(crate::model::PodId(i)))
                .or_default()
                .push(i);
        }
        for (id, pods) in by_identity {
            let pods: Vec<_> = pods.iter().map(|i| &self.cluster.pods()[*i]).collect();
            let names: BTreeSet<(String, Protocol)> = pods
                .iter()
                .flat_map(|p| p.ports.iter())
                .filter_map(|c| c.name.clone().map(|n| (n, c.protocol)))
                .collect();
            let table = self.named.entry(id).or_default();
            for (name, proto) in names {
                let values: BTreeSet<Option<u16>> =
                    pods.iter().map(|p| p.named_port(&name, proto)).collect();
                match values.into_iter().collect::<Vec<_>>().as_slice() {
                    [Some(port)] => {
                        table.insert((name, proto), *port);
                    }
                    _ => self.out.warnings.push(CompileWarning::NamedPortConflict {
                        identity: id,
                        name,
                        protocol: proto,
                        pods: pods.iter().map(|p| p.key()).collect(),
                    }),
                }
            }
        }
    }

    fn cidrs(&mut self) {
        let mut blocks = BTreeSet::new();
        for pol in self.cluster.policies() {
            for rule in pol.ingress.iter().chain(pol.egress.iter()).flatten() {
                for peer in rule.peers.iter().flatten() {
                    if let Peer::IpBlock(b) = peer {
                        blocks.insert(b.clone());
                    }
                }
            }
        }
        let prefixes: BTreeSet<IpNet> = blocks
            .iter()
            .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()))
            .collect();
        // The set of blocks covering the addresses whose longest match is `p`: prefixes nest or
        // are disjoint, so every address with longest match `p` is inside exactly the prefixes
        // that contain `p`.
        let mut region_sets: BTreeMap<IpNet, BTreeSet<&IpBlock>> = BTreeMap::new();
        for p in &prefixes {
            let set = blocks
                .iter()
                .filter(|b| b.cidr.contains(p) && !b.except.iter().any(|e| e.contains(p)))
                .collect();
            region_sets.insert(*p, set);
        }
        let distinct: BTreeSet<&BTreeSet<&IpBlock>> =
            region_sets.values().filter(|s| !s.is_empty()).collect();
        let ids: BTreeMap<&BTreeSet<&IpBlock>, Identity> = distinct
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s, Identity(Identity::FIRST_CIDR.0 + i as u32)))
            .collect();
        for (p, set) in &region_sets {
            let identity = ids.get(set).copied().unwrap_or(Identity::WORLD);
            self.out.cidrs.push(CidrEntry {
                prefix: *p,
                identity,
            });
            self.out.cidr_index.insert(*p, identity);
        }
        for b in &blocks {
            let list = ids
                .iter()
                .filter(|(s, _)| s.contains(b))
                .map(|(_, id)| *id)
                .collect();
            self.block_ids.insert(b.clone(), list);
        }
    }

    fn rules(&mut self) {
        let subjects: Vec<(Identity, IdentityLabels)> = self
            .cluster
            .identities()
            .iter()
            .map(|(i, l)| (i, l.clone()))
            .collect();
        for (id, labels) in &subjects {
            for dir in [Direction::Ingress, Direction::Egress] {
                for pol in self.cluster.policies() {
                    if pol.namespace != labels.namespace_name()
                        || !pol.selector.matches(&labels.pod)
                    {
                        continue;
                    }
                    let rules = match dir {
                        Direction::Ingress => &pol.ingress,
                        Direction::Egress => &pol.egress,
                    };
                    let Some(rules) = rules else { continue };
                    self.out.isolated.insert(IsolationKey {
                        identity: *id,
                        direction: dir,
                    });
                    for rule in rules {
                        self.rule(*id, dir, rule, &subjects);
                    }
                }
            }
        }
    }

    fn targets(&self, rule: &Rule, subjects: &[(Identity, IdentityLabels)]) -> Vec<Target> {
        let Some(peers) = &rule.peers else {
            return vec![Target::Any];
        };
        let mut out = Vec::new();
        for peer in peers {
            match peer {
                Peer::Pods { namespaces, pods } => {
                    for (j, l) in subjects {
                        let ns_ok = match namespaces {
                            NamespaceMatch::Same(ns) => l.namespace_name() == ns,
                            NamespaceMatch::Selector(s) => s.matches(&l.namespace),
                        };
                        if ns_ok && pods.matches(&l.pod) {
                            out.push(Target::Pod(*j));
                        }
                    }
                }
                Peer::IpBlock(b) => {
                    out.extend(self.block_ids[b].iter().map(|c| Target::Cidr(*c)));
                }
            }
        }
        out
    }

    fn rule(
        &mut self,
        subject: Identity,
        dir: Direction,
        rule: &Rule,
        subjects: &[(Identity, IdentityLabels)],
    ) {
        for target in self.targets(rule, subjects) {
            let peer = match target {
                Target::Pod(j) | Target::Cidr(j) => j,
                Target::Any => Identity::ANY,
            };
            let Some(specs) = &rule.ports else {
                for proto in Protocol::ALL {
                    self.add(subject, dir, proto, peer, 0, u16::MAX);
                }
                continue;
            };
            for spec in specs {
                let proto = spec.protocol;
                match &spec.port {
                    None => self.add(subject, dir, proto, peer, 0, u16::MAX),
                    Some(PortValue::Range(lo, hi)) => self.add(subject, dir, proto, peer, *lo, *hi),
                    Some(PortValue::Named(name)) => {
                        let key = (name.clone(), proto);
                        match (dir, target) {
                            (Direction::Ingress, _) => {
                                if let Some(p) = self.resolve(subject, &key) {
                                    self.add(subject, dir, proto, peer, p, p);
                                }
                            }
                            (Direction::Egress, Target::Pod(j)) => {
                                if let Some(p) = self.resolve(j, &key) {
                                    self.add(subject, dir, proto, j, p, p);
                                }
                            }
                            (Direction::Egress, Target::Any) => {
                                for (j, _) in subjects {
                                    if let Some(p) = self.resolve(*j, &key) {
                                        self.add(subject, dir, proto, *j, p, p);
                                    }
                                }
                            }
                            // Named ports never combine with ipBlock peers in egress.
                            (Direction::Egress, Target::Cidr(_)) => {}
                        }
                    }
                }
            }
        }
    }

    fn resolve(&self, id: Identity, key: &(String, Protocol)) -> Option<u16> {
        self.named.get(&id).and_then(|t| t.get(key)).copied()
    }

    fn add(
        &mut self,
        subject: Identity,
        direction: Direction,
        protocol: Protocol,
        peer: Identity,
        lo: u16,
        hi: u16,
    ) {
        for (port, len) in port_range_prefixes(lo, hi) {
            self.out.rules.insert(RuleKey {
                subject,
                direction,
                protocol,
                peer,
                port,
                port_prefix_len: len,
            });
        }
    }
}

impl Compiled {
    /// The packet end for an address, as the ipcache resolves it.
    pub fn packet_end(&self, ip: IpAddr) -> PacketEnd {
        PacketEnd {
            identity: self.endpoints.get(&ip).copied().unwrap_or(Identity::WORLD),
            ip: Some(ip),
        }
    }

    /// The `cidrs` LPM lookup: the identity of the longest prefix containing `ip`.
    pub fn lookup_cidr(&self, ip: IpAddr) -> Option<Identity> {
        let max = match ip {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        (0..=max).rev().find_map(|len| {
            let net = IpNet::new(ip, len).ok()?.trunc();
            self.cidr_index.get(&net).copied()
        })
    }

    /// The `rules` LPM lookup.
    pub fn lookup_rule(
        &self,
        subject: Identity,
        direction: Direction,
        protocol: Protocol,
        peer: Identity,
        port: u16,
    ) -> bool {
        (0..=16u8).rev().any(|len| {
            let mask = if len == 0 { 0 } else { u16::MAX << (16 - len) };
            self.rules.contains(&RuleKey {
                subject,
                direction,
                protocol,
                peer,
                port: port & mask,
                port_prefix_len: len,
            })
        })
    }

    /// One side, decided with the datapath's lookups: `subject` is the pod whose policy applies
    /// (the source for egress, the destination for ingress), `peer` the other end.
    pub fn side_allows(
        &self,
        subject: &PacketEnd,
        peer: &PacketEnd,
        direction: Direction,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        if !subject.identity.is_pod()
            || !self.isolated.contains(&IsolationKey {
                identity: subject.identity,
                direction,
            })
        {
            return true;
        }
        let mut candidates = Vec::with_capacity(3);
        if peer.identity.is_pod() {
            candidates.push(peer.identity);
        }
        if let Some(c) = peer.ip.and_then(|ip| self.lookup_cidr(ip))
            && c != Identity::WORLD
        {
            candidates.push(c);
        }
        candidates.push(Identity::ANY);
        candidates
            .into_iter()
            .any(|p| self.lookup_rule(subject.identity, direction, protocol, p, port))
    }

    /// Whether traffic from `src` to `dst` passes both sides.
    pub fn decide(&self, src: &PacketEnd, dst: &PacketEnd, protocol: Protocol, port: u16) -> bool {
        self.side_allows(src, dst, Direction::Egress, protocol, port)
            && self.side_allows(dst, src, Direction::Ingress, protocol, port)
    }
}

/// What to write to and delete from the maps to go from one compilation to the next. Apply
/// upserts/additions before removals so no entry the new state keeps is ever missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapDiff {
    /// Endpoint entries to insert or overwrite.
    pub endpoints_upsert: Vec<(IpAddr, Identity)>,
    /// Endpoint entries to delete.
    pub endpoints_remove: Vec<IpAddr>,
    /// CIDR entries to insert or overwrite.
    pub cidrs_upsert: Vec<CidrEntry>,
    /// CIDR prefixes to delete.
    pub cidrs_remove: Vec<IpNet>,
    /// Isolation keys to add.
    pub isolated_add: Vec<IsolationKey>,
    /// Isolation keys to delete.
    pub isolated_remove: Vec<IsolationKey>,
    /// Rule keys to add.
    pub rules_add: Vec<RuleKey>,
    /// Rule keys to delete.
    pub rules_remove: Vec<RuleKey>,
}

impl MapDiff {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        *self == MapDiff::default()
    }
}

impl Compiled {
    /// The changes that turn maps holding `old` into maps holding `self`.
    pub fn diff(&self, old: &Compiled) -> MapDiff {
        let old_cidrs: BTreeMap<IpNet, Identity> =
            old.cidrs.iter().map(|e| (e.prefix, e.identity)).collect();
        let new_cidrs: BTreeMap<IpNet, Identity> =
            self.cidrs.iter().map(|e| (e.prefix, e.identity)).collect();
        MapDiff {
            endpoints_upsert: self
                .endpoints
                .iter()
                .filter(|(ip, id)| old.endpoints.get(ip) != Some(id))
                .map(|(ip, id)| (*ip, *id))
                .collect(),
            endpoints_remove: old
                .endpoints
                .keys()
                .filter(|ip| !self.endpoints.contains_key(ip))
                .copied()
                .collect(),
            cidrs_upsert: self
                .cidrs
                .iter()
                .filter(|e| old_cidrs.get(&e.prefix) != Some(&e.identity))
                .copied()
                .collect(),
            cidrs_remove: old_cidrs
                .keys()
                .filter(|p| !new_cidrs.contains_key(p))
                .copied()
                .collect(),
            isolated_add: self.isolated.difference(&old.isolated).copied().collect(),
            isolated_remove: old.isolated.difference(&self.isolated).copied().collect(),
            rules_add: self.rules.difference(&old.rules).copied().collect(),
            rules_remove: old.rules.difference(&self.rules).copied().collect(),
        }
    }
}
