//! The wiremesh node agent: publishes this node's WireGuard key, watches the other nodes, and keeps a
//! full mesh of tunnels configured through a [`datapath::Datapath`].

pub mod admin;
pub mod api;
pub mod app;
pub mod config;
pub mod datapath;
pub mod device;
pub mod drain;
pub mod engine;
pub mod events;
pub mod export;
#[cfg(test)]
mod fixtures;
pub mod flows;
pub mod history;
pub mod mesh;
pub mod metrics;
mod netlink;
pub mod netns;
pub mod reconciler;
pub mod report;
pub mod routes;
pub mod status;
pub mod steering;
pub mod telemetry;
pub mod uapi;
pub mod views;
pub mod watch;
