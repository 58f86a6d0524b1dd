//! End-to-end benchmark of the conversion steps as users run them: the default
//! step (validation and its smoke test included) both ways, against a durable
//! copy of the same bytes (`cp -r` then `sync` of the copied files) measured in
//! the same run, interleaved, with the inputs' pages kept (warm) or dropped
//! (cold, `posix_fadvise(DONTNEED)` on every input file after a `sync`). Each
//! stage is timed too, as the same step with `validate=false` (the conversion
//! alone) and `smoke_test=false` (without the forward passes), and peak resident
//! memory comes from the kernel's accounting of each child process.
//!
//! Models (`CKPT_BENCH_MODELS`, comma-separated; default
//! `llama-1b,qwen3-moe,nemotron-h`):
//! - `llama-1b`: TinyLlama-1.1B's shape (22 layers, 2.2 GB bf16);
//! - `llama-3b`: Llama 3.2 3B's shape (28 layers, 6.4 GB);
//! - `qwen3-moe`: Qwen3-MoE-30B-A3B's shapes (128 experts, top 8), 2 layers;
//! - `nemotron-h`: Nemotron-3 Nano 30B-A3B's (`e2e/bridge/nemotron3_nano_30b_a3b_config.json`,
//!   128 experts), 3 layers: Mamba-2, attention, MoE (`CKPT_BENCH_NEMOTRON_PATTERN`);
//! - `tiny`: a small Llama, to try the benchmark itself.
//!
//! A model needs twice its size free (source and output; the source's weights
//! are removed before the Megatron → HF half, whose output replaces them) and is
//! skipped, saying so, without it. Sources are written to `CKPT_BENCH_DIR`
//! (default `target/ckpt-bench`, on the filesystem to measure) and removed after
//! (`CKPT_BENCH_KEEP=1` keeps them). `CKPT_BENCH_RUNS` (default 3) runs of each
//! kind, interleaved; medians are printed with every run. `CKPT_BENCH_BASELINE`
//! names another `ckpt-convert` binary (an earlier build) whose default step runs
//! interleaved with the rest, for a before/after in the same run.
//!
//! `cargo bench --bench convert`

use std::path::{Path, PathBuf};
use std::process::Command;

mod support;

use support::models::{Model, model};
use support::{Cache, Measured, durable_copy, gib, measure, median, rounded, settle};

use ckpt_convert::synthetic;

/// One kind of run of a step: a binary and extra parameters.
struct Variant {
    label: &'static str,
    bin: PathBuf,
    extra: &'static [&'static str],
}

/// The runs of one direction under one cache state.
struct Timings {
    copy: Vec<Measured>,
    variants: Vec<Vec<Measured>>,
}

#[allow(clippy::too_many_arguments)]
fn direction(
    step: &str,
    args: &[String],
    out: &Path,
    inputs: &[&Path],
    copy_src: &Path,
    copy_dst: &Path,
    variants: &[Variant],
    cache: Cache,
    runs: usize,
) -> Timings {
    let mut t = Timings {
        copy: Vec::new(),
        variants: variants.iter().map(|_| Vec::new()).collect(),
    };
    for run in 0..runs {
        // Only the inputs and one output or copy at a time.
        let _ = std::fs::remove_dir_all(out);
        settle(cache, inputs);
        t.copy.push(durable_copy(copy_src, copy_dst));
        let _ = std::fs::remove_dir_all(copy_dst);
        // Each run starts with another variant: the one right after the copy (and
        // the removal of its output) measured slower, whichever it was.
        for k in 0..variants.len() {
            let i = (k + run) % variants.len();
            let (v, times) = (&variants[i], &mut t.variants[i]);
            let _ = std::fs::remove_dir_all(out);
            settle(cache, inputs);
            times.push(measure(
                Command::new(&v.bin)
                    .arg("run")
                    .arg(step)
                    .args(args)
                    .args(v.extra)
                    .arg("--json"),
            ));
        }
    }
    t
}

fn report(step: &str, cache: Cache, m: &Model, variants: &[Variant], t: &Timings, load: &str) {
    let seconds = |v: &[Measured]| v.iter().map(|m| m.seconds).collect::<Vec<_>>();
    // CPU time varies less than wall time on a shared disk: it shows what each
    // stage costs where the disk's delays hide it.
    let cpu = |v: &[Measured]| median(&v.iter().map(|m| m.cpu_seconds).collect::<Vec<_>>());
    let copy = median(&seconds(&t.copy));
    let limit = 2 * m.largest() + (512 << 20);
    println!(
        "{step}, {} cache (load {load} → {}):",
        cache.name(),
        support::load()
    );
    println!(
        "  {:<34} {copy:6.2} s  {:>6.0} MB/s  CPU {:5.2} s              runs {:?}",
        "durable copy (cp -r + sync)",
        m.bytes() as f64 / copy / 1e6,
        cpu(&t.copy),
        rounded(&seconds(&t.copy))
    );
    for (v, runs) in variants.iter().zip(&t.variants) {
        let s = median(&seconds(runs));
        let rss = runs.iter().map(|r| r.max_rss).max().unwrap_or(0);
        let target = if v.extra.is_empty() {
            format!(
                " (target <= 1.20: {}; RSS <= {:.2}: {})",
                if s / copy <= 1.2 { "met" } else { "MISSED" },
                gib(limit),
                if rss <= limit { "met" } else { "MISSED" }
            )
        } else {
            String::new()
        };
        println!(
            "  {:<34} {s:6.2} s  {:5.2} x copy  CPU {:5.2} s  RSS {:.2} GiB  runs {:?}{target}",
            v.label,
            s / copy,
            cpu(runs),
            gib(rss),
            rounded(&seconds(runs)),
        );
    }
    // The default step's stages, from its own reports (validation runs beside
    // the final fsync; the reference's forward pass beside the conversion).
    if let Some(runs) = t.variants.first() {
        let pick = |p: &str| {
            median(
                &runs
                    .iter()
                    .filter_map(|r| support::json_f64(&r.stdout, p))
                    .collect::<Vec<_>>(),
            )
        };
        if runs
            .iter()
            .all(|r| support::json_f64(&r.stdout, "/validation/seconds").is_some())
        {
            println!(
                "  stages of the default step: validation {:.2} s after the data was written (checks beside the output's forward pass, beside the final fsync)",
                pick("/validation/seconds")
            );
        }
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
    let models = std::env::var("CKPT_BENCH_MODELS")
        .unwrap_or_else(|_| "llama-1b,qwen3-moe,nemotron-h".into());
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_ckpt-convert"));
    let mut variants = vec![Variant {
        label: "default step (validated)",
        bin: bin.clone(),
        extra: &[],
    }];
    if let Some(b) = std::env::var_os("CKPT_BENCH_BASELINE") {
        variants.push(Variant {
            label: "baseline binary, default step",
            bin: b.into(),
            extra: &[],
        });
    }
    variants.push(Variant {
        label: "smoke_test=false",
        bin: bin.clone(),
        extra: &["smoke_test=false"],
    });
    variants.push(Variant {
        label: "validate=false (conversion alone)",
        bin,
        extra: &["validate=false"],
    });
    std::fs::create_dir_all(&root).unwrap();
    println!(
        "benchmark of the default conversion steps: {}",
        support::machine(&root)
    );
    for name in models.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let m = model(name);
        let src = root.join(format!("src-{name}"));
        if !support::room_for(name, m.bytes(), &root, &src) {
            continue;
        }
        println!(
            "{name}: {} tensors, {:.2} GB, largest tensor {:.2} GiB, {runs} runs of each kind",
            m.tensors.len(),
            m.bytes() as f64 / 1e9,
            gib(m.largest())
        );
        if !src.join("config.json").is_file() {
            let _ = std::fs::remove_dir_all(&src);
            let t = std::time::Instant::now();
            synthetic::write_hf_tensors(&src, &m.config, &m.tensors, m.vocab, 1, 5_000_000_000)
                .expect("write the synthetic source");
            println!("  wrote the source in {:.1} s", t.elapsed().as_secs_f64());
        }
        let (meg, back, copy) = (
            root.join(format!("megatron-{name}")),
            root.join(format!("hf-back-{name}")),
            root.join("copy"),
        );
        let iter = meg.join("iter_0000000");
        let to_megatron = [
            format!("hf_model_id={}", src.display()),
            format!("megatron_path={}", meg.display()),
        ];
        for cache in [Cache::Warm, Cache::Cold] {
            let load = support::load();
            let t = direction(
                "convert/hf_to_megatron",
                &to_megatron,
                &meg,
                &[&src],
                &src,
                &copy,
                &variants,
                cache,
                runs,
            );
            report("convert/hf_to_megatron", cache, &m, &variants, &t, &load);
        }
        // The Megatron → HF half reads the iteration and the source's config and
        // tokenizer; its weights make room for the output.
        if !keep {
            for p in support::files_under(&src) {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                if n.ends_with(".safetensors") || n == "model.safetensors.index.json" {
                    std::fs::remove_file(p).unwrap();
                }
            }
        }
        let to_hf = [
            format!("megatron_path={}", iter.display()),
            format!("hf_model_id={}", src.display()),
            format!("hf_path={}", back.display()),
        ];
        for cache in [Cache::Warm, Cache::Cold] {
            let load = support::load();
            let t = direction(
                "convert/megatron_to_hf",
                &to_hf,
                &back,
                &[&iter, &src],
                &iter,
                &copy,
                &variants,
                cache,
                runs,
            );
            report("convert/megatron_to_hf", cache, &m, &variants, &t, &load);
        }
        let _ = std::fs::remove_dir_all(&back);
        let _ = std::fs::remove_dir_all(&meg);
        if !keep {
            let _ = std::fs::remove_dir_all(&src);
        }
    }
}
