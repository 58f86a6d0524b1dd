//! The garbage collector removes a deleted Job's pods.

use anyhow::Result;
use kube::api::DeleteParams;

use crate::util::{MOUNT, World, converter_job, to_job};

#[tokio::test]
async fn background_deletion_of_a_job_removes_its_pods() -> Result<()> {
    let w = World::new("gc", |c| c).await?;
    let source = format!("{MOUNT}/hf-source");
    let job = w
        .create_job(to_job(converter_job("gc", &["inspect", &source], true))?)
        .await?;
    w.job_reaches(&job, "Complete").await?;
    assert_eq!(w.pods_of(&job).await?.len(), 1);

    w.jobs().delete(&job, &DeleteParams::background()).await?;
    w.eventually("the GC deleted the job's pods", || async {
        Ok(w.pods_of(&job).await?.is_empty())
    })
    .await?;
    assert!(w.jobs().get_opt(&job).await?.is_none());
    assert!(w.standin.take_errors().is_empty());
    Ok(())
}
