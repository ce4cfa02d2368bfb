//! `mesh-agent`: the wiremesh node agent binary. `mesh-agent run` is the agent, which drives a
//! WireGuard device it does not own; `mesh-agent device` is the userspace device (crate
//! `wiremesh-device`), run as its own process.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_agent::{
    app,
    config::{Config, RunArgs},
    memory, netns, telemetry,
};
use wiremesh_device::command::{self, DeviceArgs};

#[derive(Parser)]
#[command(name = "mesh-agent", version, about = "wiremesh node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (watch Nodes, publish this node's key, keep the mesh configured).
    Run(Box<RunArgs>),
    /// Run a standalone WireGuard device speaking the wg(8) UAPI.
    Device(DeviceArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Device(args) => {
            command::init_logging();
            command::run(args, &["device"])
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // Before any thread exists (mesh_agent::memory).
    memory::limit_arenas(1);
    let config = Config::from_args(args)?;
    telemetry::init(config.log_format);
    // setns() moves only the calling thread: enter the namespace before any other thread exists,
    // so every runtime worker (and the TUN device, sockets and netlink) lives in it.
    if let Some(path) = config.netns_path() {
        netns::enter(&path)?;
    }
    tracing::info!(
        config = %serde_json::to_string(&config).context("serialize config")?,
        "starting mesh-agent"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mesh-agent")
        .build()
        .context("start tokio runtime")?;
    runtime.block_on(app::run(config))
}
