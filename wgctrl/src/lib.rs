//! The wiremesh device-control layer: what the agent uses to read and configure a WireGuard
//! device, whatever implements it. [`datapath`] is the contract (the [`Datapath`] trait, its types
//! and an in-memory fake); [`uapi`] is the wg(8) cross-platform protocol and [`UapiDevice`], its
//! client for userspace devices (ours, wireguard-go, boringtun-cli); [`kernel`] is
//! [`KernelDevice`], the kernel module over generic netlink; [`link`] creates, finds and deletes
//! kernel `wireguard` links; [`convert`] maps the trait's calls onto the protocol's requests.

pub mod convert;
pub mod datapath;
#[doc(hidden)]
pub mod fuzzing;
mod iface;
pub mod kernel;
pub mod link;
mod netlink;
pub mod uapi;

pub use datapath::{
    Datapath, DatapathError, DatapathKind, DeviceSettings, DeviceStatus, PeerConfig, PeerStatus,
};
pub use kernel::{KernelDevice, KernelError};
pub use link::{
    Link, LinkError, create_wireguard_link, delete_link, find_link, kernel_module_available,
};
pub use netlink::NetlinkError;
pub use uapi::{UapiClientError, UapiDevice};
