//! Issue 14: one conversion split across processes (`workers=N part=I`, then
//! `workers=N finalize`) publishes exactly what a single run does; a killed part
//! is run again alone; finalize publishes nothing until every part is done and
//! refuses a part written for another plan.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use ckpt_convert::synthetic::{self, ModelShape};
use serde_json::Value;

use crate::util::{Workdir, bin, files_under, run, to_hf_args, to_megatron_args};

/// A Qwen3-MoE of 2 layers and 4 experts, every required tensor present.
fn tiny_moe(dir: &Path) {
    let config = serde_json::json!({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "attention_bias": false, "bos_token_id": 1, "eos_token_id": 2,
        "decoder_sparse_step": 1, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
        "intermediate_size": 128, "max_position_embeddings": 256, "mlp_only_layers": [],
        "moe_intermediate_size": 32, "norm_topk_prob": true, "num_attention_heads": 4,
        "num_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_scaling": null,
        "rope_theta": 1_000_000.0, "tie_word_embeddings": false, "dtype": "bfloat16",
        "vocab_size": 128
    });
    let tensors = ckpt_convert::validate::expected::required_hf_bf16(&config).unwrap();
    let text = serde_json::to_string_pretty(&config).unwrap() + "\n";
    synthetic::write_hf_tensors(dir, &text, &tensors, 128, 11, 40_000).expect("write the MoE");
}

/// Every file under `dir` by relative path: its bytes, or for the manifest and
/// the validation report their JSON without what differs between any two runs
/// (`created`, `seconds`, and the smoke test's time at the end of a `detail`).
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for p in files_under(dir) {
        let mut bytes = std::fs::read(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy();
        if name == "ckpt-manifest.json" || name == "ckpt-validation.json" {
            let mut v: Value = serde_json::from_slice(&bytes).unwrap();
            ckpt_testcluster::without_run_times(&mut v);
            bytes = serde_json::to_vec_pretty(&v).unwrap();
        }
        out.insert(p.strip_prefix(dir).unwrap().to_owned(), bytes);
    }
    out
}

/// The manifest's weights digest and files list.
fn manifest_of(dir: &Path) -> (Value, Value) {
    let text = std::fs::read(dir.join("ckpt-manifest.json")).unwrap();
    let m: Value = serde_json::from_slice(&text).unwrap();
    (m["output"]["weights_digest"].clone(), m["files"].clone())
}

/// Asserts that `got` (a published output directory) is `want`, file by file.
#[track_caller]
fn assert_same(want: &Path, got: &Path, what: &str) {
    let (wd, wf) = manifest_of(want);
    let (gd, gf) = manifest_of(got);
    assert!(wd.as_str().is_some_and(|d| d.len() == 32), "{what}: {wd}");
    assert_eq!(wd, gd, "{what}: weights digest");
    assert_eq!(wf, gf, "{what}: manifest files");
    let (w, g) = (tree(want), tree(got));
    assert_eq!(
        w.keys().collect::<Vec<_>>(),
        g.keys().collect::<Vec<_>>(),
        "{what}: files"
    );
    for (path, bytes) in &w {
        assert!(
            g[path] == *bytes,
            "{what}: {} differs:\n{}\n---\n{}",
            path.display(),
            String::from_utf8_lossy(bytes)
                .chars()
                .take(3000)
                .collect::<String>(),
            String::from_utf8_lossy(&g[path])
                .chars()
                .take(3000)
                .collect::<String>()
        );
    }
}

fn with(args: &[String], extra: &[String]) -> Vec<String> {
    args.iter().chain(extra).cloned().collect()
}

/// Runs the split of `args` with `n` workers, every part its own process, all
/// at once, then finalize.
fn split_run(args: &[String], n: usize) {
    let parts: Vec<_> = (0..n)
        .rev()
        .map(|part| {
            let child = bin()
                .args(with(
                    args,
                    &[format!("workers={n}"), format!("part={part}")],
                ))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (part, child)
        })
        .collect();
    for (part, child) in parts {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(&format!("part {part} of {n}")),
            "part {part} of {n}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    run(&with(args, &[format!("workers={n}"), "finalize".into()])).assert_exit(0);
}

/// For one conversion that writes `out` (under `w`; the published output is
/// `out/sub`): N = 1, 2, 3 and 7 give the single run's output.
fn splits_match_the_single_run(w: &Workdir, args: &[String], out: &str, sub: &str) {
    run(args).assert_exit(0);
    std::fs::rename(w.path(out), w.path("single")).unwrap();
    let single = w.path("single").join(sub);
    // Several tensor files to share out.
    let data = files_under(&single)
        .iter()
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "distcp" || e == "safetensors")
        })
        .count();
    assert!(data >= 3, "{out}: {data} tensor files");
    for n in [1, 2, 3, 7] {
        split_run(args, n);
        assert_same(
            &single,
            &w.path(out).join(sub),
            &format!("{out} workers={n}"),
        );
        // The records and the shared staging went with the publish; the run
        // directory's trackers are the single run's.
        let left: Vec<String> = w
            .ls(out)
            .into_iter()
            .filter(|n| n.contains(".ckpt-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        if !sub.is_empty() {
            assert_eq!(w.ls(out), w.ls("single"));
            assert_eq!(
                std::fs::read(w.path(out).join("latest_checkpointed_iteration.txt")).unwrap(),
                std::fs::read(w.path("single/latest_checkpointed_iteration.txt")).unwrap()
            );
        }
        std::fs::remove_dir_all(w.path(out)).unwrap();
    }
    std::fs::remove_dir_all(w.path("single")).unwrap();
}

#[test]
fn a_split_dense_conversion_is_the_single_run_both_ways() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 20_000);
    let before = w.snapshot("src");
    let args = with(
        &to_megatron_args(&w, &src, "run"),
        &["distcp_files=4".into()],
    );
    splits_match_the_single_run(&w, &args, "run", "iter_0000000");
    // And back: HF shards mirrored from the source (several files to share out).
    run(&args).assert_exit(0);
    let back = to_hf_args(&w, &w.path("run/iter_0000000"), &src);
    splits_match_the_single_run(&w, &back, "back", "");
    assert_eq!(before, w.snapshot("src"), "the source changed");
}

#[test]
fn a_split_moe_conversion_is_the_single_run_both_ways() {
    let w = Workdir::new();
    tiny_moe(&w.path("src"));
    let args = with(
        &to_megatron_args(&w, &w.path("src"), "run"),
        &["distcp_files=3".into()],
    );
    splits_match_the_single_run(&w, &args, "run", "iter_0000000");
    run(&args).assert_exit(0);
    let back = to_hf_args(&w, &w.path("run/iter_0000000"), &w.path("src"));
    splits_match_the_single_run(&w, &back, "back", "");
}

#[test]
fn finalize_publishes_nothing_until_every_part_is_done_and_refuses_another_plan() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 20_000);
    let args = with(
        &to_megatron_args(&w, &src, "run"),
        &["distcp_files=4".into()],
    );
    let iter = w.path("run/iter_0000000");
    let finalize = with(&args, &["workers=2".into(), "finalize=true".into()]);
    run(&with(&args, &["workers=2".into(), "part=0".into()])).assert_exit(0);
    run(&finalize)
        .assert_exit(1)
        .stderr_has("part 1 of 2 has no completion record");
    assert!(!iter.exists() && !w.path("run/latest_checkpointed_iteration.txt").exists());
    // Part 1 written for another dtype: refused by the plan's fingerprint.
    run(&with(
        &args,
        &["workers=2".into(), "part=1".into(), "dtype=float16".into()],
    ))
    .assert_exit(0);
    run(&finalize)
        .assert_exit(2)
        .stderr_has("part 1 was written for another plan");
    assert!(!iter.exists());
    // Or for another tensor parallel size.
    let tp2 = [
        "tp=2",
        "make_vocab_size_divisible_by=64",
        "workers=2",
        "part=1",
    ];
    run(&with(&args, &tp2.map(String::from))).assert_exit(0);
    run(&finalize)
        .assert_exit(2)
        .stderr_has("part 1 was written for another plan");
    assert!(!iter.exists());
    // Bad combinations are refusals.
    run(&with(&args, &["workers=2".into(), "part=2".into()]))
        .assert_exit(2)
        .stderr_has("part");
    run(&with(&args, &["part=0".into()])).assert_exit(2);
    // Nobody holds the shared staging between runs: `clean` removes it.
    let shared = w.path("run/.iter_0000000.ckpt-staging-split");
    assert!(shared.is_dir());
    run(&["clean".to_owned(), w.path("run").display().to_string()]).assert_exit(0);
    assert!(!shared.exists(), "{:?}", w.ls("run"));
}

/// A tiny Llama at `src` converted to Megatron (four `.distcp` files) by one
/// process into `single/`; returns the source and the conversion's arguments
/// (writing `run/`).
fn single_tiny_run(w: &Workdir) -> (PathBuf, Vec<String>) {
    let src = w.hf("src", &ModelShape::tiny_llama(), 20_000);
    let args = with(
        &to_megatron_args(w, &src, "run"),
        &["distcp_files=4".into()],
    );
    run(&args).assert_exit(0);
    std::fs::rename(w.path("run"), w.path("single")).unwrap();
    (src, args)
}

/// Parts that see the source under another path (a pod's volume, a Slurm node's
/// mount point) share one plan: a source is known by its content.
#[test]
fn parts_may_see_the_source_under_another_path() {
    let w = Workdir::new();
    let (src, args) = single_tiny_run(&w);
    // The same files, hard-linked under another name.
    let other = w.path("src-elsewhere");
    std::fs::create_dir(&other).unwrap();
    for f in files_under(&src) {
        std::fs::hard_link(&f, other.join(f.file_name().unwrap())).unwrap();
    }
    let moved = to_megatron_args(&w, &other, "run");
    assert_ne!(moved, to_megatron_args(&w, &src, "run"));
    let moved = with(&moved, &["distcp_files=4".into()]);
    run(&with(&moved, &["workers=2".into(), "part=0".into()])).assert_exit(0);
    run(&with(&args, &["workers=2".into(), "part=1".into()])).assert_exit(0);
    run(&with(&args, &["workers=2".into(), "finalize".into()])).assert_exit(0);
    assert_same(
        &w.path("single/iter_0000000"),
        &w.path("run/iter_0000000"),
        "a part reading the source elsewhere",
    );
}

#[cfg(feature = "failpoints")]
#[test]
fn a_part_killed_mid_write_is_run_again_alone() {
    let w = Workdir::new();
    let (_, args) = single_tiny_run(&w);
    let part = |i: usize| with(&args, &["workers=3".into(), format!("part={i}")]);
    run(&part(0)).assert_exit(0);
    run(&part(2)).assert_exit(0);
    let killed = bin()
        .args(part(1))
        .env("CKPT_CONVERT_ABORT_AFTER_PIECES", "2")
        .output()
        .unwrap();
    assert!(!killed.status.success(), "the failpoint did not fire");
    run(&with(&args, &["workers=3".into(), "finalize".into()]))
        .assert_exit(1)
        .stderr_has("part 1 of 3");
    assert!(!w.path("run/iter_0000000").exists());
    let records = w.path("run/.iter_0000000.ckpt-staging-split/.ckpt-split");
    let done = |i: usize| std::fs::read(records.join(format!("part-{i}-of-3.json"))).unwrap();
    let (zero, two) = (done(0), done(2));
    // Part 0 again: already done, nothing rewritten; part 1 again: written.
    run(&part(0))
        .assert_exit(0)
        .stdout_has("already written for this plan");
    run(&part(1)).assert_exit(0);
    assert_eq!(
        (zero, two),
        (done(0), done(2)),
        "other parts' records changed"
    );
    // A file changed after its part recorded it: finalize's validation reads it
    // back against the digest recorded, and publishes nothing.
    let shared = w.path("run/.iter_0000000.ckpt-staging-split");
    let record: serde_json::Value = serde_json::from_slice(&done(2)).unwrap();
    let file = shared.join(record["files"][0]["path"].as_str().unwrap());
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 100;
    bytes[last] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    run(&with(&args, &["workers=3".into(), "finalize".into()]))
        .assert_exit(1)
        .stderr_has("validation failed");
    assert!(!w.path("run/iter_0000000").exists());
    // Its part, run again, sees the digest differ and writes it again.
    run(&part(2)).assert_exit(0);
    assert_ne!(std::fs::read(&file).unwrap(), bytes);
    run(&with(&args, &["workers=3".into(), "finalize".into()])).assert_exit(0);
    assert_same(
        &w.path("single/iter_0000000"),
        &w.path("run/iter_0000000"),
        "after a killed part",
    );
}

#[cfg(not(feature = "failpoints"))]
#[test]
fn a_part_killed_mid_write_is_run_again_alone() {
    panic!(
        "this test needs the failpoints feature: cargo test --features failpoints (the repository's test command passes it)"
    );
}
