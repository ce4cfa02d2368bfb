//! Unit tests of the configuration state machine (no root needed: binds an ephemeral UDP port).

use std::net::IpAddr;

use wiremesh_wgctrl::uapi::parse::{SecretKey, parse_set};

use super::*;

fn state() -> DeviceState {
    DeviceState::new(Arc::new(UdpEndpoint::bind(0, 0, 1).expect("bind")))
}

fn hex(b: [u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn apply(st: &mut DeviceState, body: &str) {
    st.apply(&parse_set(body).expect("parse"), None)
        .expect("apply");
}

fn owner(st: &DeviceState, ip: &str) -> Option<[u8; 32]> {
    let ip: IpAddr = ip.parse().unwrap();
    st.table.lookup(ip).map(|p| *p.public_key.as_bytes())
}

const P1: [u8; 32] = [1; 32];
const P2: [u8; 32] = [2; 32];

#[test]
fn allowed_ips_move_between_peers_and_replace() {
    let mut st = state();
    apply(
        &mut st,
        &format!(
            "public_key={}\nallowed_ip=10.0.0.0/24\nallowed_ip=10.1.0.0/16\npublic_key={}\nallowed_ip=10.2.0.0/16\n",
            hex(P1),
            hex(P2)
        ),
    );
    assert_eq!(owner(&st, "10.0.0.7"), Some(P1));
    assert_eq!(owner(&st, "10.2.3.4"), Some(P2));
    // The same prefix given to P2 leaves P1.
    apply(
        &mut st,
        &format!("public_key={}\nallowed_ip=10.0.0.0/24\n", hex(P2)),
    );
    assert_eq!(owner(&st, "10.0.0.7"), Some(P2));
    let p1 = &st.peers[&PublicKey::from_bytes(P1)];
    assert_eq!(
        p1.allowed_ips,
        vec!["10.1.0.0/16".parse::<IpNet>().unwrap()]
    );
    // replace_allowed_ips drops the old ones.
    apply(
        &mut st,
        &format!(
            "public_key={}\nreplace_allowed_ips=true\nallowed_ip=10.9.0.0/16\n",
            hex(P2)
        ),
    );
    assert_eq!(owner(&st, "10.0.0.7"), None);
    assert_eq!(owner(&st, "10.2.3.4"), None);
    assert_eq!(owner(&st, "10.9.1.1"), Some(P2));
}

#[test]
fn update_only_remove_and_replace_peers() {
    let mut st = state();
    apply(
        &mut st,
        &format!(
            "public_key={}\nupdate_only=true\nallowed_ip=10.0.0.0/8\n",
            hex(P1)
        ),
    );
    assert!(st.peers.is_empty(), "update_only created a peer");
    apply(
        &mut st,
        &format!("public_key={}\nallowed_ip=10.0.0.0/8\n", hex(P1)),
    );
    apply(
        &mut st,
        &format!("public_key={}\nallowed_ip=11.0.0.0/8\n", hex(P2)),
    );
    let idx = st.peers[&PublicKey::from_bytes(P1)].peer.index;
    assert!(st.by_index.contains_key(&idx));
    apply(&mut st, &format!("public_key={}\nremove=true\n", hex(P1)));
    assert!(!st.by_index.contains_key(&idx), "index survived removal");
    assert_eq!(owner(&st, "10.1.1.1"), None);
    apply(
        &mut st,
        &format!("replace_peers=true\npublic_key={}\n", hex(P1)),
    );
    assert_eq!(st.peers.len(), 1);
    assert!(st.peers.contains_key(&PublicKey::from_bytes(P1)));
    assert_eq!(owner(&st, "11.1.1.1"), None);
}

#[test]
fn private_key_creates_and_clears_sessions_and_own_key_is_not_a_peer() {
    let mut st = state();
    apply(&mut st, &format!("public_key={}\n", hex(P1)));
    assert!(
        st.peers[&PublicKey::from_bytes(P1)]
            .peer
            .lock()
            .tunn
            .is_none()
    );
    let secret = [7u8; 32];
    apply(&mut st, &format!("private_key={}\n", hex(secret)));
    assert!(
        st.peers[&PublicKey::from_bytes(P1)]
            .peer
            .lock()
            .tunn
            .is_some()
    );
    // Our own public key as a peer is ignored.
    let own = XPublic::from(&StaticSecret::from(secret)).to_bytes();
    apply(
        &mut st,
        &format!("public_key={}\nallowed_ip=1.2.3.4/32\n", hex(own)),
    );
    assert!(!st.peers.contains_key(&PublicKey::from_bytes(own)));
    // The zero key removes the identity and every session.
    st.apply(
        &SetRequest {
            private_key: Some(SecretKey(Zeroizing::new([0; 32]))),
            ..SetRequest::default()
        },
        None,
    )
    .unwrap();
    assert!(st.identity.is_none());
    assert!(
        st.peers[&PublicKey::from_bytes(P1)]
            .peer
            .lock()
            .tunn
            .is_none()
    );
}

#[test]
fn keepalive_and_psk_and_endpoint() {
    let mut st = state();
    apply(&mut st, &format!("private_key={}\n", hex([9; 32])));
    apply(
        &mut st,
        &format!(
            "public_key={}\npersistent_keepalive_interval=25\npreshared_key={}\nendpoint=10.0.0.1:5\n",
            hex(P1),
            hex([3; 32])
        ),
    );
    let entry = &st.peers[&PublicKey::from_bytes(P1)];
    assert_eq!(entry.peer.keepalive.load(Ordering::Relaxed), 25);
    assert!(
        entry.peer.keepalive_now.load(Ordering::Relaxed),
        "no immediate keepalive"
    );
    assert_eq!(entry.preshared_key.as_deref(), Some(&[3u8; 32]));
    assert_eq!(
        entry.peer.lock().endpoint,
        Some("10.0.0.1:5".parse().unwrap())
    );
    apply(
        &mut st,
        &format!("public_key={}\npreshared_key={}\n", hex(P1), hex([0; 32])),
    );
    assert!(st.peers[&PublicKey::from_bytes(P1)].preshared_key.is_none());
}
