//! Running short external commands (`ip`, and anything inside a network namespace through
//! `ip netns exec`), with errors that carry the command line and its stderr.

use std::{
    ffi::OsStr,
    process::{Command, Output, Stdio},
};

/// A command that could not be run or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program could not be started at all (not installed, not executable).
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why exec failed.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its trimmed standard error.
        stderr: String,
    },
}

impl CommandError {
    /// The standard error of a command that ran and failed, empty otherwise.
    pub fn stderr(&self) -> &str {
        match self {
            Self::Failed { stderr, .. } => stderr,
            Self::Spawn { .. } => "",
        }
    }
}

fn command_line(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` to completion with stdin closed and returns its output whatever the exit status.
pub fn output(cmd: &mut Command) -> Result<Output, CommandError> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|source| CommandError::Spawn {
            command: command_line(cmd),
            source,
        })
}

/// Runs `cmd` to completion and returns its stdout; a non-zero exit is an error carrying stderr.
pub fn run(cmd: &mut Command) -> Result<String, CommandError> {
    let out = output(cmd)?;
    if !out.status.success() {
        return Err(CommandError::Failed {
            command: command_line(cmd),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip <args>` in the host network namespace.
pub fn ip<I, S>(args: I) -> Result<String, CommandError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new("ip").args(args))
}

/// `ip -n <netns> <args>`: iproute2 inside a named network namespace.
pub fn ip_in<I, S>(netns: &str, args: I) -> Result<String, CommandError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new("ip").arg("-n").arg(netns).args(args))
}

/// The command `ip netns exec <netns> <argv...>`, ready for more configuration (env, stdio).
pub fn netns_command<I, S>(netns: &str, argv: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("ip");
    cmd.arg("netns").arg("exec").arg(netns).args(argv);
    cmd
}

/// Runs `argv` inside `netns` through `ip netns exec` and returns its output whatever the exit status
/// (for commands whose failure is the interesting result, like a ping that must not get through).
pub fn exec_in<I, S>(netns: &str, argv: I) -> Result<Output, CommandError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    output(&mut netns_command(netns, argv))
}

/// Runs `argv` inside `netns` through `ip netns exec`; a non-zero exit is an error.
pub fn run_in<I, S>(netns: &str, argv: I) -> Result<String, CommandError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(&mut netns_command(netns, argv))
}
