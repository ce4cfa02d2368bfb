//! The wiremesh userspace WireGuard device: the [`engine`] (boringtun's noise layer driven by our
//! own TUN and UDP I/O), the wg(8) UAPI server ([`uapi`]) and the `device` command ([`command`])
//! that runs both as a long-lived process. It knows nothing of Kubernetes or the agent, which
//! configures it over the UAPI socket (or, in-process, through the [`Datapath`] trait).
//!
//! [`Datapath`]: wiremesh_wgctrl::Datapath

pub mod command;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod uapi;
