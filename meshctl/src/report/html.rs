//! report.html: one self-contained page (inline style and SVG, no script, nothing fetched) an
//! auditor reads: the coverage headline, the node-pair matrix coloured by encryption, the
//! plaintext flows, drops by reason, the nodes' keys and their ages against the rotation policy,
//! the rotation history, the controls, the gaps, and the service dependency graph drawn from the
//! flows.

use std::{collections::BTreeSet, fmt::Write as _};

use super::Report;

const STYLE: &str = "body{font-family:sans-serif;margin:2em;color:#222;background:#fff}\
h1{margin-bottom:0}.sub{color:#666}\
.headline{font-size:2.2em;margin:.6em 0;padding:.4em .6em;border-radius:6px;display:inline-block}\
.good{background:#d6f5d6}.bad{background:#f9d0d0}.unknown{background:#eee}\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #bbb;padding:.3em .6em;text-align:left}\
th{background:#f3f3f3}td.enc{background:#8fd694}td.plain{background:#f08c8c}td.none{background:#eee}\
td.drop{background:#f5d67a}.mono{font-family:monospace}";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn table(out: &mut String, head: &[&str], rows: &[Vec<String>], empty: &str) {
    if rows.is_empty() {
        let _ = writeln!(out, "<p>{}</p>", esc(empty));
        return;
    }
    out.push_str("<table><tr>");
    for h in head {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr>\n");
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            let _ = write!(out, "<td>{}</td>", esc(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_string(), T::to_string)
}

/// The page of `report`.
pub fn render(report: &Report) -> String {
    let s = &report.summary;
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>wiremesh encryption report</title><style>{STYLE}</style></head><body>\n\
         <h1>wiremesh encryption report</h1>\n<p class=\"sub\">window {} to {}; generated {}; \
         cipher suite <span class=\"mono\">{}</span>; mode {}</p>\n",
        esc(&report.window.from),
        esc(&report.window.to),
        esc(&report.generated_at),
        esc(&report.cipher_suite),
        esc(&report.mode)
    );
    let class = match s.coverage {
        Some(c) if c >= 1.0 => "good",
        Some(_) => "bad",
        None => "unknown",
    };
    let _ = writeln!(
        out,
        "<div id=\"coverage\" class=\"headline {class}\">Encryption coverage {}: {} of {} \
         cross-node flows encrypted</div>\n<p>{} plaintext, {} dropped, {} other (same node or \
         not pod-to-pod); {} of {} nodes reached; {} gap(s).</p>",
        esc(&s.coverage_percent),
        s.encrypted_flows,
        s.cross_node_flows,
        s.plaintext_flows,
        s.dropped_flows,
        s.other_flows,
        s.nodes_reached,
        s.nodes_total,
        report.gaps.len()
    );

    out.push_str("<h2>Node pairs</h2>\n");
    matrix(&mut out, report);

    out.push_str("<h2>Plaintext flows</h2>\n");
    let rows: Vec<Vec<String>> = report
        .plaintext_flow_list
        .iter()
        .map(|p| {
            vec![
                p.source.clone(),
                p.destination.clone(),
                format!("{}/{}", p.protocol, p.destination_port),
                format!("{} -> {}", p.source_node, p.destination_node),
                p.reason.clone(),
                p.packets.to_string(),
                p.last_seen.clone(),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "source",
            "destination",
            "port",
            "nodes",
            "reason",
            "packets",
            "last seen",
        ],
        &rows,
        "No plaintext cross-node flow in the window.",
    );

    out.push_str("<h2>Dropped by reason</h2>\n");
    let rows: Vec<Vec<String>> = report
        .dropped_by_reason
        .iter()
        .map(|(r, c)| vec![r.clone(), c.flows.to_string(), c.packets.to_string()])
        .collect();
    table(
        &mut out,
        &["reason", "flows", "packets"],
        &rows,
        "Nothing dropped.",
    );

    let _ = writeln!(
        out,
        "<h2>Nodes and keys</h2>\n<p>Rotation policy: {}</p>",
        if report.key_rotation_interval.is_empty() {
            "no scheduled rotation (keyRotationInterval unset)".to_string()
        } else {
            format!("rotate every {}", esc(&report.key_rotation_interval))
        }
    );
    let limit = wiremesh_crds::parse_go_duration(&report.key_rotation_interval).ok();
    let rows: Vec<Vec<String>> = report
        .nodes
        .iter()
        .map(|n| {
            let age = match (n.key_age_seconds, limit) {
                (Some(a), Some(l)) if a > l.as_secs() => format!("{a} s (over policy)"),
                (Some(a), _) => format!("{a} s"),
                (None, _) => "-".into(),
            };
            vec![
                n.name.clone(),
                opt(&n.public_key_fingerprint),
                opt(&n.key_generation),
                age,
                format!("{}/{}", n.peers_up, n.peers_expected),
                opt(&n.datapath),
                n.mode.clone(),
                if n.reached { "yes" } else { "NO" }.into(),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "node",
            "key",
            "generation",
            "key age",
            "peers up",
            "datapath",
            "mode",
            "reached",
        ],
        &rows,
        "No nodes.",
    );

    out.push_str("<h2>Key rotations</h2>\n");
    let rows: Vec<Vec<String>> = report
        .rotations
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.phase.clone(),
                opt(&r.start),
                opt(&r.end),
                r.selected_nodes.join(", "),
                r.reason.clone(),
            ]
        })
        .collect();
    table(
        &mut out,
        &["name", "phase", "start", "end", "nodes", "reason"],
        &rows,
        "No key rotation recorded.",
    );

    out.push_str("<h2>Service dependencies</h2>\n");
    graph(&mut out, report);

    out.push_str("<h2>Controls</h2>\n");
    let rows: Vec<Vec<String>> = report
        .controls
        .iter()
        .map(|c| {
            vec![
                format!("{} {}", c.framework, c.id),
                c.title.clone(),
                c.status.clone(),
                c.evidence.join("; "),
            ]
        })
        .collect();
    table(
        &mut out,
        &["control", "title", "status", "evidence"],
        &rows,
        "",
    );

    out.push_str("<h2>Gaps</h2>\n");
    let rows: Vec<Vec<String>> = report
        .gaps
        .iter()
        .map(|g| {
            vec![
                g.kind.clone(),
                opt(&g.node),
                opt(&g.from),
                opt(&g.to),
                g.detail.clone(),
            ]
        })
        .collect();
    table(
        &mut out,
        &["kind", "node", "from", "to", "detail"],
        &rows,
        "None: every node answered for the whole window.",
    );
    let _ = writeln!(
        out,
        "<p class=\"sub mono\">digest {}</p>\n</body></html>",
        esc(&report.digest)
    );
    out
}

/// Source nodes down, destination nodes across; green: only encrypted, red: any plaintext.
fn matrix(out: &mut String, report: &Report) {
    let names: BTreeSet<&str> = report
        .nodes
        .iter()
        .map(|n| n.name.as_str())
        .chain(report.node_pairs.iter().map(|p| p.source_node.as_str()))
        .chain(
            report
                .node_pairs
                .iter()
                .map(|p| p.destination_node.as_str()),
        )
        .collect();
    out.push_str("<table><tr><th>from \\ to</th>");
    for n in &names {
        let _ = write!(out, "<th>{}</th>", esc(n));
    }
    out.push_str("</tr>\n");
    for src in &names {
        let _ = write!(out, "<tr><th>{}</th>", esc(src));
        for dst in &names {
            let pair = report
                .node_pairs
                .iter()
                .find(|p| p.source_node == *src && p.destination_node == *dst);
            let (class, text) = match pair {
                None => ("none", "-".to_string()),
                Some(p) if p.plaintext_flows > 0 => (
                    "plain",
                    format!(
                        "{} plaintext, {} encrypted",
                        p.plaintext_flows, p.encrypted_flows
                    ),
                ),
                Some(p) if p.encrypted_flows > 0 => {
                    ("enc", format!("{} encrypted", p.encrypted_flows))
                }
                Some(p) => ("drop", format!("{} dropped", p.dropped_flows)),
            };
            let _ = write!(out, "<td class=\"{class}\">{}</td>", esc(&text));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
}

/// Workloads on a circle, an arrow per pair that talked: green encrypted, red plaintext,
/// orange dashed dropped, grey same node.
fn graph(out: &mut String, report: &Report) {
    let names: Vec<&str> = report
        .services
        .iter()
        .flat_map(|e| [e.source.as_str(), e.destination.as_str()])
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if names.is_empty() {
        out.push_str("<p>No flows in the window.</p>\n");
        return;
    }
    let (w, h, r) = (760.0_f64, 520.0_f64, 200.0_f64);
    let pos = |i: usize| {
        let a = std::f64::consts::TAU * i as f64 / names.len() as f64;
        (w / 2.0 + r * a.cos(), h / 2.0 + r * a.sin())
    };
    let index = |n: &str| names.iter().position(|x| *x == n).unwrap_or(0);
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"service dependency graph\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"6\" \
         markerHeight=\"6\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" \
         fill=\"#555\"/></marker></defs>"
    );
    for e in report.services.iter().filter(|e| e.source != e.destination) {
        let (x1, y1) = pos(index(&e.source));
        let (x2, y2) = pos(index(&e.destination));
        let (colour, dash, what) = if e.plaintext_flows > 0 {
            ("#d33", "", "plaintext")
        } else if e.encrypted_flows > 0 {
            ("#2a2", "", "encrypted")
        } else if e.dropped_flows > 0 {
            ("#e90", " stroke-dasharray=\"6 4\"", "dropped")
        } else {
            ("#999", "", "same node")
        };
        let _ = writeln!(
            out,
            "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{colour}\" \
             stroke-width=\"2\"{dash} marker-end=\"url(#arrow)\"><title>{} to {}: {what}</title></line>",
            esc(&e.source),
            esc(&e.destination)
        );
    }
    for (i, n) in names.iter().enumerate() {
        let (x, y) = pos(i);
        let _ = writeln!(
            out,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"7\" fill=\"#36c\"/><text x=\"{:.1}\" \
             y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">{}</text>",
            x,
            y - 12.0,
            esc(n)
        );
    }
    out.push_str("<text x=\"10\" y=\"20\" font-size=\"12\" fill=\"#2a2\">green: encrypted</text>\
                  <text x=\"10\" y=\"36\" font-size=\"12\" fill=\"#d33\">red: plaintext</text>\
                  <text x=\"10\" y=\"52\" font-size=\"12\" fill=\"#e90\">orange dashed: dropped</text>\
                  <text x=\"10\" y=\"68\" font-size=\"12\" fill=\"#999\">grey: same node</text></svg>\n");
}
