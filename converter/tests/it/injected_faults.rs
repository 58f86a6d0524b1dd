//! Faults injected into a step's output as it is written (the `failpoints`
//! feature's hooks, applied before the piece is digested, as a faulty kernel
//! would): the checks that run while the step writes catch each one, the step
//! fails, and nothing is published. The same step without the hook succeeds, so
//! the hook is what the checks caught.

#[cfg(feature = "failpoints")]
use {
    crate::util::{Run, Workdir, bin, kv},
    ckpt_convert::synthetic::ModelShape,
    serde_json::json,
    std::path::Path,
};

/// Runs `ckpt-convert` with `args` and one hook set in its environment.
#[cfg(feature = "failpoints")]
fn run_with(hook: (&str, &str), args: &[String]) -> Run {
    Run {
        out: bin()
            .args(args)
            .env(hook.0, hook.1)
            .output()
            .expect("run ckpt-convert"),
    }
}

#[cfg(feature = "failpoints")]
fn to_megatron_args(src: &Path, out: &Path) -> Vec<String> {
    vec![
        "run".into(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", src),
        kv("megatron_path", out),
    ]
}

#[cfg(feature = "failpoints")]
#[test]
fn a_conversion_with_two_attention_heads_swapped_fails_its_smoke_test() {
    let w = Workdir::new();
    let shape = ModelShape::tiny_llama();
    let src = w.hf("src", &shape, 1 << 30);
    let before = w.snapshot("src");
    let d = shape.head_dim;
    let per_group = shape.heads / shape.kv_heads;
    // HF → Megatron: in layer 1's fused QKV, query head 0 of group 0 trades places
    // with the group's key head. Every name, shape and digest stays consistent.
    let qkv = format!(
        "decoder.layers.self_attention.linear_qkv.weight[1:2, 0:{}, 0:{}]",
        (shape.heads + 2 * shape.kv_heads) * d,
        shape.hidden
    );
    let args = to_megatron_args(&src, &w.path("meg"));
    run_with(
        (
            "CKPT_CONVERT_FAIL_SWAP_ROWS",
            &format!("{qkv}:0:{}:{d}", per_group * d),
        ),
        &args,
    )
    .assert_exit(1)
    .stderr_has("smoke test: logits differ from the reference's");
    assert!(!w.path("meg/iter_0000000").exists(), "{:?}", w.ls("meg"));
    assert_eq!(before, w.snapshot("src"), "the source changed");
    run_with(("CKPT_CONVERT_FAIL_SWAP_ROWS", ""), &args).assert_exit(0);

    // Megatron → HF: query heads 0 and 1 of layer 1 trade places.
    let back = [
        "run".to_owned(),
        "convert/megatron_to_hf".into(),
        kv("megatron_path", &w.path("meg/iter_0000000")),
        kv("hf_model_id", &src),
        kv("hf_path", &w.path("back")),
    ];
    run_with(
        (
            "CKPT_CONVERT_FAIL_SWAP_ROWS",
            &format!("model.layers.1.self_attn.q_proj.weight:0:{d}:{d}"),
        ),
        &back,
    )
    .assert_exit(1)
    .stderr_has("smoke test: logits differ from the reference's");
    assert!(!w.path("back").exists());
    run_with(("CKPT_CONVERT_FAIL_SWAP_ROWS", ""), &back).assert_exit(0);
}

#[cfg(feature = "failpoints")]
fn merge_args(w: &Workdir) -> Vec<String> {
    let base = w.hf("base", &ModelShape::tiny_llama(), 1 << 30);
    let adapter = crate::merge_lora::qv_adapter(
        &w.path("adapter"),
        json!({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
    );
    vec![
        "run".into(),
        "convert/merge_lora".into(),
        kv("lora_checkpoint", &adapter),
        kv("base_hf_path", &base),
        kv("output_hf_path", &w.path("out")),
    ]
}

#[cfg(feature = "failpoints")]
#[test]
fn a_merge_with_one_adapted_row_left_unmerged_fails_its_probe() {
    let w = Workdir::new();
    let args = merge_args(&w);
    run_with(
        (
            "CKPT_CONVERT_FAIL_UNMERGED_ROW",
            "model.layers.0.self_attn.q_proj.weight:5",
        ),
        &args,
    )
    .assert_exit(1)
    .stderr_has("smoke test: 1 of 4 merged tensors disagree with base + s·B·A: model.layers.0.self_attn.q_proj.weight: merged weight × v differs");
    assert!(!w.path("out").exists());
    run_with(("CKPT_CONVERT_FAIL_UNMERGED_ROW", ""), &args).assert_exit(0);
}

#[cfg(feature = "failpoints")]
#[test]
fn a_merge_with_the_wrong_scaling_fails_its_probe() {
    let w = Workdir::new();
    let args = merge_args(&w);
    // α/r = 2 applied as 2 × 1.25: every merged tensor is off.
    run_with(("CKPT_CONVERT_FAIL_MERGE_SCALE", "1.25"), &args)
        .assert_exit(1)
        .stderr_has("smoke test: 4 of 4 merged tensors disagree with base + s·B·A");
    assert!(!w.path("out").exists());
    run_with(("CKPT_CONVERT_FAIL_MERGE_SCALE", "1"), &args).assert_exit(0);
}

#[cfg(not(feature = "failpoints"))]
#[test]
fn injected_faults_need_the_failpoints_feature() {
    panic!(
        "these tests need the failpoints feature: cargo test --features failpoints (the repository's test command passes it)"
    );
}
