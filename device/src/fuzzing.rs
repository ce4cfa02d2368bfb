//! Fuzzing entry points of the device, shared by the cargo-fuzz targets in `device/fuzz/` and by
//! `tests/fuzz_corpus.rs`, which replays the committed corpora so `cargo test` runs exactly what
//! the fuzzer runs. Each entry panics when an invariant breaks; that is how the fuzzer reports a
//! finding.
//!
//! - [`uapi_server`]: the wg(8) UAPI server side, a whole connection of arbitrary bytes served
//!   by [`crate::uapi::handle_client`] against a real engine state (no TUN);
//! - [`engine_packets`]: the engine's receive path fed malformed, replayed and forged WireGuard
//!   messages (see [`crate::engine::fuzzing`]).

use std::{
    io::{Read, Write},
    net::Shutdown,
    os::unix::net::UnixStream,
    sync::Arc,
};

use wiremesh_wgctrl::uapi::parse::{self, GetResponse, SetRequest};

pub use crate::engine::fuzzing::engine_packets;
use crate::{engine::fuzzing::detached_device, uapi::UapiHandler};

/// The engine state behind the UAPI, with `listen_port` taken out of every request: the fuzzer
/// must not bind arbitrary ports of the machine it runs on. Everything else (keys, peers,
/// allowed IPs, endpoints, fwmark on its own loopback socket) is applied for real.
struct NoBind(Arc<dyn UapiHandler>);

impl UapiHandler for NoBind {
    fn uapi_get(&self) -> GetResponse {
        self.0.uapi_get()
    }
    fn uapi_set(&self, req: &SetRequest) -> Result<(), i32> {
        let mut req = req.clone();
        req.listen_port = None;
        self.0.uapi_set(&req)
    }
    fn uapi_failed(&self, reason: String) {
        panic!("the UAPI handler failed: {reason}");
    }
}

/// One UAPI connection carrying `data` (any number of `get=1`/`set=1` operations, or garbage),
/// served as the device serves a client. Checks: no panic, the connection ends, and everything
/// the server wrote is a sequence of well-formed answers — `errno=N` then an empty line, and
/// the lines of a `get` answer parse with the client's own parser. Finally the device's state
/// renders to an answer the client parses.
pub fn uapi_server(data: &[u8]) {
    let handler = NoBind(detached_device());
    let (client, server) = UnixStream::pair().expect("socketpair");
    // Read the answers while the server writes them, so a long answer cannot fill the socket
    // buffer and stall the server.
    let mut reader = client.try_clone().expect("clone");
    let answers = std::thread::spawn(move || {
        let mut out = Vec::new();
        reader.read_to_end(&mut out).map(|_| out)
    });
    // The request may be larger than the socket buffer: write it from another thread too.
    let request = data.to_vec();
    let mut writer = client.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&request);
        let _ = writer.shutdown(Shutdown::Write);
    });
    let served = crate::uapi::handle_client(server, &handler);
    sender.join().expect("writer thread");
    let _ = client.shutdown(Shutdown::Both);
    let out = answers
        .join()
        .expect("reader thread")
        .expect("read answers");
    if let Err(e) = served {
        // Only I/O errors (a request cut short at EOF) end a connection with an error.
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
            ),
            "the server failed: {e}"
        );
    }
    check_answers(&out);
    let final_state = parse::format_get(&handler.uapi_get());
    let body = final_state.strip_suffix("errno=0\n\n").expect("errno=0");
    parse::parse_get(body).expect("the device's state renders to a parseable answer");
}

/// Answers are `line*` + `errno=N\n` + `\n`; the lines of each must parse as a `get` answer.
fn check_answers(out: &[u8]) {
    let text = std::str::from_utf8(out).expect("answers are UTF-8");
    let mut rest = text;
    while !rest.is_empty() {
        let Some(at) = rest
            .find("errno=")
            .filter(|&at| at == 0 || rest[..at].ends_with('\n'))
        else {
            panic!("answer without errno: {rest:?}");
        };
        let body = &rest[..at];
        let tail = &rest[at + "errno=".len()..];
        let end = tail
            .find("\n\n")
            .expect("errno line followed by an empty line");
        let errno: i32 = tail[..end].parse().expect("numeric errno");
        assert!(errno <= 0, "errno {errno} must be 0 or negative");
        if !body.is_empty() {
            assert_eq!(errno, 0, "a failed operation wrote lines before its errno");
            parse::parse_get(body).expect("a get answer the client parses");
        }
        rest = &tail[end + 2..];
    }
}
