//! Whether the datapath is alive, for `/healthz`, the `wiremesh_datapath_up` metric and the
//! reconciler. The device is not the agent's: its process can die (and be restarted by its
//! supervisor) or its link can be deleted under the agent. [`DatapathMonitor`] asks the device for
//! its status every [`PROBE_INTERVAL`]; a device that stops answering, comes back or comes back as
//! another interface (a new ifindex: the process restarted) wakes the reconciler at once, so the
//! fresh device gets its whole configuration without waiting for the periodic resync.

use std::{sync::Arc, time::Duration};

use tokio::sync::{Notify, watch};

use crate::{datapath::Datapath, drain::Drain, metrics::Metrics, select::DatapathSlot};

/// How often the device is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

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
    slot: Arc<DatapathSlot>,
    notify: Arc<Notify>,
    tx: watch::Sender<DatapathHealth>,
    metrics: Metrics,
}

impl DatapathMonitor {
    /// A monitor of `slot` that wakes the reconciler through `notify`, and the receiver of its
    /// findings.
    pub fn new(
        slot: Arc<DatapathSlot>,
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

    /// One probe; returns whether the reconciler should be woken.
    pub fn probe(&self, ever_selected: &mut bool) -> bool {
        *ever_selected |= self.slot.selection().is_some();
        let health = match self.slot.status() {
            Ok(status) => DatapathHealth {
                starting: false,
                alive: true,
                ifindex: Some(status.ifindex),
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
        loop {
            if self.probe(&mut ever_selected) {
                self.notify.notify_one();
            }
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
        datapath::{DatapathKind, fake::FakeDatapath},
        select::Selection,
    };

    #[test]
    fn starting_alive_dead_and_back() {
        let slot = Arc::new(DatapathSlot::new("wm0"));
        let metrics = Metrics::new(&mut Registry::default());
        let (monitor, rx) = DatapathMonitor::new(slot.clone(), Arc::new(Notify::new()), metrics);
        let mut ever = false;
        assert!(!monitor.probe(&mut ever), "no wake-up while starting");
        assert!(rx.borrow().check().is_ok(), "starting is not dead");
        let selection = Selection {
            choice: DatapathChoice::Userspace,
            kind: DatapathKind::Userspace,
            reason: "requested",
            message: String::new(),
        };
        slot.set(Arc::new(FakeDatapath::new("wm0")), selection.clone());
        assert!(
            monitor.probe(&mut ever),
            "a device that answers wakes the reconciler"
        );
        assert!(rx.borrow().alive);
        assert!(!monitor.probe(&mut ever), "nothing new");
        slot.clear();
        assert!(monitor.probe(&mut ever));
        let error = rx.borrow().check().unwrap_err();
        assert!(error.contains("wm0"), "{error}");
        slot.set(Arc::new(FakeDatapath::new("wm0")), selection);
        assert!(monitor.probe(&mut ever));
        assert!(rx.borrow().check().is_ok());
    }
}
