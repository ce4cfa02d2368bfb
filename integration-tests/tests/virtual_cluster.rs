//! The virtual cluster for real (root): namespaces, links, routes, Kubernetes objects, node
//! credentials used from inside a node namespace, processes in node namespaces, adding and removing a
//! node, detaching and tearing down from the description. Every test checks that what it created is
//! gone afterwards.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;
use wiremesh_integration::{
    ClusterDescription, ClusterOptions, Resource, VirtualCluster, command, netns,
    testenv::client_from_kubeconfig, wait,
};

/// Privileged tests need root (see [`wiremesh_integration::have_root`]).
fn have_root() -> bool {
    wiremesh_integration::have_root("network namespaces")
}

fn netns_list() -> String {
    command::ip(["netns", "list"]).expect("ip netns list")
}

fn link_exists(name: &str) -> bool {
    command::ip(["link", "show", "dev", name]).is_ok()
}

/// Host-side names and processes a cluster created, to check they are gone later.
struct Footprint {
    netns: Vec<String>,
    links: Vec<String>,
    processes: Vec<wiremesh_integration::ProcessIdentity>,
    dirs: Vec<std::path::PathBuf>,
    mounts: Vec<std::path::PathBuf>,
}

fn footprint(ledger: &[Resource]) -> Footprint {
    let mut f = Footprint {
        netns: vec![],
        links: vec![],
        processes: vec![],
        dirs: vec![],
        mounts: vec![],
    };
    for r in ledger {
        match r {
            Resource::Netns { name } => f.netns.push(name.clone()),
            Resource::HostLink { name } => f.links.push(name.clone()),
            Resource::Process { identity, .. } => f.processes.push(*identity),
            Resource::Dir { path } => f.dirs.push(path.clone()),
            Resource::Mount { path } => f.mounts.push(path.clone()),
        }
    }
    f
}

fn assert_gone(f: &Footprint) {
    let list = netns_list();
    for ns in &f.netns {
        assert!(
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "namespace {ns} left behind"
        );
    }
    for link in &f.links {
        assert!(!link_exists(link), "link {link} left behind");
    }
    for p in &f.processes {
        assert!(!p.is_running(), "process {} left running", p.pid);
    }
    for d in &f.dirs {
        assert!(!d.exists(), "directory {} left behind", d.display());
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for m in &f.mounts {
        let m = m.to_string_lossy();
        assert!(
            !mounts
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(m.as_ref())),
            "mount {m} left behind"
        );
    }
}

fn ping(cluster: &VirtualCluster, netns: &str, target: Ipv4Addr) {
    wait::until_blocking(
        &format!("{netns} to ping {target}"),
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let out = command::exec_in(netns, ["ping", "-c", "1", "-W", "1", &target.to_string()])
                .map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stdout).into_owned())
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e} (cluster {})", cluster.id()));
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_topology_objects_rbac_processes_and_cleanup() {
    if !have_root() {
        return;
    }
    let opts = ClusterOptions {
        nodes: 2,
        pods_per_node: 2,
        spare_nodes: 1,
        ..ClusterOptions::default()
    };
    let mut cluster = VirtualCluster::start(opts).await.expect("cluster starts");
    let subnet = cluster.underlay().subnet();
    let bridge_ip = cluster.underlay().bridge_ip();

    // Host side: the bridge with its address, one namespace per node and per pod.
    let addr =
        command::ip(["-4", "-o", "addr", "show", "dev", cluster.bridge()]).expect("bridge exists");
    assert!(
        addr.contains(&format!("{bridge_ip}/24")),
        "bridge address: {addr}"
    );
    let list = netns_list();
    for n in cluster.nodes() {
        assert!(
            list.contains(&n.network.netns),
            "{} missing from {list}",
            n.network.netns
        );
        assert!(subnet.contains(&n.network.underlay_ip));
    }
    assert_eq!(cluster.pods().len(), 4);

    // Pods on one node reach each other; nodes reach each other and the bridge over the underlay;
    // with the plaintext routes, pods reach pods on other nodes.
    let p11 = cluster.pod("pod-1-1").expect("pod-1-1").clone();
    let p12 = cluster.pod("pod-1-2").expect("pod-1-2").clone();
    let p21 = cluster.pod("pod-2-1").expect("pod-2-1").clone();
    let n1 = cluster.node("node-1").expect("node-1").clone();
    let n2 = cluster.node("node-2").expect("node-2").clone();
    ping(&cluster, &p11.network.netns, p12.network.ip);
    ping(&cluster, &p12.network.netns, p11.network.ip);
    ping(&cluster, &n1.network.netns, n2.network.underlay_ip);
    ping(&cluster, &n2.network.netns, n1.network.underlay_ip);
    ping(&cluster, &n1.network.netns, bridge_ip);
    ping(&cluster, &p11.network.netns, p21.network.ip);
    // Pod traffic without any route stops in the node instead of leaving through the host.
    let out = cluster
        .exec_in_pod("pod-1-1", ["ping", "-c", "1", "-W", "1", "10.244.200.10"])
        .expect("ping runs");
    assert!(
        !out.status.success(),
        "a pod reached an address no node owns"
    );
    let routes = command::ip_in(&n1.network.netns, ["route", "show"]).expect("routes");
    assert!(routes.contains("unreachable 10.244.0.0/16"), "{routes}");
    assert!(
        routes.contains(&format!(
            "10.244.2.0/24 via {} dev eth0 metric 1000",
            n2.network.underlay_ip
        )),
        "{routes}"
    );

    // testenv serves on the bridge IP (for the nodes) and on loopback with the same port.
    let server = cluster
        .testenv()
        .expect("testenv")
        .credentials()
        .server
        .clone();
    assert!(
        server.starts_with(&format!("https://{bridge_ip}:")),
        "{server}"
    );
    let port: u16 = server
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port in server URL");
    std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("apiserver on 127.0.0.1");

    // Kubernetes objects as a kubelet and CNI leave them.
    let admin = cluster.client().clone();
    let node = Api::<Node>::all(admin.clone())
        .get("node-1")
        .await
        .expect("Node node-1");
    assert_eq!(
        node.spec.and_then(|s| s.pod_cidrs),
        Some(vec![n1.network.pod_cidr.to_string()])
    );
    let internal = node.status.and_then(|s| s.addresses).unwrap_or_default();
    assert!(
        internal
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == n1.network.underlay_ip.to_string())
    );
    let pod = Api::<Pod>::namespaced(admin.clone(), "default")
        .get("pod-2-1")
        .await
        .expect("Pod pod-2-1");
    assert_eq!(
        pod.spec.and_then(|s| s.node_name).as_deref(),
        Some("node-2")
    );
    assert_eq!(
        pod.status.and_then(|s| s.pod_ip),
        Some(p21.network.ip.to_string())
    );

    // node-1's agent credentials (a token bound to its agent Pod), used from inside node-1's namespace
    // (where its agent runs): it reaches the apiserver over the underlay, patches its own Node, is
    // forbidden to patch node-2 (admission policy), and reads all Nodes and Pods (deploy/ RBAC).
    let kubeconfig = n1.kubeconfig.clone();
    let (own, other, nodes, pods) = netns::within(&n1.network.netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let client = client_from_kubeconfig(&kubeconfig)
                .await
                .expect("node-1 client");
            let api = Api::<Node>::all(client.clone());
            let patch =
                json!({"metadata": {"annotations": {"wiremesh.io/endpoint": "10.213.0.11:51871"}}});
            let own = api
                .patch("node-1", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ());
            // The admission policies come into force seconds after the cluster applied them (the
            // admission plugin's informer): until then the patch goes through. Each attempt
            // changes the value, since an identical patch changes nothing and is always allowed.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            let mut attempt: u16 = 0;
            let other = loop {
                let probe = json!({"metadata": {"annotations": {
                    "wiremesh.io/endpoint": format!("10.213.0.11:{}", 40000 + attempt),
                }}});
                let result = api
                    .patch("node-2", &PatchParams::default(), &Patch::Merge(&probe))
                    .await
                    .map(|_| ());
                if result.is_err() || std::time::Instant::now() >= deadline {
                    break result;
                }
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            };
            let nodes = api
                .list(&ListParams::default())
                .await
                .map(|l| l.items.len());
            // The test pods (the agents' own Pods in the deploy namespace are not counted).
            let pods = Api::<Pod>::all(client)
                .list(&ListParams::default().labels("app=wiremesh-testbed"))
                .await
                .map(|l| l.items.len());
            (own, other, nodes, pods)
        })
    })
    .expect("enter node-1 namespace");
    own.expect("node-1 patches its own Node from its namespace");
    match other {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("node-1 patching node-2: want 403 Forbidden, got {other:?}"),
    }
    assert_eq!(nodes.expect("node-1 lists Nodes"), 2);
    assert_eq!(pods.expect("node-1 lists Pods"), 4);

    // A process in a node namespace, with the node's kubeconfig in its environment.
    let agent = cluster
        .spawn_agent(
            "node-2",
            Path::new("/bin/sh"),
            ["-c", "ip -4 -o addr show dev eth0; echo \"node=$NODE_NAME kubeconfig=$KUBECONFIG\"; exec sleep 600"],
            vec![],
        )
        .expect("spawn agent");
    let log = cluster
        .node("node-2")
        .expect("node-2")
        .agent_log
        .clone()
        .expect("agent log");
    let want = format!("node=node-2 kubeconfig={}", n2.kubeconfig.display());
    wait::until_blocking(
        "agent output",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let text = read_log(&log);
            if text.contains(&want) {
                Ok(())
            } else {
                Err(text)
            }
        },
    )
    .expect("agent wrote its environment");
    assert!(
        read_log(&log).contains(&n2.network.underlay_ip.to_string()),
        "agent not in node-2's namespace"
    );
    let desc = cluster.description();
    assert_eq!(
        desc.nodes
            .iter()
            .find(|n| n.name == "node-2")
            .and_then(|n| n.agent_pid),
        Some(agent.pid)
    );
    // kill -9, as a crash would.
    let status = cluster
        .process(agent.pid)
        .expect("agent")
        .kill()
        .expect("kill -9");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert!(!agent.is_running());
    // Restarted, it is the node's agent again.
    let again = cluster
        .spawn_agent("node-2", Path::new("/bin/sleep"), ["600"], vec![])
        .expect("restart agent");
    assert!(again.is_running());
    let desc = cluster.description();
    assert_eq!(
        desc.nodes
            .iter()
            .find(|n| n.name == "node-2")
            .and_then(|n| n.agent_pid),
        Some(again.pid)
    );

    // A node added later (credentials provisioned at start) is reachable; removing it removes its
    // namespaces, link, objects and the routes to it.
    let n3 = cluster.add_node().await.expect("add node-3").clone();
    assert_eq!(n3.name, "node-3");
    let p31 = cluster
        .add_pod("node-3", None)
        .await
        .expect("pod on node-3")
        .clone();
    ping(&cluster, &p31.network.netns, p11.network.ip);
    ping(&cluster, &n1.network.netns, n3.network.underlay_ip);
    let sleeper = cluster
        .spawn_in_node(
            "node-3",
            wiremesh_integration::ProcessSpec::new(
                "sleeper",
                "/bin/sleep",
                cluster.work_dir().join("logs/sleeper.log"),
            )
            .args(["600"]),
        )
        .expect("spawn in node-3");
    cluster.remove_node("node-3").await.expect("remove node-3");
    assert!(!sleeper.is_running(), "process in a removed node survived");
    let list = netns_list();
    assert!(
        !list.contains(&n3.network.netns) && !list.contains(&p31.network.netns),
        "{list}"
    );
    assert!(!link_exists(&n3.network.host_link));
    let routes = command::ip_in(&n1.network.netns, ["route", "show"]).expect("routes");
    assert!(
        !routes.contains(&n3.network.pod_cidr.to_string()),
        "route to removed node left: {routes}"
    );
    let gone = Api::<Node>::all(admin.clone())
        .get_opt("node-3")
        .await
        .expect("get node-3");
    assert!(gone.is_none(), "Node node-3 still exists");

    // The description carries the documented keys.
    let desc = serde_json::to_value(cluster.description()).expect("description");
    assert_eq!(desc["nodes"].as_array().map(Vec::len), Some(2));
    assert_eq!(desc["pods"].as_array().map(Vec::len), Some(4));
    assert_eq!(
        desc["nodes"][0]["underlayIP"],
        n1.network.underlay_ip.to_string()
    );
    assert!(desc["testenvPid"].as_u64().is_some_and(|p| p > 0));

    // Teardown removes everything that was created.
    let f = footprint(cluster.ledger().resources());
    assert!(
        f.netns.len() >= 6 && !f.links.is_empty() && !f.processes.is_empty() && !f.dirs.is_empty()
    );
    let testenv = cluster.testenv().expect("testenv").identity();
    cluster.teardown().expect("teardown");
    assert_gone(&f);
    assert!(!testenv.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_cluster_is_removed_from_its_description() {
    if !have_root() {
        return;
    }
    let opts = ClusterOptions {
        nodes: 1,
        pods_per_node: 1,
        outlive_parent: true,
        ..ClusterOptions::default()
    };
    let mut cluster = VirtualCluster::start(opts).await.expect("cluster starts");
    let agent = cluster
        .spawn_agent("node-1", Path::new("/bin/sleep"), ["600"], vec![])
        .expect("spawn agent");
    let testenv = cluster.testenv().expect("testenv").identity();
    let path = cluster.work_dir().join("cluster.json");
    let desc = cluster.detach();
    desc.write(&path).expect("write cluster.json");

    // Everything is still there after the handle is gone.
    assert!(agent.is_running() && testenv.is_running());
    assert!(netns_list().contains(&desc.nodes[0].netns));
    assert!(link_exists(&desc.bridge));

    let read = ClusterDescription::read(&path).expect("read cluster.json");
    assert_eq!(read, desc);
    let f = footprint(read.resources.resources());
    read.teardown().expect("teardown from the description");
    assert_gone(&f);
    assert!(!agent.is_running() && !testenv.is_running());
    assert!(!link_exists(&desc.bridge));
}
