//! Tunnel byte counters for the metrics, from the WireGuard devices' per-peer counters (what
//! `wg show <if> transfer` prints): `wiremesh_tunnel_{receive,transmit}_bytes_total` summed over
//! every peer of both worlds (during a rotation the next world's device carries traffic too),
//! and, with `--per-peer-metrics`, `wiremesh_peer_{receive,transmit}_bytes_total{peer}` per peer
//! node.
//!
//! Device counters are not the agent's: they start at zero when a peer is (re)added or the
//! device restarts, and they carry bytes from before this agent started. So each reading is
//! turned into increments: the first reading of a device in this process is the baseline (the
//! counters count from the agent's start, so a restarted agent does not show a burst of old
//! traffic), a peer that appears later counts from zero, and a value below the last one is a
//! reset (the new value is the increment).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::IpNet;
use wiremesh_keyexchange::PublicKey;

use crate::{
    datapath::DeviceStatus,
    metrics::{Metrics, PeerLabels},
};

/// See the module docs.
#[derive(Debug, Default)]
pub struct TunnelStats {
    per_peer: bool,
    /// Devices read at least once (their first reading was the baseline).
    primed: BTreeSet<String>,
    /// Last (rx, tx) per (device, peer key).
    last: HashMap<(String, PublicKey), (u64, u64)>,
    /// Peer nodes with per-peer series.
    exported: BTreeSet<String>,
}

impl TunnelStats {
    /// `per_peer`: also the per-peer series (`--per-peer-metrics`).
    pub fn new(per_peer: bool) -> Self {
        Self {
            per_peer,
            ..Self::default()
        }
    }

    /// Feeds one reading: `devices` are the current world's device first, then the next
    /// world's (if any); `configured` the current world's (node, key) pairs. A peer of another
    /// device is named by the current-world peer with the same allowed IPs (both worlds hold
    /// every peer with its pod prefixes). Returns the (receive, transmit) increments summed.
    pub fn observe(
        &mut self,
        devices: &[&DeviceStatus],
        configured: &[(String, PublicKey)],
        metrics: &Metrics,
    ) -> (u64, u64) {
        let mut by_key: HashMap<PublicKey, String> = configured
            .iter()
            .map(|(node, key)| (*key, node.clone()))
            .collect();
        if let Some(current) = devices.first() {
            // The other world's peer is the node of the current world's first peer (in device
            // order) sharing an allowed IP with it: looked up by IP, not by a scan of the current
            // peers per peer (O(N^2) during a rotation at thousands of peers).
            let mut by_ip: HashMap<&IpNet, (usize, &PublicKey)> = HashMap::new();
            for (index, c) in current.peers.iter().enumerate() {
                for ip in &c.allowed_ips {
                    by_ip.entry(ip).or_insert((index, &c.public_key));
                }
            }
            for other in &devices[1..] {
                for p in &other.peers {
                    if by_key.contains_key(&p.public_key) {
                        continue;
                    }
                    let named = p
                        .allowed_ips
                        .iter()
                        .filter_map(|ip| by_ip.get(ip))
                        .min_by_key(|(index, _)| *index);
                    if let Some(node) = named.and_then(|(_, key)| by_key.get(*key)).cloned() {
                        by_key.insert(p.public_key, node);
                    }
                }
            }
        }

        let mut seen = BTreeSet::new();
        let mut per_node: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let (mut rx_sum, mut tx_sum) = (0, 0);
        for device in devices {
            let baseline = self.primed.insert(device.ifname.clone());
            for p in &device.peers {
                let id = (device.ifname.clone(), p.public_key);
                let (rx, tx) = match self.last.get(&id) {
                    _ if baseline => (0, 0),
                    Some(&(lrx, ltx)) => (increment(lrx, p.rx_bytes), increment(ltx, p.tx_bytes)),
                    None => (p.rx_bytes, p.tx_bytes),
                };
                self.last.insert(id.clone(), (p.rx_bytes, p.tx_bytes));
                seen.insert(id);
                rx_sum += rx;
                tx_sum += tx;
                if let Some(node) = by_key.get(&p.public_key) {
                    let e = per_node.entry(node.clone()).or_default();
                    e.0 += rx;
                    e.1 += tx;
                }
            }
        }
        // Peers gone from their device: a later return counts from zero.
        self.last.retain(|id, _| seen.contains(id));

        metrics.tunnel_receive_bytes.inc_by(rx_sum);
        metrics.tunnel_transmit_bytes.inc_by(tx_sum);
        if self.per_peer {
            for (node, (rx, tx)) in &per_node {
                let labels = PeerLabels { peer: node.clone() };
                metrics
                    .peer_receive_bytes
                    .get_or_create(&labels)
                    .inc_by(*rx);
                metrics
                    .peer_transmit_bytes
                    .get_or_create(&labels)
                    .inc_by(*tx);
            }
            let now: BTreeSet<String> = per_node.into_keys().collect();
            for gone in self.exported.difference(&now) {
                let labels = PeerLabels { peer: gone.clone() };
                metrics.peer_receive_bytes.remove(&labels);
                metrics.peer_transmit_bytes.remove(&labels);
            }
            self.exported = now;
        }
        (rx_sum, tx_sum)
    }
}

/// The increment of a device counter from `last` to `now` (a lower value is a reset to zero).
fn increment(last: u64, now: u64) -> u64 {
    if now >= last { now - last } else { now }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::text::encode, registry::Registry};
    use wiremesh_keyexchange::PrivateKey;

    use super::*;
    use crate::datapath::{DatapathKind, PeerStatus};

    fn key() -> PublicKey {
        PrivateKey::generate().unwrap().public_key()
    }

    fn peer(key: PublicKey, prefix: &str, rx: u64, tx: u64) -> PeerStatus {
        PeerStatus {
            public_key: key,
            endpoint: None,
            allowed_ips: vec![prefix.parse().unwrap()],
            persistent_keepalive: None,
            has_preshared_key: false,
            last_handshake: None,
            rx_bytes: rx,
            tx_bytes: tx,
        }
    }

    fn device(ifname: &str, peers: Vec<PeerStatus>) -> DeviceStatus {
        DeviceStatus {
            kind: DatapathKind::Userspace,
            ifname: ifname.into(),
            ifindex: 1,
            public_key: None,
            listen_port: 51871,
            fwmark: 0,
            mtu: 1420,
            peers,
        }
    }

    fn text(registry: &Registry) -> String {
        let mut t = String::new();
        encode(&mut t, registry).unwrap();
        t
    }

    #[test]
    fn counts_increments_from_the_first_reading_across_resets_and_worlds() {
        let mut registry = Registry::with_prefix("wiremesh");
        let metrics = Metrics::new(&mut registry);
        let mut stats = TunnelStats::new(true);
        let (k2, k3, k2_next) = (key(), key(), key());
        let configured = vec![("node-2".to_string(), k2), ("node-3".to_string(), k3)];

        // The first reading is the baseline: traffic from before the agent started is not new.
        let a = device(
            "wm0",
            vec![
                peer(k2, "10.244.2.0/24", 5_000, 7_000),
                peer(k3, "10.244.3.0/24", 100, 100),
            ],
        );
        assert_eq!(stats.observe(&[&a], &configured, &metrics), (0, 0));

        let a = device(
            "wm0",
            vec![
                peer(k2, "10.244.2.0/24", 6_000, 7_500),
                peer(k3, "10.244.3.0/24", 50, 100), // reset: 50 new bytes
            ],
        );
        assert_eq!(stats.observe(&[&a], &configured, &metrics), (1_050, 500));

        // A rotation's next world: node-2 under its next key, named by its allowed IPs; the
        // device is new to this process, so its first reading is again a baseline.
        let b = device("wm1", vec![peer(k2_next, "10.244.2.0/24", 10, 10)]);
        assert_eq!(stats.observe(&[&a, &b], &configured, &metrics), (0, 0));
        let b = device("wm1", vec![peer(k2_next, "10.244.2.0/24", 410, 210)]);
        assert_eq!(stats.observe(&[&a, &b], &configured, &metrics), (400, 200));

        assert_eq!(metrics.tunnel_receive_bytes.get(), 1_450);
        assert_eq!(metrics.tunnel_transmit_bytes.get(), 700);
        let t = text(&registry);
        assert!(
            t.contains("wiremesh_peer_receive_bytes_total{peer=\"node-2\"} 1400"),
            "{t}"
        );
        assert!(
            t.contains("wiremesh_peer_transmit_bytes_total{peer=\"node-2\"} 700"),
            "{t}"
        );
        assert!(
            t.contains("wiremesh_peer_receive_bytes_total{peer=\"node-3\"} 50"),
            "{t}"
        );

        // node-3 leaves: its series go; a peer added later counts from zero.
        let k4 = key();
        let configured = vec![("node-2".to_string(), k2), ("node-4".to_string(), k4)];
        let a = device(
            "wm0",
            vec![
                peer(k2, "10.244.2.0/24", 6_000, 7_500),
                peer(k4, "10.244.4.0/24", 30, 40),
            ],
        );
        assert_eq!(stats.observe(&[&a], &configured, &metrics), (30, 40));
        let t = text(&registry);
        assert!(!t.contains("peer=\"node-3\""), "{t}");
        assert!(
            t.contains("wiremesh_peer_receive_bytes_total{peer=\"node-4\"} 30"),
            "{t}"
        );
    }

    #[test]
    fn no_per_peer_series_unless_asked_for() {
        let mut registry = Registry::with_prefix("wiremesh");
        let metrics = Metrics::new(&mut registry);
        let mut stats = TunnelStats::new(false);
        let k2 = key();
        let configured = vec![("node-2".to_string(), k2)];
        stats.observe(
            &[&device("wm0", vec![peer(k2, "10.244.2.0/24", 0, 0)])],
            &configured,
            &metrics,
        );
        stats.observe(
            &[&device("wm0", vec![peer(k2, "10.244.2.0/24", 900, 800)])],
            &configured,
            &metrics,
        );
        let t = text(&registry);
        assert!(t.contains("wiremesh_tunnel_receive_bytes_total 900"), "{t}");
        assert!(
            t.contains("wiremesh_tunnel_transmit_bytes_total 800"),
            "{t}"
        );
        assert!(!t.contains("wiremesh_peer_receive_bytes"), "{t}");
    }
}
