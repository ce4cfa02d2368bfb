//! The wg(8) cross-platform UAPI (`/var/run/wireguard/<ifname>.sock`): [`parse`] is the pure text
//! protocol, shared by our device's server (crate `wiremesh-device`) and [`UapiDevice`], the
//! client here.

mod client;
pub mod parse;

pub(crate) use client::read_answer;
pub use client::{DEFAULT_TIMEOUT, UapiClientError, UapiDevice, default_socket_path};
