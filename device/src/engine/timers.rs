//! The timer thread: ticks boringtun's per-peer timers (handshake retries, rekey, session
//! expiry, passive keepalives) every 250 ms, runs persistent keepalives itself (so the interval
//! can change without dropping a session), resets the handshake rate limiter every second, and
//! applies the `rekey_after` test hook.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use boringtun::noise::{TunnResult, errors::WireGuardError};

use super::{EngineCounters, Shared, outbox::Outbox};

const TICK: Duration = Duration::from_millis(250);

pub(crate) fn run(shared: Arc<Shared>) {
    let mut timers = Timers::new(shared);
    while !timers.shared.stopping() {
        let mut pfd = libc::pollfd {
            fd: timers.shared.waker.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe {
            libc::poll(&mut pfd, 1, TICK.as_millis() as i32);
        }
        if timers.shared.stopping() {
            break;
        }
        timers.tick();
    }
}

/// The timer thread's state between ticks.
pub(crate) struct Timers {
    shared: Arc<Shared>,
    buf: Vec<u8>,
    out: Outbox,
    last_reset: Instant,
    last_log: Instant,
    logged: EngineCounters,
}

impl Timers {
    pub fn new(shared: Arc<Shared>) -> Self {
        let logged = shared.counters.snapshot();
        Self {
            shared,
            buf: vec![0u8; 2048],
            out: Outbox::with_capacity(4096),
            last_reset: Instant::now(),
            last_log: Instant::now(),
            logged,
        }
    }

    /// One tick: every peer's timers under the state read lock and its peer lock, collecting
    /// what they want sent; the sends happen after both are released.
    pub fn tick(&mut self) {
        let shared = &*self.shared;
        if self.last_log.elapsed() >= Duration::from_secs(10) {
            let now = shared.counters.snapshot();
            if now != self.logged {
                tracing::debug!(ifname = %shared.ifname, counters = ?now, "engine counters");
                self.logged = now;
            }
            self.last_log = Instant::now();
        }
        let (buf, out) = (&mut self.buf, &mut self.out);
        let state = shared.read_state();
        if let Some(id) = &state.identity
            && self.last_reset.elapsed() >= Duration::from_secs(1)
        {
            id.rate_limiter.reset_count();
            self.last_reset = Instant::now();
        }
        let now_ms = shared.now_ms();
        for entry in state.peers.values() {
            let peer = &entry.peer;
            let mut inner = peer.lock();
            let endpoint = inner.endpoint;
            let Some(tunn) = inner.tunn.as_mut() else {
                continue;
            };
            // What update_timers sends counts as "sent now" for the persistent keepalive.
            let mut last_tx_ms = peer.last_tx_ms.load(Ordering::Relaxed);
            match tunn.update_timers(buf) {
                TunnResult::WriteToNetwork(pkt) => {
                    if let Some(dst) = endpoint {
                        out.push(dst, pkt, Some(peer));
                        last_tx_ms = now_ms;
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    tracing::trace!(peer = %peer.public_key, "session expired");
                }
                TunnResult::Err(e) => {
                    tracing::debug!(peer = %peer.public_key, error = ?e, "timer error");
                }
                TunnResult::Done
                | TunnResult::WriteToTunnelV4(..)
                | TunnResult::WriteToTunnelV6(..) => {}
            }
            let Some(dst) = endpoint else {
                continue;
            };
            let keepalive = u64::from(peer.keepalive.load(Ordering::Relaxed));
            let due = keepalive != 0
                && (peer.keepalive_now.swap(false, Ordering::Relaxed)
                    || now_ms.saturating_sub(last_tx_ms) >= keepalive * 1000);
            if due && let TunnResult::WriteToNetwork(pkt) = tunn.encapsulate(&[], buf) {
                out.push(dst, pkt, Some(peer));
            }
            if let Some(after) = shared.rekey_after
                && tunn
                    .time_since_last_handshake()
                    .is_some_and(|age| age >= after)
                && let TunnResult::WriteToNetwork(pkt) =
                    tunn.format_handshake_initiation(buf, false)
            {
                tracing::debug!(peer = %peer.public_key, "test rekey: new handshake");
                out.push(dst, pkt, Some(peer));
            }
        }
        let udp = state.udp.clone();
        drop(state);
        if !out.is_empty() {
            out.send(&udp, 0, shared);
        }
    }
}
