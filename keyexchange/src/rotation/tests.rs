//! Unit tests of the rotation halves: every controller transition and every agent branch,
//! including resume from each crash window. The randomized whole-cluster run is in
//! `simulation.rs`.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use super::{
    agent::{self, *},
    controller::{self, *},
    *,
};
use crate::{
    annotations::{NodeAnnotations, RotationMark, RotationStep},
    keys::{PrivateKey, PublicKey},
    peers::{NodeView, desired_peers},
};

use RotationStep::{Aborted, Prepared, Retired, Switched};

fn key(seed: u8) -> PublicKey {
    PrivateKey::from_bytes([seed; 32]).public_key()
}

fn plan3() -> RotationPlan {
    // a, b rotate; c only takes part.
    RotationPlan::new("rot-1", ["a", "b", "c"], ["a", "b", "z"]).unwrap()
}

// ---------------- plan and phase ----------------

#[test]
fn plan_keeps_only_joined_selected_nodes() {
    let plan = plan3();
    assert_eq!(plan.name(), "rot-1");
    assert_eq!(plan.participants().len(), 3);
    assert_eq!(plan.rotating().iter().collect::<Vec<_>>(), ["a", "b"]);
    assert!(plan.is_rotating("a") && !plan.is_rotating("c") && !plan.is_rotating("z"));
    assert!(plan.is_participant("c") && !plan.is_participant("z"));
}

#[test]
fn plan_rejects_a_bad_name() {
    for name in ["", "Upper", "a_b", "-x"] {
        assert!(matches!(
            RotationPlan::new(name, ["a"], ["a"]),
            Err(RotationError::InvalidName(_))
        ));
    }
}

#[test]
fn phases_round_trip_their_names() {
    for phase in RotationPhase::ALL {
        assert_eq!(phase.as_str().parse::<RotationPhase>(), Ok(phase));
        assert_eq!(phase.to_string(), phase.as_str());
    }
    assert!("Done".parse::<RotationPhase>().is_err());
    assert_eq!(
        RotationPhase::ALL.iter().filter(|p| p.is_active()).count(),
        3
    );
    assert!(RotationPhase::Complete.is_terminal() && RotationPhase::Failed.is_terminal());
    assert!(!RotationPhase::Retiring.failure_keeps_old_keys());
    assert!(RotationPhase::Switching.failure_keeps_old_keys());
}

// ---------------- controller ----------------

struct Ctl {
    plan: RotationPlan,
    marks: BTreeMap<String, Option<RotationStep>>,
    phase: RotationPhase,
    elapsed: Duration,
    abort: bool,
    blocked: bool,
}

impl Ctl {
    fn new(phase: RotationPhase) -> Self {
        Self {
            plan: plan3(),
            marks: ["a", "b", "c", "late-joiner"]
                .into_iter()
                .map(|n| (n.to_string(), None))
                .collect(),
            phase,
            elapsed: Duration::from_secs(1),
            abort: false,
            blocked: false,
        }
    }

    fn mark(mut self, node: &str, step: RotationStep) -> Self {
        self.marks.insert(node.into(), Some(step));
        self
    }

    fn all(mut self, step: RotationStep) -> Self {
        for n in ["a", "b", "c"] {
            self.marks.insert(n.into(), Some(step));
        }
        self
    }

    fn eval(&self) -> ControllerOutcome {
        controller::evaluate(&ControllerInput {
            plan: &self.plan,
            phase: self.phase,
            elapsed_in_phase: self.elapsed,
            phase_timeout: Duration::from_secs(300),
            abort_requested: self.abort,
            another_rotation_active: self.blocked,
            marks: &self.marks,
        })
    }
}

#[test]
fn pending_starts_preparing_unless_another_rotation_runs() {
    let mut c = Ctl::new(RotationPhase::Pending);
    let out = c.eval();
    assert_eq!(out.phase, RotationPhase::Preparing);
    assert!(out.changed);
    assert_eq!(out.waiting_on, ["a", "b", "c"]);
    c.blocked = true;
    c.elapsed = Duration::from_secs(100_000);
    let out = c.eval();
    assert_eq!(out.phase, RotationPhase::Pending);
    assert!(!out.changed && out.failure.is_none());
}

#[test]
fn pending_with_no_rotating_node_fails() {
    let mut c = Ctl::new(RotationPhase::Pending);
    c.plan = RotationPlan::new("r", ["a", "b"], ["nobody"]).unwrap();
    let out = c.eval();
    assert_eq!(out.phase, RotationPhase::Failed);
    let f = out.failure.unwrap();
    assert_eq!(
        (f.during, f.reason),
        (RotationPhase::Pending, FailureReason::NoNodes)
    );
    assert_eq!(f.reason.as_str(), "NoNodesToRotate");
}

#[test]
fn each_phase_advances_when_every_participant_reaches_its_step() {
    for (phase, step, next) in [
        (RotationPhase::Preparing, Prepared, RotationPhase::Switching),
        (RotationPhase::Switching, Switched, RotationPhase::Retiring),
        (RotationPhase::Retiring, Retired, RotationPhase::Complete),
    ] {
        // All but one: stays.
        let c = Ctl::new(phase).mark("a", step).mark("b", step);
        let out = c.eval();
        assert_eq!(out.phase, phase);
        assert_eq!(out.waiting_on, ["c"]);
        assert!(!out.changed);
        // All: advances exactly one phase (the next step is not there yet).
        let out = c.mark("c", step).eval();
        assert_eq!(out.phase, next, "{phase}");
        assert!(out.changed && out.failure.is_none());
    }
}

#[test]
fn restarted_controller_catches_up_several_phases() {
    let out = Ctl::new(RotationPhase::Preparing).all(Retired).eval();
    assert_eq!(out.phase, RotationPhase::Complete);
    assert_eq!(out.counts.retired, 3);
    assert!(out.waiting_on.is_empty());
    let out = Ctl::new(RotationPhase::Pending).all(Switched).eval();
    assert_eq!(out.phase, RotationPhase::Retiring);
    assert_eq!(out.waiting_on, ["a", "b", "c"]);
}

#[test]
fn timeout_fails_naming_the_stuck_nodes() {
    for phase in [
        RotationPhase::Preparing,
        RotationPhase::Switching,
        RotationPhase::Retiring,
    ] {
        let target = phase.target_step().unwrap();
        let mut c = Ctl::new(phase).mark("b", target).mark("a", Prepared);
        c.elapsed = Duration::from_secs(300);
        assert_eq!(c.eval().phase, phase, "exactly the timeout is not late");
        c.elapsed = Duration::from_secs(301);
        let out = c.eval();
        assert_eq!(out.phase, RotationPhase::Failed);
        let f = out.failure.unwrap();
        assert_eq!(f.during, phase);
        assert_eq!(f.reason, FailureReason::Timeout);
        let mut stuck = vec!["c".to_string()];
        if target != Prepared {
            stuck.insert(0, "a".into());
        }
        assert_eq!(f.stuck, stuck);
        assert_eq!(f.keeps_old_keys(), phase != RotationPhase::Retiring);
        let message = f.message(Duration::from_secs(300));
        assert!(
            message.contains("within 300s") && message.contains(" c"),
            "{message}"
        );
    }
}

#[test]
fn progress_beats_a_late_evaluation() {
    let mut c = Ctl::new(RotationPhase::Preparing).all(Prepared);
    c.elapsed = Duration::from_secs(10_000);
    assert_eq!(c.eval().phase, RotationPhase::Switching);
}

#[test]
fn abort_fails_in_every_non_terminal_phase() {
    for phase in [
        RotationPhase::Pending,
        RotationPhase::Preparing,
        RotationPhase::Switching,
        RotationPhase::Retiring,
    ] {
        let mut c = Ctl::new(phase).all(Prepared);
        c.abort = true;
        let out = c.eval();
        assert_eq!(out.phase, RotationPhase::Failed);
        let f = out.failure.unwrap();
        assert_eq!((f.during, f.reason), (phase, FailureReason::Aborted));
        assert!(f.message(Duration::ZERO).contains("aborted during"));
    }
}

#[test]
fn terminal_phases_stay() {
    for phase in [RotationPhase::Complete, RotationPhase::Failed] {
        let mut c = Ctl::new(phase);
        c.abort = true;
        c.elapsed = Duration::MAX;
        let out = c.eval();
        assert_eq!(out.phase, phase);
        assert!(!out.changed && out.failure.is_none() && out.waiting_on.is_empty());
    }
}

#[test]
fn removed_nodes_leave_every_barrier() {
    let mut c = Ctl::new(RotationPhase::Switching)
        .mark("a", Switched)
        .mark("b", Switched);
    c.marks.remove("c");
    let out = c.eval();
    assert_eq!(out.phase, RotationPhase::Retiring);
    assert_eq!(out.removed, ["c"]);
    assert_eq!(out.counts.total, 2);
}

#[test]
fn removing_every_rotating_node_fails_the_rotation() {
    let mut c = Ctl::new(RotationPhase::Preparing).mark("c", Prepared);
    c.marks.remove("a");
    c.marks.remove("b");
    let out = c.eval();
    assert_eq!(out.phase, RotationPhase::Failed);
    assert_eq!(out.failure.unwrap().reason, FailureReason::NoNodes);
    assert_eq!(out.removed, ["a", "b"]);
}

#[test]
fn marks_of_other_nodes_and_aborts_are_counted_right() {
    let c = Ctl::new(RotationPhase::Retiring)
        .mark("a", Retired)
        .mark("b", Switched)
        .mark("c", Aborted)
        .mark("late-joiner", Retired);
    let out = c.eval();
    assert_eq!(
        out.counts,
        PhaseCounts {
            total: 3,
            rotating: 2,
            prepared: 2,
            switched: 2,
            retired: 1,
            aborted: 1
        }
    );
    assert_eq!(out.counts.done(RotationPhase::Retiring), 1);
    assert_eq!(out.counts.done(RotationPhase::Switching), 2);
    assert_eq!(out.counts.done(RotationPhase::Failed), 1);
    assert_eq!(out.waiting_on, ["b", "c"]);
}

#[test]
fn failure_message_names_at_most_ten_nodes() {
    let f = Failure {
        during: RotationPhase::Preparing,
        reason: FailureReason::Timeout,
        stuck: (0..25).map(|i| format!("node-{i:02}")).collect(),
    };
    let m = f.message(Duration::from_secs(60));
    assert!(m.contains("node-09") && !m.contains("node-10"), "{m}");
    assert!(
        m.contains("and 15 more") && m.ends_with("old keys stay in force"),
        "{m}"
    );
    let f = Failure {
        during: RotationPhase::Retiring,
        reason: FailureReason::NoNodes,
        stuck: vec![],
    };
    assert!(
        f.message(Duration::ZERO)
            .ends_with("new keys stay in force")
    );
}

// ---------------- agent ----------------

const EP: &str = "192.168.0.1:51871";

/// Builds an agent input around node "a" of `plan3`.
struct Agent {
    node: &'static str,
    keys: LocalKeys,
    own: BTreeMap<String, String>,
    plan: RotationPlan,
    phase: Option<RotationPhase>,
    failed_during: Option<RotationPhase>,
    peers: BTreeMap<String, PeerObservation>,
}

impl Agent {
    fn new(node: &'static str) -> Self {
        let k = key(1);
        Self {
            node,
            keys: local_keys(k, None, None),
            own: published(k, 4, None, None),
            plan: plan3(),
            phase: Some(RotationPhase::Preparing),
            failed_during: None,
            peers: ["a", "b", "c"]
                .into_iter()
                .filter(|n| *n != node)
                .map(|n| (n.to_string(), PeerObservation::default()))
                .collect(),
        }
    }

    fn plan(&self) -> AgentPlan {
        agent::plan(&AgentInput {
            node: self.node,
            endpoint: EP.parse().unwrap(),
            keys: &self.keys,
            own_annotations: &self.own,
            rotation: self.phase.map(|phase| RotationView {
                plan: &self.plan,
                phase,
                failed_during: self.failed_during,
            }),
            peers: &self.peers,
        })
    }

    fn action(&self) -> Option<AgentAction> {
        self.plan().action
    }

    fn publishes(&self) -> NodeAnnotations {
        match self.action() {
            Some(AgentAction::Publish(n)) => n,
            other => panic!("want a publish, got {other:?}"),
        }
    }

    fn peer(mut self, node: &str, next: Option<PublicKey>, step: Option<RotationStep>) -> Self {
        self.peers.insert(
            node.into(),
            PeerObservation {
                next_public_key: next,
                step,
            },
        );
        self
    }

    /// Applies the plan's action to the model (keystore steps with fresh keys).
    fn step(&mut self, fresh: u8) -> Option<AgentAction> {
        let action = self.action()?;
        match &action {
            AgentAction::Keystore(step) => apply(&mut self.keys, *step, fresh),
            AgentAction::Publish(n) => {
                self.own = n.render();
            }
        }
        Some(action)
    }
}

fn published(
    k: PublicKey,
    generation: u64,
    next: Option<PublicKey>,
    mark: Option<RotationMark>,
) -> BTreeMap<String, String> {
    NodeAnnotations {
        public_key: k,
        endpoint: EP.parse::<SocketAddr>().unwrap(),
        key_generation: generation,
        next_public_key: next,
        next_endpoint: None,
        rotation: mark,
    }
    .render()
}

/// The local key slots, in the field order of [`LocalKeys`].
fn local_keys(
    current: PublicKey,
    next: Option<PublicKey>,
    previous: Option<PublicKey>,
) -> LocalKeys {
    LocalKeys {
        current,
        next,
        previous,
    }
}

/// The keys of a rotating node right after `PromoteNext`: current K' (key 2), previous K (key 1).
fn promoted_keys() -> LocalKeys {
    local_keys(key(2), None, Some(key(1)))
}

/// Rotating node "a" after its switch: [`promoted_keys`], K' published with generation 5 and
/// the mark `published_step`, rotation in `phase`.
fn switched_agent(published_step: RotationStep, phase: RotationPhase) -> Agent {
    let mut a = Agent::new("a");
    a.keys = promoted_keys();
    a.own = published(key(2), 5, None, mark(published_step));
    a.phase = Some(phase);
    a
}

fn mark(step: RotationStep) -> Option<RotationMark> {
    Some(RotationMark::new("rot-1", step))
}

/// The keystore semantics, on public keys.
pub(super) fn apply(keys: &mut LocalKeys, step: KeystoreStep, fresh: u8) {
    match step {
        KeystoreStep::GenerateNext => {
            keys.next.get_or_insert(key(fresh));
        }
        KeystoreStep::PromoteNext => {
            let next = keys.next.take().expect("promote without next");
            assert!(keys.previous.is_none(), "promote over an old identity");
            keys.previous = Some(keys.current);
            keys.current = next;
        }
        KeystoreStep::DiscardNext => keys.next = None,
        KeystoreStep::RestorePrevious => {
            keys.current = keys.previous.take().expect("restore without previous");
        }
        KeystoreStep::RetirePrevious => keys.previous = None,
    }
}

fn ks(step: KeystoreStep) -> Option<AgentAction> {
    Some(AgentAction::Keystore(step))
}

#[test]
fn idle_node_publishes_its_key_once() {
    let mut a = Agent::new("a");
    a.phase = None;
    a.own.clear();
    let n = a.publishes();
    assert_eq!(n.public_key, key(1));
    assert_eq!(n.key_generation, 0);
    assert_eq!(n.endpoint, EP.parse().unwrap());
    a.own = n.render();
    assert_eq!(a.action(), None);
    // Foreign annotations do not matter.
    a.own.insert("example.com/x".into(), "y".into());
    assert_eq!(a.action(), None);
}

#[test]
fn endpoint_change_is_republished_with_the_same_generation() {
    let mut a = Agent::new("a");
    a.phase = None;
    a.own
        .insert(ANNOTATION_ENDPOINT_KEY.into(), "192.168.0.1:1".into());
    let n = a.publishes();
    assert_eq!(n.endpoint, EP.parse().unwrap());
    assert_eq!(n.key_generation, 4);
}

const ANNOTATION_ENDPOINT_KEY: &str = crate::annotations::ANNOTATION_ENDPOINT;

#[test]
fn a_new_key_bumps_the_generation() {
    // e.g. after --regenerate-key
    let mut a = Agent::new("a");
    a.phase = None;
    a.keys.current = key(9);
    let n = a.publishes();
    assert_eq!((n.public_key, n.key_generation), (key(9), 5));
}

#[test]
fn corrupt_own_annotations_are_repaired() {
    let mut a = Agent::new("a");
    a.phase = None;
    a.own.insert(
        crate::annotations::ANNOTATION_KEY_GENERATION.into(),
        "x".into(),
    );
    let n = a.publishes();
    assert_eq!(n.key_generation, 0);
}

#[test]
fn rotating_node_generates_announces_then_waits_for_peers() {
    let mut a = Agent::new("a");
    assert_eq!(a.step(2), ks(KeystoreStep::GenerateNext));
    assert_eq!(a.keys.next, Some(key(2)));
    let n = a.publishes();
    assert_eq!(n.next_public_key, Some(key(2)));
    assert_eq!(n.rotation, None);
    assert_eq!(n.key_generation, 4);
    a.step(0);
    // b (rotating) has not announced: wait for it, c does not matter.
    let p = a.plan();
    assert_eq!(p.action, None);
    assert_eq!(p.waiting_for, ["b"]);
    let a = a.peer("b", Some(key(3)), None);
    let n = a.publishes();
    assert_eq!(n.rotation, mark(Prepared));
    assert_eq!(n.next_public_key, Some(key(2)));
}

#[test]
fn peer_already_switched_counts_as_seen() {
    let mut a = Agent::new("a").peer("b", None, Some(Switched));
    a.step(2);
    a.step(0);
    assert_eq!(a.publishes().rotation, mark(Prepared));
}

#[test]
fn missing_or_rejected_peers_do_not_block() {
    let mut a = Agent::new("a");
    a.peers.clear();
    a.step(2);
    a.step(0);
    assert_eq!(a.publishes().rotation, mark(Prepared));
}

#[test]
fn prepared_node_does_nothing_more_in_preparing() {
    let mut a = Agent::new("a").peer("b", Some(key(3)), None);
    while a.step(2).is_some() {}
    assert_eq!(a.own, published(key(1), 4, Some(key(2)), mark(Prepared)));
    assert_eq!(a.plan(), AgentPlan::default());
}

#[test]
fn rotating_node_switches_in_one_patch_after_promoting() {
    let mut a = Agent::new("a").peer("b", Some(key(3)), None);
    while a.step(2).is_some() {}
    a.phase = Some(RotationPhase::Switching);
    assert_eq!(a.step(0), ks(KeystoreStep::PromoteNext));
    assert_eq!(a.keys, promoted_keys());
    let n = a.publishes();
    assert_eq!(n.public_key, key(2));
    assert_eq!(n.key_generation, 5);
    assert_eq!(n.next_public_key, None);
    assert_eq!(n.rotation, mark(Switched));
    a.step(0);
    assert_eq!(a.action(), None);
}

#[test]
fn rotating_node_retires_after_seeing_switches_then_drops_its_old_key_last() {
    let a = switched_agent(Switched, RotationPhase::Retiring)
        .peer("b", None, Some(Prepared))
        .peer("c", None, Some(Switched));
    let p = a.plan();
    assert_eq!(p.action, None);
    assert_eq!(p.waiting_for, ["b"]);
    let mut a = a.peer("b", None, Some(Switched));
    assert_eq!(a.publishes().rotation, mark(Retired));
    a.step(0);
    // Keeps answering to K until every participant is seen retired.
    let p = a.plan();
    assert_eq!(p.action, None);
    assert_eq!(p.waiting_for, ["b", "c"]);
    let mut a = a
        .peer("b", None, Some(Retired))
        .peer("c", None, Some(Retired));
    assert_eq!(a.step(0), ks(KeystoreStep::RetirePrevious));
    assert_eq!(a.plan(), AgentPlan::default());
}

#[test]
fn complete_drops_the_old_key_without_waiting() {
    let mut a = switched_agent(Retired, RotationPhase::Complete);
    assert_eq!(a.step(0), ks(KeystoreStep::RetirePrevious));
    assert_eq!(a.action(), None);
}

#[test]
fn observer_marks_each_step() {
    let mut c = Agent::new("c");
    // Waits for both rotating nodes' next keys.
    let p = c.plan();
    assert_eq!(
        (p.action, p.waiting_for),
        (None, vec!["a".into(), "b".into()])
    );
    c = c
        .peer("a", Some(key(2)), None)
        .peer("b", Some(key(3)), None);
    assert_eq!(c.publishes().rotation, mark(Prepared));
    c.step(0);
    assert_eq!(c.action(), None);
    c.phase = Some(RotationPhase::Switching);
    assert_eq!(c.publishes().rotation, mark(Switched));
    c.step(0);
    assert_eq!(c.action(), None);
    c.phase = Some(RotationPhase::Retiring);
    c = c.peer("a", None, Some(Switched));
    assert_eq!(c.plan().waiting_for, ["b"]);
    c = c.peer("b", None, Some(Retired));
    assert_eq!(c.publishes().rotation, mark(Retired));
    c.step(0);
    assert_eq!(c.plan(), AgentPlan::default());
    // The observer never touched its key.
    assert_eq!(c.own, published(key(1), 4, None, mark(Retired)));
}

#[test]
fn observer_discards_a_stray_next_key() {
    let mut c = Agent::new("c");
    c.keys.next = Some(key(8));
    assert_eq!(c.action(), ks(KeystoreStep::DiscardNext));
}

#[test]
fn non_participant_only_settles() {
    let mut z = Agent::new("zz");
    assert_eq!(z.action(), None);
    z.keys.next = Some(key(8));
    assert_eq!(z.action(), ks(KeystoreStep::DiscardNext));
}

#[test]
fn pending_rotation_is_ignored() {
    let mut a = Agent::new("a");
    a.phase = Some(RotationPhase::Pending);
    assert_eq!(a.action(), None);
}

#[test]
fn failure_before_retiring_rolls_back_from_every_step() {
    // (keys, published) at each point a rotating node can be when the rotation fails.
    let k = key(1);
    let k2 = key(2);
    let cases = [
        (local_keys(k, None, None), published(k, 4, None, None)),
        (local_keys(k, Some(k2), None), published(k, 4, None, None)),
        (
            local_keys(k, Some(k2), None),
            published(k, 4, Some(k2), None),
        ),
        (
            local_keys(k, Some(k2), None),
            published(k, 4, Some(k2), mark(Prepared)),
        ),
        (
            local_keys(k2, None, Some(k)),
            published(k, 4, Some(k2), mark(Prepared)),
        ),
        (
            local_keys(k2, None, Some(k)),
            published(k2, 5, None, mark(Switched)),
        ),
        (
            local_keys(k, None, None),
            published(k2, 5, None, mark(Switched)),
        ),
    ];
    for during in [RotationPhase::Preparing, RotationPhase::Switching] {
        for (keys, own) in &cases {
            let mut a = Agent::new("a");
            a.keys = *keys;
            a.own = own.clone();
            a.phase = Some(RotationPhase::Failed);
            a.failed_during = Some(during);
            let mut steps = 0;
            while a.step(0).is_some() {
                steps += 1;
                assert!(steps < 10, "no progress from {keys:?}");
            }
            assert_eq!(a.keys, local_keys(k, None, None), "{during} from {keys:?}");
            let n =
                NodeAnnotations::parse(&a.own, &[EP.parse::<SocketAddr>().unwrap().ip()]).unwrap();
            assert_eq!(n.public_key, k);
            assert_eq!(n.next_public_key, None);
            assert_eq!(n.rotation, mark(Aborted));
            // Generations never go back.
            let before =
                NodeAnnotations::parse(own, &[EP.parse::<SocketAddr>().unwrap().ip()]).unwrap();
            assert!(n.key_generation >= before.key_generation);
            if before.public_key != k {
                assert_eq!(n.key_generation, before.key_generation + 1);
            }
        }
    }
}

#[test]
fn failure_in_retiring_keeps_the_new_key() {
    let mut a = switched_agent(Switched, RotationPhase::Failed);
    a.failed_during = Some(RotationPhase::Retiring);
    assert_eq!(a.step(0), ks(KeystoreStep::RetirePrevious));
    assert_eq!(a.action(), None);
    assert_eq!(a.keys.current, key(2));
    assert_eq!(a.own, published(key(2), 5, None, mark(Switched)));
}

#[test]
fn unknown_failure_phase_is_treated_as_rollback() {
    let mut a = Agent::new("a");
    a.keys.next = Some(key(2));
    a.phase = Some(RotationPhase::Failed);
    assert_eq!(a.step(0), ks(KeystoreStep::DiscardNext));
    assert_eq!(a.publishes().rotation, mark(Aborted));
}

#[test]
fn failure_during_pending_touches_nothing() {
    let mut a = Agent::new("a");
    a.phase = Some(RotationPhase::Failed);
    a.failed_during = Some(RotationPhase::Pending);
    assert_eq!(a.action(), None);
}

#[test]
fn aborted_mark_wins_over_a_stale_active_phase() {
    let mut a = Agent::new("a");
    a.own = published(key(1), 6, None, mark(Aborted));
    a.phase = Some(RotationPhase::Switching);
    assert_eq!(a.action(), None);
}

#[test]
fn observer_acknowledges_a_failure() {
    let mut c = Agent::new("c");
    c.own = published(key(1), 4, None, mark(Prepared));
    c.phase = Some(RotationPhase::Failed);
    c.failed_during = Some(RotationPhase::Switching);
    assert_eq!(c.publishes().rotation, mark(Aborted));
}

#[test]
fn resume_after_crash_between_promote_and_publish() {
    let mut a = Agent::new("a");
    a.keys = promoted_keys();
    a.own = published(key(1), 4, Some(key(2)), mark(Prepared));
    a.phase = Some(RotationPhase::Switching);
    let n = a.publishes();
    assert_eq!(
        (n.public_key, n.key_generation, n.rotation),
        (key(2), 5, mark(Switched))
    );
}

#[test]
fn resume_after_crash_between_generate_and_announce() {
    let mut a = Agent::new("a");
    a.keys.next = Some(key(2));
    assert_eq!(a.publishes().next_public_key, Some(key(2)));
}

#[test]
fn a_lost_next_key_is_regenerated_while_preparing_and_the_claim_withdrawn() {
    let mut a = Agent::new("a").peer("b", Some(key(3)), None);
    a.own = published(key(1), 4, Some(key(2)), mark(Prepared));
    assert_eq!(a.step(7), ks(KeystoreStep::GenerateNext));
    let n = a.publishes();
    assert_eq!((n.next_public_key, n.rotation), (Some(key(7)), None));
    a.step(0);
    assert_eq!(a.publishes().rotation, mark(Prepared));
}

#[test]
fn a_lost_next_key_after_preparing_stalls_until_failure() {
    let mut a = Agent::new("a");
    a.own = published(key(1), 4, Some(key(2)), mark(Prepared));
    a.phase = Some(RotationPhase::Switching);
    let p = a.plan();
    assert_eq!(p.action, None);
    assert_eq!(p.stall, Some(Stall::NextKeyLost));
    assert!(Stall::NextKeyLost.to_string().contains("missing"));
    // A different next key than the announced one is not switched to either.
    a.keys.next = Some(key(9));
    assert_eq!(a.plan().stall, Some(Stall::NextKeyLost));
}

#[test]
fn a_node_that_missed_preparing_does_not_switch() {
    for node in ["a", "c"] {
        let mut x = Agent::new(node);
        x.phase = Some(RotationPhase::Switching);
        let p = x.plan();
        assert_eq!(p.action, None, "{node}");
        assert_eq!(p.stall, Some(Stall::MissedPrepare));
        x.phase = Some(RotationPhase::Complete);
        assert_eq!(x.plan(), AgentPlan::default());
    }
}

#[test]
fn leftover_old_identity_is_settled_before_a_new_rotation() {
    // previous.key from an earlier rotation whose K' was published: retire it.
    let mut a = Agent::new("a");
    a.keys.previous = Some(key(0));
    assert_eq!(a.action(), ks(KeystoreStep::RetirePrevious));
    // K' promoted but never published: undo.
    let mut a = Agent::new("a");
    a.keys = promoted_keys();
    a.phase = None;
    assert_eq!(a.action(), ks(KeystoreStep::RestorePrevious));
}

#[test]
fn stray_next_key_beside_a_promotion_is_settled_first() {
    let mut a = Agent::new("a");
    a.keys = local_keys(key(1), Some(key(2)), Some(key(0)));
    a.own = published(key(1), 4, Some(key(2)), mark(Prepared));
    a.phase = Some(RotationPhase::Switching);
    assert_eq!(a.step(0), ks(KeystoreStep::RetirePrevious));
    assert_eq!(a.step(0), ks(KeystoreStep::PromoteNext));
}

#[test]
fn the_mark_of_an_older_rotation_is_replaced() {
    let mut a = Agent::new("a");
    a.own = published(key(1), 4, None, Some(RotationMark::new("rot-0", Retired)));
    a.step(2);
    let n = a.publishes();
    assert_eq!(n.rotation, None);
    assert_eq!(n.next_public_key, Some(key(2)));
}

#[test]
fn observe_peers_reads_next_keys_and_marks_of_accepted_peers() {
    let view = |i: u8, next: Option<PublicKey>, m: Option<RotationMark>| {
        let addr = std::net::IpAddr::from([192, 168, 0, i]);
        NodeView {
            name: format!("n{i}"),
            annotations: NodeAnnotations {
                public_key: key(i),
                endpoint: SocketAddr::new(addr, 51871),
                key_generation: 0,
                next_public_key: next,
                next_endpoint: None,
                rotation: m,
            }
            .render(),
            addresses: vec![addr],
            ..NodeView::default()
        }
    };
    let nodes = [
        view(1, None, None),
        view(2, Some(key(20)), mark(Prepared)),
        view(3, None, Some(RotationMark::new("other", Retired))),
    ];
    let set = desired_peers("n1", &nodes);
    let seen = observe_peers("rot-1", &set, &nodes);
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen["n2"],
        PeerObservation {
            next_public_key: Some(key(20)),
            step: Some(Prepared)
        }
    );
    assert_eq!(seen["n3"], PeerObservation::default());
}
