//! Fuzzes the wg(8) UAPI `set=1` body parser (the device's side of the protocol): it must never
//! panic, and whatever it accepts must survive a render/parse round trip unchanged. Run:
//! `make fuzz` or `cargo +nightly fuzz run uapi_set` (seed corpus in `corpus/uapi_set`, also
//! replayed by `tests/uapi_corpus.rs`).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = wiremesh_wgctrl::fuzzing::uapi_set(data);
});
