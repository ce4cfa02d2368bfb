//! How the agent process uses the C allocator (glibc malloc), measured in docs/benchmarks.md
//! ("Agent memory"): a heap profile of the agent at 300-1,000 nodes showed its resident memory
//! well above its live heap, the difference being free memory malloc keeps in per-thread arenas.
//! Two settings close most of that gap:
//!
//! - [`limit_arenas`]: one malloc arena for the whole process instead of up to 8 per core (the
//!   tokio workers, blocking threads and the flow reader each got their own, each keeping its own
//!   free memory). The agent's allocation rate is low (watch events, one reconcile pass per
//!   burst), so the lock is not contended; the per-thread caches (tcache) still serve small
//!   allocations without it. The userspace device (`mesh-agent device`) keeps the default.
//! - [`release_free`]: after a pass that rebuilt the derived state (the peer plan, the policy
//!   model), return the free pages to the kernel instead of keeping them for the next pass.
//!
//! Both are no-ops where the C library is not glibc.

/// Limits glibc malloc to `arenas` arenas (`M_ARENA_MAX`). Call before any thread is started.
pub fn limit_arenas(arenas: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a malloc parameter; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = arenas;
}

/// Returns the free memory of every malloc arena to the kernel (`malloc_trim(0)`).
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory malloc holds free; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_free_keeps_live_allocations() {
        let live: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 64 * 1024]).collect();
        let freed: Vec<Vec<u8>> = (0..64).map(|_| vec![0u8; 64 * 1024]).collect();
        drop(freed);
        release_free();
        for (i, block) in live.iter().enumerate() {
            assert!(block.iter().all(|b| *b == i as u8));
        }
    }
}
