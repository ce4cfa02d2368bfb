//! The wg(8) cross-platform UAPI (`/var/run/wireguard/<ifname>.sock`): [`parse`] is the pure text
//! protocol, shared by our device's server (crate `wiremesh-device`) and the client here.

pub mod parse;
