//! Pod MTU above the tunnel's in the virtual cluster: two pods on different nodes whose veths
//! have MTU 1500 (the cluster's default is the tunnel MTU, 1420; both ends at 1500 so TCP's MSS
//! is not clamped by the receiver) move a bulk TCP transfer in Strict mode. `from_pod` hands its too-big packets to the routing stack, whose ICMP
//! "fragmentation needed" teaches the pod the path MTU; its packets then fit and are redirected
//! into the tunnel (forwarded-encrypted), so the transfer completes instead of stalling. The
//! too-big packets are recorded as `too-big`, not as encrypted.

#[path = "mesh_support/support.rs"]
mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use support::*;

const LEN: usize = 8 << 20;
const PORT: u16 = 5201;

/// A listener on the pod's address and [`PORT`], in its namespace.
fn bulk_receiver(cluster: &wiremesh_integration::VirtualCluster, pod: &str) -> TcpListener {
    let p = cluster.pod(pod).expect("pod");
    let ip = p.network.ip;
    wiremesh_integration::netns::within(&p.network.netns, move || TcpListener::bind((ip, PORT)))
        .expect("enter pod namespace")
        .unwrap_or_else(|e| panic!("listen on {ip}:{PORT}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_with_mtu_1500_gets_bulk_tcp_through_the_tunnel_in_strict_mode() {
    let Some(cluster) = start_mesh_or_skip(Shape::new(2, 1)).await else {
        return;
    };
    // Both pods' veths (both ends) go to 1500, above the tunnel's 1420.
    for name in ["pod-1-1", "pod-2-1"] {
        let p = cluster.pod(name).expect("pod").network.clone();
        wiremesh_integration::command::ip_in(
            &p.node_netns,
            ["link", "set", &p.node_link, "mtu", "1500"],
        )
        .expect("host side MTU");
        wiremesh_integration::command::ip_in(&p.netns, ["link", "set", "eth0", "mtu", "1500"])
            .expect("pod side MTU");
        let link = wiremesh_integration::command::ip_in(&p.netns, ["-o", "link", "show", "eth0"])
            .expect("ip link");
        assert!(link.contains(" mtu 1500 "), "{link}");
    }
    let pod = cluster.pod("pod-1-1").expect("pod").network.clone();

    set_mesh_mode(&cluster, "Strict").await;
    let c = &cluster;
    wait_async(
        "node-1 strict, with one pod above the tunnel MTU",
        Duration::from_secs(20),
        || async move {
            let m = agent_metrics(c, "node-1").await?;
            if m.contains("wiremesh_ebpf_strict_mode 1")
                && m.contains("wiremesh_pods_mtu_above_tunnel 1\n")
            {
                Ok(())
            } else {
                Err("not strict yet or the pod's MTU not seen".to_string())
            }
        },
    )
    .await;
    let _server = EchoServer::start(&cluster, "pod-2-1", 80);
    expect_reachability(
        &cluster,
        "strict mode, tunnel up",
        Duration::from_secs(15),
        &[("pod-1-1", "pod-2-1", 80, true)],
    )
    .await;

    let listener = bulk_receiver(&cluster, "pod-2-1");
    let receiver = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut buf = vec![0u8; 65536];
        let mut got = 0usize;
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 {
                break;
            }
            got += n;
        }
        got
    });
    let to = SocketAddr::from((cluster.pod("pod-2-1").expect("pod").network.ip, PORT));
    let started = Instant::now();
    let sent = tokio::task::block_in_place(|| {
        wiremesh_integration::netns::within(&pod.netns, move || -> Result<(), String> {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .map_err(|e| format!("connect {to}: {e}"))?;
            s.set_write_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
            s.write_all(&vec![0x5a; LEN])
                .map_err(|e| format!("send: {e}"))?;
            s.shutdown(std::net::Shutdown::Write)
                .map_err(|e| e.to_string())
        })
        .expect("enter pod namespace")
    });
    let got = tokio::task::block_in_place(|| receiver.join().expect("receiver"));
    eprintln!(
        "{LEN} bytes from a 1500-MTU pod in {:?} (sender: {sent:?})",
        started.elapsed()
    );
    assert_eq!(
        got, LEN,
        "the bulk transfer must complete (sender: {sent:?})"
    );
    // The node's "fragmentation needed" taught the pod the tunnel's path MTU.
    let route =
        wiremesh_integration::command::ip_in(&pod.netns, ["route", "get", &to.ip().to_string()])
            .expect("ip route get");
    assert!(
        route.contains("mtu 1420"),
        "pod-1-1 learned the path MTU 1420 towards pod-2-1: {route}"
    );
    let flows = agent_flows(&cluster, "node-1").await;
    assert!(
        has_flow(
            &flows,
            "pod-1-1",
            "pod-2-1",
            Some(PORT),
            "forwarded-encrypted"
        ),
        "the transfer went through the tunnel: {flows:#?}"
    );
    assert!(
        has_flow(&flows, "pod-1-1", "pod-2-1", Some(PORT), "too-big"),
        "the packets above the tunnel MTU are recorded as handed to the stack, not as \
         encrypted: {flows:#?}"
    );
    assert!(
        !has_flow(&flows, "pod-1-1", "pod-2-1", None, "dropped-plaintext"),
        "nothing left in plaintext: {flows:#?}"
    );

    cluster.teardown().expect("teardown");
}
