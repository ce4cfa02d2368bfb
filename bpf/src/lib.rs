//! wiremesh eBPF: the tc programs (C in `src/*.bpf.c`, map ABI in `include/wiremesh.h`), the Rust
//! mirrors of that ABI, and the aya loader that pins maps and links per node, attaches the
//! programs and reads flow records.

pub mod abi;
pub mod frame;
pub mod loader;
pub mod sync;

pub use abi::{
    AbiError, CT_OTHER_TIMEOUT_DEFAULT, CT_TCP_CLOSE_TIMEOUT, CT_TCP_TIMEOUT_DEFAULT, Config,
    Ct6Key, CtKey, CtKeyOf, CtValue, EndpointValue, Flow, FlowEvent, FlowEvent6, FlowKey, FlowKey6,
    FlowKeyOf, FlowState, FragKey, FragValue, Hook, IpcacheValue, IsolationKeyRaw, Mode, RuleData,
    STATS6_SPOOFED, Stats6, Verdict, config_flags, ipcache_flags,
};
pub use loader::{
    Attached, DEFAULT_BPFFS, Error, FlowBacklog, FlowReader, Loader, Maps, NETLINK_HANDLE,
    NETLINK_PRIORITY, ProgramStats, Retained, RingWaiter, TestRun, if_index, node_pin_dir,
    pinned_ipcache_entries, pinned_ipcache6_entries, tcx_available,
};
pub use sync::{MapWriter, PolicyApplied, apply_policy, apply_policy_dual, fake::FakeMaps};
