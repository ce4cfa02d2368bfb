//! Shared by the datapath rotation scenarios (`rotation_traffic.rs` on the userspace device,
//! `mesh_kernel_vm.rs` on kernel WireGuard in the VM; included with `#[path]` next to
//! `mesh_support/support.rs` as `support`): a whole-cluster rotation under traffic with its
//! checks, the identity a node publishes, the keys in its keystore, its tunnel devices' peers,
//! and the proof that a retired key is refused (a WireGuard handshake initiation sent with it
//! gets no answer).
#![allow(dead_code, reason = "each test binary uses a part of the helpers")]

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use boringtun::{
    noise::{Tunn, TunnResult},
    x25519,
};
use meshctl::demo;
use wiremesh_integration::VirtualCluster;
use wiremesh_keyexchange::{Keystore, PrivateKey, PublicKey};

use super::support::{print_agent_logs, wait_async, wait_converged};

/// The mesh's listen port: slot a; slot b listens on the next port.
pub const LISTEN_PORT: u16 = 51871;

/// (public key, generation) a node publishes.
pub async fn identity(cluster: &VirtualCluster, node: &str) -> (String, u64) {
    let n = kube::Api::<k8s_openapi::api::core::v1::Node>::all(cluster.client().clone())
        .get(node)
        .await
        .expect("get node");
    let a = n.metadata.annotations.unwrap_or_default();
    (
        a.get("wiremesh.io/public-key").cloned().unwrap_or_default(),
        a.get("wiremesh.io/key-generation")
            .and_then(|g| g.parse().ok())
            .unwrap_or_default(),
    )
}

/// The current private key in `node`'s keystore.
pub fn private_key(cluster: &VirtualCluster, node: &str) -> PrivateKey {
    Keystore::new(cluster.work_dir().join("state").join(node))
        .load()
        .expect("keystore")
        .keys
        .current
}

/// Sends one handshake initiation from `own` to `peer` at `to` (from the test's namespace, over
/// the underlay bridge) and reports whether a valid handshake response came back within `wait`.
pub fn handshake_answered(
    own: &PrivateKey,
    peer: &PublicKey,
    to: SocketAddr,
    wait: Duration,
) -> bool {
    let secret = x25519::StaticSecret::from(*own.to_bytes());
    let peer = x25519::PublicKey::from(*peer.as_bytes());
    let mut tunn = Tunn::new(secret, peer, None, None, rand_index(), None);
    let mut out = vec![0u8; 2048];
    let packet = match tunn.format_handshake_initiation(&mut out, true) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no handshake initiation: {other:?}"),
    };
    let socket = UdpSocket::bind("0.0.0.0:0").expect("udp socket");
    socket.send_to(&packet, to).expect("send initiation");
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 2048];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        let Ok((n, _)) = socket.recv_from(&mut buf) else {
            return false;
        };
        let mut scratch = vec![0u8; 2048];
        if matches!(
            tunn.decapsulate(None, &buf[..n], &mut scratch),
            TunnResult::WriteToNetwork(_) | TunnResult::Done
        ) && tunn.time_since_last_handshake().is_some()
        {
            return true;
        }
    }
    false
}

fn rand_index() -> u32 {
    use std::io::Read;
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("/dev/urandom");
    u32::from_le_bytes(b) >> 8
}

/// The public keys of the peers on `ifname` in `node` (`wg show <if> peers`); an error when the
/// device does not answer.
pub fn peers_on(cluster: &VirtualCluster, node: &str, ifname: &str) -> Result<Vec<String>, String> {
    let out = cluster
        .exec_in_node(node, ["wg", "show", ifname, "peers"])
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// Asserts that a handshake with `retired` (a private key of `node` no longer in force) is
/// answered by none of `peers`, on either slot.
pub fn assert_refused(
    cluster: &VirtualCluster,
    node: &str,
    retired: &PrivateKey,
    peers: &[(&str, PublicKey)],
) {
    for (peer, peer_key) in peers {
        let ip = cluster.node(peer).expect("node").network.underlay_ip;
        for port in [LISTEN_PORT, LISTEN_PORT + 1] {
            let to = SocketAddr::new(ip.into(), port);
            assert!(
                !handshake_answered(retired, peer_key, to, Duration::from_millis(700)),
                "{peer} at {to} answered a handshake with {node}'s retired key"
            );
        }
    }
}

/// The two tunnel interfaces of `node`: slot a (named after its namespace) and slot b.
pub fn slot_interfaces(cluster: &VirtualCluster, node: &str) -> [String; 2] {
    let netns = cluster.node(node).expect("node").network.netns.clone();
    [netns.clone(), format!("{netns}b")]
}

/// The IPv4 `rp_filter` of `ifname` in `node`'s namespace, as the sysctl reads.
pub fn rp_filter(cluster: &VirtualCluster, node: &str, ifname: &str) -> Result<String, String> {
    let path = format!("/proc/sys/net/ipv4/conf/{ifname}/rp_filter");
    let out = cluster
        .exec_in_node(node, ["cat", path.as_str()])
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Strict reverse-path filtering (`net.ipv4.conf.all.rp_filter = 1`, the default of some
/// distributions) in every node namespace of `nodes`: a rotation switches each peer on each side
/// on its own, so packets arrive on one tunnel device while the route back points at the other;
/// only the agent's loose `rp_filter` on its tunnel devices lets them through.
pub fn strict_rp_filter(cluster: &VirtualCluster, nodes: &[&str]) {
    for node in nodes {
        let out = cluster
            .exec_in_node(
                node,
                ["sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=1"],
            )
            .expect("sysctl");
        assert!(out.status.success(), "{node}: sysctl rp_filter: {out:?}");
    }
}

/// Both tunnel devices of every node of `nodes` have a loose `rp_filter` (2), set by the agent.
pub fn assert_loose_rp_filter(cluster: &VirtualCluster, nodes: &[&str]) {
    for node in nodes {
        for ifname in slot_interfaces(cluster, node) {
            assert_eq!(
                rp_filter(cluster, node, &ifname).as_deref(),
                Ok("2"),
                "{node}: rp_filter of {ifname}"
            );
        }
    }
}

/// What [`rotate_all_under_traffic`] saw, in the order of `nodes`.
pub struct WholeRotation {
    /// (public key, generation) before and after.
    pub before: Vec<(String, u64)>,
    pub after: Vec<(String, u64)>,
    /// The private keys the rotation retired.
    pub retired: Vec<PrivateKey>,
    /// The new public keys.
    pub new_keys: Vec<PublicKey>,
}

/// `meshctl demo rotate` on a running cluster whose nodes are exactly `nodes`: every node rotates
/// while a 10 ms ping and a TCP stream run between pods on different nodes. Asserts that it
/// completed with no ping lost and no reset, that every node published a new key one generation
/// up and the mesh converged on it, and that a handshake initiated with each retired key is
/// refused by every peer on both slots.
pub async fn rotate_all_under_traffic(cluster: &VirtualCluster, nodes: &[&str]) -> WholeRotation {
    let mut before = Vec::new();
    for node in nodes {
        before.push(identity(cluster, node).await);
    }
    let retired: Vec<PrivateKey> = nodes.iter().map(|n| private_key(cluster, n)).collect();

    // What `make demo` runs: it prints the keys before and after and what was lost, and says
    // whether it completed with nothing lost and no reset.
    let clean = demo::rotate_under_traffic(&cluster.description())
        .await
        .expect("demo rotate");
    if !clean {
        print_agent_logs(cluster);
    }
    assert!(
        clean,
        "the rotation under traffic lost packets, reset the stream or did not complete"
    );

    // Every node has a new key, one generation up, and the mesh converged on it.
    // (Each agent publishes its new identity in its first pass after Complete.)
    let mut after = Vec::new();
    for (node, (old_key, old_gen)) in nodes.iter().zip(&before) {
        wait_async(
            &format!("{node} publishes its new key"),
            Duration::from_secs(30),
            || async move {
                match identity(cluster, node).await {
                    (key, _) if &key != old_key => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        let (key, generation) = identity(cluster, node).await;
        eprintln!("{node}: {old_key} (gen {old_gen}) -> {key} (gen {generation})");
        assert_ne!(&key, old_key, "{node} kept its key");
        assert_eq!(generation, old_gen + 1, "{node}'s generation");
        after.push((key, generation));
    }
    wait_converged(cluster).await;

    // A handshake with a retired key is refused by every peer, on both slots.
    let new_keys: Vec<PublicKey> = after
        .iter()
        .map(|(k, _)| PublicKey::from_base64(k).expect("key"))
        .collect();
    for (i, node) in nodes.iter().enumerate() {
        let peers: Vec<(&str, PublicKey)> = nodes
            .iter()
            .zip(&new_keys)
            .filter(|(p, _)| *p != node)
            .map(|(p, k)| (*p, *k))
            .collect();
        tokio::task::block_in_place(|| assert_refused(cluster, node, &retired[i], &peers));
    }
    WholeRotation {
        before,
        after,
        retired,
        new_keys,
    }
}

/// After one rotation of every node of `nodes` (exactly the cluster's nodes): every node's
/// endpoint is on slot b, its slot-a device is out of service (no peers) and its slot-b device
/// holds every other node.
pub async fn assert_on_slot_b(cluster: &VirtualCluster, nodes: &[&str]) {
    for node in nodes {
        let [a, b] = slot_interfaces(cluster, node);
        let n = kube::Api::<k8s_openapi::api::core::v1::Node>::all(cluster.client().clone())
            .get(node)
            .await
            .expect("node");
        let endpoint = n.metadata.annotations.unwrap_or_default()["wiremesh.io/endpoint"].clone();
        assert!(
            endpoint.ends_with(&format!(":{}", LISTEN_PORT + 1)),
            "{node}: {endpoint}"
        );
        assert_eq!(peers_on(cluster, node, &a), Ok(vec![]), "{node} slot a");
        assert_eq!(
            peers_on(cluster, node, &b).map(|p| p.len()),
            Ok(nodes.len() - 1),
            "{node} slot b"
        );
    }
}

/// The refusal probe can succeed: a handshake initiated with `node`'s key in force is answered by
/// `peer` at its published endpoint (the port of its current slot: participants alternate slots
/// with every completed rotation, rotating or not). Run it last: `peer` then takes the test's
/// socket as `node`'s endpoint until `node`'s next authenticated packet moves it back.
pub async fn assert_probe_answered(cluster: &VirtualCluster, node: &str, peer: &str) {
    let own = private_key(cluster, node);
    let (peer_key, _) = identity(cluster, peer).await;
    let peer_key = PublicKey::from_base64(&peer_key).expect("key");
    let endpoint = wiremesh_integration::objects::node_annotation(
        cluster.client(),
        peer,
        "wiremesh.io/endpoint",
    )
    .await
    .expect("get node")
    .expect("published endpoint");
    let to: SocketAddr = endpoint.parse().expect("endpoint");
    let answered = tokio::task::block_in_place(|| {
        handshake_answered(&own, &peer_key, to, Duration::from_secs(3))
    });
    assert!(
        answered,
        "{peer} at {to} did not answer a handshake with {node}'s key in force: the refusal \
         probe proves nothing"
    );
}
