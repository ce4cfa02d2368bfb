//! `wiremesh-device <ifname> [--foreground]`: the userspace WireGuard device on its own, the
//! same command as `mesh-agent device` (like `wireguard-go <ifname>`).

use clap::Parser;
use wiremesh_device::command::{self, DeviceArgs};

#[derive(Parser)]
#[command(
    name = "wiremesh-device",
    version,
    about = "wiremesh userspace WireGuard device (wg(8) UAPI)"
)]
struct Cli {
    #[command(flatten)]
    device: DeviceArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    command::init_logging();
    command::run(cli.device, &[])
}
