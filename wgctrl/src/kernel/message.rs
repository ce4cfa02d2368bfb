//! WireGuard generic netlink messages, pure (no socket): a [`SetRequest`] split into as many
//! WG_CMD_SET_DEVICE messages as it takes to keep each under a size limit, and the parts of a
//! WG_CMD_GET_DEVICE dump coalesced back into one [`GetResponse`].
//!
//! Splitting follows wg(8)'s `ipc-linux.h` and the kernel's header comment: every message names
//! the device; the device settings and `WGDEVICE_F_REPLACE_PEERS` go in the first message only; a
//! peer whose allowed IPs do not fit continues in the next message with only its public key, its
//! remove/update-only flags and more allowed IPs (`WGPEER_F_REPLACE_ALLOWEDIPS`, the preshared key,
//! endpoint and keepalive only in its first part). The dump is the mirror image: a peer that
//! continues in the next message repeats only its public key and allowed IPs.

use netlink_packet_core::Emitable;
use netlink_packet_generic::constants::GENL_HDRLEN;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute,
    WireguardPeerFlags,
};
use zeroize::{Zeroize, Zeroizing};

use crate::uapi::parse::{
    GetPeer, GetResponse, PeerUpdate, SecretKey, SetRequest, normalize_endpoint,
};

/// Largest SET message we send. wg(8) uses a page (4 KiB) and the kernel takes much larger ones;
/// 8 KiB halves the round trips of wg(8) and stays far below any socket buffer limit.
pub const SET_MESSAGE_LIMIT: usize = 8192;

/// Header room of every message: nlmsghdr + genlmsghdr.
const HEADERS: usize = NETLINK_HEADER_LEN + GENL_HDRLEN;
/// `struct nlmsghdr`.
const NETLINK_HEADER_LEN: usize = 16;
/// An NLA header (the container attributes' own size).
const NLA_HEADER: usize = 4;

/// Why a request cannot be expressed in messages of the given size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a single peer entry needs {needed} bytes, more than the message limit {limit}")]
pub struct TooSmall {
    pub needed: usize,
    pub limit: usize,
}

/// The WG_CMD_GET_DEVICE request (sent with `NLM_F_DUMP`).
pub fn get_request(ifname: &str) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::IfName(ifname.to_string())],
    }
}

/// `req` as WG_CMD_SET_DEVICE messages for `ifname`, each at most `limit` bytes on the wire.
/// At least one message is returned (an empty request still names the device, which checks
/// that it exists).
pub fn set_messages(
    ifname: &str,
    req: &SetRequest,
    limit: usize,
) -> Result<Vec<SetMessage>, TooSmall> {
    let mut builder = Builder {
        ifname,
        limit,
        done: Vec::new(),
        current: Vec::new(),
        current_len: 0,
        peers: Vec::new(),
    };
    builder.start(device_attributes(req));
    for peer in &req.peers {
        builder.add_peer(peer)?;
    }
    builder.flush();
    Ok(builder.done)
}

/// One WG_CMD_SET_DEVICE message. It may carry the private key: the attribute is zeroized when
/// the message is dropped, and `Debug` is not implemented.
pub struct SetMessage(WireguardMessage);

impl SetMessage {
    pub fn message(&self) -> &WireguardMessage {
        &self.0
    }
}

impl Drop for SetMessage {
    fn drop(&mut self) {
        zeroize_message(&mut self.0);
    }
}

/// Overwrites every key in `message` (device private key, peer preshared keys).
pub(crate) fn zeroize_message(message: &mut WireguardMessage) {
    for attr in &mut message.attributes {
        match attr {
            WireguardAttribute::PrivateKey(key) => key.zeroize(),
            WireguardAttribute::Peers(peers) => {
                for peer in peers {
                    for attr in &mut peer.0 {
                        if let WireguardPeerAttribute::PresharedKey(key) = attr {
                            key.zeroize();
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

fn device_attributes(req: &SetRequest) -> Vec<WireguardAttribute> {
    let mut attrs = Vec::new();
    if let Some(key) = &req.private_key {
        attrs.push(WireguardAttribute::PrivateKey(*key.0));
    }
    if let Some(port) = req.listen_port {
        attrs.push(WireguardAttribute::ListenPort(port));
    }
    if let Some(mark) = req.fwmark {
        attrs.push(WireguardAttribute::Fwmark(mark));
    }
    if req.replace_peers {
        attrs.push(WireguardAttribute::Flags(
            WireguardDeviceFlags::ReplacePeers,
        ));
    }
    attrs
}

/// The attributes of a peer entry before its allowed IPs: the key and flags always, the rest in
/// the first part only.
fn peer_head(peer: &PeerUpdate, first_part: bool) -> Vec<WireguardPeerAttribute> {
    let mut attrs = vec![WireguardPeerAttribute::PublicKey(peer.public_key)];
    let mut flags = WireguardPeerFlags::empty();
    if peer.remove {
        flags |= WireguardPeerFlags::RemoveMe;
    }
    if peer.update_only {
        flags |= WireguardPeerFlags::UpdateOnly;
    }
    if first_part && peer.replace_allowed_ips {
        flags |= WireguardPeerFlags::ReplaceAllowedIps;
    }
    if !flags.is_empty() {
        attrs.push(WireguardPeerAttribute::Flags(flags));
    }
    if first_part {
        if let Some(psk) = &peer.preshared_key {
            attrs.push(WireguardPeerAttribute::PresharedKey(*psk.0));
        }
        if let Some(endpoint) = peer.endpoint {
            attrs.push(WireguardPeerAttribute::Endpoint(endpoint));
        }
        if let Some(keepalive) = peer.persistent_keepalive {
            attrs.push(WireguardPeerAttribute::PersistentKeepalive(keepalive));
        }
    }
    attrs
}

fn allowed_ip(net: &ipnet::IpNet) -> WireguardAllowedIp {
    let family = match net {
        ipnet::IpNet::V4(_) => WireguardAddressFamily::Ipv4,
        ipnet::IpNet::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.network()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

struct Builder<'a> {
    ifname: &'a str,
    limit: usize,
    done: Vec<SetMessage>,
    /// Device attributes of the message being built (the peers are added at flush).
    current: Vec<WireguardAttribute>,
    /// Wire size of the message being built, peers included.
    current_len: usize,
    peers: Vec<WireguardPeer>,
}

impl Builder<'_> {
    fn start(&mut self, extra: Vec<WireguardAttribute>) {
        self.current = vec![WireguardAttribute::IfName(self.ifname.to_string())];
        self.current.extend(extra);
        self.current_len = HEADERS + self.current.as_slice().buffer_len();
    }

    fn flush(&mut self) {
        let mut attributes = std::mem::take(&mut self.current);
        if !self.peers.is_empty() {
            attributes.push(WireguardAttribute::Peers(std::mem::take(&mut self.peers)));
        }
        self.done.push(SetMessage(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        }));
    }

    /// Room left in the current message, counting the peers container if this would be its
    /// first peer.
    fn room(&self) -> usize {
        let container = if self.peers.is_empty() { NLA_HEADER } else { 0 };
        self.limit
            .saturating_sub(self.current_len)
            .saturating_sub(container)
    }

    fn commit(&mut self, peer: WireguardPeer) {
        if self.peers.is_empty() {
            self.current_len += NLA_HEADER;
        }
        self.current_len += peer.buffer_len();
        self.peers.push(peer);
    }

    fn next_message(&mut self) {
        self.flush();
        self.start(Vec::new());
    }

    fn add_peer(&mut self, peer: &PeerUpdate) -> Result<(), TooSmall> {
        let ips: Vec<WireguardAllowedIp> = peer.allowed_ips.iter().map(allowed_ip).collect();
        let mut next_ip = 0;
        let mut first_part = true;
        loop {
            let head = peer_head(peer, first_part);
            let head_len = WireguardPeer(head.clone()).buffer_len();
            // A part must carry its head and, if any are left, at least one allowed IP.
            let first_ip_len = ips
                .get(next_ip)
                .map_or(0, |ip| NLA_HEADER + ip.buffer_len());
            let needed = head_len + first_ip_len;
            if needed > self.room() {
                // Would it fit in a message of its own?
                let fresh = HEADERS
                    + WireguardAttribute::IfName(self.ifname.to_string()).buffer_len()
                    + NLA_HEADER
                    + needed;
                if fresh > self.limit {
                    return Err(TooSmall {
                        needed: fresh,
                        limit: self.limit,
                    });
                }
                self.next_message();
                continue;
            }
            let mut room = self.room() - head_len;
            let mut part_ips = Vec::new();
            if next_ip < ips.len() {
                room -= NLA_HEADER;
                while let Some(ip) = ips.get(next_ip) {
                    let len = ip.buffer_len();
                    if len > room {
                        break;
                    }
                    room -= len;
                    part_ips.push(ip.clone());
                    next_ip += 1;
                }
            }
            let mut attrs = head;
            if !part_ips.is_empty() {
                attrs.push(WireguardPeerAttribute::AllowedIps(part_ips));
            }
            self.commit(WireguardPeer(attrs));
            if next_ip == ips.len() {
                return Ok(());
            }
            first_part = false;
            self.next_message();
        }
    }
}

/// What a WG_CMD_GET_DEVICE dump says about the device.
#[derive(Debug, Default)]
pub struct DeviceDump {
    pub ifindex: u32,
    pub ifname: String,
    pub public_key: Option<[u8; 32]>,
    /// Settings and peers in the terms of the UAPI protocol; `Debug` redacts the keys.
    pub get: GetResponse,
}

/// Why a dump could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DumpError {
    #[error("the dump holds no message")]
    Empty,
    #[error("a peer entry without a public key")]
    PeerWithoutKey,
    #[error("an allowed IP entry is incomplete or invalid ({reason})")]
    BadAllowedIp { reason: String },
}

/// Coalesces the parts of a dump, in the order received, into one device. A peer whose first
/// entry in a message has the public key of the previous message's last peer is the same peer
/// continued: its allowed IPs are appended.
pub fn parse_dump(parts: Vec<WireguardMessage>) -> Result<DeviceDump, DumpError> {
    if parts.is_empty() {
        return Err(DumpError::Empty);
    }
    let mut dump = DeviceDump::default();
    for mut part in parts {
        let mut continued_allowed = true;
        for attr in std::mem::take(&mut part.attributes) {
            match attr {
                WireguardAttribute::IfIndex(i) => dump.ifindex = i,
                WireguardAttribute::IfName(n) => dump.ifname = n,
                WireguardAttribute::PrivateKey(mut key) => {
                    dump.get.private_key = Some(SecretKey(Zeroizing::new(key)));
                    key.zeroize();
                }
                WireguardAttribute::PublicKey(key) => dump.public_key = Some(key),
                WireguardAttribute::ListenPort(p) => dump.get.listen_port = p,
                WireguardAttribute::Fwmark(m) => dump.get.fwmark = m,
                WireguardAttribute::Peers(peers) => {
                    for (i, peer) in peers.into_iter().enumerate() {
                        let peer = parse_peer(peer)?;
                        let same_as_last = continued_allowed
                            && i == 0
                            && dump
                                .get
                                .peers
                                .last()
                                .is_some_and(|last| last.public_key == peer.public_key);
                        match dump.get.peers.last_mut() {
                            Some(last) if same_as_last => {
                                last.allowed_ips.extend(peer.allowed_ips);
                            }
                            _ => dump.get.peers.push(peer),
                        }
                    }
                    continued_allowed = false;
                }
                _ => {}
            }
        }
    }
    Ok(dump)
}

fn parse_peer(peer: WireguardPeer) -> Result<GetPeer, DumpError> {
    let mut out = GetPeer {
        public_key: [0; 32],
        preshared_key: None,
        endpoint: None,
        last_handshake: None,
        rx_bytes: 0,
        tx_bytes: 0,
        persistent_keepalive: 0,
        allowed_ips: Vec::new(),
    };
    let mut has_key = false;
    for attr in peer.0 {
        match attr {
            WireguardPeerAttribute::PublicKey(k) => {
                out.public_key = k;
                has_key = true;
            }
            WireguardPeerAttribute::PresharedKey(mut k) => {
                let psk = SecretKey(Zeroizing::new(k));
                k.zeroize();
                out.preshared_key = (!psk.is_zero()).then_some(psk);
            }
            WireguardPeerAttribute::Endpoint(ep) => out.endpoint = Some(normalize_endpoint(ep)),
            WireguardPeerAttribute::PersistentKeepalive(k) => out.persistent_keepalive = k,
            WireguardPeerAttribute::LastHandshake(t) => {
                out.last_handshake = (t.seconds > 0 || t.nano_seconds > 0).then(|| {
                    std::time::UNIX_EPOCH
                        + std::time::Duration::new(
                            u64::try_from(t.seconds).unwrap_or(0),
                            u32::try_from(t.nano_seconds.clamp(0, 999_999_999)).unwrap_or(0),
                        )
                });
            }
            WireguardPeerAttribute::RxBytes(b) => out.rx_bytes = b,
            WireguardPeerAttribute::TxBytes(b) => out.tx_bytes = b,
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    out.allowed_ips.push(parse_allowed_ip(ip)?);
                }
            }
            _ => {}
        }
    }
    if !has_key {
        return Err(DumpError::PeerWithoutKey);
    }
    Ok(out)
}

fn parse_allowed_ip(ip: WireguardAllowedIp) -> Result<ipnet::IpNet, DumpError> {
    let mut addr = None;
    let mut cidr = None;
    for attr in ip.0 {
        match attr {
            WireguardAllowedIpAttr::IpAddr(a) => addr = Some(a),
            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(c),
            _ => {}
        }
    }
    match (addr, cidr) {
        (Some(addr), Some(cidr)) => ipnet::IpNet::new(addr, cidr)
            .map(|n| n.trunc())
            .map_err(|e| DumpError::BadAllowedIp {
                reason: e.to_string(),
            }),
        _ => Err(DumpError::BadAllowedIp {
            reason: "address or prefix length missing".into(),
        }),
    }
}

#[cfg(test)]
mod tests;
