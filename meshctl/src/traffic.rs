//! Cross-node pod traffic for the demo and the scenario tests: ICMP (ping), a TCP echo and a UDP
//! echo between two pod network namespaces. Sockets are opened inside the namespaces (a thread
//! that entered them), so the traffic takes the pods' own routes: veth, node, tunnel, node, veth.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use wiremesh_integration::{command, netns};

/// One end of a flow: a pod's network namespace and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEnd {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
}

/// Why an exchange failed; names both pods.
#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("{proto} {from} -> {to}: {what}: {source}")]
    Io {
        proto: &'static str,
        from: String,
        to: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{proto} {from} -> {to}: {message}")]
    Failed {
        proto: &'static str,
        from: String,
        to: String,
        message: String,
    },
}

fn io_err(
    proto: &'static str,
    from: &PodEnd,
    to: &PodEnd,
    what: &'static str,
) -> impl FnOnce(io::Error) -> TrafficError {
    let (from, to) = (from.name.clone(), to.name.clone());
    move |source| TrafficError::Io {
        proto,
        from,
        to,
        what,
        source,
    }
}

fn failed(proto: &'static str, from: &PodEnd, to: &PodEnd, message: String) -> TrafficError {
    TrafficError::Failed {
        proto,
        from: from.name.clone(),
        to: to.name.clone(),
        message,
    }
}

fn enter_err(source: netns::NetnsError) -> io::Error {
    io::Error::other(source.to_string())
}

/// `ping -c 1` from `from` to `to`, retried up to `attempts` times (1 s timeout each).
pub fn ping(from: &PodEnd, to: &PodEnd, attempts: u32) -> Result<(), TrafficError> {
    let mut last = String::new();
    for _ in 0..attempts.max(1) {
        let output = command::exec_in(
            &from.netns,
            ["ping", "-c", "1", "-W", "1", &to.ip.to_string()],
        )
        .map_err(|e| failed("icmp", from, to, e.to_string()))?;
        if output.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&output.stdout).trim().to_string();
    }
    Err(failed("icmp", from, to, format!("no reply: {last}")))
}

/// Sends `payload` over TCP from `from` to a listener in `to` and expects it echoed back.
pub fn tcp_echo(
    from: &PodEnd,
    to: &PodEnd,
    payload: &[u8],
    timeout: Duration,
) -> Result<(), TrafficError> {
    let listen_ip = to.ip;
    let listener = netns::within(&to.netns, move || {
        TcpListener::bind(SocketAddr::from((listen_ip, 0)))
    })
    .map_err(enter_err)
    .and_then(|r| r)
    .map_err(io_err("tcp", from, to, "listen"))?;
    let addr = listener
        .local_addr()
        .map_err(io_err("tcp", from, to, "listen address"))?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("tcp", from, to, "listen"))?;
    let expected = payload.len();
    let server = thread::spawn(move || -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let (mut conn, _) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(timeout))?;
        let mut buf = vec![0u8; expected];
        conn.read_exact(&mut buf)?;
        conn.write_all(&buf)
    });

    let client = netns::within(&from.netns, move || {
        TcpStream::connect_timeout(&addr, timeout)
    })
    .map_err(enter_err)
    .and_then(|r| r)
    .map_err(io_err("tcp", from, to, "connect"));
    let result = client.and_then(|mut stream| {
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io_err("tcp", from, to, "configure"))?;
        stream
            .write_all(payload)
            .map_err(io_err("tcp", from, to, "send"))?;
        let mut back = vec![0u8; payload.len()];
        stream
            .read_exact(&mut back)
            .map_err(io_err("tcp", from, to, "receive echo"))?;
        if back != payload {
            return Err(failed("tcp", from, to, "echo differs".into()));
        }
        Ok(())
    });
    let served = server
        .join()
        .map_err(|_| failed("tcp", from, to, "server thread panicked".into()))?;
    result?;
    served.map_err(io_err("tcp", from, to, "server"))
}

/// Sends `payload` in a UDP datagram from `from` to a socket in `to` and expects it echoed back;
/// retried up to `attempts` times.
pub fn udp_echo(
    from: &PodEnd,
    to: &PodEnd,
    payload: &[u8],
    timeout: Duration,
    attempts: u32,
) -> Result<(), TrafficError> {
    let (server_ip, client_ip) = (to.ip, from.ip);
    let server = netns::within(&to.netns, move || {
        UdpSocket::bind(SocketAddr::from((server_ip, 0)))
    })
    .map_err(enter_err)
    .and_then(|r| r)
    .map_err(io_err("udp", from, to, "bind server"))?;
    let server_addr = server
        .local_addr()
        .map_err(io_err("udp", from, to, "server address"))?;
    let client = netns::within(&from.netns, move || {
        UdpSocket::bind(SocketAddr::from((client_ip, 0)))
    })
    .map_err(enter_err)
    .and_then(|r| r)
    .map_err(io_err("udp", from, to, "bind client"))?;
    let per_try = timeout / attempts.max(1);
    server
        .set_read_timeout(Some(per_try))
        .map_err(io_err("udp", from, to, "configure"))?;
    client
        .set_read_timeout(Some(per_try))
        .map_err(io_err("udp", from, to, "configure"))?;

    let mut last = String::from("no attempt");
    for _ in 0..attempts.max(1) {
        client
            .send_to(payload, server_addr)
            .map_err(io_err("udp", from, to, "send"))?;
        let mut buf = vec![0u8; payload.len() + 64];
        let (n, peer) = match server.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) => {
                last = format!("server received nothing: {e}");
                continue;
            }
        };
        if &buf[..n] != payload {
            last = "server received a different payload".into();
            continue;
        }
        server
            .send_to(&buf[..n], peer)
            .map_err(io_err("udp", from, to, "echo"))?;
        match client.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == payload => return Ok(()),
            Ok(_) => last = "echo differs".into(),
            Err(e) => last = format!("no echo: {e}"),
        }
    }
    Err(failed("udp", from, to, last))
}
