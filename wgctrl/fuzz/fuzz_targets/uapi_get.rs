//! Fuzzes the client side of the wg(8) UAPI: the agent reading a device's `get=1` answer
//! (answer reader over a socket pair, then the parser). Run: `make fuzz` or
//! `cargo +nightly fuzz run uapi_get` (seed corpus in `corpus/uapi_get`, also replayed by
//! `tests/uapi_corpus.rs`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = wiremesh_wgctrl::fuzzing::uapi_get_answer(data);
});
