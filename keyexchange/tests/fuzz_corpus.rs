//! Replays every committed fuzz corpus file through the fuzz entry point, so `cargo test` (and
//! `make test`) exercises the annotation parser exactly as the fuzzer does.

use std::fs;

#[path = "../../testsupport/corpus.rs"]
mod corpus;

use wiremesh_keyexchange::{AnnotationError, NodeAnnotations};

#[test]
fn annotation_corpus_replays_cleanly() {
    for path in corpus::seeds(env!("CARGO_MANIFEST_DIR"), "annotations", 20) {
        let data = fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let result = std::panic::catch_unwind(|| wiremesh_keyexchange::fuzzing::annotations(&data));
        assert!(result.is_ok(), "corpus file {} fails", path.display());

        // The seeds are named after what they test: `valid-*` must be accepted, `not-published`
        // and `empty` are pending, every other seed must be rejected.
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let (annotations, addresses) = wiremesh_keyexchange::fuzzing::decode(&data);
        let parsed = NodeAnnotations::parse(&annotations, &addresses);
        if name.starts_with("valid-") || name == "foreign-annotations" {
            assert!(parsed.is_ok(), "{name}: {parsed:?}");
        } else if name == "not-published" || name == "empty" {
            assert_eq!(parsed, Err(AnnotationError::NotPublished), "{name}");
        } else if !name.starts_with("found-") {
            let reason = parsed.expect_err(&name).reason();
            assert_ne!(reason, "PublicKeyNotPublished", "{name}");
        }
    }
}
