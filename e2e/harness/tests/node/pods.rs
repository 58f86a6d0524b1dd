//! Converter pods on the real node: the kubelet mounts the claim, runs the
//! image as its user, and writes the termination message.

use std::os::unix::fs::MetadataExt;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::util::{World, converter_job, snapshot};
use ckpt_testcluster::IMAGE_USER;

#[tokio::test]
async fn the_kubelet_reports_the_converters_summary_as_termination_message() -> Result<()> {
    let w = World::new("summary").await?;
    let image = &w.images.converter.reference;
    let name = w
        .create_job(converter_job(
            "convert",
            image,
            &[
                "run",
                "convert/hf_to_megatron",
                "hf_model_id=/models/source/hf",
                "megatron_path=/models/target/megatron",
            ],
            false,
            serde_json::json!({}),
        ))
        .await?;
    w.job_reaches(&name, "Complete").await?;
    let (pod, term) = w.terminated(&name).await?;
    assert_eq!(term.exit_code, 0);
    assert_eq!(term.reason.as_deref(), Some("Completed"));

    // The kubelet, not a stand-in, ran it: a containerd container of our image.
    let status = pod.status.as_ref().context("status")?;
    let container = &status.container_statuses.as_ref().context("statuses")?[0];
    assert!(
        container
            .container_id
            .as_deref()
            .is_some_and(|id| id.starts_with("containerd://")),
        "{container:#?}"
    );
    assert_eq!(&container.image, image);
    assert!(
        w.images.converter.is_image_id(&container.image_id),
        "{container:#?}"
    );
    assert_eq!(
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(w.node.name())
    );

    // The message is the converter's JSON summary, read by the kubelet from
    // /dev/termination-log.
    let message = term.message.context("no termination message")?;
    let summary: Value = serde_json::from_str(&message)
        .with_context(|| format!("not the converter's JSON summary: {message}"))?;
    assert_eq!(summary["step"], "convert/hf_to_megatron", "{summary:#}");
    assert_eq!(summary["status"], "succeeded", "{summary:#}");
    // Container paths: the converter saw the claim where the kubelet mounted it.
    assert!(
        summary["output"]
            .as_str()
            .is_some_and(|o| o.starts_with("/models/target/megatron")),
        "{summary:#}"
    );
    assert_eq!(summary["checks_failed"], 0, "{summary:#}");

    // Written as the image's user, where the claim's directory is.
    let written = w.path("target/megatron/latest_checkpointed_iteration.txt");
    assert!(written.is_file(), "{} missing", written.display());
    assert_eq!(std::fs::metadata(&written)?.uid(), IMAGE_USER);
    Ok(())
}

/// The source volume mounted read-only by the kubelet cannot be written, even
/// though its files belong to the converter's user: the conversion's target is
/// put beside the input on that volume (not inside the input, which the
/// converter refuses by itself), and the kernel refuses the write. The same
/// Job with a writable mount succeeds, so nothing else stops it.
#[tokio::test]
async fn a_read_only_source_volume_cannot_be_written() -> Result<()> {
    let w = World::new("readonly").await?;
    let image = &w.images.converter.reference;
    let before = snapshot(&w.path("source"))?;
    let args = [
        "run",
        "convert/hf_to_megatron",
        "hf_model_id=/models/source/hf",
        "megatron_path=/models/source/megatron",
    ];
    let name = w
        .create_job(converter_job(
            "ro",
            image,
            &args,
            true,
            serde_json::json!({}),
        ))
        .await?;
    w.job_reaches(&name, "Failed").await?;
    let (_, term) = w.terminated(&name).await?;
    assert_ne!(term.exit_code, 0);
    let message = term.message.unwrap_or_default();
    assert!(
        message.to_lowercase().contains("read-only file system"),
        "expected EROFS in the termination message, found: {message}"
    );
    assert_eq!(snapshot(&w.path("source"))?, before, "the source changed");

    let name = w
        .create_job(converter_job(
            "rw",
            image,
            &args,
            false,
            serde_json::json!({}),
        ))
        .await?;
    w.job_reaches(&name, "Complete").await?;
    assert!(
        w.path("source/megatron/latest_checkpointed_iteration.txt")
            .is_file()
    );
    Ok(())
}
