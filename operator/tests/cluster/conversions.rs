//! Conversions end to end: the examples applied as users apply them, through the
//! operator, to outputs on the claims.

use ckpt_operator::api::CheckpointConversion;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};

use crate::support::{
    Env, Operator, Waiting, condition, converting, cp, fixtures, kubectl, lora_fixtures,
    tensors_of, validated,
};

#[tokio::test]
async fn examples_convert_and_validate_through_the_operator() {
    let (env, mut op) = converting("examples").await;
    for (file, name) in [
        ("megatron-to-hf.yaml", "sft-to-hf"),
        ("hf-to-megatron.yaml", "llama3b-to-megatron"),
    ] {
        env.apply_ok(file).await;
        let cr = env
            .wait_for(name, "Succeeded and Validated", &mut [&mut op], validated)
            .await;
        let st = cr.status.clone().unwrap();
        assert_eq!(st.observed_generation, Some(1));
        assert_eq!(st.phase.as_deref(), Some("Succeeded"));
        let summary = st.summary.expect("summary in status");
        assert!(
            summary.tensors.unwrap() > 0 && summary.bytes.unwrap() > 0,
            "{summary:?}"
        );
        assert!(
            summary.checks_passed.unwrap() > 0 && summary.checks_failed == Some(0),
            "{summary:?}"
        );
        assert!(summary.output_digest.is_some());
        assert_eq!(condition(&cr, "Accepted").0, "True");
        assert_eq!(condition(&cr, "Running").0, "False");
        assert!(st.start_time.is_some() && st.completion_time.is_some());
        let report = env
            .claim("lustre-shared")
            .join(summary.report_path.expect("report path"));
        assert!(report.is_file(), "{} is not on the claim", report.display());
    }
    // The outputs are where the examples say, and the sources are untouched.
    assert!(
        env.claim("lustre-shared")
            .join("output/convert/sft-hf/config.json")
            .is_file()
    );
    assert!(
        env.claim("lustre-shared")
            .join("output/convert/llama3b-megatron/iter_0000000/.metadata")
            .is_file()
    );
    assert_eq!(env.pods_run().await, 2, "one pod per conversion");
    // Events mark the transitions, each once (issue 10: JobCreated came twice on a
    // normal run), from the replica that holds the Lease.
    for name in ["sft-to-hf", "llama3b-to-megatron"] {
        let events = env.events_of(name).await;
        let reasons: Vec<&str> = events
            .iter()
            .map(|e| e.reason.as_deref().unwrap_or(""))
            .collect();
        for r in [
            "Accepted",
            "JobCreated",
            "ConversionSucceeded",
            "ValidationPassed",
        ] {
            assert_eq!(
                reasons.iter().filter(|x| **x == r).count(),
                1,
                "{name}: one {r} event: {reasons:?}"
            );
        }
        for e in &events {
            assert!(e.series.is_none(), "{name}: {:?} repeated: {e:?}", e.reason);
            assert_eq!(e.reporting_instance.as_deref(), Some("examples"));
        }
    }
    // kubectl get shows the printer columns, with why and what.
    let table = kubectl(&["get", "checkpointconversions", "-n", &env.ns], "")
        .await
        .expect_ok("kubectl get checkpointconversions");
    assert!(
        table.contains("STEP")
            && table.contains("PHASE")
            && table.contains("REASON")
            && table.contains("VALIDATED")
            && table.contains("MESSAGE"),
        "{table}"
    );
    assert!(
        table.contains("ConversionSucceeded") && table.contains("wrote "),
        "{table}"
    );
    assert!(
        table.contains("convert/megatron_to_hf") && table.contains("Succeeded"),
        "{table}"
    );
    op.stop();
}

#[tokio::test]
async fn a_corrupt_source_fails_at_once_with_the_converter_message() {
    let mut env = Env::new("corrupt").await;
    fixtures(&env);
    // Truncate one .distcp file of the SFT checkpoint.
    let distcp = env
        .claim("lustre-shared")
        .join("output/sft/megatron_bridge/iter_0000100/__0_1.distcp");
    let len = std::fs::metadata(&distcp).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&distcp)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    env.start_node().await;
    let mut op = Operator::start(&env, "corrupt").await;
    env.apply_ok("megatron-to-hf.yaml").await;
    let cr = env
        .wait_condition("sft-to-hf", "Failed", "True", &mut op)
        .await;
    let (_, reason, message) = condition(&cr, "Failed");
    assert_eq!(reason, "InvalidInput");
    assert!(
        message.contains("__0_1.distcp") && message.contains("runs past the end"),
        "{message}"
    );
    // No validation ran, so there is no Validated verdict (issue 10: it read False).
    assert!(
        crate::support::condition_status(&cr, "Validated").is_none(),
        "{:#?}",
        cr.status
    );
    assert_eq!(cr.status.as_ref().unwrap().phase.as_deref(), Some("Failed"));
    assert_eq!(
        cr.status.as_ref().unwrap().reason.as_deref(),
        Some("InvalidInput")
    );
    // Exit code 2 is not retried: one pod, Job failed by its podFailurePolicy.
    let jobs = env.jobs().await;
    assert_eq!(jobs.len(), 1);
    let st = jobs[0].status.clone().unwrap();
    assert_eq!(st.failed, Some(1));
    assert_eq!(env.pods_run().await, 1);
    assert!(
        !env.claim("lustre-shared")
            .join("output/convert/sft-hf")
            .exists(),
        "a failed conversion published output"
    );
    op.stop();
}

#[tokio::test]
async fn the_apiserver_refuses_invalid_and_changed_resources_with_our_messages() {
    let env = Env::new("cel").await;
    let err = env
        .apply_example("illegal-target-inside-source.yaml")
        .await
        .expect_err("illegal-target-inside-source.yaml");
    assert!(
        err.contains("target.path must not equal, be inside, or contain source.path"),
        "{err}"
    );
    env.apply_ok("megatron-to-hf.yaml").await;
    let patch = |p: &'static str| {
        let ns = env.ns.clone();
        async move {
            kubectl(
                &[
                    "patch",
                    "checkpointconversion",
                    "sft-to-hf",
                    "-n",
                    &ns,
                    "--type=merge",
                    "-p",
                    p,
                ],
                "",
            )
            .await
        }
    };
    let err = patch(r#"{"spec":{"target":{"path":"output/convert/other"}}}"#)
        .await
        .expect_err("a changed target");
    assert!(err.contains("target is immutable"), "{err}");
    let err = patch(r#"{"spec":{"dtype":"float32"}}"#)
        .await
        .expect_err("a changed dtype");
    assert!(err.contains("dtype is immutable"), "{err}");
    patch(r#"{"spec":{"parallelism":{"tp":0}}}"#)
        .await
        .expect_err("tp=0");
    let err = patch(r#"{"spec":{"lora":{"backend":"hf_peft"}}}"#)
        .await
        .expect_err("lora on a Megatron source");
    assert!(
        err.contains("lora is only valid with a checkpoint_lora source"),
        "{err}"
    );
    // Job knobs may change.
    patch(r#"{"spec":{"job":{"backoffLimit":3}}}"#)
        .await
        .expect_ok("a changed backoffLimit");
}

#[tokio::test]
async fn a_second_resource_for_the_same_target_is_refused() {
    let (env, mut op) = converting("conflict").await;
    env.apply_ok("megatron-to-hf.yaml").await;
    env.wait_condition("sft-to-hf", "Accepted", "True", &mut op)
        .await;
    // Same target, created later.
    let text = env
        .example("megatron-to-hf.yaml")
        .replace("name: sft-to-hf", "name: sft-to-hf-again");
    kubectl(&["apply", "-f", "-"], &text)
        .await
        .expect_ok("the second resource");
    let cr = env
        .wait_condition("sft-to-hf-again", "Accepted", "False", &mut op)
        .await;
    assert_eq!(condition(&cr, "Accepted").1, "TargetConflict");
    assert!(condition(&cr, "Accepted").2.contains("sft-to-hf"));
    env.wait_condition("sft-to-hf", "Succeeded", "True", &mut op)
        .await;
    let jobs: Vec<String> = env
        .jobs()
        .await
        .iter()
        .map(|j| j.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(jobs, vec!["sft-to-hf-g1"]);
    op.stop();
}

#[tokio::test]
async fn deleting_the_resource_removes_its_job_and_pods_but_keeps_the_output() {
    let (env, mut op) = converting("delete").await;
    env.apply_ok("megatron-to-hf.yaml").await;
    env.wait_condition("sft-to-hf", "Succeeded", "True", &mut op)
        .await;
    let client = cp().await.client();
    let api: Api<CheckpointConversion> = Api::namespaced(client.clone(), &env.ns);
    api.delete("sft-to-hf", &DeleteParams::background())
        .await
        .unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &env.ns);
    let pods: Api<Pod> = Api::namespaced(client, &env.ns);
    let waiting = Waiting::new("garbage collection of the Job and its pods");
    loop {
        let j = jobs.list(&ListParams::default()).await.unwrap().items.len();
        let p = pods.list(&ListParams::default()).await.unwrap().items.len();
        if j == 0 && p == 0 {
            break;
        }
        waiting.tick(|| format!("{j} Jobs and {p} pods left")).await;
    }
    assert!(
        env.claim("lustre-shared")
            .join("output/convert/sft-hf/config.json")
            .is_file(),
        "the output was removed"
    );
    op.stop();
}

#[tokio::test]
async fn lora_merge_examples_succeed_for_both_backends() {
    let mut env = Env::new("lora").await;
    fixtures(&env);
    lora_fixtures(&env);
    env.start_node().await;
    let mut op = Operator::start(&env, "lora").await;
    for (file, name, outputs) in [
        (
            "merge-lora-hf-peft.yaml",
            "peft-merge",
            vec!["output/convert/peft-merged-hf/config.json"],
        ),
        (
            "merge-lora-megatron-bridge.yaml",
            "sft-lora-merge",
            vec![
                "output/convert/sft-lora-merged-hf/config.json",
                "output/convert/sft-lora-merged-megatron/iter_0000000/.metadata",
            ],
        ),
    ] {
        env.apply_ok(file).await;
        let cr = env
            .wait_for(name, "Succeeded and Validated", &mut [&mut op], validated)
            .await;
        let st = cr.status.unwrap();
        assert_eq!(st.step.as_deref(), Some("convert/merge_lora"));
        let summary = st.summary.expect("summary");
        assert!(
            summary.tensors.unwrap() > 0 && summary.checks_failed == Some(0),
            "{summary:?}"
        );
        for rel in outputs {
            assert!(
                env.claim("lustre-shared").join(rel).is_file(),
                "{rel} was not written"
            );
        }
    }
    // The merge changed the adapted weights and nothing else.
    let base = tensors_of(&env.claim("models").join("hf/Llama-3.2-3B"));
    let merged = tensors_of(
        &env.claim("lustre-shared")
            .join("output/convert/peft-merged-hf"),
    );
    assert_eq!(
        base.keys().collect::<Vec<_>>(),
        merged.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &base {
        let adapted = name.contains("q_proj") || name.contains("v_proj");
        assert_eq!(
            &merged[name] != bytes,
            adapted,
            "{name}: changed={}",
            &merged[name] != bytes
        );
    }
    op.stop();
}
