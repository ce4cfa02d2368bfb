//! The timer thread: ticks boringtun's per-peer timers (handshake retries, rekey, session
//! expiry, passive keepalives) every 250 ms, runs persistent keepalives itself (so the interval
//! can change without dropping a session), resets the handshake rate limiter every second, and
//! applies the `rekey_after` test hook.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use boringtun::noise::{TunnResult, errors::WireGuardError};

use super::{Shared, worker::send_control};

const TICK: Duration = Duration::from_millis(250);

pub(crate) fn run(shared: Arc<Shared>) {
    let mut buf = vec![0u8; 2048];
    let mut last_reset = Instant::now();
    let mut last_log = Instant::now();
    let mut logged = shared.counters.snapshot();
    while !shared.stopping() {
        let mut pfd = libc::pollfd {
            fd: shared.waker.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe {
            libc::poll(&mut pfd, 1, TICK.as_millis() as i32);
        }
        if shared.stopping() {
            break;
        }
        if last_log.elapsed() >= Duration::from_secs(10) {
            let now = shared.counters.snapshot();
            if now != logged {
                tracing::debug!(ifname = %shared.ifname, counters = ?now, "engine counters");
                logged = now;
            }
            last_log = Instant::now();
        }
        let state = shared.read_state();
        if let Some(id) = &state.identity
            && last_reset.elapsed() >= Duration::from_secs(1)
        {
            id.rate_limiter.reset_count();
            last_reset = Instant::now();
        }
        let now_ms = shared.now_ms();
        for entry in state.peers.values() {
            let peer = &entry.peer;
            let mut inner = peer.lock();
            let endpoint = inner.endpoint;
            let Some(tunn) = inner.tunn.as_mut() else {
                continue;
            };
            match tunn.update_timers(&mut buf) {
                TunnResult::WriteToNetwork(pkt) => {
                    if let Some(dst) = endpoint {
                        send_control(&shared, &state.udp, peer, dst, pkt);
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
                    || now_ms.saturating_sub(peer.last_tx_ms.load(Ordering::Relaxed))
                        >= keepalive * 1000);
            if due && let TunnResult::WriteToNetwork(pkt) = tunn.encapsulate(&[], &mut buf) {
                send_control(&shared, &state.udp, peer, dst, pkt);
            }
            if let Some(after) = shared.rekey_after
                && tunn
                    .time_since_last_handshake()
                    .is_some_and(|age| age >= after)
                && let TunnResult::WriteToNetwork(pkt) =
                    tunn.format_handshake_initiation(&mut buf, false)
            {
                tracing::debug!(peer = %peer.public_key, "test rekey: new handshake");
                send_control(&shared, &state.udp, peer, dst, pkt);
            }
        }
    }
}
