//! Fuzzes the wg(8) UAPI `set=1` parser: it must never panic, and whatever it accepts must
//! survive a render/parse round trip unchanged. Run: `cargo +nightly fuzz run uapi_set`
//! (seed corpus in `corpus/uapi_set`, also replayed by `tests/device_uapi_corpus.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use wiremesh_wgctrl::uapi::parse::{format_set, parse_set};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(req) = parse_set(text) {
        let again = parse_set(&format_set(&req)).expect("rendered request must parse");
        assert_eq!(again, req, "round trip changed the request");
    }
});
