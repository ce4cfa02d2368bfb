//! The eBPF datapath of the agent: the single writer of this node's pinned maps and links.
//!
//! Once `MeshEncryption default` steers traffic, the task loads the programs with their maps
//! pinned in `<bpffs>/wiremesh/<node>` (reusing the pins of an earlier run, so enforcement never
//! stops across a restart; pins of an older build with other map shapes stay in use until this
//! run has filled a new generation of maps and swapped its programs into the pinned links, see
//! [`wiremesh_bpf::Loader::load`]) and then, on every watch event (debounced 100 ms), every mesh
//! change and every 2 s:
//!
//! 1. compiles Namespaces, Pods and NetworkPolicies with the `wiremesh-policy` compiler (the
//!    same code as `meshctl policy check`) and writes `Compiled::diff` against what it wrote
//!    last: additions first, then the ipcache, then removals, so nothing the new state allows
//!    is missing at any moment; after a (re)load it writes the whole compilation and deletes
//!    whatever an older run left ([`wiremesh_bpf::Maps::retain_policy`]);
//! 2. writes the ipcache ([`plan::desired_ipcache`]) as a diff against the pinned map;
//! 3. writes `wm_config`: the tunnel's current ifindex (a new TUN gets a new one), strict or
//!    permissive, the host identity and the WireGuard port;
//! 4. writes the anti-spoofing entry of each local pod's veth (`wm_endpoints`: host-side
//!    ifindex -> the pod's addresses) and only then attaches `from_pod`/`to_pod` to it, so the
//!    first packet `from_pod` sees is already checked; attaches the underlay programs to the
//!    device holding the node's address (and leaves them where they are while that address, as
//!    the Node says, is on no device: [`keep_underlay`]); then deletes the endpoint entries and link pins of
//!    veths that are gone (also those an earlier run left behind). While a local pod that a
//!    NetworkPolicy selects has no veth the pass can name yet, every unnamed veth gets the
//!    programs with a pending entry, which passes nothing ([`fail_closed`]).
//!
//! A link or route appearing (rtnetlink events, [`links::LinkWatch`]) wakes a pass at once,
//! so a new pod's veth is covered when it appears, not at the next periodic pass.
//!
//! A thread reads the flow ring buffer into the [`FlowTable`] served on `/flows`.
//! When steering is switched off the programs stay attached (NetworkPolicy is still enforced
//! and flows recorded) but nothing is redirected: the tunnel ifindex is 0, the mode permissive
//! and no prefix carries `ENCRYPT`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::ObjectReference;
use tokio::sync::{Notify, watch};
use wiremesh_bpf::{
    Config as BpfConfig, EndpointValue, Hook, IpcacheValue, Loader, MapWriter, Mode, Retained,
    node_pin_dir,
};
use wiremesh_crds::EncryptionMode;
use wiremesh_policy::{Compiled, Identity, IdentityAllocator, MapDiff, compile};

use crate::{
    config::{DEFAULT_LISTEN_PORT, EbpfChoice},
    drain::Drain,
    events::NodeEvents,
    flows::{Names, PeerInfo, PodInfo},
    flowsource::{BpfKernel, FlowSource},
    metrics::{InvalidObjectLabels, MapLabels, Metrics, ResultLabels, StageLabels},
    nodestatus::MeshNodeEbpf,
    reconciler::{API_WRITE_TIMEOUT, MeshSnapshot},
    watch::Caches,
};

pub mod links;
pub mod plan;

#[cfg(test)]
mod tests;

use links::{LinkSnapshot, Links};
use plan::{ObjectProblem, node_ipv4};

/// Periodic pass: new pod veths and a re-created tunnel are picked up at least this often.
const PERIOD: Duration = Duration::from_secs(2);

/// Wait after a failed load before trying again.
const LOAD_RETRY: Duration = Duration::from_secs(5);

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("loading the eBPF datapath from {pin_dir}: {source}")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: wiremesh_bpf::Error,
    },
    #[error("eBPF map update: {0}")]
    Maps(#[source] wiremesh_bpf::Error),
    #[error("policy model: {0}")]
    Policy(#[source] wiremesh_policy::ClusterError),
    #[error("reading interfaces: {0}")]
    Links(#[source] links::LinksError),
    #[error("attaching {program} to {iface}: {source}")]
    Attach {
        program: &'static str,
        iface: String,
        #[source]
        source: wiremesh_bpf::Error,
    },
}

/// Where the eBPF programs send pod traffic, as last written to the maps (device names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SteeredTunnels {
    /// Whether cross-node pod traffic is redirected into a tunnel at all.
    pub redirecting: bool,
    /// `tunnel_ifindex`'s device (`None`: 0, nothing redirected).
    pub tunnel: Option<String>,
    /// `alt_tunnel_ifindex`'s device during a rotation.
    pub alt: Option<String>,
    /// The nodes whose ipcache entries carry `ALT_TUNNEL` (sent through `alt`).
    pub alt_nodes: BTreeSet<String>,
}

impl SteeredTunnels {
    /// Whether a redirect goes into `ifname`.
    pub fn names(&self, ifname: &str) -> bool {
        self.tunnel.as_deref() == Some(ifname) || self.alt.as_deref() == Some(ifname)
    }

    /// Whether traffic to `node` goes through `next` (the next world's device) in the datapath:
    /// always when nothing is redirected (the routes, moved by the reconciler, decide).
    pub fn sends_through(&self, node: &str, next: &str) -> bool {
        !self.redirecting
            || (self.alt.as_deref() == Some(next) && self.alt_nodes.contains(node))
            || (self.tunnel.as_deref() == Some(next))
    }
}

/// Settings of the task from the agent's flags.
#[derive(Debug, Clone)]
pub struct SteeringSettings {
    pub node_name: String,
    pub bpffs: PathBuf,
    /// The tunnel interface.
    pub interface: String,
    pub listen_port: Option<u16>,
    pub ebpf: EbpfChoice,
}

/// What the loaded datapath holds, as this process wrote it.
struct Loaded {
    loader: Loader,
    written: Written,
    attached: BTreeMap<(String, u8), (Hook, u32)>,
    pins_collected: bool,
    stop_reader: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// The task. See the module docs.
pub struct Steering {
    settings: SteeringSettings,
    caches: Caches,
    mesh: watch::Receiver<MeshSnapshot>,
    notify: Arc<Notify>,
    metrics: Metrics,
    events: NodeEvents,
    flows: Arc<FlowSource>,
    loaded: Option<Loaded>,
    reported: BTreeSet<ObjectProblem>,
    /// Objects the last compilation left out (reported again each pass; Events only once).
    policy_problems: Vec<ObjectProblem>,
    load_error: Option<String>,
    next_load: Option<Instant>,
    ebpf_status: watch::Sender<MeshNodeEbpf>,
    /// The tunnels the config in the maps redirects into, once this process wrote or checked it.
    steered: watch::Sender<Option<SteeredTunnels>>,
    /// The identities of the last compilation, passed into the next (stable identities).
    identities: IdentityAllocator,
    /// The policies of the last compilation ([`fail_closed`] for pods without entries).
    policies: Vec<wiremesh_policy::Policy>,
}

impl Steering {
    /// Wires the task; `flows` (where flow records go) is shared with the API server.
    pub fn new(
        settings: SteeringSettings,
        client: kube::Client,
        caches: Caches,
        mesh: watch::Receiver<MeshSnapshot>,
        notify: Arc<Notify>,
        metrics: Metrics,
        flows: Arc<FlowSource>,
    ) -> Self {
        Self {
            events: NodeEvents::new(client, &settings.node_name),
            settings,
            caches,
            mesh,
            notify,
            metrics,
            flows,
            loaded: None,
            reported: BTreeSet::new(),
            policy_problems: Vec::new(),
            load_error: None,
            next_load: None,
            ebpf_status: watch::channel(MeshNodeEbpf::default()).0,
            steered: watch::channel(None).0,
            identities: IdentityAllocator::new(),
            policies: Vec::new(),
        }
    }

    /// The datapath's state for the node's status, updated after every pass.
    pub fn ebpf_status(&self) -> watch::Receiver<MeshNodeEbpf> {
        self.ebpf_status.subscribe()
    }

    /// The tunnels the eBPF programs redirect into (`None` until this process has written or
    /// checked the config in the maps). The reconciler takes a device out of service only once
    /// no redirect names it: after a restart the pinned config still names the tunnel of the
    /// process before, and a flush ahead of the rewrite loses the packets redirected there.
    pub fn steered(&self) -> watch::Receiver<Option<SteeredTunnels>> {
        self.steered.subscribe()
    }

    /// Runs passes until the drain starts. The maps and links stay pinned afterwards.
    pub async fn run(mut self, mut drain: Drain) {
        if self.settings.ebpf == EbpfChoice::Off {
            tracing::info!("eBPF datapath off (--ebpf off): no steering, policy or flows");
            drain.signaled().await;
            return;
        }
        // The mesh's first pass (after the Node, Pod and MeshEncryption caches synced) decides
        // which tunnels exist; steering before it would clear every ENCRYPT flag an earlier run
        // left in the pinned ipcache. (Only the reconciler waits on those caches' readiness:
        // kube's store readiness loses wake-ups with several concurrent waiters.)
        tokio::select! {
            () = self.caches.wait_policy_synced() => {}
            () = drain.signaled() => return,
        }
        tokio::select! {
            _ = self.mesh.wait_for(|s| s.reconciled) => {}
            () = drain.signaled() => return,
        }
        let links = match Links::new() {
            Ok(l) => l,
            Err(error) => {
                tracing::error!(%error, "eBPF steering cannot read interfaces; not started");
                self.metrics
                    .ebpf_errors
                    .get_or_create(&StageLabels { stage: "netlink" })
                    .inc();
                drain.signaled().await;
                return;
            }
        };
        // A new veth (or route) wakes a pass at once: a new pod is covered from the moment its
        // veth exists, not at the next periodic pass (fail_closed, finding 6 of issue 13).
        let link_changed = Arc::new(Notify::new());
        let _link_watch = match links::LinkWatch::start(link_changed.clone()) {
            Ok(w) => Some(w),
            Err(error) => {
                tracing::warn!(%error, "no link events; new veths wait for the periodic pass");
                self.metrics
                    .ebpf_errors
                    .get_or_create(&StageLabels { stage: "netlink" })
                    .inc();
                None
            }
        };
        // Whether the API objects or the mesh changed since the last successful pass; periodic
        // passes without a change only look at interfaces and the tunnel (no recompile).
        let mut dirty = true;
        loop {
            let started = Instant::now();
            let result = self.pass(&links, dirty).await;
            if dirty {
                // The recompiled policy model is dropped: give its pages back (crate::memory).
                crate::memory::release_free();
            }
            let error = result.as_ref().err().map(|e| format!("{e:#}"));
            self.ebpf_status.send_if_modified(|r| {
                let next = MeshNodeEbpf {
                    loaded: self.loaded.is_some(),
                    strict: self.metrics.ebpf_strict.get() == 1,
                    attached_programs: self
                        .loaded
                        .as_ref()
                        .map_or(0, |l| u32::try_from(l.attached.len()).unwrap_or(u32::MAX)),
                    error,
                };
                let changed = *r != next;
                *r = next;
                changed
            });
            match result {
                Ok(()) => {
                    dirty = false;
                    self.metrics
                        .steering_passes
                        .get_or_create(&ResultLabels { result: "ok" })
                        .inc();
                }
                Err(error) => {
                    self.metrics
                        .steering_passes
                        .get_or_create(&ResultLabels { result: "error" })
                        .inc();
                    tracing::warn!(error = %error, "eBPF steering pass failed; retrying");
                }
            }
            self.metrics
                .steering_duration
                .observe(started.elapsed().as_secs_f64());
            tokio::select! {
                () = self.notify.notified() => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    dirty = true;
                }
                _ = self.mesh.changed() => dirty = true,
                () = link_changed.notified() => {}
                () = tokio::time::sleep(PERIOD) => {}
                () = drain.signaled() => break,
            }
        }
        if let Some(mut loaded) = self.loaded.take() {
            loaded.stop_reader.store(true, Ordering::Relaxed);
            if let Some(reader) = loaded.reader.take() {
                let _ = tokio::task::spawn_blocking(move || reader.join()).await;
            }
            tracing::info!(
                pin_dir = %loaded.loader.pin_dir().display(),
                "stopping; eBPF programs and maps stay pinned and keep enforcing"
            );
        }
    }

    fn publish_steered(sender: &watch::Sender<Option<SteeredTunnels>>, steered: SteeredTunnels) {
        sender.send_if_modified(|s| {
            let changed = s.as_ref() != Some(&steered);
            *s = Some(steered);
            changed
        });
    }

    fn pin_dir(&self) -> PathBuf {
        node_pin_dir(&self.settings.bpffs, &self.settings.node_name)
    }

    async fn load(&mut self) -> Result<(), SteeringError> {
        let pin_dir = self.pin_dir();
        let mut loader = match Loader::load(&pin_dir) {
            Ok(l) => l,
            Err(source) => {
                let error = SteeringError::Load { pin_dir, source };
                self.metrics
                    .ebpf_errors
                    .get_or_create(&StageLabels { stage: "load" })
                    .inc();
                let message = format!("{error:#}");
                if self.load_error.as_deref() != Some(message.as_str()) {
                    self.load_error = Some(message.clone());
                    self.warn_own_node("EbpfUnavailable", &message).await;
                }
                self.next_load = Some(Instant::now() + LOAD_RETRY);
                return Err(error);
            }
        };
        self.load_error = None;
        let maps = loader.maps_ref();
        let ipcache: BTreeMap<IpNet, IpcacheValue> = maps
            .ipcache_entries()
            .map_err(SteeringError::Maps)?
            .into_iter()
            .map(|(net, value)| (IpNet::V4(net), value))
            .chain(
                maps.ipcache6_entries()
                    .map_err(SteeringError::Maps)?
                    .into_iter()
                    .map(|(net, value)| (IpNet::V6(net), value)),
            )
            .collect();
        let backlog = match loader.flow_backlog_handle() {
            Ok(handle) => Some(handle),
            Err(error) => {
                tracing::warn!(%error, "no request-time flow backlog");
                None
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let reader = loader
            .take_flow_reader()
            .and_then(|r| self.spawn_reader(r, backlog, stop.clone()));
        tracing::info!(
            pin_dir = %loader.pin_dir().display(),
            restored_ipcache = ipcache.len(),
            "eBPF datapath loaded (pinned state reused)"
        );
        self.metrics.ebpf_loaded.set(1);
        self.loaded = Some(Loaded {
            loader,
            written: Written {
                ipcache,
                policy: None,
            },
            attached: BTreeMap::new(),
            pins_collected: false,
            stop_reader: stop,
            reader,
        });
        Ok(())
    }

    /// Hands the ring buffer and the backlog to the flow source and starts the reader thread
    /// (`None`, logged, when the ring cannot be waited on).
    fn spawn_reader(
        &self,
        reader: wiremesh_bpf::FlowReader,
        backlog: Option<wiremesh_bpf::FlowBacklog>,
        stop: Arc<AtomicBool>,
    ) -> Option<std::thread::JoinHandle<()>> {
        let waiter = match reader.waiter() {
            Ok(w) => w,
            Err(error) => {
                tracing::warn!(%error, "no flow reader: the ring buffer cannot be waited on");
                return None;
            }
        };
        self.flows.attach(Box::new(BpfKernel { reader, backlog }));
        let source = self.flows.clone();
        Some(
            std::thread::Builder::new()
                .name("flow-reader".into())
                .spawn(move || source.run_reader(waiter, &stop))
                .unwrap_or_else(|e| panic!("spawn the flow reader thread: {e}")),
        )
    }

    async fn warn_own_node(&self, reason: &str, message: &str) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.settings.node_name.clone()),
            uid: self
                .caches
                .nodes
                .state()
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(self.settings.node_name.as_str()))
                .and_then(|n| n.metadata.uid.clone()),
            ..ObjectReference::default()
        };
        self.publish(&reference, reason, message, "LoadDatapath")
            .await;
    }

    async fn publish(&self, reference: &ObjectReference, reason: &str, note: &str, action: &str) {
        match tokio::time::timeout(
            API_WRITE_TIMEOUT,
            self.events.warn(reference, reason, note, action),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, reason, "could not record Event"),
            Err(_) => tracing::warn!(reason, "recording the Event timed out"),
        }
    }

    async fn report_problems(&mut self, problems: Vec<ObjectProblem>) {
        let current: BTreeSet<ObjectProblem> = problems.into_iter().collect();
        let fresh: Vec<ObjectProblem> = current.difference(&self.reported).cloned().collect();
        self.reported = current;
        for p in fresh {
            tracing::warn!(
                kind = p.kind,
                namespace = p.namespace.as_deref().unwrap_or(""),
                name = %p.name,
                reason = p.reason,
                message = %p.message,
                "object the eBPF datapath cannot fully serve"
            );
            self.metrics
                .invalid_objects
                .get_or_create(&InvalidObjectLabels {
                    kind: p.kind,
                    reason: p.reason,
                })
                .inc();
            let api_version = if p.kind == "NetworkPolicy" {
                "networking.k8s.io/v1"
            } else {
                "v1"
            };
            let reference = ObjectReference {
                api_version: Some(api_version.into()),
                kind: Some(p.kind.into()),
                namespace: p.namespace.clone(),
                name: Some(p.name.clone()),
                uid: p.uid.clone(),
                ..ObjectReference::default()
            };
            self.publish(&reference, p.reason, &p.message, "SkipObject")
                .await;
        }
    }

    async fn pass(&mut self, links: &Links, dirty: bool) -> Result<(), SteeringError> {
        let me = self.caches.mesh_encryption();
        let steering = me.as_ref().is_some_and(|m| m.spec.steers_traffic());
        if self.loaded.is_none() {
            if !steering {
                Self::publish_steered(&self.steered, SteeredTunnels::default());
                return Ok(());
            }
            if self.next_load.is_some_and(|t| Instant::now() < t) {
                return Ok(());
            }
            self.load().await?;
        }
        let strict = steering
            && me
                .as_ref()
                .is_some_and(|m| m.spec.mode == EncryptionMode::Strict);
        let listen_port = self
            .settings
            .listen_port
            .or(me.as_ref().map(|m| m.spec.listen_port))
            .filter(|p| *p != 0)
            .unwrap_or(DEFAULT_LISTEN_PORT);
        let snapshot = self.mesh.borrow().clone();
        let encrypted: BTreeSet<String> = if steering && snapshot.enabled {
            snapshot
                .configured
                .iter()
                .map(|(n, _)| n.clone())
                .chain(snapshot.alt_nodes.iter().cloned())
                .collect()
        } else {
            BTreeSet::new()
        };

        let nodes = self.caches.nodes.state();
        let pods = self.caches.pods.state();
        let namespaces = self.caches.namespaces.state();
        let policies = self.caches.policies.state();

        // Policy, ipcache and names only when something changed (or after a load).
        let recompile = dirty
            || self
                .loaded
                .as_ref()
                .is_none_or(|l| l.written.policy.is_none());
        let mut policy_started = None;
        let mut desired = None;
        if recompile {
            policy_started = Some(Instant::now());
            let (cluster, problems) =
                plan::policy_cluster(&namespaces, &pods, &policies, &self.identities)
                    .map_err(SteeringError::Policy)?;
            self.identities = cluster.identities().clone();
            self.policies = cluster.policies().to_vec();
            *self
                .flows
                .names()
                .write()
                .unwrap_or_else(|e| e.into_inner()) =
                flow_names(&self.settings.node_name, &nodes, &pods, &cluster);
            self.policy_problems = problems;
            let compiled = compile(&cluster);
            let mut ipcache = plan::desired_ipcache(
                &self.settings.node_name,
                &nodes,
                &pods,
                &compiled.endpoints,
                &encrypted,
                &snapshot.claims,
            );
            plan::mark_alt_tunnel(&mut ipcache, &snapshot.alt_nodes);
            desired = Some((compiled, ipcache));
        }

        let snap = links.snapshot().await.map_err(SteeringError::Links)?;
        // The current world's tunnel (the reconciler names it; before its first pass, the
        // configured interface) and, during a rotation, the next world's.
        let tunnel_name = if snapshot.tunnel.is_empty() {
            self.settings.interface.as_str()
        } else {
            snapshot.tunnel.as_str()
        };
        let ifindex_of = |name: &str| {
            snap.names
                .iter()
                .find(|(_, n)| n.as_str() == name)
                .map(|(i, _)| *i)
        };
        let tunnel = ifindex_of(tunnel_name);
        let alt_tunnel = snapshot.alt_tunnel.as_deref().and_then(ifindex_of);
        let own_ip = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.settings.node_name.as_str()))
            .and_then(|n| node_ipv4(n));
        let config = BpfConfig::new(
            if steering { tunnel.unwrap_or(0) } else { 0 },
            if strict {
                Mode::Strict
            } else {
                Mode::Permissive
            },
            Identity::HOST.0,
            listen_port,
        )
        .with_alt_tunnel(if steering { alt_tunnel.unwrap_or(0) } else { 0 });

        let Some(loaded) = self.loaded.as_mut() else {
            return Ok(());
        };
        // The config before the ipcache: when a rotation completes, the next world's device
        // becomes `tunnel_ifindex` and the ALT_TUNNEL flags go. With the flags cleared first,
        // packets to a switched peer were redirected for a moment into the old world's device,
        // flushed in that same reconciler pass (one lost ping in some `make demo` runs). Written
        // first, the config sends flagged entries to the new tunnel too (`alt_tunnel_ifindex` 0
        // falls back to `tunnel_ifindex`); at a rotation's start `alt_tunnel_ifindex` is set
        // before any entry carries the flag.
        let maps = loaded.loader.maps();
        if maps.config().ok() != Some(config) {
            maps.set_config(&config).map_err(SteeringError::Maps)?;
            tracing::info!(
                tunnel_ifindex = config.tunnel_ifindex,
                alt_tunnel_ifindex = config.alt_tunnel_ifindex,
                strict,
                wg_port = listen_port,
                "eBPF config written"
            );
        }
        if let Some((compiled, ipcache)) = &desired
            && write_all(loaded, compiled, ipcache, &self.metrics)?
            && let Some(started) = policy_started
        {
            self.metrics
                .policy_apply_duration
                .observe(started.elapsed().as_secs_f64());
        }
        // Config and ipcache are in the maps: say where pod traffic goes now. (Without a
        // recompile the ipcache's ALT_TUNNEL flags are those of the last pass.)
        let alt_nodes = if desired.is_some() {
            snapshot.alt_nodes.iter().cloned().collect()
        } else {
            self.steered
                .borrow()
                .as_ref()
                .map(|s| s.alt_nodes.clone())
                .unwrap_or_default()
        };
        Self::publish_steered(
            &self.steered,
            SteeredTunnels {
                redirecting: steering,
                tunnel: (steering && tunnel.is_some()).then(|| tunnel_name.to_string()),
                alt: alt_tunnel
                    .filter(|_| steering)
                    .and(snapshot.alt_tunnel.clone()),
                alt_nodes,
            },
        );
        self.metrics.ebpf_strict.set(i64::from(strict));
        let mut placed = placement(&snap, own_ip, tunnel, &self.settings.node_name, &pods);
        keep_underlay(&mut placed, &snap, &loaded.attached);
        let waiting = fail_closed(
            &mut placed,
            &snap,
            &self.settings.node_name,
            &pods,
            &self.policies,
        );
        if !waiting.is_empty() {
            tracing::debug!(
                ?waiting,
                pending_veths = placed.endpoints.values().filter(|e| e.is_pending()).count(),
                "selected pods without entries: unnamed veths fail closed"
            );
        }
        // Anti-spoofing entries before from_pod goes on a new veth; stale ones after the
        // programs left the veths that are gone.
        write_endpoints(loaded.loader.maps(), &placed.endpoints).map_err(SteeringError::Maps)?;
        let attach = attach_all(loaded, &placed.wanted);
        prune_endpoints(loaded.loader.maps(), &placed.endpoints).map_err(SteeringError::Maps)?;
        self.metrics
            .bpf_attached_programs
            .set(loaded.attached.len() as i64);
        if let Ok(lost) = loaded.loader.maps_ref().events_lost() {
            self.metrics.flow_events_lost.set(lost as i64);
        }
        self.metrics
            .pods_mtu_above_tunnel
            .set(placed.above_tunnel_mtu.len() as i64);
        self.report_problems(self.policy_problems.clone()).await;
        attach
    }
}

/// Pod and node names by address, pod labels and isolating policies, and each node's key
/// generation, for flow records.
fn flow_names(
    node_name: &str,
    nodes: &[Arc<crate::cached::CachedNode>],
    pods: &[Arc<crate::cached::CachedPod>],
    cluster: &wiremesh_policy::Cluster,
) -> Names {
    let mut names = Names {
        node_name: node_name.to_string(),
        ..Names::default()
    };
    for n in nodes {
        if let (Some(name), Some(_)) = (n.metadata.name.clone(), node_ipv4(n)) {
            // Every address, both families (a record's peer node is its IPv4 underlay).
            for ip in crate::views::node_addresses(n) {
                names.nodes.insert(ip, name.clone());
            }
            let generation = n
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(wiremesh_keyexchange::ANNOTATION_KEY_GENERATION))
                .and_then(|g| g.parse().ok());
            names.peers.insert(
                name,
                PeerInfo {
                    key_generation: generation,
                    ..PeerInfo::default()
                },
            );
        }
    }
    let isolating = |pod: &wiremesh_policy::Pod, ingress: bool| -> Vec<String> {
        cluster
            .policies()
            .iter()
            .filter(|p| p.namespace == pod.namespace && p.selector.matches(&pod.labels))
            .filter(|p| {
                if ingress {
                    p.ingress.is_some()
                } else {
                    p.egress.is_some()
                }
            })
            .map(|p| p.key())
            .collect()
    };
    let model: BTreeMap<(String, String), &wiremesh_policy::Pod> = cluster
        .pods()
        .iter()
        .map(|p| ((p.namespace.clone(), p.name.clone()), p))
        .collect();
    // The pods of one label set share its Hubble form (as they share the set in the cache).
    let mut label_forms: BTreeMap<Option<&BTreeMap<String, String>>, Arc<[String]>> =
        BTreeMap::new();
    for p in pods {
        let namespace = p
            .metadata
            .namespace
            .as_deref()
            .unwrap_or("default")
            .to_string();
        let name = p.metadata.name.clone().unwrap_or_default();
        let labels = label_forms
            .entry(p.labels())
            .or_insert_with(|| {
                p.labels()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("k8s:{k}={v}"))
                    .collect()
            })
            .clone();
        let mut info = PodInfo {
            labels,
            ..PodInfo::default()
        };
        if let Some(m) = model.get(&(namespace.clone(), name.clone())) {
            info.ingress_policies = isolating(m, true);
            info.egress_policies = isolating(m, false);
        }
        info.namespace = namespace;
        info.name = name;
        // `status.podIPs`: an IPv6 flow names the pod like an IPv4 one.
        let info = Arc::new(info);
        for ip in crate::views::pod_network_ips(p) {
            names.pods.insert(ip, Arc::clone(&info));
        }
    }
    names
}

/// The map writes of a pass: [`MapWriter`] plus the garbage collection after a (re)load.
/// Implemented by the pinned maps; unit tests use `FakeMaps`.
pub trait PolicyMaps: MapWriter {
    /// Deletes every policy entry `keep` lacks ([`wiremesh_bpf::Maps::retain_policy`]).
    fn retain_policy(&mut self, keep: &Compiled) -> Result<Retained, wiremesh_bpf::Error>;
}

impl PolicyMaps for wiremesh_bpf::Maps {
    fn retain_policy(&mut self, keep: &Compiled) -> Result<Retained, wiremesh_bpf::Error> {
        wiremesh_bpf::Maps::retain_policy(self, keep)
    }
}

/// What this process wrote to the maps.
#[derive(Debug, Default)]
pub struct Written {
    /// The ipcache, both families (read back from the pinned maps at load).
    pub ipcache: BTreeMap<IpNet, IpcacheValue>,
    /// The last compilation; `None` right after a load (the pins hold an unknown one).
    pub policy: Option<Compiled>,
}

/// Writes the policy maps and the ipcache: every put (policy additions, then ipcache) before
/// every delete (ipcache, then policy removals), so no entry the new state needs is missing at
/// any moment; after a load the whole compilation is written and the leftovers of the pinned
/// state are deleted. Returns whether anything changed.
pub fn write_policy<M: PolicyMaps>(
    maps: &mut M,
    written: &mut Written,
    compiled: &Compiled,
    ipcache: &BTreeMap<IpNet, IpcacheValue>,
) -> Result<bool, wiremesh_bpf::Error> {
    let empty = Compiled::default();
    let restored = written.policy.is_none();
    let diff = compiled.diff(written.policy.as_ref().unwrap_or(&empty));
    let adds = MapDiff {
        cidrs_upsert: diff.cidrs_upsert,
        isolated_add: diff.isolated_add,
        rules_add: diff.rules_add,
        ..MapDiff::default()
    };
    let removes = MapDiff {
        cidrs_remove: diff.cidrs_remove,
        isolated_remove: diff.isolated_remove,
        rules_remove: diff.rules_remove,
        ..MapDiff::default()
    };
    // The diffs carry no endpoints (the ipcache below places pod addresses); IPv6 CIDR entries
    // go to cidrs6.
    let unused4 = |_: Ipv4Addr, _: Identity| IpcacheValue::default();
    let unused6 = |_: Ipv6Addr, _: Identity| IpcacheValue::default();
    let mut changed = false;
    if !adds.is_empty() {
        wiremesh_bpf::apply_policy_dual(maps, &adds, unused4, unused6)?;
        changed = true;
    }
    for (net, value) in ipcache {
        if written.ipcache.get(net) != Some(value) {
            match net {
                IpNet::V4(n) => maps.put_ipcache(*n, *value)?,
                IpNet::V6(n) => maps.put_ipcache6(*n, *value)?,
            }
            written.ipcache.insert(*net, *value);
            changed = true;
        }
    }
    let stale: Vec<IpNet> = written
        .ipcache
        .keys()
        .filter(|n| !ipcache.contains_key(n))
        .copied()
        .collect();
    for net in stale {
        match net {
            IpNet::V4(n) => maps.del_ipcache(n)?,
            IpNet::V6(n) => maps.del_ipcache6(n)?,
        }
        written.ipcache.remove(&net);
        changed = true;
    }
    if !removes.is_empty() {
        wiremesh_bpf::apply_policy_dual(maps, &removes, unused4, unused6)?;
        changed = true;
    }
    if restored {
        let gone = maps.retain_policy(compiled)?;
        if gone.total() > 0 {
            tracing::info!(
                isolated = gone.isolated,
                rules = gone.rules,
                cidrs = gone.cidrs,
                cidrs6 = gone.cidrs6,
                "deleted policy entries an earlier run left behind"
            );
            changed = true;
        }
    }
    written.policy = Some(compiled.clone());
    Ok(changed)
}

fn write_all(
    loaded: &mut Loaded,
    compiled: &Compiled,
    ipcache: &BTreeMap<IpNet, IpcacheValue>,
    metrics: &Metrics,
) -> Result<bool, SteeringError> {
    let result = write_policy(loaded.loader.maps(), &mut loaded.written, compiled, ipcache);
    let label = ResultLabels {
        result: if result.is_ok() { "ok" } else { "error" },
    };
    if !matches!(result, Ok(false)) {
        metrics.policy_updates.get_or_create(&label).inc();
    }
    let changed = result.map_err(SteeringError::Maps)?;
    if changed {
        tracing::info!(
            isolated = compiled.isolated.len(),
            rules = compiled.rules.len(),
            cidrs = compiled.cidrs.len(),
            ipcache = ipcache.len(),
            "eBPF policy maps and ipcache updated"
        );
    }
    for (map, n) in [
        ("isolated", compiled.isolated.len()),
        ("rules", compiled.rules.len()),
        ("cidrs", compiled.cidrs.len()),
        ("ipcache", ipcache.len()),
    ] {
        metrics
            .map_entries
            .get_or_create(&MapLabels { map })
            .set(n as i64);
    }
    Ok(changed)
}

/// Where the programs go according to one link snapshot, the anti-spoofing entries, and the
/// local pods whose veth MTU exceeds the tunnel's. The latter is information, not a fault:
/// `from_pod` hands a packet too big for the tunnel to the routing stack, which answers with a
/// PMTU error, so such pods work and only pay a round trip of path MTU discovery per
/// destination (no Event; the `pods_mtu_above_tunnel` gauge counts them).
#[derive(Debug, Default)]
pub struct Placement {
    /// (interface, hook) -> (hook, ifindex).
    pub wanted: BTreeMap<(String, u8), (Hook, u32)>,
    /// Host-side veth ifindex -> the addresses of the one local pod behind it (the
    /// `wm_endpoints` anti-spoofing entries). An interface that routes to several pods (a
    /// bridge) gets none: the program cannot tell which pod sent a packet, so it does not check.
    pub endpoints: BTreeMap<u32, EndpointValue>,
    /// `namespace/name` of the local pods whose veth MTU is above the tunnel's.
    pub above_tunnel_mtu: Vec<String>,
}

/// See [`Placement`].
pub fn placement(
    snap: &LinkSnapshot,
    own_ip: Option<Ipv4Addr>,
    tunnel: Option<u32>,
    own_node: &str,
    pods: &[Arc<crate::cached::CachedPod>],
) -> Placement {
    let mut out = Placement::default();
    let underlay = own_ip.and_then(|ip| snap.address_iface(ip));
    if let Some((index, name)) = underlay {
        for hook in [Hook::UnderlayIngress, Hook::UnderlayEgress] {
            out.wanted
                .insert((name.to_string(), hook as u8), (hook, index));
        }
    }
    let tunnel_mtu = tunnel.and_then(|i| snap.mtus.get(&i)).copied();
    let exclude: Vec<u32> = tunnel.into_iter().chain(underlay.map(|(i, _)| i)).collect();
    // ifindex -> the pods behind it (more than one: no anti-spoofing entry).
    let mut behind: BTreeMap<u32, Vec<EndpointValue>> = BTreeMap::new();
    for pod in pods {
        if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(own_node) {
            continue;
        }
        let ips = crate::views::pod_network_ips(pod);
        let ip4 = ips.iter().find_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        });
        let ip6 = ips.iter().find_map(|ip| match ip {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        });
        // The pod's veth by the route to any of its addresses (a single-stack IPv6 pod has only
        // an IPv6 route); the entry holds both families, so from_pod checks either source.
        let mut seen = BTreeSet::new();
        for ip in ips {
            let Some((index, name)) = snap.route_iface(ip, &exclude) else {
                continue;
            };
            if !seen.insert(index) {
                continue;
            }
            let ep = EndpointValue::new(ip4, ip6);
            let pods_here = behind.entry(index).or_default();
            if !pods_here.contains(&ep) {
                pods_here.push(ep);
            }
            for hook in [Hook::FromPod, Hook::ToPod] {
                out.wanted
                    .insert((name.to_string(), hook as u8), (hook, index));
            }
            if let (Some(mtu), Some(tunnel_mtu)) = (snap.mtus.get(&index), tunnel_mtu)
                && *mtu > tunnel_mtu
            {
                out.above_tunnel_mtu.push(format!(
                    "{}/{}",
                    pod.metadata.namespace.as_deref().unwrap_or("default"),
                    pod.metadata.name.as_deref().unwrap_or("")
                ));
                tracing::debug!(
                    iface = name,
                    mtu,
                    tunnel_mtu,
                    "pod veth MTU above the tunnel's (PMTU discovery applies)"
                );
            }
        }
    }
    for (index, eps) in behind {
        match eps.as_slice() {
            [one] => {
                out.endpoints.insert(index, *one);
            }
            _ => tracing::debug!(
                ifindex = index,
                pods = eps.len(),
                "interface routes to several pods: no anti-spoofing entry"
            ),
        }
    }
    out
}

/// Fail static for the underlay programs: when the Node's address is on no interface, the
/// underlay hooks stay where they are attached (as long as that link exists with the same
/// ifindex) instead of being detached. After an underlay readdress the agent learns its new
/// address from its Node only when its API connections notice the move (~22 s, docs/faults.md);
/// meanwhile the old address is on no interface, and the Strict mode guard against plaintext
/// pod traffic on the underlay was detached for that long, then attached again.
pub fn keep_underlay(
    placed: &mut Placement,
    snap: &LinkSnapshot,
    attached: &BTreeMap<(String, u8), (Hook, u32)>,
) {
    let is_underlay = |hook: Hook| matches!(hook, Hook::UnderlayIngress | Hook::UnderlayEgress);
    if placed.wanted.values().any(|(hook, _)| is_underlay(*hook)) {
        return;
    }
    for (key, (hook, index)) in attached {
        if is_underlay(*hook) && snap.names.get(index) == Some(&key.0) {
            placed.wanted.insert(key.clone(), (*hook, *index));
        }
    }
}

/// Fail closed for new pods (finding 6 of issue 13, docs/threat-model.md): while a local pod
/// that some NetworkPolicy selects has no veth the pass can name (no IP in its status yet, or
/// no route to it), every unnamed veth of the namespace (not a bridge port, not the tunnel or
/// the underlay) gets the programs and a [`EndpointValue::pending`] entry, so nothing passes
/// it either way until the pod's identity and entry are written. Returns the waiting selected
/// pods (`namespace/name`); without any, `placed` is left alone.
pub fn fail_closed(
    placed: &mut Placement,
    snap: &LinkSnapshot,
    own_node: &str,
    pods: &[Arc<crate::cached::CachedPod>],
    policies: &[wiremesh_policy::Policy],
) -> Vec<String> {
    let named: BTreeSet<u32> = placed
        .wanted
        .values()
        .filter(|(hook, _)| *hook == Hook::FromPod)
        .map(|(_, index)| *index)
        .collect();
    let underlay: BTreeSet<u32> = placed
        .wanted
        .values()
        .filter(|(hook, _)| *hook == Hook::UnderlayIngress)
        .map(|(_, index)| *index)
        .collect();
    let mut waiting = Vec::new();
    for pod in pods {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        if spec.and_then(|s| s.node_name.as_deref()) != Some(own_node)
            || spec.and_then(|s| s.host_network).unwrap_or(false)
            || matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
            || pod.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let resolved = crate::views::pod_network_ips(pod).into_iter().any(|ip| {
            snap.route_iface(ip, &[])
                .is_some_and(|(index, _)| named.contains(&index))
        });
        if resolved {
            continue;
        }
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let labels = pod.labels().cloned().unwrap_or_default();
        if policies
            .iter()
            .any(|p| p.namespace == namespace && p.selector.matches(&labels))
        {
            waiting.push(format!(
                "{namespace}/{}",
                pod.metadata.name.as_deref().unwrap_or("")
            ));
        }
    }
    if waiting.is_empty() {
        return waiting;
    }
    for index in &snap.veths {
        if named.contains(index) || underlay.contains(index) {
            continue;
        }
        let Some(name) = snap.names.get(index) else {
            continue;
        };
        for hook in [Hook::FromPod, Hook::ToPod] {
            placed
                .wanted
                .insert((name.clone(), hook as u8), (hook, *index));
        }
        placed.endpoints.insert(*index, EndpointValue::pending());
    }
    waiting
}

/// The `wm_endpoints` map as the steering pass uses it. Implemented by the pinned maps; unit
/// tests use a `BTreeMap`.
pub trait EndpointMaps {
    /// All entries.
    fn endpoints(&self) -> Result<BTreeMap<u32, EndpointValue>, wiremesh_bpf::Error>;
    /// Inserts or overwrites one.
    fn put_endpoint(
        &mut self,
        ifindex: u32,
        value: EndpointValue,
    ) -> Result<(), wiremesh_bpf::Error>;
    /// Deletes one (missing is not an error).
    fn del_endpoint(&mut self, ifindex: u32) -> Result<(), wiremesh_bpf::Error>;
}

impl EndpointMaps for wiremesh_bpf::Maps {
    fn endpoints(&self) -> Result<BTreeMap<u32, EndpointValue>, wiremesh_bpf::Error> {
        Ok(self.endpoint_entries()?.into_iter().collect())
    }
    fn put_endpoint(
        &mut self,
        ifindex: u32,
        value: EndpointValue,
    ) -> Result<(), wiremesh_bpf::Error> {
        self.upsert_endpoint(ifindex, value)
    }
    fn del_endpoint(&mut self, ifindex: u32) -> Result<(), wiremesh_bpf::Error> {
        self.remove_endpoint(ifindex)
    }
}

/// Writes every wanted endpoint entry the map does not hold yet (a new veth, or a reused
/// ifindex now behind another pod). Returns how many were written.
pub fn write_endpoints<M: EndpointMaps>(
    maps: &mut M,
    wanted: &BTreeMap<u32, EndpointValue>,
) -> Result<usize, wiremesh_bpf::Error> {
    let have = maps.endpoints()?;
    let mut n = 0;
    for (index, value) in wanted {
        if have.get(index) != Some(value) {
            maps.put_endpoint(*index, *value)?;
            tracing::info!(
                ifindex = index,
                ip4 = %Ipv4Addr::from(value.ip4),
                ip6 = %Ipv6Addr::from(value.ip6),
                "anti-spoofing entry written"
            );
            n += 1;
        }
    }
    Ok(n)
}

/// Deletes every endpoint entry not wanted (veths that are gone, an interface now shared by
/// several pods, leftovers of an earlier run). Returns how many were deleted.
pub fn prune_endpoints<M: EndpointMaps>(
    maps: &mut M,
    wanted: &BTreeMap<u32, EndpointValue>,
) -> Result<usize, wiremesh_bpf::Error> {
    let mut n = 0;
    for index in maps.endpoints()?.into_keys() {
        if !wanted.contains_key(&index) {
            maps.del_endpoint(index)?;
            tracing::info!(ifindex = index, "anti-spoofing entry deleted");
            n += 1;
        }
    }
    Ok(n)
}

/// Attaches the programs where they belong and detaches them where they no longer do. Every
/// interface is tried; the first failure is returned.
fn attach_all(
    loaded: &mut Loaded,
    wanted: &BTreeMap<(String, u8), (Hook, u32)>,
) -> Result<(), SteeringError> {
    let mut first_error = None;
    for (key, (hook, index)) in wanted {
        if loaded.attached.get(key) == Some(&(*hook, *index)) {
            continue;
        }
        match loaded.loader.attach(&key.0, *hook) {
            Ok(how) => {
                tracing::info!(iface = %key.0, program = hook.program(), ?how, "program attached");
                loaded.attached.insert(key.clone(), (*hook, *index));
            }
            Err(source) => {
                tracing::warn!(iface = %key.0, program = hook.program(), error = %source, "attach failed");
                first_error.get_or_insert(SteeringError::Attach {
                    program: hook.program(),
                    iface: key.0.clone(),
                    source,
                });
            }
        }
    }
    let stale: Vec<(String, u8)> = loaded
        .attached
        .keys()
        .filter(|k| !wanted.contains_key(*k))
        .cloned()
        .collect();
    for key in stale {
        if let Some((hook, _)) = loaded.attached.remove(&key) {
            if let Err(error) = loaded.loader.detach(&key.0, hook) {
                tracing::warn!(iface = %key.0, program = hook.program(), %error, "detach failed");
            } else {
                tracing::info!(iface = %key.0, program = hook.program(), "program detached");
            }
        }
    }
    // Pins an earlier run left for interfaces that are gone now; then, every attached hook
    // running this loader's programs, the map pins of an older build's generation.
    if !loaded.pins_collected && first_error.is_none() {
        loaded.pins_collected = true;
        collect_stale_pins(loaded, wanted);
        if !loaded.loader.previous_generations().is_empty() {
            match loaded.loader.remove_previous_generations() {
                Ok(n) => tracing::info!(
                    pins = n,
                    map_dir = %loaded.loader.map_dir().display(),
                    "upgrade finished: programs swapped onto the new maps, old map pins removed"
                ),
                Err(error) => tracing::warn!(%error, "removing the old generation's map pins"),
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn collect_stale_pins(loaded: &mut Loaded, wanted: &BTreeMap<(String, u8), (Hook, u32)>) {
    let dir = loaded.loader.pin_dir().join("links");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let found = Hook::ALL.into_iter().find_map(|h| {
            name.strip_prefix(&format!("{}-", h.program()))
                .map(|iface| (h, iface.to_string()))
        });
        let Some((hook, iface)) = found else { continue };
        if wanted.contains_key(&(iface.clone(), hook as u8)) {
            continue;
        }
        match loaded.loader.detach(&iface, hook) {
            Ok(()) => tracing::info!(iface, program = hook.program(), "removed stale pinned link"),
            Err(error) => tracing::warn!(iface, %error, "removing stale pinned link"),
        }
    }
}
