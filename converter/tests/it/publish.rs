//! Publishing: a killed run leaves no target, the source is never modified, the
//! next run cleans up; a dry run writes nothing.

use ckpt_convert::synthetic::ModelShape;

use crate::util::{Workdir, kv, run};

#[cfg(feature = "failpoints")]
#[test]
fn a_run_killed_mid_write_leaves_no_target() {
    use crate::util::bin;
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 60_000);
    let before = w.snapshot("src");
    let args = [
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", &src),
        kv("megatron_path", &w.path("run")),
    ];
    let out = bin()
        .args(&args)
        .env("CKPT_CONVERT_ABORT_AFTER_PIECES", "5")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the failpoint did not fire");
    // Killed: no iteration, no tracker, only a staging directory that says so.
    assert!(!w.path("run/iter_0000000").exists());
    assert!(!w.path("run/latest_checkpointed_iteration.txt").exists());
    let left = w.ls("run");
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        left[0].starts_with(".iter_0000000.ckpt-staging-"),
        "{left:?}"
    );
    assert_eq!(before, w.snapshot("src"), "the source changed");
    // The next run succeeds and removes the dead run's staging directory.
    run(&args).assert_exit(0);
    assert_eq!(
        w.ls("run"),
        vec![
            "iter_0000000",
            "latest_checkpointed_iteration.txt",
            "latest_train_state.pt"
        ]
    );
}

#[cfg(not(feature = "failpoints"))]
#[test]
fn a_run_killed_mid_write_leaves_no_target() {
    panic!(
        "this test needs the failpoints feature: cargo test --features failpoints (the repository's test command passes it)"
    );
}

#[test]
fn a_dry_run_prints_the_plan_and_writes_nothing() {
    let w = Workdir::new();
    let src = w.hf("src", &ModelShape::tiny_llama(), 1 << 30);
    let r = run(&[
        "run".to_owned(),
        "convert/hf_to_megatron".into(),
        kv("hf_model_id", &src),
        kv("megatron_path", &w.path("run")),
        "--dry-run".into(),
    ]);
    r.assert_exit(0)
        .stdout_has("decoder.layers.self_attention.linear_qkv.weight[1:2, 0:128, 0:64] [1, 128, 64] bfloat16 <- model.layers.1.self_attn.q_proj.weight + model.layers.1.self_attn.k_proj.weight + model.layers.1.self_attn.v_proj.weight (qkv interleave)")
        .stdout_has("nothing written");
    assert!(!w.path("run").exists());
}
