//! [`UapiDevice`]: a [`Datapath`] that configures a userspace WireGuard device (ours,
//! wireguard-go, boringtun-cli) through its wg(8) UAPI socket, the way `wg(8)` does: one
//! connection per operation, `get=1` to read, `set=1` to change, `errno=` for the outcome.

use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use wiremesh_keyexchange::PublicKey;

use super::parse::{self, GetResponse, SetRequest};
use crate::{
    convert,
    datapath::{Datapath, DatapathError, DatapathKind, DeviceSettings, DeviceStatus, PeerConfig},
    iface,
};

/// How long one operation may take by default (connect, request, answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest `get=1` answer read (a few hundred bytes per peer and allowed IP).
const MAX_GET_ANSWER: usize = 64 << 20;

/// Why a UAPI operation failed. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum UapiClientError {
    /// Nothing serves the socket: the file is missing or nobody accepts on it (the device
    /// process is gone).
    #[error("no device is serving the socket: {source}")]
    NotServing {
        #[source]
        source: io::Error,
    },
    #[error("timed out after {timeout:?}")]
    Timeout { timeout: Duration },
    #[error("{source}")]
    Io {
        #[source]
        source: io::Error,
    },
    /// The device refused the request with this errno (negative, as the protocol sends it).
    #[error("the device answered errno={errno} ({})", io::Error::from_raw_os_error(errno.saturating_neg()))]
    Errno { errno: i32 },
    #[error("malformed answer: {reason}")]
    Protocol { reason: String },
}

impl UapiClientError {
    fn io(source: io::Error, timeout: Duration) -> Self {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::Timeout { timeout },
            _ => Self::Io { source },
        }
    }
}

/// A userspace WireGuard device reached over its UAPI socket. Holds no connection: every
/// operation connects, so a restarted device process is picked up without any reconnect logic.
#[derive(Debug, Clone)]
pub struct UapiDevice {
    ifname: String,
    socket: PathBuf,
    timeout: Duration,
}

impl UapiDevice {
    /// The device `ifname` at the socket wg(8) looks for: `/var/run/wireguard/<ifname>.sock`.
    pub fn new(ifname: &str) -> Self {
        Self::with_socket(ifname, default_socket_path(ifname))
    }

    /// The device `ifname` served at `socket`.
    pub fn with_socket(ifname: &str, socket: impl Into<PathBuf>) -> Self {
        Self {
            ifname: ifname.to_string(),
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Bounds each operation (connect, request and answer) by `timeout` instead of 5 s.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The device's configuration and peers (`get=1`), the private key included.
    pub fn get(&self) -> Result<GetResponse, DatapathError> {
        self.get_raw().map_err(|e| self.error(e))
    }

    /// Applies `req` (`set=1`); the device applies all of it or nothing.
    pub fn set(&self, req: &SetRequest) -> Result<(), DatapathError> {
        self.set_raw(req).map_err(|e| self.error(e))
    }

    fn error(&self, source: UapiClientError) -> DatapathError {
        DatapathError::Uapi {
            ifname: self.ifname.clone(),
            socket: self.socket.clone(),
            source,
        }
    }

    fn connect(&self) -> Result<UnixStream, UapiClientError> {
        let stream = UnixStream::connect(&self.socket).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                UapiClientError::NotServing { source }
            }
            _ => UapiClientError::Io { source },
        })?;
        let set = |r: io::Result<()>| r.map_err(|source| UapiClientError::Io { source });
        set(stream.set_read_timeout(Some(self.timeout)))?;
        set(stream.set_write_timeout(Some(self.timeout)))?;
        Ok(stream)
    }

    fn get_raw(&self) -> Result<GetResponse, UapiClientError> {
        let mut stream = self.connect()?;
        stream
            .write_all(b"get=1\n\n")
            .map_err(|e| UapiClientError::io(e, self.timeout))?;
        let body = read_answer(&stream, self.timeout)?;
        parse::parse_get(&body).map_err(|e| UapiClientError::Protocol {
            reason: e.to_string(),
        })
    }

    fn set_raw(&self, req: &SetRequest) -> Result<(), UapiClientError> {
        let mut stream = self.connect()?;
        let body = parse::format_set(req);
        let mut text = zeroize::Zeroizing::new(String::with_capacity(body.len() + 8));
        text.push_str("set=1\n");
        text.push_str(&body);
        text.push('\n');
        stream
            .write_all(text.as_bytes())
            .map_err(|e| UapiClientError::io(e, self.timeout))?;
        let rest = read_answer(&stream, self.timeout)?;
        if rest.is_empty() {
            Ok(())
        } else {
            Err(UapiClientError::Protocol {
                reason: "unexpected lines before errno in a set answer".into(),
            })
        }
    }
}

/// The socket path wg(8) uses for `ifname`.
pub fn default_socket_path(ifname: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"))
}

/// Reads an answer up to its empty line; returns the lines before `errno=N` when N is 0.
/// Holds key material (a `get` answer carries the private key): zeroized.
pub(crate) fn read_answer(
    stream: &UnixStream,
    timeout: Duration,
) -> Result<zeroize::Zeroizing<String>, UapiClientError> {
    let mut reader = BufReader::new(stream);
    let mut body = zeroize::Zeroizing::new(String::new());
    let mut line = zeroize::Zeroizing::new(String::new());
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| UapiClientError::io(e, timeout))?;
        if n == 0 {
            return Err(UapiClientError::Protocol {
                reason: "connection closed before errno".into(),
            });
        }
        if let Some(value) = line.strip_prefix("errno=") {
            let errno: i32 =
                value
                    .trim_end_matches('\n')
                    .parse()
                    .map_err(|_| UapiClientError::Protocol {
                        // Cut short: the device's bytes end up in logs.
                        reason: format!("bad errno line {:?}", parse::truncate(line.trim_end())),
                    })?;
            return if errno == 0 {
                Ok(body)
            } else {
                Err(UapiClientError::Errno { errno })
            };
        }
        if line.as_str() == "\n" {
            return Err(UapiClientError::Protocol {
                reason: "answer ended without errno".into(),
            });
        }
        if body.len() + line.len() > MAX_GET_ANSWER {
            return Err(UapiClientError::Protocol {
                reason: format!("answer longer than {MAX_GET_ANSWER} bytes"),
            });
        }
        body.push_str(&line);
    }
}

impl Datapath for UapiDevice {
    fn kind(&self) -> DatapathKind {
        DatapathKind::Userspace
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

    /// A process serves the socket (a connection is accepted by the kernel only while one
    /// listens: a dead device's socket refuses it) and the interface exists, by its index now.
    /// The connection is closed without a request, which the device takes as a client that
    /// is done. In the calling thread's network namespace, as [`Datapath::status`].
    fn probe(&self) -> Result<u32, DatapathError> {
        drop(self.connect().map_err(|e| self.error(e))?);
        iface::lookup(&self.ifname)
            .map(|link| link.ifindex)
            .map_err(|source| DatapathError::Io {
                ifname: self.ifname.clone(),
                source,
            })
    }

    /// Reads the device over the socket and the interface's index and MTU from the kernel, in
    /// the calling thread's network namespace (where the device's TUN interface must be).
    fn status(&self) -> Result<DeviceStatus, DatapathError> {
        let get = self.get()?;
        let link = iface::lookup(&self.ifname).map_err(|source| DatapathError::Io {
            ifname: self.ifname.clone(),
            source,
        })?;
        Ok(convert::device_status(
            DatapathKind::Userspace,
            &self.ifname,
            link.ifindex,
            link.mtu,
            get,
        ))
    }
}

#[cfg(test)]
mod tests;
