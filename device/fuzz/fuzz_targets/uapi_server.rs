//! Fuzzes the wg(8) UAPI server: one connection of arbitrary bytes served against a real engine
//! state (see `wiremesh_device::fuzzing::uapi_server`). Seeds in `corpus/uapi_server`, replayed
//! by `tests/fuzz_corpus.rs`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wiremesh_device::fuzzing::uapi_server(data);
});
