//! Every checked-in fuzz corpus file (seeds made from real files by
//! `fuzz/seeds.py`) and every input a fuzzer found a bug with
//! (`fuzz/regressions/<target>/`, named after what it found), fed on stable to
//! the entry points the fuzz targets call: none may panic.

use std::path::Path;

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn every_corpus_file_and_regression_replays() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failures = Vec::new();
    for (name, target) in ckpt_convert::fuzz::TARGETS {
        let seeds = files(&root.join("corpus").join(name));
        assert!(
            seeds.len() >= 3,
            "fuzz/corpus/{name} holds {} seeds: make them with `python converter/fuzz/seeds.py` (the e2e/requirements.txt venv)",
            seeds.len()
        );
        for f in seeds
            .iter()
            .chain(&files(&root.join("regressions").join(name)))
        {
            let data = std::fs::read(f).unwrap();
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                failures.push(f.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "panicked on: {failures:#?}");
}
