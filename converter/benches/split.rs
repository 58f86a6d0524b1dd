//! Benchmark of one conversion split across processes on one machine: `N`
//! parts (`workers=N part=I`) started together against one disk, then
//! `finalize`, for each `N` of `CKPT_BENCH_WORKERS` (default 1, 2, 4 and the
//! machine's core count), against a durable copy of the same bytes (`cp -r` then
//! `sync`) and the single default run, in the same run, interleaved, warm and
//! cold (as `convert`: the inputs' pages dropped before a cold run).
//!
//! Printed for each `N`: the whole split (parts, then finalize) and its ratio to
//! the copy; the parts' phase (the slowest part's wall time), each part's time
//! (fastest, slowest) and the parts' aggregate throughput; the final step (the
//! smoke test's forward passes, the checks, the manifest and the publish); the
//! peak RSS of any one process. The split with `smoke_test=false` shows what the
//! final step's forward passes cost, the one part of validation that does not
//! split.
//!
//! Every step is the default one (validated). The output has as many tensor files
//! as the largest `N` (`distcp_files` for Megatron; the source's shards, which
//! the HF output mirrors), so every part has files, and every `N` writes the same
//! bytes. Models as `convert` (`CKPT_BENCH_MODELS`, default `llama-1b`), with
//! `CKPT_BENCH_DIR`, `CKPT_BENCH_RUNS` (default 3) and `CKPT_BENCH_KEEP`.
//!
//! `cargo bench --bench split`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod support;

use support::models::{Model, model};
use support::{Cache, Measured, durable_copy, gib, measure, median, rounded, settle};

use ckpt_convert::synthetic;

/// One split run: its parts (in part order), then its final step.
struct SplitRun {
    /// From the first part's start to the last one's end.
    parts_wall: f64,
    parts: Vec<Measured>,
    finalize: Measured,
}

impl SplitRun {
    fn seconds(&self) -> f64 {
        self.parts_wall + self.finalize.seconds
    }

    fn max_rss(&self) -> u64 {
        self.parts
            .iter()
            .map(|p| p.max_rss)
            .chain([self.finalize.max_rss])
            .max()
            .unwrap_or(0)
    }
}

/// What one benchmark run compares.
#[derive(Clone, Copy)]
enum Kind {
    Copy,
    Single,
    /// `N` parts; with the smoke test or without.
    Split(usize, bool),
}

fn split_run(bin: &Path, step: &str, args: &[String], n: usize, smoke: bool) -> SplitRun {
    let run = |extra: Vec<String>| {
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg(step)
            .args(args)
            .args(extra)
            .arg("--json");
        if !smoke {
            cmd.arg("smoke_test=false");
        }
        cmd
    };
    let started = Instant::now();
    let parts: Vec<Measured> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let mut cmd = run(vec![format!("workers={n}"), format!("part={i}")]);
                scope.spawn(move || measure(&mut cmd))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a part's runner"))
            .collect()
    });
    let parts_wall = started.elapsed().as_secs_f64();
    let finalize = measure(&mut run(vec![format!("workers={n}"), "finalize".into()]));
    SplitRun {
        parts_wall,
        parts,
        finalize,
    }
}

/// The runs of one direction under one cache state, by kind.
#[derive(Default)]
struct Timings {
    copy: Vec<Measured>,
    single: Vec<Measured>,
    splits: Vec<Vec<SplitRun>>,
}

#[allow(clippy::too_many_arguments)]
fn direction(
    bin: &Path,
    step: &str,
    args: &[String],
    out: &Path,
    inputs: &[&Path],
    (copy_src, copy_dst): (&Path, &Path),
    splits: &[(usize, bool)],
    cache: Cache,
    runs: usize,
) -> Timings {
    let mut kinds = vec![Kind::Copy, Kind::Single];
    kinds.extend(splits.iter().map(|&(n, smoke)| Kind::Split(n, smoke)));
    let mut t = Timings {
        splits: splits.iter().map(|_| Vec::new()).collect(),
        ..Timings::default()
    };
    for run in 0..runs {
        // Each run starts with another kind (the first after a removal measured
        // slower, whichever it was).
        for k in 0..kinds.len() {
            let kind = kinds[(k + run) % kinds.len()];
            let _ = std::fs::remove_dir_all(out);
            let _ = std::fs::remove_dir_all(copy_dst);
            settle(cache, inputs);
            match kind {
                Kind::Copy => t.copy.push(durable_copy(copy_src, copy_dst)),
                Kind::Single => t.single.push(measure(
                    Command::new(bin)
                        .arg("run")
                        .arg(step)
                        .args(args)
                        .arg("--json"),
                )),
                Kind::Split(n, smoke) => {
                    let i = splits.iter().position(|&s| s == (n, smoke)).unwrap();
                    t.splits[i].push(split_run(bin, step, args, n, smoke));
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(copy_dst);
    t
}

fn report(step: &str, cache: Cache, m: &Model, splits: &[(usize, bool)], t: &Timings, load: &str) {
    let seconds = |v: &[Measured]| v.iter().map(|m| m.seconds).collect::<Vec<_>>();
    let copy = median(&seconds(&t.copy));
    let single = median(&seconds(&t.single));
    let mb = m.bytes() as f64 / 1e6;
    println!(
        "{step}, {} cache (load {load} → {}):",
        cache.name(),
        support::load()
    );
    println!(
        "  {:<40} {copy:6.2} s  {:>6.0} MB/s  runs {:?}",
        "durable copy (cp -r + sync)",
        mb / copy,
        rounded(&seconds(&t.copy))
    );
    println!(
        "  {:<40} {single:6.2} s  {:5.2} x copy  RSS {:.2} GiB  runs {:?}",
        "one process (default step)",
        single / copy,
        gib(t.single.iter().map(|r| r.max_rss).max().unwrap_or(0)),
        rounded(&seconds(&t.single))
    );
    for (&(n, smoke), runs) in splits.iter().zip(&t.splits) {
        let total: Vec<f64> = runs.iter().map(SplitRun::seconds).collect();
        let walls: Vec<f64> = runs.iter().map(|r| r.parts_wall).collect();
        let fin: Vec<f64> = runs.iter().map(|r| r.finalize.seconds).collect();
        let each: Vec<f64> = runs
            .iter()
            .flat_map(|r| r.parts.iter().map(|p| p.seconds))
            .collect();
        let (fastest, slowest) = each
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &s| (lo.min(s), hi.max(s)));
        let label = format!(
            "{n} part{} + finalize{}",
            if n == 1 { "" } else { "s" },
            if smoke { "" } else { ", smoke_test=false" }
        );
        let s = median(&total);
        println!(
            "  {label:<40} {s:6.2} s  {:5.2} x copy  {:5.2} x one process  RSS {:.2} GiB  runs {:?}",
            s / copy,
            s / single,
            gib(runs.iter().map(SplitRun::max_rss).max().unwrap_or(0)),
            rounded(&total),
        );
        let wall = median(&walls);
        println!(
            "  {:<40} parts {wall:6.2} s ({:>5.0} MB/s together; each {fastest:.2}–{slowest:.2} s), finalize {:6.2} s",
            "",
            mb / wall,
            median(&fin),
        );
    }
}

fn main() {
    let runs: usize = std::env::var("CKPT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let root = std::env::var_os("CKPT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ckpt-bench"));
    let keep = std::env::var_os("CKPT_BENCH_KEEP").is_some();
    let models = std::env::var("CKPT_BENCH_MODELS").unwrap_or_else(|_| "llama-1b".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut workers: Vec<usize> = match std::env::var("CKPT_BENCH_WORKERS") {
        Ok(v) => v
            .split(',')
            .map(|w| {
                w.trim().parse().ok().filter(|&n| n > 0).unwrap_or_else(|| {
                    panic!("CKPT_BENCH_WORKERS: {w:?} is not a positive integer")
                })
            })
            .collect(),
        Err(_) => vec![1, 2, 4, cores],
    };
    workers.sort_unstable();
    workers.dedup();
    let most = *workers.last().expect("at least one worker count");
    // Every N with its smoke test; the largest without it too.
    let mut splits: Vec<(usize, bool)> = workers.iter().map(|&n| (n, true)).collect();
    splits.push((most, false));
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_ckpt-convert"));
    std::fs::create_dir_all(&root).unwrap();
    println!(
        "benchmark of one conversion split across processes on one machine: {}",
        support::machine(&root)
    );
    for name in models.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let m = model(name);
        let src = root.join(format!("split-src-{name}"));
        if !support::room_for(name, m.bytes(), &root, &src) {
            continue;
        }
        // As many source shards as the most parts: the HF output mirrors them.
        let shard = m.bytes().div_ceil(most as u64) + (1 << 20);
        println!(
            "{name}: {} tensors, {:.2} GB, {most} tensor files, {runs} runs of each kind",
            m.tensors.len(),
            m.bytes() as f64 / 1e9,
        );
        if !src.join("config.json").is_file() {
            let _ = std::fs::remove_dir_all(&src);
            synthetic::write_hf_tensors(&src, &m.config, &m.tensors, m.vocab, 1, shard)
                .expect("write the synthetic source");
        }
        let (meg, back, copy) = (
            root.join(format!("split-megatron-{name}")),
            root.join(format!("split-hf-back-{name}")),
            root.join("split-copy"),
        );
        let iter = meg.join("iter_0000000");
        let to_megatron = [
            format!("hf_model_id={}", src.display()),
            format!("megatron_path={}", meg.display()),
            format!("distcp_files={most}"),
        ];
        for cache in [Cache::Warm, Cache::Cold] {
            let load = support::load();
            let t = direction(
                &bin,
                "convert/hf_to_megatron",
                &to_megatron,
                &meg,
                &[&src],
                (&src, &copy),
                &splits,
                cache,
                runs,
            );
            report("convert/hf_to_megatron", cache, &m, &splits, &t, &load);
        }
        // The Megatron → HF half reads the last output (every kind wrote the same).
        let _ = std::fs::remove_dir_all(&meg);
        measure(
            Command::new(&bin)
                .arg("run")
                .arg("convert/hf_to_megatron")
                .args(&to_megatron)
                .arg("validate=false"),
        );
        let to_hf = [
            format!("megatron_path={}", iter.display()),
            format!("hf_model_id={}", src.display()),
            format!("hf_path={}", back.display()),
        ];
        for cache in [Cache::Warm, Cache::Cold] {
            let load = support::load();
            let t = direction(
                &bin,
                "convert/megatron_to_hf",
                &to_hf,
                &back,
                &[&iter, &src],
                (&iter, &copy),
                &splits,
                cache,
                runs,
            );
            report("convert/megatron_to_hf", cache, &m, &splits, &t, &load);
        }
        let _ = std::fs::remove_dir_all(&back);
        let _ = std::fs::remove_dir_all(&meg);
        if !keep {
            let _ = std::fs::remove_dir_all(&src);
        }
    }
}
