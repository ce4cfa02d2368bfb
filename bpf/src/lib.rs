//! wiremesh eBPF: tc programs for steering, policy and flow records, and the Rust side of their map
//! ABI. The programs arrive with the eBPF issue; until then this crate only reserves its place in the
//! workspace.
