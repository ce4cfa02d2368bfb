//! Issue 14, the agent side of key rotation on the userspace datapath: real agents (each with
//! its coordinator, elected over the Lease, under the agent ServiceAccount) rotate every node of
//! a 3-node virtual cluster while a 10 ms ping and a TCP stream run between pods on different
//! nodes. Asserted: the rotation completes, no ping is lost, the TCP stream is never reset, every
//! node's public key changed and its generation went up by one, and a handshake initiated with a
//! retired key gets no answer from any peer on either slot (while the new key gets one: the probe
//! works). Prints the measured numbers (docs/benchmarks.md).

#[path = "mesh_support/support.rs"]
mod support;

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use boringtun::{
    noise::{Tunn, TunnResult},
    x25519,
};
use meshctl::{demo, rotate, traffic};
use support::*;
use wiremesh_integration::{Role, VirtualCluster, have_root};
use wiremesh_keyexchange::{Keystore, PrivateKey, PublicKey};

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
const LISTEN_PORT: u16 = 51871;

/// Every node's key age as `meshctl status` shows it.
async fn key_ages(cluster: &VirtualCluster) -> Vec<Option<u64>> {
    let status = meshctl::status::collect(cluster.client())
        .await
        .expect("meshctl status");
    NODES
        .iter()
        .map(|n| status.node(n).and_then(|v| v.key_age_secs))
        .collect()
}

/// (public key, generation) a node publishes.
async fn identity(cluster: &VirtualCluster, node: &str) -> (String, u64) {
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

fn private_key(cluster: &VirtualCluster, node: &str) -> PrivateKey {
    Keystore::new(cluster.work_dir().join("state").join(node))
        .load()
        .expect("keystore")
        .keys
        .current
}

/// Sends one handshake initiation from `own` to `peer` at `to` (from the host, over the
/// underlay bridge) and reports whether a valid handshake response came back within `wait`.
fn handshake_answered(own: &PrivateKey, peer: &PublicKey, to: SocketAddr, wait: Duration) -> bool {
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
    let mut b = [0u8; 4];
    getrandom_fill(&mut b);
    u32::from_le_bytes(b) >> 8
}

fn getrandom_fill(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("/dev/urandom");
}

/// Creates a KeyRotation; returns its name.
async fn create_rotation(
    cluster: &VirtualCluster,
    nodes: Option<&str>,
    revoke: bool,
    phase_timeout: &str,
) -> String {
    let created = rotate::create(
        cluster.client(),
        &rotate::RotateOptions {
            nodes: nodes.map(str::to_string),
            revoke,
            reason: "rotation_traffic".into(),
            phase_timeout: Some(phase_timeout.into()),
        },
    )
    .await
    .expect("create the KeyRotation");
    created.metadata.name.clone().expect("generated name")
}

/// Follows rotation `name` to its end (printing its progress); returns it and the time since
/// `started`.
async fn follow_rotation(
    cluster: &VirtualCluster,
    name: &str,
    started: Instant,
) -> (wiremesh_crds::KeyRotation, Duration) {
    match rotate::follow(cluster.client(), name, Duration::from_secs(240), |line| {
        eprintln!("[{:>5.1}s] {line}", started.elapsed().as_secs_f64())
    })
    .await
    {
        Ok(done) => (done, started.elapsed()),
        Err(error) => {
            print_agent_logs(cluster);
            panic!("rotation did not finish: {error}");
        }
    }
}

/// The public keys of the peers on `ifname` in `node` (`wg show <if> peers`); an error when the
/// device does not answer.
fn peers_on(cluster: &VirtualCluster, node: &str, ifname: &str) -> Result<Vec<String>, String> {
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
fn assert_refused(
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

/// A 10 ms ping between two pods ([`meshctl::traffic::LongPing`]).
struct LongPing(traffic::LongPing);

impl LongPing {
    fn start(cluster: &VirtualCluster, from: &str, to: &str) -> Self {
        let netns = cluster.pod(from).expect("pod").network.netns.clone();
        let ip = cluster.pod(to).expect("pod").network.ip;
        Self(traffic::LongPing::start(&netns, ip).expect("start ping"))
    }

    /// (sent up to the last reply, received).
    fn stop(self) -> (u32, u32) {
        let count = self.0.stop().expect("ping output");
        (count.sent, count.received)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_rotation_under_traffic_loses_nothing_and_retires_the_old_keys() {
    if !have_root("network namespaces, TUN devices") {
        return;
    }
    let cluster = start_mesh(Shape::new(3, 1)).await;
    let client = cluster.client().clone();
    let mut before = Vec::new();
    for node in NODES {
        before.push(identity(&cluster, node).await);
    }
    let old_keys: Vec<PrivateKey> = NODES.iter().map(|n| private_key(&cluster, n)).collect();
    let ages_before = key_ages(&cluster).await;
    let before_rotation = Instant::now();

    // What `make demo` runs (`meshctl demo rotate`): every node rotates while a 10 ms ping
    // pod-1-1 -> pod-2-1 and a TCP stream pod-2-1 -> pod-1-1 run; it prints the keys before and
    // after and what was lost, and says whether it completed with nothing lost and no reset.
    let clean = demo::rotate_under_traffic(&cluster.description())
        .await
        .expect("demo rotate");
    if !clean {
        print_agent_logs(&cluster);
    }
    assert!(
        clean,
        "the rotation under traffic lost packets, reset the stream or did not complete"
    );

    // Every node has a new key, one generation up, and the mesh converged on it.
    // (Each agent publishes its new identity in its first pass after Complete.)
    let mut after = Vec::new();
    for (node, (old_key, old_gen)) in NODES.iter().zip(&before) {
        let c = &cluster;
        wait_async(
            &format!("{node} publishes its new key"),
            Duration::from_secs(30),
            || async move {
                match identity(c, node).await {
                    (key, _) if &key != old_key => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        let (key, generation) = identity(&cluster, node).await;
        eprintln!("{node}: {old_key} (gen {old_gen}) -> {key} (gen {generation})");
        assert_ne!(&key, old_key, "{node} kept its key");
        assert_eq!(generation, old_gen + 1, "{node}'s generation");
        after.push(key);
    }
    wait_converged(&cluster).await;

    // Key age (meshctl status, from the agents' reports, and the agents' metric): every key is
    // younger than the time since the rotation was started, and was older before it.
    let since = before_rotation.elapsed().as_secs() + 1;
    let c = &cluster;
    wait_async(
        "key ages reset by the rotation",
        Duration::from_secs(30),
        || async move {
            let ages = key_ages(c).await;
            if ages.iter().all(|a| a.is_some_and(|a| a <= since)) {
                Ok(())
            } else {
                Err(format!("ages {ages:?}, rotation started {since}s ago"))
            }
        },
    )
    .await;
    eprintln!("key ages before the rotation {ages_before:?}");
    assert!(ages_before.iter().all(Option::is_some), "{ages_before:?}");
    for node in NODES {
        let metrics = agent_metrics(&cluster, node).await.expect("metrics");
        let age: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("wiremesh_key_age_seconds "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{node}: no wiremesh_key_age_seconds in /metrics"));
        assert!(age <= since as f64 + 2.0, "{node}: key age metric {age}");
    }

    // The slots alternated: every node's endpoint is on slot b now, its slot-a device is out of
    // service (no peers) and the slot-b device holds both peers.
    for node in NODES {
        let netns = cluster.node(node).expect("node").network.netns.clone();
        let n = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
            .get(node)
            .await
            .expect("node");
        let endpoint = n.metadata.annotations.unwrap_or_default()["wiremesh.io/endpoint"].clone();
        assert!(
            endpoint.ends_with(&format!(":{}", LISTEN_PORT + 1)),
            "{node}: {endpoint}"
        );
        assert_eq!(
            peers_on(&cluster, node, &netns),
            Ok(vec![]),
            "{node} slot a"
        );
        assert_eq!(
            peers_on(&cluster, node, &format!("{netns}b")).map(|p| p.len()),
            Ok(2),
            "{node} slot b"
        );
    }

    // A handshake with a retired key is refused by every peer, on both slots.
    let new_public: Vec<PublicKey> = after
        .iter()
        .map(|k| PublicKey::from_base64(k).expect("key"))
        .collect();
    for (i, node) in NODES.iter().enumerate() {
        let peers: Vec<(&str, PublicKey)> = NODES
            .iter()
            .zip(&new_public)
            .filter(|(p, _)| *p != node)
            .map(|(p, k)| (*p, *k))
            .collect();
        assert_refused(&cluster, node, &old_keys[i], &peers);
    }

    // Revocation with one agent stopped: node-3's key is revoked while node-2's agent is down.
    // node-1 drops node-3's old key as soon as node-3 publishes its next key; the rotation fails
    // naming node-2 (it never prepares), and the ping between node-1 and node-2 keeps flowing.
    let cluster = revoke_with_a_stopped_agent(cluster, &new_public).await;
    cluster.teardown().expect("teardown");
}

async fn revoke_with_a_stopped_agent(
    cluster: VirtualCluster,
    keys: &[PublicKey],
) -> VirtualCluster {
    let client = cluster.client().clone();
    let node3_old = private_key(&cluster, "node-3");
    let (node3_key, node3_gen) = identity(&cluster, "node-3").await;
    cluster
        .hold_restarts("node-2", Role::Agent, true)
        .expect("hold");
    let killed = cluster
        .kill_supervised("node-2", Role::Agent)
        .expect("stop node-2's agent");
    let ping = LongPing::start(&cluster, "pod-1-1", "pod-2-1");
    let started = Instant::now();
    let name = create_rotation(&cluster, Some("kubernetes.io/hostname=node-3"), true, "10s").await;
    // node-1's current world (slot b since the first rotation) stops holding node-3's old key as
    // soon as node-3 publishes its next one, long before the rotation ends; from then on the old
    // key is refused there.
    let netns1 = cluster.node("node-1").expect("node").network.netns.clone();
    let old = keys[2].to_base64();
    let c = &cluster;
    wait_async(
        "node-1 drops node-3's revoked key",
        // The stopped agent may have held the coordinator Lease: another takes over within 15 s.
        Duration::from_secs(40),
        || {
            let result = peers_on(c, "node-1", &format!("{netns1}b"));
            let old = old.clone();
            async move {
                match result {
                    Ok(peers) if !peers.contains(&old) => Ok(()),
                    other => Err(format!("peers {other:?}")),
                }
            }
        },
    )
    .await;
    let dropped_after = started.elapsed();
    tokio::task::block_in_place(|| {
        assert_refused(&cluster, "node-3", &node3_old, &[("node-1", keys[0])])
    });
    let (failed, _) = follow_rotation(&cluster, &name, started).await;
    let (transmitted, received) = ping.stop();
    let status = failed.status.clone().unwrap_or_default();
    eprintln!(
        "revocation of node-3 with node-2's agent stopped: node-1 dropped the old key after \
         {:.1} s; the rotation ended {:?} naming {:?}; ping node-1 -> node-2: {transmitted} \
         sent, {} lost",
        dropped_after.as_secs_f64(),
        status.phase,
        status.failed_nodes,
        transmitted.saturating_sub(received)
    );
    assert_eq!(rotate::phase(&failed), wiremesh_crds::RotationPhase::Failed);
    assert_eq!(status.failed_nodes, vec!["node-2".to_string()]);
    assert_eq!(
        transmitted, received,
        "pings lost while the rotation failed"
    );
    assert_eq!(
        identity(&cluster, "node-3").await,
        (node3_key.clone(), node3_gen),
        "a rotation failed in Preparing keeps the old keys"
    );

    // node-2's agent comes back; the revocation is repeated, and node-1's agent is killed right
    // after the rotation was created: it restarts, resumes, and the rotation completes without a
    // lost ping.
    cluster
        .hold_restarts("node-2", Role::Agent, false)
        .expect("release");
    wait_restarted(&cluster, "node-2", Role::Agent, killed);
    wait_converged(&cluster).await;
    let before: Vec<(String, u64)> = {
        let mut v = Vec::new();
        for node in NODES {
            v.push(identity(&cluster, node).await);
        }
        v
    };
    let node3_old = private_key(&cluster, "node-3");
    let ping = LongPing::start(&cluster, "pod-1-1", "pod-2-1");
    let started = Instant::now();
    let name = create_rotation(&cluster, Some("kubernetes.io/hostname=node-3"), true, "60s").await;
    cluster
        .kill_supervised("node-1", Role::Agent)
        .expect("kill -9 node-1's agent");
    let (done, took) = follow_rotation(&cluster, &name, started).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (transmitted, received) = ping.stop();
    eprintln!(
        "revocation of node-3 with node-1's agent killed mid-rotation: {:?} in {:.1} s; ping \
         node-1 -> node-2: {transmitted} sent, {} lost",
        rotate::phase(&done),
        took.as_secs_f64(),
        transmitted.saturating_sub(received)
    );
    if rotate::phase(&done) != wiremesh_crds::RotationPhase::Complete {
        print_agent_logs(&cluster);
        panic!("revocation ended {:?}", done.status);
    }
    assert_eq!(transmitted, received, "pings lost during the revocation");
    let mut now = Vec::new();
    for node in NODES {
        now.push(identity(&cluster, node).await);
    }
    assert_eq!(now[0], before[0], "node-1 was not selected");
    assert_eq!(now[1], before[1], "node-2 was not selected");
    assert_ne!(now[2].0, before[2].0, "node-3's key changed");
    assert_eq!(now[2].1, before[2].1 + 1, "node-3's generation");
    let key = |i: usize| PublicKey::from_base64(&now[i].0).expect("key");
    tokio::task::block_in_place(|| {
        assert_refused(
            &cluster,
            "node-3",
            &node3_old,
            &[("node-1", key(0)), ("node-2", key(1))],
        )
    });
    drop(client);
    cluster
}
