//! One agent's encryption coverage over a sliding window, for the metrics
//! `wiremesh_flow_coverage_ratio` and `wiremesh_flow_coverage_flows{class}`: of the flows
//! (5-tuples) this node recorded within the window, how many were cross-node pod flows and how
//! many of those went through a WireGuard session. A flow is counted the way the compliance
//! report counts it ([`FlowClass::of_records`]): dropped if any of its records in the window
//! says dropped, else plaintext if any cross-node record says not encrypted, else encrypted if
//! it has a cross-node record; only its records within the window count, so a flow that was
//! plaintext once and is encrypted since leaves the plaintext count when that record ages out.
//!
//! Bounded: at most `capacity` flows are tracked; beyond it the least recently seen go first.

use std::{collections::HashMap, time::Duration};

use crate::flows::{FiveTuple, Flow, FlowClass};

/// Flows in the window by class.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CoverageCounts {
    /// Indexed like [`FlowClass::ALL`].
    by_class: [u64; 4],
}

impl CoverageCounts {
    /// Flows of `class`.
    pub fn get(&self, class: FlowClass) -> u64 {
        self.by_class[class as usize]
    }

    /// Cross-node pod flows (encrypted + plaintext), the denominator of the coverage.
    pub fn cross_node(&self) -> u64 {
        self.get(FlowClass::Encrypted) + self.get(FlowClass::Plaintext)
    }

    /// Encrypted / cross-node, `None` without a cross-node flow (as the report's `null`).
    pub fn ratio(&self) -> Option<f64> {
        let all = self.cross_node();
        (all > 0).then(|| self.get(FlowClass::Encrypted) as f64 / all as f64)
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct CoverageWindow {
    window: u64,
    capacity: usize,
    /// Per flow, Unix seconds of its last record of each class (0: none), indexed like
    /// [`FlowClass::ALL`].
    flows: HashMap<FiveTuple, [u64; 4]>,
    /// The latest record time seen (the clock for pruning on overflow).
    latest: u64,
    evicted: u64,
}

impl CoverageWindow {
    /// A window of `window` (at least one second) holding at most `capacity` flows.
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window: window.as_secs().max(1),
            capacity: capacity.max(1),
            flows: HashMap::new(),
            latest: 0,
            evicted: 0,
        }
    }

    /// The window's length.
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.window)
    }

    /// Flows evicted early to stay within the capacity.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Flows tracked.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no flow is tracked.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Adds records (each at its `last_seen`).
    pub fn add<'a>(&mut self, records: impl IntoIterator<Item = &'a Flow>) {
        for r in records {
            let seen = self.flows.entry(r.five_tuple()).or_default();
            let slot = &mut seen[FlowClass::of(r) as usize];
            *slot = (*slot).max(r.last_seen);
            self.latest = self.latest.max(r.last_seen);
        }
        if self.flows.len() > self.capacity {
            self.prune(self.latest);
        }
        if self.flows.len() > self.capacity {
            // Down to 90 % at once, so a steady overflow does not sort on every record.
            let keep = self.capacity - self.capacity / 10;
            let mut by_age: Vec<(u64, FiveTuple)> = self
                .flows
                .iter()
                .map(|(k, v)| (v.iter().copied().max().unwrap_or(0), *k))
                .collect();
            by_age.sort_unstable();
            let excess = self.flows.len() - keep;
            for (_, k) in by_age.into_iter().take(excess) {
                self.flows.remove(&k);
                self.evicted += 1;
            }
        }
    }

    fn prune(&mut self, now: u64) {
        let cutoff = now.saturating_sub(self.window);
        self.flows.retain(|_, seen| {
            for t in seen.iter_mut() {
                if *t < cutoff {
                    *t = 0;
                }
            }
            seen.iter().any(|t| *t > 0)
        });
    }

    /// The flows whose records fall within the window ending at `now` (Unix seconds), by
    /// class; flows with nothing left in the window are forgotten.
    pub fn counts(&mut self, now: u64) -> CoverageCounts {
        self.prune(now);
        let mut out = CoverageCounts::default();
        for seen in self.flows.values() {
            let class = FlowClass::ALL
                .iter()
                .rev()
                .find(|c| seen[**c as usize] > 0)
                .copied()
                .unwrap_or(FlowClass::Other);
            out.by_class[class as usize] += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::flows::{Encryption, Endpoint, Ip, Layer4, Ports, reason};

    fn record(sport: u16, cross_node: bool, encrypted: bool, dropped: bool, at: u64) -> Flow {
        Flow {
            time: String::new(),
            verdict: if dropped { "DROPPED" } else { "FORWARDED" }.into(),
            drop_reason_desc: None,
            ip: Ip {
                source: Ipv4Addr::new(10, 244, 1, 2).into(),
                destination: Ipv4Addr::new(10, 244, 2, 2).into(),
                ip_version: "IPv4".into(),
                encrypted,
            },
            l4: Layer4::Udp(Ports {
                source_port: sport,
                destination_port: 7001,
            }),
            source: Endpoint::default(),
            destination: Endpoint::default(),
            node_name: "node-1".into(),
            traffic_direction: "EGRESS".into(),
            flow_type: "L3_L4".into(),
            egress_denied_by: Vec::new(),
            ingress_denied_by: Vec::new(),
            encryption: Encryption {
                encrypted,
                reason: if encrypted {
                    reason::TUNNEL
                } else {
                    reason::PERMISSIVE_NO_TUNNEL
                }
                .into(),
                peer_node: None,
                peer_key_fingerprint: None,
                peer_key_generation: None,
                handshake_age_seconds: None,
                cipher_suite: None,
            },
            wiremesh_verdict: String::new(),
            hook: "from-pod".into(),
            cross_node,
            packets: 1,
            bytes: 100,
            pending_packets: 0,
            pending_bytes: 0,
            first_seen: at,
            last_seen: at,
        }
    }

    #[test]
    fn counts_each_five_tuple_once_by_its_worst_record() {
        let mut w = CoverageWindow::new(Duration::from_secs(300), 100);
        w.add(&[
            // Two records of one encrypted flow (e.g. two verdict records, same 5-tuple).
            record(1, true, true, false, 1000),
            record(1, true, true, false, 1001),
            record(2, true, true, false, 1000),
            // Encrypted once, then plaintext: plaintext.
            record(3, true, true, false, 1000),
            record(3, true, false, false, 1002),
            // Forwarded here, dropped by the receiver's policy as seen by this node: dropped.
            record(4, true, true, false, 1000),
            record(4, true, false, true, 1000),
            // Same node.
            record(5, false, false, false, 1000),
        ]);
        let c = w.counts(1010);
        assert_eq!(c.get(FlowClass::Encrypted), 2);
        assert_eq!(c.get(FlowClass::Plaintext), 1);
        assert_eq!(c.get(FlowClass::Dropped), 1);
        assert_eq!(c.get(FlowClass::Other), 1);
        assert_eq!(c.cross_node(), 3);
        assert_eq!(c.ratio(), Some(2.0 / 3.0));
    }

    #[test]
    fn records_leave_the_window_and_classes_recover() {
        let mut w = CoverageWindow::new(Duration::from_secs(60), 100);
        w.add(&[record(1, true, false, false, 1000)]);
        assert_eq!(w.counts(1030).ratio(), Some(0.0));
        // Encrypted since: the plaintext record ages out, the flow becomes encrypted.
        w.add(&[record(1, true, true, false, 1050)]);
        assert_eq!(w.counts(1059).get(FlowClass::Plaintext), 1);
        assert_eq!(w.counts(1061).ratio(), Some(1.0));
        // Nothing left: no ratio, nothing tracked.
        let c = w.counts(2000);
        assert_eq!(c.ratio(), None);
        assert_eq!(c.cross_node(), 0);
        assert!(w.is_empty());
    }

    #[test]
    fn stays_within_its_capacity_dropping_the_least_recent() {
        let mut w = CoverageWindow::new(Duration::from_secs(3600), 10);
        let records: Vec<Flow> = (0..25)
            .map(|i| record(100 + i, true, true, false, 1000 + u64::from(i)))
            .collect();
        w.add(&records);
        assert!(w.len() <= 10, "{} flows tracked", w.len());
        assert_eq!(w.evicted(), 25 - w.len() as u64);
        // The newest survives.
        w.add(&[record(124, true, false, false, 1030)]);
        assert_eq!(w.counts(1030).get(FlowClass::Plaintext), 1);
    }
}
