//! Wiring of `mesh-agent run`: [`build`] loads the key and the kube client and starts every task
//! (watchers, reconciler, datapath monitor, status publisher, HTTP server) in one JoinSet;
//! [`App::wait_termination`] runs until SIGTERM/SIGINT or until a task dies, then drains with a
//! deadline. The agent does not own the WireGuard device: the reconciler selects it (the device
//! process's UAPI socket, or a kernel `wireguard` link) through [`SystemSelector`], and on exit
//! the device, its peers and its routes are left as they are for the next agent to adopt.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};
use prometheus_client::registry::Registry;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, watch},
    task::JoinSet,
};
use wiremesh_keyexchange::{KeySet, KeySource, Keystore};

use crate::{
    admin::AdminServer,
    api::{ApiServer, ApiState, KubeReviewer},
    config::{Config, EbpfChoice},
    coordinator::{Coordinator, CoordinatorMetrics, CoordinatorSettings},
    datapath::Datapath,
    drain::{self, Trigger},
    flowsource::FlowSource,
    health::DatapathMonitor,
    mesh::Mesh,
    metrics::Metrics,
    reconciler::{DatapathControl, MeshSnapshot, PlanSettings, Reconciler},
    routes::netlink::NetlinkRoutes,
    select::{DatapathSlot, Selector, SystemDevices, SystemLinks, SystemSelector, Worlds},
    status::{SharedStatus, StatusPublisher},
    steering::{Steering, SteeringSettings},
    taint::TaintRemover,
    watch::watchers,
};

/// How long the reconciler waits for the second slot's userspace device in one pass.
const NEXT_WORLD_DEVICE_WAIT: Duration = Duration::from_secs(2);

/// A running agent.
pub struct App {
    tasks: JoinSet<(&'static str, anyhow::Result<()>)>,
    trigger: Trigger,
    drain_timeout: Duration,
}

/// Loads (or creates) the node's keys from the keystore in `config.state_dir` (the current key,
/// and during a rotation the next one); with `--regenerate-key` replaces the key with a new one
/// first.
pub fn load_key(config: &Config) -> anyhow::Result<KeySet> {
    let keystore = Keystore::new(&config.state_dir);
    let outcome = if config.regenerate_key {
        tracing::warn!(
            state_dir = %config.state_dir.display(),
            "--regenerate-key: replacing this node's key; every peer must pick up the new one"
        );
        keystore.regenerate()
    } else {
        keystore.load_or_generate()
    }
    .with_context(|| format!("keystore {}", config.state_dir.display()))?;
    for fix in &outcome.permissions_fixed {
        tracing::warn!(
            path = %fix.path.display(),
            old_mode = format!("{:o}", fix.old_mode),
            new_mode = format!("{:o}", fix.new_mode),
            "tightened keystore permissions"
        );
    }
    let keys = outcome.keys;
    tracing::info!(
        public_key = %keys.current.public_key(),
        next_key = keys.next.is_some(),
        source = match outcome.source {
            KeySource::Loaded => "loaded",
            KeySource::Generated => "generated",
            KeySource::Regenerated => "regenerated",
        },
        state_dir = %config.state_dir.display(),
        "node key ready"
    );
    Ok(keys)
}

/// A kube client from `--kubeconfig`, or inferred (in-cluster, then $KUBECONFIG).
pub async fn kube_client(config: &Config) -> anyhow::Result<Client> {
    kube_client_from(config.kubeconfig.as_deref()).await
}

/// A kube client from the kubeconfig file `kubeconfig`, or from what `kube::Config::infer` finds
/// ($KUBECONFIG, the in-cluster service account) without one. The agent and meshctl both connect
/// through here.
pub async fn kube_client_from(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let kube_config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("load kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig, no $KUBECONFIG and not in a cluster")?,
    };
    crate::apiclient::client(kube_config).context("build kube client")
}

/// The rotation coordinator's client: `--coordinator-kubeconfig`, else the pod's ServiceAccount;
/// `None` (with the reason logged) when the agent does not stand for election.
async fn coordinator_client(config: &Config) -> Option<Client> {
    if !config.coordinator {
        tracing::info!("--coordinator false: not standing for rotation coordinator");
        return None;
    }
    let client = match &config.coordinator_kubeconfig {
        Some(path) => kube_client_from(Some(path)).await,
        None => kube::Config::incluster()
            .context("no --coordinator-kubeconfig and no in-cluster ServiceAccount")
            .and_then(|c| crate::apiclient::client(c).context("build kube client")),
    };
    match client {
        Ok(client) => Some(client),
        Err(error) => {
            tracing::warn!(
                error = format!("{error:#}"),
                "no credentials for the rotation coordinator; this agent does not stand for election"
            );
            None
        }
    }
}

/// Starts every task of the agent on the current runtime.
pub async fn build(config: &Config, keys: KeySet, client: Client) -> anyhow::Result<App> {
    let routes = Arc::new(NetlinkRoutes::new(config.route_table).context("open rtnetlink")?);
    let slot_a = Arc::new(DatapathSlot::new(&config.interface));
    let slot_b = Arc::new(DatapathSlot::new(&config.interface_b));
    let worlds = Arc::new(Worlds::new(slot_a.clone(), slot_b.clone()));
    let datapath: Arc<dyn Datapath> = worlds.clone();
    let worlds_for_stats = worlds.clone();
    let meshes = [
        Mesh::new(slot_a, routes.clone(), keys.current.clone()),
        Mesh::new(slot_b, routes.clone(), keys.current.clone()),
    ];
    let selector_a: Arc<dyn Selector> = Arc::new(SystemSelector {
        links: SystemLinks,
        devices: SystemDevices,
        ifname: config.interface.clone(),
        socket: config.uapi_socket.clone(),
        wait: config.device_wait,
    });
    // The second slot is wanted during a rotation (or when it is current after one); a missing
    // device there must not hold the reconciler up for long: the rotation names the node.
    let selector_b: Arc<dyn Selector> = Arc::new(SystemSelector {
        links: SystemLinks,
        devices: SystemDevices,
        ifname: config.interface_b.clone(),
        socket: crate::config::default_uapi_socket(&config.interface_b),
        wait: config.device_wait.min(NEXT_WORLD_DEVICE_WAIT),
    });

    let mut registry = Registry::with_prefix("wiremesh");
    let metrics = Metrics::new(&mut registry);
    let address_watch = crate::apiclient::AddressWatch::new(
        crate::apiclient::Connections::shared().clone(),
        crate::apiclient::ConnectionMetrics::new(&mut registry),
    );
    let coordinator = coordinator_client(config).await.map(|coordinator_client| {
        Coordinator::new(
            CoordinatorSettings::new(&config.node_name, &config.lease_namespace),
            coordinator_client,
            CoordinatorMetrics::new(&mut registry),
        )
    });
    let notify = Arc::new(Notify::new());
    let steer_notify = Arc::new(Notify::new());
    let mut watchers = watchers(&client, notify.clone(), steer_notify.clone());
    // A deleted MeshEncryption keeps the last spec (issue 13, finding 8); a corrupt memory
    // stops the agent rather than silently turning the mesh off.
    let memory = crate::settings::SettingsMemory::open(&config.state_dir)?;
    watchers.caches = watchers.caches.with_settings_memory(Arc::new(memory));
    let (snapshot_tx, snapshot_rx) = watch::channel(MeshSnapshot::default());
    let shared_status: SharedStatus = SharedStatus::default();
    let (monitor, health) = DatapathMonitor::new(worlds.clone(), notify.clone(), metrics.clone());

    let admin =
        AdminServer::bind(config.metrics_addr, registry, snapshot_rx.clone(), health).await?;
    tracing::info!(addr = %admin.local_addr(), "serving /healthz /readyz /metrics");
    let history = Arc::new(open_history(config)?);
    let flows = Arc::new(
        FlowSource::new(
            config.flow_table_size,
            config.flow_coverage_window,
            metrics.clone(),
        )
        .with_history(history)
        .with_peer_status(shared_status.clone())
        .with_export(open_export(config)?),
    );
    let steering = Steering::new(
        SteeringSettings {
            node_name: config.node_name.clone(),
            bpffs: config.bpffs.clone(),
            interface: config.interface.clone(),
            listen_port: config.listen_port,
            ebpf: config.ebpf,
        },
        client.clone(),
        watchers.caches.clone(),
        snapshot_rx.clone(),
        steer_notify,
        metrics.clone(),
        flows.clone(),
    );
    let api = ApiServer::bind(
        config.api_addr,
        &config.state_dir,
        config.client_ca_file.as_deref(),
        ApiState {
            node_name: config.node_name.clone(),
            flows,
            status: shared_status.clone(),
            reviewer: Arc::new(KubeReviewer::new(client.clone())),
            metrics: metrics.clone(),
            key_file: Some(
                Keystore::new(&config.state_dir)
                    .path(wiremesh_keyexchange::keystore::PRIVATE_KEY_FILE),
            ),
        },
    )
    .await?;
    tracing::info!(addr = %api.local_addr(), "serving /flows /status over HTTPS (nodes/proxy authz)");

    let reconciler = Reconciler::new(
        PlanSettings {
            node_name: config.node_name.clone(),
            listen_port: config.listen_port,
            mtu: config.mtu,
            persistent_keepalive: config.persistent_keepalive,
        },
        Keystore::new(&config.state_dir),
        keys,
        client.clone(),
        watchers.caches.clone(),
        meshes,
        routes,
        metrics.clone(),
        snapshot_tx,
        notify,
        config.resync_interval,
        DatapathControl {
            worlds,
            selectors: [selector_a, selector_b],
            flag: config.datapath,
        },
    );
    let reconciler = match config.ebpf {
        EbpfChoice::Auto => reconciler.with_steering(steering.steered()),
        EbpfChoice::Off => reconciler,
    };
    let taint_remover = config.readiness_taint.then(|| {
        TaintRemover::new(
            client.clone(),
            config.node_name.clone(),
            snapshot_rx.clone(),
        )
    });
    let reporter = StatusPublisher::new(
        config.node_name.clone(),
        datapath,
        client,
        snapshot_rx,
        metrics,
        config.status_interval,
        shared_status,
    )
    .with_per_peer_metrics(config.per_peer_metrics)
    .with_worlds(worlds_for_stats);
    let reporter = match config.ebpf {
        EbpfChoice::Auto => reporter.with_ebpf(steering.ebpf_status()),
        EbpfChoice::Off => reporter,
    };

    let (trigger, drain) = drain::channel();
    let mut tasks = JoinSet::new();
    for watch in watchers.tasks {
        spawn_until_drained(&mut tasks, "watcher", watch.run(drain.clone()));
    }
    spawn_until_drained(&mut tasks, "reconciler", reconciler.run(drain.clone()));
    spawn_until_drained(
        &mut tasks,
        "address watch",
        address_watch.run(drain.clone()),
    );
    spawn_until_drained(&mut tasks, "datapath monitor", monitor.run(drain.clone()));
    spawn_until_drained(&mut tasks, "ebpf steering", steering.run(drain.clone()));
    spawn_until_drained(&mut tasks, "status publisher", reporter.run(drain.clone()));
    if let Some(remover) = taint_remover {
        spawn_until_drained(&mut tasks, "readiness taint", remover.run(drain.clone()));
    }
    let api_drain = drain.clone();
    tasks.spawn(async move { ("api server", api.run(api_drain).await.map_err(Into::into)) });
    if let Some(coordinator) = coordinator {
        spawn_until_drained(
            &mut tasks,
            "rotation coordinator",
            coordinator.run(drain.clone()),
        );
    }
    tasks.spawn(async move { ("http server", admin.run(drain).await.map_err(Into::into)) });

    Ok(App {
        tasks,
        trigger,
        drain_timeout: config.drain_timeout,
    })
}

/// Opens the flow history in the state dir with the configured limits.
fn open_history(config: &Config) -> anyhow::Result<crate::history::History> {
    let limits = crate::history::Limits {
        retention: config.flow_retention,
        max_records: config.flow_history_max_records,
    };
    let history =
        crate::history::History::open(&config.state_dir, limits, crate::flows::unix_now())?;
    tracing::info!(path = %history.path().display(), retention = ?limits.retention, "flow history open");
    Ok(history)
}

/// The JSON-lines flow export of `--flow-export`, if asked for.
fn open_export(config: &Config) -> anyhow::Result<Option<crate::export::Export>> {
    config
        .flow_export
        .as_ref()
        .map(|path| {
            crate::export::Export::open(path, config.flow_export_max_bytes, config.flow_export_keep)
                .with_context(|| format!("--flow-export {}", path.display()))
        })
        .transpose()
}

/// Spawns `task`, a component's run loop that returns once the drain starts, as `name`. It ends
/// with `Ok(())`; an end before the drain is still reported by [`App::wait_termination`] as the
/// task stopping unexpectedly.
fn spawn_until_drained(
    tasks: &mut JoinSet<(&'static str, anyhow::Result<()>)>,
    name: &'static str,
    task: impl Future<Output = ()> + Send + 'static,
) {
    tasks.spawn(async move {
        task.await;
        (name, Ok(()))
    });
}

impl App {
    /// Runs until SIGTERM or SIGINT (clean exit) or until a task ends on its own (error exit),
    /// then drains every task within the drain timeout.
    pub async fn wait_termination(mut self) -> anyhow::Result<()> {
        let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        let failure = tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: draining"); None }
            _ = sigint.recv() => { tracing::info!("SIGINT: draining"); None }
            Some(joined) = self.tasks.join_next() => Some(match joined {
                Ok((name, Ok(()))) => anyhow::anyhow!("task {name} stopped unexpectedly"),
                Ok((name, Err(error))) => error.context(format!("task {name} failed")),
                Err(join_error) => anyhow::anyhow!("task panicked: {join_error}"),
            }),
        };
        if let Some(error) = &failure {
            tracing::error!(error = format!("{error:#}"), "shutting down");
        }
        self.trigger.start();
        let deadline = tokio::time::sleep(self.drain_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                joined = self.tasks.join_next() => match joined {
                    None => break,
                    Some(Ok((name, Err(error)))) => {
                        tracing::warn!(task = name, error = format!("{error:#}"), "task failed while draining");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(join_error)) => tracing::warn!(%join_error, "task panicked while draining"),
                },
                () = &mut deadline => {
                    tracing::warn!(remaining = self.tasks.len(), "drain deadline passed; aborting tasks");
                    self.tasks.shutdown().await;
                    break;
                }
            }
        }
        tracing::info!("stopped");
        match failure {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// `mesh-agent run` after the configuration is parsed, logging set up and the namespace entered.
/// The device is not the agent's: whatever ends the agent, it is left running with its peers and
/// routes.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let key = load_key(&config)?;
    let client = kube_client(&config).await?;
    let app = build(&config, key, client).await?;
    app.wait_termination().await
}
