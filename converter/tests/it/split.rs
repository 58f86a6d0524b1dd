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

/// A Qwen3-MoE of 2 layers and 4 experts (`e2e/fixtures/tiny-qwen3-moe-config.json`),
/// every required tensor present.
fn tiny_moe(dir: &Path) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/fixtures/tiny-qwen3-moe-config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let config: Value = serde_json::from_str(&text).unwrap();
    let tensors = ckpt_convert::validate::expected::required_hf_bf16(&config).unwrap();
    synthetic::write_hf_tensors(dir, &text, &tensors, 128, 11, 40_000).expect("write the MoE");
}

/// Every file under `dir` by relative path: its bytes, or for the manifest and
/// the validation report their JSON without what differs between any two runs
/// (`created`, `seconds`, and the smoke test's time at the end of a `detail`)
/// and the split's note of what its parts read back ([`read_back_note`]).
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for p in files_under(dir) {
        let mut bytes = std::fs::read(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy();
        if name == "ckpt-manifest.json" || name == "ckpt-validation.json" {
            let mut v: Value = serde_json::from_slice(&bytes).unwrap();
            ckpt_testcluster::without_run_times(&mut v);
            ckpt_testcluster::take_read_back_note(&mut v);
            bytes = serde_json::to_vec_pretty(&v).unwrap();
        }
        out.insert(p.strip_prefix(dir).unwrap().to_owned(), bytes);
    }
    out
}

/// What the validation report of the output `dir` says the run read back as it
/// wrote: (chunks, of chunks, files); `None` when it says nothing of it.
fn read_back_note(dir: &Path) -> Option<(u64, u64, u64)> {
    let text = std::fs::read(dir.join("ckpt-validation.json")).unwrap();
    let mut v: Value = serde_json::from_slice(&text).unwrap();
    let note = ckpt_testcluster::take_read_back_note(&mut v)?;
    // `A of B chunks and F files`
    let n: Vec<u64> = note
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(n.len(), 3, "{note}");
    Some((n[0], n[1], n[2]))
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
        // The final step's validation read none of the tensor files' bytes
        // again: every chunk and file came from the part that wrote it, as a
        // single run's came from its own read-back.
        for (dir, who) in [(single.clone(), "single"), (w.path(out).join(sub), "split")] {
            let (known, chunks, files) = read_back_note(&dir)
                .unwrap_or_else(|| panic!("{out} workers={n} ({who}): no read-back note"));
            assert!(
                known == chunks && chunks > 0 && files == data as u64,
                "{out} workers={n} ({who}): {known} of {chunks} chunks, {files} of {data} files read back by the run"
            );
        }
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
    // (Several paths at once, as the operator cleans a merge's two outputs.)
    let shared = w.path("run/.iter_0000000.ckpt-staging-split");
    assert!(shared.is_dir());
    std::fs::create_dir(w.path("empty")).unwrap();
    run(&[
        "clean".to_owned(),
        w.path("run").display().to_string(),
        w.path("empty").display().to_string(),
    ])
    .assert_exit(0)
    .stdout_has(&format!("removed  {}", shared.display()))
    .stdout_has(&format!(
        "nothing to clean in {}",
        w.path("empty").display()
    ));
    assert!(!shared.exists(), "{:?}", w.ls("run"));
}

/// The merge's smoke test in the validation report of `dir`: the probe of every
/// merged tensor passed; returns how many it probed.
#[track_caller]
fn probed_tensors(dir: &Path) -> u64 {
    let text = std::fs::read(dir.join("ckpt-validation.json")).unwrap();
    let v: Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(v["smoke_test"]["kind"], "lora_probe", "{v:#}");
    assert_eq!(v["smoke_test"]["status"], "passed", "{v:#}");
    v["smoke_test"]["probe"]["tensors"].as_u64().unwrap()
}

/// `convert/merge_lora` split: PEFT's adapter into a base of five shards, N = 2,
/// 3 and 7, publishes the single run's output; each part probed the merged
/// tensors it wrote, and finalize's smoke test is their probes together.
#[test]
fn a_split_peft_merge_is_the_single_merge() {
    let w = Workdir::new();
    let base = w.hf("base", &ModelShape::tiny_llama(), 20_000);
    let adapter = crate::merge_lora::qv_adapter(
        &w.path("adapter"),
        serde_json::json!({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
    );
    let args = vec![
        "run".to_owned(),
        "convert/merge_lora".into(),
        format!("lora_checkpoint={}", adapter.display()),
        format!("base_hf_path={}", base.display()),
        format!("output_hf_path={}", w.path("merged").display()),
    ];
    let before = (w.snapshot("base"), w.snapshot("adapter"));
    run(&args).assert_exit(0);
    std::fs::rename(w.path("merged"), w.path("single")).unwrap();
    let want = probed_tensors(&w.path("single"));
    assert_eq!(want, 4, "q and v of two layers");
    let shards = w
        .ls("single")
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .count();
    assert!(shards >= 3, "{shards} shards");
    for n in [2, 3, 7] {
        split_run(&args, n);
        assert_same(
            &w.path("single"),
            &w.path("merged"),
            &format!("merge workers={n}"),
        );
        assert_eq!(probed_tensors(&w.path("merged")), want, "workers={n}");
        std::fs::remove_dir_all(w.path("merged")).unwrap();
    }
    assert_eq!((w.snapshot("base"), w.snapshot("adapter")), before);
}

/// A Megatron-Bridge LoRA checkpoint (the real Bridge's) merged split: both
/// outputs (the merged Megatron checkpoint and its HF export) are the single
/// run's, and Bridge's own merge.
#[test]
fn a_split_megatron_bridge_merge_is_the_single_merge() {
    let refs = crate::util::bridge_refs();
    let case = refs.join("llama");
    let w = Workdir::new();
    let args = |out: &str| {
        vec![
            "run".to_owned(),
            "convert/merge_lora".into(),
            format!("lora_checkpoint={}", case.join("lora").display()),
            format!(
                "base_megatron_path={}",
                case.join("bridge_import/iter_0000000").display()
            ),
            format!("hf_model_id={}", case.join("hf").display()),
            format!(
                "output_megatron_path={}",
                w.path(&format!("{out}-mg")).display()
            ),
            format!("output_hf_path={}", w.path(&format!("{out}-hf")).display()),
            "distcp_files=3".into(),
        ]
    };
    // The single run's outputs move aside: the manifests name the outputs.
    run(&args("out")).assert_exit(0);
    for o in ["hf", "mg"] {
        std::fs::rename(w.path(&format!("out-{o}")), w.path(&format!("single-{o}"))).unwrap();
    }
    split_run(&args("out"), 3);
    for o in ["hf", "mg"] {
        std::fs::rename(w.path(&format!("out-{o}")), w.path(&format!("split-{o}"))).unwrap();
    }
    assert_same(
        &w.path("single-hf"),
        &w.path("split-hf"),
        "the split merge's HF export",
    );
    assert_same(
        &w.path("single-mg/iter_0000000"),
        &w.path("split-mg/iter_0000000"),
        "the split merge's Megatron checkpoint",
    );
    for out in ["split-hf", "split-mg/iter_0000000"] {
        assert!(probed_tensors(&w.path(out)) > 0, "{out}");
    }
    let ours = crate::util::megatron_tensors(&w.path("split-mg/iter_0000000"));
    let theirs = crate::util::megatron_tensors(&case.join("merged_megatron/iter_0000000"));
    assert_eq!(ours, theirs, "Bridge's own merge");
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
    // A file changed after its part read it back: finalize, which does not
    // read the parts' bytes again, knows by its times, names it and the part,
    // and publishes nothing.
    let shared = w.path("run/.iter_0000000.ckpt-staging-split");
    let record: serde_json::Value = serde_json::from_slice(&done(2)).unwrap();
    let rel = record["files"][0]["path"].as_str().unwrap();
    let file = shared.join(rel);
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 100;
    bytes[last] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    run(&with(&args, &["workers=3".into(), "finalize".into()]))
        .assert_exit(1)
        .stderr_has(rel)
        .stderr_has("part 2: expected the file as the part read it back")
        .stderr_has("run the part again");
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

/// A part reads back what it wrote once its files are durable: bytes that read
/// back other than written (a disk or filesystem fault, simulated by changing a
/// byte between the write and the read) fail that part with exit 1, naming the
/// file and, for a tensor's data, the tensor; no record is left, so finalize
/// refuses until the part is run again.
#[cfg(feature = "failpoints")]
#[test]
fn a_part_whose_bytes_read_back_wrong_fails_alone() {
    let w = Workdir::new();
    let (_, args) = single_tiny_run(&w);
    let part = |i: usize| with(&args, &["workers=2".into(), format!("part={i}")]);
    run(&part(0)).assert_exit(0);
    let shared = w.path("run/.iter_0000000.ckpt-staging-split");
    let zero: Value = serde_json::from_slice(
        &std::fs::read(shared.join(".ckpt-split/part-0-of-2.json")).unwrap(),
    )
    .unwrap();
    let of_zero = |p: &Path| {
        zero["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| shared.join(f["path"].as_str().unwrap()) == p)
    };
    // Part 1 paused before its read-back; then one byte of its largest file
    // (the byte at `at(len)`, the size kept) changed; returns its stderr.
    let fail_part_1 = |at: fn(usize) -> usize| -> (PathBuf, String) {
        let pause = w.path("pause");
        let _ = std::fs::remove_file(&pause);
        let _ = std::fs::remove_file(pause.with_extension("go"));
        let mut child = bin()
            .args(part(1))
            .env("CKPT_CONVERT_PAUSE_AT", "read-back")
            .env("CKPT_CONVERT_PAUSE_FILE", &pause)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        while !pause.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("part 1 ended ({status}) before it read back");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let file = files_under(&shared)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "distcp") && !of_zero(p))
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .expect("part 1 wrote a .distcp file");
        let mut bytes = std::fs::read(&file).unwrap();
        let i = at(bytes.len());
        bytes[i] ^= 0x40;
        std::fs::write(&file, &bytes).unwrap();
        std::fs::write(pause.with_extension("go"), "").unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{} byte {i}: {stderr}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(!shared.join(".ckpt-split/part-1-of-2.json").exists());
        (file, stderr)
    };
    // In the middle of the file: a tensor's data, named.
    let (file, stderr) = fail_part_1(|len| len / 2);
    assert!(
        stderr.contains(&format!("{}: part 1: expected ", file.display()))
            && stderr.contains("'s bytes at ")
            && stderr.contains(" as written (xxh3 ")
            && stderr.contains(" read back (run the part again)"),
        "{stderr}"
    );
    run(&with(&args, &["workers=2".into(), "finalize".into()]))
        .assert_exit(1)
        .stderr_has("part 1 of 2 has no completion record");
    // In the archive header of the file's first item (its local header's
    // modification time): outside every tensor, the file's digest names it.
    let (file, stderr) = fail_part_1(|_| 10);
    assert!(
        stderr.contains(&format!(
            "{}: part 1: expected the file as written (",
            file.display()
        )) && stderr.contains(" read back (run the part again)"),
        "{stderr}"
    );
    run(&part(1)).assert_exit(0);
    run(&with(&args, &["workers=2".into(), "finalize".into()])).assert_exit(0);
    assert_same(
        &w.path("single/iter_0000000"),
        &w.path("run/iter_0000000"),
        "after a part read back wrong",
    );
}

#[cfg(not(feature = "failpoints"))]
#[test]
fn a_part_whose_bytes_read_back_wrong_fails_alone() {
    panic!(
        "this test needs the failpoints feature: cargo test --features failpoints (the repository's test command passes it)"
    );
}

#[cfg(not(feature = "failpoints"))]
#[test]
fn a_part_killed_mid_write_is_run_again_alone() {
    panic!(
        "this test needs the failpoints feature: cargo test --features failpoints (the repository's test command passes it)"
    );
}
