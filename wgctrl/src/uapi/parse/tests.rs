//! Unit tests of the UAPI parser and renderer.

use super::*;

const K1: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
const K2: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";

#[test]
fn parses_what_wg_setconf_sends() {
    let body = format!(
        "private_key={K1}\nlisten_port=51820\nfwmark=0\nreplace_peers=true\n\
         public_key={K2}\npreshared_key={K1}\nendpoint=[fd00::1]:51820\n\
         persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
         allowed_ip=10.0.0.5/24\nallowed_ip=fd00::/64\nprotocol_version=1\n"
    );
    let req = parse_set(&body).unwrap();
    assert_eq!(req.listen_port, Some(51820));
    assert_eq!(req.fwmark, Some(0));
    assert!(req.replace_peers);
    assert_eq!(*req.private_key.unwrap().0, parse_hex_key(K1).unwrap());
    let peer = &req.peers[0];
    assert_eq!(peer.public_key, parse_hex_key(K2).unwrap());
    assert_eq!(peer.endpoint, Some("[fd00::1]:51820".parse().unwrap()));
    assert_eq!(peer.persistent_keepalive, Some(25));
    assert!(peer.replace_allowed_ips);
    // Host bits are cleared.
    assert_eq!(
        peer.allowed_ips,
        vec!["10.0.0.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()]
    );
}

#[test]
fn remove_and_update_only_and_mapped_endpoints() {
    let body = format!(
        "public_key={K1}\nremove=true\npublic_key={K2}\nupdate_only=true\nendpoint=[::ffff:10.1.2.3]:9\n"
    );
    let req = parse_set(&body).unwrap();
    assert!(req.peers[0].remove);
    assert!(req.peers[1].update_only);
    assert_eq!(req.peers[1].endpoint, Some("10.1.2.3:9".parse().unwrap()));
}

#[test]
fn rejects_bad_input_with_errno() {
    let cases = [
        ("listen_port=70000\n", EINVAL),
        ("listen_port=-1\n", EINVAL),
        ("listen_port=+1\n", EINVAL),
        ("bogus\n", EPROTO),
        ("private_key=abc\n", EINVAL),
        ("replace_peers=false\n", EINVAL),
        ("endpoint=1.2.3.4:5\n", EINVAL), // peer key before any public_key
        ("whatever=1\n", EINVAL),
    ];
    for (body, errno) in cases {
        let err = parse_set(body).unwrap_err();
        assert_eq!(err.errno(), errno, "{body:?}: {err}");
    }
    let peer_cases = [
        "protocol_version=2",
        "allowed_ip=10.0.0.0/33",
        "allowed_ip=10.0.0.0",
        "endpoint=host.example:1",
        "endpoint=1.2.3.4:0",
        "persistent_keepalive_interval=65536",
        "remove=yes",
        "private_key=00",
    ];
    for line in peer_cases {
        let body = format!("public_key={K1}\n{line}\n");
        assert!(parse_set(&body).is_err(), "{line} was accepted");
    }
}

#[test]
fn errors_and_debug_never_show_keys() {
    let body = format!("private_key={K1}\npublic_key={K2}\npreshared_key={K1}\n");
    let req = parse_set(&body).unwrap();
    let dbg = format!("{req:?}");
    assert!(!dbg.contains(&K1[..16]), "{dbg}");
    let err = parse_set(&format!("private_key={K1}x\n")).unwrap_err();
    assert!(!err.to_string().contains(&K1[..16]), "{err}");
}

#[test]
fn get_renders_like_wireguard_go() {
    let resp = GetResponse {
        private_key: Some(SecretKey(Zeroizing::new(parse_hex_key(K1).unwrap()))),
        listen_port: 51820,
        fwmark: 0,
        peers: vec![GetPeer {
            public_key: parse_hex_key(K2).unwrap(),
            preshared_key: None,
            endpoint: Some("10.0.0.1:51820".parse().unwrap()),
            last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
            rx_bytes: 10,
            tx_bytes: 20,
            persistent_keepalive: 25,
            allowed_ips: vec!["10.1.0.0/16".parse().unwrap()],
        }],
    };
    let text = format_get(&resp);
    let want = format!(
        "private_key={K1}\nlisten_port=51820\npublic_key={K2}\nprotocol_version=1\n\
         endpoint=10.0.0.1:51820\nlast_handshake_time_sec=1700000000\n\
         last_handshake_time_nsec=5\ntx_bytes=20\nrx_bytes=10\n\
         persistent_keepalive_interval=25\nallowed_ip=10.1.0.0/16\nerrno=0\n\n"
    );
    assert_eq!(text.as_str(), want);
    assert!(!format!("{resp:?}").contains(&K1[..16]));
}

/// Fuzzer finding (`fuzz/corpus/uapi_set/found-control-chars-key.txt`): an unknown key of
/// control (or unassigned) characters made an error of ~650 bytes (64 characters, each escaped
/// to up to 10 by `{:?}`). Anything but printable ASCII is shown as '?' now.
#[test]
fn an_unknown_key_of_control_characters_makes_a_short_error() {
    let body = format!("{}\u{afbef}=1\n", "\u{16}".repeat(500));
    let error = parse_set(&body).expect_err("unknown key");
    let message = error.to_string();
    assert_eq!(
        message,
        format!("line 1: unknown device key {:?}", "?".repeat(64))
    );
}
