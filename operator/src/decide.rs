//! What to do about one resource, decided from what was observed: a pure function
//! from (resource, observations, now) to (status, Job to create, events, requeue).
//! The reconcile shell only gathers observations and carries the decision out, so
//! every branch is a table test here.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{CheckpointConversion, CheckpointConversionStatus};
use crate::conditions::{self, types};
use crate::job::{EXIT_PREFLIGHT, job_name};
use crate::step::{self, Invocation};
use crate::summary;

/// What was observed of the resource's Job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobView {
    /// The Job's name.
    pub name: String,
    /// Pods running.
    pub active: i32,
    /// Pods that succeeded.
    pub succeeded: i32,
    /// Pods that failed.
    pub failed: i32,
    /// The Job's `Complete` condition is true.
    pub complete: bool,
    /// The Job's `Failed` condition, when true: (reason, message).
    pub failure: Option<(String, String)>,
    /// When it started.
    pub start_time: Option<Time>,
    /// When it finished.
    pub completion_time: Option<Time>,
}

/// What was observed of the Job's most recent pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodView {
    /// Exit code of the converter container, once it terminated.
    pub exit_code: Option<i32>,
    /// Its termination message (the converter's summary, or a log tail).
    pub message: Option<String>,
    /// Why the container is waiting (`ImagePullBackOff`, `ContainerCreating`).
    pub waiting: Option<(String, String)>,
    /// Why the pod is not scheduled (`Unschedulable`), with the scheduler's message.
    pub unschedulable: Option<String>,
}

/// Everything the decision depends on besides the resource.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// The Job of the current generation.
    pub job: Option<JobView>,
    /// Its most recent pod.
    pub pod: Option<PodView>,
    /// An earlier resource writing the same target (its name).
    pub conflict: Option<String>,
    /// Claims the resource names that do not exist.
    pub missing_pvcs: Vec<String>,
}

/// An event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Warning rather than Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Human message.
    pub message: String,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The status to write.
    pub status: CheckpointConversionStatus,
    /// Create the Job for this invocation.
    pub create_job: Option<Invocation>,
    /// Events, one per transition.
    pub events: Vec<Note>,
    /// When to look again without a watch event.
    pub requeue: Option<Duration>,
    /// `succeeded` or `failed` when the conversion finished in this decision (for metrics).
    pub finished: Option<&'static str>,
}

/// Phases shown by `kubectl get` (a summary of the conditions, not a state machine).
pub mod phase {
    /// Waiting for a claim or to start.
    pub const PENDING: &str = "Pending";
    /// The Job runs.
    pub const RUNNING: &str = "Running";
    /// Converted and validated.
    pub const SUCCEEDED: &str = "Succeeded";
    /// The conversion failed.
    pub const FAILED: &str = "Failed";
    /// The spec was refused (invalid or conflicting).
    pub const REJECTED: &str = "Rejected";
}

fn note(warning: bool, reason: &str, message: impl Into<String>) -> Note {
    Note {
        warning,
        reason: reason.into(),
        message: message.into(),
    }
}

/// Decides for `cr` given `obs` at time `now`.
pub fn decide(cr: &CheckpointConversion, obs: &Observed, now: &Time) -> Decision {
    let generation = cr.metadata.generation;
    let name = cr.metadata.name.clone().unwrap_or_default();
    let old = cr.status.clone().unwrap_or_default();
    let mut st = old.clone();
    st.observed_generation = generation;
    let mut events = Vec::new();
    let before =
        |t: &str| conditions::get(&old.conditions, t).map(|c| (c.status.clone(), c.reason.clone()));
    let mut emit = |st: &CheckpointConversionStatus, t: &str, warning: bool| {
        if let Some(c) = conditions::get(&st.conditions, t)
            && before(t) != Some((c.status.clone(), c.reason.clone()))
            && (c.status == "True" || warning)
        {
            events.push(note(warning, &c.reason, c.message.clone()));
        }
    };
    let set = |st: &mut CheckpointConversionStatus, t: &str, v: bool, reason: &str, msg: String| {
        conditions::set(&mut st.conditions, t, v, reason, msg, generation, now)
    };

    // Preflight without data: the step, conflicts, claims.
    let inv = match step::invocation(&cr.spec) {
        Ok(inv) => inv,
        Err(e) => {
            set(&mut st, types::ACCEPTED, false, "InvalidSpec", e.0);
            st.phase = Some(phase::REJECTED.into());
            emit(&st, types::ACCEPTED, true);
            return Decision {
                status: st,
                create_job: None,
                events,
                requeue: None,
                finished: None,
            };
        }
    };
    st.step = Some(inv.step.into());
    let current_job = job_name(&name, generation.unwrap_or(1));
    if let Some(other) = &obs.conflict
        && obs.job.is_none()
    {
        set(
            &mut st,
            types::ACCEPTED,
            false,
            "TargetConflict",
            format!(
                "target {}:{} is also written by CheckpointConversion {other}, which was created first; no Job is started",
                cr.spec.target.pvc, cr.spec.target.path
            ),
        );
        st.phase = Some(phase::REJECTED.into());
        emit(&st, types::ACCEPTED, true);
        return Decision {
            status: st,
            create_job: None,
            events,
            requeue: None,
            finished: None,
        };
    }
    if !obs.missing_pvcs.is_empty() && obs.job.is_none() {
        set(
            &mut st,
            types::ACCEPTED,
            false,
            "PVCNotFound",
            format!(
                "PersistentVolumeClaim {} not found in the namespace; waiting for it",
                obs.missing_pvcs.join(", ")
            ),
        );
        st.phase = Some(phase::PENDING.into());
        emit(&st, types::ACCEPTED, true);
        return Decision {
            status: st,
            create_job: None,
            events,
            requeue: Some(Duration::from_secs(30)),
            finished: None,
        };
    }
    set(
        &mut st,
        types::ACCEPTED,
        true,
        "Accepted",
        format!(
            "{}: {}:{} → {}:{}",
            inv.step,
            cr.spec.source.pvc,
            cr.spec.source.path,
            cr.spec.target.pvc,
            cr.spec.target.path
        ),
    );
    emit(&st, types::ACCEPTED, false);

    let finished_here = |st: &CheckpointConversionStatus| {
        st.job_name.as_deref() == Some(current_job.as_str())
            && (conditions::is_true(&st.conditions, types::SUCCEEDED)
                || conditions::is_true(&st.conditions, types::FAILED))
    };
    let Some(job) = &obs.job else {
        if finished_here(&old) {
            // Finished, and the Job is gone (TTL): the status keeps the result.
            return Decision {
                status: st,
                create_job: None,
                events,
                requeue: None,
                finished: None,
            };
        }
        // A new generation starts over.
        conditions::remove(&mut st.conditions, types::SUCCEEDED);
        conditions::remove(&mut st.conditions, types::FAILED);
        conditions::remove(&mut st.conditions, types::VALIDATED);
        st.summary = None;
        st.start_time = None;
        st.completion_time = None;
        st.job_name = Some(current_job.clone());
        set(
            &mut st,
            types::RUNNING,
            true,
            "JobCreated",
            format!("created Job {current_job} running {}", inv.step),
        );
        st.phase = Some(phase::RUNNING.into());
        emit(&st, types::RUNNING, false);
        return Decision {
            status: st,
            create_job: Some(inv),
            events,
            requeue: Some(Duration::from_secs(60)),
            finished: None,
        };
    };
    st.job_name = Some(job.name.clone());
    st.start_time = job.start_time.clone().or(st.start_time);
    let target_dir = cr
        .spec
        .target
        .path
        .rsplit_once('/')
        .map_or("", |(p, _)| p)
        .to_owned();
    let wire = obs
        .pod
        .as_ref()
        .and_then(|p| p.message.as_deref())
        .and_then(summary::parse);

    if job.complete {
        st.completion_time = job.completion_time.clone().or_else(|| Some(now.clone()));
        let s = wire
            .as_ref()
            .map(|w| w.to_status(&target_dir))
            .unwrap_or_default();
        let detail = match (s.tensors, s.bytes, s.seconds) {
            (Some(t), Some(b), Some(sec)) => format!(
                "wrote {t} tensors ({:.2} GB) to {}:{} in {sec:.1} s",
                b as f64 / 1e9,
                cr.spec.target.pvc,
                s.output_path.as_deref().unwrap_or(&cr.spec.target.path)
            ),
            _ => format!("Job {} completed", job.name),
        };
        set(
            &mut st,
            types::RUNNING,
            false,
            "Completed",
            format!("Job {} completed", job.name),
        );
        set(
            &mut st,
            types::SUCCEEDED,
            true,
            "ConversionSucceeded",
            detail,
        );
        conditions::remove(&mut st.conditions, types::FAILED);
        emit(&st, types::SUCCEEDED, false);
        let validation_off = cr.spec.validation.as_ref().and_then(|v| v.enabled) == Some(false);
        match (s.checks_passed, s.checks_failed) {
            (Some(p), Some(0)) => set(
                &mut st,
                types::VALIDATED,
                true,
                "ValidationPassed",
                format!("{p} checks passed"),
            ),
            (Some(p), Some(f)) => set(
                &mut st,
                types::VALIDATED,
                false,
                "ValidationFailed",
                format!("{f} of {} checks failed", p + f),
            ),
            _ if validation_off => set(
                &mut st,
                types::VALIDATED,
                false,
                "ValidationDisabled",
                "validation.enabled is false".into(),
            ),
            _ => set(
                &mut st,
                types::VALIDATED,
                false,
                "NoValidationReport",
                "the converter reported no validation".into(),
            ),
        }
        emit(&st, types::VALIDATED, false);
        st.summary = Some(s);
        st.phase = Some(phase::SUCCEEDED.into());
        let newly = !finished_here(&old);
        return Decision {
            status: st,
            create_job: None,
            events,
            requeue: None,
            finished: newly.then_some("succeeded"),
        };
    }
    if let Some((job_reason, job_message)) = &job.failure {
        st.completion_time = job.completion_time.clone().or_else(|| Some(now.clone()));
        let exit = obs
            .pod
            .as_ref()
            .and_then(|p| p.exit_code)
            .or(wire.as_ref().and_then(|w| w.exit_code));
        let converter_error = wire.as_ref().and_then(|w| w.error.clone()).or_else(|| {
            obs.pod
                .as_ref()
                .and_then(|p| p.message.clone())
                .filter(|m| !m.trim().is_empty())
        });
        let reason = match (job_reason.as_str(), exit) {
            ("DeadlineExceeded", _) => "DeadlineExceeded",
            (_, Some(EXIT_PREFLIGHT)) => "InvalidInput",
            (_, _)
                if converter_error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("validation failed")) =>
            {
                "ValidationFailed"
            }
            ("BackoffLimitExceeded", _) => "BackoffLimitExceeded",
            _ => "ConverterFailed",
        };
        let message = match (&converter_error, exit) {
            (Some(e), Some(code)) => format!("converter exited {code}: {}", e.trim()),
            (Some(e), None) => e.trim().to_owned(),
            (None, _) => format!("Job {} failed ({job_reason}): {job_message}", job.name),
        };
        set(
            &mut st,
            types::RUNNING,
            false,
            "Failed",
            format!("Job {} failed ({job_reason})", job.name),
        );
        set(&mut st, types::FAILED, true, reason, message.clone());
        conditions::remove(&mut st.conditions, types::SUCCEEDED);
        set(
            &mut st,
            types::VALIDATED,
            false,
            "ConversionFailed",
            "no output was published".into(),
        );
        emit(&st, types::FAILED, true);
        st.summary = wire
            .as_ref()
            .map(|w| w.to_status(&target_dir))
            .filter(|s| s.tensors.is_some());
        st.phase = Some(phase::FAILED.into());
        let newly = !finished_here(&old);
        return Decision {
            status: st,
            create_job: None,
            events,
            requeue: None,
            finished: newly.then_some("failed"),
        };
    }
    // Still running (or waiting to run).
    let (reason, message) = match obs.pod.as_ref() {
        Some(PodView {
            unschedulable: Some(m),
            ..
        }) => (
            "Unschedulable",
            format!("Job {}: pod cannot be scheduled: {m}", job.name),
        ),
        Some(PodView {
            waiting: Some((r, m)),
            ..
        }) => (
            r.as_str(),
            format!("Job {}: container waiting ({r}): {m}", job.name),
        ),
        _ if job.active > 0 => (
            "JobRunning",
            format!("Job {} is running {}", job.name, inv.step),
        ),
        _ => (
            "JobCreated",
            format!("Job {} is starting {}", job.name, inv.step),
        ),
    };
    let warning = matches!(
        reason,
        "Unschedulable" | "ImagePullBackOff" | "ErrImagePull" | "CreateContainerConfigError"
    );
    set(&mut st, types::RUNNING, true, reason, message);
    emit(&st, types::RUNNING, warning);
    st.phase = Some(phase::RUNNING.into());
    Decision {
        status: st,
        create_job: None,
        events,
        requeue: Some(Duration::from_secs(60)),
        finished: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Artifact, ArtifactKind, BaseModel, CheckpointConversionSpec};

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn cr() -> CheckpointConversion {
        let mut c = CheckpointConversion::new(
            "sft-to-hf",
            CheckpointConversionSpec {
                source: Artifact {
                    kind: ArtifactKind::CheckpointMegatron,
                    pvc: "lustre-shared".into(),
                    path: "output/sft/iter_0000100".into(),
                },
                target: Artifact {
                    kind: ArtifactKind::CheckpointHf,
                    pvc: "lustre-shared".into(),
                    path: "output/convert/sft-hf".into(),
                },
                base_model: Some(BaseModel {
                    pvc: "models".into(),
                    path: "hf/base".into(),
                    model_id: None,
                }),
                lora: None,
                parallelism: None,
                dtype: None,
                validation: None,
                job: None,
            },
        );
        c.metadata.namespace = Some("training".into());
        c.metadata.generation = Some(1);
        c
    }

    fn cond<'a>(d: &'a Decision, t: &str) -> (&'a str, &'a str) {
        let c =
            conditions::get(&d.status.conditions, t).unwrap_or_else(|| panic!("no {t} condition"));
        (c.status.as_str(), c.reason.as_str())
    }

    fn with_status(mut c: CheckpointConversion, d: &Decision) -> CheckpointConversion {
        c.status = Some(d.status.clone());
        c
    }

    #[test]
    fn a_new_resource_gets_a_job() {
        let d = decide(&cr(), &Observed::default(), &at(1));
        assert!(d.create_job.is_some());
        assert_eq!(cond(&d, types::ACCEPTED), ("True", "Accepted"));
        assert_eq!(cond(&d, types::RUNNING), ("True", "JobCreated"));
        assert_eq!(d.status.job_name.as_deref(), Some("sft-to-hf-g1"));
        assert_eq!(d.status.observed_generation, Some(1));
        assert_eq!(d.status.phase.as_deref(), Some("Running"));
        assert_eq!(
            d.events
                .iter()
                .map(|e| e.reason.as_str())
                .collect::<Vec<_>>(),
            vec!["Accepted", "JobCreated"]
        );
        // Deciding again on the same observations changes nothing and emits nothing.
        let again = decide(
            &with_status(cr(), &d),
            &Observed {
                job: Some(JobView {
                    name: "sft-to-hf-g1".into(),
                    ..JobView::default()
                }),
                ..Observed::default()
            },
            &at(2),
        );
        assert!(again.create_job.is_none());
        assert!(again.events.is_empty(), "{:?}", again.events);
    }

    #[test]
    fn conflicts_and_missing_claims_start_nothing() {
        let d = decide(
            &cr(),
            &Observed {
                conflict: Some("other".into()),
                ..Observed::default()
            },
            &at(1),
        );
        assert!(d.create_job.is_none());
        assert_eq!(cond(&d, types::ACCEPTED), ("False", "TargetConflict"));
        assert_eq!(d.status.phase.as_deref(), Some("Rejected"));
        assert!(d.events[0].warning);
        let d = decide(
            &cr(),
            &Observed {
                missing_pvcs: vec!["models".into()],
                ..Observed::default()
            },
            &at(1),
        );
        assert!(d.create_job.is_none());
        assert_eq!(cond(&d, types::ACCEPTED), ("False", "PVCNotFound"));
        assert!(d.requeue.is_some());
    }

    #[test]
    fn an_invalid_spec_is_rejected() {
        let mut c = cr();
        c.spec.target.kind = ArtifactKind::CheckpointLora;
        let d = decide(&c, &Observed::default(), &at(1));
        assert!(d.create_job.is_none());
        assert_eq!(cond(&d, types::ACCEPTED), ("False", "InvalidSpec"));
    }

    #[test]
    fn success_fills_the_summary_and_validation() {
        let first = decide(&cr(), &Observed::default(), &at(1));
        let obs = Observed {
            job: Some(JobView { name: "sft-to-hf-g1".into(), succeeded: 1, complete: true, completion_time: Some(at(50)), ..JobView::default() }),
            pod: Some(PodView {
                exit_code: Some(0),
                message: Some(r#"{"v":1,"step":"convert/megatron_to_hf","status":"succeeded","output":"/data/target/sft-hf","tensors":291,"bytes":6000000000,"seconds":12.0,"weights_digest":"d","checks_passed":6,"checks_failed":0,"report":"/data/target/sft-hf/ckpt-validation.json"}"#.into()),
                ..PodView::default()
            }),
            ..Observed::default()
        };
        let d = decide(&with_status(cr(), &first), &obs, &at(60));
        assert_eq!(cond(&d, types::SUCCEEDED), ("True", "ConversionSucceeded"));
        assert_eq!(cond(&d, types::VALIDATED), ("True", "ValidationPassed"));
        assert_eq!(cond(&d, types::RUNNING), ("False", "Completed"));
        let s = d.status.summary.clone().unwrap();
        assert_eq!(
            s.report_path.as_deref(),
            Some("output/convert/sft-hf/ckpt-validation.json")
        );
        assert_eq!(d.finished, Some("succeeded"));
        assert_eq!(d.status.completion_time, Some(at(50)));
        // Once finished, a Job removed by its TTL does not start another.
        let later = decide(&with_status(cr(), &d), &Observed::default(), &at(99));
        assert!(later.create_job.is_none());
        assert_eq!(later.finished, None);
        assert_eq!(cond(&later, types::SUCCEEDED).0, "True");
    }

    #[test]
    fn failures_carry_the_converter_message_and_reason() {
        let first = decide(&cr(), &Observed::default(), &at(1));
        let failed = |exit: i32, job_reason: &str, message: &str| Observed {
            job: Some(JobView {
                name: "sft-to-hf-g1".into(),
                failed: 1,
                failure: Some((job_reason.into(), "x".into())),
                ..JobView::default()
            }),
            pod: Some(PodView {
                exit_code: Some(exit),
                message: Some(message.into()),
                ..PodView::default()
            }),
            ..Observed::default()
        };
        let bad_input = failed(
            2,
            "PodFailurePolicy",
            r#"{"v":1,"step":"convert/megatron_to_hf","status":"failed","exit_code":2,"error":"megatron_path=/data/source is a run directory"}"#,
        );
        let d = decide(&with_status(cr(), &first), &bad_input, &at(5));
        assert_eq!(cond(&d, types::FAILED), ("True", "InvalidInput"));
        let msg = &conditions::get(&d.status.conditions, types::FAILED)
            .unwrap()
            .message;
        assert!(msg.contains("is a run directory"), "{msg}");
        assert_eq!(d.status.phase.as_deref(), Some("Failed"));
        assert!(
            d.events
                .iter()
                .any(|e| e.warning && e.reason == "InvalidInput")
        );
        let log_tail = failed(1, "BackoffLimitExceeded", "error: disk full");
        let d = decide(&with_status(cr(), &first), &log_tail, &at(5));
        assert_eq!(cond(&d, types::FAILED), ("True", "BackoffLimitExceeded"));
        assert!(
            conditions::get(&d.status.conditions, types::FAILED)
                .unwrap()
                .message
                .contains("disk full")
        );
        // A new generation after a failure runs again.
        let mut next = with_status(cr(), &d);
        next.metadata.generation = Some(2);
        let again = decide(&next, &Observed::default(), &at(9));
        assert!(again.create_job.is_some());
        assert_eq!(again.status.job_name.as_deref(), Some("sft-to-hf-g2"));
        assert!(conditions::get(&again.status.conditions, types::FAILED).is_none());
    }

    #[test]
    fn waiting_pods_explain_why() {
        let first = decide(&cr(), &Observed::default(), &at(1));
        let obs = Observed {
            job: Some(JobView {
                name: "sft-to-hf-g1".into(),
                active: 1,
                ..JobView::default()
            }),
            pod: Some(PodView {
                waiting: Some(("ImagePullBackOff".into(), "pull access denied".into())),
                ..PodView::default()
            }),
            ..Observed::default()
        };
        let d = decide(&with_status(cr(), &first), &obs, &at(5));
        assert_eq!(cond(&d, types::RUNNING), ("True", "ImagePullBackOff"));
        assert!(
            d.events
                .iter()
                .any(|e| e.warning && e.reason == "ImagePullBackOff")
        );
    }
}
