//! The desired peer set: from every Node's view (annotations, addresses, podCIDRs, pod IPs) to the
//! peers this node should have, the nodes it must ignore and why, and the nodes not joined yet.
//!
//! Deterministic: the result depends only on the set of views, not on their order. Hostile or
//! broken input only ever costs the node that published it (and, for a stolen key or an
//! overlapping prefix, the node it collides with), never other peers.
//!
//! Decisions an operator can rely on:
//! - Two nodes that claim the same key (public or next) are both rejected: the datapath
//!   identifies a peer by its static key, so either claim could be the impostor. A node claiming a
//!   key of this node is rejected as well.
//! - A pod prefix (podCIDR, or a pod IP outside the node's own podCIDRs) that overlaps a prefix of
//!   another node is dropped from every peer that claims it, and the overlap is reported in
//!   [`PeerSet::conflicts`]. Overlapping prefixes are a misconfiguration or an attempt to pull
//!   another node's pod traffic; longest-prefix match would silently pick one side. Dropped means
//!   no tunnel route: Strict mode drops that traffic, Permissive sends it in plaintext as without
//!   wiremesh. Prefixes of this node win: a peer's prefix overlapping ours is dropped from the peer.
//! - A prefix that contains a node address (any node's `status.addresses`) is dropped and reported
//!   the same way: routing an underlay address into the tunnel loops the tunnel into itself.
//!   This also removes hostNetwork pod IPs, which equal their node's address.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;

use crate::{
    annotations::{
        ANNOTATION_NEXT_PUBLIC_KEY, ANNOTATION_PUBLIC_KEY, AnnotationError, NodeAnnotations,
        parse_key,
    },
    keys::PublicKey,
};

#[cfg(test)]
mod tests;

/// What the agent knows about one Node (from the Node and Pod informers).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeView {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.annotations` (only the `wiremesh.io/*` keys matter).
    pub annotations: BTreeMap<String, String>,
    /// `status.addresses` that are IPs (InternalIP, ExternalIP).
    pub addresses: Vec<IpAddr>,
    /// `spec.podCIDRs`.
    pub pod_cidrs: Vec<IpNet>,
    /// `status.podIPs` of the non-hostNetwork pods with `spec.nodeName` = this node.
    pub pod_ips: Vec<IpAddr>,
}

/// A peer the datapath should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    /// The Node name.
    pub node: String,
    /// The key to initiate to and to accept handshakes from.
    pub public_key: PublicKey,
    /// Where to send.
    pub endpoint: SocketAddr,
    /// podCIDRs, plus /32 or /128 for pod IPs outside them; sorted, no duplicates, no prefix
    /// inside another of the same peer, none overlapping another node's.
    pub allowed_ips: Vec<IpNet>,
    /// The peer's key generation.
    pub key_generation: u64,
    /// During a rotation: also accept handshakes from the peer under this key.
    pub next_public_key: Option<PublicKey>,
    /// During a rotation: where the peer's next-world tunnel listens.
    pub next_endpoint: Option<SocketAddr>,
}

/// Why a node is not a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// Its annotations are invalid.
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    /// Another node claims one of its keys.
    #[error(
        "public key {key} is also claimed by node(s) {}",
        name_list(other_nodes)
    )]
    DuplicateKey {
        key: PublicKey,
        other_nodes: Vec<String>,
    },
    /// It claims a key of this node.
    #[error("public key {key} belongs to this node")]
    KeyOfThisNode { key: PublicKey },
    /// Two views carry the same node name (the caller's caches disagree).
    #[error("more than one view of this node")]
    DuplicateNodeName,
}

impl RejectReason {
    /// The Kubernetes Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Annotation(e) => e.reason(),
            Self::DuplicateKey { .. } => "DuplicatePublicKey",
            Self::KeyOfThisNode { .. } => "PublicKeyOfThisNode",
            Self::DuplicateNodeName => "DuplicateNodeName",
        }
    }
}

/// A node that is not a peer, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedNode {
    /// The Node name.
    pub node: String,
    /// Why.
    pub error: RejectReason,
}

/// What a dropped prefix collided with.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConflictWith {
    /// A prefix of another node (possibly this node).
    Prefix { node: String, prefix: IpNet },
    /// An address of a node.
    NodeAddress { node: String, address: IpAddr },
}

/// A prefix dropped from a peer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PrefixConflict {
    /// The peer that lost the prefix.
    pub node: String,
    /// The dropped prefix.
    pub prefix: IpNet,
    /// What it overlapped.
    pub with: ConflictWith,
}

impl PrefixConflict {
    /// The Kubernetes Event reason.
    pub fn reason(&self) -> &'static str {
        match self.with {
            ConflictWith::Prefix { .. } => "OverlappingPodPrefix",
            ConflictWith::NodeAddress { .. } => "PodPrefixContainsNodeAddress",
        }
    }
}

impl fmt::Display for PrefixConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.with {
            ConflictWith::Prefix { node, prefix } => write!(
                f,
                "pod prefix {} of node {} overlaps {prefix} of node {node}; dropped",
                self.prefix, self.node
            ),
            ConflictWith::NodeAddress { node, address } => write!(
                f,
                "pod prefix {} of node {} contains address {address} of node {node}; dropped",
                self.prefix, self.node
            ),
        }
    }
}

/// The outcome of [`desired_peers`]. Every list is sorted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerSet {
    /// The peers, by node name.
    pub peers: Vec<DesiredPeer>,
    /// Nodes ignored, by node name (a node appears once, with its first problem).
    pub rejected: Vec<RejectedNode>,
    /// Nodes that have not published a key yet.
    pub pending: Vec<String>,
    /// Prefixes dropped from peers.
    pub conflicts: Vec<PrefixConflict>,
}

impl PeerSet {
    /// The peer for `node`, if it is one.
    pub fn peer(&self, node: &str) -> Option<&DesiredPeer> {
        self.peers
            .binary_search_by(|p| p.node.as_str().cmp(node))
            .ok()
            .map(|i| &self.peers[i])
    }
}

/// The peers of node `self_name`. The node's own keys are taken from its own view's annotations;
/// use [`desired_peers_with_local_keys`] to also protect keys not published yet.
pub fn desired_peers(self_name: &str, nodes: &[NodeView]) -> PeerSet {
    desired_peers_with_local_keys(self_name, &[], nodes)
}

/// [`desired_peers`], treating `local_keys` (e.g. every key in this node's keystore) as this
/// node's too: a node claiming one is rejected.
pub fn desired_peers_with_local_keys(
    self_name: &str,
    local_keys: &[PublicKey],
    nodes: &[NodeView],
) -> PeerSet {
    let mut by_name: BTreeMap<&str, Vec<&NodeView>> = BTreeMap::new();
    for view in nodes {
        by_name.entry(view.name.as_str()).or_default().push(view);
    }

    let mut own_keys: BTreeSet<PublicKey> = local_keys.iter().copied().collect();
    let mut own_prefixes = Vec::new();
    for view in by_name.get(self_name).into_iter().flatten() {
        own_keys.extend(published_keys(&view.annotations));
        own_prefixes.extend(view.pod_cidrs.iter().map(IpNet::trunc));
    }

    let mut set = PeerSet::default();
    let mut candidates: Vec<(&NodeView, NodeAnnotations)> = Vec::new();
    for (name, views) in &by_name {
        if *name == self_name {
            continue;
        }
        if views.len() > 1 {
            set.rejected.push(RejectedNode {
                node: name.to_string(),
                error: RejectReason::DuplicateNodeName,
            });
            continue;
        }
        let view = views[0];
        match NodeAnnotations::parse(&view.annotations, &view.addresses) {
            Ok(parsed) => candidates.push((view, parsed)),
            Err(AnnotationError::NotPublished) => set.pending.push(name.to_string()),
            Err(error) => set.rejected.push(RejectedNode {
                node: name.to_string(),
                error: error.into(),
            }),
        }
    }

    let mut claims: BTreeMap<PublicKey, Vec<&str>> = BTreeMap::new();
    for (view, parsed) in &candidates {
        for key in parsed.claimed_keys() {
            claims.entry(key).or_default().push(view.name.as_str());
        }
    }
    let mut accepted = Vec::new();
    for (view, parsed) in candidates {
        match key_conflict(&view.name, &parsed, &own_keys, &claims) {
            Some(error) => set.rejected.push(RejectedNode {
                node: view.name.clone(),
                error,
            }),
            None => accepted.push((view, parsed)),
        }
    }

    let prefixes = assign_prefixes(self_name, &own_prefixes, nodes, &accepted);
    for (view, parsed) in accepted {
        let (allowed_ips, mut conflicts) = prefixes
            .get(view.name.as_str())
            .cloned()
            .unwrap_or_default();
        set.conflicts.append(&mut conflicts);
        set.peers.push(DesiredPeer {
            node: view.name.clone(),
            public_key: parsed.public_key,
            endpoint: parsed.endpoint,
            allowed_ips,
            key_generation: parsed.key_generation,
            next_public_key: parsed.next_public_key,
            next_endpoint: parsed.next_endpoint,
        });
    }
    set.peers.sort_by(|a, b| a.node.cmp(&b.node));
    set.rejected.sort_by(|a, b| a.node.cmp(&b.node));
    set.pending.sort();
    set.conflicts.sort();
    set
}

/// At most five names, then a count: Event messages stay short however many nodes collide.
fn name_list(names: &[String]) -> String {
    let mut out = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        out.push_str(&format!(" and {} more", names.len() - 5));
    }
    out
}

/// The keys a node's own annotations publish, valid ones only.
fn published_keys(annotations: &BTreeMap<String, String>) -> Vec<PublicKey> {
    [ANNOTATION_PUBLIC_KEY, ANNOTATION_NEXT_PUBLIC_KEY]
        .into_iter()
        .filter_map(|a| annotations.get(a).and_then(|v| parse_key(a, v).ok()))
        .collect()
}

fn key_conflict(
    node: &str,
    parsed: &NodeAnnotations,
    own_keys: &BTreeSet<PublicKey>,
    claims: &BTreeMap<PublicKey, Vec<&str>>,
) -> Option<RejectReason> {
    for key in parsed.claimed_keys() {
        if own_keys.contains(&key) {
            return Some(RejectReason::KeyOfThisNode { key });
        }
    }
    for key in parsed.claimed_keys() {
        let others: Vec<String> = claims[&key]
            .iter()
            .filter(|n| **n != node)
            .map(|n| n.to_string())
            .collect();
        if !others.is_empty() {
            return Some(RejectReason::DuplicateKey {
                key,
                other_nodes: others,
            });
        }
    }
    None
}

/// Who holds a prefix in the overlap sweep.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Holder<'a> {
    /// A peer's pod prefix: dropped on any overlap.
    Peer(&'a str),
    /// This node's podCIDR: never dropped, wins against peers.
    Local(&'a str),
    /// A node address as a host prefix: never dropped, kills every prefix containing it.
    Address(&'a str),
}

/// Allowed IPs and conflicts per accepted peer.
fn assign_prefixes<'a>(
    self_name: &'a str,
    own_prefixes: &[IpNet],
    all_nodes: &'a [NodeView],
    accepted: &[(&'a NodeView, NodeAnnotations)],
) -> BTreeMap<&'a str, (Vec<IpNet>, Vec<PrefixConflict>)> {
    let mut items: Vec<(IpNet, Holder<'a>)> = Vec::new();
    for net in own_prefixes {
        items.push((*net, Holder::Local(self_name)));
    }
    for view in all_nodes {
        for addr in &view.addresses {
            items.push((IpNet::from(*addr), Holder::Address(view.name.as_str())));
        }
    }
    for (view, _) in accepted {
        for net in own_pod_prefixes(view) {
            items.push((net, Holder::Peer(view.name.as_str())));
        }
    }
    // Prefixes are nested or disjoint. Sorted by (family, network, length), each prefix comes
    // after every prefix containing it, so a stack of enclosing prefixes finds all overlaps in
    // one pass (the stack is at most 129 deep).
    items.sort();
    items.dedup();
    let mut dropped: BTreeSet<(IpNet, &str)> = BTreeSet::new();
    let mut conflicts: BTreeMap<&str, Vec<PrefixConflict>> = BTreeMap::new();
    let mut stack: Vec<(IpNet, Holder<'a>)> = Vec::new();
    for (net, holder) in &items {
        while let Some((top, _)) = stack.last() {
            if top.contains(net) {
                break;
            }
            stack.pop();
        }
        for (outer, outer_holder) in &stack {
            record_overlap(
                (*outer, *outer_holder),
                (*net, *holder),
                &mut dropped,
                &mut conflicts,
            );
        }
        stack.push((*net, *holder));
    }

    let mut out = BTreeMap::new();
    for (view, _) in accepted {
        let name = view.name.as_str();
        let mut kept: Vec<IpNet> = own_pod_prefixes(view)
            .into_iter()
            .filter(|net| !dropped.contains(&(*net, name)))
            .collect();
        kept.sort();
        kept.dedup();
        let mut node_conflicts = conflicts.remove(name).unwrap_or_default();
        node_conflicts.sort();
        node_conflicts.dedup();
        out.insert(name, (kept, node_conflicts));
    }
    out
}

/// A peer's podCIDRs (host bits cleared) plus host prefixes for pod IPs outside them, without
/// prefixes nested inside another of its own.
fn own_pod_prefixes(view: &NodeView) -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = view.pod_cidrs.iter().map(IpNet::trunc).collect();
    for ip in &view.pod_ips {
        nets.push(IpNet::from(*ip));
    }
    nets.sort();
    nets.dedup();
    let mut out: Vec<IpNet> = Vec::new();
    for net in nets {
        // Sorted: a containing prefix of the same family sorts before what it contains.
        if !out.iter().any(|outer| outer.contains(&net)) {
            out.push(net);
        }
    }
    out
}

fn record_overlap<'a>(
    outer: (IpNet, Holder<'a>),
    inner: (IpNet, Holder<'a>),
    dropped: &mut BTreeSet<(IpNet, &'a str)>,
    conflicts: &mut BTreeMap<&'a str, Vec<PrefixConflict>>,
) {
    let owner = |h: Holder<'a>| match h {
        Holder::Peer(n) | Holder::Local(n) | Holder::Address(n) => n,
    };
    if owner(outer.1) == owner(inner.1) {
        // A node's own prefixes nest harmlessly, and a node's pod prefix containing its own
        // address is handled below only for addresses.
        if !matches!((outer.1, inner.1), (Holder::Peer(_), Holder::Address(_))) {
            return;
        }
    }
    let mut drop = |victim: (IpNet, Holder<'a>), other: (IpNet, Holder<'a>)| {
        let Holder::Peer(node) = victim.1 else {
            return;
        };
        let with = match other.1 {
            Holder::Address(n) => ConflictWith::NodeAddress {
                node: n.to_string(),
                address: other.0.addr(),
            },
            Holder::Peer(n) | Holder::Local(n) => ConflictWith::Prefix {
                node: n.to_string(),
                prefix: other.0,
            },
        };
        dropped.insert((victim.0, node));
        conflicts.entry(node).or_default().push(PrefixConflict {
            node: node.to_string(),
            prefix: victim.0,
            with,
        });
    };
    match (outer.1, inner.1) {
        // Addresses are sentinels: only the prefix containing one is dropped.
        (_, Holder::Address(_)) => drop(outer, inner),
        (Holder::Address(_), _) => drop(inner, outer),
        _ => {
            drop(outer, inner);
            drop(inner, outer);
        }
    }
}
