//! The device-control layer (`wiremesh-wgctrl`) against the real kernel WireGuard module. The
//! host's kernel has none, so `wgctrl_kernel_guest_tests` boots Debian's stock kernel in the VM
//! harness (`vm`) and runs the guest tests of this file there in one boot: link management over
//! rtnetlink, `KernelDevice` configured and read back field by field (cross-checked with the host's
//! own `wg show dump`), thousands of peers and allowed IPs in split SET messages and multi-part GET
//! dumps, a handshake between two kernel devices in two namespaces, removal.

use std::{net::IpAddr, process::Command, time::Duration};

use ipnet::IpNet;
use wiremesh_integration::{
    command::{ip, ip_in, run_in},
    netns::within,
    vm,
    wait::until_blocking,
};
use wiremesh_keyexchange::{PrivateKey, PublicKey};
use wiremesh_wgctrl::{
    Datapath, DatapathError, DeviceSettings, KernelDevice, PeerConfig, create_wireguard_link,
    delete_link, find_link, kernel_module_available,
    uapi::parse::{PeerUpdate, SecretKey, SetRequest},
};

/// The guest tests of this file (each `#[ignore]`d on the host: they need the VM's kernel).
const GUEST_TESTS: [&str; 5] = [
    "guest_links_are_created_found_and_deleted",
    "guest_kernel_device_is_configured_and_read_back",
    "guest_thousands_of_allowed_ips_go_in_split_messages_and_come_back",
    "guest_two_kernel_devices_handshake_through_wgctrl",
    "guest_errors_name_the_interface",
];

#[test]
fn wgctrl_kernel_guest_tests() {
    vm::rerun_tests_in_vm(&GUEST_TESTS);
}

fn guest_only() {
    assert!(
        vm::in_guest(),
        "runs inside the kernel VM: wgctrl_kernel_guest_tests boots it"
    );
}

/// Network namespaces of one guest test, deleted on drop.
#[derive(Default)]
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, name: &str) -> String {
        let name = format!("wmwg{}-{name}", std::process::id());
        ip(["netns", "add", &name]).expect("ip netns add");
        ip_in(&name, ["link", "set", "lo", "up"]).expect("lo up");
        self.0.push(name.clone());
        name
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.0.drain(..).rev() {
            let _ = ip(["netns", "del", &ns]);
        }
    }
}

fn net(s: &str) -> IpNet {
    s.parse().expect("prefix")
}

fn sorted(mut v: Vec<IpNet>) -> Vec<IpNet> {
    v.sort();
    v
}

/// `wg show <if> dump` (the host's wireguard-tools): the interface line, then one per peer.
fn wg_dump(ns: &str, ifname: &str) -> Vec<Vec<String>> {
    run_in(ns, ["wg", "show", ifname, "dump"])
        .expect("wg show dump")
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

#[test]
#[ignore = "runs inside the kernel VM: wgctrl_kernel_guest_tests boots it"]
fn guest_links_are_created_found_and_deleted() {
    guest_only();
    let mut namespaces = Namespaces::default();
    let ns = namespaces.add("links");
    within(&ns, || {
        assert!(
            kernel_module_available().expect("probe"),
            "the 6.1 guest has WireGuard"
        );
        // The probe leaves nothing behind: only lo here.
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&links.stdout).lines().count(),
            1,
            "only lo after the probe"
        );
        let link = create_wireguard_link("wm-k0").expect("create");
        assert!(link.is_wireguard(), "{link:?}");
        assert!(link.ifindex > 0 && !link.up, "{link:?}");
        assert_eq!(find_link("wm-k0").unwrap(), Some(link.clone()));
        let shown = Command::new("ip")
            .args(["-d", "-o", "link", "show", "wm-k0"])
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
        assert!(
            shown.starts_with(&format!("{}: wm-k0:", link.ifindex)) && shown.contains("wireguard"),
            "{shown}"
        );
        assert!(
            create_wireguard_link("wm-k0").is_err(),
            "a second link of the same name"
        );
        let lo = find_link("lo").unwrap().expect("lo");
        assert!(!lo.is_wireguard());
        delete_link(link.ifindex).expect("delete");
        assert_eq!(find_link("wm-k0").unwrap(), None);
        delete_link(link.ifindex).expect("deleting a gone link is not an error");
    })
    .unwrap();
}

#[test]
#[ignore = "runs inside the kernel VM: wgctrl_kernel_guest_tests boots it"]
fn guest_kernel_device_is_configured_and_read_back() {
    guest_only();
    let mut namespaces = Namespaces::default();
    let ns = namespaces.add("readback");
    let key = PrivateKey::generate().unwrap();
    let peer_key = PrivateKey::generate().unwrap().public_key();
    let other_key = PrivateKey::generate().unwrap().public_key();
    let (key2, ns2) = (key.clone(), ns.clone());
    within(&ns, move || {
        let link = create_wireguard_link("wm-k1").expect("create");
        let dev = KernelDevice::open("wm-k1").expect("open");
        dev.configure(&DeviceSettings {
            private_key: Some(key2.clone()),
            listen_port: Some(51871),
            fwmark: Some(0x57),
        })
        .expect("configure");
        let mut peer = PeerConfig::new(peer_key);
        peer.endpoint = Some("192.0.2.7:51872".parse().unwrap());
        peer.allowed_ips = vec![net("10.9.0.0/24"), net("fd00:9::/64")];
        peer.persistent_keepalive = Some(25);
        peer.preshared_key = Some([0x42; 32]);
        dev.set_peer(&peer).expect("set_peer");
        let mut other = PeerConfig::new(other_key);
        other.endpoint = Some("[2001:db8::7]:51873".parse().unwrap());
        other.allowed_ips = vec![net("10.10.0.0/16")];
        dev.set_peer(&other).expect("set_peer other");

        let status = dev.status().expect("status");
        assert_eq!(status.kind, wiremesh_wgctrl::DatapathKind::Kernel);
        assert_eq!(status.ifindex, link.ifindex);
        assert_eq!(status.mtu, link.mtu);
        assert_eq!(status.public_key, Some(key2.public_key()));
        assert_eq!((status.listen_port, status.fwmark), (51871, 0x57));
        assert_eq!(status.peers.len(), 2);
        let p = status
            .peers
            .iter()
            .find(|p| p.public_key == peer_key)
            .expect("peer");
        assert_eq!(p.endpoint, peer.endpoint);
        assert_eq!(
            sorted(p.allowed_ips.clone()),
            sorted(peer.allowed_ips.clone())
        );
        assert_eq!(p.persistent_keepalive, Some(25));
        assert!(p.has_preshared_key);
        assert_eq!(p.last_handshake, None);
        let o = status
            .peers
            .iter()
            .find(|p| p.public_key == other_key)
            .expect("other");
        assert_eq!(o.endpoint, other.endpoint);
        assert!(!o.has_preshared_key);
        assert_eq!(o.persistent_keepalive, None);

        // set_peer replaces: fewer allowed IPs, PSK and keepalive gone, endpoint kept.
        let mut smaller = PeerConfig::new(peer_key);
        smaller.endpoint = peer.endpoint;
        smaller.allowed_ips = vec![net("10.9.0.0/24")];
        dev.set_peer(&smaller).expect("replace");
        let status = dev.status().unwrap();
        let p = status
            .peers
            .iter()
            .find(|p| p.public_key == peer_key)
            .unwrap();
        assert_eq!(p.allowed_ips, smaller.allowed_ips);
        assert!(!p.has_preshared_key);
        assert_eq!(p.persistent_keepalive, None);
    })
    .unwrap();

    // The host's wg(8) reads the same device the same way.
    let dump = wg_dump(&ns, "wm-k1");
    assert_eq!(dump.len(), 3, "{dump:?}");
    assert_eq!(dump[0][1], key.public_key().to_base64());
    assert_eq!(dump[0][2], "51871");
    assert_eq!(dump[0][3], "0x57");
    let peer_line = dump
        .iter()
        .find(|l| l[0] == peer_key.to_base64())
        .expect("peer line");
    assert_eq!(peer_line[1], "(none)");
    assert_eq!(peer_line[2], "192.0.2.7:51872");
    assert_eq!(peer_line[3], "10.9.0.0/24");
    let other_line = dump
        .iter()
        .find(|l| l[0] == other_key.to_base64())
        .expect("other line");
    assert_eq!(other_line[2], "[2001:db8::7]:51873");

    within(&ns2, move || {
        let dev = KernelDevice::open("wm-k1").unwrap();
        dev.remove_peer(&peer_key).expect("remove");
        dev.remove_peer(&peer_key)
            .expect("removing a missing peer is not an error");
        let status = dev.status().unwrap();
        assert_eq!(
            status
                .peers
                .iter()
                .map(|p| p.public_key)
                .collect::<Vec<_>>(),
            vec![other_key]
        );
        // Clearing the key (all zero) is a device setting like any other.
        dev.set(&SetRequest {
            private_key: Some(SecretKey(zeroize::Zeroizing::new([0; 32]))),
            ..SetRequest::default()
        })
        .expect("clear key");
        assert_eq!(dev.status().unwrap().public_key, None);
        delete_link(status.ifindex).expect("delete");
    })
    .unwrap();
}

/// `peers` peers with `ips_per_peer` allowed IPs each (IPv4 /32s and some IPv6 /128s), all new.
fn big_request(
    peers: u32,
    ips_per_peer: u32,
    first_ip: u32,
) -> (SetRequest, Vec<(PublicKey, Vec<IpNet>)>) {
    let mut req = SetRequest {
        replace_peers: true,
        ..SetRequest::default()
    };
    let mut want = Vec::new();
    let mut n = first_ip;
    for _ in 0..peers {
        let key = PrivateKey::generate().unwrap().public_key();
        let mut peer = PeerUpdate::new(*key.as_bytes());
        peer.replace_allowed_ips = true;
        for _ in 0..ips_per_peer {
            let addr: IpAddr = if n % 7 == 6 {
                std::net::Ipv6Addr::from((0xfd00_u128 << 112) | u128::from(n)).into()
            } else {
                std::net::Ipv4Addr::from(0x0a00_0000 + n).into()
            };
            let len = if addr.is_ipv4() { 32 } else { 128 };
            peer.allowed_ips.push(IpNet::new(addr, len).unwrap());
            n += 1;
        }
        want.push((key, sorted(peer.allowed_ips.clone())));
        req.peers.push(peer);
    }
    (req, want)
}

fn read_back(dev: &KernelDevice) -> Vec<(PublicKey, Vec<IpNet>)> {
    let mut got: Vec<(PublicKey, Vec<IpNet>)> = dev
        .status()
        .expect("status")
        .peers
        .into_iter()
        .map(|p| (p.public_key, sorted(p.allowed_ips)))
        .collect();
    got.sort_by_key(|(k, _)| *k);
    got
}

#[test]
#[ignore = "runs inside the kernel VM: wgctrl_kernel_guest_tests boots it"]
fn guest_thousands_of_allowed_ips_go_in_split_messages_and_come_back() {
    guest_only();
    let mut namespaces = Namespaces::default();
    let ns = namespaces.add("bulk");
    within(&ns, move || {
        let link = create_wireguard_link("wm-k2").expect("create");
        let dev = KernelDevice::open("wm-k2").expect("open");

        // 1,000 peers with 20 allowed IPs each (20,000) in 8 KiB messages, replacing all peers.
        let (req, mut want) = big_request(1_000, 20, 0);
        dev.set(&req).expect("set 1,000 peers");
        want.sort_by_key(|(k, _)| *k);
        assert!(read_back(&dev) == want, "1,000 peers read back differ");

        // One peer with 20,000 allowed IPs in 4 KiB messages (wg(8)'s size): its first part
        // replaces the allowed IPs, the continuations append. Replace-peers drops the 1,000.
        let (req, mut want) = big_request(1, 20_000, 100_000);
        dev.set_with_limit(&req, 4096).expect("set one big peer");
        want.sort_by_key(|(k, _)| *k);
        let got = read_back(&dev);
        assert_eq!(got.len(), 1, "replace_peers left only the new peer");
        assert_eq!(got[0].1.len(), 20_000);
        assert!(got == want, "20,000 allowed IPs read back differ");

        // set_peer on that peer replaces all 20,000 with one.
        let mut one = PeerConfig::new(want[0].0);
        one.allowed_ips = vec![net("10.200.0.0/16")];
        dev.set_peer(&one).expect("set_peer");
        assert_eq!(
            read_back(&dev),
            vec![(one.public_key, one.allowed_ips.clone())]
        );
        delete_link(link.ifindex).unwrap();
    })
    .unwrap();
}

#[test]
#[ignore = "runs inside the kernel VM: wgctrl_kernel_guest_tests boots it"]
fn guest_two_kernel_devices_handshake_through_wgctrl() {
    guest_only();
    let mut namespaces = Namespaces::default();
    let a = namespaces.add("a");
    let b = namespaces.add("b");
    ip([
        "link", "add", "wmva", "netns", &a, "type", "veth", "peer", "name", "wmvb", "netns", &b,
    ])
    .expect("veth");
    ip_in(&a, ["addr", "add", "10.210.0.1/24", "dev", "wmva"]).unwrap();
    ip_in(&b, ["addr", "add", "10.210.0.2/24", "dev", "wmvb"]).unwrap();
    ip_in(&a, ["link", "set", "wmva", "up"]).unwrap();
    ip_in(&b, ["link", "set", "wmvb", "up"]).unwrap();
    let key_a = PrivateKey::generate().unwrap();
    let key_b = PrivateKey::generate().unwrap();
    let psk = [0x5a; 32];
    for (ns, key, peer, peer_underlay, peer_tunnel) in [
        (
            &a,
            &key_a,
            key_b.public_key(),
            "10.210.0.2",
            "10.211.0.2/32",
        ),
        (
            &b,
            &key_b,
            key_a.public_key(),
            "10.210.0.1",
            "10.211.0.1/32",
        ),
    ] {
        let key = key.clone();
        let (underlay, tunnel) = (peer_underlay.to_owned(), peer_tunnel.to_owned());
        within(ns, move || {
            create_wireguard_link("wm-hs").expect("create");
            let dev = KernelDevice::open("wm-hs").unwrap();
            dev.configure(&DeviceSettings {
                private_key: Some(key),
                listen_port: Some(51880),
                fwmark: None,
            })
            .unwrap();
            let mut p = PeerConfig::new(peer);
            p.endpoint = Some(format!("{underlay}:51880").parse().unwrap());
            p.allowed_ips = vec![net(&tunnel)];
            p.preshared_key = Some(psk);
            dev.set_peer(&p).unwrap();
        })
        .unwrap();
    }
    ip_in(&a, ["addr", "add", "10.211.0.1/24", "dev", "wm-hs"]).unwrap();
    ip_in(&b, ["addr", "add", "10.211.0.2/24", "dev", "wm-hs"]).unwrap();
    ip_in(&a, ["link", "set", "wm-hs", "up"]).unwrap();
    ip_in(&b, ["link", "set", "wm-hs", "up"]).unwrap();
    until_blocking(
        "a ping from a to b through the kernel tunnel",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || run_in(&a, ["ping", "-c", "1", "-W", "2", "10.211.0.2"]).map_err(|e| e.to_string()),
    )
    .unwrap();
    for ns in [&a, &b] {
        let status = within(ns, || {
            KernelDevice::open("wm-hs").unwrap().status().unwrap()
        })
        .unwrap();
        let peer = &status.peers[0];
        let age = peer
            .last_handshake
            .expect("a handshake after the ping")
            .elapsed()
            .unwrap_or_default();
        assert!(age < Duration::from_secs(120), "handshake {age:?} ago");
        assert!(peer.rx_bytes > 0 && peer.tx_bytes > 0, "{peer:?}");
        assert!(peer.has_preshared_key);
    }
}

#[test]
#[ignore = "runs inside the kernel VM: wgctrl_kernel_guest_tests boots it"]
fn guest_errors_name_the_interface() {
    guest_only();
    let mut namespaces = Namespaces::default();
    let ns = namespaces.add("errors");
    within(&ns, || {
        let missing = KernelDevice::open("wm-missing").expect("the family resolves");
        let err = missing.status().unwrap_err();
        assert!(matches!(err, DatapathError::Kernel { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("wm-missing"), "{text}");
        // Not a WireGuard interface: the kernel refuses it.
        let lo = KernelDevice::open("lo").unwrap();
        let err = lo.status().unwrap_err();
        assert!(err.to_string().contains("lo"), "{err}");
        let err = lo
            .configure(&DeviceSettings {
                listen_port: Some(1),
                ..DeviceSettings::default()
            })
            .unwrap_err();
        assert!(matches!(err, DatapathError::Kernel { .. }), "{err:?}");
    })
    .unwrap();
}
