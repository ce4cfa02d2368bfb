//! [`Routes`] over rtnetlink, in the network namespace of the thread that created the connection.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::{
    IpVersion, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressScope},
        link::{AfSpecInet, AfSpecUnspec, InetDevConf, LinkAttribute, LinkFlags},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};

use super::{
    LinkState, ROUTE_PROTOCOL, RP_FILTER_LOOSE, RULE_PRIORITY, Routes, RoutesError, TUNNEL_ADDRESS,
};
use crate::netlink;

/// See the module docs. Dropping it closes the netlink connection.
#[derive(Debug)]
pub struct NetlinkRoutes {
    netlink: netlink::Connection,
    table: u32,
}

/// One route of a dump, reduced to what ownership decisions need.
#[derive(Debug, Clone, Copy)]
struct Dumped {
    dst: IpNet,
    table: u32,
    protocol: RouteProtocol,
    oif: Option<u32>,
}

impl NetlinkRoutes {
    /// Opens an rtnetlink socket and drives it on the current tokio runtime; routes go to `table`.
    pub fn new(table: u32) -> Result<Self, RoutesError> {
        let netlink = netlink::Connection::open().map_err(RoutesError::Connection)?;
        Ok(Self { netlink, table })
    }

    /// The routing table of our routes.
    pub fn table(&self) -> u32 {
        self.table
    }

    async fn ifindex(&self, ifname: &str) -> Result<Option<u32>, RoutesError> {
        Ok(self.link_state(ifname).await?.map(|l| l.ifindex))
    }

    /// The link without [`LinkState::tunnel_address`] (false): one request.
    async fn link_state(&self, ifname: &str) -> Result<Option<LinkState>, RoutesError> {
        let mut links = self
            .netlink
            .handle()
            .link()
            .get()
            .match_name(ifname.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(Some(LinkState {
                ifindex: link.header.index,
                up: link.header.flags.contains(LinkFlags::Up),
                mtu: link
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        LinkAttribute::Mtu(mtu) => Some(*mtu),
                        _ => None,
                    })
                    .unwrap_or(0),
                rp_filter: link.attributes.iter().find_map(|a| match a {
                    LinkAttribute::AfSpecUnspec(specs) => specs.iter().find_map(|s| match s {
                        AfSpecUnspec::Inet(inet) => inet.iter().find_map(|i| match i {
                            AfSpecInet::DevConf(conf) => u32::try_from(conf.rp_filter).ok(),
                            _ => None,
                        }),
                        _ => None,
                    }),
                    _ => None,
                }),
                tunnel_address: false,
            })),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(netlink_error("get link", ifname, e)),
        }
    }

    /// Whether the link `ifindex` holds [`TUNNEL_ADDRESS`].
    async fn has_tunnel_address(&self, ifname: &str, ifindex: u32) -> Result<bool, RoutesError> {
        let addresses: Vec<_> = self
            .netlink
            .handle()
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .set_address_filter(IpAddr::V4(TUNNEL_ADDRESS))
            .execute()
            .try_collect()
            .await
            .map_err(|e| netlink_error("list addresses", ifname, e))?;
        Ok(addresses.iter().any(|m| {
            m.header.index == ifindex
                && m.attributes.iter().any(|a| {
                    matches!(a, AddressAttribute::Address(IpAddr::V4(v4))
                        | AddressAttribute::Local(IpAddr::V4(v4)) if *v4 == TUNNEL_ADDRESS)
                })
        }))
    }

    async fn require_ifindex(&self, ifname: &str) -> Result<u32, RoutesError> {
        self.ifindex(ifname)
            .await?
            .ok_or_else(|| RoutesError::NoSuchInterface {
                ifname: ifname.to_string(),
            })
    }

    fn route_message(
        &self,
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
            .table_id(self.table)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .scope(RouteScope::Link)
            .build())
    }

    /// Every route of both families in our table (the kernel may or may not filter a dump by
    /// table; we filter again).
    async fn dump_table(&self, ifname: &str) -> Result<Vec<(Dumped, RouteMessage)>, RoutesError> {
        let mut messages = self
            .netlink
            .routes(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .table_id(self.table)
                    .build(),
            )
            .await
            .map_err(|e| netlink_error("list IPv4 routes", ifname, e))?;
        messages.extend(
            self.netlink
                .routes(
                    RouteMessageBuilder::<Ipv6Addr>::new()
                        .table_id(self.table)
                        .build(),
                )
                .await
                .map_err(|e| netlink_error("list IPv6 routes", ifname, e))?,
        );
        Ok(messages
            .into_iter()
            .filter_map(|m| Some((dumped(&m)?, m)))
            .filter(|(d, _)| d.table == self.table)
            .collect())
    }

    fn is_ours(route: &Dumped) -> bool {
        route.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
    }

    async fn rules(&self) -> Result<Vec<RuleMessage>, RoutesError> {
        let mut rules = Vec::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            let dump: Result<Vec<RuleMessage>, _> = self
                .netlink
                .handle()
                .rule()
                .get(version)
                .execute()
                .try_collect()
                .await;
            match dump {
                Ok(found) => rules.extend(found),
                // A namespace without IPv6 has no IPv6 rules.
                Err(e) if errno(&e) == Some(libc::EAFNOSUPPORT) => {}
                Err(e) => return Err(netlink_error("list rules", "*", e)),
            }
        }
        Ok(rules
            .into_iter()
            .filter(|rule| self.is_our_rule(rule))
            .collect())
    }

    fn is_our_rule(&self, rule: &RuleMessage) -> bool {
        let mut table = u32::from(rule.header.table);
        let mut priority = None;
        for attribute in &rule.attributes {
            match attribute {
                RuleAttribute::Table(t) => table = *t,
                RuleAttribute::Priority(p) => priority = Some(*p),
                _ => {}
            }
        }
        table == self.table && priority == Some(RULE_PRIORITY)
    }
}

/// The fields of a dumped route, `None` for messages that are not routes to a prefix.
fn dumped(message: &RouteMessage) -> Option<Dumped> {
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
    let address = destination.unwrap_or(match message.header.address_family {
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    });
    let dst = IpNet::new(address, message.header.destination_prefix_length).ok()?;
    Some(Dumped {
        dst,
        table,
        protocol: message.header.protocol,
        oif,
    })
}

impl Routes for NetlinkRoutes {
    async fn link(&self, ifname: &str) -> Result<Option<LinkState>, RoutesError> {
        let Some(mut link) = self.link_state(ifname).await? else {
            return Ok(None);
        };
        link.tunnel_address = self.has_tunnel_address(ifname, link.ifindex).await?;
        Ok(Some(link))
    }

    async fn link_up(&self, ifname: &str, mtu: u32) -> Result<(), RoutesError> {
        let ifindex = self.require_ifindex(ifname).await?;
        // rp_filter over rtnetlink (IFLA_AF_SPEC/AF_INET/IFLA_INET_CONF), not /proc/sys: the
        // agent's container has NET_ADMIN but a read-only /proc/sys.
        // Only the non-zero fields of a request are sent: rp_filter alone.
        let mut conf = InetDevConf::default();
        conf.rp_filter = RP_FILTER_LOOSE as i32;
        let mut message = LinkUnspec::new_with_index(ifindex).mtu(mtu).up().build();
        message
            .attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
                AfSpecInet::DevConfRequest(conf),
            ])]));
        self.netlink
            .handle()
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|e| {
                netlink_error(
                    &format!("set up, mtu {mtu}, rp_filter {RP_FILTER_LOOSE}"),
                    ifname,
                    e,
                )
            })?;
        if self.has_tunnel_address(ifname, ifindex).await? {
            return Ok(());
        }
        let mut add = self
            .netlink
            .handle()
            .address()
            .add(ifindex, IpAddr::V4(TUNNEL_ADDRESS), 32);
        add.message_mut().header.scope = AddressScope::Host;
        match add.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(netlink_error(
                &format!("add address {TUNNEL_ADDRESS}/32 scope host"),
                ifname,
                e,
            )),
        }
    }

    async fn list(&self, ifname: &str) -> Result<Vec<IpNet>, RoutesError> {
        let Some(ifindex) = self.ifindex(ifname).await? else {
            return Ok(Vec::new());
        };
        let mut prefixes: Vec<IpNet> = self
            .dump_table(ifname)
            .await?
            .into_iter()
            .map(|(d, _)| d)
            .filter(|d| Self::is_ours(d) && d.oif == Some(ifindex))
            .map(|d| d.dst)
            .collect();
        prefixes.sort();
        prefixes.dedup();
        Ok(prefixes)
    }

    async fn add(&self, ifname: &str, dst: IpNet) -> Result<(), RoutesError> {
        let ifindex = self.require_ifindex(ifname).await?;
        let message = self.route_message(ifname, ifindex, dst, "add route")?;
        // Without `replace`: NLM_F_EXCL, so a route of someone else is never overwritten.
        match self.netlink.handle().route().add(message).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                let existing = self.dump_table(ifname).await?;
                let ours = existing
                    .iter()
                    .filter(|(d, _)| d.dst == dst && Self::is_ours(d))
                    .map(|(d, _)| d.oif)
                    .collect::<Vec<_>>();
                if ours.contains(&Some(ifindex)) {
                    Ok(())
                } else if !ours.is_empty() {
                    // Ours through the other tunnel device (a rotation moves a peer between its
                    // two worlds): replace it in one message, so the prefix is never unrouted.
                    let message = self.route_message(ifname, ifindex, dst, "move route")?;
                    self.netlink
                        .handle()
                        .route()
                        .add(message)
                        .replace()
                        .execute()
                        .await
                        .map_err(|e| netlink_error(&format!("move route {dst}"), ifname, e))
                } else {
                    Err(RoutesError::Foreign {
                        table: self.table,
                        dst,
                    })
                }
            }
            Err(e) => Err(netlink_error(&format!("add route {dst}"), ifname, e)),
        }
    }

    async fn del(&self, ifname: &str, dst: IpNet) -> Result<(), RoutesError> {
        // Without the interface its routes are gone with it.
        let Some(ifindex) = self.ifindex(ifname).await? else {
            return Ok(());
        };
        let message = self.route_message(ifname, ifindex, dst, "delete route")?;
        match self.netlink.handle().route().del(message).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => Ok(()),
            Err(e) => Err(netlink_error(&format!("delete route {dst}"), ifname, e)),
        }
    }

    async fn ensure_rule(&self) -> Result<usize, RoutesError> {
        let existing = self.rules().await?;
        let mut added = 0;
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            if existing.iter().any(|r| r.header.family == family) {
                continue;
            }
            let mut request = self
                .netlink
                .handle()
                .rule()
                .add()
                .table_id(self.table)
                .priority(RULE_PRIORITY)
                .action(RuleAction::ToTable);
            let message = request.message_mut();
            message.header.family = family;
            message
                .attributes
                .push(RuleAttribute::Protocol(RouteProtocol::Other(
                    ROUTE_PROTOCOL,
                )));
            match request.execute().await {
                Ok(()) => {}
                // IPv6 disabled in this namespace: nothing to steer there.
                Err(e)
                    if family == AddressFamily::Inet6 && errno(&e) == Some(libc::EAFNOSUPPORT) =>
                {
                    continue;
                }
                Err(e) => return Err(netlink_error(&format!("add {family:?} rule"), "*", e)),
            }
            added += 1;
        }
        Ok(added)
    }

    async fn remove_rule_and_table(&self) -> Result<usize, RoutesError> {
        let mut removed = 0;
        for rule in self.rules().await? {
            match self.netlink.handle().rule().del(rule).execute().await {
                Ok(()) => removed += 1,
                Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::ESRCH)) => {}
                Err(e) => return Err(netlink_error("delete rule", "*", e)),
            }
        }
        for (route, message) in self.dump_table("*").await? {
            if !Self::is_ours(&route) {
                continue;
            }
            match self.netlink.handle().route().del(message).execute().await {
                Ok(()) => removed += 1,
                Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => {}
                Err(e) => {
                    return Err(netlink_error(
                        &format!("delete route {}", route.dst),
                        "*",
                        e,
                    ));
                }
            }
        }
        Ok(removed)
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
            let routes = NetlinkRoutes::new(87).unwrap();
            routes
                .netlink
                .handle()
                .link()
                .add(LinkVeth::new("wmtest0", "wmtest1").build())
                .execute()
                .await
                .unwrap();
            assert!(routes.list("wmtest0").await.unwrap().is_empty());
            assert!(!routes.link("wmtest0").await.unwrap().unwrap().up);
            assert_ne!(
                routes.link("wmtest0").await.unwrap().unwrap().rp_filter,
                Some(RP_FILTER_LOOSE)
            );
            routes.link_up("wmtest0", 1420).await.unwrap();
            let link = routes.link("wmtest0").await.unwrap().unwrap();
            assert!(link.is_ready(1420), "{link:?}");
            // The sysctl an operator reads says the same (/proc/sys/net follows the namespace
            // of the reading thread).
            let sysctl =
                std::fs::read_to_string("/proc/sys/net/ipv4/conf/wmtest0/rp_filter").unwrap();
            assert_eq!(sysctl.trim(), RP_FILTER_LOOSE.to_string());
            // Again: the address is not added twice.
            routes.link_up("wmtest0", 1420).await.unwrap();
            let ifindex = routes.require_ifindex("wmtest0").await.unwrap();
            let ours: Vec<_> = routes
                .netlink
                .addresses()
                .await
                .unwrap()
                .into_iter()
                .filter(|m| m.header.index == ifindex && m.header.family == AddressFamily::Inet)
                .collect();
            assert_eq!(ours.len(), 1, "{ours:?}");
            assert_eq!(ours[0].header.scope, AddressScope::Host);
            assert!(routes.link("nope0").await.unwrap().is_none());

            let v4 = IpNet::from_str("10.244.1.0/24").unwrap();
            let host = IpNet::from_str("10.250.0.7/32").unwrap();
            let v6 = IpNet::from_str("fd00:1::/64").unwrap();
            for dst in [v4, host, v6] {
                routes.add("wmtest0", dst).await.unwrap();
            }
            // Adding our own route again is not an error.
            routes.add("wmtest0", v4).await.unwrap();
            // Ours live in table 87, not in main.
            let main: Vec<IpNet> = routes
                .netlink
                .routes(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .await
                .unwrap()
                .iter()
                .filter_map(dumped)
                .filter(|d| d.table == 254 && d.protocol == RouteProtocol::Other(ROUTE_PROTOCOL))
                .map(|d| d.dst)
                .collect();
            assert!(main.is_empty(), "{main:?}");
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

            // Someone else's route in our table is neither replaced nor listed as ours.
            let ifindex = routes.require_ifindex("wmtest1").await.unwrap();
            routes.link_up("wmtest1", 1500).await.unwrap();
            let foreign = IpNet::from_str("10.244.9.0/24").unwrap();
            let message = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(foreign.network(), foreign.prefix_len())
                .unwrap()
                .output_interface(ifindex)
                .table_id(87)
                .protocol(RouteProtocol::Static)
                .scope(RouteScope::Link)
                .build();
            routes
                .netlink
                .handle()
                .route()
                .add(message)
                .execute()
                .await
                .unwrap();
            let err = routes.add("wmtest0", foreign).await.unwrap_err();
            assert!(matches!(err, RoutesError::Foreign { .. }), "{err}");
            assert!(!routes.list("wmtest0").await.unwrap().contains(&foreign));

            // The rule: added once, then present; removing it takes our routes, not the foreign one.
            assert_eq!(routes.ensure_rule().await.unwrap(), 2);
            assert_eq!(routes.ensure_rule().await.unwrap(), 0);
            let removed = routes.remove_rule_and_table().await.unwrap();
            assert_eq!(removed, 2 + 2, "two rules and our two routes");
            assert!(routes.list("wmtest0").await.unwrap().is_empty());
            assert!(routes.rules().await.unwrap().is_empty());
            let left: Vec<IpNet> = routes
                .dump_table("*")
                .await
                .unwrap()
                .into_iter()
                .map(|(d, _)| d.dst)
                .collect();
            assert_eq!(left, vec![foreign], "the foreign route stays");
        });
    }

    #[test]
    fn underlay_mtu_is_read_from_the_interface_holding_the_address() {
        if !is_root() {
            eprintln!("underlay_mtu_...: needs root (CI runs it as root)");
            return;
        }
        in_private_netns(|| async {
            let routes = NetlinkRoutes::new(87).unwrap();
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
