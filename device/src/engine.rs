//! The userspace WireGuard engine: boringtun's `noise` layer (handshakes, sessions, timers,
//! cookies) driven by our own I/O — a multi-queue TUN with virtio-net offloads and one batched
//! UDP socket with GSO/GRO — with one datapath worker per core. It implements
//! [`Datapath`] for the agent and serves the wg(8) UAPI (see
//! [`crate::uapi`]) so that `wg show`/`wg set` work against it.
//!
//! Threads: `wm-dp-N`, one per core, each owning TUN queue N (encrypt -> UDP) and UDP
//! socket N (decrypt -> TUN; SO_REUSEPORT sockets, so each peer's packets stay in order),
//! `wm-timers` (boringtun timer ticks every 250 ms, persistent keepalives, rate-limiter
//! resets) and `wm-uapi` (the configuration socket). The engine never assigns addresses or routes: the owner of the
//! interface does (the agent through rtnetlink, an operator with ip(8)).
//!
//! No lock is held across a UDP send (see the `worker` and `outbox` modules), so a configuration
//! write never waits for a full socket buffer. A panic in any engine thread fails the whole
//! device ([`UserspaceEngine::failure`]): the device process exits non-zero for its supervisor
//! to restart it, rather than running on with a dead worker.

mod allowed_ips;
mod checksum;
#[doc(hidden)]
pub mod fuzzing;
mod gro;
mod gso;
mod int_hash;
mod io;
mod outbox;
mod state;
mod timers;
mod worker;

#[cfg(test)]
pub(crate) use worker::PANIC_QUEUE;

use std::{
    path::PathBuf,
    sync::{
        Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use wiremesh_keyexchange::PublicKey;
use wiremesh_wgctrl::{
    convert,
    datapath::{
        Datapath, DatapathError, DatapathKind, DeviceSettings, DeviceStatus, PeerConfig, PeerStatus,
    },
    uapi::parse::{self as uapi_parse, GetPeer, GetResponse, SecretKey, SetRequest},
};
use zeroize::Zeroizing;

use self::{
    io::{NetNs, UdpEndpoint, Waker},
    outbox::Outbox,
    state::{ApplyError, DeviceState},
};
use crate::uapi::{UapiHandler, UapiServer};

/// Default tunnel MTU: a 1500-byte underlay minus the 80 bytes of WireGuard-over-IPv6
/// overhead (40 IPv6 + 8 UDP + 32 WireGuard), so full-size packets never fragment.
pub const DEFAULT_MTU: u16 = 1420;

/// How to build an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Interface name (at most 15 bytes).
    pub ifname: String,
    /// Interface MTU.
    pub mtu: u16,
    /// Where to serve the wg(8) UAPI; `None` serves none.
    pub uapi_socket: Option<PathBuf>,
    /// Datapath workers (= TUN queues); 0 means one per available core.
    pub threads: usize,
    /// UDP port to bind at start; 0 picks a free one (wg(8) can change it later).
    pub listen_port: u16,
    /// After handling packets, keep polling this long before sleeping (0 = off). Lowers the
    /// round-trip time of an idle tunnel by saving thread wake-ups, at the cost of CPU.
    pub busy_poll: Duration,
    /// Test hook: start a new handshake whenever the current session is older than this,
    /// instead of boringtun's fixed 120 s (REKEY_AFTER_TIME). `None` in production.
    pub rekey_after: Option<Duration>,
}

impl EngineConfig {
    /// Defaults for `ifname`: MTU 1420, no UAPI socket, one worker per core, random port.
    pub fn new(ifname: impl Into<String>) -> Self {
        Self {
            ifname: ifname.into(),
            mtu: DEFAULT_MTU,
            uapi_socket: None,
            threads: 0,
            listen_port: 0,
            busy_poll: Duration::ZERO,
            rekey_after: None,
        }
    }

    /// The socket path wg(8) looks for: `/var/run/wireguard/<ifname>.sock`.
    pub fn default_uapi_path(ifname: &str) -> PathBuf {
        PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"))
    }
}

/// Why the engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("interface name {ifname:?}: {reason}")]
    InvalidName {
        ifname: String,
        reason: &'static str,
    },
    #[error("interface {ifname}: cannot create TUN device: {source}")]
    Tun {
        ifname: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {ifname}: cannot bind UDP port {port}: {source}")]
    Udp {
        ifname: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {ifname}: cannot serve UAPI: {source}")]
    Uapi {
        ifname: String,
        #[source]
        source: crate::uapi::UapiError,
    },
    #[error("interface {ifname}: cannot start thread: {source}")]
    Thread {
        ifname: String,
        #[source]
        source: std::io::Error,
    },
}

/// Drop and event counters of one engine (monotonic since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Datagrams sent (data, handshake, keepalive).
    pub tx_datagrams: u64,
    /// Sends that failed, or packets that could not be encapsulated.
    pub tx_errors: u64,
    /// TUN packets with no peer for their destination.
    pub tx_no_route: u64,
    /// TUN packets for a peer with no known endpoint.
    pub tx_no_endpoint: u64,
    /// Packets dropped because the device has no private key.
    pub tx_no_key: u64,
    /// TUN frames that were not IP or could not be split.
    pub tun_malformed: u64,
    /// IPv6 multicast/link-local packets (neighbour discovery) not sent into the tunnel.
    pub tun_filtered: u64,
    /// Writes to the TUN that failed.
    pub tun_write_errors: u64,
    /// Datagrams that are not WireGuard messages (bad type, size or reserved bytes).
    pub rx_malformed: u64,
    /// Datagrams for a receiver index or static key we do not know.
    pub rx_unknown_peer: u64,
    /// Handshake messages with a wrong mac1.
    pub rx_invalid_mac: u64,
    /// Cookie replies sent because handshakes arrived faster than the rate limit.
    pub rx_cookie_replies: u64,
    /// Handshakes that failed to authenticate (or replays).
    pub rx_handshake_failed: u64,
    /// Data packets that failed to decrypt, were replayed or had no session.
    pub rx_decrypt_failed: u64,
    /// Decrypted packets whose inner source is not in the sender's allowed IPs.
    pub rx_src_not_allowed: u64,
    /// Datagrams dropped because the device has no private key.
    pub rx_no_key: u64,
}

macro_rules! counters {
    ($($field:ident),* $(,)?) => {
        #[derive(Default)]
        pub(crate) struct Counters { $(pub $field: AtomicU64,)* }
        impl Counters {
            pub(crate) fn snapshot(&self) -> EngineCounters {
                EngineCounters { $($field: self.$field.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters!(
    tx_datagrams,
    tx_errors,
    tx_no_route,
    tx_no_endpoint,
    tx_no_key,
    tun_malformed,
    tun_filtered,
    tun_write_errors,
    rx_malformed,
    rx_unknown_peer,
    rx_invalid_mac,
    rx_cookie_replies,
    rx_handshake_failed,
    rx_decrypt_failed,
    rx_src_not_allowed,
    rx_no_key,
);

/// State shared by the engine handle, the workers, the timer thread and the UAPI server.
pub(crate) struct Shared {
    pub ifname: String,
    state: RwLock<DeviceState>,
    /// Serializes configuration changes (including the slow socket bind).
    config: Mutex<()>,
    pub counters: Counters,
    pub waker: Waker,
    stop: AtomicBool,
    closed: Mutex<Option<String>>,
    closed_cv: Condvar,
    /// Set when an engine thread panicked: the device is broken, not merely closed.
    failure: Mutex<Option<String>>,
    netns: NetNs,
    /// UDP sockets per endpoint (= receive workers).
    udp_sockets: usize,
    started: Instant,
    pub rekey_after: Option<Duration>,
    /// Busy polling (opt-in): the worker that handled the last packet, the only one that
    /// spins; the others sleep in poll(2).
    pub spinner: AtomicUsize,
}

impl Shared {
    pub fn read_state(&self) -> RwLockReadGuard<'_, DeviceState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, DeviceState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Milliseconds since the engine started (coarse clock for keepalives).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Records why the device stopped working and wakes everyone up.
    pub fn mark_dead(&self, reason: String) {
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        if closed.is_none() {
            tracing::info!(ifname = %self.ifname, reason = %reason, "device closing");
            *closed = Some(reason);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
        self.closed_cv.notify_all();
    }

    /// Records that the device broke (an engine thread panicked) and closes it.
    pub fn mark_failed(&self, reason: String) {
        tracing::error!(ifname = %self.ifname, reason = %reason, "device failed");
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| reason.clone());
        self.mark_dead(reason);
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A device on `udp` with no TUN and no threads: for driving the receive path directly
    /// (unit tests, the fuzz harness).
    pub(crate) fn detached(ifname: &str, udp: UdpEndpoint) -> Self {
        Self {
            ifname: ifname.into(),
            state: RwLock::new(DeviceState::new(Arc::new(udp))),
            config: Mutex::new(()),
            counters: Counters::default(),
            waker: Waker::new().expect("eventfd"),
            stop: AtomicBool::new(false),
            closed: Mutex::new(None),
            closed_cv: Condvar::new(),
            failure: Mutex::new(None),
            netns: NetNs::current().expect("the current network namespace"),
            udp_sockets: 1,
            started: Instant::now(),
            rekey_after: None,
            spinner: AtomicUsize::new(0),
        }
    }

    /// Starts a new handshake with `peer` now (unless one is in flight), as a rekey would.
    fn force_handshake(&self, peer: &PublicKey) -> Result<(), DatapathError> {
        let mut out = Outbox::with_capacity(256);
        let udp = self.stage_handshake(peer, &mut out)?;
        out.send(&udp, 0, self);
        Ok(())
    }

    /// Stages a new handshake initiation to `peer` in `out`; the endpoint to send it on.
    fn stage_handshake(
        &self,
        peer: &PublicKey,
        out: &mut Outbox,
    ) -> Result<Arc<UdpEndpoint>, DatapathError> {
        Ok({
            let st = self.read_state();
            let entry = st
                .peers
                .get(peer)
                .ok_or_else(|| DatapathError::NoSuchPeer {
                    ifname: self.ifname.clone(),
                    public_key: *peer,
                })?;
            let mut inner = entry.peer.lock();
            let endpoint = inner.endpoint;
            let mut buf = [0u8; 256];
            if let (Some(tunn), Some(dst)) = (inner.tunn.as_mut(), endpoint)
                && let boringtun::noise::TunnResult::WriteToNetwork(init) =
                    tunn.format_handshake_initiation(&mut buf, true)
            {
                out.push(dst, init, Some(&entry.peer));
            }
            st.udp.clone()
        })
    }

    fn apply(&self, req: &SetRequest) -> Result<(), ApplyError> {
        let _serial = self.config.lock().unwrap_or_else(|e| e.into_inner());
        let (cur_port, fwmark) = {
            let st = self.read_state();
            (st.udp.port, st.fwmark)
        };
        let new_udp = match req.listen_port {
            Some(port) if port != 0 && port != cur_port => {
                let mark = req.fwmark.unwrap_or(fwmark);
                let count = self.udp_sockets;
                let udp = self
                    .netns
                    .run(move || UdpEndpoint::bind(port, mark, count))
                    .map_err(|source| ApplyError::Bind { port, source })?;
                Some(Arc::new(udp))
            }
            _ => None,
        };
        let old = self.write_state().apply(req, new_udp)?;
        if let Some(old) = old {
            // Wake workers polling the old sockets so they pick up the new ones.
            old.shutdown();
        }
        Ok(())
    }

    fn peer_statuses(&self) -> Vec<(PeerStatus, Option<Zeroizing<[u8; 32]>>)> {
        let st = self.read_state();
        st.peers
            .values()
            .map(|entry| {
                let inner = entry.peer.lock();
                let last_handshake = inner
                    .tunn
                    .as_ref()
                    .and_then(|t| t.time_since_last_handshake())
                    .and_then(|ago| SystemTime::now().checked_sub(ago));
                let ka = entry.peer.keepalive.load(Ordering::Relaxed) as u16;
                (
                    PeerStatus {
                        public_key: entry.peer.public_key,
                        endpoint: inner.endpoint,
                        allowed_ips: entry.allowed_ips.clone(),
                        persistent_keepalive: (ka != 0).then_some(ka),
                        has_preshared_key: entry.preshared_key.is_some(),
                        last_handshake,
                        rx_bytes: entry.peer.rx_bytes.load(Ordering::Relaxed),
                        tx_bytes: entry.peer.tx_bytes.load(Ordering::Relaxed),
                    },
                    entry.preshared_key.clone(),
                )
            })
            .collect()
    }
}

impl UapiHandler for Shared {
    fn uapi_get(&self) -> GetResponse {
        let (private_key, listen_port, fwmark) = {
            let st = self.read_state();
            (
                st.identity
                    .as_ref()
                    .map(|id| SecretKey(Zeroizing::new(id.secret.to_bytes()))),
                st.udp.port,
                st.fwmark,
            )
        };
        let peers = self
            .peer_statuses()
            .into_iter()
            .map(|(p, psk)| GetPeer {
                public_key: *p.public_key.as_bytes(),
                preshared_key: psk.map(SecretKey),
                endpoint: p.endpoint,
                last_handshake: p.last_handshake,
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                persistent_keepalive: p.persistent_keepalive.unwrap_or(0),
                allowed_ips: p.allowed_ips,
            })
            .collect();
        GetResponse {
            private_key,
            listen_port,
            fwmark,
            peers,
        }
    }

    fn uapi_set(&self, req: &SetRequest) -> Result<(), i32> {
        self.apply(req).map_err(|e| {
            tracing::warn!(ifname = %self.ifname, error = %e, "UAPI set failed");
            match e {
                ApplyError::Bind { .. } | ApplyError::Fwmark { .. } => uapi_parse::EADDRINUSE,
            }
        })
    }

    fn uapi_failed(&self, reason: String) {
        self.mark_failed(reason);
    }
}

/// Spawns engine thread `name`. If `f` panics, the device fails ([`Shared::mark_failed`])
/// instead of running on without the thread (a dead worker would silently drop its queue's
/// packets while the UAPI still answers).
fn spawn_watched(
    shared: &Arc<Shared>,
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let watch = PanicWatch {
        shared: shared.clone(),
        thread: name.clone(),
    };
    std::thread::Builder::new().name(name).spawn(move || {
        let _watch = watch;
        f();
    })
}

/// Fails the device when dropped by a panicking thread.
pub(crate) struct PanicWatch {
    shared: Arc<Shared>,
    thread: String,
}

impl Drop for PanicWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared
                .mark_failed(format!("engine thread {} panicked", self.thread));
        }
    }
}

/// A running userspace WireGuard device. See the module docs.
pub struct UserspaceEngine {
    shared: Arc<Shared>,
    ifindex: u32,
    mtu: u16,
    threads: Mutex<Vec<JoinHandle<()>>>,
    uapi: Mutex<Option<UapiServer>>,
}

impl std::fmt::Debug for UserspaceEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserspaceEngine")
            .field("ifname", &self.shared.ifname)
            .field("ifindex", &self.ifindex)
            .finish_non_exhaustive()
    }
}

impl UserspaceEngine {
    /// Creates the TUN device and UDP socket in the network namespace of the calling thread,
    /// starts the workers and (if configured) the UAPI server.
    pub fn create(config: EngineConfig) -> Result<Arc<Self>, EngineError> {
        let ifname = config.ifname.clone();
        validate_ifname(&ifname)?;
        let threads = if config.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            config.threads
        };
        let tun_err = |source| EngineError::Tun {
            ifname: ifname.clone(),
            source,
        };
        let netns = NetNs::current().map_err(tun_err)?;
        let udp = UdpEndpoint::bind(config.listen_port, 0, threads).map_err(|source| {
            EngineError::Udp {
                ifname: ifname.clone(),
                port: config.listen_port,
                source,
            }
        })?;
        let queues = io::open_tun(&ifname, config.mtu, threads).map_err(tun_err)?;
        let ifindex = queues[0].if_index().map_err(tun_err)?;
        let shared = Arc::new(Shared {
            ifname: ifname.clone(),
            state: RwLock::new(DeviceState::new(Arc::new(udp))),
            config: Mutex::new(()),
            counters: Counters::default(),
            waker: Waker::new().map_err(tun_err)?,
            stop: AtomicBool::new(false),
            closed: Mutex::new(None),
            closed_cv: Condvar::new(),
            failure: Mutex::new(None),
            netns,
            udp_sockets: threads,
            started: Instant::now(),
            rekey_after: config.rekey_after,
            spinner: AtomicUsize::new(0),
        });
        let engine = Arc::new(Self {
            shared: shared.clone(),
            ifindex,
            mtu: config.mtu,
            threads: Mutex::new(Vec::new()),
            uapi: Mutex::new(None),
        });
        let thread_err = |source| EngineError::Thread {
            ifname: ifname.clone(),
            source,
        };
        {
            let mut handles = engine.threads.lock().unwrap_or_else(|e| e.into_inner());
            for (queue, tun) in queues.into_iter().enumerate() {
                tun.set_nonblocking(true).map_err(tun_err)?;
                let tun = Arc::new(tun);
                let tx = worker::TunWorker::new(shared.clone(), tun.clone(), queue);
                let rx = worker::UdpWorker::new(shared.clone(), tun, queue);
                let w = worker::Worker {
                    tx,
                    rx,
                    busy_poll: config.busy_poll,
                };
                handles.push(
                    spawn_watched(&shared, format!("wm-dp-{queue}"), move || w.run())
                        .map_err(thread_err)?,
                );
            }
            let timer_shared = shared.clone();
            handles.push(
                spawn_watched(&shared, "wm-timers".into(), move || {
                    timers::run(timer_shared)
                })
                .map_err(thread_err)?,
            );
        }
        if let Some(path) = &config.uapi_socket {
            let handler: Arc<dyn UapiHandler> = shared.clone();
            let server = UapiServer::start(path, handler).map_err(|source| EngineError::Uapi {
                ifname: ifname.clone(),
                source,
            })?;
            *engine.uapi.lock().unwrap_or_else(|e| e.into_inner()) = Some(server);
        }
        tracing::info!(
            ifname = %ifname,
            ifindex,
            mtu = config.mtu,
            workers = threads,
            listen_port = engine.listen_port(),
            "userspace WireGuard engine started"
        );
        Ok(engine)
    }

    /// The interface index of the TUN device (in the namespace it was created in).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The MTU the device was created with.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The UDP port currently bound.
    pub fn listen_port(&self) -> u16 {
        self.shared.read_state().udp.port
    }

    /// Drop and event counters.
    pub fn counters(&self) -> EngineCounters {
        self.shared.counters.snapshot()
    }

    /// Starts a new handshake with `peer` now (unless one is in flight), as a rekey would.
    pub fn force_handshake(&self, peer: &PublicKey) -> Result<(), DatapathError> {
        self.shared.force_handshake(peer)
    }

    /// Why the device failed, if it did: an engine thread panicked. A failed device is also
    /// closed ([`wait_closed`](Self::wait_closed) returns); its process must exit non-zero so
    /// that its supervisor restarts it.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure()
    }

    /// Asks the device to close (as SIGTERM does for `mesh-agent device`).
    pub fn close(&self, reason: impl Into<String>) {
        self.shared.mark_dead(reason.into());
    }

    /// Blocks until the device closes (interface deleted, [`close`](Self::close), shutdown)
    /// or `timeout` passes; returns the reason if it closed.
    pub fn wait_closed(&self, timeout: Option<Duration>) -> Option<String> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut closed = self.shared.closed.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(reason) = closed.as_ref() {
                return Some(reason.clone());
            }
            closed = match deadline {
                None => self
                    .shared
                    .closed_cv
                    .wait(closed)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    self.shared
                        .closed_cv
                        .wait_timeout(closed, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// Stops the workers, removes the TUN device (by closing its queues) and the UAPI socket.
    /// Idempotent; also run on drop.
    pub fn shutdown(&self) {
        self.shared.mark_dead("shut down".into());
        if let Some(mut server) = self.uapi.lock().unwrap_or_else(|e| e.into_inner()).take() {
            server.stop();
        }
        let handles: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for handle in handles {
            if handle.join().is_err() {
                tracing::error!(ifname = %self.shared.ifname, "engine thread panicked");
            }
        }
        // Drop all sessions so no key material outlives the device.
        let mut st = self.shared.write_state();
        let keys: Vec<PublicKey> = st.peers.keys().copied().collect();
        for key in keys {
            st.remove_peer(&key);
        }
        st.identity = None;
    }

    fn invalid(&self, message: String) -> DatapathError {
        DatapathError::Invalid {
            ifname: self.shared.ifname.clone(),
            message,
        }
    }

    fn apply(&self, req: &SetRequest) -> Result<(), DatapathError> {
        if self.shared.stopping() {
            return Err(DatapathError::Closed {
                ifname: self.shared.ifname.clone(),
            });
        }
        self.shared.apply(req).map_err(|e| match e {
            ApplyError::Bind { source, .. } | ApplyError::Fwmark { source, .. } => {
                DatapathError::Io {
                    ifname: self.shared.ifname.clone(),
                    source,
                }
            }
        })
    }
}

impl Drop for UserspaceEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Datapath for UserspaceEngine {
    fn kind(&self) -> DatapathKind {
        DatapathKind::Userspace
    }

    fn ifname(&self) -> &str {
        &self.shared.ifname
    }

    fn configure(&self, settings: &DeviceSettings) -> Result<(), DatapathError> {
        self.apply(&convert::configure_request(settings))
    }

    fn set_peer(&self, peer: &PeerConfig) -> Result<(), DatapathError> {
        let req = convert::set_peer_request(peer).map_err(|message| self.invalid(message))?;
        self.apply(&req)
    }

    fn remove_peer(&self, public_key: &PublicKey) -> Result<(), DatapathError> {
        self.apply(&convert::remove_peer_request(public_key))
    }

    fn status(&self) -> Result<DeviceStatus, DatapathError> {
        let (public_key, listen_port, fwmark) = {
            let st = self.shared.read_state();
            (
                st.identity
                    .as_ref()
                    .map(|id| PublicKey::from_bytes(id.public.to_bytes())),
                st.udp.port,
                st.fwmark,
            )
        };
        Ok(DeviceStatus {
            kind: DatapathKind::Userspace,
            ifname: self.shared.ifname.clone(),
            ifindex: self.ifindex,
            public_key,
            listen_port,
            fwmark,
            mtu: u32::from(self.mtu),
            peers: self
                .shared
                .peer_statuses()
                .into_iter()
                .map(|(p, _)| p)
                .collect(),
        })
    }
}

fn validate_ifname(ifname: &str) -> Result<(), EngineError> {
    let reason = if ifname.is_empty() {
        Some("empty")
    } else if ifname.len() > 15 {
        Some("longer than 15 bytes")
    } else if ifname
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
        || ifname == "."
        || ifname == ".."
    {
        Some("contains '/', ':', whitespace or is a dot name")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(EngineError::InvalidName {
            ifname: ifname.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
