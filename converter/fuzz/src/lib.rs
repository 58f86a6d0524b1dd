//! What the structure-aware targets share: keeping the bytes they rendered, so a
//! crash they find can be replayed through the raw target it fed
//! (`regressions/<raw target>/`, replayed on stable by
//! `converter/tests/it/fuzz_corpus.rs`).

/// Writes `bytes`, rendered for the raw target `target`, to
/// `$CKPT_FUZZ_RENDER/<target>` when that directory is set (run a structured
/// target on one crash input with it to get the raw bytes).
pub fn keep(target: &str, bytes: &[u8]) {
    if let Some(dir) = std::env::var_os("CKPT_FUZZ_RENDER") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("create $CKPT_FUZZ_RENDER");
        std::fs::write(dir.join(target), bytes).expect("write the rendered input");
    }
}
