//! Probing every ordered pod pair: the answer is what the datapath enforces (the compiled map
//! entries through the lookup simulator), cross-checked against the reference evaluator.

use std::{fmt, str::FromStr};

use anyhow::bail;
use wiremesh_policy::{Cluster, CompileWarning, Endpoint, PacketEnd, PodId, Protocol, compile};

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
pub struct Probe {
    pub from: PodId,
    pub to: PodId,
    pub port: ProbePort,
    pub allowed: bool,
}

pub struct ProbeResult {
    pub probes: Vec<Probe>,
    pub warnings: Vec<String>,
}

/// Probes every ordered pair of distinct pods for every port, in file order: port, then source,
/// then destination.
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
    let end = |id: PodId| PacketEnd {
        identity: cluster.identity(id),
        ip: cluster.pod(id).ip,
    };
    let n = cluster.pods().len();
    let mut probes = Vec::with_capacity(ports.len() * n * n.saturating_sub(1));
    for port in ports {
        for from in (0..n).map(PodId) {
            for to in (0..n).map(PodId).filter(|t| *t != from) {
                let allowed = compiled.decide(&end(from), &end(to), port.protocol, port.port);
                let reference = cluster
                    .allowed(
                        &Endpoint::Pod(from),
                        &Endpoint::Pod(to),
                        port.protocol,
                        port.port,
                    )
                    .allowed();
                if allowed != reference && warnings.is_empty() {
                    bail!(
                        "internal error: compiled maps and evaluator disagree for {} -> {} {port}",
                        cluster.pod(from).key(),
                        cluster.pod(to).key()
                    );
                }
                probes.push(Probe {
                    from,
                    to,
                    port: *port,
                    allowed,
                });
            }
        }
    }
    Ok(ProbeResult { probes, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;

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
