//! An in-memory [`Datapath`] for unit tests of the reconciler: records every call, keeps peers in a
//! map, and can be told to fail.

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard},
};

use wiremesh_keyexchange::PublicKey;

use super::{
    Datapath, DatapathError, DatapathKind, DeviceSettings, DeviceStatus, PeerConfig, PeerStatus,
};

#[derive(Debug, Default)]
struct State {
    public_key: Option<PublicKey>,
    listen_port: u16,
    fwmark: u32,
    peers: BTreeMap<PublicKey, PeerConfig>,
    calls: Vec<String>,
    fail_next: Option<String>,
}

/// See the module docs.
#[derive(Debug)]
pub struct FakeDatapath {
    ifname: String,
    state: Mutex<State>,
}

impl FakeDatapath {
    pub fn new(ifname: &str) -> Self {
        Self {
            ifname: ifname.to_string(),
            state: Mutex::default(),
        }
    }

    /// The next mutating call fails with this message.
    pub fn fail_next(&self, message: &str) {
        self.lock().fail_next = Some(message.to_string());
    }

    /// Calls made so far, as short strings (`set_peer <key>`, `remove_peer <key>`, `configure`).
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    pub fn peer(&self, key: &PublicKey) -> Option<PeerConfig> {
        self.lock().peers.get(key).cloned()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mutate(&self, call: String) -> Result<MutexGuard<'_, State>, DatapathError> {
        let mut state = self.lock();
        if let Some(message) = state.fail_next.take() {
            return Err(DatapathError::Invalid {
                ifname: self.ifname.clone(),
                message,
            });
        }
        state.calls.push(call);
        Ok(state)
    }
}

impl Datapath for FakeDatapath {
    fn kind(&self) -> DatapathKind {
        DatapathKind::Userspace
    }

    fn ifname(&self) -> &str {
        &self.ifname
    }

    fn configure(&self, settings: &DeviceSettings) -> Result<(), DatapathError> {
        let mut state = self.mutate("configure".to_string())?;
        if let Some(key) = &settings.private_key {
            state.public_key = Some(key.public_key());
        }
        if let Some(port) = settings.listen_port {
            state.listen_port = port;
        }
        if let Some(mark) = settings.fwmark {
            state.fwmark = mark;
        }
        Ok(())
    }

    fn set_peer(&self, peer: &PeerConfig) -> Result<(), DatapathError> {
        let mut state = self.mutate(format!("set_peer {}", peer.public_key))?;
        state.peers.insert(peer.public_key, peer.clone());
        Ok(())
    }

    fn remove_peer(&self, public_key: &PublicKey) -> Result<(), DatapathError> {
        let mut state = self.mutate(format!("remove_peer {public_key}"))?;
        state.peers.remove(public_key);
        Ok(())
    }

    fn status(&self) -> Result<DeviceStatus, DatapathError> {
        let state = self.lock();
        Ok(DeviceStatus {
            kind: DatapathKind::Userspace,
            ifname: self.ifname.clone(),
            ifindex: 0,
            public_key: state.public_key,
            listen_port: state.listen_port,
            fwmark: state.fwmark,
            mtu: 1420,
            peers: state
                .peers
                .values()
                .map(|p| PeerStatus {
                    public_key: p.public_key,
                    endpoint: p.endpoint,
                    allowed_ips: p.allowed_ips.clone(),
                    persistent_keepalive: p.persistent_keepalive,
                    has_preshared_key: p.preshared_key.is_some(),
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                })
                .collect(),
        })
    }
}
