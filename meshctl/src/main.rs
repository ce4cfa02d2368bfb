//! `meshctl`: the wiremesh operator CLI.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_agent::app::kube_client_from;
use meshctl::{demo, rotate, status};

mod kubeflags;
mod policy;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "wiremesh operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show per-node key, peers and handshakes; exit status 1 when the mesh is not converged.
    Status {
        #[command(flatten)]
        kube: kubeflags::KubeFlags,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: kubeflags::OutputFormat,
        /// Wait up to this many seconds for the mesh to converge before reporting.
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// Start or stop the local virtual cluster (needs root).
    Demo {
        #[command(subcommand)]
        command: DemoCommand,
    },
    /// Offline NetworkPolicy tools (`policy check -f FILE`).
    Policy(policy::PolicyArgs),
    /// Rotate the nodes' static WireGuard keys (creates a KeyRotation), or abort a rotation.
    Rotate(RotateArgs),
    /// Observe flows with their encryption evidence (like `hubble observe`), through the API
    /// server's node proxy.
    Flows(FlowsArgs),
    /// Write the signed compliance report of the mesh's traffic over a window (report.json,
    /// report.dsse.json, report.pub, report.html), or verify one (`report verify FILE`).
    Report(ReportArgs),
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct ReportArgs {
    #[command(subcommand)]
    command: Option<ReportCommand>,
    #[command(flatten)]
    kube: kubeflags::KubeFlags,
    /// The window: this long before now up to now (Go duration: 90s, 15m, 24h, 720h).
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    since: String,
    /// Directory to write the files into (created if missing).
    #[arg(long, default_value = "wiremesh-report", value_name = "DIR")]
    out: PathBuf,
    /// Sign with this PKCS#8 PEM Ed25519 key instead of the key in --signing-secret.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// The Secret (namespace/name) holding the signing key; created with a new key on first use.
    #[arg(long, default_value = meshctl::report::sign::DEFAULT_SECRET, value_name = "NS/NAME")]
    signing_secret: String,
}

#[derive(Subcommand)]
enum ReportCommand {
    /// Check a report.json: its digest, and the signature of report.dsse.json next to it; names
    /// the check that failed.
    Verify {
        /// The report.json to check.
        file: PathBuf,
        /// The signer's public key (PEM). Default: the public key in --signing-secret.
        #[arg(long, value_name = "PUB")]
        key: Option<PathBuf>,
        /// The DSSE envelope (default: report.dsse.json next to FILE).
        #[arg(long, value_name = "FILE")]
        signature: Option<PathBuf>,
        /// The Secret (namespace/name) whose public key to trust without --key.
        #[arg(long, default_value = meshctl::report::sign::DEFAULT_SECRET, value_name = "NS/NAME")]
        signing_secret: String,
    },
}

#[derive(clap::Args)]
struct FlowsArgs {
    #[command(flatten)]
    kube: kubeflags::KubeFlags,
    /// Keep polling the agents and print new records as they come.
    #[arg(short, long)]
    follow: bool,
    /// Read each agent's flow history over this past period (Go duration: 90s, 15m, 2h, 720h)
    /// instead of its live flow table.
    #[arg(long, value_name = "DURATION")]
    since: Option<String>,
    /// Only flows from or to this pod (`name` or `namespace/name`).
    #[arg(long)]
    pod: Option<String>,
    /// Only flows observed by this node.
    #[arg(long)]
    node: Option<String>,
    /// FORWARDED, DROPPED, or a wiremesh verdict (forwarded-encrypted, forwarded-plain,
    /// dropped-policy, dropped-plaintext, forwarded-local, too-big).
    #[arg(long)]
    verdict: Option<String>,
    /// Only pod-to-pod flows between nodes that were not encrypted.
    #[arg(long)]
    unencrypted: bool,
    /// Only flows with this source or destination port.
    #[arg(long)]
    port: Option<u16>,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: meshctl::flows::Format,
    /// With --follow: seconds between polls.
    #[arg(long, default_value_t = 1)]
    interval: u64,
}

#[derive(clap::Args)]
struct RotateArgs {
    /// Kubeconfig file (default: $KUBECONFIG, then in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Only the nodes this label selector picks (kubectl syntax); default every node.
    #[arg(long, value_name = "SELECTOR")]
    nodes: Option<String>,
    /// Compromised key: peers stop accepting the old keys at once (no overlap; costs packets).
    #[arg(long)]
    revoke: bool,
    /// Why the keys are rotated (kept in the rotation history).
    #[arg(long, default_value = "")]
    reason: String,
    /// How long each phase may wait for a node (Go duration, at least 10s).
    #[arg(long, value_name = "DURATION")]
    phase_timeout: Option<String>,
    /// Follow the rotation to Complete or Failed with a progress line; exit 1 unless Complete.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this long (Go duration).
    #[arg(long, default_value = "30m", value_name = "DURATION")]
    timeout: String,
    /// Ask the coordinator to stop the rotation NAME (nodes go back to their old keys).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["nodes", "revoke", "phase_timeout"])]
    abort: Option<String>,
}

#[derive(Subcommand)]
enum DemoCommand {
    /// Start testenv, nodes, pods and one agent per node; wait until the mesh is converged.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Pods on every node.
        #[arg(long, default_value_t = 2)]
        pods_per_node: u32,
        /// The mesh-agent executable (default: next to meshctl).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// Seconds to wait for convergence.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Dual stack: pods and nodes get IPv6 addresses and podCIDRs too (the underlay's
        /// tunnel endpoints stay IPv4); `demo traffic` then also runs over IPv6.
        #[arg(long)]
        dual_stack: bool,
    },
    /// Ping, TCP and UDP between every pair of pods on different nodes.
    Traffic,
    /// Each agent's eBPF flow table (`/flows`), summarised by verdict; fails when a node has
    /// recorded no encrypted flow (run after `demo traffic`).
    Flows,
    /// Rotate every node's key while a 10 ms ping and a TCP stream run between pods on different
    /// nodes; prints the keys before and after and the packets lost (exit 1 on any loss).
    Rotate,
    /// Inject a fault (docs/faults.md) while a 10 ms ping and a TCP stream run across nodes;
    /// prints what was lost and how long recovery took (exit 1 when the mesh did not behave as
    /// specified).
    Fault {
        #[command(subcommand)]
        kind: FaultCommand,
    },
    /// Print the admin kubeconfig path of the running demo.
    Kubeconfig,
    /// Remove everything `demo up` created.
    Down,
}

#[derive(Subcommand)]
enum FaultCommand {
    /// Stop the API server (agents' connections reset, testenv frozen) for a while.
    ApiserverStop {
        /// Seconds.
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
    },
    /// Delay every agent request by DELAY seconds each way, for DURATION seconds.
    ApiserverSlow {
        #[arg(long, default_value_t = 2.0)]
        delay: f64,
        #[arg(long, default_value_t = 20.0)]
        duration: f64,
    },
    /// Reboot NODE: kill its device and agent, clear its routes and pinned eBPF state, restart.
    NodeReboot {
        node: String,
        /// Also delete its keystore (it comes back with a new key).
        #[arg(long)]
        lose_keystore: bool,
        /// Seconds it stays down.
        #[arg(long = "for", default_value_t = 1.0)]
        down_for: f64,
    },
    /// Take NODE's underlay link down; with --for, bring it up again after that many seconds
    /// (under traffic, measured).
    UnderlayDown {
        node: String,
        #[arg(long = "for")]
        down_for: Option<f64>,
    },
    /// Bring NODE's underlay link up again.
    UnderlayUp { node: String },
    /// Move NODE to another underlay address (its Node's InternalIP follows, as a kubelet's).
    UnderlayReaddress {
        node: String,
        /// The new address (default: a spare one of the underlay subnet).
        #[arg(long)]
        ip: Option<std::net::Ipv4Addr>,
    },
    /// End NODE's agent for good; delete its Node object after DELETE_NODE_AFTER seconds.
    AgentGone {
        node: String,
        #[arg(long, default_value_t = 10.0)]
        delete_node_after: f64,
    },
}

async fn run_fault(kind: FaultCommand) -> anyhow::Result<ExitCode> {
    use meshctl::fault::Fault;
    let dir = demo::demo_dir();
    let path = dir.join("cluster.json");
    let mut description = demo::running(&dir)?;
    let secs = Duration::from_secs_f64;
    let fault = match kind {
        FaultCommand::ApiserverStop { duration } => Fault::ApiserverStop {
            duration: secs(duration),
        },
        FaultCommand::ApiserverSlow { delay, duration } => Fault::ApiserverSlow {
            delay: secs(delay),
            duration: secs(duration),
        },
        FaultCommand::NodeReboot {
            node,
            lose_keystore,
            down_for,
        } => Fault::NodeReboot {
            node,
            lose_keystore,
            down_for: secs(down_for),
        },
        FaultCommand::UnderlayDown {
            node,
            down_for: Some(down_for),
        } => Fault::UnderlayFlap {
            node,
            down_for: secs(down_for),
        },
        FaultCommand::UnderlayDown {
            node,
            down_for: None,
        } => {
            wiremesh_integration::faults::underlay_link(&description, &node, false)?;
            println!("==> {node}: underlay link down (`meshctl demo fault underlay-up {node}`)");
            return Ok(ExitCode::SUCCESS);
        }
        FaultCommand::UnderlayUp { node } => {
            wiremesh_integration::faults::underlay_link(&description, &node, true)?;
            println!("==> {node}: underlay link up");
            return Ok(ExitCode::SUCCESS);
        }
        FaultCommand::UnderlayReaddress { node, ip } => Fault::UnderlayReaddress { node, ip },
        FaultCommand::AgentGone {
            node,
            delete_node_after,
        } => Fault::AgentGone {
            node,
            delete_after: secs(delete_node_after),
        },
    };
    let client = kube_client_from(Some(&description.kubeconfig)).await?;
    let started = std::time::Instant::now();
    let report = meshctl::fault::run(&client, &mut description, &fault, |line| {
        println!("    [{:>5.1}s] {line}", started.elapsed().as_secs_f64());
    })
    .await?;
    // A readdressed node keeps its new address in cluster.json.
    description
        .write(&path)
        .with_context(|| format!("write {}", path.display()))?;
    for line in report.lines() {
        println!("    {line}");
    }
    Ok(if report.problems.is_empty() {
        println!("==> fault survived as specified");
        ExitCode::SUCCESS
    } else {
        println!("==> the mesh did NOT behave as specified");
        ExitCode::from(1)
    })
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Policy(args) => {
            policy::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rotate(args) => run_rotate(args).await,
        Command::Flows(args) => run_flows(args).await,
        Command::Report(args) => run_report(args).await,
        Command::Status { kube, output, wait } => {
            let client = kube.client().await?;
            let mut current = status::collect(&client).await?;
            if wait > 0 && !current.converged() {
                current =
                    match demo::wait_converged(&client, Duration::from_secs(wait), |_| {}).await {
                        Ok(s) => s,
                        Err(_) => status::collect(&client).await?,
                    };
            }
            print!("{}", kubeflags::render_status(&current, output)?);
            Ok(if current.converged() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Demo {
            command:
                DemoCommand::Up {
                    nodes,
                    pods_per_node,
                    agent_bin,
                    timeout,
                    dual_stack,
                },
        } => {
            let opts = demo::UpOptions {
                nodes,
                pods_per_node,
                agent_binary: agent_bin.unwrap_or_else(demo::default_agent_binary),
                timeout: Duration::from_secs(timeout),
                demo_dir: demo::demo_dir(),
                dual_stack,
            };
            let description = demo::up(&opts).await?;
            println!(
                "==> the mesh is up; cluster described in {}/cluster.json",
                demo::demo_dir().display()
            );
            println!("    kubeconfig: {}", description.kubeconfig.display());
            for pod in &description.pods {
                println!(
                    "    pod {:<10} {:<14} on {:<8} netns {}",
                    pod.name, pod.ip, pod.node, pod.netns
                );
            }
            if let Some(pod) = description.pods.first()
                && let Some(other) = description.pods.iter().find(|p| p.node != pod.node)
            {
                println!("    try: ip netns exec {} ping -c3 {}", pod.netns, other.ip);
            }
            println!(
                "    status: meshctl status --kubeconfig {}",
                description.kubeconfig.display()
            );
            println!("    stop: meshctl demo down");
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            command: DemoCommand::Traffic,
        } => {
            let description = demo::running(&demo::demo_dir())?;
            let (results, capture) = demo::traffic_with_capture(&description)?;
            let verdict = |r: &Result<(), meshctl::traffic::TrafficError>| {
                if r.is_ok() { "ok" } else { "FAILED" }
            };
            for r in &results {
                println!(
                    "    {:<10} ({}) -> {:<10} {:<14} ({})  icmp {:<6} tcp {:<6} udp {}",
                    r.from.name,
                    r.from_node,
                    r.to.name,
                    r.to.ip,
                    r.to_node,
                    verdict(&r.icmp),
                    verdict(&r.tcp),
                    verdict(&r.udp)
                );
                for error in [&r.icmp, &r.tcp, &r.udp]
                    .into_iter()
                    .filter_map(|x| x.as_ref().err())
                {
                    println!("        {error}");
                }
            }
            let ok = results.iter().filter(|r| r.ok()).count();
            println!(
                "==> {ok}/{} cross-node pod flows passed ICMP, TCP and UDP",
                results.len()
            );
            println!(
                "==> underlay capture on bridge {}: {}",
                description.bridge,
                capture.summary()
            );
            for violation in &capture.violations {
                println!("        {violation}");
            }
            if capture.clean() {
                println!(
                    "    only WireGuard between the nodes; the payload marker never crossed the wire in plaintext"
                );
            } else {
                println!("    NOT CLEAN: plaintext or unexpected traffic on the underlay");
            }
            Ok(
                if ok == results.len() && !results.is_empty() && capture.clean() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                },
            )
        }
        Command::Demo {
            command: DemoCommand::Flows,
        } => {
            let description = demo::running(&demo::demo_dir())?;
            let mut ok = true;
            let client = kube_client_from(Some(&description.kubeconfig)).await?;
            let agents =
                meshctl::agents::Agents::connect(client, Some(&description.kubeconfig)).await?;
            for (node, flows) in demo::agent_flows(&agents, &description).await {
                match flows {
                    Ok(flows) => {
                        let mut by_verdict = std::collections::BTreeMap::<String, u64>::new();
                        for f in &flows {
                            *by_verdict.entry(f.wiremesh_verdict.clone()).or_default() += f.packets;
                        }
                        let summary: Vec<String> = by_verdict
                            .iter()
                            .map(|(v, p)| format!("{v} {p} packets"))
                            .collect();
                        println!("    {node}: {} flows: {}", flows.len(), summary.join(", "));
                        if !by_verdict.contains_key("forwarded-encrypted") {
                            println!("        no flow was redirected into the tunnel");
                            ok = false;
                        }
                    }
                    Err(e) => {
                        println!("    {node}: {e}");
                        ok = false;
                    }
                }
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Demo {
            command: DemoCommand::Fault { kind },
        } => run_fault(kind).await,
        Command::Demo {
            command: DemoCommand::Kubeconfig,
        } => {
            let description = demo::running(&demo::demo_dir())?;
            println!("{}", description.kubeconfig.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            command: DemoCommand::Rotate,
        } => {
            let description = demo::running(&demo::demo_dir())?;
            Ok(if demo::rotate_under_traffic(&description).await? {
                println!("==> rotation complete: every key changed, nothing lost");
                ExitCode::SUCCESS
            } else {
                println!("==> rotation FAILED or lost traffic");
                ExitCode::from(1)
            })
        }
        Command::Demo {
            command: DemoCommand::Down,
        } => {
            if demo::down(&demo::demo_dir())? {
                println!("==> demo removed");
            } else {
                println!(
                    "==> no demo running ({}/cluster.json absent)",
                    demo::demo_dir().display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn run_flows(args: FlowsArgs) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;

    use meshctl::flows::{self, Filter, Follower};

    let filter = Filter {
        namespace: args.kube.namespace.clone(),
        pod: args.pod,
        node: args.node,
        verdict: args.verdict,
        unencrypted: args.unencrypted,
        port: args.port,
    };
    filter.validate()?;
    let since = args
        .since
        .as_deref()
        .map(|s| {
            wiremesh_crds::parse_go_duration(s)
                .with_context(|| format!("--since {s:?}"))
                .map(flows::since_unix)
        })
        .transpose()?;
    let client = args.kube.client().await?;
    let agents = meshctl::agents::Agents::connect(client, args.kube.kubeconfig.as_deref()).await?;
    let nodes = flows::nodes(&agents, &filter).await?;
    let gathered = flows::gather(&agents, &nodes, since, &filter).await;
    let mut unreachable = gathered.unreachable.len();
    for (node, error) in &gathered.unreachable {
        eprintln!("warning: {node}: {error}");
    }
    let mut follower = Follower::default();
    let first = follower.fresh(gathered.flows);
    print!("{}", flows::render(&first, args.output, true));
    if !args.follow {
        return Ok(if unreachable == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    // JSON arrays cannot be appended to: follow prints JSON lines after the first batch.
    let format = match args.output {
        flows::Format::Json => flows::Format::Jsonl,
        other => other,
    };
    let interval = Duration::from_secs(args.interval.max(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            () = tokio::time::sleep(interval) => {}
        }
        let gathered = flows::gather(&agents, &nodes, None, &filter).await;
        if gathered.unreachable.len() != unreachable {
            for (node, error) in &gathered.unreachable {
                eprintln!("warning: {node}: {error}");
            }
            unreachable = gathered.unreachable.len();
        }
        let fresh = follower.fresh(gathered.flows);
        let mut out = std::io::stdout().lock();
        write!(out, "{}", flows::render(&fresh, format, false))?;
        out.flush()?;
    }
}

async fn run_report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    use meshctl::report::{self, sign};

    if let Some(ReportCommand::Verify {
        file,
        key,
        signature,
        signing_secret,
    }) = args.command
    {
        let bytes = std::fs::read(&file).with_context(|| format!("read {}", file.display()))?;
        let envelope_file = signature.unwrap_or_else(|| report::envelope_path(&file));
        let envelope = std::fs::read(&envelope_file)
            .with_context(|| format!("read the signature {}", envelope_file.display()))?;
        let public = match key {
            Some(path) => {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("read --key {}", path.display()))?;
                sign::PublicKey::from_pem(&text, &path.display().to_string())?
            }
            None => {
                let client = args.kube.client().await?;
                sign::public_from_secret(&client, &signing_secret).await?
            }
        };
        return Ok(match sign::verify(&bytes, &envelope, &public) {
            Ok(v) => {
                println!(
                    "OK: {} digest {} matches its body and is signed by key {} ({})",
                    file.display(),
                    v.digest,
                    v.keyid,
                    envelope_file.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("FAILED: {}: {e}", file.display());
                ExitCode::from(1)
            }
        });
    }
    let since = wiremesh_crds::parse_go_duration(&args.since)
        .with_context(|| format!("--since {:?}", args.since))?;
    let client = args.kube.client().await?;
    let key = match &args.key_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read --key-file {}", path.display()))?;
            sign::SigningKey::from_pem(&text, &path.display().to_string())?
        }
        None => sign::SigningKey::from_secret_or_create(&client, &args.signing_secret).await?,
    };
    let agents =
        meshctl::agents::Agents::connect(client.clone(), args.kube.kubeconfig.as_deref()).await?;
    let inputs = report::gather(&client, &agents, since).await?;
    let made = report::build(&inputs, report::unix(std::time::SystemTime::now()));
    let written = report::write(&args.out, &made, &key)
        .with_context(|| format!("write the report into {}", args.out.display()))?;
    println!("==> report written to {}", written.json.display());
    println!(
        "    signature {} (key {}), page {}",
        written.envelope.display(),
        key.public().keyid(),
        written.html.display()
    );
    println!("    {}", report::coverage_line(&made));
    for gap in &made.gaps {
        println!(
            "    gap: {} {}: {}",
            gap.kind,
            gap.node.as_deref().unwrap_or("cluster"),
            gap.detail
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_rotate(args: RotateArgs) -> anyhow::Result<ExitCode> {
    use std::io::{IsTerminal, Write};

    let timeout = wiremesh_crds::parse_go_duration(&args.timeout)
        .with_context(|| format!("--timeout {:?}", args.timeout))?;
    let client = kube_client_from(args.kubeconfig.as_deref()).await?;
    let name = match &args.abort {
        Some(name) => {
            let by = format!("meshctl rotate --abort by {}", whoami());
            let rotation = rotate::abort(&client, name, &by).await?;
            if rotate::phase(&rotation).is_terminal() {
                println!("{name} already ended: {}", rotate::phase(&rotation));
                return Ok(ExitCode::SUCCESS);
            }
            println!("{name}: abort requested");
            name.clone()
        }
        None => {
            let options = rotate::RotateOptions {
                nodes: args.nodes.clone(),
                revoke: args.revoke,
                reason: args.reason.clone(),
                phase_timeout: args.phase_timeout.clone(),
            };
            let rotation = rotate::create(&client, &options).await?;
            let name = kube::ResourceExt::name_any(&rotation);
            println!("keyrotation.wiremesh.io/{name} created");
            name
        }
    };
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    // On a terminal the line is rewritten in place; in a log every change is its own line.
    let tty = std::io::stdout().is_terminal();
    let done = rotate::follow(&client, &name, timeout, |line| {
        let mut out = std::io::stdout().lock();
        if tty {
            let _ = write!(out, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    })
    .await;
    if tty {
        println!();
    }
    let rotation = done?;
    Ok(match rotate::phase(&rotation) {
        wiremesh_crds::RotationPhase::Complete => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}

/// Who asked, for the abort annotation ($USER when set).
fn whoami() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "an unnamed user".to_string())
}

fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    runtime.block_on(run(Cli::parse()))
}
