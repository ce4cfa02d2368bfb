//! Fuzzes the engine's receive path with malformed, replayed and forged WireGuard messages
//! (see `wiremesh_device::engine::fuzzing`). Seeds in `corpus/engine_packets`, replayed by
//! `tests/fuzz_corpus.rs`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wiremesh_device::fuzzing::engine_packets(data);
});
