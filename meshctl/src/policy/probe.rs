//! Probing every ordered pod pair: the answer is what the datapath enforces (the compiled map
//! entries through the lookup simulator), cross-checked against the reference evaluator.
//!
//! A packet carries addresses of one family, so a pair is probed once per family both pods have
//! an address of (dual-stack pods: IPv4 and IPv6), each end at its address of that family: an
//! ipBlock may admit a pod's IPv6 address and not its IPv4 one. A pair without a common family
//! (a pod without an address yet) is probed once, by the pods' first addresses.

use std::{fmt, str::FromStr};

use anyhow::bail;
use wiremesh_policy::{
    Cluster, CompileWarning, Endpoint, Family, PacketEnd, PodId, Protocol, compile,
};

/// A protocol and port to probe, written `tcp/80`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbePort {
    /// Protocol.
    pub protocol: Protocol,
    /// Port (1..65535).
    pub port: u16,
}

impl Default for ProbePort {
    fn default() -> Self {
        Self {
            protocol: Protocol::Tcp,
            port: 80,
        }
    }
}

impl FromStr for ProbePort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (proto, port) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: want PROTO/PORT like tcp/80"))?;
        let protocol = proto.parse()?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: port must be 1..65535"))?;
        Ok(Self { protocol, port })
    }
}

impl fmt::Display for ProbePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol, self.port)
    }
}

/// One probe result.
#[derive(Debug, PartialEq, Eq)]
pub struct Probe {
    pub from: PodId,
    pub to: PodId,
    pub port: ProbePort,
    /// The family probed; `None` when the pods share none (probed by their first addresses).
    pub family: Option<Family>,
    pub allowed: bool,
}

pub struct ProbeResult {
    pub probes: Vec<Probe>,
    pub warnings: Vec<String>,
}

/// Probes every ordered pair of distinct pods for every port and every family they share (module
/// docs), in file order: port, then source, then destination, then IPv4 before IPv6.
pub fn probe(cluster: &Cluster, ports: &[ProbePort]) -> anyhow::Result<ProbeResult> {
    let compiled = compile(cluster);
    let warnings: Vec<String> = compiled
        .warnings
        .iter()
        .map(|w| match w {
            CompileWarning::NamedPortConflict {
                name,
                protocol,
                pods,
                ..
            } => format!(
                "pods {} share an identity but disagree on named port {name}/{protocol}; \
                 rules naming it do not match them",
                pods.join(", ")
            ),
        })
        .collect();
    // The packet end of a pod at its address of `family` (its first address for `None`).
    let end = |id: PodId, family: Option<Family>| {
        let pod = cluster.pod(id);
        PacketEnd {
            identity: cluster.identity(id),
            ip: family.map_or(pod.ip, |f| pod.ip_of(f)),
        }
    };
    let n = cluster.pods().len();
    let mut probes = Vec::with_capacity(ports.len() * n * n.saturating_sub(1));
    for port in ports {
        for from in (0..n).map(PodId) {
            for to in (0..n).map(PodId).filter(|t| *t != from) {
                let (src, dst) = (cluster.pod(from), cluster.pod(to));
                let mut families: Vec<Option<Family>> = Family::ALL
                    .into_iter()
                    .filter(|f| src.ip_of(*f).is_some() && dst.ip_of(*f).is_some())
                    .map(Some)
                    .collect();
                if families.is_empty() {
                    families.push(None);
                }
                for family in families {
                    let (s, d) = (Endpoint::Pod(from), Endpoint::Pod(to));
                    let (proto, p) = (port.protocol, port.port);
                    let allowed = compiled.decide(&end(from, family), &end(to, family), proto, p);
                    let reference = match family {
                        Some(f) => cluster.allowed_over(&s, &d, f, proto, p),
                        None => Some(cluster.allowed(&s, &d, proto, p)),
                    }
                    .is_some_and(|v| v.allowed());
                    if allowed != reference && warnings.is_empty() {
                        bail!(
                            "internal error: compiled maps and evaluator disagree for {} -> {} \
                             {port}{}",
                            src.key(),
                            dst.key(),
                            family.map(|f| format!(" over {f}")).unwrap_or_default()
                        );
                    }
                    probes.push(Probe {
                        from,
                        to,
                        port: *port,
                        family,
                        allowed,
                    });
                }
            }
        }
    }
    Ok(ProbeResult { probes, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13 leftover: `db` admits tcp/5432 only from fd00:10:244:1::/64, the IPv6 podCIDR
    /// holding `api`'s second address. `api` and `db` are dual stack, `batch` has an IPv4
    /// address only, `pending` none yet.
    const DUAL_STACK: &str = include_str!("../../../examples/policy/dual-stack.yaml");

    /// (from, to, family, allowed) of every probe to tcp/5432.
    fn verdicts(cluster: &Cluster) -> Vec<(String, String, Option<Family>, bool)> {
        let port = "tcp/5432".parse().unwrap();
        probe(cluster, &[port])
            .unwrap()
            .probes
            .into_iter()
            .map(|p| {
                (
                    cluster.pod(p.from).name.clone(),
                    cluster.pod(p.to).name.clone(),
                    p.family,
                    p.allowed,
                )
            })
            .collect()
    }

    #[test]
    fn a_dual_stack_pair_is_probed_per_family_at_its_addresses() {
        let cluster = wiremesh_policy::load_manifest(DUAL_STACK).unwrap();
        let result = verdicts(&cluster);
        let to_db: Vec<_> = result
            .iter()
            .filter(|(_, to, _, _)| to == "db")
            .map(|(from, _, family, allowed)| (from.as_str(), *family, *allowed))
            .collect();
        assert_eq!(
            to_db,
            [
                // The ipBlock holds api's IPv6 address only: its IPv4 traffic is denied.
                ("api", Some(Family::V4), false),
                ("api", Some(Family::V6), true),
                // batch has no IPv6 address, so no IPv6 probe; its IPv4 address is not in the
                // block.
                ("batch", Some(Family::V4), false),
                // pending has no address: probed once, by identity (no ipBlock matches it).
                ("pending", None, false),
            ]
        );
        // db -> api: neither isolated for it, both families allowed; api -> batch: IPv4 only.
        let pair = |from: &str, to: &str| -> Vec<(Option<Family>, bool)> {
            result
                .iter()
                .filter(|(f, t, _, _)| f == from && t == to)
                .map(|(_, _, family, allowed)| (*family, *allowed))
                .collect()
        };
        assert_eq!(
            pair("db", "api"),
            [(Some(Family::V4), true), (Some(Family::V6), true)]
        );
        assert_eq!(pair("api", "batch"), [(Some(Family::V4), true)]);
        // 12 ordered pairs: api<->db twice (two families), the rest once.
        assert_eq!(result.len(), 14);
    }

    #[test]
    fn the_table_marks_a_pair_allowed_over_one_family_only() {
        let cluster = wiremesh_policy::load_manifest(DUAL_STACK).unwrap();
        let port: ProbePort = "tcp/5432".parse().unwrap();
        let probes = probe(&cluster, &[port]).unwrap().probes;
        let mut out = Vec::new();
        super::super::output::table(&mut out, &cluster, &[port], &probes).unwrap();
        let text = String::from_utf8(out).unwrap();
        for line in [
            "  1  shop/api      10.244.1.10, fd00:10:244:1::a  identity",
            "  4  shop/pending  no IP                          identity",
            "tcp/5432: 9 of 12 pairs allowed, 1 over one family only",
            "  1  shop/api      - 6 x x",
            "  3  shop/batch    x . - x",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn parses_ports() {
        assert_eq!(
            "udp/53".parse::<ProbePort>().unwrap(),
            ProbePort {
                protocol: Protocol::Udp,
                port: 53
            }
        );
        assert_eq!("SCTP/9".parse::<ProbePort>().unwrap().to_string(), "sctp/9");
        assert!("tcp/0".parse::<ProbePort>().is_err());
        assert!("tcp/65536".parse::<ProbePort>().is_err());
        assert!("icmp/1".parse::<ProbePort>().is_err());
        assert!("80".parse::<ProbePort>().is_err());
    }
}
