//! `activeDeadlineSeconds` on the real node: a conversion still running at its
//! deadline is stopped, the Job ends Failed with reason DeadlineExceeded, and
//! the converter removes what it had staged (through the operator, the
//! CheckpointConversion too: `operator.rs`).
//!
//! "Still running" without racing the clock: the pod runs the test image
//! (`images.converter_failpoints`), whose converter stages its first piece and
//! then waits. Once it is waiting the test lowers the Job's deadline (a mutable
//! field) below the time already spent, so the deadline passes mid-write
//! whatever the node's speed.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::batch::v1::Job;

use crate::util::{Source, World, converter_job};

/// The Job `name` of the test image converting `source/hf` into
/// `target/megatron`, with the emptyDir `tmp` its pause file goes into.
fn paused_conversion_job(w: &World, name: &str) -> serde_json::Value {
    let mut job = converter_job(
        name,
        &w.images.converter_failpoints.reference,
        &[
            "run",
            "convert/hf_to_megatron",
            "hf_model_id=/models/source/hf",
            "megatron_path=/models/target/megatron",
        ],
        false,
        serde_json::json!({}),
    );
    let pod = &mut job["spec"]["template"]["spec"];
    pod["volumes"]
        .as_array_mut()
        .expect("volumes")
        .push(serde_json::json!({"name": "tmp", "emptyDir": {}}));
    pod["containers"][0]["volumeMounts"]
        .as_array_mut()
        .expect("volumeMounts")
        .push(serde_json::json!({"name": "tmp", "mountPath": "/tmp"}));
    job
}

#[tokio::test]
async fn active_deadline_stops_a_conversion_mid_write_and_its_staging_is_removed() -> Result<()> {
    let w = World::with_source("deadline-job", Source::Medium).await?;
    let name = w.create_job(paused_conversion_job(&w, "slow")).await?;
    w.paused(&name).await?;
    let staged = w.staging_under_target();
    ensure!(
        !staged.is_empty(),
        "paused, yet nothing is staged under target/"
    );
    // Already past: the Job controller fails the Job at once and deletes its pod.
    w.deadline_already_past(&name).await?;
    let job: Job = w.job_reaches(&name, "Failed").await?;
    let failed = job
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Failed")
        .context("Failed condition")?;
    assert_eq!(
        failed.reason.as_deref(),
        Some("DeadlineExceeded"),
        "{failed:#?}"
    );
    // The Job controller deletes the pod; the kubelet stops the container with
    // SIGTERM, and the converter removes its staging before it exits.
    w.eventually("the slow pod is gone", || async {
        Ok(w.pods_of(&name).await?.is_empty())
    })
    .await?;
    assert_eq!(
        w.staging_under_target(),
        Vec::<std::path::PathBuf>::new(),
        "staged before the deadline: {staged:?}"
    );
    assert!(
        !w.path("target/megatron").exists(),
        "the run directory the run created is left"
    );
    Ok(())
}
