//! A randomized cluster running the real controller and agent logic against a model API server,
//! with stale caches, arbitrary interleavings, agent restarts, frozen agents, node removals,
//! timeouts and aborts.
//!
//! Checked at every step of runs without failures (the hitless property of DESIGN.md):
//! - when A initiates to B, B's datapath accepts A's static key (its view of A's public or next key);
//! - when B initiates to A using its view of A's public key, A still holds that private key.
//!
//! Checked at the end of every run: the rotation is terminal; every node's keystore holds one key
//! and its annotations publish it; a completed rotation changed exactly the rotating nodes' keys;
//! a rotation failed before Retiring left every key as it was, one failed in Retiring kept the
//! new keys; generations never decreased.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use proptest::prelude::*;

use super::{
    RotationPhase, RotationPlan,
    agent::{self, AgentAction, AgentInput, KeystoreStep, LocalKeys, RotationView, observe_peers},
    controller::{self, ControllerInput},
};
use crate::{
    annotations::{NodeAnnotations, RotationMark},
    keys::{PrivateKey, PublicKey},
    peers::{NodeView, desired_peers},
};

fn addr(i: usize) -> IpAddr {
    IpAddr::from([192, 168, 0, u8::try_from(i + 1).unwrap()])
}

/// Small deterministic generator; proptest supplies the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

#[derive(Clone)]
struct Agent {
    keys: LocalKeys,
    /// Its informer: every node's annotations as last seen.
    cache: BTreeMap<String, BTreeMap<String, String>>,
    /// Its view of the KeyRotation status.
    status: (RotationPhase, Option<RotationPhase>),
    /// What its datapath accepts/targets per peer: (public key, next key), from `cache`.
    datapath: BTreeMap<String, (PublicKey, Option<PublicKey>)>,
    frozen_until: u64,
}

struct Cluster {
    names: Vec<String>,
    api: BTreeMap<String, BTreeMap<String, String>>,
    agents: BTreeMap<String, Agent>,
    plan: RotationPlan,
    phase: RotationPhase,
    failed_during: Option<RotationPhase>,
    failure: Option<super::Failure>,
    phase_since: u64,
    controller_cache: BTreeMap<String, BTreeMap<String, String>>,
    time: u64,
    timeout: u64,
    abort_at: Option<u64>,
    key_counter: u32,
    original: BTreeMap<String, PublicKey>,
    new_keys: BTreeMap<String, PublicKey>,
    generations: BTreeMap<String, u64>,
    hitless: bool,
}

impl Cluster {
    fn new(n: usize, rotating: &[usize]) -> Self {
        let names: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
        let mut api = BTreeMap::new();
        let mut agents = BTreeMap::new();
        let mut original = BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            let k = PrivateKey::from_bytes([u8::try_from(i).unwrap() + 1; 32]).public_key();
            original.insert(name.clone(), k);
            api.insert(
                name.clone(),
                NodeAnnotations {
                    public_key: k,
                    endpoint: SocketAddr::new(addr(i), 51871),
                    key_generation: i as u64,
                    next_public_key: None,
                    next_endpoint: None,
                    rotation: Some(RotationMark::new("rot-old", super::RotationStep::Retired)),
                }
                .render(),
            );
            agents.insert(
                name.clone(),
                Agent {
                    keys: LocalKeys {
                        current: k,
                        next: None,
                        previous: None,
                    },
                    cache: BTreeMap::new(),
                    status: (RotationPhase::Pending, None),
                    datapath: BTreeMap::new(),
                    frozen_until: 0,
                },
            );
        }
        let plan = RotationPlan::new(
            "rot-sim",
            names.iter().cloned(),
            rotating.iter().map(|i| names[*i].clone()),
        )
        .unwrap();
        let mut cluster = Self {
            generations: names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i as u64))
                .collect(),
            names,
            controller_cache: api.clone(),
            api,
            agents,
            plan,
            phase: RotationPhase::Pending,
            failed_during: None,
            failure: None,
            phase_since: 0,
            time: 0,
            timeout: u64::MAX,
            abort_at: None,
            key_counter: 1000,
            original,
            new_keys: BTreeMap::new(),
            hitless: true,
        };
        for name in cluster.names.clone() {
            cluster.restart(&name);
        }
        cluster
    }

    /// Starts another rotation once this one is terminal: keys in force now are the "old" ones.
    fn next_rotation(&mut self, name: &str, rotating: &[usize]) {
        assert!(self.phase.is_terminal());
        self.plan = RotationPlan::new(
            name,
            self.api.keys().cloned(),
            rotating.iter().map(|i| self.names[*i].clone()),
        )
        .unwrap();
        self.phase = RotationPhase::Pending;
        self.failed_during = None;
        self.failure = None;
        self.phase_since = self.time;
        self.abort_at = None;
        self.original = self
            .agents
            .iter()
            .map(|(n, a)| (n.clone(), a.keys.current))
            .collect();
        self.new_keys.clear();
        // Agents see the new KeyRotation object with its own (Pending) status.
        for agent in self.agents.values_mut() {
            agent.status = (RotationPhase::Pending, None);
        }
    }

    fn views(&self, cache: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<NodeView> {
        cache
            .iter()
            .map(|(name, annotations)| {
                let i = self.names.iter().position(|n| n == name).unwrap();
                NodeView {
                    name: name.clone(),
                    annotations: annotations.clone(),
                    addresses: vec![addr(i)],
                    ..NodeView::default()
                }
            })
            .collect()
    }

    fn apply_datapath(&mut self, name: &str) {
        let agent = &self.agents[name];
        let set = desired_peers(name, &self.views(&agent.cache));
        assert!(set.rejected.is_empty(), "{:?}", set.rejected);
        let datapath = set
            .peers
            .iter()
            .map(|p| (p.node.clone(), (p.public_key, p.next_public_key)))
            .collect();
        self.agents.get_mut(name).unwrap().datapath = datapath;
    }

    /// A restarted agent re-lists everything and rebuilds its datapath; its keys are on disk.
    fn restart(&mut self, name: &str) {
        let fresh = self.api.clone();
        let status = (self.phase, self.failed_during);
        let agent = self.agents.get_mut(name).unwrap();
        agent.cache = fresh;
        agent.status = status;
        self.apply_datapath(name);
    }

    fn refresh_one(&mut self, name: &str, of: &str) {
        let truth = self.api.get(of).cloned();
        let agent = self.agents.get_mut(name).unwrap();
        match truth {
            Some(t) => agent.cache.insert(of.to_string(), t),
            None => agent.cache.remove(of),
        };
        self.apply_datapath(name);
    }

    /// One plan-and-act step of an agent. Returns whether it did something.
    fn act(&mut self, name: &str) -> bool {
        if !self.api.contains_key(name) {
            return false;
        }
        let agent = &self.agents[name];
        let views = self.views(&agent.cache);
        let set = desired_peers(name, &views);
        let peers = observe_peers(self.plan.name(), &set, &views);
        let own = agent.cache.get(name).cloned().unwrap_or_default();
        let i = self.names.iter().position(|n| n == name).unwrap();
        let (phase, failed_during) = agent.status;
        let plan = agent::plan(&AgentInput {
            node: name,
            endpoint: SocketAddr::new(addr(i), 51871),
            keys: &agent.keys,
            own_annotations: &own,
            rotation: Some(RotationView {
                plan: &self.plan,
                phase,
                failed_during,
            }),
            peers: &peers,
        });
        let Some(action) = plan.action else {
            return false;
        };
        match action {
            AgentAction::Keystore(step) => {
                self.key_counter += 1;
                let fresh = self.key_counter;
                let keys = &mut self.agents.get_mut(name).unwrap().keys;
                apply_checked(keys, step, fresh);
                if step == KeystoreStep::GenerateNext {
                    self.new_keys.insert(name.to_string(), keys.next.unwrap());
                }
            }
            AgentAction::Publish(annotations) => {
                let rendered = annotations.render();
                let generation = annotations.key_generation;
                let previous = self
                    .generations
                    .insert(name.to_string(), generation)
                    .unwrap();
                assert!(
                    generation >= previous,
                    "{name}: generation {previous} -> {generation}"
                );
                assert_eq!(annotations.public_key, self.agents[name].keys.current);
                self.api.insert(name.to_string(), rendered.clone());
                // The patch response updates the agent's own cache entry.
                self.agents
                    .get_mut(name)
                    .unwrap()
                    .cache
                    .insert(name.to_string(), rendered);
                self.apply_datapath(name);
            }
        }
        true
    }

    fn controller_step(&mut self) {
        let marks: BTreeMap<String, Option<super::RotationStep>> = self
            .controller_cache
            .iter()
            .map(|(n, a)| {
                let step = RotationMark::from_annotations(a)
                    .unwrap()
                    .filter(|m| m.rotation == self.plan.name())
                    .map(|m| m.step);
                (n.clone(), step)
            })
            .collect();
        let out = controller::evaluate(&ControllerInput {
            plan: &self.plan,
            phase: self.phase,
            elapsed_in_phase: Duration::from_secs(self.time - self.phase_since),
            phase_timeout: Duration::from_secs(self.timeout),
            abort_requested: self.abort_at.is_some_and(|t| self.time >= t),
            another_rotation_active: false,
            marks: &marks,
        });
        if out.changed {
            self.phase = out.phase;
            self.phase_since = self.time;
            if let Some(f) = out.failure {
                self.failed_during = Some(f.during);
                self.failure = Some(f);
            }
        }
    }

    fn remove(&mut self, name: &str) {
        self.api.remove(name);
    }

    /// The hitless invariants over every pair of live nodes.
    fn check_hitless(&self) {
        for a in self.api.keys() {
            for b in self.api.keys() {
                if a == b {
                    continue;
                }
                let (ka, kb) = (&self.agents[a], &self.agents[b]);
                // A initiates to B with its current key: B must accept it.
                let Some((pk, next)) = kb.datapath.get(a) else {
                    panic!("{b} has no peer {a}");
                };
                assert!(
                    ka.keys.current == *pk || Some(ka.keys.current) == *next,
                    "t={} phase={:?}: {b} rejects {a}'s key {}",
                    self.time,
                    self.phase,
                    ka.keys.current.fingerprint()
                );
                // B initiates to A with its view of A's key: A must hold it.
                let (target, _) = kb.datapath[a];
                assert!(
                    ka.keys.current == target || ka.keys.previous == Some(target),
                    "t={} phase={:?}: {a} cannot answer {b}'s handshake to {}",
                    self.time,
                    self.phase,
                    target.fingerprint()
                );
            }
        }
    }

    /// Runs random events until the rotation is terminal, then lets everyone catch up.
    fn run(&mut self, rng: &mut Rng, max_events: usize, removals: bool) {
        let n = self.names.len();
        for _ in 0..max_events {
            if self.phase.is_terminal() {
                break;
            }
            let who = self.names[rng.below(n)].clone();
            let frozen = self.agents[&who].frozen_until > self.time;
            match rng.below(100) {
                0..=34 if !frozen => {
                    self.act(&who);
                }
                35..=64 if !frozen => {
                    let of = self.names[rng.below(n)].clone();
                    self.refresh_one(&who, &of);
                }
                65..=72 if !frozen => {
                    self.agents.get_mut(&who).unwrap().status = (self.phase, self.failed_during);
                }
                73..=84 => {
                    let of = self.names[rng.below(n)].clone();
                    match self.api.get(&of) {
                        Some(a) => self.controller_cache.insert(of, a.clone()),
                        None => self.controller_cache.remove(&of),
                    };
                }
                85..=92 => self.controller_step(),
                93..=97 => self.time += 1,
                98 if !frozen && rng.chance(50) => self.restart(&who),
                99 if removals && rng.chance(20) && self.api.len() > 2 => self.remove(&who),
                _ => {}
            }
            if self.hitless {
                self.check_hitless();
            }
        }
        // Catch up: every live agent sees everything and acts until quiet.
        for agent in self.agents.values_mut() {
            agent.frozen_until = 0;
        }
        for _ in 0..50 {
            self.controller_cache = self.api.clone();
            self.controller_step();
            let mut busy = false;
            for name in self.names.clone() {
                if !self.api.contains_key(&name) {
                    continue;
                }
                self.restart(&name);
                for _ in 0..10 {
                    busy |= self.act(&name);
                }
            }
            if self.hitless {
                self.check_hitless();
            }
            if !busy && self.phase.is_terminal() {
                return;
            }
        }
        panic!("no quiescence: phase {:?}", self.phase);
    }

    fn check_final(&self) {
        assert!(self.phase.is_terminal());
        for (name, annotations) in &self.api {
            let agent = &self.agents[name];
            assert_eq!(agent.keys.next, None, "{name} keeps a next key");
            assert_eq!(agent.keys.previous, None, "{name} keeps an old key");
            let i = self.names.iter().position(|n| n == name).unwrap();
            let parsed = NodeAnnotations::parse(annotations, &[addr(i)]).unwrap();
            assert_eq!(
                parsed.public_key, agent.keys.current,
                "{name} publishes another key"
            );
            assert_eq!(parsed.next_public_key, None);
            let rotated = self.plan.is_rotating(name);
            let keeps_old = self.phase == RotationPhase::Failed
                && self
                    .failed_during
                    .is_none_or(|d| d.failure_keeps_old_keys());
            if rotated && !keeps_old {
                assert_eq!(Some(&agent.keys.current), self.new_keys.get(name), "{name}");
                assert_ne!(agent.keys.current, self.original[name]);
            } else {
                assert_eq!(
                    agent.keys.current, self.original[name],
                    "{name} changed its key"
                );
            }
        }
    }
}

fn apply_checked(keys: &mut LocalKeys, step: KeystoreStep, fresh: u32) {
    match step {
        KeystoreStep::GenerateNext => {
            assert!(keys.next.is_none(), "generate over a next key");
            let mut seed = [9u8; 32];
            // Not the first byte: clamping clears its low bits.
            seed[4..8].copy_from_slice(&fresh.to_le_bytes());
            keys.next = Some(PrivateKey::from_bytes(seed).public_key());
        }
        KeystoreStep::PromoteNext => {
            let next = keys.next.take().expect("promote without a next key");
            assert!(keys.previous.is_none(), "promote over an old identity");
            keys.previous = Some(keys.current);
            keys.current = next;
        }
        KeystoreStep::DiscardNext => keys.next = None,
        KeystoreStep::RestorePrevious => {
            keys.current = keys.previous.take().expect("restore without previous");
        }
        KeystoreStep::RetirePrevious => {
            assert!(keys.previous.take().is_some(), "retire without previous");
        }
    }
}

fn arb_cluster() -> impl Strategy<Value = (usize, Vec<usize>, u64)> {
    (2usize..=6).prop_flat_map(|n| {
        (
            Just(n),
            proptest::sample::subsequence((0..n).collect::<Vec<_>>(), 1..=n),
            any::<u64>().prop_map(|s| s | 1),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// No failures: every interleaving completes, and no handshake is ever refused.
    #[test]
    fn rotation_is_hitless_and_completes((n, rotating, seed) in arb_cluster()) {
        let mut c = Cluster::new(n, &rotating);
        c.run(&mut Rng(seed), 40_000, false);
        prop_assert_eq!(c.phase, RotationPhase::Complete);
        c.check_final();
    }

    /// Nodes removed at random moments leave the barriers; the rest stays hitless.
    #[test]
    fn rotation_survives_node_removal((n, rotating, seed) in arb_cluster()) {
        let mut c = Cluster::new(n, &rotating);
        c.run(&mut Rng(seed), 40_000, true);
        let rotating_left = c.plan.rotating().iter().any(|r| c.api.contains_key(r));
        if rotating_left {
            prop_assert_eq!(c.phase, RotationPhase::Complete);
        } else {
            prop_assert!(c.phase.is_terminal());
        }
        c.check_final();
    }

    /// Frozen agents, short timeouts and aborts: the rotation ends either way, and the keys end
    /// consistent: old keys after a failure before Retiring, new keys otherwise.
    #[test]
    fn failures_converge((n, rotating, seed) in arb_cluster(), timeout in 1u64..30, abort in proptest::option::of(0u64..60)) {
        let mut rng = Rng(seed);
        let mut c = Cluster::new(n, &rotating);
        c.hitless = false;
        c.timeout = timeout;
        c.abort_at = abort;
        for name in c.names.clone() {
            if rng.chance(40) {
                c.agents.get_mut(&name).unwrap().frozen_until = rng.next() % 80;
            }
        }
        c.run(&mut rng, 40_000, false);
        c.check_final();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A second rotation after one that completed or failed (frozen agents, short timeouts)
    /// starts clean, is hitless, and completes.
    #[test]
    fn consecutive_rotations((n, rotating, seed) in arb_cluster(), second in proptest::collection::vec(any::<bool>(), 6), timeout in 1u64..20) {
        let mut rng = Rng(seed);
        let mut c = Cluster::new(n, &rotating);
        c.hitless = false;
        c.timeout = timeout;
        for name in c.names.clone() {
            if rng.chance(30) {
                c.agents.get_mut(&name).unwrap().frozen_until = rng.next() % 40;
            }
        }
        c.run(&mut rng, 40_000, false);
        c.check_final();
        let mut picked: Vec<usize> = (0..n).filter(|i| second[*i]).collect();
        if picked.is_empty() {
            picked.push(0);
        }
        c.next_rotation("rot-sim-2", &picked);
        c.hitless = true;
        c.timeout = u64::MAX;
        c.run(&mut rng, 40_000, false);
        prop_assert_eq!(c.phase, RotationPhase::Complete);
        c.check_final();
    }
}

#[test]
fn a_frozen_node_fails_the_rotation_with_its_name() {
    let mut c = Cluster::new(3, &[0, 1]);
    c.hitless = false;
    c.timeout = 5;
    c.agents.get_mut("node-2").unwrap().frozen_until = u64::MAX;
    let mut rng = Rng(0x9e3779b97f4a7c15);
    c.controller_step();
    assert_eq!(c.phase, RotationPhase::Preparing);
    // The live nodes do everything they can; node-2 never answers.
    for _ in 0..3 {
        for who in ["node-0", "node-1"] {
            c.restart(who);
            while c.act(who) {}
        }
    }
    c.controller_cache = c.api.clone();
    c.controller_step();
    assert_eq!(c.phase, RotationPhase::Preparing);
    c.time += 6;
    c.controller_step();
    assert_eq!(c.phase, RotationPhase::Failed);
    assert_eq!(c.failed_during, Some(RotationPhase::Preparing));
    let failure = c.failure.clone().unwrap();
    assert_eq!(failure.stuck, ["node-2"]);
    assert_eq!(failure.reason, super::FailureReason::Timeout);
    c.run(&mut rng, 0, false);
    c.check_final();
}
