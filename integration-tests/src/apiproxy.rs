//! A TCP proxy in front of the API server that the agents' kubeconfigs point to, so faults of the
//! control plane can be injected and the agents' behaviour measured from outside them (the
//! faults of docs/faults.md). It forwards bytes without looking into TLS (the apiserver's serving
//! certificate names the bridge IP, which the proxy listens on too) and runs in one of three modes,
//! read from a control file every [`POLL`]:
//!
//! - `pass`: forward;
//! - `down`: the API server is gone: every open connection is cut (RST) and new ones are reset
//!   as soon as they are accepted;
//! - `delay <ms>`: every chunk of bytes, in both directions, is held back `<ms>` milliseconds (a
//!   slow API server or etcd: requests take seconds).
//!
//! Per client address (each node's underlay IP) it counts connections accepted, connections reset
//! while down, connections open now and the most open at once since the last mode change, and
//! writes them as JSON to a stats file ([`ProxyStats`]) every [`POLL`].
//!
//! Binary: `wiremesh-apiproxy --listen IP:PORT --upstream IP:PORT --control FILE --stats FILE`.
//! The listen address actually bound (with `:0` a free port) is in the stats file.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// How often the control file is read and the stats file written.
pub const POLL: Duration = Duration::from_millis(50);

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProxyMode {
    /// Forward.
    Pass,
    /// Reset every connection (the API server is down).
    Down,
    /// Hold every chunk back this many milliseconds.
    Delay(u64),
}

impl ProxyMode {
    /// Parses the control file's text: `pass`, `down` or `delay <ms>`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut words = text.split_whitespace();
        match (words.next()?, words.next()) {
            ("pass", None) => Some(Self::Pass),
            ("down", None) => Some(Self::Down),
            ("delay", Some(ms)) => ms.parse().ok().map(Self::Delay),
            _ => None,
        }
    }

    /// The control file's text for this mode.
    pub fn render(self) -> String {
        match self {
            Self::Pass => "pass\n".to_owned(),
            Self::Down => "down\n".to_owned(),
            Self::Delay(ms) => format!("delay {ms}\n"),
        }
    }
}

/// Counters of one client address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientStats {
    /// Connections accepted and forwarded, since the start.
    pub connections: u64,
    /// Connections reset at once because the proxy was down.
    pub refused: u64,
    /// Connections open now.
    pub open: u64,
    /// The most connections open at once since the last mode change.
    pub max_open: u64,
}

/// The stats file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStats {
    /// The address the proxy listens on.
    pub listen: SocketAddr,
    /// The mode in force.
    pub mode: ProxyMode,
    /// Mode changes so far (a new `maxOpen` window each).
    pub epoch: u64,
    /// By client IP.
    pub clients: BTreeMap<IpAddr, ClientStats>,
}

impl ProxyStats {
    /// Reads a stats file.
    pub fn read(path: &Path) -> Result<Self, ProxyError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProxyError::Io {
            what: "reading stats",
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| ProxyError::Io {
            what: "parsing stats",
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })
    }

    /// The counters of `ip` (zero when it never connected).
    pub fn client(&self, ip: IpAddr) -> ClientStats {
        self.clients.get(&ip).cloned().unwrap_or_default()
    }
}

/// Why the proxy cannot run or be controlled.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Bad command line.
    #[error(
        "usage: wiremesh-apiproxy --listen IP:PORT --upstream IP:PORT --control FILE --stats FILE: {0}"
    )]
    Usage(String),
    /// A file or socket operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or address.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Parsed command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyArgs {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The API server.
    pub upstream: SocketAddr,
    /// The control file (mode).
    pub control: PathBuf,
    /// The stats file.
    pub stats: PathBuf,
}

impl ProxyArgs {
    /// Parses the arguments (without argv\[0\]).
    pub fn parse(mut argv: impl Iterator<Item = std::ffi::OsString>) -> Result<Self, ProxyError> {
        let (mut listen, mut upstream, mut control, mut stats) = (None, None, None, None);
        while let Some(flag) = argv.next() {
            let value = argv
                .next()
                .ok_or_else(|| ProxyError::Usage(format!("{flag:?} needs a value")))?;
            let addr = || {
                value
                    .to_str()
                    .and_then(|v| v.parse::<SocketAddr>().ok())
                    .ok_or_else(|| ProxyError::Usage(format!("{value:?} is not IP:PORT")))
            };
            match flag.to_str() {
                Some("--listen") => listen = Some(addr()?),
                Some("--upstream") => upstream = Some(addr()?),
                Some("--control") => control = Some(PathBuf::from(&value)),
                Some("--stats") => stats = Some(PathBuf::from(&value)),
                _ => return Err(ProxyError::Usage(format!("unknown argument {flag:?}"))),
            }
        }
        let missing = |what: &str| ProxyError::Usage(format!("no {what}"));
        Ok(Self {
            listen: listen.ok_or_else(|| missing("--listen"))?,
            upstream: upstream.ok_or_else(|| missing("--upstream"))?,
            control: control.ok_or_else(|| missing("--control"))?,
            stats: stats.ok_or_else(|| missing("--stats"))?,
        })
    }
}

/// The proxy binary: `$WIREMESH_APIPROXY_BIN`, else `wiremesh-apiproxy` next to the running
/// executable or one directory up.
pub fn default_binary() -> PathBuf {
    crate::supervise::sibling_binary("wiremesh-apiproxy", "WIREMESH_APIPROXY_BIN")
}

/// Sets the mode of the proxy controlled by `control` (it takes effect within [`POLL`]).
pub fn set_mode(control: &Path, mode: ProxyMode) -> Result<(), ProxyError> {
    crate::fsutil::write_private_atomic(control, mode.render().as_bytes()).map_err(|source| {
        ProxyError::Io {
            what: "writing the control file",
            path: control.to_owned(),
            source,
        }
    })
}

/// Shared state of the running proxy.
struct State {
    mode: ProxyMode,
    epoch: u64,
    clients: BTreeMap<IpAddr, ClientStats>,
    /// Open connections (both sockets), to cut them when going down.
    open: BTreeMap<u64, (TcpStream, TcpStream)>,
}

/// Runs the proxy until the process is killed.
pub fn run(args: &ProxyArgs) -> Result<(), ProxyError> {
    let listener = TcpListener::bind(args.listen).map_err(|source| ProxyError::Io {
        what: "listening on",
        path: PathBuf::from(args.listen.to_string()),
        source,
    })?;
    let listen = listener.local_addr().map_err(|source| ProxyError::Io {
        what: "local address of",
        path: PathBuf::from(args.listen.to_string()),
        source,
    })?;
    let mode = std::fs::read_to_string(&args.control)
        .ok()
        .and_then(|t| ProxyMode::parse(&t))
        .unwrap_or(ProxyMode::Pass);
    let state = Arc::new(Mutex::new(State {
        mode,
        epoch: 0,
        clients: BTreeMap::new(),
        open: BTreeMap::new(),
    }));
    let mut written = Vec::new();
    write_stats(&args.stats, listen, &state, &mut written)?;
    eprintln!("[apiproxy] {listen} -> {} ({mode:?})", args.upstream);

    let control = args.control.clone();
    let stats = args.stats.clone();
    let poller = state.clone();
    thread::Builder::new()
        .name("apiproxy-control".into())
        .spawn(move || {
            loop {
                thread::sleep(POLL);
                let wanted = std::fs::read_to_string(&control)
                    .ok()
                    .and_then(|t| ProxyMode::parse(&t));
                if let Some(wanted) = wanted {
                    let mut s = lock(&poller);
                    if s.mode != wanted {
                        eprintln!("[apiproxy] mode {:?} -> {wanted:?}", s.mode);
                        s.mode = wanted;
                        s.epoch += 1;
                        let open: Vec<u64> = s.clients.values().map(|c| c.open).collect();
                        for (c, open) in s.clients.values_mut().zip(open) {
                            c.max_open = open;
                        }
                        if wanted == ProxyMode::Down {
                            for (_, (a, b)) in std::mem::take(&mut s.open) {
                                reset(&a);
                                let _ = b.shutdown(Shutdown::Both);
                            }
                        }
                    }
                }
                if let Err(error) = write_stats(&stats, listen, &poller, &mut written) {
                    eprintln!("[apiproxy] {error}");
                }
            }
        })
        .map_err(|source| ProxyError::Io {
            what: "starting the control thread for",
            path: args.control.clone(),
            source,
        })?;

    let ids = AtomicU64::new(0);
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let Ok(peer) = client.peer_addr() else {
            continue;
        };
        let ip = peer.ip();
        let mode = lock(&state).mode;
        if mode == ProxyMode::Down {
            lock(&state).clients.entry(ip).or_default().refused += 1;
            reset(&client);
            continue;
        }
        let upstream = match TcpStream::connect_timeout(&args.upstream, Duration::from_secs(5)) {
            Ok(u) => u,
            Err(error) => {
                eprintln!("[apiproxy] upstream {}: {error}", args.upstream);
                reset(&client);
                continue;
            }
        };
        let id = ids.fetch_add(1, Ordering::Relaxed);
        {
            let mut s = lock(&state);
            let c = s.clients.entry(ip).or_default();
            c.connections += 1;
            c.open += 1;
            c.max_open = c.max_open.max(c.open);
            if let (Ok(a), Ok(b)) = (client.try_clone(), upstream.try_clone()) {
                s.open.insert(id, (a, b));
            }
        }
        let state = state.clone();
        let _ = thread::Builder::new()
            .name("apiproxy-conn".into())
            .spawn(move || {
                serve(client, upstream, &state);
                let mut s = lock(&state);
                s.open.remove(&id);
                if let Some(c) = s.clients.get_mut(&ip) {
                    c.open = c.open.saturating_sub(1);
                }
            });
    }
    Ok(())
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Closes with RST (SO_LINGER 0), as a host whose server died answers.
fn reset(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized value.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Forwards both directions until either side closes.
fn serve(client: TcpStream, upstream: TcpStream, state: &Arc<Mutex<State>>) {
    let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let up_state = state.clone();
    let up = thread::spawn(move || pump(client, upstream, &up_state));
    pump(u2, c2, state);
    let _ = up.join();
}

/// Copies `from` to `to`, each chunk held back by the delay in force when it was read.
fn pump(mut from: TcpStream, to: TcpStream, state: &Arc<Mutex<State>>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = thread::spawn(move || {
        let mut to = to;
        for (due, chunk) in rx {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = match lock(state).mode {
            ProxyMode::Delay(ms) => Duration::from_millis(ms),
            ProxyMode::Pass | ProxyMode::Down => Duration::ZERO,
        };
        if tx
            .send((Instant::now() + delay, buf[..n].to_vec()))
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// Writes the stats file when they changed since `written` (the last JSON written).
fn write_stats(
    path: &Path,
    listen: SocketAddr,
    state: &Mutex<State>,
    written: &mut Vec<u8>,
) -> Result<(), ProxyError> {
    let stats = {
        let s = lock(state);
        ProxyStats {
            listen,
            mode: s.mode,
            epoch: s.epoch,
            clients: s.clients.clone(),
        }
    };
    let json = serde_json::to_vec_pretty(&stats).map_err(|e| ProxyError::Io {
        what: "serializing stats to",
        path: path.to_owned(),
        source: std::io::Error::other(e),
    })?;
    if json == *written {
        return Ok(());
    }
    crate::fsutil::write_private_atomic(path, &json).map_err(|source| ProxyError::Io {
        what: "writing stats",
        path: path.to_owned(),
        source,
    })?;
    *written = json;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_render() {
        for mode in [ProxyMode::Pass, ProxyMode::Down, ProxyMode::Delay(2500)] {
            assert_eq!(ProxyMode::parse(&mode.render()), Some(mode));
        }
        assert_eq!(ProxyMode::parse("delay x"), None);
        assert_eq!(ProxyMode::parse("up"), None);
        assert_eq!(ProxyMode::parse(""), None);
    }

    #[test]
    fn forwards_delays_and_resets() {
        let dir = tempfile::tempdir().unwrap();
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = echo.local_addr().unwrap();
        thread::spawn(move || {
            for conn in echo.incoming() {
                let Ok(mut c) = conn else { continue };
                thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let args = ProxyArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream,
            control: dir.path().join("mode"),
            stats: dir.path().join("stats.json"),
        };
        let run_args = args.clone();
        thread::spawn(move || run(&run_args));
        let deadline = Instant::now() + Duration::from_secs(5);
        let stats = loop {
            if let Ok(s) = ProxyStats::read(&args.stats) {
                break s;
            }
            assert!(Instant::now() < deadline, "no stats file");
            thread::sleep(Duration::from_millis(10));
        };
        let echo_once = |expect_delay: Duration| {
            let mut c = TcpStream::connect(stats.listen).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let started = Instant::now();
            c.write_all(b"ping").unwrap();
            let mut back = [0u8; 4];
            c.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"ping");
            // Held back once on the way out and once on the way back.
            assert!(
                started.elapsed() >= expect_delay * 2,
                "{:?}",
                started.elapsed()
            );
            c
        };
        let open = echo_once(Duration::ZERO);
        set_mode(&args.control, ProxyMode::Delay(100)).unwrap();
        thread::sleep(POLL * 3);
        drop(echo_once(Duration::from_millis(100)));
        set_mode(&args.control, ProxyMode::Down).unwrap();
        thread::sleep(POLL * 3);
        // The open connection was cut, and a new one is reset.
        let mut open = open;
        let mut buf = [0u8; 4];
        let _ = open.write_all(b"ping");
        assert!(matches!(open.read(&mut buf), Ok(0) | Err(_)));
        let mut fresh = TcpStream::connect(stats.listen).unwrap();
        fresh
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = fresh.write_all(b"ping");
        assert!(matches!(fresh.read(&mut buf), Ok(0) | Err(_)));
        thread::sleep(POLL * 3);
        let stats = ProxyStats::read(&args.stats).unwrap();
        let me = stats.client("127.0.0.1".parse().unwrap());
        assert_eq!(stats.mode, ProxyMode::Down);
        assert_eq!(me.connections, 2, "{me:?}");
        assert_eq!(me.refused, 1, "{me:?}");
    }
}
