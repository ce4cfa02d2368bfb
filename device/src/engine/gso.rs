//! TUN read side of the send path: a frame read from the TUN (virtio-net header + packet, up
//! to 64 KiB when the kernel hands us a TSO/USO super-packet) is cut into MTU-sized segments
//! in place. Segment `i`'s headers are written just before its payload, over the tail of
//! segment `i - 1`'s payload, which has been encrypted by then; so segments are produced in
//! order and no payload byte is copied. Checksums the kernel left to the "hardware"
//! (NEEDS_CSUM) are computed here.

use tun_rs::VIRTIO_NET_HDR_LEN;

use super::checksum::{fold, pseudo_header, sum};

const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Largest IP + L4 header we segment (IPv6 with extension headers + TCP with options).
const MAX_HDR: usize = 256;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Why a frame from the TUN could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed(pub &'static str);

/// Calls `each` with every IP packet of the `n`-byte frame at the start of `frame` (virtio-net
/// header first), in order, with valid checksums. `each` must be done with a segment when it
/// returns: the next one is built over its tail.
pub(crate) fn for_each_segment(
    frame: &mut [u8],
    n: usize,
    mut each: impl FnMut(&[u8]),
) -> Result<(), Malformed> {
    if n < VIRTIO_NET_HDR_LEN + 20 || n > frame.len() {
        return Err(Malformed("frame shorter than an IP header"));
    }
    let hdr: [u8; VIRTIO_NET_HDR_LEN] = frame[..VIRTIO_NET_HDR_LEN]
        .try_into()
        .map_err(|_| Malformed("no virtio-net header"))?;
    let flags = hdr[0];
    let gso_type = hdr[1] & !VIRTIO_NET_HDR_GSO_ECN;
    let gso_size = usize::from(u16::from_ne_bytes([hdr[4], hdr[5]]));
    let csum_start = usize::from(u16::from_ne_bytes([hdr[6], hdr[7]]));
    let csum_offset = usize::from(u16::from_ne_bytes([hdr[8], hdr[9]]));
    let ip = &mut frame[VIRTIO_NET_HDR_LEN..n];
    let v6 = match ip[0] >> 4 {
        4 => false,
        6 if ip.len() >= 40 => true,
        _ => return Err(Malformed("not IPv4 or IPv6")),
    };
    if gso_type == VIRTIO_NET_HDR_GSO_NONE {
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            let at = csum_start + csum_offset;
            if at + 2 > ip.len() || csum_start >= ip.len() {
                return Err(Malformed("checksum offset beyond the packet"));
            }
            // The field holds the pseudo-header sum; sum the rest on top of it.
            let c = !fold(sum(&ip[csum_start..], 0));
            // In UDP (checksum at offset 6) zero means "no checksum": send all ones instead.
            let c = if c == 0 && csum_offset == 6 {
                0xffff
            } else {
                c
            };
            ip[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        each(ip);
        return Ok(());
    }
    let proto = match gso_type {
        VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_TCPV6 => IPPROTO_TCP,
        VIRTIO_NET_HDR_GSO_UDP_L4 => IPPROTO_UDP,
        VIRTIO_NET_HDR_GSO_UDP => return Err(Malformed("UFO (IP fragmentation) not supported")),
        _ => return Err(Malformed("unknown GSO type")),
    };
    if (gso_type == VIRTIO_NET_HDR_GSO_TCPV6) != v6 && proto == IPPROTO_TCP {
        return Err(Malformed("GSO type does not match the IP version"));
    }
    let ip_hlen = csum_start;
    if ip_hlen < 20 || ip_hlen + 8 > ip.len() || (v6 && ip_hlen < 40) {
        return Err(Malformed("bad L4 offset"));
    }
    let l4_hlen = if proto == IPPROTO_TCP {
        usize::from(ip[ip_hlen + 12] >> 4) * 4
    } else {
        8
    };
    let hlen = ip_hlen + l4_hlen;
    if l4_hlen < 8 || hlen > MAX_HDR || hlen >= ip.len() || gso_size == 0 {
        return Err(Malformed("bad GSO headers"));
    }
    let mut template = [0u8; MAX_HDR];
    template[..hlen].copy_from_slice(&ip[..hlen]);
    let template = &template[..hlen];
    let payload_len = ip.len() - hlen;
    let segs = payload_len.div_ceil(gso_size);
    let id0 = u16::from_be_bytes([template[4], template[5]]);
    let seq0 = u32::from_be_bytes([
        template[ip_hlen + 4],
        template[ip_hlen + 5],
        template[ip_hlen + 6],
        template[ip_hlen + 7],
    ]);
    for i in 0..segs {
        let p_start = hlen + i * gso_size;
        let p_len = gso_size.min(ip.len() - p_start);
        let s = p_start - hlen;
        let seg = &mut ip[s..p_start + p_len];
        if i > 0 {
            seg[..hlen].copy_from_slice(template);
        }
        let total = hlen + p_len;
        if v6 {
            seg[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        } else {
            seg[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            seg[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            seg[10..12].copy_from_slice(&[0, 0]);
            let c = !fold(sum(&seg[..ip_hlen], 0));
            seg[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let l4 = ip_hlen;
        let csum_at = if proto == IPPROTO_TCP {
            let seq = seq0.wrapping_add((i * gso_size) as u32);
            seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            if i + 1 < segs {
                seg[l4 + 13] &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                seg[l4 + 13] &= !TCP_CWR;
            }
            l4 + 16
        } else {
            seg[l4 + 4..l4 + 6].copy_from_slice(&((total - ip_hlen) as u16).to_be_bytes());
            l4 + 6
        };
        seg[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
        let c = !fold(sum(
            &seg[l4..],
            pseudo_header(seg, v6, proto, total - ip_hlen),
        ));
        // A UDP checksum of zero means "none": send all ones instead.
        let c = if c == 0 && proto == IPPROTO_UDP {
            0xffff
        } else {
            c
        };
        seg[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        each(seg);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_l4(pkt: &[u8], v6: bool, proto: u8) -> bool {
        let ip_hlen = if v6 {
            40
        } else {
            usize::from(pkt[0] & 0x0f) * 4
        };
        let l4 = &pkt[ip_hlen..];
        fold(sum(l4, pseudo_header(pkt, v6, proto, l4.len()))) == 0xffff
    }

    /// A TSO frame as the kernel hands it over: one big packet, NEEDS_CSUM, the pseudo-header
    /// sum in the checksum field.
    fn tso_frame(v6: bool, payload: &[u8], mss: u16, flags: u8) -> Vec<u8> {
        let ip_hlen = if v6 { 40 } else { 20 };
        let hlen = ip_hlen + 32;
        let total = hlen + payload.len();
        let mut f = vec![0u8; VIRTIO_NET_HDR_LEN + total];
        f[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        f[1] = if v6 {
            VIRTIO_NET_HDR_GSO_TCPV6
        } else {
            VIRTIO_NET_HDR_GSO_TCPV4
        };
        f[2..4].copy_from_slice(&(hlen as u16).to_ne_bytes());
        f[4..6].copy_from_slice(&mss.to_ne_bytes());
        f[6..8].copy_from_slice(&(ip_hlen as u16).to_ne_bytes());
        f[8..10].copy_from_slice(&16u16.to_ne_bytes());
        let ip = &mut f[VIRTIO_NET_HDR_LEN..];
        if v6 {
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            ip[6] = IPPROTO_TCP;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&[0xfd; 16]);
            ip[24..40].copy_from_slice(&[0xfe; 16]);
        } else {
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
            ip[6] = 0x40;
            ip[8] = 64;
            ip[9] = IPPROTO_TCP;
            ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
            ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        }
        let t = ip_hlen;
        ip[t..t + 4].copy_from_slice(&[0x13, 0x88, 0xc3, 0x50]);
        ip[t + 4..t + 8].copy_from_slice(&0xffff_ff00u32.to_be_bytes());
        ip[t + 12] = 8 << 4;
        ip[t + 13] = flags;
        ip[t + 32..].copy_from_slice(payload);
        let partial = fold(pseudo_header(ip, v6, IPPROTO_TCP, total - ip_hlen));
        ip[t + 16..t + 18].copy_from_slice(&partial.to_be_bytes());
        f
    }

    #[test]
    fn tso_frames_become_valid_segments_with_the_same_bytes() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 300) as u8).collect();
            let mut f = tso_frame(v6, &payload, 1368, 0x10 | TCP_PSH | TCP_CWR);
            let n = f.len();
            let mut got = Vec::new();
            let mut segs = Vec::new();
            for_each_segment(&mut f, n, |seg| segs.push(seg.to_vec())).expect("split");
            assert_eq!(segs.len(), 8);
            let ip_hlen = if v6 { 40 } else { 20 };
            for (i, seg) in segs.iter().enumerate() {
                assert!(
                    valid_l4(seg, v6, IPPROTO_TCP),
                    "v6 {v6} segment {i} checksum"
                );
                if !v6 {
                    assert_eq!(usize::from(u16::from_be_bytes([seg[2], seg[3]])), seg.len());
                    assert_eq!(fold(sum(&seg[..20], 0)), 0xffff, "IP header checksum");
                    assert_eq!(
                        u16::from_be_bytes([seg[4], seg[5]]),
                        0xfffeu16.wrapping_add(i as u16)
                    );
                } else {
                    assert_eq!(
                        usize::from(u16::from_be_bytes([seg[4], seg[5]])) + 40,
                        seg.len()
                    );
                }
                let t = ip_hlen;
                let seq = u32::from_be_bytes(seg[t + 4..t + 8].try_into().unwrap());
                assert_eq!(seq, 0xffff_ff00u32.wrapping_add(i as u32 * 1368));
                let flags = seg[t + 13];
                assert_eq!(flags & TCP_PSH != 0, i == 7, "PSH only on the last");
                assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR only on the first");
                got.extend_from_slice(&seg[t + 32..]);
            }
            assert_eq!(got, payload);
        }
    }

    #[test]
    fn plain_packets_get_their_checksum_and_bad_frames_are_refused() {
        let payload = vec![0x5a; 300];
        let mut f = tso_frame(false, &payload, 1368, 0x18);
        f[1] = VIRTIO_NET_HDR_GSO_NONE;
        let n = f.len();
        let mut segs = Vec::new();
        for_each_segment(&mut f, n, |s| segs.push(s.to_vec())).expect("plain");
        assert_eq!(segs.len(), 1);
        assert!(valid_l4(&segs[0], false, IPPROTO_TCP));

        let mut bad = tso_frame(false, &payload, 0, 0x10);
        let n = bad.len();
        assert!(for_each_segment(&mut bad, n, |_| {}).is_err(), "gso_size 0");
        let mut bad = tso_frame(false, &payload, 100, 0x10);
        bad[1] = VIRTIO_NET_HDR_GSO_TCPV6;
        assert!(
            for_each_segment(&mut bad, n, |_| {}).is_err(),
            "wrong version"
        );
        let mut bad = tso_frame(false, &payload, 100, 0x10);
        bad[VIRTIO_NET_HDR_LEN] = 0x15;
        assert!(for_each_segment(&mut bad, n, |_| {}).is_err(), "not IP");
        assert!(for_each_segment(&mut bad, 12, |_| {}).is_err(), "short");
    }
}
