//! `activeDeadlineSeconds` on the real node: a conversion that cannot finish
//! in time is killed, and the Job ends Failed with reason DeadlineExceeded
//! (through the operator, the CheckpointConversion too: `operator.rs`).
//!
//! "Cannot finish in time" without a sleep: the conversion's CPU time is
//! measured first on the host, then the pod gets a CPU limit of 10m (the
//! kernel's CFS quota: 1 ms per 100 ms) and a deadline at most a third of the
//! time that much CPU takes at that rate. The precondition is asserted, so a
//! fixture too small for it fails loudly instead of racing.

use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::util::{Source, World, converter, converter_job};

/// CPU seconds (user + system) of `ckpt-convert ARGS…` on the host, from
/// `wait4` on that child alone: other tests' children do not count.
fn cpu_seconds(args: &[String]) -> Result<f64> {
    let child = Command::new(converter())
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: wait4 writes into the two values we own; the child is ours and
    // not waited for elsewhere (std's Child does not reap on drop).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    ensure!(waited == pid, "wait4: {}", std::io::Error::last_os_error());
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the measuring run failed (wait status {status}); its stderr is above"
    );
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(secs(usage.ru_utime) + secs(usage.ru_stime))
}

/// The deadline for a conversion of the world's demo source under a 10m CPU
/// limit, after checking that it cannot finish within it.
pub fn deadline_for(w: &World) -> Result<i64> {
    let scratch = tempfile::Builder::new().prefix("ckpt-measure-").tempdir()?;
    let cpu = cpu_seconds(&[
        "run".into(),
        "convert/hf_to_megatron".into(),
        format!("hf_model_id={}", w.path("source/hf").display()),
        format!("megatron_path={}", scratch.path().join("out").display()),
    ])?;
    // At 1% of a CPU the conversion needs cpu * 100 seconds of wall time.
    let throttled = cpu * 100.0;
    let deadline = (throttled / 3.0).floor().min(20.0) as i64;
    ensure!(
        deadline >= 2,
        "the conversion needs only {cpu:.3} s of CPU ({throttled:.1} s at 10m): too little to outlast any deadline safely"
    );
    eprintln!("conversion CPU {cpu:.3} s, {throttled:.0} s at 10m; deadline {deadline} s");
    Ok(deadline)
}

#[tokio::test]
async fn active_deadline_kills_a_slow_conversion_pod() -> Result<()> {
    let w = World::with_source("deadline-job", Source::Medium).await?;
    let deadline = deadline_for(&w)?;
    let mut job = converter_job(
        "slow",
        &w.images.converter.reference,
        &[
            "run",
            "convert/hf_to_megatron",
            "hf_model_id=/models/source/hf",
            "megatron_path=/models/target/megatron",
        ],
        false,
        serde_json::json!({"activeDeadlineSeconds": deadline}),
    );
    job["spec"]["template"]["spec"]["containers"][0]["resources"] =
        serde_json::json!({"limits": {"cpu": "10m"}});
    let name = w.create_job(job).await?;
    let job = w.job_reaches(&name, "Failed").await?;
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
    // The Job controller deletes the pod; the kubelet kills the container.
    w.eventually("the slow pod is gone", || async {
        Ok(w.pods_of(&name).await?.is_empty())
    })
    .await?;
    // Killed before publishing: no target that looks complete.
    assert!(
        !w.path("target/megatron/latest_checkpointed_iteration.txt")
            .exists()
    );
    Ok(())
}
