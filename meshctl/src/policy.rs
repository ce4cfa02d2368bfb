//! `meshctl policy`: offline NetworkPolicy tools over a manifest file, using the same compiler
//! the agent loads into the eBPF maps.

mod output;
mod probe;

use std::{io::Read, path::PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};

pub use probe::ProbePort;

/// `meshctl policy ...`
#[derive(Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// For every ordered pair of distinct pods in FILE and every --port, say whether traffic is
    /// allowed, once per address family both pods have (dual stack: IPv4 and IPv6, each pod at
    /// its address of that family). A pod to itself is not listed (loopback traffic is not
    /// subject to policy).
    Check(CheckArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// Multi-document YAML of Namespaces, Pods and NetworkPolicies (`-` for stdin).
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    file: PathBuf,
    /// Protocol and port to probe, like tcp/80, udp/53 or sctp/9 (repeatable; default tcp/80).
    #[arg(long = "port", value_name = "PROTO/PORT")]
    ports: Vec<ProbePort>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// A reachability matrix per port (`4`/`6`: allowed over IPv4/IPv6 only).
    Table,
    /// `{"probes":[{"from","to","port","family","allowed"}, ...]}`.
    Json,
}

/// Runs `meshctl policy`.
pub fn run(args: PolicyArgs) -> anyhow::Result<()> {
    match args.command {
        PolicyCommand::Check(a) => check(a),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let name = args.file.display().to_string();
    let text = if name == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("reading {name}"))?
    };
    let cluster = wiremesh_policy::load_manifest(&text).with_context(|| name.clone())?;
    let ports = if args.ports.is_empty() {
        vec![ProbePort::default()]
    } else {
        args.ports
    };
    let result = probe::probe(&cluster, &ports)?;
    for w in &result.warnings {
        eprintln!("warning: {w}");
    }
    let mut stdout = std::io::stdout().lock();
    match args.output {
        Format::Table => output::table(&mut stdout, &cluster, &ports, &result.probes)?,
        Format::Json => output::json(&mut stdout, &cluster, &result.probes)?,
    }
    Ok(())
}
