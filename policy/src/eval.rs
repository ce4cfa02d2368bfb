//! The reference evaluator: the NetworkPolicy semantics written as directly as possible, pod by
//! pod. The compiler's output is checked against it.
//!
//! Traffic from `src` to `dst` is allowed iff the egress side of `src` allows it and the ingress
//! side of `dst` allows it. A side allows when its pod is not isolated in that direction (no
//! policy selecting it has that policy type), or when any rule of any policy selecting it
//! matches (union). External endpoints have no side of their own.
//!
//! Choices where the API leaves room:
//! - ipBlock matches by address, pod addresses included (as Calico, Antrea, OVN-Kubernetes and
//!   kube-router do; Cilium does not). A pod without an IP matches no ipBlock.
//! - A named port is resolved on the destination pod: the subject for ingress, the peer for
//!   egress, by container port name and protocol. In egress, a named port combines only with peers
//!   that select pods (pod/namespace selectors, or an empty `to`), never with ipBlock peers: the
//!   owner of an address in a block is not known to be a pod.

use crate::{
    model::{Cluster, Endpoint, PodId, Protocol},
    rules::{NamespaceMatch, Peer, PortSpec, PortValue, Rule},
};

/// The outcome for one side (the egress of the source or the ingress of the destination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SideVerdict {
    /// The endpoint is not a pod: nothing to enforce on this side.
    External,
    /// No policy selects the pod for this direction: everything is allowed.
    NotIsolated,
    /// Allowed by these policies (`ns/name`).
    AllowedBy(Vec<String>),
    /// The pod is isolated and no rule matches.
    Denied,
}

impl SideVerdict {
    /// Whether this side lets the traffic through.
    pub fn allows(&self) -> bool {
        !matches!(self, SideVerdict::Denied)
    }
}

/// The outcome of [`Cluster::allowed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The source's egress side.
    pub egress: SideVerdict,
    /// The destination's ingress side.
    pub ingress: SideVerdict,
}

impl Verdict {
    /// Whether the traffic is allowed (both sides allow it).
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Ingress,
    Egress,
}

impl Cluster {
    /// Whether `proto`/`port` traffic from `src` to `dst` is allowed.
    pub fn allowed(&self, src: &Endpoint, dst: &Endpoint, proto: Protocol, port: u16) -> Verdict {
        Verdict {
            egress: self.side(src, dst, Dir::Egress, proto, port),
            ingress: self.side(dst, src, Dir::Ingress, proto, port),
        }
    }

    fn side(
        &self,
        subject: &Endpoint,
        peer: &Endpoint,
        dir: Dir,
        proto: Protocol,
        port: u16,
    ) -> SideVerdict {
        let Endpoint::Pod(subject) = *subject else {
            return SideVerdict::External;
        };
        let pod = self.pod(subject);
        let mut isolated = false;
        let mut by = Vec::new();
        for policy in self.policies() {
            if policy.namespace != pod.namespace || !policy.selector.matches(&pod.labels) {
                continue;
            }
            let rules = match dir {
                Dir::Ingress => &policy.ingress,
                Dir::Egress => &policy.egress,
            };
            let Some(rules) = rules else { continue };
            isolated = true;
            if rules
                .iter()
                .any(|r| self.rule_matches(r, subject, peer, dir, proto, port))
            {
                by.push(policy.key());
            }
        }
        match (isolated, by.is_empty()) {
            (false, _) => SideVerdict::NotIsolated,
            (true, true) => SideVerdict::Denied,
            (true, false) => SideVerdict::AllowedBy(by),
        }
    }

    fn rule_matches(
        &self,
        rule: &Rule,
        subject: PodId,
        peer: &Endpoint,
        dir: Dir,
        proto: Protocol,
        port: u16,
    ) -> bool {
        // Where named ports are resolved: the destination pod.
        let port_owner = match dir {
            Dir::Ingress => Some(subject),
            Dir::Egress => match peer {
                Endpoint::Pod(p) => Some(*p),
                Endpoint::External(_) => None,
            },
        };
        let ports_match = |allow_named: bool| match &rule.ports {
            None => true,
            Some(specs) => specs
                .iter()
                .any(|s| self.port_matches(s, port_owner, allow_named, proto, port)),
        };
        let Some(peers) = &rule.peers else {
            return ports_match(true);
        };
        peers.iter().any(|p| match p {
            Peer::Pods { .. } => self.pod_peer_matches(p, peer) && ports_match(true),
            Peer::IpBlock(b) => {
                self.endpoint_ip(peer).is_some_and(|ip| b.contains(&ip))
                    && ports_match(dir == Dir::Ingress)
            }
        })
    }

    fn pod_peer_matches(&self, p: &Peer, peer: &Endpoint) -> bool {
        let (Peer::Pods { namespaces, pods }, Endpoint::Pod(id)) = (p, peer) else {
            return false;
        };
        let labels = self.identity_labels(*id);
        let ns_ok = match namespaces {
            NamespaceMatch::Same(ns) => labels.namespace_name() == ns,
            NamespaceMatch::Selector(s) => s.matches(&labels.namespace),
        };
        ns_ok && pods.matches(&labels.pod)
    }

    fn port_matches(
        &self,
        spec: &PortSpec,
        owner: Option<PodId>,
        allow_named: bool,
        proto: Protocol,
        port: u16,
    ) -> bool {
        if spec.protocol != proto {
            return false;
        }
        match &spec.port {
            None => true,
            Some(PortValue::Range(lo, hi)) => (*lo..=*hi).contains(&port),
            Some(PortValue::Named(name)) => {
                allow_named
                    && owner.is_some_and(|o| self.pod(o).named_port(name, proto) == Some(port))
            }
        }
    }
}
