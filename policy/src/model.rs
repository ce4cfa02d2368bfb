//! The cluster model the policy logic works on: namespaces with labels, pods with labels, IP and
//! named container ports, and parsed policies; built from Kubernetes API objects.

use std::{
    collections::{BTreeMap, btree_map::Entry},
    fmt,
    net::IpAddr,
    str::FromStr,
    sync::Arc,
};

use k8s_openapi::{api::core::v1 as core, apimachinery::pkg::apis::meta::v1::ObjectMeta};

use crate::{
    identity::{Identity, IdentityAllocator, IdentityLabels},
    rules::Policy,
};

/// An object that cannot be turned into the model; `field` is the path inside the object.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClusterError {
    /// A required field is missing or empty.
    #[error("{field}: required")]
    Missing {
        /// Path of the field.
        field: String,
    },
    /// A field has a value that is not allowed.
    #[error("{field}: invalid value {value:?}: {reason}")]
    Invalid {
        /// Path of the field.
        field: String,
        /// The value as written.
        value: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// Two pods with the same namespace and name.
    #[error("pod {namespace}/{name} is defined twice")]
    DuplicatePod {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Two namespaces with the same name.
    #[error("namespace {name} is defined twice")]
    DuplicateNamespace {
        /// Name.
        name: String,
    },
    /// Two pods with the same IP: the ipcache could not tell them apart.
    #[error("pods {first} and {second} both have IP {ip}")]
    DuplicateIp {
        /// The address.
        ip: IpAddr,
        /// `ns/name` of the first pod.
        first: String,
        /// `ns/name` of the second pod.
        second: String,
    },
}

/// A transport protocol NetworkPolicy can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP (IP protocol 6), the default.
    Tcp,
    /// UDP (17).
    Udp,
    /// SCTP (132).
    Sctp,
}

impl Protocol {
    /// All protocols, in a fixed order.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The IP protocol number (what the eBPF side sees in the header).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// Parses the exact Kubernetes spelling (`TCP`, `UDP`, `SCTP`).
    pub fn from_k8s(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// Parses an optional Kubernetes protocol field (absent = TCP).
    pub(crate) fn parse_field(value: Option<&String>, field: &str) -> Result<Self, ClusterError> {
        match value {
            None => Ok(Protocol::Tcp),
            Some(s) => Self::from_k8s(s).ok_or_else(|| ClusterError::Invalid {
                field: field.to_string(),
                value: s.clone(),
                reason: "protocol must be TCP, UDP or SCTP",
            }),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;

    /// Case-insensitive: `tcp`, `TCP`, ...
    fn from_str(s: &str) -> Result<Self, String> {
        Self::from_k8s(&s.to_ascii_uppercase())
            .ok_or_else(|| format!("unknown protocol {s:?} (want tcp, udp or sctp)"))
    }
}

/// An address family: which addresses of two pods one packet can carry (both ends of a packet
/// are of the same family).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

/// A namespace and its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Name.
    pub name: String,
    /// Labels (the name label is added when identities are built).
    pub labels: BTreeMap<String, String>,
}

impl Namespace {
    /// Converts a Kubernetes Namespace.
    pub fn from_k8s(ns: &core::Namespace) -> Result<Self, ClusterError> {
        Ok(Self {
            name: required_name(ns.metadata.name.as_ref())?,
            labels: ns.metadata.labels.clone().unwrap_or_default(),
        })
    }
}

/// A named container port of a pod.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerPort {
    /// The port name (IANA service name style), if any.
    pub name: Option<String>,
    /// The port number.
    pub port: u16,
    /// The protocol (default TCP).
    pub protocol: Protocol,
}

/// A pod: what policy needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels (shared: equal across the pods of a workload, see [`PodFields::labels`]).
    pub labels: Arc<BTreeMap<String, String>>,
    /// `status.podIP`, if assigned.
    pub ip: Option<IpAddr>,
    /// The pod's further addresses (`status.podIPs` after the first: the other family of a
    /// dual-stack pod). Each carries the pod's identity like `ip`.
    pub other_ips: Vec<IpAddr>,
    /// Container ports of all containers.
    pub ports: Vec<ContainerPort>,
}

impl Pod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Every address of the pod: `ip`, then `other_ips`.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ip.into_iter().chain(self.other_ips.iter().copied())
    }

    /// The pod's address of `family` (the first one listed, should it list two).
    pub fn ip_of(&self, family: Family) -> Option<IpAddr> {
        self.ips().find(|ip| Family::of(*ip) == family)
    }

    /// The port number of the container port named `name` with protocol `proto`.
    pub fn named_port(&self, name: &str, proto: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.protocol == proto && p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }

    /// Converts a Kubernetes Pod (namespace defaults to `default`, as kubectl does).
    pub fn from_k8s(pod: &core::Pod) -> Result<Self, ClusterError> {
        let status = pod.status.as_ref();
        let container_ports: Vec<&[core::ContainerPort]> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| c.ports.as_deref().unwrap_or_default())
            .collect();
        Self::from_fields(&PodFields {
            metadata: &pod.metadata,
            labels: Arc::new(pod.metadata.labels.clone().unwrap_or_default()),
            pod_ip: status.and_then(|s| s.pod_ip.as_deref()),
            pod_ips: status
                .and_then(|s| s.pod_ips.as_deref())
                .unwrap_or_default(),
            container_ports: &container_ports,
        })
    }

    /// Converts the fields of a Pod that policy reads (for callers that keep Pods in a form of
    /// their own, like the agent's cache).
    pub fn from_fields(pod: &PodFields<'_>) -> Result<Self, ClusterError> {
        let name = required_name(pod.metadata.name.as_ref())?;
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let ip = match pod.pod_ip {
            None => None,
            Some("") => None,
            Some(s) => Some(s.parse().map_err(|_| ClusterError::Invalid {
                field: "status.podIP".into(),
                value: s.to_string(),
                reason: "not an IP address",
            })?),
        };
        let mut other_ips = Vec::new();
        for (i, p) in pod.pod_ips.iter().enumerate() {
            let parsed: IpAddr = p.ip.trim().parse().map_err(|_| ClusterError::Invalid {
                field: format!("status.podIPs[{i}].ip"),
                value: p.ip.clone(),
                reason: "not an IP address",
            })?;
            if Some(parsed) != ip && !other_ips.contains(&parsed) {
                other_ips.push(parsed);
            }
        }
        let (ip, other_ips) = match ip {
            Some(ip) => (Some(ip), other_ips),
            None if !other_ips.is_empty() => {
                let first = other_ips.remove(0);
                (Some(first), other_ips)
            }
            None => (None, other_ips),
        };
        let mut ports = Vec::new();
        for (ci, container_ports) in pod.container_ports.iter().enumerate() {
            for (pi, p) in container_ports.iter().enumerate() {
                let field = format!("spec.containers[{ci}].ports[{pi}]");
                let port = u16::try_from(p.container_port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| ClusterError::Invalid {
                        field: format!("{field}.containerPort"),
                        value: p.container_port.to_string(),
                        reason: "must be 1..65535",
                    })?;
                let protocol =
                    Protocol::parse_field(p.protocol.as_ref(), &format!("{field}.protocol"))?;
                ports.push(ContainerPort {
                    name: p.name.clone().filter(|n| !n.is_empty()),
                    port,
                    protocol,
                });
            }
        }
        Ok(Self {
            namespace,
            name,
            labels: Arc::clone(&pod.labels),
            ip,
            other_ips,
            ports,
        })
    }
}

/// The fields of a Kubernetes Pod that [`Pod::from_fields`] reads, borrowed.
#[derive(Debug, Clone)]
pub struct PodFields<'a> {
    /// Name and namespace.
    pub metadata: &'a ObjectMeta,
    /// `metadata.labels`, shared: a caller converting many pods can hand the pods with equal
    /// labels one map.
    pub labels: Arc<BTreeMap<String, String>>,
    /// `status.podIP`.
    pub pod_ip: Option<&'a str>,
    /// `status.podIPs`.
    pub pod_ips: &'a [core::PodIP],
    /// `spec.containers[*].ports`, one entry per container in order (the index names the
    /// field in errors).
    pub container_ports: &'a [&'a [core::ContainerPort]],
}

fn required_name(name: Option<&String>) -> Result<String, ClusterError> {
    match name {
        Some(n) if !n.is_empty() => Ok(n.clone()),
        _ => Err(ClusterError::Missing {
            field: "metadata.name".into(),
        }),
    }
}

/// Index of a pod in [`Cluster::pods`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodId(pub usize);

/// One end of a connection: a pod of the cluster or an address outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// A pod.
    Pod(PodId),
    /// Anything that is not a pod (world, host, other nodes).
    External(IpAddr),
}

/// Namespaces, pods and policies, with pod identities allocated.
#[derive(Debug, Clone)]
pub struct Cluster {
    namespaces: BTreeMap<String, Namespace>,
    pods: Vec<Pod>,
    policies: Vec<Policy>,
    identity_labels: Vec<IdentityLabels>,
    identities: IdentityAllocator,
    pod_identity: Vec<Identity>,
}

impl Cluster {
    /// Builds the model. Pods in a namespace that is not listed get a namespace with no labels
    /// besides its name label. Identities are allocated deterministically (sorted label sets
    /// from 256); [`Cluster::with_identities`] keeps an earlier assignment instead.
    pub fn new(
        namespaces: Vec<Namespace>,
        pods: Vec<Pod>,
        policies: Vec<Policy>,
    ) -> Result<Self, ClusterError> {
        Self::with_identities(namespaces, pods, policies, &IdentityAllocator::new())
    }

    /// [`Cluster::new`], with identities stable across compiles: a label set keeps the id it
    /// has in `previous` (the identities of the last model, [`Cluster::identities`]); new
    /// label sets get ids `previous` does not hold ([`IdentityAllocator::carried_over`]). So a
    /// label change renumbers no other identity and rewrites no other map entry.
    pub fn with_identities(
        namespaces: Vec<Namespace>,
        pods: Vec<Pod>,
        policies: Vec<Policy>,
        previous: &IdentityAllocator,
    ) -> Result<Self, ClusterError> {
        let mut ns_map = BTreeMap::new();
        for ns in namespaces {
            match ns_map.entry(ns.name.clone()) {
                Entry::Occupied(_) => {
                    return Err(ClusterError::DuplicateNamespace { name: ns.name });
                }
                Entry::Vacant(v) => {
                    v.insert(ns);
                }
            }
        }
        let mut seen = BTreeMap::new();
        let mut ips: BTreeMap<IpAddr, String> = BTreeMap::new();
        for p in &pods {
            if seen
                .insert((p.namespace.clone(), p.name.clone()), ())
                .is_some()
            {
                return Err(ClusterError::DuplicatePod {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                });
            }
            for ip in p.ips() {
                if let Some(first) = ips.insert(ip, p.key()) {
                    return Err(ClusterError::DuplicateIp {
                        ip,
                        first,
                        second: p.key(),
                    });
                }
            }
        }
        // One map per namespace, shared by its pods' identity labels.
        let mut ns_identity: BTreeMap<&str, Arc<BTreeMap<String, String>>> = BTreeMap::new();
        let identity_labels: Vec<IdentityLabels> = pods
            .iter()
            .map(|p| {
                let namespace = ns_identity.entry(&p.namespace).or_insert_with(|| {
                    let labels = ns_map
                        .get(&p.namespace)
                        .map(|n: &Namespace| n.labels.clone())
                        .unwrap_or_default();
                    Arc::new(IdentityLabels::namespace_labels(&p.namespace, labels))
                });
                IdentityLabels {
                    pod: Arc::clone(&p.labels),
                    namespace: Arc::clone(namespace),
                }
            })
            .collect();
        let identities = IdentityAllocator::carried_over(previous, &identity_labels);
        let pod_identity = identity_labels
            .iter()
            .map(|l| identities.get(l).unwrap_or(Identity::UNKNOWN))
            .collect();
        Ok(Self {
            namespaces: ns_map,
            pods,
            policies,
            identity_labels,
            identities,
            pod_identity,
        })
    }

    /// Namespaces by name (only those given to [`Cluster::new`]).
    pub fn namespaces(&self) -> &BTreeMap<String, Namespace> {
        &self.namespaces
    }

    /// Pods, indexed by [`PodId`].
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pod with this id.
    pub fn pod(&self, id: PodId) -> &Pod {
        &self.pods[id.0]
    }

    /// Finds a pod by namespace and name.
    pub fn find_pod(&self, namespace: &str, name: &str) -> Option<PodId> {
        self.pods
            .iter()
            .position(|p| p.namespace == namespace && p.name == name)
            .map(PodId)
    }

    /// Policies.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// The identity labels of a pod.
    pub fn identity_labels(&self, id: PodId) -> &IdentityLabels {
        &self.identity_labels[id.0]
    }

    /// The identity of a pod.
    pub fn identity(&self, id: PodId) -> Identity {
        self.pod_identity[id.0]
    }

    /// The identity allocator (identities of the pods present).
    pub fn identities(&self) -> &IdentityAllocator {
        &self.identities
    }

    /// The IP of an endpoint, if it has one (a pod's first address, `status.podIP`).
    pub fn endpoint_ip(&self, e: &Endpoint) -> Option<IpAddr> {
        match e {
            Endpoint::Pod(id) => self.pod(*id).ip,
            Endpoint::External(ip) => Some(*ip),
        }
    }

    /// The address of an endpoint in `family`, if it has one: a pod's address of that family
    /// (a dual-stack pod has one of each), an external address if it is of that family.
    pub fn endpoint_ip_of(&self, e: &Endpoint, family: Family) -> Option<IpAddr> {
        match e {
            Endpoint::Pod(id) => self.pod(*id).ip_of(family),
            Endpoint::External(ip) => Some(*ip).filter(|ip| Family::of(*ip) == family),
        }
    }
}
