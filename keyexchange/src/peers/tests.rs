//! Tests of the desired peer set: exclusion of self, rejection rules with their reasons, prefix
//! conflicts, and determinism under permutation (property tests).

use std::net::{IpAddr, SocketAddr};

use proptest::prelude::*;

use super::*;
use crate::{
    annotations::{
        ANNOTATION_ENDPOINT, ANNOTATION_KEY_GENERATION, ANNOTATION_ROTATION, DEFAULT_LISTEN_PORT,
        RotationMark, RotationStep,
    },
    keys::PrivateKey,
};

fn key(seed: u8) -> PublicKey {
    PrivateKey::from_bytes([seed; 32]).public_key()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Node `i`: address 192.168.0.i, podCIDR 10.244.i.0/24, key seed i.
fn node(i: u8) -> NodeView {
    let addr = IpAddr::from([192, 168, 0, i]);
    NodeView {
        name: format!("node-{i}"),
        annotations: NodeAnnotations {
            public_key: key(i),
            endpoint: SocketAddr::new(addr, DEFAULT_LISTEN_PORT),
            key_generation: u64::from(i),
            next_public_key: None,
            next_endpoint: None,
            rotation: None,
        }
        .render(),
        addresses: vec![addr],
        pod_cidrs: vec![net(&format!("10.244.{i}.0/24"))],
        pod_ips: vec![],
        pod_ip_created: Default::default(),
    }
}

fn names(set: &PeerSet) -> Vec<&str> {
    set.peers.iter().map(|p| p.node.as_str()).collect()
}

fn rejected(set: &PeerSet) -> Vec<(&str, &'static str)> {
    set.rejected
        .iter()
        .map(|r| (r.node.as_str(), r.error.reason()))
        .collect()
}

#[test]
fn peers_exclude_self_and_are_sorted() {
    let nodes = [node(3), node(1), node(2)];
    let set = desired_peers("node-2", &nodes);
    assert_eq!(names(&set), ["node-1", "node-3"]);
    let p = set.peer("node-3").unwrap();
    assert_eq!(p.public_key, key(3));
    assert_eq!(p.endpoint, "192.168.0.3:51871".parse().unwrap());
    assert_eq!(p.allowed_ips, [net("10.244.3.0/24")]);
    assert_eq!(p.key_generation, 3);
    assert_eq!(p.next_public_key, None);
    assert!(set.rejected.is_empty() && set.pending.is_empty() && set.conflicts.is_empty());
    assert!(set.peer("node-2").is_none());
}

#[test]
fn self_not_in_list_is_fine() {
    let set = desired_peers("elsewhere", &[node(1)]);
    assert_eq!(names(&set), ["node-1"]);
}

#[test]
fn next_key_is_carried() {
    let mut n = node(1);
    n.annotations
        .insert(ANNOTATION_NEXT_PUBLIC_KEY.into(), key(101).to_base64());
    let set = desired_peers("node-9", &[n]);
    assert_eq!(set.peers[0].next_public_key, Some(key(101)));
}

#[test]
fn unpublished_nodes_are_pending_not_rejected() {
    let mut n = node(1);
    n.annotations.clear();
    let set = desired_peers("node-2", &[n, node(2), node(3)]);
    assert_eq!(set.pending, ["node-1"]);
    assert!(set.rejected.is_empty());
    assert_eq!(names(&set), ["node-3"]);
}

#[test]
fn invalid_annotations_reject_only_that_node() {
    let cases: Vec<(&str, String, &str)> = vec![
        (
            ANNOTATION_PUBLIC_KEY,
            "garbage".into(),
            "InvalidKeyEncoding",
        ),
        (ANNOTATION_PUBLIC_KEY, "AAAA".into(), "InvalidKeyLength"),
        (
            ANNOTATION_PUBLIC_KEY,
            PublicKey::from_bytes([0; 32]).to_base64(),
            "ZeroPublicKey",
        ),
        (
            ANNOTATION_PUBLIC_KEY,
            PublicKey::from_bytes({
                let mut u = [0; 32];
                u[0] = 1;
                u
            })
            .to_base64(),
            "LowOrderPublicKey",
        ),
        (ANNOTATION_ENDPOINT, "nope".into(), "InvalidEndpoint"),
        // An IPv6 endpoint of a node without an IPv6 address (an IPv4 one not among its
        // addresses follows its address instead: `readdressed_node_stays_a_peer_...`).
        (
            ANNOTATION_ENDPOINT,
            "[fd00::99]:51871".into(),
            "EndpointNotNodeAddress",
        ),
        (
            ANNOTATION_KEY_GENERATION,
            "-1".into(),
            "InvalidKeyGeneration",
        ),
        (ANNOTATION_NEXT_PUBLIC_KEY, "x".into(), "InvalidKeyEncoding"),
        (ANNOTATION_ROTATION, "X=y".into(), "InvalidRotationMark"),
    ];
    for (annotation, value, reason) in cases {
        let mut bad = node(1);
        bad.annotations.insert(annotation.into(), value.clone());
        let set = desired_peers("node-2", &[bad, node(2), node(3)]);
        assert_eq!(rejected(&set), [("node-1", reason)], "{annotation}={value}");
        assert_eq!(names(&set), ["node-3"]);
        let message = set.rejected[0].error.to_string();
        assert!(message.contains(annotation), "{message}");
    }
}

#[test]
fn readdressed_node_stays_a_peer_at_its_new_address() {
    // node-1 moved from 192.168.0.1 to 192.168.0.51: its Node says so, its endpoint annotation
    // (written by its agent, which has not noticed yet) still names the old address.
    let mut moved = node(1);
    let new_ip = ip("192.168.0.51");
    moved.addresses = vec![new_ip];
    let set = desired_peers("node-2", &[moved.clone(), node(2), node(3)]);
    assert!(set.rejected.is_empty(), "{:?}", set.rejected);
    assert_eq!(names(&set), ["node-1", "node-3"]);
    let p = set.peer("node-1").unwrap();
    assert_eq!(p.endpoint, SocketAddr::new(new_ip, DEFAULT_LISTEN_PORT));
    assert_eq!(p.public_key, key(1));
    assert_eq!(p.allowed_ips, [net("10.244.1.0/24")]);
    assert_eq!(set.stale_endpoints.len(), 1);
    let stale = &set.stale_endpoints[0];
    assert_eq!(stale.node, "node-1");
    assert_eq!(stale.reason(), "StaleEndpoint");
    assert_eq!(
        stale.endpoint.annotated,
        "192.168.0.1:51871".parse().unwrap()
    );
    assert_eq!(stale.endpoint.used, p.endpoint);
    assert!(stale.to_string().contains("node node-1"), "{stale}");

    // Its agent republishes: nothing stale any more, the same peer.
    moved
        .annotations
        .insert(ANNOTATION_ENDPOINT.into(), "192.168.0.51:51871".into());
    let set = desired_peers("node-2", &[moved, node(2), node(3)]);
    assert!(set.stale_endpoints.is_empty());
    assert_eq!(set.peer("node-1").unwrap().endpoint, p.endpoint);
}

#[test]
fn stale_endpoint_never_sends_to_an_address_the_node_does_not_have() {
    // node-1's annotation names node-3's address (a hijack attempt, or node-3 took over the
    // address node-1 left): node-1 is sent to at its own address, never at node-3's.
    let mut hijack = node(1);
    hijack
        .annotations
        .insert(ANNOTATION_ENDPOINT.into(), "192.168.0.3:51871".into());
    let set = desired_peers("node-2", &[hijack, node(2), node(3)]);
    assert_eq!(
        set.peer("node-1").unwrap().endpoint,
        "192.168.0.1:51871".parse().unwrap()
    );
    assert_eq!(
        set.peer("node-3").unwrap().endpoint,
        "192.168.0.3:51871".parse().unwrap()
    );
    assert_eq!(set.stale_endpoints.len(), 1);
    for peer in &set.peers {
        let view = node(peer.node.trim_start_matches("node-").parse().unwrap());
        assert!(view.addresses.contains(&peer.endpoint.ip()), "{peer:?}");
    }
    // A node without any address is not a peer: there is nowhere it claims to send to.
    let mut gone = node(1);
    gone.addresses.clear();
    let set = desired_peers("node-2", &[gone, node(2)]);
    assert_eq!(rejected(&set), [("node-1", "EndpointNotNodeAddress")]);
    assert!(set.stale_endpoints.is_empty());
    // A node rejected for another reason is not reported as stale as well.
    let mut twin = node(1);
    twin.addresses = vec![ip("192.168.0.61")];
    twin.annotations
        .insert(ANNOTATION_PUBLIC_KEY.into(), key(3).to_base64());
    let set = desired_peers("node-2", &[twin, node(2), node(3)]);
    assert_eq!(
        rejected(&set),
        [
            ("node-1", "DuplicatePublicKey"),
            ("node-3", "DuplicatePublicKey")
        ]
    );
    assert!(set.stale_endpoints.is_empty());
}

#[test]
fn same_public_key_rejects_both_nodes() {
    let mut b = node(2);
    b.annotations
        .insert(ANNOTATION_PUBLIC_KEY.into(), key(1).to_base64());
    let set = desired_peers("node-3", &[node(1), b, node(3), node(4)]);
    assert_eq!(
        rejected(&set),
        [
            ("node-1", "DuplicatePublicKey"),
            ("node-2", "DuplicatePublicKey")
        ]
    );
    assert_eq!(names(&set), ["node-4"]);
    match &set.rejected[0].error {
        RejectReason::DuplicateKey {
            key: k,
            other_nodes,
        } => {
            assert_eq!(*k, key(1));
            assert_eq!(other_nodes, &["node-2"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn next_key_colliding_with_another_nodes_key_rejects_both() {
    let mut b = node(2);
    b.annotations
        .insert(ANNOTATION_NEXT_PUBLIC_KEY.into(), key(1).to_base64());
    let mut c = node(3);
    let mut d = node(4);
    c.annotations
        .insert(ANNOTATION_NEXT_PUBLIC_KEY.into(), key(77).to_base64());
    d.annotations
        .insert(ANNOTATION_NEXT_PUBLIC_KEY.into(), key(77).to_base64());
    let set = desired_peers("node-9", &[node(1), b, c, d, node(5)]);
    assert_eq!(
        rejected(&set),
        [
            ("node-1", "DuplicatePublicKey"),
            ("node-2", "DuplicatePublicKey"),
            ("node-3", "DuplicatePublicKey"),
            ("node-4", "DuplicatePublicKey"),
        ]
    );
    assert_eq!(names(&set), ["node-5"]);
}

#[test]
fn a_node_may_announce_its_own_key_as_next() {
    let mut a = node(1);
    a.annotations
        .insert(ANNOTATION_NEXT_PUBLIC_KEY.into(), key(1).to_base64());
    let set = desired_peers("node-9", &[a]);
    assert_eq!(names(&set), ["node-1"]);
}

#[test]
fn a_node_claiming_our_published_key_is_rejected() {
    let mut thief = node(2);
    thief
        .annotations
        .insert(ANNOTATION_PUBLIC_KEY.into(), key(1).to_base64());
    let set = desired_peers("node-1", &[node(1), thief, node(3)]);
    assert_eq!(rejected(&set), [("node-2", "PublicKeyOfThisNode")]);
    assert_eq!(names(&set), ["node-3"]);

    // Our next key is ours too.
    let mut me = node(1);
    me.annotations
        .insert(ANNOTATION_NEXT_PUBLIC_KEY.into(), key(50).to_base64());
    let mut thief = node(2);
    thief
        .annotations
        .insert(ANNOTATION_NEXT_PUBLIC_KEY.into(), key(50).to_base64());
    let set = desired_peers("node-1", &[me, thief]);
    assert_eq!(rejected(&set), [("node-2", "PublicKeyOfThisNode")]);
}

#[test]
fn a_node_claiming_an_unpublished_local_key_is_rejected() {
    // We have not published yet (first start); someone already claims the key in our keystore.
    let mut me = node(1);
    me.annotations.clear();
    let mut thief = node(2);
    thief
        .annotations
        .insert(ANNOTATION_PUBLIC_KEY.into(), key(1).to_base64());
    assert_eq!(
        names(&desired_peers("node-1", &[me.clone(), thief.clone()])),
        ["node-2"]
    );
    let set = desired_peers_with_local_keys("node-1", &[key(1)], &[me, thief]);
    assert_eq!(rejected(&set), [("node-2", "PublicKeyOfThisNode")]);
    assert!(set.peers.is_empty());
}

#[test]
fn duplicate_views_of_one_node_are_rejected() {
    let set = desired_peers("node-9", &[node(1), node(1), node(2)]);
    assert_eq!(rejected(&set), [("node-1", "DuplicateNodeName")]);
    assert_eq!(names(&set), ["node-2"]);
}

/// [`desired_peers`] with the pod claims checked against `policy`.
fn peers_with_policy(self_name: &str, policy: &AddressPolicy, nodes: &[NodeView]) -> PeerSet {
    let claims = pod_claims(self_name, policy, nodes);
    desired_peers_with_claims(self_name, &[], nodes, &claims)
}

#[test]
fn pod_ips_outside_their_nodes_pod_cidrs_are_refused() {
    // Issue 13, finding 1: a node with podCIDRs may not claim pod IPs outside them.
    let mut a = node(1);
    a.pod_cidrs = vec![
        net("10.244.1.7/24"),
        net("fd00:1::/64"),
        net("10.244.1.0/25"),
    ];
    a.pod_ips = vec![
        ip("10.244.1.9"),
        ip("10.50.0.4"),
        ip("10.50.0.4"),
        ip("10.50.0.3"),
        ip("fd00:1::5"),
        ip("fd00:2::5"),
    ];
    let set = desired_peers("node-9", &[a]);
    assert_eq!(
        set.peers[0].allowed_ips,
        [net("10.244.1.0/24"), net("fd00:1::/64")]
    );
    let refused: Vec<_> = set.conflicts.iter().map(|c| c.prefix).collect();
    assert_eq!(
        refused,
        [
            net("10.50.0.3/32"),
            net("10.50.0.4/32"),
            net("fd00:2::5/128")
        ]
    );
    assert!(
        set.conflicts
            .iter()
            .all(|c| c.reason() == "PodIPOutsideNodePodCIDRs" && c.node == "node-1")
    );
}

#[test]
fn hostile_pod_addresses_never_become_allowed_ips() {
    // Issue 13, finding 1: the metadata server, loopback, multicast, a service address and an
    // address outside the cluster's pod range, claimed by a pod on node-2.
    let policy = AddressPolicy::new(&[net("10.244.0.0/16")], &[net("10.96.0.0/12")]);
    let mut b = node(2);
    b.pod_cidrs.clear();
    b.pod_ips = vec![
        ip("169.254.169.254"),
        ip("127.0.0.1"),
        ip("224.0.0.1"),
        ip("10.96.0.1"),
        ip("10.0.0.53"),
        ip("192.168.0.1"),
        ip("10.244.200.7"),
    ];
    let set = peers_with_policy("node-1", &policy, &[node(1), b]);
    assert_eq!(
        set.peer("node-2").unwrap().allowed_ips,
        [net("10.244.200.7/32")]
    );
    let reasons: BTreeSet<&str> = set.conflicts.iter().map(PrefixConflict::reason).collect();
    assert_eq!(
        reasons,
        BTreeSet::from([
            "PodAddressReserved",
            "PodAddressInServiceCIDR",
            "PodAddressOutsideClusterPodCIDRs",
        ])
    );
    assert_eq!(set.conflicts.len(), 6, "{:#?}", set.conflicts);
}

#[test]
fn shared_subnet_cni_needs_the_cluster_pod_cidrs() {
    // Azure CNI style: no podCIDRs, pods from a shared subnet. Without a configured cluster
    // range there is nothing to trust the pod IPs against: refused (fail closed).
    let mut a = node(1);
    let mut b = node(2);
    a.pod_cidrs.clear();
    b.pod_cidrs.clear();
    a.pod_ips = vec![ip("192.168.1.101"), ip("192.168.1.102")];
    b.pod_ips = vec![ip("192.168.1.201")];
    let closed = desired_peers("node-9", &[a.clone(), b.clone()]);
    assert!(closed.peers.iter().all(|p| p.allowed_ips.is_empty()));
    assert!(
        closed
            .conflicts
            .iter()
            .all(|c| c.reason() == "PodIPWithoutPodCIDRs")
    );
    let policy = AddressPolicy::new(&[net("192.168.1.0/24")], &[]);
    let set = peers_with_policy("node-9", &policy, &[a, b]);
    assert_eq!(
        set.peer("node-1").unwrap().allowed_ips,
        [net("192.168.1.101/32"), net("192.168.1.102/32")]
    );
    assert_eq!(
        set.peer("node-2").unwrap().allowed_ips,
        [net("192.168.1.201/32")]
    );
    assert!(set.conflicts.is_empty());
}

#[test]
fn identical_pod_cidrs_are_dropped_from_both_and_reported() {
    let mut b = node(2);
    b.pod_cidrs = vec![net("10.244.1.0/24"), net("10.244.2.0/24")];
    let set = desired_peers("node-9", &[node(1), b]);
    assert!(set.peer("node-1").unwrap().allowed_ips.is_empty());
    assert_eq!(
        set.peer("node-2").unwrap().allowed_ips,
        [net("10.244.2.0/24")]
    );
    assert_eq!(set.conflicts.len(), 2);
    assert!(
        set.conflicts
            .iter()
            .all(|c| c.reason() == "OverlappingPodPrefix")
    );
    assert_eq!(
        set.conflicts[0],
        PrefixConflict {
            node: "node-1".into(),
            prefix: net("10.244.1.0/24"),
            with: ConflictWith::Prefix {
                node: "node-2".into(),
                prefix: net("10.244.1.0/24")
            },
        }
    );
    assert!(set.conflicts[0].to_string().contains("overlaps"));
}

#[test]
fn nested_pod_cidrs_of_two_nodes_are_dropped_from_both() {
    let mut b = node(2);
    b.pod_cidrs = vec![net("10.244.0.0/16")];
    let set = desired_peers("node-9", &[node(1), b, node(3)]);
    assert!(set.peer("node-1").unwrap().allowed_ips.is_empty());
    assert!(set.peer("node-2").unwrap().allowed_ips.is_empty());
    assert!(set.peer("node-3").unwrap().allowed_ips.is_empty());
    // node-2's /16 overlaps two prefixes: two conflicts for it, one each for the others.
    assert_eq!(
        set.conflicts.iter().filter(|c| c.node == "node-2").count(),
        2
    );
    assert_eq!(set.conflicts.len(), 4);
}

#[test]
fn pod_ip_inside_another_nodes_pod_cidr_never_costs_that_node_its_range() {
    // Issue 13, finding 2: this used to drop node-1's podCIDR together with the claim, cutting
    // node-1 off. The assigned podCIDR wins; the claim is refused (and reported).
    let policy = AddressPolicy::new(&[net("10.244.0.0/16")], &[]);
    let mut b = node(2);
    b.pod_ips = vec![ip("10.244.1.50"), ip("10.244.2.9")];
    for set in [
        desired_peers("node-9", &[node(1), b.clone()]),
        peers_with_policy("node-3", &policy, &[node(1), b.clone(), node(3)]),
    ] {
        assert_eq!(
            set.peer("node-1").unwrap().allowed_ips,
            [net("10.244.1.0/24")]
        );
        assert_eq!(
            set.peer("node-2").unwrap().allowed_ips,
            [net("10.244.2.0/24")]
        );
        assert_eq!(set.conflicts.len(), 1, "{:#?}", set.conflicts);
        assert_eq!(set.conflicts[0].node, "node-2");
        assert_eq!(set.conflicts[0].prefix, net("10.244.1.50/32"));
    }
    // Without podCIDRs of its own (shared subnet) the claim loses against the assigned range
    // too.
    b.pod_cidrs.clear();
    let set = peers_with_policy("node-9", &policy, &[node(1), b]);
    assert_eq!(
        set.peer("node-1").unwrap().allowed_ips,
        [net("10.244.1.0/24")]
    );
    assert_eq!(
        set.peer("node-2").unwrap().allowed_ips,
        [net("10.244.2.9/32")]
    );
    assert_eq!(set.conflicts[0].reason(), "OverlappingPodPrefix");
}

#[test]
fn pod_ip_claimed_by_two_nodes_goes_to_the_oldest_pod() {
    let policy = AddressPolicy::new(&[net("10.99.0.0/16")], &[]);
    let mut a = node(1);
    let mut b = node(2);
    for v in [&mut a, &mut b] {
        v.pod_cidrs.clear();
        v.pod_ips = vec![ip("10.99.0.1")];
    }
    b.pod_ip_created.insert(ip("10.99.0.1"), 1_000);
    a.pod_ip_created.insert(ip("10.99.0.1"), 2_000);
    let set = peers_with_policy("node-9", &policy, &[a.clone(), b.clone()]);
    assert!(set.peer("node-1").unwrap().allowed_ips.is_empty());
    assert_eq!(
        set.peer("node-2").unwrap().allowed_ips,
        [net("10.99.0.1/32")]
    );
    assert_eq!(set.conflicts.len(), 1);
    assert_eq!(set.conflicts[0].reason(), "DuplicatePodIP");
    assert!(set.conflicts[0].to_string().contains("older pod"));
    // Same age: the lowest node name wins, whatever the input order.
    b.pod_ip_created.insert(ip("10.99.0.1"), 2_000);
    let set = peers_with_policy("node-9", &policy, &[b, a]);
    assert_eq!(
        set.peer("node-1").unwrap().allowed_ips,
        [net("10.99.0.1/32")]
    );
    assert!(set.peer("node-2").unwrap().allowed_ips.is_empty());
}

#[test]
fn a_local_pod_ip_is_never_taken_by_a_remote_claim() {
    let policy = AddressPolicy::new(&[net("10.99.0.0/16")], &[]);
    let mut me = node(1);
    let mut b = node(2);
    for v in [&mut me, &mut b] {
        v.pod_cidrs.clear();
    }
    me.pod_ips = vec![ip("10.99.0.1")];
    me.pod_ip_created.insert(ip("10.99.0.1"), 5_000);
    b.pod_ips = vec![ip("10.99.0.1"), ip("10.99.0.2")];
    b.pod_ip_created.insert(ip("10.99.0.1"), 1);
    let claims = pod_claims("node-1", &policy, &[me, b]);
    assert_eq!(claims.prefixes("node-1"), [net("10.99.0.1/32")]);
    assert_eq!(claims.prefixes("node-2"), [net("10.99.0.2/32")]);
    assert!(claims.accepts("node-1", ip("10.99.0.1")));
    assert!(!claims.accepts("node-2", ip("10.99.0.1")));
}

#[test]
fn peer_prefix_overlapping_ours_is_dropped_from_the_peer() {
    let mut b = node(2);
    b.pod_cidrs = vec![
        net("10.244.1.0/25"),
        net("10.244.2.0/24"),
        net("10.244.1.128/25"),
    ];
    b.pod_ips = vec![ip("10.244.1.200")];
    let set = desired_peers("node-1", &[node(1), b]);
    assert_eq!(
        set.peer("node-2").unwrap().allowed_ips,
        [net("10.244.2.0/24")]
    );
    assert_eq!(set.conflicts.len(), 2);
    assert!(set.conflicts.iter().all(|c| matches!(
        &c.with,
        ConflictWith::Prefix { node, prefix } if node == "node-1" && *prefix == net("10.244.1.0/24")
    )));
}

#[test]
fn prefix_containing_a_node_address_is_dropped() {
    // A podCIDR over the underlay would route tunnel packets into the tunnel.
    let mut b = node(2);
    b.pod_cidrs = vec![net("192.168.0.0/24"), net("10.244.2.0/24")];
    let set = desired_peers("node-9", &[node(1), b]);
    assert_eq!(
        set.peer("node-2").unwrap().allowed_ips,
        [net("10.244.2.0/24")]
    );
    assert!(!set.conflicts.is_empty());
    assert!(
        set.conflicts
            .iter()
            .all(|c| c.reason() == "PodPrefixContainsNodeAddress" && c.node == "node-2")
    );
    assert!(set.conflicts[0].to_string().contains("contains address"));
}

#[test]
fn host_network_pod_ips_are_dropped() {
    let mut a = node(1);
    a.pod_cidrs.clear();
    a.pod_ips = vec![ip("192.168.0.1"), ip("192.168.0.2"), ip("10.99.0.1")];
    let policy = AddressPolicy::new(
        &[
            net("10.99.0.0/16"),
            net("192.168.0.0/24"),
            net("10.244.0.0/16"),
        ],
        &[],
    );
    let set = peers_with_policy("node-9", &policy, &[a, node(2)]);
    assert_eq!(
        set.peer("node-1").unwrap().allowed_ips,
        [net("10.99.0.1/32")]
    );
    assert_eq!(set.conflicts.len(), 2);
    assert!(
        set.conflicts
            .iter()
            .all(|c| c.reason() == "PodPrefixContainsNodeAddress")
    );
}

#[test]
fn conflicts_only_touch_the_prefixes_involved() {
    let mut b = node(2);
    b.pod_cidrs.push(net("10.244.1.128/25"));
    let set = desired_peers("node-9", &[node(1), b, node(3)]);
    assert_eq!(
        set.peer("node-3").unwrap().allowed_ips,
        [net("10.244.3.0/24")]
    );
    assert_eq!(
        set.peer("node-2").unwrap().allowed_ips,
        [net("10.244.2.0/24")]
    );
    assert!(set.peer("node-1").unwrap().allowed_ips.is_empty());
}

#[test]
fn rotation_marks_do_not_affect_the_peer_set() {
    let mut a = node(1);
    a.annotations.insert(
        ANNOTATION_ROTATION.into(),
        RotationMark::new("r", RotationStep::Switched).to_string(),
    );
    let set = desired_peers("node-9", &[a]);
    assert_eq!(names(&set), ["node-1"]);
}

#[test]
fn reject_reasons_display() {
    let e = RejectReason::DuplicateKey {
        key: key(1),
        other_nodes: vec!["b".into(), "c".into()],
    };
    assert!(e.to_string().contains("b, c"));
    let e = RejectReason::DuplicateKey {
        key: key(1),
        other_nodes: (0..1000).map(|i| format!("node-{i}")).collect(),
    };
    let message = e.to_string();
    assert!(message.ends_with("node-4 and 995 more"), "{message}");
    assert_eq!(
        RejectReason::DuplicateNodeName.reason(),
        "DuplicateNodeName"
    );
    assert_eq!(
        RejectReason::KeyOfThisNode { key: key(1) }.reason(),
        "PublicKeyOfThisNode"
    );
}

// ---- properties ----

/// A small world with collisions likely: keys from a pool of 12, addresses and prefixes from
/// small pools, some broken annotations.
fn arb_view() -> impl Strategy<Value = NodeView> {
    (
        0u8..10,
        0u8..12,
        proptest::option::of(0u8..12),
        0u8..6,
        proptest::collection::vec((0u8..4, 22u8..=26), 0..3),
        proptest::collection::vec(0u8..40, 0..4),
        0u8..8,
    )
        .prop_map(|(n, k, next, a, cidrs, pods, broken)| {
            let addr = IpAddr::from([192, 168, 0, a]);
            let mut annotations = NodeAnnotations {
                public_key: key(k),
                endpoint: SocketAddr::new(addr, DEFAULT_LISTEN_PORT),
                key_generation: 1,
                next_public_key: next.map(|s| key(100 + s)),
                next_endpoint: None,
                rotation: None,
            }
            .render();
            match broken {
                0 => {
                    annotations.clear();
                }
                1 => {
                    annotations.insert(ANNOTATION_ENDPOINT.into(), "192.168.9.9:1".into());
                }
                _ => {}
            }
            NodeView {
                name: format!("n{n}"),
                annotations,
                addresses: vec![addr],
                pod_cidrs: cidrs
                    .into_iter()
                    .map(|(third, len)| IpNet::new(IpAddr::from([10, 0, third, 0]), len).unwrap())
                    .collect(),
                pod_ips: pods
                    .into_iter()
                    .map(|p| IpAddr::from([10, 0, p % 5, p]))
                    .collect(),
                pod_ip_created: Default::default(),
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn peer_set_is_independent_of_input_order(
        (views, perm) in proptest::collection::vec(arb_view(), 0..9)
            .prop_flat_map(|v| { let n = v.len(); (Just(v), Just((0..n).collect::<Vec<_>>()).prop_shuffle()) }),
        self_index in 0u8..10,
    ) {
        let self_name = format!("n{self_index}");
        let permuted: Vec<NodeView> = perm.iter().map(|i| views[*i].clone()).collect();
        prop_assert_eq!(desired_peers(&self_name, &views), desired_peers(&self_name, &permuted));
    }

    #[test]
    fn peer_set_invariants(views in proptest::collection::vec(arb_view(), 0..9), self_index in 0u8..10) {
        let self_name = format!("n{self_index}");
        let set = desired_peers(&self_name, &views);
        // Self is never anywhere; every other node is in exactly one list.
        let mut seen: Vec<&str> = set.peers.iter().map(|p| p.node.as_str())
            .chain(set.rejected.iter().map(|r| r.node.as_str()))
            .chain(set.pending.iter().map(String::as_str))
            .collect();
        prop_assert!(!seen.contains(&self_name.as_str()));
        seen.sort();
        let mut want: Vec<&str> = views.iter().map(|v| v.name.as_str()).filter(|n| *n != self_name).collect();
        want.sort();
        want.dedup();
        prop_assert_eq!(seen, want);
        // Sorted lists.
        prop_assert!(set.peers.windows(2).all(|w| w[0].node < w[1].node));
        prop_assert!(set.rejected.windows(2).all(|w| w[0].node < w[1].node));
        // No key claimed twice among peers, none of ours.
        let own: Vec<PublicKey> = views.iter().filter(|v| v.name == self_name)
            .flat_map(|v| published_keys(&v.annotations)).collect();
        let mut keys: Vec<PublicKey> = set.peers.iter()
            .flat_map(|p| std::iter::once(p.public_key).chain(p.next_public_key.filter(|n| *n != p.public_key)))
            .collect();
        for k in &keys { prop_assert!(!own.contains(k)); }
        keys.sort();
        let before = keys.len();
        keys.dedup();
        prop_assert_eq!(before, keys.len());
        // Allowed IPs sorted, unique, disjoint across peers and from every node address.
        let addresses: Vec<IpAddr> = views.iter().flat_map(|v| v.addresses.clone()).collect();
        let own_cidrs: Vec<IpNet> = views.iter().filter(|v| v.name == self_name)
            .flat_map(|v| v.pod_cidrs.clone()).collect();
        let mut all: Vec<(IpNet, &str)> = Vec::new();
        for p in &set.peers {
            prop_assert!(p.allowed_ips.windows(2).all(|w| w[0] < w[1]));
            for n in &p.allowed_ips {
                prop_assert!(addresses.iter().all(|a| !n.contains(a)), "{} holds an address", n);
                prop_assert!(own_cidrs.iter().all(|o| !o.contains(n) && !n.contains(o)));
                all.push((*n, &p.node));
            }
        }
        for (i, (a, na)) in all.iter().enumerate() {
            for (b, nb) in &all[i + 1..] {
                if na != nb {
                    prop_assert!(!a.contains(b) && !b.contains(a), "{} of {} overlaps {} of {}", a, na, b, nb);
                }
            }
        }
    }

    #[test]
    fn valid_disjoint_nodes_are_all_peers(count in 1u8..30, self_index in 0u8..30) {
        let views: Vec<NodeView> = (1..=count).map(node).collect();
        let set = desired_peers(&format!("node-{self_index}"), &views);
        let expect = if (1..=count).contains(&self_index) { count - 1 } else { count };
        prop_assert_eq!(set.peers.len(), usize::from(expect));
        prop_assert!(set.rejected.is_empty() && set.conflicts.is_empty());
    }
}

#[test]
fn large_cluster_is_fast_enough() {
    // 2000 nodes with 30 pod IPs each from a shared range (no podCIDRs): the sweep is
    // O(n log n).
    let views: Vec<NodeView> = (0..2000u32)
        .map(|i| {
            let b = i.to_be_bytes();
            let addr = IpAddr::from([172, 16, b[2], b[3]]);
            NodeView {
                name: format!("node-{i:04}"),
                annotations: NodeAnnotations {
                    public_key: PrivateKey::from_bytes({
                        let mut s = [7u8; 32];
                        s[..4].copy_from_slice(&b);
                        s
                    })
                    .public_key(),
                    endpoint: SocketAddr::new(addr, 51871),
                    key_generation: 0,
                    next_public_key: None,
                    next_endpoint: None,
                    rotation: None,
                }
                .render(),
                addresses: vec![addr],
                pod_cidrs: vec![],
                pod_ips: (0..30u8)
                    .map(|p| IpAddr::from([100, b[2], b[3], p]))
                    .collect(),
                pod_ip_created: Default::default(),
            }
        })
        .collect();
    let policy = AddressPolicy::new(&[net("100.0.0.0/8")], &[]);
    let set = peers_with_policy("node-0000", &policy, &views);
    assert_eq!(set.peers.len(), 1999);
    assert!(set.conflicts.is_empty());
    assert_eq!(set.peers[5].allowed_ips.len(), 30);
}
