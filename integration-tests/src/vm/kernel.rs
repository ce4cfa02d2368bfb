//! Preparing the guest kernel: resolve Debian's `linux-image-amd64` to its versioned image
//! package, `apt-get download` it (nothing is installed: no /boot, no /lib/modules on the host),
//! unpack it with dpkg-deb, run depmod on the unpacked tree, extract the uncompressed ELF vmlinux
//! from the vmlinuz (booted through its PVH entry, which skips the real-mode setup and the
//! in-guest decompression) and build the initramfs with the modules the tests need.
//!
//! Everything lands in the cache directory and is reused: a second prepare only checks files.
//! The unpacked tree (~400 MB) is deleted once the initramfs is built; the .deb is kept so a
//! changed module list or init rebuilds without a download.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use tracing::{info, warn};

use super::{VmError, initramfs};

/// The meta package whose dependency names the kernel image package.
pub(super) const META_PACKAGE: &str = "linux-image-amd64";

/// Modules loaded in the guest, dependencies first (what `modprobe --show-depends` resolves):
/// virtio + 9p for the shares, virtio-rng for early entropy, and what the tests create: kernel
/// WireGuard links, veths, TUN devices, bridges (the virtual cluster's underlay), dummies, the
/// clsact qdisc with cls_bpf/act_bpf (eBPF attached through netlink, as 6.1 has no TCX).
/// Everything else they use (netns, IPv6, policy routing, AF_PACKET, BPF, BTF) is built in.
pub(super) const MODULES: [&str; 12] = [
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "virtio_rng",
    "wireguard",
    "veth",
    "tun",
    "bridge",
    "dummy",
    "sch_ingress",
    "cls_bpf",
    "act_bpf",
];

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub(super) struct Prepared {
    /// The kernel release (`uname -r` in the guest), e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// The image package's version, e.g. `6.1.192-3`.
    pub package_version: String,
    /// The uncompressed ELF vmlinux, or the bzImage when extraction was impossible.
    pub kernel: PathBuf,
    /// The initramfs archive.
    pub initramfs: PathBuf,
}

/// Finds `name` in PATH, then in the sbin directories (depmod lives there and a non-login PATH
/// may lack them).
pub(super) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `name`, which Debian's `package` provides, or an error naming the package to install.
pub(super) fn tool(name: &str, package: &'static str) -> Result<PathBuf, VmError> {
    which(name).ok_or_else(|| VmError::ToolMissing {
        tool: name.to_owned(),
        package,
    })
}

fn run(cmd: &mut Command) -> Result<String, VmError> {
    Ok(crate::command::run(cmd)?)
}

pub(super) fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> VmError {
    let (what, path) = (what.to_owned(), path.to_owned());
    move |source| VmError::Io { what, path, source }
}

/// Where apt keeps the package lists; `apt-get update` changes its modification time.
const APT_LISTS: &str = "/var/lib/apt/lists";

/// The versioned image package (`linux-image-6.1.0-57-amd64`) the meta package depends on,
/// from apt's local lists (no network). `WIREMESH_VM_KERNEL_PACKAGE` overrides it. The answer is
/// remembered in `<cache>/resolved-package` until the lists change (apt-cache takes 1-2 s on a
/// loaded machine, and every test binary prepares).
fn resolve_package(cache: &Path) -> Result<String, VmError> {
    if let Some(p) = std::env::var_os("WIREMESH_VM_KERNEL_PACKAGE") {
        return Ok(p.to_string_lossy().into_owned());
    }
    let memo = cache.join("resolved-package");
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = matches!(
        (modified(&memo), modified(Path::new(APT_LISTS))),
        (Some(at), Some(lists)) if at >= lists
    );
    if let Some(p) = fresh
        .then(|| fs::read_to_string(&memo).ok())
        .flatten()
        .map(|s| s.trim().to_owned())
        .filter(|s| s.starts_with("linux-image-"))
    {
        return Ok(p);
    }
    let package = resolve_with_apt_cache()?;
    fs::write(&memo, &package).map_err(io_err("writing", &memo))?;
    Ok(package)
}

fn resolve_with_apt_cache() -> Result<String, VmError> {
    let apt_cache = tool("apt-cache", "apt")?;
    let lookup = || -> Result<Option<String>, VmError> {
        let out = run(Command::new(&apt_cache).args(["depends", META_PACKAGE]))?;
        Ok(depends_image(&out))
    };
    if let Some(p) = lookup().ok().flatten() {
        return Ok(p);
    }
    // Empty or stale package lists (a fresh machine): refresh once.
    apt_update()?;
    lookup()?.ok_or_else(|| VmError::KernelPackage {
        package: META_PACKAGE.to_owned(),
        detail: "apt-cache depends names no linux-image-<version> package".to_owned(),
    })
}

/// The first `Depends: linux-image-<digit>...` of `apt-cache depends` output.
pub(super) fn depends_image(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends.lines().find_map(|l| {
        let p = l.trim().strip_prefix("Depends:")?.trim();
        let rest = p.strip_prefix("linux-image-")?;
        rest.starts_with(|c: char| c.is_ascii_digit())
            .then(|| p.to_owned())
    })
}

fn apt_update() -> Result<(), VmError> {
    let apt_get = tool("apt-get", "apt")?;
    info!("apt-get update (package lists for the kernel VM)");
    run(Command::new(apt_get).args(["update", "-qq"]))
        .map(drop)
        .map_err(|e| VmError::KernelPackage {
            package: META_PACKAGE.to_owned(),
            detail: format!("apt-get update failed: {e}"),
        })
}

/// The downloaded .deb of `package` in `cache`, if there is one.
fn find_deb(cache: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    fs::read_dir(cache)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
}

fn download(cache: &Path, package: &str) -> Result<PathBuf, VmError> {
    if let Some(deb) = find_deb(cache, package) {
        return Ok(deb);
    }
    let apt_get = tool("apt-get", "apt")?;
    info!(
        package,
        "apt-get download (the kernel image for the test VM)"
    );
    let get = || {
        run(Command::new(&apt_get)
            .arg("download")
            .arg(package)
            .current_dir(cache))
    };
    if let Err(first) = get() {
        warn!(error = %first, "apt-get download failed; refreshing the package lists once");
        apt_update()?;
        get().map_err(|e| VmError::KernelPackage {
            package: package.to_owned(),
            detail: e.to_string(),
        })?;
    }
    find_deb(cache, package).ok_or_else(|| VmError::KernelPackage {
        package: package.to_owned(),
        detail: format!(
            "apt-get download left no {package}_*.deb in {}",
            cache.display()
        ),
    })
}

/// Offset of the XZ stream in a bzImage (`scripts/extract-vmlinux` looks for the same magic).
pub(super) fn xz_offset(image: &[u8]) -> Option<usize> {
    const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
    image.windows(XZ_MAGIC.len()).position(|w| w == XZ_MAGIC)
}

/// Decompresses the XZ payload of `vmlinuz` into `out` and checks it is an ELF file. xz reports
/// an error for the bytes after the stream, so its exit status is not used: the ELF magic is.
fn extract_vmlinux(xz: &Path, vmlinuz: &Path, out: &Path) -> Result<bool, VmError> {
    let image = fs::read(vmlinuz).map_err(io_err("reading", vmlinuz))?;
    let Some(off) = xz_offset(&image) else {
        return Ok(false);
    };
    let tmp = out.with_extension("tmp");
    let file = fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
    let mut child = Command::new(xz)
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .map_err(io_err("starting", xz))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    // A broken pipe only means xz stopped reading after the stream's end.
    let _ = stdin.write_all(&image[off..]);
    drop(stdin);
    let _ = child.wait();
    let head = fs::read(&tmp).map_err(io_err("reading", &tmp))?;
    if head.len() > 4 && &head[..4] == b"\x7fELF" {
        fs::rename(&tmp, out).map_err(io_err("renaming", &tmp))?;
        Ok(true)
    } else {
        let _ = fs::remove_file(&tmp);
        Ok(false)
    }
}

/// `(file name, params)` of each module to insmod for `MODULES`, dependencies first, deduplicated;
/// built-in modules are skipped.
pub(super) fn load_order(show_depends: &str) -> Vec<(String, String)> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in show_depends.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("insmod") {
            continue;
        }
        let Some(path) = words.next() else { continue };
        let params = words.collect::<Vec<_>>().join(" ");
        if seen.insert(path.to_owned()) {
            out.push((path.to_owned(), params));
        }
    }
    out
}

/// Downloads, unpacks and prepares the kernel and its initramfs in `cache` (already locked by the
/// caller), reusing whatever is there.
pub(super) fn prepare(cache: &Path) -> Result<Prepared, VmError> {
    let (busybox, busybox_bytes) = busybox()?;
    let package = resolve_package(cache)?;
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_owned();
    let dir = cache.join(&release);
    fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let vmlinux = dir.join("vmlinux");
    let bzimage = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.cpio");
    let inputs_path = dir.join("initramfs.inputs");
    let modules: Vec<String> = MODULES.iter().map(|m| (*m).to_owned()).collect();
    let inputs = initramfs::inputs_text(&busybox, busybox_bytes.len(), &modules);
    let version_path = dir.join("package-version");

    let kernel_ready = vmlinux.is_file() || bzimage.is_file();
    let initrd_ready = initrd.is_file()
        && fs::read_to_string(&inputs_path).is_ok_and(|s| s == inputs)
        && version_path.is_file();
    if kernel_ready && initrd_ready {
        let package_version = fs::read_to_string(&version_path)
            .map_err(io_err("reading", &version_path))?
            .trim()
            .to_owned();
        let kernel = if vmlinux.is_file() { vmlinux } else { bzimage };
        return Ok(Prepared {
            release,
            package_version,
            kernel,
            initramfs: initrd,
        });
    }

    let dpkg_deb = tool("dpkg-deb", "dpkg")?;
    let depmod = tool("depmod", "kmod")?;
    let modprobe = tool("modprobe", "kmod")?;
    let xz = tool("xz", "xz-utils")?;
    let deb = download(cache, &package)?;
    let package_version = run(Command::new(&dpkg_deb).arg("-f").arg(&deb).arg("Version"))?
        .trim()
        .to_owned();
    let tree = dir.join("tree");
    let _ = fs::remove_dir_all(&tree);
    info!(deb = %deb.display(), "unpacking the kernel package (dpkg-deb -x, nothing installed)");
    run(Command::new(&dpkg_deb).arg("-x").arg(&deb).arg(&tree))?;
    let result = (|| {
        let vmlinuz = tree.join(format!("boot/vmlinuz-{release}"));
        if !vmlinuz.is_file() {
            return Err(VmError::KernelPackage {
                package: package.clone(),
                detail: format!("{} has no boot/vmlinuz-{release}", deb.display()),
            });
        }
        if !vmlinux.is_file() && !extract_vmlinux(&xz, &vmlinuz, &vmlinux)? {
            warn!("no XZ-compressed ELF in the vmlinuz; booting the bzImage (slower)");
            fs::copy(&vmlinuz, &bzimage).map_err(io_err("copying", &vmlinuz))?;
        }
        // The package ships no modules.dep (its postinst runs depmod).
        run(Command::new(&depmod).arg("-b").arg(&tree).arg(&release))?;
        let mut show = String::new();
        for m in MODULES {
            let out = run(Command::new(&modprobe).arg("-d").arg(&tree).args([
                "-S",
                &release,
                "--show-depends",
                m,
            ]))
            .map_err(|e| VmError::ModuleMissing {
                module: m.to_owned(),
                release: release.clone(),
                detail: e.to_string(),
            })?;
            show.push_str(&out);
        }
        let mut mods = Vec::new();
        for (path, params) in load_order(&show) {
            let path = PathBuf::from(path);
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let data = fs::read(&path).map_err(io_err("reading module", &path))?;
            mods.push((name, data, params));
        }
        let archive = initramfs::newc(&initramfs::entries(busybox_bytes, mods));
        let tmp = initrd.with_extension("tmp");
        fs::write(&tmp, archive).map_err(io_err("writing", &tmp))?;
        fs::rename(&tmp, &initrd).map_err(io_err("renaming", &tmp))?;
        fs::write(&inputs_path, &inputs).map_err(io_err("writing", &inputs_path))?;
        fs::write(&version_path, &package_version).map_err(io_err("writing", &version_path))?;
        Ok(())
    })();
    let _ = fs::remove_dir_all(&tree);
    result?;
    let kernel = if vmlinux.is_file() { vmlinux } else { bzimage };
    info!(%release, %package_version, kernel = %kernel.display(), "kernel VM prepared");
    Ok(Prepared {
        release,
        package_version,
        kernel,
        initramfs: initrd,
    })
}

/// A statically linked busybox (Debian's busybox-static installs it as /bin/busybox; the plain
/// busybox package's binary is dynamically linked and cannot run in the initramfs).
fn busybox() -> Result<(PathBuf, Vec<u8>), VmError> {
    let path = std::env::var_os("WIREMESH_VM_BUSYBOX")
        .map(PathBuf::from)
        .or_else(|| which("busybox"))
        .ok_or(VmError::ToolMissing {
            tool: "busybox".to_owned(),
            package: "busybox-static",
        })?;
    let bytes = fs::read(&path).map_err(io_err("reading", &path))?;
    match initramfs::is_static_elf(&bytes) {
        Some(true) => Ok((path, bytes)),
        _ => Err(VmError::ToolMissing {
            tool: format!(
                "a statically linked busybox ({} is not one)",
                path.display()
            ),
            package: "busybox-static",
        }),
    }
}
