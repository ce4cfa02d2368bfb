//! Long-running child processes of the virtual cluster (agents, testenv): spawning, optionally inside
//! a network namespace, with output to a log file; stopping by PID with a deadline.
//!
//! A process is identified by its PID *and* its start time (field 22 of `/proc/<pid>/stat`), so a
//! process recorded in a cluster description and stopped later by another process (`meshctl demo
//! down`) is never confused with an unrelated process that reused the PID.

use std::{
    ffi::OsString,
    fs::{File, OpenOptions},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

/// Why a process could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The log file could not be created.
    #[error("cannot create log file {path}: {source}")]
    LogFile {
        /// The log path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The network namespace could not be opened.
    #[error("cannot open network namespace {netns}: {source}")]
    Netns {
        /// The namespace name (under /run/netns).
        netns: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// fork/setns/exec failed.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program path.
        program: String,
        /// The I/O error (from exec, or from setns in the child).
        #[source]
        source: std::io::Error,
    },
    /// Sending a signal failed for another reason than the process being gone.
    #[error("cannot signal pid {pid}: {source}")]
    Signal {
        /// The PID.
        pid: u32,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// waitpid failed.
    #[error("cannot wait for pid {pid}: {source}")]
    Wait {
        /// The PID.
        pid: u32,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The process was still alive after SIGKILL and the deadline.
    #[error("pid {pid} ({label}) is still running {waited:?} after SIGKILL")]
    Unkillable {
        /// The PID.
        pid: u32,
        /// What the process is.
        label: String,
        /// How long we waited.
        waited: Duration,
    },
}

/// What to run and where its output goes.
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    /// Short description for logs and errors, e.g. `agent node-1`.
    pub label: String,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables (the rest is inherited).
    pub env: Vec<(OsString, OsString)>,
    /// stdout and stderr are appended here.
    pub log_path: PathBuf,
    /// Network namespace (name under /run/netns) to run in; `None` for the host namespace.
    pub netns: Option<String>,
}

impl ProcessSpec {
    /// A spec with no arguments, no extra environment, in the host namespace.
    pub fn new(
        label: impl Into<String>,
        program: impl Into<PathBuf>,
        log_path: impl Into<PathBuf>,
    ) -> Self {
        Self {
            label: label.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            log_path: log_path.into(),
            netns: None,
        }
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds one environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs the process inside the named network namespace.
    pub fn in_netns(mut self, netns: impl Into<String>) -> Self {
        self.netns = Some(netns.into());
        self
    }
}

/// A process together with its start time, enough to signal it safely from any process later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessIdentity {
    /// The PID.
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

/// The state letter and start time of `pid`, or `None` when there is no such process.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything: parse after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `rest` starts at field 3 (state), so field 22 is the 20th after it.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

impl ProcessIdentity {
    /// The identity of a running `pid`, `None` if it does not exist.
    pub fn of(pid: u32) -> Option<Self> {
        stat(pid).map(|(_, start_time)| Self { pid, start_time })
    }

    /// Whether this very process still exists and has not exited (zombies count as exited).
    pub fn is_running(&self) -> bool {
        matches!(stat(self.pid), Some((state, start)) if start == self.start_time && state != 'Z' && state != 'X')
    }

    /// Sends `signal` if this very process is still running; `Ok(false)` if it is gone.
    pub fn signal(&self, signal: i32) -> Result<bool, ProcessError> {
        if !self.is_running() {
            return Ok(false);
        }
        send_signal(self.pid, signal)
    }

    /// Stops a process that is not our child: SIGTERM, up to `grace` for it to exit, then SIGKILL.
    /// Returns whether it was running.
    pub fn stop(&self, label: &str, grace: Duration) -> Result<bool, ProcessError> {
        if !self.signal(libc::SIGTERM)? {
            return Ok(false);
        }
        if poll(grace, || !self.is_running()) {
            return Ok(true);
        }
        tracing::warn!(
            pid = self.pid,
            label,
            ?grace,
            "process ignored SIGTERM, sending SIGKILL"
        );
        self.signal(libc::SIGKILL)?;
        let waited = Duration::from_secs(10);
        if poll(waited, || !self.is_running()) {
            Ok(true)
        } else {
            Err(ProcessError::Unkillable {
                pid: self.pid,
                label: label.to_owned(),
                waited,
            })
        }
    }
}

fn send_signal(pid: u32, signal: i32) -> Result<bool, ProcessError> {
    let Ok(raw) = i32::try_from(pid) else {
        return Ok(false);
    };
    // SAFETY: kill(2) has no memory-safety preconditions; the PID was checked to belong to the
    // process we mean just before (a race with its exit yields ESRCH, handled below).
    let rc = unsafe { libc::kill(raw, signal) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(false)
    } else {
        Err(ProcessError::Signal { pid, source: err })
    }
}

/// Polls `done` every 20 ms until it returns true or `timeout` passes; returns the last result.
fn poll(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for our child to exit, at most `timeout`; `Ok(None)` if it is still running.
pub(crate) fn wait_child(
    child: &mut Child,
    timeout: Duration,
) -> Result<Option<ExitStatus>, ProcessError> {
    let pid = child.id();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|source| ProcessError::Wait { pid, source })?
        {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Stops our child: SIGTERM, up to `grace` to exit, then SIGKILL; reaps it and returns its status.
pub(crate) fn terminate_child(
    child: &mut Child,
    label: &str,
    grace: Duration,
) -> Result<ExitStatus, ProcessError> {
    let pid = child.id();
    if let Some(status) = child
        .try_wait()
        .map_err(|source| ProcessError::Wait { pid, source })?
    {
        return Ok(status);
    }
    send_signal(pid, libc::SIGTERM)?;
    if let Some(status) = wait_child(child, grace)? {
        return Ok(status);
    }
    tracing::warn!(
        pid,
        label,
        ?grace,
        "process ignored SIGTERM, sending SIGKILL"
    );
    kill_child(child, label)
}

/// SIGKILLs our child and reaps it.
pub(crate) fn kill_child(child: &mut Child, label: &str) -> Result<ExitStatus, ProcessError> {
    let pid = child.id();
    send_signal(pid, libc::SIGKILL)?;
    let waited = Duration::from_secs(10);
    wait_child(child, waited)?.ok_or_else(|| ProcessError::Unkillable {
        pid,
        label: label.to_owned(),
        waited,
    })
}

/// Opens `/run/netns/<name>` for setns(2).
fn open_netns(netns: &str) -> Result<File, ProcessError> {
    File::open(Path::new("/run/netns").join(netns)).map_err(|source| ProcessError::Netns {
        netns: netns.to_owned(),
        source,
    })
}

/// Makes `cmd` enter the network namespace `ns` between fork and exec.
///
/// setns(2) is used rather than `ip netns exec` so the child keeps the host's mounts: `ip netns exec`
/// remounts /sys, which hides /sys/fs/bpf from an agent that pins eBPF objects.
fn enter_netns_before_exec(cmd: &mut Command, ns: &File) {
    let fd = ns.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls setns(2), which is
    // async-signal-safe; `fd` stays open until spawn returns because the caller keeps `ns` alive, and
    // it is O_CLOEXEC so the program does not inherit it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Default time between SIGTERM and SIGKILL.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// A child process we started; stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct ManagedProcess {
    label: String,
    child: Child,
    identity: ProcessIdentity,
    log_path: PathBuf,
    exit: Option<ExitStatus>,
    grace: Duration,
}

impl ManagedProcess {
    /// Starts `spec` in its own process group (a Ctrl-C meant for the parent does not reach it), with
    /// stdin from /dev/null and stdout and stderr appended to the log file.
    pub fn spawn(spec: &ProcessSpec) -> Result<Self, ProcessError> {
        if let Some(dir) = spec.log_path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ProcessError::LogFile {
                path: spec.log_path.clone(),
                source,
            })?;
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_path)
            .map_err(|source| ProcessError::LogFile {
                path: spec.log_path.clone(),
                source,
            })?;
        let log_err = log.try_clone().map_err(|source| ProcessError::LogFile {
            path: spec.log_path.clone(),
            source,
        })?;

        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        let ns = spec.netns.as_deref().map(open_netns).transpose()?;
        if let Some(ns) = &ns {
            enter_netns_before_exec(&mut cmd, ns);
        }
        let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            program: spec.program.display().to_string(),
            source,
        })?;
        drop(ns);
        Ok(Self::adopt(
            spec.label.clone(),
            child,
            spec.log_path.clone(),
        ))
    }

    /// Wraps a child started elsewhere in this crate.
    pub(crate) fn adopt(label: String, child: Child, log_path: PathBuf) -> Self {
        let pid = child.id();
        // A child that already exited is still a zombie we have not reaped, so its stat exists.
        let start_time = stat(pid).map(|(_, start)| start).unwrap_or_default();
        tracing::debug!(pid, label = %label, log = %log_path.display(), "process started");
        Self {
            label,
            child,
            identity: ProcessIdentity { pid, start_time },
            log_path,
            exit: None,
            grace: DEFAULT_GRACE,
        }
    }

    /// How long the process gets between SIGTERM and SIGKILL when dropped (default 10 s).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The PID.
    pub fn pid(&self) -> u32 {
        self.identity.pid
    }

    /// PID and start time, for descriptions read by other processes.
    pub fn identity(&self) -> ProcessIdentity {
        self.identity
    }

    /// What this process is.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Where its output goes.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The exit status if it has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.exit.is_none() {
            let pid = self.pid();
            self.exit = self
                .child
                .try_wait()
                .map_err(|source| ProcessError::Wait { pid, source })?;
        }
        Ok(self.exit)
    }

    /// Sends a signal (e.g. `libc::SIGKILL` to simulate a crash); `Ok(false)` if it already exited.
    pub fn signal(&mut self, signal: i32) -> Result<bool, ProcessError> {
        if self.try_wait()?.is_some() {
            return Ok(false);
        }
        send_signal(self.pid(), signal)
    }

    /// SIGKILL and reap, as a crash would end it.
    pub fn kill(&mut self) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let status = kill_child(&mut self.child, &self.label)?;
        self.exit = Some(status);
        Ok(status)
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let status = terminate_child(&mut self.child, &self.label, grace)?;
        self.exit = Some(status);
        tracing::debug!(pid = self.pid(), label = %self.label, %status, "process stopped");
        Ok(status)
    }

    /// Leaves the process running and forgets it (for `meshctl demo up`, which exits while the
    /// cluster keeps running); returns its identity so it can be stopped later.
    pub fn detach(self) -> ProcessIdentity {
        let identity = self.identity;
        std::mem::forget(self);
        identity
    }

    pub(crate) fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        if let Err(err) = self.stop(self.grace) {
            tracing::error!(pid = self.pid(), label = %self.label, %err, "could not stop process");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_of_self_is_running() {
        let me = ProcessIdentity::of(std::process::id()).expect("own stat");
        assert!(me.is_running());
        let other = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !other.is_running(),
            "a different start time is a different process"
        );
    }

    #[test]
    fn spawn_stop_and_log() {
        let dir = std::env::temp_dir().join(format!("wm-proc-test-{}", std::process::id()));
        let log = dir.join("sleep.log");
        let spec =
            ProcessSpec::new("sh", "/bin/sh", &log).args(["-c", "echo started; exec sleep 60"]);
        let mut p = ManagedProcess::spawn(&spec).expect("spawn");
        let identity = p.identity();
        assert!(poll(Duration::from_secs(10), || std::fs::read_to_string(
            &log
        )
        .unwrap_or_default()
        .contains("started")));
        assert!(identity.is_running());
        let status = p.stop(Duration::from_secs(5)).expect("stop");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );
        assert!(!identity.is_running());
        drop(p);
        std::fs::remove_dir_all(&dir).expect("remove temp dir");
    }
}
