//! Fuzzing entry point of the agent's `/flows` query, shared by the cargo-fuzz target in
//! `mesh-agent/fuzz/` and by `tests/fuzz_corpus.rs`, which replays the committed corpus so
//! `cargo test` runs exactly what the fuzzer runs. Panics when an invariant breaks; that is how
//! the fuzzer reports a finding.

use std::sync::OnceLock;

use axum::{extract::Query, http::Uri};

use crate::{
    api::FlowsQuery,
    history::{History, Limits},
};

/// "Now" of every fuzzed request (fixed, so an input behaves the same on every run).
const NOW: u64 = 1_700_000_000;

/// A flow history with a few recording periods, opened once per process. Its directory is
/// removed as soon as the database is open (the open file stays usable), so nothing is left
/// behind when the fuzzer is killed.
fn history() -> &'static History {
    static HISTORY: OnceLock<History> = OnceLock::new();
    HISTORY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("wm-fuzz-flows-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("history dir");
        let mut history = None;
        for start in [NOW - 7200, NOW - 600] {
            drop(history.take());
            let h = History::open(&dir, Limits::default(), start).expect("open history");
            h.flush(start + 300).expect("flush");
            history = Some(h);
        }
        std::fs::remove_dir_all(&dir).expect("remove history dir");
        history.expect("history")
    })
}

/// The query string of `GET /flows?<data>` through the same extractor and window rule the
/// handler uses, then the history read it leads to. Checks: no panic; a rejected query has a
/// short error; an accepted window is ordered and the history answers it without error, with
/// recording periods that overlap it.
pub fn flows_query(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(uri) = format!("/flows?{text}").parse::<Uri>() else {
        // hyper answers 400 before the router sees it.
        return;
    };
    let query = match Query::<FlowsQuery>::try_from_uri(&uri) {
        Ok(Query(query)) => query,
        // axum answers 400 with this text.
        Err(rejection) => {
            assert!(rejection.body_text().len() <= 1024, "long rejection");
            return;
        }
    };
    match query.window(NOW) {
        Ok(None) => assert!(query.since.is_none() && query.until.is_none()),
        Ok(Some(window)) => {
            assert!(window.from <= window.to, "window {window:?}");
            assert_eq!(Some(window.from), query.since);
            let history = history();
            history
                .query(window.from, window.to)
                .expect("history query of an accepted window");
            for period in history
                .coverage(window.from, window.to)
                .expect("coverage of an accepted window")
            {
                assert!(
                    period.to >= window.from && period.from <= window.to,
                    "{period:?} outside {window:?}"
                );
            }
        }
        Err(error) => assert!(error.to_string().len() <= 200, "long error: {error}"),
    }
}
