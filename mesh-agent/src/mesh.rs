//! The applied side of the mesh: what this node's device and routing table hold, and the one
//! function that moves them to a wanted state. Only the reconciler task owns a [`Mesh`], so there is
//! a single writer for the device and the routes.
//!
//! Read back, then repair: every [`Mesh::apply`] first reads what the device and the routing table
//! really hold (the device's key, listen port and peers; the tunnel link's state; our routes and
//! rule) and compares the wanted state with that, not with the agent's own bookkeeping. A peer
//! removed by hand (`wg set <if> peer X remove`), a route deleted with `ip route del`, a device
//! process that restarted empty (a new ifindex, no key) are all repaired by the next pass. The only
//! bookkeeping is what the agent last wrote per peer, so an endpoint the device learned from an
//! authenticated packet (roaming) is not fought over.
//!
//! Restore, then garbage-collect: the caller only calls [`Mesh::apply`], which prunes, once the
//! Kubernetes caches have synced, so a restart never tears down tunnels just because the caches
//! were still empty; a restarted agent adopts the device it finds as it is.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ipnet::IpNet;
use wiremesh_keyexchange::{PrivateKey, PublicKey};

use crate::{
    datapath::{Datapath, DatapathError, DeviceSettings, PeerConfig, PeerStatus},
    routes::{Routes, RoutesError},
};

/// One failed step of an apply; the other steps still ran.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("peer {node}: {source}")]
    Peer {
        node: String,
        #[source]
        source: DatapathError,
    },
    #[error("device: {0}")]
    Device(#[source] DatapathError),
    #[error("routes: {0}")]
    Routes(#[source] RoutesError),
}

/// A peer the mesh wants, with the node it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedPeer {
    pub node: String,
    pub config: PeerConfig,
}

/// The whole wanted state of this node's part of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The mesh is on: our routing rule exists. Off: rule and table are removed.
    pub enabled: bool,
    /// Sorted by node name, unique keys, disjoint allowed IPs.
    pub peers: Vec<WantedPeer>,
    pub mtu: u32,
    pub listen_port: u16,
    /// Peers (by node) configured on the device whose prefixes this device does not route: a
    /// rotation sends to them through the other tunnel device (docs/rotation.md).
    pub unrouted: BTreeSet<String>,
}

/// What one apply did.
#[derive(Debug, Default)]
pub struct ApplyOutcome {
    pub peers_set: usize,
    pub peers_removed: usize,
    pub routes_added: usize,
    pub routes_removed: usize,
    /// Rules added or removed, plus routes removed with the table.
    pub rules_changed: usize,
    /// The device did not hold the keystore's key and was given it: `Some(None)` for a device
    /// without a key (freshly started), `Some(Some(k))` when it held another key `k`.
    pub key_replaced: Option<Option<PublicKey>>,
    /// The device has another ifindex than at the last pass (it was recreated): `(old, new)`.
    pub device_replaced: Option<(u32, u32)>,
    /// The device did not answer (its process is gone, its link deleted): nothing was applied.
    pub device_unreachable: bool,
    /// Peers this agent had configured that were missing or changed on the device.
    pub peers_repaired: usize,
    /// Routes this agent had installed that were missing from the routing table.
    pub routes_repaired: usize,
    pub errors: Vec<MeshError>,
}

impl ApplyOutcome {
    /// Whether anything changed on the device or in the routing table.
    pub fn changed(&self) -> bool {
        self.peers_set
            + self.peers_removed
            + self.routes_added
            + self.routes_removed
            + self.rules_changed
            > 0
            || self.key_replaced.is_some()
    }
}

/// See the module docs.
pub struct Mesh<R: Routes> {
    datapath: Arc<dyn Datapath>,
    routes: Arc<R>,
    private_key: PrivateKey,
    /// What this agent last wrote per peer (cleared when the device is replaced).
    written: BTreeMap<PublicKey, PeerConfig>,
    /// Wanted peers found on the device with exactly the wanted configuration at the last apply.
    in_sync: BTreeMap<PublicKey, PeerConfig>,
    /// Our routes as read back (and then changed) at the last apply.
    applied_routes: BTreeSet<IpNet>,
    ifindex: Option<u32>,
    /// The last handshake of every peer on the device at the last apply.
    handshakes: BTreeMap<PublicKey, std::time::SystemTime>,
}

impl<R: Routes> Mesh<R> {
    /// A mesh over `datapath` whose device must hold `private_key` (the keystore's: it wins over
    /// any other key found on the device). Changes nothing until [`Mesh::apply`].
    pub fn new(datapath: Arc<dyn Datapath>, routes: Arc<R>, private_key: PrivateKey) -> Self {
        Self {
            datapath,
            routes,
            private_key,
            written: BTreeMap::new(),
            in_sync: BTreeMap::new(),
            applied_routes: BTreeSet::new(),
            ifindex: None,
            handshakes: BTreeMap::new(),
        }
    }

    /// The key the device must hold from the next apply on (a rotation promoted the next key).
    pub fn set_private_key(&mut self, private_key: PrivateKey) {
        self.private_key = private_key;
    }

    /// The public half of the key the device must hold.
    pub fn public_key(&self) -> PublicKey {
        self.private_key.public_key()
    }

    /// The last handshake of each peer as read back at the last apply.
    pub fn last_handshake(&self, key: &PublicKey) -> Option<std::time::SystemTime> {
        self.handshakes.get(key).copied()
    }

    /// Takes this device out of service without deleting it: removes every peer and every route
    /// of ours through it (the old world after a rotation; its key no longer opens anything).
    /// A device that does not answer has nothing to flush.
    pub async fn flush(&mut self) -> Result<usize, MeshError> {
        let ifname = self.datapath.ifname().to_string();
        let status = match self.datapath.status() {
            Ok(status) => status,
            Err(_) => return Ok(0),
        };
        let mut changed = 0;
        for dst in self.routes.list(&ifname).await.map_err(MeshError::Routes)? {
            self.routes
                .del(&ifname, dst)
                .await
                .map_err(MeshError::Routes)?;
            changed += 1;
        }
        for peer in &status.peers {
            self.datapath
                .remove_peer(&peer.public_key)
                .map_err(|source| MeshError::Peer {
                    node: peer.public_key.fingerprint(),
                    source,
                })?;
            changed += 1;
        }
        self.written.clear();
        self.in_sync.clear();
        self.applied_routes.clear();
        self.handshakes.clear();
        Ok(changed)
    }

    /// The interface name.
    pub fn ifname(&self) -> &str {
        self.datapath.ifname()
    }

    /// The datapath, for status queries.
    pub fn datapath(&self) -> &Arc<dyn Datapath> {
        &self.datapath
    }

    /// Drives another device from now on (the datapath was re-selected); the next apply reads it
    /// back and configures it completely.
    pub fn replace_datapath(&mut self, datapath: Arc<dyn Datapath>) {
        self.datapath = datapath;
        self.written.clear();
        self.in_sync.clear();
        self.applied_routes.clear();
        self.ifindex = None;
    }

    /// Whether `peer` was on the device with exactly this configuration after the last apply.
    pub fn is_applied(&self, peer: &WantedPeer) -> bool {
        self.in_sync.get(&peer.config.public_key) == Some(&peer.config)
    }

    /// Routes the mesh holds through the tunnel after the last apply.
    pub fn applied_routes(&self) -> &BTreeSet<IpNet> {
        &self.applied_routes
    }

    /// Whether the device's `actual` peer matches `wanted`. The endpoint counts only when this
    /// agent did not itself write exactly `wanted` (then a different endpoint is roaming).
    fn matches(&self, actual: &PeerStatus, wanted: &PeerConfig) -> bool {
        let keepalive = |k: Option<u16>| k.filter(|k| *k > 0);
        let ips = |v: &[IpNet]| v.iter().copied().collect::<BTreeSet<IpNet>>();
        let wrote_this = self.written.get(&wanted.public_key) == Some(wanted);
        ips(&actual.allowed_ips) == ips(&wanted.allowed_ips)
            && keepalive(actual.persistent_keepalive) == keepalive(wanted.persistent_keepalive)
            && actual.has_preshared_key == wanted.preshared_key.is_some()
            && (wrote_this
                || (actual.endpoint == wanted.endpoint && wanted.preshared_key.is_none()))
    }

    /// Reads the device and the routing table back and makes them match `wanted`, pruning
    /// everything else of ours. Every step runs even if another fails; failures come back in
    /// [`ApplyOutcome::errors`] and the next apply retries them.
    pub async fn apply(&mut self, wanted: &Wanted) -> ApplyOutcome {
        let mut out = ApplyOutcome::default();
        let ifname = self.datapath.ifname().to_string();
        self.in_sync.clear();

        // The device as it is: unreachable means nothing else can be checked.
        let status = match self.datapath.status() {
            Ok(status) => status,
            Err(e) => {
                self.applied_routes.clear();
                out.device_unreachable = true;
                out.errors.push(MeshError::Device(e));
                return out;
            }
        };
        if self.ifindex != Some(status.ifindex) {
            if let Some(old) = self.ifindex {
                out.device_replaced = Some((old, status.ifindex));
            }
            self.ifindex = Some(status.ifindex);
            self.written.clear();
        }
        let own = self.private_key.public_key();
        if status.public_key != Some(own) {
            let settings = DeviceSettings {
                private_key: Some(self.private_key.clone()),
                ..DeviceSettings::default()
            };
            match self.datapath.configure(&settings) {
                Ok(()) => out.key_replaced = Some(status.public_key),
                Err(e) => out.errors.push(MeshError::Device(e)),
            }
        }
        if status.listen_port != wanted.listen_port {
            let settings = DeviceSettings {
                listen_port: Some(wanted.listen_port),
                ..DeviceSettings::default()
            };
            if let Err(e) = self.datapath.configure(&settings) {
                out.errors.push(MeshError::Device(e));
            }
        }
        match self.routes.link(&ifname).await {
            Ok(Some(link)) if link.is_ready(wanted.mtu) => {}
            Ok(_) => {
                if let Err(e) = self.routes.link_up(&ifname, wanted.mtu).await {
                    out.errors.push(MeshError::Routes(e));
                }
            }
            Err(e) => out.errors.push(MeshError::Routes(e)),
        }
        if wanted.enabled {
            match self.routes.ensure_rule().await {
                Ok(added) => out.rules_changed += added,
                Err(e) => out.errors.push(MeshError::Routes(e)),
            }
        }

        let actual_peers: BTreeMap<PublicKey, &PeerStatus> =
            status.peers.iter().map(|p| (p.public_key, p)).collect();
        self.handshakes = status
            .peers
            .iter()
            .filter_map(|p| p.last_handshake.map(|t| (p.public_key, t)))
            .collect();
        let actual_routes: BTreeSet<IpNet> = match self.routes.list(&ifname).await {
            Ok(routes) => routes.into_iter().collect(),
            Err(e) => {
                out.errors.push(MeshError::Routes(e));
                BTreeSet::new()
            }
        };
        let previous_routes = std::mem::replace(&mut self.applied_routes, actual_routes);

        let wanted_keys: BTreeSet<PublicKey> =
            wanted.peers.iter().map(|p| p.config.public_key).collect();
        let wanted_routes: BTreeSet<IpNet> = wanted
            .peers
            .iter()
            .filter(|p| !wanted.unrouted.contains(&p.node))
            .flat_map(|p| p.config.allowed_ips.iter().copied())
            .collect();

        // Routes first, then peers: traffic to a prefix that is going away stops being steered
        // into the tunnel before its peer disappears.
        let stale_routes: Vec<IpNet> = self
            .applied_routes
            .difference(&wanted_routes)
            .copied()
            .collect();
        for dst in stale_routes {
            match self.routes.del(&ifname, dst).await {
                Ok(()) => {
                    self.applied_routes.remove(&dst);
                    out.routes_removed += 1;
                }
                Err(e) => out.errors.push(MeshError::Routes(e)),
            }
        }
        for key in actual_peers.keys().filter(|k| !wanted_keys.contains(k)) {
            match self.datapath.remove_peer(key) {
                Ok(()) => {
                    tracing::info!(key = %key.fingerprint(), "removed peer");
                    self.written.remove(key);
                    out.peers_removed += 1;
                }
                Err(source) => out.errors.push(MeshError::Peer {
                    node: key.fingerprint(),
                    source,
                }),
            }
        }

        // Peers whose allowed IPs only shrink go first, so a prefix moving between two peers is
        // released by the old one before the new one claims it.
        let mut changed: Vec<&WantedPeer> = Vec::new();
        for peer in &wanted.peers {
            match actual_peers.get(&peer.config.public_key) {
                Some(actual) if self.matches(actual, &peer.config) => {
                    self.in_sync
                        .insert(peer.config.public_key, peer.config.clone());
                }
                Some(actual) => {
                    if self.written.get(&peer.config.public_key) == Some(&peer.config) {
                        out.peers_repaired += 1;
                        tracing::warn!(
                            peer = %peer.node,
                            key = %peer.config.public_key.fingerprint(),
                            device_allowed_ips = ?actual.allowed_ips,
                            "peer changed on the device behind the agent's back; repairing"
                        );
                    }
                    changed.push(peer);
                }
                None => {
                    if self.written.contains_key(&peer.config.public_key) {
                        out.peers_repaired += 1;
                        tracing::warn!(
                            peer = %peer.node,
                            key = %peer.config.public_key.fingerprint(),
                            "peer missing from the device; repairing"
                        );
                    }
                    changed.push(peer);
                }
            }
        }
        changed.sort_by_key(|p| {
            let previous: BTreeSet<IpNet> = actual_peers
                .get(&p.config.public_key)
                .map(|a| a.allowed_ips.iter().copied().collect())
                .unwrap_or_default();
            !p.config.allowed_ips.iter().all(|ip| previous.contains(ip))
        });
        for peer in changed {
            match self.datapath.set_peer(&peer.config) {
                Ok(()) => {
                    tracing::info!(
                        peer = %peer.node,
                        key = %peer.config.public_key.fingerprint(),
                        endpoint = %peer.config.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                        allowed_ips = ?peer.config.allowed_ips,
                        "configured peer"
                    );
                    self.written
                        .insert(peer.config.public_key, peer.config.clone());
                    self.in_sync
                        .insert(peer.config.public_key, peer.config.clone());
                    out.peers_set += 1;
                }
                Err(source) => out.errors.push(MeshError::Peer {
                    node: peer.node.clone(),
                    source,
                }),
            }
        }

        // Only prefixes whose peer is on the device get a route.
        for peer in &wanted.peers {
            if !self.is_applied(peer) || wanted.unrouted.contains(&peer.node) {
                continue;
            }
            for dst in &peer.config.allowed_ips {
                if self.applied_routes.contains(dst) {
                    continue;
                }
                if previous_routes.contains(dst) && out.device_replaced.is_none() {
                    out.routes_repaired += 1;
                    tracing::warn!(
                        peer = %peer.node,
                        route = %dst,
                        "route missing from the routing table; repairing"
                    );
                }
                match self.routes.add(&ifname, *dst).await {
                    Ok(()) => {
                        self.applied_routes.insert(*dst);
                        out.routes_added += 1;
                    }
                    Err(e) => out.errors.push(MeshError::Routes(e)),
                }
            }
        }

        if !wanted.enabled {
            // Off: our rule and whatever is left in our table go, so the routing the node had
            // before (a CNI's routes in the main table) is in force again.
            match self.routes.remove_rule_and_table().await {
                Ok(removed) => {
                    out.rules_changed += removed;
                    if removed > 0 {
                        self.applied_routes.clear();
                    }
                }
                Err(e) => out.errors.push(MeshError::Routes(e)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
