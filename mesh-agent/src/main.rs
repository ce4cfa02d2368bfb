//! `mesh-agent`: the wiremesh node agent binary. It links the userspace device (crate
//! `wiremesh-device`) for `mesh-agent device` and for the in-process engine it hands the agent.

use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_agent::{
    app::{self, OpenedDatapath},
    config::{Config, DEFAULT_LISTEN_PORT, DatapathChoice, RunArgs},
    netns, telemetry,
};
use wiremesh_device::{
    command::{self, DeviceArgs},
    engine::{EngineConfig, UserspaceEngine},
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
    runtime.block_on(app::run(config, open_datapath))
}

/// Creates the datapath chosen by `--datapath`, in the current network namespace: the userspace
/// engine in this process (`auto` too, until the kernel datapath is wired in). Shutting it down
/// removes the TUN device and the UAPI socket; the kernel drops the routes through the device
/// with it.
fn open_datapath(config: &Config) -> anyhow::Result<OpenedDatapath> {
    match config.datapath {
        DatapathChoice::Kernel => anyhow::bail!(
            "--datapath kernel: the kernel WireGuard engine is not built yet; use --datapath userspace"
        ),
        DatapathChoice::Auto | DatapathChoice::Userspace => {
            let mut engine = EngineConfig::new(&config.interface);
            engine.uapi_socket = Some(config.uapi_socket.clone());
            engine.listen_port = config.listen_port.unwrap_or(DEFAULT_LISTEN_PORT);
            if let Some(mtu) = config.mtu {
                engine.mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
            }
            let engine = UserspaceEngine::create(engine).with_context(|| {
                format!("create userspace WireGuard device {}", config.interface)
            })?;
            let datapath: Arc<UserspaceEngine> = engine.clone();
            Ok(OpenedDatapath {
                datapath,
                shutdown: Some(Box::new(move || engine.shutdown())),
            })
        }
    }
}
