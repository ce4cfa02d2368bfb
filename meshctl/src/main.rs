//! `meshctl`: the wiremesh operator CLI.

use anyhow::bail;
use clap::{Parser, Subcommand};

mod policy;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "wiremesh operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show per-node key, peers and handshakes.
    Status,
    /// Start or stop the local virtual cluster.
    Demo,
    /// Offline NetworkPolicy tools (`policy check -f FILE`).
    Policy(policy::PolicyArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Status => bail!("`meshctl status` is not built yet (issue 4)"),
        Command::Demo => bail!("`meshctl demo` is not built yet (issue 4)"),
        Command::Policy(args) => policy::run(args),
    }
}
