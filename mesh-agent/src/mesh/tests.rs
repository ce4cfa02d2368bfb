//! Unit tests of [`Mesh`] against the in-memory datapath and routes.

use std::{net::SocketAddr, str::FromStr};

use wiremesh_keyexchange::PrivateKey;

use super::*;
use crate::{datapath::fake::FakeDatapath, routes::fake::FakeRoutes};

fn key() -> PublicKey {
    PrivateKey::generate().unwrap().public_key()
}

fn net(s: &str) -> IpNet {
    IpNet::from_str(s).unwrap()
}

fn peer(node: &str, key: PublicKey, ips: &[&str]) -> WantedPeer {
    let mut config = PeerConfig::new(key);
    config.endpoint = Some(SocketAddr::from_str("192.0.2.1:51871").unwrap());
    config.allowed_ips = ips.iter().map(|s| net(s)).collect();
    config.persistent_keepalive = Some(25);
    WantedPeer {
        node: node.into(),
        config,
    }
}

fn wanted(peers: Vec<WantedPeer>) -> Wanted {
    Wanted {
        enabled: true,
        peers,
        mtu: 1420,
        listen_port: 51871,
        unrouted: Default::default(),
    }
}

async fn mesh() -> (Arc<FakeDatapath>, Arc<FakeRoutes>, Mesh<FakeRoutes>) {
    let datapath = Arc::new(FakeDatapath::new("wm0"));
    let routes = Arc::new(FakeRoutes::new());
    let mesh = Mesh::new(
        datapath.clone(),
        routes.clone(),
        PrivateKey::generate().unwrap(),
    );
    (datapath, routes, mesh)
}

#[tokio::test]
async fn apply_configures_peers_routes_mtu_and_port() {
    let (datapath, routes, mut mesh) = mesh().await;
    let (kb, kc) = (key(), key());
    let out = mesh
        .apply(&wanted(vec![
            peer("b", kb, &["10.244.2.0/24"]),
            peer("c", kc, &["10.244.3.0/24", "10.99.0.7/32"]),
        ]))
        .await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!((out.peers_set, out.routes_added), (2, 3));
    assert_eq!(routes.link_mtu("wm0"), Some(1420));
    assert_eq!(
        routes.link_rp_filter("wm0"),
        Some(crate::routes::RP_FILTER_LOOSE),
        "loose reverse-path filter on the tunnel device"
    );
    assert!(routes.has_rule(), "the rule that selects our table");
    assert_eq!(datapath.status().unwrap().listen_port, 51871);
    assert!(
        matches!(out.key_replaced, Some(None)),
        "a device without a key gets the keystore's"
    );
    assert_eq!(
        datapath.peer(&kc).unwrap().allowed_ips,
        vec![net("10.244.3.0/24"), net("10.99.0.7/32")]
    );
    assert_eq!(
        routes.routes("wm0"),
        [
            net("10.244.2.0/24"),
            net("10.244.3.0/24"),
            net("10.99.0.7/32")
        ]
        .into_iter()
        .collect()
    );

    // The same wanted state again changes nothing.
    let calls_before = (datapath.calls().len(), routes.calls().len());
    let out = mesh
        .apply(&wanted(vec![
            peer("b", kb, &["10.244.2.0/24"]),
            peer("c", kc, &["10.244.3.0/24", "10.99.0.7/32"]),
        ]))
        .await;
    assert!(!out.changed() && out.errors.is_empty());
    assert_eq!((datapath.calls().len(), routes.calls().len()), calls_before);
}

#[tokio::test]
async fn removed_node_loses_routes_then_peer() {
    let (datapath, routes, mut mesh) = mesh().await;
    let (kb, kc) = (key(), key());
    mesh.apply(&wanted(vec![
        peer("b", kb, &["10.244.2.0/24"]),
        peer("c", kc, &["10.244.3.0/24"]),
    ]))
    .await;
    let out = mesh
        .apply(&wanted(vec![peer("b", kb, &["10.244.2.0/24"])]))
        .await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!((out.peers_removed, out.routes_removed), (1, 1));
    assert!(datapath.peer(&kc).is_none());
    assert_eq!(
        routes.routes("wm0"),
        [net("10.244.2.0/24")].into_iter().collect()
    );
    let calls = routes.calls();
    assert_eq!(calls.last().unwrap(), "del wm0 10.244.3.0/24");
    let dp_calls = datapath.calls();
    assert_eq!(dp_calls.last().unwrap(), &format!("remove_peer {kc}"));

    // Disabled mesh: everything goes, the rule too.
    let out = mesh
        .apply(&Wanted {
            enabled: false,
            ..wanted(vec![])
        })
        .await;
    assert!(out.errors.is_empty());
    assert!(datapath.status().unwrap().peers.is_empty());
    assert!(routes.routes("wm0").is_empty());
    assert!(!routes.has_rule());
    // Enabled again: the rule is back.
    let out = mesh
        .apply(&wanted(vec![peer("b", kb, &["10.244.2.0/24"])]))
        .await;
    assert!(out.errors.is_empty() && routes.has_rule());
}

#[tokio::test]
async fn existing_state_is_adopted_and_only_ours_is_pruned() {
    let datapath = Arc::new(FakeDatapath::new("wm0"));
    let routes = Arc::new(FakeRoutes::new());
    let private = PrivateKey::generate().unwrap();
    let (kept, stale) = (key(), key());
    datapath
        .configure(&DeviceSettings {
            private_key: Some(private.clone()),
            listen_port: Some(51871),
            ..DeviceSettings::default()
        })
        .unwrap();
    datapath
        .set_peer(&peer("b", kept, &["10.244.2.0/24"]).config)
        .unwrap();
    datapath
        .set_peer(&peer("x", stale, &["10.244.9.0/24"]).config)
        .unwrap();
    routes.link_up("wm0", 1420).await.unwrap();
    routes.ensure_rule().await.unwrap();
    routes.insert_route("wm0", net("10.244.2.0/24"));
    routes.insert_route("wm0", net("10.244.9.0/24"));
    routes.insert_route("eth0", net("10.1.0.0/16"));
    let calls_before = datapath.calls().len();

    // A restarted agent: the device left by the earlier run is adopted as it is.
    let mut mesh = Mesh::new(datapath.clone(), routes.clone(), private);
    let out = mesh
        .apply(&wanted(vec![peer("b", kept, &["10.244.2.0/24"])]))
        .await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert!(out.key_replaced.is_none(), "the device holds our key");
    assert_eq!(
        (out.peers_set, out.routes_added),
        (0, 0),
        "adopted, not rewritten"
    );
    assert_eq!((out.peers_removed, out.routes_removed), (1, 1));
    assert_eq!(
        datapath.calls()[calls_before..],
        [format!("remove_peer {stale}")]
    );
    assert!(datapath.peer(&stale).is_none());
    assert_eq!(
        routes.routes("wm0"),
        [net("10.244.2.0/24")].into_iter().collect()
    );
    // Routes on other interfaces are not ours to prune.
    assert_eq!(routes.routes("eth0").len(), 1);
}

#[tokio::test]
async fn drift_is_read_back_and_repaired() {
    let (datapath, routes, mut mesh) = mesh().await;
    let (kb, kc) = (key(), key());
    let w = wanted(vec![
        peer("b", kb, &["10.244.2.0/24"]),
        peer("c", kc, &["10.244.3.0/24"]),
    ]);
    mesh.apply(&w).await;
    // By hand: `wg set wm0 peer <b> remove`, `ip route del 10.244.3.0/24`, another allowed IP on c.
    datapath.remove_peer(&kb).unwrap();
    routes.remove_route("wm0", net("10.244.3.0/24"));
    let out = mesh.apply(&w).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!((out.peers_set, out.routes_added), (1, 1));
    assert_eq!((out.peers_repaired, out.routes_repaired), (1, 1));
    assert!(datapath.peer(&kb).is_some());
    assert_eq!(routes.routes("wm0").len(), 2);
    let mut grown = datapath.peer(&kc).unwrap();
    grown.allowed_ips.push(net("10.250.0.0/16"));
    datapath.set_peer(&grown).unwrap();
    let out = mesh.apply(&w).await;
    assert_eq!(out.peers_set, 1);
    assert_eq!(
        datapath.peer(&kc).unwrap().allowed_ips,
        vec![net("10.244.3.0/24")]
    );
    // Another key on the device: the keystore's wins.
    let intruder = PrivateKey::generate().unwrap();
    datapath
        .configure(&DeviceSettings {
            private_key: Some(intruder.clone()),
            ..DeviceSettings::default()
        })
        .unwrap();
    let out = mesh.apply(&w).await;
    assert_eq!(out.key_replaced, Some(Some(intruder.public_key())));
    assert_ne!(
        datapath.status().unwrap().public_key,
        Some(intruder.public_key())
    );
    // The link went down and lost its MTU: brought back.
    routes.remove_link("wm0");
    let out = mesh.apply(&w).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(routes.link_mtu("wm0"), Some(1420));
    assert_eq!(routes.routes("wm0").len(), 2);
    // Strict reverse-path filtering set by hand: loose again at the next pass.
    routes.set_rp_filter("wm0", 1);
    let out = mesh.apply(&w).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!(
        routes.link_rp_filter("wm0"),
        Some(crate::routes::RP_FILTER_LOOSE)
    );
}

#[tokio::test]
async fn a_route_we_did_not_create_is_never_replaced() {
    let (_datapath, routes, mut mesh) = mesh().await;
    let (kb, kc) = (key(), key());
    routes.insert_foreign(net("10.244.2.0/24"));
    let w = wanted(vec![
        peer("b", kb, &["10.244.2.0/24"]),
        peer("c", kc, &["10.244.3.0/24"]),
    ]);
    let out = mesh.apply(&w).await;
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    assert!(
        out.errors[0].to_string().contains("did not create"),
        "{}",
        out.errors[0]
    );
    assert_eq!(
        routes.routes("wm0"),
        [net("10.244.3.0/24")].into_iter().collect()
    );
}

#[tokio::test]
async fn failures_are_reported_and_retried_without_blocking_other_peers() {
    let (datapath, routes, mut mesh) = mesh().await;
    let (kb, kc) = (key(), key());
    let w = wanted(vec![
        peer("b", kb, &["10.244.2.0/24"]),
        peer("c", kc, &["10.244.3.0/24"]),
    ]);
    // The first apply sets key and listen port, so set_peer(b) is the next datapath call.
    mesh.apply(&Wanted {
        peers: vec![],
        ..w.clone()
    })
    .await;
    datapath.fail_next("injected");
    let out = mesh.apply(&w).await;
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    assert!(
        out.errors[0].to_string().contains("peer b"),
        "{}",
        out.errors[0]
    );
    // c is fully configured, b has neither peer nor route.
    assert!(datapath.peer(&kc).is_some());
    assert!(datapath.peer(&kb).is_none());
    assert_eq!(
        routes.routes("wm0"),
        [net("10.244.3.0/24")].into_iter().collect()
    );

    let out = mesh.apply(&w).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!((out.peers_set, out.routes_added), (1, 1));
    assert_eq!(routes.routes("wm0").len(), 2);

    // A failing route add is retried on the next apply.
    let kd = key();
    let mut w2 = w.clone();
    w2.peers.push(peer("d", kd, &["10.244.4.0/24"]));
    routes.fail_next("injected");
    let out = mesh.apply(&w2).await;
    assert_eq!(out.errors.len(), 1);
    assert!(!routes.routes("wm0").contains(&net("10.244.4.0/24")));
    let out = mesh.apply(&w2).await;
    assert!(out.errors.is_empty());
    assert!(routes.routes("wm0").contains(&net("10.244.4.0/24")));
}

#[tokio::test]
async fn prefix_moving_between_peers_is_released_before_it_is_claimed() {
    let (datapath, _routes, mut mesh) = mesh().await;
    let (kb, kc) = (key(), key());
    mesh.apply(&wanted(vec![
        peer("b", kb, &["10.244.2.0/24", "10.99.0.5/32"]),
        peer("c", kc, &["10.244.3.0/24"]),
    ]))
    .await;
    let before = datapath.calls().len();
    let out = mesh
        .apply(&wanted(vec![
            peer("b", kb, &["10.244.2.0/24"]),
            peer("c", kc, &["10.244.3.0/24", "10.99.0.5/32"]),
        ]))
        .await;
    assert!(out.errors.is_empty());
    let calls = datapath.calls()[before..].to_vec();
    assert_eq!(
        calls,
        vec![format!("set_peer {kb}"), format!("set_peer {kc}")]
    );
}

#[tokio::test]
async fn mtu_and_port_changes_are_applied() {
    let (datapath, routes, mut mesh) = mesh().await;
    mesh.apply(&wanted(vec![])).await;
    let out = mesh
        .apply(&Wanted {
            enabled: true,
            peers: vec![],
            mtu: 1380,
            listen_port: 6000,
            unrouted: Default::default(),
        })
        .await;
    assert!(out.errors.is_empty());
    assert_eq!(routes.link_mtu("wm0"), Some(1380));
    assert_eq!(datapath.status().unwrap().listen_port, 6000);
}
