//! The wiremesh device-control layer: what the agent uses to read and configure a WireGuard
//! device, whatever implements it. [`datapath`] is the contract (the [`Datapath`] trait, its types
//! and an in-memory fake); [`uapi`] is the wg(8) cross-platform configuration protocol that
//! userspace devices (ours, wireguard-go, boringtun-cli) speak on their Unix socket.

pub mod datapath;
pub mod uapi;

pub use datapath::{
    Datapath, DatapathError, DatapathKind, DeviceSettings, DeviceStatus, PeerConfig, PeerStatus,
};
