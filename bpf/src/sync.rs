//! Writing policy to the maps: the [`MapWriter`] operations (implemented by the pinned
//! [`crate::Maps`] and by the in-memory [`fake::FakeMaps`] for unit tests of callers), and
//! [`apply_policy`], which turns a compiler [`MapDiff`] into writes in a safe order.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tracing::debug;
use wiremesh_policy::{Identity, IsolationKey, MapDiff, RuleKey};

use crate::{
    abi::{AbiError, Config, IpcacheValue},
    loader::Error,
};

pub mod fake;

/// The map writes the agent performs. Deleting a missing entry is not an error.
pub trait MapWriter {
    /// Writes the config entry.
    fn set_config(&mut self, config: &Config) -> Result<(), Error>;
    /// Inserts or overwrites an ipcache prefix.
    fn put_ipcache(&mut self, net: Ipv4Net, value: IpcacheValue) -> Result<(), Error>;
    /// Deletes an ipcache prefix.
    fn del_ipcache(&mut self, net: Ipv4Net) -> Result<(), Error>;
    /// Inserts or overwrites a cidrs4 prefix.
    fn put_cidr(&mut self, net: Ipv4Net, identity: u32) -> Result<(), Error>;
    /// Deletes a cidrs4 prefix.
    fn del_cidr(&mut self, net: Ipv4Net) -> Result<(), Error>;
    /// Marks (identity, direction) isolated.
    fn put_isolated(&mut self, key: &IsolationKey) -> Result<(), Error>;
    /// Clears an isolation mark.
    fn del_isolated(&mut self, key: &IsolationKey) -> Result<(), Error>;
    /// Adds an allow rule.
    fn put_rule(&mut self, key: &RuleKey) -> Result<(), Error>;
    /// Removes an allow rule.
    fn del_rule(&mut self, key: &RuleKey) -> Result<(), Error>;
    /// Inserts or overwrites an ipcache6 prefix. Default: unsupported (an error).
    fn put_ipcache6(&mut self, net: Ipv6Net, _value: IpcacheValue) -> Result<(), Error> {
        Err(AbiError::Ipv6(net.into()).into())
    }
    /// Deletes an ipcache6 prefix. Default: unsupported (an error).
    fn del_ipcache6(&mut self, net: Ipv6Net) -> Result<(), Error> {
        Err(AbiError::Ipv6(net.into()).into())
    }
    /// Inserts or overwrites a cidrs6 prefix. Default: unsupported (an error).
    fn put_cidr6(&mut self, net: Ipv6Net, _identity: u32) -> Result<(), Error> {
        Err(AbiError::Ipv6(net.into()).into())
    }
    /// Deletes a cidrs6 prefix. Default: unsupported (an error).
    fn del_cidr6(&mut self, net: Ipv6Net) -> Result<(), Error> {
        Err(AbiError::Ipv6(net.into()).into())
    }
    /// Called once after a batch of writes (by [`apply_policy`]): the pinned maps start a new
    /// policy epoch so established flows are decided again. Default: nothing.
    fn policy_written(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

/// What [`apply_policy`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyApplied {
    /// Entries inserted or overwritten.
    pub written: usize,
    /// Entries deleted.
    pub removed: usize,
    /// IPv6 entries skipped (the programs are IPv4 only).
    pub skipped_ipv6: usize,
}

/// Applies a policy diff: CIDR, isolation and rule entries directly, endpoints as ipcache /32s
/// whose node fields come from `place(ip, identity)`. All upserts and additions go first, then
/// the deletions, so an entry both states share is never missing. IPv6 entries are skipped and
/// counted (see [`apply_policy_dual`] to write them too).
pub fn apply_policy<M: MapWriter + ?Sized>(
    maps: &mut M,
    diff: &MapDiff,
    place: impl Fn(Ipv4Addr, Identity) -> IpcacheValue,
) -> Result<PolicyApplied, Error> {
    apply(maps, diff, &place, None)
}

/// [`apply_policy`] for both families: IPv6 endpoints go to ipcache6 as /128s placed by
/// `place6`, IPv6 CIDR entries to cidrs6.
pub fn apply_policy_dual<M: MapWriter + ?Sized>(
    maps: &mut M,
    diff: &MapDiff,
    place4: impl Fn(Ipv4Addr, Identity) -> IpcacheValue,
    place6: impl Fn(Ipv6Addr, Identity) -> IpcacheValue,
) -> Result<PolicyApplied, Error> {
    apply(maps, diff, &place4, Some(&place6))
}

type Place6<'a> = Option<&'a dyn Fn(Ipv6Addr, Identity) -> IpcacheValue>;

fn apply<M: MapWriter + ?Sized>(
    maps: &mut M,
    diff: &MapDiff,
    place: &dyn Fn(Ipv4Addr, Identity) -> IpcacheValue,
    place6: Place6<'_>,
) -> Result<PolicyApplied, Error> {
    let mut n = PolicyApplied::default();
    for (ip, id) in &diff.endpoints_upsert {
        match ip {
            IpAddr::V4(a) => {
                maps.put_ipcache(Ipv4Net::from(*a), place(*a, *id))?;
                n.written += 1;
            }
            IpAddr::V6(a) => match place6 {
                Some(p6) => {
                    maps.put_ipcache6(Ipv6Net::from(*a), p6(*a, *id))?;
                    n.written += 1;
                }
                None => n.skipped_ipv6 += 1,
            },
        }
    }
    for e in &diff.cidrs_upsert {
        match e.prefix {
            IpNet::V4(net) => {
                maps.put_cidr(net.trunc(), e.identity.0)?;
                n.written += 1;
            }
            IpNet::V6(net) if place6.is_some() => {
                maps.put_cidr6(net.trunc(), e.identity.0)?;
                n.written += 1;
            }
            IpNet::V6(_) => n.skipped_ipv6 += 1,
        }
    }
    for k in &diff.isolated_add {
        maps.put_isolated(k)?;
        n.written += 1;
    }
    for k in &diff.rules_add {
        maps.put_rule(k)?;
        n.written += 1;
    }
    for k in &diff.rules_remove {
        maps.del_rule(k)?;
        n.removed += 1;
    }
    for k in &diff.isolated_remove {
        maps.del_isolated(k)?;
        n.removed += 1;
    }
    for p in &diff.cidrs_remove {
        match p {
            IpNet::V4(net) => {
                maps.del_cidr(net.trunc())?;
                n.removed += 1;
            }
            IpNet::V6(net) if place6.is_some() => {
                maps.del_cidr6(net.trunc())?;
                n.removed += 1;
            }
            IpNet::V6(_) => n.skipped_ipv6 += 1,
        }
    }
    for ip in &diff.endpoints_remove {
        match ip {
            IpAddr::V4(a) => {
                maps.del_ipcache(Ipv4Net::from(*a))?;
                n.removed += 1;
            }
            IpAddr::V6(a) if place6.is_some() => {
                maps.del_ipcache6(Ipv6Net::from(*a))?;
                n.removed += 1;
            }
            IpAddr::V6(_) => n.skipped_ipv6 += 1,
        }
    }
    maps.policy_written()?;
    debug!(
        written = n.written,
        removed = n.removed,
        skipped_ipv6 = n.skipped_ipv6,
        "policy applied to maps"
    );
    Ok(n)
}
