//! The wiremesh virtual cluster: a real kube-apiserver (testenv), nodes as network namespaces joined by
//! an underlay bridge, pods as namespaces behind veths (ptp style), Node and Pod objects as a kubelet
//! would leave them, and real agents running inside node namespaces.
//!
//! Entry points: [`VirtualCluster::start`] builds a whole cluster (tests, `meshctl demo up`);
//! [`Testenv::start`] runs only the apiserver; [`ClusterDescription`] is `cluster.json` and tears a
//! detached cluster down from another process. Everything created is recorded in a [`Ledger`] and
//! removed newest first; nothing is ever deleted by name pattern.

pub mod agentidentity;
pub mod apiproxy;
pub mod bpfpin;
pub mod clients;
mod cluster;
pub mod command;
mod description;
pub mod faults;
mod fsutil;
pub mod keyscan;
mod ledger;
mod names;
pub mod netns;
pub mod objects;
mod privilege;
mod process;
pub mod proxypki;
pub mod supervise;
pub mod testenv;
pub mod underlay;
pub mod vm;
pub mod wait;

pub use bpfpin::pin_map_of_another_shape;
pub use cluster::{
    ClusterError, ClusterNode, ClusterOptions, ClusterPod, POD_MTU, Role, VirtualCluster, node_name,
};
pub use description::{
    ApiProxyDescription, ClusterDescription, DescriptionError, NodeDescription, PodDescription,
};
pub use fsutil::write_private_atomic;
pub use ledger::{Ledger, ReleaseError, Resource, TeardownError};
pub use names::ClusterId;
pub use privilege::have_root;
pub use process::{ManagedProcess, ProcessError, ProcessIdentity, ProcessSpec};
pub use testenv::{Testenv, TestenvCredentials, TestenvError, TestenvOptions, UserCredential};
