//! Garbage collection of the policy maps after a restart: an agent that reuses pinned maps does
//! not know which compilation wrote them, so once it has written the current one it deletes
//! every isolation, rule and CIDR entry (both families) that compilation does not contain,
//! then starts a new policy epoch so established flows decided under the deleted entries
//! re-run their policy lookups on the next packet.

use std::{collections::HashSet, hash::Hash};

use aya::{
    Pod,
    maps::{LpmTrie, MapData, lpm_trie::Key},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use wiremesh_policy::Compiled;

use super::{Error, Maps, ignore_missing, map_err};
use crate::abi::{IsolationKeyRaw, RuleData, lpm4_key, lpm4_net, lpm6_key, lpm6_net, rule_key};

/// What [`Maps::retain_policy`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retained {
    /// Isolation entries deleted.
    pub isolated: usize,
    /// Rule entries deleted.
    pub rules: usize,
    /// IPv4 CIDR entries (`wm_cidrs4`) deleted.
    pub cidrs: usize,
    /// IPv6 CIDR entries (`wm_cidrs6`) deleted.
    pub cidrs6: usize,
}

impl Retained {
    /// Entries deleted in all maps.
    pub fn total(&self) -> usize {
        self.isolated + self.rules + self.cidrs + self.cidrs6
    }
}

impl Maps {
    /// Deletes every `wm_isolated`, `wm_rules`, `wm_cidrs4` and `wm_cidrs6` entry that `keep`
    /// does not contain (the ipcaches are left alone: their owner diffs them with
    /// [`Maps::ipcache_entries`]). Write `keep` first, so nothing it allows is ever missing.
    /// When anything was deleted it starts a new policy epoch, so a flow allowed by a deleted
    /// entry is re-checked on its next packet instead of keeping a stale conntrack allow.
    pub fn retain_policy(&mut self, keep: &Compiled) -> Result<Retained, Error> {
        let mut out = Retained::default();

        let isolated: HashSet<IsolationKeyRaw> =
            keep.isolated.iter().map(IsolationKeyRaw::from).collect();
        let stale: Vec<IsolationKeyRaw> = self
            .isolated
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err("wm_isolated"))?
            .into_iter()
            .filter(|k| !isolated.contains(k))
            .collect();
        for k in &stale {
            ignore_missing(self.isolated.remove(k), "wm_isolated")?;
        }
        out.isolated = stale.len();

        let rules: HashSet<(u32, RuleData)> = keep
            .rules
            .iter()
            .map(|r| {
                let k = rule_key(r);
                (k.prefix_len(), k.data())
            })
            .collect();
        out.rules = retain_lpm(
            &mut self.rules,
            "wm_rules",
            &rules,
            |k| Some((k.prefix_len(), k.data())),
            |(len, data)| Key::new(len, data),
        )?;

        let (cidrs4, cidrs6): (HashSet<Ipv4Net>, HashSet<Ipv6Net>) =
            keep.cidrs
                .iter()
                .fold(Default::default(), |(mut v4, mut v6), e| {
                    match e.prefix {
                        IpNet::V4(n) => v4.insert(n.trunc()),
                        IpNet::V6(n) => v6.insert(n.trunc()),
                    };
                    (v4, v6)
                });
        out.cidrs = retain_lpm(&mut self.cidrs, "wm_cidrs4", &cidrs4, lpm4_net, lpm4_key)?;

        out.cidrs6 = retain_lpm(&mut self.cidrs6, "wm_cidrs6", &cidrs6, lpm6_net, lpm6_key)?;

        if out.total() > 0 {
            self.bump_policy_epoch()?;
        }
        Ok(out)
    }
}

/// Deletes every entry of an LPM trie whose key, read by `entry`, `keep` does not hold; keys
/// `entry` cannot read are left alone. `key` builds the map key back from what `entry` read.
/// Returns how many entries it deleted.
fn retain_lpm<K: Pod, V: Pod, E: Eq + Hash>(
    trie: &mut LpmTrie<MapData, K, V>,
    name: &'static str,
    keep: &HashSet<E>,
    entry: impl Fn(&Key<K>) -> Option<E>,
    key: impl Fn(E) -> Key<K>,
) -> Result<usize, Error> {
    let stale: Vec<E> = trie
        .keys()
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err(name))?
        .iter()
        .filter_map(entry)
        .filter(|e| !keep.contains(e))
        .collect();
    let deleted = stale.len();
    for e in stale {
        ignore_missing(trie.remove(&key(e)), name)?;
    }
    Ok(deleted)
}
