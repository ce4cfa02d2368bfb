//! The pure half of the wg(8) cross-platform configuration protocol: parsing and rendering the
//! body of a `set=1` request ([`SetRequest`]) and of a `get=1` answer ([`GetResponse`]), for the
//! server of our device and for the client ([`super::UapiDevice`]). No I/O, no engine state, so
//! it can be fuzzed (see `wgctrl/fuzz`) and unit-tested exhaustively.
//!
//! The grammar follows what wg(8) writes and what wireguard-go accepts: `key=value` lines, device
//! keys first, then one section per peer opened by `public_key=`. Keys are lowercase hex. The whole
//! body is validated before anything is applied, so a bad line never leaves a half-applied
//! configuration behind.

use std::{
    fmt::{self, Write as _},
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use zeroize::Zeroizing;

/// Longest body accepted in one `set=1` request (wg(8) writes ~200 bytes per peer).
pub const MAX_SET_BODY: usize = 4 << 20;

/// errno values as the protocol reports them (negative, like wireguard-go).
pub const EINVAL: i32 = -22;
pub const EPROTO: i32 = -71;
pub const EADDRINUSE: i32 = -98;
pub const EIO: i32 = -5;

/// Why a request body was rejected. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("line {line}: no '=' in line")]
    NoEquals { line: usize },
    #[error("line {line}: invalid value for {key}: {reason}")]
    InvalidValue {
        line: usize,
        key: &'static str,
        reason: String,
    },
    #[error("line {line}: unknown device key {key:?}")]
    UnknownDeviceKey { line: usize, key: String },
    #[error("line {line}: unknown peer key {key:?}")]
    UnknownPeerKey { line: usize, key: String },
    #[error("line {line}: {key} before any public_key")]
    PeerKeyFirst { line: usize, key: &'static str },
    #[error("request body is longer than {MAX_SET_BODY} bytes")]
    TooLong,
}

impl ParseError {
    /// The errno reported to the client for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NoEquals { .. } => EPROTO,
            _ => EINVAL,
        }
    }
}

/// A 32-byte key from the wire (private or preshared). Zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(pub Zeroizing<[u8; 32]>);

impl SecretKey {
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|b| *b == 0)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// One peer section of a `set=1` request, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUpdate {
    pub public_key: [u8; 32],
    /// `remove=true`: delete the peer; the rest of the section is ignored.
    pub remove: bool,
    /// `update_only=true`: do nothing if the peer does not exist yet.
    pub update_only: bool,
    /// `Some(zero key)` clears the preshared key.
    pub preshared_key: Option<SecretKey>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds, 0 turns it off.
    pub persistent_keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpNet>,
}

impl PeerUpdate {
    pub fn new(public_key: [u8; 32]) -> Self {
        Self {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// A parsed `set=1` request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// `Some(zero key)` removes the private key.
    pub private_key: Option<SecretKey>,
    pub listen_port: Option<u16>,
    /// 0 removes the mark.
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerUpdate>,
}

/// Parses the body of a `set=1` request: the lines after `set=1`, without the terminating empty
/// line (a trailing empty line is tolerated).
pub fn parse_set(body: &str) -> Result<SetRequest, ParseError> {
    if body.len() > MAX_SET_BODY {
        return Err(ParseError::TooLong);
    }
    let mut req = SetRequest::default();
    for (idx, line) in body.split('\n').enumerate() {
        let line_no = idx + 1;
        if line.is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or(ParseError::NoEquals { line: line_no })?;
        if key == "public_key" {
            let public_key = parse_hex_key(value).map_err(|reason| ParseError::InvalidValue {
                line: line_no,
                key: "public_key",
                reason,
            })?;
            req.peers.push(PeerUpdate::new(public_key));
            continue;
        }
        match req.peers.last_mut() {
            None => parse_device_line(&mut req, line_no, key, value)?,
            Some(peer) => parse_peer_line(peer, line_no, key, value)?,
        }
    }
    Ok(req)
}

fn invalid(line: usize, key: &'static str, reason: impl Into<String>) -> ParseError {
    ParseError::InvalidValue {
        line,
        key,
        reason: reason.into(),
    }
}

fn parse_true(line: usize, key: &'static str, value: &str) -> Result<bool, ParseError> {
    if value == "true" {
        Ok(true)
    } else {
        Err(invalid(line, key, "only \"true\" is accepted"))
    }
}

fn parse_device_line(
    req: &mut SetRequest,
    line: usize,
    key: &str,
    value: &str,
) -> Result<(), ParseError> {
    match key {
        "private_key" => {
            let bytes = parse_hex_key(value).map_err(|r| invalid(line, "private_key", r))?;
            req.private_key = Some(SecretKey(Zeroizing::new(bytes)));
        }
        "listen_port" => {
            req.listen_port =
                Some(parse_decimal(value).map_err(|r| invalid(line, "listen_port", r))?);
        }
        "fwmark" => {
            req.fwmark = Some(parse_decimal(value).map_err(|r| invalid(line, "fwmark", r))?);
        }
        "replace_peers" => req.replace_peers = parse_true(line, "replace_peers", value)?,
        other => {
            return Err(ParseError::UnknownDeviceKey {
                line,
                key: truncate(other),
            });
        }
    }
    Ok(())
}

fn parse_peer_line(
    peer: &mut PeerUpdate,
    line: usize,
    key: &str,
    value: &str,
) -> Result<(), ParseError> {
    match key {
        "remove" => peer.remove = parse_true(line, "remove", value)?,
        "update_only" => peer.update_only = parse_true(line, "update_only", value)?,
        "preshared_key" => {
            let bytes = parse_hex_key(value).map_err(|r| invalid(line, "preshared_key", r))?;
            peer.preshared_key = Some(SecretKey(Zeroizing::new(bytes)));
        }
        "endpoint" => {
            peer.endpoint = Some(parse_endpoint(value).map_err(|r| invalid(line, "endpoint", r))?);
        }
        "persistent_keepalive_interval" => {
            peer.persistent_keepalive = Some(
                parse_decimal(value)
                    .map_err(|r| invalid(line, "persistent_keepalive_interval", r))?,
            );
        }
        "replace_allowed_ips" => {
            peer.replace_allowed_ips = parse_true(line, "replace_allowed_ips", value)?;
            // Allowed IPs listed before the replace line in the same section are replaced too.
            peer.allowed_ips.clear();
        }
        "allowed_ip" => {
            let net = parse_prefix(value).map_err(|r| invalid(line, "allowed_ip", r))?;
            peer.allowed_ips.push(net);
        }
        "protocol_version" => {
            if value != "1" {
                return Err(invalid(line, "protocol_version", "only version 1 exists"));
            }
        }
        other => {
            return Err(ParseError::UnknownPeerKey {
                line,
                key: truncate(other),
            });
        }
    }
    Ok(())
}

/// At most 64 characters of a hostile value, anything but printable ASCII as '?', so an error
/// quoting it stays short (a `{:?}` of a control or unassigned character takes up to 10 bytes).
pub(crate) fn truncate(key: &str) -> String {
    key.chars()
        .take(64)
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// Decimal without sign, leading '+' or whitespace, like Go's `strconv.ParseUint`.
fn parse_decimal<T: TryFrom<u64>>(value: &str) -> Result<T, String> {
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a decimal number".into());
    }
    let n: u64 = value.parse().map_err(|_| "number too large".to_string())?;
    T::try_from(n).map_err(|_| "number out of range".to_string())
}

/// 64 hex digits (either case) -> 32 bytes.
pub fn parse_hex_key(value: &str) -> Result<[u8; 32], String> {
    let bytes = value.as_bytes();
    if bytes.len() != 64 {
        return Err(format!(
            "want 64 hex digits, got {} characters",
            bytes.len()
        ));
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = hex_digit(pair[0]).ok_or("not a hex digit")?;
        let lo = hex_digit(pair[1]).ok_or("not a hex digit")?;
        out[i] = (hi << 4) | lo;
    }
    Ok(out)
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `a.b.c.d:port` or `[v6]:port` (wg(8) resolves names before it sends them).
fn parse_endpoint(value: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = value
        .parse()
        .map_err(|_| "want ip:port or [ipv6]:port".to_string())?;
    if addr.port() == 0 {
        return Err("port 0".into());
    }
    Ok(normalize_endpoint(addr))
}

/// An endpoint as every part of wiremesh compares it: an IPv4-mapped IPv6 address becomes IPv4,
/// and IPv6 scope and flow information are dropped (meaningless for an underlay endpoint here;
/// wg(8) never sends a zone we could route by).
pub fn normalize_endpoint(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => SocketAddr::new(IpAddr::V6(*v6.ip()), v6.port()),
        },
        v4 => v4,
    }
}

/// `ip/len`; host bits are cleared like the kernel and wireguard-go do.
fn parse_prefix(value: &str) -> Result<IpNet, String> {
    let (ip, len) = value.split_once('/').ok_or("missing /prefix length")?;
    let ip: IpAddr = ip.parse().map_err(|_| "not an IP address".to_string())?;
    let len: u8 = parse_decimal(len)?;
    IpNet::new(ip, len)
        .map(|n| n.trunc())
        .map_err(|_| "prefix length too long".to_string())
}

/// Renders a [`SetRequest`] as the body of a `set=1` request (without the `set=1` line and the
/// final empty line), the way wg(8) writes it. `parse_set(&format_set(r)) == r` for every
/// request the parser produces; the fuzz target checks exactly that. Zeroized on drop.
pub fn format_set(req: &SetRequest) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    if let Some(key) = &req.private_key {
        push_hex(&mut out, "private_key", &key.0);
    }
    if let Some(port) = req.listen_port {
        let _ = writeln!(out, "listen_port={port}");
    }
    if let Some(mark) = req.fwmark {
        let _ = writeln!(out, "fwmark={mark}");
    }
    if req.replace_peers {
        out.push_str("replace_peers=true\n");
    }
    for peer in &req.peers {
        push_hex(&mut out, "public_key", &peer.public_key);
        if peer.remove {
            out.push_str("remove=true\n");
        }
        if peer.update_only {
            out.push_str("update_only=true\n");
        }
        if let Some(psk) = &peer.preshared_key {
            push_hex(&mut out, "preshared_key", &psk.0);
        }
        if let Some(ep) = peer.endpoint {
            let _ = writeln!(out, "endpoint={ep}");
        }
        if let Some(ka) = peer.persistent_keepalive {
            let _ = writeln!(out, "persistent_keepalive_interval={ka}");
        }
        if peer.replace_allowed_ips {
            out.push_str("replace_allowed_ips=true\n");
        }
        for net in &peer.allowed_ips {
            let _ = writeln!(out, "allowed_ip={net}");
        }
    }
    out
}

/// One peer in a `get=1` answer (`Debug` redacts the preshared key through [`SecretKey`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetPeer {
    pub public_key: [u8; 32],
    pub preshared_key: Option<SecretKey>,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: u16,
    pub allowed_ips: Vec<IpNet>,
}

/// Everything a `get=1` answer carries. The private key is only present on the wire protocol,
/// which is root-only (socket mode 0600), exactly as with wireguard-go.
#[derive(Clone, Default)]
pub struct GetResponse {
    pub private_key: Option<SecretKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<GetPeer>,
}

impl fmt::Debug for GetResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetResponse")
            .field("has_private_key", &self.private_key.is_some())
            .field("listen_port", &self.listen_port)
            .field("fwmark", &self.fwmark)
            .field("peers", &self.peers)
            .finish()
    }
}

fn push_hex(out: &mut String, key: &str, bytes: &[u8; 32]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push_str(key);
    out.push('=');
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
    out.push('\n');
}

/// Renders a `get=1` answer including the final `errno=0` and empty line. The returned string
/// holds the private key and is zeroized on drop.
pub fn format_get(resp: &GetResponse) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(256 + resp.peers.len() * 320));
    if let Some(key) = &resp.private_key
        && !key.is_zero()
    {
        push_hex(&mut out, "private_key", &key.0);
    }
    if resp.listen_port != 0 {
        let _ = writeln!(out, "listen_port={}", resp.listen_port);
    }
    if resp.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", resp.fwmark);
    }
    for peer in &resp.peers {
        push_hex(&mut out, "public_key", &peer.public_key);
        if let Some(psk) = &peer.preshared_key {
            // `wg showconf` needs the real key to round-trip; `wg show` prints "(hidden)".
            push_hex(&mut out, "preshared_key", &psk.0);
        }
        out.push_str("protocol_version=1\n");
        if let Some(ep) = peer.endpoint {
            let _ = writeln!(out, "endpoint={ep}");
        }
        let since_epoch = peer
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or(Duration::ZERO);
        let _ = writeln!(out, "last_handshake_time_sec={}", since_epoch.as_secs());
        let _ = writeln!(
            out,
            "last_handshake_time_nsec={}",
            since_epoch.subsec_nanos()
        );
        let _ = writeln!(out, "tx_bytes={}", peer.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", peer.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            peer.persistent_keepalive
        );
        for net in &peer.allowed_ips {
            let _ = writeln!(out, "allowed_ip={net}");
        }
    }
    out.push_str("errno=0\n\n");
    out
}

/// Parses the body of a `get=1` answer: the lines before `errno=` (which the caller checks).
/// Keys this version does not know are skipped, so newer devices stay readable; a known key with
/// a bad value is an error. The private key, if present, ends up in a zeroized [`SecretKey`].
pub fn parse_get(body: &str) -> Result<GetResponse, ParseError> {
    let mut resp = GetResponse::default();
    for (idx, line) in body.split('\n').enumerate() {
        let line_no = idx + 1;
        if line.is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or(ParseError::NoEquals { line: line_no })?;
        if key == "public_key" {
            let public_key = parse_hex_key(value).map_err(|r| invalid(line_no, "public_key", r))?;
            resp.peers.push(GetPeer {
                public_key,
                preshared_key: None,
                endpoint: None,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                persistent_keepalive: 0,
                allowed_ips: Vec::new(),
            });
            continue;
        }
        match resp.peers.last_mut() {
            None => parse_get_device_line(&mut resp, line_no, key, value)?,
            Some(peer) => parse_get_peer_line(peer, line_no, key, value)?,
        }
    }
    Ok(resp)
}

fn parse_get_device_line(
    resp: &mut GetResponse,
    line: usize,
    key: &str,
    value: &str,
) -> Result<(), ParseError> {
    match key {
        "private_key" => {
            let bytes = parse_hex_key(value).map_err(|r| invalid(line, "private_key", r))?;
            resp.private_key = Some(SecretKey(Zeroizing::new(bytes)));
        }
        "listen_port" => {
            resp.listen_port = parse_decimal(value).map_err(|r| invalid(line, "listen_port", r))?;
        }
        "fwmark" => resp.fwmark = parse_decimal(value).map_err(|r| invalid(line, "fwmark", r))?,
        "endpoint" | "allowed_ip" | "preshared_key" => {
            return Err(ParseError::PeerKeyFirst {
                line,
                key: match key {
                    "endpoint" => "endpoint",
                    "allowed_ip" => "allowed_ip",
                    _ => "preshared_key",
                },
            });
        }
        _ => {}
    }
    Ok(())
}

fn parse_get_peer_line(
    peer: &mut GetPeer,
    line: usize,
    key: &str,
    value: &str,
) -> Result<(), ParseError> {
    match key {
        "preshared_key" => {
            let bytes = parse_hex_key(value).map_err(|r| invalid(line, "preshared_key", r))?;
            let psk = SecretKey(Zeroizing::new(bytes));
            peer.preshared_key = (!psk.is_zero()).then_some(psk);
        }
        "endpoint" => {
            peer.endpoint = Some(parse_endpoint(value).map_err(|r| invalid(line, "endpoint", r))?);
        }
        "last_handshake_time_sec" => {
            let secs: u64 =
                parse_decimal(value).map_err(|r| invalid(line, "last_handshake_time_sec", r))?;
            let nanos = peer
                .last_handshake
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.subsec_nanos());
            peer.last_handshake = handshake_time(secs, nanos);
        }
        "last_handshake_time_nsec" => {
            let nanos: u32 =
                parse_decimal(value).map_err(|r| invalid(line, "last_handshake_time_nsec", r))?;
            if nanos >= 1_000_000_000 {
                return Err(invalid(line, "last_handshake_time_nsec", "not below 10^9"));
            }
            let secs = peer
                .last_handshake
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            peer.last_handshake = handshake_time(secs, nanos);
        }
        "rx_bytes" => {
            peer.rx_bytes = parse_decimal(value).map_err(|r| invalid(line, "rx_bytes", r))?
        }
        "tx_bytes" => {
            peer.tx_bytes = parse_decimal(value).map_err(|r| invalid(line, "tx_bytes", r))?
        }
        "persistent_keepalive_interval" => {
            peer.persistent_keepalive = parse_decimal(value)
                .map_err(|r| invalid(line, "persistent_keepalive_interval", r))?;
        }
        "allowed_ip" => {
            let net = parse_prefix(value).map_err(|r| invalid(line, "allowed_ip", r))?;
            peer.allowed_ips.push(net);
        }
        _ => {}
    }
    Ok(())
}

/// 0 seconds and 0 nanoseconds is "never", as the protocol writes it.
fn handshake_time(secs: u64, nanos: u32) -> Option<SystemTime> {
    (secs != 0 || nanos != 0).then(|| UNIX_EPOCH + Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests;
