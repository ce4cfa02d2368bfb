//! The wg(8) cross-platform UAPI server: a Unix socket (normally
//! `/var/run/wireguard/<ifname>.sock`) speaking `get=1` / `set=1` exactly like wireguard-go,
//! so `wg show`, `wg set`, `wg setconf` and `wg showconf` work unchanged. Parsing and rendering
//! live in [`wiremesh_wgctrl::uapi::parse`] (pure, fuzzed, shared with the client); this module
//! owns the socket and the connection loop.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::{
        fd::AsRawFd,
        unix::{
            fs::PermissionsExt,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use wiremesh_wgctrl::uapi::parse::{self, GetResponse, MAX_SET_BODY, SetRequest};

/// What the UAPI server needs from a device.
pub trait UapiHandler: Send + Sync + 'static {
    /// The current configuration and peer state.
    fn uapi_get(&self) -> GetResponse;
    /// Applies a parsed `set`; `Err` carries the (negative) errno to report.
    fn uapi_set(&self, req: &SetRequest) -> Result<(), i32>;
}

/// Why the UAPI socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    #[error("{path}: another process is serving this socket")]
    InUse { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A running UAPI server; [`stop`](Self::stop) (or drop) removes the socket file.
pub struct UapiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How long one client may take to send its request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

impl UapiServer {
    /// Binds `path` (creating its directory, mode 0755 like wireguard-go's) and serves it on
    /// a thread. A stale socket file nobody listens on is replaced.
    pub fn start(path: &Path, handler: Arc<dyn UapiHandler>) -> Result<Self, UapiError> {
        let io_err = |source| UapiError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(UapiError::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(io_err)?;
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        listener.set_nonblocking(true).map_err(io_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread_path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("wm-uapi".into())
            .spawn(move || serve(listener, handler, thread_stop, thread_path))
            .map_err(io_err)?;
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving and removes the socket file. Idempotent.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
            if let Err(e) = std::fs::remove_file(&self.path)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove UAPI socket");
            }
        }
    }
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(
    listener: UnixListener,
    handler: Arc<dyn UapiHandler>,
    stop: Arc<AtomicBool>,
    path: PathBuf,
) {
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the short timeout bounds how long stop() waits.
        unsafe {
            libc::poll(&mut pfd, 1, 100);
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = handle_client(stream, handler.as_ref()) {
                    tracing::debug!(path = %path.display(), error = %e, "UAPI client error");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "UAPI accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Serves one connection: any number of `get=1` / `set=1` operations until EOF.
pub fn handle_client(stream: UnixStream, handler: &dyn UapiHandler) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        match line.as_str() {
            "get=1\n" => {
                let mut next = [0u8; 1];
                reader.read_exact(&mut next)?;
                if next[0] != b'\n' {
                    write!(writer, "errno={}\n\n", parse::EINVAL)?;
                    return Ok(());
                }
                let text = parse::format_get(&handler.uapi_get());
                writer.write_all(text.as_bytes())?;
            }
            "set=1\n" => {
                let body = read_set_body(&mut reader)?;
                let errno = match body {
                    Err(errno) => errno,
                    Ok(body) => match parse::parse_set(&body) {
                        Ok(req) => handler.uapi_set(&req).err().unwrap_or(0),
                        Err(e) => {
                            tracing::warn!(error = %e, "invalid UAPI set request");
                            e.errno()
                        }
                    },
                };
                write!(writer, "errno={errno}\n\n")?;
            }
            _ => return Ok(()),
        }
    }
}

/// Reads `key=value` lines up to the empty line. The body holds key material: zeroized.
fn read_set_body(
    reader: &mut BufReader<UnixStream>,
) -> io::Result<Result<zeroize::Zeroizing<String>, i32>> {
    let mut body = zeroize::Zeroizing::new(String::new());
    let mut line = zeroize::Zeroizing::new(String::new());
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "set request ended without an empty line",
            ));
        }
        if line.as_str() == "\n" {
            return Ok(Ok(body));
        }
        if body.len() + line.len() > MAX_SET_BODY {
            return Ok(Err(parse::EINVAL));
        }
        body.push_str(&line);
    }
}
