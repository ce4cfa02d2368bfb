//! Garbage collection of the policy maps after a restart: an agent that reuses pinned maps does
//! not know which compilation wrote them, so once it has written the current one it deletes
//! every isolation, rule and CIDR entry (both families) that compilation does not contain,
//! then starts a new policy epoch so established flows decided under the deleted entries
//! re-run their policy lookups on the next packet.

use std::collections::HashSet;

use aya::maps::lpm_trie::Key;
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
        let stale: Vec<Key<RuleData>> = self
            .rules
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err("wm_rules"))?
            .into_iter()
            .filter(|k| !rules.contains(&(k.prefix_len(), k.data())))
            .collect();
        for k in &stale {
            ignore_missing(self.rules.remove(k), "wm_rules")?;
        }
        out.rules = stale.len();

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
        let stale: Vec<Ipv4Net> = self
            .cidrs
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err("wm_cidrs4"))?
            .iter()
            .filter_map(lpm4_net)
            .filter(|n| !cidrs4.contains(n))
            .collect();
        for n in &stale {
            ignore_missing(self.cidrs.remove(&lpm4_key(*n)), "wm_cidrs4")?;
        }
        out.cidrs = stale.len();

        let stale: Vec<Ipv6Net> = self
            .cidrs6
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err("wm_cidrs6"))?
            .iter()
            .filter_map(lpm6_net)
            .filter(|n| !cidrs6.contains(n))
            .collect();
        for n in &stale {
            ignore_missing(self.cidrs6.remove(&lpm6_key(*n)), "wm_cidrs6")?;
        }
        out.cidrs6 = stale.len();

        if out.total() > 0 {
            self.bump_policy_epoch()?;
        }
        Ok(out)
    }
}
