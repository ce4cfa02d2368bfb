//! Fuzzes the Node annotation parser through the same entry point the corpus test replays.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    wiremesh_keyexchange::fuzzing::annotations(data);
});
