//! A blocking netlink socket for request/response exchanges (generic netlink for the WireGuard
//! family, rtnetlink for links): one request at a time, replies matched by sequence number,
//! multi-part dumps collected up to `NLMSG_DONE`, acknowledgements and kernel errors turned into
//! [`NetlinkError`], every receive bounded by a timeout. The socket lives in the network
//! namespace of the thread that opened it.

use std::{
    fmt::Debug,
    io,
    time::{Duration, Instant},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkDeserializable, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};
use zeroize::Zeroizing;

/// How long a request may wait for its replies by default.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a netlink exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {source}")]
    Io {
        #[source]
        source: io::Error,
    },
    #[error("no answer from the kernel within {timeout:?}")]
    Timeout { timeout: Duration },
    /// The kernel refused the request (`NLMSG_ERROR`, or an error code in `NLMSG_DONE`).
    #[error("the kernel answered: {source}")]
    Kernel {
        /// The positive errno.
        errno: i32,
        #[source]
        source: io::Error,
    },
    #[error("undecodable netlink message: {reason}")]
    Decode { reason: String },
}

impl NetlinkError {
    fn kernel(code: i32) -> Self {
        let errno = code.saturating_abs();
        Self::Kernel {
            errno,
            source: io::Error::from_raw_os_error(errno),
        }
    }

    /// The errno the kernel answered with, if that is what happened.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// What one datagram held for the request with a given sequence number.
#[derive(Debug)]
pub(crate) enum Reply<I> {
    /// A data message (one part of a dump, or the answer of a plain request).
    Message(I),
    /// An acknowledgement (`NLMSG_ERROR` with code 0).
    Ack,
    /// The end of a dump.
    Done,
}

/// Splits a received datagram into the replies to request `seq`. Messages of other sequence
/// numbers (late answers to a request that timed out) are skipped. A kernel error ends the
/// exchange with [`NetlinkError::Kernel`].
pub(crate) fn parse_datagram<I>(mut buf: &[u8], seq: u32) -> Result<Vec<Reply<I>>, NetlinkError>
where
    I: NetlinkDeserializable + Debug,
{
    let mut replies = Vec::new();
    while !buf.is_empty() {
        let len = NetlinkBuffer::new_checked(buf)
            .map_err(|e| NetlinkError::Decode {
                reason: e.to_string(),
            })?
            .length() as usize;
        let message =
            NetlinkMessage::<I>::deserialize(&buf[..len]).map_err(|e| NetlinkError::Decode {
                reason: e.to_string(),
            })?;
        buf = &buf[align4(len).min(buf.len())..];
        if message.header.sequence_number != seq {
            continue;
        }
        match message.payload {
            NetlinkPayload::InnerMessage(inner) => replies.push(Reply::Message(inner)),
            NetlinkPayload::Error(e) => match e.code {
                None => replies.push(Reply::Ack),
                Some(code) => return Err(NetlinkError::kernel(code.get())),
            },
            NetlinkPayload::Done(done) => {
                if done.code != 0 {
                    return Err(NetlinkError::kernel(done.code));
                }
                replies.push(Reply::Done);
            }
            NetlinkPayload::Overrun(_) => {
                return Err(NetlinkError::Decode {
                    reason: "the kernel reported an overrun".into(),
                });
            }
            _ => {}
        }
    }
    Ok(replies)
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// Serializes `payload` as a request with sequence number `seq` and `flags` (plus
/// `NLM_F_REQUEST`). The bytes may hold key material: zeroized on drop.
pub(crate) fn serialize<I>(payload: I, flags: u16, seq: u32) -> Zeroizing<Vec<u8>>
where
    I: NetlinkSerializable + Debug,
{
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    message.finalize();
    let mut bytes = Zeroizing::new(vec![0u8; message.buffer_len()]);
    message.serialize(&mut bytes);
    bytes
}

/// A connected netlink socket of one protocol. Not `Sync`: callers serialize access.
pub(crate) struct NetlinkSocket {
    socket: Socket,
    seq: u32,
    timeout: Duration,
}

impl NetlinkSocket {
    /// Opens and binds a socket of `protocol` (`NETLINK_GENERIC`, `NETLINK_ROUTE`).
    pub(crate) fn open(protocol: isize, timeout: Duration) -> Result<Self, NetlinkError> {
        let io = |source| NetlinkError::Io { source };
        let mut socket = Socket::new(protocol).map_err(io)?;
        socket.bind_auto().map_err(io)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(io)?;
        // Extended acks make the kernel's error messages carry the reason; harmless if refused.
        let _ = socket.set_ext_ack(true);
        Ok(Self {
            socket,
            seq: 0,
            timeout,
        })
    }

    /// Sends `payload` and waits for its answer: the data messages up to the acknowledgement
    /// (plain request, `NLM_F_ACK` is added) or up to `NLMSG_DONE` (`dump`).
    pub(crate) fn request<I, O>(&mut self, payload: I, dump: bool) -> Result<Vec<O>, NetlinkError>
    where
        I: NetlinkSerializable + Debug,
        O: NetlinkDeserializable + Debug,
    {
        self.request_with_flags(payload, dump, 0)
    }

    /// As [`request`](Self::request) with more `NLM_F_*` flags (`NLM_F_CREATE | NLM_F_EXCL`).
    pub(crate) fn request_with_flags<I, O>(
        &mut self,
        payload: I,
        dump: bool,
        extra_flags: u16,
    ) -> Result<Vec<O>, NetlinkError>
    where
        I: NetlinkSerializable + Debug,
        O: NetlinkDeserializable + Debug,
    {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let flags = extra_flags | if dump { NLM_F_DUMP } else { NLM_F_ACK };
        let bytes = serialize(payload, flags, seq);
        self.socket
            .send(&bytes, 0)
            .map_err(|source| NetlinkError::Io { source })?;
        drop(bytes);
        let deadline = Instant::now() + self.timeout;
        let mut out = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(NetlinkError::Timeout {
                    timeout: self.timeout,
                });
            }
            socket2::SockRef::from(&self.socket)
                .set_read_timeout(Some(remaining))
                .map_err(|source| NetlinkError::Io { source })?;
            let datagram = match self.socket.recv_from_full() {
                Ok((datagram, _)) => Zeroizing::new(datagram),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(NetlinkError::Timeout {
                        timeout: self.timeout,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(NetlinkError::Io { source }),
            };
            for reply in parse_datagram::<O>(&datagram, seq)? {
                match reply {
                    Reply::Message(m) => out.push(m),
                    Reply::Ack | Reply::Done => return Ok(out),
                }
            }
        }
    }
}
