//! An in-memory [`Routes`] for unit tests: keeps our routes per interface, foreign routes of the
//! table, the rule and link state, records calls, and can be told to fail the next mutating call.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Mutex, MutexGuard},
};

use ipnet::IpNet;

use super::{DEFAULT_ROUTE_TABLE, LinkState, Routes, RoutesError};

#[derive(Debug, Default)]
struct State {
    links: BTreeMap<String, LinkState>,
    routes: BTreeMap<String, BTreeSet<IpNet>>,
    foreign: BTreeSet<IpNet>,
    rule: bool,
    address_mtu: BTreeMap<IpAddr, u32>,
    calls: Vec<String>,
    fail_next: Option<String>,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct FakeRoutes {
    state: Mutex<State>,
}

impl FakeRoutes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Pretends that an interface holding `address` has this MTU.
    pub fn set_address_mtu(&self, address: IpAddr, mtu: u32) {
        self.lock().address_mtu.insert(address, mtu);
    }

    /// Pre-populates a route of ours, as if left behind by an earlier run.
    pub fn insert_route(&self, ifname: &str, dst: IpNet) {
        self.lock()
            .routes
            .entry(ifname.to_string())
            .or_default()
            .insert(dst);
    }

    /// Deletes a route of ours behind the agent's back (`ip route del`).
    pub fn remove_route(&self, ifname: &str, dst: IpNet) {
        if let Some(routes) = self.lock().routes.get_mut(ifname) {
            routes.remove(&dst);
        }
    }

    /// Puts a route someone else created into our table.
    pub fn insert_foreign(&self, dst: IpNet) {
        self.lock().foreign.insert(dst);
    }

    /// Deletes the interface (its routes go with it), or brings it down.
    pub fn remove_link(&self, ifname: &str) {
        let mut state = self.lock();
        state.links.remove(ifname);
        state.routes.remove(ifname);
    }

    /// The next mutating call fails with this message.
    pub fn fail_next(&self, message: &str) {
        self.lock().fail_next = Some(message.to_string());
    }

    /// Current routes of ours through `ifname`.
    pub fn routes(&self, ifname: &str) -> BTreeSet<IpNet> {
        self.lock().routes.get(ifname).cloned().unwrap_or_default()
    }

    /// Whether our rule exists.
    pub fn has_rule(&self) -> bool {
        self.lock().rule
    }

    /// The MTU the interface was brought up with, if it was.
    pub fn link_mtu(&self, ifname: &str) -> Option<u32> {
        self.lock()
            .links
            .get(ifname)
            .filter(|l| l.up)
            .map(|l| l.mtu)
    }

    /// The `rp_filter` the interface was given, if it exists.
    pub fn link_rp_filter(&self, ifname: &str) -> Option<u32> {
        self.lock().links.get(ifname).and_then(|l| l.rp_filter)
    }

    /// Sets the interface's `rp_filter` behind the agent's back (`sysctl -w`).
    pub fn set_rp_filter(&self, ifname: &str, value: u32) {
        if let Some(link) = self.lock().links.get_mut(ifname) {
            link.rp_filter = Some(value);
        }
    }

    /// Calls made so far (`link_up <if> <mtu>`, `add <if> <dst>`, `del <if> <dst>`, `rule add`,
    /// `rule remove`).
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mutate(&self, ifname: &str, call: String) -> Result<MutexGuard<'_, State>, RoutesError> {
        let mut state = self.lock();
        if let Some(message) = state.fail_next.take() {
            return Err(RoutesError::Invalid {
                operation: call,
                ifname: ifname.to_string(),
                message,
            });
        }
        state.calls.push(call);
        Ok(state)
    }
}

impl Routes for FakeRoutes {
    async fn link(&self, ifname: &str) -> Result<Option<LinkState>, RoutesError> {
        Ok(self.lock().links.get(ifname).copied())
    }

    async fn link_up(&self, ifname: &str, mtu: u32) -> Result<(), RoutesError> {
        let mut state = self.mutate(ifname, format!("link_up {ifname} {mtu}"))?;
        let next = state.links.len() as u32 + 10;
        let link = state.links.entry(ifname.to_string()).or_insert(LinkState {
            ifindex: next,
            up: false,
            mtu: 0,
            rp_filter: Some(0),
            tunnel_address: false,
        });
        link.up = true;
        link.mtu = mtu;
        link.rp_filter = Some(super::RP_FILTER_LOOSE);
        link.tunnel_address = true;
        Ok(())
    }

    async fn list(&self, ifname: &str) -> Result<Vec<IpNet>, RoutesError> {
        Ok(self.routes(ifname).into_iter().collect())
    }

    async fn add(&self, ifname: &str, dst: IpNet) -> Result<(), RoutesError> {
        let mut state = self.mutate(ifname, format!("add {ifname} {dst}"))?;
        if state.foreign.contains(&dst) {
            return Err(RoutesError::Foreign {
                table: DEFAULT_ROUTE_TABLE,
                dst,
            });
        }
        // Ours through another device moves (route replace).
        for routes in state.routes.values_mut() {
            routes.remove(&dst);
        }
        state
            .routes
            .entry(ifname.to_string())
            .or_default()
            .insert(dst);
        Ok(())
    }

    async fn del(&self, ifname: &str, dst: IpNet) -> Result<(), RoutesError> {
        let mut state = self.mutate(ifname, format!("del {ifname} {dst}"))?;
        if let Some(routes) = state.routes.get_mut(ifname) {
            routes.remove(&dst);
        }
        Ok(())
    }

    async fn ensure_rule(&self) -> Result<usize, RoutesError> {
        if self.lock().rule {
            return Ok(0);
        }
        let mut state = self.mutate("*", "rule add".to_string())?;
        state.rule = true;
        Ok(1)
    }

    async fn remove_rule_and_table(&self) -> Result<usize, RoutesError> {
        let mut state = self.mutate("*", "rule remove".to_string())?;
        let mut removed = usize::from(std::mem::take(&mut state.rule));
        for routes in state.routes.values_mut() {
            removed += routes.len();
            routes.clear();
        }
        Ok(removed)
    }

    async fn mtu_of_address(&self, address: IpAddr) -> Result<u32, RoutesError> {
        self.lock()
            .address_mtu
            .get(&address)
            .copied()
            .ok_or(RoutesError::NoSuchAddress { address })
    }
}
