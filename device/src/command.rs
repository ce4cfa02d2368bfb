//! `mesh-agent device <ifname> [--foreground]` (also `wiremesh-device <ifname>`): a standalone
//! WireGuard device like wireguard-go and boringtun-cli. It creates the TUN interface, serves the
//! wg(8) UAPI on `/var/run/wireguard/<ifname>.sock`, and runs until SIGTERM/SIGINT or until the
//! interface is deleted, then removes the socket. Without `--foreground` it re-executes itself
//! detached (new session, stdio on /dev/null) and returns once the device is up, like wireguard-go.

use std::{
    io::{BufRead, Write},
    os::{fd::FromRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};

use crate::engine::{DEFAULT_MTU, EngineConfig, UserspaceEngine};

/// Environment variable carrying the readiness pipe to a detached child.
const READY_FD_ENV: &str = "MESH_AGENT_DEVICE_READY_FD";
/// Test hook: seconds after which the device starts a new handshake (see `EngineConfig`).
pub const REKEY_ENV: &str = "MESH_AGENT_TEST_REKEY_AFTER_SECS";

/// Options of the `device` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Interface name to create.
    pub ifname: String,
    /// Stay in the foreground (default: detach once the device is up).
    #[arg(short, long)]
    pub foreground: bool,
    /// Interface MTU.
    #[arg(long, default_value_t = DEFAULT_MTU)]
    pub mtu: u16,
    /// Datapath worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// UAPI socket path (default `/var/run/wireguard/<ifname>.sock`).
    #[arg(long)]
    pub uapi_socket: Option<PathBuf>,
    /// Busy-poll this many microseconds after traffic before sleeping (0 = off): lower
    /// latency on a quiet tunnel for more CPU.
    #[arg(long, default_value_t = 0)]
    pub busy_poll_us: u64,
}

/// Runs the command. Must be called before any other thread exists (signals are blocked
/// here so that only the signal thread receives them). `subcommand` is what precedes the
/// device's own arguments on the command line of this executable (`["device"]` for
/// `mesh-agent device`, nothing for `wiremesh-device`): the detached mode re-executes it.
pub fn run(args: DeviceArgs, subcommand: &[&str]) -> anyhow::Result<()> {
    if !args.foreground && std::env::var_os(READY_FD_ENV).is_none() {
        return detach(&args, subcommand);
    }
    let ready_fd: Option<i32> = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    // SAFETY: the fd was created for us by the parent and is only used here.
    let mut ready = ready_fd.map(|fd| unsafe { std::fs::File::from_raw_fd(fd) });
    match serve(&args, &mut ready) {
        Ok(()) => Ok(()),
        Err(e) => {
            if let Some(pipe) = ready.as_mut() {
                let _ = writeln!(pipe, "error: {e:#}");
            }
            Err(e)
        }
    }
}

fn serve(args: &DeviceArgs, ready: &mut Option<std::fs::File>) -> anyhow::Result<()> {
    let signals = block_signals()?;
    let rekey_after = match std::env::var(REKEY_ENV) {
        Ok(v) => {
            Some(Duration::from_secs(v.parse().with_context(|| {
                format!("{REKEY_ENV}={v:?} is not a number")
            })?))
        }
        Err(_) => None,
    };
    let config = EngineConfig {
        uapi_socket: Some(
            args.uapi_socket
                .clone()
                .unwrap_or_else(|| EngineConfig::default_uapi_path(&args.ifname)),
        ),
        mtu: args.mtu,
        threads: args.threads,
        busy_poll: Duration::from_micros(args.busy_poll_us),
        rekey_after,
        ..EngineConfig::new(&args.ifname)
    };
    let engine = UserspaceEngine::create(config)
        .with_context(|| format!("cannot start device {}", args.ifname))?;
    // Report readiness and close the pipe: the waiting parent exits on this line.
    if let Some(mut pipe) = ready.take() {
        writeln!(pipe, "ok").context("cannot report readiness")?;
    }
    let for_signals: Arc<UserspaceEngine> = engine.clone();
    std::thread::Builder::new()
        .name("wm-signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits on the signal set blocked in block_signals.
            unsafe { libc::sigwait(&signals, &mut sig) };
            for_signals.close(format!("received signal {sig}"));
        })
        .context("cannot start signal thread")?;
    let reason = engine.wait_closed(None).unwrap_or_default();
    tracing::info!(ifname = %args.ifname, reason = %reason, "device stopping");
    engine.shutdown();
    Ok(())
}

fn block_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: plain sigset manipulation on a local set, then masking the calling thread (every
    // thread started afterwards inherits the mask).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!(
                "pthread_sigmask failed: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
        Ok(set)
    }
}

/// Re-executes ourselves in the foreground, detached, and waits until the child reports that
/// the device is up (or why it is not).
fn detach(args: &DeviceArgs, subcommand: &[&str]) -> anyhow::Result<()> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds; the read end is close-on-exec, the write end is inherited.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), 0) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh fds from pipe2, owned here.
    let mut read_end = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    let write_end = unsafe { std::fs::File::from_raw_fd(fds[1]) };
    // SAFETY: mark the read end close-on-exec so the child holds only the write end.
    unsafe { libc::fcntl(fds[0], libc::F_SETFD, libc::FD_CLOEXEC) };
    let exe = std::env::current_exe().context("cannot find own executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(subcommand)
        .arg(&args.ifname)
        .arg("--foreground")
        .arg("--mtu")
        .arg(args.mtu.to_string())
        .arg("--threads")
        .arg(args.threads.to_string())
        .arg("--busy-poll-us")
        .arg(args.busy_poll_us.to_string());
    if let Some(path) = &args.uapi_socket {
        cmd.arg("--uapi-socket").arg(path);
    }
    cmd.env(READY_FD_ENV, fds[1].to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and detaches the child from our terminal/session.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("cannot start detached device")?;
    drop(write_end);
    let mut answer = String::new();
    std::io::BufReader::new(&mut read_end)
        .read_line(&mut answer)
        .context("cannot read readiness from detached device")?;
    match answer.lines().next() {
        Some("ok") => {
            println!("{} up (pid {})", args.ifname, child.id());
            Ok(())
        }
        Some(err) => bail!("device {} failed: {err}", args.ifname),
        None => bail!("device {} exited before it was up", args.ifname),
    }
}

/// Logging for the device command: RUST_LOG filter (default info) on stderr, JSON with
/// LOG_FORMAT=json.
pub fn init_logging() {
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
