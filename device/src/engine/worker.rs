//! The datapath: one worker thread per TUN queue / UDP socket pair, moving batches both ways:
//! TUN -> (split GSO frames) -> encrypt -> UDP (GSO trains), and UDP (GRO) -> decrypt ->
//! cryptokey-routing check -> TUN (GRO coalescing). All buffers are allocated once per worker
//! and reused for every batch; the per-packet path does not allocate.

use std::{
    io::{self, IoSliceMut},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{Arc, atomic::Ordering},
};

use boringtun::noise::{
    Packet, TunnResult, errors::WireGuardError, handshake::parse_handshake_anon,
};
use quinn_udp::{RecvMeta, UdpSockRef};
use tun_rs::{SyncDevice, VIRTIO_NET_HDR_LEN};
use wiremesh_keyexchange::PublicKey;

use super::{
    Shared,
    gro::TunCoalescer,
    gso,
    io::{UdpEndpoint, canonical},
    state::{DeviceState, Peer},
};

/// Largest IP packet the TUN can hand us (or we it) in one frame.
const MAX_FRAME: usize = 65535;
/// Encrypted bytes staged before a flush to the UDP socket.
const TX_STAGE: usize = 512 * 1024;
/// UDP receive buffers per batch; each holds one GRO train of up to 64 KiB.
const RX_BUFS: usize = 16;
/// Largest UDP payload one GSO send may carry.
const MAX_GSO_BYTES: usize = 65000;
/// TUN frames per wake-up before the worker looks at the UDP side again (fairness); what
/// they produce is sent together.
const TUN_BURST: usize = 16;
/// UDP batches per wake-up before the worker looks at the TUN side again.
const UDP_BURST: usize = 8;

/// One encrypted datagram staged in `tx_buf`.
#[derive(Clone, Copy)]
struct Staged {
    dst: SocketAddr,
    start: usize,
    len: usize,
}

/// What one [`TunWorker::batch`] or [`UdpWorker::batch`] call found.
#[derive(Clone, Copy, Default)]
pub(crate) struct Step {
    /// Packets were handled (or errors counted): the device is not idle.
    pub worked: bool,
    /// The descriptor was read until it had nothing left; it need not be read again until
    /// poll() reports it readable. `false` when the burst limit stopped the reads.
    pub drained: bool,
}

/// The TUN -> UDP half of a [`Worker`]: read a frame (a TSO super-packet or one packet),
/// split it in place, encrypt each segment straight into the send buffer, send as GSO trains.
pub(crate) struct TunWorker {
    shared: Arc<Shared>,
    tun: Arc<SyncDevice>,
    queue: usize,
    frame: Vec<u8>,
    tx_buf: Vec<u8>,
    tx_used: usize,
    staged: Vec<Staged>,
    tx_acct: Vec<(Arc<Peer>, u64)>,
}

impl TunWorker {
    pub fn new(shared: Arc<Shared>, tun: Arc<SyncDevice>, queue: usize) -> Self {
        Self {
            shared,
            tun,
            queue,
            frame: vec![0; VIRTIO_NET_HDR_LEN + MAX_FRAME],
            tx_buf: vec![0; TX_STAGE],
            tx_used: 0,
            staged: Vec::with_capacity(TX_STAGE / 1024),
            tx_acct: Vec::with_capacity(16),
        }
    }

    /// Reads up to [`TUN_BURST`] frames, encrypts them and sends what they produced.
    pub(crate) fn batch(&mut self, udp: &UdpEndpoint) -> io::Result<Step> {
        let mut step = Step::default();
        for _ in 0..TUN_BURST {
            let n = match self.tun.recv(&mut self.frame) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    step.drained = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_fatal_tun_error(&e) => return Err(e),
                Err(e) => {
                    tracing::debug!(ifname = %self.shared.ifname, error = %e, "TUN read failed");
                    self.shared
                        .counters
                        .tun_malformed
                        .fetch_add(1, Ordering::Relaxed);
                    step.worked = true;
                    continue;
                }
            };
            step.worked = true;
            self.encrypt_frame(n, udp);
        }
        if step.worked {
            self.flush(udp);
        }
        Ok(step)
    }

    fn flush(&mut self, udp: &UdpEndpoint) {
        flush_tx(
            udp,
            self.queue,
            &self.tx_buf,
            &mut self.staged,
            &mut self.tx_acct,
            &self.shared,
        );
        self.tx_used = 0;
    }

    /// Encrypts every segment of the `n`-byte frame in `self.frame` for the peer that owns its
    /// destination (one lookup and one peer lock per frame).
    fn encrypt_frame(&mut self, n: usize, udp: &UdpEndpoint) {
        let shared = &*self.shared;
        let counters = &shared.counters;
        let state = shared.read_state();
        let Some(dst) = self.frame.get(VIRTIO_NET_HDR_LEN..n).and_then(packet_dst) else {
            counters.tun_malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if let IpAddr::V6(v6) = dst
            && (v6.is_multicast() || v6.is_unicast_link_local())
        {
            // Neighbour discovery and other link-local chatter the kernel sends on a new
            // interface: never tunnelled (FACTS: it can eat the first handshake).
            counters.tun_filtered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(peer) = state.table.lookup(dst) else {
            counters.tx_no_route.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut inner = peer.lock();
        let Some(endpoint) = inner.endpoint else {
            counters.tx_no_endpoint.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(tunn) = inner.tunn.as_mut() else {
            counters.tx_no_key.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let (tx_buf, tx_used, staged, acct, queue) = (
            &mut self.tx_buf,
            &mut self.tx_used,
            &mut self.staged,
            &mut self.tx_acct,
            self.queue,
        );
        let mut sent = 0u64;
        let split = gso::for_each_segment(&mut self.frame, n, |seg| {
            let need = (seg.len() + 32 + 16).max(148);
            if *tx_used + need > tx_buf.len() {
                flush_tx(udp, queue, tx_buf, staged, acct, shared);
                *tx_used = 0;
            }
            let start = *tx_used;
            match tunn.encapsulate(seg, &mut tx_buf[start..start + need]) {
                TunnResult::WriteToNetwork(out) => {
                    let len = out.len();
                    staged.push(Staged {
                        dst: endpoint,
                        start,
                        len,
                    });
                    *tx_used += len;
                    sent += len as u64;
                }
                // Queued inside the Tunn until the handshake completes.
                TunnResult::Done => {}
                TunnResult::Err(e) => {
                    counters.tx_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = %peer.public_key, error = ?e, "encapsulate failed");
                }
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                    counters.tx_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        drop(inner);
        if sent > 0 {
            account(acct, peer, sent);
        }
        if let Err(gso::Malformed(why)) = split {
            tracing::debug!(ifname = %shared.ifname, reason = why, "bad frame from TUN");
            counters.tun_malformed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The UDP -> TUN half of a [`Worker`]: receive (GRO trains split by stride), decrypt, check the
/// inner source against the sender's allowed IPs, write to the TUN with GRO coalescing.
pub(crate) struct UdpWorker {
    shared: Arc<Shared>,
    tun: Arc<SyncDevice>,
    index: usize,
    rx_bufs: Vec<Vec<u8>>,
    rx_meta: Vec<RecvMeta>,
    gro: TunCoalescer,
    scratch: Vec<u8>,
}

impl UdpWorker {
    pub fn new(shared: Arc<Shared>, tun: Arc<SyncDevice>, index: usize) -> Self {
        let udp_gso = tun.udp_gso();
        Self {
            shared,
            tun,
            index,
            rx_bufs: (0..RX_BUFS).map(|_| vec![0; MAX_FRAME]).collect(),
            rx_meta: vec![RecvMeta::default(); RX_BUFS],
            gro: TunCoalescer::new(udp_gso),
            scratch: vec![0; 2048],
        }
    }

    /// Receives up to [`UDP_BURST`] batches. A batch that does not fill every buffer means
    /// recvmmsg(2) found the queue empty: the socket counts as drained without another probe.
    pub(crate) fn batch(&mut self, udp: &UdpEndpoint) -> Step {
        let mut step = Step::default();
        let sock = udp.sock(self.index);
        for _ in 0..UDP_BURST {
            let n = {
                let mut iovs: [IoSliceMut<'_>; RX_BUFS] = {
                    let mut it = self.rx_bufs.iter_mut();
                    std::array::from_fn(|_| {
                        IoSliceMut::new(it.next().map_or(&mut [][..], |b| &mut b[..]))
                    })
                };
                match sock
                    .state
                    .recv(UdpSockRef::from(&sock.socket), &mut iovs, &mut self.rx_meta)
                {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        step.drained = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // ICMP errors surface here (ECONNREFUSED...): not fatal for a UDP server.
                        tracing::trace!(error = %e, "UDP receive error");
                        step.worked = true;
                        continue;
                    }
                }
            };
            if n == 0 {
                step.drained = true;
                break;
            }
            step.worked = true;
            self.decrypt_batch(n, udp);
            if n < RX_BUFS {
                step.drained = true;
                break;
            }
        }
        step
    }

    fn decrypt_batch(&mut self, n: usize, udp: &UdpEndpoint) {
        let shared = self.shared.clone();
        let state = shared.read_state();
        let tx = TxCtx {
            udp,
            idx: self.index,
        };
        let mut cache = RxCache::default();
        for i in 0..n {
            let meta = self.rx_meta[i];
            let src = canonical(meta.addr);
            let stride = meta.stride.max(1);
            let mut off = 0;
            while off < meta.len {
                let end = (off + stride).min(meta.len);
                let datagram = &self.rx_bufs[i][off..end];
                let data = datagram.first() == Some(&MSG_DATA);
                let dst = self.gro.dst(datagram.len(), data);
                match handle_datagram(
                    &shared,
                    &state,
                    &tx,
                    src,
                    datagram,
                    dst,
                    &mut self.scratch,
                    &mut cache,
                ) {
                    Some(len) => {
                        let tun = &self.tun;
                        let mut out = |f: &[u8]| tun.send(f).map(drop);
                        if let Err(e) = self.gro.commit(len, &mut out) {
                            self.tun_write_failed(&e);
                        }
                    }
                    None => self.gro.abort(),
                }
                off = end;
            }
        }
        drop(state);
        self.flush_tun();
    }

    fn flush_tun(&mut self) {
        let tun = &self.tun;
        if let Err(e) = self.gro.flush(&mut |f: &[u8]| tun.send(f).map(drop)) {
            self.tun_write_failed(&e);
        }
    }

    fn tun_write_failed(&self, e: &io::Error) {
        self.shared
            .counters
            .tun_write_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(ifname = %self.shared.ifname, error = %e, "TUN write failed");
    }
}

/// One datapath worker: both directions of queue `i` on one thread — TUN queue `i` (encrypt)
/// and UDP socket `i` (decrypt). One thread per queue beat one thread per direction here:
/// fewer wake-ups per round trip (the reply to a packet just written to the TUN is usually
/// picked up by the same thread without sleeping) and fewer context switches, measured as
/// lower RTT and higher TCP throughput on a 2-core machine (see docs/benchmarks.md).
/// Busy polling before sleeping is opt-in (`EngineConfig::busy_poll`): it trades a CPU for
/// ~50-100 us less round-trip time on an idle tunnel; one worker per device spins.
pub(crate) struct Worker {
    pub tx: TunWorker,
    pub rx: UdpWorker,
    pub busy_poll: std::time::Duration,
}

impl Worker {
    /// Runs until the engine stops or the TUN device goes away.
    ///
    /// Poll-driven: a descriptor is read only when poll(2) said it is readable or its last
    /// burst stopped at the burst limit (fairness between the directions under load); one
    /// that was read until empty is left to the next (level-triggered) poll instead of being
    /// probed again. The waker eventfd stays readable once signalled, so a stop is never
    /// missed; a replaced UDP endpoint is noticed by pointer at the top of every round.
    pub fn run(mut self) {
        let shared = self.tx.shared.clone();
        let tun_fd = self.tx.tun.as_raw_fd();
        let spin = self.busy_poll;
        let queue = self.tx.queue;
        let mut last_busy = std::time::Instant::now();
        let mut udp = shared.read_state().udp.clone();
        let (mut tun_ready, mut udp_ready) = (true, true);
        while !shared.stopping() {
            {
                let st = shared.read_state();
                if !Arc::ptr_eq(&st.udp, &udp) {
                    udp = st.udp.clone();
                    udp_ready = true;
                }
            }
            let mut worked = false;
            if tun_ready {
                match self.tx.batch(&udp) {
                    Ok(step) => {
                        worked |= step.worked;
                        tun_ready = !step.drained;
                    }
                    Err(e) => {
                        shared.mark_dead(format!("TUN queue {queue} failed: {e}"));
                        return;
                    }
                }
            }
            if udp_ready {
                let step = self.rx.batch(&udp);
                worked |= step.worked;
                udp_ready = !step.drained;
            }
            if worked {
                last_busy = std::time::Instant::now();
                if !spin.is_zero() && shared.spinner.load(Ordering::Relaxed) != queue {
                    shared.spinner.store(queue, Ordering::Relaxed);
                }
            }
            if tun_ready || udp_ready {
                continue;
            }
            if !spin.is_zero()
                && shared.spinner.load(Ordering::Relaxed) == queue
                && last_busy.elapsed() < spin
            {
                // Busy polling (opt-in): catch the next packet without a wake-up. Only the
                // worker that handled the last packet spins (a peer's traffic converges on
                // one worker: its UDP socket by 4-tuple, its TUN flows by the TUN's flow
                // table), so idle workers leave the CPUs to the application and softirqs.
                // Read both descriptors directly (a readiness poll first was measured
                // slower), and yield only after a round that found nothing: the answer to
                // what was just written to the TUN is often already queued.
                if !worked {
                    std::thread::yield_now();
                }
                tun_ready = true;
                udp_ready = true;
                continue;
            }
            let mut fds = [
                libc::pollfd {
                    fd: tun_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: udp.sock(self.rx.index).socket.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: shared.waker.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: three valid pollfds for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
            if n <= 0 {
                continue;
            }
            tun_ready = fds[0].revents != 0;
            udp_ready = fds[1].revents != 0;
        }
    }
}

/// Where replies produced on the receive path go out.
pub(crate) struct TxCtx<'a> {
    pub udp: &'a UdpEndpoint,
    pub idx: usize,
}

impl TxCtx<'_> {
    fn send(&self, dst: SocketAddr, bytes: &[u8]) {
        let _ = self.udp.send(self.idx, dst, bytes, None);
    }
}

fn is_fatal_tun_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD) | Some(libc::EBADF) | Some(libc::EIO) | Some(libc::ENODEV)
    )
}

fn account(acct: &mut Vec<(Arc<Peer>, u64)>, peer: &Arc<Peer>, bytes: u64) {
    match acct.last_mut() {
        Some((p, n)) if Arc::ptr_eq(p, peer) => *n += bytes,
        _ => acct.push((peer.clone(), bytes)),
    }
}

/// Sends the staged datagrams, grouping runs to one destination with equal sizes into GSO
/// trains (the last datagram of a train may be shorter).
fn flush_tx(
    udp: &UdpEndpoint,
    idx: usize,
    buf: &[u8],
    staged: &mut Vec<Staged>,
    acct: &mut Vec<(Arc<Peer>, u64)>,
    shared: &Shared,
) {
    let counters = &shared.counters;
    let max_segs = udp.max_gso_segments();
    let mut i = 0;
    while i < staged.len() {
        let first = staged[i];
        let mut j = i + 1;
        let mut total = first.len;
        if first.len < MAX_GSO_BYTES {
            while j < staged.len()
                && j - i < max_segs
                && staged[j].dst == first.dst
                && staged[j].start == staged[j - 1].start + staged[j - 1].len
                && total + staged[j].len <= MAX_GSO_BYTES
                && staged[j].len <= first.len
            {
                total += staged[j].len;
                j += 1;
                if staged[j - 1].len < first.len {
                    break;
                }
            }
        }
        let segment = if j - i > 1 { Some(first.len) } else { None };
        let contents = &buf[first.start..first.start + total];
        match udp.send(idx, first.dst, contents, segment) {
            Ok(()) => {
                counters
                    .tx_datagrams
                    .fetch_add((j - i) as u64, Ordering::Relaxed);
            }
            Err(e) => {
                counters
                    .tx_errors
                    .fetch_add((j - i) as u64, Ordering::Relaxed);
                tracing::debug!(dst = %first.dst, error = %e, "UDP send failed");
            }
        }
        i = j;
    }
    staged.clear();
    let now = shared.now_ms();
    for (peer, bytes) in acct.drain(..) {
        peer.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
        peer.last_tx_ms.store(now, Ordering::Relaxed);
    }
}

/// The destination address of an IP packet.
#[inline]
fn packet_dst(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => Some(IpAddr::V4(Ipv4Addr::new(
            pkt[16], pkt[17], pkt[18], pkt[19],
        ))),
        6 if pkt.len() >= 40 => {
            let b: [u8; 16] = pkt[24..40].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

const MSG_INIT: u8 = 1;
const MSG_RESPONSE: u8 = 2;
const MSG_COOKIE: u8 = 3;
const MSG_DATA: u8 = 4;

/// The last lookups of one receive batch: a GRO train is many datagrams of one peer carrying
/// packets of a few flows, so the receiver-index map and the allowed-IPs table need to be
/// consulted once per batch rather than per packet. Valid only under the state read guard
/// the batch holds (the maps cannot change meanwhile).
#[derive(Default)]
pub(crate) struct RxCache<'s> {
    /// Receiver index (shifted) -> peer.
    index: Option<(u32, &'s Arc<Peer>)>,
    /// Inner source address known to belong to the peer at this address.
    src: Option<(IpAddr, *const Peer)>,
}

/// Handles one received datagram. Returns the length of the decrypted packet left at the
/// start of `dst` for the TUN, if any.
#[allow(clippy::too_many_arguments)]
pub(crate) fn handle_datagram<'s>(
    shared: &Shared,
    state: &'s DeviceState,
    tx: &TxCtx<'_>,
    src: SocketAddr,
    datagram: &[u8],
    dst: &mut [u8],
    scratch: &mut [u8],
    cache: &mut RxCache<'s>,
) -> Option<usize> {
    let counters = &shared.counters;
    if datagram.len() < 4 || datagram[1..4] != [0, 0, 0] {
        counters.rx_malformed.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let Some(identity) = &state.identity else {
        counters.rx_no_key.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let peer = match datagram[0] {
        MSG_DATA | MSG_RESPONSE | MSG_COOKIE => {
            let min = match datagram[0] {
                MSG_DATA => 32,
                MSG_RESPONSE => 92,
                _ => 64,
            };
            if datagram.len() < min || (datagram[0] != MSG_DATA && datagram.len() != min) {
                counters.rx_malformed.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            // Responses carry (sender, receiver); data and cookie replies only a receiver.
            let at = if datagram[0] == MSG_RESPONSE { 8 } else { 4 };
            let receiver = u32::from_le_bytes([
                datagram[at],
                datagram[at + 1],
                datagram[at + 2],
                datagram[at + 3],
            ]);
            let key = receiver >> 8;
            match cache.index {
                Some((k, p)) if k == key => p,
                _ => match state.by_index.get(&key) {
                    Some(p) => {
                        cache.index = Some((key, p));
                        p
                    }
                    None => {
                        counters.rx_unknown_peer.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                },
            }
        }
        MSG_INIT => {
            if datagram.len() != 148 {
                counters.rx_malformed.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            // Cheap checks first (mac1, load -> cookie), only then the Diffie-Hellman.
            let half = match identity
                .rate_limiter
                .verify_packet(Some(src.ip()), datagram, scratch)
            {
                Ok(Packet::HandshakeInit(init)) => {
                    parse_handshake_anon(&identity.secret, &identity.public, &init)
                }
                Ok(_) => {
                    counters.rx_malformed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    counters.rx_cookie_replies.fetch_add(1, Ordering::Relaxed);
                    tx.send(src, cookie);
                    return None;
                }
                Err(TunnResult::Err(WireGuardError::InvalidMac)) => {
                    counters.rx_invalid_mac.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Err(_) => {
                    counters.rx_malformed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            };
            let Ok(half) = half else {
                counters.rx_handshake_failed.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            match state
                .peers
                .get(&PublicKey::from_bytes(half.peer_static_public))
            {
                Some(entry) => &entry.peer,
                None => {
                    counters.rx_unknown_peer.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        _ => {
            counters.rx_malformed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };

    let mut guard = peer.lock();
    let inner = &mut *guard;
    let Some(tunn) = inner.tunn.as_mut() else {
        counters.rx_no_key.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    // A decrypted packet falls through to the cryptokey-routing check below; everything
    // else is finished here.
    let (len, from) = match tunn.decapsulate(Some(src.ip()), datagram, dst) {
        TunnResult::WriteToTunnelV4(pkt, from) => (pkt.len(), IpAddr::V4(from)),
        TunnResult::WriteToTunnelV6(pkt, from) => (pkt.len(), IpAddr::V6(from)),
        TunnResult::Done => {
            // Keepalive or cookie reply: authenticated, nothing for the TUN.
            inner.endpoint = Some(src);
            drop(guard);
            peer.rx_bytes
                .fetch_add(datagram.len() as u64, Ordering::Relaxed);
            return None;
        }
        TunnResult::WriteToNetwork(reply) => {
            // Handshake answered (or a keepalive after our initiation completed).
            inner.endpoint = Some(src);
            peer.rx_bytes
                .fetch_add(datagram.len() as u64, Ordering::Relaxed);
            let mut sent = reply.len() as u64;
            tx.send(src, reply);
            // Flush packets queued while the handshake was in flight.
            loop {
                match tunn.decapsulate(None, &[], dst) {
                    TunnResult::WriteToNetwork(pkt) => {
                        sent += pkt.len() as u64;
                        tx.send(src, pkt);
                    }
                    TunnResult::Done => break,
                    TunnResult::Err(e) => {
                        tracing::debug!(peer = %peer.public_key, error = ?e, "flushing queue failed");
                        break;
                    }
                    TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => break,
                }
            }
            drop(guard);
            peer.tx_bytes.fetch_add(sent, Ordering::Relaxed);
            peer.last_tx_ms.store(shared.now_ms(), Ordering::Relaxed);
            return None;
        }
        TunnResult::Err(e) => {
            drop(guard);
            count_error(counters, &e);
            return None;
        }
    };
    if !owns(state, peer, from, &mut cache.src) {
        counters.rx_src_not_allowed.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    inner.endpoint = Some(src);
    drop(guard);
    peer.rx_bytes
        .fetch_add(datagram.len() as u64, Ordering::Relaxed);
    Some(len)
}

/// Whether `addr` is in `peer`'s allowed IPs (cryptokey routing); `last` remembers the last
/// address that was.
fn owns(
    state: &DeviceState,
    peer: &Arc<Peer>,
    addr: IpAddr,
    last: &mut Option<(IpAddr, *const Peer)>,
) -> bool {
    if *last == Some((addr, Arc::as_ptr(peer))) {
        return true;
    }
    let ok = state
        .table
        .lookup(addr)
        .is_some_and(|owner| Arc::ptr_eq(owner, peer));
    if ok {
        *last = Some((addr, Arc::as_ptr(peer)));
    }
    ok
}

fn count_error(counters: &super::Counters, e: &WireGuardError) {
    let c = match e {
        WireGuardError::InvalidAeadTag
        | WireGuardError::InvalidCounter
        | WireGuardError::DuplicateCounter
        | WireGuardError::NoCurrentSession => &counters.rx_decrypt_failed,
        WireGuardError::InvalidMac => &counters.rx_invalid_mac,
        WireGuardError::UnderLoad => &counters.rx_cookie_replies,
        WireGuardError::InvalidPacket | WireGuardError::IncorrectPacketLength => {
            &counters.rx_malformed
        }
        _ => &counters.rx_handshake_failed,
    };
    c.fetch_add(1, Ordering::Relaxed);
}

/// Sends a handshake initiation or keepalive produced outside the datapath (timers).
pub(crate) fn send_control(
    shared: &Shared,
    udp: &UdpEndpoint,
    peer: &Peer,
    dst: SocketAddr,
    bytes: &[u8],
) {
    match udp.send(0, dst, bytes, None) {
        Ok(()) => {
            peer.tx_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            peer.last_tx_ms.store(shared.now_ms(), Ordering::Relaxed);
        }
        Err(e) => {
            shared.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %peer.public_key, dst = %dst, error = %e, "control send failed");
        }
    }
}
