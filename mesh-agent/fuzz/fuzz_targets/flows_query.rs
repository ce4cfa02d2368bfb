//! Fuzzes the query string of the agent's `/flows` API (see
//! `mesh_agent::fuzzing::flows_query`). Seeds in `corpus/flows_query`, replayed by
//! `tests/fuzz_corpus.rs`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mesh_agent::fuzzing::flows_query(data);
});
