//! [`KernelDevice`]: a [`Datapath`] over the kernel's WireGuard generic netlink family, the way
//! wg(8) and wgctrl-go talk to the module: resolve the `wireguard` family id (CTRL_CMD_GETFAMILY),
//! read with a WG_CMD_GET_DEVICE dump, change with WG_CMD_SET_DEVICE messages split to fit
//! ([`message`]). Blocking: one netlink socket, opened in the network namespace of the thread
//! that calls [`KernelDevice::open`], used by one call at a time.

pub mod message;

use std::{fmt, sync::Mutex, time::Duration};

use netlink_packet_core::Emitable;
use netlink_packet_generic::{
    GenlFamily, GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use netlink_packet_wireguard::WireguardMessage;
use netlink_sys::protocols::NETLINK_GENERIC;
use wiremesh_keyexchange::PublicKey;

use self::message::{DeviceDump, DumpError, SET_MESSAGE_LIMIT, TooSmall};
use crate::{
    convert,
    datapath::{Datapath, DatapathError, DatapathKind, DeviceSettings, DeviceStatus, PeerConfig},
    iface,
    netlink::{self, NetlinkError, NetlinkSocket},
    uapi::parse::SetRequest,
};

/// Why a kernel WireGuard operation failed. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The generic netlink family `wireguard` is not registered: the module is not loaded (or
    /// not built into this kernel).
    #[error("the kernel has no WireGuard generic netlink family (module not loaded?)")]
    NoFamily,
    #[error("resolving the wireguard generic netlink family: {source}")]
    Family {
        #[source]
        source: NetlinkError,
    },
    #[error("WG_CMD_GET_DEVICE: {source}")]
    Get {
        #[source]
        source: NetlinkError,
    },
    #[error("WG_CMD_GET_DEVICE: {source}")]
    Dump {
        #[source]
        source: DumpError,
    },
    #[error("WG_CMD_SET_DEVICE (message {part} of {parts}): {source}")]
    Set {
        part: usize,
        parts: usize,
        #[source]
        source: NetlinkError,
    },
    #[error("WG_CMD_SET_DEVICE: {source}")]
    TooLarge {
        #[source]
        source: TooSmall,
    },
}

/// A kernel WireGuard interface, addressed by name.
pub struct KernelDevice {
    ifname: String,
    family_id: u16,
    socket: Mutex<NetlinkSocket>,
}

impl fmt::Debug for KernelDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelDevice")
            .field("ifname", &self.ifname)
            .field("family_id", &self.family_id)
            .finish_non_exhaustive()
    }
}

impl KernelDevice {
    /// Opens the generic netlink socket and resolves the family. The interface itself is
    /// checked by the first operation (the kernel answers ENODEV for a missing one, and EOPNOTSUPP
    /// for an interface that is not WireGuard).
    pub fn open(ifname: &str) -> Result<Self, DatapathError> {
        Self::open_with_timeout(ifname, netlink::DEFAULT_TIMEOUT)
    }

    /// As [`open`](Self::open), each exchange with the kernel bounded by `timeout`.
    pub fn open_with_timeout(ifname: &str, timeout: Duration) -> Result<Self, DatapathError> {
        let error = |source| DatapathError::Kernel {
            ifname: ifname.to_string(),
            source,
        };
        let mut socket = NetlinkSocket::open(NETLINK_GENERIC, timeout)
            .map_err(|source| error(KernelError::Family { source }))?;
        let family_id = resolve_family(&mut socket).map_err(error)?;
        Ok(Self {
            ifname: ifname.to_string(),
            family_id,
            socket: Mutex::new(socket),
        })
    }

    /// The generic netlink family id the kernel gave `wireguard`.
    pub fn family_id(&self) -> u16 {
        self.family_id
    }

    /// The device's settings and peers (WG_CMD_GET_DEVICE), the private key included.
    pub fn get(&self) -> Result<DeviceDump, DatapathError> {
        let request = family_message(message::get_request(&self.ifname), self.family_id);
        let parts: Vec<GenlMessage<WireguardMessage>> = self
            .lock()
            .request(request, true)
            .map_err(|source| self.error(KernelError::Get { source }))?;
        let parts = parts.into_iter().map(|m| m.payload).collect();
        message::parse_dump(parts).map_err(|source| self.error(KernelError::Dump { source }))
    }

    /// Applies `req` (WG_CMD_SET_DEVICE), in as many messages as it takes. Each message is applied
    /// by the kernel on its own: a failure in message N leaves messages 1..N-1 applied.
    pub fn set(&self, req: &SetRequest) -> Result<(), DatapathError> {
        self.set_with_limit(req, SET_MESSAGE_LIMIT)
    }

    /// As [`set`](Self::set) with messages of at most `limit` bytes (tests use small limits to
    /// exercise the splitting against the real module).
    pub fn set_with_limit(&self, req: &SetRequest, limit: usize) -> Result<(), DatapathError> {
        let messages = message::set_messages(&self.ifname, req, limit)
            .map_err(|source| self.error(KernelError::TooLarge { source }))?;
        let parts = messages.len();
        let mut socket = self.lock();
        for (i, msg) in messages.iter().enumerate() {
            let payload = family_message(Borrowed(msg.message()), self.family_id);
            let _: Vec<GenlMessage<WireguardMessage>> =
                socket.request(payload, false).map_err(|source| {
                    self.error(KernelError::Set {
                        part: i + 1,
                        parts,
                        source,
                    })
                })?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetlinkSocket> {
        self.socket.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn error(&self, source: KernelError) -> DatapathError {
        DatapathError::Kernel {
            ifname: self.ifname.clone(),
            source,
        }
    }
}

/// CTRL_CMD_GETFAMILY for `wireguard`.
fn resolve_family(socket: &mut NetlinkSocket) -> Result<u16, KernelError> {
    let request = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(
            WireguardMessage::family_name().to_string(),
        )],
    });
    let replies: Vec<GenlMessage<GenlCtrl>> = socket.request(request, false).map_err(|source| {
        if source.errno() == Some(libc::ENOENT) {
            KernelError::NoFamily
        } else {
            KernelError::Family { source }
        }
    })?;
    replies
        .iter()
        .flat_map(|m| &m.payload.nlas)
        .find_map(|attr| match attr {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })
        .ok_or(KernelError::NoFamily)
}

fn family_message<F: GenlFamily + fmt::Debug>(payload: F, family_id: u16) -> GenlMessage<F> {
    let mut message = GenlMessage::from_payload(payload);
    message.set_resolved_family_id(family_id);
    message
}

/// The bytes of one SET message as sent (request + acknowledgement flags), for tests.
#[cfg(test)]
pub(crate) fn set_bytes(
    message: &message::SetMessage,
    family_id: u16,
    seq: u32,
) -> zeroize::Zeroizing<Vec<u8>> {
    netlink::serialize(
        family_message(Borrowed(message.message()), family_id),
        netlink_packet_core::NLM_F_ACK,
        seq,
    )
}

/// A SET message serialized in place, so that no copy of the private key is made.
pub(crate) struct Borrowed<'a>(pub(crate) &'a WireguardMessage);

impl fmt::Debug for Borrowed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WireguardMessage({:?}, <redacted>)", self.0.cmd)
    }
}

impl GenlFamily for Borrowed<'_> {
    fn family_name() -> &'static str {
        WireguardMessage::family_name()
    }

    fn version(&self) -> u8 {
        self.0.version()
    }

    fn command(&self) -> u8 {
        self.0.command()
    }
}

impl Emitable for Borrowed<'_> {
    fn buffer_len(&self) -> usize {
        self.0.buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.0.emit(buffer);
    }
}

impl Datapath for KernelDevice {
    fn kind(&self) -> DatapathKind {
        DatapathKind::Kernel
    }

    fn ifname(&self) -> &str {
        &self.ifname
    }

    fn configure(&self, settings: &DeviceSettings) -> Result<(), DatapathError> {
        self.set(&convert::configure_request(settings))
    }

    fn set_peer(&self, peer: &PeerConfig) -> Result<(), DatapathError> {
        let req = convert::set_peer_request(peer).map_err(|message| DatapathError::Invalid {
            ifname: self.ifname.clone(),
            message,
        })?;
        self.set(&req)
    }

    fn remove_peer(&self, public_key: &PublicKey) -> Result<(), DatapathError> {
        self.set(&convert::remove_peer_request(public_key))
    }

    /// The kernel's device is its link: there while the interface is.
    fn probe(&self) -> Result<u32, DatapathError> {
        iface::lookup(&self.ifname)
            .map(|link| link.ifindex)
            .map_err(|source| DatapathError::Io {
                ifname: self.ifname.clone(),
                source,
            })
    }

    fn status(&self) -> Result<DeviceStatus, DatapathError> {
        let dump = self.get()?;
        let mtu = iface::lookup(&self.ifname)
            .map_err(|source| DatapathError::Io {
                ifname: self.ifname.clone(),
                source,
            })?
            .mtu;
        let public_key = dump.public_key.map(PublicKey::from_bytes);
        let mut status = convert::device_status(
            DatapathKind::Kernel,
            &self.ifname,
            dump.ifindex,
            mtu,
            dump.get,
        );
        // The kernel reports the public key itself (the same as the one derived from the key).
        if public_key.is_some() {
            status.public_key = public_key;
        }
        Ok(status)
    }
}
