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
        peers,
        mtu: 1420,
        listen_port: 51871,
    }
}

async fn mesh() -> (Arc<FakeDatapath>, Arc<FakeRoutes>, Mesh<FakeRoutes>) {
    let datapath = Arc::new(FakeDatapath::new("wm0"));
    let routes = Arc::new(FakeRoutes::new());
    let mesh = Mesh::restore(datapath.clone(), routes.clone())
        .await
        .unwrap();
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
    assert_eq!(datapath.status().unwrap().listen_port, 51871);
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

    // Disabled mesh: everything goes.
    let out = mesh.apply(&wanted(vec![])).await;
    assert!(out.errors.is_empty());
    assert!(datapath.status().unwrap().peers.is_empty());
    assert!(routes.routes("wm0").is_empty());
}

#[tokio::test]
async fn restore_keeps_existing_state_until_apply_and_then_prunes_only_ours() {
    let datapath = Arc::new(FakeDatapath::new("wm0"));
    let routes = Arc::new(FakeRoutes::new());
    let (kept, stale) = (key(), key());
    datapath
        .set_peer(&peer("b", kept, &["10.244.2.0/24"]).config)
        .unwrap();
    datapath
        .set_peer(&peer("x", stale, &["10.244.9.0/24"]).config)
        .unwrap();
    routes.insert_route("wm0", net("10.244.2.0/24"));
    routes.insert_route("wm0", net("10.244.9.0/24"));
    routes.insert_route("eth0", net("10.1.0.0/16"));

    let mut mesh = Mesh::restore(datapath.clone(), routes.clone())
        .await
        .unwrap();
    // Restore alone changes nothing.
    assert_eq!(datapath.status().unwrap().peers.len(), 2);
    assert_eq!(mesh.applied_routes().len(), 2);
    assert_eq!(mesh.applied_peers().count(), 2);

    let out = mesh
        .apply(&wanted(vec![peer("b", kept, &["10.244.2.0/24"])]))
        .await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    // The restored peer is rewritten once (its exact config was unknown), its route kept.
    assert_eq!(out.peers_set, 1);
    assert_eq!(out.routes_added, 0);
    assert_eq!((out.peers_removed, out.routes_removed), (1, 1));
    assert!(datapath.peer(&stale).is_none());
    assert_eq!(
        routes.routes("wm0"),
        [net("10.244.2.0/24")].into_iter().collect()
    );
    // Routes on other interfaces are not ours to prune.
    assert_eq!(routes.routes("eth0").len(), 1);
}

#[tokio::test]
async fn failures_are_reported_and_retried_without_blocking_other_peers() {
    let (datapath, routes, mut mesh) = mesh().await;
    let (kb, kc) = (key(), key());
    let w = wanted(vec![
        peer("b", kb, &["10.244.2.0/24"]),
        peer("c", kc, &["10.244.3.0/24"]),
    ]);
    // link_up succeeds, configure(listen port) is the first datapath call: make set_peer(b) fail
    // by failing after it.
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
            peers: vec![],
            mtu: 1380,
            listen_port: 6000,
        })
        .await;
    assert!(out.errors.is_empty());
    assert_eq!(routes.link_mtu("wm0"), Some(1380));
    assert_eq!(datapath.status().unwrap().listen_port, 6000);
}
