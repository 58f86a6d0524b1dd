//! `convert/merge_lora`: merged values from first principles, the output layout,
//! adapter directory resolution, and every refusal (variants that cannot be merged
//! faithfully, pickles, wrong bases), each with exit code 2 and nothing written.
//!
//! Adapters are written here with the `safetensors` crate directly (not with the
//! converter's writer), and expected values are computed here from the formulas,
//! never with the converter's merge code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ckpt_convert::synthetic::ModelShape;
use half::bf16;
use safetensors::tensor::TensorView;
use serde_json::json;

use crate::util::{Workdir, kv, run};

// ---------------------------------------------------------------------------------------------
// fixtures
// ---------------------------------------------------------------------------------------------

/// A tensor to write: name, shape, values (stored as f32 unless `bf16`).
struct T {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
    bf16: bool,
}

fn t(name: &str, shape: &[usize], values: Vec<f32>) -> T {
    assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
    T {
        name: name.into(),
        shape: shape.to_vec(),
        values,
        bf16: false,
    }
}

fn write_safetensors(path: &Path, tensors: &[T]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| {
            if t.bf16 {
                t.values
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
                    .collect()
            } else {
                t.values.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            let dtype = if t.bf16 {
                safetensors::Dtype::BF16
            } else {
                safetensors::Dtype::F32
            };
            (
                t.name.clone(),
                TensorView::new(dtype, t.shape.clone(), b).expect("a consistent view"),
            )
        })
        .collect();
    let meta = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::tensor::serialize_to_file(views, Some(meta), path).expect("write safetensors");
}

/// Every tensor of an HF directory (all shards), widened to f64, with dtype and shape.
fn read_dir(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<f64>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let vals: Vec<f64> = match view.dtype() {
                safetensors::Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| f64::from(bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))))
                    .collect(),
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                    .collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            out.insert(
                name,
                (format!("{:?}", view.dtype()), view.shape().to_vec(), vals),
            );
        }
    }
    out
}

fn tiny(tied: bool) -> ModelShape {
    let mut s = ModelShape::tiny_llama();
    s.tied = tied;
    s
}

/// An adapter directory: `adapter_config.json` (PEFT defaults filled in by the
/// converter) and `adapter_model.safetensors`.
fn adapter(dir: &Path, config: serde_json::Value, tensors: &[T]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg = json!({"peft_type": "LORA", "task_type": "CAUSAL_LM"});
    for (k, v) in config.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    write_safetensors(&dir.join("adapter_model.safetensors"), tensors);
    dir.to_owned()
}

const P: &str = "base_model.model.";

/// Exactly representable adapter values: A = n·2⁻⁸, B = m·2⁻⁶ with small integers,
/// so every product and sum is exact and only the final rounding(s) remain.
fn a_vals(r: usize, cols: usize, salt: usize) -> Vec<f32> {
    (0..r * cols)
        .map(|i| ((i * 7 + salt * 3) % 17) as f32 - 8.0)
        .map(|n| n * f32::powi(2.0, -8))
        .collect()
}

fn b_vals(rows: usize, r: usize, salt: usize) -> Vec<f32> {
    (0..rows * r)
        .map(|i| ((i * 5 + salt * 11) % 13) as f32 - 6.0)
        .map(|m| m * f32::powi(2.0, -6))
        .collect()
}

/// A simple q_proj/v_proj adapter of rank `r` for the tiny Llama (hidden 64,
/// q [64, 64], v [32, 64]).
pub(crate) fn qv_adapter(dir: &Path, config: serde_json::Value) -> PathBuf {
    let r = config["r"].as_u64().unwrap_or(8) as usize;
    let mut tensors = Vec::new();
    for l in 0..2 {
        for (m, out) in [("q_proj", 64), ("v_proj", 32)] {
            let base = format!("{P}model.layers.{l}.self_attn.{m}");
            tensors.push(t(
                &format!("{base}.lora_A.weight"),
                &[r, 64],
                a_vals(r, 64, l),
            ));
            tensors.push(t(
                &format!("{base}.lora_B.weight"),
                &[out, r],
                b_vals(out, r, l),
            ));
        }
    }
    adapter(dir, config, &tensors)
}

fn merge(w: &Workdir, adapter: &Path, base: &Path, out: &str, extra: &[&str]) -> crate::util::Run {
    let mut args = vec![
        "run".to_owned(),
        "convert/merge_lora".into(),
        kv("lora_checkpoint", adapter),
        kv("base_hf_path", base),
        kv("output_hf_path", &w.path(out)),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    run(&args)
}

/// The merge's smoke test (the probe of every merged tensor) ran and passed.
#[track_caller]
fn probed(dir: &Path) {
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ckpt-validation.json")).unwrap())
            .unwrap();
    assert_eq!(report["smoke_test"]["kind"], "lora_probe", "{report:#}");
    assert_eq!(report["smoke_test"]["status"], "passed", "{report:#}");
    assert!(report["smoke_test"]["probe"]["tensors"].as_u64().unwrap() > 0);
    assert!(report["smoke_test_max_abs_diff"].as_f64().is_some());
}

fn bf16_of(x: f64) -> f64 {
    f64::from(bf16::from_f64(x))
}

// ---------------------------------------------------------------------------------------------
// values
// ---------------------------------------------------------------------------------------------

#[test]
fn merged_values_follow_the_formulas() {
    let w = Workdir::new();
    let base = w.hf("base", &tiny(false), 1 << 30);
    let (r, alpha) = (4usize, 8.0);
    let (r_emb, vocab, h) = (4usize, 128usize, 64usize);
    let mut tensors = Vec::new();
    // Linear: layer 0 q_proj (rank 4), layer 1 v_proj with rank_pattern 2 and
    // alpha_pattern 3 (scale 1.5).
    let q = format!("{P}model.layers.0.self_attn.q_proj");
    tensors.push(t(&format!("{q}.lora_A.weight"), &[r, h], a_vals(r, h, 1)));
    tensors.push(t(&format!("{q}.lora_B.weight"), &[64, r], b_vals(64, r, 2)));
    let v = format!("{P}model.layers.1.self_attn.v_proj");
    tensors.push(t(&format!("{v}.lora_A.weight"), &[2, h], a_vals(2, h, 3)));
    tensors.push(t(&format!("{v}.lora_B.weight"), &[32, 2], b_vals(32, 2, 4)));
    // Embedding: A [r, vocab], B [dim, r].
    let e = format!("{P}model.embed_tokens");
    // Wider numerators: sums need 9 significant bits, so rounding the delta to
    // bf16 first (as PEFT's embedding merge does) changes results.
    let wide: Vec<f32> = (0..r_emb * vocab)
        .map(|i| ((i * 7 + 5) % 33) as f32 - 16.0)
        .map(|n| n * f32::powi(2.0, -8))
        .collect();
    tensors.push(t(&format!("{e}.lora_embedding_A"), &[r_emb, vocab], wide));
    let wide_b: Vec<f32> = (0..h * r_emb)
        .map(|i| ((i * 5 + 3) % 29) as f32 - 14.0)
        .map(|n| n * f32::powi(2.0, -6))
        .collect();
    tensors.push(t(&format!("{e}.lora_embedding_B"), &[h, r_emb], wide_b));
    let ad = adapter(
        &w.path("adapter"),
        json!({
            "r": r, "lora_alpha": alpha,
            "target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "embed_tokens"],
            "rank_pattern": {"embed_tokens": 4, r"layers\.1\..*v_proj": 2},
            "alpha_pattern": {"v_proj": 3},
        }),
        &tensors,
    );
    merge(&w, &ad, &base, "out", &[]).assert_exit(0);
    probed(&w.path("out"));
    let before = read_dir(&base);
    let after = read_dir(&w.path("out"));
    let adapter_vals = |name: &str| -> Vec<f64> {
        tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap()
            .values
            .iter()
            .map(|v| f64::from(*v))
            .collect()
    };
    // W' = rne(W + s·B@A): one rounding (PEFT Linear.merge with f32 adapters).
    let linear = |module: &str, name: &str, out: usize, rank: usize, scale: f64| {
        let a = adapter_vals(&format!("{module}.lora_A.weight"));
        let b = adapter_vals(&format!("{module}.lora_B.weight"));
        let base_w = &before[name].2;
        let got = &after[name].2;
        for o in 0..out {
            for i in 0..h {
                let d: f64 = (0..rank).map(|k| b[o * rank + k] * a[k * h + i]).sum();
                let want = bf16_of(base_w[o * h + i] + scale * d);
                assert_eq!(got[o * h + i], want, "{name}[{o}, {i}]");
            }
        }
    };
    linear(
        &q,
        "model.layers.0.self_attn.q_proj.weight",
        64,
        r,
        alpha / r as f64,
    );
    linear(
        &v,
        "model.layers.1.self_attn.v_proj.weight",
        32,
        2,
        3.0 / 2.0,
    );
    // Embedding: W' = rne(W + rne(s·(B@A)ᵀ)): the delta is rounded first.
    let a = adapter_vals(&format!("{e}.lora_embedding_A"));
    let b = adapter_vals(&format!("{e}.lora_embedding_B"));
    let (base_e, got_e) = (
        &before["model.embed_tokens.weight"].2,
        &after["model.embed_tokens.weight"].2,
    );
    let s = alpha / r_emb as f64;
    let mut double_rounding_mattered = false;
    for tok in 0..vocab {
        for d in 0..h {
            let delta: f64 = (0..r_emb)
                .map(|k| b[d * r_emb + k] * a[k * vocab + tok])
                .sum();
            let want = bf16_of(base_e[tok * h + d] + bf16_of(s * delta));
            double_rounding_mattered |= want != bf16_of(base_e[tok * h + d] + s * delta);
            assert_eq!(got_e[tok * h + d], want, "embed_tokens[{tok}, {d}]");
        }
    }
    assert!(
        double_rounding_mattered,
        "the fixture must tell one rounding from two"
    );
    // Everything else is the base, bit for bit, with the base's dtypes and shapes.
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (name, (dtype, shape, vals)) in &before {
        assert_eq!(&after[name].0, dtype, "{name}");
        assert_eq!(&after[name].1, shape, "{name}");
        if ![
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.v_proj.weight",
            "model.embed_tokens.weight",
        ]
        .contains(&name.as_str())
        {
            assert_eq!(&after[name].2, vals, "{name} changed");
        }
    }
}

#[test]
fn rslora_and_lora_bias_and_dora_use_their_formulas() {
    let w = Workdir::new();
    let mut shape = tiny(false);
    shape.architecture = "Qwen2ForCausalLM".into();
    shape.model_type = "qwen2".into();
    shape.qkv_bias = true;
    let base = w.hf("base", &shape, 1 << 30);
    // rslora with r=4: s = alpha / sqrt(4) = 3 / 2; lora_bias adds s·bias to k_proj.bias.
    let k = format!("{P}model.layers.0.self_attn.k_proj");
    let bias: Vec<f32> = (0..32)
        .map(|i| (i as f32 - 16.0) * f32::powi(2.0, -9))
        .collect();
    let tensors = vec![
        t(&format!("{k}.lora_A.weight"), &[4, 64], a_vals(4, 64, 7)),
        t(&format!("{k}.lora_B.weight"), &[32, 4], b_vals(32, 4, 8)),
        t(&format!("{k}.lora_B.bias"), &[32], bias.clone()),
    ];
    let ad = adapter(
        &w.path("adapter"),
        json!({"r": 4, "lora_alpha": 3, "use_rslora": true, "lora_bias": true,
               "target_modules": ["k_proj"], "layers_to_transform": [0]}),
        &tensors,
    );
    merge(&w, &ad, &base, "out", &[]).assert_exit(0);
    probed(&w.path("out"));
    let (before, after) = (read_dir(&base), read_dir(&w.path("out")));
    let name = "model.layers.0.self_attn.k_proj.bias";
    for (o, bv) in bias.iter().enumerate() {
        let want = bf16_of(before[name].2[o] + 1.5 * f64::from(*bv));
        assert_eq!(after[name].2[o], want, "{name}[{o}]");
    }
    let a = a_vals(4, 64, 7);
    let b = b_vals(32, 4, 8);
    let wname = "model.layers.0.self_attn.k_proj.weight";
    for o in 0..32 {
        for i in 0..64 {
            let d: f64 = (0..4)
                .map(|k| f64::from(b[o * 4 + k]) * f64::from(a[k * 64 + i]))
                .sum();
            assert_eq!(
                after[wname].2[o * 64 + i],
                bf16_of(before[wname].2[o * 64 + i] + 1.5 * d)
            );
        }
    }
    // DoRA with a zero B: V = W, so W' = rne(m / ‖W_row‖ · W). With m = 1.125·‖W_row‖
    // (rounded to f32) the result is W · 1.125 up to the f32 norm and division:
    // checked to one bf16 ulp.
    let w2 = Workdir::new();
    let base = w2.hf("base", &tiny(false), 1 << 30);
    let before = read_dir(&base);
    let wname = "model.layers.1.mlp.down_proj.weight";
    let (rows, cols) = (64usize, 128usize);
    let wv = &before[wname].2;
    let m: Vec<f32> = (0..rows)
        .map(|o| {
            let n: f64 = (0..cols)
                .map(|i| wv[o * cols + i].powi(2))
                .sum::<f64>()
                .sqrt();
            (n * 1.125) as f32
        })
        .collect();
    let d = format!("{P}model.layers.1.mlp.down_proj");
    let ad = adapter(
        &w2.path("adapter"),
        json!({"r": 2, "lora_alpha": 2, "use_dora": true, "target_modules": ["model.layers.1.mlp.down_proj"]}),
        &[
            t(
                &format!("{d}.lora_A.weight"),
                &[2, cols],
                a_vals(2, cols, 1),
            ),
            t(
                &format!("{d}.lora_B.weight"),
                &[rows, 2],
                vec![0.0; rows * 2],
            ),
            t(&format!("{d}.lora_magnitude_vector"), &[rows], m),
        ],
    );
    merge(&w2, &ad, &base, "out", &[]).assert_exit(0);
    let after = read_dir(&w2.path("out"));
    for (i, (&base_v, &got)) in wv.iter().zip(&after[wname].2).enumerate() {
        let want = base_v * 1.125;
        let ulp = f64::from(
            bf16::from_f64(want.abs()).to_bits() as i32
                - bf16::from_f64(got.abs()).to_bits() as i32,
        );
        assert!(ulp.abs() <= 1.0, "{wname}[{i}]: {got} vs {want}");
    }
}

// ---------------------------------------------------------------------------------------------
// layout
// ---------------------------------------------------------------------------------------------

#[test]
fn output_mirrors_the_base_and_takes_the_adapters_tokenizer_first() {
    let w = Workdir::new();
    // Sharded base: several files and an index.
    let base = w.hf("base", &tiny(false), 60_000);
    let ad = qv_adapter(
        &w.path("adapter"),
        json!({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
    );
    std::fs::write(ad.join("tokenizer_config.json"), "{\"adapter\": true}\n").unwrap();
    std::fs::write(ad.join("chat_template.jinja"), "adapter template").unwrap();
    std::fs::write(ad.join("README.md"), "model card").unwrap();
    std::fs::write(ad.join("training_args.bin"), b"pickle").unwrap();
    let r = merge(&w, &ad, &base, "out", &["--json"]);
    r.assert_exit(0);
    let report: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
    assert_eq!(report["kind"], "checkpoint_hf");
    let out = w.path("out");
    let base_files: Vec<String> = w
        .ls("base")
        .into_iter()
        .filter(|f| f.ends_with(".safetensors") || f.ends_with(".json") && f.contains("index"))
        .collect();
    let out_files = w.ls("out");
    for f in &base_files {
        assert!(out_files.contains(f), "{f} missing from {out_files:?}");
    }
    assert!(
        base_files.len() > 2,
        "the base must be sharded for this test: {base_files:?}"
    );
    for f in &out_files {
        assert!(!f.starts_with("adapter_"), "adapter file {f} copied");
        assert_ne!(f, "README.md");
        assert_ne!(f, "training_args.bin");
    }
    // The same index (tensor → shard), config.json byte for byte, tokenizer precedence.
    let index = |d: &Path| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(d.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap()["weight_map"]
            .clone()
    };
    assert_eq!(index(&base), index(&out));
    assert_eq!(
        std::fs::read(base.join("config.json")).unwrap(),
        std::fs::read(out.join("config.json")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
        "{\"adapter\": true}\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(),
        "adapter template"
    );
    assert_eq!(
        std::fs::read(base.join("tokenizer.json")).unwrap(),
        std::fs::read(out.join("tokenizer.json")).unwrap()
    );
    assert_eq!(
        std::fs::read(base.join("generation_config.json")).unwrap(),
        std::fs::read(out.join("generation_config.json")).unwrap()
    );
    // Provenance: base and adapter, each with its digests.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("ckpt-manifest.json")).unwrap())
            .unwrap();
    let sources = m["provenance"]["sources"].as_array().unwrap();
    assert_eq!(sources[0]["role"], "base_hf_path");
    assert_eq!(sources[1]["role"], "lora_checkpoint");
    assert_eq!(sources[1]["kind"], "checkpoint_lora");
    for s in sources {
        assert_eq!(s["weights_digest"].as_str().unwrap().len(), 32, "{s}");
    }
    let adapter_files: Vec<&str> = sources[1]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        adapter_files,
        vec!["adapter_config.json", "adapter_model.safetensors"]
    );
    let side: Vec<(&str, &str)> = m["provenance"]["side_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap(), f["from"].as_str().unwrap()))
        .collect();
    assert!(
        side.iter()
            .any(|(p, from)| *p == "chat_template.jinja" && from.contains("adapter")),
        "{side:?}"
    );
    // A dry run prints the plan with the merge and writes nothing.
    let dry = merge(&w, &ad, &base, "dry", &["--dry-run"]);
    dry.assert_exit(0)
        .stdout_has("lora r=8 alpha=16")
        .stdout_has("nothing written");
    assert!(!w.path("dry").exists());
}

#[test]
fn lora_on_the_head_of_a_tied_model_unties_it() {
    let w = Workdir::new();
    let base = w.hf("base", &tiny(true), 1 << 30);
    let head = format!("{P}lm_head");
    let ad = adapter(
        &w.path("adapter"),
        json!({"r": 2, "lora_alpha": 4, "target_modules": ["lm_head"]}),
        &[
            t(&format!("{head}.lora_A.weight"), &[2, 64], a_vals(2, 64, 1)),
            t(
                &format!("{head}.lora_B.weight"),
                &[128, 2],
                b_vals(128, 2, 2),
            ),
        ],
    );
    merge(&w, &ad, &base, "out", &[])
        .assert_exit(0)
        .stdout_has("tie_word_embeddings is set to false");
    let (before, after) = (read_dir(&base), read_dir(&w.path("out")));
    assert!(!before.contains_key("lm_head.weight"));
    // The input embedding is unchanged; the head is the embedding plus the delta.
    assert_eq!(
        after["model.embed_tokens.weight"].2,
        before["model.embed_tokens.weight"].2
    );
    let (a, b) = (a_vals(2, 64, 1), b_vals(128, 2, 2));
    let emb = &before["model.embed_tokens.weight"].2;
    for o in 0..128 {
        for i in 0..64 {
            let d: f64 = (0..2)
                .map(|k| f64::from(b[o * 2 + k]) * f64::from(a[k * 64 + i]))
                .sum();
            assert_eq!(
                after["lm_head.weight"].2[o * 64 + i],
                bf16_of(emb[o * 64 + i] + 2.0 * d)
            );
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(w.path("out/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], json!(false));
    // A LoRA elsewhere keeps the model tied and writes no head.
    let ad2 = qv_adapter(
        &w.path("adapter2"),
        json!({"r": 8, "target_modules": ["q_proj", "v_proj"]}),
    );
    merge(&w, &ad2, &base, "out2", &[]).assert_exit(0);
    assert!(!read_dir(&w.path("out2")).contains_key("lm_head.weight"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(w.path("out2/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["tie_word_embeddings"], json!(true));
}

#[test]
fn saved_embedding_layers_replace_and_resize() {
    let w = Workdir::new();
    let base = w.hf("base", &tiny(false), 1 << 30);
    // modules_to_save-style replacements with 4 new tokens (132 rows), fp32 in the file.
    let emb: Vec<f32> = (0..132 * 64)
        .map(|i| ((i % 31) as f32 - 15.0) / 64.0)
        .collect();
    let head: Vec<f32> = (0..132 * 64)
        .map(|i| ((i % 29) as f32 - 14.0) / 64.0)
        .collect();
    let ad = adapter(
        &w.path("adapter"),
        json!({"r": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head", "embed_tokens"]}),
        &[
            t(
                &format!("{P}model.embed_tokens.weight"),
                &[132, 64],
                emb.clone(),
            ),
            t(&format!("{P}lm_head.weight"), &[132, 64], head.clone()),
            t(
                &format!("{P}model.layers.0.self_attn.q_proj.lora_A.weight"),
                &[8, 64],
                a_vals(8, 64, 0),
            ),
            t(
                &format!("{P}model.layers.0.self_attn.q_proj.lora_B.weight"),
                &[64, 8],
                b_vals(64, 8, 0),
            ),
            t(
                &format!("{P}model.layers.0.self_attn.v_proj.lora_A.weight"),
                &[8, 64],
                a_vals(8, 64, 1),
            ),
            t(
                &format!("{P}model.layers.0.self_attn.v_proj.lora_B.weight"),
                &[32, 8],
                b_vals(32, 8, 1),
            ),
            t(
                &format!("{P}model.layers.1.self_attn.q_proj.lora_A.weight"),
                &[8, 64],
                a_vals(8, 64, 2),
            ),
            t(
                &format!("{P}model.layers.1.self_attn.q_proj.lora_B.weight"),
                &[64, 8],
                b_vals(64, 8, 2),
            ),
            t(
                &format!("{P}model.layers.1.self_attn.v_proj.lora_A.weight"),
                &[8, 64],
                a_vals(8, 64, 3),
            ),
            t(
                &format!("{P}model.layers.1.self_attn.v_proj.lora_B.weight"),
                &[32, 8],
                b_vals(32, 8, 3),
            ),
        ],
    );
    merge(&w, &ad, &base, "out", &[]).assert_exit(0);
    probed(&w.path("out"));
    let after = read_dir(&w.path("out"));
    // Replaced whole, cast to the base dtype (these values are exact in bf16).
    assert_eq!(after["model.embed_tokens.weight"].0, "BF16");
    assert_eq!(after["model.embed_tokens.weight"].1, vec![132, 64]);
    assert_eq!(
        after["model.embed_tokens.weight"].2,
        emb.iter().map(|v| f64::from(*v)).collect::<Vec<_>>()
    );
    assert_eq!(
        after["lm_head.weight"].2,
        head.iter().map(|v| f64::from(*v)).collect::<Vec<_>>()
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(w.path("out/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], json!(132));
}

// ---------------------------------------------------------------------------------------------
// lora_checkpoint resolution
// ---------------------------------------------------------------------------------------------

#[test]
fn a_training_directory_resolves_to_its_highest_step() {
    let w = Workdir::new();
    let base = w.hf("base", &tiny(false), 1 << 30);
    let cfg = json!({"r": 8, "target_modules": ["q_proj", "v_proj"]});
    for step in ["checkpoint-200", "checkpoint-1000", "checkpoint-500"] {
        qv_adapter(&w.path(&format!("train/{step}")), cfg.clone());
    }
    std::fs::write(w.path("train/trainer_state.json"), "{}").unwrap();
    let r = merge(&w, &w.path("train"), &base, "out", &["--json"]);
    r.assert_exit(0);
    let report: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
    let notes = report["warnings"].to_string();
    assert!(
        notes.contains("checkpoint-1000") && notes.contains("step 1000"),
        "{notes}"
    );
    let m = std::fs::read_to_string(w.path("out/ckpt-manifest.json")).unwrap();
    assert!(
        m.contains(&w.path("train/checkpoint-1000").display().to_string()),
        "{m}"
    );
    // A file inside the adapter directory names the directory.
    merge(
        &w,
        &w.path("train/checkpoint-500/adapter_config.json"),
        &base,
        "out2",
        &[],
    )
    .assert_exit(0);
    // Two adapters and no step to tell them apart: refused, listing both.
    qv_adapter(&w.path("named/alpha"), cfg.clone());
    qv_adapter(&w.path("named/beta"), cfg);
    merge(&w, &w.path("named"), &base, "out3", &[])
        .assert_exit(2)
        .stderr_has("alpha")
        .stderr_has("beta")
        .stderr_has("name the one to merge");
    assert!(!w.path("out3").exists());
    merge(&w, &w.path("nothing-here"), &base, "out4", &[])
        .assert_exit(2)
        .stderr_has("does not exist");
}

// ---------------------------------------------------------------------------------------------
// refusals
// ---------------------------------------------------------------------------------------------

/// Runs a merge expected to be refused: exit 2, the message, nothing written.
#[track_caller]
fn refused(w: &Workdir, adapter: &Path, base: &Path, extra: &[&str], says: &[&str]) {
    let r = merge(w, adapter, base, "refused", extra);
    r.assert_exit(2);
    for s in says {
        r.stderr_has(s);
    }
    assert!(!w.path("refused").exists(), "output written");
    let staging: Vec<String> = w
        .ls("")
        .into_iter()
        .filter(|n| n.contains("staging"))
        .collect();
    assert!(staging.is_empty(), "staging left: {staging:?}");
}

#[test]
fn variants_that_cannot_be_merged_faithfully_are_refused() {
    let w = Workdir::new();
    let base = w.hf("base", &tiny(false), 1 << 30);
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            json!({"layer_replication": [[0, 2], [1, 2]]}),
            "layer_replication",
        ),
        (
            json!({"init_lora_weights": "pissa"}),
            "rewrites the base weights",
        ),
        (
            json!({"init_lora_weights": "pissa_niter_16"}),
            "rewrites the base weights",
        ),
        (
            json!({"init_lora_weights": "olora"}),
            "rewrites the base weights",
        ),
        (
            json!({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}),
            "rewrites the base weights",
        ),
        (
            json!({"init_lora_weights": "corda"}),
            "rewrites the base weights",
        ),
        (json!({"use_qalora": true}), "QALoRA"),
        (json!({"alora_invocation_tokens": [1, 2]}), "aLoRA"),
        (json!({"peft_type": "IA3"}), "only LoRA adapters"),
        (
            json!({"target_parameters": ["mlp.experts.gate_up_proj"]}),
            "target_parameters",
        ),
        (json!({"task_type": "SEQ_CLS"}), "classification"),
    ];
    for (i, (extra, says)) in cases.into_iter().enumerate() {
        let mut cfg = json!({"r": 8, "target_modules": ["q_proj", "v_proj"]});
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        let ad = qv_adapter(&w.path(&format!("a{i}")), cfg);
        refused(&w, &ad, &base, &[], &["adapter_config.json", says]);
    }
}

#[test]
fn pickles_quantized_bases_and_unknown_options_are_refused() {
    let w = Workdir::new();
    let base = w.hf("base", &tiny(false), 1 << 30);
    // Only the pickled weights.
    let ad = w.path("pickled");
    std::fs::create_dir_all(&ad).unwrap();
    std::fs::write(
        ad.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    std::fs::write(ad.join("adapter_model.bin"), b"PK\x03\x04not unpickled").unwrap();
    refused(
        &w,
        &ad,
        &base,
        &[],
        &["adapter_model.bin", "pickle", "safe_serialization=True"],
    );
    // A quantized base.
    let good = qv_adapter(
        &w.path("good"),
        json!({"r": 8, "target_modules": ["q_proj", "v_proj"]}),
    );
    let q = w.hf("quantized", &tiny(false), 1 << 30);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"] = json!({"quant_method": "bitsandbytes", "load_in_4bit": true});
    std::fs::write(q.join("config.json"), cfg.to_string()).unwrap();
    refused(
        &w,
        &good,
        &q,
        &[],
        &["quantization_config", "quantized base"],
    );
    // An unknown parameter, and a dtype other than the base's.
    refused(
        &w,
        &good,
        &base,
        &["merge_mode=fast"],
        &["unknown parameter \"merge_mode\""],
    );
    refused(
        &w,
        &good,
        &base,
        &["dtype=float32"],
        &["dtype=float32", "keep the dtypes"],
    );
    // LoRA weights the configuration does not target, and a target without weights.
    let stray = qv_adapter(
        &w.path("stray"),
        json!({"r": 8, "target_modules": ["q_proj"]}),
    );
    refused(&w, &stray, &base, &[], &["v_proj", "does not target"]);
    let partial = qv_adapter(
        &w.path("partial"),
        json!({"r": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]}),
    );
    refused(
        &w,
        &partial,
        &base,
        &[],
        &["o_proj", "adapter_config.json targets"],
    );
    // A rank that disagrees with the configuration.
    let rank = qv_adapter(
        &w.path("rank"),
        json!({"r": 8, "rank_pattern": {"v_proj": 4}, "target_modules": ["q_proj", "v_proj"]}),
    );
    refused(&w, &rank, &base, &[], &["v_proj.lora_A.weight", "rank 4"]);
    // lora_bias into a base without biases.
    let lb = w.path("lora_bias");
    adapter(
        &lb,
        json!({"r": 2, "lora_bias": true, "target_modules": ["model.layers.0.self_attn.q_proj"]}),
        &[
            t(
                &format!("{P}model.layers.0.self_attn.q_proj.lora_A.weight"),
                &[2, 64],
                a_vals(2, 64, 0),
            ),
            t(
                &format!("{P}model.layers.0.self_attn.q_proj.lora_B.weight"),
                &[64, 2],
                b_vals(64, 2, 0),
            ),
            t(
                &format!("{P}model.layers.0.self_attn.q_proj.lora_B.bias"),
                &[64],
                vec![0.5; 64],
            ),
        ],
    );
    refused(&w, &lb, &base, &[], &["lora_bias=true needs a bias"]);
}

// ---------------------------------------------------------------------------------------------
// the wrong base
// ---------------------------------------------------------------------------------------------

fn set_config(dir: &Path, key: &str, value: serde_json::Value) {
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg[key] = value;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
}

#[test]
fn missing_or_mis_shaped_targets_are_refused_even_when_allowed() {
    let w = Workdir::new();
    let base = w.hf("base", &tiny(false), 1 << 30);
    // A module the base does not have (an adapter for a deeper model).
    let deep = w.path("deep");
    adapter(
        &deep,
        json!({"r": 2, "target_modules": ["q_proj"]}),
        &[
            t(
                &format!("{P}model.layers.7.self_attn.q_proj.lora_A.weight"),
                &[2, 64],
                a_vals(2, 64, 0),
            ),
            t(
                &format!("{P}model.layers.7.self_attn.q_proj.lora_B.weight"),
                &[64, 2],
                b_vals(64, 2, 0),
            ),
        ],
    );
    refused(
        &w,
        &deep,
        &base,
        &[],
        &[
            "model.layers.7.self_attn.q_proj.weight",
            "no such tensor in the base",
        ],
    );
    refused(
        &w,
        &deep,
        &base,
        &["allow_base_mismatch=true"],
        &["no such tensor in the base"],
    );
    // Mis-shaped: an adapter for a wider model (hidden 96).
    let wide = w.path("wide");
    adapter(
        &wide,
        json!({"r": 2, "target_modules": ["model.layers.0.self_attn.q_proj"]}),
        &[
            t(
                &format!("{P}model.layers.0.self_attn.q_proj.lora_A.weight"),
                &[2, 96],
                a_vals(2, 96, 0),
            ),
            t(
                &format!("{P}model.layers.0.self_attn.q_proj.lora_B.weight"),
                &[96, 2],
                b_vals(96, 2, 0),
            ),
        ],
    );
    refused(
        &w,
        &wide,
        &base,
        &["allow_base_mismatch=true"],
        &[
            "model.layers.0.self_attn.q_proj.weight",
            "[96, 96]",
            "[64, 64]",
        ],
    );
}

#[test]
fn an_adapter_naming_another_model_is_refused_unless_allowed() {
    let w = Workdir::new();
    let base = w.hf("base", &tiny(false), 1 << 30);
    set_config(&base, "_name_or_path", json!("meta-llama/Llama-3.2-1B"));
    let other = qv_adapter(
        &w.path("other"),
        json!({"r": 8, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}),
    );
    refused(
        &w,
        &other,
        &base,
        &[],
        &[
            "Qwen/Qwen2.5-0.5B",
            "meta-llama/Llama-3.2-1B",
            "allow_base_mismatch=true",
        ],
    );
    merge(&w, &other, &base, "allowed", &["allow_base_mismatch=true"])
        .assert_exit(0)
        .stdout_has("allowed by allow_base_mismatch=true");
    // The same name (another spelling) is accepted without a note.
    let same = qv_adapter(
        &w.path("same"),
        json!({"r": 8, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "/models/llama-3.2-1b"}),
    );
    merge(&w, &same, &base, "same-out", &[]).assert_exit(0);
    // A base that declares no name: a directory name is not an identity, only a note.
    let anon = w.hf("anon", &tiny(false), 1 << 30);
    merge(&w, &other, &anon, "anon-out", &[])
        .assert_exit(0)
        .stdout_has("could not be confirmed");
}

#[test]
fn a_revision_other_than_the_cached_snapshot_is_refused() {
    let w = Workdir::new();
    // An HF cache entry: models--org--tiny/snapshots/<commit>, refs/main → commit.
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = w.path("hub/models--org--tiny");
    w.hf(
        &format!("hub/models--org--tiny/snapshots/{commit}"),
        &tiny(false),
        1 << 30,
    );
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let cfg = |rev: &str| json!({"r": 8, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "org/tiny", "revision": rev});
    let good = qv_adapter(&w.path("good"), cfg("main"));
    let bad = qv_adapter(
        &w.path("bad"),
        cfg("fedcba9876543210fedcba9876543210fedcba98"),
    );
    let with_cache = |a: &Path, out: &str| {
        let out_out = crate::util::bin()
            .args([
                "run".to_owned(),
                "convert/merge_lora".into(),
                kv("lora_checkpoint", a),
                "base_hf_path=org/tiny".into(),
                kv("output_hf_path", &w.path(out)),
            ])
            .env("HF_HUB_CACHE", w.path("hub"))
            .output()
            .unwrap();
        crate::util::Run { out: out_out }
    };
    with_cache(&good, "good-out").assert_exit(0);
    with_cache(&bad, "bad-out")
        .assert_exit(2)
        .stderr_has("revision")
        .stderr_has(commit);
    assert!(!w.path("bad-out").exists());
    // Another repository in the cache is a declared name that differs.
    let other = qv_adapter(
        &w.path("other"),
        json!({"r": 8, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "org/other"}),
    );
    with_cache(&other, "other-out")
        .assert_exit(2)
        .stderr_has("org/tiny");
}

/// A base with our manifest: an HF directory written by ckpt-convert.
fn converted_base(w: &Workdir) -> (PathBuf, String) {
    let src = w.hf("src", &tiny(false), 1 << 30);
    run(&[
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", &src),
        kv("megatron_path", &w.path("mg")),
    ])
    .assert_exit(0);
    let r = run(&[
        "run".to_owned(),
        "convert/megatron_to_hf".into(),
        kv("megatron_path", &w.path("mg/iter_0000000")),
        kv("hf_model_id", &src),
        kv("hf_path", &w.path("base")),
        "--json".into(),
    ]);
    r.assert_exit(0);
    let report: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
    (
        w.path("base"),
        report["weights_digest"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn base_digests_are_checked_before_reading_and_as_read() {
    let w = Workdir::new();
    let (base, digest) = converted_base(&w);
    let ad = qv_adapter(
        &w.path("adapter"),
        json!({"r": 8, "target_modules": ["q_proj", "v_proj"]}),
    );
    // The right digest, given by the user, and the base's own manifest: merged.
    merge(&w, &ad, &base, "ok", &[&format!("base_digest={digest}")]).assert_exit(0);
    // A digest that differs from the base's manifest: refused before any data is read.
    let wrong = "0".repeat(32);
    refused(
        &w,
        &ad,
        &base,
        &[&format!("base_digest={wrong}")],
        &["wrong base", &digest, &wrong],
    );
    refused(
        &w,
        &ad,
        &base,
        &[&format!("base_digest={wrong}"), "allow_base_mismatch=true"],
        &["never overridden"],
    );
    refused(
        &w,
        &ad,
        &base,
        &["base_digest=xyz"],
        &["base_digest=xyz", "32 hexadecimal digits"],
    );
    // A base without a manifest: the digest is computed from its tensors as read,
    // and a mismatch found after the output is written is still never published.
    let copy = w.path("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in w.ls("base") {
        if f != "ckpt-manifest.json" {
            std::fs::copy(base.join(&f), copy.join(&f)).unwrap();
        }
    }
    merge(
        &w,
        &ad,
        &copy,
        "ok-copy",
        &[&format!("base_digest={digest}")],
    )
    .assert_exit(0);
    refused(
        &w,
        &ad,
        &copy,
        &[&format!("base_digest={wrong}")],
        &["as read have digest", &digest, "nothing was published"],
    );
    // A base changed after its manifest was written: the manifest no longer holds.
    let shard = w
        .ls("base")
        .into_iter()
        .find(|f| f.ends_with(".safetensors"))
        .unwrap();
    let path = base.join(&shard);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    refused(
        &w,
        &ad,
        &base,
        &[],
        &["as read have digest", "its own ckpt-manifest.json"],
    );
}

#[test]
fn the_base_an_adapter_recorded_must_be_the_one_given() {
    let w = Workdir::new();
    let (base, _) = converted_base(&w);
    // Another converted model (a different seed) that the adapter says it was trained on.
    let src2 = w.path("src2");
    ckpt_convert::synthetic::write_hf(&src2, &tiny(false), 99, 1 << 30).unwrap();
    run(&[
        "run".to_owned(),
        "convert/megatron_to_hf".into(),
        kv("megatron_path", &{
            run(&[
                "run".to_owned(),
                "convert/hf_to_megatron".into(),
                kv("hf_model_id", &src2),
                kv("megatron_path", &w.path("mg2")),
            ])
            .assert_exit(0);
            w.path("mg2/iter_0000000")
        }),
        kv("hf_model_id", &src2),
        kv("hf_path", &w.path("base2")),
    ])
    .assert_exit(0);
    let ad = qv_adapter(
        &w.path("adapter"),
        json!({"r": 8, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": w.path("base2").display().to_string()}),
    );
    // Same architecture, same shapes, same tensor names: only the digests tell.
    refused(
        &w,
        &ad,
        &base,
        &["allow_base_mismatch=true"],
        &["wrong base", "base_model_name_or_path"],
    );
    merge(&w, &ad, &w.path("base2"), "right", &[]).assert_exit(0);
}

// ---------------------------------------------------------------------------------------------
// Megatron-Bridge adapters
// ---------------------------------------------------------------------------------------------

/// Names the tensors of two checkpoints that differ (dtype, shape or any bit).
fn differing(
    ours: &BTreeMap<String, (String, Vec<u64>, Vec<u8>)>,
    theirs: &BTreeMap<String, (String, Vec<u64>, Vec<u8>)>,
) -> Vec<String> {
    let mut out: Vec<String> = ours
        .keys()
        .chain(theirs.keys())
        .filter(|k| ours.get(*k) != theirs.get(*k))
        .cloned()
        .collect();
    out.dedup();
    out
}

fn bridge_merge(
    w: &Workdir,
    adapter: &Path,
    base: &Path,
    hf: &Path,
    out: &str,
    extra: &[&str],
) -> crate::util::Run {
    let mut args = vec![
        "run".to_owned(),
        "convert/merge_lora".into(),
        kv("lora_checkpoint", adapter),
        kv("base_megatron_path", base),
        kv("output_megatron_path", &w.path(&format!("{out}-mg"))),
        kv("output_hf_path", &w.path(&format!("{out}-hf"))),
        kv("hf_model_id", hf),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    run(&args)
}

/// A LoRA checkpoint the real Megatron-Bridge 0.3.1 wrote (its run directory:
/// the tracker names iteration 50; its run_config.yaml is PyYAML's, with
/// `!!set`), merged into the base Bridge imported: both outputs equal Bridge's own
/// merges bit for bit (`merge_lora.py`'s Megatron checkpoint; the HF export with
/// merged adapters), for fused and canonical LoRA, on Llama, Qwen3, Qwen3-MoE
/// and Nemotron-H.
#[test]
fn megatron_bridge_adapters_merge_as_megatron_bridge_merges_them() {
    let refs = crate::util::bridge_refs();
    // Dense (fused and canonical adapters, stacked layers), MoE (attention
    // adapters beside the experts) and hybrid (per-layer keys; adapters on in_proj
    // saved per component, out_proj, the dense and the shared-expert MLPs).
    for family in ["llama", "qwen3", "qwen3_moe", "nemotron_h"] {
        let case = refs.join(family);
        // The hybrid case names the base by its run directory, as the guide does.
        let base = if family == "nemotron_h" {
            case.join("bridge_import")
        } else {
            case.join("bridge_import/iter_0000000")
        };
        let hf = case.join("hf");
        let w = Workdir::new();
        let mut loras = vec![("lora", "merged_hf", Some("merged_megatron/iter_0000000"))];
        if case.join("lora_canonical").is_dir() {
            loras.push(("lora_canonical", "merged_hf_canonical", None));
        }
        for (lora, merged_hf, merged_mg) in loras {
            let before = w.snapshot_of(&case);
            let r = bridge_merge(&w, &case.join(lora), &base, &hf, lora, &["--json"]);
            r.assert_exit(0);
            let report: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
            assert_eq!(report["kind"], "checkpoint_hf");
            assert_eq!(report["other_outputs"][0]["kind"], "checkpoint_megatron");
            assert!(
                report["warnings"].to_string().contains("iteration 50"),
                "{report}"
            );
            assert_eq!(report["validation"]["smoke_test"], "passed", "{report:#}");
            probed(&w.path(&format!("{lora}-hf")));
            probed(&w.path(&format!("{lora}-mg/iter_0000000")));
            let ours = crate::util::hf_tensors(&w.path(&format!("{lora}-hf")));
            let theirs = crate::util::hf_tensors(&case.join(merged_hf));
            assert!(ours.len() > 10);
            assert_eq!(
                differing(&ours, &theirs),
                Vec::<String>::new(),
                "{family} {lora}: HF"
            );
            if let Some(m) = merged_mg {
                let ours =
                    crate::util::megatron_tensors(&w.path(&format!("{lora}-mg/iter_0000000")));
                let theirs = crate::util::megatron_tensors(&case.join(m));
                assert_eq!(
                    differing(&ours, &theirs),
                    Vec::<String>::new(),
                    "{family} {lora}: Megatron"
                );
            }
            // The source and the references are untouched.
            assert_eq!(w.snapshot_of(&case), before);
        }
    }
}

/// `merge_arithmetic=fp32` merges as Megatron-Bridge ≥ 0.5 does: in float32 with
/// one rounding, `rne(W + s · (B @ A))`, checked element by element against that
/// formula computed here from the tensors Bridge wrote; the two arithmetics differ.
#[test]
fn megatron_bridge_fp32_arithmetic_follows_its_formula() {
    let refs = crate::util::bridge_refs();
    let case = refs.join("llama");
    let w = Workdir::new();
    bridge_merge(
        &w,
        &case.join("lora"),
        &case.join("bridge_import/iter_0000000"),
        &case.join("hf"),
        "f",
        &["merge_arithmetic=fp32"],
    )
    .assert_exit(0);
    let base = crate::util::megatron_tensors(&case.join("bridge_import/iter_0000000"));
    let adapter = crate::util::megatron_tensors(&case.join("lora/iter_0000050"));
    let ours = crate::util::megatron_tensors(&w.path("f-mg/iter_0000000"));
    let legacy = crate::util::megatron_tensors(&case.join("merged_megatron/iter_0000000"));
    let vals = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(2)
            .map(|x| bf16::from_bits(u16::from_le_bytes([x[0], x[1]])).to_f32())
            .collect()
    };
    // alpha 12, dim 8 (run_config.yaml).
    let scale = 1.5f32;
    let key = "decoder.layers.mlp.linear_fc2.weight";
    let (_, shape, w0) = &base[key];
    let (layers, rows, cols) = (shape[0] as usize, shape[1] as usize, shape[2] as usize);
    let a = vals(&adapter["decoder.layers.mlp.linear_fc2.adapter.linear_in.weight"].2);
    let b = vals(&adapter["decoder.layers.mlp.linear_fc2.adapter.linear_out.weight"].2);
    let r = a.len() / (layers * cols);
    let (w0, got) = (vals(w0), vals(&ours[key].2));
    for l in 0..layers {
        for i in 0..rows {
            for j in 0..cols {
                let mut acc = 0f32;
                for k in 0..r {
                    acc = b[(l * rows + i) * r + k].mul_add(a[(l * r + k) * cols + j], acc);
                }
                let at = (l * rows + i) * cols + j;
                let want = bf16::from_f32(w0[at] + acc * scale).to_f32();
                assert_eq!(got[at], want, "{key}[{l}, {i}, {j}]");
            }
        }
    }
    assert_ne!(
        ours[key], legacy[key],
        "the two arithmetics must differ on these values"
    );
}

#[test]
fn megatron_bridge_hybrid_refusals() {
    let refs = crate::util::bridge_refs();
    let case = refs.join("nemotron_h");
    let w = Workdir::new();
    let lora = w.path("lora");
    crate::util::copy_tree(&case.join("lora"), &lora);
    let rc = lora.join("iter_0000050/run_config.yaml");
    let text = std::fs::read_to_string(&rc).unwrap();
    // A Mamba adapter the targets do not name.
    let edited = text.replace("  - out_proj\n", "");
    assert_ne!(edited, text);
    std::fs::write(&rc, edited).unwrap();
    let r = bridge_merge(
        &w,
        &lora,
        &case.join("bridge_import"),
        &case.join("hf"),
        "untargeted",
        &[],
    );
    r.assert_exit(2)
        .stderr_has("out_proj")
        .stderr_has("does not name it");
    // The hybrid adapter on a dense base: no in_proj there.
    let llama = refs.join("llama");
    let r = bridge_merge(
        &w,
        &case.join("lora"),
        &llama.join("bridge_import"),
        &llama.join("hf"),
        "dense",
        &["allow_base_mismatch=true"],
    );
    r.assert_exit(2)
        .stderr_has("linear_qkv.adapter.linear_in.weight")
        .stderr_has("found [8, 32]");
    for out in ["untargeted", "dense"] {
        assert!(!w.path(&format!("{out}-mg")).exists() && !w.path(&format!("{out}-hf")).exists());
    }
}

/// Megatron-Bridge adapters that cannot be merged faithfully are refused, naming
/// the file and what was expected; nothing is written.
#[test]
fn megatron_bridge_refusals() {
    let refs = crate::util::bridge_refs();
    let case = refs.join("llama");
    let base = case.join("bridge_import/iter_0000000");
    let hf = case.join("hf");
    let w = Workdir::new();
    let check = |ad: &Path, extra: &[&str], says: &[&str]| {
        let r = bridge_merge(&w, ad, &base, &hf, "refused", extra);
        r.assert_exit(2);
        for s in says {
            r.stderr_has(s);
        }
        assert!(!w.path("refused-mg").exists() && !w.path("refused-hf").exists());
    };
    // A copy of the real adapter checkpoint with its run_config.yaml edited.
    let edited = |name: &str, edit: &dyn Fn(String) -> String| -> PathBuf {
        let d = w.path(name);
        crate::util::copy_tree(&case.join("lora"), &d);
        let rc = d.join("iter_0000050/run_config.yaml");
        let text = std::fs::read_to_string(&rc).unwrap();
        let changed = edit(text.clone());
        assert_ne!(changed, text, "{name}: the edit must change the file");
        std::fs::write(&rc, changed).unwrap();
        d
    };
    // An adapter for another model (Qwen3's: head_dim 32, so linear_qkv has other
    // shapes): refused even when a mismatch is allowed.
    check(
        &refs.join("qwen3/lora"),
        &["allow_base_mismatch=true"],
        &["linear_qkv.adapter.linear_out.weight", "[2, 256, 8]"],
    );
    // DoRA and other methods.
    let dora = edited("dora", &|t| {
        t.replace(
            "megatron.bridge.peft.lora.LoRA",
            "megatron.bridge.peft.dora.DoRA",
        )
    });
    check(&dora, &[], &["run_config.yaml", "DoRA"]);
    // A target list that does not name an adapter present.
    let untargeted = edited("untargeted", &|t| t.replace("  - linear_fc2\n", ""));
    check(&untargeted, &[], &["linear_fc2", "does not name it"]);
    // A rank that disagrees with dim.
    let dim = edited("dim", &|t| t.replace("  dim: 8\n", "  dim: 16\n"));
    check(&dim, &[], &["dim=16"]);
    // A run_config.yaml with a tag that would run code.
    let code = edited("code", &|t| {
        t.replacen(
            "  dim: 8\n",
            "  dim: !!python/object/apply:os.system ['true']\n",
            1,
        )
    });
    check(&code, &[], &["run_config.yaml", "python/object/apply"]);
    // No run_config.yaml: the scale is unknown.
    let bare = edited("bare", &|t| t + "\n");
    std::fs::remove_file(bare.join("iter_0000050/run_config.yaml")).unwrap();
    check(&bare, &[], &["run_config.yaml", "is missing"]);
    // A named base model that differs from the base's.
    let named = edited("named", &|t| {
        let at = t.find("  hf_model_id: ").expect("model.hf_model_id");
        let end = at + t[at..].find('\n').unwrap();
        format!("{}  hf_model_id: org/another-model{}", &t[..at], &t[end..])
    });
    check(
        &named,
        &[],
        &["org/another-model", "allow_base_mismatch=true"],
    );
    bridge_merge(
        &w,
        &named,
        &base,
        &hf,
        "allowed",
        &["allow_base_mismatch=true"],
    )
    .assert_exit(0);
    // The base's identity: a weights digest it does not have is refused, its own
    // accepted. Our import of the same HF model equals Bridge's import bit for
    // bit, so the digest its manifest records is the base's.
    let ok = case.join("lora");
    run(&[
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", &hf),
        kv("megatron_path", &w.path("ours")),
    ])
    .assert_exit(0);
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(w.path("ours/iter_0000000/ckpt-manifest.json")).unwrap(),
    )
    .unwrap();
    let digest = m["output"]["weights_digest"].as_str().unwrap().to_owned();
    check(
        &ok,
        &[&format!("base_digest={}", "f".repeat(32))],
        &["wrong base", &digest],
    );
    bridge_merge(
        &w,
        &ok,
        &base,
        &hf,
        "digest",
        &[&format!("base_digest={digest}")],
    )
    .assert_exit(0);
    // A dry run plans both outputs and writes neither.
    bridge_merge(&w, &ok, &base, &hf, "dry", &["--dry-run"])
        .assert_exit(0)
        .stdout_has("lora merge (dim=8 alpha=12)")
        .stdout_has("also planned");
    assert!(!w.path("dry-mg").exists() && !w.path("dry-hf").exists());
    // export_hf without a model to export around.
    run(&[
        "run".to_owned(),
        "convert/merge_lora".into(),
        kv("lora_checkpoint", &ok),
        kv("base_megatron_path", &base),
        kv("output_megatron_path", &w.path("x-mg")),
        kv("output_hf_path", &w.path("x-hf")),
    ])
    .assert_exit(2)
    .stderr_has("hf_model_id");
    // export_hf=false writes only the Megatron checkpoint.
    run(&[
        "run".to_owned(),
        "convert/merge_lora".into(),
        kv("lora_checkpoint", &ok),
        kv("base_megatron_path", &base),
        kv("output_megatron_path", &w.path("y-mg")),
        "export_hf=false".into(),
    ])
    .assert_exit(0);
    assert!(w.path("y-mg/iter_0000000/.metadata").is_file());
}

#[test]
fn outputs_overlapping_inputs_are_refused() {
    let w = Workdir::new();
    let base = w.hf("base", &tiny(false), 1 << 30);
    let ad = qv_adapter(
        &w.path("adapter"),
        json!({"r": 8, "target_modules": ["q_proj", "v_proj"]}),
    );
    let before = w.snapshot("base");
    run(&[
        "run".to_owned(),
        "convert/merge_lora".into(),
        kv("lora_checkpoint", &ad),
        kv("base_hf_path", &base),
        kv("output_hf_path", &base.join("merged")),
    ])
    .assert_exit(2)
    .stderr_has("is inside base_hf_path=");
    run(&[
        "run".to_owned(),
        "convert/merge_lora".into(),
        kv("lora_checkpoint", &ad),
        kv("base_hf_path", &base),
        kv("output_hf_path", &ad),
    ])
    .assert_exit(2)
    .stderr_has("lora_checkpoint=");
    assert_eq!(before, w.snapshot("base"));
}

/// The guide's `tp`, `pp` and `ep` overrides: the merged Megatron checkpoint
/// records the sizes asked for (the rest of the base's run_config.yaml is kept),
/// and sizes the model cannot be split into are refused before anything is written.
#[test]
fn megatron_bridge_merge_records_the_parallel_sizes_asked_for() {
    let refs = crate::util::bridge_refs();
    let case = refs.join("nemotron_h");
    let w = Workdir::new();
    let merge = |out: &str, extra: &[&str]| {
        bridge_merge(
            &w,
            &case.join("lora"),
            &case.join("bridge_import"),
            &case.join("hf"),
            out,
            extra,
        )
    };
    merge("sized", &["tp=2", "pp=1", "ep=4"]).assert_exit(0);
    let rc = std::fs::read_to_string(w.path("sized-mg/iter_0000000/run_config.yaml")).unwrap();
    let base =
        std::fs::read_to_string(case.join("bridge_import/iter_0000000/run_config.yaml")).unwrap();
    for line in [
        "  tensor_model_parallel_size: 2\n",
        "  pipeline_model_parallel_size: 1\n",
        "  expert_model_parallel_size: 4\n",
    ] {
        assert!(rc.contains(line), "{line:?} missing");
    }
    let rest = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.contains("_parallel_size:"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(rest(&rc), rest(&base), "only the parallel sizes change");
    merge("toowide", &["ep=8"])
        .assert_exit(2)
        .stderr_has("ep=8")
        .stderr_has("n_routed_experts=4");
    assert!(!w.path("toowide-mg").exists() && !w.path("toowide-hf").exists());
}
