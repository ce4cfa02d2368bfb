//! meshctl, the wiremesh operator CLI, as a library: the mesh status as seen through the API server
//! and the local demo cluster. The binary (`src/main.rs`) only parses flags and prints.

pub mod agents;
pub mod capture;
pub mod demo;
pub mod fault;
pub mod flows;
pub mod report;
pub mod rotate;
pub mod status;
pub mod traffic;
