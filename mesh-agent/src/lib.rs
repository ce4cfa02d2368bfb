//! The wiremesh node agent: publishes this node's WireGuard key, watches the other nodes, and keeps a
//! full mesh of tunnels configured through a [`datapath::Datapath`].

pub mod datapath;
pub mod device;
pub mod engine;
pub mod uapi;
