//! Measures two floors under any userspace WireGuard engine on this machine, with no network
//! I/O at all, and prints them as one JSON object (used by `bench/bench.py`, variant `floor`):
//!
//! - `noise_gbps`: how fast one core runs boringtun's noise layer — the same `Tunn` our engine
//!   drives — encrypting each packet once (`encapsulate`) and decrypting it once (`decapsulate`),
//!   1420-byte IPv4 packets (the tunnel MTU), after a real handshake between two in-memory peers.
//!   Every byte a tunnel carries costs at least this much CPU, whatever its I/O does.
//! - `wake_cold_us` / `wake_warm_us`: how long a thread blocked in `read(2)` on a pipe takes to
//!   run after another thread writes to it, when the sleeper has been idle for 10 ms (as a
//!   tunnel worker between the packets of an idle ping) and when it slept only for the length of
//!   one round trip. A userspace tunnel that sleeps when idle pays such wake-ups on every round
//!   trip that the kernel's own datapath does not.
//!
//! Usage: `engine-floor [--seconds S] [--wakes N]`.

use std::{
    fs::File,
    io::{Read, Write},
    os::fd::FromRawFd,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use boringtun::{
    noise::{Tunn, TunnResult},
    x25519::{PublicKey, StaticSecret},
};

/// Inner packet size: the tunnel MTU, the size of every full TCP segment in the bulk runs.
const PACKET: usize = 1420;

fn main() -> Result<()> {
    let mut seconds = 1.0f64;
    let mut wakes = 200usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => seconds = args.next().context("--seconds needs a value")?.parse()?,
            "--wakes" => wakes = args.next().context("--wakes needs a value")?.parse()?,
            other => {
                bail!("unknown argument {other:?} (usage: engine-floor [--seconds S] [--wakes N])")
            }
        }
    }
    let noise = noise_gbps(Duration::from_secs_f64(seconds))?;
    let (cold, warm) = wake_latency(wakes)?;
    println!(
        "{}",
        serde_json::json!({
            "packet_bytes": PACKET,
            "noise_gbps": noise,
            "wake_cold_us": cold,
            "wake_warm_us": warm,
            "wakes": wakes,
        })
    );
    Ok(())
}

fn secret() -> Result<StaticSecret> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
    Ok(StaticSecret::from(bytes))
}

/// The datagram a `TunnResult` asks us to send, or an error naming what came instead.
fn to_network(r: TunnResult<'_>, what: &str) -> Result<Vec<u8>> {
    match r {
        TunnResult::WriteToNetwork(p) => Ok(p.to_vec()),
        TunnResult::Err(e) => bail!("{what}: {e:?}"),
        TunnResult::Done => bail!("{what}: nothing to send"),
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
            bail!("{what}: unexpected packet for the tunnel")
        }
    }
}

/// Two peers with a completed handshake and a confirmed session on both sides.
fn peers() -> Result<(Tunn, Tunn)> {
    let (ka, kb) = (secret()?, secret()?);
    let (pa, pb) = (PublicKey::from(&ka), PublicKey::from(&kb));
    let mut a = Tunn::new(ka, pb, None, None, 1, None);
    let mut b = Tunn::new(kb, pa, None, None, 2, None);
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let init = to_network(a.format_handshake_initiation(&mut buf, false), "initiation")?;
    let resp = to_network(b.decapsulate(None, &init, &mut out), "response")?;
    // The initiator answers the response with a keepalive, which confirms the session at b.
    let keepalive = to_network(a.decapsulate(None, &resp, &mut out), "keepalive")?;
    match b.decapsulate(None, &keepalive, &mut out) {
        TunnResult::Done => {}
        TunnResult::Err(e) => bail!("keepalive at responder: {e:?}"),
        _ => bail!("keepalive at responder: unexpected result"),
    }
    Ok((a, b))
}

fn ipv4_packet(len: usize) -> Vec<u8> {
    let mut p = vec![0xa5u8; len];
    p[0] = 0x45;
    p[1] = 0;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[4..8].fill(0);
    p[8] = 64;
    p[9] = 17;
    p[10..12].fill(0);
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p
}

/// Inner Gbit/s one core moves through encapsulate + decapsulate (median of three rounds).
fn noise_gbps(round: Duration) -> Result<f64> {
    let (mut a, mut b) = peers()?;
    let packet = ipv4_packet(PACKET);
    let mut wire = vec![0u8; PACKET + 64];
    let mut plain = vec![0u8; PACKET + 64];
    let mut rates = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let mut bytes = 0u64;
        while start.elapsed() < round {
            for _ in 0..256 {
                let len = match a.encapsulate(&packet, &mut wire) {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    _ => bail!("encapsulate did not produce a datagram"),
                };
                match b.decapsulate(None, &wire[..len], &mut plain) {
                    TunnResult::WriteToTunnelV4(p, _) if p.len() == PACKET => {}
                    TunnResult::Err(e) => bail!("decapsulate: {e:?}"),
                    _ => bail!("decapsulate did not return the packet"),
                }
                bytes += PACKET as u64;
            }
        }
        rates.push(bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9);
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[1])
}

fn pipe() -> Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median wake-up latency in microseconds: (after 10 ms idle, after one round trip's sleep).
fn wake_latency(n: usize) -> Result<(f64, f64)> {
    let (mut to_b_rx, mut to_b_tx) = pipe()?;
    let (mut to_a_rx, mut to_a_tx) = pipe()?;
    // When b woke up, for each round trip.
    let woke: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let woke_b = woke.clone();
    let echo = thread::spawn(move || -> std::io::Result<()> {
        let mut byte = [0u8; 1];
        loop {
            if to_b_rx.read(&mut byte)? == 0 {
                return Ok(());
            }
            let now = Instant::now();
            woke_b.lock().expect("lock").push(now);
            to_a_tx.write_all(&byte)?;
        }
    });
    let mut sent = Vec::with_capacity(n);
    let mut back = Vec::with_capacity(n);
    let mut byte = [0u8; 1];
    for _ in 0..n {
        thread::sleep(Duration::from_millis(10));
        sent.push(Instant::now());
        to_b_tx.write_all(&byte)?;
        to_a_rx.read_exact(&mut byte)?;
        back.push(Instant::now());
    }
    drop(to_b_tx);
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    let woke = woke.lock().expect("lock");
    if woke.len() != n {
        bail!("echo thread saw {} of {n} messages", woke.len());
    }
    let mut cold: Vec<f64> = (0..n)
        .map(|i| (woke[i] - sent[i]).as_secs_f64() * 1e6)
        .collect();
    let mut warm: Vec<f64> = (0..n)
        .map(|i| (back[i] - woke[i]).as_secs_f64() * 1e6)
        .collect();
    Ok((median(&mut cold), median(&mut warm)))
}
