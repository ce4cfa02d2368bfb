//! Issue 14, the agent side of key rotation on the userspace datapath: real agents (each with
//! its coordinator, elected over the Lease, under the agent ServiceAccount) rotate every node of
//! a 3-node virtual cluster while a 10 ms ping and a TCP stream run between pods on different
//! nodes. Asserted: the rotation completes, no ping is lost, the TCP stream is never reset, every
//! node's public key changed and its generation went up by one, and a handshake initiated with a
//! retired key gets no answer from any peer on either slot, while the same probe with a key in
//! force is answered (checked last). Node namespaces run with strict `rp_filter`; the agents'
//! tunnel devices end with a loose one. Prints the measured numbers (docs/benchmarks.md).

#[path = "mesh_support/support.rs"]
mod support;
#[path = "rotation_support/under_traffic.rs"]
mod under_traffic;

use std::time::{Duration, Instant};

use meshctl::{rotate, traffic};
use support::*;
use under_traffic::*;
use wiremesh_integration::{Role, VirtualCluster, have_root};
use wiremesh_keyexchange::PublicKey;

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

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
    let ages_before = key_ages(&cluster).await;
    let before_rotation = Instant::now();
    // Strict reverse-path filtering in the node namespaces, as some distributions ship it: the
    // agent's loose rp_filter on both tunnel devices is what lets the asymmetric per-peer switch
    // through.
    strict_rp_filter(&cluster, &NODES);

    // What `make demo` runs (`meshctl demo rotate`): every node rotates while a 10 ms ping
    // pod-1-1 -> pod-2-1 and a TCP stream pod-2-1 -> pod-1-1 run; nothing lost, new keys one
    // generation up, retired keys refused by every peer.
    let rotated = rotate_all_under_traffic(&cluster, &NODES).await;
    assert_loose_rp_filter(&cluster, &NODES);

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

    // The slots alternated: every node's endpoint is on slot b now.
    assert_on_slot_b(&cluster, &NODES).await;

    // Revocation with one agent stopped: node-3's key is revoked while node-2's agent is down.
    // node-1 drops node-3's old key as soon as node-3 publishes its next key; the rotation fails
    // naming node-2 (it never prepares), and the ping between node-1 and node-2 keeps flowing.
    let cluster = revoke_with_a_stopped_agent(cluster, &rotated.new_keys).await;
    // The refusals above mean something: the same probe with a key in force is answered.
    assert_probe_answered(&cluster, "node-1", "node-2").await;
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
