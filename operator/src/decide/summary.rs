//! From an admission and an outcome to status: conditions, the phase with its reason
//! and message, and one event per real transition.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::admit::Refusal;
use super::outcome::{self, Failure, Outcome, Progress};
use super::{Decision, JobView, Note, Observed, phase};
use crate::api::{
    CheckpointConversion, CheckpointConversionStatus, ConversionSummary, PartsStatus,
};
use crate::conditions::{self, types};
use crate::job::run_job_name;
use crate::reason::Reason;
use crate::step::{Invocation, Share};
use ckpt_wire::Summary;

use crate::summary::to_status;

/// How often an unfinished run is looked at without a watch event (a safety net:
/// the Job, its pods and its events are watched).
const RUNNING_RECHECK: Duration = Duration::from_secs(60);
/// `status.message` is a glance for `kubectl get`; the conditions keep the whole text.
const SHORT_MESSAGE: usize = 200;

/// Builds the decision step by step: the status being written and the events of
/// the transitions it makes from `old`.
struct Builder<'a> {
    cr: &'a CheckpointConversion,
    old: CheckpointConversionStatus,
    st: CheckpointConversionStatus,
    events: Vec<Note>,
    now: &'a Time,
}

impl<'a> Builder<'a> {
    fn new(cr: &'a CheckpointConversion, now: &'a Time) -> Self {
        let old = cr.status.clone().unwrap_or_default();
        let mut st = old.clone();
        st.observed_generation = cr.metadata.generation;
        Builder {
            cr,
            old,
            st,
            events: Vec::new(),
            now,
        }
    }

    fn set(&mut self, type_: &str, status: bool, reason: &Reason, message: impl Into<String>) {
        conditions::set(
            &mut self.st.conditions,
            type_,
            status,
            reason.as_str(),
            message,
            self.cr.metadata.generation,
            self.now,
        );
    }

    fn set_unknown(&mut self, type_: &str, reason: &Reason, message: impl Into<String>) {
        conditions::set_unknown(
            &mut self.st.conditions,
            type_,
            reason.as_str(),
            message,
            self.cr.metadata.generation,
            self.now,
        );
    }

    fn remove(&mut self, type_: &str) {
        conditions::remove(&mut self.st.conditions, type_);
    }

    /// An event when condition `type_` changed its status or reason: for a True
    /// condition, and for any condition whose reason is a warning.
    fn emit(&mut self, type_: &str, reason: &Reason) {
        let before = conditions::get(&self.old.conditions, type_)
            .map(|c| (c.status.clone(), c.reason.clone()));
        if let Some(c) = conditions::get(&self.st.conditions, type_)
            && before != Some((c.status.clone(), c.reason.clone()))
            && (c.status == "True" || reason.is_warning())
        {
            let message = c.message.clone();
            self.note(reason, message);
        }
    }

    fn note(&mut self, reason: &Reason, message: impl Into<String>) {
        self.events.push(Note {
            warning: reason.is_warning(),
            reason: reason.as_str().to_owned(),
            message: message.into(),
        });
    }

    /// Sets the phase and the reason and message that explain it (those of
    /// condition `type_`).
    fn phase(&mut self, phase: &str, type_: &str) {
        self.st.phase = Some(phase.into());
        let c = conditions::get(&self.st.conditions, type_).cloned();
        self.st.reason = c.as_ref().map(|c| c.reason.clone());
        self.st.message = c.map(|c| short(&c.message));
    }

    fn done(self, create_job: Option<Invocation>, requeue: Option<Duration>) -> Decision {
        Decision {
            status: self.st,
            create_job,
            events: self.events,
            requeue,
            finished: None,
        }
    }
}

/// The first line of `message`, at most [`SHORT_MESSAGE`] bytes.
fn short(message: &str) -> String {
    let line = message.lines().next().unwrap_or("");
    let cut = conditions::shorten(line, SHORT_MESSAGE);
    if cut.len() < line.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

/// The status of a resource that may not run (yet).
pub fn refused(cr: &CheckpointConversion, refusal: Refusal, now: &Time) -> Decision {
    let mut b = Builder::new(cr, now);
    b.set(types::ACCEPTED, false, &refusal.reason, refusal.message);
    b.emit(types::ACCEPTED, &refusal.reason);
    b.phase(refusal.phase, types::ACCEPTED);
    b.done(None, refusal.requeue)
}

/// The status of an admitted resource whose run stands at `outcome`.
pub fn admitted(
    cr: &CheckpointConversion,
    obs: &Observed,
    inv: Invocation,
    outcome: Outcome,
    now: &Time,
) -> Decision {
    let mut b = Builder::new(cr, now);
    b.st.step = Some(inv.step.name().into());
    b.set(
        types::ACCEPTED,
        true,
        &Reason::Accepted,
        format!(
            "{}: {}:{} → {}:{}",
            inv.step,
            cr.spec.source.pvc,
            cr.spec.source.path,
            cr.spec.target.pvc,
            cr.spec.target.path
        ),
    );
    b.emit(types::ACCEPTED, &Reason::Accepted);
    // The parts of a split run as last seen: kept while their Job is gone (its TTL)
    // and the final step's answers.
    match (&obs.parts, &obs.job) {
        (Some(parts), _) => b.st.parts = Some(parts.clone()),
        (None, Some(job)) if job.share == Share::Whole => b.st.parts = None,
        _ => {}
    }
    match outcome {
        Outcome::Start => start(b, inv),
        Outcome::Finalize(job, workers) => finalize(b, obs, inv, job, workers),
        Outcome::WaitForPrevious(previous) => {
            let reason = Reason::PreviousJobRunning;
            b.set(
                types::RUNNING,
                false,
                &reason,
                format!("waiting for Job {previous} of the previous run to finish"),
            );
            b.phase(phase::PENDING, types::RUNNING);
            b.done(None, Some(RUNNING_RECHECK))
        }
        Outcome::Keep => {
            // Nothing new happened; the status keeps what it says (and the
            // generation it now describes).
            b.done(None, None)
        }
        Outcome::InProgress(job, progress) => in_progress(b, obs, &inv, job, progress),
        Outcome::Succeeded(job, wire) => succeeded(b, job, wire),
        Outcome::Failed(job, failure) => failed(b, job, failure),
    }
}

fn start(mut b: Builder<'_>, inv: Invocation) -> Decision {
    let generation = b.cr.metadata.generation.unwrap_or(1);
    let name = run_job_name(
        &b.cr.metadata.name.clone().unwrap_or_default(),
        generation,
        inv.share,
    );
    // A new run starts over.
    b.remove(types::SUCCEEDED);
    b.remove(types::FAILED);
    b.remove(types::VALIDATED);
    b.st.summary = None;
    b.st.start_time = None;
    b.st.completion_time = None;
    b.st.failed_attempts = None;
    b.st.retry = Some(b.cr.spec.retry.unwrap_or(0));
    b.st.job_name = Some(name.clone());
    let (message, parts) = match inv.share {
        Share::Parts { workers } => (
            format!("created Job {name} running {} in {workers} parts", inv.step),
            Some(PartsStatus {
                workers,
                ..PartsStatus::default()
            }),
        ),
        _ => (format!("created Job {name} running {}", inv.step), None),
    };
    b.st.parts = parts;
    let reason = Reason::JobCreated;
    b.set(types::RUNNING, true, &reason, message);
    b.emit(types::RUNNING, &reason);
    b.phase(phase::RUNNING, types::RUNNING);
    b.done(Some(inv), Some(RUNNING_RECHECK))
}

/// Every part of a split run completed: the final step's Job checks them,
/// validates and publishes. It is named after the parts' generation, and the
/// status follows it from here.
fn finalize(
    mut b: Builder<'_>,
    obs: &Observed,
    inv: Invocation,
    parts: JobView,
    workers: i32,
) -> Decision {
    observe_job(&mut b, &parts);
    attempts(&mut b, obs, &parts);
    let share = Share::Finalize {
        workers,
        generation: parts.generation,
    };
    let name = run_job_name(
        &b.cr.metadata.name.clone().unwrap_or_default(),
        parts.generation,
        share,
    );
    b.st.job_name = Some(name.clone());
    b.st.failed_attempts = None;
    if let Some(p) = b.st.parts.as_mut() {
        p.finalize_job = Some(name.clone());
    }
    let reason = Reason::PartsDone;
    b.set(
        types::RUNNING,
        true,
        &reason,
        format!(
            "all {workers} parts of Job {} are done; created Job {name} to check them, validate and publish",
            parts.name
        ),
    );
    b.emit(types::RUNNING, &reason);
    b.phase(phase::RUNNING, types::RUNNING);
    b.done(Some(inv.with_share(share)), Some(RUNNING_RECHECK))
}

/// `start` waiting for its Job creation slot (`--jobs-per-second`), which comes
/// after `wait`: nothing is created yet, the status says so, and the resource is
/// looked at again then.
pub fn queued(cr: &CheckpointConversion, mut d: Decision, wait: Duration, now: &Time) -> Decision {
    let job = d.status.job_name.clone().unwrap_or_default();
    let reason = Reason::JobQueued;
    conditions::set(
        &mut d.status.conditions,
        types::RUNNING,
        false,
        reason.as_str(),
        format!(
            "Job {job} waits for its turn: the operator creates a limited number of Jobs per second"
        ),
        cr.metadata.generation,
        now,
    );
    d.status.phase = Some(phase::PENDING.into());
    d.status.reason = Some(reason.as_str().into());
    d.status.message =
        conditions::get(&d.status.conditions, types::RUNNING).map(|c| short(&c.message));
    d.events.retain(|e| {
        e.reason != Reason::JobCreated.as_str() && e.reason != Reason::PartsDone.as_str()
    });
    d.create_job = None;
    d.requeue = Some(wait);
    d
}

/// Records the Job as the one this status describes.
fn observe_job(b: &mut Builder<'_>, job: &JobView) {
    b.st.job_name = Some(job.name.clone());
    b.st.retry = Some(job.retry);
    // A split run started when its parts did.
    b.st.start_time = match job.share {
        Share::Finalize { .. } => b.st.start_time.take().or(job.start_time.clone()),
        _ => job.start_time.clone().or(b.st.start_time.take()),
    };
}

/// One `AttemptFailed` event per pod that failed, with what it said.
fn attempts(b: &mut Builder<'_>, obs: &Observed, job: &JobView) {
    let before = if b.old.job_name.as_deref() == Some(job.name.as_str()) {
        b.old.failed_attempts.unwrap_or(0)
    } else {
        0
    };
    if job.failed > before {
        let error = obs
            .failed_pod
            .as_ref()
            .map(outcome::attempt_error)
            .unwrap_or_else(|| "the pod failed".into());
        let message = format!("Job {}: attempt {} failed: {error}", job.name, job.failed);
        b.note(&Reason::AttemptFailed, message);
    }
    b.st.failed_attempts = (job.failed > 0).then_some(job.failed);
}

fn in_progress(
    mut b: Builder<'_>,
    obs: &Observed,
    inv: &Invocation,
    job: JobView,
    progress: Progress,
) -> Decision {
    observe_job(&mut b, &job);
    attempts(&mut b, obs, &job);
    let (reason, message, phase) = match progress {
        Progress::Blocked(reason, message) => (reason, message, phase::PENDING),
        Progress::Running => {
            let doing = match (job.share, &b.st.parts) {
                (Share::Parts { workers }, Some(p)) => {
                    format!("running {}: {}/{workers} parts done", inv.step, p.done)
                }
                (Share::Finalize { workers, .. }, _) => format!(
                    "finishing {}: checking its {workers} parts, validating, publishing",
                    inv.step
                ),
                _ => format!("running {}", inv.step),
            };
            let message = match (job.failed, job.share) {
                (0, _) => format!("Job {} is {doing}", job.name),
                (n, Share::Parts { .. }) => {
                    format!("Job {} is {doing} ({n} failed attempts retried)", job.name)
                }
                (n, _) => format!(
                    "Job {} is {doing} (attempt {}; {n} failed)",
                    job.name,
                    n + 1
                ),
            };
            (Reason::JobRunning, message, phase::RUNNING)
        }
        Progress::Retrying => {
            let error = obs
                .failed_pod
                .as_ref()
                .map(outcome::attempt_error)
                .unwrap_or_else(|| "the pod failed".into());
            (
                Reason::Retrying,
                format!(
                    "Job {}: attempt {} failed ({error}); the Job starts another",
                    job.name, job.failed
                ),
                phase::RUNNING,
            )
        }
        Progress::Created => {
            // A Job that ran once never reads as "starting" again: between two
            // attempts it briefly has no pod, which is no news.
            let same_job = b.old.job_name.as_deref() == Some(job.name.as_str());
            let old_running = conditions::get(&b.old.conditions, types::RUNNING)
                .filter(|c| same_job && c.status == "True")
                .filter(|c| ["JobRunning", "Retrying", "PartsDone"].contains(&c.reason.as_str()))
                .cloned();
            match old_running {
                Some(c) => {
                    let reason = match c.reason.as_str() {
                        "Retrying" => Reason::Retrying,
                        "PartsDone" => Reason::PartsDone,
                        _ => Reason::JobRunning,
                    };
                    (reason, c.message, phase::RUNNING)
                }
                None => (
                    Reason::JobCreated,
                    format!("Job {} is starting {}", job.name, inv.step),
                    phase::RUNNING,
                ),
            }
        }
    };
    b.set(types::RUNNING, true, &reason, message);
    // Retrying is told by its AttemptFailed event, and JobCreated and PartsDone by
    // the shell when it creates the Job: none is news here.
    if !matches!(
        reason,
        Reason::Retrying | Reason::JobCreated | Reason::PartsDone
    ) {
        b.emit(types::RUNNING, &reason);
    }
    b.phase(phase, types::RUNNING);
    b.done(None, Some(RUNNING_RECHECK))
}

fn finished(b: &mut Builder<'_>, job: &JobView) -> bool {
    b.st.completion_time = job.completion_time.clone().or_else(|| Some(b.now.clone()));
    let same_job = b.old.job_name.as_deref() == Some(job.name.as_str());
    !(same_job
        && (conditions::is_true(&b.old.conditions, types::SUCCEEDED)
            || conditions::is_true(&b.old.conditions, types::FAILED)))
}

fn target_dir(cr: &CheckpointConversion) -> String {
    cr.spec
        .target
        .path
        .rsplit_once('/')
        .map_or("", |(p, _)| p)
        .to_owned()
}

fn warnings(b: &mut Builder<'_>, newly: bool, summary: &ConversionSummary) {
    if newly {
        for w in &summary.warnings {
            b.note(&Reason::ConverterWarning, w.clone());
        }
    }
}

fn succeeded(mut b: Builder<'_>, job: JobView, wire: Option<Summary>) -> Decision {
    observe_job(&mut b, &job);
    let newly = finished(&mut b, &job);
    let cr = b.cr;
    let s = wire
        .as_ref()
        .map(|w| to_status(w, &target_dir(cr)))
        .unwrap_or_default();
    let output = s.output_path.as_deref().unwrap_or(&cr.spec.target.path);
    let (reason, detail) = match (s.reused, s.tensors, s.bytes, s.seconds) {
        (Some(true), ..) => (
            Reason::OutputReused,
            format!(
                "{}:{output} already held the output of this exact conversion (same step, parameters and sources); nothing was rewritten",
                cr.spec.target.pvc
            ),
        ),
        (_, Some(t), Some(bytes), Some(sec)) => (
            Reason::ConversionSucceeded,
            format!(
                "wrote {t} tensors ({:.2} GB) to {}:{output} in {sec:.1} s",
                bytes as f64 / 1e9,
                cr.spec.target.pvc,
            ),
        ),
        _ => (
            Reason::ConversionSucceeded,
            format!("Job {} completed", job.name),
        ),
    };
    b.set(
        types::RUNNING,
        false,
        &Reason::Completed,
        format!("Job {} completed", job.name),
    );
    b.set(types::SUCCEEDED, true, &reason, detail);
    b.remove(types::FAILED);
    b.emit(types::SUCCEEDED, &reason);
    let validation_off = cr.spec.validation.as_ref().and_then(|v| v.enabled) == Some(false);
    // Validated says what validation found, and exists only when it ran (or was
    // asked for and not reported).
    match (s.checks_passed, s.checks_failed) {
        (Some(p), Some(0)) => b.set(
            types::VALIDATED,
            true,
            &Reason::ValidationPassed,
            format!("{p} checks passed"),
        ),
        (Some(p), Some(f)) => b.set(
            types::VALIDATED,
            false,
            &Reason::ValidationFailed,
            format!("{f} of {} checks failed", p + f),
        ),
        _ if validation_off => b.remove(types::VALIDATED),
        _ => b.set_unknown(
            types::VALIDATED,
            &Reason::NoValidationReport,
            "validation was asked for, but the converter reported none",
        ),
    }
    let validated = conditions::get(&b.st.conditions, types::VALIDATED).cloned();
    if let Some(v) = &validated {
        let r = match v.reason.as_str() {
            "ValidationPassed" => Reason::ValidationPassed,
            "ValidationFailed" => Reason::ValidationFailed,
            _ => Reason::NoValidationReport,
        };
        b.emit(types::VALIDATED, &r);
    }
    warnings(&mut b, newly, &s);
    b.st.summary = Some(s);
    let explains = match validated {
        Some(v) if v.status != "True" => types::VALIDATED,
        _ => types::SUCCEEDED,
    };
    b.phase(phase::SUCCEEDED, explains);
    let mut d = b.done(None, None);
    d.finished = newly.then_some("succeeded");
    d
}

fn failed(mut b: Builder<'_>, job: JobView, failure: Failure) -> Decision {
    observe_job(&mut b, &job);
    let newly = finished(&mut b, &job);
    let job_reason = job
        .failure
        .as_ref()
        .map(|(r, _)| r.clone())
        .unwrap_or_default();
    b.set(
        types::RUNNING,
        false,
        &Reason::JobFailed,
        format!("Job {} failed ({job_reason})", job.name),
    );
    // A split run's parts leave their shared staging for the next run to reuse.
    let message = match job.share {
        Share::Whole => failure.message.clone(),
        _ => format!(
            "{}\nthe parts' staging directory stays beside the target: raising spec.retry runs the conversion again without rewriting the parts that completed; deleting this resource removes it",
            failure.message
        ),
    };
    b.set(types::FAILED, true, &failure.reason, message);
    b.remove(types::SUCCEEDED);
    let s = failure
        .wire
        .as_ref()
        .map(|w| to_status(w, &target_dir(b.cr)));
    // Validated only when validation ran: a failed conversion is not a failed
    // validation, unless the converter says it was.
    match s.as_ref().map(|s| (s.checks_passed, s.checks_failed)) {
        Some((Some(p), Some(f))) if f > 0 => {
            b.set(
                types::VALIDATED,
                false,
                &Reason::ValidationFailed,
                format!("{f} of {} checks failed", p + f),
            );
            b.emit(types::VALIDATED, &Reason::ValidationFailed);
        }
        _ => b.remove(types::VALIDATED),
    }
    b.emit(types::FAILED, &failure.reason);
    if let Some(s) = &s {
        warnings(&mut b, newly, s);
    }
    b.st.failed_attempts = (job.failed > 0).then_some(job.failed);
    b.st.summary = s.filter(|s| s.tensors.is_some() || !s.warnings.is_empty());
    b.phase(phase::FAILED, types::FAILED);
    let mut d = b.done(None, None);
    d.finished = newly.then_some("failed");
    d
}
