//! The engine with opt-in busy polling (`EngineConfig::busy_poll`): traffic crosses the tunnel
//! as without it, a worker keeps its CPU while packets keep coming (no sleep between pings
//! 10 ms apart with a 20 ms window), and once the traffic stops the workers go back to sleep:
//! an idle tunnel costs (almost) no CPU. Its own test binary, so that the `wm-dp-*` threads in
//! this process are this test's alone. Privileged: creates (and removes) its own namespaces.

#[path = "device_support/engines.rs"]
mod engines;
#[path = "device_support/netns.rs"]
mod netns;

use std::time::Duration;

use engines::*;
use netns::*;
use wiremesh_device::engine::EngineConfig;

/// CPU time used so far by this process's datapath worker threads (`wm-dp-*`).
fn datapath_cpu() -> Duration {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("wm-dp") {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised comm: state is 3rd, utime 14th, stime 15th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        ticks += f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
    }
    Duration::from_secs_f64(ticks as f64 / ticks_per_s)
}

#[test]
fn busy_polling_carries_traffic_keeps_polling_and_sleeps_when_idle() {
    require_root!();
    let t = two(|ifname| {
        let mut config = EngineConfig::new(ifname);
        config.busy_poll = Duration::from_millis(20);
        config
    });
    wait_for("ping a -> b", Duration::from_secs(20), || {
        t.pair.a.ping(T_B).then_some(())
    });
    tcp_roundtrip(&t.pair.b, &t.pair.a, T_B, 2 << 20);

    // Idle: the spin window is 20 ms, so within a few seconds a whole second passes with the
    // workers asleep in poll(2) (timers and keepalives are off on this tunnel).
    let idle = wait_for("datapath threads asleep", Duration::from_secs(20), || {
        let c0 = datapath_cpu();
        std::thread::sleep(Duration::from_secs(1));
        let used = datapath_cpu() - c0;
        (used < Duration::from_millis(100)).then_some(used)
    });

    // Pings 10 ms apart inside the 20 ms window: a worker at each end never sleeps.
    let c0 = datapath_cpu();
    let out = t
        .pair
        .a
        .exec(&["ping", "-q", "-c", "100", "-i", "0.01", "-W", "1", T_B]);
    let spinning = datapath_cpu() - c0;
    assert!(
        out.status.success(),
        "pings with busy polling failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        spinning > Duration::from_millis(200) && spinning > idle * 10,
        "busy polling did not keep a worker polling: {spinning:?} of CPU during ~1 s of pings \
         (idle second: {idle:?})"
    );

    // And it stops again.
    wait_for(
        "datapath threads asleep again",
        Duration::from_secs(20),
        || {
            let c0 = datapath_cpu();
            std::thread::sleep(Duration::from_secs(1));
            (datapath_cpu() - c0 < Duration::from_millis(100)).then_some(())
        },
    );
}
