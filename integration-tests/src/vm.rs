//! Real-kernel tests in a VM: Debian's stock kernel (linux-image-amd64, 6.1, with the WireGuard
//! module this host's kernel lacks, and without TCX) boots under qemu with a busybox initramfs,
//! mounts the host's `/` read-only over virtio-9p, chroots into it and runs one command, so host
//! binaries (`ip`, `wg`, `tc`, a Rust test binary) run unchanged on the guest kernel.
//!
//! [`KernelVm::prepare`] downloads and caches the kernel and builds the initramfs (once, under the
//! repository's `.cache/kernel-vm/`); [`KernelVm::run`] boots it for one [`VmCommand`] and returns
//! its exit code, stdout and stderr (written by the guest into a per-run read-write share) and the
//! console. [`rerun_self_in_vm`] and friends re-execute the running test binary in the guest, with
//! [`IN_VM_ENV`] set so a test knows where it runs ([`in_guest`]). A boot costs seconds under
//! software emulation: run every test of a binary in one boot.
//!
//! The guest has fresh tmpfs on `/tmp` and `/run` (hiding the host's), a bpffs on `/sys/fs/bpf`,
//! `/dev/net/tun`, loopback up, no network interface at all, 1 vCPU. Under TCG speed means
//! nothing: test behaviour here, never benchmark.

mod initramfs;
mod kernel;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    ffi::{OsStr, OsString},
    fs,
    io::{Read, Seek, SeekFrom},
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use tracing::{debug, info};

use initramfs::{MARK_EXIT, MARK_START, ROOT_TAG, WORK_TAG};

/// Set to `1` in the guest command's environment.
pub const IN_VM_ENV: &str = "WIREMESH_IN_VM";

/// The PATH of the guest command (with the sbin directories: `ip`, `tc`, `wg` live there).
pub const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Whether this process runs inside the kernel VM (env [`IN_VM_ENV`]`=1`).
pub fn in_guest() -> bool {
    std::env::var_os(IN_VM_ENV).is_some_and(|v| v == "1")
}

/// Why the VM could not be prepared or a command could not run in it.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// qemu is not installed.
    #[error(
        "qemu-system-x86_64 not found: install Debian's qemu-system-x86 (`make deps` does), or \
         point WIREMESH_VM_QEMU at it"
    )]
    QemuMissing,
    /// Another tool of the preparation is not installed.
    #[error("{tool} not found: install Debian's {package} (`make deps` does)")]
    ToolMissing {
        /// The tool.
        tool: String,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// The kernel package could not be resolved, downloaded or unpacked.
    #[error("kernel package {package}: {detail}")]
    KernelPackage {
        /// The package.
        package: String,
        /// What went wrong (apt's message).
        detail: String,
    },
    /// A module the tests need is not in the kernel package.
    #[error("module {module} is not available for kernel {release}: {detail}")]
    ModuleMissing {
        /// The module.
        module: String,
        /// The kernel release.
        release: String,
        /// modprobe's message.
        detail: String,
    },
    /// A preparation step (apt, dpkg-deb, depmod, modprobe) could not run or failed.
    #[error(transparent)]
    Command(#[from] crate::command::CommandError),
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A share cannot be passed to the guest.
    #[error("share {path}: {reason}")]
    BadShare {
        /// The host directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The guest did not reach the command in time.
    #[error(
        "the VM did not start the command within {timeout:?} (boot timeout); console tail:\n{console_tail}"
    )]
    BootTimeout {
        /// The boot timeout.
        timeout: Duration,
        /// The last lines of the serial console.
        console_tail: String,
    },
    /// The command did not finish in time (the VM was killed).
    #[error(
        "the command did not finish within {timeout:?} in the VM\n--- stdout tail ---\n{stdout_tail}\n\
         --- stderr tail ---\n{stderr_tail}\n--- console tail ---\n{console_tail}"
    )]
    CommandTimeout {
        /// The command timeout.
        timeout: Duration,
        /// The last lines the command wrote to stdout.
        stdout_tail: String,
        /// The last lines the command wrote to stderr.
        stderr_tail: String,
        /// The last lines of the serial console.
        console_tail: String,
    },
    /// qemu ended without the guest reporting an exit status (a kernel panic, a failed mount, a
    /// qemu error).
    #[error(
        "the VM stopped without reporting the command's exit status (qemu: {qemu_status})\n\
         --- qemu stderr ---\n{qemu_stderr}\n--- console tail ---\n{console_tail}"
    )]
    NoExitStatus {
        /// qemu's exit status.
        qemu_status: String,
        /// qemu's own stderr.
        qemu_stderr: String,
        /// The last lines of the serial console.
        console_tail: String,
    },
}

impl VmError {
    /// Whether the error means this machine lacks a tool (then a test outside CI may skip; in CI
    /// it must fail).
    pub fn is_missing_tool(&self) -> bool {
        matches!(self, Self::QemuMissing | Self::ToolMissing { .. })
    }
}

/// A host directory mounted in the guest at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The directory (absolute after [`KernelVm::run`] resolves it).
    pub path: PathBuf,
    /// Read-write (results, logs) or read-only (binaries under the host's /tmp).
    pub writable: bool,
}

/// One command to run in the guest, as root, in a chroot of the host's `/`.
#[derive(Debug, Clone)]
pub struct VmCommand {
    /// Program and arguments; the program is looked up in [`GUEST_PATH`].
    pub argv: Vec<OsString>,
    /// Environment on top of the defaults (PATH, HOME, TERM, `WG_COLOR_MODE=never`,
    /// `RUST_BACKTRACE=1`, [`IN_VM_ENV`]`=1`); the guest starts from an empty environment.
    pub env: BTreeMap<String, OsString>,
    /// Working directory in the guest (default `/`).
    pub cwd: Option<PathBuf>,
    /// Extra host directories, mounted at the same path (needed for anything under the host's
    /// /tmp or /run, which the guest's tmpfs hide, and for anything the command writes).
    pub shares: Vec<Share>,
    /// Guest memory (default 1024 MiB).
    pub memory_mib: u32,
    /// From qemu's start until the command runs (default 180 s; the machine may be loaded).
    pub boot_timeout: Duration,
    /// For the command itself (default 600 s).
    pub timeout: Duration,
}

impl VmCommand {
    /// `argv` with the defaults.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self {
            argv: argv.into_iter().map(|a| a.as_ref().to_owned()).collect(),
            env: BTreeMap::new(),
            cwd: None,
            shares: Vec::new(),
            memory_mib: 1024,
            boot_timeout: Duration::from_secs(180),
            timeout: Duration::from_secs(600),
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl AsRef<OsStr>) -> Self {
        self.env.insert(key.into(), value.as_ref().to_owned());
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Shares a host directory read-write at the same path.
    pub fn share_rw(mut self, dir: impl Into<PathBuf>) -> Self {
        self.shares.push(Share {
            path: dir.into(),
            writable: true,
        });
        self
    }

    /// Shares a host directory read-only at the same path.
    pub fn share_ro(mut self, dir: impl Into<PathBuf>) -> Self {
        self.shares.push(Share {
            path: dir.into(),
            writable: false,
        });
        self
    }

    /// Sets the guest memory.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Sets the command timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the boot timeout.
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }
}

/// What a command did in the guest.
#[derive(Debug, Clone)]
pub struct VmOutput {
    /// The command's exit code (128 + n when killed by signal n, as sh reports it).
    pub exit_code: i32,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
    /// The serial console: kernel messages and the init's lines.
    pub console: String,
    /// From qemu's start until the command started.
    pub boot_time: Duration,
    /// From qemu's start until qemu exited.
    pub wall_time: Duration,
}

impl VmOutput {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }
}

/// How qemu runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accel {
    Kvm,
    Tcg,
}

/// A prepared kernel and initramfs, ready to boot any number of times (also concurrently).
#[derive(Debug, Clone)]
pub struct KernelVm {
    qemu: PathBuf,
    accel: Accel,
    cache: PathBuf,
    prepared: kernel::Prepared,
}

/// The cache: `WIREMESH_VM_CACHE`, or `.cache/kernel-vm` in the repository (gitignored).
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WIREMESH_VM_CACHE") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(env!("CARGO_MANIFEST_DIR")))
        .join(".cache/kernel-vm")
}

impl KernelVm {
    /// Prepares the VM in [`default_cache_dir`]: idempotent and cheap once cached (the first call
    /// downloads ~70 MB and takes tens of seconds). Safe to call from concurrent processes.
    pub fn prepare() -> Result<Self, VmError> {
        Self::prepare_in(&default_cache_dir())
    }

    /// [`KernelVm::prepare`] with an explicit cache directory.
    pub fn prepare_in(cache: &Path) -> Result<Self, VmError> {
        let qemu = match std::env::var_os("WIREMESH_VM_QEMU") {
            Some(q) => PathBuf::from(q),
            None => kernel::which("qemu-system-x86_64").ok_or(VmError::QemuMissing)?,
        };
        fs::create_dir_all(cache).map_err(kernel::io_err("creating", cache))?;
        let cache = cache
            .canonicalize()
            .map_err(kernel::io_err("resolving", cache))?;
        let lock_path = cache.join("lock");
        let _lock = FileLock::acquire(&lock_path)?;
        let t0 = Instant::now();
        let prepared = kernel::prepare(&cache)?;
        remove_dead_runs(&cache.join("runs"));
        debug!(elapsed = ?t0.elapsed(), "kernel VM prepare");
        Ok(Self {
            qemu,
            accel: accel(),
            cache,
            prepared,
        })
    }

    /// The guest's kernel release (`uname -r`).
    pub fn release(&self) -> &str {
        &self.prepared.release
    }

    /// The Debian version of the kernel package.
    pub fn package_version(&self) -> &str {
        &self.prepared.package_version
    }

    /// Boots the VM, runs `cmd` and returns what it did. A non-zero exit code is not an error;
    /// a guest that cannot boot, a timeout or a guest that stops without an exit code is.
    pub fn run(&self, cmd: &VmCommand) -> Result<VmOutput, VmError> {
        if cmd.argv.is_empty() {
            return Err(VmError::BadShare {
                path: PathBuf::new(),
                reason: "empty argv".to_owned(),
            });
        }
        let shares = resolve_shares(&cmd.shares)?;
        let run = RunDir::create(&self.cache.join("runs"))?;
        let mut table = String::new();
        for (i, s) in shares.iter().enumerate() {
            let mode = if s.writable { "rw" } else { "ro" };
            table.push_str(&format!("wmshare{i} {mode} {}\n", s.path.display()));
        }
        run.write("shares", table.as_bytes())?;
        run.write("cmd.sh", &guest_script(cmd))?;
        let console = run.path.join("console.log");
        let qemu_log = run.path.join("qemu.log");
        let args = self.qemu_args(cmd, &run.path, &console, &shares);
        let qemu_stderr =
            fs::File::create(&qemu_log).map_err(kernel::io_err("creating", &qemu_log))?;
        let mut command = Command::new(&self.qemu);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(qemu_stderr);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // qemu dies with the test process instead of outliving a killed test run.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        info!(release = %self.prepared.release, accel = ?self.accel, argv = ?cmd.argv, "booting the kernel VM");
        let t0 = Instant::now();
        let child = command
            .spawn()
            .map_err(kernel::io_err("starting", &self.qemu))?;
        let mut qemu = Qemu(child);
        let verbose = std::env::var_os("WIREMESH_VM_VERBOSE").is_some_and(|v| v == "1");
        let mut tail = ConsoleFollower::new(&console, verbose);
        let mut started: Option<Duration> = None;
        let status = loop {
            tail.poll();
            if started.is_none() && tail.seen(MARK_START) {
                started = Some(t0.elapsed());
            }
            if let Some(status) = qemu
                .0
                .try_wait()
                .map_err(kernel::io_err("waiting for", &self.qemu))?
            {
                break status;
            }
            let elapsed = t0.elapsed();
            match started {
                None if elapsed > cmd.boot_timeout => {
                    qemu.kill();
                    tail.poll();
                    return Err(VmError::BootTimeout {
                        timeout: cmd.boot_timeout,
                        console_tail: tail_lines(&tail.text(), 40),
                    });
                }
                Some(s) if elapsed > s + cmd.timeout => {
                    qemu.kill();
                    tail.poll();
                    return Err(VmError::CommandTimeout {
                        timeout: cmd.timeout,
                        stdout_tail: tail_lines(&run.read_lossy("stdout"), 60),
                        stderr_tail: tail_lines(&run.read_lossy("stderr"), 60),
                        console_tail: tail_lines(&tail.text(), 20),
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let wall_time = t0.elapsed();
        tail.poll();
        let console_text = tail.text();
        let exit_code = run
            .read_lossy("exit_code")
            .trim()
            .parse::<i32>()
            .ok()
            .or_else(|| exit_marker(&console_text));
        let Some(exit_code) = exit_code else {
            return Err(VmError::NoExitStatus {
                qemu_status: status.to_string(),
                qemu_stderr: fs::read_to_string(&qemu_log).unwrap_or_default(),
                console_tail: tail_lines(&console_text, 40),
            });
        };
        let out = VmOutput {
            exit_code,
            stdout: run.read_lossy("stdout"),
            stderr: run.read_lossy("stderr"),
            console: console_text,
            boot_time: started.unwrap_or(wall_time),
            wall_time,
        };
        info!(exit_code, boot = ?out.boot_time, wall = ?out.wall_time, "kernel VM command finished");
        Ok(out)
    }

    fn qemu_args(
        &self,
        cmd: &VmCommand,
        run_dir: &Path,
        console: &Path,
        shares: &[Share],
    ) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => push(&["-accel", "tcg"]),
        }
        let mem = format!("{}M", cmd.memory_mib);
        let con = format!("file,id=con,path={}", qemu_escape(console));
        let kernel = self.prepared.kernel.to_string_lossy().into_owned();
        let initrd = self.prepared.initramfs.to_string_lossy().into_owned();
        push(&[
            "-M",
            "q35",
            "-m",
            &mem,
            "-smp",
            "1",
            "-display",
            "none",
            "-vga",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-nic",
            "none",
            "-chardev",
            &con,
            "-serial",
            "chardev:con",
            "-kernel",
            &kernel,
            "-initrd",
            &initrd,
            "-append",
            "console=ttyS0 quiet panic=-1 rdinit=/init",
            "-device",
            "virtio-rng-pci",
        ]);
        let mut fsdev = |id: &str, tag: &str, path: &Path, writable: bool| {
            let ro = if writable { "" } else { ",readonly=on" };
            a.extend([
                "-fsdev".to_owned(),
                format!(
                    "local,id={id},path={},security_model=none{ro},multidevs=remap",
                    qemu_escape(path)
                ),
                "-device".to_owned(),
                format!("virtio-9p-pci,fsdev={id},mount_tag={tag}"),
            ]);
        };
        fsdev("fsroot", ROOT_TAG, Path::new("/"), false);
        fsdev("fswork", WORK_TAG, run_dir, true);
        for (i, s) in shares.iter().enumerate() {
            fsdev(
                &format!("fs{i}"),
                &format!("wmshare{i}"),
                &s.path,
                s.writable,
            );
        }
        a
    }
}

/// `-accel`: KVM only with real VT-x/AMD-V (`/dev/kvm` on these machines is kvm_pvm, which a stock
/// kernel does not boot on); `WIREMESH_VM_ACCEL=kvm|tcg` overrides.
fn accel() -> Accel {
    match std::env::var("WIREMESH_VM_ACCEL").as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    let kvm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let vt = fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    });
    if kvm && vt { Accel::Kvm } else { Accel::Tcg }
}

/// qemu option values escape a comma by doubling it.
fn qemu_escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

fn resolve_shares(shares: &[Share]) -> Result<Vec<Share>, VmError> {
    let mut out = Vec::new();
    for s in shares {
        let bad = |reason: &str| VmError::BadShare {
            path: s.path.clone(),
            reason: reason.to_owned(),
        };
        let path = s
            .path
            .canonicalize()
            .map_err(|e| bad(&format!("cannot resolve: {e}")))?;
        if !path.is_dir() {
            return Err(bad("not a directory"));
        }
        if path == Path::new("/") || path.as_os_str().as_bytes().contains(&b'\n') {
            return Err(bad("must be a directory other than / without newlines"));
        }
        out.push(Share {
            path,
            writable: s.writable,
        });
    }
    Ok(out)
}

/// `'…'` quoting for sh.
fn sh_quote(s: &OsStr) -> Vec<u8> {
    let mut out = vec![b'\''];
    for &b in s.as_bytes() {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

/// The environment of a guest command: the defaults, then `cmd.env`.
fn guest_env(cmd: &VmCommand) -> BTreeMap<String, OsString> {
    let mut env: BTreeMap<String, OsString> = [
        ("PATH", GUEST_PATH),
        ("HOME", "/root"),
        ("TERM", "dumb"),
        ("LANG", "C.UTF-8"),
        ("WG_COLOR_MODE", "never"),
        ("RUST_BACKTRACE", "1"),
        (IN_VM_ENV, "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), OsString::from(v)))
    .collect();
    env.extend(cmd.env.clone());
    env
}

/// `cmd.sh`: the working directory, then `env -i` with exactly the guest environment.
fn guest_script(cmd: &VmCommand) -> Vec<u8> {
    let mut s = b"# written by wiremesh_integration::vm for one run\n".to_vec();
    let cwd = cmd.cwd.clone().unwrap_or_else(|| PathBuf::from("/"));
    s.extend_from_slice(b"cd ");
    s.extend(sh_quote(cwd.as_os_str()));
    s.extend_from_slice(b" || exit 126\nexec /usr/bin/env -i");
    for (k, v) in guest_env(cmd) {
        let mut kv = OsString::from(k);
        kv.push("=");
        kv.push(v);
        s.push(b' ');
        s.extend(sh_quote(&kv));
    }
    for a in &cmd.argv {
        s.push(b' ');
        s.extend(sh_quote(a));
    }
    s.push(b'\n');
    s
}

fn exit_marker(console: &str) -> Option<i32> {
    console
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(MARK_EXIT)?.trim().parse().ok())
}

/// The last `n` lines of `text`.
fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// qemu, killed if still running when dropped (a panicking test leaves no VM behind).
struct Qemu(Child);

impl Qemu {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.kill();
        }
    }
}

/// Reads the console log as qemu appends to it (echoing it to stderr when verbose).
struct ConsoleFollower {
    path: PathBuf,
    buf: Vec<u8>,
    verbose: bool,
}

impl ConsoleFollower {
    fn new(path: &Path, verbose: bool) -> Self {
        Self {
            path: path.to_owned(),
            buf: Vec::new(),
            verbose,
        }
    }

    fn poll(&mut self) {
        let Ok(mut f) = fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.buf.len() as u64)).is_err() {
            return;
        }
        let before = self.buf.len();
        let _ = f.read_to_end(&mut self.buf);
        if self.verbose && self.buf.len() > before {
            eprint!("{}", String::from_utf8_lossy(&self.buf[before..]));
        }
    }

    fn seen(&self, marker: &str) -> bool {
        self.buf
            .windows(marker.len())
            .any(|w| w == marker.as_bytes())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).replace('\r', "")
    }
}

/// The per-run directory (`<cache>/runs/<pid>-<n>`), shared read-write with the guest and removed
/// afterwards (`WIREMESH_KEEP_WORK_DIR=1` keeps it).
struct RunDir {
    path: PathBuf,
}

impl RunDir {
    fn create(parent: &Path) -> Result<Self, VmError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = parent.join(format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path); // a previous process with the same PID
        fs::create_dir_all(&path).map_err(kernel::io_err("creating", &path))?;
        Ok(Self { path })
    }

    fn write(&self, name: &str, data: &[u8]) -> Result<(), VmError> {
        let p = self.path.join(name);
        fs::write(&p, data).map_err(kernel::io_err("writing", &p))
    }

    fn read_lossy(&self, name: &str) -> String {
        fs::read(self.path.join(name))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::env::var_os("WIREMESH_KEEP_WORK_DIR").is_some_and(|v| v == "1") {
            eprintln!("kept the VM run directory {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Removes run directories of processes that are gone (killed before their cleanup ran).
fn remove_dead_runs(runs: &Path) {
    let Ok(entries) = fs::read_dir(runs) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let pid = name.to_str().and_then(|n| n.split('-').next());
        if pid.is_some_and(|p| !Path::new("/proc").join(p).exists()) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// An exclusive `flock` on a file, released on drop (concurrent test binaries prepare once).
struct FileLock {
    _file: fs::File,
}

impl FileLock {
    fn acquire(path: &Path) -> Result<Self, VmError> {
        use std::os::fd::AsRawFd;
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(kernel::io_err("opening", path))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(kernel::io_err("locking", path)(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self { _file: f })
    }
}

/// Host directories the guest cannot see through the root share (its own tmpfs and virtual
/// filesystems hide them).
fn hidden_in_guest(p: &Path) -> bool {
    ["/tmp", "/run", "/var/run", "/dev", "/proc", "/sys"]
        .iter()
        .any(|h| p.starts_with(h))
}

/// Environment of the host test process passed on to the guest test process.
fn forwarded_env() -> impl Iterator<Item = (String, OsString)> {
    std::env::vars_os().filter_map(|(k, v)| {
        let k = k.into_string().ok()?;
        let pass = k == "CI"
            || k.starts_with("RUST_")
            || k.starts_with("CARGO_")
            || (k.starts_with("WIREMESH_") && k != IN_VM_ENV);
        pass.then_some((k, v))
    })
}

/// The command that re-executes this test binary in the guest with `args` (libtest arguments):
/// same executable (its directory shared when the guest would not see it), same working
/// directory, the forwarded environment, `WIREMESH_VM_TIMEOUT_SECS` as the command timeout.
pub fn self_command<I, S>(args: I) -> VmCommand
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = VmCommand::new(
        std::iter::once(exe.as_os_str().to_owned())
            .chain(args.into_iter().map(|a| a.as_ref().to_owned())),
    );
    for (k, v) in forwarded_env() {
        cmd = cmd.env(k, v);
    }
    if let Some(secs) = std::env::var("WIREMESH_VM_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        cmd = cmd.timeout(Duration::from_secs(secs));
    }
    if let Some(dir) = exe.parent().filter(|d| hidden_in_guest(d)) {
        cmd = cmd.share_ro(dir);
    }
    if let Ok(cwd) = std::env::current_dir() {
        if hidden_in_guest(&cwd) && Some(cwd.as_path()) != exe.parent() {
            cmd = cmd.share_ro(&cwd);
        }
        cmd = cmd.cwd(cwd);
    }
    cmd
}

/// Prepares the VM for a test: `None` (with a SKIPPED line) only outside CI when a tool is
/// missing; in CI, or on any other error, the test fails with the reason.
pub fn prepare_for_test() -> Option<KernelVm> {
    assert!(
        !in_guest(),
        "already inside the kernel VM: a guest test must not boot another VM"
    );
    let t0 = Instant::now();
    match KernelVm::prepare() {
        Ok(vm) => {
            eprintln!("kernel VM prepared in {:.1?}", t0.elapsed());
            Some(vm)
        }
        Err(e) if e.is_missing_tool() && std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: the kernel VM cannot run on this machine: {e}");
            None
        }
        Err(e) => panic!("the kernel VM cannot run on this machine: {e}"),
    }
}

/// Runs this test binary in the guest with `args` and checks libtest's summary: the run must
/// pass and have run at least `min_passed` tests (a filter that matches nothing passes
/// vacuously, so a count is required). Prints the guest's output and the timings (shown by
/// libtest for a failing test or with --nocapture). Returns `None` when skipped
/// ([`prepare_for_test`]).
pub fn rerun_self_with_args(args: &[&str], min_passed: usize) -> Option<VmOutput> {
    let vm = prepare_for_test()?;
    let cmd = self_command(args);
    let out = vm
        .run(&cmd)
        .unwrap_or_else(|e| panic!("running {args:?} in the kernel VM: {e}"));
    eprintln!(
        "--- guest ({} {}) stdout ---\n{}\n--- guest stderr ---\n{}\n--- kernel VM: boot {:.1?}, \
         command {:.1?}, wall {:.1?}, exit {} ---",
        vm.release(),
        vm.package_version(),
        out.stdout,
        out.stderr,
        out.boot_time,
        out.wall_time.saturating_sub(out.boot_time),
        out.wall_time,
        out.exit_code,
    );
    let passed = libtest_passed(&out.stdout);
    assert!(
        out.success() && passed.is_some_and(|n| n >= min_passed),
        "tests {args:?} failed in the kernel VM (exit {}, passed {passed:?}, expected at least \
         {min_passed}); the guest's output is above; console tail:\n{}",
        out.exit_code,
        tail_lines(&out.console, 30)
    );
    Some(out)
}

/// Re-executes the test `test_name` of this binary inside the guest (`--exact`, ignored tests
/// included, `--nocapture --test-threads=1`, [`IN_VM_ENV`]`=1`) and panics with the guest's
/// output unless it passed. Call it from the same test on the host:
///
/// ```no_run
/// # use wiremesh_integration::vm;
/// #[test]
/// fn kernel_wireguard() {
///     if !vm::in_guest() {
///         return vm::rerun_self_in_vm("kernel_wireguard");
///     }
///     // runs on the guest's kernel
/// }
/// ```
pub fn rerun_self_in_vm(test_name: &str) {
    rerun_tests_in_vm(&[test_name]);
}

/// Several tests of this binary in one boot (each by exact name); every one must pass.
pub fn rerun_tests_in_vm(test_names: &[&str]) {
    let mut args = vec!["--exact"];
    args.extend_from_slice(test_names);
    args.extend(["--include-ignored", "--nocapture", "--test-threads=1"]);
    rerun_self_with_args(&args, test_names.len());
}

/// Every test of this binary in one boot except `skip` (the host test calling this, and whatever
/// cannot run there), one at a time; at least one must run and all must pass.
pub fn rerun_all_in_vm(skip: &[&str]) {
    let mut args = vec!["--exact", "--test-threads=1"];
    for s in skip {
        args.extend(["--skip", s]);
    }
    rerun_self_with_args(&args, 1);
}

/// libtest's "test result: ok. N passed" count, `None` when the summary is missing or not ok.
fn libtest_passed(stdout: &str) -> Option<usize> {
    stdout.lines().rev().find_map(|l| {
        let rest = l.trim().strip_prefix("test result: ok. ")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}
