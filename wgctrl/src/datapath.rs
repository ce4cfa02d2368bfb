//! The contract between the agent and a WireGuard implementation. The userspace engine in-process
//! (crate `wiremesh-device`), a userspace device process over its UAPI socket
//! ([`crate::UapiDevice`]) and the kernel module over generic netlink ([`crate::KernelDevice`]) all
//! implement [`Datapath`]; the agent's reconciler only ever talks to this trait, and unit tests use
//! [`fake::FakeDatapath`].
//!
//! The trait is synchronous on purpose: every call is a short, bounded operation on in-process
//! state, one UAPI exchange or a few netlink round trips (each bounded by a timeout). Callers on a
//! tokio runtime may call it directly.

use std::{fmt, net::SocketAddr, path::PathBuf, time::SystemTime};

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
/// replaced, not merged. Its `Debug` output never shows the preshared key.
#[derive(Clone, PartialEq, Eq)]
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

impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// Stands in for a secret in `Debug` output.
        struct Redacted;
        impl fmt::Debug for Redacted {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("<redacted>")
            }
        }
        f.debug_struct("PeerConfig")
            .field("public_key", &self.public_key)
            .field("endpoint", &self.endpoint)
            .field("allowed_ips", &self.allowed_ips)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field(
                "preshared_key",
                &self.preshared_key.as_ref().map(|_| Redacted),
            )
            .finish()
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
    /// Whether the device is there, and its interface index: what a liveness probe needs,
    /// without the per-peer dump of [`Datapath::status`] (its cost grows with the peers: polled
    /// every 500 ms at 5,000 peers it was a third of an idle agent's CPU, docs/benchmarks.md).
    /// A device that is there but hung is only found by [`Datapath::status`].
    fn probe(&self) -> Result<u32, DatapathError> {
        self.status().map(|s| s.ifindex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_config_debug_never_shows_the_preshared_key() {
        let psk = [0xa7u8; 32];
        let mut peer = PeerConfig::new(PublicKey::from_bytes([0x11; 32]));
        peer.preshared_key = Some(psk);
        peer.persistent_keepalive = Some(25);
        let text = format!("{peer:?} {peer:#?}");
        // Every encoding a key could be printed in: Debug's decimal array (flat and pretty),
        // hex both cases, and base64 as wg(8) shows keys.
        let decimal = format!("{:?}", &psk[..4]);
        let hex: String = psk.iter().map(|b| format!("{b:02x}")).collect();
        let base64 = PublicKey::from_bytes(psk).to_base64();
        for needle in [
            decimal.trim_end_matches(']').to_string(),
            psk[0].to_string(),
            hex[..8].to_string(),
            hex[..8].to_uppercase(),
            base64[..8].to_string(),
        ] {
            assert!(!text.contains(&needle), "{needle:?} in {text}");
        }
        assert!(text.contains("preshared_key: Some(<redacted>)"), "{text}");
        assert!(text.contains("persistent_keepalive: Some(25)"), "{text}");
        peer.preshared_key = None;
        assert!(format!("{peer:?}").contains("preshared_key: None"));
    }
}
