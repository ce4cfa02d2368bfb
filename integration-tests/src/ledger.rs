//! The ledger of everything a virtual cluster created on the host, released in reverse order.
//!
//! Only what was recorded here is ever deleted: names are never matched by pattern. The ledger is
//! serializable so a cluster started by one process (`meshctl demo up`) can be removed by another
//! (`meshctl demo down`) from its description.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    command::{self, CommandError},
    process::{ProcessError, ProcessIdentity},
};

/// One thing created on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Resource {
    /// A directory (work dir with logs, kubeconfigs, testenv data).
    Dir {
        /// The directory, removed recursively.
        path: PathBuf,
    },
    /// A link in the host network namespace (the bridge, host ends of node veths).
    HostLink {
        /// The interface name.
        name: String,
    },
    /// A named network namespace (a node or a pod).
    Netns {
        /// The name under /run/netns.
        name: String,
    },
    /// A filesystem mounted by the cluster (the agents' bpffs), unmounted.
    Mount {
        /// The mount point.
        path: PathBuf,
    },
    /// A process (an agent, testenv), stopped with SIGTERM then SIGKILL.
    Process {
        /// What it is.
        label: String,
        /// PID and start time.
        #[serde(flatten)]
        identity: ProcessIdentity,
    },
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir { path } => write!(f, "directory {}", path.display()),
            Self::HostLink { name } => write!(f, "host link {name}"),
            Self::Netns { name } => write!(f, "network namespace {name}"),
            Self::Mount { path } => write!(f, "mount {}", path.display()),
            Self::Process { label, identity } => {
                write!(f, "process {label} (pid {})", identity.pid)
            }
        }
    }
}

/// Why one resource could not be released.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// `ip` failed.
    #[error("{resource}: {source}")]
    Command {
        /// What was being released.
        resource: String,
        /// The failure.
        #[source]
        source: CommandError,
    },
    /// A file or directory could not be removed.
    #[error("{resource}: {source}")]
    Io {
        /// What was being released.
        resource: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// A process could not be stopped.
    #[error("{resource}: {source}")]
    Process {
        /// What was being released.
        resource: String,
        /// The failure.
        #[source]
        source: ProcessError,
    },
    /// A network namespace still exists after deletion (a process is still inside it).
    #[error("{resource} still exists after deletion")]
    Lingering {
        /// What was being released.
        resource: String,
    },
}

/// Every release that failed during a teardown; the rest was released anyway.
#[derive(Debug, thiserror::Error)]
#[error("teardown left {} resource(s) behind: {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct TeardownError(pub Vec<ReleaseError>);

/// How long a process recorded in the ledger gets between SIGTERM and SIGKILL.
pub const PROCESS_GRACE: Duration = Duration::from_secs(10);

fn is_missing_link(err: &CommandError) -> bool {
    let stderr = err.stderr();
    stderr.contains("Cannot find device") || stderr.contains("does not exist")
}

/// Whether `path` is listed as a mount point in /proc/self/mounts.
pub(crate) fn is_mount_point(path: &std::path::Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .any(|m| m == wanted)
}

pub(crate) fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// Releases one resource; something already gone counts as released.
pub fn release(resource: &Resource) -> Result<(), ReleaseError> {
    let what = resource.to_string();
    match resource {
        Resource::Dir { path } => match std::fs::remove_dir_all(path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(ReleaseError::Io {
                resource: what,
                source: err,
            }),
            _ => Ok(()),
        },
        Resource::HostLink { name } => match command::ip(["link", "del", "dev", name]) {
            Err(err) if !is_missing_link(&err) => Err(ReleaseError::Command {
                resource: what,
                source: err,
            }),
            _ => Ok(()),
        },
        Resource::Netns { name } => {
            if !netns_exists(name) {
                return Ok(());
            }
            command::ip(["netns", "del", name]).map_err(|source| ReleaseError::Command {
                resource: what.clone(),
                source,
            })?;
            if netns_exists(name) {
                return Err(ReleaseError::Lingering { resource: what });
            }
            Ok(())
        }
        Resource::Mount { path } => {
            if !is_mount_point(path) {
                return Ok(());
            }
            command::run(std::process::Command::new("umount").arg(path)).map_err(|source| {
                ReleaseError::Command {
                    resource: what,
                    source,
                }
            })?;
            Ok(())
        }
        Resource::Process { label, identity } => identity
            .stop(label, PROCESS_GRACE)
            .map(|_| ())
            .map_err(|source| ReleaseError::Process {
                resource: what,
                source,
            }),
    }
}

/// Resources in creation order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ledger(Vec<Resource>);

impl Ledger {
    /// Records a resource just created.
    pub fn push(&mut self, resource: Resource) {
        self.0.push(resource);
    }

    /// The recorded resources, oldest first.
    pub fn resources(&self) -> &[Resource] {
        &self.0
    }

    /// Removes the records matching `pred` without releasing them (they were released elsewhere).
    pub fn forget(&mut self, mut pred: impl FnMut(&Resource) -> bool) {
        self.0.retain(|r| !pred(r));
    }

    /// Releases the records matching `pred`, newest first, and forgets those that were released.
    pub fn release_matching(
        &mut self,
        mut pred: impl FnMut(&Resource) -> bool,
    ) -> Result<(), TeardownError> {
        let mut errors = Vec::new();
        let mut kept = Vec::with_capacity(self.0.len());
        for resource in std::mem::take(&mut self.0).into_iter().rev() {
            if !pred(&resource) {
                kept.push(resource);
                continue;
            }
            match release(&resource) {
                Ok(()) => tracing::debug!(%resource, "released"),
                Err(err) => {
                    tracing::warn!(%resource, %err, "release failed");
                    errors.push(err);
                    kept.push(resource);
                }
            }
        }
        kept.reverse();
        self.0 = kept;
        if errors.is_empty() {
            Ok(())
        } else {
            Err(TeardownError(errors))
        }
    }

    /// Releases everything, newest first; what failed stays recorded.
    pub fn release_all(&mut self) -> Result<(), TeardownError> {
        self.release_matching(|_| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_round_trips_through_json() {
        let mut ledger = Ledger::default();
        ledger.push(Resource::Dir {
            path: "/tmp/wiremesh-x".into(),
        });
        ledger.push(Resource::HostLink {
            name: "wmbx".into(),
        });
        ledger.push(Resource::Netns {
            name: "wmx-n1".into(),
        });
        ledger.push(Resource::Process {
            label: "agent node-1".into(),
            identity: ProcessIdentity {
                pid: 7,
                start_time: 99,
            },
        });
        let json = serde_json::to_value(&ledger).expect("serialize");
        assert_eq!(
            json[3],
            serde_json::json!({"kind": "process", "label": "agent node-1", "pid": 7, "startTime": 99})
        );
        assert_eq!(
            json[1],
            serde_json::json!({"kind": "hostLink", "name": "wmbx"})
        );
        let back: Ledger = serde_json::from_value(json).expect("deserialize");
        assert_eq!(back, ledger);
    }

    #[test]
    fn releasing_what_is_already_gone_succeeds() {
        let mut ledger = Ledger::default();
        let dir = std::env::temp_dir().join(format!("wm-ledger-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        ledger.push(Resource::Dir { path: dir.clone() });
        ledger.push(Resource::Dir {
            path: dir.join("never-created"),
        });
        // PID 1 with a start time it cannot have: a different process, which must not be signalled.
        ledger.push(Resource::Process {
            label: "ghost".into(),
            identity: ProcessIdentity {
                pid: 1,
                start_time: u64::MAX,
            },
        });
        ledger.release_all().expect("release");
        assert!(!dir.exists());
        assert!(ledger.resources().is_empty());
    }
}
