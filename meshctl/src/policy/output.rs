//! Rendering probe results: a reachability matrix per port, or JSON.

use std::{collections::BTreeMap, io::Write};

use serde::Serialize;
use wiremesh_policy::{Cluster, Family, PodId};

use super::{ProbePort, probe::Probe};

#[derive(Serialize)]
struct JsonProbe {
    from: String,
    to: String,
    port: String,
    /// `ipv4`, `ipv6`, or null when the pods share no family.
    family: Option<String>,
    allowed: bool,
}

#[derive(Serialize)]
struct JsonOut {
    probes: Vec<JsonProbe>,
}

/// `{"probes":[{"from":"ns/pod","to":"ns/pod","port":"tcp/80","family":"ipv4","allowed":true},
/// ...]}`: one probe per family the pair shares.
pub fn json(w: &mut impl Write, cluster: &Cluster, probes: &[Probe]) -> anyhow::Result<()> {
    let out = JsonOut {
        probes: probes
            .iter()
            .map(|p| JsonProbe {
                from: cluster.pod(p.from).key(),
                to: cluster.pod(p.to).key(),
                port: p.port.to_string(),
                family: p.family.map(|f| f.to_string()),
                allowed: p.allowed,
            })
            .collect(),
    };
    serde_json::to_writer(&mut *w, &out)?;
    writeln!(w)?;
    Ok(())
}

/// A pair's cell from its probes (one per family it shares): `x` allowed over every one, `.`
/// over none, `4` or `6` over that family only.
fn cell(probes: &[&Probe]) -> char {
    let allowed: Vec<Option<Family>> = probes
        .iter()
        .filter(|p| p.allowed)
        .map(|p| p.family)
        .collect();
    if allowed.is_empty() {
        '.'
    } else if allowed.len() == probes.len() {
        'x'
    } else {
        match allowed[..] {
            [Some(Family::V4)] => '4',
            [Some(Family::V6)] => '6',
            _ => 'x',
        }
    }
}

/// One matrix per port: rows are sources, columns destinations (numbered as in the pod list),
/// `x` allowed, `.` denied, `4`/`6` allowed over IPv4/IPv6 only (dual-stack pods), `-` the pod
/// itself (not probed).
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
    let addresses: Vec<String> = pods
        .iter()
        .map(|p| {
            let ips: Vec<String> = p.ips().map(|ip| ip.to_string()).collect();
            if ips.is_empty() {
                "no IP".to_string()
            } else {
                ips.join(", ")
            }
        })
        .collect();
    let ip_width = addresses.iter().map(String::len).max().unwrap_or(0).max(15);
    writeln!(w, "pods:")?;
    for (i, p) in pods.iter().enumerate() {
        writeln!(
            w,
            "  {:>width$}  {:<name_width$}  {:<ip_width$}  identity {}",
            i + 1,
            p.key(),
            addresses[i],
            cluster.identity(PodId(i))
        )?;
    }
    for port in ports {
        let mut pairs: BTreeMap<(PodId, PodId), Vec<&Probe>> = BTreeMap::new();
        for p in probes.iter().filter(|p| p.port == *port) {
            pairs.entry((p.from, p.to)).or_default().push(p);
        }
        let mut cells = vec![vec!['-'; n]; n];
        let (mut allowed, mut one_family) = (0, 0);
        for ((from, to), probes) in &pairs {
            let c = cell(probes);
            cells[from.0][to.0] = c;
            allowed += usize::from(c == 'x');
            one_family += usize::from(c == '4' || c == '6');
        }
        let total = pairs.len();
        writeln!(w)?;
        if one_family == 0 {
            writeln!(
                w,
                "{port}: {allowed} of {total} pairs allowed (rows: from, columns: to; x allowed, . denied)"
            )?;
        } else {
            writeln!(
                w,
                "{port}: {allowed} of {total} pairs allowed, {one_family} over one family only \
                 (rows: from, columns: to; x allowed, . denied, 4/6 allowed over IPv4/IPv6 only)"
            )?;
        }
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
