//! Fuzzing entry points of the wg(8) UAPI protocol, shared by the cargo-fuzz targets in
//! `wgctrl/fuzz/` and by `tests/uapi_corpus.rs`, which replays the committed corpora, so
//! `cargo test` runs exactly what the fuzzer runs. Each entry panics when an invariant breaks;
//! that is how the fuzzer reports a finding.
//!
//! The server side (the device reading `set=1` requests) is [`uapi_set`] here plus the socket
//! loop fuzzed in `device/fuzz` (`uapi_server`); the client side (the agent reading a device's
//! `get=1` answer) is [`uapi_get_answer`].

use std::{io::Write, os::unix::net::UnixStream, time::Duration};

use crate::uapi::{
    parse::{format_get, format_set, parse_get, parse_set},
    read_answer,
};

/// Longest error text allowed: errors end up in logs and Events.
pub const MAX_ERROR_LEN: usize = 300;

/// The `set=1` body parser on arbitrary bytes (lossy UTF-8): no panic, a short error, and an
/// accepted request survives a render/parse round trip unchanged. Returns whether it was
/// accepted.
pub fn uapi_set(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    match parse_set(&text) {
        Ok(req) => {
            let again = parse_set(&format_set(&req)).expect("rendered request must parse");
            assert_eq!(again, req, "round trip changed the request");
            true
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.len() <= MAX_ERROR_LEN, "error too long: {message}");
            assert!(e.errno() < 0, "errno {} of {message}", e.errno());
            false
        }
    }
}

/// The client reading a device's answer to `get=1`: the raw bytes as the device wrote them
/// (lossy UTF-8 is not applied: the socket carries bytes), read through the client's own
/// answer reader over a socket pair, then parsed. Checks: no panic, no hang (the reader stops
/// at EOF), a short error; an accepted answer renders to text that parses back to the same
/// rendering (`GetResponse` is compared through its rendering: it holds a zeroized key).
/// Returns whether the answer was accepted.
pub fn uapi_get_answer(data: &[u8]) -> bool {
    let (mut device, client) = UnixStream::pair().expect("socketpair");
    // Written before reading, so the input must fit the socket buffer: cap it (the fuzzer's
    // -max_len is far below this).
    let data = &data[..data.len().min(64 << 10)];
    device.write_all(data).expect("write answer");
    drop(device);
    let body = match read_answer(&client, Duration::from_secs(5)) {
        Ok(body) => body,
        Err(e) => {
            let message = e.to_string();
            assert!(message.len() <= MAX_ERROR_LEN, "error too long: {message}");
            return false;
        }
    };
    match parse_get(&body) {
        Ok(resp) => {
            let rendered = format_get(&resp);
            let body = rendered
                .strip_suffix("errno=0\n\n")
                .expect("rendering ends with errno=0");
            let again = parse_get(body).expect("rendered answer must parse");
            assert_eq!(
                *format_get(&again),
                *rendered,
                "render/parse round trip changed the answer"
            );
            true
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.len() <= MAX_ERROR_LEN, "error too long: {message}");
            false
        }
    }
}
