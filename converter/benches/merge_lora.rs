//! LoRA merge benchmark: `convert/merge_lora` against PEFT's `merge_and_unload()` +
//! `save_pretrained()` on CPU, on the same inputs, in the same run: wall time and peak
//! resident memory of each side from the kernel's accounting of the child process
//! (`wait4`), then the two outputs compared tensor by tensor.
//!
//! The model has the shape of Llama 3.2 1B (1.24 billion parameters, bf16, tied
//! embeddings); the adapter has r=16 on every linear layer (q, k, v, o, gate, up,
//! down), f32 as PEFT saves it, with random non-zero A and B.
//!
//! `cargo bench --bench merge_lora`. Environment: `CKPT_BENCH_DIR` (default
//! `target/ckpt-bench`, on the filesystem to measure), `CKPT_PYTHON` (a Python with
//! torch, transformers and peft; default `python3`), `CKPT_BENCH_RUNS` (default 3,
//! interleaved; medians printed with every run), `CKPT_BENCH_BASELINE` (another
//! `ckpt-convert` binary whose default step runs interleaved, for a before/after),
//! `CKPT_BENCH_SHAPE=tiny` for a quick smoke run. Each side runs warm (inputs as
//! the previous run left them) and cold (their pages dropped first, see
//! `support::settle`); ours also with `smoke_test=false` and `validate=false`, to
//! time the merge probe and the other checks.
//!
//! What each side does: PEFT loads the base (bf16), loads the adapter, merges, and
//! saves (no fsync; `torch.set_num_threads` = the cores we use). We run the whole
//! step: preflight, plan, merge (each merged tensor probed as it is written), write,
//! fsync every file, digests, manifest and the validation pass that re-reads the
//! output. Before each measured run, `sync` (not timed) flushes what the previous
//! run left dirty, so neither side pays for the other's write-back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

mod support;

use support::{Cache, Measured, gib, measure, median, rounded, settle};

use ckpt_convert::formats::hf::HfCheckpoint;
use ckpt_convert::synthetic::{self, ModelShape};
use safetensors::tensor::TensorView;

/// Llama 3.2 1B.
fn llama_1b() -> ModelShape {
    ModelShape {
        architecture: "LlamaForCausalLM".into(),
        model_type: "llama".into(),
        layers: 16,
        hidden: 2048,
        intermediate: 8192,
        heads: 32,
        kv_heads: 8,
        head_dim: 64,
        vocab: 128_256,
        tied: true,
        qkv_bias: false,
        qk_norm: false,
        dtype: ckpt_convert::formats::dtype::DType::BF16,
    }
}

const MODULES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// A PEFT adapter directory with rank `r` on every linear layer of `shape`.
fn write_adapter(dir: &Path, shape: &ModelShape, r: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let (h, f, d) = (
        shape.hidden as usize,
        shape.intermediate as usize,
        shape.head_dim as usize,
    );
    let q = shape.heads as usize * d;
    let kv = shape.kv_heads as usize * d;
    let dims = |m: &str| -> (usize, usize) {
        match m {
            "self_attn.q_proj" => (q, h),
            "self_attn.k_proj" | "self_attn.v_proj" => (kv, h),
            "self_attn.o_proj" => (h, q),
            "mlp.gate_proj" | "mlp.up_proj" => (f, h),
            _ => (h, f),
        }
    };
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        ((state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for l in 0..shape.layers {
        for m in MODULES {
            let (out, inn) = dims(m);
            let base = format!("base_model.model.model.layers.{l}.{m}");
            let a: Vec<u8> = (0..r * inn)
                .flat_map(|_| (next() * 0.02).to_le_bytes())
                .collect();
            let b: Vec<u8> = (0..out * r)
                .flat_map(|_| (next() * 0.02).to_le_bytes())
                .collect();
            tensors.push((format!("{base}.lora_A.weight"), vec![r, inn], a));
            tensors.push((format!("{base}.lora_B.weight"), vec![out, r], b));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::tensor::serialize_to_file(
        views,
        Some(meta),
        &dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let targets: Vec<&str> = MODULES
        .iter()
        .map(|m| m.rsplit('.').next().unwrap())
        .collect();
    let cfg = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
        "lora_dropout": 0.0, "bias": "none", "target_modules": targets,
        "base_model_name_or_path": null, "inference_mode": true,
    });
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
}

const PEFT_SCRIPT: &str = r#"
import os, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
"#;

/// Compares two HF directories tensor by tensor: (tensors, elements, elements
/// that differ, max difference in bf16 ulps).
fn compare(a: &Path, b: &Path) -> (usize, u64, u64, u32) {
    let (x, y) = (
        HfCheckpoint::open(a).unwrap(),
        HfCheckpoint::open(b).unwrap(),
    );
    let mut names: Vec<&String> = x.by_name.keys().collect();
    names.sort();
    let mut theirs: Vec<&String> = y.by_name.keys().collect();
    theirs.sort();
    assert_eq!(names, theirs, "the two outputs hold different tensors");
    let (mut elements, mut differ, mut worst) = (0u64, 0u64, 0u32);
    for n in &names {
        let (tx, ty) = (x.tensor(n).unwrap(), y.tensor(n).unwrap());
        assert_eq!((tx.dtype, &tx.shape), (ty.dtype, &ty.shape), "{n}");
        let bx = ckpt_convert::formats::source::read_box(
            &x.files,
            tx,
            &vec![0; tx.shape.len()],
            &tx.shape,
        );
        let by = ckpt_convert::formats::source::read_box(
            &y.files,
            ty,
            &vec![0; ty.shape.len()],
            &ty.shape,
        );
        for (p, q) in bx.chunks_exact(2).zip(by.chunks_exact(2)) {
            elements += 1;
            let (p, q) = (
                i16::from_le_bytes([p[0], p[1]]),
                i16::from_le_bytes([q[0], q[1]]),
            );
            if p != q {
                differ += 1;
                let key = |v: i16| {
                    if v < 0 {
                        -0x8000 - i32::from(v)
                    } else {
                        i32::from(v)
                    }
                };
                worst = worst.max(key(p).abs_diff(key(q)));
            }
        }
    }
    (names.len(), elements, differ, worst)
}

fn main() {
    let shape = match std::env::var("CKPT_BENCH_SHAPE").as_deref() {
        Ok("tiny") => {
            let mut s = llama_1b();
            s.layers = 2;
            s.hidden = 256;
            s.intermediate = 768;
            s.heads = 4;
            s.kv_heads = 2;
            s.vocab = 4096;
            s
        }
        _ => llama_1b(),
    };
    let runs: usize = std::env::var("CKPT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let python = std::env::var("CKPT_PYTHON").unwrap_or_else(|_| "python3".into());
    let root = std::env::var_os("CKPT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ckpt-bench"));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_ckpt-convert"));
    let r = 16;
    std::fs::create_dir_all(&root).unwrap();
    println!(
        "merge benchmark: {} {} layers hidden {} ({:.2} B parameters, {}), LoRA r={r} on {} modules per layer; {}",
        shape.architecture,
        shape.layers,
        shape.hidden,
        shape.parameters() as f64 / 1e9,
        shape.dtype,
        MODULES.len(),
        support::machine(&root)
    );
    let base = root.join(format!("merge-base-{}l-{}h", shape.layers, shape.hidden));
    if !base.join("config.json").is_file() {
        let _ = std::fs::remove_dir_all(&base);
        synthetic::write_hf(&base, &shape, 1, 5_000_000_000).expect("write the base");
    }
    let adapter = root.join(format!(
        "merge-adapter-{}l-{}h-r{r}",
        shape.layers, shape.hidden
    ));
    if !adapter.join("adapter_config.json").is_file() {
        let _ = std::fs::remove_dir_all(&adapter);
        write_adapter(&adapter, &shape, r);
    }
    let script = root.join("peft_merge.py");
    std::fs::write(&script, PEFT_SCRIPT).unwrap();
    let (peft_out, ours_out) = (root.join("merged-peft"), root.join("merged-ours"));
    // (label, binary, extra parameters): the default step first.
    let mut variants: Vec<(&str, PathBuf, &[&str])> =
        vec![("ckpt-convert default step (validated)", bin.clone(), &[])];
    if let Some(b) = std::env::var_os("CKPT_BENCH_BASELINE") {
        variants.push(("baseline binary, default step", b.into(), &[]));
    }
    variants.push((
        "smoke_test=false (no merge probe)",
        bin.clone(),
        &["smoke_test=false"],
    ));
    variants.push(("validate=false (merge alone)", bin, &["validate=false"]));
    for cache in [Cache::Warm, Cache::Cold] {
        let load = support::load();
        let mut peft = Vec::new();
        let mut ours: Vec<Vec<Measured>> = variants.iter().map(|_| Vec::new()).collect();
        for _ in 0..runs {
            // One output on disk at a time.
            let _ = std::fs::remove_dir_all(&ours_out);
            let _ = std::fs::remove_dir_all(&peft_out);
            settle(cache, &[&base, &adapter]);
            peft.push(measure(
                Command::new(&python)
                    .arg(&script)
                    .arg(&base)
                    .arg(&adapter)
                    .arg(&peft_out)
                    .arg(threads.to_string())
                    .env("HF_HUB_OFFLINE", "1")
                    .env("TRANSFORMERS_OFFLINE", "1"),
            ));
            let _ = std::fs::remove_dir_all(&peft_out);
            for ((_, b, extra), times) in variants.iter().zip(&mut ours) {
                let _ = std::fs::remove_dir_all(&ours_out);
                settle(cache, &[&base, &adapter]);
                times.push(measure(
                    Command::new(b)
                        .arg("run")
                        .arg("convert/merge_lora")
                        .arg(format!("lora_checkpoint={}", adapter.display()))
                        .arg(format!("base_hf_path={}", base.display()))
                        .arg(format!("output_hf_path={}", ours_out.display()))
                        .args(*extra),
                ));
            }
        }
        let seconds = |v: &[Measured]| v.iter().map(|m| m.seconds).collect::<Vec<_>>();
        let rss = |v: &[Measured]| v.iter().map(|m| m.max_rss).max().unwrap_or(0);
        let tp = median(&seconds(&peft));
        println!(
            "{} cache (load {load} → {}):",
            cache.name(),
            support::load()
        );
        println!(
            "  {:<40} {tp:6.2} s  peak RSS {:.2} GiB  runs {:?}",
            "PEFT merge_and_unload + save_pretrained",
            gib(rss(&peft)),
            rounded(&seconds(&peft))
        );
        for ((label, _, extra), times) in variants.iter().zip(&ours) {
            let t = median(&seconds(times));
            let (speedup, memory) = (tp / t, rss(times) as f64 / rss(&peft) as f64);
            let targets = if extra.is_empty() {
                format!(
                    " (targets >= 10x: {}, <= 0.25: {})",
                    if speedup >= 10.0 { "met" } else { "MISSED" },
                    if memory <= 0.25 { "met" } else { "MISSED" }
                )
            } else {
                String::new()
            };
            println!(
                "  {label:<40} {t:6.2} s  peak RSS {:.2} GiB  {speedup:5.1}x faster than PEFT, {memory:.2} of its memory  runs {:?}{targets}",
                gib(rss(times)),
                rounded(&seconds(times))
            );
        }
    }
    // The outputs of one more run of each, compared.
    let _ = std::fs::remove_dir_all(&ours_out);
    measure(
        Command::new(&variants[0].1)
            .arg("run")
            .arg("convert/merge_lora")
            .arg(format!("lora_checkpoint={}", adapter.display()))
            .arg(format!("base_hf_path={}", base.display()))
            .arg(format!("output_hf_path={}", ours_out.display())),
    );
    measure(
        Command::new(&python)
            .arg(&script)
            .arg(&base)
            .arg(&adapter)
            .arg(&peft_out)
            .arg(threads.to_string())
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1"),
    );
    let (tensors, elements, differ, worst) = compare(&ours_out, &peft_out);
    println!(
        "  outputs: {tensors} tensors, {elements} elements, {differ} differ ({:.2e}), max {worst} bf16 ulp",
        differ as f64 / elements.max(1) as f64
    );
    let _ = std::fs::remove_dir_all(&ours_out);
    let _ = std::fs::remove_dir_all(&peft_out);
}
