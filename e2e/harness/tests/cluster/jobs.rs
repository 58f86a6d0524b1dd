//! Jobs run through the node stand-in: the real Job controller completes or
//! fails them from the pod status the stand-in writes.

use anyhow::Result;

use crate::util::{MOUNT, World, converter_job, to_job};

#[tokio::test]
async fn inspect_job_completes() -> Result<()> {
    let w = World::new("inspect-ok", |c| c).await?;
    let source = format!("{MOUNT}/hf-source");
    let job = w
        .create_job(to_job(converter_job(
            "inspect",
            &["inspect", &source],
            true,
        ))?)
        .await?;
    let done = w.job_reaches(&job, "Complete").await?;
    assert_eq!(done.status.and_then(|s| s.succeeded), Some(1));

    let (pod, term) = w.terminated(&job).await?;
    assert_eq!(
        pod.status.and_then(|s| s.phase).as_deref(),
        Some("Succeeded")
    );
    assert_eq!(
        (term.exit_code, term.reason.as_deref()),
        (0, Some("Completed"))
    );
    assert!(term.started_at.is_some() && term.finished_at.is_some());

    let runs = w.standin.runs_of_job(&job);
    let [run] = runs.as_slice() else {
        panic!("expected one run: {runs:#?}")
    };
    assert_eq!(run.exit_code, Some(0));
    assert_eq!(
        run.pod_argv,
        ["/usr/local/bin/ckpt-convert", "inspect", source.as_str()]
    );
    assert!(
        run.argv[0].ends_with("release/ckpt-convert"),
        "{:?}",
        run.argv
    );
    assert!(
        !run.argv[2].starts_with(MOUNT),
        "argument not mapped: {:?}",
        run.argv
    );
    assert!(
        run.output.contains("checkpoint_hf") && run.output.contains("39 tensors"),
        "{}",
        run.output
    );
    assert!(w.standin.take_errors().is_empty());
    Ok(())
}

#[tokio::test]
async fn failing_inspect_fails_the_job_with_the_logs_as_message() -> Result<()> {
    let w = World::new("inspect-bad", |c| c).await?;
    let missing = format!("{MOUNT}/nonexistent-under-the-mount");
    let mut job = converter_job("inspect-missing", &["inspect", &missing], true);
    let spec = &mut job["spec"];
    spec["template"]["spec"]["containers"][0]["terminationMessagePolicy"] =
        "FallbackToLogsOnError".into();
    // The Job controller must see the exit code: exit 2 (bad invocation) fails the
    // Job at once although backoffLimit would allow retries.
    spec["backoffLimit"] = 3.into();
    spec["podFailurePolicy"] = serde_json::json!({"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [2]}}
    ]});
    let job = w.create_job(to_job(job)?).await?;
    let failed = w.job_reaches(&job, "Failed").await?;
    let conditions = failed.status.and_then(|s| s.conditions).unwrap_or_default();
    let cond = conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .expect("checked by job_reaches");
    assert_eq!(
        cond.reason.as_deref(),
        Some("PodFailurePolicy"),
        "{conditions:#?}"
    );

    let (pod, term) = w.terminated(&job).await?;
    assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Failed"));
    assert_eq!((term.exit_code, term.reason.as_deref()), (2, Some("Error")));
    let message = term.message.unwrap_or_default();
    // The converter's own error line, with the path as the pod saw it.
    assert!(
        message.contains(&format!("error: {missing}: no such file or directory")),
        "message: {message:?}"
    );
    assert_eq!(
        w.standin.runs_of_job(&job).len(),
        1,
        "FailJob must stop retries"
    );
    assert!(w.standin.take_errors().is_empty());
    Ok(())
}
