//! The agent's configuration: one serializable [`Config`] built from command-line flags and
//! environment variables, validated before anything starts, and logged once at start. It holds no
//! secrets (the private key lives only in the keystore file), so serializing it is always safe.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args, ValueEnum};
use serde::Serialize;

/// The UDP port of the tunnel when neither the flag nor `MeshEncryption.spec.listenPort` says
/// otherwise (the same value as `wiremesh_keyexchange::DEFAULT_LISTEN_PORT`).
pub const DEFAULT_LISTEN_PORT: u16 = 51871;

/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;

/// Which WireGuard implementation the agent drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathChoice {
    /// The kernel module when it is loaded, the userspace engine otherwise.
    Auto,
    /// The built-in userspace engine (boringtun noise layer + TUN + UDP).
    Userspace,
    /// Kernel WireGuard over generic netlink.
    Kernel,
}

/// Whether the agent loads the eBPF datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EbpfChoice {
    /// Load it when `MeshEncryption default` steers traffic.
    Auto,
    /// Never load it.
    Off,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// Flags of `mesh-agent run`; every flag also reads an environment variable so a DaemonSet can
/// configure the agent without arguments.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Name of the Node object this agent runs on.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Kubeconfig file; without it the in-cluster service account (or $KUBECONFIG) is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Directory of the node's persistent state (the private key lives in `<dir>/private.key`).
    #[arg(long, env = "WIREMESH_STATE_DIR", default_value = "/var/lib/wiremesh")]
    pub state_dir: PathBuf,

    /// Name of the tunnel interface.
    #[arg(long, env = "WIREMESH_INTERFACE", default_value = "wiremesh0")]
    pub interface: String,

    /// Name of the second tunnel slot (its port is the listen port + 1): a key rotation brings
    /// up the next world there, and from then on the slots alternate (docs/rotation.md). Without
    /// it: `--interface` with a trailing `0` replaced by `1` (`wiremesh0` -> `wiremesh1`), else with `b`
    /// appended (cut to 15 bytes).
    #[arg(long, env = "WIREMESH_INTERFACE_B")]
    pub interface_b: Option<String>,

    /// UDP listen port of the tunnel. Without it `MeshEncryption.spec.listenPort` decides
    /// (default 51871).
    #[arg(long, env = "WIREMESH_LISTEN_PORT")]
    pub listen_port: Option<u16>,

    /// MTU of the tunnel interface. Without it `MeshEncryption.spec.mtu` decides, and without that
    /// the MTU of the underlay interface minus 80 bytes.
    #[arg(long, env = "WIREMESH_MTU")]
    pub mtu: Option<u32>,

    /// Path of the wg(8) UAPI socket of the userspace engine
    /// (default `/var/run/wireguard/<interface>.sock`).
    #[arg(long, env = "WIREMESH_UAPI_SOCKET")]
    pub uapi_socket: Option<PathBuf>,

    /// Address of the unauthenticated HTTP server for /healthz, /readyz and /metrics.
    #[arg(long, env = "WIREMESH_METRICS_ADDR", default_value = "0.0.0.0:9871")]
    pub metrics_addr: SocketAddr,

    /// Address of the authenticated HTTPS API (/flows, /status), reached through the API
    /// server's node proxy (`nodes/proxy`).
    #[arg(long, env = "WIREMESH_API_ADDR", default_value = "0.0.0.0:9872")]
    pub api_addr: SocketAddr,

    /// PEM bundle of the CA(s) whose client certificates the API accepts (the API server's
    /// `--kubelet-client-certificate` issuer); without it only bearer tokens are accepted.
    #[arg(long, env = "WIREMESH_CLIENT_CA_FILE")]
    pub client_ca_file: Option<PathBuf>,

    /// Days of flow history kept in `<state-dir>/flows.redb`.
    #[arg(long, env = "WIREMESH_FLOW_RETENTION_DAYS", default_value_t = 30)]
    pub flow_retention_days: u64,

    /// Most (flow, minute) records kept in the flow history; the oldest go first.
    #[arg(
        long,
        env = "WIREMESH_FLOW_HISTORY_MAX_RECORDS",
        default_value_t = 500_000
    )]
    pub flow_history_max_records: u64,

    /// Write every flow record as a JSON line to this file (for log shippers), rotated by size.
    #[arg(long, env = "WIREMESH_FLOW_EXPORT")]
    pub flow_export: Option<PathBuf>,

    /// Size at which the export file is rotated (`<file>.1` .. `<file>.<keep>`).
    #[arg(long, env = "WIREMESH_FLOW_EXPORT_MAX_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub flow_export_max_bytes: u64,

    /// Rotated export files kept.
    #[arg(long, env = "WIREMESH_FLOW_EXPORT_KEEP", default_value_t = 5)]
    pub flow_export_keep: u32,

    /// Enter the network namespace `/var/run/netns/<name>` before anything else starts.
    #[arg(long, env = "WIREMESH_NETNS")]
    pub netns: Option<String>,

    /// WireGuard device to drive: `kernel` (create or adopt a `wireguard` link), `userspace` (the
    /// device process's UAPI socket) or `auto` (kernel when the module is there). Without it
    /// `MeshEncryption.spec.datapath` decides, at run time.
    #[arg(long, env = "WIREMESH_DATAPATH", value_enum)]
    pub datapath: Option<DatapathChoice>,

    /// How long to wait for the userspace device's UAPI socket before giving up (seconds); the
    /// agent is not ready meanwhile.
    #[arg(long, env = "WIREMESH_DEVICE_WAIT", default_value_t = 60)]
    pub device_wait_secs: u64,

    /// Routing table of the agent's routes (selected by an `ip rule` of its own, ahead of the
    /// main table); never 253-255 (default, main, local).
    #[arg(long, env = "WIREMESH_ROUTE_TABLE", default_value_t = crate::routes::DEFAULT_ROUTE_TABLE)]
    pub route_table: u32,

    /// Persistent keepalive towards every peer, in seconds (0 turns it off). Keeps a session up
    /// between idle nodes so `meshctl status` sees live handshakes and NAT state stays warm.
    #[arg(long, env = "WIREMESH_PERSISTENT_KEEPALIVE", default_value_t = 25)]
    pub persistent_keepalive: u16,

    /// How often the agent refreshes the status of its `MeshNode` (seconds); it also writes at
    /// once when the peer count changes, but never more often than every 2 seconds.
    #[arg(long, env = "WIREMESH_STATUS_INTERVAL", default_value_t = 30)]
    pub status_interval_secs: u64,

    /// Periodic full reconcile, even without watch events (seconds).
    #[arg(long, env = "WIREMESH_RESYNC_INTERVAL", default_value_t = 60)]
    pub resync_interval_secs: u64,

    /// Time the agent gives itself to drain after SIGTERM (seconds).
    #[arg(long, env = "WIREMESH_DRAIN_TIMEOUT", default_value_t = 10)]
    pub drain_timeout_secs: u64,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Mount point of the bpf filesystem; the eBPF maps and links of this node are pinned in
    /// `<bpffs>/wiremesh/<node name>`, so enforcement survives an agent restart.
    #[arg(long, env = "WIREMESH_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,

    /// eBPF datapath (steering, NetworkPolicy, strict mode, flows): `auto` loads it once
    /// `MeshEncryption default` steers traffic; `off` never loads it (routes only, no policy).
    #[arg(long, env = "WIREMESH_EBPF", value_enum, default_value = "auto")]
    pub ebpf: EbpfChoice,

    /// Most flows kept in the agent's flow table (`/flows`); the least recently seen go first.
    #[arg(long, env = "WIREMESH_FLOW_TABLE_SIZE", default_value_t = 4096)]
    pub flow_table_size: usize,

    /// Also export series per peer node: handshake time
    /// (`wiremesh_peer_last_handshake_timestamp_seconds{peer}`) and tunnel bytes
    /// (`wiremesh_peer_receive_bytes_total{peer}`, `wiremesh_peer_transmit_bytes_total{peer}`).
    /// Off by default: N agents times N-1 peers is N² series for the cluster's Prometheus; the
    /// bounded `wiremesh_peers_by_handshake_age{age}`,
    /// `wiremesh_peer_oldest_handshake_timestamp_seconds` and
    /// `wiremesh_tunnel_{receive,transmit}_bytes_total` are always there.
    #[arg(long, env = "WIREMESH_PER_PEER_METRICS", default_value_t = false)]
    pub per_peer_metrics: bool,

    /// Seconds of flows behind `wiremesh_flow_coverage_ratio` (encrypted / cross-node pod flows
    /// this node recorded within the window).
    #[arg(
        long,
        env = "WIREMESH_FLOW_COVERAGE_WINDOW_SECS",
        default_value_t = 300
    )]
    pub flow_coverage_window_secs: u64,
    /// Stand for election as the cluster's key-rotation coordinator (a Lease among the agents).
    #[arg(long, env = "WIREMESH_COORDINATOR", default_value_t = true, action = clap::ArgAction::Set)]
    pub coordinator: bool,

    /// Namespace of the coordinator's Lease: the agent's own namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "wiremesh-system")]
    pub lease_namespace: String,

    /// Credentials of the rotation coordinator (default: the pod's ServiceAccount). Node
    /// credentials cannot hold the Lease: NodeRestriction allows a node only its own Lease in
    /// `kube-node-lease`. Without either, this agent does not stand for election.
    #[arg(long, env = "WIREMESH_COORDINATOR_KUBECONFIG")]
    pub coordinator_kubeconfig: Option<PathBuf>,

    /// Remove the taint `wiremesh.io/not-ready` from this node once its mesh has converged (nodes
    /// register with it: kubelet `--register-with-taints=wiremesh.io/not-ready=:NoSchedule`).
    #[arg(long, env = "WIREMESH_READINESS_TAINT", default_value_t = false, action = clap::ArgAction::Set)]
    pub readiness_taint: bool,
    /// Replace this node's key with a new one before starting, whatever the keystore holds
    /// (also a corrupt or half-present one), and drop any rotation state. This changes the
    /// node's identity: every peer picks up the new public key. A flag only (no environment
    /// variable), so a restart never repeats it by accident.
    #[arg(long)]
    pub regenerate_key: bool,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("node name is empty (set --node-name or NODE_NAME)")]
    EmptyNodeName,
    #[error("interface name {0:?} is invalid: 1 to 15 bytes, no '/', whitespace or ':'")]
    InterfaceName(String),
    #[error("network namespace name {0:?} is invalid: no '/' and not '.' or '..'")]
    NetnsName(String),
    #[error("listen port 0 is not allowed")]
    ListenPort,
    #[error("MTU {0} is out of range 1280..=65535")]
    Mtu(u32),
    #[error("{name} must be at least 1 second")]
    ZeroInterval { name: &'static str },
    #[error("{name} must be at least 1")]
    ZeroLimit { name: &'static str },
    #[error("route table {0} is reserved (0 and 253-255 are unspec, default, main and local)")]
    RouteTable(u32),
}

/// The validated configuration of `mesh-agent run`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    pub node_name: String,
    pub kubeconfig: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub interface: String,
    /// The second slot's interface (rotation).
    pub interface_b: String,
    pub listen_port: Option<u16>,
    pub mtu: Option<u32>,
    pub uapi_socket: PathBuf,
    pub metrics_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub client_ca_file: Option<PathBuf>,
    #[serde(with = "secs")]
    pub flow_retention: Duration,
    pub flow_history_max_records: u64,
    pub flow_export: Option<PathBuf>,
    pub flow_export_max_bytes: u64,
    pub flow_export_keep: u32,
    pub netns: Option<String>,
    /// `None`: `MeshEncryption.spec.datapath` decides (default auto).
    pub datapath: Option<DatapathChoice>,
    #[serde(with = "secs")]
    pub device_wait: Duration,
    pub route_table: u32,
    pub persistent_keepalive: u16,
    #[serde(with = "secs")]
    pub status_interval: Duration,
    #[serde(with = "secs")]
    pub resync_interval: Duration,
    #[serde(with = "secs")]
    pub drain_timeout: Duration,
    pub log_format: LogFormat,
    pub bpffs: PathBuf,
    pub ebpf: EbpfChoice,
    pub flow_table_size: usize,
    pub per_peer_metrics: bool,
    #[serde(with = "secs")]
    pub flow_coverage_window: Duration,
    pub coordinator: bool,
    pub lease_namespace: String,
    pub coordinator_kubeconfig: Option<PathBuf>,
    pub readiness_taint: bool,
    pub regenerate_key: bool,
}

impl Config {
    /// Validates the flags.
    pub fn from_args(args: RunArgs) -> Result<Self, ConfigError> {
        if args.node_name.trim().is_empty() {
            return Err(ConfigError::EmptyNodeName);
        }
        let interface_b = args
            .interface_b
            .clone()
            .unwrap_or_else(|| default_interface_b(&args.interface));
        for ifname in [&args.interface, &interface_b] {
            if ifname.is_empty()
                || ifname.len() > MAX_IFNAME_LEN
                || ifname
                    .chars()
                    .any(|c| c == '/' || c == ':' || c.is_whitespace())
            {
                return Err(ConfigError::InterfaceName(ifname.clone()));
            }
        }
        if interface_b == args.interface {
            return Err(ConfigError::InterfaceName(interface_b));
        }
        if let Some(ns) = &args.netns
            && (ns.is_empty() || ns.contains('/') || ns == "." || ns == "..")
        {
            return Err(ConfigError::NetnsName(ns.clone()));
        }
        if args.listen_port == Some(0) {
            return Err(ConfigError::ListenPort);
        }
        if let Some(mtu) = args.mtu
            && !(1280..=65535).contains(&mtu)
        {
            return Err(ConfigError::Mtu(mtu));
        }
        for (name, value) in [
            ("status interval", args.status_interval_secs),
            ("resync interval", args.resync_interval_secs),
            ("drain timeout", args.drain_timeout_secs),
            ("device wait", args.device_wait_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::ZeroInterval { name });
            }
        }
        for (name, value) in [
            ("flow retention days", args.flow_retention_days),
            ("flow history max records", args.flow_history_max_records),
            ("flow export max bytes", args.flow_export_max_bytes),
            ("flow coverage window", args.flow_coverage_window_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::ZeroLimit { name });
            }
        }
        if matches!(args.route_table, 0 | 253..=255) {
            return Err(ConfigError::RouteTable(args.route_table));
        }
        let uapi_socket = args
            .uapi_socket
            .unwrap_or_else(|| default_uapi_socket(&args.interface));
        Ok(Self {
            node_name: args.node_name.trim().to_string(),
            kubeconfig: args.kubeconfig,
            state_dir: args.state_dir,
            interface: args.interface,
            interface_b,
            listen_port: args.listen_port,
            mtu: args.mtu,
            uapi_socket,
            metrics_addr: args.metrics_addr,
            api_addr: args.api_addr,
            client_ca_file: args.client_ca_file,
            flow_retention: Duration::from_secs(args.flow_retention_days.saturating_mul(86_400)),
            flow_history_max_records: args.flow_history_max_records,
            flow_export: args.flow_export,
            flow_export_max_bytes: args.flow_export_max_bytes,
            flow_export_keep: args.flow_export_keep,
            netns: args.netns,
            datapath: args.datapath,
            device_wait: Duration::from_secs(args.device_wait_secs),
            route_table: args.route_table,
            persistent_keepalive: args.persistent_keepalive,
            status_interval: Duration::from_secs(args.status_interval_secs),
            resync_interval: Duration::from_secs(args.resync_interval_secs),
            drain_timeout: Duration::from_secs(args.drain_timeout_secs),
            log_format: args.log_format,
            bpffs: args.bpffs,
            ebpf: args.ebpf,
            flow_table_size: args.flow_table_size.max(1),
            per_peer_metrics: args.per_peer_metrics,
            flow_coverage_window: Duration::from_secs(args.flow_coverage_window_secs),
            coordinator: args.coordinator,
            lease_namespace: args.lease_namespace,
            coordinator_kubeconfig: args.coordinator_kubeconfig,
            readiness_taint: args.readiness_taint,
            regenerate_key: args.regenerate_key,
        })
    }

    /// `/var/run/netns/<name>` of `--netns`, if given.
    pub fn netns_path(&self) -> Option<PathBuf> {
        self.netns
            .as_ref()
            .map(|name| Path::new("/var/run/netns").join(name))
    }
}

/// The second slot's interface when `--interface-b` is not given: a trailing `0` becomes `1`
/// (`wiremesh0` -> `wiremesh1`), else `b` is appended (the name cut to fit 15 bytes).
pub fn default_interface_b(interface: &str) -> String {
    if let Some(stem) = interface.strip_suffix('0') {
        return format!("{stem}1");
    }
    let mut b: String = interface.chars().take(MAX_IFNAME_LEN - 1).collect();
    b.push('b');
    b
}

/// Where wg(8) looks for the UAPI socket of `ifname`.
pub fn default_uapi_socket(ifname: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"))
}

mod secs {
    use std::time::Duration;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct TestCli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["mesh-agent"];
        argv.extend_from_slice(args);
        Config::from_args(TestCli::try_parse_from(argv).expect("flags parse").run)
    }

    #[test]
    fn defaults_are_filled_in() {
        let config = parse(&["--node-name", "n1"]).unwrap();
        assert_eq!(config.node_name, "n1");
        assert_eq!(config.interface, "wiremesh0");
        assert_eq!(
            config.uapi_socket,
            PathBuf::from("/var/run/wireguard/wiremesh0.sock")
        );
        assert_eq!(config.listen_port, None);
        assert_eq!(config.datapath, None);
        assert_eq!(config.route_table, 87);
        assert_eq!(config.netns_path(), None);
        assert_eq!(config.metrics_addr.port(), 9871);
        assert_eq!(config.api_addr.port(), 9872);
        assert_eq!(config.flow_retention, Duration::from_secs(30 * 86_400));
        assert_eq!(config.flow_export, None);
    }

    /// Finding 14 (docs/threat-model.md): the flag that keystore errors tell the operator to
    /// use exists and does what they say: a corrupt key stops the agent with an error naming
    /// it, and with it the agent starts on a new key.
    #[test]
    fn the_flag_keystore_errors_name_regenerates_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let state_arg = state.to_str().expect("utf-8").to_string();
        let plain = parse(&["--node-name", "n", "--state-dir", &state_arg]).unwrap();
        assert!(!plain.regenerate_key);
        let first = crate::app::load_key(&plain).expect("first start generates");
        std::fs::write(state.join("private.key"), "not a key\n").expect("corrupt it");
        let error = format!("{:#}", crate::app::load_key(&plain).unwrap_err());
        let flag = error
            .split_whitespace()
            .find(|w| {
                w.trim_matches(|c: char| c == '(' || c == ')')
                    .starts_with("--")
            })
            .map(|w| w.trim_matches(|c: char| c == '(' || c == ')' || c == ','))
            .unwrap_or_else(|| panic!("the error names no flag: {error}"));
        assert_eq!(flag, "--regenerate-key", "{error}");
        let regenerate = parse(&["--node-name", "n", "--state-dir", &state_arg, flag]).unwrap();
        assert!(regenerate.regenerate_key);
        let new = crate::app::load_key(&regenerate).expect("regenerated");
        assert_ne!(new.current.public_key(), first.current.public_key());
        let reloaded = crate::app::load_key(&plain).expect("the new key loads");
        assert_eq!(reloaded.current.public_key(), new.current.public_key());
    }

    #[test]
    fn bad_values_are_rejected_with_reasons() {
        assert_eq!(
            parse(&["--node-name", " "]).unwrap_err(),
            ConfigError::EmptyNodeName
        );
        assert!(matches!(
            parse(&["--node-name", "n", "--interface", "a-very-long-ifname"]).unwrap_err(),
            ConfigError::InterfaceName(_)
        ));
        assert!(matches!(
            parse(&["--node-name", "n", "--netns", "../x"]).unwrap_err(),
            ConfigError::NetnsName(_)
        ));
        assert_eq!(
            parse(&["--node-name", "n", "--listen-port", "0"]).unwrap_err(),
            ConfigError::ListenPort
        );
        assert_eq!(
            parse(&["--node-name", "n", "--mtu", "500"]).unwrap_err(),
            ConfigError::Mtu(500)
        );
        assert_eq!(
            parse(&["--node-name", "n", "--flow-retention-days", "0"]).unwrap_err(),
            ConfigError::ZeroLimit {
                name: "flow retention days"
            }
        );
        assert_eq!(
            parse(&["--node-name", "n", "--route-table", "254"]).unwrap_err(),
            ConfigError::RouteTable(254)
        );
    }

    #[test]
    fn serialized_config_names_the_netns_path() {
        let config = parse(&[
            "--node-name",
            "n1",
            "--netns",
            "wm-n1",
            "--listen-port",
            "5000",
        ])
        .unwrap();
        assert_eq!(
            config.netns_path(),
            Some(PathBuf::from("/var/run/netns/wm-n1"))
        );
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["listenPort"], 5000);
        assert_eq!(json["statusInterval"], 30);
    }
}
