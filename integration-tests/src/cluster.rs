//! The virtual cluster: testenv, the underlay bridge, nodes and pods as network namespaces with their
//! Node and Pod objects, and processes (agents) running inside node namespaces.
//!
//! Everything created is recorded in a [`Ledger`] and removed by [`VirtualCluster::teardown`] or on
//! drop; [`VirtualCluster::detach`] instead leaves it running and returns a [`ClusterDescription`] that
//! another process can tear down.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use crate::{
    agentidentity::{self, AgentIdentity, IdentityError},
    command::{self, CommandError},
    description::{ClusterDescription, NodeDescription, PodDescription},
    ledger::{Ledger, Resource, TeardownError},
    names::ClusterId,
    netns::{self, NetnsError, NodeNetwork, PodNetwork},
    objects::{self, ObjectsError},
    process::{ManagedProcess, ProcessError, ProcessIdentity, ProcessSpec},
    testenv::{Testenv, TestenvError, TestenvOptions},
    underlay::{self, UnderlayError, UnderlayLease},
};

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The work directory could not be created.
    #[error("work directory {path}: {source}")]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Underlay setup failed.
    #[error(transparent)]
    Underlay(#[from] UnderlayError),
    /// A node or pod namespace could not be built.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// testenv failed.
    #[error(transparent)]
    Testenv(#[from] TestenvError),
    /// The API server's node-proxy client certificate could not be made.
    #[error(transparent)]
    ProxyPki(#[from] crate::proxypki::ProxyPkiError),
    /// A Kubernetes call failed.
    #[error(transparent)]
    Objects(#[from] ObjectsError),
    /// A process could not be started or stopped.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// A command in a namespace failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// No node or pod of that name.
    #[error("no {kind} named {name:?} in this cluster")]
    Unknown {
        /// `node`, `pod` or `process`.
        kind: &'static str,
        /// The name asked for.
        name: String,
    },
    /// A node or pod of that name exists already.
    #[error("{kind} {name:?} exists already")]
    Exists {
        /// `node` or `pod`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// Removing host resources failed.
    #[error(transparent)]
    Teardown(#[from] TeardownError),
    /// The agents' ServiceAccount, RBAC or bound tokens could not be set up.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// What to build.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Nodes created at start: `node-1` .. `node-<nodes>`.
    pub nodes: u32,
    /// Pods created on every node at start: `pod-<node>-1` ..
    pub pods_per_node: u32,
    /// Extra node names (`node-<nodes+1>` ..) that get credentials now, for [`VirtualCluster::add_node`]
    /// later (testenv's token file is fixed at start).
    pub spare_nodes: u32,
    /// Kubernetes namespace of the pods.
    pub pod_namespace: String,
    /// MTU of pod veths; `None` keeps 1500. Default [`POD_MTU`]: the tunnel MTU of a 1500-byte
    /// underlay, as a CNI configured for a WireGuard mesh sets it — the eBPF datapath redirects
    /// pod packets straight into the tunnel, past the routing stack that would otherwise answer
    /// an oversized packet with "fragmentation needed".
    pub pod_mtu: Option<u32>,
    /// Where logs, kubeconfigs and testenv data go; default `<tmp>/wiremesh-<id>`. Removed at teardown
    /// if the cluster created it, unless `keep_work_dir`.
    pub work_dir: Option<PathBuf>,
    /// Leave the work directory (logs) behind at teardown.
    pub keep_work_dir: bool,
    /// testenv keeps running when this process exits (for [`VirtualCluster::detach`]).
    pub outlive_parent: bool,
    /// The testenv executable.
    pub testenv_binary: PathBuf,
    /// Grant node users read access to all Nodes, Pods and wiremesh.io objects
    /// (see [`objects::install_node_read_rbac`]).
    pub node_read_rbac: bool,
    /// Deadline for testenv's READY line.
    pub testenv_ready_timeout: Duration,
    /// The supervisor executable that restarts a node's device and agent processes
    /// ([`VirtualCluster::spawn_supervised`]); default [`crate::supervise::default_binary`].
    pub supervisor_binary: PathBuf,
    /// Route every node's podCIDR between nodes over the underlay in plaintext (like a cloud route
    /// table; see [`netns`]), so cross-node pod traffic flows without a mesh and the mesh's own
    /// routes (lower metric) take precedence.
    pub plaintext_pod_routes: bool,
    /// Dual stack: every node also gets an IPv6 podCIDR (fd00:10:244:<index>::/64, in its
    /// `spec.podCIDRs`) and an IPv6 InternalIP, every pod an IPv6 address from it (in its
    /// `status.podIPs`); see [`netns`]. The tunnel endpoints stay IPv4.
    pub dual_stack: bool,
    /// Put the fault proxy ([`crate::apiproxy`]) between the agents and the API server: the
    /// nodes' kubeconfigs point to it, so `meshctl demo fault apiserver-stop|apiserver-slow` can
    /// cut or slow the agents' API traffic.
    pub api_proxy: bool,
    /// Let the API server write an audit log (one event per request, with the agent's node) to
    /// `<work dir>/logs/audit.log`, to count the agents' requests.
    pub audit_log: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 2,
            pods_per_node: 1,
            spare_nodes: 0,
            pod_namespace: "default".to_owned(),
            pod_mtu: Some(POD_MTU),
            work_dir: None,
            keep_work_dir: std::env::var_os("WIREMESH_KEEP_WORK_DIR").is_some(),
            outlive_parent: false,
            testenv_binary: crate::testenv::default_binary(),
            supervisor_binary: crate::supervise::default_binary(),
            node_read_rbac: true,
            testenv_ready_timeout: Duration::from_secs(180),
            plaintext_pod_routes: true,
            dual_stack: false,
            api_proxy: false,
            audit_log: false,
        }
    }
}

/// The ledger label of a supervised process: `<role> <node> (supervised)`.
pub(crate) fn supervised_label(role: &str, node: &str) -> String {
    format!("{role} {node} (supervised)")
}

/// The audit policy of [`ClusterOptions::audit_log`]: every request once, when it arrives, with
/// its user (and so the agent's node) but no bodies.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [ResponseStarted, ResponseComplete, Panic]
rules:
- level: Metadata
";

/// Default MTU of pod veths: 1500 (underlay) - 80 (WireGuard overhead).
pub const POD_MTU: u32 = 1420;

/// The name of node `index` (1-based).
pub fn node_name(index: u32) -> String {
    format!("node-{index}")
}

/// One node of the cluster.
#[derive(Clone, Debug)]
pub struct ClusterNode {
    /// Node name.
    pub name: String,
    /// Its namespace, addresses and podCIDR.
    pub network: NodeNetwork,
    /// Kubeconfig of the node's agent: a token of the agent ServiceAccount of `deploy/wiremesh.yaml`
    /// bound to the node's agent Pod (see [`agentidentity`]), as the DaemonSet's pod has.
    pub kubeconfig: PathBuf,
    /// The agent running in it, if any (for a supervised agent: the first run; the current one
    /// is [`VirtualCluster::supervised_pid`]).
    pub agent: Option<ProcessIdentity>,
    /// The agent's log file, once an agent was started.
    pub agent_log: Option<PathBuf>,
    /// The device process's log file, once one was started.
    pub device_log: Option<PathBuf>,
}

/// The processes of a node that the cluster supervises, as the containers of the wiremesh pod
/// on a real node: each is restarted within a second whenever it exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// `mesh-agent device <if> --foreground`: the userspace WireGuard device.
    Device,
    /// The second slot's userspace device (`mesh-agent device <if-b>`), which a key rotation
    /// brings up as the next world (docs/rotation.md).
    DeviceB,
    /// `mesh-agent run`: the agent.
    Agent,
}

impl Role {
    /// `device` or `agent`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::DeviceB => "device-b",
            Self::Agent => "agent",
        }
    }
}

/// A supervised process: its supervisor and where the supervisor records the current run.
#[derive(Clone, Debug)]
struct Supervised {
    node: String,
    role: Role,
    supervisor: ProcessIdentity,
    pid_file: PathBuf,
}

/// One pod of the cluster.
#[derive(Clone, Debug)]
pub struct ClusterPod {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Node name.
    pub node: String,
    /// Its namespace and address.
    pub network: PodNetwork,
}

/// A running virtual cluster; torn down when dropped.
pub struct VirtualCluster {
    id: ClusterId,
    lease: UnderlayLease,
    bridge: String,
    work_dir: PathBuf,
    bpffs: PathBuf,
    pod_namespace: String,
    pod_mtu: Option<u32>,
    plaintext_pod_routes: bool,
    dual_stack: bool,
    testenv: Option<Testenv>,
    client: kube::Client,
    agent_identity: AgentIdentity,
    nodes: Vec<ClusterNode>,
    pods: Vec<ClusterPod>,
    next_pod_index: std::collections::BTreeMap<String, u32>,
    processes: Vec<NodeProcess>,
    supervisor_binary: PathBuf,
    supervised: Vec<Supervised>,
    api_proxy: Option<crate::ApiProxyDescription>,
    audit_log: Option<PathBuf>,
    ledger: Ledger,
    done: bool,
}

/// A process started by the cluster, with the node it runs in.
#[derive(Debug)]
struct NodeProcess {
    node: String,
    process: ManagedProcess,
}

impl VirtualCluster {
    /// Builds the cluster: work dir, underlay bridge, testenv listening on the bridge IP, node
    /// namespaces with Node objects, pods with Pod objects. Whatever was created is removed again if
    /// a step fails.
    pub async fn start(opts: ClusterOptions) -> Result<Self, ClusterError> {
        let lease = UnderlayLease::claim()?;
        let mut ledger = Ledger::default();
        // Once the cluster value exists its Drop cleans up; before that, the ledger is released here.
        let result = Self::build(&opts, ClusterId::next(), lease, &mut ledger).await;
        if result.is_err()
            && let Err(cleanup) = ledger.release_all()
        {
            tracing::error!(%cleanup, "cleanup after a failed start left resources behind");
        }
        result
    }

    async fn build(
        opts: &ClusterOptions,
        id: ClusterId,
        lease: UnderlayLease,
        ledger: &mut Ledger,
    ) -> Result<Self, ClusterError> {
        let work_dir = opts
            .work_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("wiremesh-{id}")));
        let existed = work_dir.exists();
        std::fs::create_dir_all(&work_dir).map_err(|source| ClusterError::WorkDir {
            path: work_dir.clone(),
            source,
        })?;
        if !existed && !opts.keep_work_dir {
            ledger.push(Resource::Dir {
                path: work_dir.clone(),
            });
        }

        // A private bpffs for the agents' pinned maps and links (the host may have none, and
        // clusters must not share pins): `<work dir>/bpffs-<id>`, unmounted at teardown.
        let bpffs = work_dir.join(format!("bpffs-{id}"));
        std::fs::create_dir_all(&bpffs).map_err(|source| ClusterError::WorkDir {
            path: bpffs.clone(),
            source,
        })?;
        command::run(
            std::process::Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&bpffs),
        )?;
        ledger.push(Resource::Mount {
            path: bpffs.clone(),
        });

        let bridge = underlay::create_bridge(&id, &lease, ledger)?;

        let all_nodes: Vec<String> = (1..=opts.nodes + opts.spare_nodes).map(node_name).collect();
        // A fresh data dir per cluster: a work dir left over from an earlier run must not hand its etcd
        // data to this apiserver.
        let testenv_dir = work_dir.join(format!("testenv-{id}"));
        if !opts.keep_work_dir {
            ledger.push(Resource::Dir {
                path: testenv_dir.clone(),
            });
        }
        let mut testenv_opts = TestenvOptions::new(lease.bridge_ip(), testenv_dir, all_nodes);
        testenv_opts.binary = opts.testenv_binary.clone();
        testenv_opts.log_path = work_dir.join("logs/testenv.log");
        testenv_opts.outlive_parent = opts.outlive_parent;
        testenv_opts.ready_timeout = opts.testenv_ready_timeout;
        testenv_opts.apiserver_args = crate::proxypki::generate(&work_dir)?;
        let audit_log = if opts.audit_log {
            let policy = work_dir.join("audit-policy.yaml");
            let log = work_dir.join("logs/audit.log");
            crate::fsutil::write_private_atomic(&policy, AUDIT_POLICY.as_bytes()).map_err(
                |source| ClusterError::WorkDir {
                    path: policy.clone(),
                    source,
                },
            )?;
            testenv_opts.apiserver_args.extend([
                format!("--audit-policy-file={}", policy.display()),
                format!("--audit-log-path={}", log.display()),
                "--audit-log-format=json".to_owned(),
                "--audit-log-mode=blocking".to_owned(),
            ]);
            Some(log)
        } else {
            None
        };
        let testenv = Testenv::start(&testenv_opts)?;
        ledger.push(Resource::Process {
            label: "testenv".to_owned(),
            identity: testenv.identity(),
        });
        let client = testenv.admin_client().await?;
        let mut processes = Vec::new();
        let api_proxy = if opts.api_proxy {
            let (process, description) =
                start_api_proxy(&work_dir, lease.bridge_ip(), &testenv.credentials().server)?;
            ledger.push(Resource::Process {
                label: process.label().to_owned(),
                identity: process.identity(),
            });
            processes.push(NodeProcess {
                node: String::new(),
                process,
            });
            Some(description)
        } else {
            None
        };

        objects::ensure_namespace(&client, &opts.pod_namespace).await?;
        if opts.node_read_rbac {
            objects::install_node_read_rbac(&client).await?;
        }
        let agent_identity =
            agentidentity::install(&client, &agentidentity::default_manifest()).await?;

        let mut cluster = Self {
            id,
            lease,
            bridge,
            work_dir,
            bpffs,
            pod_namespace: opts.pod_namespace.clone(),
            pod_mtu: opts.pod_mtu,
            plaintext_pod_routes: opts.plaintext_pod_routes,
            dual_stack: opts.dual_stack,
            testenv: Some(testenv),
            client,
            agent_identity,
            nodes: Vec::new(),
            pods: Vec::new(),
            next_pod_index: Default::default(),
            processes,
            supervisor_binary: opts.supervisor_binary.clone(),
            supervised: Vec::new(),
            api_proxy,
            audit_log,
            ledger: std::mem::take(ledger),
            done: false,
        };
        for index in 1..=opts.nodes {
            cluster.add_node_with_index(index).await?;
            for _ in 0..opts.pods_per_node {
                cluster.add_pod(&node_name(index), None).await?;
            }
        }
        Ok(cluster)
    }

    /// The cluster id (part of every namespace and link name).
    pub fn id(&self) -> &ClusterId {
        &self.id
    }

    /// An admin client.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// testenv (None only after [`VirtualCluster::detach`] or teardown).
    pub fn testenv(&self) -> Option<&Testenv> {
        self.testenv.as_ref()
    }

    /// The admin kubeconfig.
    pub fn kubeconfig_path(&self) -> Option<&Path> {
        self.testenv.as_ref().map(Testenv::kubeconfig_path)
    }

    /// The ServiceAccount the agents run as.
    pub fn agent_identity(&self) -> &AgentIdentity {
        &self.agent_identity
    }

    /// The underlay bridge in the host namespace.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The underlay lease (subnet, bridge IP, node IP plan).
    pub fn underlay(&self) -> &UnderlayLease {
        &self.lease
    }

    /// Logs, kubeconfigs, testenv data.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The bpf filesystem the agents pin their maps and links in (`mesh-agent run --bpffs`).
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// The CA of the client certificate the API server presents through `nodes/proxy` (the
    /// agents' `--client-ca-file`).
    pub fn proxy_client_ca(&self) -> PathBuf {
        crate::proxypki::ca_file(&self.work_dir)
    }

    /// Everything created on the host so far, oldest first.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// All nodes, in creation order.
    pub fn nodes(&self) -> &[ClusterNode] {
        &self.nodes
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&ClusterNode, ClusterError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| ClusterError::Unknown {
                kind: "node",
                name: name.to_owned(),
            })
    }

    /// Records that node `name` moved to underlay address `ip` (after
    /// [`crate::faults::underlay_readdress`]), so its description and the host's view follow.
    pub fn set_underlay_ip(
        &mut self,
        name: &str,
        ip: std::net::Ipv4Addr,
    ) -> Result<(), ClusterError> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .ok_or_else(|| ClusterError::Unknown {
                kind: "node",
                name: name.to_owned(),
            })?;
        node.network.underlay_ip = ip;
        Ok(())
    }

    /// All pods, in creation order.
    pub fn pods(&self) -> &[ClusterPod] {
        &self.pods
    }

    /// The pod called `name` (in the cluster's pod namespace).
    pub fn pod(&self, name: &str) -> Result<&ClusterPod, ClusterError> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| ClusterError::Unknown {
                kind: "pod",
                name: name.to_owned(),
            })
    }

    /// The pods on node `node`.
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a ClusterPod> + 'a {
        self.pods.iter().filter(move |p| p.node == node)
    }

    /// Adds the next node (`node-<n>`); it must have been provisioned (`nodes + spare_nodes`).
    pub async fn add_node(&mut self) -> Result<&ClusterNode, ClusterError> {
        let index = self
            .nodes
            .iter()
            .map(|n| n.network.index)
            .max()
            .unwrap_or(0)
            + 1;
        self.add_node_with_index(index).await
    }

    async fn add_node_with_index(&mut self, index: u32) -> Result<&ClusterNode, ClusterError> {
        let name = node_name(index);
        if self.nodes.iter().any(|n| n.name == name) {
            return Err(ClusterError::Exists { kind: "node", name });
        }
        let testenv = self.testenv.as_ref().ok_or_else(|| ClusterError::Unknown {
            kind: "testenv",
            name: String::new(),
        })?;
        let kubeconfig = self
            .work_dir
            .join("nodes")
            .join(format!("{name}.kubeconfig"));
        let mut credentials = testenv.credentials().clone();
        if let Some(proxy) = &self.api_proxy {
            // The agents reach the API server through the fault proxy.
            credentials.server.clone_from(&proxy.server);
        }
        let network = netns::create_node(
            &self.id,
            &self.lease,
            &self.bridge,
            index,
            self.dual_stack,
            &mut self.ledger,
        )?;
        if self.plaintext_pod_routes {
            for other in &self.nodes {
                netns::add_plaintext_route(&network, &other.network)?;
                netns::add_plaintext_route(&other.network, &network)?;
            }
        }
        let pod_cidrs: Vec<ipnet::IpNet> = std::iter::once(network.pod_cidr.into())
            .chain(network.pod_cidr6.map(Into::into))
            .collect();
        let addresses: Vec<std::net::IpAddr> = std::iter::once(network.underlay_ip.into())
            .chain(network.underlay_ip6.map(Into::into))
            .collect();
        objects::create_node_with(&self.client, &name, &pod_cidrs, &addresses).await?;
        // After the Node: the token carries the node's name and UID.
        agentidentity::write_agent_kubeconfig(
            &self.client,
            &self.agent_identity,
            &credentials,
            &name,
            &kubeconfig,
        )
        .await?;
        tracing::info!(node = %name, netns = %network.netns, "node added");
        self.nodes.push(ClusterNode {
            name,
            network,
            kubeconfig,
            agent: None,
            agent_log: None,
            device_log: None,
        });
        Ok(self
            .nodes
            .last()
            .unwrap_or_else(|| unreachable!("just pushed")))
    }

    /// Adds a pod on `node`, named `name` or `pod-<node index>-<n>`.
    pub async fn add_pod(
        &mut self,
        node: &str,
        name: Option<&str>,
    ) -> Result<&ClusterPod, ClusterError> {
        let node = self.node(node)?.clone();
        let counter = self.next_pod_index.entry(node.name.clone()).or_insert(0);
        *counter += 1;
        let pod_index = *counter;
        let name = name.map_or_else(
            || format!("pod-{}-{pod_index}", node.network.index),
            str::to_owned,
        );
        if self.pods.iter().any(|p| p.name == name) {
            return Err(ClusterError::Exists { kind: "pod", name });
        }
        let network = netns::create_pod(
            &self.id,
            &node.network,
            pod_index,
            self.pod_mtu,
            &mut self.ledger,
        )?;
        let pod_ips: Vec<std::net::IpAddr> = std::iter::once(network.ip.into())
            .chain(network.ip6.map(Into::into))
            .collect();
        objects::create_pod_with(
            &self.client,
            &self.pod_namespace,
            &name,
            &node.name,
            &pod_ips,
            node.network.underlay_ip,
        )
        .await?;
        self.pods.push(ClusterPod {
            namespace: self.pod_namespace.clone(),
            name,
            node: node.name,
            network,
        });
        Ok(self
            .pods
            .last()
            .unwrap_or_else(|| unreachable!("just pushed")))
    }

    /// Removes a node completely: stops its processes, deletes its Pod and Node objects, its pod
    /// namespaces, its namespace and its underlay link.
    pub async fn remove_node(&mut self, name: &str) -> Result<(), ClusterError> {
        let node = self.node(name)?.clone();
        let pods: Vec<ClusterPod> = self
            .pods
            .iter()
            .filter(|p| p.node == name)
            .cloned()
            .collect();
        for pod in &pods {
            objects::delete_pod(&self.client, &pod.namespace, &pod.name).await?;
        }
        objects::delete_node(&self.client, name).await?;
        agentidentity::delete_agent_pod(&self.client, &self.agent_identity, name).await?;

        let (in_node, keep): (Vec<NodeProcess>, Vec<NodeProcess>) =
            self.processes.drain(..).partition(|p| p.node == name);
        self.processes = keep;
        self.supervised.retain(|s| s.node != name);
        for mut p in in_node {
            p.process.stop(crate::ledger::PROCESS_GRACE)?;
            let identity = p.process.identity();
            self.ledger
                .forget(|r| matches!(r, Resource::Process { identity: i, .. } if *i == identity));
        }

        let mut names: Vec<String> = pods.iter().map(|p| p.network.netns.clone()).collect();
        names.push(node.network.netns.clone());
        let host_link = node.network.host_link.clone();
        self.ledger.release_matching(|r| match r {
            Resource::Netns { name } => names.contains(name),
            Resource::HostLink { name } => *name == host_link,
            _ => false,
        })?;
        self.pods.retain(|p| p.node != name);
        self.nodes.retain(|n| n.name != name);
        if self.plaintext_pod_routes {
            for other in &self.nodes {
                netns::remove_plaintext_route(&other.network, &node.network)?;
            }
        }
        tracing::info!(node = name, "node removed");
        Ok(())
    }

    /// Starts a long-running process inside node `node`'s namespace (entered with setns, host mounts
    /// kept), output appended to `spec.log_path`. It is stopped at teardown.
    pub fn spawn_in_node(
        &mut self,
        node: &str,
        spec: ProcessSpec,
    ) -> Result<ProcessIdentity, ClusterError> {
        let netns = self.node(node)?.network.netns.clone();
        self.forget_exited();
        let process = ManagedProcess::spawn(&spec.in_netns(netns))?;
        let identity = process.identity();
        self.ledger.push(Resource::Process {
            label: process.label().to_owned(),
            identity,
        });
        self.processes.push(NodeProcess {
            node: node.to_owned(),
            process,
        });
        Ok(identity)
    }

    /// Starts the agent of `node`: `program args...` in the node's namespace with `KUBECONFIG` set to
    /// the node's own kubeconfig and `NODE_NAME` to its name (plus `env`), logging to
    /// `<work dir>/logs/agent-<node>.log` (appended across restarts). Recorded as the node's agent.
    pub fn spawn_agent<I, S>(
        &mut self,
        node: &str,
        program: &Path,
        args: I,
        env: Vec<(OsString, OsString)>,
    ) -> Result<ProcessIdentity, ClusterError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let n = self.node(node)?;
        let log = self.work_dir.join("logs").join(format!("agent-{node}.log"));
        let mut spec = ProcessSpec::new(format!("agent {node}"), program, &log)
            .args(args)
            .env("KUBECONFIG", n.kubeconfig.as_os_str())
            .env("NODE_NAME", node);
        spec.env.extend(env);
        let identity = self.spawn_in_node(node, spec)?;
        if let Some(n) = self.nodes.iter_mut().find(|n| n.name == node) {
            n.agent = Some(identity);
            n.agent_log = Some(log);
        }
        Ok(identity)
    }

    /// Drops the handles and ledger records of processes that have exited (e.g. a killed agent before
    /// its restart), so a reused PID never finds a stale handle.
    fn forget_exited(&mut self) {
        let mut kept = Vec::with_capacity(self.processes.len());
        for mut p in std::mem::take(&mut self.processes) {
            if !matches!(p.process.try_wait(), Ok(Some(_))) {
                kept.push(p);
                continue;
            }
            let identity = p.process.identity();
            self.ledger
                .forget(|r| matches!(r, Resource::Process { identity: i, .. } if *i == identity));
        }
        self.processes = kept;
    }

    /// The process with this PID, for signalling (e.g. `SIGKILL` to simulate a crash).
    pub fn process(&mut self, pid: u32) -> Result<&mut ManagedProcess, ClusterError> {
        self.processes
            .iter_mut()
            .map(|p| &mut p.process)
            .find(|p| p.pid() == pid)
            .ok_or_else(|| ClusterError::Unknown {
                kind: "process",
                name: pid.to_string(),
            })
    }

    /// Stops a process started by this cluster (SIGTERM, then SIGKILL after `grace`), reaps it and
    /// forgets it; a node whose agent it was has no agent afterwards.
    pub fn stop_process(
        &mut self,
        pid: u32,
        grace: Duration,
    ) -> Result<std::process::ExitStatus, ClusterError> {
        let pos = self
            .processes
            .iter()
            .position(|p| p.process.pid() == pid)
            .ok_or_else(|| ClusterError::Unknown {
                kind: "process",
                name: pid.to_string(),
            })?;
        let mut process = self.processes.remove(pos).process;
        let status = process.stop(grace)?;
        let identity = process.identity();
        self.ledger
            .forget(|r| matches!(r, Resource::Process { identity: i, .. } if *i == identity));
        for n in &mut self.nodes {
            if n.agent == Some(identity) {
                n.agent = None;
            }
        }
        Ok(status)
    }

    /// Starts `program args...` in node `node`'s namespace under a supervisor that restarts it
    /// within a second whenever it exits (crash, `kill -9`), as a kubelet restarts a container.
    /// Output of every run is appended to `<work dir>/logs/<role>-<node>.log`; for [`Role::Agent`]
    /// `KUBECONFIG` is the node's own kubeconfig and `NODE_NAME` its name. Returns the first run
    /// once it started; [`VirtualCluster::supervised_pid`] follows restarts.
    pub fn spawn_supervised<I, S>(
        &mut self,
        node: &str,
        role: Role,
        program: &Path,
        args: I,
        env: Vec<(OsString, OsString)>,
    ) -> Result<ProcessIdentity, ClusterError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let n = self.node(node)?.clone();
        if self.supervised_pid(node, role).is_some() {
            return Err(ClusterError::Exists {
                kind: role.as_str(),
                name: node.to_owned(),
            });
        }
        let log = self
            .work_dir
            .join("logs")
            .join(format!("{}-{node}.log", role.as_str()));
        let pid_file = self
            .work_dir
            .join("run")
            .join(format!("{}-{node}.pid", role.as_str()));
        let _ = std::fs::remove_file(&pid_file);
        let mut spec = ProcessSpec::new(
            supervised_label(role.as_str(), node),
            &self.supervisor_binary,
            &log,
        )
        .args([
            OsString::from("--pid-file"),
            pid_file.clone().into_os_string(),
            "--grace-ms".into(),
            (crate::ledger::PROCESS_GRACE.as_millis() * 4 / 5)
                .to_string()
                .into(),
            "--".into(),
            program.as_os_str().to_owned(),
        ])
        .args(args);
        if role == Role::Agent {
            spec = spec
                .env("KUBECONFIG", n.kubeconfig.as_os_str())
                .env("NODE_NAME", node);
        }
        spec.env.extend(env);
        let supervisor = self.spawn_in_node(node, spec)?;
        self.supervised
            .retain(|s| !(s.node == node && s.role == role));
        self.supervised.push(Supervised {
            node: node.to_owned(),
            role,
            supervisor,
            pid_file: pid_file.clone(),
        });
        if let Some(n) = self.nodes.iter_mut().find(|n| n.name == node) {
            match role {
                Role::Agent => n.agent_log = Some(log.clone()),
                Role::Device => n.device_log = Some(log.clone()),
                Role::DeviceB => {}
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(first) = crate::supervise::current(&pid_file) {
                if role == Role::Agent
                    && let Some(n) = self.nodes.iter_mut().find(|n| n.name == node)
                {
                    n.agent = Some(first);
                }
                return Ok(first);
            }
            if !supervisor.is_running() || std::time::Instant::now() >= deadline {
                return Err(ClusterError::Process(ProcessError::Spawn {
                    program: program.display().to_string(),
                    source: std::io::Error::other(format!(
                        "the supervisor did not start it (see {})",
                        log.display()
                    )),
                }));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The current run of `node`'s supervised `role` process (it changes with every restart);
    /// `None` when none is running (between a crash and its restart, or never started).
    pub fn supervised_pid(&self, node: &str, role: Role) -> Option<ProcessIdentity> {
        self.supervised
            .iter()
            .find(|s| s.node == node && s.role == role && s.supervisor.is_running())
            .and_then(|s| crate::supervise::current(&s.pid_file))
    }

    /// `kill -9` of the current run of `node`'s supervised `role` process, as a crash would end
    /// it; its supervisor restarts it (unless held, see [`VirtualCluster::hold_restarts`]).
    /// Returns the killed run.
    pub fn kill_supervised(&self, node: &str, role: Role) -> Result<ProcessIdentity, ClusterError> {
        let current = self
            .supervised_pid(node, role)
            .ok_or_else(|| ClusterError::Unknown {
                kind: role.as_str(),
                name: node.to_owned(),
            })?;
        current.signal(libc::SIGKILL)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while current.is_running() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(current)
    }

    /// Holds (`true`: SIGSTOP to the supervisor) or releases (`false`: SIGCONT) the restarts of
    /// `node`'s `role` process, so a test can look at a node whose agent is down; a held
    /// supervisor restarts a process that died meanwhile as soon as it is released.
    pub fn hold_restarts(&self, node: &str, role: Role, hold: bool) -> Result<(), ClusterError> {
        let supervisor = self
            .supervised
            .iter()
            .find(|s| s.node == node && s.role == role)
            .map(|s| s.supervisor)
            .ok_or_else(|| ClusterError::Unknown {
                kind: role.as_str(),
                name: node.to_owned(),
            })?;
        supervisor.signal(if hold { libc::SIGSTOP } else { libc::SIGCONT })?;
        Ok(())
    }

    /// Waits until `node`'s `role` process runs again after `killed`, at most `timeout`.
    pub fn wait_restarted(
        &self,
        node: &str,
        role: Role,
        killed: ProcessIdentity,
        timeout: Duration,
    ) -> Result<ProcessIdentity, ClusterError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(now) = self.supervised_pid(node, role).filter(|p| *p != killed) {
                return Ok(now);
            }
            if std::time::Instant::now() >= deadline {
                return Err(ClusterError::Unknown {
                    kind: "restarted process",
                    name: format!("{} of {node} within {timeout:?}", role.as_str()),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops `node`'s supervised `role` process for good: its supervisor passes SIGTERM on, waits
    /// up to `grace` (then SIGKILL) and exits with the process's status, which is returned.
    pub fn stop_supervised(
        &mut self,
        node: &str,
        role: Role,
        grace: Duration,
    ) -> Result<std::process::ExitStatus, ClusterError> {
        let pos = self
            .supervised
            .iter()
            .position(|s| s.node == node && s.role == role)
            .ok_or_else(|| ClusterError::Unknown {
                kind: role.as_str(),
                name: node.to_owned(),
            })?;
        let supervised = self.supervised.remove(pos);
        self.stop_process(supervised.supervisor.pid, grace + Duration::from_secs(2))
    }

    /// Runs `argv` in node `node`'s namespace (`ip netns exec`), returning its output whatever the
    /// exit status.
    pub fn exec_in_node<I, S>(&self, node: &str, argv: I) -> Result<Output, ClusterError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Ok(command::exec_in(&self.node(node)?.network.netns, argv)?)
    }

    /// Runs `argv` in pod `pod`'s namespace, returning its output whatever the exit status.
    pub fn exec_in_pod<I, S>(&self, pod: &str, argv: I) -> Result<Output, ClusterError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Ok(command::exec_in(&self.pod(pod)?.network.netns, argv)?)
    }

    /// The description of the cluster as it is now (the `cluster.json` of `meshctl demo`).
    pub fn description(&self) -> ClusterDescription {
        let (kubeconfig, testenv_pid, api_server) = self.testenv.as_ref().map_or_else(
            || (PathBuf::new(), 0, String::new()),
            |t| {
                (
                    t.kubeconfig_path().to_owned(),
                    t.pid(),
                    t.credentials().server.clone(),
                )
            },
        );
        ClusterDescription {
            kubeconfig,
            testenv_pid,
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeDescription {
                    name: n.name.clone(),
                    netns: n.network.netns.clone(),
                    underlay_ip: n.network.underlay_ip,
                    agent_pid: self
                        .supervised_pid(&n.name, Role::Agent)
                        .or(n.agent.filter(ProcessIdentity::is_running))
                        .map(|a| a.pid),
                    device_pid: self.supervised_pid(&n.name, Role::Device).map(|d| d.pid),
                    pod_cidr: n.network.pod_cidr.to_string(),
                    pod_cidr6: n.network.pod_cidr6.map(|c| c.to_string()),
                    kubeconfig: n.kubeconfig.clone(),
                    agent_log: n.agent_log.clone(),
                    device_log: n.device_log.clone(),
                    agent_pid_file: self.pid_file(&n.name, Role::Agent),
                    device_pid_file: self.pid_file(&n.name, Role::Device),
                    underlay_host_link: Some(n.network.host_link.clone()),
                })
                .collect(),
            pods: self
                .pods
                .iter()
                .map(|p| PodDescription {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    netns: p.network.netns.clone(),
                    ip: p.network.ip,
                    ip6: p.network.ip6,
                    node: p.node.clone(),
                })
                .collect(),
            id: self.id.to_string(),
            api_server,
            bridge: self.bridge.clone(),
            underlay_subnet: self.lease.subnet().to_string(),
            work_dir: self.work_dir.clone(),
            resources: self.ledger.clone(),
            api_proxy: self.api_proxy.clone(),
            audit_log: self.audit_log.clone(),
        }
    }

    fn pid_file(&self, node: &str, role: Role) -> Option<PathBuf> {
        self.supervised
            .iter()
            .find(|s| s.node == node && s.role == role)
            .map(|s| s.pid_file.clone())
    }

    /// Leaves everything running and returns its description, from which
    /// [`ClusterDescription::teardown`] removes it later (also from another process). The cluster must
    /// have been started with [`ClusterOptions::outlive_parent`] for testenv to survive this process.
    pub fn detach(mut self) -> ClusterDescription {
        let description = self.description();
        for p in self.processes.drain(..) {
            p.process.detach();
        }
        if let Some(t) = self.testenv.take() {
            t.detach();
        }
        self.done = true;
        description
    }

    /// Removes everything this cluster created, newest first (agents, pod and node namespaces, links,
    /// testenv, the bridge, the work dir). Keeps going past failures and reports them all.
    pub fn teardown(mut self) -> Result<(), TeardownError> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Result<(), TeardownError> {
        self.done = true;
        // A supervisor held by a test would not act on SIGTERM until continued.
        for supervised in &self.supervised {
            let _ = supervised.supervisor.signal(libc::SIGCONT);
        }
        // Our own children are stopped by the ledger (by PID and start time); dropping the handles
        // afterwards only reaps them.
        let result = self.ledger.release_all();
        self.processes.clear();
        self.testenv = None;
        result
    }
}

/// Starts the fault proxy on `bridge_ip` (a free port) in front of `server` and waits until it
/// listens; its kubeconfig server is `https://<bridge ip>:<port>` (the apiserver's certificate
/// names the bridge IP).
fn start_api_proxy(
    work_dir: &Path,
    bridge_ip: std::net::Ipv4Addr,
    server: &str,
) -> Result<(ManagedProcess, crate::ApiProxyDescription), ClusterError> {
    let upstream = server.trim_start_matches("https://").to_owned();
    let control = work_dir.join("run/apiproxy.mode");
    let stats = work_dir.join("run/apiproxy.stats.json");
    let _ = std::fs::remove_file(&stats);
    crate::apiproxy::set_mode(&control, crate::apiproxy::ProxyMode::Pass).map_err(|e| {
        ClusterError::WorkDir {
            path: control.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    })?;
    let spec = ProcessSpec::new(
        "apiproxy",
        crate::apiproxy::default_binary(),
        work_dir.join("logs/apiproxy.log"),
    )
    .args([
        OsString::from("--listen"),
        format!("{bridge_ip}:0").into(),
        "--upstream".into(),
        upstream.into(),
        "--control".into(),
        control.clone().into_os_string(),
        "--stats".into(),
        stats.clone().into_os_string(),
    ]);
    let mut process = ManagedProcess::spawn(&spec)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let listen = loop {
        if let Ok(s) = crate::apiproxy::ProxyStats::read(&stats) {
            break s.listen;
        }
        if matches!(process.try_wait(), Ok(Some(_))) || std::time::Instant::now() >= deadline {
            return Err(ClusterError::Process(ProcessError::Spawn {
                program: spec.program.display().to_string(),
                source: std::io::Error::other(format!(
                    "the API proxy did not start (see {})",
                    spec.log_path.display()
                )),
            }));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let description = crate::ApiProxyDescription {
        server: format!("https://{listen}"),
        control,
        stats,
    };
    Ok((process, description))
}

impl std::fmt::Debug for VirtualCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtualCluster")
            .field("id", &self.id)
            .field("bridge", &self.bridge)
            .field("subnet", &self.lease.subnet())
            .field("nodes", &self.nodes)
            .field("pods", &self.pods)
            .field("work_dir", &self.work_dir)
            .finish_non_exhaustive()
    }
}

impl Drop for VirtualCluster {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Err(err) = self.teardown_inner() {
            tracing::error!(cluster = %self.id, %err, "virtual cluster teardown left resources behind");
        }
    }
}
