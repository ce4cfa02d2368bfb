//! The [`Datapath`] operations in the terms of the wg(8) protocol, shared by every
//! implementation: each call becomes one [`SetRequest`] (the userspace engine applies it, the UAPI
//! client sends it, the kernel client turns it into WG_CMD_SET_DEVICE messages), and a
//! [`GetResponse`] becomes a [`DeviceStatus`].
//!
//! [`Datapath`]: crate::Datapath

use wiremesh_keyexchange::PublicKey;
use zeroize::Zeroizing;

use crate::{
    datapath::{DatapathKind, DeviceSettings, DeviceStatus, PeerConfig, PeerStatus},
    uapi::parse::{GetPeer, GetResponse, PeerUpdate, SecretKey, SetRequest},
};

/// `configure`: only the settings that are `Some`.
pub fn configure_request(settings: &DeviceSettings) -> SetRequest {
    SetRequest {
        private_key: settings
            .private_key
            .as_ref()
            .map(|k| SecretKey(Zeroizing::new(*k.to_bytes()))),
        listen_port: settings.listen_port,
        fwmark: settings.fwmark,
        replace_peers: false,
        peers: Vec::new(),
    }
}

/// `set_peer`: the peer exactly as given — allowed IPs replaced, no PSK and no keepalive when
/// `None`. An endpoint of `None` leaves the device's (possibly roamed) endpoint alone: the protocol
/// has no way to clear one. Rejects an endpoint with port 0 or an unspecified address.
pub fn set_peer_request(peer: &PeerConfig) -> Result<SetRequest, String> {
    if let Some(ep) = peer.endpoint
        && (ep.port() == 0 || ep.ip().is_unspecified())
    {
        return Err(format!("peer {}: invalid endpoint {ep}", peer.public_key));
    }
    let mut update = PeerUpdate::new(*peer.public_key.as_bytes());
    update.preshared_key = Some(SecretKey(Zeroizing::new(
        peer.preshared_key.unwrap_or([0; 32]),
    )));
    update.endpoint = peer.endpoint;
    update.persistent_keepalive = Some(peer.persistent_keepalive.unwrap_or(0));
    update.replace_allowed_ips = true;
    update.allowed_ips = peer.allowed_ips.iter().map(|n| n.trunc()).collect();
    Ok(SetRequest {
        peers: vec![update],
        ..SetRequest::default()
    })
}

/// `remove_peer`.
pub fn remove_peer_request(public_key: &PublicKey) -> SetRequest {
    let mut update = PeerUpdate::new(*public_key.as_bytes());
    update.remove = true;
    SetRequest {
        peers: vec![update],
        ..SetRequest::default()
    }
}

/// One peer of a `get` answer as the agent sees it.
pub fn peer_status(peer: GetPeer) -> PeerStatus {
    PeerStatus {
        public_key: PublicKey::from_bytes(peer.public_key),
        endpoint: peer.endpoint,
        allowed_ips: peer.allowed_ips,
        persistent_keepalive: (peer.persistent_keepalive != 0).then_some(peer.persistent_keepalive),
        has_preshared_key: peer.preshared_key.as_ref().is_some_and(|k| !k.is_zero()),
        last_handshake: peer.last_handshake,
        rx_bytes: peer.rx_bytes,
        tx_bytes: peer.tx_bytes,
    }
}

/// A whole `get` answer plus what only the interface knows (index, MTU). The public key is
/// derived from the private key; the private key itself goes no further.
pub fn device_status(
    kind: DatapathKind,
    ifname: &str,
    ifindex: u32,
    mtu: u32,
    get: GetResponse,
) -> DeviceStatus {
    let public_key = get
        .private_key
        .as_ref()
        .filter(|k| !k.is_zero())
        .map(|k| wiremesh_keyexchange::PrivateKey::from_bytes(*k.0).public_key());
    DeviceStatus {
        kind,
        ifname: ifname.to_string(),
        ifindex,
        public_key,
        listen_port: get.listen_port,
        fwmark: get.fwmark,
        mtu,
        peers: get.peers.into_iter().map(peer_status).collect(),
    }
}
