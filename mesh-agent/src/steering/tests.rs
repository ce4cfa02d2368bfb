use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use wiremesh_bpf::{FakeMaps, sync::fake::Write};

use super::*;
use crate::{
    cached::{CachedNode, CachedPod},
    fixtures::node,
};

fn pod(name: &str, node: &str, ip: &str, role: &str) -> Arc<CachedPod> {
    crate::fixtures::pod(name, node, ip, ("role", role))
}

impl PolicyMaps for FakeMaps {
    fn retain_policy(&mut self, keep: &Compiled) -> Result<Retained, wiremesh_bpf::Error> {
        let mut out = Retained::default();
        let before = (self.isolated.len(), self.rules.len(), self.cidrs.len());
        self.isolated.retain(|k| keep.isolated.contains(k));
        self.rules.retain(|k| keep.rules.contains(k));
        let cidrs: BTreeSet<ipnet::IpNet> = keep.cidrs.iter().map(|e| e.prefix).collect();
        self.cidrs
            .retain(|n, _| cidrs.contains(&ipnet::IpNet::V4(*n)));
        let before6 = self.cidrs6.len();
        self.cidrs6
            .retain(|n, _| cidrs.contains(&ipnet::IpNet::V6(*n)));
        out.cidrs6 = before6 - self.cidrs6.len();
        out.isolated = before.0 - self.isolated.len();
        out.rules = before.1 - self.rules.len();
        out.cidrs = before.2 - self.cidrs.len();
        for _ in 0..out.total() {
            self.writes.push(Write::Del);
        }
        Ok(out)
    }
}

fn policy(name: &str, spec: serde_json::Value) -> Arc<NetworkPolicy> {
    Arc::new(
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        }))
        .unwrap(),
    )
}

/// Compilation and ipcache of a cluster state.
fn state(
    pods: &[Arc<CachedPod>],
    policies: &[Arc<NetworkPolicy>],
) -> (Compiled, BTreeMap<IpNet, IpcacheValue>) {
    let nodes = [
        node("n1", "10.213.0.11", "10.244.1.0/24"),
        node("n2", "10.213.0.12", "10.244.2.0/24"),
    ];
    let (_, compiled, ipcache) = state_on(&nodes, pods, policies, &Default::default());
    (compiled, ipcache)
}

/// The model, compilation and ipcache on n1 (tunnel to n2 up) of `nodes`, `pods` and
/// `policies`, identities carried over from `previous`.
fn state_on(
    nodes: &[Arc<CachedNode>],
    pods: &[Arc<CachedPod>],
    policies: &[Arc<NetworkPolicy>],
    previous: &wiremesh_policy::IdentityAllocator,
) -> (
    wiremesh_policy::Cluster,
    Compiled,
    BTreeMap<IpNet, IpcacheValue>,
) {
    let (cluster, problems) = plan::policy_cluster(&[], pods, policies, previous).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let compiled = compile(&cluster);
    let ipcache = plan::desired_ipcache(
        "n1",
        nodes,
        pods,
        &compiled.endpoints,
        &BTreeSet::from(["n2".to_string()]),
        &crate::fixtures::claims("n1", nodes, pods),
    );
    (cluster, compiled, ipcache)
}

/// Both ipcache maps as one.
fn ipcache_of(maps: &FakeMaps) -> BTreeMap<IpNet, IpcacheValue> {
    maps.ipcache
        .iter()
        .map(|(n, v)| (IpNet::V4(*n), *v))
        .chain(maps.ipcache6.iter().map(|(n, v)| (IpNet::V6(*n), *v)))
        .collect()
}

fn assert_maps_hold(maps: &FakeMaps, compiled: &Compiled, ipcache: &BTreeMap<IpNet, IpcacheValue>) {
    assert_eq!(maps.isolated, compiled.isolated);
    assert_eq!(maps.rules, compiled.rules);
    assert_eq!(&ipcache_of(maps), ipcache);
    assert_eq!(maps.cidrs.len() + maps.cidrs6.len(), compiled.cidrs.len());
}

/// Every put before every delete: at no moment is an entry of the new state missing.
fn assert_puts_before_deletes(writes: &[Write]) {
    let first_del = writes
        .iter()
        .position(|w| *w == Write::Del)
        .unwrap_or(writes.len());
    assert!(
        writes[first_del..].iter().all(|w| *w == Write::Del),
        "a put after a delete: {writes:?}"
    );
}

#[test]
fn a_restarted_agent_rewrites_the_pins_and_drops_what_an_older_run_left() {
    let web = policy(
        "web",
        serde_json::json!({
            "podSelector": {"matchLabels": {"role": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                         "ports": [{"port": 80}]}],
        }),
    );
    let blocks = policy(
        "blocks",
        serde_json::json!({
            "podSelector": {"matchLabels": {"role": "client"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]}],
        }),
    );
    let pods_old = vec![
        pod("a", "n1", "10.244.1.11", "client"),
        pod("b", "n2", "10.244.2.11", "web"),
        pod("gone", "n2", "10.244.2.12", "old"),
    ];
    let (old, old_ipcache) = state(&pods_old, &[web.clone(), blocks]);

    // The pinned maps as an earlier run left them.
    let mut maps = FakeMaps::default();
    let mut first = Written::default();
    assert!(write_policy(&mut maps, &mut first, &old, &old_ipcache).unwrap());
    assert_maps_hold(&maps, &old, &old_ipcache);

    // Restart: a pod is gone, another came with labels that renumber the identities, and one
    // policy was deleted while the agent was down.
    let pods_new = vec![
        pod("a", "n1", "10.244.1.11", "client"),
        pod("b", "n2", "10.244.2.11", "web"),
        pod("aaa", "n1", "10.244.1.12", "aaa"),
    ];
    let (new, new_ipcache) = state(&pods_new, &[web]);
    assert_ne!(
        old.endpoints[&"10.244.1.11".parse().unwrap()],
        new.endpoints[&"10.244.1.11".parse().unwrap()],
        "the test wants identities to move"
    );
    maps.writes.clear();
    let mut restarted = Written {
        ipcache: ipcache_of(&maps),
        policy: None,
    };
    assert!(write_policy(&mut maps, &mut restarted, &new, &new_ipcache).unwrap());
    assert_maps_hold(&maps, &new, &new_ipcache);
    assert!(
        maps.cidrs.is_empty(),
        "the deleted policy's ipBlock is gone"
    );
    assert_puts_before_deletes(&maps.writes);

    // Nothing changed: nothing written.
    maps.writes.clear();
    assert!(!write_policy(&mut maps, &mut restarted, &new, &new_ipcache).unwrap());
    assert!(maps.writes.is_empty(), "{:?}", maps.writes);
}

#[test]
fn a_policy_change_is_written_as_a_diff_puts_first() {
    let pods = vec![
        pod("a", "n1", "10.244.1.11", "client"),
        pod("b", "n2", "10.244.2.11", "web"),
    ];
    let (open, ipcache) = state(&pods, &[]);
    let mut maps = FakeMaps::default();
    let mut written = Written::default();
    write_policy(&mut maps, &mut written, &open, &ipcache).unwrap();
    let deny = policy("deny", serde_json::json!({"podSelector": {}}));
    let (denied, ipcache2) = state(&pods, &[deny]);
    maps.writes.clear();
    assert!(write_policy(&mut maps, &mut written, &denied, &ipcache2).unwrap());
    assert_maps_hold(&maps, &denied, &ipcache2);
    assert_eq!(
        maps.writes.len(),
        denied.isolated.len(),
        "only the new keys"
    );
    maps.writes.clear();
    assert!(write_policy(&mut maps, &mut written, &open, &ipcache).unwrap());
    assert_maps_hold(&maps, &open, &ipcache);
    assert_puts_before_deletes(&maps.writes);
}

#[test]
fn programs_go_on_local_pod_veths_and_the_underlay_and_big_mtus_are_counted() {
    let snap = links::LinkSnapshot {
        names: BTreeMap::from([
            (2, "eth0".into()),
            (5, "veth1".into()),
            (6, "veth2".into()),
            (9, "wm0".into()),
        ]),
        mtus: BTreeMap::from([(2, 1500), (5, 1420), (6, 1500), (9, 1420)]),
        addresses: BTreeMap::from([(Ipv4Addr::new(10, 213, 0, 11), 2)]),
        routes: vec![
            (Ipv4Addr::UNSPECIFIED, 0, 2),
            (Ipv4Addr::new(10, 244, 1, 11), 32, 5),
            (Ipv4Addr::new(10, 244, 1, 12), 32, 6),
            (Ipv4Addr::new(10, 244, 2, 0), 24, 9),
        ],
        ..links::LinkSnapshot::default()
    };
    let pods = vec![
        pod("a", "n1", "10.244.1.11", "x"),
        pod("big", "n1", "10.244.1.12", "x"),
        pod("unwired", "n1", "10.244.1.13", "x"),
        pod("remote", "n2", "10.244.2.11", "x"),
    ];
    let placed = placement(
        &snap,
        Some(Ipv4Addr::new(10, 213, 0, 11)),
        Some(9),
        "n1",
        &pods,
    );
    let wanted: Vec<(String, &str)> = placed
        .wanted
        .iter()
        .map(|((iface, _), (hook, _))| (iface.clone(), hook.program()))
        .collect();
    assert_eq!(
        wanted,
        vec![
            ("eth0".to_string(), "underlay_ingress"),
            ("eth0".to_string(), "underlay_egress"),
            ("veth1".to_string(), "from_pod"),
            ("veth1".to_string(), "to_pod"),
            ("veth2".to_string(), "from_pod"),
            ("veth2".to_string(), "to_pod"),
        ],
        "a pod without its own route gets nothing (the default route is the underlay)"
    );
    assert_eq!(placed.above_tunnel_mtu, vec!["default/big".to_string()]);
    assert_eq!(
        placed.endpoints,
        BTreeMap::from([
            (
                5,
                EndpointValue::new(Some(Ipv4Addr::new(10, 244, 1, 11)), None)
            ),
            (
                6,
                EndpointValue::new(Some(Ipv4Addr::new(10, 244, 1, 12)), None)
            ),
        ]),
        "each local pod veth is declared with its pod's address"
    );
}

#[test]
fn underlay_programs_stay_while_the_nodes_address_lags_a_readdress() {
    // eth0 moved from 10.213.0.11 to 10.213.0.211; the Node (as the agent sees it) still says
    // 10.213.0.11, which no interface holds.
    let snap = links::LinkSnapshot {
        names: BTreeMap::from([(2, "eth0".into()), (5, "veth1".into())]),
        addresses: BTreeMap::from([(Ipv4Addr::new(10, 213, 0, 211), 2)]),
        routes: vec![
            (Ipv4Addr::UNSPECIFIED, 0, 2),
            (Ipv4Addr::new(10, 244, 1, 11), 32, 5),
        ],
        ..links::LinkSnapshot::default()
    };
    let pods = vec![pod("a", "n1", "10.244.1.11", "x")];
    let stale = Some(Ipv4Addr::new(10, 213, 0, 11));
    let underlay = |placed: &Placement| -> Vec<(String, Hook, u32)> {
        placed
            .wanted
            .iter()
            .filter(|(_, (hook, _))| matches!(hook, Hook::UnderlayIngress | Hook::UnderlayEgress))
            .map(|((iface, _), (hook, index))| (iface.clone(), *hook, *index))
            .collect()
    };
    let attached: BTreeMap<(String, u8), (Hook, u32)> =
        [Hook::UnderlayIngress, Hook::UnderlayEgress]
            .into_iter()
            .map(|hook| (("eth0".to_string(), hook as u8), (hook, 2)))
            .chain([(
                ("veth1".to_string(), Hook::FromPod as u8),
                (Hook::FromPod, 5),
            )])
            .collect();
    let mut placed = placement(&snap, stale, None, "n1", &pods);
    assert!(
        underlay(&placed).is_empty(),
        "the stale address is on no interface"
    );
    keep_underlay(&mut placed, &snap, &attached);
    assert_eq!(
        underlay(&placed),
        [
            ("eth0".to_string(), Hook::UnderlayIngress, 2),
            ("eth0".to_string(), Hook::UnderlayEgress, 2)
        ],
        "kept where they were attached"
    );
    // The Node's address followed: placed by the address, nothing kept besides.
    let moved = Some(Ipv4Addr::new(10, 213, 0, 211));
    let mut placed = placement(&snap, moved, None, "n1", &pods);
    let by_address = underlay(&placed);
    keep_underlay(&mut placed, &snap, &attached);
    assert_eq!(underlay(&placed), by_address);
    assert_eq!(by_address.len(), 2);
    // The underlay link gone (or replaced: another ifindex): nothing is kept.
    let mut gone = snap.clone();
    gone.names.remove(&2);
    let mut placed = placement(&gone, stale, None, "n1", &pods);
    keep_underlay(&mut placed, &gone, &attached);
    assert!(underlay(&placed).is_empty());
}

#[test]
fn an_interface_routing_to_several_pods_gets_no_anti_spoofing_entry() {
    let snap = links::LinkSnapshot {
        names: BTreeMap::from([(2, "eth0".into()), (7, "cni0".into())]),
        mtus: BTreeMap::new(),
        addresses: BTreeMap::from([(Ipv4Addr::new(10, 213, 0, 11), 2)]),
        routes: vec![
            (Ipv4Addr::UNSPECIFIED, 0, 2),
            (Ipv4Addr::new(10, 244, 1, 0), 24, 7),
        ],
        ..links::LinkSnapshot::default()
    };
    let pods = vec![
        pod("a", "n1", "10.244.1.11", "x"),
        pod("b", "n1", "10.244.1.12", "x"),
    ];
    let placed = placement(
        &snap,
        Some(Ipv4Addr::new(10, 213, 0, 11)),
        None,
        "n1",
        &pods,
    );
    assert!(
        placed
            .wanted
            .contains_key(&("cni0".to_string(), Hook::FromPod as u8))
    );
    assert!(
        placed.endpoints.is_empty(),
        "a shared bridge cannot be checked per pod: {:?}",
        placed.endpoints
    );
}

/// Finding 6 (docs/threat-model.md): while a local pod that a policy selects has no veth the
/// pass can name (here no IP yet), every unnamed veth gets the programs and a pending entry;
/// named pod veths, bridge ports (not in `veths`) and the underlay are left alone; once no
/// selected pod waits (it got its IP and route, or no policy selects it) nothing is pending.
#[test]
fn unnamed_veths_fail_closed_while_a_selected_pod_has_no_entries() {
    let mut snap = links::LinkSnapshot {
        names: BTreeMap::from([
            (2, "eth0".into()),
            (5, "veth1".into()),
            (6, "vethnew".into()),
        ]),
        addresses: BTreeMap::from([(Ipv4Addr::new(10, 213, 0, 11), 2)]),
        routes: vec![
            (Ipv4Addr::UNSPECIFIED, 0, 2),
            (Ipv4Addr::new(10, 244, 1, 11), 32, 5),
        ],
        veths: BTreeSet::from([2, 5, 6]),
        ..links::LinkSnapshot::default()
    };
    let mut fresh = CachedPod::clone(&pod("new", "n1", "10.244.1.12", "web"));
    let status = fresh.status.as_mut().unwrap();
    (status.pod_ip, status.pod_ips) = (None, None);
    let pods = vec![pod("a", "n1", "10.244.1.11", "x"), Arc::new(fresh)];
    let deny_web = policy(
        "deny-web",
        serde_json::json!({"podSelector": {"matchLabels": {"role": "web"}}}),
    );
    let (cluster, _) = plan::policy_cluster(&[], &pods, &[deny_web], &Default::default()).unwrap();
    let own = Some(Ipv4Addr::new(10, 213, 0, 11));
    let mut placed = placement(&snap, own, None, "n1", &pods);
    let waiting = fail_closed(&mut placed, &snap, "n1", &pods, cluster.policies());
    assert_eq!(waiting, vec!["default/new".to_string()]);
    assert_eq!(placed.endpoints.get(&6), Some(&EndpointValue::pending()));
    assert!(
        !placed.endpoints[&5].is_pending(),
        "a named pod veth keeps its entry"
    );
    assert!(
        !placed.endpoints.contains_key(&2),
        "the underlay is never pending"
    );
    for hook in [Hook::FromPod, Hook::ToPod] {
        assert_eq!(
            placed.wanted.get(&("vethnew".to_string(), hook as u8)),
            Some(&(hook, 6))
        );
    }
    // Without a policy selecting the waiting pod, nothing is pending.
    let mut placed = placement(&snap, own, None, "n1", &pods);
    assert!(fail_closed(&mut placed, &snap, "n1", &pods, &[]).is_empty());
    assert!(!placed.endpoints.contains_key(&6));
    // The pod got its IP and its route: its veth is named, nothing waits.
    let pods = vec![
        pod("a", "n1", "10.244.1.11", "x"),
        pod("new", "n1", "10.244.1.12", "web"),
    ];
    snap.routes.push((Ipv4Addr::new(10, 244, 1, 12), 32, 6));
    let mut placed = placement(&snap, own, None, "n1", &pods);
    assert!(fail_closed(&mut placed, &snap, "n1", &pods, cluster.policies()).is_empty());
    assert_eq!(
        placed.endpoints[&6],
        EndpointValue::new(Some(Ipv4Addr::new(10, 244, 1, 12)), None)
    );
}

#[derive(Default)]
struct FakeEndpoints {
    map: BTreeMap<u32, EndpointValue>,
    ops: Vec<(char, u32)>,
}

impl EndpointMaps for FakeEndpoints {
    fn endpoints(&self) -> Result<BTreeMap<u32, EndpointValue>, wiremesh_bpf::Error> {
        Ok(self.map.clone())
    }
    fn put_endpoint(
        &mut self,
        ifindex: u32,
        value: EndpointValue,
    ) -> Result<(), wiremesh_bpf::Error> {
        self.ops.push(('+', ifindex));
        self.map.insert(ifindex, value);
        Ok(())
    }
    fn del_endpoint(&mut self, ifindex: u32) -> Result<(), wiremesh_bpf::Error> {
        self.ops.push(('-', ifindex));
        self.map.remove(&ifindex);
        Ok(())
    }
}

#[test]
fn endpoint_entries_are_written_changed_and_pruned_like_the_pinned_state_demands() {
    let ep = |last: u8| EndpointValue::new(Some(Ipv4Addr::new(10, 244, 1, last)), None);
    // Pinned by an earlier run: veth 5 (still there), 6 (ifindex reused by another pod), 8
    // (gone).
    let mut maps = FakeEndpoints {
        map: BTreeMap::from([(5, ep(11)), (6, ep(12)), (8, ep(13))]),
        ops: Vec::new(),
    };
    let wanted = BTreeMap::from([(5, ep(11)), (6, ep(20)), (9, ep(21))]);
    assert_eq!(write_endpoints(&mut maps, &wanted).unwrap(), 2);
    assert_eq!(maps.ops, vec![('+', 6), ('+', 9)], "only what differs");
    assert_eq!(maps.map.get(&8), Some(&ep(13)), "writes delete nothing");
    assert_eq!(prune_endpoints(&mut maps, &wanted).unwrap(), 1);
    assert_eq!(maps.map, wanted);
    maps.ops.clear();
    assert_eq!(write_endpoints(&mut maps, &wanted).unwrap(), 0);
    assert_eq!(prune_endpoints(&mut maps, &wanted).unwrap(), 0);
    assert!(maps.ops.is_empty());
}

#[tokio::test]
async fn a_pin_directory_outside_bpffs_is_a_clear_error_with_a_metric() {
    use kube::runtime::reflector;
    use prometheus_client::{encoding::text::encode, registry::Registry};

    let dir = tempfile::tempdir().unwrap();
    let client =
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
    let caches = Caches {
        nodes: reflector::store().0,
        pods: reflector::store().0,
        mesh_encryption: reflector::store().0,
        namespaces: reflector::store().0,
        policies: reflector::store().0,
        settings: None,
        keyrotations: reflector::store().0,
    };
    let mut registry = Registry::with_prefix("wiremesh");
    let metrics = Metrics::new(&mut registry);
    let (_tx, rx) = watch::channel(MeshSnapshot::default());
    let mut steering = Steering::new(
        SteeringSettings {
            node_name: "n1".into(),
            bpffs: dir.path().to_owned(),
            interface: "wm0".into(),
            listen_port: None,
            ebpf: EbpfChoice::Auto,
        },
        client,
        caches,
        rx,
        Arc::new(Notify::new()),
        metrics.clone(),
        Arc::new(crate::flowsource::FlowSource::new(
            4,
            Duration::from_secs(300),
            metrics,
        )),
    );
    let error = steering.load().await.unwrap_err().to_string();
    let pins = dir.path().join("wiremesh/n1");
    assert!(error.contains(&pins.display().to_string()), "{error}");
    assert!(error.contains("not on a bpf filesystem"), "{error}");
    assert!(error.contains("mount -t bpf"), "the fix is named: {error}");
    assert!(steering.loaded.is_none());
    assert!(steering.next_load.is_some(), "retried later");
    let mut text = String::new();
    encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"wiremesh_ebpf_errors_total{stage="load"} 1"#),
        "{text}"
    );
}

#[test]
fn peers_moved_to_the_next_world_get_the_alt_tunnel_flag() {
    use wiremesh_bpf::abi::ipcache_flags;
    let (_, mut ipcache) = state(&[], &[]);
    let n2: IpNet = "10.244.2.0/24".parse().unwrap();
    let n1: IpNet = "10.244.1.0/24".parse().unwrap();
    assert_eq!(ipcache[&n2].flags & ipcache_flags::ALT_TUNNEL, 0);
    plan::mark_alt_tunnel(&mut ipcache, &["n2".to_string()]);
    assert_eq!(
        ipcache[&n2].flags,
        ipcache_flags::REMOTE_POD | ipcache_flags::ENCRYPT | ipcache_flags::ALT_TUNNEL
    );
    // Local prefixes and nodes not moved keep their flags.
    assert_eq!(ipcache[&n1].flags & ipcache_flags::ALT_TUNNEL, 0);
}

/// Issue 13, finding 3: a dual-stack cluster's IPv6 pod addresses, podCIDRs and ipBlocks reach
/// the IPv6 maps (ipcache6, cidrs6) with the identities of their IPv4 twins. On main the
/// ipcache had only IPv4 and `apply_policy` skipped IPv6 CIDRs, so IPv6 was world to policy.
#[test]
fn dual_stack_writes_ipv6_pods_cidrs_and_ipblocks_to_the_ipv6_maps() {
    use crate::fixtures::{node_dual, pod_dual};
    let nodes = [
        node_dual("n1", "10.213.0.11", "10.244.1.0/24", "fd00:10:244:1::/64"),
        node_dual("n2", "10.213.0.12", "10.244.2.0/24", "fd00:10:244:2::/64"),
    ];
    let pods = vec![
        pod_dual(
            "a",
            "n1",
            "10.244.1.11",
            "fd00:10:244:1::b",
            ("role", "web"),
        ),
        pod_dual(
            "b",
            "n2",
            "10.244.2.11",
            "fd00:10:244:2::b",
            ("role", "client"),
        ),
    ];
    let web = policy(
        "web",
        serde_json::json!({
            "podSelector": {"matchLabels": {"role": "web"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "fd00:10:244:2::/64"}}]}],
        }),
    );
    let (cluster, compiled, ipcache) = state_on(&nodes, &pods, &[web], &Default::default());
    let mut maps = FakeMaps::default();
    let mut written = Written::default();
    assert!(write_policy(&mut maps, &mut written, &compiled, &ipcache).unwrap());
    assert_maps_hold(&maps, &compiled, &ipcache);
    let v6 = |s: &str| -> ipnet::Ipv6Net { s.parse().unwrap() };
    let v4 = |s: &str| -> ipnet::Ipv4Net { s.parse().unwrap() };
    let b6 = maps.ipcache6[&v6("fd00:10:244:2::b/128")];
    assert_eq!(b6, maps.ipcache[&v4("10.244.2.11/32")]);
    assert!(Identity(b6.identity).is_pod());
    assert!(maps.ipcache6.contains_key(&v6("fd00:10:244:2::/64")));
    let block = maps.cidrs6[&v6("fd00:10:244:2::/64")];
    assert!(
        block >= Identity::FIRST_CIDR.0,
        "the IPv6 ipBlock has a CIDR identity"
    );
    // The simulator decides as the maps will: the client's IPv6 address is inside the block,
    // its IPv4 address is not.
    let web_ep = compiled.packet_end("fd00:10:244:1::b".parse().unwrap());
    let client6 = compiled.packet_end("fd00:10:244:2::b".parse().unwrap());
    let client4 = compiled.packet_end("10.244.2.11".parse().unwrap());
    let web4 = compiled.packet_end("10.244.1.11".parse().unwrap());
    use wiremesh_policy::Protocol;
    assert!(compiled.decide(&client6, &web_ep, Protocol::Tcp, 80));
    assert!(!compiled.decide(&client4, &web4, Protocol::Tcp, 80));

    // Removing a pod's IPv6 address removes its IPv6 entry (diff against what was written).
    let pods4 = vec![
        pods[0].clone(),
        crate::fixtures::pod("b", "n2", "10.244.2.11", ("role", "client")),
    ];
    let (_, compiled, ipcache) = state_on(&nodes, &pods4, &[], cluster.identities());
    assert!(write_policy(&mut maps, &mut written, &compiled, &ipcache).unwrap());
    assert_maps_hold(&maps, &compiled, &ipcache);
    assert!(!maps.ipcache6.contains_key(&v6("fd00:10:244:2::b/128")));
    assert!(maps.cidrs6.is_empty());
}

/// Issue 13, finding 3: a pod with only an IPv6 address is found by its IPv6 route (on main
/// only IPv4 routes were read, so its veth got no programs: no policy, no anti-spoofing), and a
/// dual-stack pod's entry holds both addresses.
#[test]
fn ipv6_routes_name_pod_veths_too() {
    let v6 = |s: &str| -> std::net::Ipv6Addr { s.parse().unwrap() };
    let snap = links::LinkSnapshot {
        names: BTreeMap::from([(2, "eth0".into()), (5, "veth1".into()), (6, "veth2".into())]),
        addresses: BTreeMap::from([(Ipv4Addr::new(10, 213, 0, 11), 2)]),
        routes: vec![
            (Ipv4Addr::UNSPECIFIED, 0, 2),
            (Ipv4Addr::new(10, 244, 1, 11), 32, 5),
        ],
        routes6: vec![
            (v6("fd00:10:244:1::b"), 128, 5),
            (v6("fd00:10:244:1::c"), 128, 6),
        ],
        veths: BTreeSet::from([5, 6]),
        ..links::LinkSnapshot::default()
    };
    let only6 = CachedPod::clone(&pod("only6", "n1", "fd00:10:244:1::c", "x"));
    let pods = vec![
        crate::fixtures::pod_dual(
            "dual",
            "n1",
            "10.244.1.11",
            "fd00:10:244:1::b",
            ("role", "x"),
        ),
        Arc::new(only6),
    ];
    let placed = placement(
        &snap,
        Some(Ipv4Addr::new(10, 213, 0, 11)),
        None,
        "n1",
        &pods,
    );
    let on: BTreeSet<&str> = placed
        .wanted
        .iter()
        .filter(|(_, (hook, _))| *hook == Hook::FromPod)
        .map(|((iface, _), _)| iface.as_str())
        .collect();
    assert_eq!(on, BTreeSet::from(["veth1", "veth2"]));
    assert_eq!(
        placed.endpoints,
        BTreeMap::from([
            (
                5,
                EndpointValue::new(
                    Some(Ipv4Addr::new(10, 244, 1, 11)),
                    Some(v6("fd00:10:244:1::b"))
                )
            ),
            (6, EndpointValue::new(None, Some(v6("fd00:10:244:1::c")))),
        ])
    );
    // A policy selecting the IPv6-only pod: it is named by its route, so nothing waits.
    let deny: wiremesh_policy::Policy = wiremesh_policy::Policy::from_k8s(&policy(
        "deny",
        serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    ))
    .unwrap();
    let mut placed = placed;
    assert!(fail_closed(&mut placed, &snap, "n1", &pods, &[deny]).is_empty());
}

/// What the reconciler reads before flushing the other world or marking `switched`.
#[test]
fn steered_tunnels_say_which_devices_and_peers_the_maps_send_through() {
    let during = SteeredTunnels {
        redirecting: true,
        tunnel: Some("wm0".into()),
        alt: Some("wm0b".into()),
        alt_nodes: ["node-2".to_string()].into_iter().collect(),
    };
    assert!(during.names("wm0") && during.names("wm0b") && !during.names("wm1"));
    // Flagged: through the next world; not flagged: still through the current one.
    assert!(during.sends_through("node-2", "wm0b"));
    assert!(!during.sends_through("node-3", "wm0b"));
    // The pinned config of an earlier process that named no next world sends nobody there.
    let before = SteeredTunnels {
        alt: None,
        ..during.clone()
    };
    assert!(!before.sends_through("node-2", "wm0b"));
    // After Complete the next world's device is the tunnel: everyone goes through it.
    let after = SteeredTunnels {
        redirecting: true,
        tunnel: Some("wm0b".into()),
        alt: None,
        alt_nodes: BTreeSet::new(),
    };
    assert!(after.sends_through("node-3", "wm0b") && !after.names("wm0"));
    // Nothing redirected: the routes decide, and they are the reconciler's own.
    assert!(SteeredTunnels::default().sends_through("node-3", "wm0b"));
    assert!(!SteeredTunnels::default().names("wm0"));
}
