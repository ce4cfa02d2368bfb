//! The cluster description, `/run/wiremesh-demo/cluster.json`: what `meshctl demo up` leaves for people
//! and scripts (kubeconfig, testenv PID, nodes with their namespaces, underlay IPs, agent and device
//! PIDs, pods with their namespaces and IPs), plus the ledger another process needs to remove it all.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::ledger::{Ledger, TeardownError};

/// Why a description could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DescriptionError {
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The JSON did not parse.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// A running virtual cluster. The keys `kubeconfig`, `testenvPid`, `nodes[].{name, netns, underlayIP,
/// agentPid}` and `pods[].{namespace, name, netns, ip, node}` are the documented interface; the others
/// are extra detail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterDescription {
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// PID of the testenv process (kube-apiserver + etcd).
    pub testenv_pid: u32,
    /// The nodes.
    pub nodes: Vec<NodeDescription>,
    /// The pods.
    pub pods: Vec<PodDescription>,
    /// The cluster id in every namespace and link name.
    pub id: String,
    /// `https://IP:port` of the apiserver.
    pub api_server: String,
    /// The underlay bridge in the host namespace (capture here to see node-to-node traffic).
    pub bridge: String,
    /// The underlay subnet, e.g. `10.213.7.0/24`.
    pub underlay_subnet: String,
    /// Logs, kubeconfigs and testenv data.
    pub work_dir: PathBuf,
    /// Everything created on the host, oldest first; `meshctl demo down` releases it newest first.
    pub resources: Ledger,
    /// The fault proxy in front of the API server that the agents' kubeconfigs point to
    /// ([`crate::apiproxy`]), if the cluster runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_proxy: Option<ApiProxyDescription>,
    /// The API server's audit log (one JSON event per request, at RequestReceived), if enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_log: Option<PathBuf>,
}

/// The fault proxy of a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiProxyDescription {
    /// `https://IP:port` the agents use.
    pub server: String,
    /// Its control file ([`crate::apiproxy::set_mode`]).
    pub control: PathBuf,
    /// Its stats file ([`crate::apiproxy::ProxyStats`]).
    pub stats: PathBuf,
}

/// One node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDescription {
    /// Node name (the Node object).
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its underlay address (also the Node's InternalIP).
    #[serde(rename = "underlayIP")]
    pub underlay_ip: Ipv4Addr,
    /// PID of its mesh-agent, `null` when none runs. For a supervised agent this follows
    /// restarts: [`ClusterDescription::read`] refreshes it from `agentPidFile`.
    pub agent_pid: Option<u32>,
    /// PID of its device process (`mesh-agent device`), `null` when none runs; follows restarts
    /// like `agentPid` (from `devicePidFile`).
    #[serde(default)]
    pub device_pid: Option<u32>,
    /// Its podCIDR.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: String,
    /// Its IPv6 podCIDR (dual stack).
    #[serde(rename = "podCIDR6", default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr6: Option<String>,
    /// Kubeconfig with this node's own credentials (user `system:node:<name>`).
    pub kubeconfig: PathBuf,
    /// The agent's log file, if an agent was started.
    pub agent_log: Option<PathBuf>,
    /// The device process's log file, if one was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_log: Option<PathBuf>,
    /// Where the agent's supervisor records the current run (`PID start-time`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_pid_file: Option<PathBuf>,
    /// Where the device's supervisor records the current run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_pid_file: Option<PathBuf>,
    /// The host end of its underlay veth (on the bridge): the node's "switch port".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_host_link: Option<String>,
}

/// One pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodDescription {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its IPv6 address (dual stack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<std::net::Ipv6Addr>,
    /// The node it runs on.
    pub node: String,
}

impl ClusterDescription {
    /// Reads a description written by [`ClusterDescription::write`].
    pub fn read(path: &Path) -> Result<Self, DescriptionError> {
        let text = std::fs::read_to_string(path).map_err(|source| DescriptionError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut description: Self =
            serde_json::from_str(&text).map_err(|source| DescriptionError::Json {
                path: path.to_owned(),
                source,
            })?;
        description.refresh_pids();
        Ok(description)
    }

    /// Re-reads `agentPid` and `devicePid` from the supervisors' PID files (a supervised process
    /// gets a new PID at every restart); `null` while one is not running.
    pub fn refresh_pids(&mut self) {
        for node in &mut self.nodes {
            if let Some(file) = &node.agent_pid_file {
                node.agent_pid = crate::supervise::current(file).map(|p| p.pid);
            }
            if let Some(file) = &node.device_pid_file {
                node.device_pid = crate::supervise::current(file).map(|p| p.pid);
            }
        }
    }

    /// Writes the description atomically (temporary file + rename), mode 0600.
    pub fn write(&self, path: &Path) -> Result<(), DescriptionError> {
        let json = serde_json::to_string_pretty(self).map_err(|source| DescriptionError::Json {
            path: path.to_owned(),
            source,
        })?;
        crate::fsutil::write_private_atomic(path, format!("{json}\n").as_bytes()).map_err(
            |source| DescriptionError::Io {
                path: path.to_owned(),
                source,
            },
        )
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeDescription> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The supervisor of `node`'s `role` process (`agent`, `device`, `device-b`), from the
    /// ledger, if it still runs.
    pub fn supervisor(&self, node: &str, role: &str) -> Option<crate::ProcessIdentity> {
        let label = crate::cluster::supervised_label(role, node);
        self.resources
            .resources()
            .iter()
            .rev()
            .find_map(|r| match r {
                crate::Resource::Process { label: l, identity }
                    if *l == label && identity.is_running() =>
                {
                    Some(*identity)
                }
                _ => None,
            })
    }

    /// Removes everything the cluster created (agents, namespaces, links, testenv, work dir), newest
    /// first, from another process than the one that created it. Processes are matched by PID and start
    /// time, so a reused PID is never signalled.
    pub fn teardown(&self) -> Result<(), TeardownError> {
        let mut ledger = self.resources.clone();
        ledger.release_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_keys_are_spelled_as_issue_4_says() {
        let desc = ClusterDescription {
            kubeconfig: "/run/wiremesh-demo/admin.kubeconfig".into(),
            testenv_pid: 42,
            nodes: vec![NodeDescription {
                name: "node-1".into(),
                netns: "wm0000100-n1".into(),
                underlay_ip: Ipv4Addr::new(10, 213, 3, 11),
                agent_pid: Some(43),
                device_pid: Some(44),
                pod_cidr: "10.244.1.0/24".into(),
                pod_cidr6: None,
                kubeconfig: "/run/wiremesh-demo/nodes/node-1.kubeconfig".into(),
                agent_log: None,
                device_log: None,
                agent_pid_file: None,
                device_pid_file: None,
                underlay_host_link: None,
            }],
            pods: vec![PodDescription {
                namespace: "default".into(),
                name: "pod-1-1".into(),
                netns: "wm0000100-n1-p1".into(),
                ip: Ipv4Addr::new(10, 244, 1, 11),
                ip6: None,
                node: "node-1".into(),
            }],
            id: "0000100".into(),
            api_server: "https://10.213.3.1:6443".into(),
            bridge: "wmb0000100".into(),
            underlay_subnet: "10.213.3.0/24".into(),
            work_dir: "/run/wiremesh-demo".into(),
            resources: Ledger::default(),
            api_proxy: None,
            audit_log: None,
        };
        let v = serde_json::to_value(&desc).expect("serialize");
        assert_eq!(v["kubeconfig"], "/run/wiremesh-demo/admin.kubeconfig");
        assert_eq!(v["testenvPid"], 42);
        assert_eq!(v["nodes"][0]["name"], "node-1");
        assert_eq!(v["nodes"][0]["netns"], "wm0000100-n1");
        assert_eq!(v["nodes"][0]["underlayIP"], "10.213.3.11");
        assert_eq!(v["nodes"][0]["agentPid"], 43);
        assert_eq!(v["nodes"][0]["devicePid"], 44);
        for key in ["namespace", "name", "netns", "ip", "node"] {
            assert!(
                v["pods"][0].get(key).is_some(),
                "pods[].{key} missing in {v}"
            );
        }
        assert_eq!(v["pods"][0]["ip"], "10.244.1.11");
        let back: ClusterDescription = serde_json::from_value(v).expect("deserialize");
        assert_eq!(back, desc);
    }
}
