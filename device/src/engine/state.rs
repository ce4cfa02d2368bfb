//! The engine's configuration state: keys, the UDP endpoint, peers, the receiver-index map and
//! the allowed-IPs table, plus the one function that changes it ([`DeviceState::apply`]). The
//! datapath workers read it under a read lock once per batch; UAPI `set` and the agent's
//! `Datapath` calls take the write lock.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
};

use boringtun::{
    noise::{Tunn, rate_limiter::RateLimiter},
    x25519::{PublicKey as XPublic, StaticSecret},
};
use ipnet::IpNet;
use wiremesh_keyexchange::PublicKey;
use wiremesh_wgctrl::uapi::parse::{PeerUpdate, SetRequest};
use zeroize::Zeroizing;

use super::{allowed_ips::AllowedIps, int_hash::IntHashBuilder, io::UdpEndpoint};

/// Handshake messages per second (all peers) before the responder asks for cookies. Each
/// initiation is counted twice (device-level check, then inside the peer's `Tunn`).
pub(crate) const HANDSHAKE_RATE_LIMIT: u64 = 200;

/// One peer's live state. `inner` is the single-writer lock around boringtun's `Tunn`.
pub(crate) struct Peer {
    pub public_key: PublicKey,
    /// Our 24-bit receiver index prefix for this peer (boringtun shifts it left by 8).
    pub index: u32,
    pub inner: Mutex<PeerInner>,
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Milliseconds since engine start of the last datagram sent to this peer.
    pub last_tx_ms: AtomicU64,
    /// Persistent keepalive interval in seconds, 0 = off (we run it ourselves so it can be
    /// changed without dropping the session).
    pub keepalive: AtomicU32,
    /// Send a keepalive at the next timer tick (set when keepalive is switched on).
    pub keepalive_now: AtomicBool,
}

pub(crate) struct PeerInner {
    /// `None` while the device has no private key.
    pub tunn: Option<Tunn>,
    /// Configured, or learned from the last authenticated datagram (roaming).
    pub endpoint: Option<SocketAddr>,
}

impl Peer {
    pub fn lock(&self) -> MutexGuard<'_, PeerInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Configuration kept beside the live peer.
pub(crate) struct PeerEntry {
    pub peer: Arc<Peer>,
    pub allowed_ips: Vec<IpNet>,
    pub preshared_key: Option<Zeroizing<[u8; 32]>>,
}

/// Our static identity.
pub(crate) struct Identity {
    pub secret: StaticSecret,
    pub public: XPublic,
    pub rate_limiter: Arc<RateLimiter>,
}

/// See the module docs.
pub(crate) struct DeviceState {
    pub identity: Option<Identity>,
    pub fwmark: u32,
    pub udp: Arc<UdpEndpoint>,
    pub peers: BTreeMap<PublicKey, PeerEntry>,
    pub by_index: HashMap<u32, Arc<Peer>, IntHashBuilder>,
    pub table: AllowedIps<Arc<Peer>>,
}

/// Why a change was refused; maps to a UAPI errno.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error("cannot bind UDP port {port}: {source}")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set fwmark {mark}: {source}")]
    Fwmark {
        mark: u32,
        #[source]
        source: std::io::Error,
    },
}

impl DeviceState {
    pub fn new(udp: Arc<UdpEndpoint>) -> Self {
        Self {
            identity: None,
            fwmark: 0,
            udp,
            peers: BTreeMap::new(),
            by_index: HashMap::default(),
            table: AllowedIps::default(),
        }
    }

    /// Applies a parsed `set` request. A new UDP socket (port change) is bound by the caller
    /// beforehand and passed in, so that a bind failure changes nothing.
    pub fn apply(
        &mut self,
        req: &SetRequest,
        new_udp: Option<Arc<UdpEndpoint>>,
    ) -> Result<Option<Arc<UdpEndpoint>>, ApplyError> {
        let mut old_udp = None;
        if let Some(udp) = new_udp {
            old_udp = Some(std::mem::replace(&mut self.udp, udp));
        }
        if let Some(mark) = req.fwmark
            && (mark != self.fwmark || old_udp.is_some())
        {
            self.udp
                .set_fwmark(mark)
                .map_err(|source| ApplyError::Fwmark { mark, source })?;
            self.fwmark = mark;
        }
        if let Some(key) = &req.private_key {
            self.set_private_key(if key.is_zero() { None } else { Some(*key.0) });
        }
        if req.replace_peers {
            let keys: Vec<PublicKey> = self.peers.keys().copied().collect();
            for key in keys {
                self.remove_peer(&key);
            }
        }
        for update in &req.peers {
            self.apply_peer(update);
        }
        Ok(old_udp)
    }

    fn set_private_key(&mut self, key: Option<[u8; 32]>) {
        let key = key.map(Zeroizing::new);
        if let (Some(new), Some(cur)) = (&key, &self.identity)
            && **new == cur.secret.to_bytes()
        {
            return;
        }
        self.identity = key.map(|bytes| {
            let secret = StaticSecret::from(*bytes);
            let public = XPublic::from(&secret);
            let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
            Identity {
                secret,
                public,
                rate_limiter,
            }
        });
        // A peer with our own public key makes no sense (wireguard-go drops it too).
        if let Some(id) = &self.identity {
            let own = PublicKey::from_bytes(id.public.to_bytes());
            if self.peers.contains_key(&own) {
                self.remove_peer(&own);
            }
        }
        for entry in self.peers.values() {
            let mut inner = entry.peer.lock();
            match (&self.identity, inner.tunn.as_mut()) {
                (None, _) => inner.tunn = None,
                (Some(id), Some(tunn)) => {
                    tunn.set_static_private(
                        id.secret.clone(),
                        id.public,
                        Some(id.rate_limiter.clone()),
                    );
                }
                (Some(id), None) => {
                    inner.tunn = Some(new_tunn(id, &entry.peer, entry.preshared_key.as_deref()));
                }
            }
        }
    }

    fn apply_peer(&mut self, update: &PeerUpdate) {
        let key = PublicKey::from_bytes(update.public_key);
        if let Some(id) = &self.identity
            && id.public.to_bytes() == update.public_key
        {
            return;
        }
        if update.remove {
            self.remove_peer(&key);
            return;
        }
        if !self.peers.contains_key(&key) {
            if update.update_only {
                return;
            }
            let index = self.free_index();
            let peer = Arc::new(Peer {
                public_key: key,
                index,
                inner: Mutex::new(PeerInner {
                    tunn: None,
                    endpoint: None,
                }),
                rx_bytes: AtomicU64::new(0),
                tx_bytes: AtomicU64::new(0),
                last_tx_ms: AtomicU64::new(0),
                keepalive: AtomicU32::new(0),
                keepalive_now: AtomicBool::new(false),
            });
            if let Some(id) = &self.identity {
                peer.lock().tunn = Some(new_tunn(id, &peer, None));
            }
            self.by_index.insert(index, peer.clone());
            self.peers.insert(
                key,
                PeerEntry {
                    peer,
                    allowed_ips: Vec::new(),
                    preshared_key: None,
                },
            );
        }
        let identity = self.identity.as_ref();
        let Some(entry) = self.peers.get_mut(&key) else {
            return;
        };
        if let Some(psk) = &update.preshared_key {
            let new = if psk.is_zero() {
                None
            } else {
                Some(Zeroizing::new(*psk.0))
            };
            if new != entry.preshared_key {
                entry.preshared_key = new;
                // boringtun takes the PSK only at construction: the next handshake uses it.
                if let Some(id) = identity {
                    entry.peer.lock().tunn =
                        Some(new_tunn(id, &entry.peer, entry.preshared_key.as_deref()));
                }
            }
        }
        if let Some(ep) = update.endpoint {
            entry.peer.lock().endpoint = Some(ep);
        }
        if let Some(secs) = update.persistent_keepalive {
            let old = entry
                .peer
                .keepalive
                .swap(u32::from(secs), Ordering::Relaxed);
            if old == 0 && secs != 0 {
                entry.peer.keepalive_now.store(true, Ordering::Relaxed);
            }
        }
        let peer = entry.peer.clone();
        if update.replace_allowed_ips {
            for net in std::mem::take(&mut entry.allowed_ips) {
                self.table.remove(net);
            }
        }
        for net in &update.allowed_ips {
            if let Some(prev) = self.table.insert(*net, peer.clone())
                && let Some(prev_entry) = self.peers.get_mut(&prev.public_key)
            {
                prev_entry.allowed_ips.retain(|n| n != net);
            }
            if let Some(entry) = self.peers.get_mut(&key)
                && !entry.allowed_ips.contains(net)
            {
                entry.allowed_ips.push(*net);
            }
        }
    }

    pub fn remove_peer(&mut self, key: &PublicKey) {
        if let Some(entry) = self.peers.remove(key) {
            for net in &entry.allowed_ips {
                self.table.remove(*net);
            }
            self.by_index.remove(&entry.peer.index);
            // Drop the sessions now, not when the last worker lets go of the Arc.
            entry.peer.lock().tunn = None;
        }
    }

    fn free_index(&self) -> u32 {
        loop {
            let mut b = [0u8; 4];
            // Falls back to a counter-like value if the random source fails; uniqueness is what
            // matters here, not secrecy.
            if getrandom::fill(&mut b).is_err() {
                b = (self.by_index.len() as u32 + 1).to_le_bytes();
            }
            let idx = u32::from_le_bytes(b) & 0x00ff_ffff;
            if !self.by_index.contains_key(&idx) {
                return idx;
            }
        }
    }
}

fn new_tunn(id: &Identity, peer: &Peer, psk: Option<&[u8; 32]>) -> Tunn {
    Tunn::new(
        id.secret.clone(),
        XPublic::from(*peer.public_key.as_bytes()),
        psk.copied(),
        None,
        peer.index,
        Some(id.rate_limiter.clone()),
    )
}

#[cfg(test)]
mod tests;
