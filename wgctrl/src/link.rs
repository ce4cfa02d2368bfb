//! Kernel `wireguard` links over rtnetlink (what `ip link add/del/show` does, without ip(8)):
//! create one, find one by name, delete one, and find out whether the kernel has WireGuard at
//! all. Blocking; every call works in the network namespace of the calling thread.

use std::sync::atomic::{AtomicU32, Ordering};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::netlink::{self, NetlinkError, NetlinkSocket};

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("create wireguard link {ifname}: {source}")]
    Create {
        ifname: String,
        #[source]
        source: NetlinkError,
    },
    #[error("create wireguard link {ifname}: the kernel has no WireGuard support (module missing)")]
    Unsupported { ifname: String },
    #[error("look up link {ifname}: {source}")]
    Find {
        ifname: String,
        #[source]
        source: NetlinkError,
    },
    #[error("created link {ifname} but cannot find it afterwards")]
    Vanished { ifname: String },
    #[error("delete link {ifindex}: {source}")]
    Delete {
        ifindex: u32,
        #[source]
        source: NetlinkError,
    },
    #[error("probe for WireGuard support: {source}")]
    Probe {
        #[source]
        source: Box<LinkError>,
    },
}

/// What the kernel says about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub ifname: String,
    /// `wireguard`, `veth`, ...; `None` for links without a kind (physical devices, TUN has
    /// `tun`).
    pub kind: Option<String>,
    pub mtu: u32,
    /// Administratively up (IFF_UP).
    pub up: bool,
}

impl Link {
    pub fn is_wireguard(&self) -> bool {
        self.kind.as_deref() == Some("wireguard")
    }
}

fn socket() -> Result<NetlinkSocket, NetlinkError> {
    NetlinkSocket::open(NETLINK_ROUTE, netlink::DEFAULT_TIMEOUT)
}

/// Creates a WireGuard link `ifname` (down, no addresses) and returns it. Fails if a link of that
/// name exists; [`LinkError::Unsupported`] when the kernel has no WireGuard.
pub fn create_wireguard_link(ifname: &str) -> Result<Link, LinkError> {
    let mut message = LinkMessage::default();
    message
        .attributes
        .push(LinkAttribute::IfName(ifname.to_string()));
    message
        .attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::Wireguard,
        )]));
    let create = |source| LinkError::Create {
        ifname: ifname.to_string(),
        source,
    };
    let mut socket = socket().map_err(create)?;
    let result: Result<Vec<RouteNetlinkMessage>, _> = socket.request_with_flags(
        RouteNetlinkMessage::NewLink(message),
        false,
        NLM_F_CREATE | NLM_F_EXCL,
    );
    match result {
        Ok(_) => {}
        Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => {
            return Err(LinkError::Unsupported {
                ifname: ifname.to_string(),
            });
        }
        Err(e) => return Err(create(e)),
    }
    find_link(ifname)?.ok_or_else(|| LinkError::Vanished {
        ifname: ifname.to_string(),
    })
}

/// The link named `ifname`, or `None` when there is none in this namespace.
pub fn find_link(ifname: &str) -> Result<Option<Link>, LinkError> {
    let find = |source| LinkError::Find {
        ifname: ifname.to_string(),
        source,
    };
    let mut message = LinkMessage::default();
    message
        .attributes
        .push(LinkAttribute::IfName(ifname.to_string()));
    let replies: Vec<RouteNetlinkMessage> = match socket()
        .map_err(find)?
        .request(RouteNetlinkMessage::GetLink(message), false)
    {
        Ok(replies) => replies,
        Err(e) if e.errno() == Some(libc::ENODEV) => return Ok(None),
        Err(e) => return Err(find(e)),
    };
    Ok(replies.into_iter().find_map(|reply| match reply {
        RouteNetlinkMessage::NewLink(link) => Some(link_from(link)),
        _ => None,
    }))
}

fn link_from(message: LinkMessage) -> Link {
    let mut link = Link {
        ifindex: message.header.index,
        ifname: String::new(),
        kind: None,
        mtu: 0,
        up: message.header.flags.contains(LinkFlags::Up),
    };
    for attr in message.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.ifname = name,
            LinkAttribute::Mtu(mtu) => link.mtu = mtu,
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(kind.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// Deletes the link with index `ifindex` (any kind). Deleting a link that is already gone is
/// not an error.
pub fn delete_link(ifindex: u32) -> Result<(), LinkError> {
    let delete = |source| LinkError::Delete { ifindex, source };
    let mut message = LinkMessage::default();
    message.header.index = ifindex;
    let result: Result<Vec<RouteNetlinkMessage>, _> = socket()
        .map_err(delete)?
        .request(RouteNetlinkMessage::DelLink(message), false);
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(delete(e)),
    }
}

/// Whether this kernel can create WireGuard links: creates and deletes a uniquely named one
/// (loading the module on demand, as `ip link add` would). Needs CAP_NET_ADMIN.
pub fn kernel_module_available() -> Result<bool, LinkError> {
    static PROBES: AtomicU32 = AtomicU32::new(0);
    let ifname = format!(
        "wmprobe{}x{}",
        std::process::id() % 100_000,
        PROBES.fetch_add(1, Ordering::Relaxed) % 100
    );
    let probe = |source| LinkError::Probe {
        source: Box::new(source),
    };
    match create_wireguard_link(&ifname) {
        Ok(link) => {
            delete_link(link.ifindex).map_err(probe)?;
            Ok(true)
        }
        Err(LinkError::Unsupported { .. }) => Ok(false),
        Err(e) => Err(probe(e)),
    }
}
