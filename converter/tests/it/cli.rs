//! The command line: inspect for every layout, JSON reports, both parameter
//! spellings.

use ckpt_convert::synthetic::ModelShape;

use crate::util::{Workdir, kv, run};

#[test]
fn inspect_reads_every_layout() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
    let j: serde_json::Value = serde_json::from_str(
        &run(&[
            "inspect".to_owned(),
            src.display().to_string(),
            "--json".into(),
        ])
        .assert_exit(0)
        .stdout(),
    )
    .unwrap();
    assert_eq!(j["kind"], "checkpoint_hf");
    assert_eq!(j["architecture"], "LlamaForCausalLM");
    assert_eq!(j["tensors"].as_array().unwrap().len(), 21);
    run(&[
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", &src),
        kv("megatron_path", &w.path("run")),
    ])
    .assert_exit(0);
    // A run directory resolves to its latest iteration.
    let j: serde_json::Value = serde_json::from_str(
        &run(&[
            "inspect".to_owned(),
            w.path("run").display().to_string(),
            "--json".into(),
        ])
        .assert_exit(0)
        .stdout(),
    )
    .unwrap();
    assert_eq!(j["kind"], "checkpoint_megatron");
    assert_eq!(j["iteration"], 0);
    let qkv = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "decoder.layers.self_attention.linear_qkv.weight")
        .unwrap();
    assert_eq!(qkv["shape"], serde_json::json!([2, 128, 64]));
    assert_eq!(
        qkv["chunks"][1],
        serde_json::json!([[1, 0, 0], [1, 128, 64]])
    );
    assert_eq!(j["byte_items"].as_array().unwrap().len(), 10);
    // A single safetensors file.
    let first = ckpt_convert::formats::hf::HfCheckpoint::open(&src)
        .unwrap()
        .shards[0]
        .clone();
    let file = src.join(first);
    run(&["inspect".to_owned(), file.display().to_string()])
        .assert_exit(0)
        .stdout_has("safetensors_file");
    run(&["inspect", "/nonexistent"])
        .assert_exit(2)
        .stderr_has("/nonexistent");
}

#[test]
fn json_report_and_flag_spelling() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 1 << 30);
    let r = run(&[
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        "--hf-model-id".into(),
        src.display().to_string(),
        "--megatron-path".into(),
        w.path("run/iter_0000005").display().to_string(),
        "--dtype".into(),
        "float32".into(),
        "--json".into(),
    ]);
    let j: serde_json::Value = serde_json::from_str(&r.assert_exit(0).stdout()).unwrap();
    assert_eq!(j["status"], "succeeded");
    assert_eq!(j["kind"], "checkpoint_megatron");
    // Embedding, 7 per layer (2 layers), final norm, output layer.
    assert_eq!(j["tensors"], 17);
    assert_eq!(
        std::fs::read_to_string(w.path("run/latest_checkpointed_iteration.txt")).unwrap(),
        "5"
    );
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(w.path("run/iter_0000005/ckpt-manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["step"], "convert/hf_to_megatron");
    assert_eq!(manifest["parameters"]["dtype"], "float32");
    assert_eq!(manifest["output"]["iteration"], 5);
    assert!(
        manifest["provenance"]["side_files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["path"] == "tokenizer/chat_template.jinja")
    );
}

#[test]
fn validate_finds_corruption_and_non_finite_values() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 1 << 30);
    run(&[
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", &src),
        kv("megatron_path", &w.path("run")),
    ])
    .assert_exit(0);
    let iter = w.path("run/iter_0000000");
    run(&[
        "run".to_owned(),
        "convert/megatron_to_hf".into(),
        kv("megatron_path", &iter),
        kv("hf_model_id", &src),
        kv("hf_path", &w.path("hf")),
    ])
    .assert_exit(0);
    // Both outputs carry the report of the validation that ran before publishing.
    for dir in [&iter, &w.path("hf")] {
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("ckpt-validation.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(report["failed"], 0, "{report}");
        assert_eq!(report["path"], dir.display().to_string());
    }
    run(&["validate".to_owned(), w.path("run").display().to_string()])
        .assert_exit(0)
        .stdout_has("tracker");
    // A NaN written into a tensor: the manifest digest and the finiteness scan both fail.
    let file = w.path("hf/model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + n] = 0xff;
    bytes[8 + n + 1] = 0x7f;
    std::fs::write(&file, bytes).unwrap();
    run(&["validate".to_owned(), w.path("hf").display().to_string()])
        .assert_exit(1)
        .stdout_has("FAIL manifest: model.safetensors: content differs")
        .stdout_has("NaN or infinite");
    // A missing tokenizer file.
    std::fs::remove_file(iter.join("tokenizer/tokenizer.json")).unwrap();
    run(&["validate".to_owned(), iter.display().to_string()])
        .assert_exit(1)
        .stdout_has("tokenizer/tokenizer.json");
}
