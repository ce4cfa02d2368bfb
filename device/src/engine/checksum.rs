//! Internet checksum (RFC 1071) helpers for the offload code: sums are kept unfolded in a
//! `u64` in big-endian word order so that pieces (pseudo-header, headers, payload) add up.

/// One's-complement sum of `data` as big-endian 16-bit words (an odd last byte is the high
/// byte of a zero-padded word), added to `initial`, unfolded. Sums four bytes per step in
/// native order (the compiler vectorizes this) and swaps once at the end, which RFC 1071
/// shows is equivalent.
pub(crate) fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc = 0u64;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 4];
        last[..rest.len()].copy_from_slice(rest);
        acc += u64::from(u32::from_ne_bytes(last));
    }
    // Folded in native word order; the big-endian value is the byte swap on little-endian.
    initial + u64::from(u16::from_be(fold(acc)))
}

/// Folds an unfolded sum to 16 bits (not complemented).
pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Sum of the TCP/UDP pseudo-header of the IP packet `ip` (addresses from its header) for an
/// L4 segment of `l4_len` bytes of protocol `proto`.
pub(crate) fn pseudo_header(ip: &[u8], v6: bool, proto: u8, l4_len: usize) -> u64 {
    let addrs = if v6 { &ip[8..40] } else { &ip[12..20] };
    sum(addrs, u64::from(proto) + l4_len as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook one-word-at-a-time version.
    fn reference(data: &[u8]) -> u64 {
        data.chunks(2)
            .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum()
    }

    #[test]
    fn matches_the_reference_for_every_length_and_alignment() {
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 131 + i / 7) as u8).collect();
        for start in 0..4 {
            for len in (0..200).chain([1399, 1400, 1401, 2995]) {
                let d = &data[start..start + len];
                assert_eq!(
                    fold(sum(d, 7)),
                    fold(reference(d) + 7),
                    "start {start} len {len}"
                );
            }
        }
    }

    #[test]
    fn rfc1071_example() {
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&d, 0)), 0xddf2);
    }
}
