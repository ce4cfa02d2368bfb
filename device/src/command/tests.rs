//! The device process end to end: a panicked engine thread makes [`run`] fail, so the process
//! exits non-zero and its supervisor restarts it (issue 12: no half-dead datapath). The test
//! re-executes its own binary as the device process, in a network namespace of its own; the
//! panic comes from a hook compiled only into unit tests (`engine::PANIC_QUEUE`).
//! Privileged (creates a TUN device).

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use super::{DeviceArgs, run};

/// Set in the re-executed child: the directory for its UAPI socket.
const CHILD_ENV: &str = "WIREMESH_TEST_DEVICE_CHILD";
/// Only ever a deadline for a failure.
const DEADLINE: Duration = Duration::from_secs(30);
const TEST_NAME: &str = "command::tests::a_panicked_worker_makes_the_device_process_exit_non_zero";

#[test]
fn a_panicked_worker_makes_the_device_process_exit_non_zero() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&dir));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP {TEST_NAME}: needs root (CI runs it as root)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("child.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(std::env::current_exe().expect("own executable"))
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start the device process");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!("the device process still ran {DEADLINE:?} after its worker panicked:\n{text}")
    });
    let up = text.find("CHILD: device up").expect("device came up first");
    let failed = text
        .find("CHILD: device exited with error")
        .unwrap_or_else(|| panic!("the device did not fail:\n{text}"));
    assert!(up < failed, "{text}");
    assert!(
        text.contains("test hook: datapath worker 0 panics")
            && text.contains("engine thread wm-dp-0 panicked"),
        "{text}"
    );
    assert_eq!(status.code(), Some(1), "{text}");
}

/// The device process: serves a device until it fails, then exits as `main` does (1 on error).
fn child(dir: &Path) -> ! {
    // SAFETY: a new network namespace for this thread and the engine threads it starts.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!("CHILD: unshare: {}", std::io::Error::last_os_error());
        std::process::exit(2);
    }
    let socket = dir.join("wmpanic0.sock");
    let watched = socket.clone();
    std::thread::spawn(move || {
        if !uapi_answers(&watched) {
            eprintln!("CHILD: device never answered on its UAPI socket");
            std::process::exit(3);
        }
        eprintln!("CHILD: device up");
        crate::engine::PANIC_QUEUE.store(0, Ordering::SeqCst);
    });
    let args = DeviceArgs {
        ifname: "wmpanic0".into(),
        foreground: true,
        mtu: 1420,
        threads: 2,
        uapi_socket: Some(PathBuf::from(&socket)),
        busy_poll_us: 0,
    };
    match run(args, &[]) {
        Err(e) => {
            eprintln!("CHILD: device exited with error: {e:#}");
            std::process::exit(1);
        }
        Ok(()) => {
            eprintln!("CHILD: device exited cleanly");
            std::process::exit(0);
        }
    }
}

/// Waits (until [`DEADLINE`]) for a UAPI `get` on `socket` to succeed.
fn uapi_answers(socket: &Path) -> bool {
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if let Ok(mut stream) = UnixStream::connect(socket) {
            let mut reply = String::new();
            if stream.write_all(b"get=1\n\n").is_ok()
                && stream.shutdown(std::net::Shutdown::Write).is_ok()
                && stream.read_to_string(&mut reply).is_ok()
                && reply.contains("errno=0")
            {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
