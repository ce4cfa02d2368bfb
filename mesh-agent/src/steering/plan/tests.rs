use wiremesh_policy::compile;

use super::*;
use crate::fixtures::{claims, node};

fn pod(name: &str, node: &str, ip: &str, app: &str) -> Arc<CachedPod> {
    crate::fixtures::pod(name, node, ip, ("app", app))
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn ipcache_marks_local_remote_and_encrypted_prefixes_with_identities() {
    let nodes = vec![
        node("n1", "10.213.0.11", "10.244.1.0/24"),
        node("n2", "10.213.0.12", "10.244.2.0/24"),
        node("n3", "10.213.0.13", "10.244.3.0/24"),
    ];
    let pods = vec![
        pod("a", "n1", "10.244.1.11", "a"),
        pod("b", "n2", "10.244.2.11", "b"),
        pod("c", "n3", "10.244.3.11", "a"),
    ];
    let (cluster, problems) = policy_cluster(&[], &pods, &[], &Default::default()).unwrap();
    assert!(problems.is_empty());
    let compiled = compile(&cluster);
    let encrypted = BTreeSet::from(["n2".to_string()]);
    let ipc = desired_ipcache(
        "n1",
        &nodes,
        &pods,
        &compiled.endpoints,
        &encrypted,
        &claims("n1", &nodes, &pods),
    );
    assert_eq!(ipc.len(), 9, "3 pod CIDRs, 3 pods, 3 node addresses");
    // Node addresses: this node is the host, the others remote nodes; never pod addresses.
    let me = ipc[&net("10.213.0.11/32")];
    assert_eq!(
        (me.identity, me.flags),
        (Identity::HOST.0, ipcache_flags::NODE)
    );
    let other = ipc[&net("10.213.0.12/32")];
    assert_eq!(
        (other.identity, other.flags, other.node_id),
        (Identity::REMOTE_NODE.0, ipcache_flags::NODE, node_id("n2"))
    );
    let own = ipc[&net("10.244.1.0/24")];
    assert_eq!(own.flags, ipcache_flags::LOCAL);
    let n2 = ipc[&net("10.244.2.0/24")];
    assert_eq!(n2.flags, ipcache_flags::REMOTE_POD | ipcache_flags::ENCRYPT);
    assert_eq!(n2.node_ip, [10, 213, 0, 12]);
    assert_eq!(n2.node_id, node_id("n2"));
    // No tunnel to n3: still a pod range (strict mode drops it), but not encrypted.
    assert_eq!(ipc[&net("10.244.3.0/24")].flags, ipcache_flags::REMOTE_POD);
    let a = ipc[&net("10.244.1.11/32")];
    let c = ipc[&net("10.244.3.11/32")];
    assert_eq!(a.flags, ipcache_flags::LOCAL);
    assert!(Identity(a.identity).is_pod());
    assert_eq!(a.identity, c.identity, "same labels, same identity");
    assert_ne!(a.identity, ipc[&net("10.244.2.11/32")].identity);
    assert_eq!(c.flags, ipcache_flags::REMOTE_POD);
}

/// Finding 10 (docs/threat-model.md), as the steering task runs it: a new pod whose labels
/// sort before every other label set does not renumber the existing pods when the previous
/// assignment is passed in.
#[test]
fn the_previous_identities_are_kept_across_compiles() {
    let pods = vec![
        pod("a", "n1", "10.244.1.11", "m"),
        pod("b", "n1", "10.244.1.12", "n"),
    ];
    let (first, _) = policy_cluster(&[], &pods, &[], &Default::default()).unwrap();
    let mut more = pods.clone();
    more.push(pod("c", "n1", "10.244.1.13", "a-first"));
    let (second, _) = policy_cluster(&[], &more, &[], first.identities()).unwrap();
    let ids = |c: &Cluster| -> Vec<Identity> {
        ["a", "b"]
            .iter()
            .map(|n| c.identity(c.find_pod("default", n).unwrap()))
            .collect()
    };
    assert_eq!(ids(&second), ids(&first));
}

#[test]
fn host_network_and_finished_pods_are_not_pod_addresses() {
    let nodes = vec![node("n1", "10.213.0.11", "10.244.1.0/24")];
    let mut host = CachedPod::clone(&pod("h", "n1", "10.213.0.11", "h"));
    host.spec.as_mut().unwrap().host_network = Some(true);
    let mut done = CachedPod::clone(&pod("d", "n1", "10.244.1.12", "d"));
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    let pods = vec![Arc::new(host), Arc::new(done)];
    let (cluster, _) = policy_cluster(&[], &pods, &[], &Default::default()).unwrap();
    let ipc = desired_ipcache(
        "n1",
        &nodes,
        &pods,
        &compile(&cluster).endpoints,
        &BTreeSet::new(),
        &claims("n1", &nodes, &pods),
    );
    assert_eq!(
        ipc.keys().copied().collect::<Vec<_>>(),
        vec![net("10.213.0.11/32"), net("10.244.1.0/24")]
    );
    assert_eq!(
        ipc[&net("10.213.0.11/32")].flags,
        ipcache_flags::NODE,
        "the host-network pod's address is the node's, not a pod's"
    );
}

#[test]
fn hostile_pod_addresses_get_no_ipcache_entry() {
    // Issue 13, findings 1 and 2: a pod on n2 whose status says the metadata server, n1's node
    // address, or an IP inside n3's podCIDR. None may become an ENCRYPT entry towards n2 (on
    // main they all did, and the last one overwrote n3's pod).
    let nodes = vec![
        node("n1", "10.213.0.11", "10.244.1.0/24"),
        node("n2", "10.213.0.12", "10.244.2.0/24"),
        node("n3", "10.213.0.13", "10.244.3.0/24"),
    ];
    let pods = vec![
        pod("good", "n2", "10.244.2.11", "a"),
        pod("meta", "n2", "169.254.169.254", "a"),
        pod("node", "n2", "10.213.0.11", "a"),
        pod("steal", "n2", "10.244.3.11", "a"),
        pod("victim", "n3", "10.244.3.12", "a"),
    ];
    let (cluster, _) = policy_cluster(&[], &pods, &[], &Default::default()).unwrap();
    let encrypted = BTreeSet::from(["n2".to_string(), "n3".to_string()]);
    let ipc = desired_ipcache(
        "n1",
        &nodes,
        &pods,
        &compile(&cluster).endpoints,
        &encrypted,
        &claims("n1", &nodes, &pods),
    );
    for hostile in ["169.254.169.254/32", "10.244.3.11/32"] {
        assert!(!ipc.contains_key(&net(hostile)), "{hostile}: {ipc:?}");
    }
    // n1's address keeps its own entry (the host), never a pod entry towards n2.
    let me = ipc[&net("10.213.0.11/32")];
    assert_eq!(
        (me.identity, me.flags),
        (Identity::HOST.0, ipcache_flags::NODE)
    );
    assert_eq!(ipc[&net("10.244.2.11/32")].node_id, node_id("n2"));
    assert_eq!(ipc[&net("10.244.3.0/24")].node_id, node_id("n3"));
    assert_eq!(ipc[&net("10.244.3.12/32")].node_id, node_id("n3"));
}

#[test]
fn malformed_objects_are_reported_and_left_out_without_failing() {
    let bad_policy: NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "bad", "namespace": "default", "uid": "u1"},
        "spec": {"podSelector": {"matchExpressions": [{"key": "app", "operator": "Bogus"}]}}
    }))
    .unwrap();
    let good_policy: NetworkPolicy = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "deny", "namespace": "default"},
        "spec": {"podSelector": {}}
    }))
    .unwrap();
    let mut bad_ports = CachedPod::clone(&pod("p", "n1", "10.244.1.13", "p"));
    bad_ports.spec.as_mut().unwrap().containers = vec![
        serde_json::from_value(
            serde_json::json!({"name": "c", "ports": [{"containerPort": 0, "name": "web"}]}),
        )
        .unwrap(),
    ];
    let twin = pod("twin", "n1", "10.244.1.13", "t");
    let pods = vec![Arc::new(bad_ports), twin];
    let (cluster, problems) = policy_cluster(
        &[],
        &pods,
        &[Arc::new(bad_policy), Arc::new(good_policy)],
        &Default::default(),
    )
    .unwrap();
    let reasons: Vec<&str> = problems.iter().map(|p| p.reason).collect();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(reasons.contains(&"InvalidNetworkPolicy"), "{problems:?}");
    assert!(reasons.contains(&"InvalidPodPorts"), "{problems:?}");
    assert!(reasons.contains(&"DuplicatePodIP"), "{problems:?}");
    assert_eq!(
        cluster.pods().len(),
        1,
        "the pod keeps its identity without its ports"
    );
    assert_eq!(
        cluster.policies().len(),
        1,
        "the valid policy is still enforced"
    );
    let compiled = compile(&cluster);
    assert_eq!(
        compiled.isolated.len(),
        1,
        "default deny of the valid policy"
    );
}

/// Issue 13, finding 3: on a dual-stack cluster every IPv6 podCIDR and pod address gets an
/// ipcache entry with the same fields as its IPv4 twin (on main IPv6 had none, so IPv6 pod
/// traffic was world to policy and not pod traffic to strict mode), node IPv6 addresses are
/// `NODE`, and an IPv6 pod claim outside its node's podCIDRs gets none, like IPv4.
#[test]
fn dual_stack_pods_and_cidrs_get_ipv6_entries_with_the_same_identity() {
    use crate::fixtures::{node_dual, pod_dual};
    let mut n2 = CachedNode::clone(&node_dual(
        "n2",
        "10.213.0.12",
        "10.244.2.0/24",
        "fd00:10:244:2::/64",
    ));
    n2.status
        .as_mut()
        .and_then(|s| s.addresses.as_mut())
        .unwrap()
        .push(k8s_openapi::api::core::v1::NodeAddress {
            type_: "InternalIP".into(),
            address: "fd00:213::12".into(),
        });
    let nodes = vec![
        node_dual("n1", "10.213.0.11", "10.244.1.0/24", "fd00:10:244:1::/64"),
        Arc::new(n2),
    ];
    let pods = vec![
        pod_dual("a", "n1", "10.244.1.11", "fd00:10:244:1::b", ("app", "a")),
        pod_dual("b", "n2", "10.244.2.11", "fd00:10:244:2::b", ("app", "b")),
        // An IPv6 claim outside n2's IPv6 podCIDR (inside n1's): refused, like IPv4.
        pod_dual(
            "evil",
            "n2",
            "10.244.2.12",
            "fd00:10:244:1::99",
            ("app", "b"),
        ),
    ];
    let (cluster, problems) = policy_cluster(&[], &pods, &[], &Default::default()).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let compiled = compile(&cluster);
    let ipc = desired_ipcache(
        "n1",
        &nodes,
        &pods,
        &compiled.endpoints,
        &BTreeSet::from(["n2".to_string()]),
        &claims("n1", &nodes, &pods),
    );
    let own6 = ipc[&net("fd00:10:244:1::/64")];
    assert_eq!(own6.flags, ipcache_flags::LOCAL);
    let n2_6 = ipc[&net("fd00:10:244:2::/64")];
    assert_eq!(
        n2_6,
        ipc[&net("10.244.2.0/24")],
        "same fields as the IPv4 podCIDR"
    );
    assert_eq!(
        n2_6.flags,
        ipcache_flags::REMOTE_POD | ipcache_flags::ENCRYPT
    );
    assert_eq!(n2_6.node_ip, [10, 213, 0, 12], "tunnel endpoints stay IPv4");
    for (v4, v6) in [
        ("10.244.1.11/32", "fd00:10:244:1::b/128"),
        ("10.244.2.11/32", "fd00:10:244:2::b/128"),
    ] {
        let (a, b) = (ipc[&net(v4)], ipc[&net(v6)]);
        assert!(Identity(b.identity).is_pod(), "{v6}: {b:?}");
        assert_eq!(a, b, "{v6} carries the pod's identity and node fields");
    }
    assert!(
        !ipc.contains_key(&net("fd00:10:244:1::99/128")),
        "a hostile IPv6 claim gets no entry: {ipc:?}"
    );
    let node6 = ipc[&net("fd00:213::12/128")];
    assert_eq!(
        (node6.identity, node6.flags),
        (Identity::REMOTE_NODE.0, ipcache_flags::NODE)
    );
    // The compiler knows both addresses of a pod.
    assert_eq!(
        compiled.endpoints[&"fd00:10:244:2::b".parse::<IpAddr>().unwrap()],
        compiled.endpoints[&"10.244.2.11".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn the_policy_model_shares_one_label_map_per_label_set_and_namespace() {
    let pods = vec![
        pod("a", "n1", "10.244.1.10", "web"),
        pod("b", "n2", "10.244.2.10", "web"),
        pod("c", "n2", "10.244.2.11", "db"),
    ];
    let (cluster, problems) = policy_cluster(&[], &pods, &[], &Default::default()).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let id = |name: &str| {
        wiremesh_policy::PodId(cluster.pods().iter().position(|p| p.name == name).unwrap())
    };
    let (a, b, c) = (
        cluster.identity_labels(id("a")),
        cluster.identity_labels(id("b")),
        cluster.identity_labels(id("c")),
    );
    assert!(Arc::ptr_eq(&a.pod, &b.pod), "equal pod labels: one map");
    assert!(!Arc::ptr_eq(&a.pod, &c.pod));
    assert_eq!(c.pod.get("app").map(String::as_str), Some("db"));
    assert!(
        Arc::ptr_eq(&a.namespace, &c.namespace),
        "one map per namespace"
    );
    assert_eq!(a.namespace_name(), "default");
    assert!(Arc::ptr_eq(&cluster.pod(id("a")).labels, &a.pod));
}
