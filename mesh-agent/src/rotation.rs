//! The agent side of key rotation (docs/rotation.md, "two worlds, two devices"), as pure
//! decisions the reconciler applies on every pass:
//!
//! - [`mode`]: where this node stands — at rest (one world), a participant of an active rotation
//!   (two worlds: the current one on the published slot, the next one on the other slot), past
//!   the end of a completed rotation (moving into its next world in this pass), or rolled back
//!   after a failure before the switch.
//! - [`keystore_step`]: the keystore change the mode needs (generate K' in Preparing, promote it
//!   at Complete, discard it after a rollback).
//! - [`own_rotation_annotations`]: what this node publishes beyond its identity (`next-public-key`,
//!   `next-endpoint`, its mark) and on which slot its current world is.
//! - [`current_identity`] / [`next_identity`]: under which key and endpoint a peer is configured
//!   on the device of each world.
//! - [`next_step`]: when the mark moves (`prepared` once the next world holds every participant,
//!   `switched` once every participant is sent to through the next world, `retired` once every
//!   participant switched).
//!
//! Everything is derived from durable state (the keystore, the Node annotations, the KeyRotation
//! status, the devices and routes), so an agent restarted at any step continues.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use wiremesh_crds::KeyRotation;
use wiremesh_keyexchange::{
    DesiredPeer, PublicKey,
    annotations::{
        ANNOTATION_ENDPOINT, ANNOTATION_NEXT_ENDPOINT, ANNOTATION_NEXT_PUBLIC_KEY, RotationMark,
        RotationStep,
    },
    rotation::{RotationPhase, agent::KeystoreStep},
};

#[cfg(test)]
mod tests;

/// How long after its last handshake a peer's session on the next world counts as up (a
/// WireGuard session lives 180 s; persistent keepalive renews it).
pub const FRESH_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(170);

/// One of the two tunnel slots of a node: a = `--interface` on the listen port, b =
/// `--interface-b` on the listen port + 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// 0 for a, 1 for b (index into per-slot arrays).
    pub fn index(self) -> usize {
        match self {
            Self::A => 0,
            Self::B => 1,
        }
    }

    /// The other slot.
    pub fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }

    /// The slot's UDP port for the mesh's listen port `base`.
    pub fn port(self, base: u16) -> u16 {
        match self {
            Self::A => base,
            Self::B => base.wrapping_add(1),
        }
    }

    /// The slot whose port an endpoint names (anything but base + 1 is slot a).
    pub fn of_port(port: u16, base: u16) -> Self {
        if port == base.wrapping_add(1) {
            Self::B
        } else {
            Self::A
        }
    }
}

/// A KeyRotation whose plan is frozen, as the agents need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationView {
    /// `status.rotationId`: the name in every mark.
    pub id: String,
    pub phase: RotationPhase,
    pub participants: BTreeSet<String>,
    /// The nodes whose key changes.
    pub selected: BTreeSet<String>,
    pub failed_during: Option<RotationPhase>,
    /// `spec.revokeImmediately`: peers drop the selected nodes' old keys as soon as the new ones
    /// are published.
    pub revoke: bool,
}

impl RotationView {
    /// The view of a KeyRotation, `None` while it has no frozen plan (Pending).
    pub fn from_object(object: &KeyRotation) -> Option<Self> {
        let status = object.status.as_ref()?;
        let id = status.rotation_id.clone()?;
        let phase: RotationPhase = status.phase.as_str().parse().ok()?;
        Some(Self {
            id,
            phase,
            participants: status.participants.iter().cloned().collect(),
            selected: status.selected_nodes.iter().cloned().collect(),
            failed_during: status.failed_during.and_then(|p| p.as_str().parse().ok()),
            revoke: object.spec.revoke_immediately,
        })
    }

    /// Complete, or failed in Retiring (every participant already sends only through the next
    /// world, so the new keys stay).
    pub fn completed(&self) -> bool {
        self.phase == RotationPhase::Complete
            || (self.phase == RotationPhase::Failed
                && self.failed_during == Some(RotationPhase::Retiring))
    }

    /// Failed before the switch: every node goes back to its old world.
    pub fn rolled_back(&self) -> bool {
        self.phase == RotationPhase::Failed && !self.completed()
    }

    /// Whether `node`'s key changes.
    pub fn rotates(&self, node: &str) -> bool {
        self.selected.contains(node)
    }
}

/// Where this node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode<'a> {
    /// No rotation concerns the node: one world, on the slot of its published endpoint.
    Rest,
    /// A participant of an active rotation: the next world runs on the other slot.
    Active(&'a RotationView),
    /// The rotation the node took part in completed and the node still announces its next world:
    /// it becomes the current one in this pass.
    Completing(&'a RotationView),
    /// The rotation failed before the switch: back to one world, old keys, mark `aborted`.
    RolledBack(&'a RotationView),
}

/// The mode of `node` from its own annotations and the rotations.
pub fn mode<'a>(
    node: &str,
    own: &BTreeMap<String, String>,
    rotations: &'a [RotationView],
) -> Mode<'a> {
    let mark = RotationMark::from_annotations(own).ok().flatten();
    let announces_next = own.contains_key(ANNOTATION_NEXT_ENDPOINT);
    if let Some(active) = rotations
        .iter()
        .find(|r| r.phase.is_active() && r.participants.contains(node))
    {
        let aborted = mark
            .as_ref()
            .is_some_and(|m| m.rotation == active.id && m.step == RotationStep::Aborted);
        return if aborted {
            Mode::RolledBack(active)
        } else {
            Mode::Active(active)
        };
    }
    let Some(mark) = mark else {
        return Mode::Rest;
    };
    let Some(rotation) = rotations.iter().find(|r| r.id == mark.rotation) else {
        return Mode::Rest;
    };
    if rotation.completed() && announces_next && mark.step != RotationStep::Aborted {
        return Mode::Completing(rotation);
    }
    if rotation.rolled_back() && (mark.step != RotationStep::Aborted || announces_next) {
        return Mode::RolledBack(rotation);
    }
    Mode::Rest
}

/// The public halves of the keystore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keys {
    pub current: PublicKey,
    pub next: Option<PublicKey>,
    pub previous: Option<PublicKey>,
}

/// The keystore change `mode` needs, if any. Apply it, reload and ask again.
pub fn keystore_step(node: &str, mode: Mode<'_>, keys: &Keys) -> Option<KeystoreStep> {
    if keys.previous.is_some() {
        // A promotion is published in the same pass that makes it; nothing answers to the
        // old key after that.
        return Some(KeystoreStep::RetirePrevious);
    }
    match mode {
        Mode::Active(r) => {
            (r.rotates(node) && r.phase == RotationPhase::Preparing && keys.next.is_none())
                .then_some(KeystoreStep::GenerateNext)
        }
        Mode::Completing(r) => {
            (r.rotates(node) && keys.next.is_some()).then_some(KeystoreStep::PromoteNext)
        }
        Mode::Rest | Mode::RolledBack(_) => {
            keys.next.is_some().then_some(KeystoreStep::DiscardNext)
        }
    }
}

/// What this node publishes about the rotation, and where its worlds are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnRotation {
    /// The slot of the current world (its port goes into `endpoint`).
    pub current: Slot,
    /// The slot of the next world while a rotation is active.
    pub next: Option<Slot>,
    /// `next-public-key`, `next-endpoint`, `rotation` to set (`Some`) or remove (`None`).
    pub annotations: BTreeMap<&'static str, Option<String>>,
}

/// The rotation part of this node's annotations. `step` is the mark [`next_step`] computed
/// (Active only); `address` the node's first address; `base` the mesh's listen port.
pub fn own_rotation_annotations(
    node: &str,
    mode: Mode<'_>,
    own: &BTreeMap<String, String>,
    keys: &Keys,
    step: Option<RotationStep>,
    address: IpAddr,
    base: u16,
) -> OwnRotation {
    let published = own
        .get(ANNOTATION_ENDPOINT)
        .and_then(|e| e.parse::<SocketAddr>().ok())
        .map(|e| Slot::of_port(e.port(), base))
        .unwrap_or(Slot::A);
    let mark = own
        .get(wiremesh_keyexchange::annotations::ANNOTATION_ROTATION)
        .cloned();
    let mut annotations: BTreeMap<&'static str, Option<String>> = BTreeMap::from([
        (ANNOTATION_NEXT_PUBLIC_KEY, None),
        (ANNOTATION_NEXT_ENDPOINT, None),
        (wiremesh_keyexchange::annotations::ANNOTATION_ROTATION, mark),
    ]);
    let (current, next) = match mode {
        Mode::Rest => (published, None),
        Mode::Completing(_) => (published.other(), None),
        Mode::RolledBack(r) => {
            annotations.insert(
                wiremesh_keyexchange::annotations::ANNOTATION_ROTATION,
                Some(RotationMark::new(&r.id, RotationStep::Aborted).to_string()),
            );
            (published, None)
        }
        Mode::Active(r) => {
            let next = published.other();
            annotations.insert(
                ANNOTATION_NEXT_ENDPOINT,
                Some(SocketAddr::new(address, next.port(base)).to_string()),
            );
            if r.rotates(node) {
                annotations.insert(ANNOTATION_NEXT_PUBLIC_KEY, keys.next.map(|k| k.to_base64()));
            }
            if let Some(step) = step {
                annotations.insert(
                    wiremesh_keyexchange::annotations::ANNOTATION_ROTATION,
                    Some(RotationMark::new(&r.id, step).to_string()),
                );
            }
            (published, Some(next))
        }
    };
    OwnRotation {
        current,
        next,
        annotations,
    }
}

/// A peer's step in rotation `id`, from its mark.
pub fn peer_step(annotations: &BTreeMap<String, String>, id: &str) -> Option<RotationStep> {
    RotationMark::from_annotations(annotations)
        .ok()
        .flatten()
        .filter(|m| m.rotation == id)
        .map(|m| m.step)
}

/// The key and endpoint under which `peer` is configured in a node's current world: its
/// published identity, or — when the rotation its mark names has completed and it still
/// announces its next world (it has not moved into it yet) — its next identity, which is the
/// one that stays. `revoked` drops a peer whose old key is revoked (see [`is_revoked`]).
pub fn current_identity(
    peer: &DesiredPeer,
    peer_annotations: &BTreeMap<String, String>,
    rotations: &[RotationView],
) -> (PublicKey, SocketAddr) {
    let completed = RotationMark::from_annotations(peer_annotations)
        .ok()
        .flatten()
        .and_then(|m| rotations.iter().find(|r| r.id == m.rotation))
        .is_some_and(RotationView::completed);
    match peer.next_endpoint {
        Some(next_endpoint) if completed => (
            peer.next_public_key.unwrap_or(peer.public_key),
            next_endpoint,
        ),
        _ => (peer.public_key, peer.endpoint),
    }
}

/// The key and endpoint of `peer` in the next world of `rotation`: a participant's announced
/// next world (`None` until it announced it), a non-participant's published identity.
///
/// A participant marked `retired` that no longer announces a next world has completed the
/// rotation (it saw Complete before this node's KeyRotation cache did): what it publishes now is
/// its next world, so it stays in ours. Dropping it there would leave its prefixes, which this
/// node already sends through the next world, without a peer until this node sees Complete too.
pub fn next_identity(
    peer: &DesiredPeer,
    peer_annotations: &BTreeMap<String, String>,
    rotation: &RotationView,
    rotations: &[RotationView],
) -> Option<(PublicKey, SocketAddr)> {
    if !rotation.participants.contains(&peer.node) {
        return Some(current_identity(peer, peer_annotations, rotations));
    }
    if peer.next_endpoint.is_none()
        && peer_step(peer_annotations, &rotation.id) == Some(RotationStep::Retired)
    {
        return Some((peer.public_key, peer.endpoint));
    }
    let endpoint = peer.next_endpoint?;
    let key = if rotation.rotates(&peer.node) {
        peer.next_public_key?
    } else {
        peer.public_key
    };
    Some((key, endpoint))
}

/// Whether `peer`'s old key is revoked: a `revokeImmediately` rotation selected it and it
/// published its next key, so no current world keeps it.
pub fn is_revoked(peer: &DesiredPeer, rotation: &RotationView) -> bool {
    rotation.revoke
        && rotation.phase.is_active()
        && rotation.rotates(&peer.node)
        && peer.next_public_key.is_some()
}

/// Whether `node` may send to `peer` through the next world (once that world has a handshake
/// with it): from Switching on; with `revokeImmediately`, at once between a revoked node and its
/// peers, since the current world no longer carries them (the loss a revocation accepts ends as
/// soon as the next world's handshake is done).
pub fn may_switch(rotation: &RotationView, node: &str, peer: &str) -> bool {
    rotation.phase >= RotationPhase::Switching
        || (rotation.revoke && (rotation.rotates(node) || rotation.rotates(peer)))
}

/// What the reconciler observed of the next world at its last apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// The next-world device holds every participant peer that announced its next world.
    pub next_ready: bool,
    /// Participant peers (other than this node) present in the peer set.
    pub participants: BTreeSet<String>,
    /// Peers sent to through the next world.
    pub switched: BTreeSet<String>,
    /// Each participant peer's step in the rotation.
    pub peer_steps: BTreeMap<String, Option<RotationStep>>,
}

/// This node's mark in the active `rotation`, given its current mark `mine` (in that rotation)
/// and what it observed. Marks only move forward.
pub fn next_step(
    rotation: &RotationView,
    mine: Option<RotationStep>,
    progress: &Progress,
) -> Option<RotationStep> {
    let phase = rotation.phase;
    let mut step = mine.filter(|s| *s != RotationStep::Aborted);
    if step.is_none() && phase == RotationPhase::Preparing && progress.next_ready {
        step = Some(RotationStep::Prepared);
    }
    if step == Some(RotationStep::Prepared)
        && phase >= RotationPhase::Switching
        && progress.participants.is_subset(&progress.switched)
    {
        step = Some(RotationStep::Switched);
    }
    if step == Some(RotationStep::Switched)
        && phase >= RotationPhase::Retiring
        && progress.participants.iter().all(|p| {
            progress
                .peer_steps
                .get(p)
                .copied()
                .flatten()
                .is_some_and(|s| s.reached(RotationStep::Switched))
        })
    {
        step = Some(RotationStep::Retired);
    }
    step
}

/// This node's rotation state for the metrics (`wiremesh_rotation_phase{phase}`,
/// `wiremesh_rotation_step{step}`, [`crate::metrics::ROTATION_PHASES`] and
/// [`crate::metrics::ROTATION_STEPS`]): the phase of the rotation it takes part in (`Idle` at
/// rest, `Complete` while moving into the new world, `Failed` while rolling back), and the step
/// of the mark it publishes (`mark`: the `wiremesh.io/rotation` value, `none` without one).
pub fn state_labels(mode: Mode<'_>, mark: Option<&str>) -> (&'static str, &'static str) {
    let phase = match mode {
        Mode::Rest => "Idle",
        Mode::Active(r) => r.phase.as_str(),
        Mode::Completing(_) => "Complete",
        Mode::RolledBack(_) => "Failed",
    };
    let step = mark
        .and_then(|m| RotationMark::parse(m).ok())
        .map_or("none", |m| m.step.as_str());
    (phase, step)
}
