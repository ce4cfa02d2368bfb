//! The wiremesh node agent: publishes this node's WireGuard key, watches the other nodes, and keeps a
//! full mesh of tunnels configured through a [`datapath::Datapath`].
//!
//! `datapath` is the device-control layer of crate `wiremesh-wgctrl`, re-exported under its old
//! path. This library never links the userspace engine (crate `wiremesh-device`): only the
//! `mesh-agent` binary does, for `mesh-agent device`. The agent reaches a device through
//! [`select`]: the device process's UAPI socket, or a kernel `wireguard` link.

pub mod admin;
pub mod api;
pub mod apiclient;
pub mod app;
pub mod cached;
pub mod config;
pub mod coordinator;
pub mod coverage;
pub mod drain;
pub mod events;
pub mod export;
#[cfg(test)]
mod fixtures;
pub mod flows;
pub mod flowsource;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod history;
pub mod memory;
pub mod mesh;
pub mod metrics;
mod netlink;
pub mod netns;
pub mod nodestatus;
pub mod reconciler;
pub mod rotation;
pub mod routes;
pub mod select;
pub mod settings;
pub mod status;
pub mod steering;
pub mod taint;
pub mod telemetry;
pub mod tunnelstats;
pub mod views;
pub mod watch;

pub use wiremesh_wgctrl::datapath;
