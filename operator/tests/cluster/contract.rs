//! The converter's side of issue 10, with the real converter: refusals that a retry
//! cannot fix exit 2 and are not retried, and an identical conversion already
//! published is recognised. The last needs the real node: the stand-in rewrites
//! mount paths per pod, so the parameters a manifest records differ from one pod to
//! the next.

use crate::support::{
    Env, Operator, condition, condition_status, contents, converting, finished, fixtures, kubectl,
};

/// Regression (issue 10, finding 6): EACCES/EROFS on the target were retried (52 s,
/// three attempts) and the message came twice.
#[tokio::test]
async fn a_target_the_converter_cannot_write_fails_at_once_on_the_stand_in() {
    let mut env = Env::new("read-only").await;
    fixtures(&env);
    // The target's parent exists (a missing subPath on a read-only volume would
    // stop the pod before the converter runs).
    std::fs::create_dir_all(env.claim("lustre-shared").join("output/convert")).unwrap();
    let cfg = env
        .node_config()
        .read_only_pvc("lustre-shared", env.claim("lustre-shared"));
    env.start_node_with(cfg).await;
    let mut op = Operator::start(&env, "read-only").await;
    env.apply_ok("megatron-to-hf.yaml").await;
    let cr = env
        .wait_condition("sft-to-hf", "Failed", "True", &mut op)
        .await;
    let (_, reason, message) = condition(&cr, "Failed");
    assert_eq!(reason, "InvalidInput", "{message}");
    assert_eq!(
        message
            .to_lowercase()
            .matches("read-only file system")
            .count(),
        1,
        "said once: {message}"
    );
    assert_eq!(env.runs().len(), 1, "not retried: {:#?}", env.runs());
    op.stop();
}

/// Regression (issue 10, finding 6): a missing source read "expected an iter_*
/// directory holding .metadata and metadata.json, found neither". In a pod the
/// kubelet creates the missing subPath as an empty directory, which the converter
/// names as such.
#[tokio::test]
async fn a_missing_source_says_it_does_not_exist() {
    let (env, mut op) = converting("no-source").await;
    let manifest = env.example("megatron-to-hf.yaml").replace(
        "path: output/sft/megatron_bridge/iter_0000100",
        "path: output/sft/megatron_bridge/iter_0000200",
    );
    kubectl(&["apply", "-f", "-"], &manifest)
        .await
        .expect_ok("a resource with a missing source");
    let cr = env
        .wait_condition("sft-to-hf", "Failed", "True", &mut op)
        .await;
    let (_, reason, message) = condition(&cr, "Failed");
    assert_eq!(reason, "InvalidInput");
    assert!(
        message.contains("is an empty directory") && message.contains("does not exist"),
        "{message}"
    );
    assert_eq!(env.pods_run().await, 1, "not retried");
    op.stop();
}

/// Regression (issue 10, finding 4): `convert/hf_to_megatron` wrote `iter_0000000/`
/// and `latest_checkpointed_iteration.txt` into an existing Hugging Face directory.
#[tokio::test]
async fn a_megatron_target_holding_something_else_is_refused() {
    let (env, mut op) = converting("not-megatron").await;
    // An HF directory where the example writes its Megatron run directory.
    let target = env
        .claim("lustre-shared")
        .join("output/convert/llama3b-megatron");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("config.json"), "{}").unwrap();
    let before = contents(&target);
    env.apply_ok("hf-to-megatron.yaml").await;
    let cr = env
        .wait_condition("llama3b-to-megatron", "Failed", "True", &mut op)
        .await;
    assert_eq!(condition(&cr, "Failed").1, "InvalidInput");
    assert_eq!(contents(&target), before, "the directory was written into");
    op.stop();
}

/// A resource deleted and applied again (as a GitOps prune and sync may do) finds its
/// output published by the identical conversion and succeeds without rewriting it.
#[tokio::test]
#[ignore = "real node only: run-tests.sh runs it with CKPT_TEST_NODE=real"]
async fn recreating_a_resource_reuses_its_published_output_on_the_real_node() {
    Env::needs_real_node("compares the parameters two pods pass");
    let (env, mut op) = converting("reuse").await;
    env.apply_ok("megatron-to-hf.yaml").await;
    env.wait_condition("sft-to-hf", "Succeeded", "True", &mut op)
        .await;
    let output = env.claim("lustre-shared").join("output/convert/sft-hf");
    let published = contents(&output);
    kubectl(
        &[
            "delete",
            "checkpointconversion",
            "sft-to-hf",
            "-n",
            &env.ns,
            "--wait=true",
        ],
        "",
    )
    .await
    .expect_ok("deleting the resource");
    env.apply_ok("megatron-to-hf.yaml").await;
    let cr = env
        .wait_for("sft-to-hf", "finished", &mut [&mut op], finished)
        .await;
    assert_eq!(
        condition(&cr, "Succeeded").1,
        "OutputReused",
        "{:#?}",
        cr.status
    );
    assert!(condition_status(&cr, "Failed").is_none());
    assert_eq!(contents(&output), published, "the output was rewritten");
    op.stop();
}
