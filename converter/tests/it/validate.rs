//! `convert/validate` and the validation every conversion runs: each check is
//! broken alone in an otherwise good output and must fail with a message naming
//! it; the forward smoke test passes on good conversions of every family and
//! fails on layout mistakes that leave every shape intact.

use std::path::{Path, PathBuf};

use ckpt_convert::formats::megatron::MegatronCheckpoint;
use ckpt_convert::formats::source::ChunkData;
use ckpt_convert::synthetic::ModelShape;

use crate::util::{Workdir, kv, run};

fn family(name: &str) -> ModelShape {
    let mut s = ModelShape::tiny_llama();
    s.layers = 2;
    match name {
        "llama" => {}
        "llama_tied" => s.tied = true,
        "mistral" => {
            s.architecture = "MistralForCausalLM".into();
            s.model_type = "mistral".into();
        }
        "qwen2" => {
            s.architecture = "Qwen2ForCausalLM".into();
            s.model_type = "qwen2".into();
            s.qkv_bias = true;
        }
        "qwen3" => {
            s.architecture = "Qwen3ForCausalLM".into();
            s.model_type = "qwen3".into();
            s.qk_norm = true;
            s.head_dim = 32;
        }
        "padded" => s.vocab = 130,
        other => panic!("{other}"),
    }
    s
}

fn json(r: &crate::util::Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout()).unwrap_or_else(|e| panic!("{e}: {}", r.stdout()))
}

/// HF source `src` → Megatron `meg` (iteration dir returned), with `extra` args.
fn to_megatron(w: &Workdir, src: &Path, extra: &[&str]) -> (PathBuf, serde_json::Value) {
    let mut args = vec![
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", src),
        kv("megatron_path", &w.path("meg")),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let r = run(&args);
    r.assert_exit(0);
    (w.path("meg/iter_0000000"), json(&r))
}

fn to_hf(w: &Workdir, iter: &Path, src: &Path, extra: &[&str]) -> (PathBuf, serde_json::Value) {
    let mut args = vec![
        "run".to_owned(),
        "convert/megatron_to_hf".into(),
        kv("megatron_path", iter),
        kv("hf_model_id", src),
        kv("hf_path", &w.path("back")),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let r = run(&args);
    r.assert_exit(0);
    (w.path("back"), json(&r))
}

fn validate(dir: &Path, extra: &[&str]) -> crate::util::Run {
    let mut args = vec!["validate".to_owned(), dir.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    run(&args)
}

#[track_caller]
fn smoke_passed(report: &serde_json::Value, what: &str) -> f64 {
    let v = &report["validation"];
    assert_eq!(v["smoke_test"], "passed", "{what}: {report:#}");
    v["smoke_test_max_abs_diff"]
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: no smoke_test_max_abs_diff in {report:#}"))
}

#[test]
fn the_smoke_test_passes_on_good_conversions_of_every_family() {
    let cases: [(&str, &[&str]); 8] = [
        ("llama", &[]),
        ("llama_tied", &[]),
        ("mistral", &[]),
        ("qwen2", &[]),
        ("qwen3", &[]),
        ("padded", &["make_vocab_size_divisible_by=128"]),
        ("llama", &["tp=2", "make_vocab_size_divisible_by=64"]),
        ("qwen2", &["dtype=float16"]),
    ];
    for (name, extra) in cases {
        let w = Workdir::new();
        let src = w.hf("src", &family(name), 40_000);
        let (iter, rep) = to_megatron(&w, &src, extra);
        let d = smoke_passed(&rep, name);
        // Same weights through the same kernels: nothing but rounding separates them.
        assert!(d <= 1e-6, "{name}: {d}");
        let (_, back) = to_hf(&w, &iter, &src, &[]);
        smoke_passed(&back, name);
        // The report beside the output says the same, with the comparison.
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(iter.join("ckpt-validation.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(report["smoke_test"]["kind"], "forward", "{name}");
        assert_eq!(report["smoke_test"]["comparison"]["tokens"], 8, "{name}");
        assert!(
            report["smoke_test"]["comparison"]["max_abs_logit"]
                .as_f64()
                .unwrap()
                > 0.0
        );
    }
}

#[test]
fn smoke_test_false_skips_only_the_forward_pass() {
    let w = Workdir::new();
    let src = w.hf("src", &family("llama"), 1 << 30);
    let (iter, rep) = to_megatron(&w, &src, &["smoke_test=false"]);
    let v = &rep["validation"];
    assert_eq!(v["failed"], 0);
    assert!(v["passed"].as_u64().unwrap() >= 8, "{rep:#}");
    assert!(v.get("smoke_test").is_none(), "{rep:#}");
    let report = std::fs::read_to_string(iter.join("ckpt-validation.json")).unwrap();
    assert!(!report.contains("smoke test"), "{report}");
    let (_, rep) = to_hf(&w, &iter, &src, &["validate=false"]);
    assert!(rep.get("validation").is_none(), "{rep:#}");
    // And as a step: the checks run, the forward pass does not.
    let r = validate(
        &iter,
        &[&kv("reference", &src), "smoke_test=false", "--json"],
    );
    r.assert_exit(0);
    assert!(json(&r).get("smoke_test").is_none());
}

#[test]
fn convert_validate_compares_with_a_reference_and_reports_the_difference() {
    let w = Workdir::new();
    let src = w.hf("src", &family("qwen3"), 1 << 30);
    let (iter, _) = to_megatron(&w, &src, &[]);
    let log = w.path("termination-log");
    let r = crate::util::bin()
        .args([
            "run".to_owned(),
            "convert/validate".into(),
            kv("path", &w.path("meg")),
            kv("reference", &src),
        ])
        .env("CKPT_TERMINATION_LOG", &log)
        .output()
        .unwrap();
    let r = crate::util::Run { out: r };
    r.assert_exit(0).stdout_has("ok   smoke test: max |Δlogit|");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&log).unwrap()).unwrap();
    assert_eq!(summary["step"], "convert/validate");
    assert_eq!(summary["status"], "succeeded");
    assert!(
        summary["smoke_test_max_abs_diff"].as_f64().is_some(),
        "{summary}"
    );
    assert!(std::fs::read(&log).unwrap().len() <= 4096);
    // A conversion's summary carries the number too.
    let out = crate::util::bin()
        .args([
            "run".to_owned(),
            "convert/megatron_to_hf".into(),
            kv("megatron_path", &iter),
            kv("hf_model_id", &src),
            kv("hf_path", &w.path("back")),
        ])
        .env("CKPT_TERMINATION_LOG", &log)
        .output()
        .unwrap();
    assert!(out.status.success());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&log).unwrap()).unwrap();
    assert!(
        summary["smoke_test_max_abs_diff"].as_f64().is_some(),
        "{summary}"
    );
    // The other direction (an HF output against its Megatron source), and --json.
    let r = validate(&w.path("back"), &[&kv("reference", &iter), "--json"]);
    r.assert_exit(0);
    let rep = json(&r);
    assert_eq!(rep["smoke_test"]["status"], "passed", "{rep:#}");
    assert!(rep["smoke_test_max_abs_diff"].as_f64().is_some());
    // A directory without our manifest is not a complete output.
    validate(&src, &[])
        .assert_exit(1)
        .stdout_has("FAIL manifest: ")
        .stdout_has("ckpt-manifest.json");
}

#[test]
fn generate_prints_text_and_dump_logits_writes_them() {
    let w = Workdir::new();
    let src = w.hf("src", &family("llama"), 1 << 30);
    let (iter, _) = to_megatron(&w, &src, &[]);
    let r = validate(
        &iter,
        &["--generate", "prompt=w5 w6 w7", "max_new_tokens=3"],
    );
    r.assert_exit(0).stdout_has("generate (3 new tokens");
    let rep = validate(
        &iter,
        &[
            "generate=true",
            "prompt=w5 w6 w7",
            "max_new_tokens=3",
            "--json",
        ],
    );
    let rep = json(&rep);
    let g = &rep["generation"];
    assert_eq!(g["new_ids"].as_array().unwrap().len(), 3, "{rep:#}");
    assert!(g["text"].as_str().unwrap().starts_with('w'), "{rep:#}");
    // Greedy decoding is the same through both layouts.
    let hf = validate(
        &src,
        &[
            "generate=true",
            "prompt=w5 w6 w7",
            "max_new_tokens=3",
            "--json",
        ],
    );
    assert_eq!(json(&hf)["generation"]["new_ids"], g["new_ids"]);
    let file = w.path("logits.safetensors");
    validate(&iter, &[&kv("dump_logits", &file), "tokens=1,2,3"]).assert_exit(0);
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("logits").unwrap().shape(), &[3, 128]);
    assert_eq!(st.tensor("tokens").unwrap().shape(), &[3]);
}

#[test]
fn bad_invocations_exit_2() {
    let w = Workdir::new();
    validate(&w.path("nothing"), &[])
        .assert_exit(2)
        .stderr_has("path=");
    let src = w.hf("src", &family("llama"), 1 << 30);
    validate(&src, &["bogus=1"])
        .assert_exit(2)
        .stderr_has("bogus");
    validate(&src, &["--delete-source-after-validation"]).assert_exit(2);
    // An architecture without a forward pass: the smoke test says so, explicitly,
    // and does not fail (the source has no manifest, which does).
    let cfg = src.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("LlamaForCausalLM", "GPT2LMHeadModel")).unwrap();
    let r = validate(&src, &[&kv("reference", &src), "--json"]);
    r.assert_exit(1);
    let rep = json(&r);
    assert_eq!(rep["smoke_test"]["status"], "not_applicable", "{rep:#}");
    let failed: Vec<&str> = rep["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["manifest"], "{rep:#}");
    assert!(
        rep["smoke_test"]["detail"]
            .as_str()
            .unwrap()
            .contains("GPT2LMHeadModel")
    );
}

/// The byte range of the stored elements of `key`'s chunk at `offsets`.
fn chunk_bytes(iter: &Path, key: &str, offsets: &[u64]) -> (PathBuf, u64, Vec<u64>) {
    let m = MegatronCheckpoint::open(iter).unwrap();
    let t = m.tensor(key).unwrap();
    let c = t.chunks.iter().find(|c| c.offsets == offsets).unwrap();
    let ChunkData::Contiguous(r) = &c.data else {
        panic!("strided")
    };
    (m.files.get(r.file).path.clone(), r.offset, c.sizes.clone())
}

fn swap_rows(file: &Path, base: u64, row_bytes: u64, a: u64, b: u64, n: u64) {
    let mut bytes = std::fs::read(file).unwrap();
    for i in 0..n * row_bytes {
        bytes.swap(
            (base + a * row_bytes + i) as usize,
            (base + b * row_bytes + i) as usize,
        );
    }
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn a_swapped_head_block_inside_linear_qkv_fails_the_smoke_test() {
    let w = Workdir::new();
    let shape = family("llama");
    let src = w.hf("src", &shape, 1 << 30);
    let (iter, _) = to_megatron(&w, &src, &[]);
    let (h, d) = (shape.hidden, shape.head_dim);
    let p = shape.heads / shape.kv_heads;
    // Layer 1, group 0: query head 0 and the key head swap places. Every shape,
    // name and value count stays right; only the forward pass can tell.
    let (file, base, _) = chunk_bytes(
        &iter,
        "decoder.layers.self_attention.linear_qkv.weight",
        &[1, 0, 0],
    );
    swap_rows(&file, base, h * 2, 0, p * d, d);
    let r = validate(&iter, &[&kv("reference", &src)]);
    r.assert_exit(1)
        .stdout_has("FAIL smoke test: logits differ from the reference's");
    // The architecture check cannot see it; only the digest and the forward pass do.
    r.stdout_has("ok   architecture tensors");
    let rep = json(&validate(&iter, &[&kv("reference", &src), "--json"]));
    let c = &rep["smoke_test"]["comparison"];
    assert!(
        c["max_abs_diff"].as_f64().unwrap() > 10.0 * c["tolerance"].as_f64().unwrap(),
        "{c}"
    );
}

#[test]
fn fc1_halves_swapped_or_a_missing_bias_fail_the_smoke_test() {
    let w = Workdir::new();
    let shape = family("qwen2");
    let src = w.hf("src", &shape, 1 << 30);
    let (iter, _) = to_megatron(&w, &src, &["smoke_test=false"]);
    let (h, f) = (shape.hidden, shape.intermediate);
    // gate and up of layer 0 are separate chunks of linear_fc1: swap their contents.
    let n = (f * h * 2) as usize;
    let (gfile, gate, _) = chunk_bytes(&iter, "decoder.layers.mlp.linear_fc1.weight", &[0, 0, 0]);
    let (ufile, up, _) = chunk_bytes(&iter, "decoder.layers.mlp.linear_fc1.weight", &[0, f, 0]);
    let g: Vec<u8> = std::fs::read(&gfile).unwrap()[gate as usize..gate as usize + n].to_vec();
    let u: Vec<u8> = std::fs::read(&ufile).unwrap()[up as usize..up as usize + n].to_vec();
    for (file, at, with) in [(&gfile, gate, &u), (&ufile, up, &g)] {
        let mut bytes = std::fs::read(file).unwrap();
        bytes[at as usize..at as usize + n].copy_from_slice(with);
        std::fs::write(file, bytes).unwrap();
    }
    validate(&iter, &[&kv("reference", &src)])
        .assert_exit(1)
        .stdout_has("FAIL smoke test: logits differ");
    // A zeroed q/k/v bias (Qwen2) in a fresh conversion.
    let w = Workdir::new();
    let src = w.hf("src", &shape, 1 << 30);
    let (iter, _) = to_megatron(&w, &src, &["smoke_test=false"]);
    let (file, base, sizes) = chunk_bytes(
        &iter,
        "decoder.layers.self_attention.linear_qkv.bias",
        &[1, 0],
    );
    let mut bytes = std::fs::read(&file).unwrap();
    for b in &mut bytes[base as usize..(base + sizes[1] * 2) as usize] {
        *b = 0;
    }
    std::fs::write(&file, bytes).unwrap();
    validate(&iter, &[&kv("reference", &src)])
        .assert_exit(1)
        .stdout_has("FAIL smoke test: logits differ");
}

#[test]
fn wrong_vocab_padding_fails() {
    let w = Workdir::new();
    let shape = family("padded");
    let src = w.hf("src", &shape, 1 << 30);
    let (iter, _) = to_megatron(&w, &src, &["make_vocab_size_divisible_by=128"]);
    let h = shape.hidden;
    // Rows 130..256 are padding; fill one with the values of a real row.
    let (file, base, sizes) = chunk_bytes(&iter, "embedding.word_embeddings.weight", &[0, 0]);
    assert_eq!(sizes, vec![256, h]);
    let mut bytes = std::fs::read(&file).unwrap();
    let row = (h * 2) as usize;
    let b = base as usize;
    bytes.copy_within(b + 5 * row..b + 6 * row, b + 200 * row);
    std::fs::write(&file, &bytes).unwrap();
    validate(&iter, &[])
        .assert_exit(1)
        .stdout_has("FAIL vocab padding: tensor \"embedding.word_embeddings.weight\": 1 of the 126 padding rows");
    // Rows shifted by one (padding zero again): only the forward pass sees it.
    let w = Workdir::new();
    let src = w.hf("src", &shape, 1 << 30);
    let (iter, _) = to_megatron(&w, &src, &["make_vocab_size_divisible_by=128"]);
    let (file, base, _) = chunk_bytes(&iter, "embedding.word_embeddings.weight", &[0, 0]);
    let mut bytes = std::fs::read(&file).unwrap();
    let b = base as usize;
    bytes.copy_within(b + row..b + 130 * row, b);
    for x in &mut bytes[b + 129 * row..b + 130 * row] {
        *x = 0;
    }
    std::fs::write(&file, &bytes).unwrap();
    let r = validate(&iter, &[&kv("reference", &src)]);
    r.assert_exit(1)
        .stdout_has("ok   vocab padding")
        .stdout_has("FAIL smoke test: logits differ");
}

#[test]
fn a_missing_shard_fails_naming_it() {
    let w = Workdir::new();
    let src = w.hf("src", &family("llama"), 40_000);
    let (iter, _) = to_megatron(&w, &src, &[]);
    let (back, _) = to_hf(&w, &iter, &src, &[]);
    let shards: Vec<String> = w
        .ls("back")
        .into_iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert!(shards.len() > 2, "{shards:?}");
    std::fs::remove_file(back.join(&shards[1])).unwrap();
    validate(&back, &[])
        .assert_exit(1)
        .stdout_has("FAIL weights: ")
        .stdout_has(&format!("shard \"{}\" named in the index", shards[1]));
}

#[test]
fn a_truncated_distcp_item_fails_naming_it() {
    let w = Workdir::new();
    let src = w.hf("src", &family("llama"), 1 << 30);
    let (iter, _) = to_megatron(&w, &src, &[]);
    let f = iter.join("__0_1.distcp");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    validate(&iter, &[])
        .assert_exit(1)
        .stdout_has("FAIL items: ")
        .stdout_has("__0_1.distcp")
        .stdout_has("runs past the end");
}

#[test]
fn a_changed_tokenizer_file_fails_the_provenance_check() {
    let w = Workdir::new();
    let src = w.hf("src", &family("llama"), 1 << 30);
    let (iter, _) = to_megatron(&w, &src, &[]);
    let (back, _) = to_hf(&w, &iter, &src, &[]);
    let tok = back.join("tokenizer.json");
    let text = std::fs::read_to_string(&tok).unwrap();
    std::fs::write(&tok, text.replace("\"w5\"", "\"w5x\"")).unwrap();
    validate(&back, &[])
        .assert_exit(1)
        .stdout_has("FAIL tokenizer and config files: tokenizer.json (tokenizer) differs from the provenance recorded at conversion");
    // The chat template inside a Megatron iteration is checked the same way.
    std::fs::write(iter.join("tokenizer/chat_template.jinja"), "{{ x }}").unwrap();
    validate(&iter, &[])
        .assert_exit(1)
        .stdout_has("tokenizer/chat_template.jinja (chat_template) differs from the provenance");
    // A generation config the source has must travel.
    std::fs::remove_file(back.join("generation_config.json")).unwrap();
    validate(&back, &[])
        .assert_exit(1)
        .stdout_has("FAIL generation_config.json: generation_config.json is missing");
}

#[test]
fn bytes_changed_under_a_matching_manifest_fail_the_weights_digest() {
    let w = Workdir::new();
    let shape = family("llama");
    let src = w.hf("src", &shape, 1 << 30);
    let (iter, _) = to_megatron(&w, &src, &[]);
    // Two rows of one tensor trade places: lengths hold, values stay finite.
    let (file, base, _) = chunk_bytes(&iter, "decoder.layers.mlp.linear_fc2.weight", &[1, 0, 0]);
    swap_rows(&file, base, shape.intermediate * 2, 0, 1, 1);
    // The manifest is made to record the changed file, as if it were written so.
    let path = iter.join("ckpt-manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let rel = file.file_name().unwrap().to_string_lossy().into_owned();
    let (_, digest) = ckpt_convert::formats::digest::file(&file).unwrap();
    let files = m["files"].as_array_mut().unwrap();
    let record = files
        .iter_mut()
        .find(|f| f["path"] == rel.as_str())
        .unwrap();
    record["xxh3"] = digest.into();
    std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    validate(&iter, &["smoke_test=false"])
        .assert_exit(1)
        .stdout_has("ok   manifest")
        .stdout_has("ok   finite")
        .stdout_has("FAIL weights digest: the tensors as read back hash to");
}

#[test]
fn a_nan_fails_naming_the_tensor() {
    let w = Workdir::new();
    let src = w.hf("src", &family("llama"), 1 << 30);
    let (iter, _) = to_megatron(&w, &src, &[]);
    let (file, base, _) = chunk_bytes(&iter, "decoder.layers.mlp.linear_fc2.weight", &[1, 0, 0]);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[base as usize + 10] = 0xc0;
    bytes[base as usize + 11] = 0x7f;
    std::fs::write(&file, bytes).unwrap();
    validate(&iter, &[&kv("reference", &src)])
        .assert_exit(1)
        .stdout_has("FAIL finite: decoder.layers.mlp.linear_fc2.weight: 1 NaN or infinite values")
        .stdout_has("FAIL smoke test");
}

#[test]
fn tensors_missing_extra_or_mis_shaped_for_the_architecture_fail() {
    let w = Workdir::new();
    let src = w.hf("src", &family("llama"), 1 << 30);
    let (iter, _) = to_megatron(&w, &src, &[]);
    let (back, _) = to_hf(&w, &iter, &src, &[]);
    let cfg = back.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    // One layer fewer in the configuration: the last layer's tensors are extra.
    std::fs::write(
        &cfg,
        text.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1"),
    )
    .unwrap();
    validate(&back, &[])
        .assert_exit(1)
        .stdout_has("FAIL architecture tensors: tensor \"model.layers.1.")
        .stdout_has("is not part of the architecture (config.json)");
    // One layer more: the tensors of layer 2 are missing.
    std::fs::write(
        &cfg,
        text.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
    )
    .unwrap();
    validate(&back, &[])
        .assert_exit(1)
        .stdout_has("tensor \"model.layers.2.input_layernorm.weight\" is missing (expected [64] from config.json)");
    // Another intermediate size: every MLP shape is wrong.
    std::fs::write(
        &cfg,
        text.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    validate(&back, &[])
        .assert_exit(1)
        .stdout_has("tensor \"model.layers.0.mlp.gate_proj.weight\": expected shape [96, 64] (from config.json), found [128, 64]");
    // The Megatron side is derived from run_config.yaml.
    let rc = iter.join("run_config.yaml");
    let text = std::fs::read_to_string(&rc).unwrap();
    std::fs::write(
        &rc,
        text.replace("num_query_groups: 2", "num_query_groups: 4"),
    )
    .unwrap();
    validate(&iter, &[])
        .assert_exit(1)
        .stdout_has("tensor \"decoder.layers.self_attention.linear_qkv.weight\": expected shape [2, 192, 64] (from run_config.yaml), found [2, 128, 64]");
}

#[test]
fn megatron_side_files_and_the_tracker_are_checked() {
    let w = Workdir::new();
    let src = w.hf("src", &family("llama"), 1 << 30);
    let (iter, _) = to_megatron(&w, &src, &[]);
    std::fs::write(w.path("meg/latest_checkpointed_iteration.txt"), "5").unwrap();
    validate(&iter, &[])
        .assert_exit(1)
        .stdout_has("FAIL tracker: latest_checkpointed_iteration.txt names Some(5), not 0");
    std::fs::write(w.path("meg/latest_checkpointed_iteration.txt"), "0").unwrap();
    std::fs::remove_file(iter.join("common.pt")).unwrap();
    std::fs::remove_file(iter.join("run_config.yaml")).unwrap();
    std::fs::write(iter.join("metadata.json"), r#"{"sharded_backend": "zarr"}"#).unwrap();
    let r = validate(&iter, &[]);
    r.assert_exit(1)
        .stdout_has("FAIL common.pt: missing")
        .stdout_has("FAIL run_config.yaml: missing")
        .stdout_has("FAIL metadata.json: expected sharded_backend torch_dist");
    // Without run_config.yaml the architecture comes from hf_model_id's config.json.
    std::fs::write(
        iter.join("metadata.json"),
        ckpt_convert::formats::megatron::METADATA_JSON,
    )
    .unwrap();
    let r = validate(
        &iter,
        &[&kv("hf_model_id", &src), &kv("reference", &src), "--json"],
    );
    let rep = json(&r);
    let arch = rep["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "architecture tensors")
        .unwrap()
        .clone();
    assert_eq!(arch["passed"], true, "{rep:#}");
    assert!(
        arch["detail"].as_str().unwrap().contains("config.json"),
        "{arch}"
    );
    assert_eq!(rep["smoke_test"]["status"], "passed", "{rep:#}");
}

#[test]
fn an_identity_export_reports_the_smoke_test_as_not_applicable() {
    let w = Workdir::new();
    let src = w.hf("src", &family("llama"), 1 << 30);
    let (iter, rep) = to_megatron(&w, &src, &["mapping=identity"]);
    assert_eq!(rep["validation"]["smoke_test"], "not_applicable", "{rep:#}");
    assert!(rep["validation"].get("smoke_test_max_abs_diff").is_none());
    let report = std::fs::read_to_string(iter.join("ckpt-validation.json")).unwrap();
    assert!(
        report.contains("not applicable: no reference model"),
        "{report}"
    );
}
