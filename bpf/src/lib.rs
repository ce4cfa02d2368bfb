//! wiremesh eBPF: the tc programs (C in `src/*.bpf.c`, map ABI in `include/wiremesh.h`), the Rust
//! mirrors of that ABI, and the aya loader that pins maps and links per node, attaches the
//! programs and reads flow records.

pub mod abi;
pub mod loader;
pub mod sync;

pub use abi::{
    AbiError, Config, CtKey, FlowEvent, FlowKey, FlowState, Hook, IpcacheValue, IsolationKeyRaw,
    Mode, RuleData, Verdict, ipcache_flags,
};
pub use loader::{
    Attached, DEFAULT_BPFFS, Error, FlowReader, Loader, Maps, Retained, node_pin_dir,
};
pub use sync::{MapWriter, PolicyApplied, apply_policy, fake::FakeMaps};
