//! Replays the committed corpus of the `specs` fuzz target (`fuzz/corpus/specs`) through the
//! entry point it calls (`wiremesh_crds::fuzzing::specs`), so `cargo test` checks exactly what
//! the fuzzer checks. Files named `found-*` are inputs a fuzzer run found.

use std::{fs, path::Path};

#[path = "../../testsupport/corpus.rs"]
mod corpus;

#[test]
fn specs_corpus_replays_cleanly() {
    for path in corpus::seeds(env!("CARGO_MANIFEST_DIR"), "specs", 10) {
        let data = fs::read(&path).expect("read seed");
        let result = std::panic::catch_unwind(|| wiremesh_crds::fuzzing::specs(&data));
        assert!(result.is_ok(), "seed {} fails", path.display());
    }
}

/// The seeds reach what they are named after: the full objects decode, so the corpus exercises
/// the spec accessors and not only the JSON parser.
#[test]
fn full_object_seeds_decode() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/specs");
    let me: wiremesh_crds::MeshEncryption =
        serde_json::from_slice(&fs::read(dir.join("meshencryption-full.json")).expect("seed"))
            .expect("MeshEncryption seed decodes");
    assert_eq!(me.spec.pod_cidrs().expect("cidrs").len(), 2);
    let kr: wiremesh_crds::KeyRotation =
        serde_json::from_slice(&fs::read(dir.join("keyrotation-full.json")).expect("seed"))
            .expect("KeyRotation seed decodes");
    assert!(kr.spec.phase_timeout().is_ok());
    let spec: wiremesh_crds::KeyRotationSpec = serde_json::from_slice(
        &fs::read(dir.join("keyrotation-spec-short-timeout.json")).expect("seed"),
    )
    .expect("spec seed decodes");
    assert!(spec.phase_timeout().is_err());
}
