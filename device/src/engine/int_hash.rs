//! A cheap hasher for the datapath's integer-keyed maps (receiver index -> peer, allowed-IPs
//! prefixes). std's SipHash cost one `hash_one` call of ~20 ns per received packet (twice:
//! receiver-index lookup and the allowed-IPs source check); a seeded folded multiply does the
//! same job in a few cycles. The keys in these maps are chosen by us (random receiver
//! indices) or by the operator (prefixes), never by the network, so hash flooding through
//! them is not possible; the per-map random seed is defence in depth.

use std::hash::{BuildHasher, Hasher};

/// Builds [`IntHasher`]s with a per-map random seed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IntHashBuilder {
    seed: u64,
}

impl Default for IntHashBuilder {
    fn default() -> Self {
        let mut b = [0u8; 8];
        // A fixed seed still hashes correctly; randomness is only defence in depth.
        if getrandom::fill(&mut b).is_err() {
            b = 0x243f_6a88_85a3_08d3u64.to_le_bytes();
        }
        Self {
            seed: u64::from_le_bytes(b),
        }
    }
}

impl BuildHasher for IntHashBuilder {
    type Hasher = IntHasher;

    fn build_hasher(&self) -> IntHasher {
        IntHasher(self.seed)
    }
}

/// Folded-multiply hasher: every written word is mixed in with one 64x64->128 multiply.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IntHasher(u64);

impl IntHasher {
    #[inline]
    fn mix(&mut self, v: u64) {
        let p = u128::from(self.0 ^ v) * 0x9e37_79b9_7f4a_7c15u128;
        self.0 = (p as u64) ^ ((p >> 64) as u64);
    }
}

impl Hasher for IntHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.mix(u64::from(n));
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }

    #[inline]
    fn write_u128(&mut self, n: u128) {
        self.mix(n as u64);
        self.mix((n >> 64) as u64);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    #[test]
    fn spreads_sequential_and_prefix_keys_over_buckets() {
        let b = IntHashBuilder::default();
        // Low 7 bits (bucket index of a small table) and top 7 bits (hashbrown's tag) must
        // both vary for keys that differ only in high bits (masked /24 prefixes) or low bits.
        for keys in [
            (0..256u32).map(|i| i << 8).collect::<Vec<_>>(),
            (0..256u32).collect::<Vec<_>>(),
        ] {
            let low: HashSet<u64> = keys.iter().map(|k| b.hash_one(k) & 0x7f).collect();
            let top: HashSet<u64> = keys.iter().map(|k| b.hash_one(k) >> 57).collect();
            assert!(low.len() > 100, "low bits: {} distinct", low.len());
            assert!(top.len() > 100, "top bits: {} distinct", top.len());
        }
    }

    #[test]
    fn works_as_a_map_hasher() {
        let mut m: HashMap<u128, u32, IntHashBuilder> = HashMap::default();
        for i in 0..10_000u32 {
            m.insert(u128::from(i) << 64 | u128::from(i), i);
        }
        for i in 0..10_000u32 {
            assert_eq!(m.get(&(u128::from(i) << 64 | u128::from(i))), Some(&i));
        }
        assert_eq!(m.get(&1), None);
    }
}
