//! The applied side of the mesh: what this node's device and routing table hold, and the one
//! function that moves them to a wanted state. Only the reconciler task owns a [`Mesh`], so there is
//! a single writer for the device and the routes.
//!
//! Restore, then garbage-collect: [`Mesh::restore`] reads the peers and routes that already exist
//! (left by an earlier run, e.g. a kernel device that outlived the agent) without touching them;
//! the caller only calls [`Mesh::apply`], which prunes, once the Kubernetes caches have synced, so
//! a restart never tears down tunnels just because the caches were still empty.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ipnet::IpNet;
use wiremesh_keyexchange::PublicKey;

use crate::{
    datapath::{Datapath, DatapathError, DeviceSettings, PeerConfig},
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
    /// Sorted by node name, unique keys, disjoint allowed IPs.
    pub peers: Vec<WantedPeer>,
    pub mtu: u32,
    pub listen_port: u16,
}

/// A peer on the device. `config` is `None` for peers found at restore, whose exact
/// configuration (endpoint as configured, keepalive, PSK) is unknown: the first apply rewrites them.
#[derive(Debug, Clone)]
struct AppliedPeer {
    node: Option<String>,
    config: Option<PeerConfig>,
}

/// What one apply did.
#[derive(Debug, Default)]
pub struct ApplyOutcome {
    pub peers_set: usize,
    pub peers_removed: usize,
    pub routes_added: usize,
    pub routes_removed: usize,
    pub errors: Vec<MeshError>,
}

impl ApplyOutcome {
    /// Whether anything changed on the device or in the routing table.
    pub fn changed(&self) -> bool {
        self.peers_set + self.peers_removed + self.routes_added + self.routes_removed > 0
    }
}

/// See the module docs.
pub struct Mesh<R: Routes> {
    datapath: Arc<dyn Datapath>,
    routes: Arc<R>,
    peers: BTreeMap<PublicKey, AppliedPeer>,
    applied_routes: BTreeSet<IpNet>,
    mtu: Option<u32>,
    listen_port: Option<u16>,
}

impl<R: Routes> Mesh<R> {
    /// Reads the device's peers and our routes through its interface, changing nothing.
    pub async fn restore(datapath: Arc<dyn Datapath>, routes: Arc<R>) -> Result<Self, MeshError> {
        let status = datapath.status().map_err(MeshError::Device)?;
        let peers = status
            .peers
            .iter()
            .map(|p| {
                (
                    p.public_key,
                    AppliedPeer {
                        node: None,
                        config: None,
                    },
                )
            })
            .collect();
        let applied_routes = routes
            .list(datapath.ifname())
            .await
            .map_err(MeshError::Routes)?
            .into_iter()
            .collect();
        Ok(Self {
            datapath,
            routes,
            peers,
            applied_routes,
            mtu: None,
            listen_port: Some(status.listen_port).filter(|p| *p != 0),
        })
    }

    /// The interface name.
    pub fn ifname(&self) -> &str {
        self.datapath.ifname()
    }

    /// The datapath, for status queries.
    pub fn datapath(&self) -> &Arc<dyn Datapath> {
        &self.datapath
    }

    /// Peers on the device: key and node name (unknown for restored, not yet re-applied peers).
    pub fn applied_peers(&self) -> impl Iterator<Item = (&PublicKey, Option<&str>)> {
        self.peers.iter().map(|(k, p)| (k, p.node.as_deref()))
    }

    /// Whether `peer` is on the device with exactly this configuration.
    pub fn is_applied(&self, peer: &WantedPeer) -> bool {
        self.peers
            .get(&peer.config.public_key)
            .and_then(|a| a.config.as_ref())
            == Some(&peer.config)
    }

    /// Routes the mesh holds through the tunnel.
    pub fn applied_routes(&self) -> &BTreeSet<IpNet> {
        &self.applied_routes
    }

    /// Makes device and routes match `wanted`, pruning everything else of ours. Every step runs
    /// even if another fails; failures come back in [`ApplyOutcome::errors`] and the next apply
    /// retries them (state is only recorded as applied when the call succeeded).
    pub async fn apply(&mut self, wanted: &Wanted) -> ApplyOutcome {
        let mut out = ApplyOutcome::default();
        let ifname = self.datapath.ifname().to_string();

        if self.mtu != Some(wanted.mtu) {
            match self.routes.link_up(&ifname, wanted.mtu).await {
                Ok(()) => self.mtu = Some(wanted.mtu),
                Err(e) => out.errors.push(MeshError::Routes(e)),
            }
        }
        if self.listen_port != Some(wanted.listen_port) {
            let settings = DeviceSettings {
                listen_port: Some(wanted.listen_port),
                ..DeviceSettings::default()
            };
            match self.datapath.configure(&settings) {
                Ok(()) => self.listen_port = Some(wanted.listen_port),
                Err(e) => out.errors.push(MeshError::Device(e)),
            }
        }

        let wanted_keys: BTreeSet<PublicKey> =
            wanted.peers.iter().map(|p| p.config.public_key).collect();
        let wanted_routes: BTreeSet<IpNet> = wanted
            .peers
            .iter()
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
        let stale_peers: Vec<PublicKey> = self
            .peers
            .keys()
            .filter(|k| !wanted_keys.contains(k))
            .copied()
            .collect();
        for key in stale_peers {
            let node = self.peers[&key]
                .node
                .clone()
                .unwrap_or_else(|| key.fingerprint());
            match self.datapath.remove_peer(&key) {
                Ok(()) => {
                    tracing::info!(peer = %node, key = %key.fingerprint(), "removed peer");
                    self.peers.remove(&key);
                    out.peers_removed += 1;
                }
                Err(source) => out.errors.push(MeshError::Peer { node, source }),
            }
        }

        // Peers whose allowed IPs only shrink go first, so a prefix moving between two peers is
        // released by the old one before the new one claims it.
        let mut changed: Vec<&WantedPeer> = wanted
            .peers
            .iter()
            .filter(|p| {
                self.peers
                    .get(&p.config.public_key)
                    .and_then(|a| a.config.as_ref())
                    != Some(&p.config)
            })
            .collect();
        changed.sort_by_key(|p| {
            let previous: BTreeSet<IpNet> = self
                .peers
                .get(&p.config.public_key)
                .and_then(|a| a.config.as_ref())
                .map(|c| c.allowed_ips.iter().copied().collect())
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
                    self.peers.insert(
                        peer.config.public_key,
                        AppliedPeer {
                            node: Some(peer.node.clone()),
                            config: Some(peer.config.clone()),
                        },
                    );
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
            let on_device = self
                .peers
                .get(&peer.config.public_key)
                .and_then(|a| a.config.as_ref())
                == Some(&peer.config);
            if !on_device {
                continue;
            }
            for dst in &peer.config.allowed_ips {
                if self.applied_routes.contains(dst) {
                    continue;
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
        out
    }
}

#[cfg(test)]
mod tests;
