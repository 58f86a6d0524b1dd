//! Inputs for the tests that run conversions through these peers.

use std::path::Path;

/// Overwrites the last 64 bytes of the first `.safetensors` file in `dir` with
/// `0xFF`: NaN in bfloat16 and float32. The headers stay valid, so a preflight
/// (which reads headers only) passes and the run fails in validation.
///
/// # Panics
/// When `dir` has no safetensors file or it cannot be rewritten (a broken fixture).
pub fn poison_values(dir: &Path) {
    let mut shards: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort();
    let shard = shards
        .first()
        .unwrap_or_else(|| panic!("{}: no .safetensors file", dir.display()));
    let mut bytes = std::fs::read(shard).expect("reading the shard");
    let n = bytes.len();
    assert!(n > 64, "{}: too small to poison", shard.display());
    bytes[n - 64..].fill(0xFF);
    std::fs::write(shard, bytes).expect("rewriting the shard");
}

/// Removes from a validation report (`ckpt-validation.json`) the note that a
/// run's validation adds to its weights digest check, saying how much of what it
/// checked the run read back as it wrote it (`… (12 of 12 chunks and 4 files
/// read back by the run that wrote them)`: a single run's execution, or a split
/// run's parts), and returns the note without its parentheses.
pub fn take_read_back_note(v: &mut serde_json::Value) -> Option<String> {
    const END: &str = " read back by the run that wrote them)";
    let check = v
        .get_mut("checks")?
        .as_array_mut()?
        .iter_mut()
        .find(|c| c["name"] == "weights digest")?;
    let serde_json::Value::String(d) = &mut check["detail"] else {
        return None;
    };
    let at = d.rfind(" (").filter(|_| d.ends_with(END))?;
    let note = d[at + 2..d.len() - 1].to_owned();
    d.truncate(at);
    Some(note)
}

/// Removes from a manifest or validation report (`ckpt-manifest.json`,
/// `ckpt-validation.json`) what differs between any two runs of one conversion:
/// `created`, `seconds` (and the merge probe's `worker_seconds`), and the time at
/// the end of a check's `detail`
/// (`…, 0.41 s`). What is left is the same for runs that wrote the same output.
pub fn without_run_times(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("created");
            m.remove("seconds");
            m.remove("worker_seconds");
            if let Some(serde_json::Value::String(d)) = m.get_mut("detail")
                && let Some(at) = d.rfind(", ").filter(|&at| d[at..].ends_with(" s"))
            {
                d.truncate(at);
            }
            m.values_mut().for_each(without_run_times);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(without_run_times),
        _ => {}
    }
}
