//! The root check of the privileged tests (network namespaces, TUN devices, bpffs).

/// Whether a privileged test may run. Without root it fails under CI (which runs as root, so a
/// skip there would hide a broken setup) and is skipped loudly elsewhere; `needs` says what root
/// is needed for.
pub fn have_root(needs: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "privileged test run without root under CI"
    );
    eprintln!("SKIPPED: needs root ({needs})");
    false
}
