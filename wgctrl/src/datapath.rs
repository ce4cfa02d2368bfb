//! The contract between the agent and a WireGuard implementation. The userspace engine in-process
//! (crate `wiremesh-device`), a userspace device process over its UAPI socket
//! ([`crate::UapiDevice`]) and the kernel module over generic netlink ([`crate::KernelDevice`]) all
//! implement [`Datapath`]; the agent's reconciler only ever talks to this trait, and unit tests use
//! [`fake::FakeDatapath`].
//!
//! The trait is synchronous on purpose: every call is a short, bounded operation on in-process
//! state, one UAPI exchange or a few netlink round trips (each bounded by a timeout). Callers on a
//! tokio runtime may call it directly.

use std::{net::SocketAddr, path::PathBuf, time::SystemTime};

use ipnet::IpNet;
use wiremesh_keyexchange::{PrivateKey, PublicKey};

pub mod fake;

/// Which implementation carries the packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatapathKind {
    Userspace,
    Kernel,
}

impl DatapathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Userspace => "userspace",
            Self::Kernel => "kernel",
        }
    }
}

/// Device-wide settings. `None` leaves a setting unchanged.
#[derive(Debug, Clone, Default)]
pub struct DeviceSettings {
    pub private_key: Option<PrivateKey>,
    pub listen_port: Option<u16>,
    /// 0 removes the mark.
    pub fwmark: Option<u32>,
}

/// The wanted state of one peer. `set_peer` makes the device match it exactly: allowed IPs are
/// replaced, not merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// Seconds; `None` or 0 is off.
    pub persistent_keepalive: Option<u16>,
    /// Raw preshared key; `None` is the all-zero key (no PSK).
    pub preshared_key: Option<[u8; 32]>,
}

impl PeerConfig {
    pub fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
            preshared_key: None,
        }
    }
}

/// What the device reports about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    /// The endpoint in use: configured, or learned from the last authenticated packet (roaming).
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    pub has_preshared_key: bool,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The device as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    pub kind: DatapathKind,
    pub ifname: String,
    pub ifindex: u32,
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub mtu: u32,
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("interface {ifname}: {source}")]
    Io {
        ifname: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {ifname}: {message}")]
    Invalid { ifname: String, message: String },
    #[error("interface {ifname}: no peer {public_key}")]
    NoSuchPeer {
        ifname: String,
        public_key: PublicKey,
    },
    #[error("interface {ifname} is closed")]
    Closed { ifname: String },
    /// A userspace device reached over its UAPI socket failed (see [`crate::UapiDevice`]).
    #[error("interface {ifname}: UAPI socket {}: {source}", socket.display())]
    Uapi {
        ifname: String,
        socket: PathBuf,
        #[source]
        source: crate::UapiClientError,
    },
    /// The kernel module failed (see [`crate::KernelDevice`]).
    #[error("interface {ifname}: {source}")]
    Kernel {
        ifname: String,
        #[source]
        source: crate::KernelError,
    },
}

/// A WireGuard device that the agent configures.
pub trait Datapath: Send + Sync + 'static {
    fn kind(&self) -> DatapathKind;
    /// The interface name (in the agent's network namespace).
    fn ifname(&self) -> &str;
    /// Applies the given device-wide settings.
    fn configure(&self, settings: &DeviceSettings) -> Result<(), DatapathError>;
    /// Adds the peer or makes an existing peer match `peer` exactly. Live sessions of an existing
    /// peer survive an update that does not change its key.
    fn set_peer(&self, peer: &PeerConfig) -> Result<(), DatapathError>;
    /// Removes a peer and its sessions. Removing an unknown peer is not an error.
    fn remove_peer(&self, public_key: &PublicKey) -> Result<(), DatapathError>;
    /// The device and all peers, with handshake times and counters.
    fn status(&self) -> Result<DeviceStatus, DatapathError>;
}
