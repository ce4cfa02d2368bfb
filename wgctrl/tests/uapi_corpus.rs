//! Replays the UAPI fuzz targets' committed corpora through the same entry points the fuzz
//! targets call (`wiremesh_wgctrl::fuzzing`), so `cargo test` checks what the fuzzer checks:
//! `corpus/uapi_set` (the device parsing `set=1` bodies) and `corpus/uapi_get` (the client
//! reading a `get=1` answer). Seeds named `ok_*` must be accepted, `bad_*` rejected; `found-*`
//! (inputs a fuzzer run found) must only not panic. Also feeds every prefix of every seed, which
//! covers truncated requests and answers cheaply.

use std::path::Path;

use wiremesh_wgctrl::fuzzing::{uapi_get_answer, uapi_set};

fn replay(target: &str, entry: fn(&[u8]) -> bool) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut seen = 0;
    for entry_ in std::fs::read_dir(&dir).expect("corpus dir") {
        let path = entry_.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let data = std::fs::read(&path).expect("read seed");
        let accepted = entry(&data);
        if name.starts_with("ok_") {
            assert!(accepted, "{target}/{name} was rejected");
        } else if name.starts_with("bad_") {
            assert!(!accepted, "{target}/{name} was accepted");
        } else if !name.starts_with("found-") {
            panic!("seed {target}/{name} must start with ok_, bad_ or found-");
        }
        for cut in 0..=data.len() {
            entry(&data[..cut]);
        }
        seen += 1;
    }
    assert!(seen >= 8, "only {seen} seeds found in {}", dir.display());
}

#[test]
fn set_corpus_round_trips() {
    replay("uapi_set", uapi_set);
}

#[test]
fn get_answer_corpus_round_trips() {
    replay("uapi_get", uapi_get_answer);
}
