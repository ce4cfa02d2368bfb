//! A small process supervisor, as a kubelet restarts the containers of a pod: it runs one program,
//! restarts it within a second whenever it exits (crash, `kill -9`, clean exit alike), and records
//! the PID and start time of the current run in a PID file so tests and `cluster.json` readers
//! can find (and kill) the current process. SIGTERM or SIGINT to the supervisor is passed on to the
//! program; the supervisor waits for it (SIGKILL after the grace period), removes the PID file and
//! exits with the program's status. The program gets `PR_SET_PDEATHSIG`, so a supervisor killed
//! with SIGKILL does not leave it behind.
//!
//! Binary: `wiremesh-supervise --pid-file F [--grace-ms N] -- PROGRAM ARGS...` (the virtual
//! cluster runs one per node and role: the device and the agent).

use std::{
    ffi::OsString,
    os::unix::process::{CommandExt, ExitStatusExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant},
};

use crate::process::ProcessIdentity;

/// Delay before the first restart; doubled for a program that keeps exiting within a second of
/// its start, up to [`MAX_RESTART_DELAY`].
pub const RESTART_DELAY: Duration = Duration::from_millis(100);

/// The longest wait before a restart.
pub const MAX_RESTART_DELAY: Duration = Duration::from_millis(800);

/// Why the supervisor cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// Bad command line.
    #[error("usage: wiremesh-supervise --pid-file FILE [--grace-ms N] -- PROGRAM [ARGS...]: {0}")]
    Usage(String),
    /// The program could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The PID file could not be written.
    #[error("cannot write PID file {path}: {source}")]
    PidFile {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// waitpid failed.
    #[error("cannot wait for the program: {0}")]
    Wait(#[source] std::io::Error),
}

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperviseArgs {
    /// Where the current run's identity goes.
    pub pid_file: PathBuf,
    /// SIGTERM to SIGKILL, when stopping.
    pub grace: Duration,
    /// The program and its arguments.
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
}

impl SuperviseArgs {
    /// Parses `--pid-file F [--grace-ms N] -- PROGRAM ARGS...` (without argv\[0\]).
    pub fn parse(mut argv: impl Iterator<Item = OsString>) -> Result<Self, SuperviseError> {
        let mut pid_file = None;
        let mut grace = Duration::from_secs(15);
        loop {
            let Some(arg) = argv.next() else {
                return Err(SuperviseError::Usage("missing `-- PROGRAM`".into()));
            };
            match arg.to_str() {
                Some("--") => break,
                Some("--pid-file") => pid_file = argv.next().map(PathBuf::from),
                Some("--grace-ms") => {
                    let value = argv
                        .next()
                        .and_then(|v| v.to_str()?.parse().ok())
                        .ok_or_else(|| SuperviseError::Usage("--grace-ms needs a number".into()))?;
                    grace = Duration::from_millis(value);
                }
                _ => return Err(SuperviseError::Usage(format!("unknown argument {arg:?}"))),
            }
        }
        let pid_file = pid_file.ok_or_else(|| SuperviseError::Usage("no --pid-file".into()))?;
        let program = argv
            .next()
            .ok_or_else(|| SuperviseError::Usage("no PROGRAM".into()))?;
        Ok(Self {
            pid_file,
            grace,
            program,
            args: argv.collect(),
        })
    }
}

/// The supervisor binary: `$WIREMESH_SUPERVISOR_BIN`, else `wiremesh-supervise` next to the running
/// executable or one directory up (a test binary runs from `target/<profile>/deps/`).
pub fn default_binary() -> PathBuf {
    sibling_binary("wiremesh-supervise", "WIREMESH_SUPERVISOR_BIN")
}

/// A binary of this workspace: `$env`, else `name` next to the running executable or one
/// directory up.
pub fn sibling_binary(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let candidates = [
        dir.join(name),
        dir.parent().map(|d| d.join(name)).unwrap_or_default(),
    ];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| candidates[0].clone())
}

/// The identity recorded in a supervisor's PID file, if the file exists and that very process
/// still runs.
pub fn current(pid_file: &Path) -> Option<ProcessIdentity> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    let mut fields = text.split_whitespace();
    let identity = ProcessIdentity {
        pid: fields.next()?.parse().ok()?,
        start_time: fields.next()?.parse().ok()?,
    };
    identity.is_running().then_some(identity)
}

/// The signal that asked us to stop (0: none yet).
static STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    STOP.store(signal, Ordering::SeqCst);
}

fn spawn(args: &SuperviseArgs) -> Result<Child, SuperviseError> {
    let mut command = Command::new(&args.program);
    command.args(&args.args).stdin(Stdio::null());
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and only affects the child.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().map_err(|source| SuperviseError::Spawn {
        program: args.program.to_string_lossy().into_owned(),
        source,
    })
}

fn record(args: &SuperviseArgs, child: &Child) -> Result<(), SuperviseError> {
    let identity = ProcessIdentity::of(child.id()).unwrap_or(ProcessIdentity {
        pid: child.id(),
        start_time: 0,
    });
    crate::fsutil::write_private_atomic(
        &args.pid_file,
        format!("{} {}\n", identity.pid, identity.start_time).as_bytes(),
    )
    .map_err(|source| SuperviseError::PidFile {
        path: args.pid_file.clone(),
        source,
    })
}

/// Supervises until SIGTERM/SIGINT; returns the program's last exit status.
pub fn run(args: &SuperviseArgs) -> Result<ExitStatus, SuperviseError> {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let label = args.program.to_string_lossy().into_owned();
    let mut delay = RESTART_DELAY / 2;
    loop {
        let mut child = spawn(args)?;
        let started = Instant::now();
        record(args, &child)?;
        eprintln!("[supervisor] started {label} (pid {})", child.id());
        let status = loop {
            if let Some(status) = child.try_wait().map_err(SuperviseError::Wait)? {
                break status;
            }
            let signal = STOP.load(Ordering::SeqCst);
            if signal != 0 {
                let status = stop(&mut child, signal, args.grace)?;
                let _ = std::fs::remove_file(&args.pid_file);
                eprintln!("[supervisor] {label} stopped ({status}) on signal {signal}");
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if STOP.load(Ordering::SeqCst) != 0 {
            let _ = std::fs::remove_file(&args.pid_file);
            return Ok(status);
        }
        delay = if started.elapsed() < Duration::from_secs(1) {
            (delay * 2).min(MAX_RESTART_DELAY)
        } else {
            RESTART_DELAY
        };
        eprintln!("[supervisor] {label} exited ({status}); restarting in {delay:?}");
        std::thread::sleep(delay);
    }
}

fn stop(child: &mut Child, signal: i32, grace: Duration) -> Result<ExitStatus, SuperviseError> {
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().map_err(SuperviseError::Wait)? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait().map_err(SuperviseError::Wait)
}

/// The supervisor's own exit code for the program's `status`: the same code, or 128 + signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_and_bad_ones_say_why() {
        let args = SuperviseArgs::parse(
            [
                "--pid-file",
                "/tmp/x.pid",
                "--grace-ms",
                "500",
                "--",
                "sleep",
                "9",
            ]
            .into_iter()
            .map(OsString::from),
        )
        .unwrap();
        assert_eq!(args.pid_file, PathBuf::from("/tmp/x.pid"));
        assert_eq!(args.grace, Duration::from_millis(500));
        assert_eq!(args.program, "sleep");
        assert_eq!(args.args, vec![OsString::from("9")]);
        let err = SuperviseArgs::parse(["sleep"].into_iter().map(OsString::from)).unwrap_err();
        assert!(err.to_string().contains("unknown argument"), "{err}");
        let err = SuperviseArgs::parse(["--", "x"].into_iter().map(OsString::from)).unwrap_err();
        assert!(err.to_string().contains("no --pid-file"), "{err}");
    }
}
