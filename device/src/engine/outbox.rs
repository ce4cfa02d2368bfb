//! Datagrams produced while the configuration read lock or a peer lock is held — handshake
//! messages, cookie replies, keepalives, packets queued during a handshake — are staged here
//! and sent only after the locks are released. A send may wait for socket buffer space
//! ([`UdpEndpoint::send`] polls for up to ~100 ms); waiting there with a lock held would stall
//! every worker behind a configuration write (UAPI `set`, the agent's `Datapath` calls).
//! Bulk data does not come through here: the encrypt path stages it in its own send buffer,
//! also flushed without locks.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use super::{Shared, io::UdpEndpoint, state::Peer};

/// One staged datagram: `len` bytes at `start` of the outbox buffer.
struct Item {
    dst: SocketAddr,
    start: usize,
    len: usize,
    /// The peer whose transmit counters the datagram counts towards, if any (a cookie reply to
    /// an unauthenticated source has none).
    peer: Option<Arc<Peer>>,
}

/// See the module docs. Reused across batches: its buffers only grow.
pub(crate) struct Outbox {
    buf: Vec<u8>,
    items: Vec<Item>,
}

impl Outbox {
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            buf: Vec::with_capacity(bytes),
            items: Vec::new(),
        }
    }

    /// Stages a copy of `bytes` for `dst`.
    pub fn push(&mut self, dst: SocketAddr, bytes: &[u8], peer: Option<&Arc<Peer>>) {
        let start = self.buf.len();
        self.buf.extend_from_slice(bytes);
        self.items.push(Item {
            dst,
            start,
            len: bytes.len(),
            peer: peer.cloned(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Takes everything staged instead of sending it (the fuzz harness plays the network).
    pub fn take(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        let out = self
            .items
            .drain(..)
            .map(|item| {
                (
                    item.dst,
                    self.buf[item.start..item.start + item.len].to_vec(),
                )
            })
            .collect();
        self.buf.clear();
        out
    }

    /// Sends everything staged on socket `idx` of `udp`, in order, and empties the outbox.
    /// Call with no lock held.
    pub fn send(&mut self, udp: &UdpEndpoint, idx: usize, shared: &Shared) {
        let counters = &shared.counters;
        for item in self.items.drain(..) {
            let bytes = &self.buf[item.start..item.start + item.len];
            match udp.send(idx, item.dst, bytes, None) {
                Ok(()) => {
                    counters.tx_datagrams.fetch_add(1, Ordering::Relaxed);
                    if let Some(peer) = &item.peer {
                        peer.tx_bytes.fetch_add(item.len as u64, Ordering::Relaxed);
                        peer.last_tx_ms.store(shared.now_ms(), Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    counters.tx_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(dst = %item.dst, error = %e, "control send failed");
                }
            }
        }
        self.buf.clear();
    }
}
