//! TUN write side of the receive path: decrypted TCP segments (and UDP datagrams, when the TUN
//! takes USO frames) of one flow are coalesced into one large frame and handed to the kernel in one write with a virtio-net GSO header, like a
//! NIC doing GRO. Packets are decrypted straight into place: a data datagram is opened at the
//! tail of the frame its flow is most likely to extend, with its IP/TCP headers overlapping the
//! end of the previous payload; when it fits, the overwritten bytes are put back and nothing is
//! copied. Only a guess that turns out wrong (another flow, a packet that cannot be merged)
//! costs one copy.
//!
//! Checksums are not verified before merging: the packets were authenticated by the AEAD (as
//! kernel WireGuard, which marks them CHECKSUM_UNNECESSARY). TCP frames are written with
//! NEEDS_CSUM and the pseudo-header sum, so the kernel does not re-verify them either.
//! Everything else (ICMP, fragments, unmergeable UDP) is written as it is. No allocation after
//! construction.

use std::io;

use tun_rs::VIRTIO_NET_HDR_LEN;

use super::checksum::{fold, pseudo_header, sum};

/// Room for the virtio-net header plus the largest IP packet.
const BUF_CAP: usize = VIRTIO_NET_HDR_LEN + 65535;
/// Largest coalesced IP packet.
const MAX_FRAME: usize = 65535;
/// Flows coalesced at once; one more buffer than this is always free.
const MAX_FLOWS: usize = 8;
/// Largest IP + TCP header we merge (IPv6 40 + TCP 60).
const MAX_HDR: usize = 100;

const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// Where the next packet is being decrypted.
#[derive(Clone, Copy)]
enum Target {
    None,
    /// At the tail of open flow `flows[.0]`; the `hlen` bytes it overlaps are saved.
    Tail(usize),
    /// At the start of free buffer `.0` (after the virtio-net header room).
    Fresh(usize),
}

/// One frame being built.
struct Flow {
    buf: usize,
    proto: u8,
    v6: bool,
    ip_hlen: usize,
    /// IP + TCP header length.
    hlen: usize,
    /// End of the frame in its buffer (header room included).
    end: usize,
    next_seq: u32,
    gso_size: usize,
    segs: usize,
    /// No more segments may be appended (PSH or a short segment seen).
    closed: bool,
}

/// What a packet is, as far as merging goes.
struct L4Info {
    proto: u8,
    v6: bool,
    ip_hlen: usize,
    hlen: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

/// See the module docs.
pub(crate) struct TunCoalescer {
    bufs: Vec<Vec<u8>>,
    free: Vec<usize>,
    flows: Vec<Flow>,
    target: Target,
    saved: [u8; MAX_HDR],
    /// Also merge UDP datagrams (the TUN accepts USO frames).
    udp: bool,
}

impl TunCoalescer {
    /// `udp`: the TUN takes UDP segmentation offload frames (kernel >= 6.2).
    pub fn new(udp: bool) -> Self {
        Self {
            bufs: (0..=MAX_FLOWS).map(|_| vec![0; BUF_CAP]).collect(),
            free: (0..=MAX_FLOWS).rev().collect(),
            flows: Vec::with_capacity(MAX_FLOWS),
            target: Target::None,
            saved: [0; MAX_HDR],
            udp,
        }
    }

    /// Where to decrypt the next datagram of `need` bytes into. `data` says it is a transport
    /// data message (only those are decrypted at a flow's tail: handshake handling may use the
    /// buffer as scratch space for queued packets). Must be followed by [`commit`](Self::commit)
    /// or [`abort`](Self::abort).
    pub fn dst(&mut self, need: usize, data: bool) -> &mut [u8] {
        if data && let Some(fi) = self.flows.len().checked_sub(1) {
            let f = &self.flows[fi];
            if !f.closed && f.end + need <= BUF_CAP {
                let at = f.end - f.hlen;
                self.saved[..f.hlen].copy_from_slice(&self.bufs[f.buf][at..f.end]);
                self.target = Target::Tail(fi);
                return &mut self.bufs[f.buf][at..];
            }
        }
        let b = *self.free.last().expect("a free buffer is kept");
        self.target = Target::Fresh(b);
        &mut self.bufs[b][VIRTIO_NET_HDR_LEN..]
    }

    /// Nothing usable was decrypted: undo what [`dst`](Self::dst) prepared.
    pub fn abort(&mut self) {
        if let Target::Tail(fi) = self.target {
            let f = &self.flows[fi];
            let at = f.end - f.hlen;
            self.bufs[f.buf][at..f.end].copy_from_slice(&self.saved[..f.hlen]);
        }
        self.target = Target::None;
    }

    /// A packet of `len` bytes was decrypted where [`dst`](Self::dst) said: merge it, queue it
    /// or write it.
    pub fn commit(
        &mut self,
        len: usize,
        out: &mut impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let target = std::mem::replace(&mut self.target, Target::None);
        let res = match target {
            Target::None => Ok(()),
            Target::Tail(fi) => {
                let (buf, hlen, end) = {
                    let f = &self.flows[fi];
                    (f.buf, f.hlen, f.end)
                };
                let at = end - hlen;
                let info = l4_info(&self.bufs[buf][at..at + len]);
                if let Some(info) = info
                    && self.can_append(fi, at, &info)
                {
                    self.bufs[buf][at..end].copy_from_slice(&self.saved[..hlen]);
                    self.appended(fi, &info, TCP_PSH & info.flags != 0);
                    Ok(())
                } else {
                    // Wrong guess: move the packet to a free buffer, then restore the tail.
                    let b = *self.free.last().expect("a free buffer is kept");
                    let (src, dst) = two(&mut self.bufs, buf, b);
                    dst[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len]
                        .copy_from_slice(&src[at..at + len]);
                    src[at..end].copy_from_slice(&self.saved[..hlen]);
                    self.place(b, len, out)
                }
            }
            Target::Fresh(b) => self.place(b, len, out),
        };
        if self.free.is_empty() {
            let flushed = self.flush(out);
            return res.and(flushed);
        }
        res
    }

    /// Writes every frame being built.
    pub fn flush(&mut self, out: &mut impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        let mut res = Ok(());
        for fi in 0..self.flows.len() {
            let r = self.write_flow(fi, out);
            if res.is_ok() {
                res = r;
            }
        }
        for f in self.flows.drain(..) {
            self.free.push(f.buf);
        }
        res
    }

    /// Packet at the start of free buffer `b`: start a flow, extend one, or write it out.
    fn place(
        &mut self,
        b: usize,
        len: usize,
        out: &mut impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let pkt = &self.bufs[b][VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len];
        let Some(info) = l4_info(pkt) else {
            return write_plain(&mut self.bufs[b], len, out);
        };
        let same = self.flows.iter().position(|f| {
            f.proto == info.proto
                && f.v6 == info.v6
                && same_flow(&self.bufs[f.buf][VIRTIO_NET_HDR_LEN..], pkt, f.v6)
        });
        let mergeable = info.payload > 0
            && if info.proto == IPPROTO_TCP {
                info.flags & !TCP_PSH == TCP_ACK
            } else {
                self.udp
            };
        if let Some(fi) = same {
            let at = VIRTIO_NET_HDR_LEN;
            if mergeable && self.can_append_from(fi, &self.bufs[b][at..at + len], &info) {
                let (dst, src) = two(&mut self.bufs, self.flows[fi].buf, b);
                let end = self.flows[fi].end;
                dst[end..end + info.payload]
                    .copy_from_slice(&src[at + info.hlen..at + info.hlen + info.payload]);
                self.appended(fi, &info, TCP_PSH & info.flags != 0);
                return Ok(());
            }
            // Keep the flow in order: what we have of it goes first.
            let r = self.write_flow(fi, out);
            let f = self.flows.remove(fi);
            self.free.push(f.buf);
            r?;
        }
        if !mergeable {
            if info.proto == IPPROTO_UDP {
                return write_plain(&mut self.bufs[b], len, out);
            }
            return write_tcp(&mut self.bufs[b], len, &info, out);
        }
        self.free.retain(|&x| x != b);
        self.flows.push(Flow {
            buf: b,
            proto: info.proto,
            v6: info.v6,
            ip_hlen: info.ip_hlen,
            hlen: info.hlen,
            end: VIRTIO_NET_HDR_LEN + len,
            next_seq: info.seq.wrapping_add(info.payload as u32),
            gso_size: info.payload,
            segs: 1,
            closed: info.proto == IPPROTO_TCP && info.flags & TCP_PSH != 0,
        });
        Ok(())
    }

    /// Whether the packet decrypted at `at` in flow `fi`'s buffer extends that flow.
    fn can_append(&self, fi: usize, at: usize, info: &L4Info) -> bool {
        let f = &self.flows[fi];
        let pkt = &self.bufs[f.buf][at..at + info.hlen];
        self.can_append_from(fi, pkt, info)
    }

    fn can_append_from(&self, fi: usize, pkt: &[u8], info: &L4Info) -> bool {
        let f = &self.flows[fi];
        if f.closed
            || info.proto != f.proto
            || info.v6 != f.v6
            || info.hlen != f.hlen
            || info.ip_hlen != f.ip_hlen
            || info.payload == 0
            || info.payload > f.gso_size
            || (f.proto == IPPROTO_TCP
                && (info.flags & !TCP_PSH != TCP_ACK || info.seq != f.next_seq))
            || f.end - VIRTIO_NET_HDR_LEN + info.payload > MAX_FRAME
        {
            return false;
        }
        let head = &self.bufs[f.buf][VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + f.hlen];
        headers_match(head, pkt, f.proto, f.v6, f.ip_hlen, f.hlen)
    }

    /// Bookkeeping after `info`'s payload was added at the end of flow `fi`.
    fn appended(&mut self, fi: usize, info: &L4Info, psh: bool) {
        let f = &mut self.flows[fi];
        f.end += info.payload;
        f.next_seq = f.next_seq.wrapping_add(info.payload as u32);
        f.segs += 1;
        if psh || info.payload < f.gso_size {
            f.closed = true;
        }
        if psh && f.proto == IPPROTO_TCP {
            let flags = VIRTIO_NET_HDR_LEN + f.ip_hlen + 13;
            self.bufs[f.buf][flags] |= TCP_PSH;
        }
        // The just-extended flow is the best guess for the next packet.
        let last = self.flows.len() - 1;
        if fi != last {
            self.flows.swap(fi, last);
        }
    }

    fn write_flow(
        &mut self,
        fi: usize,
        out: &mut impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let f = &self.flows[fi];
        let frame = &mut self.bufs[f.buf][..f.end];
        let total = f.end - VIRTIO_NET_HDR_LEN;
        let (ip, hdr) = {
            let (h, ip) = frame.split_at_mut(VIRTIO_NET_HDR_LEN);
            (ip, h)
        };
        if f.segs > 1 {
            if f.v6 {
                ip[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            } else {
                ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                ip[10..12].copy_from_slice(&[0, 0]);
                let c = !fold(sum(&ip[..f.ip_hlen], 0));
                ip[10..12].copy_from_slice(&c.to_be_bytes());
            }
        }
        let gso = match (f.segs > 1, f.proto, f.v6) {
            (false, ..) => VIRTIO_NET_HDR_GSO_NONE,
            (true, IPPROTO_UDP, _) => {
                let l4 = f.ip_hlen;
                ip[l4 + 4..l4 + 6].copy_from_slice(&((total - l4) as u16).to_be_bytes());
                VIRTIO_NET_HDR_GSO_UDP_L4
            }
            (true, _, true) => VIRTIO_NET_HDR_GSO_TCPV6,
            (true, _, false) => VIRTIO_NET_HDR_GSO_TCPV4,
        };
        set_partial_csum(ip, f.proto, f.v6, f.ip_hlen, total);
        fill_vnet(
            hdr,
            VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso,
            f.hlen,
            if f.segs > 1 { f.gso_size } else { 0 },
            f.ip_hlen,
            csum_offset(f.proto),
        );
        out(frame)
    }
}

fn two(bufs: &mut [Vec<u8>], a: usize, b: usize) -> (&mut Vec<u8>, &mut Vec<u8>) {
    assert_ne!(a, b);
    if a < b {
        let (l, r) = bufs.split_at_mut(b);
        (&mut l[a], &mut r[0])
    } else {
        let (l, r) = bufs.split_at_mut(a);
        (&mut r[0], &mut l[b])
    }
}

/// Parses a TCP or UDP packet's headers; `None` for anything else (or a fragment, or a bad
/// length).
fn l4_info(pkt: &[u8]) -> Option<L4Info> {
    let (v6, ip_hlen, proto) = match pkt.first()? >> 4 {
        4 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            if pkt.len() < 20
                || ihl < 20
                || usize::from(u16::from_be_bytes([pkt[2], pkt[3]])) != pkt.len()
                // More-fragments or a fragment offset.
                || u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0
            {
                return None;
            }
            (false, ihl, pkt[9])
        }
        6 => {
            if pkt.len() < 40 || usize::from(u16::from_be_bytes([pkt[4], pkt[5]])) + 40 != pkt.len()
            {
                return None;
            }
            (true, 40, pkt[6])
        }
        _ => return None,
    };
    if proto == IPPROTO_UDP {
        let udp = pkt.get(ip_hlen..ip_hlen + 8)?;
        if usize::from(u16::from_be_bytes([udp[4], udp[5]])) != pkt.len() - ip_hlen {
            return None;
        }
        return Some(L4Info {
            proto,
            v6,
            ip_hlen,
            hlen: ip_hlen + 8,
            seq: 0,
            flags: 0,
            payload: pkt.len() - ip_hlen - 8,
        });
    }
    if proto != IPPROTO_TCP {
        return None;
    }
    let tcp = pkt.get(ip_hlen..ip_hlen + 20)?;
    let hlen = ip_hlen + usize::from(tcp[12] >> 4) * 4;
    if hlen < ip_hlen + 20 || hlen > pkt.len() || hlen > MAX_HDR {
        return None;
    }
    Some(L4Info {
        proto,
        v6,
        ip_hlen,
        hlen,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        flags: tcp[13],
        payload: pkt.len() - hlen,
    })
}

/// Same addresses and ports.
fn same_flow(a: &[u8], b: &[u8], v6: bool) -> bool {
    let (addrs, ip_hlen_a, ip_hlen_b) = if v6 {
        (8..40, 40, 40)
    } else {
        (
            12..20,
            usize::from(a[0] & 0x0f) * 4,
            usize::from(b[0] & 0x0f) * 4,
        )
    };
    a[addrs.clone()] == b[addrs] && a[ip_hlen_a..ip_hlen_a + 4] == b[ip_hlen_b..ip_hlen_b + 4]
}

/// Headers equal except the fields that differ between segments of one stream (IP length,
/// id, checksum; TCP sequence number, PSH, window, checksum; UDP length, checksum).
fn headers_match(
    head: &[u8],
    pkt: &[u8],
    proto: u8,
    v6: bool,
    ip_hlen: usize,
    hlen: usize,
) -> bool {
    let ip_ok = if v6 {
        head[..4] == pkt[..4] && head[6..40] == pkt[6..40]
    } else {
        head[..2] == pkt[..2] && head[6..10] == pkt[6..10] && head[12..ip_hlen] == pkt[12..ip_hlen]
    };
    let t = ip_hlen;
    if proto == IPPROTO_UDP {
        return ip_ok && head[t..t + 4] == pkt[t..t + 4];
    }
    ip_ok
        && head[t..t + 4] == pkt[t..t + 4]
        && head[t + 8..t + 13] == pkt[t + 8..t + 13]
        && head[t + 18..hlen] == pkt[t + 18..hlen]
}

/// Where the checksum field is in the L4 header.
fn csum_offset(proto: u8) -> usize {
    if proto == IPPROTO_TCP { 16 } else { 6 }
}

/// Puts the pseudo-header sum (not complemented) in the checksum field, as the kernel
/// expects for CHECKSUM_PARTIAL.
fn set_partial_csum(ip: &mut [u8], proto: u8, v6: bool, ip_hlen: usize, total: usize) {
    let pseudo = pseudo_header(ip, v6, proto, total - ip_hlen);
    let at = ip_hlen + csum_offset(proto);
    ip[at..at + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
}

/// Fills a virtio-net header (native byte order, as the TUN driver reads it).
fn fill_vnet(
    hdr: &mut [u8],
    flags: u8,
    gso_type: u8,
    hdr_len: usize,
    gso_size: usize,
    csum_start: usize,
    csum_offset: usize,
) {
    hdr[0] = flags;
    hdr[1] = gso_type;
    hdr[2..4].copy_from_slice(&(hdr_len as u16).to_ne_bytes());
    hdr[4..6].copy_from_slice(&(gso_size as u16).to_ne_bytes());
    hdr[6..8].copy_from_slice(&(csum_start as u16).to_ne_bytes());
    hdr[8..10].copy_from_slice(&(csum_offset as u16).to_ne_bytes());
}

/// Writes a single TCP segment as CHECKSUM_PARTIAL (pseudo-header sum in the checksum
/// field), so the kernel does not verify what the AEAD already authenticated.
fn write_tcp(
    buf: &mut [u8],
    len: usize,
    info: &L4Info,
    out: &mut impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let frame = &mut buf[..VIRTIO_NET_HDR_LEN + len];
    let (hdr, ip) = frame.split_at_mut(VIRTIO_NET_HDR_LEN);
    set_partial_csum(ip, IPPROTO_TCP, info.v6, info.ip_hlen, len);
    fill_vnet(
        hdr,
        VIRTIO_NET_HDR_F_NEEDS_CSUM,
        VIRTIO_NET_HDR_GSO_NONE,
        info.hlen,
        0,
        info.ip_hlen,
        csum_offset(IPPROTO_TCP),
    );
    out(frame)
}

/// Writes a packet as it is (the kernel checks its checksums).
fn write_plain(
    buf: &mut [u8],
    len: usize,
    out: &mut impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    buf[..VIRTIO_NET_HDR_LEN].fill(0);
    out(&buf[..VIRTIO_NET_HDR_LEN + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 4] = [10, 0, 0, 1];
    const B: [u8; 4] = [10, 0, 0, 2];

    /// An IPv4/TCP segment with valid checksums and a timestamp option.
    fn tcp4(src: [u8; 4], sport: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let hlen = 20 + 32;
        let total = hlen + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&(seq as u16).to_be_bytes()); // varying id
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = IPPROTO_TCP;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&B);
        let c = !fold(sum(&p[..20], 0));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&7u32.to_be_bytes());
        t[12] = 8 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&(1000 + seq as u16 % 7).to_be_bytes()); // window varies
        t[20..24].copy_from_slice(&[1, 1, 8, 10]);
        t[24..28].copy_from_slice(&42u32.to_be_bytes());
        t[32..].copy_from_slice(payload);
        let pseudo = sum(&p[12..20], u64::from(IPPROTO_TCP) + (total - 20) as u64);
        let c = !fold(sum(&p[20..], pseudo));
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// A segment as the kernel would see it after GSO-splitting `frame` (what the receiving
    /// application gets): (src, seq, flags, payload).
    type Seg = ([u8; 4], u32, u8, Vec<u8>);

    /// Feeds packets through the coalescer as the worker does, then checks and splits the
    /// frames written.
    fn run(pkts: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<Seg>) {
        let mut c = TunCoalescer::new(true);
        let mut frames: Vec<Vec<u8>> = Vec::new();
        let mut out = |f: &[u8]| {
            frames.push(f.to_vec());
            Ok(())
        };
        for p in pkts {
            let need = p.len() + 32 + 16;
            let dst = c.dst(need, true);
            dst[..p.len()].copy_from_slice(p);
            // The AEAD tag and padding land after the packet.
            dst[p.len()..p.len() + 16].fill(0xee);
            c.commit(p.len(), &mut out).expect("write");
        }
        c.flush(&mut out).expect("flush");
        let mut segs = Vec::new();
        for f in &frames {
            segs.extend(split(f));
        }
        (frames, segs)
    }

    fn split(f: &[u8]) -> Vec<Seg> {
        let (hdr, ip) = f.split_at(VIRTIO_NET_HDR_LEN);
        if ip[9] != IPPROTO_TCP {
            assert_eq!(
                hdr, &[0; VIRTIO_NET_HDR_LEN],
                "plain packets carry no offload"
            );
            return vec![(A, 0, 0, ip.to_vec())];
        }
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len());
        assert_eq!(fold(sum(&ip[..20], 0)), 0xffff, "IPv4 header checksum");
        assert_eq!(hdr[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(u16::from_ne_bytes([hdr[6], hdr[7]]), 20);
        assert_eq!(u16::from_ne_bytes([hdr[8], hdr[9]]), 16);
        let pseudo = sum(&ip[12..20], u64::from(IPPROTO_TCP) + (ip.len() - 20) as u64);
        assert_eq!(
            u16::from_be_bytes([ip[36], ip[37]]),
            fold(pseudo),
            "partial checksum"
        );
        let hlen = 20 + usize::from(ip[32] >> 4) * 4;
        let src: [u8; 4] = ip[12..16].try_into().unwrap();
        let seq = u32::from_be_bytes(ip[24..28].try_into().unwrap());
        let payload = &ip[hlen..];
        let gso = usize::from(u16::from_ne_bytes([hdr[4], hdr[5]]));
        if hdr[1] == VIRTIO_NET_HDR_GSO_NONE {
            return vec![(src, seq, ip[33], payload.to_vec())];
        }
        assert_eq!(hdr[1], VIRTIO_NET_HDR_GSO_TCPV4);
        assert_eq!(usize::from(u16::from_ne_bytes([hdr[2], hdr[3]])), hlen);
        assert!(payload.len() > gso, "a GSO frame has more than one segment");
        payload
            .chunks(gso)
            .enumerate()
            .map(|(i, p)| {
                let last = (i + 1) * gso >= payload.len();
                // The kernel keeps PSH on the last segment only.
                let flags = if last { ip[33] } else { ip[33] & !TCP_PSH };
                (src, seq + (i * gso) as u32, flags, p.to_vec())
            })
            .collect()
    }

    fn data(n: usize, tag: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ tag).collect()
    }

    fn expect(pkts: &[Vec<u8>]) -> Vec<Seg> {
        pkts.iter()
            .map(|p| {
                if p[9] != IPPROTO_TCP {
                    return (A, 0, 0, p.clone());
                }
                let src: [u8; 4] = p[12..16].try_into().unwrap();
                let seq = u32::from_be_bytes(p[24..28].try_into().unwrap());
                (src, seq, p[33], p[52..].to_vec())
            })
            .collect()
    }

    #[test]
    fn a_stream_becomes_one_gso_frame_with_the_same_bytes() {
        let pkts: Vec<_> = (0..40u32)
            .map(|i| tcp4(A, 1, 1000 + i * 1368, TCP_ACK, &data(1368, i as u8)))
            .collect();
        let (frames, segs) = run(&pkts);
        assert_eq!(frames.len(), 1);
        assert_eq!(segs, expect(&pkts));
    }

    #[test]
    fn frames_stop_at_64k_psh_and_short_segments() {
        let mut pkts: Vec<_> = (0..60u32)
            .map(|i| tcp4(A, 1, i * 1368, TCP_ACK, &data(1368, i as u8)))
            .collect();
        // PSH on #50 closes the frame; #51 starts a new one, the short #55 closes it.
        pkts[50] = tcp4(A, 1, 50 * 1368, TCP_ACK | TCP_PSH, &data(1368, 50));
        pkts[55] = tcp4(A, 1, 55 * 1368, TCP_ACK, &data(100, 55));
        for (i, p) in pkts.iter_mut().enumerate().skip(56) {
            *p = tcp4(
                A,
                1,
                55 * 1368 + 100 + (i as u32 - 56) * 1368,
                TCP_ACK,
                &data(1368, 9),
            );
        }
        let (frames, segs) = run(&pkts);
        assert!(
            frames
                .iter()
                .all(|f| f.len() - VIRTIO_NET_HDR_LEN <= MAX_FRAME)
        );
        assert_eq!(frames.len(), 4, "47 (64 KiB), 4 + PSH, 4 + short, 4");
        assert_eq!(segs, expect(&pkts));
    }

    #[test]
    fn interleaved_flows_control_segments_and_other_protocols_keep_per_flow_order() {
        let mut pkts = Vec::new();
        let (mut s1, mut s2) = (0u32, 5000u32);
        for i in 0..30u8 {
            pkts.push(tcp4(A, 1, s1, TCP_ACK, &data(1000, i)));
            s1 += 1000;
            if i % 3 == 0 {
                pkts.push(tcp4(A, 2, s2, TCP_ACK, &data(1000, i ^ 0x55)));
                s2 += 1000;
            }
            if i == 10 {
                // A pure ACK and a FIN of flow 2, an ICMP packet, a retransmission of flow 1.
                pkts.push(tcp4(A, 2, s2, TCP_ACK, &[]));
                pkts.push(tcp4(A, 2, s2, TCP_ACK | 0x01, &[]));
                let mut icmp = tcp4(A, 9, 0, 0, &data(64, 3));
                icmp[9] = 1;
                pkts.push(icmp);
                pkts.push(tcp4(A, 1, s1 - 2000, TCP_ACK, &data(1000, 8)));
            }
        }
        let (frames, segs) = run(&pkts);
        assert!(frames.len() < pkts.len() / 2, "{} frames", frames.len());
        let want = expect(&pkts);
        for flow in [1u16, 2, 9] {
            let pick = |v: &[Seg], pkts: &[Vec<u8>]| -> Vec<Seg> {
                let _ = pkts;
                v.iter()
                    .filter(|s| {
                        want.iter()
                            .zip(pkts)
                            .any(|(w, p)| w == *s && u16::from_be_bytes([p[20], p[21]]) == flow)
                    })
                    .cloned()
                    .collect()
            };
            assert_eq!(pick(&segs, &pkts), pick(&want, &pkts), "flow {flow}");
        }
        let mut a = segs.clone();
        let mut b = want.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "every segment exactly once");
    }

    #[test]
    fn many_flows_and_aborted_decryptions_lose_nothing() {
        let mut c = TunCoalescer::new(true);
        let mut frames: Vec<Vec<u8>> = Vec::new();
        let mut out = |f: &[u8]| {
            frames.push(f.to_vec());
            Ok(())
        };
        let mut pkts = Vec::new();
        for round in 0..5u32 {
            for flow in 0..20u16 {
                let p = tcp4(A, 100 + flow, round * 500, TCP_ACK, &data(500, flow as u8));
                // A datagram that fails to decrypt in between: it clobbers the tail.
                let dst = c.dst(1500, true);
                dst[..1500].fill(0xab);
                c.abort();
                let dst = c.dst(p.len() + 48, true);
                dst[..p.len()].copy_from_slice(&p);
                c.commit(p.len(), &mut out).unwrap();
                pkts.push(p);
            }
        }
        c.flush(&mut out).unwrap();
        let mut segs: Vec<Seg> = frames.iter().flat_map(|f| split(f)).collect();
        let mut want = expect(&pkts);
        segs.sort();
        want.sort();
        assert_eq!(segs, want);
    }

    fn udp4(sport: u16, payload: &[u8]) -> Vec<u8> {
        let total = 28 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = IPPROTO_UDP;
        p[12..16].copy_from_slice(&A);
        p[16..20].copy_from_slice(&B);
        let c = !fold(sum(&p[..20], 0));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&53u16.to_be_bytes());
        p[24..26].copy_from_slice(&((total - 20) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        p
    }

    #[test]
    fn udp_datagrams_of_one_flow_become_a_uso_frame_when_the_tun_takes_them() {
        let mut pkts: Vec<_> = (0..10u8).map(|i| udp4(7, &data(1200, i))).collect();
        pkts.push(udp4(7, &data(300, 10)));
        pkts.push(udp4(7, &data(1200, 11)));
        for udp in [true, false] {
            let mut c = TunCoalescer::new(udp);
            let mut frames: Vec<Vec<u8>> = Vec::new();
            let mut out = |f: &[u8]| {
                frames.push(f.to_vec());
                Ok(())
            };
            for p in &pkts {
                let dst = c.dst(p.len() + 48, true);
                dst[..p.len()].copy_from_slice(p);
                c.commit(p.len(), &mut out).unwrap();
            }
            c.flush(&mut out).unwrap();
            if !udp {
                let plain: Vec<_> = frames
                    .iter()
                    .map(|f| f[VIRTIO_NET_HDR_LEN..].to_vec())
                    .collect();
                assert_eq!(plain, pkts, "written one by one, unchanged");
                continue;
            }
            assert_eq!(frames.len(), 2, "11 datagrams up to the short one, then 1");
            let f = &frames[0];
            let (hdr, ip) = f.split_at(VIRTIO_NET_HDR_LEN);
            assert_eq!(hdr[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
            assert_eq!(hdr[1], VIRTIO_NET_HDR_GSO_UDP_L4);
            assert_eq!(u16::from_ne_bytes([hdr[4], hdr[5]]), 1200);
            assert_eq!(u16::from_ne_bytes([hdr[8], hdr[9]]), 6);
            assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len());
            assert_eq!(fold(sum(&ip[..20], 0)), 0xffff);
            assert_eq!(
                usize::from(u16::from_be_bytes([ip[24], ip[25]])),
                ip.len() - 20
            );
            let partial = fold(pseudo_header(ip, false, IPPROTO_UDP, ip.len() - 20));
            assert_eq!(u16::from_be_bytes([ip[26], ip[27]]), partial);
            let want: Vec<u8> = pkts[..11].iter().flat_map(|p| p[28..].to_vec()).collect();
            assert_eq!(&ip[28..], &want[..]);
            assert_eq!(&frames[1][VIRTIO_NET_HDR_LEN + 28..], &pkts[11][28..]);
        }
    }
}
