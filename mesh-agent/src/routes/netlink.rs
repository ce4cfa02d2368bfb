//! [`Routes`] over rtnetlink, in the network namespace of the thread that created the connection.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::{
    LinkUnspec, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::LinkAttribute,
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
    },
};

use super::{ROUTE_PROTOCOL, Routes, RoutesError};
use crate::netlink;

/// The main routing table.
const RT_TABLE_MAIN: u32 = 254;

/// See the module docs. Dropping it closes the netlink connection.
#[derive(Debug)]
pub struct NetlinkRoutes {
    netlink: netlink::Connection,
}

impl NetlinkRoutes {
    /// Opens an rtnetlink socket and drives it on the current tokio runtime.
    pub fn new() -> Result<Self, RoutesError> {
        let netlink = netlink::Connection::open().map_err(RoutesError::Connection)?;
        Ok(Self { netlink })
    }

    async fn ifindex(&self, ifname: &str) -> Result<Option<u32>, RoutesError> {
        let mut links = self
            .netlink
            .handle()
            .link()
            .get()
            .match_name(ifname.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(Some(link.header.index)),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(netlink_error("get link", ifname, e)),
        }
    }

    async fn require_ifindex(&self, ifname: &str) -> Result<u32, RoutesError> {
        self.ifindex(ifname)
            .await?
            .ok_or_else(|| RoutesError::NoSuchInterface {
                ifname: ifname.to_string(),
            })
    }

    fn route_message(
        ifname: &str,
        ifindex: u32,
        dst: IpNet,
        operation: &str,
    ) -> Result<RouteMessage, RoutesError> {
        let builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .map_err(|e| RoutesError::Invalid {
                operation: format!("{operation} {dst}"),
                ifname: ifname.to_string(),
                message: e.to_string(),
            })?;
        Ok(builder
            .output_interface(ifindex)
            .table_id(RT_TABLE_MAIN)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .scope(RouteScope::Link)
            .build())
    }
}

impl Routes for NetlinkRoutes {
    async fn link_up(&self, ifname: &str, mtu: u32) -> Result<(), RoutesError> {
        let ifindex = self.require_ifindex(ifname).await?;
        self.netlink
            .handle()
            .link()
            .set(LinkUnspec::new_with_index(ifindex).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(|e| netlink_error(&format!("set up, mtu {mtu}"), ifname, e))
    }

    async fn list(&self, ifname: &str) -> Result<Vec<IpNet>, RoutesError> {
        let Some(ifindex) = self.ifindex(ifname).await? else {
            return Ok(Vec::new());
        };
        let mut messages = self
            .netlink
            .routes(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .await
            .map_err(|e| netlink_error("list IPv4 routes", ifname, e))?;
        messages.extend(
            self.netlink
                .routes(RouteMessageBuilder::<Ipv6Addr>::new().build())
                .await
                .map_err(|e| netlink_error("list IPv6 routes", ifname, e))?,
        );
        let mut prefixes = Vec::new();
        for message in messages {
            if message.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                continue;
            }
            let mut table = u32::from(message.header.table);
            let mut oif = None;
            let mut destination = None;
            for attribute in &message.attributes {
                match attribute {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Oif(index) => oif = Some(*index),
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                        destination = Some(IpAddr::V4(*a));
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                        destination = Some(IpAddr::V6(*a));
                    }
                    _ => {}
                }
            }
            if table != RT_TABLE_MAIN || oif != Some(ifindex) {
                continue;
            }
            let address = destination.unwrap_or(match message.header.address_family {
                rtnetlink::packet_route::AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            });
            if let Ok(net) = IpNet::new(address, message.header.destination_prefix_length) {
                prefixes.push(net);
            }
        }
        prefixes.sort();
        prefixes.dedup();
        Ok(prefixes)
    }

    async fn add(&self, ifname: &str, dst: IpNet) -> Result<(), RoutesError> {
        let ifindex = self.require_ifindex(ifname).await?;
        let message = Self::route_message(ifname, ifindex, dst, "add route")?;
        self.netlink
            .handle()
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(|e| netlink_error(&format!("add route {dst}"), ifname, e))
    }

    async fn del(&self, ifname: &str, dst: IpNet) -> Result<(), RoutesError> {
        // Without the interface its routes are gone with it.
        let Some(ifindex) = self.ifindex(ifname).await? else {
            return Ok(());
        };
        let message = Self::route_message(ifname, ifindex, dst, "delete route")?;
        match self.netlink.handle().route().del(message).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => Ok(()),
            Err(e) => Err(netlink_error(&format!("delete route {dst}"), ifname, e)),
        }
    }

    async fn mtu_of_address(&self, address: IpAddr) -> Result<u32, RoutesError> {
        let addresses = self
            .netlink
            .addresses()
            .await
            .map_err(|e| netlink_error("list addresses", "*", e))?;
        let index = addresses
            .iter()
            .find(|message| {
                message.attributes.iter().any(|attribute| {
                    matches!(attribute,
                        AddressAttribute::Address(a) | AddressAttribute::Local(a) if *a == address)
                })
            })
            .map(|message| message.header.index)
            .ok_or(RoutesError::NoSuchAddress { address })?;
        let link = self
            .netlink
            .handle()
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .map_err(|e| netlink_error("get link", &format!("ifindex {index}"), e))?
            .ok_or(RoutesError::NoSuchAddress { address })?;
        link.attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            })
            .ok_or_else(|| RoutesError::Invalid {
                operation: "read MTU".to_string(),
                ifname: format!("ifindex {index}"),
                message: "the kernel reported no MTU".to_string(),
            })
    }
}

fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.to_io().raw_os_error(),
        _ => None,
    }
}

fn netlink_error(operation: &str, ifname: &str, error: rtnetlink::Error) -> RoutesError {
    let source = match &error {
        rtnetlink::Error::NetlinkError(message) => message.to_io(),
        other => io::Error::other(other.to_string()),
    };
    RoutesError::Netlink {
        operation: operation.to_string(),
        ifname: ifname.to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use rtnetlink::LinkVeth;

    use super::*;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Runs `f` on a fresh thread inside a private network namespace that disappears with the
    /// thread, so the test leaves nothing behind.
    fn in_private_netns<F, Fut>(f: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        std::thread::spawn(move || {
            // SAFETY: unshare affects only this thread's namespaces.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            );
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f());
        })
        .join()
        .expect("test thread panicked");
    }

    #[test]
    fn routes_roundtrip_in_a_private_namespace() {
        if !is_root() {
            eprintln!("routes_roundtrip_in_a_private_namespace: needs root (CI runs it as root)");
            return;
        }
        in_private_netns(|| async {
            let routes = NetlinkRoutes::new().unwrap();
            routes
                .netlink
                .handle()
                .link()
                .add(LinkVeth::new("wmtest0", "wmtest1").build())
                .execute()
                .await
                .unwrap();
            assert!(routes.list("wmtest0").await.unwrap().is_empty());
            routes.link_up("wmtest0", 1420).await.unwrap();

            let v4 = IpNet::from_str("10.244.1.0/24").unwrap();
            let host = IpNet::from_str("10.250.0.7/32").unwrap();
            let v6 = IpNet::from_str("fd00:1::/64").unwrap();
            for dst in [v4, host, v6] {
                routes.add("wmtest0", dst).await.unwrap();
            }
            // Replacing an existing route is not an error.
            routes.add("wmtest0", v4).await.unwrap();
            let mut want = vec![v4, host, v6];
            want.sort();
            assert_eq!(routes.list("wmtest0").await.unwrap(), want);

            routes.del("wmtest0", host).await.unwrap();
            routes.del("wmtest0", host).await.unwrap();
            let mut want = vec![v4, v6];
            want.sort();
            assert_eq!(routes.list("wmtest0").await.unwrap(), want);

            // Unknown interfaces: list is empty, add names the interface.
            assert!(routes.list("nope0").await.unwrap().is_empty());
            let err = routes.add("nope0", v4).await.unwrap_err();
            assert!(err.to_string().contains("nope0"), "{err}");
        });
    }

    #[test]
    fn underlay_mtu_is_read_from_the_interface_holding_the_address() {
        if !is_root() {
            eprintln!("underlay_mtu_...: needs root (CI runs it as root)");
            return;
        }
        in_private_netns(|| async {
            let routes = NetlinkRoutes::new().unwrap();
            let handle = routes.netlink.handle();
            handle
                .link()
                .add(LinkVeth::new("wmunder0", "wmunder1").build())
                .execute()
                .await
                .unwrap();
            routes.link_up("wmunder0", 1400).await.unwrap();
            let index = routes.require_ifindex("wmunder0").await.unwrap();
            let address = IpAddr::from([192, 0, 2, 10]);
            handle
                .address()
                .add(index, address, 24)
                .execute()
                .await
                .unwrap();
            assert_eq!(routes.mtu_of_address(address).await.unwrap(), 1400);
            let other = IpAddr::from([192, 0, 2, 11]);
            assert!(matches!(
                routes.mtu_of_address(other).await,
                Err(RoutesError::NoSuchAddress { .. })
            ));
        });
    }
}
