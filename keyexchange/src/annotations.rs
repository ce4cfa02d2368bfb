//! The Node annotation schema of the key exchange (DESIGN.md "Key exchange"): parse, validate and
//! render the `wiremesh.io/*` annotations each agent writes on its own Node.
//!
//! Everything here treats annotation values as hostile input: any node (or anyone with Node patch
//! rights) can write them. A rejected value maps to an [`AnnotationError`] whose
//! [`reason`](AnnotationError::reason) is a Kubernetes Event reason and whose `Display` is a short
//! message that names the annotation and quotes at most a truncated, escaped prefix of the value.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use crate::keys::{KeyError, PublicKey};

mod point;
#[cfg(test)]
mod tests;

pub use point::{KeyProblem, validate_public_key};

/// Base64 of the node's current X25519 public key (44 characters).
pub const ANNOTATION_PUBLIC_KEY: &str = "wiremesh.io/public-key";
/// `IP:port` (IPv6 as `[addr]:port`) where the node's tunnel listens; the IP must be one of the
/// Node's `status.addresses`.
pub const ANNOTATION_ENDPOINT: &str = "wiremesh.io/endpoint";
/// Decimal, monotonic: +1 every time the published public key changes (a rotation switch, a
/// rollback, a regenerated key).
pub const ANNOTATION_KEY_GENERATION: &str = "wiremesh.io/key-generation";
/// Base64 of the key the node will switch to in the rotation in progress.
pub const ANNOTATION_NEXT_PUBLIC_KEY: &str = "wiremesh.io/next-public-key";
/// During a rotation: `IP:port` of the node's next-world tunnel (the other slot's port), validated
/// like [`ANNOTATION_ENDPOINT`]. Published by every participant (docs/rotation.md).
pub const ANNOTATION_NEXT_ENDPOINT: &str = "wiremesh.io/next-endpoint";
/// Rotation progress of this node: `<KeyRotation name>=<step>`, see [`RotationMark`].
pub const ANNOTATION_ROTATION: &str = "wiremesh.io/rotation";
/// UDP port of the tunnel when `MeshEncryption.spec.listenPort` is not set.
pub const DEFAULT_LISTEN_PORT: u16 = 51871;

/// Every annotation this schema owns, for callers that copy or strip them as a set.
pub const ALL_ANNOTATIONS: [&str; 6] = [
    ANNOTATION_PUBLIC_KEY,
    ANNOTATION_ENDPOINT,
    ANNOTATION_KEY_GENERATION,
    ANNOTATION_NEXT_PUBLIC_KEY,
    ANNOTATION_NEXT_ENDPOINT,
    ANNOTATION_ROTATION,
];

/// Longest KeyRotation name (a DNS-1123 subdomain).
const MAX_ROTATION_NAME: usize = 253;
/// How many bytes of a rejected value (escaped) an error message quotes, at most one escape more.
const SHOWN_LEN: usize = 48;

/// A rejected annotation value as it appears in messages: control characters escaped, cut to a
/// few dozen characters, with the original length when cut. Hostile values can be up to 256 KiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShownValue(String);

impl ShownValue {
    /// Escapes and truncates `value`.
    pub fn new(value: &str) -> Self {
        let mut shown = String::new();
        for c in value.chars() {
            if shown.len() >= SHOWN_LEN {
                shown.push_str(&format!("...({} bytes)", value.len()));
                return Self(shown);
            }
            shown.extend(c.escape_debug());
        }
        Self(shown)
    }

    /// The escaped, possibly truncated text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ShownValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0)
    }
}

/// What is wrong with an endpoint value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EndpointProblem {
    /// Not `IPv4:port` or `[IPv6]:port` (host names are not accepted).
    #[error("not IP:port")]
    Syntax,
    /// Port 0 is not a listening port.
    #[error("port 0")]
    PortZero,
    /// An IPv6 zone (`%2`) only means something on the node itself.
    #[error("IPv6 zone id is not allowed")]
    ZoneId,
}

/// What is wrong with a key-generation value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GenerationProblem {
    /// Anything but ASCII digits (signs, spaces, empty).
    #[error("not a decimal number")]
    NotDecimal,
    /// `007`: one number, one spelling.
    #[error("leading zero")]
    LeadingZero,
    /// Larger than u64.
    #[error("too large")]
    Overflow,
}

/// What is wrong with a rotation mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MarkProblem {
    /// No `=` between name and step.
    #[error("want <rotation>=<step>")]
    Syntax,
    /// The name is not a DNS-1123 subdomain (lowercase alphanumerics, '-', '.', at most 253).
    #[error("rotation name is not a DNS-1123 subdomain")]
    Name,
    /// The step is not one of prepared, switched, retired, aborted.
    #[error("step is not prepared, switched, retired or aborted")]
    Step,
}

/// Why a node's annotations were not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    /// No public key yet: the node has not joined. Not an error worth an Event.
    #[error("annotation {ANNOTATION_PUBLIC_KEY} is not set: the node has not joined the mesh")]
    NotPublished,
    /// A public-key or next-public-key value is unusable.
    #[error("annotation {annotation}: {value}: {problem}")]
    InvalidKey {
        annotation: &'static str,
        value: ShownValue,
        problem: KeyProblem,
    },
    /// The node published a key but no endpoint.
    #[error("annotation {ANNOTATION_ENDPOINT} is not set")]
    MissingEndpoint,
    /// The endpoint does not parse.
    #[error("annotation {ANNOTATION_ENDPOINT}: {value}: {problem}")]
    InvalidEndpoint {
        value: ShownValue,
        problem: EndpointProblem,
    },
    /// The endpoint parses, but its IP is not one of the Node's `status.addresses`: a node could
    /// otherwise point its peers' traffic at any host.
    #[error(
        "annotation {ANNOTATION_ENDPOINT}: {} is not one of the node's addresses", endpoint.ip()
    )]
    EndpointNotNodeAddress { endpoint: SocketAddr },
    /// The node published a key but no generation.
    #[error("annotation {ANNOTATION_KEY_GENERATION} is not set")]
    MissingKeyGeneration,
    /// The generation does not parse.
    #[error("annotation {ANNOTATION_KEY_GENERATION}: {value}: {problem}")]
    InvalidKeyGeneration {
        value: ShownValue,
        problem: GenerationProblem,
    },
    /// The rotation mark does not parse.
    #[error("annotation {ANNOTATION_ROTATION}: {value}: {problem}")]
    InvalidRotationMark {
        value: ShownValue,
        problem: MarkProblem,
    },
}

impl AnnotationError {
    /// A CamelCase Kubernetes Event reason, stable across releases (dashboards match on it).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotPublished => "PublicKeyNotPublished",
            Self::InvalidKey { problem, .. } => problem.reason(),
            Self::MissingEndpoint => "MissingEndpoint",
            Self::InvalidEndpoint { .. } => "InvalidEndpoint",
            Self::EndpointNotNodeAddress { .. } => "EndpointNotNodeAddress",
            Self::MissingKeyGeneration => "MissingKeyGeneration",
            Self::InvalidKeyGeneration { .. } => "InvalidKeyGeneration",
            Self::InvalidRotationMark { .. } => "InvalidRotationMark",
        }
    }

    /// The annotation at fault.
    pub fn annotation(&self) -> &'static str {
        match self {
            Self::NotPublished => ANNOTATION_PUBLIC_KEY,
            Self::InvalidKey { annotation, .. } => annotation,
            Self::MissingEndpoint
            | Self::InvalidEndpoint { .. }
            | Self::EndpointNotNodeAddress { .. } => ANNOTATION_ENDPOINT,
            Self::MissingKeyGeneration | Self::InvalidKeyGeneration { .. } => {
                ANNOTATION_KEY_GENERATION
            }
            Self::InvalidRotationMark { .. } => ANNOTATION_ROTATION,
        }
    }
}

/// How far a node has come in one KeyRotation. Ordered: a later step implies the earlier ones,
/// except [`Aborted`](Self::Aborted), which ends the rotation for that node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RotationStep {
    /// The node published its next key (if it rotates) and accepts every rotating peer's next key.
    Prepared,
    /// The node initiates with its new key (if it rotates) and published it as its public key.
    Switched,
    /// The node uses only new keys: its view shows every rotating peer switched.
    Retired,
    /// The rotation failed and the node went back to the keys in force before it.
    Aborted,
}

impl RotationStep {
    /// The spelling in the annotation.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Switched => "switched",
            Self::Retired => "retired",
            Self::Aborted => "aborted",
        }
    }

    /// Whether the node has reached at least `step` (an aborted node has reached nothing).
    pub fn reached(self, step: RotationStep) -> bool {
        self != Self::Aborted && step != Self::Aborted && self >= step
    }
}

impl fmt::Display for RotationStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `wiremesh.io/rotation` value: `<KeyRotation name>=<step>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RotationMark {
    /// The KeyRotation object's name.
    pub rotation: String,
    /// This node's progress in it.
    pub step: RotationStep,
}

impl RotationMark {
    /// A mark for `rotation`; panics in debug builds if the name could not round-trip.
    pub fn new(rotation: impl Into<String>, step: RotationStep) -> Self {
        let rotation = rotation.into();
        debug_assert!(
            is_dns1123_subdomain(&rotation),
            "bad rotation name {rotation:?}"
        );
        Self { rotation, step }
    }

    /// Parses and validates a mark value.
    pub fn parse(value: &str) -> Result<Self, AnnotationError> {
        let bad = |problem| AnnotationError::InvalidRotationMark {
            value: ShownValue::new(value),
            problem,
        };
        let (name, step) = value
            .split_once('=')
            .ok_or_else(|| bad(MarkProblem::Syntax))?;
        if !is_dns1123_subdomain(name) {
            return Err(bad(MarkProblem::Name));
        }
        let step = match step {
            "prepared" => RotationStep::Prepared,
            "switched" => RotationStep::Switched,
            "retired" => RotationStep::Retired,
            "aborted" => RotationStep::Aborted,
            _ => return Err(bad(MarkProblem::Step)),
        };
        Ok(Self {
            rotation: name.to_string(),
            step,
        })
    }

    /// The mark in `annotations`, if any, parsed on its own (a bad endpoint does not hide it).
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
    ) -> Result<Option<Self>, AnnotationError> {
        annotations
            .get(ANNOTATION_ROTATION)
            .map(|v| Self::parse(v))
            .transpose()
    }
}

impl fmt::Display for RotationMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.rotation, self.step)
    }
}

impl FromStr for RotationMark {
    type Err = AnnotationError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Self::parse(value)
    }
}

/// Whether `name` is a Kubernetes object name (DNS-1123 subdomain).
pub fn is_dns1123_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ROTATION_NAME
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// An endpoint annotation whose IP is not (any more) one of the Node's addresses, and where a
/// peer sends instead: the node's underlay address changed and its agent has not republished yet
/// (docs/faults.md, "underlay readdressed"). See [`NodeAnnotations::parse_for_peering`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MovedEndpoint {
    /// [`ANNOTATION_ENDPOINT`] or [`ANNOTATION_NEXT_ENDPOINT`].
    pub annotation: &'static str,
    /// The endpoint as annotated.
    pub annotated: SocketAddr,
    /// What is used instead: [`endpoint_on_node`] of it, always one of the Node's addresses.
    pub used: SocketAddr,
}

impl fmt::Display for MovedEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "annotation {}: {} is not one of the node's addresses (any more); using its address {} until the node republishes",
            self.annotation,
            self.annotated.ip(),
            self.used
        )
    }
}

/// Where to reach a node whose annotated `endpoint` is not one of its `node_addresses`: its first
/// address of the same family (InternalIP before ExternalIP, the order the agent's views keep),
/// with the annotated port. `None` when the node has no address of that family. The result is
/// always one of `node_addresses`: an annotation never makes anyone send outside them.
pub fn endpoint_on_node(endpoint: SocketAddr, node_addresses: &[IpAddr]) -> Option<SocketAddr> {
    node_addresses
        .iter()
        .find(|ip| ip.is_ipv4() == endpoint.is_ipv4())
        .map(|ip| SocketAddr::new(*ip, endpoint.port()))
}

/// One node's validated key-exchange annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAnnotations {
    /// The key peers initiate to and accept handshakes from.
    pub public_key: PublicKey,
    /// Where the node's tunnel listens; always one of the node's addresses (from
    /// [`parse_for_peering`](Self::parse_for_peering): possibly in place of the annotated one).
    pub endpoint: SocketAddr,
    /// +1 every time `public_key` changes.
    pub key_generation: u64,
    /// During a rotation: the key the node will switch to. Peers accept it as well.
    pub next_public_key: Option<PublicKey>,
    /// During a rotation: where the node's next-world tunnel listens.
    pub next_endpoint: Option<SocketAddr>,
    /// The node's progress in the latest rotation it took part in.
    pub rotation: Option<RotationMark>,
}

impl NodeAnnotations {
    /// Parses and validates the annotations of a Node whose `status.addresses` are
    /// `node_addresses`. Unknown annotations are ignored. The first problem found is returned;
    /// an absent public key is [`AnnotationError::NotPublished`].
    pub fn parse(
        annotations: &BTreeMap<String, String>,
        node_addresses: &[IpAddr],
    ) -> Result<Self, AnnotationError> {
        Self::parse_inner(annotations, node_addresses, None)
    }

    /// [`parse`](Self::parse) for a node to peer with. An endpoint (or next endpoint) that is
    /// well-formed but whose IP is not one of `node_addresses` is not an error here: the node's
    /// underlay address changed and its agent has not republished the annotation yet, which
    /// takes that agent until its own API connections notice (~22 s, docs/faults.md). The
    /// endpoint is replaced with [`endpoint_on_node`] (the node's address of the same family,
    /// annotated port), so peers keep the node and send to an address it claims; each
    /// replacement is returned, for an Event. Rejected as by `parse` when the node has no
    /// address of that family. Every other problem is the same error as in `parse`.
    pub fn parse_for_peering(
        annotations: &BTreeMap<String, String>,
        node_addresses: &[IpAddr],
    ) -> Result<(Self, Vec<MovedEndpoint>), AnnotationError> {
        let mut moved = Vec::new();
        let parsed = Self::parse_inner(annotations, node_addresses, Some(&mut moved))?;
        Ok((parsed, moved))
    }

    /// `moved`: follow the node's addresses (and record it) instead of rejecting.
    fn parse_inner(
        annotations: &BTreeMap<String, String>,
        node_addresses: &[IpAddr],
        mut moved: Option<&mut Vec<MovedEndpoint>>,
    ) -> Result<Self, AnnotationError> {
        let mut endpoint_value = |annotation: &'static str, value: &str| match (
            parse_endpoint(value, node_addresses),
            moved.as_deref_mut(),
        ) {
            (Err(AnnotationError::EndpointNotNodeAddress { endpoint }), Some(moved)) => {
                let used = endpoint_on_node(endpoint, node_addresses)
                    .ok_or(AnnotationError::EndpointNotNodeAddress { endpoint })?;
                moved.push(MovedEndpoint {
                    annotation,
                    annotated: endpoint,
                    used,
                });
                Ok(used)
            }
            (result, _) => result,
        };
        let public_key = match annotations.get(ANNOTATION_PUBLIC_KEY) {
            None => return Err(AnnotationError::NotPublished),
            Some(value) => parse_key(ANNOTATION_PUBLIC_KEY, value)?,
        };
        let endpoint = match annotations.get(ANNOTATION_ENDPOINT) {
            None => return Err(AnnotationError::MissingEndpoint),
            Some(value) => endpoint_value(ANNOTATION_ENDPOINT, value)?,
        };
        let key_generation = match annotations.get(ANNOTATION_KEY_GENERATION) {
            None => return Err(AnnotationError::MissingKeyGeneration),
            Some(value) => parse_key_generation(value)?,
        };
        let next_public_key = annotations
            .get(ANNOTATION_NEXT_PUBLIC_KEY)
            .map(|value| parse_key(ANNOTATION_NEXT_PUBLIC_KEY, value))
            .transpose()?;
        let next_endpoint = annotations
            .get(ANNOTATION_NEXT_ENDPOINT)
            .map(|value| endpoint_value(ANNOTATION_NEXT_ENDPOINT, value))
            .transpose()?;
        let rotation = RotationMark::from_annotations(annotations)?;
        Ok(Self {
            public_key,
            endpoint,
            key_generation,
            next_public_key,
            next_endpoint,
            rotation,
        })
    }

    /// The annotations to write: all six keys this schema owns that have a value. A patch that
    /// applies them should also remove the owned keys missing here (see [`ALL_ANNOTATIONS`]).
    pub fn render(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        out.insert(
            ANNOTATION_PUBLIC_KEY.to_string(),
            self.public_key.to_base64(),
        );
        out.insert(ANNOTATION_ENDPOINT.to_string(), self.endpoint.to_string());
        out.insert(
            ANNOTATION_KEY_GENERATION.to_string(),
            self.key_generation.to_string(),
        );
        if let Some(next) = &self.next_public_key {
            out.insert(ANNOTATION_NEXT_PUBLIC_KEY.to_string(), next.to_base64());
        }
        if let Some(next) = &self.next_endpoint {
            out.insert(ANNOTATION_NEXT_ENDPOINT.to_string(), next.to_string());
        }
        if let Some(mark) = &self.rotation {
            out.insert(ANNOTATION_ROTATION.to_string(), mark.to_string());
        }
        out
    }

    /// This node's step in `rotation`, or `None` when its mark names another rotation or none.
    pub fn rotation_step(&self, rotation: &str) -> Option<RotationStep> {
        self.rotation
            .as_ref()
            .filter(|m| m.rotation == rotation)
            .map(|m| m.step)
    }

    /// The keys this node answers to: its public key and, during a rotation, its next key.
    pub fn claimed_keys(&self) -> impl Iterator<Item = PublicKey> + '_ {
        std::iter::once(self.public_key)
            .chain(self.next_public_key.filter(|next| *next != self.public_key))
    }
}

/// Parses one key annotation (`annotation` names it in errors) and validates the point.
pub fn parse_key(annotation: &'static str, value: &str) -> Result<PublicKey, AnnotationError> {
    let bad = |problem| AnnotationError::InvalidKey {
        annotation,
        value: ShownValue::new(value),
        problem,
    };
    let key = PublicKey::from_base64(value).map_err(|e| {
        bad(match e {
            KeyError::Length(n) => KeyProblem::Length(n),
            KeyError::Base64(_) | KeyError::Random(_) => KeyProblem::Encoding,
        })
    })?;
    validate_public_key(&key).map_err(bad)?;
    Ok(key)
}

/// Parses an endpoint value and checks its IP against the node's addresses.
pub fn parse_endpoint(
    value: &str,
    node_addresses: &[IpAddr],
) -> Result<SocketAddr, AnnotationError> {
    let bad = |problem| AnnotationError::InvalidEndpoint {
        value: ShownValue::new(value),
        problem,
    };
    let endpoint: SocketAddr = value.parse().map_err(|_| bad(EndpointProblem::Syntax))?;
    if endpoint.port() == 0 {
        return Err(bad(EndpointProblem::PortZero));
    }
    if let SocketAddr::V6(v6) = endpoint
        && v6.scope_id() != 0
    {
        return Err(bad(EndpointProblem::ZoneId));
    }
    if !node_addresses.contains(&endpoint.ip()) {
        return Err(AnnotationError::EndpointNotNodeAddress { endpoint });
    }
    Ok(endpoint)
}

/// Parses a key-generation value: plain decimal, no sign, no leading zero.
pub fn parse_key_generation(value: &str) -> Result<u64, AnnotationError> {
    let bad = |problem| AnnotationError::InvalidKeyGeneration {
        value: ShownValue::new(value),
        problem,
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(GenerationProblem::NotDecimal));
    }
    if value.len() > 1 && value.starts_with('0') {
        return Err(bad(GenerationProblem::LeadingZero));
    }
    value.parse().map_err(|_| bad(GenerationProblem::Overflow))
}
