//! An in-memory [`Routes`] for unit tests: keeps routes per interface, records calls, and can be told
//! to fail the next mutating call.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Mutex, MutexGuard},
};

use ipnet::IpNet;

use super::{Routes, RoutesError};

#[derive(Debug, Default)]
struct State {
    links: BTreeMap<String, u32>,
    routes: BTreeMap<String, BTreeSet<IpNet>>,
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

    /// Pre-populates a route, as if left behind by an earlier run.
    pub fn insert_route(&self, ifname: &str, dst: IpNet) {
        self.lock()
            .routes
            .entry(ifname.to_string())
            .or_default()
            .insert(dst);
    }

    /// The next mutating call fails with this message.
    pub fn fail_next(&self, message: &str) {
        self.lock().fail_next = Some(message.to_string());
    }

    /// Current routes through `ifname`.
    pub fn routes(&self, ifname: &str) -> BTreeSet<IpNet> {
        self.lock().routes.get(ifname).cloned().unwrap_or_default()
    }

    /// The MTU the interface was brought up with, if it was.
    pub fn link_mtu(&self, ifname: &str) -> Option<u32> {
        self.lock().links.get(ifname).copied()
    }

    /// Calls made so far (`link_up <if> <mtu>`, `add <if> <dst>`, `del <if> <dst>`).
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
    async fn link_up(&self, ifname: &str, mtu: u32) -> Result<(), RoutesError> {
        let mut state = self.mutate(ifname, format!("link_up {ifname} {mtu}"))?;
        state.links.insert(ifname.to_string(), mtu);
        Ok(())
    }

    async fn list(&self, ifname: &str) -> Result<Vec<IpNet>, RoutesError> {
        Ok(self.routes(ifname).into_iter().collect())
    }

    async fn add(&self, ifname: &str, dst: IpNet) -> Result<(), RoutesError> {
        let mut state = self.mutate(ifname, format!("add {ifname} {dst}"))?;
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

    async fn mtu_of_address(&self, address: IpAddr) -> Result<u32, RoutesError> {
        self.lock()
            .address_mtu
            .get(&address)
            .copied()
            .ok_or(RoutesError::NoSuchAddress { address })
    }
}
