//! The wiremesh node agent: publishes this node's WireGuard key, watches the other nodes, and keeps a
//! full mesh of tunnels configured through a [`datapath::Datapath`].

pub mod admin;
pub mod app;
pub mod config;
pub mod datapath;
pub mod device;
pub mod drain;
pub mod engine;
pub mod events;
#[cfg(test)]
mod fixtures;
pub mod flows;
pub mod mesh;
pub mod metrics;
mod netlink;
pub mod netns;
pub mod nodestatus;
pub mod reconciler;
pub mod routes;
pub mod settings;
pub mod status;
pub mod steering;
pub mod telemetry;
pub mod uapi;
pub mod views;
pub mod watch;
