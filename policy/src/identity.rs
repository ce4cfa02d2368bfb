//! Security identities: the label set of a pod plus its namespace's labels (the Cilium model),
//! mapped to small numeric ids that the eBPF maps carry instead of addresses.
//!
//! Numeric space (u32):
//! - `0` [`Identity::UNKNOWN`]: never assigned; a map value of 0 means "no entry".
//! - `1` [`Identity::HOST`]: the local node's own addresses.
//! - `2` [`Identity::WORLD`]: any address not known to be a pod (external, or an ipcache miss).
//! - `3` [`Identity::REMOTE_NODE`]: another node's addresses.
//! - `4` [`Identity::ANY`]: only in rule keys: "every peer" (a rule with an empty `from`/`to`).
//! - `5..256`: reserved.
//! - `256..2^24` ([`Identity::FIRST_POD`]): pod identities, one per distinct [`IdentityLabels`].
//! - `2^24..` ([`Identity::FIRST_CIDR`]): CIDR identities, allocated by the compiler, one per
//!   distinct set of ipBlocks an address region belongs to.
//!
//! For policy, host and remote-node addresses behave like world: only ipBlocks and empty peers
//! match them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::Arc,
};

/// The prefix under which namespace labels appear in an identity's flat label form.
pub const NAMESPACE_LABEL_PREFIX: &str = "io.kubernetes.pod.namespace.labels.";

/// The namespace label that always carries the namespace name (set by Kubernetes since 1.21;
/// we set it ourselves when a namespace object does not have it).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A numeric security identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity(pub u32);

impl Identity {
    /// Not an identity: the "no entry" value.
    pub const UNKNOWN: Identity = Identity(0);
    /// The local host.
    pub const HOST: Identity = Identity(1);
    /// Anything outside the cluster's pods.
    pub const WORLD: Identity = Identity(2);
    /// Other nodes.
    pub const REMOTE_NODE: Identity = Identity(3);
    /// Wildcard peer in rule keys (empty `from`/`to`); never the identity of a packet.
    pub const ANY: Identity = Identity(4);
    /// First pod identity.
    pub const FIRST_POD: Identity = Identity(256);
    /// First CIDR identity (ipBlock regions).
    pub const FIRST_CIDR: Identity = Identity(1 << 24);

    /// Whether this is a pod identity.
    pub fn is_pod(self) -> bool {
        (Self::FIRST_POD.0..Self::FIRST_CIDR.0).contains(&self.0)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::UNKNOWN => f.write_str("unknown"),
            Self::HOST => f.write_str("host"),
            Self::WORLD => f.write_str("world"),
            Self::REMOTE_NODE => f.write_str("remote-node"),
            Self::ANY => f.write_str("any"),
            Identity(n) => write!(f, "{n}"),
        }
    }
}

/// The labels that define a pod identity: the pod's labels and its namespace's labels (which
/// always include `kubernetes.io/metadata.name=<namespace>`, so equal pod labels in two
/// namespaces are two identities).
///
/// Both maps are shared (`Arc`): the model holds one per pod, and the pods of one workload (and
/// of one namespace) carry equal maps, so a model rebuild clones no label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityLabels {
    /// Pod labels.
    pub pod: Arc<BTreeMap<String, String>>,
    /// Namespace labels, including the namespace name label.
    pub namespace: Arc<BTreeMap<String, String>>,
}

impl IdentityLabels {
    /// Builds the labels of a pod in `namespace` (name) with the namespace's labels.
    pub fn new(
        pod: BTreeMap<String, String>,
        namespace: &str,
        namespace_labels: BTreeMap<String, String>,
    ) -> Self {
        Self {
            pod: Arc::new(pod),
            namespace: Arc::new(Self::namespace_labels(namespace, namespace_labels)),
        }
    }

    /// A namespace's labels as identities carry them: with the namespace name label.
    pub fn namespace_labels(
        namespace: &str,
        mut labels: BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string());
        labels
    }

    /// The namespace name.
    pub fn namespace_name(&self) -> &str {
        self.namespace
            .get(NAMESPACE_NAME_LABEL)
            .map_or("", String::as_str)
    }

    /// The flat form: `k=v` for pod labels, `io.kubernetes.pod.namespace.labels.k=v` for
    /// namespace labels, sorted.
    pub fn flat(&self) -> Vec<String> {
        let mut out: Vec<String> = self.pod.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.extend(
            self.namespace
                .iter()
                .map(|(k, v)| format!("{NAMESPACE_LABEL_PREFIX}{k}={v}")),
        );
        out.sort();
        out
    }
}

/// Allocates pod identities. Stable: a label set keeps its id while it is allocated; new label
/// sets get the lowest free id. [`IdentityAllocator::from_label_sets`] is deterministic: the same
/// label sets always get the same ids (sorted order).
#[derive(Debug, Clone, Default)]
pub struct IdentityAllocator {
    by_labels: BTreeMap<IdentityLabels, Identity>,
    by_id: BTreeMap<Identity, IdentityLabels>,
}

impl IdentityAllocator {
    /// An empty allocator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allocates every distinct label set in sorted order, so equal inputs give equal ids.
    pub fn from_label_sets<'a>(sets: impl IntoIterator<Item = &'a IdentityLabels>) -> Self {
        let sorted: BTreeSet<&IdentityLabels> = sets.into_iter().collect();
        let mut a = Self::new();
        for s in sorted {
            a.allocate(s);
        }
        a
    }

    /// The identities of exactly the distinct label sets `sets`, keeping the id each had in
    /// `previous` (the last compilation's assignment), so a label change elsewhere renumbers
    /// nothing. New label sets get, in sorted order, the lowest ids `previous` did not hold:
    /// an id freed in this step is not handed to another label set in the same step.
    pub fn carried_over<'a>(
        previous: &IdentityAllocator,
        sets: impl IntoIterator<Item = &'a IdentityLabels>,
    ) -> Self {
        let wanted: BTreeSet<&IdentityLabels> = sets.into_iter().collect();
        let mut a = previous.clone();
        for s in &wanted {
            a.allocate(s);
        }
        let gone: Vec<IdentityLabels> = a
            .by_labels
            .keys()
            .filter(|l| !wanted.contains(l))
            .cloned()
            .collect();
        for l in &gone {
            a.release(l);
        }
        a
    }

    /// The identity of `labels`, allocating the lowest free pod id if it is new.
    pub fn allocate(&mut self, labels: &IdentityLabels) -> Identity {
        if let Some(id) = self.by_labels.get(labels) {
            return *id;
        }
        let mut next = Identity::FIRST_POD.0;
        for id in self.by_id.keys() {
            if id.0 != next {
                break;
            }
            next += 1;
        }
        let id = Identity(next);
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(id, labels.clone());
        id
    }

    /// Frees the identity of `labels` (its id may be reused later).
    pub fn release(&mut self, labels: &IdentityLabels) -> Option<Identity> {
        let id = self.by_labels.remove(labels)?;
        self.by_id.remove(&id);
        Some(id)
    }

    /// The identity of `labels`, if allocated.
    pub fn get(&self, labels: &IdentityLabels) -> Option<Identity> {
        self.by_labels.get(labels).copied()
    }

    /// The labels of `id`, if allocated.
    pub fn labels(&self, id: Identity) -> Option<&IdentityLabels> {
        self.by_id.get(&id)
    }

    /// All allocated identities with their labels, by id.
    pub fn iter(&self) -> impl Iterator<Item = (Identity, &IdentityLabels)> {
        self.by_id.iter().map(|(id, l)| (*id, l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn il(app: &str, ns: &str) -> IdentityLabels {
        IdentityLabels::new(
            BTreeMap::from([("app".to_string(), app.to_string())]),
            ns,
            BTreeMap::new(),
        )
    }

    #[test]
    fn deterministic_and_stable() {
        let sets = [il("b", "x"), il("a", "x"), il("a", "y"), il("a", "x")];
        let a1 = IdentityAllocator::from_label_sets(&sets);
        let rev: Vec<_> = sets.iter().rev().cloned().collect();
        let a2 = IdentityAllocator::from_label_sets(&rev);
        let ids1: Vec<_> = a1.iter().map(|(i, l)| (i, l.clone())).collect();
        let ids2: Vec<_> = a2.iter().map(|(i, l)| (i, l.clone())).collect();
        assert_eq!(ids1, ids2);
        assert_eq!(ids1.len(), 3);
        assert_eq!(a1.get(&il("a", "x")), Some(Identity(256)));
        assert_ne!(
            a1.get(&il("a", "x")),
            a1.get(&il("a", "y")),
            "namespace matters"
        );

        let mut a = a1.clone();
        let freed = a.release(&il("a", "y")).unwrap();
        assert_eq!(
            a.get(&il("b", "x")),
            a1.get(&il("b", "x")),
            "others keep their id"
        );
        assert_eq!(a.allocate(&il("c", "z")), freed, "lowest free id reused");
        assert_eq!(a.allocate(&il("d", "z")), Identity(259));
    }

    /// Finding 10 (docs/threat-model.md): identities are stable across compiles. Whatever label
    /// sets come and go, every set present before and after keeps its id, no id is given to
    /// two sets, and an id freed in a step is not reused in that step.
    #[test]
    fn carried_over_keeps_every_surviving_id() {
        use proptest::prelude::*;
        let set = || (0u8..6, 0u8..3).prop_map(|(a, n)| il(&format!("a{a}"), &format!("n{n}")));
        let steps = prop::collection::vec(prop::collection::vec(set(), 0..8), 1..6);
        proptest!(ProptestConfig::with_cases(500), |(steps in steps)| {
            let mut prev = IdentityAllocator::new();
            for sets in steps {
                let next = IdentityAllocator::carried_over(&prev, &sets);
                let distinct: BTreeSet<&IdentityLabels> = sets.iter().collect();
                prop_assert_eq!(next.iter().count(), distinct.len());
                for s in &distinct {
                    let id = next.get(s).expect("allocated");
                    prop_assert!(id.is_pod());
                    prop_assert_eq!(next.labels(id), Some(*s));
                    match prev.get(s) {
                        Some(old) => prop_assert_eq!(id, old, "{:?} renumbered", s),
                        None => prop_assert!(
                            prev.labels(id).is_none(),
                            "{:?} took {:?}, freed in the same step", s, id
                        ),
                    }
                }
                prev = next;
            }
        });
    }

    #[test]
    fn flat_form_and_ranges() {
        let l = IdentityLabels::new(
            BTreeMap::from([("app".into(), "web".into())]),
            "prod",
            BTreeMap::from([("team".into(), "a".into())]),
        );
        assert_eq!(
            l.flat(),
            vec![
                "app=web",
                "io.kubernetes.pod.namespace.labels.kubernetes.io/metadata.name=prod",
                "io.kubernetes.pod.namespace.labels.team=a",
            ]
        );
        assert_eq!(l.namespace_name(), "prod");
        assert!(
            Identity(256).is_pod() && !Identity::WORLD.is_pod() && !Identity::FIRST_CIDR.is_pod()
        );
    }
}
