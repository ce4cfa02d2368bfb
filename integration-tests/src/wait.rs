//! Deadline-bounded polling for tests: wait until a condition holds, never a bare sleep.

use std::{
    future::Future,
    time::{Duration, Instant},
};

/// A condition that did not hold before its deadline.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {timeout:?} waiting for {what}; last observation: {last}")]
pub struct Timeout {
    /// What was awaited.
    pub what: String,
    /// The deadline.
    pub timeout: Duration,
    /// The last reason the condition did not hold.
    pub last: String,
}

/// Polls `check` every `interval` until it returns `Ok(value)` or `timeout` passes. `Err(reason)`
/// means "not yet"; the last reason is reported on timeout.
pub async fn until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> Result<T, Timeout>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(v) => return Ok(v),
            Err(reason) => reason,
        };
        if Instant::now() >= deadline {
            return Err(Timeout {
                what: what.to_owned(),
                timeout,
                last,
            });
        }
        tokio::time::sleep(interval).await;
    }
}

/// The blocking form of [`until`].
pub fn until_blocking<T, F>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> Result<T, Timeout>
where
    F: FnMut() -> Result<T, String>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check() {
            Ok(v) => return Ok(v),
            Err(reason) => reason,
        };
        if Instant::now() >= deadline {
            return Err(Timeout {
                what: what.to_owned(),
                timeout,
                last,
            });
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_last_reason() {
        let mut n = 0;
        let err = until_blocking(
            "n to reach 1000",
            Duration::from_millis(50),
            Duration::from_millis(5),
            || {
                n += 1;
                if n >= 1000 {
                    Ok(n)
                } else {
                    Err(format!("n = {n}"))
                }
            },
        )
        .expect_err("cannot reach 1000 in 50 ms at 5 ms per step");
        assert!(err.last.starts_with("n = "), "{err}");
        assert_eq!(
            until_blocking("ok", Duration::ZERO, Duration::ZERO, || Ok::<_, String>(7))
                .expect("ready"),
            7
        );
    }
}
