//! An in-memory [`MapWriter`] that records the order of writes, for unit tests of code that
//! drives the maps.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::{Ipv4Net, Ipv6Net};
use wiremesh_policy::{IsolationKey, RuleKey};

use super::MapWriter;
use crate::{
    abi::{Config, IpcacheValue},
    loader::Error,
};

/// One write, in the order it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// An insert or overwrite.
    Put,
    /// A delete.
    Del,
}

/// Map contents as plain collections.
#[derive(Debug, Clone, Default)]
pub struct FakeMaps {
    /// The config entry.
    pub config: Config,
    /// ipcache4.
    pub ipcache: BTreeMap<Ipv4Net, IpcacheValue>,
    /// cidrs4.
    pub cidrs: BTreeMap<Ipv4Net, u32>,
    /// ipcache6.
    pub ipcache6: BTreeMap<Ipv6Net, IpcacheValue>,
    /// cidrs6.
    pub cidrs6: BTreeMap<Ipv6Net, u32>,
    /// isolated.
    pub isolated: BTreeSet<IsolationKey>,
    /// rules.
    pub rules: BTreeSet<RuleKey>,
    /// Every write in order.
    pub writes: Vec<Write>,
}

impl MapWriter for FakeMaps {
    fn set_config(&mut self, config: &Config) -> Result<(), Error> {
        self.config = *config;
        self.writes.push(Write::Put);
        Ok(())
    }
    fn put_ipcache(&mut self, net: Ipv4Net, value: IpcacheValue) -> Result<(), Error> {
        self.ipcache.insert(net, value);
        self.writes.push(Write::Put);
        Ok(())
    }
    fn del_ipcache(&mut self, net: Ipv4Net) -> Result<(), Error> {
        self.ipcache.remove(&net);
        self.writes.push(Write::Del);
        Ok(())
    }
    fn put_cidr(&mut self, net: Ipv4Net, identity: u32) -> Result<(), Error> {
        self.cidrs.insert(net, identity);
        self.writes.push(Write::Put);
        Ok(())
    }
    fn del_cidr(&mut self, net: Ipv4Net) -> Result<(), Error> {
        self.cidrs.remove(&net);
        self.writes.push(Write::Del);
        Ok(())
    }
    fn put_ipcache6(&mut self, net: Ipv6Net, value: IpcacheValue) -> Result<(), Error> {
        self.ipcache6.insert(net, value);
        self.writes.push(Write::Put);
        Ok(())
    }
    fn del_ipcache6(&mut self, net: Ipv6Net) -> Result<(), Error> {
        self.ipcache6.remove(&net);
        self.writes.push(Write::Del);
        Ok(())
    }
    fn put_cidr6(&mut self, net: Ipv6Net, identity: u32) -> Result<(), Error> {
        self.cidrs6.insert(net, identity);
        self.writes.push(Write::Put);
        Ok(())
    }
    fn del_cidr6(&mut self, net: Ipv6Net) -> Result<(), Error> {
        self.cidrs6.remove(&net);
        self.writes.push(Write::Del);
        Ok(())
    }
    fn put_isolated(&mut self, key: &IsolationKey) -> Result<(), Error> {
        self.isolated.insert(*key);
        self.writes.push(Write::Put);
        Ok(())
    }
    fn del_isolated(&mut self, key: &IsolationKey) -> Result<(), Error> {
        self.isolated.remove(key);
        self.writes.push(Write::Del);
        Ok(())
    }
    fn put_rule(&mut self, key: &RuleKey) -> Result<(), Error> {
        self.rules.insert(*key);
        self.writes.push(Write::Put);
        Ok(())
    }
    fn del_rule(&mut self, key: &RuleKey) -> Result<(), Error> {
        self.rules.remove(key);
        self.writes.push(Write::Del);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
