//! Replays the device's committed fuzz corpora (`fuzz/corpus/*`) through the entry points the
//! cargo-fuzz targets call (`wiremesh_device::fuzzing`), so `cargo test` checks exactly what the
//! fuzzer checks: the UAPI server on whole connections, and the engine's receive path on scripts
//! of genuine, replayed, bit-flipped and raw WireGuard messages (a replayed message the engine
//! accepted once must be rejected). Files named `found-*` are inputs a fuzzer run found.

use std::fs;

#[path = "../../testsupport/corpus.rs"]
mod corpus;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    corpus::seeds(env!("CARGO_MANIFEST_DIR"), target, 8)
        .into_iter()
        .map(|path| {
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            (name, fs::read(&path).expect("read seed"))
        })
        .collect()
}

#[test]
fn uapi_server_corpus_replays_cleanly() {
    for (name, data) in corpus("uapi_server") {
        let result = std::panic::catch_unwind(|| wiremesh_device::fuzzing::uapi_server(&data));
        assert!(result.is_ok(), "uapi_server seed {name} fails");
    }
}

#[test]
fn engine_packets_corpus_replays_cleanly() {
    for (name, data) in corpus("engine_packets") {
        let result = std::panic::catch_unwind(|| wiremesh_device::fuzzing::engine_packets(&data));
        assert!(result.is_ok(), "engine_packets seed {name} fails");
    }
}
