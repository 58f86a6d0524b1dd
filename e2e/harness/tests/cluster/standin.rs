//! The node stand-in fails loudly on what it cannot emulate, and kills
//! processes of deleted pods and of pods past `activeDeadlineSeconds`.

use anyhow::Result;
use kube::api::DeleteParams;

use ckpt_testcluster::{REASON_CANNOT_EMULATE, REASON_PVC_NOT_FOUND};

use crate::util::{MOUNT, World, converter_job, to_job};

#[tokio::test]
async fn unsupported_pods_fail_loudly() -> Result<()> {
    let w = World::new("refuse", |c| c).await?;
    let source = format!("{MOUNT}/hf-source");

    let mut other_image = converter_job("busybox", &["inspect", &source], true);
    other_image["spec"]["template"]["spec"]["containers"][0]["image"] =
        "docker.io/library/busybox:1.37".into();
    let mut config_map = converter_job("configmap", &["inspect", &source], true);
    config_map["spec"]["template"]["spec"]["volumes"][0] =
        serde_json::json!({"name": "models", "configMap": {"name": "settings"}});
    let mut unknown_claim = converter_job("unknown-claim", &["inspect", &source], true);
    unknown_claim["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] =
        "nope".into();

    let cases = [
        (
            other_image,
            REASON_CANNOT_EMULATE,
            "\"docker.io/library/busybox:1.37\"",
        ),
        (config_map, REASON_CANNOT_EMULATE, "configMap"),
        (unknown_claim, REASON_PVC_NOT_FOUND, "\"nope\""),
    ];
    for (job, reason, needle) in cases {
        let job = w.create_job(to_job(job)?).await?;
        w.job_reaches(&job, "Failed").await?;
        let pod = w.pods_of(&job).await?.pop().expect("the job has a pod");
        let status = pod.status.unwrap_or_default();
        assert_eq!(status.phase.as_deref(), Some("Failed"));
        assert_eq!(status.reason.as_deref(), Some(reason), "{status:#?}");
        assert!(
            status.message.as_deref().unwrap_or("").contains(needle),
            "{status:#?}"
        );
        let errors = w.standin.take_errors();
        assert!(
            matches!(errors.as_slice(), [e] if e.reason == reason && e.message.contains(needle)),
            "{errors:#?}"
        );
        assert!(w.standin.runs_of_job(&job).is_empty(), "nothing may run");
    }
    Ok(())
}

/// A long-running "converter": the stand-in maps the command to /bin/sleep.
fn sleeper(name: &str) -> serde_json::Value {
    let mut job = converter_job(name, &["300"], true);
    job["spec"]["template"]["spec"]["containers"][0]["command"] = serde_json::json!(["sleep"]);
    job
}

#[tokio::test]
async fn deleted_and_overdue_pods_are_killed() -> Result<()> {
    let w = World::new("kill", |c| c.binary("sleep", "/bin/sleep")).await?;

    // Deleting the running pod kills its process.
    let job = w.create_job(to_job(sleeper("deleted"))?).await?;
    w.eventually("the sleeper runs", || async {
        Ok(w.standin
            .runs_of_job(&job)
            .first()
            .is_some_and(|r| r.exit_code.is_none()))
    })
    .await?;
    let pod = w.pods_of(&job).await?.pop().expect("the job has a pod");
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    w.pods().delete(&pod_name, &DeleteParams::default()).await?;
    w.eventually("the deleted pod's process ended", || async {
        Ok(w.standin
            .runs()
            .iter()
            .any(|r| r.pod == pod_name && r.exit_code.is_some()))
    })
    .await?;
    let run = w
        .standin
        .runs()
        .into_iter()
        .find(|r| r.pod == pod_name)
        .expect("found above");
    assert_eq!(
        (run.end.as_deref(), run.exit_code),
        (Some("Deleted"), Some(128 + 15))
    );
    w.jobs().delete(&job, &DeleteParams::background()).await?;

    // activeDeadlineSeconds fails the pod with reason DeadlineExceeded.
    let mut overdue = sleeper("overdue");
    overdue["spec"]["template"]["spec"]["activeDeadlineSeconds"] = 1.into();
    let job = w.create_job(to_job(overdue)?).await?;
    w.job_reaches(&job, "Failed").await?;
    let pod = w.pods_of(&job).await?.pop().expect("the job has a pod");
    let status = pod.status.unwrap_or_default();
    assert_eq!(
        status.reason.as_deref(),
        Some("DeadlineExceeded"),
        "{status:#?}"
    );
    let runs = w.standin.runs_of_job(&job);
    assert_eq!(runs[0].end.as_deref(), Some("DeadlineExceeded"));
    assert!(w.standin.take_errors().is_empty());
    Ok(())
}

#[tokio::test]
async fn dropping_the_stand_in_kills_its_processes() -> Result<()> {
    let w = World::new("drop", |c| c.binary("sleep", "/bin/sleep")).await?;
    let job = w.create_job(to_job(sleeper("orphan"))?).await?;
    w.eventually("the sleeper runs", || async {
        Ok(w.standin
            .runs_of_job(&job)
            .first()
            .is_some_and(|r| r.exit_code.is_none()))
    })
    .await?;
    let pid = w.standin.runs_of_job(&job)[0].pid;
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    let World { standin, .. } = w;
    drop(standin);
    let proc_dir = format!("/proc/{pid}");
    for _ in 0..100 {
        if !std::path::Path::new(&proc_dir).exists() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("process {pid} survived its stand-in");
}
