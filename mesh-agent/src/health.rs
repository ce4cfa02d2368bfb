//! Whether the datapath is alive, for `/healthz`, the `wiremesh_datapath_up` metric and the
//! reconciler. The device is not the agent's: its process can die (and be restarted by its
//! supervisor) or its link can be deleted under the agent. [`DatapathMonitor`] probes the device
//! every [`PROBE_INTERVAL`] ([`Datapath::probe`]: a process serves its socket, its interface and
//! index) and asks it for its whole status every [`FULL_PROBE_EVERY`] probes (which a hung
//! device does not answer; the status is a dump of every peer, too dear for every probe at
//! thousands of peers). A device that stops answering, comes back or comes back as another
//! interface (a new ifindex: the process restarted) wakes the reconciler at once, so the fresh
//! device gets its whole configuration without waiting for the periodic resync.

use std::{sync::Arc, time::Duration};

use tokio::sync::{Notify, watch};

use crate::{datapath::Datapath, drain::Drain, metrics::Metrics, select::Worlds};

/// How often the device is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Every how many probes the device's whole status is read instead (every 2 s).
pub const FULL_PROBE_EVERY: u32 = 4;

/// The datapath's liveness as last probed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatapathHealth {
    /// No device was selected yet (the agent is starting: not ready, but not dead either).
    pub starting: bool,
    /// The device answered the last probe.
    pub alive: bool,
    /// Its interface index when it answered.
    pub ifindex: Option<u32>,
    /// Why it did not answer.
    pub error: Option<String>,
}

impl DatapathHealth {
    /// What `/healthz` says: fine while starting or alive, else why the datapath is dead.
    pub fn check(&self) -> Result<(), String> {
        if self.starting || self.alive {
            Ok(())
        } else {
            Err(self
                .error
                .clone()
                .unwrap_or_else(|| "the device does not answer".to_string()))
        }
    }
}

/// See the module docs.
pub struct DatapathMonitor {
    slot: Arc<Worlds>,
    notify: Arc<Notify>,
    tx: watch::Sender<DatapathHealth>,
    metrics: Metrics,
}

impl DatapathMonitor {
    /// A monitor of `slot` that wakes the reconciler through `notify`, and the receiver of its
    /// findings.
    pub fn new(
        slot: Arc<Worlds>,
        notify: Arc<Notify>,
        metrics: Metrics,
    ) -> (Self, watch::Receiver<DatapathHealth>) {
        let (tx, rx) = watch::channel(DatapathHealth {
            starting: true,
            ..DatapathHealth::default()
        });
        (
            Self {
                slot,
                notify,
                tx,
                metrics,
            },
            rx,
        )
    }

    /// One probe, a [`Datapath::status`] if `full` else a [`Datapath::probe`]; returns whether
    /// the reconciler should be woken.
    pub fn probe(&self, ever_selected: &mut bool, full: bool) -> bool {
        *ever_selected |= self.slot.current().selection().is_some();
        let probed = if full {
            self.slot.status().map(|status| status.ifindex)
        } else {
            self.slot.probe()
        };
        let health = match probed {
            Ok(ifindex) => DatapathHealth {
                starting: false,
                alive: true,
                ifindex: Some(ifindex),
                error: None,
            },
            Err(error) => DatapathHealth {
                starting: !*ever_selected,
                alive: false,
                ifindex: None,
                error: Some(format!("datapath {}: {error}", self.slot.ifname())),
            },
        };
        let previous = self.tx.borrow().clone();
        let wake = !health.starting
            && (previous.alive != health.alive
                || (health.ifindex.is_some() && previous.ifindex != health.ifindex));
        if previous.alive && !health.alive {
            tracing::warn!(error = ?health.error, "the datapath stopped answering");
        } else if !previous.alive && health.alive && !previous.starting {
            tracing::info!(ifindex = ?health.ifindex, "the datapath answers again");
        }
        if *ever_selected {
            self.metrics.datapath_up.set(i64::from(health.alive));
        }
        self.tx.send_if_modified(|h| {
            let changed = *h != health;
            *h = health;
            changed
        });
        wake
    }

    /// Probes until the drain starts.
    pub async fn run(self, mut drain: Drain) {
        let mut ever_selected = false;
        let mut tick: u32 = 0;
        loop {
            if self.probe(&mut ever_selected, tick.is_multiple_of(FULL_PROBE_EVERY)) {
                self.notify.notify_one();
            }
            tick = tick.wrapping_add(1);
            tokio::select! {
                () = tokio::time::sleep(PROBE_INTERVAL) => {}
                () = drain.signaled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{
        config::DatapathChoice,
        datapath::{DatapathError, DatapathKind, DeviceStatus, fake::FakeDatapath},
        select::Selection,
    };

    /// A monitor of slots `wm0` (current, returned to select devices in) and `wm1`.
    fn monitor() -> (
        Arc<crate::select::DatapathSlot>,
        DatapathMonitor,
        watch::Receiver<DatapathHealth>,
    ) {
        let slot = Arc::new(crate::select::DatapathSlot::new("wm0"));
        let worlds = Arc::new(Worlds::new(
            slot.clone(),
            Arc::new(crate::select::DatapathSlot::new("wm1")),
        ));
        let metrics = Metrics::new(&mut Registry::default());
        let (monitor, rx) = DatapathMonitor::new(worlds, Arc::new(Notify::new()), metrics);
        (slot, monitor, rx)
    }

    #[test]
    fn starting_alive_dead_and_back() {
        let (slot, monitor, rx) = monitor();
        let mut ever = false;
        assert!(!monitor.probe(&mut ever, true), "no wake-up while starting");
        assert!(rx.borrow().check().is_ok(), "starting is not dead");
        let selection = Selection {
            choice: DatapathChoice::Userspace,
            kind: DatapathKind::Userspace,
            reason: "requested",
            message: String::new(),
        };
        slot.set(Arc::new(FakeDatapath::new("wm0")), selection.clone());
        assert!(
            monitor.probe(&mut ever, true),
            "a device that answers wakes the reconciler"
        );
        assert!(rx.borrow().alive);
        assert!(!monitor.probe(&mut ever, true), "nothing new");
        slot.clear();
        assert!(monitor.probe(&mut ever, true));
        let error = rx.borrow().check().unwrap_err();
        assert!(error.contains("wm0"), "{error}");
        slot.set(Arc::new(FakeDatapath::new("wm0")), selection);
        assert!(monitor.probe(&mut ever, true));
        assert!(rx.borrow().check().is_ok());
        slot.clear();
        assert!(
            monitor.probe(&mut ever, false),
            "the quick probe finds a device gone too"
        );
        assert!(!rx.borrow().alive);
    }

    /// A device whose process serves its socket but does not answer a request.
    struct Hung;

    impl Datapath for Hung {
        fn kind(&self) -> DatapathKind {
            DatapathKind::Userspace
        }
        fn ifname(&self) -> &str {
            "wm0"
        }
        fn configure(&self, _: &crate::datapath::DeviceSettings) -> Result<(), DatapathError> {
            Ok(())
        }
        fn set_peer(&self, _: &crate::datapath::PeerConfig) -> Result<(), DatapathError> {
            Ok(())
        }
        fn remove_peer(&self, _: &wiremesh_keyexchange::PublicKey) -> Result<(), DatapathError> {
            Ok(())
        }
        fn status(&self) -> Result<DeviceStatus, DatapathError> {
            Err(DatapathError::Invalid {
                ifname: "wm0".into(),
                message: "no answer".into(),
            })
        }
        fn probe(&self) -> Result<u32, DatapathError> {
            Ok(7)
        }
    }

    #[test]
    fn a_hung_device_is_found_by_the_full_probe() {
        let (slot, monitor, rx) = monitor();
        slot.set(
            Arc::new(Hung),
            Selection {
                choice: DatapathChoice::Userspace,
                kind: DatapathKind::Userspace,
                reason: "requested",
                message: String::new(),
            },
        );
        let mut ever = false;
        assert!(monitor.probe(&mut ever, false), "alive by the quick probe");
        assert_eq!(rx.borrow().ifindex, Some(7));
        assert!(monitor.probe(&mut ever, true), "dead by the full one");
        let error = rx.borrow().check().unwrap_err();
        assert!(error.contains("no answer"), "{error}");
    }
}
