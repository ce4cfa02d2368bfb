//! NetworkPolicy semantics against hand-computed reachability tables, in the style of the
//! upstream netpol e2e truth tables: three namespaces x, y, z (labelled `ns: <name>`) with pods
//! a, b, c each (labelled `pod: <name>`; the b pods also `tier: backend`). Rows are sources,
//! columns destinations, `x` = allowed, `.` = denied. Every table is also checked against the
//! compiled map entries through the lookup simulator.

use std::net::IpAddr;

use wiremesh_policy::{Cluster, Endpoint, PodId, Protocol, compile, load_manifest};

const PODS: [&str; 9] = [
    "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
];

/// Namespaces x, y, z and pods: IP 10.0.<ns 1..3>.<pod 1..3>. Named ports: `http` is TCP 80 on
/// the a and b pods and TCP 81 on the c pods; `dns` is UDP 53 everywhere.
fn base() -> String {
    let mut out = String::new();
    for (ni, ns) in ["x", "y", "z"].iter().enumerate() {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    ns: {ns}\n"
        ));
        for (pi, pod) in ["a", "b", "c"].iter().enumerate() {
            let tier = if *pod == "b" {
                "\n    tier: backend"
            } else {
                ""
            };
            let http = if *pod == "c" { 81 } else { 80 };
            out.push_str(&format!(
                "---
apiVersion: v1
kind: Pod
metadata:
  name: {pod}
  namespace: {ns}
  labels:
    pod: {pod}{tier}
spec:
  containers:
  - name: main
    image: agnhost
    ports:
    - {{name: http, containerPort: {http}}}
    - {{name: dns, containerPort: 53, protocol: UDP}}
status:
  podIP: 10.0.{}.{}
",
                ni + 1,
                pi + 1
            ));
        }
    }
    out
}

fn cluster(policies: &str) -> Cluster {
    load_manifest(&format!("{}{policies}", base())).expect("manifest loads")
}

fn pod(c: &Cluster, key: &str) -> PodId {
    let (ns, name) = key.split_once('/').unwrap();
    c.find_pod(ns, name).unwrap()
}

fn parse_port(p: &str) -> (Protocol, u16) {
    let (proto, port) = p.split_once('/').unwrap();
    (proto.parse().unwrap(), port.parse().unwrap())
}

/// Asserts the evaluator's table for `port` (like `tcp/80`) and that the compiled entries agree.
#[track_caller]
fn assert_table(c: &Cluster, port: &str, expected: &str) {
    let (proto, port_n) = parse_port(port);
    let compiled = compile(c);
    assert!(compiled.warnings.is_empty(), "{:?}", compiled.warnings);
    let mut actual = String::new();
    let mut want = String::new();
    for line in expected.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (from, cells) = line.split_once(' ').unwrap();
        want.push_str(&format!("{from} {}\n", cells.replace(' ', "")));
    }
    for from in PODS {
        let mut row = String::new();
        for to in PODS {
            let (s, d) = (pod(c, from), pod(c, to));
            let allowed = c
                .allowed(&Endpoint::Pod(s), &Endpoint::Pod(d), proto, port_n)
                .allowed();
            let sim = compiled.decide(
                &compiled.packet_end(c.pod(s).ip.unwrap()),
                &compiled.packet_end(c.pod(d).ip.unwrap()),
                proto,
                port_n,
            );
            assert_eq!(allowed, sim, "{from} -> {to} {port}: evaluator vs compiled");
            row.push(if allowed { 'x' } else { '.' });
        }
        actual.push_str(&format!("{from} {row}\n"));
    }
    assert_eq!(
        actual, want,
        "\n{port}\nactual:\n{actual}\nexpected:\n{want}"
    );
}

/// The table in which every source sees the same `cells` (one row, like `... xxx xxx`): the
/// outcome depends on the destination only.
fn every_source(cells: &str) -> String {
    PODS.iter()
        .map(|from| format!("{from} {cells}\n"))
        .collect()
}

/// Everything open.
fn all() -> String {
    every_source("xxx xxx xxx")
}

#[test]
fn no_policy_allows_everything() {
    let c = cluster("");
    for p in ["tcp/80", "udp/53", "sctp/9"] {
        assert_table(&c, p, &all());
    }
}

#[test]
fn default_deny_ingress_in_one_namespace() {
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec:
  podSelector: {}
",
    );
    let t = &every_source("... xxx xxx");
    assert_table(&c, "tcp/80", t);
    assert_table(&c, "udp/53", t);
}

#[test]
fn default_deny_egress() {
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-egress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
",
    );
    let t = "
        x/a ... ... ...
        x/b ... ... ...
        x/c ... ... ...
        y/a xxx xxx xxx
        y/b xxx xxx xxx
        y/c xxx xxx xxx
        z/a xxx xxx xxx
        z/b xxx xxx xxx
        z/c xxx xxx xxx";
    assert_table(&c, "tcp/80", t);
}

#[test]
fn pod_selector_peer_is_the_policy_namespace() {
    // Into x/a only from pods labelled pod=b in x (not y/b, z/b).
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
",
    );
    assert_table(
        &c,
        "tcp/80",
        "
        x/a .xx xxx xxx
        x/b xxx xxx xxx
        x/c .xx xxx xxx
        y/a .xx xxx xxx
        y/b .xx xxx xxx
        y/c .xx xxx xxx
        z/a .xx xxx xxx
        z/b .xx xxx xxx
        z/c .xx xxx xxx",
    );
}

#[test]
fn namespace_selector_peer() {
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
",
    );
    assert_table(
        &c,
        "tcp/80",
        "
        x/a .xx xxx xxx
        x/b .xx xxx xxx
        x/c .xx xxx xxx
        y/a xxx xxx xxx
        y/b xxx xxx xxx
        y/c xxx xxx xxx
        z/a .xx xxx xxx
        z/b .xx xxx xxx
        z/c .xx xxx xxx",
    );
}

#[test]
fn namespace_and_pod_selector_in_one_peer_is_and() {
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-y-c, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector: {matchLabels: {pod: c}}
",
    );
    assert_table(
        &c,
        "tcp/80",
        "
        x/a .xx xxx xxx
        x/b .xx xxx xxx
        x/c .xx xxx xxx
        y/a .xx xxx xxx
        y/b .xx xxx xxx
        y/c xxx xxx xxx
        z/a .xx xxx xxx
        z/b .xx xxx xxx
        z/c .xx xxx xxx",
    );
}

#[test]
fn two_peers_are_or() {
    // namespace y (any pod) OR pod=c in the policy's namespace x.
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-y-or-c, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
    - podSelector: {matchLabels: {pod: c}}
",
    );
    assert_table(
        &c,
        "tcp/80",
        "
        x/a .xx xxx xxx
        x/b .xx xxx xxx
        x/c xxx xxx xxx
        y/a xxx xxx xxx
        y/b xxx xxx xxx
        y/c xxx xxx xxx
        z/a .xx xxx xxx
        z/b .xx xxx xxx
        z/c .xx xxx xxx",
    );
}

#[test]
fn match_expressions_all_operators() {
    // Subjects: pods without tier (DoesNotExist) in namespaces NotIn [z] -> x/a x/c y/a y/c.
    // Peers: pods with tier (Exists) whose pod label is In [b, c], in namespaces In [x, z]:
    // x/b and z/b.
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: exprs, namespace: x}
spec:
  podSelector:
    matchExpressions:
    - {key: tier, operator: DoesNotExist}
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions:
        - {key: ns, operator: In, values: [x, z]}
      podSelector:
        matchExpressions:
        - {key: tier, operator: Exists}
        - {key: pod, operator: In, values: [b, c]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: exprs, namespace: y}
spec:
  podSelector:
    matchExpressions:
    - {key: tier, operator: DoesNotExist}
  ingress:
  - from:
    - namespaceSelector:
        matchExpressions:
        - {key: ns, operator: NotIn, values: [x, y]}
",
    );
    // x/a, x/c: only from x/b, z/b. y/a, y/c: only from namespace z.
    assert_table(
        &c,
        "tcp/80",
        "
        x/a .x. .x. xxx
        x/b xxx .x. xxx
        x/c .x. .x. xxx
        y/a .x. .x. xxx
        y/b .x. .x. xxx
        y/c .x. .x. xxx
        z/a .x. xxx xxx
        z/b xxx xxx xxx
        z/c .x. xxx xxx",
    );
}

#[test]
fn ip_block_with_except_matches_pod_addresses() {
    // Into x/a from 10.0.0.0/16 except y's 10.0.2.0/24; out of x/b to 10.0.2.0/24 except y/c.
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: cidr-in, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - ipBlock: {cidr: 10.0.0.0/16, except: [10.0.2.0/24]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: cidr-out, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 10.0.2.0/24, except: [10.0.2.3/32]}
",
    );
    assert_table(
        &c,
        "tcp/80",
        "
        x/a xxx xxx xxx
        x/b ... xx. ...
        x/c xxx xxx xxx
        y/a .xx xxx xxx
        y/b .xx xxx xxx
        y/c .xx xxx xxx
        z/a xxx xxx xxx
        z/b xxx xxx xxx
        z/c xxx xxx xxx",
    );
}

#[test]
fn overlapping_ip_blocks_union() {
    // Two blocks on x/a: 10.0.0.0/16 except 10.0.0.0/22 (so x, y, z excluded), and
    // 10.0.2.0/24 except 10.0.2.2/32 (y/a, y/c). Only y/a and y/c get in.
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: overlap, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.0/22]}
  - from:
    - ipBlock: {cidr: 10.0.2.0/24, except: [10.0.2.2/32]}
",
    );
    assert_table(
        &c,
        "tcp/80",
        "
        x/a .xx xxx xxx
        x/b .xx xxx xxx
        x/c .xx xxx xxx
        y/a xxx xxx xxx
        y/b .xx xxx xxx
        y/c xxx xxx xxx
        z/a .xx xxx xxx
        z/b .xx xxx xxx
        z/c .xx xxx xxx",
    );
}

#[test]
fn numeric_port_and_default_protocol() {
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: port-80, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports:
    - port: 80
",
    );
    assert_table(&c, "tcp/80", &all());
    let closed = &every_source(".xx xxx xxx");
    assert_table(&c, "tcp/81", closed);
    assert_table(&c, "udp/80", closed);
    assert_table(&c, "sctp/80", closed);
}

#[test]
fn end_port_range() {
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: range, namespace: x}
spec:
  podSelector: {}
  ingress:
  - ports:
    - {protocol: UDP, port: 1000, endPort: 1025}
",
    );
    let closed = &every_source("... xxx xxx");
    for p in ["udp/1000", "udp/1023", "udp/1024", "udp/1025"] {
        assert_table(&c, p, &all());
    }
    for p in ["udp/999", "udp/1026", "tcp/1000", "sctp/1024"] {
        assert_table(&c, p, closed);
    }
}

#[test]
fn sctp_and_udp() {
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: protos, namespace: y}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
  - ports:
    - {protocol: SCTP, port: 9}
    - {protocol: UDP}
",
    );
    let closed = &every_source("xxx x.x xxx");
    assert_table(&c, "sctp/9", &all());
    assert_table(&c, "udp/7", &all());
    assert_table(&c, "udp/65535", &all());
    assert_table(&c, "sctp/10", closed);
    assert_table(&c, "tcp/9", closed);
}

#[test]
fn named_port_ingress_resolves_on_the_destination() {
    // http is 80 on a and b pods, 81 on c pods.
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: http, namespace: x}
spec:
  podSelector: {}
  ingress:
  - ports:
    - port: http
",
    );
    assert_table(&c, "tcp/80", &every_source("xx. xxx xxx"));
    assert_table(&c, "tcp/81", &every_source("..x xxx xxx"));
    // `http` is TCP only: UDP 80 is not opened by it.
    assert_table(&c, "udp/80", &every_source("... xxx xxx"));
}

#[test]
fn named_port_egress_resolves_on_the_peer() {
    // x/a may send to any pod on its `http` port, and to `dns` (UDP 53) in z only. No
    // policyTypes and egress rules present: Ingress is inferred too, so x/a takes no traffic.
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: out, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  egress:
  - ports: [{port: http}]
  - to: [{namespaceSelector: {matchLabels: {ns: z}}}]
    ports: [{port: dns, protocol: UDP}]
",
    );
    assert_table(
        &c,
        "tcp/80",
        "
        x/a .x. xx. xx.
        x/b .xx xxx xxx
        x/c .xx xxx xxx
        y/a .xx xxx xxx
        y/b .xx xxx xxx
        y/c .xx xxx xxx
        z/a .xx xxx xxx
        z/b .xx xxx xxx
        z/c .xx xxx xxx",
    );
    assert_table(
        &c,
        "tcp/81",
        "
        x/a ..x ..x ..x
        x/b .xx xxx xxx
        x/c .xx xxx xxx
        y/a .xx xxx xxx
        y/b .xx xxx xxx
        y/c .xx xxx xxx
        z/a .xx xxx xxx
        z/b .xx xxx xxx
        z/c .xx xxx xxx",
    );
    assert_table(
        &c,
        "udp/53",
        "
        x/a ... ... xxx
        x/b .xx xxx xxx
        x/c .xx xxx xxx
        y/a .xx xxx xxx
        y/b .xx xxx xxx
        y/c .xx xxx xxx
        z/a .xx xxx xxx
        z/b .xx xxx xxx
        z/c .xx xxx xxx",
    );
}

#[test]
fn policy_types_explicit_and_inferred() {
    // p1: explicit [Ingress, Egress] with only an ingress rule: egress of y/a is denied.
    // p2: [Egress] only, with ingress rules that must be ignored: y/b not isolated for ingress,
    //     egress denied.
    // p3: no policyTypes but an egress rule: inferred Ingress + Egress; y/c ingress deny-all,
    //     egress only to x.
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p1, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - {}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p2, namespace: y}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {pod: nobody}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p3, namespace: y}
spec:
  podSelector: {matchLabels: {pod: c}}
  egress:
  - to: [{namespaceSelector: {matchLabels: {ns: x}}}]
",
    );
    assert_table(
        &c,
        "tcp/80",
        "
        x/a xxx xx. xxx
        x/b xxx xx. xxx
        x/c xxx xx. xxx
        y/a ... ... ...
        y/b ... ... ...
        y/c xxx ... ...
        z/a xxx xx. xxx
        z/b xxx xx. xxx
        z/c xxx xx. xxx",
    );
}

#[test]
fn multiple_policies_union_and_namespacing() {
    // Two policies select x/a: from y/b, and from z/c. A policy in y that selects pod=a does not
    // touch x/a or z/a; it only lets y/a be reached from its own namespace.
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-y-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-z-c, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: z}}, podSelector: {matchLabels: {pod: c}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: same-ns, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {}}]
",
    );
    assert_table(
        &c,
        "tcp/80",
        "
        x/a .xx .xx xxx
        x/b .xx .xx xxx
        x/c .xx .xx xxx
        y/a .xx xxx xxx
        y/b xxx xxx xxx
        y/c .xx xxx xxx
        z/a .xx .xx xxx
        z/b .xx .xx xxx
        z/c xxx .xx xxx",
    );
}

#[test]
fn empty_from_and_empty_ports_allow_all() {
    // An isolating deny-all plus a rule with an empty peer list and no ports.
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: z}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: open-c, namespace: z}
spec:
  podSelector: {matchLabels: {pod: c}}
  ingress:
  - from: []
    ports: []
",
    );
    let t = "
        x/a xxx xxx ..x
        x/b xxx xxx ..x
        x/c xxx xxx ..x
        y/a xxx xxx ..x
        y/b xxx xxx ..x
        y/c xxx xxx ..x
        z/a ... ... ...
        z/b ... ... ...
        z/c ... ... ...";
    assert_table(&c, "tcp/80", t);
    assert_table(&c, "sctp/7", t);
}

#[test]
fn external_endpoints() {
    let c = cluster(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{ipBlock: {cidr: 0.0.0.0/0, except: [192.168.0.0/16]}}]
  egress:
  - to: [{ipBlock: {cidr: 8.8.8.0/24}}]
    ports: [{port: 53, protocol: UDP}, {port: http}]
  - ports: [{port: dns, protocol: UDP}]
",
    );
    let compiled = compile(&c);
    let xa = pod(&c, "x/a");
    let ext = |s: &str| s.parse::<IpAddr>().unwrap();
    let cases = [
        // (from, to, proto/port, allowed)
        ("203.0.113.9", "x/a", "tcp/443", true),
        ("192.168.1.1", "x/a", "tcp/443", false),
        ("x/a", "8.8.8.8", "udp/53", true),
        ("x/a", "8.8.8.8", "tcp/53", false),
        // A named port never matches an address outside the cluster.
        ("x/a", "8.8.8.8", "tcp/80", false),
        ("x/a", "8.8.4.4", "udp/53", false),
        // An empty `to` with a named port reaches pods only.
        ("x/a", "y/c", "udp/53", true),
        ("x/a", "y/c", "udp/54", false),
        // Externals have no side of their own.
        ("203.0.113.9", "y/b", "tcp/1", true),
    ];
    for (from, to, port, want) in cases {
        let end = |s: &str| match s.split_once('/') {
            Some(_) => Endpoint::Pod(pod(&c, s)),
            None => Endpoint::External(ext(s)),
        };
        let (s, d) = (end(from), end(to));
        let (proto, n) = parse_port(port);
        let v = c.allowed(&s, &d, proto, n);
        assert_eq!(v.allowed(), want, "{from} -> {to} {port}: {v:?}");
        let ip = |e: &Endpoint| c.endpoint_ip(e).unwrap();
        let sim = compiled.decide(
            &compiled.packet_end(ip(&s)),
            &compiled.packet_end(ip(&d)),
            proto,
            n,
        );
        assert_eq!(sim, want, "{from} -> {to} {port}: compiled");
    }
    assert!(matches!(
        c.allowed(&Endpoint::Pod(xa), &Endpoint::External(ext("8.8.8.8")), Protocol::Udp, 53)
            .egress,
        wiremesh_policy::SideVerdict::AllowedBy(ref by) if by == &["x/web".to_string()]
    ));
}
