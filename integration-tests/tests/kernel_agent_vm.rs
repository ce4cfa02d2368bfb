//! Issue 12, the kernel datapath of the agent on a real kernel: the host has no WireGuard module,
//! so `kernel_agent_vm_guest_tests` boots Debian's stock kernel in the VM harness and runs the
//! guest test there. In a private network namespace the agent's own code selects the datapath
//! (`auto`: the module is there, so a kernel `wireguard` link is created), configures it
//! (`Mesh::apply`: key, port, peer, route in table 87 behind our rule), repairs drift read back
//! from the kernel (a peer removed with `wg set`, a route deleted with `ip route del`), and a
//! second selection, as a restarted agent makes it, adopts the same link with nothing rewritten.

use std::{net::SocketAddr, path::Path, process::Command, str::FromStr, sync::Arc, time::Duration};

use ipnet::IpNet;
use mesh_agent::{
    config::DatapathChoice,
    datapath::{Datapath, DatapathKind, PeerConfig},
    mesh::{Mesh, Wanted, WantedPeer},
    routes::netlink::NetlinkRoutes,
    select::{DatapathSlot, Selection, SystemDevices, SystemLinks, select},
};
use wiremesh_integration::vm;
use wiremesh_keyexchange::PrivateKey;

#[test]
fn kernel_agent_vm_guest_tests() {
    vm::rerun_tests_in_vm(&["guest_agent_selects_configures_repairs_and_adopts_a_kernel_device"]);
}

fn sh(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "runs inside the kernel VM: kernel_agent_vm_guest_tests boots it"]
fn guest_agent_selects_configures_repairs_and_adopts_a_kernel_device() {
    assert!(vm::in_guest(), "runs inside the kernel VM");
    std::thread::spawn(|| {
        // SAFETY: unshare affects only this thread, which owns the namespace until it ends.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(agent_on_kernel());
    })
    .join()
    .expect("guest test thread");
}

/// `auto` as the agent selects it (no device process: there is no UAPI socket).
async fn select_auto(
    ifname: &str,
) -> Result<(Arc<dyn Datapath>, Selection), mesh_agent::select::SelectError> {
    let socket = Path::new("/nonexistent/wmk0.sock");
    select(
        &SystemLinks,
        &SystemDevices,
        DatapathChoice::Auto,
        ifname,
        socket,
        Duration::from_secs(1),
    )
    .await
}

async fn agent_on_kernel() {
    let ifname = "wmk0";
    let (device, selection) = select_auto(ifname).await.expect("auto selects the kernel");
    assert_eq!(
        (selection.kind, selection.reason),
        (DatapathKind::Kernel, "kernel-module"),
        "{}",
        selection.message
    );
    let slot = Arc::new(DatapathSlot::new(ifname));
    slot.set(device, selection);
    let routes = Arc::new(NetlinkRoutes::new(87).expect("rtnetlink"));
    let key = PrivateKey::generate().unwrap();
    let peer_key = PrivateKey::generate().unwrap().public_key();
    let mut config = PeerConfig::new(peer_key);
    config.endpoint = Some(SocketAddr::from_str("192.0.2.2:51871").unwrap());
    config.allowed_ips = vec![IpNet::from_str("10.244.2.0/24").unwrap()];
    config.persistent_keepalive = Some(25);
    let wanted = Wanted {
        enabled: true,
        peers: vec![WantedPeer {
            node: "node-2".into(),
            config,
        }],
        mtu: 1420,
        listen_port: 51871,
    };
    let datapath: Arc<dyn Datapath> = slot.clone();
    let mut mesh = Mesh::new(datapath.clone(), routes.clone(), key.clone());
    let out = mesh.apply(&wanted).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert!(
        matches!(out.key_replaced, Some(None)),
        "a new link has no key"
    );
    assert_eq!((out.peers_set, out.routes_added), (1, 1));
    let shown = sh(&["wg", "show", ifname, "dump"]);
    assert!(shown.contains(&peer_key.to_base64()), "{shown}");
    assert!(shown.contains(&key.public_key().to_base64()), "{shown}");
    assert!(sh(&["ip", "route", "show", "table", "87"]).contains("10.244.2.0/24"));
    assert!(sh(&["ip", "rule", "show"]).contains("lookup 87"));
    let ifindex = datapath.status().expect("status").ifindex;

    // Drift, read back from the kernel and repaired.
    sh(&["wg", "set", ifname, "peer", &peer_key.to_base64(), "remove"]);
    sh(&["ip", "route", "del", "10.244.2.0/24", "table", "87"]);
    let out = mesh.apply(&wanted).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert_eq!((out.peers_repaired, out.routes_repaired), (1, 1));
    assert!(sh(&["wg", "show", ifname, "peers"]).contains(&peer_key.to_base64()));
    assert!(sh(&["ip", "route", "show", "table", "87"]).contains("10.244.2.0/24"));

    // A restarted agent: selects again, adopts the same link, rewrites nothing.
    let (device, selection) = select_auto(ifname)
        .await
        .expect("auto adopts the kernel link");
    assert_eq!(selection.reason, "adopted-kernel-link");
    let slot = Arc::new(DatapathSlot::new(ifname));
    slot.set(device, selection);
    let datapath: Arc<dyn Datapath> = slot.clone();
    let mut mesh = Mesh::new(datapath.clone(), routes.clone(), key);
    let out = mesh.apply(&wanted).await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert!(out.key_replaced.is_none(), "the device holds our key");
    assert_eq!(
        (out.peers_set, out.routes_added),
        (0, 0),
        "adopted as it is"
    );
    assert_eq!(datapath.status().expect("status").ifindex, ifindex);

    // Disabled: rule and table go.
    let out = mesh
        .apply(&Wanted {
            enabled: false,
            peers: vec![],
            ..wanted
        })
        .await;
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    assert!(!sh(&["ip", "rule", "show"]).contains("lookup 87"));
    assert!(
        sh(&["ip", "route", "show", "table", "87"])
            .trim()
            .is_empty()
    );
}
