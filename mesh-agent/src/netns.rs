//! Entering a named network namespace. `setns(2)` moves only the calling thread, and threads inherit
//! the namespace of the thread that spawns them, so [`enter`] must run on the main thread before
//! the tokio runtime (or any other thread) exists: then every runtime worker, the TUN device and
//! every socket live in that namespace.

use std::{fs::File, io, os::fd::AsRawFd, path::Path};

/// Why the namespace could not be entered.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("open network namespace {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("setns into {path}: {source}")]
    Setns {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Moves the calling thread into the network namespace at `path` (e.g. `/var/run/netns/<name>`).
pub fn enter(path: &Path) -> Result<(), NetnsError> {
    let display = path.display().to_string();
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: display.clone(),
        source,
    })?;
    // SAFETY: `file` is an open descriptor for the duration of the call; setns does not retain it.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Setns {
            path: display,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_namespace_is_a_clear_error() {
        let err = enter(Path::new("/var/run/netns/wiremesh-does-not-exist-test")).unwrap_err();
        assert!(
            err.to_string().contains("wiremesh-does-not-exist-test"),
            "{err}"
        );
    }
}
