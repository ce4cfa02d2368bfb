//! Fuzzes the custom resources' JSON decoding and spec validation (see
//! `wiremesh_crds::fuzzing::specs`). Seeds in `corpus/specs`, replayed by `tests/fuzz_corpus.rs`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wiremesh_crds::fuzzing::specs(data);
});
