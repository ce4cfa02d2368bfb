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
    fn enter_moves_only_the_calling_thread_into_the_named_namespace() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("enter_moves_only_...: needs root (CI runs it as root)");
            return;
        }
        let name = format!("wm-agent-netns-test-{}", std::process::id());
        let add = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add");
        assert!(add.success(), "ip netns add {name}");
        let path = Path::new("/var/run/netns").join(&name);
        let want = std::fs::metadata(&path).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        let here = std::fs::metadata("/proc/thread-self/ns/net")
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        let thread_path = path.clone();
        let joined = std::thread::spawn(move || {
            enter(&thread_path).unwrap();
            let inode = |p: &str| {
                std::fs::metadata(p)
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                    .unwrap()
            };
            let inside = inode("/proc/thread-self/ns/net");
            // A thread spawned after setns inherits the namespace.
            let child = std::thread::spawn(move || inode("/proc/thread-self/ns/net"))
                .join()
                .unwrap();
            (inside, child)
        })
        .join();
        let after = std::fs::metadata("/proc/thread-self/ns/net")
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        let del = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .status()
            .expect("run ip netns del");
        assert!(del.success(), "ip netns del {name}");
        let (inside, child) = joined.expect("the thread in the namespace panicked");
        assert_eq!(Some(inside), want.ok());
        assert_eq!(child, inside);
        assert_eq!(after, here, "the test thread itself stayed where it was");
    }

    #[test]
    fn missing_namespace_is_a_clear_error() {
        let err = enter(Path::new("/var/run/netns/wiremesh-does-not-exist-test")).unwrap_err();
        assert!(
            err.to_string().contains("wiremesh-does-not-exist-test"),
            "{err}"
        );
    }
}
