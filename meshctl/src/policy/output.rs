//! Rendering probe results: a reachability matrix per port, or JSON.

use std::io::Write;

use serde::Serialize;
use wiremesh_policy::{Cluster, PodId};

use super::{ProbePort, probe::Probe};

#[derive(Serialize)]
struct JsonProbe {
    from: String,
    to: String,
    port: String,
    allowed: bool,
}

#[derive(Serialize)]
struct JsonOut {
    probes: Vec<JsonProbe>,
}

/// `{"probes":[{"from":"ns/pod","to":"ns/pod","port":"tcp/80","allowed":true}, ...]}`.
pub fn json(w: &mut impl Write, cluster: &Cluster, probes: &[Probe]) -> anyhow::Result<()> {
    let out = JsonOut {
        probes: probes
            .iter()
            .map(|p| JsonProbe {
                from: cluster.pod(p.from).key(),
                to: cluster.pod(p.to).key(),
                port: p.port.to_string(),
                allowed: p.allowed,
            })
            .collect(),
    };
    serde_json::to_writer(&mut *w, &out)?;
    writeln!(w)?;
    Ok(())
}

/// One matrix per port: rows are sources, columns destinations (numbered as in the pod list),
/// `x` allowed, `.` denied, `-` the pod itself (not probed).
pub fn table(
    w: &mut impl Write,
    cluster: &Cluster,
    ports: &[ProbePort],
    probes: &[Probe],
) -> anyhow::Result<()> {
    let pods = cluster.pods();
    let n = pods.len();
    let width = n.to_string().len();
    let name_width = pods.iter().map(|p| p.key().len()).max().unwrap_or(0);
    writeln!(w, "pods:")?;
    for (i, p) in pods.iter().enumerate() {
        let ip =
            p.ip.map_or_else(|| "no IP".to_string(), |ip| ip.to_string());
        writeln!(
            w,
            "  {:>width$}  {:<name_width$}  {ip:<15}  identity {}",
            i + 1,
            p.key(),
            cluster.identity(PodId(i))
        )?;
    }
    for port in ports {
        let mut cells = vec![vec!['-'; n]; n];
        let (mut allowed, mut total) = (0, 0);
        for p in probes.iter().filter(|p| p.port == *port) {
            cells[p.from.0][p.to.0] = if p.allowed { 'x' } else { '.' };
            total += 1;
            allowed += usize::from(p.allowed);
        }
        writeln!(w)?;
        writeln!(
            w,
            "{port}: {allowed} of {total} pairs allowed (rows: from, columns: to; x allowed, . denied)"
        )?;
        let header: Vec<String> = (1..=n).map(|i| format!("{i:>width$}")).collect();
        writeln!(
            w,
            "  {:width$}  {:name_width$}  {}",
            "",
            "",
            header.join(" ")
        )?;
        for (i, p) in pods.iter().enumerate() {
            let row: Vec<String> = cells[i].iter().map(|c| format!("{c:>width$}")).collect();
            writeln!(
                w,
                "  {:>width$}  {:<name_width$}  {}",
                i + 1,
                p.key(),
                row.join(" ")
            )?;
        }
    }
    Ok(())
}
