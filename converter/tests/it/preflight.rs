//! Preflight refusals: exit 2, a message naming the parameter, nothing written.

use ckpt_convert::synthetic::ModelShape;

use crate::util::{Workdir, kv, run};

fn converted(w: &Workdir) -> std::path::PathBuf {
    let src = w.hf("src", &ModelShape::tiny_llama(), 1 << 30);
    run(&[
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", &src),
        kv("megatron_path", &w.path("run")),
    ])
    .assert_exit(0);
    src
}

#[test]
fn a_run_directory_names_its_latest_iteration() {
    let w = Workdir::new();
    let src = converted(&w);
    run(&[
        "run".to_owned(),
        "convert/megatron_to_hf".into(),
        kv("megatron_path", &w.path("run")),
        kv("hf_model_id", &src),
        kv("hf_path", &w.path("hf")),
    ])
    .assert_exit(2)
    .stderr_has("is a run directory")
    .stderr_has("latest_checkpointed_iteration.txt naming 0")
    .stderr_has(&format!(
        "use megatron_path={}",
        w.path("run/iter_0000000").display()
    ));
    assert!(!w.path("hf").exists());
}

#[test]
fn outputs_overlapping_inputs_are_refused() {
    let w = Workdir::new();
    let src = converted(&w);
    let files_before = w.snapshot("src");
    run(&[
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", &src),
        kv("megatron_path", &src.join("iter_0000001")),
    ])
    .assert_exit(2)
    .stderr_has("is inside hf_model_id=");
    let to_hf = |hf_path: std::path::PathBuf| {
        run(&[
            "run".to_owned(),
            "convert/megatron_to_hf".into(),
            kv("megatron_path", &w.path("run/iter_0000000")),
            kv("hf_model_id", &src),
            kv("hf_path", &hf_path),
        ])
    };
    to_hf(w.path("run"))
        .assert_exit(2)
        .stderr_has("contains megatron_path=");
    to_hf(w.path("run/iter_0000000/hf"))
        .assert_exit(2)
        .stderr_has("is inside megatron_path=");
    to_hf(w.path("src/../src"))
        .assert_exit(2)
        .stderr_has("is the same path as hf_model_id=");
    assert_eq!(files_before, w.snapshot("src"), "the source changed");
}

#[test]
fn an_existing_output_needs_overwrite() {
    let w = Workdir::new();
    let src = converted(&w);
    // Another conversion into the same place is refused (an identical one is
    // recognised as done: see `publish::an_identical_rerun_is_done`).
    let again = [
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", &src),
        kv("megatron_path", &w.path("run")),
        "dtype=float32".into(),
    ];
    run(&again)
        .assert_exit(2)
        .stderr_has("already holds the output of another conversion")
        .stderr_has("--overwrite");
    // A file the conversion never writes: it goes only if the iteration is replaced
    // as a whole (time stamps would say nothing on a coarse or fast clock).
    let marker = w.path("run/iter_0000000/left-by-the-test");
    std::fs::write(&marker, b"old").unwrap();
    let mut with = again.to_vec();
    with.push("--overwrite".into());
    run(&with).assert_exit(0);
    assert!(!marker.exists(), "the iteration was not replaced");
    assert!(
        w.path("run/iter_0000000/ckpt-manifest.json").is_file(),
        "the new iteration has no manifest"
    );
    assert!(
        !w.ls("run").iter().any(|n| n.contains("ckpt-")),
        "{:?}",
        w.ls("run")
    );
}

#[test]
fn bad_parameters_are_named() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 1 << 30);
    let base = |extra: &str| {
        vec![
            "run".to_owned(),
            "convert/hf_to_megatron".into(),
            kv("hf_model_id", &src),
            kv("megatron_path", &w.path("o")),
            extra.to_owned(),
        ]
    };
    run(&base("dtype=float8"))
        .assert_exit(2)
        .stderr_has("dtype=float8: expected bfloat16, float16 or float32");
    run(&base("tp=0")).assert_exit(2).stderr_has("tp=0");
    run(&base("tp=3"))
        .assert_exit(2)
        .stderr_has("tp=3: expected a divisor of num_attention_heads=4");
    run(&base("hf_modle_id=x"))
        .assert_exit(2)
        .stderr_has("unknown parameter \"hf_modle_id\"");
    run(&["run", "convert/hf_to_megatron"])
        .assert_exit(2)
        .stderr_has("missing required parameter hf_model_id");
    run(&["run", "convert/nope", "a=b"])
        .assert_exit(2)
        .stderr_has("unknown step");
    run(&["run", "convert/hf_to_megatron", "positional"])
        .assert_exit(2)
        .stderr_has("expected key=value");
    assert!(!w.path("o").exists());
}

#[test]
fn unknown_architectures_and_options_are_refused() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 1 << 30);
    let cfg_path = src.join("config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    let cases = [
        (
            "\"LlamaForCausalLM\"",
            "\"GPT2LMHeadModel\"",
            "architecture GPT2LMHeadModel is not supported",
        ),
        (
            "\"hidden_act\": \"silu\"",
            "\"hidden_act\": \"gelu\"",
            "hidden_act=gelu",
        ),
        ("\"mlp_bias\": false", "\"mlp_bias\": true", "mlp_bias=true"),
        (
            "\"attention_bias\": false",
            "\"attention_bias\": true",
            "attention_bias=true",
        ),
        (
            "\"rope_theta\": 500000.0",
            "\"rope_theta\": 500000.0, \"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0}",
            "rope_scaling.rope_type=yarn",
        ),
    ];
    for (from, to, message) in cases {
        assert!(original.contains(from), "{from}");
        std::fs::write(&cfg_path, original.replace(from, to)).unwrap();
        run(&[
            "run".to_owned(),
            "convert/hf_to_megatron".into(),
            kv("hf_model_id", &src),
            kv("megatron_path", &w.path("o")),
        ])
        .assert_exit(2)
        .stderr_has(message)
        .stderr_has("config.json");
    }
    assert!(!w.path("o").exists());
}

#[test]
fn missing_tensors_and_wrong_shapes_are_named() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 1 << 30);
    let cfg_path = src.join("config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        original.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 4"),
    )
    .unwrap();
    run(&[
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", &src),
        kv("megatron_path", &w.path("o")),
    ])
    .assert_exit(2)
    .stderr_has("model.layers.0.self_attn.k_proj.weight")
    .stderr_has("expected shape [64, 64]")
    .stderr_has("found [32, 64]");
    std::fs::write(
        &cfg_path,
        original.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
    )
    .unwrap();
    run(&[
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", &src),
        kv("megatron_path", &w.path("o")),
    ])
    .assert_exit(2)
    .stderr_has("model.layers.2.input_layernorm.weight")
    .stderr_has("missing");
    assert!(!w.path("o").exists());
}

/// Issue 11: impossible configuration values are refused in preflight, naming the
/// field and the value (not by the smoke test as an infinite logit difference).
#[test]
fn impossible_config_values_are_named() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 1 << 30);
    let cfg_path = src.join("config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&original).unwrap();
    for (key, value) in [("rope_theta", 0.0), ("rms_norm_eps", -1e-5)] {
        let mut c = cfg.clone();
        c[key] = value.into();
        std::fs::write(&cfg_path, c.to_string()).unwrap();
        run(&[
            "run".to_owned(),
            "convert/hf_to_megatron".into(),
            kv("hf_model_id", &src),
            kv("megatron_path", &w.path("o")),
        ])
        .assert_exit(2)
        .stderr_has(&format!(
            "config.json: {key}: expected a number greater than 0"
        ));
    }
    assert!(!w.path("o").exists());
}

/// A Llama 3 rope scaling Megatron-Core computes differently is refused by name;
/// `allow_rope_mismatch=true` converts it anyway, says so, records it in the
/// manifest, and the smoke test compares both models under Megatron-Core's values.
#[test]
fn llama3_rope_megatron_cannot_express_is_named_and_can_be_overridden() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 1 << 30);
    let cfg_path = src.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 2.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let base = [
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", &src),
        kv("megatron_path", &w.path("o")),
    ];
    run(&base)
        .assert_exit(2)
        .stderr_has("low_freq_factor=2 (Megatron-Core uses 1)")
        .stderr_has("original_max_position_embeddings=16 (Megatron-Core uses 8192)")
        .stderr_has("allow_rope_mismatch=true");
    assert!(!w.path("o").exists());
    let mut args = base.to_vec();
    args.push("allow_rope_mismatch=true".into());
    let out = run(&args);
    out.assert_exit(0)
        .stdout_has("warning: llama3 rope scaling ")
        .stdout_has("low_freq_factor=2 (Megatron-Core uses 1)")
        .stdout_has("smoke test passed");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(w.path("o/iter_0000000/ckpt-manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["parameters"]["allow_rope_mismatch"], "true");
}
