//! Graceful shutdown. One [`Trigger`] is held by the app; every task holds a [`Drain`] and stops
//! taking new work when [`Drain::signaled`] completes. The app then waits for the tasks with a
//! deadline.

use tokio::sync::watch;

/// The side that starts the drain.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// A cheap, cloneable handle that tells a task to finish.
#[derive(Debug, Clone)]
pub struct Drain(watch::Receiver<bool>);

/// A connected trigger and drain.
pub fn channel() -> (Trigger, Drain) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Drain(rx))
}

impl Trigger {
    /// Tells every [`Drain`] to finish. Idempotent.
    pub fn start(&self) {
        self.0.send_replace(true);
    }
}

impl Drain {
    /// Completes once the drain has started (at once if it already has, or if the trigger is gone).
    pub async fn signaled(&mut self) {
        // An error means the trigger was dropped: treat it like a drain.
        let _ = self.0.wait_for(|draining| *draining).await;
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn signaled_completes_after_start_and_for_late_clones() {
        let (trigger, mut drain) = channel();
        let mut late = drain.clone();
        assert!(!drain.is_draining());
        let waiter = tokio::spawn(async move { drain.signaled().await });
        trigger.start();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("drain signaled within 5 s")
            .unwrap();
        assert!(late.is_draining());
        late.signaled().await;
    }

    #[tokio::test]
    async fn dropped_trigger_counts_as_drain() {
        let (trigger, mut drain) = channel();
        drop(trigger);
        tokio::time::timeout(Duration::from_secs(5), drain.signaled())
            .await
            .expect("signaled once the trigger is gone");
    }
}
