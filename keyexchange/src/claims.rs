//! Which pod addresses a node may claim: the one range check every consumer of pod addresses
//! (WireGuard allowed IPs, tunnel routes, the eBPF ipcache) goes through, so a node can never pull
//! traffic for an address that is not a pod address of its own.
//!
//! A claim is a node's podCIDR (`spec.podCIDRs`) or a pod IP (`status.podIPs` of a pod bound to
//! it). [`AddressPolicy::check`] accepts a claim only when
//! - it overlaps no reserved range: unspecified/"this network" (0.0.0.0/8, ::/128), loopback
//!   (127.0.0.0/8, ::1), link-local (169.254.0.0/16 — the cloud metadata server — and fe80::/10),
//!   multicast (224.0.0.0/4, ff00::/8) and the IPv4 reserved/broadcast block 240.0.0.0/4;
//! - it overlaps no service CIDR (`MeshEncryption.spec.serviceCIDRs`);
//! - it lies inside one of the cluster's pod CIDRs (`MeshEncryption.spec.podCIDRs`), when set;
//! - a pod IP lies inside one of its own node's podCIDRs when the node has any; a pod IP of a node
//!   without podCIDRs is accepted only inside the configured cluster pod CIDRs (without them there
//!   is no range to trust, so it fails closed).
//!
//! Node addresses (any Node's `status.addresses`) are checked by the overlap sweep in
//! [`crate::peers`], which sees every node at once.
//!
//! Why no default from the Nodes' podCIDRs: their union is whatever the nodes say, and a hostile
//! Node object with a wide podCIDR would widen it. Without `spec.podCIDRs` every node is confined
//! to its own podCIDRs (which may not overlap another node's or any node address), which is as
//! much as the cluster tells us without trusting a single node.

use std::{fmt, net::IpAddr};

use ipnet::IpNet;

/// Address ranges that are never pod addresses, with a name for messages.
const RESERVED: [(&str, &str); 10] = [
    ("0.0.0.0/8", "unspecified"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
    // IPv4-mapped IPv6 addresses would alias IPv4 destinations.
    ("::ffff:0:0/96", "IPv4-mapped"),
];

/// What a node claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClaimKind {
    /// One of its `spec.podCIDRs`.
    PodCidr,
    /// The IP of a pod bound to it.
    PodIp,
}

/// Why a claim is refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
pub enum ClaimError {
    /// It overlaps a reserved range.
    #[error("it overlaps the {name} range {range}")]
    Reserved { range: IpNet, name: &'static str },
    /// It overlaps a service CIDR.
    #[error("it overlaps the service CIDR {cidr}")]
    ServiceCidr { cidr: IpNet },
    /// It is outside every configured cluster pod CIDR.
    #[error("it is outside the cluster pod CIDRs ({})", list(cidrs))]
    OutsideClusterPodCidrs { cidrs: Vec<IpNet> },
    /// A pod IP outside its node's podCIDRs.
    #[error("it is outside the node's podCIDRs ({})", list(cidrs))]
    OutsideNodePodCidrs { cidrs: Vec<IpNet> },
    /// A pod IP of a node without podCIDRs, and no cluster pod CIDRs configured.
    #[error(
        "the node has no spec.podCIDRs and MeshEncryption spec.podCIDRs is not set, so no pod address can be trusted"
    )]
    NoPodCidrs,
}

impl ClaimError {
    /// The Kubernetes Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Reserved { .. } => "PodAddressReserved",
            Self::ServiceCidr { .. } => "PodAddressInServiceCIDR",
            Self::OutsideClusterPodCidrs { .. } => "PodAddressOutsideClusterPodCIDRs",
            Self::OutsideNodePodCidrs { .. } => "PodIPOutsideNodePodCIDRs",
            Self::NoPodCidrs => "PodIPWithoutPodCIDRs",
        }
    }
}

fn list(cidrs: &[IpNet]) -> String {
    if cidrs.is_empty() {
        return "none".to_string();
    }
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The cluster-wide ranges pod claims are checked against. The default (nothing configured)
/// confines every node to its own podCIDRs; see the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// `MeshEncryption.spec.podCIDRs`; empty: not configured.
    pub cluster_pod_cidrs: Vec<IpNet>,
    /// `MeshEncryption.spec.serviceCIDRs`: never pod addresses.
    pub service_cidrs: Vec<IpNet>,
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

impl AddressPolicy {
    /// A policy from configured ranges (host bits cleared).
    pub fn new(cluster_pod_cidrs: &[IpNet], service_cidrs: &[IpNet]) -> Self {
        Self {
            cluster_pod_cidrs: cluster_pod_cidrs.iter().map(IpNet::trunc).collect(),
            service_cidrs: service_cidrs.iter().map(IpNet::trunc).collect(),
        }
    }

    /// Whether `claim` (a podCIDR or a pod IP as a host prefix) of a node whose podCIDRs are
    /// `node_pod_cidrs` is acceptable. See the module docs for the rules.
    pub fn check(
        &self,
        node_pod_cidrs: &[IpNet],
        claim: IpNet,
        kind: ClaimKind,
    ) -> Result<(), ClaimError> {
        let claim = claim.trunc();
        for (range, name) in RESERVED {
            let range: IpNet = range.parse().expect("reserved ranges are valid");
            if overlaps(&range, &claim) {
                return Err(ClaimError::Reserved { range, name });
            }
        }
        if let Some(cidr) = self.service_cidrs.iter().find(|c| overlaps(c, &claim)) {
            return Err(ClaimError::ServiceCidr { cidr: *cidr });
        }
        if !self.cluster_pod_cidrs.is_empty()
            && !self.cluster_pod_cidrs.iter().any(|c| c.contains(&claim))
        {
            return Err(ClaimError::OutsideClusterPodCidrs {
                cidrs: self.cluster_pod_cidrs.clone(),
            });
        }
        if kind == ClaimKind::PodIp {
            if !node_pod_cidrs.is_empty() {
                if !node_pod_cidrs.iter().any(|c| c.trunc().contains(&claim)) {
                    return Err(ClaimError::OutsideNodePodCidrs {
                        cidrs: node_pod_cidrs.iter().map(IpNet::trunc).collect(),
                    });
                }
            } else if self.cluster_pod_cidrs.is_empty() {
                return Err(ClaimError::NoPodCidrs);
            }
        }
        Ok(())
    }

    /// [`AddressPolicy::check`] for a pod IP.
    pub fn check_pod_ip(&self, node_pod_cidrs: &[IpNet], ip: IpAddr) -> Result<(), ClaimError> {
        self.check(node_pod_cidrs, IpNet::from(ip), ClaimKind::PodIp)
    }
}

impl fmt::Display for AddressPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cluster pod CIDRs: {}; service CIDRs: {}",
            if self.cluster_pod_cidrs.is_empty() {
                "not set (each node confined to its own podCIDRs)".to_string()
            } else {
                list(&self.cluster_pod_cidrs)
            },
            list(&self.service_cidrs)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn reserved_ranges_are_refused_for_every_kind_of_claim() {
        let policy = AddressPolicy::default();
        let own = [net("10.244.2.0/24")];
        for (addr, reason) in [
            ("169.254.169.254", "PodAddressReserved"),
            ("127.0.0.1", "PodAddressReserved"),
            ("224.0.0.251", "PodAddressReserved"),
            ("255.255.255.255", "PodAddressReserved"),
            ("0.0.0.0", "PodAddressReserved"),
            ("fe80::1", "PodAddressReserved"),
            ("ff02::1", "PodAddressReserved"),
            ("::1", "PodAddressReserved"),
            ("::ffff:10.244.2.5", "PodAddressReserved"),
        ] {
            let err = policy.check_pod_ip(&own, ip(addr)).unwrap_err();
            assert_eq!(err.reason(), reason, "{addr}: {err}");
        }
        // A podCIDR that contains a reserved range is refused as a whole.
        let err = policy
            .check(&[], net("169.0.0.0/8"), ClaimKind::PodCidr)
            .unwrap_err();
        assert!(err.to_string().contains("link-local"), "{err}");
        assert!(
            policy
                .check(&[], net("0.0.0.0/0"), ClaimKind::PodCidr)
                .is_err()
        );
    }

    #[test]
    fn pod_ips_stay_inside_their_nodes_pod_cidrs() {
        let policy = AddressPolicy::default();
        let own = [net("10.244.2.7/24")];
        assert_eq!(policy.check_pod_ip(&own, ip("10.244.2.9")), Ok(()));
        let err = policy.check_pod_ip(&own, ip("10.244.3.9")).unwrap_err();
        assert_eq!(err.reason(), "PodIPOutsideNodePodCIDRs");
        assert!(err.to_string().contains("10.244.2.0/24"), "{err}");
        // The apiserver's or a DNS server's address outside every pod range.
        assert!(policy.check_pod_ip(&own, ip("10.0.0.1")).is_err());
    }

    #[test]
    fn without_any_pod_range_pod_ips_fail_closed() {
        let policy = AddressPolicy::default();
        assert_eq!(
            policy.check_pod_ip(&[], ip("192.168.0.101")),
            Err(ClaimError::NoPodCidrs)
        );
        // With the cluster range configured, a shared-subnet CNI (no podCIDRs) works inside it.
        let policy = AddressPolicy::new(&[net("192.168.0.0/24")], &[]);
        assert_eq!(policy.check_pod_ip(&[], ip("192.168.0.101")), Ok(()));
        assert_eq!(
            policy
                .check_pod_ip(&[], ip("192.168.1.1"))
                .unwrap_err()
                .reason(),
            "PodAddressOutsideClusterPodCIDRs"
        );
    }

    #[test]
    fn cluster_and_service_cidrs_bound_pod_cidrs_too() {
        let policy = AddressPolicy::new(&[net("10.244.0.0/16")], &[net("10.96.0.0/12")]);
        assert_eq!(
            policy.check(&[], net("10.244.3.0/24"), ClaimKind::PodCidr),
            Ok(())
        );
        // A node cannot widen the cluster range with a wide podCIDR of its own.
        assert_eq!(
            policy
                .check(&[], net("10.0.0.0/8"), ClaimKind::PodCidr)
                .unwrap_err()
                .reason(),
            "PodAddressInServiceCIDR"
        );
        assert_eq!(
            policy
                .check(&[], net("10.245.0.0/24"), ClaimKind::PodCidr)
                .unwrap_err()
                .reason(),
            "PodAddressOutsideClusterPodCIDRs"
        );
        let in_services = AddressPolicy::new(&[], &[net("10.96.0.0/12")]);
        assert_eq!(
            in_services
                .check_pod_ip(&[net("10.96.5.0/24")], ip("10.96.5.1"))
                .unwrap_err(),
            ClaimError::ServiceCidr {
                cidr: net("10.96.0.0/12")
            }
        );
    }
}
