//! The real Kubernetes clients the deploy tests use: kubectl (k8s.io/kubernetes/cmd/kubectl at
//! testenv's release) and helm v4, both built by `make clients` into `.cache/bin` of the checkout.
//! Whatever `kubectl` a machine has on PATH (e.g. /usr/bin/kubectl from google-cloud-sdk) is never
//! used.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

/// Why a client could not be found or run.
#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    /// The binary is not built.
    #[error("{tool} not found at {path}: run `make clients` (part of `make deps`)")]
    Missing {
        /// `kubectl` or `helm`.
        tool: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The command could not be started.
    #[error("running {command}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The command failed.
    #[error("{command} failed ({status}):\n{stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr (and stdout).
        stderr: String,
    },
}

/// The root of this checkout.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Where `make clients` puts kubectl, helm and the `kubectl-wiremesh` plugin:
/// `$WIREMESH_CLIENTS_DIR`, default `<checkout>/.cache/bin`.
pub fn clients_dir() -> PathBuf {
    std::env::var_os("WIREMESH_CLIENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/bin"))
}

fn client(tool: &'static str) -> Result<PathBuf, ClientsError> {
    let path = clients_dir().join(tool);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ClientsError::Missing { tool, path })
    }
}

/// The kubectl built by `make clients`.
pub fn kubectl() -> Result<PathBuf, ClientsError> {
    client("kubectl")
}

/// The helm built by `make clients`.
pub fn helm() -> Result<PathBuf, ClientsError> {
    client("helm")
}

/// `program args...` as one printable line.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` and returns its stdout; a failure carries stderr and stdout.
pub fn run(cmd: &mut Command) -> Result<String, ClientsError> {
    let command = command_line(cmd);
    let out = cmd.output().map_err(|source| ClientsError::Spawn {
        command: command.clone(),
        source,
    })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(ClientsError::Failed {
        command,
        status: out.status,
        stderr: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ),
    })
}
