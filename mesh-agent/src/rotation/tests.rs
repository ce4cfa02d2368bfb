use std::net::Ipv4Addr;

use wiremesh_keyexchange::{
    PrivateKey,
    annotations::{ANNOTATION_PUBLIC_KEY, ANNOTATION_ROTATION},
};

use super::*;

fn key() -> PublicKey {
    PrivateKey::generate().unwrap().public_key()
}

fn rotation(phase: RotationPhase) -> RotationView {
    RotationView {
        id: "r.1234abcd".into(),
        phase,
        participants: ["n1", "n2", "n3"].into_iter().map(String::from).collect(),
        selected: ["n1", "n2"].into_iter().map(String::from).collect(),
        failed_during: None,
        revoke: false,
    }
}

fn own(
    endpoint: &str,
    mark: Option<&str>,
    next_endpoint: Option<&str>,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::from([
        (ANNOTATION_PUBLIC_KEY.to_string(), key().to_base64()),
        (ANNOTATION_ENDPOINT.to_string(), endpoint.to_string()),
    ]);
    if let Some(mark) = mark {
        m.insert(ANNOTATION_ROTATION.to_string(), mark.to_string());
    }
    if let Some(next) = next_endpoint {
        m.insert(ANNOTATION_NEXT_ENDPOINT.to_string(), next.to_string());
    }
    m
}

const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));

#[test]
fn slots_alternate_by_port() {
    assert_eq!(Slot::of_port(51871, 51871), Slot::A);
    assert_eq!(Slot::of_port(51872, 51871), Slot::B);
    assert_eq!(Slot::A.other().port(51871), 51872);
    assert_eq!(Slot::B.index(), 1);
}

#[test]
fn modes_follow_the_rotation_and_the_own_annotations() {
    let active = [rotation(RotationPhase::Switching)];
    let rest = own("10.0.0.1:51871", None, None);
    assert_eq!(mode("n1", &rest, &active), Mode::Active(&active[0]));
    // n4 is not a participant: it stays at rest.
    assert_eq!(mode("n4", &rest, &active), Mode::Rest);

    let mut complete = rotation(RotationPhase::Complete);
    let done = [complete.clone()];
    let announcing = own(
        "10.0.0.1:51871",
        Some("r.1234abcd=retired"),
        Some("10.0.0.1:51872"),
    );
    assert_eq!(mode("n1", &announcing, &done), Mode::Completing(&done[0]));
    let moved = own("10.0.0.1:51872", Some("r.1234abcd=retired"), None);
    assert_eq!(mode("n1", &moved, &done), Mode::Rest);

    complete.phase = RotationPhase::Failed;
    complete.failed_during = Some(RotationPhase::Switching);
    let failed = [complete.clone()];
    assert_eq!(
        mode("n1", &announcing, &failed),
        Mode::RolledBack(&failed[0])
    );
    let aborted = own("10.0.0.1:51871", Some("r.1234abcd=aborted"), None);
    assert_eq!(mode("n1", &aborted, &failed), Mode::Rest);
    // Failed in Retiring keeps the new keys: the node completes.
    complete.failed_during = Some(RotationPhase::Retiring);
    let late = [complete];
    assert_eq!(mode("n1", &announcing, &late), Mode::Completing(&late[0]));
}

#[test]
fn keystore_steps_generate_promote_and_discard() {
    let preparing = rotation(RotationPhase::Preparing);
    let none = Keys {
        current: key(),
        next: None,
        previous: None,
    };
    let with_next = Keys {
        next: Some(key()),
        ..none
    };
    assert_eq!(
        keystore_step("n1", Mode::Active(&preparing), &none),
        Some(KeystoreStep::GenerateNext)
    );
    // n3 does not rotate.
    assert_eq!(keystore_step("n3", Mode::Active(&preparing), &none), None);
    assert_eq!(
        keystore_step("n1", Mode::Active(&preparing), &with_next),
        None
    );
    let complete = rotation(RotationPhase::Complete);
    assert_eq!(
        keystore_step("n1", Mode::Completing(&complete), &with_next),
        Some(KeystoreStep::PromoteNext)
    );
    assert_eq!(
        keystore_step("n1", Mode::Rest, &with_next),
        Some(KeystoreStep::DiscardNext)
    );
    let promoted = Keys {
        previous: Some(key()),
        ..none
    };
    assert_eq!(
        keystore_step("n1", Mode::Completing(&complete), &promoted),
        Some(KeystoreStep::RetirePrevious)
    );
}

#[test]
fn active_nodes_announce_the_next_world_on_the_other_slot() {
    let r = rotation(RotationPhase::Preparing);
    let keys = Keys {
        current: key(),
        next: Some(key()),
        previous: None,
    };
    let published = own("10.0.0.1:51872", None, None);
    let out = own_rotation_annotations(
        "n1",
        Mode::Active(&r),
        &published,
        &keys,
        Some(RotationStep::Prepared),
        IP,
        51871,
    );
    assert_eq!((out.current, out.next), (Slot::B, Some(Slot::A)));
    assert_eq!(
        out.annotations[ANNOTATION_NEXT_ENDPOINT].as_deref(),
        Some("10.0.0.1:51871")
    );
    assert_eq!(
        out.annotations[ANNOTATION_NEXT_PUBLIC_KEY],
        Some(keys.next.unwrap().to_base64())
    );
    assert_eq!(
        out.annotations[ANNOTATION_ROTATION].as_deref(),
        Some("r.1234abcd=prepared")
    );
    // A participant that does not rotate announces only its next endpoint.
    let n3 = own_rotation_annotations("n3", Mode::Active(&r), &published, &keys, None, IP, 51871);
    assert_eq!(n3.annotations[ANNOTATION_NEXT_PUBLIC_KEY], None);
    assert!(n3.annotations[ANNOTATION_NEXT_ENDPOINT].is_some());

    // Completing: the next world's slot becomes current; next-* go.
    let c = rotation(RotationPhase::Complete);
    let done = own_rotation_annotations(
        "n1",
        Mode::Completing(&c),
        &published,
        &keys,
        None,
        IP,
        51871,
    );
    assert_eq!((done.current, done.next), (Slot::A, None));
    assert_eq!(done.annotations[ANNOTATION_NEXT_ENDPOINT], None);
}

#[test]
fn marks_move_forward_with_the_observed_progress() {
    let mut r = rotation(RotationPhase::Preparing);
    let mut progress = Progress {
        next_ready: false,
        participants: ["n2", "n3"].into_iter().map(String::from).collect(),
        ..Progress::default()
    };
    assert_eq!(next_step(&r, None, &progress), None);
    progress.next_ready = true;
    assert_eq!(next_step(&r, None, &progress), Some(RotationStep::Prepared));
    r.phase = RotationPhase::Switching;
    let prepared = Some(RotationStep::Prepared);
    progress.switched.insert("n2".into());
    assert_eq!(next_step(&r, prepared, &progress), prepared);
    progress.switched.insert("n3".into());
    assert_eq!(
        next_step(&r, prepared, &progress),
        Some(RotationStep::Switched)
    );
    r.phase = RotationPhase::Retiring;
    let switched = Some(RotationStep::Switched);
    progress
        .peer_steps
        .insert("n2".into(), Some(RotationStep::Retired));
    progress.peer_steps.insert("n3".into(), prepared);
    assert_eq!(next_step(&r, switched, &progress), switched);
    progress.peer_steps.insert("n3".into(), switched);
    assert_eq!(
        next_step(&r, switched, &progress),
        Some(RotationStep::Retired)
    );
}

#[test]
fn peers_are_seen_under_the_identity_of_each_world() {
    let (old, new) = (key(), key());
    let peer = DesiredPeer {
        node: "n2".into(),
        public_key: old,
        endpoint: "10.0.0.2:51871".parse().unwrap(),
        allowed_ips: vec![],
        key_generation: 1,
        next_public_key: Some(new),
        next_endpoint: Some("10.0.0.2:51872".parse().unwrap()),
    };
    let active = rotation(RotationPhase::Switching);
    let marks = BTreeMap::from([(
        ANNOTATION_ROTATION.to_string(),
        "r.1234abcd=prepared".into(),
    )]);
    let rotations = [active.clone()];
    assert_eq!(
        current_identity(&peer, &marks, &rotations),
        (old, peer.endpoint)
    );
    assert_eq!(
        next_identity(&peer, &marks, &active, &rotations),
        Some((new, peer.next_endpoint.unwrap()))
    );
    // Completed: the next identity is the one that stays.
    let done = [rotation(RotationPhase::Complete)];
    assert_eq!(
        current_identity(&peer, &marks, &done),
        (new, peer.next_endpoint.unwrap())
    );
    // A participant that has not announced its next world is not in it yet.
    let quiet = DesiredPeer {
        next_endpoint: None,
        ..peer.clone()
    };
    assert_eq!(next_identity(&quiet, &marks, &active, &rotations), None);
    // It completed (marked retired, its next world published as its identity) before this
    // node's cache saw the rotation end: it stays in the next world under what it publishes.
    let completed = DesiredPeer {
        public_key: new,
        endpoint: "10.0.0.2:51872".parse().unwrap(),
        next_public_key: None,
        next_endpoint: None,
        ..peer.clone()
    };
    let retired = BTreeMap::from([(ANNOTATION_ROTATION.to_string(), "r.1234abcd=retired".into())]);
    let retiring = rotation(RotationPhase::Retiring);
    assert_eq!(
        next_identity(
            &completed,
            &retired,
            &retiring,
            std::slice::from_ref(&retiring)
        ),
        Some((new, completed.endpoint))
    );
    let revoking = RotationView {
        revoke: true,
        ..active
    };
    assert!(is_revoked(&peer, &revoking));
    assert!(!is_revoked(&quiet_without_next(&peer), &revoking));
}

fn quiet_without_next(peer: &DesiredPeer) -> DesiredPeer {
    DesiredPeer {
        next_public_key: None,
        ..peer.clone()
    }
}

#[test]
fn switching_waits_for_the_phase_except_for_revoked_pairs() {
    let mut r = rotation(RotationPhase::Preparing);
    assert!(!may_switch(&r, "n1", "n3"));
    r.revoke = true;
    // n1 and n2 are selected: their pairs switch as soon as the next world has a handshake.
    assert!(may_switch(&r, "n3", "n1"));
    assert!(may_switch(&r, "n1", "n3"));
    r.selected.remove("n1");
    r.selected.remove("n2");
    assert!(!may_switch(&r, "n1", "n3"));
    r.phase = RotationPhase::Switching;
    assert!(may_switch(&r, "n1", "n3"));
}

#[test]
fn metric_labels_name_the_phase_and_the_own_mark() {
    let preparing = rotation(RotationPhase::Preparing);
    let complete = rotation(RotationPhase::Complete);
    let failed = rotation(RotationPhase::Failed);
    assert_eq!(state_labels(Mode::Rest, None), ("Idle", "none"));
    assert_eq!(
        state_labels(Mode::Active(&preparing), Some("r.1234abcd=prepared")),
        ("Preparing", "prepared")
    );
    assert_eq!(
        state_labels(Mode::Completing(&complete), Some("r.1234abcd=retired")),
        ("Complete", "retired")
    );
    assert_eq!(
        state_labels(Mode::RolledBack(&failed), Some("r.1234abcd=aborted")),
        ("Failed", "aborted")
    );
    // A mark this build cannot read is no mark; every label is one of the fixed set.
    assert_eq!(state_labels(Mode::Rest, Some("garbage")), ("Idle", "none"));
    for phase in [
        RotationPhase::Preparing,
        RotationPhase::Switching,
        RotationPhase::Retiring,
    ] {
        let r = rotation(phase);
        let (p, _) = state_labels(Mode::Active(&r), None);
        assert!(crate::metrics::ROTATION_PHASES.contains(&p), "{p}");
    }
}
