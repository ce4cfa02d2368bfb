//! The committed seeds of one cargo-fuzz target, for each crate's `tests/fuzz_corpus.rs` (included
//! there with `#[path]`: the crates share no test-support crate).

use std::{
    fs,
    path::{Path, PathBuf},
};

/// The files of `<manifest_dir>/fuzz/corpus/<target>`, sorted; panics with fewer than `min`.
pub fn seeds(manifest_dir: &str, target: &str, min: usize) -> Vec<PathBuf> {
    let dir = Path::new(manifest_dir).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(
        files.len() >= min,
        "only {} seeds in {}",
        files.len(),
        dir.display()
    );
    files
}
