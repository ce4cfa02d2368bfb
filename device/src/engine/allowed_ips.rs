//! The allowed-IPs table: longest-prefix match from an inner IP address to the peer that owns it.
//! Used twice per packet: to pick the peer for a packet read from the TUN, and to check that a
//! decrypted packet's source address belongs to the peer that sent it (cryptokey routing).
//!
//! One hash map per prefix length, probed from the longest populated length down. A mesh has
//! a handful of distinct lengths (/32 host routes, /24 pod CIDRs), so a lookup is a few hash
//! probes (with a cheap integer hash, see `int_hash`) and never allocates.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

use super::int_hash::IntHashBuilder;

/// See the module docs. `T` is the peer handle (cheap to clone).
#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: Family<u32, T>,
    v6: Family<u128, T>,
}

#[derive(Debug, Clone)]
struct Family<K, T> {
    /// Index = prefix length.
    by_len: Vec<HashMap<K, T, IntHashBuilder>>,
    /// Populated prefix lengths, longest first.
    lens: Vec<u8>,
}

impl<K: std::hash::Hash + Eq + Copy + Mask, T: Clone> Family<K, T> {
    fn new(bits: usize, hasher: IntHashBuilder) -> Self {
        Self {
            by_len: (0..=bits).map(|_| HashMap::with_hasher(hasher)).collect(),
            lens: Vec::new(),
        }
    }

    fn refresh_lens(&mut self) {
        self.lens = (0..self.by_len.len())
            .rev()
            .filter(|&l| !self.by_len[l].is_empty())
            .map(|l| l as u8)
            .collect();
    }

    fn insert(&mut self, key: K, len: u8, value: T) -> Option<T> {
        let old = self.by_len[len as usize].insert(key.mask(len), value);
        self.refresh_lens();
        old
    }

    fn remove(&mut self, key: K, len: u8) -> Option<T> {
        let old = self.by_len[len as usize].remove(&key.mask(len));
        self.refresh_lens();
        old
    }

    fn lookup(&self, key: K) -> Option<&T> {
        self.lens
            .iter()
            .find_map(|&len| self.by_len[len as usize].get(&key.mask(len)))
    }
}

trait Mask {
    fn mask(self, len: u8) -> Self;
}

impl Mask for u32 {
    fn mask(self, len: u8) -> Self {
        if len == 0 {
            0
        } else {
            self & (u32::MAX << (32 - len))
        }
    }
}

impl Mask for u128 {
    fn mask(self, len: u8) -> Self {
        if len == 0 {
            0
        } else {
            self & (u128::MAX << (128 - len))
        }
    }
}

impl<T: Clone> Default for AllowedIps<T> {
    fn default() -> Self {
        let hasher = IntHashBuilder::default();
        Self {
            v4: Family::new(32, hasher),
            v6: Family::new(128, hasher),
        }
    }
}

impl<T: Clone> AllowedIps<T> {
    /// Maps `net` to `value`, returning the previous owner of exactly this prefix.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net {
            IpNet::V4(n) => self.v4.insert(u32::from(n.addr()), n.prefix_len(), value),
            IpNet::V6(n) => self.v6.insert(u128::from(n.addr()), n.prefix_len(), value),
        }
    }

    /// Removes exactly this prefix.
    pub fn remove(&mut self, net: IpNet) -> Option<T> {
        match net {
            IpNet::V4(n) => self.v4.remove(u32::from(n.addr()), n.prefix_len()),
            IpNet::V6(n) => self.v6.remove(u128::from(n.addr()), n.prefix_len()),
        }
    }

    /// Longest-prefix match.
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => self.lookup_v4(a),
            IpAddr::V6(a) => self.lookup_v6(a),
        }
    }

    pub fn lookup_v4(&self, addr: Ipv4Addr) -> Option<&T> {
        self.v4.lookup(u32::from(addr))
    }

    pub fn lookup_v6(&self, addr: Ipv6Addr) -> Option<&T> {
        self.v6.lookup(u128::from(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::default();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.1.0.0/16"), 2);
        t.insert(net("10.1.2.3/32"), 3);
        t.insert(net("0.0.0.0/0"), 4);
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()), Some(&3));
        assert_eq!(t.lookup("10.1.2.4".parse().unwrap()), Some(&2));
        assert_eq!(t.lookup("10.2.0.1".parse().unwrap()), Some(&1));
        assert_eq!(t.lookup("192.168.0.1".parse().unwrap()), Some(&4));
        assert_eq!(t.lookup("fd00::1".parse().unwrap()), None);
        t.remove(net("10.1.0.0/16"));
        assert_eq!(t.lookup("10.1.2.4".parse().unwrap()), Some(&1));
    }

    #[test]
    fn host_bits_are_ignored_and_v6_works() {
        let mut t = AllowedIps::default();
        t.insert(net("fd00:1::5/64"), 'a');
        t.insert(net("::/0"), 'z');
        assert_eq!(t.lookup("fd00:1::ffff".parse().unwrap()), Some(&'a'));
        assert_eq!(t.lookup("fd00:2::1".parse().unwrap()), Some(&'z'));
        t.remove(net("fd00:1::/64"));
        assert_eq!(t.lookup("fd00:1::ffff".parse().unwrap()), Some(&'z'));
    }

    #[test]
    fn reinsert_moves_prefix_to_new_owner() {
        let mut t = AllowedIps::default();
        assert_eq!(t.insert(net("10.0.0.0/24"), 1), None);
        assert_eq!(t.insert(net("10.0.0.0/24"), 2), Some(1));
        assert_eq!(t.lookup("10.0.0.9".parse().unwrap()), Some(&2));
    }
}
