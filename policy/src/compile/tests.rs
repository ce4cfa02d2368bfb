//! Compiler tests: port-range splitting, the CIDR partition, byte layouts, named-port conflicts,
//! and the equivalence property: over random small clusters and policies, the lookup simulator
//! over the compiled entries decides exactly as the evaluator for every pair, protocol and port.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use proptest::prelude::*;

use super::*;
use crate::{
    model::{ContainerPort, Endpoint, Namespace, Pod, PodId},
    rules::{Policy, PortSpec},
    selector::{Requirement, Selector},
};

#[test]
fn port_ranges_split_into_aligned_blocks() {
    assert_eq!(port_range_prefixes(0, u16::MAX), vec![(0, 0)]);
    assert_eq!(port_range_prefixes(80, 80), vec![(80, 16)]);
    assert_eq!(port_range_prefixes(80, 81), vec![(80, 15)]);
    assert_eq!(
        port_range_prefixes(1000, 1025),
        vec![(1000, 13), (1008, 12), (1024, 15)]
    );
    assert_eq!(port_range_prefixes(1, u16::MAX).len(), 16);
    assert_eq!(port_range_prefixes(65535, 65535), vec![(65535, 16)]);
    // Exhaustive over a few thousand ranges: blocks are aligned, disjoint, and cover exactly.
    for (lo, hi) in [
        (1u16, 2u16),
        (3, 1000),
        (1023, 1025),
        (4000, 9000),
        (1, 65534),
    ] {
        let blocks = port_range_prefixes(lo, hi);
        assert!(blocks.len() <= 30);
        let mut covered = 0u32;
        for (start, len) in &blocks {
            let size = 1u32 << (16 - len);
            assert_eq!(u32::from(*start) % size, 0, "aligned");
            covered += size;
        }
        assert_eq!(covered, u32::from(hi - lo) + 1);
        for p in [lo, hi, lo.saturating_sub(1), hi.saturating_add(1)] {
            let inside = blocks.iter().any(|(s, len)| {
                let mask = if *len == 0 { 0 } else { u16::MAX << (16 - len) };
                p & mask == *s
            });
            assert_eq!(inside, (lo..=hi).contains(&p), "{lo}-{hi} at {p}");
        }
    }
}

#[test]
fn key_byte_layouts() {
    let k = RuleKey {
        subject: Identity(0x0102_0304),
        direction: Direction::Egress,
        protocol: Protocol::Udp,
        peer: Identity(0x0a0b_0c0d),
        port: 0x1f90,
        port_prefix_len: 12,
    };
    let b = k.to_bytes();
    assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 92);
    assert_eq!(u32::from_ne_bytes(b[4..8].try_into().unwrap()), 0x0102_0304);
    assert_eq!(
        u32::from_ne_bytes(b[8..12].try_into().unwrap()),
        0x0a0b_0c0d
    );
    assert_eq!(&b[12..], &[1, 17, 0x1f, 0x90]);
    let i = IsolationKey {
        identity: Identity(300),
        direction: Direction::Ingress,
    };
    assert_eq!(i.to_bytes()[..4], 300u32.to_ne_bytes());
    assert_eq!(i.to_bytes()[4..], [0, 0, 0, 0]);
    let c = CidrEntry {
        prefix: "10.1.0.0/16".parse().unwrap(),
        identity: Identity::FIRST_CIDR,
    };
    let kb = c.key_bytes();
    assert_eq!(kb.len(), 8);
    assert_eq!(kb[4..], [10, 1, 0, 0]);
    let c6 = CidrEntry {
        prefix: "fd00::/8".parse().unwrap(),
        identity: Identity::FIRST_CIDR,
    };
    assert_eq!(c6.key_bytes().len(), 20);
}

fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: &str, ports: Vec<ContainerPort>) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: Arc::new(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ip: Some(ip.parse().unwrap()),
        other_ips: Vec::new(),
        ports,
    }
}

fn http(port: u16) -> ContainerPort {
    ContainerPort {
        name: Some("http".into()),
        port,
        protocol: Protocol::Tcp,
    }
}

#[test]
fn cidr_partition_gives_one_identity_per_block_set() {
    let block = |cidr: &str, except: &[&str]| {
        Peer::IpBlock(IpBlock {
            cidr: cidr.parse().unwrap(),
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
        })
    };
    let pol = Policy {
        namespace: "n".into(),
        name: "p".into(),
        selector: Selector::everything(),
        ingress: Some(vec![Rule {
            peers: Some(vec![
                block("10.0.0.0/8", &["10.1.0.0/16"]),
                block("10.1.2.0/24", &[]),
            ]),
            ports: None,
        }]),
        egress: None,
    };
    let c = Cluster::new(vec![], vec![], vec![pol]).unwrap();
    let m = compile(&c);
    let prefixes: Vec<_> = m.cidrs.iter().map(|e| e.prefix.to_string()).collect();
    assert_eq!(prefixes, ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24"]);
    let id = |ip: &str| m.lookup_cidr(ip.parse().unwrap());
    assert_eq!(
        id("10.9.9.9"),
        Some(Identity::FIRST_CIDR),
        "first block only"
    );
    assert_eq!(id("10.1.9.9"), Some(Identity::WORLD), "excepted, no block");
    assert_eq!(
        id("10.1.2.9"),
        Some(Identity(Identity::FIRST_CIDR.0 + 1)),
        "second only"
    );
    assert_eq!(id("11.0.0.1"), None);
}

#[test]
fn named_port_conflict_fails_closed_with_a_warning() {
    // Two pods with the same labels (one identity) disagree on `http`.
    let pods = vec![
        pod("n", "a", &[("app", "web")], "10.0.0.1", vec![http(80)]),
        pod("n", "b", &[("app", "web")], "10.0.0.2", vec![http(8080)]),
        pod("n", "c", &[("app", "client")], "10.0.0.3", vec![]),
    ];
    let pol = Policy {
        namespace: "n".into(),
        name: "p".into(),
        selector: Selector::from_requirements(vec![Requirement::In(
            "app".into(),
            BTreeSet::from(["web".to_string()]),
        )]),
        ingress: Some(vec![Rule {
            peers: None,
            ports: Some(vec![PortSpec {
                protocol: Protocol::Tcp,
                port: Some(PortValue::Named("http".into())),
            }]),
        }]),
        egress: None,
    };
    let ns = vec![Namespace {
        name: "n".into(),
        labels: BTreeMap::new(),
    }];
    let c = Cluster::new(ns, pods, vec![pol]).unwrap();
    let m = compile(&c);
    assert_eq!(m.warnings.len(), 1, "{:?}", m.warnings);
    let CompileWarning::NamedPortConflict { name, pods, .. } = &m.warnings[0];
    assert_eq!(name, "http");
    assert_eq!(pods, &["n/a", "n/b"]);
    let client = m.packet_end("10.0.0.3".parse().unwrap());
    for (ip, port) in [("10.0.0.1", 80), ("10.0.0.2", 8080)] {
        assert!(
            c.allowed(
                &Endpoint::Pod(c.find_pod("n", "c").unwrap()),
                &Endpoint::External(ip.parse().unwrap()),
                Protocol::Tcp,
                port
            )
            .allowed(),
            "an address is not a pod for the evaluator"
        );
        assert!(!m.decide(
            &client,
            &m.packet_end(ip.parse().unwrap()),
            Protocol::Tcp,
            port
        ));
    }
}

#[test]
fn identical_inputs_compile_identically() {
    let build = || {
        let pods = vec![
            pod("n", "a", &[("app", "web")], "10.0.0.1", vec![http(80)]),
            pod("m", "b", &[("app", "db")], "10.0.0.2", vec![]),
        ];
        let pol = Policy {
            namespace: "n".into(),
            name: "p".into(),
            selector: Selector::everything(),
            ingress: Some(vec![Rule {
                peers: None,
                ports: None,
            }]),
            egress: Some(vec![]),
        };
        compile(&Cluster::new(vec![], pods, vec![pol]).unwrap())
    };
    let (a, b) = (build(), build());
    assert_eq!(a.rules, b.rules);
    assert_eq!(a.isolated, b.isolated);
    assert_eq!(a.endpoints, b.endpoints);
    assert_eq!(a.isolated.len(), 2);
    assert_eq!(a.rules.len(), 3, "one full-range entry per protocol");
}

#[test]
fn ipv6_blocks_and_pods() {
    let pods = vec![
        pod("n", "a", &[("app", "a")], "fd00::1", vec![]),
        pod("n", "b", &[("app", "b")], "fd00:0:0:1::1", vec![]),
        pod("n", "c", &[("app", "c")], "10.0.0.1", vec![]),
    ];
    let pol = Policy {
        namespace: "n".into(),
        name: "p".into(),
        selector: Selector::from_requirements(vec![Requirement::In("app".into(), values(&["a"]))]),
        ingress: Some(vec![Rule {
            peers: Some(vec![Peer::IpBlock(IpBlock {
                cidr: "fd00::/32".parse().unwrap(),
                except: vec!["fd00::/64".parse().unwrap()],
            })]),
            ports: None,
        }]),
        egress: None,
    };
    let c = Cluster::new(vec![], pods, vec![pol]).unwrap();
    let m = compile(&c);
    assert_eq!(m.cidrs.len(), 2);
    let a = m.packet_end("fd00::1".parse().unwrap());
    for (src, want) in [
        ("fd00:0:0:1::1", true),
        ("fd00::2", false),
        ("10.0.0.1", false),
        ("2001:db8::1", false),
        ("fd00:0:ffff::9", true),
    ] {
        let s = m.packet_end(src.parse().unwrap());
        assert_eq!(m.decide(&s, &a, Protocol::Tcp, 443), want, "{src}");
        let ext = c.find_pod("n", "a").map(Endpoint::Pod).unwrap();
        let src_ep = match c.pods().iter().position(|p| p.ip == s.ip) {
            Some(i) => Endpoint::Pod(PodId(i)),
            None => Endpoint::External(src.parse().unwrap()),
        };
        assert_eq!(
            c.allowed(&src_ep, &ext, Protocol::Tcp, 443).allowed(),
            want,
            "{src}"
        );
    }
}

#[test]
fn entry_count_is_linear_in_rules() {
    // 1000 policies, each: pods app=sN accept TCP 20000+N from pods app=cN. One identity per
    // label set, so exactly one rule entry and one isolation entry per policy.
    let n = 1000;
    let mut pods = Vec::new();
    let mut policies = Vec::new();
    for i in 0..n {
        let ip = |k: usize| format!("10.{}.{}.{}", k / 65536, (k / 256) % 256, k % 256);
        let (s, cl) = (format!("s{i}"), format!("c{i}"));
        pods.push(pod("n", &s, &[("app", &s)], &ip(2 * i + 1), vec![]));
        pods.push(pod("n", &cl, &[("app", &cl)], &ip(2 * i + 2), vec![]));
        let sel = |v: &str| {
            Selector::from_requirements(vec![Requirement::In("app".into(), values(&[v]))])
        };
        policies.push(Policy {
            namespace: "n".into(),
            name: format!("p{i}"),
            selector: sel(&s),
            ingress: Some(vec![Rule {
                peers: Some(vec![Peer::Pods {
                    namespaces: crate::rules::NamespaceMatch::Same("n".into()),
                    pods: sel(&cl),
                }]),
                ports: Some(vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: Some(PortValue::Range(20000 + i as u16, 20000 + i as u16)),
                }]),
            }]),
            egress: None,
        });
    }
    let c = Cluster::new(vec![], pods, policies).unwrap();
    let m = compile(&c);
    assert_eq!(m.rules.len(), n);
    assert_eq!(m.isolated.len(), n);
    assert_eq!(m.endpoints.len(), 2 * n);
    let (s7, c7) = (
        c.find_pod("n", "s7").unwrap(),
        c.find_pod("n", "c7").unwrap(),
    );
    let end = |p: PodId| m.packet_end(c.pod(p).ip.unwrap());
    assert!(m.decide(&end(c7), &end(s7), Protocol::Tcp, 20007));
    assert!(!m.decide(&end(c7), &end(s7), Protocol::Tcp, 20008));
    assert!(!m.decide(
        &end(c.find_pod("n", "c8").unwrap()),
        &end(s7),
        Protocol::Tcp,
        20007
    ));
}

#[test]
fn diff_turns_old_maps_into_new_maps() {
    let build = |port: u16, with_b: bool| {
        let mut pods = vec![pod("n", "a", &[("app", "a")], "10.0.0.1", vec![])];
        if with_b {
            pods.push(pod("n", "b", &[("app", "b")], "10.0.0.2", vec![]));
        }
        let pol = Policy {
            namespace: "n".into(),
            name: "p".into(),
            selector: Selector::everything(),
            ingress: Some(vec![Rule {
                peers: Some(vec![Peer::IpBlock(IpBlock {
                    cidr: "10.0.0.0/24".parse().unwrap(),
                    except: vec![],
                })]),
                ports: Some(vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: Some(PortValue::Range(port, port)),
                }]),
            }]),
            egress: None,
        };
        compile(&Cluster::new(vec![], pods, vec![pol]).unwrap())
    };
    let old = build(80, true);
    let new = build(443, false);
    assert!(new.diff(&new).is_empty());
    let d = new.diff(&old);
    assert_eq!(
        d.endpoints_remove,
        vec!["10.0.0.2".parse::<IpAddr>().unwrap()]
    );
    assert!(
        d.endpoints_upsert.is_empty() && d.cidrs_upsert.is_empty() && d.cidrs_remove.is_empty()
    );
    assert_eq!(d.isolated_remove.len(), 1);
    assert_eq!(d.rules_add.len(), 1);
    assert_eq!(d.rules_add[0].port, 443);
    assert_eq!(d.rules_remove.len(), 2, "port 80 for a and b");
    // Applying the diff to the old sets gives the new ones.
    let mut rules = old.rules.clone();
    rules.extend(d.rules_add.iter().copied());
    for r in &d.rules_remove {
        rules.remove(r);
    }
    assert_eq!(rules, new.rules);
}

// ---- the equivalence property ----

const NS_NAMES: [&str; 3] = ["n0", "n1", "n2"];
const APPS: [&str; 3] = ["web", "db", "api"];
const PROBE_PORTS: [u16; 8] = [53, 80, 81, 1000, 1024, 5432, 8080, 65535];

/// Named ports follow the `app` label, so pods of one identity agree (no conflicts).
fn ports_for(app: Option<&str>) -> Vec<ContainerPort> {
    let mut out = vec![ContainerPort {
        name: Some("dns".into()),
        port: 53,
        protocol: Protocol::Udp,
    }];
    match app {
        Some("web") => out.push(http(80)),
        Some("api") => out.push(http(8080)),
        Some("db") => out.push(ContainerPort {
            name: Some("pg".into()),
            port: 5432,
            protocol: Protocol::Tcp,
        }),
        _ => {}
    }
    out
}

fn pod_ip(i: usize) -> IpAddr {
    // Spread over a few /24s and /26s so prefixes select interesting subsets.
    IpAddr::V4(Ipv4Addr::new(10, 0, (i / 3) as u8, (i % 3 * 64 + 1) as u8))
}

fn values(vs: &[&str]) -> BTreeSet<String> {
    vs.iter().map(|s| s.to_string()).collect()
}

fn requirement() -> impl Strategy<Value = Requirement> {
    let key = prop::sample::select(vec!["app", "tier", "team", "env"]);
    let val = prop::sample::subsequence(vec!["web", "db", "api", "front", "a", "b", "prod"], 1..3);
    (key, val, 0..4u8).prop_map(|(k, v, op)| match op {
        0 => Requirement::In(k.into(), values(&v)),
        1 => Requirement::NotIn(k.into(), values(&v)),
        2 => Requirement::Exists(k.into()),
        _ => Requirement::DoesNotExist(k.into()),
    })
}

fn selector() -> impl Strategy<Value = Selector> {
    prop::collection::vec(requirement(), 0..3).prop_map(Selector::from_requirements)
}

fn ip_block(n_pods: usize) -> impl Strategy<Value = IpBlock> {
    let lens = prop::sample::select(vec![8u8, 16, 24, 26, 30, 32]);
    (
        0..n_pods.max(1),
        lens,
        prop::collection::vec((0..n_pods.max(1), 24..=32u8), 0..3),
    )
        .prop_map(move |(k, len, excepts)| {
            let cidr = IpNet::new(pod_ip(k), len).unwrap().trunc();
            let mut except: Vec<IpNet> = excepts
                .into_iter()
                .map(|(e, l)| IpNet::new(pod_ip(e), l).unwrap().trunc())
                .filter(|e| cidr.contains(e) && *e != cidr)
                .collect();
            except.sort();
            except.dedup();
            IpBlock { cidr, except }
        })
}

fn peer(n_pods: usize) -> impl Strategy<Value = Peer> {
    prop_oneof![
        (
            prop::option::of(selector()),
            selector(),
            prop::sample::select(NS_NAMES.to_vec())
        )
            .prop_map(|(ns, pods, own)| Peer::Pods {
                namespaces: match ns {
                    None => crate::rules::NamespaceMatch::Same(own.into()),
                    Some(s) => crate::rules::NamespaceMatch::Selector(s),
                },
                pods,
            }),
        ip_block(n_pods).prop_map(Peer::IpBlock),
    ]
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    let proto = prop::sample::select(Protocol::ALL.to_vec());
    let value = prop_oneof![
        Just(None),
        prop::sample::select(vec![53u16, 80, 81, 8080]).prop_map(|p| Some(PortValue::Range(p, p))),
        prop::sample::select(vec![(80u16, 81u16), (1000, 1030), (1, 1023), (5000, 65535)])
            .prop_map(|(a, b)| Some(PortValue::Range(a, b))),
        prop::sample::select(vec!["http", "dns", "pg", "none"])
            .prop_map(|n| Some(PortValue::Named(n.into()))),
    ];
    let unnamed = (proto, value).prop_map(|(protocol, port)| PortSpec { protocol, port });
    // Named ports with the protocol they are defined with, so they often resolve.
    let named = prop::sample::select(vec![
        ("http", Protocol::Tcp),
        ("dns", Protocol::Udp),
        ("pg", Protocol::Tcp),
        ("dns", Protocol::Tcp),
    ])
    .prop_map(|(n, protocol)| PortSpec {
        protocol,
        port: Some(PortValue::Named(n.into())),
    });
    prop_oneof![2 => unnamed, 1 => named]
}

fn rule(n_pods: usize) -> impl Strategy<Value = Rule> {
    (
        prop::option::of(prop::collection::vec(peer(n_pods), 1..3)),
        prop::option::of(prop::collection::vec(port_spec(), 1..3)),
    )
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

fn rules(n_pods: usize) -> impl Strategy<Value = Option<Vec<Rule>>> {
    prop::option::of(prop::collection::vec(rule(n_pods), 0..3))
}

type PodSpec = (usize, Option<&'static str>, Option<&'static str>);

fn cluster() -> impl Strategy<Value = Cluster> {
    let ns_labels = prop::collection::vec(
        (
            prop::option::of(prop::sample::select(vec!["a", "b"])),
            prop::option::of(prop::sample::select(vec!["prod", "dev"])),
        ),
        3,
    );
    let pods = prop::collection::vec(
        (
            0..3usize,
            prop::option::of(prop::sample::select(APPS.to_vec())),
            prop::option::of(prop::sample::select(vec!["front", "back"])),
        ),
        1..7,
    );
    (ns_labels, pods).prop_flat_map(|(ns_labels, pods): (_, Vec<PodSpec>)| {
        let n = pods.len();
        let policy = (0..3usize, selector(), rules(n), rules(n));
        prop::collection::vec(policy, 0..4).prop_map(move |pols| {
            let namespaces = NS_NAMES
                .iter()
                .zip(&ns_labels)
                .map(|(name, (team, env))| {
                    let mut labels = BTreeMap::new();
                    if let Some(t) = team {
                        labels.insert("team".to_string(), t.to_string());
                    }
                    if let Some(e) = env {
                        labels.insert("env".to_string(), e.to_string());
                    }
                    Namespace {
                        name: name.to_string(),
                        labels,
                    }
                })
                .collect();
            let pods = pods
                .iter()
                .enumerate()
                .map(|(i, (ns, app, tier))| {
                    let mut labels = BTreeMap::new();
                    if let Some(a) = app {
                        labels.insert("app".to_string(), a.to_string());
                    }
                    if let Some(t) = tier {
                        labels.insert("tier".to_string(), t.to_string());
                    }
                    Pod {
                        namespace: NS_NAMES[*ns].into(),
                        name: format!("p{i}"),
                        labels: Arc::new(labels),
                        ip: Some(pod_ip(i)),
                        other_ips: Vec::new(),
                        ports: ports_for(*app),
                    }
                })
                .collect();
            let policies = pols
                .iter()
                .enumerate()
                .map(|(i, (ns, sel, ingress, egress))| {
                    // A policy without any direction is not expressible; keep at least Ingress.
                    let ingress = match (ingress, egress) {
                        (None, None) => Some(Vec::new()),
                        _ => ingress.clone(),
                    };
                    Policy {
                        namespace: NS_NAMES[*ns].into(),
                        name: format!("pol{i}"),
                        selector: sel.clone(),
                        ingress,
                        egress: egress.clone(),
                    }
                })
                .collect();
            Cluster::new(namespaces, pods, policies).unwrap()
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn compiled_entries_decide_like_the_evaluator(c in cluster()) {
        let m = compile(&c);
        prop_assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        let externals: Vec<IpAddr> = ["10.0.0.200", "10.0.1.2", "192.168.7.7", "8.8.8.8"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let mut endpoints: Vec<Endpoint> =
            (0..c.pods().len()).map(|i| Endpoint::Pod(PodId(i))).collect();
        endpoints.extend(externals.iter().map(|ip| Endpoint::External(*ip)));
        for s in &endpoints {
            for d in &endpoints {
                if matches!((s, d), (Endpoint::External(_), Endpoint::External(_))) {
                    continue;
                }
                let ps = m.packet_end(c.endpoint_ip(s).unwrap());
                let pd = m.packet_end(c.endpoint_ip(d).unwrap());
                for proto in Protocol::ALL {
                    for port in PROBE_PORTS {
                        let v = c.allowed(s, d, proto, port);
                        let eg = m.side_allows(&ps, &pd, Direction::Egress, proto, port);
                        let ing = m.side_allows(&pd, &ps, Direction::Ingress, proto, port);
                        prop_assert_eq!(v.egress.allows(), eg, "egress {:?}->{:?} {} {}: {:?}", s, d, proto, port, v);
                        prop_assert_eq!(v.ingress.allows(), ing, "ingress {:?}->{:?} {} {}: {:?}", s, d, proto, port, v);
                        prop_assert_eq!(v.allowed(), m.decide(&ps, &pd, proto, port));
                    }
                }
            }
        }
    }
}

/// A pod `name` in namespace `ns` labelled app=`app`, with address `ip`.
fn labelled_pod(ns: &str, name: &str, app: &str, ip: IpAddr) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: Arc::new(BTreeMap::from([("app".to_string(), app.to_string())])),
        ip: Some(ip),
        other_ips: Vec::new(),
        ports: Vec::new(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Finding 10 (docs/threat-model.md): a pod with a label set of its own coming or going
    /// (here one whose labels sort before or after all others) changes no other pod's
    /// identity, and the maps change only in that pod's entries: no other endpoint, isolation
    /// or rule entry is rewritten. Each compile passes the previous model's identities in, as
    /// the agent's steering does.
    #[test]
    fn an_unrelated_label_set_renumbers_nothing(
        pods in prop::collection::vec((0usize..3, 0u8..5), 1..8),
        extra_first in any::<bool>(),
    ) {
        let pods: Vec<Pod> = pods
            .iter()
            .enumerate()
            .map(|(i, (ns, app))| labelled_pod(NS_NAMES[*ns], &format!("p{i}"), &format!("a{app}"), pod_ip(i)))
            .collect();
        // Every pod is isolated for ingress and admits app=a0 from its namespace.
        let policies: Vec<Policy> = NS_NAMES
            .iter()
            .map(|ns| Policy::from_k8s(&serde_yaml::from_str(&format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: {ns}}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: a0}}}}}}]\n"
            )).unwrap()).unwrap())
            .collect();
        let base = Cluster::new(vec![], pods.clone(), policies.clone()).unwrap();
        let (extra_ns, extra_app) = if extra_first { ("a-first", "a") } else { ("zz-last", "zz") };
        let extra_ip = IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9));
        let mut more = pods.clone();
        more.push(labelled_pod(extra_ns, "new", extra_app, extra_ip));
        let added =
            Cluster::with_identities(vec![], more, policies.clone(), base.identities()).unwrap();
        let removed =
            Cluster::with_identities(vec![], pods.clone(), policies, added.identities()).unwrap();
        for c in [&added, &removed] {
            for (i, _) in pods.iter().enumerate() {
                prop_assert_eq!(c.identity(PodId(i)), base.identity(PodId(i)), "pod p{} renumbered", i);
            }
        }
        let (m0, m1, m2) = (compile(&base), compile(&added), compile(&removed));
        let grow = m1.diff(&m0);
        prop_assert!(grow.endpoints_remove.is_empty() && grow.cidrs_remove.is_empty());
        prop_assert!(grow.isolated_remove.is_empty() && grow.rules_remove.is_empty());
        let new_id = added.identity(PodId(pods.len()));
        prop_assert_eq!(grow.endpoints_upsert, vec![(extra_ip, new_id)]);
        prop_assert!(grow.isolated_add.iter().all(|k| k.identity == new_id), "{:?}", grow.isolated_add);
        prop_assert!(grow.rules_add.iter().all(|k| k.subject == new_id), "{:?}", grow.rules_add);
        prop_assert!(m2.diff(&m0).is_empty(), "removing the pod again restores the same maps");
    }
}

/// Issue 13, finding 3: a dual-stack pod (`status.podIPs` of both families) is one identity
/// at both addresses, and a second pod holding either address is a duplicate.
#[test]
fn dual_stack_pods_map_both_addresses_to_their_identity() {
    let k8s_pod = |name: &str, ips: &[&str]| -> k8s_openapi::api::core::v1::Pod {
        use k8s_openapi::api::core::v1 as core;
        core::Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                labels: Some([("app".to_string(), name.to_string())].into()),
                ..Default::default()
            },
            status: Some(core::PodStatus {
                pod_ip: Some(ips[0].into()),
                pod_ips: Some(
                    ips.iter()
                        .map(|ip| core::PodIP { ip: ip.to_string() })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    };
    let web = Pod::from_k8s(&k8s_pod("web", &["10.244.1.11", "fd00:10:244:1::b"])).unwrap();
    assert_eq!(web.ip, Some("10.244.1.11".parse().unwrap()));
    assert_eq!(
        web.other_ips,
        vec!["fd00:10:244:1::b".parse::<IpAddr>().unwrap()]
    );
    let client = Pod::from_k8s(&k8s_pod("client", &["10.244.2.11", "fd00:10:244:2::b"])).unwrap();
    let cluster = Cluster::new(Vec::new(), vec![web.clone(), client], Vec::new()).unwrap();
    let m = compile(&cluster);
    let id = |ip: &str| m.endpoints[&ip.parse::<IpAddr>().unwrap()];
    assert_eq!(id("10.244.1.11"), id("fd00:10:244:1::b"));
    assert_ne!(id("fd00:10:244:1::b"), id("fd00:10:244:2::b"));
    assert!(id("fd00:10:244:2::b").is_pod());

    let mut twin = Pod::from_k8s(&k8s_pod("twin", &["10.244.3.11", "fd00:10:244:1::b"])).unwrap();
    twin.name = "twin".into();
    assert!(matches!(
        Cluster::new(Vec::new(), vec![web, twin], Vec::new()),
        Err(crate::model::ClusterError::DuplicateIp { .. })
    ));
}
