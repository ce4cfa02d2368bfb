//! Replays the committed corpus of the `flows_query` fuzz target (`fuzz/corpus/flows_query`)
//! through the entry point it calls (`mesh_agent::fuzzing::flows_query`), so `cargo test` checks
//! exactly what the fuzzer checks, and pins the window rule the seeds are named after.

use std::fs;

#[path = "../../testsupport/corpus.rs"]
mod corpus;

use mesh_agent::api::{FlowsQuery, FlowsQueryError};

#[test]
fn flows_query_corpus_replays_cleanly() {
    for path in corpus::seeds(env!("CARGO_MANIFEST_DIR"), "flows_query", 10) {
        let data = fs::read(&path).expect("read seed");
        let result = std::panic::catch_unwind(|| mesh_agent::fuzzing::flows_query(&data));
        assert!(result.is_ok(), "seed {} fails", path.display());
    }
}

#[test]
fn flows_window_rule() {
    let q = |since, until| FlowsQuery { since, until };
    assert_eq!(q(None, None).window(100), Ok(None));
    let w = q(Some(10), None).window(100).expect("ok").expect("window");
    assert_eq!((w.from, w.to), (10, 100));
    let w = q(Some(10), Some(10))
        .window(100)
        .expect("ok")
        .expect("window");
    assert_eq!((w.from, w.to), (10, 10));
    assert_eq!(
        q(Some(5), Some(1)).window(100),
        Err(FlowsQueryError::Reversed { since: 5, until: 1 })
    );
    assert_eq!(
        q(None, Some(5)).window(100),
        Err(FlowsQueryError::UntilWithoutSince { until: 5 })
    );
    // `since` in the future with no `until`: until defaults to now, which is before since.
    assert!(q(Some(200), None).window(100).is_err());
}
