//! Unique names for what one virtual cluster creates on the host.
//!
//! A [`ClusterId`] is the creating process's PID and a per-process counter, both in fixed-width base 36,
//! so clusters of parallel tests and of different processes never share a namespace or link name, and
//! every name still fits the kernel's 15-character interface name limit.

use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Identifies one virtual cluster: 5 base-36 digits of PID (pid_max is at most 2^22), 2 of counter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterId(String);

fn base36(mut n: u32, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(out).unwrap_or_default()
}

impl ClusterId {
    /// A fresh id for this process. The counter wraps after 1296 clusters in one process.
    pub fn next() -> Self {
        let seq = NEXT.fetch_add(1, Ordering::Relaxed) % (36 * 36);
        Self(format!(
            "{}{}",
            base36(std::process::id(), 5),
            base36(seq, 2)
        ))
    }

    /// The id itself (7 characters of `[0-9a-z]`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Name of the underlay bridge in the host namespace, e.g. `wmb0abcd00`.
    pub fn bridge(&self) -> String {
        format!("wmb{}", self.0)
    }

    /// Name of the host end of node `index`'s underlay veth, e.g. `wm0abcd00n3`.
    pub fn node_host_link(&self, index: u32) -> String {
        format!("wm{}n{index}", self.0)
    }

    /// Name of node `index`'s network namespace, e.g. `wm0abcd00-n3`.
    pub fn node_netns(&self, index: u32) -> String {
        format!("wm{}-n{index}", self.0)
    }

    /// Name of a pod's network namespace, e.g. `wm0abcd00-n3-p1`.
    pub fn pod_netns(&self, node_index: u32, pod_index: u32) -> String {
        format!("wm{}-n{node_index}-p{pod_index}", self.0)
    }
}

impl std::fmt::Display for ClusterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fixed_width_and_distinct() {
        let a = ClusterId::next();
        let b = ClusterId::next();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 7);
        assert!(
            a.as_str()
                .bytes()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
        );
    }

    #[test]
    fn link_names_fit_ifnamsiz() {
        let id = ClusterId::next();
        assert!(id.bridge().len() <= 15, "{}", id.bridge());
        assert!(
            id.node_host_link(239).len() <= 15,
            "{}",
            id.node_host_link(239)
        );
    }

    #[test]
    fn base36_is_positional() {
        assert_eq!(base36(0, 3), "000");
        assert_eq!(base36(35, 2), "0z");
        assert_eq!(base36(36, 2), "10");
        assert_eq!(base36(4_194_304, 5), "2hwcg");
    }
}
