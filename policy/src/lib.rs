//! wiremesh policy: security identities from pod and namespace labels, the full
//! `networking.k8s.io/v1` NetworkPolicy semantics (a reference evaluator), and the compiler that
//! flattens the same objects into the entries the eBPF programs look up. Pure logic: no Kubernetes
//! client, no sockets, no files.
#![forbid(unsafe_code)]

pub mod compile;
pub mod eval;
pub mod identity;
pub mod manifest;
pub mod model;
pub mod rules;
pub mod selector;

pub use compile::{
    CidrEntry, CompileWarning, Compiled, Direction, IsolationKey, MapDiff, PacketEnd,
    RULE_KEY_FIXED_BITS, RuleKey, compile, port_range_prefixes,
};
pub use eval::{SideVerdict, Verdict};
pub use identity::{Identity, IdentityAllocator, IdentityLabels, NAMESPACE_LABEL_PREFIX};
pub use manifest::{ManifestError, load_manifest};
pub use model::{
    Cluster, ClusterError, ContainerPort, Endpoint, Family, Namespace, Pod, PodFields, PodId,
    Protocol,
};
pub use rules::{IpBlock, Peer, Policy, PolicyError, PortSpec, PortValue, Rule};
pub use selector::{Requirement, Selector, SelectorError};
