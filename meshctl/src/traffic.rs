//! Cross-node pod traffic for the demo and the scenario tests: ICMP (ping), a TCP echo and a UDP
//! echo between two pod network namespaces. Sockets are opened inside the namespaces (a thread
//! that entered them), so the traffic takes the pods' own routes: veth, node, tunnel, node, veth.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use wiremesh_integration::{command, netns};

/// One end of a flow: a pod's network namespace and address (either family: a dual-stack pod
/// is one end per address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEnd {
    pub name: String,
    pub netns: String,
    pub ip: IpAddr,
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

/// A ping every 10 ms from a pod to an address, running until [`LongPing::stop`] (the
/// demo's and the rotation test's "did a rotation lose a packet" probe).
pub struct LongPing {
    child: std::process::Child,
    /// Reads ping's output as it comes: a pipe nobody reads fills after ~800 replies (8 s) and
    /// then blocks ping.
    output: Option<thread::JoinHandle<String>>,
}

/// What a [`LongPing`] saw: the last request that got a reply, and how many replies came.
#[derive(Debug, Clone, PartialEq)]
pub struct PingCount {
    /// Requests up to the last answered one (a request in flight at the stop is not counted).
    pub sent: u32,
    pub received: u32,
    /// The first request before the last reply that got none (where a loss happened).
    pub first_lost: Option<u32>,
    /// The longest run of consecutive requests without a reply (10 ms apart).
    pub longest_gap: u32,
    /// Every reply: sequence number and arrival time (seconds since the Unix epoch).
    pub replies: Vec<(u32, f64)>,
}

impl PingCount {
    /// Requests before the last reply that got none.
    pub fn lost(&self) -> u32 {
        self.sent.saturating_sub(self.received)
    }

    /// The longest time between two consecutive replies, from their arrival times (while
    /// replies are missing ping sends less often than every 10 ms, so counting requests would
    /// understate a gap).
    pub fn longest_gap_time(&self) -> Duration {
        let longest = self
            .replies
            .windows(2)
            .map(|w| w[1].1 - w[0].1)
            .fold(0.0, f64::max);
        Duration::from_secs_f64(longest.max(0.0))
    }

    /// The arrival time of the reply that ended the longest gap (`None` without two replies).
    pub fn longest_gap_end(&self) -> Option<std::time::SystemTime> {
        let (_, end) = self
            .replies
            .windows(2)
            .map(|w| (w[1].1 - w[0].1, w[1].1))
            .reduce(|a, b| if b.0 > a.0 { b } else { a })?;
        Some(std::time::UNIX_EPOCH + Duration::from_secs_f64(end.max(0.0)))
    }

    /// When each lost request was about sent: between the replies around it, in proportion to
    /// its sequence number (ping sends every 10 ms; a reply comes about 1 ms after its request).
    pub fn lost_at(&self) -> Vec<std::time::SystemTime> {
        let mut out = Vec::new();
        for pair in self.replies.windows(2) {
            let ((s0, t0), (s1, t1)) = (pair[0], pair[1]);
            for s in s0 + 1..s1 {
                let t = t0 + (t1 - t0) * f64::from(s - s0) / f64::from(s1 - s0);
                out.push(std::time::UNIX_EPOCH + Duration::from_secs_f64(t.max(0.0)));
            }
        }
        if let Some((first, t)) = self.replies.first() {
            // Lost before the first reply: at most 10 ms apart, before it.
            for s in 1..*first {
                let t = t - 0.010 * f64::from(first - s);
                out.push(std::time::UNIX_EPOCH + Duration::from_secs_f64(t.max(0.0)));
            }
        }
        out.sort();
        out
    }

    /// The first reply that came at or after `at`.
    pub fn first_reply_after(&self, at: std::time::SystemTime) -> Option<std::time::SystemTime> {
        let at = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
        self.replies
            .iter()
            .map(|(_, t)| *t)
            .filter(|t| *t >= at)
            .reduce(f64::min)
            .map(|t| std::time::UNIX_EPOCH + Duration::from_secs_f64(t))
    }
}

impl LongPing {
    /// Starts `ping -i 0.010` in network namespace `netns` towards `ip`.
    pub fn start(netns: &str, ip: impl Into<IpAddr>) -> io::Result<Self> {
        let ip = ip.into();
        let child = std::process::Command::new("ip")
            .args([
                "netns", "exec", netns, "ping", "-n", "-D", "-i", "0.010", "-W", "2",
            ])
            .args(["-c", "1000000"])
            .arg(ip.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let mut child = child;
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout pipe"))?;
        let output = thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        Ok(Self {
            child,
            output: Some(output),
        })
    }

    /// Stops ping (SIGINT) and counts by sequence number: any missing reply before the last
    /// reply is a loss.
    pub fn stop(mut self) -> io::Result<PingCount> {
        // `ip netns exec` execs ping: the child's pid is ping's.
        let pid = libc::pid_t::try_from(self.child.id()).map_err(io::Error::other)?;
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGINT) };
        self.child.wait()?;
        let text = self
            .output
            .take()
            .ok_or_else(|| io::Error::other("stopped twice"))?
            .join()
            .map_err(|_| io::Error::other("ping output reader panicked"))?;
        Ok(count_replies(&text))
    }
}

/// Counts the replies in `ping -D` output by sequence number: any missing reply before the last
/// reply is a loss.
fn count_replies(text: &str) -> PingCount {
    let mut replies: Vec<(u32, f64)> = text
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            let seq = l
                .split("icmp_seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            let time = l
                .strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .and_then(|t| t.parse().ok())
                .unwrap_or(0.0);
            Some((seq, time))
        })
        .collect();
    replies.sort_by_key(|(s, _)| *s);
    replies.dedup_by_key(|(s, _)| *s);
    let seqs: Vec<u32> = replies.iter().map(|(s, _)| *s).collect();
    let first_lost =
        (1..=seqs.last().copied().unwrap_or(0)).find(|s| seqs.binary_search(s).is_err());
    let mut longest_gap = 0;
    let mut previous = 0;
    for s in &seqs {
        longest_gap = longest_gap.max(s.saturating_sub(previous + 1));
        previous = *s;
    }
    PingCount {
        sent: seqs.last().copied().unwrap_or(0),
        received: u32::try_from(seqs.len()).unwrap_or(u32::MAX),
        first_lost,
        longest_gap,
        replies,
    }
}

/// A TCP stream between two pods: the client writes 16 KiB every 10 ms until stopped, the server
/// reads and counts. Any error (a reset) is kept.
pub struct TcpRun {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    client: Option<thread::JoinHandle<Result<u64, String>>>,
    server: Option<thread::JoinHandle<Result<u64, String>>>,
}

impl TcpRun {
    /// Listens on `ip:port` in `server_ns` and connects to it from `client_ns`.
    pub fn start(
        server_ns: &str,
        client_ns: &str,
        ip: impl Into<IpAddr>,
        port: u16,
    ) -> io::Result<Self> {
        let ip = ip.into();
        use std::sync::atomic::Ordering;
        let listener = netns::within(server_ns, move || TcpListener::bind((ip, port)))
            .map_err(io::Error::other)??;
        let server = thread::spawn(move || -> Result<u64, String> {
            let (mut conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            conn.set_read_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 65536];
            let mut total = 0u64;
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => return Ok(total),
                    Ok(n) => total += n as u64,
                    Err(e) => return Err(format!("server read after {total} bytes: {e}")),
                }
            }
        });
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let client_ns = client_ns.to_string();
        let client = thread::spawn(move || -> Result<u64, String> {
            netns::within(&client_ns, move || -> Result<u64, String> {
                let addr = SocketAddr::from((ip, port));
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .map_err(|e| format!("connect {addr}: {e}"))?;
                s.set_write_timeout(Some(Duration::from_secs(30)))
                    .map_err(|e| e.to_string())?;
                let chunk = vec![0x5au8; 16 * 1024];
                let mut sent = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    s.write_all(&chunk)
                        .map_err(|e| format!("client write after {sent} bytes: {e}"))?;
                    sent += chunk.len() as u64;
                    thread::sleep(Duration::from_millis(10));
                }
                s.shutdown(std::net::Shutdown::Write)
                    .map_err(|e| format!("shutdown: {e}"))?;
                Ok(sent)
            })
            .map_err(|e| e.to_string())?
        });
        Ok(Self {
            stop,
            client: Some(client),
            server: Some(server),
        })
    }

    /// Stops the client; returns (bytes sent, bytes received) or the first error.
    pub fn finish(mut self) -> Result<(u64, u64), String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = self
            .client
            .take()
            .ok_or("finished twice")?
            .join()
            .map_err(|_| "client panicked".to_string())??;
        let received = self
            .server
            .take()
            .ok_or("finished twice")?
            .join()
            .map_err(|_| "server panicked".to_string())??;
        Ok((sent, received))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_output_counts_losses_gaps_and_times() {
        let text = "PING 10.244.2.11 (10.244.2.11) 56(84) bytes of data.
[1765100000.010000] 64 bytes from 10.244.2.11: icmp_seq=1 ttl=63 time=0.2 ms
[1765100000.020000] 64 bytes from 10.244.2.11: icmp_seq=2 ttl=63 time=0.2 ms
[1765100000.060000] 64 bytes from 10.244.2.11: icmp_seq=6 ttl=63 time=0.2 ms
[1765100000.080000] 64 bytes from 10.244.2.11: icmp_seq=8 ttl=63 time=0.2 ms
";
        let count = count_replies(text);
        assert_eq!((count.sent, count.received, count.lost()), (8, 4, 4));
        assert_eq!(count.first_lost, Some(3));
        assert_eq!(count.longest_gap, 3);
        assert!(
            count.longest_gap_time().abs_diff(Duration::from_millis(40)) < Duration::from_millis(1)
        );
        let at = std::time::UNIX_EPOCH + Duration::from_secs_f64(1_765_100_000.05);
        let first = count.first_reply_after(at).unwrap();
        let secs = first
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((secs - 1_765_100_000.06).abs() < 1e-3, "{secs}");
        let end = count.longest_gap_end().unwrap();
        let secs = end
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((secs - 1_765_100_000.06).abs() < 1e-3, "{secs}");
    }
}
