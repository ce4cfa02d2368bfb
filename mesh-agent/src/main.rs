//! `mesh-agent`: the wiremesh node agent binary.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_agent::{
    app,
    config::{Config, RunArgs},
    netns, telemetry,
};

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
    Device(mesh_agent::device::DeviceArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(*args),
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

fn run(args: RunArgs) -> anyhow::Result<()> {
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
