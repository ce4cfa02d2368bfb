//! The desired peer set: from every Node's view (annotations, addresses, podCIDRs, pod IPs) to the
//! peers this node should have, the nodes it must ignore and why, and the nodes not joined yet.
//!
//! Deterministic: the result depends only on the set of views, not on their order. Hostile or
//! broken input only ever costs the node that published it (and, for a stolen key or an
//! overlapping podCIDR, the node it collides with), never other peers.
//!
//! Decisions an operator can rely on:
//! - Two nodes that claim the same key (public or next) are both rejected: the datapath
//!   identifies a peer by its static key, so either claim could be the impostor. A node claiming a
//!   key of this node is rejected as well.
//! - Pod prefixes (podCIDRs, and pod IPs outside them) come from [`pod_claims`]: each claim must
//!   pass the [`AddressPolicy`] (never a reserved, service or out-of-range address, a pod IP only
//!   inside its node's podCIDRs), and overlaps are resolved there: a prefix containing a node
//!   address is dropped, this node's prefixes win, an assigned podCIDR wins over another node's pod
//!   IP inside it, overlapping podCIDRs are dropped from both, and a pod IP claimed twice goes to
//!   the oldest pod. Every refused or dropped claim is reported in [`PeerSet::conflicts`].
//!   Dropped means no tunnel route: Strict mode drops that traffic, Permissive sends it in
//!   plaintext as without wiremesh.
//! - A node whose endpoint annotation names an address it no longer has (its underlay address
//!   changed; its agent republishes when it notices) stays a peer, sent to at its own address of
//!   the same family with the annotated port ([`NodeAnnotations::parse_for_peering`]): never at
//!   an address outside its `status.addresses`, and node addresses are sentinels of the prefix
//!   sweep, so none is ever routed into the tunnel. Reported in [`PeerSet::stale_endpoints`].

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;

use crate::{
    annotations::{
        ANNOTATION_NEXT_PUBLIC_KEY, ANNOTATION_PUBLIC_KEY, AnnotationError, MovedEndpoint,
        NodeAnnotations, parse_key,
    },
    claims::{AddressPolicy, ClaimError, ClaimKind},
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
    /// Unix seconds of the oldest pod holding each pod IP (`metadata.creationTimestamp`); an IP
    /// missing here counts as the newest. Decides which of two nodes claiming one IP keeps it.
    pub pod_ip_created: BTreeMap<IpAddr, i64>,
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
    /// The same pod IP, claimed for an older pod by another node.
    DuplicatePodIp { node: String },
    /// The [`AddressPolicy`] refuses it.
    Policy(ClaimError),
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
        match &self.with {
            ConflictWith::Prefix { .. } => "OverlappingPodPrefix",
            ConflictWith::NodeAddress { .. } => "PodPrefixContainsNodeAddress",
            ConflictWith::DuplicatePodIp { .. } => "DuplicatePodIP",
            ConflictWith::Policy(error) => error.reason(),
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
            ConflictWith::DuplicatePodIp { node } => write!(
                f,
                "pod IP {} of node {} is also claimed, for an older pod, by node {node}; dropped",
                self.prefix.addr(),
                self.node
            ),
            ConflictWith::Policy(error) => write!(
                f,
                "pod prefix {} of node {} refused: {error}",
                self.prefix, self.node
            ),
        }
    }
}

/// A peer whose endpoint annotation is not one of its Node's addresses any more: it is kept,
/// sent to at `endpoint.used` (one of its addresses) until its agent republishes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaleEndpoint {
    /// The Node name.
    pub node: String,
    /// The annotated endpoint and the one used.
    pub endpoint: MovedEndpoint,
}

impl StaleEndpoint {
    /// The Kubernetes Event reason. Not a rejection: the node stays a peer.
    pub fn reason(&self) -> &'static str {
        "StaleEndpoint"
    }
}

impl fmt::Display for StaleEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}: {}", self.node, self.endpoint)
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
    /// Pod claims refused or dropped, of any node (this one included).
    pub conflicts: Vec<PrefixConflict>,
    /// Peers whose annotated endpoint (or next endpoint) is not one of their addresses any
    /// more, and the address used instead (the peer in [`peers`](Self::peers) has it).
    pub stale_endpoints: Vec<StaleEndpoint>,
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
/// node's too: a node claiming one is rejected. Pod claims are checked against the default
/// [`AddressPolicy`].
pub fn desired_peers_with_local_keys(
    self_name: &str,
    local_keys: &[PublicKey],
    nodes: &[NodeView],
) -> PeerSet {
    let claims = pod_claims(self_name, &AddressPolicy::default(), nodes);
    desired_peers_with_claims(self_name, local_keys, nodes, &claims)
}

/// [`desired_peers_with_local_keys`] with the pod prefixes already decided by [`pod_claims`]
/// (so the ipcache and the peers use one decision).
pub fn desired_peers_with_claims(
    self_name: &str,
    local_keys: &[PublicKey],
    nodes: &[NodeView],
    claims: &PodClaims,
) -> PeerSet {
    let mut by_name: BTreeMap<&str, Vec<&NodeView>> = BTreeMap::new();
    for view in nodes {
        by_name.entry(view.name.as_str()).or_default().push(view);
    }

    let mut own_keys: BTreeSet<PublicKey> = local_keys.iter().copied().collect();
    for view in by_name.get(self_name).into_iter().flatten() {
        own_keys.extend(published_keys(&view.annotations));
    }

    let mut set = PeerSet::default();
    let mut candidates: Vec<(&NodeView, NodeAnnotations, Vec<MovedEndpoint>)> = Vec::new();
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
        match NodeAnnotations::parse_for_peering(&view.annotations, &view.addresses) {
            Ok((parsed, moved)) => candidates.push((view, parsed, moved)),
            Err(AnnotationError::NotPublished) => set.pending.push(name.to_string()),
            Err(error) => set.rejected.push(RejectedNode {
                node: name.to_string(),
                error: error.into(),
            }),
        }
    }

    let mut key_claims: BTreeMap<PublicKey, Vec<&str>> = BTreeMap::new();
    for (view, parsed, _) in &candidates {
        for key in parsed.claimed_keys() {
            key_claims.entry(key).or_default().push(view.name.as_str());
        }
    }
    let mut accepted = Vec::new();
    for (view, parsed, moved) in candidates {
        match key_conflict(&view.name, &parsed, &own_keys, &key_claims) {
            Some(error) => set.rejected.push(RejectedNode {
                node: view.name.clone(),
                error,
            }),
            None => accepted.push((view, parsed, moved)),
        }
    }

    set.conflicts = claims.conflicts.clone();
    for (view, parsed, moved) in accepted {
        set.stale_endpoints
            .extend(moved.into_iter().map(|endpoint| StaleEndpoint {
                node: view.name.clone(),
                endpoint,
            }));
        set.peers.push(DesiredPeer {
            node: view.name.clone(),
            public_key: parsed.public_key,
            endpoint: parsed.endpoint,
            allowed_ips: claims.prefixes(&view.name).to_vec(),
            key_generation: parsed.key_generation,
            next_public_key: parsed.next_public_key,
            next_endpoint: parsed.next_endpoint,
        });
    }
    set.peers.sort_by(|a, b| a.node.cmp(&b.node));
    set.rejected.sort_by(|a, b| a.node.cmp(&b.node));
    set.pending.sort();
    set.conflicts.sort();
    set.stale_endpoints.sort();
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

/// Who holds a prefix in the overlap sweep, strongest first.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Holder<'a> {
    /// A node address as a host prefix: never dropped, drops every prefix containing it.
    Address(&'a str),
    /// This node's podCIDR or pod IP: never dropped, wins against every remote claim.
    Local(&'a str),
    /// Another node's podCIDR: dropped when it overlaps another podCIDR (either could be
    /// wrong), ours or a node address; wins against pod IPs.
    Cidr(&'a str),
    /// Another node's pod IP outside its podCIDRs: loses against every other holder except an
    /// equal claim of a younger pod (the oldest pod, then the lowest node name, wins).
    PodIp { created: i64, node: &'a str },
}

impl<'a> Holder<'a> {
    fn node(self) -> &'a str {
        match self {
            Self::Address(n) | Self::Local(n) | Self::Cidr(n) | Self::PodIp { node: n, .. } => n,
        }
    }
}

/// The pod prefixes every node may hold, after [`pod_claims`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodClaims {
    /// Accepted prefixes per node (podCIDRs and host prefixes of pod IPs outside them), sorted,
    /// none nested in another of the same node, none overlapping another node's.
    pub accepted: BTreeMap<String, Vec<IpNet>>,
    /// Claims refused or dropped, sorted.
    pub conflicts: Vec<PrefixConflict>,
}

impl PodClaims {
    /// The accepted prefixes of `node`.
    pub fn prefixes(&self, node: &str) -> &[IpNet] {
        self.accepted
            .get(node)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Whether `ip`, claimed by a pod on `node`, lies inside one of that node's accepted
    /// prefixes: the test the ipcache applies to each pod address.
    pub fn accepts(&self, node: &str, ip: IpAddr) -> bool {
        let host = IpNet::from(ip);
        self.prefixes(node).iter().any(|p| p.contains(&host))
    }
}

/// Decides which pod prefixes each node may hold. Every claim first passes
/// [`AddressPolicy::check`]; then one sweep over all claims and all node addresses resolves
/// overlaps:
/// - a prefix containing any node's address is dropped (an underlay address routed into the
///   tunnel loops it into itself; this also removes hostNetwork pod IPs);
/// - this node's podCIDRs and pod IPs are never dropped; a remote claim overlapping them is;
/// - a podCIDR wins over a pod IP of another node inside it (one bad pod claim never costs a
///   node its assigned range);
/// - two podCIDRs that overlap are both dropped (either could be the impostor);
/// - two nodes claiming the same pod IP: the oldest pod keeps it (then the lowest node name).
pub fn pod_claims(self_name: &str, policy: &AddressPolicy, nodes: &[NodeView]) -> PodClaims {
    let mut by_name: BTreeMap<&str, Vec<&NodeView>> = BTreeMap::new();
    for view in nodes {
        by_name.entry(view.name.as_str()).or_default().push(view);
    }
    let mut out = PodClaims::default();
    let mut items: Vec<(IpNet, Holder<'_>)> = Vec::new();
    for view in nodes {
        for addr in &view.addresses {
            items.push((IpNet::from(*addr), Holder::Address(view.name.as_str())));
        }
    }
    for (name, views) in &by_name {
        let local = *name == self_name;
        // Two views of one remote name: the caches disagree; claim nothing for it. Every view
        // of this node's own name is ours (nothing may overlap any of them).
        if !local && views.len() > 1 {
            continue;
        }
        for (view, (net, kind)) in views
            .iter()
            .flat_map(|view| own_pod_prefixes(view).into_iter().map(move |c| (*view, c)))
        {
            if let Err(error) = policy.check(&view.pod_cidrs, net, kind) {
                out.conflicts.push(PrefixConflict {
                    node: name.to_string(),
                    prefix: net,
                    with: ConflictWith::Policy(error),
                });
                continue;
            }
            let holder = match (local, kind) {
                (true, _) => Holder::Local(name),
                (false, ClaimKind::PodCidr) => Holder::Cidr(name),
                (false, ClaimKind::PodIp) => Holder::PodIp {
                    created: view
                        .pod_ip_created
                        .get(&net.addr())
                        .copied()
                        .unwrap_or(i64::MAX),
                    node: name,
                },
            };
            items.push((net, holder));
        }
    }
    // Prefixes are nested or disjoint. Sorted by (family, network, length), each prefix comes
    // after every prefix containing it, so a stack of enclosing prefixes finds all overlaps in
    // one pass (the stack is at most 129 deep).
    items.sort();
    items.dedup();
    let mut dropped: BTreeSet<(IpNet, &str)> = BTreeSet::new();
    let mut stack: Vec<(IpNet, Holder<'_>)> = Vec::new();
    for (net, holder) in &items {
        while let Some((top, _)) = stack.last() {
            if top.contains(net) {
                break;
            }
            stack.pop();
        }
        for outer in &stack {
            record_overlap(*outer, (*net, *holder), &mut dropped, &mut out.conflicts);
        }
        stack.push((*net, *holder));
    }
    for (net, holder) in items {
        if matches!(holder, Holder::Address(_)) || dropped.contains(&(net, holder.node())) {
            continue;
        }
        out.accepted
            .entry(holder.node().to_string())
            .or_default()
            .push(net);
    }
    for prefixes in out.accepted.values_mut() {
        prefixes.sort();
        prefixes.dedup();
    }
    out.conflicts.sort();
    out.conflicts.dedup();
    out
}

/// A node's podCIDRs (host bits cleared) plus host prefixes for pod IPs outside them, without
/// prefixes nested inside another of its own.
fn own_pod_prefixes(view: &NodeView) -> Vec<(IpNet, ClaimKind)> {
    let mut nets: Vec<(IpNet, ClaimKind)> = view
        .pod_cidrs
        .iter()
        .map(|n| (n.trunc(), ClaimKind::PodCidr))
        .collect();
    for ip in &view.pod_ips {
        nets.push((IpNet::from(*ip), ClaimKind::PodIp));
    }
    nets.sort();
    nets.dedup_by(|a, b| a.0 == b.0);
    let mut out: Vec<(IpNet, ClaimKind)> = Vec::new();
    for (net, kind) in nets {
        // Sorted: a containing prefix of the same family sorts before what it contains.
        if !out.iter().any(|(outer, _)| outer.contains(&net)) {
            out.push((net, kind));
        }
    }
    out
}

/// Applies the rules of [`pod_claims`] to one pair of overlapping prefixes (`outer` contains
/// `inner`).
fn record_overlap<'a>(
    outer: (IpNet, Holder<'a>),
    inner: (IpNet, Holder<'a>),
    dropped: &mut BTreeSet<(IpNet, &'a str)>,
    conflicts: &mut Vec<PrefixConflict>,
) {
    let mut drop = |victim: (IpNet, Holder<'a>), other: (IpNet, Holder<'a>)| {
        let node = match victim.1 {
            Holder::Cidr(n) | Holder::PodIp { node: n, .. } => n,
            Holder::Address(_) | Holder::Local(_) => return,
        };
        let with = match other.1 {
            Holder::Address(n) => ConflictWith::NodeAddress {
                node: n.to_string(),
                address: other.0.addr(),
            },
            Holder::PodIp { node: n, .. } if matches!(victim.1, Holder::PodIp { .. }) => {
                ConflictWith::DuplicatePodIp {
                    node: n.to_string(),
                }
            }
            Holder::Local(n) | Holder::Cidr(n) | Holder::PodIp { node: n, .. } => {
                ConflictWith::Prefix {
                    node: n.to_string(),
                    prefix: other.0,
                }
            }
        };
        dropped.insert((victim.0, node));
        conflicts.push(PrefixConflict {
            node: node.to_string(),
            prefix: victim.0,
            with,
        });
    };
    if outer.1.node() == inner.1.node() {
        // A node's own prefixes nest harmlessly; only its pod prefix containing (or equal to) its
        // own address is dropped (hostNetwork pod IPs).
        match (outer.1, inner.1) {
            (_, Holder::Address(_)) => drop(outer, inner),
            (Holder::Address(_), _) => drop(inner, outer),
            _ => {}
        }
        return;
    }
    match (outer.1, inner.1) {
        // Addresses are sentinels: only the prefix containing one is dropped.
        (_, Holder::Address(_)) => drop(outer, inner),
        (Holder::Address(_), _) => drop(inner, outer),
        (Holder::Local(_), _) => drop(inner, outer),
        (_, Holder::Local(_)) => drop(outer, inner),
        (Holder::Cidr(_), Holder::Cidr(_)) => {
            drop(outer, inner);
            drop(inner, outer);
        }
        (Holder::Cidr(_), Holder::PodIp { .. }) => drop(inner, outer),
        (Holder::PodIp { .. }, Holder::Cidr(_)) => drop(outer, inner),
        (
            Holder::PodIp {
                created: a,
                node: na,
            },
            Holder::PodIp {
                created: b,
                node: nb,
            },
        ) => {
            // Equal host prefixes: the younger claim loses.
            if (a, na) < (b, nb) {
                drop(inner, outer);
            } else {
                drop(outer, inner);
            }
        }
    }
}
