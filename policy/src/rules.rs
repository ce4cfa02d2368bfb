//! NetworkPolicy objects parsed and validated into the form the evaluator and the compiler share:
//! policy types resolved, peers and ports normalised, selectors parsed.

use ipnet::IpNet;
use k8s_openapi::{api::networking::v1 as net, apimachinery::pkg::util::intstr::IntOrString};

use crate::{
    model::{ClusterError, Protocol},
    selector::{Selector, SelectorError},
};

/// A NetworkPolicy that cannot be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// A selector is invalid.
    #[error(transparent)]
    Selector(#[from] SelectorError),
    /// A field is missing or invalid.
    #[error(transparent)]
    Field(#[from] ClusterError),
}

fn invalid(field: String, value: impl ToString, reason: &'static str) -> PolicyError {
    PolicyError::Field(ClusterError::Invalid {
        field,
        value: value.to_string(),
        reason,
    })
}

/// Which namespaces a pod peer covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceMatch {
    /// Only the policy's own namespace (a peer `podSelector` without `namespaceSelector`).
    Same(String),
    /// Namespaces whose labels match.
    Selector(Selector),
}

/// One peer of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Pods selected by namespace and pod labels.
    Pods {
        /// The namespaces.
        namespaces: NamespaceMatch,
        /// The pods within them (`{}` when the peer only has a namespaceSelector).
        pods: Selector,
    },
    /// An address block.
    IpBlock(IpBlock),
}

/// `ipBlock`: addresses in `cidr` but in none of `except`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpBlock {
    /// The block (host bits cleared).
    pub cidr: IpNet,
    /// Excluded sub-blocks (host bits cleared, sorted, deduplicated).
    pub except: Vec<IpNet>,
}

impl IpBlock {
    /// Whether `ip` is in the block.
    pub fn contains(&self, ip: &std::net::IpAddr) -> bool {
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }
}

/// The port part of a port spec.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortValue {
    /// An inclusive range (`port`, or `port`..=`endPort`).
    Range(u16, u16),
    /// A named container port.
    Named(String),
}

/// One entry of `ports`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    /// Protocol (default TCP).
    pub protocol: Protocol,
    /// Port; `None` means every port of the protocol.
    pub port: Option<PortValue>,
}

/// One ingress or egress rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Peers; `None` (absent or empty `from`/`to`) means every peer, pods and external.
    pub peers: Option<Vec<Peer>>,
    /// Ports; `None` (absent or empty) means every port of every protocol.
    pub ports: Option<Vec<PortSpec>>,
}

/// A parsed NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Namespace (the policy selects pods only here).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.podSelector`.
    pub selector: Selector,
    /// Ingress rules if the policy has policy type Ingress (an empty list isolates: deny all).
    pub ingress: Option<Vec<Rule>>,
    /// Egress rules if the policy has policy type Egress.
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Converts a Kubernetes NetworkPolicy. Without `policyTypes`, Ingress always applies and
    /// Egress applies when there is at least one egress rule (the API server's defaulting).
    /// Rules of a direction not in `policyTypes` are ignored.
    pub fn from_k8s(np: &net::NetworkPolicy) -> Result<Self, PolicyError> {
        let name = match np.metadata.name.as_ref() {
            Some(n) if !n.is_empty() => n.clone(),
            _ => {
                return Err(ClusterError::Missing {
                    field: "metadata.name".into(),
                }
                .into());
            }
        };
        let namespace = np
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let spec = np.spec.clone().unwrap_or_default();
        let selector = match &spec.pod_selector {
            Some(s) => Selector::parse(s, "spec.podSelector")?,
            None => Selector::everything(),
        };
        let ingress_rules = spec.ingress.unwrap_or_default();
        let egress_rules = spec.egress.unwrap_or_default();
        let (has_ingress, has_egress) = match &spec.policy_types {
            Some(types) if !types.is_empty() => {
                let mut flags = (false, false);
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => flags.0 = true,
                        "Egress" => flags.1 = true,
                        other => {
                            return Err(invalid(
                                format!("spec.policyTypes[{i}]"),
                                other,
                                "must be Ingress or Egress",
                            ));
                        }
                    }
                }
                flags
            }
            _ => (true, !egress_rules.is_empty()),
        };
        let ingress = if has_ingress {
            let mut rules = Vec::new();
            for (i, r) in ingress_rules.iter().enumerate() {
                let f = format!("spec.ingress[{i}]");
                rules.push(Rule::parse(
                    r.from.as_deref(),
                    r.ports.as_deref(),
                    &namespace,
                    &f,
                    "from",
                )?);
            }
            Some(rules)
        } else {
            None
        };
        let egress = if has_egress {
            let mut rules = Vec::new();
            for (i, r) in egress_rules.iter().enumerate() {
                let f = format!("spec.egress[{i}]");
                rules.push(Rule::parse(
                    r.to.as_deref(),
                    r.ports.as_deref(),
                    &namespace,
                    &f,
                    "to",
                )?);
            }
            Some(rules)
        } else {
            None
        };
        Ok(Self {
            namespace,
            name,
            selector,
            ingress,
            egress,
        })
    }
}

impl Rule {
    fn parse(
        peers: Option<&[net::NetworkPolicyPeer]>,
        ports: Option<&[net::NetworkPolicyPort]>,
        namespace: &str,
        field: &str,
        peers_name: &str,
    ) -> Result<Self, PolicyError> {
        let peers = match peers {
            None | Some([]) => None,
            Some(list) => Some(
                list.iter()
                    .enumerate()
                    .map(|(i, p)| Peer::parse(p, namespace, &format!("{field}.{peers_name}[{i}]")))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let ports = match ports {
            None | Some([]) => None,
            Some(list) => Some(
                list.iter()
                    .enumerate()
                    .map(|(i, p)| PortSpec::parse(p, &format!("{field}.ports[{i}]")))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(Self { peers, ports })
    }
}

impl Peer {
    fn parse(
        p: &net::NetworkPolicyPeer,
        namespace: &str,
        field: &str,
    ) -> Result<Self, PolicyError> {
        match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
            (Some(b), None, None) => Ok(Peer::IpBlock(IpBlock::parse(
                b,
                &format!("{field}.ipBlock"),
            )?)),
            (Some(_), _, _) => Err(invalid(
                field.to_string(),
                "ipBlock with a selector",
                "ipBlock cannot be combined with podSelector or namespaceSelector",
            )),
            (None, None, None) => Err(invalid(
                field.to_string(),
                "{}",
                "a peer needs podSelector, namespaceSelector or ipBlock",
            )),
            (None, ns, pods) => Ok(Peer::Pods {
                namespaces: match ns {
                    None => NamespaceMatch::Same(namespace.to_string()),
                    Some(s) => NamespaceMatch::Selector(Selector::parse(
                        s,
                        &format!("{field}.namespaceSelector"),
                    )?),
                },
                pods: match pods {
                    None => Selector::everything(),
                    Some(s) => Selector::parse(s, &format!("{field}.podSelector"))?,
                },
            }),
        }
    }
}

impl IpBlock {
    fn parse(b: &net::IPBlock, field: &str) -> Result<Self, PolicyError> {
        let cidr = parse_net(&b.cidr, format!("{field}.cidr"))?;
        let mut except = Vec::new();
        for (i, e) in b.except.iter().flatten().enumerate() {
            let f = format!("{field}.except[{i}]");
            let e = parse_net(e, f.clone())?;
            if !cidr.contains(&e) || e == cidr {
                return Err(invalid(f, e, "must be a strict subset of cidr"));
            }
            except.push(e);
        }
        except.sort();
        except.dedup();
        Ok(Self { cidr, except })
    }
}

fn parse_net(s: &str, field: String) -> Result<IpNet, PolicyError> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| invalid(field, s, "not a CIDR (like 10.0.0.0/8 or fd00::/64)"))
}

impl PortSpec {
    fn parse(p: &net::NetworkPolicyPort, field: &str) -> Result<Self, PolicyError> {
        let protocol = Protocol::parse_field(p.protocol.as_ref(), &format!("{field}.protocol"))?;
        let port_field = format!("{field}.port");
        let port = match &p.port {
            None => {
                if let Some(e) = p.end_port {
                    return Err(invalid(format!("{field}.endPort"), e, "endPort needs port"));
                }
                None
            }
            Some(IntOrString::Int(n)) => {
                let start = to_port(*n, &port_field)?;
                let end = match p.end_port {
                    None => start,
                    Some(e) => {
                        let end = to_port(e, &format!("{field}.endPort"))?;
                        if end < start {
                            return Err(invalid(
                                format!("{field}.endPort"),
                                e,
                                "must not be below port",
                            ));
                        }
                        end
                    }
                };
                Some(PortValue::Range(start, end))
            }
            Some(IntOrString::String(s)) => {
                if let Some(e) = p.end_port {
                    return Err(invalid(
                        format!("{field}.endPort"),
                        e,
                        "endPort needs a numeric port",
                    ));
                }
                if s.is_empty() {
                    return Err(invalid(port_field, s, "empty port name"));
                }
                // A numeric string is a port number, as the API server's IntOrString parsing does.
                match s.parse::<i32>() {
                    Ok(n) => {
                        let n = to_port(n, &port_field)?;
                        Some(PortValue::Range(n, n))
                    }
                    Err(_) => Some(PortValue::Named(s.clone())),
                }
            }
        };
        Ok(Self { protocol, port })
    }
}

fn to_port(n: i32, field: &str) -> Result<u16, PolicyError> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(field.to_string(), n, "must be 1..65535"))
}

#[cfg(test)]
mod tests {
    use crate::manifest::load_manifest;

    fn policy_err(spec: &str) -> String {
        let doc = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: n}}\nspec:\n{spec}"
        );
        let e = load_manifest(&doc).unwrap_err().to_string();
        e.strip_prefix("document 1 (NetworkPolicy n/p): ")
            .unwrap_or_else(|| panic!("unexpected prefix: {e}"))
            .to_string()
    }

    #[test]
    fn invalid_policies_are_rejected_with_the_field() {
        let cases = [
            (
                "  policyTypes: [Ingress, Sideways]\n",
                "spec.policyTypes[1]: invalid value \"Sideways\": must be Ingress or Egress",
            ),
            (
                "  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]\n",
                "spec.ingress[0].from[0]: invalid value \"ipBlock with a selector\": ipBlock cannot be combined with podSelector or namespaceSelector",
            ),
            (
                "  egress:\n  - to: [{}]\n",
                "spec.egress[0].to[0]: invalid value \"{}\": a peer needs podSelector, namespaceSelector or ipBlock",
            ),
            (
                "  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]\n",
                "spec.ingress[0].from[0].ipBlock.except[0]: invalid value \"10.1.0.0/24\": must be a strict subset of cidr",
            ),
            (
                "  ingress:\n  - ports: [{port: 90, endPort: 80}]\n",
                "spec.ingress[0].ports[0].endPort: invalid value \"80\": must not be below port",
            ),
            (
                "  ingress:\n  - ports: [{endPort: 80}]\n",
                "spec.ingress[0].ports[0].endPort: invalid value \"80\": endPort needs port",
            ),
            (
                "  ingress:\n  - ports: [{protocol: ICMP}]\n",
                "spec.ingress[0].ports[0].protocol: invalid value \"ICMP\": protocol must be TCP, UDP or SCTP",
            ),
            (
                "  ingress:\n  - ports: [{port: 70000}]\n",
                "spec.ingress[0].ports[0].port: invalid value \"70000\": must be 1..65535",
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(policy_err(spec), want, "spec:\n{spec}");
        }
    }

    #[test]
    fn host_bits_are_cleared_and_policy_types_inferred() {
        let c = load_manifest(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  \
             egress:\n  - to: [{ipBlock: {cidr: 10.1.2.3/16, except: [10.1.2.3/24]}}]\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: q}\nspec:\n  \
             egress: []\n",
        )
        .unwrap();
        let p = &c.policies()[0];
        assert_eq!(p.namespace, "default");
        assert_eq!(
            p.ingress.as_deref(),
            Some(&[][..]),
            "Ingress is always inferred"
        );
        let rules = p
            .egress
            .as_ref()
            .expect("Egress inferred from egress rules");
        let Some(peers) = &rules[0].peers else {
            panic!("peers")
        };
        assert_eq!(
            peers[0],
            super::Peer::IpBlock(super::IpBlock {
                cidr: "10.1.0.0/16".parse().unwrap(),
                except: vec!["10.1.2.0/24".parse().unwrap()],
            })
        );
        let q = &c.policies()[1];
        assert!(
            q.ingress.is_some() && q.egress.is_none(),
            "empty egress list: no Egress"
        );
    }
}
