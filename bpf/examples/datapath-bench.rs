//! Benchmark helper for `make bench` (bench/bench.py): loads the datapath in a node namespace,
//! attaches `from_pod`/`to_pod` to the host side of the given pod veths, writes the ipcache and
//! (optionally) about `--rules` policy-map entries generated through the `wiremesh-policy`
//! compiler from a synthetic cluster, checks that the measured flow is allowed and a neighbour
//! port is not, and then serves run-time statistics of the programs until stdin closes.
//!
//! ```text
//! datapath-bench --netns NODE --pin-dir DIR --iface HOST_A --iface HOST_B \
//!     --pod-a 10.211.1.2 --pod-b 10.211.2.2 --port 5201 --rules 1000
//! ```
//!
//! Prints one JSON line describing what was loaded, then answers every `stats` line on stdin
//! with a JSON line of `{program: {"id", "runs", "run_ns"}}` (run-time statistics are enabled
//! while this process lives), and every `testrun` line with the `from_pod` cost measured by
//! `BPF_PROG_TEST_RUN` (no network around it): `{"established_ns", "new_flow_ns",
//! "denied_ns"}` — a packet of an established flow a -> b, the first packet of a new allowed
//! flow (average over 2000 flows, fresh ports each time), and a packet policy denies (a -> b on the next port; `null`
//! without policy). The links stay pinned in `--pin-dir` after exit.

use std::{
    fmt::Write as _,
    io::{BufRead, Write},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd,
    path::PathBuf,
};

use anyhow::{Context, bail, ensure};
use wiremesh_bpf::{
    Config, EndpointValue, Hook, IpcacheValue, Loader, Mode,
    frame::{tcp_flags, tcp4},
    if_index, ipcache_flags,
};
use wiremesh_policy::{Compiled, Identity, Protocol, compile, load_manifest};

/// Namespaces of synthetic pods, and pods per namespace.
const NAMESPACES: usize = 10;
const PODS_PER_NS: usize = 10;

struct Args {
    netns: String,
    pin_dir: PathBuf,
    ifaces: Vec<String>,
    pod_a: Ipv4Addr,
    pod_b: Ipv4Addr,
    port: u16,
    rules: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut netns, mut pin_dir, mut ifaces) = (None, None, Vec::new());
    let (mut pod_a, mut pod_b, mut port, mut rules) = (None, None, 5201, 0);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--netns" => netns = Some(value()?),
            "--pin-dir" => pin_dir = Some(PathBuf::from(value()?)),
            "--iface" => ifaces.push(value()?),
            "--pod-a" => pod_a = Some(value()?.parse().context("--pod-a")?),
            "--pod-b" => pod_b = Some(value()?.parse().context("--pod-b")?),
            "--port" => port = value()?.parse().context("--port")?,
            "--rules" => rules = value()?.parse().context("--rules")?,
            other => bail!("unknown argument {other} (see the module docs of datapath-bench)"),
        }
    }
    Ok(Args {
        netns: netns.context("--netns is required")?,
        pin_dir: pin_dir.context("--pin-dir is required")?,
        ifaces,
        pod_a: pod_a.context("--pod-a is required")?,
        pod_b: pod_b.context("--pod-b is required")?,
        port,
        rules,
    })
}

/// The two measured pods, the synthetic cluster around them, and the policies that allow
/// exactly a -> b on the measured port (b's ingress by a named port, a's egress by an ipBlock
/// with an except and a port range).
fn cluster(a: Ipv4Addr, b: Ipv4Addr, port: u16, policies: usize) -> String {
    let mut y = String::new();
    let bo = b.octets();
    let _ = write!(
        y,
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: bench, labels: {{team: bench, env: prod}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: bench, labels: {{app: client, role: load}}}}
spec: {{containers: [{{name: c, image: x}}]}}
status: {{podIP: {a}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: bench, labels: {{app: server}}}}
spec: {{containers: [{{name: c, image: x, ports: [{{name: iperf, containerPort: {port}}}]}}]}}
status: {{podIP: {b}}}
"#
    );
    for n in 0..NAMESPACES {
        let env = if n % 2 == 0 { "prod" } else { "dev" };
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: svc{n}, labels: {{team: t{}, env: {env}}}}}\n",
            n % 5
        );
        for p in 0..PODS_PER_NS {
            let tier = ["front", "back", "db"][p % 3];
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{p}, namespace: svc{n}, labels: {{app: app{p}, tier: {tier}, version: v{}}}}}\nspec: {{containers: [{{name: c, image: x, ports: [{{name: http, containerPort: 8080}}, {{name: metrics, containerPort: 9090}}, {{name: dns, containerPort: 53, protocol: UDP}}]}}]}}\nstatus: {{podIP: 10.250.{n}.{}}}\n",
                n % 2,
                p + 1
            );
        }
    }
    if policies == 0 {
        return y;
    }
    let _ = write!(
        y,
        r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: server-in, namespace: bench}}
spec:
  podSelector: {{matchLabels: {{app: server}}}}
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{team: bench}}}}, podSelector: {{matchLabels: {{app: client}}}}}}]
    ports: [{{port: iperf}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: client-out, namespace: bench}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Ingress, Egress]
  egress:
  - to: [{{ipBlock: {{cidr: {}.{}.{}.0/24, except: [{}.{}.{}.128/25]}}}}]
    ports: [{{protocol: TCP, port: {}, endPort: {}}}]
  - to: [{{namespaceSelector: {{matchLabels: {{env: prod}}}}}}]
    ports: [{{protocol: UDP, port: dns}}]
"#,
        bo[0],
        bo[1],
        bo[2],
        bo[0],
        bo[1],
        bo[2],
        port.saturating_sub(1),
        port.saturating_add(9),
    );
    for i in 0..policies {
        y.push_str(&synthetic_policy(i));
    }
    y
}

/// The `i`-th synthetic policy: the rule kinds of docs/policy.md in turn.
fn synthetic_policy(i: usize) -> String {
    let ns = i % NAMESPACES;
    let app = (i / NAMESPACES) % PODS_PER_NS;
    let head = format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: svc{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: app{app}}}}}\n"
    );
    let body = match i % 6 {
        0 => "  ingress:\n  - from: [{podSelector: {matchLabels: {tier: front}}}]\n    ports: [{port: http}, {port: 9090}]\n".to_owned(),
        1 => format!(
            "  ingress:\n  - from: [{{namespaceSelector: {{matchLabels: {{team: t{}}}}}, podSelector: {{matchExpressions: [{{key: tier, operator: In, values: [front]}}]}}}}]\n    ports: [{{protocol: TCP, port: {}, endPort: {}}}]\n",
            i % 5,
            8000 + i % 50,
            8003 + i % 50
        ),
        2 => format!(
            "  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: 10.{}.0.0/16, except: [10.{}.128.0/17]}}}}]\n    ports: [{{protocol: UDP, port: 53}}, {{protocol: TCP, port: 443}}]\n",
            i % 200,
            i % 200
        ),
        3 => format!(
            "  ingress:\n  - from: [{{ipBlock: {{cidr: 172.16.{}.0/24}}}}]\n    ports: [{{protocol: SCTP, port: 3868}}]\n",
            i % 250
        ),
        4 => format!(
            "  ingress:\n  - from: [{{namespaceSelector: {{matchLabels: {{env: prod}}}}, podSelector: {{matchLabels: {{app: app{}}}}}}}]\n    ports: [{{protocol: TCP, port: {}}}, {{protocol: UDP, port: 6000}}]\n",
            (app + 3) % PODS_PER_NS,
            5000 + i % 100
        ),
        _ => format!(
            "  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: app{}}}}}}}]\n  egress:\n  - to: [{{namespaceSelector: {{matchLabels: {{team: t{}}}}}, podSelector: {{matchLabels: {{tier: db}}}}}}]\n    ports: [{{port: metrics}}, {{protocol: UDP, port: dns}}]\n",
            (app + 1) % PODS_PER_NS,
            i % 5
        ),
    };
    head + &body
}

fn compile_with(args: &Args, policies: usize) -> anyhow::Result<(Compiled, usize)> {
    let text = cluster(args.pod_a, args.pod_b, args.port, policies);
    let c = compile(&load_manifest(&text).context("generated manifest")?);
    ensure!(c.warnings.is_empty(), "compiler warnings: {:?}", c.warnings);
    Ok((c, policies))
}

/// The smallest number of synthetic policies whose compilation has at least `target` rule
/// entries (rules only grow as policies are added).
fn compile_for(args: &Args) -> anyhow::Result<(Compiled, usize)> {
    if args.rules == 0 {
        return compile_with(args, 0);
    }
    let (mut lo, mut hi) = (1usize, 1usize);
    while compile_with(args, hi)?.0.rules.len() < args.rules {
        ensure!(hi < 1 << 14, "cannot reach {} rules", args.rules);
        lo = hi + 1;
        hi *= 2;
    }
    while lo < hi {
        let mid = (lo + hi) / 2;
        if compile_with(args, mid)?.0.rules.len() >= args.rules {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    compile_with(args, hi)
}

fn enter_netns(name: &str) -> anyhow::Result<()> {
    let path = format!("/var/run/netns/{name}");
    let f = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    // SAFETY: a valid netns fd; this program is single-threaded here.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    ensure!(r == 0, "setns {path}: {}", std::io::Error::last_os_error());
    Ok(())
}

/// The `testrun` answer (see the module docs).
fn test_runs(
    loader: &Loader,
    args: &Args,
    ifindex: u32,
    denies: bool,
    round: u16,
) -> anyhow::Result<String> {
    const REPEAT: u32 = 200_000;
    const NEW_FLOWS: u16 = 2000;
    let b = SocketAddrV4::new(args.pod_b, args.port);
    let run = |frame: &[u8], repeat: u32| -> anyhow::Result<wiremesh_bpf::TestRun> {
        loader
            .test_run(Hook::FromPod, frame, ifindex, repeat)
            .with_context(|| format!("test run x{repeat} of a {}-byte frame", frame.len()))
    };
    let established = tcp4(SocketAddrV4::new(args.pod_a, 41000), b, tcp_flags::ACK, 0);
    ensure!(
        run(&established, 1)?.retval == 0,
        "the measured flow must pass"
    );
    let established_ns = run(&established, REPEAT)?.per_run.as_nanos();
    let mut total = 0u128;
    // Fresh source ports every round, so these flows are really new.
    let first = 20000 + (round % 20) * NEW_FLOWS;
    for sport in first..first + NEW_FLOWS {
        let syn = tcp4(SocketAddrV4::new(args.pod_a, sport), b, tcp_flags::SYN, 0);
        let r = run(&syn, 1)?;
        ensure!(r.retval == 0, "new flows to the measured port must pass");
        total += r.per_run.as_nanos();
    }
    let new_flow_ns = total / u128::from(NEW_FLOWS);
    let denied_ns = if denies {
        let next = SocketAddrV4::new(args.pod_b, args.port.wrapping_add(1));
        let syn = tcp4(
            SocketAddrV4::new(args.pod_a, 45000),
            next,
            tcp_flags::SYN,
            0,
        );
        let r = run(&syn, REPEAT)?;
        ensure!(r.retval == 2, "the next port must be dropped");
        r.per_run.as_nanos().to_string()
    } else {
        "null".to_owned()
    };
    Ok(format!(
        "{{\"established_ns\":{established_ns},\"new_flow_ns\":{new_flow_ns},\"denied_ns\":{denied_ns}}}"
    ))
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let (compiled, policies) = compile_for(&args)?;
    let (a, b) = (IpAddr::V4(args.pod_a), IpAddr::V4(args.pod_b));
    let (ea, eb) = (compiled.packet_end(a), compiled.packet_end(b));
    ensure!(
        compiled.decide(&ea, &eb, Protocol::Tcp, args.port),
        "the generated policy must allow the measured flow"
    );
    if policies > 0 {
        let other = args.port.wrapping_add(1);
        ensure!(
            !compiled.decide(&ea, &eb, Protocol::Tcp, other),
            "the generated policy must deny tcp/{other}"
        );
    }

    enter_netns(&args.netns)?;
    let mut loader = Loader::load(&args.pin_dir).context("loading the datapath")?;
    for iface in &args.ifaces {
        for hook in [Hook::FromPod, Hook::ToPod] {
            loader
                .attach(iface, hook)
                .with_context(|| format!("attaching {hook:?} to {iface}"))?;
        }
    }
    let local = [args.pod_a, args.pod_b];
    let remote_node = Ipv4Addr::new(192, 0, 2, 1);
    let maps = loader.maps();
    maps.set_config(&Config::new(0, Mode::Strict, Identity::HOST.0, 51820))?;
    let applied = maps.apply_policy(&compiled.diff(&Compiled::default()), |ip, id| {
        if local.contains(&ip) {
            IpcacheValue::new(id.0, 0, Ipv4Addr::UNSPECIFIED, ipcache_flags::LOCAL)
        } else {
            let flags = ipcache_flags::REMOTE_POD | ipcache_flags::ENCRYPT;
            IpcacheValue::new(id.0, 2, remote_node, flags)
        }
    })?;
    // Anti-spoofing entries, as the agent writes them: --iface order is pod a, pod b.
    for (iface, ip) in args.ifaces.iter().zip(local) {
        maps.upsert_endpoint(if_index(iface)?, EndpointValue::new(Some(ip), None))?;
    }
    let (isolated, rules) = maps.policy_counts();
    ensure!(
        rules == compiled.rules.len(),
        "rules map has {rules} entries"
    );
    println!(
        "{{\"policies\":{},\"rules\":{rules},\"isolated\":{isolated},\"cidrs\":{},\"endpoints\":{},\"written\":{}}}",
        policies + usize::from(policies > 0) * 2,
        compiled.cidrs.len(),
        compiled.endpoints.len(),
        applied.written
    );
    std::io::stdout().flush()?;

    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics")?;
    let ifindex_a = if_index(args.ifaces.first().context("--iface of pod a")?)?;
    let stdin = std::io::stdin();
    let mut round = 0u16;
    for line in stdin.lock().lines() {
        let line = line?;
        if line.trim() == "testrun" {
            let out = test_runs(&loader, &args, ifindex_a, policies > 0, round)?;
            round = round.wrapping_add(1);
            println!("{out}");
            std::io::stdout().flush()?;
            continue;
        }
        ensure!(line.trim() == "stats", "unknown command {line:?}");
        let mut out = String::from("{");
        for (n, hook) in [Hook::FromPod, Hook::ToPod].into_iter().enumerate() {
            let s = loader.program_stats(hook)?;
            let _ = write!(
                out,
                "{}\"{}\":{{\"id\":{},\"runs\":{},\"run_ns\":{}}}",
                if n > 0 { "," } else { "" },
                hook.program(),
                s.id,
                s.run_count,
                s.run_time.as_nanos()
            );
        }
        out.push('}');
        println!("{out}");
        std::io::stdout().flush()?;
    }
    Ok(())
}
