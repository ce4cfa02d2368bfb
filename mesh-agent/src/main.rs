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
    Device(mesh_agent::device::DeviceArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run => bail!("`mesh-agent run` is not built yet (issue 4)"),
        Command::Device(args) => {
            init_device_logging();
            mesh_agent::device::run(args)
        }
    }
}

/// Logging for `mesh-agent device`: RUST_LOG filter (default info), JSON with LOG_FORMAT=json.
fn init_device_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").is_ok_and(|v| v == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
