//! The run: which Job answers for the resource now, and where it stands. Only the
//! fields that define the output and `spec.retry` decide whether a Job starts; Job
//! settings, labels and annotations never do.

use super::{JobView, Observed, PodView};
use crate::api::CheckpointConversion;
use crate::conditions::{self, types};
use crate::job::EXIT_PREFLIGHT;
use crate::reason::Reason;
use crate::step::Share;
use ckpt_wire::Summary;

/// Where the run stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Start the Job of the current run.
    Start,
    /// A Job of an earlier run still runs; two must never write one target.
    WaitForPrevious(String),
    /// Finished earlier and stays so: a success is never repeated, and a failure of
    /// this `retry` whose Job is gone (its TTL) is still the answer.
    Keep,
    /// Every part of a split run completed: start the final step's Job.
    Finalize(JobView, i32),
    /// The Job exists and has not finished.
    InProgress(JobView, Progress),
    /// The Job completed.
    Succeeded(JobView, Option<Summary>),
    /// The Job failed.
    Failed(JobView, Failure),
}

/// How an unfinished Job is doing.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// No pod has run yet.
    Created,
    /// A pod runs.
    Running,
    /// A pod failed and no other runs yet (the Job will start one).
    Retrying,
    /// Its pod cannot start, and will not by waiting alone.
    Blocked(Reason, String),
}

/// Why a Job failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The `Failed` reason.
    pub reason: Reason,
    /// The converter's error, or the Job's.
    pub message: String,
    /// The converter's summary, if it left one.
    pub wire: Option<Summary>,
}

/// The converter's summary in a pod's termination message (a log tail is not one).
pub fn wire_of(pod: Option<&PodView>) -> Option<Summary> {
    pod.and_then(|p| p.message.as_deref())
        .and_then(Summary::parse)
}

/// What the converter said went wrong in `pod`: its summary's error, else the
/// termination message (a log tail), with the exit code.
pub fn attempt_error(pod: &PodView) -> String {
    let wire = wire_of(Some(pod));
    let exit = pod.exit_code.or(wire.as_ref().and_then(|w| w.exit_code));
    let error = wire
        .and_then(|w| w.error)
        .or_else(|| pod.message.clone().filter(|m| !m.trim().is_empty()));
    let said = match (error, exit) {
        (Some(e), Some(code)) => format!("converter exited {code}: {}", e.trim()),
        (Some(e), None) => e.trim().to_owned(),
        (None, Some(code)) => format!("converter exited {code}"),
        (None, None) => "the pod failed without a message".into(),
    };
    match pod.index {
        Some(i) => format!("part {i}: {said}"),
        None => said,
    }
}

/// Decides where the run of `cr` stands.
pub fn outcome(cr: &CheckpointConversion, obs: &Observed) -> Outcome {
    let old = cr.status.clone().unwrap_or_default();
    let Some(job) = obs.job.clone() else {
        let retry = cr.spec.retry.unwrap_or(0);
        let finished_this_run = old.retry.unwrap_or(0) == retry
            && old.job_name.is_some()
            && conditions::is_true(&old.conditions, types::FAILED);
        if conditions::is_true(&old.conditions, types::SUCCEEDED) || finished_this_run {
            return Outcome::Keep;
        }
        if let Some(previous) = &obs.previous_job {
            return Outcome::WaitForPrevious(previous.clone());
        }
        return Outcome::Start;
    };
    if job.complete {
        if let Share::Parts { workers } = job.share {
            return Outcome::Finalize(job, workers);
        }
        let wire = wire_of(obs.pod.as_ref());
        return Outcome::Succeeded(job, wire);
    }
    if let Some((job_reason, job_message)) = job.failure.clone() {
        let failure = failure(&job, &job_reason, &job_message, obs);
        return Outcome::Failed(job, failure);
    }
    let progress = match (&obs.pod, &obs.pod_creation_failure) {
        (
            Some(PodView {
                unschedulable: Some(m),
                ..
            }),
            _,
        ) => Progress::Blocked(
            Reason::Unschedulable,
            format!("Job {}: pod cannot be scheduled: {m}", job.name),
        ),
        (
            Some(PodView {
                waiting: Some((r, m)),
                ..
            }),
            _,
        ) => Progress::Blocked(
            Reason::ContainerWaiting(r.clone()),
            format!("Job {}: container waiting ({r}): {m}", job.name),
        ),
        (None, Some(m)) => Progress::Blocked(
            Reason::PodCreationFailed,
            format!("Job {} cannot create its pod: {m}", job.name),
        ),
        _ if job.active > 0 && obs.pod.as_ref().is_some_and(|p| p.exit_code.is_none()) => {
            Progress::Running
        }
        _ if job.failed > 0 => Progress::Retrying,
        _ if job.active > 0 => Progress::Running,
        _ => Progress::Created,
    };
    Outcome::InProgress(job, progress)
}

fn failure(job: &JobView, job_reason: &str, job_message: &str, obs: &Observed) -> Failure {
    // The pod that failed last tells why; the most recent pod may be one the Job
    // deleted when it gave up.
    let pod = obs.failed_pod.as_ref().or(obs.pod.as_ref());
    let wire = wire_of(pod);
    let exit = pod
        .and_then(|p| p.exit_code)
        .or(wire.as_ref().and_then(|w| w.exit_code));
    let converter_error = wire.as_ref().and_then(|w| w.error.clone()).or_else(|| {
        pod.and_then(|p| p.message.clone())
            .filter(|m| !m.trim().is_empty())
    });
    let reason = match (job_reason, exit) {
        ("DeadlineExceeded", _) => Reason::DeadlineExceeded,
        (_, Some(EXIT_PREFLIGHT)) => Reason::InvalidInput,
        _ if converter_error
            .as_deref()
            .is_some_and(|e| e.starts_with("validation failed")) =>
        {
            Reason::ValidationFailed
        }
        // A split run's part that used its own retries (`backoffLimitPerIndex`).
        ("BackoffLimitExceeded" | "MaxFailedIndexesExceeded" | "FailedIndexes", _) => {
            Reason::BackoffLimitExceeded
        }
        _ => Reason::ConverterFailed,
    };
    let message = match (pod, &converter_error) {
        (Some(p), Some(_)) => attempt_error(p),
        _ => format!("Job {} failed ({job_reason}): {job_message}", job.name),
    };
    Failure {
        reason,
        message,
        wire,
    }
}
