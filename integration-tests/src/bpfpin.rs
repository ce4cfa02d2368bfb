//! Pins as an older build leaves them, for upgrade tests: the bpf datapath tests
//! (`wiremesh-bpf`'s `tests/datapath.rs`) and the mesh upgrade scenario (`tests/mesh_upgrade.rs`)
//! both replace a pinned map with one of another shape.

use std::{ffi::CString, io, os::unix::ffi::OsStrExt, path::Path};

/// `bpf(2)` commands and map type used here (linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// Size of the `union bpf_attr` passed to the kernel (zero-filled beyond the used fields).
const ATTR_SIZE: libc::c_long = 128;

/// Replaces the pin `path` with a new, empty one-entry array map of `value_size`-byte values (a
/// map of another shape, as a build with another struct layout would have left it). The map it
/// pinned before lives on while programs use it.
pub fn pin_map_of_another_shape(path: &Path, value_size: u32) -> io::Result<()> {
    let context = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    std::fs::remove_file(path).map_err(|e| context(&format!("unpin {}", path.display()), e))?;
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, rest 0.
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[BPF_MAP_TYPE_ARRAY, 4, value_size, 1]);
    // SAFETY: BPF_MAP_CREATE with a zeroed attr of ATTR_SIZE bytes that outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_mut_ptr(), ATTR_SIZE) };
    if fd < 0 {
        return Err(context("map create", io::Error::last_os_error()));
    }
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // BPF_OBJ_PIN: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut pin = [0u64; 16];
    pin[0] = c_path.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: BPF_OBJ_PIN with a valid path pointer and map fd; both outlive the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin.as_mut_ptr(), ATTR_SIZE) };
    let pinned = if r == 0 {
        Ok(())
    } else {
        Err(context("pin", io::Error::last_os_error()))
    };
    // SAFETY: fd is ours and closed once; the pin (if made) keeps the map.
    unsafe { libc::close(fd as i32) };
    pinned
}
