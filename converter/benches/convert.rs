//! End-to-end benchmark: converts a synthetic checkpoint of a real model shape
//! (Llama 3.2 3B by default, 3.2 billion parameters) both ways and compares each
//! conversion with a durable copy of the same bytes (`cp -r` then `sync` of the
//! copied files) measured in the same run, with peak resident memory from the
//! kernel's accounting of each child process.
//!
//! The conversions run with `validate=false`: the target is for the conversion;
//! validation (which every conversion runs by default before publishing) is
//! timed on its own afterwards, as `convert/validate` of the same output.
//!
//! `cargo bench --bench convert` (env: `CKPT_BENCH_DIR`, default
//! `target/ckpt-bench`, on the filesystem to measure; `CKPT_BENCH_SHAPE=tiny` for
//! a quick smoke run; `CKPT_BENCH_RUNS`, default 2).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod support;

use support::{Measured, gib, measure};

use ckpt_convert::synthetic::{self, ModelShape};

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// `cp -r src dst` then `sync` of every copied file: the durable-copy baseline.
fn durable_copy(src: &Path, dst: &Path) -> Measured {
    let _ = std::fs::remove_dir_all(dst);
    let start = Instant::now();
    let cp = measure(Command::new("cp").arg("-r").arg(src).arg(dst));
    let mut sync = Command::new("sync");
    sync.args(files_under(dst));
    measure(&mut sync);
    Measured {
        seconds: start.elapsed().as_secs_f64(),
        max_rss: cp.max_rss,
    }
}

fn report(name: &str, bytes: u64, largest: u64, cp: &[Measured], conv: &[Measured]) {
    // The median of the runs: one slow run (another process, writeback) should
    // neither hide nor decide the figure.
    let median = |v: &[Measured]| {
        let mut s: Vec<f64> = v.iter().map(|m| m.seconds).collect();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    let (tc, tv) = (median(cp), median(conv));
    let rss = conv.iter().map(|m| m.max_rss).max().unwrap_or(0);
    let limit = 2 * largest + (512 << 20);
    println!("{name}:");
    println!(
        "  durable cp -r: {tc:.2} s ({:.0} MB/s)   conversion: {tv:.2} s ({:.0} MB/s)   ratio {:.2} (target <= 1.30)",
        bytes as f64 / tc / 1e6,
        bytes as f64 / tv / 1e6,
        tv / tc
    );
    println!(
        "  peak RSS {:.2} GiB; largest tensor {:.2} GiB; target <= 2 x largest + 512 MiB = {:.2} GiB ({})",
        gib(rss),
        gib(largest),
        gib(limit),
        if rss <= limit { "met" } else { "MISSED" }
    );
    println!(
        "  runs: cp {:?} s, convert {:?} s",
        cp.iter()
            .map(|m| (m.seconds * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        conv.iter()
            .map(|m| (m.seconds * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken from the command line.
    let shape = match std::env::var("CKPT_BENCH_SHAPE").as_deref() {
        Ok("tiny") => {
            let mut s = ModelShape::tiny_llama();
            s.layers = 8;
            s.hidden = 512;
            s.intermediate = 1536;
            s.heads = 8;
            s.kv_heads = 2;
            s.head_dim = 64;
            s.vocab = 32_000;
            s
        }
        _ => ModelShape::llama_3b(),
    };
    let runs: usize = std::env::var("CKPT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let root = std::env::var_os("CKPT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ckpt-bench"));
    let bin = env!("CARGO_BIN_EXE_ckpt-convert");
    let params = shape.parameters();
    let bytes = params * shape.dtype.size() as u64;
    let largest = shape
        .tensors()
        .iter()
        .map(|(_, s)| s.iter().product::<u64>() * shape.dtype.size() as u64)
        .max()
        .unwrap_or(0);
    println!(
        "benchmark: {} {} layers hidden {} ({:.2} B parameters, {:.2} GiB {}), {} threads, in {}",
        shape.architecture,
        shape.layers,
        shape.hidden,
        params as f64 / 1e9,
        gib(bytes),
        shape.dtype,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        root.display()
    );
    std::fs::create_dir_all(&root).unwrap();
    let src = root.join(format!(
        "src-{}-{}l-{}h",
        shape.model_type, shape.layers, shape.hidden
    ));
    if !src.join("config.json").is_file() {
        let _ = std::fs::remove_dir_all(&src);
        let t = Instant::now();
        synthetic::write_hf(&src, &shape, 1, 5_000_000_000)
            .expect("write the synthetic checkpoint");
        println!(
            "  wrote the synthetic source in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    let meg = root.join("megatron");
    let back = root.join("hf-back");
    let copy = root.join("copy");
    let (mut cp1, mut to_meg, mut cp2, mut to_hf) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        cp1.push(durable_copy(&src, &copy));
        let _ = std::fs::remove_dir_all(&meg);
        to_meg.push(measure(
            Command::new(bin)
                .arg("run")
                .arg("convert/hf_to_megatron")
                .arg(format!("hf_model_id={}", src.display()))
                .arg(format!("megatron_path={}", meg.display()))
                .arg("validate=false"),
        ));
        let iter = meg.join("iter_0000000");
        cp2.push(durable_copy(&iter, &copy));
        let _ = std::fs::remove_dir_all(&back);
        to_hf.push(measure(
            Command::new(bin)
                .arg("run")
                .arg("convert/megatron_to_hf")
                .arg(format!("megatron_path={}", iter.display()))
                .arg(format!("hf_model_id={}", src.display()))
                .arg(format!("hf_path={}", back.display()))
                .arg("validate=false"),
        ));
    }
    report("convert/hf_to_megatron", bytes, largest, &cp1, &to_meg);
    report("convert/megatron_to_hf", bytes, largest, &cp2, &to_hf);
    let _ = std::fs::remove_dir_all(&copy);
    // Validation on its own (warm cache, 2 threads as on the reference machine): the
    // streaming scans, then the scans plus the forward pass of 8 tokens through the
    // source and the output.
    let iter = meg.join("iter_0000000");
    let validate = |extra: &[String]| {
        measure(
            Command::new(bin)
                .arg("validate")
                .arg(&iter)
                .args(["--threads", "2"])
                .args(extra),
        )
    };
    let scan = validate(&["smoke_test=false".to_owned()]);
    let full = validate(&[format!("reference={}", src.display())]);
    println!(
        "convert/validate of the Megatron output ({:.2} GiB), 2 threads:",
        gib(bytes)
    );
    println!(
        "  checks without the smoke test: {:.2} s ({:.0} MB/s), peak RSS {:.2} GiB",
        scan.seconds,
        bytes as f64 / scan.seconds / 1e6,
        gib(scan.max_rss)
    );
    println!(
        "  with the smoke test (forward of source and output): {:.2} s, peak RSS {:.2} GiB",
        full.seconds,
        gib(full.max_rss)
    );
}
