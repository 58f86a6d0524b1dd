//! A `readOnly` volumeMount is really read-only: the converter cannot write
//! into it, and nothing appears in the local directory behind the claim.

use anyhow::Result;

use crate::util::{MOUNT, World, converter_job, to_job, tree};

#[tokio::test]
async fn conversion_into_a_read_only_mount_fails_and_writes_nothing() -> Result<()> {
    let w = World::new("readonly", |c| c).await?;
    let before = tree(w.fixture.path());
    let source = format!("hf_model_id={MOUNT}/hf-source");
    let target = format!("megatron_path={MOUNT}/out");
    let job = w
        .create_job(to_job(converter_job(
            "convert-ro",
            &["run", "convert/hf_to_megatron", &source, &target],
            true,
        ))?)
        .await?;
    w.job_reaches(&job, "Failed").await?;

    let (_, term) = w.terminated(&job).await?;
    assert!(
        [1, 2].contains(&term.exit_code),
        "exit code {}",
        term.exit_code
    );
    let message = term.message.unwrap_or_default();
    // The converter's JSON summary from $CKPT_TERMINATION_LOG, paths as in the pod.
    let summary: serde_json::Value = serde_json::from_str(&message).unwrap_or_else(|e| {
        panic!("termination message is not the JSON summary ({e}): {message:?}")
    });
    assert_eq!(summary["status"], "failed", "{summary}");
    let error = summary["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("{MOUNT}/out"))
            && error.to_lowercase().contains("read-only file system"),
        "{summary}"
    );
    assert_eq!(
        tree(w.fixture.path()),
        before,
        "the read-only volume changed"
    );
    assert!(w.standin.take_errors().is_empty());
    Ok(())
}

#[tokio::test]
async fn the_same_conversion_into_a_writable_mount_succeeds() -> Result<()> {
    let w = World::new("writable", |c| c).await?;
    let source = format!("hf_model_id={MOUNT}/hf-source");
    let target = format!("megatron_path={MOUNT}/out");
    let job = w
        .create_job(to_job(converter_job(
            "convert-rw",
            &["run", "convert/hf_to_megatron", &source, &target],
            false,
        ))?)
        .await?;
    w.job_reaches(&job, "Complete").await?;
    let (_, term) = w.terminated(&job).await?;
    let summary: serde_json::Value = serde_json::from_str(term.message.as_deref().unwrap_or(""))?;
    assert_eq!(summary["status"], "succeeded", "{summary}");
    let output = summary["output"].as_str().unwrap_or_default();
    assert!(output.starts_with(&format!("{MOUNT}/out")), "{summary}");
    let local = w
        .fixture
        .path()
        .join(output.trim_start_matches(&format!("{MOUNT}/")));
    assert!(
        local.join("ckpt-manifest.json").is_file(),
        "{} has no manifest",
        local.display()
    );
    assert!(w.standin.take_errors().is_empty());
    Ok(())
}
