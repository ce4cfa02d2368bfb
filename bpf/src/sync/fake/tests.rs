//! apply_policy over the fake: diffs of real compilations land exactly on the new state, puts
//! before deletes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use wiremesh_policy::{Compiled, Identity, compile, load_manifest};

use super::{FakeMaps, Write};
use crate::{
    abi::{IpcacheValue, ipcache_flags},
    sync::{apply_policy, apply_policy_dual},
};

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: t, labels: {app: a}}
spec: {containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: t, labels: {app: b}}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.0.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: v6, namespace: t, labels: {app: v6}}
spec: {containers: [{name: c, image: x}]}
status: {podIP: "fd00::5"}
"#;

const OLD: &str = r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: t}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
  - from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}]
    ports: [{port: 1000, endPort: 1100}]
"#;

const NEW: &str = r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: t}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{port: http}]
  egress:
  - to: [{ipBlock: {cidr: 10.96.0.0/12}}]
"#;

fn compiled(p: &str) -> Compiled {
    compile(&load_manifest(&format!("{PODS}{p}")).expect("manifest"))
}

fn place(_: Ipv4Addr, id: Identity) -> IpcacheValue {
    IpcacheValue::new(id.0, 0, Ipv4Addr::UNSPECIFIED, ipcache_flags::LOCAL)
}

fn assert_holds(m: &FakeMaps, c: &Compiled) {
    let v4_endpoints: Vec<_> = c
        .endpoints
        .iter()
        .filter_map(|(ip, id)| match ip {
            IpAddr::V4(a) => Some((Ipv4Net::from(*a), place(*a, *id))),
            IpAddr::V6(_) => None,
        })
        .collect();
    assert_eq!(
        m.ipcache.clone().into_iter().collect::<Vec<_>>(),
        v4_endpoints
    );
    let v4_cidrs: Vec<_> = c
        .cidrs
        .iter()
        .filter_map(|e| match e.prefix {
            IpNet::V4(n) => Some((n, e.identity.0)),
            IpNet::V6(_) => None,
        })
        .collect();
    assert_eq!(m.cidrs.clone().into_iter().collect::<Vec<_>>(), v4_cidrs);
    assert_eq!(m.isolated, c.isolated);
    assert_eq!(m.rules, c.rules);
}

#[test]
fn diffs_land_on_the_new_state_with_puts_first() {
    let (old, new) = (compiled(OLD), compiled(NEW));
    assert!(!old.rules.is_empty() && !new.rules.is_empty());
    let mut m = FakeMaps::default();
    let first = apply_policy(&mut m, &old.diff(&Compiled::default()), place).expect("apply");
    assert_eq!(first.skipped_ipv6, 1, "the IPv6 pod is skipped");
    assert_eq!(first.removed, 0);
    assert_holds(&m, &old);

    m.writes.clear();
    let second = apply_policy(&mut m, &new.diff(&old), place).expect("apply");
    assert_holds(&m, &new);
    assert!(second.removed > 0, "the old ipBlock rules go away");
    let first_del = m
        .writes
        .iter()
        .position(|w| *w == Write::Del)
        .expect("deletes");
    assert!(
        m.writes[first_del..].iter().all(|w| *w == Write::Del),
        "all puts before any delete: {:?}",
        m.writes
    );

    m.writes.clear();
    let none = apply_policy(&mut m, &new.diff(&new), place).expect("apply");
    assert_eq!((none.written, none.removed), (0, 0));
    assert!(m.writes.is_empty());
}

const V6_BLOCK: &str = r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p6, namespace: t}
spec:
  podSelector: {matchLabels: {app: v6}}
  ingress:
  - from: [{ipBlock: {cidr: "fd00:1::/64", except: ["fd00:1::/80"]}}]
"#;

fn place6(_: Ipv6Addr, id: Identity) -> IpcacheValue {
    IpcacheValue::new(id.0, 0, Ipv4Addr::UNSPECIFIED, ipcache_flags::LOCAL)
}

#[test]
fn dual_writes_ipv6_endpoints_and_cidrs_and_removes_them() {
    let c = compiled(V6_BLOCK);
    let mut m = FakeMaps::default();
    let n = apply_policy_dual(&mut m, &c.diff(&Compiled::default()), place, place6).expect("apply");
    assert_eq!(n.skipped_ipv6, 0);
    let v6 = Ipv6Net::from("fd00::5".parse::<Ipv6Addr>().expect("v6"));
    assert_eq!(
        m.ipcache6.get(&v6),
        Some(&place6(
            Ipv6Addr::UNSPECIFIED,
            c.endpoints[&IpAddr::from(v6.addr())]
        ))
    );
    let v6_cidrs: Vec<_> = c
        .cidrs
        .iter()
        .filter_map(|e| match e.prefix {
            IpNet::V6(n) => Some((n, e.identity.0)),
            IpNet::V4(_) => None,
        })
        .collect();
    assert_eq!(v6_cidrs.len(), 2, "the block and its except");
    assert_eq!(m.cidrs6.clone().into_iter().collect::<Vec<_>>(), v6_cidrs);
    assert_holds(&m, &c);

    let gone =
        apply_policy_dual(&mut m, &Compiled::default().diff(&c), place, place6).expect("apply");
    assert_eq!(gone.skipped_ipv6, 0);
    assert!(m.ipcache6.is_empty() && m.cidrs6.is_empty() && m.rules.is_empty());
}
