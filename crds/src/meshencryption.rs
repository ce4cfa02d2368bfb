//! `MeshEncryption` (`meshencryptions.wiremesh.io/v1alpha1`, cluster-scoped): the one switch and
//! the settings of the whole mesh. It is a singleton: the API server only accepts the object named
//! `default`, so every agent reads the same settings and there is nothing to merge.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::{self, DurationError, Zero};

/// The only accepted `metadata.name` of a `MeshEncryption`.
pub const MESH_ENCRYPTION_NAME: &str = "default";
/// UDP port of the tunnel when `listenPort` is not set.
pub const DEFAULT_LISTEN_PORT: u16 = 51871;
/// Static key lifetime when `keyRotationInterval` is not set (30 days).
pub const DEFAULT_KEY_ROTATION_INTERVAL: &str = "720h";
/// Shortest periodic rotation interval the API accepts (`0s` disables periodic rotation).
pub const MIN_KEY_ROTATION_INTERVAL: Duration = Duration::from_secs(3600);
/// Smallest tunnel MTU: the IPv6 minimum link MTU.
pub const MIN_MTU: u16 = 1280;
/// Largest tunnel MTU: jumbo frames.
pub const MAX_MTU: u16 = 9000;

/// Condition type: every selected node has its key published and tunnels to all peers up.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: some nodes are not encrypting (bad annotations, no handshake, datapath error).
pub const CONDITION_DEGRADED: &str = "Degraded";

/// Settings of the encryption mesh. `spec: {enabled: true}` is a complete spec: every other field
/// has a default that the API server fills in.
#[allow(
    clippy::duplicated_attributes,
    reason = "printcolumn(..) entries repeat type_ and priority by design"
)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wiremesh.io",
    version = "v1alpha1",
    kind = "MeshEncryption",
    plural = "meshencryptions",
    singular = "meshencryption",
    shortname = "meshenc",
    category = "wiremesh",
    status = "MeshEncryptionStatus",
    derive = "PartialEq",
    doc = "Cluster-wide WireGuard encryption settings of wiremesh. Singleton: the only accepted name is `default`.",
    validation = Rule::new("self.metadata.name == 'default'")
        .message("MeshEncryption is a singleton: metadata.name must be 'default'"),
    printcolumn(name = "Enabled", type_ = "boolean", json_path = ".spec.enabled", description = "whether the mesh is on"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode", description = "Disabled, Permissive or Strict"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.ready", description = "nodes ready / nodes total"),
    printcolumn(name = "Datapath", type_ = "string", json_path = ".spec.datapath", priority = 1, description = "Auto, Kernel or Userspace"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct MeshEncryptionSpec {
    /// Master switch. `false` removes tunnels, routes and eBPF programs from every node; pod
    /// traffic then flows as it did before wiremesh.
    pub enabled: bool,

    /// What happens to cross-node pod traffic. `Disabled`: keys are published and tunnels built,
    /// but no traffic is steered into them. `Permissive`: traffic is encrypted when a tunnel to the
    /// destination node exists and sent in plaintext otherwise. `Strict`: cross-node pod traffic is
    /// never sent in plaintext; it is dropped when no tunnel exists.
    #[serde(default)]
    pub mode: EncryptionMode,

    /// Also encrypt host-to-host traffic between node addresses, not only pod traffic. Not
    /// implemented yet: agents refuse `true` with the condition `NodeEncryptionNotImplemented` on
    /// their `MeshNode` status (host traffic stays as it was).
    #[serde(default)]
    pub node_encryption: bool,

    /// The cluster's pod address ranges (CIDR notation). Only addresses inside them are ever
    /// accepted from Nodes (`spec.podCIDRs`) and Pods (`status.podIPs`) as tunnel destinations;
    /// a pod IP must also lie inside its own node's podCIDRs when the node has any. Unset: each
    /// node is confined to its own podCIDRs (the union of what the Nodes say is not trusted, a
    /// hostile Node could widen it), and pod IPs of nodes without podCIDRs are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty", rename = "podCIDRs")]
    #[schemars(length(max = 16), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("podCIDRs must be CIDRs such as 10.244.0.0/16"))]
    pub pod_cidrs: Vec<String>,

    /// The cluster's service address ranges: never accepted as pod addresses.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        rename = "serviceCIDRs"
    )]
    #[schemars(length(max = 16), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("serviceCIDRs must be CIDRs such as 10.96.0.0/12"))]
    pub service_cidrs: Vec<String>,

    /// How often every node's static key is rotated, as a Go duration ("720h", "90m"). A
    /// `KeyRotation` is created on this schedule. "0s" disables periodic rotation; otherwise at
    /// least 1h.
    #[serde(default = "default_key_rotation_interval")]
    #[schemars(length(max = 32), regex(pattern = duration::GO_DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) == duration('0s') || duration(self) >= duration('1h')")
        .message("keyRotationInterval must be 0s (no periodic rotation) or at least 1h"))]
    pub key_rotation_interval: String,

    /// UDP port the tunnel listens on, on every node.
    #[serde(default = "default_listen_port")]
    #[schemars(range(min = 1, max = 65535), extend("format" = "int32"))]
    pub listen_port: u16,

    /// MTU of the tunnel device. Unset: the underlay MTU minus 80 bytes of WireGuard overhead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = MIN_MTU, max = MAX_MTU), extend("format" = "int32"))]
    pub mtu: Option<u16>,

    /// Which WireGuard implementation carries the tunnel. `Auto`: the kernel module when it is
    /// loaded, the built-in userspace engine otherwise.
    #[serde(default)]
    pub datapath: DatapathMode,
}

/// Whether and how strictly cross-node pod traffic is encrypted.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EncryptionMode {
    /// Tunnels are built but carry no traffic.
    Disabled,
    /// Encrypt when a tunnel to the destination node exists; plaintext otherwise.
    #[default]
    Permissive,
    /// Never send cross-node pod traffic in plaintext; drop it when no tunnel exists.
    Strict,
}

/// Which WireGuard implementation a node uses.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DatapathMode {
    /// Kernel WireGuard when the module is present, the userspace engine otherwise.
    #[default]
    Auto,
    /// Kernel WireGuard only; nodes without the module report an error.
    Kernel,
    /// The built-in userspace engine, even where the kernel module exists.
    Userspace,
}

/// Observed state of the mesh, written by the agents.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshEncryptionStatus {
    /// Nodes whose key is published and whose tunnels to every peer are up.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub nodes_ready: i32,

    /// Nodes that should take part in the mesh.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub nodes_total: i32,

    /// Nodes ready over nodes total as text ("2/3"), shown by `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,

    /// The `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Current state in the Kubernetes condition conventions (types `Ready`, `Degraded`).
    #[serde(default)]
    #[schemars(schema_with = "crate::conditions::conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// A spec field that the schema accepts but that cannot be used as written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("MeshEncryption spec.keyRotationInterval {:?}: {source}", crate::duration::shown(.value))]
    KeyRotationInterval {
        value: String,
        #[source]
        source: DurationError,
    },
    #[error(
        "MeshEncryption spec.keyRotationInterval {:?} is shorter than the minimum of 1h (use 0s to disable periodic rotation)",
        crate::duration::shown(.value)
    )]
    KeyRotationIntervalTooShort { value: String },
    #[error("MeshEncryption spec.{field} entry {:?} is not a CIDR: {source}", crate::duration::shown(.value))]
    Cidr {
        field: &'static str,
        value: String,
        #[source]
        source: ipnet::AddrParseError,
    },
}

impl Default for MeshEncryptionSpec {
    /// The spec the API server produces from `{enabled: false}`.
    fn default() -> Self {
        Self {
            enabled: false,
            mode: EncryptionMode::default(),
            node_encryption: false,
            key_rotation_interval: default_key_rotation_interval(),
            listen_port: DEFAULT_LISTEN_PORT,
            mtu: None,
            datapath: DatapathMode::default(),
            pod_cidrs: Vec::new(),
            service_cidrs: Vec::new(),
        }
    }
}

impl MeshEncryptionSpec {
    /// The periodic rotation interval, `None` when periodic rotation is disabled ("0s").
    /// Applies the same rules as the API server, for objects that reached us another way.
    pub fn key_rotation_interval(&self) -> Result<Option<Duration>, SpecError> {
        let interval = duration::parse_spec_duration(
            &self.key_rotation_interval,
            MIN_KEY_ROTATION_INTERVAL,
            Zero::Accepted,
            |value, source| SpecError::KeyRotationInterval { value, source },
            |value| SpecError::KeyRotationIntervalTooShort { value },
        )?;
        Ok((!interval.is_zero()).then_some(interval))
    }

    /// `podCIDRs` parsed (host bits cleared). The API server checks the syntax; this applies
    /// the same rule for objects that reached us another way.
    pub fn pod_cidrs(&self) -> Result<Vec<ipnet::IpNet>, SpecError> {
        parse_cidrs("podCIDRs", &self.pod_cidrs)
    }

    /// `serviceCIDRs` parsed (host bits cleared).
    pub fn service_cidrs(&self) -> Result<Vec<ipnet::IpNet>, SpecError> {
        parse_cidrs("serviceCIDRs", &self.service_cidrs)
    }

    /// Whether cross-node pod traffic is steered into the tunnels at all.
    pub fn steers_traffic(&self) -> bool {
        self.enabled && self.mode != EncryptionMode::Disabled
    }
}

impl MeshEncryptionStatus {
    /// Sets the node counts and the `ready` text shown by `kubectl get` together, so the text
    /// never disagrees with the numbers.
    pub fn set_node_counts(&mut self, ready: i32, total: i32) {
        self.nodes_ready = ready;
        self.nodes_total = total;
        self.ready = Some(format!("{ready}/{total}"));
    }
}

fn parse_cidrs(field: &'static str, values: &[String]) -> Result<Vec<ipnet::IpNet>, SpecError> {
    values
        .iter()
        .map(|v| {
            v.trim()
                .parse::<ipnet::IpNet>()
                .map(|n| n.trunc())
                .map_err(|source| SpecError::Cidr {
                    field,
                    value: v.clone(),
                    source,
                })
        })
        .collect()
}

fn default_key_rotation_interval() -> String {
    DEFAULT_KEY_ROTATION_INTERVAL.to_owned()
}

fn default_listen_port() -> u16 {
    DEFAULT_LISTEN_PORT
}

#[cfg(test)]
mod tests;
