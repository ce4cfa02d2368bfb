//! The agent half of the rotation: the one next thing a node must do, derived from its keystore,
//! its own Node's annotations, the KeyRotation phase and its view of the peers.
//!
//! Drive it as a loop: call [`plan`]; if it returns a [`KeystoreStep`], apply it
//! ([`crate::Keystore::apply`]), reload the keystore and call `plan` again; if it returns
//! [`AgentAction::Publish`], patch the Node (setting the five owned annotations, removing the
//! absent ones) and wait for the next watch event. Because every step is derived from durable
//! state, an agent killed between any two steps resumes correctly.
//!
//! Call it only after the datapath has applied the peer set built from the same Node views:
//! marking `prepared` tells the cluster "I accept your next keys", which must already be true.

use std::{collections::BTreeMap, fmt, net::SocketAddr};

use super::{RotationPhase, RotationPlan};
use crate::{
    annotations::{
        ALL_ANNOTATIONS, ANNOTATION_KEY_GENERATION, ANNOTATION_NEXT_PUBLIC_KEY,
        ANNOTATION_PUBLIC_KEY, NodeAnnotations, RotationMark, RotationStep, parse_key,
        parse_key_generation,
    },
    keys::PublicKey,
    peers::{NodeView, PeerSet},
};

/// The public halves of the keys in this node's keystore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalKeys {
    /// `private.key`: the key the node initiates with.
    pub current: PublicKey,
    /// `next.key`: generated for a rotation, not switched to yet.
    pub next: Option<PublicKey>,
    /// `previous.key`: the key before the last switch, still answered until retired.
    pub previous: Option<PublicKey>,
}

/// The KeyRotation as this agent sees it.
#[derive(Debug, Clone, Copy)]
pub struct RotationView<'a> {
    /// The plan from its status.
    pub plan: &'a RotationPlan,
    /// Its `status.phase`.
    pub phase: RotationPhase,
    /// For a Failed rotation, the phase that failed (`None` if unknown: treated as a rollback).
    pub failed_during: Option<RotationPhase>,
}

/// What this agent sees of one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerObservation {
    /// The peer's announced next key (accepted by this node's datapath).
    pub next_public_key: Option<PublicKey>,
    /// The peer's step in the rotation being planned.
    pub step: Option<RotationStep>,
}

/// Everything [`plan`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct AgentInput<'a> {
    /// This node's name.
    pub node: &'a str,
    /// The endpoint this node should publish.
    pub endpoint: SocketAddr,
    /// This node's keystore.
    pub keys: &'a LocalKeys,
    /// This node's annotations as last seen from the API (the whole map; only owned keys count).
    pub own_annotations: &'a BTreeMap<String, String>,
    /// The active KeyRotation if there is one; otherwise the one this node's mark names, if it
    /// still exists; otherwise `None`. A Pending rotation counts as none.
    pub rotation: Option<RotationView<'a>>,
    /// The peers in this node's datapath (see [`observe_peers`]). Participants missing here
    /// (removed, or rejected by the peer set) do not hold this node back.
    pub peers: &'a BTreeMap<String, PeerObservation>,
}

/// A change to the keystore, applied by [`crate::Keystore::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeystoreStep {
    /// Generate K' and persist it as `next.key`.
    GenerateNext,
    /// Switch: `private.key` becomes `previous.key`, `next.key` becomes `private.key`. From here
    /// the node initiates with K' and still answers handshakes addressed to K.
    PromoteNext,
    /// Drop `next.key` (rotation failed, or a leftover).
    DiscardNext,
    /// Roll back a switch: `previous.key` becomes `private.key` again.
    RestorePrevious,
    /// Retire the old identity: delete `previous.key` and stop answering to it.
    RetirePrevious,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAction {
    /// Change the keystore, then plan again.
    Keystore(KeystoreStep),
    /// Make the Node's owned annotations exactly these.
    Publish(NodeAnnotations),
}

/// Why the node cannot make progress on its own (the controller's timeout will fail the rotation,
/// which rolls back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stall {
    /// The next key this node announced is no longer in its keystore.
    NextKeyLost,
    /// The rotation moved past Preparing without this node being prepared.
    MissedPrepare,
}

impl fmt::Display for Stall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NextKeyLost => "the announced next key is missing from the keystore",
            Self::MissedPrepare => "the rotation left Preparing before this node was prepared",
        })
    }
}

/// The outcome of [`plan`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentPlan {
    /// The next thing to do; `None` when the node is where it should be for now.
    pub action: Option<AgentAction>,
    /// Peers this node waits for before its next step, sorted (for logs and status).
    pub waiting_for: Vec<String>,
    /// Set when the node is stuck until the rotation fails.
    pub stall: Option<Stall>,
}

/// The peers of `peer_set` with their next keys and their step in `rotation`.
pub fn observe_peers(
    rotation: &str,
    peer_set: &PeerSet,
    nodes: &[NodeView],
) -> BTreeMap<String, PeerObservation> {
    let views: BTreeMap<&str, &NodeView> = nodes.iter().map(|v| (v.name.as_str(), v)).collect();
    peer_set
        .peers
        .iter()
        .map(|peer| {
            let step = views
                .get(peer.node.as_str())
                .and_then(|v| {
                    RotationMark::from_annotations(&v.annotations)
                        .ok()
                        .flatten()
                })
                .filter(|m| m.rotation == rotation)
                .map(|m| m.step);
            (
                peer.node.clone(),
                PeerObservation {
                    next_public_key: peer.next_public_key,
                    step,
                },
            )
        })
        .collect()
}

/// What this node has published, each annotation parsed on its own so one bad value does not
/// hide the rest.
struct Published {
    key: Option<PublicKey>,
    generation: Option<u64>,
    next: Option<PublicKey>,
    mark: Option<RotationMark>,
}

impl Published {
    fn read(annotations: &BTreeMap<String, String>) -> Self {
        let key = |a: &'static str| annotations.get(a).and_then(|v| parse_key(a, v).ok());
        Self {
            key: key(ANNOTATION_PUBLIC_KEY),
            next: key(ANNOTATION_NEXT_PUBLIC_KEY),
            generation: annotations
                .get(ANNOTATION_KEY_GENERATION)
                .and_then(|v| parse_key_generation(v).ok()),
            mark: RotationMark::from_annotations(annotations).ok().flatten(),
        }
    }
}

/// The next thing this node must do. Pure and cheap: call it on every change.
pub fn plan(input: &AgentInput<'_>) -> AgentPlan {
    let published = Published::read(input.own_annotations);
    let ctx = Ctx { input, published };
    let Some(view) = input
        .rotation
        .filter(|v| v.plan.is_participant(input.node) && v.phase != RotationPhase::Pending)
    else {
        return ctx.settle(ctx.published.mark.clone());
    };
    let mine = ctx.step_in(view.plan.name());
    if view.phase == RotationPhase::Failed || mine == Some(RotationStep::Aborted) {
        return ctx.failed(view, mine);
    }
    if view.plan.is_rotating(input.node) {
        ctx.rotating(view, mine)
    } else {
        ctx.observing(view, mine)
    }
}

struct Ctx<'a> {
    input: &'a AgentInput<'a>,
    published: Published,
}

impl Ctx<'_> {
    fn keys(&self) -> &LocalKeys {
        self.input.keys
    }

    fn step_in(&self, rotation: &str) -> Option<RotationStep> {
        self.published
            .mark
            .as_ref()
            .filter(|m| m.rotation == rotation)
            .map(|m| m.step)
    }

    fn mark(view: RotationView<'_>, step: RotationStep) -> Option<RotationMark> {
        Some(RotationMark::new(view.plan.name(), step))
    }

    /// The generation to publish with `keys.current`: unchanged for the same key, +1 for a new
    /// one, so generations only grow.
    fn generation(&self) -> u64 {
        match (self.published.key, self.published.generation) {
            (Some(key), Some(generation)) if key == self.keys().current => generation,
            (_, Some(generation)) => generation.saturating_add(1),
            (_, None) => 0,
        }
    }

    /// Publish the current key with `next` and `mark`, if that changes anything.
    fn publish(&self, next: Option<PublicKey>, mark: Option<RotationMark>) -> AgentPlan {
        let desired = NodeAnnotations {
            public_key: self.keys().current,
            endpoint: self.input.endpoint,
            key_generation: self.generation(),
            next_public_key: next,
            next_endpoint: None,
            rotation: mark,
        };
        let rendered = desired.render();
        let owned: BTreeMap<String, String> = self
            .input
            .own_annotations
            .iter()
            .filter(|(k, _)| ALL_ANNOTATIONS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        AgentPlan {
            action: (rendered != owned).then_some(AgentAction::Publish(desired)),
            ..AgentPlan::default()
        }
    }

    fn step(step: KeystoreStep) -> AgentPlan {
        AgentPlan {
            action: Some(AgentAction::Keystore(step)),
            ..AgentPlan::default()
        }
    }

    /// `previous.key` outside a switch of the current rotation: the published key wins. If K' was
    /// promoted but never published, undo it; if it was published, K is retired.
    fn settle_previous(&self) -> Option<AgentPlan> {
        let previous = self.keys().previous?;
        Some(Self::step(if self.published.key == Some(previous) {
            KeystoreStep::RestorePrevious
        } else {
            KeystoreStep::RetirePrevious
        }))
    }

    /// No rotation concerns this node: drop leftovers, publish the current key.
    fn settle(&self, mark: Option<RotationMark>) -> AgentPlan {
        if self.keys().next.is_some() {
            return Self::step(KeystoreStep::DiscardNext);
        }
        if let Some(plan) = self.settle_previous() {
            return plan;
        }
        self.publish(None, mark)
    }

    fn failed(&self, view: RotationView<'_>, mine: Option<RotationStep>) -> AgentPlan {
        let rollback = mine == Some(RotationStep::Aborted)
            || view
                .failed_during
                .is_none_or(|d| d.failure_keeps_old_keys());
        // A rotation that failed before it started (or after the switch) has nothing to undo.
        if !rollback || view.failed_during == Some(RotationPhase::Pending) {
            return self.settle(self.published.mark.clone());
        }
        if self.keys().next.is_some() {
            return Self::step(KeystoreStep::DiscardNext);
        }
        if let Some(previous) = self.keys().previous {
            let switched_here = mine.is_some_and(|s| s.reached(RotationStep::Switched));
            return Self::step(if switched_here || self.published.key == Some(previous) {
                KeystoreStep::RestorePrevious
            } else {
                KeystoreStep::RetirePrevious
            });
        }
        self.publish(None, Self::mark(view, RotationStep::Aborted))
    }

    /// Rotating peers (other than this node) that this node sees, with their observations.
    fn rotating_peers<'v>(
        &'v self,
        view: RotationView<'v>,
    ) -> impl Iterator<Item = (&'v String, &'v PeerObservation)> + 'v {
        view.plan
            .rotating()
            .iter()
            .filter(|n| n.as_str() != self.input.node)
            .filter_map(|n| self.input.peers.get(n).map(|o| (n, o)))
    }

    /// Rotating peers whose next key (or switch) this node has not seen yet.
    fn unseen_next_keys(&self, view: RotationView<'_>) -> Vec<String> {
        self.rotating_peers(view)
            .filter(|(_, o)| {
                o.next_public_key.is_none()
                    && !o.step.is_some_and(|s| s.reached(RotationStep::Switched))
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Rotating peers this node has not seen switch yet.
    fn unseen_switches(&self, view: RotationView<'_>) -> Vec<String> {
        self.rotating_peers(view)
            .filter(|(_, o)| !o.step.is_some_and(|s| s.reached(RotationStep::Switched)))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Participants (other than this node) this node has not seen retire yet.
    fn unseen_retirements(&self, view: RotationView<'_>) -> Vec<String> {
        view.plan
            .participants()
            .iter()
            .filter(|n| n.as_str() != self.input.node)
            .filter(|n| {
                self.input
                    .peers
                    .get(*n)
                    .is_some_and(|o| !o.step.is_some_and(|s| s.reached(RotationStep::Retired)))
            })
            .cloned()
            .collect()
    }

    fn waiting(mut plan: AgentPlan, waiting_for: Vec<String>) -> AgentPlan {
        plan.waiting_for = waiting_for;
        plan
    }

    fn stalled(mut plan: AgentPlan, stall: Stall) -> AgentPlan {
        plan.stall = Some(stall);
        plan
    }

    fn rotating(&self, view: RotationView<'_>, mine: Option<RotationStep>) -> AgentPlan {
        let keys = *self.keys();
        let phase = view.phase;
        match mine {
            None | Some(RotationStep::Prepared) if phase == RotationPhase::Preparing => {
                if let Some(plan) = self.settle_previous() {
                    return plan;
                }
                let Some(next) = keys.next else {
                    return Self::step(KeystoreStep::GenerateNext);
                };
                if self.published.next != Some(next) {
                    // Announce K' (withdrawing a claim made for a key that is gone).
                    return self.publish(Some(next), None);
                }
                let unseen = self.unseen_next_keys(view);
                let mark = if mine.is_some() || unseen.is_empty() {
                    Self::mark(view, RotationStep::Prepared)
                } else {
                    self.published.mark.clone()
                };
                Self::waiting(self.publish(Some(next), mark), unseen)
            }
            None if phase == RotationPhase::Complete => self.settle(self.published.mark.clone()),
            None => Self::stalled(
                self.publish(self.published.next, self.published.mark.clone()),
                Stall::MissedPrepare,
            ),
            Some(RotationStep::Prepared) => {
                // Switching or later: switch to the announced K'.
                let announced = self.published.next;
                match (keys.next, keys.previous) {
                    (Some(next), None) if announced == Some(next) => {
                        Self::step(KeystoreStep::PromoteNext)
                    }
                    // A leftover old identity blocks the promotion; the published key decides.
                    (Some(_), Some(_)) => self
                        .settle_previous()
                        .unwrap_or_else(|| Self::step(KeystoreStep::DiscardNext)),
                    (None, Some(_))
                        if announced == Some(keys.current)
                            || self.published.key == Some(keys.current) =>
                    {
                        self.publish(None, Self::mark(view, RotationStep::Switched))
                    }
                    _ => Self::stalled(
                        self.publish(announced, self.published.mark.clone()),
                        Stall::NextKeyLost,
                    ),
                }
            }
            Some(step) => {
                if keys.next.is_some() {
                    return Self::step(KeystoreStep::DiscardNext);
                }
                self.after_switch(view, step)
            }
        }
    }

    /// A node at `switched` or `retired` (rotating or not): mark `retired` once every rotating
    /// peer is seen switched, drop the old key once every participant is seen retired.
    fn after_switch(&self, view: RotationView<'_>, step: RotationStep) -> AgentPlan {
        let phase = view.phase;
        let retiring = matches!(phase, RotationPhase::Retiring | RotationPhase::Complete);
        if step == RotationStep::Retired {
            let unseen = if phase == RotationPhase::Complete {
                Vec::new()
            } else {
                self.unseen_retirements(view)
            };
            if self.keys().previous.is_some() && unseen.is_empty() {
                return Self::step(KeystoreStep::RetirePrevious);
            }
            return Self::waiting(
                self.publish(None, Self::mark(view, RotationStep::Retired)),
                if self.keys().previous.is_some() {
                    unseen
                } else {
                    Vec::new()
                },
            );
        }
        let unseen = if phase == RotationPhase::Complete {
            Vec::new()
        } else {
            self.unseen_switches(view)
        };
        let mark = if retiring && unseen.is_empty() {
            RotationStep::Retired
        } else {
            RotationStep::Switched
        };
        Self::waiting(
            self.publish(None, Self::mark(view, mark)),
            if retiring { unseen } else { Vec::new() },
        )
    }

    fn observing(&self, view: RotationView<'_>, mine: Option<RotationStep>) -> AgentPlan {
        if self.keys().next.is_some() {
            return Self::step(KeystoreStep::DiscardNext);
        }
        if let Some(plan) = self.settle_previous() {
            return plan;
        }
        let phase = view.phase;
        match mine {
            None if phase == RotationPhase::Preparing => {
                let unseen = self.unseen_next_keys(view);
                let mark = if unseen.is_empty() {
                    Self::mark(view, RotationStep::Prepared)
                } else {
                    self.published.mark.clone()
                };
                Self::waiting(self.publish(None, mark), unseen)
            }
            None if phase == RotationPhase::Complete => self.settle(self.published.mark.clone()),
            None => Self::stalled(
                self.publish(None, self.published.mark.clone()),
                Stall::MissedPrepare,
            ),
            Some(RotationStep::Prepared) if phase == RotationPhase::Preparing => {
                self.publish(None, Self::mark(view, RotationStep::Prepared))
            }
            Some(RotationStep::Prepared) => {
                self.publish(None, Self::mark(view, RotationStep::Switched))
            }
            Some(step) => self.after_switch(view, step),
        }
    }
}
