//! `mesh-agent`: the wiremesh node agent binary.

use anyhow::bail;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mesh-agent", version, about = "wiremesh node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (watch Nodes, publish this node's key, keep the mesh configured).
    Run,
    /// Run a standalone WireGuard device speaking the wg(8) UAPI.
    Device,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run => bail!("`mesh-agent run` is not built yet (issue 4)"),
        Command::Device => bail!("`mesh-agent device` is not built yet (issue 3)"),
    }
}
