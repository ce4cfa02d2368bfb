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
use meshctl::{demo, rotate};
use support::*;
use wiremesh_integration::{ClusterOptions, VirtualCluster, have_root, objects};
use wiremesh_keyexchange::{Keystore, PrivateKey, PublicKey};

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
const LISTEN_PORT: u16 = 51871;

/// The cluster with one pod per node and agents that stand for rotation coordinator.
async fn start_rotating_mesh() -> VirtualCluster {
    let mut cluster = VirtualCluster::start(ClusterOptions {
        nodes: 3,
        pods_per_node: 1,
        ..ClusterOptions::default()
    })
    .await
    .expect("start the virtual cluster");
    let client = cluster.client().clone();
    demo::install_crds(&client).await.expect("install CRDs");
    demo::set_mesh_enabled(&client, true).await.expect("enable");
    let identity = cluster.agent_identity().clone();
    objects::install_coordinator_rbac(&client, &identity.namespace, &identity.service_account)
        .await
        .expect("coordinator RBAC for the agent ServiceAccount");
    let agent = agent_binary();
    for node in NODES {
        let kubeconfig = cluster.node(node).expect("node").kubeconfig.clone();
        let args = [
            "--coordinator-kubeconfig".to_string(),
            kubeconfig.display().to_string(),
            "--lease-namespace".to_string(),
            identity.namespace.clone(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        demo::start_agent(&mut cluster, node, &agent, &args).expect("start agent");
    }
    wait_converged(&cluster).await;
    cluster
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

/// A ping with a large count, stopped with SIGINT (its summary counts what it sent).
struct LongPing {
    child: std::process::Child,
}

impl LongPing {
    fn start(cluster: &VirtualCluster, from: &str, to: &str) -> Self {
        let netns = cluster.pod(from).expect("pod").network.netns.clone();
        let ip = cluster.pod(to).expect("pod").network.ip.to_string();
        let child = std::process::Command::new("ip")
            .args([
                "netns", "exec", &netns, "ping", "-n", "-i", "0.010", "-W", "2",
            ])
            .args(["-c", "1000000", &ip])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start ping");
        Self { child }
    }

    /// (transmitted, received).
    fn stop(self) -> (u32, u32) {
        // `ip netns exec` execs ping: the child's pid is ping's.
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let out = self.child.wait_with_output().expect("ping output");
        let text = String::from_utf8_lossy(&out.stdout);
        let summary = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no ping summary in: {text}"));
        let number = |word: &str| -> u32 {
            summary
                .split(',')
                .find(|part| part.contains(word))
                .and_then(|part| part.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {word} count in {summary:?}"))
        };
        (number("transmitted"), number("received"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_rotation_under_traffic_loses_nothing_and_retires_the_old_keys() {
    if !have_root("network namespaces, TUN devices") {
        return;
    }
    let cluster = start_rotating_mesh().await;
    let client = cluster.client().clone();
    let mut before = Vec::new();
    for node in NODES {
        before.push(identity(&cluster, node).await);
    }
    let old_keys: Vec<PrivateKey> = NODES.iter().map(|n| private_key(&cluster, n)).collect();

    // Traffic across nodes: a 10 ms ping 1 -> 2 and a TCP stream 3 -> 1, through the rotation.
    let ping = LongPing::start(&cluster, "pod-1-1", "pod-2-1");
    let tcp = TcpFlow::start(&cluster, "pod-3-1", "pod-1-1", 7014);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let created = rotate::create(
        &client,
        &rotate::RotateOptions {
            nodes: None,
            revoke: false,
            reason: "rotation_traffic".into(),
            phase_timeout: Some("60s".into()),
        },
    )
    .await
    .expect("create the KeyRotation");
    let name = created.metadata.name.clone().expect("generated name");
    let done = rotate::follow(&client, &name, Duration::from_secs(240), |line| {
        eprintln!("[{:>5.1}s] {line}", started.elapsed().as_secs_f64())
    })
    .await;
    let rotation_time = started.elapsed();
    let done = match done {
        Ok(done) => done,
        Err(error) => {
            print_agent_logs(&cluster);
            panic!("rotation did not finish: {error}");
        }
    };
    if rotate::phase(&done) != wiremesh_crds::RotationPhase::Complete {
        print_agent_logs(&cluster);
        panic!("rotation ended {:?}", done.status);
    }
    // Let packets sent around the end arrive, then stop the traffic.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (transmitted, received) = ping.stop();
    let stream = tcp.finish();
    eprintln!(
        "rotation of {} nodes under traffic: Complete in {:.1} s; ping every 10 ms: {transmitted} \
         sent, {received} received, {} lost; TCP stream: {stream:?}",
        NODES.len(),
        rotation_time.as_secs_f64(),
        transmitted.saturating_sub(received),
    );
    if transmitted != received || stream.is_err() {
        print_agent_logs(&cluster);
    }
    assert_eq!(transmitted, received, "pings lost during the rotation");
    let (sent, got) = stream.expect("the TCP stream survived the rotation (no reset)");
    assert!(sent > 0 && got == sent, "TCP: sent {sent}, received {got}");

    // Every node has a new key, one generation up, and the mesh converged on it.
    let mut after = Vec::new();
    for (node, (old_key, old_gen)) in NODES.iter().zip(&before) {
        let (key, generation) = identity(&cluster, node).await;
        eprintln!("{node}: {old_key} (gen {old_gen}) -> {key} (gen {generation})");
        assert_ne!(&key, old_key, "{node} kept its key");
        assert_eq!(generation, old_gen + 1, "{node}'s generation");
        after.push(key);
    }
    wait_converged(&cluster).await;

    // A handshake with a retired key is refused by every peer, on both slots; the new key of the
    // same node is answered (the probe works). The positive probe roams the peer's endpoint for
    // that node to the host, so it runs last.
    let underlay = |node: &str| cluster.node(node).expect("node").network.underlay_ip;
    for (i, node) in NODES.iter().enumerate() {
        for (j, peer) in NODES.iter().enumerate() {
            if i == j {
                continue;
            }
            let peer_key = PublicKey::from_base64(&after[j]).expect("key");
            for port in [LISTEN_PORT, LISTEN_PORT + 1] {
                let to = SocketAddr::new(underlay(peer).into(), port);
                assert!(
                    !handshake_answered(&old_keys[i], &peer_key, to, Duration::from_millis(700)),
                    "{peer} at {to} answered a handshake with {node}'s retired key"
                );
            }
        }
    }
    let new_key = private_key(&cluster, "node-1");
    let peer_key = PublicKey::from_base64(&after[1]).expect("key");
    let to = SocketAddr::new(underlay("node-2").into(), LISTEN_PORT + 1);
    assert!(
        handshake_answered(&new_key, &peer_key, to, Duration::from_secs(3)),
        "node-2 did not answer node-1's new key at {to}: the probe does not work"
    );
    cluster.teardown().expect("teardown");
}
