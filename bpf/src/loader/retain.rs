//! Garbage collection of the policy maps after a restart: an agent that reuses pinned maps does
//! not know which compilation wrote them, so once it has written the current one it deletes
//! every isolation, rule and CIDR entry that compilation does not contain.

use std::collections::HashSet;

use aya::maps::lpm_trie::Key;
use ipnet::{IpNet, Ipv4Net};
use wiremesh_policy::Compiled;

use super::{Error, Maps, ignore_missing, map_err};
use crate::abi::{IsolationKeyRaw, RuleData, lpm4_key, lpm4_net, rule_key};

/// What [`Maps::retain_policy`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retained {
    /// Isolation entries deleted.
    pub isolated: usize,
    /// Rule entries deleted.
    pub rules: usize,
    /// CIDR entries deleted.
    pub cidrs: usize,
}

impl Retained {
    /// Entries deleted in all maps.
    pub fn total(&self) -> usize {
        self.isolated + self.rules + self.cidrs
    }
}

impl Maps {
    /// Deletes every `wm_isolated`, `wm_rules` and `wm_cidrs4` entry that `keep` does not
    /// contain (the ipcache is left alone: its owner diffs it with
    /// [`Maps::ipcache_entries`]). Write `keep` first, so nothing it allows is ever missing.
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

        let cidrs: HashSet<Ipv4Net> = keep
            .cidrs
            .iter()
            .filter_map(|e| match e.prefix {
                IpNet::V4(n) => Some(n.trunc()),
                IpNet::V6(_) => None,
            })
            .collect();
        let stale: Vec<Ipv4Net> = self
            .cidrs
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err("wm_cidrs4"))?
            .iter()
            .filter_map(lpm4_net)
            .filter(|n| !cidrs.contains(n))
            .collect();
        for n in &stale {
            ignore_missing(self.cidrs.remove(&lpm4_key(*n)), "wm_cidrs4")?;
        }
        out.cidrs = stale.len();
        Ok(out)
    }
}
