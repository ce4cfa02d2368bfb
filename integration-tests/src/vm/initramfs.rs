//! The guest's initramfs: a static busybox, the kernel modules the tests need (loaded with insmod
//! in dependency order, as the host root has no `/lib/modules` for this kernel), and `/init`, which
//! mounts the host's root read-only over virtio-9p, chroots into it and runs the command.
//!
//! The archive is written here in the cpio "newc" format (what the kernel unpacks), so no cpio
//! tool is needed and the result is the same byte for byte for the same inputs.

use std::path::Path;

/// The mount tag of the host's root filesystem (read-only).
pub(super) const ROOT_TAG: &str = "wmroot";
/// The mount tag of the per-run directory (read-write): command script, share table, stdout,
/// stderr and the exit code.
pub(super) const WORK_TAG: &str = "wmwork";
/// Console line printed when the command starts (everything before is boot).
pub(super) const MARK_START: &str = "WIREMESH_VM_CMD_START";
/// Console line prefix carrying the command's exit status.
pub(super) const MARK_EXIT: &str = "WIREMESH_VM_EXIT=";

/// PID 1 of the guest. Kept free of host-specific values: everything that varies per run is read
/// from the work share (`shares`, `cmd.sh`), so one initramfs serves every run.
pub(super) const INIT: &str = r#"#!/bin/busybox sh
# PID 1 of the wiremesh kernel VM (busybox). Loads the modules, mounts the host's root (9p, read-only)
# with fresh proc/sys/dev/tmp/run and a bpffs, mounts the per-run share and the extra shares, runs
# the command in a chroot, writes its exit status to the per-run share and powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "WIREMESH_VM_ERROR $*"; sync; poweroff -f; }
while read -r m args; do
  insmod "/mods/$m" $args || echo "WIREMESH_VM_ERROR insmod $m failed"
done < /mods/order
R=/newroot
O9=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o ro,$O9,cache=loose wmroot $R || fail "mounting the host root over 9p"
mount -t proc proc $R/proc || fail "proc"
mount -t sysfs sys $R/sys || fail "sysfs"
mount -t devtmpfs dev $R/dev || fail "devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs shm $R/dev/shm
mount -t tmpfs -o mode=1777 tmp $R/tmp || fail "tmpfs on /tmp"
mount -t tmpfs -o mode=755 run $R/run || fail "tmpfs on /run"
mount -t bpf bpf $R/sys/fs/bpf || fail "bpffs on /sys/fs/bpf"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
W=$R/run/wiremesh-vm
mkdir -p $W
mount -t 9p -o rw,$O9 wmwork $W || fail "mounting the per-run share"
while read -r tag mode dir; do
  [ -n "$tag" ] || continue
  cache=
  [ "$mode" = ro ] && cache=,cache=loose
  mkdir -p "$R$dir" 2>/dev/null
  mount -t 9p -o "$mode,$O9$cache" "$tag" "$R$dir" || fail "mounting share $dir"
done < $W/shares
ifconfig lo 127.0.0.1 up
hostname wiremesh-vm
echo "WIREMESH_VM_CMD_START"
chroot $R /bin/sh /run/wiremesh-vm/cmd.sh < /dev/null > $W/stdout 2> $W/stderr
rc=$?
echo "$rc" > $W/exit_code
sync
umount $W
echo "WIREMESH_VM_EXIT=$rc"
poweroff -f
"#;

/// One member of a newc archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Entry {
    /// A directory.
    Dir { path: String, mode: u32 },
    /// A regular file with its contents.
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    /// A symbolic link.
    Symlink { path: String, target: String },
    /// A character device node.
    CharDev {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes `entries` as a newc archive (owner root, mtime 0) with its trailer.
pub(super) fn newc(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        match e {
            Entry::Dir { path, mode } => {
                member(&mut out, ino, S_IFDIR | mode, 2, path, &[], (0, 0))
            }
            Entry::File { path, mode, data } => {
                member(&mut out, ino, S_IFREG | mode, 1, path, data, (0, 0))
            }
            Entry::Symlink { path, target } => member(
                &mut out,
                ino,
                S_IFLNK | 0o777,
                1,
                path,
                target.as_bytes(),
                (0, 0),
            ),
            Entry::CharDev {
                path,
                mode,
                major,
                minor,
            } => member(
                &mut out,
                ino,
                S_IFCHR | mode,
                1,
                path,
                &[],
                (*major, *minor),
            ),
        }
    }
    member(&mut out, 0, 0, 1, "TRAILER!!!", &[], (0, 0));
    out
}

fn member(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    name: &str,
    data: &[u8],
    rdev: (u32, u32),
) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The archive's members: `/init`, busybox, `/dev/console` (so PID 1 has a console before devtmpfs
/// is mounted), the mount points and the modules with their load order (`name.ko [params]` per
/// line, dependencies first).
pub(super) fn entries(busybox: Vec<u8>, modules: Vec<(String, Vec<u8>, String)>) -> Vec<Entry> {
    let mut v = Vec::new();
    for d in ["bin", "dev", "proc", "sys", "mods", "newroot", "tmp"] {
        v.push(Entry::Dir {
            path: d.to_owned(),
            mode: 0o755,
        });
    }
    v.push(Entry::CharDev {
        path: "dev/console".to_owned(),
        mode: 0o600,
        major: 5,
        minor: 1,
    });
    v.push(Entry::File {
        path: "bin/busybox".to_owned(),
        mode: 0o755,
        data: busybox,
    });
    v.push(Entry::Symlink {
        path: "bin/sh".to_owned(),
        target: "busybox".to_owned(),
    });
    v.push(Entry::File {
        path: "init".to_owned(),
        mode: 0o755,
        data: INIT.as_bytes().to_vec(),
    });
    let mut order = String::new();
    for (name, data, params) in modules {
        order.push_str(&name);
        if !params.is_empty() {
            order.push(' ');
            order.push_str(&params);
        }
        order.push('\n');
        v.push(Entry::File {
            path: format!("mods/{name}"),
            mode: 0o644,
            data,
        });
    }
    v.push(Entry::File {
        path: "mods/order".to_owned(),
        mode: 0o644,
        data: order.into_bytes(),
    });
    v
}

/// Whether an ELF image is statically linked (no `PT_INTERP` program header): the
/// initramfs has no shared libraries, so a dynamically linked busybox cannot run there.
pub(super) fn is_static_elf(bytes: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return None; // only 64-bit little-endian ELF is expected on x86_64
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(bytes.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let o = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?);
        if p_type == PT_INTERP {
            return Some(false);
        }
    }
    Some(true)
}

/// What the cached initramfs was built from; a different text means rebuild.
pub(super) fn inputs_text(busybox: &Path, busybox_len: usize, modules: &[String]) -> String {
    format!(
        "busybox {} {busybox_len}\nmodules {}\ninit:\n{INIT}",
        busybox.display(),
        modules.join(" ")
    )
}
