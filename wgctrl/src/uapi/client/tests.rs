//! The UAPI client against scripted servers on a temporary socket (no root, no device): the
//! exact bytes it sends, answers in wireguard-go's format, errno and protocol errors, timeouts,
//! and errors that name the socket.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixListener,
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use wiremesh_keyexchange::PrivateKey;

use super::*;
use crate::datapath::PeerConfig;

/// Serves one connection at `path`: records the request (up to its empty line) and writes
/// `answer`. Returns the recorded request.
fn serve_once(path: &Path, answer: &'static str) -> JoinHandle<String> {
    let listener = UnixListener::bind(path).expect("bind");
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut request = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).expect("read") == 0 {
                break;
            }
            request.push_str(&line);
            if line == "\n" {
                break;
            }
        }
        (&stream).write_all(answer.as_bytes()).expect("answer");
        request
    })
}

const PEER: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";

#[test]
fn status_reads_a_wireguard_go_answer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lo.sock");
    let key = PrivateKey::generate().unwrap();
    let hex: String = key.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    // wireguard-go writes the preshared key even when it is all zero, and the protocol version.
    let answer: &'static str = Box::leak(
        format!(
            "private_key={hex}\nlisten_port=51820\nfwmark=7\npublic_key={PEER}\n\
             preshared_key={}\nprotocol_version=1\nendpoint=192.0.2.1:51820\n\
             last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\ntx_bytes=20\n\
             rx_bytes=10\npersistent_keepalive_interval=0\nallowed_ip=10.1.0.0/16\n\
             allowed_ip=fd00::/64\nsome_future_key=1\nerrno=0\n\n",
            "0".repeat(64)
        )
        .into_boxed_str(),
    );
    let server = serve_once(&path, answer);
    // "lo" exists in every namespace, so status() can also read an index and an MTU.
    let dev = UapiDevice::with_socket("lo", &path);
    let status = dev.status().expect("status");
    assert_eq!(server.join().unwrap(), "get=1\n\n");
    assert_eq!(status.kind, DatapathKind::Userspace);
    assert_eq!(status.public_key, Some(key.public_key()));
    assert_eq!((status.listen_port, status.fwmark), (51820, 7));
    assert!(status.ifindex > 0 && status.mtu > 0);
    let peer = &status.peers[0];
    assert!(!peer.has_preshared_key, "an all-zero PSK is no PSK");
    assert_eq!(peer.persistent_keepalive, None);
    assert_eq!(peer.endpoint, Some("192.0.2.1:51820".parse().unwrap()));
    assert_eq!(
        peer.last_handshake,
        Some(std::time::UNIX_EPOCH + Duration::new(1_700_000_000, 5))
    );
    assert_eq!((peer.rx_bytes, peer.tx_bytes), (10, 20));
    assert_eq!(peer.allowed_ips.len(), 2);
}

#[test]
fn set_peer_sends_what_wg_set_would_and_reads_errno() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wm0.sock");
    let dev = UapiDevice::with_socket("wm0", &path);
    let peer_key = PublicKey::from_bytes(parse::parse_hex_key(PEER).unwrap());
    let mut peer = PeerConfig::new(peer_key);
    peer.endpoint = Some("[2001:db8::1]:51871".parse().unwrap());
    peer.allowed_ips = vec!["10.2.0.5/24".parse().unwrap()];
    peer.persistent_keepalive = Some(25);

    let server = serve_once(&path, "errno=0\n\n");
    dev.set_peer(&peer).expect("set_peer");
    let want = format!(
        "set=1\npublic_key={PEER}\npreshared_key={}\nendpoint=[2001:db8::1]:51871\n\
         persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.2.0.0/24\n\n",
        "0".repeat(64)
    );
    assert_eq!(server.join().unwrap(), want);

    std::fs::remove_file(&path).unwrap();
    let server = serve_once(&path, "errno=-98\n\n");
    let err = dev
        .configure(&DeviceSettings {
            listen_port: Some(51871),
            ..DeviceSettings::default()
        })
        .unwrap_err();
    assert_eq!(server.join().unwrap(), "set=1\nlisten_port=51871\n\n");
    let text = err.to_string();
    assert!(
        text.contains("errno=-98") && text.contains("wm0.sock"),
        "{text}"
    );
    assert!(matches!(
        err,
        DatapathError::Uapi {
            source: UapiClientError::Errno { errno: -98 },
            ..
        }
    ));

    std::fs::remove_file(&path).unwrap();
    let server = serve_once(&path, "errno=0\n\n");
    dev.remove_peer(&peer_key).expect("remove");
    assert_eq!(
        server.join().unwrap(),
        format!("set=1\npublic_key={PEER}\nremove=true\n\n")
    );
}

#[test]
fn the_private_key_never_reaches_errors_or_debug() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wm1.sock");
    let key = PrivateKey::generate().unwrap();
    let hex: String = key.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let server = serve_once(&path, "errno=-22\n\n");
    let err = UapiDevice::with_socket("wm1", &path)
        .configure(&DeviceSettings {
            private_key: Some(key),
            ..DeviceSettings::default()
        })
        .unwrap_err();
    let request = server.join().unwrap();
    assert!(request.contains(&hex), "the key is sent");
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(!shown.contains(&hex[..16]), "{shown}");
    }
}

#[test]
fn missing_socket_silent_server_and_garbage_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("gone.sock");
    let err = UapiDevice::with_socket("gone", &missing).get().unwrap_err();
    assert!(
        matches!(
            err,
            DatapathError::Uapi {
                source: UapiClientError::NotServing { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("gone.sock"), "{err}");

    // A server that accepts and never answers: the timeout bounds the call.
    let silent = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&silent).unwrap();
    let (tx, rx) = mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        // Hold the connection open until the test is done.
        let _ = rx.recv_timeout(Duration::from_secs(10));
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    });
    let started = Instant::now();
    let err = UapiDevice::with_socket("silent", &silent)
        .with_timeout(Duration::from_millis(300))
        .get()
        .unwrap_err();
    let took = started.elapsed();
    drop(tx);
    holder.join().unwrap();
    assert!(
        matches!(
            err,
            DatapathError::Uapi {
                source: UapiClientError::Timeout { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");

    for (name, answer) in [
        ("noerrno", "listen_port=1\n\n"),
        ("closed", "listen_port=1\n"),
        ("badport", "listen_port=99999\nerrno=0\n\n"),
        ("badline", "garbage\nerrno=0\n\n"),
    ] {
        let path = dir.path().join(format!("{name}.sock"));
        let server = serve_once(&path, answer);
        let err = UapiDevice::with_socket(name, &path).get().unwrap_err();
        server.join().unwrap();
        assert!(
            matches!(
                err,
                DatapathError::Uapi {
                    source: UapiClientError::Protocol { .. },
                    ..
                }
            ),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn an_invalid_endpoint_is_refused_before_anything_is_sent() {
    let mut peer = PeerConfig::new(PublicKey::from_bytes([1; 32]));
    peer.endpoint = Some("10.0.0.1:0".parse().unwrap());
    // No server at all: the request must not even be attempted.
    let err = UapiDevice::with_socket("x", "/nonexistent/x.sock")
        .set_peer(&peer)
        .unwrap_err();
    assert!(matches!(err, DatapathError::Invalid { .. }), "{err:?}");
}

/// Fuzzer finding (`fuzz/corpus/uapi_get/found-long-errno-line`): a device answering a long
/// garbage `errno=` line made an error message holding the whole line. It is cut to 64
/// characters (printable ASCII only) now, so a broken device cannot flood the agent's logs and Events.
#[test]
fn a_long_bad_errno_line_makes_a_short_error() {
    let (mut device, client) = UnixStream::pair().expect("socketpair");
    let line = format!("errno=-{}\n\n", "2\u{1c}".repeat(5000));
    device.write_all(line.as_bytes()).expect("write");
    drop(device);
    let error = super::read_answer(&client, Duration::from_secs(5)).expect_err("bad errno");
    let message = error.to_string();
    assert!(
        message.starts_with("malformed answer: bad errno line"),
        "{message}"
    );
    assert!(message.len() < 120, "{} bytes: {message}", message.len());
}
