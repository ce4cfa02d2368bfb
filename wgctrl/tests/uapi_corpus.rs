//! Replays the UAPI fuzz target's seed corpus (`fuzz/corpus/uapi_set`) with the same property
//! the fuzz target checks: no panic, and an accepted request survives a render/parse round
//! trip. Seeds named `ok_*` must parse, `bad_*` must be rejected. Also feeds every prefix of
//! every seed, which covers truncated requests cheaply.

use std::path::Path;

use wiremesh_wgctrl::uapi::parse::{format_set, parse_set};

#[test]
fn seed_corpus_round_trips() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/uapi_set");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).expect("read seed");
        let result = parse_set(&text);
        if name.starts_with("ok_") {
            let req = result.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                parse_set(&format_set(&req)).expect("reparse"),
                req,
                "{name}"
            );
        } else if name.starts_with("bad_") {
            assert!(result.is_err(), "{name} was accepted");
        } else {
            panic!("seed {name} must start with ok_ or bad_");
        }
        for cut in 0..=text.len() {
            if let Ok(req) = parse_set(&text[..cut]) {
                assert_eq!(
                    parse_set(&format_set(&req)).expect("reparse"),
                    req,
                    "{name}[..{cut}]"
                );
            }
        }
        seen += 1;
    }
    assert!(seen >= 8, "only {seen} seeds found in {}", dir.display());
}
