//! What to do about one resource, decided from what was observed: a pure function
//! from (resource, observations, now) to (status, Job to create, events, requeue).
//! The reconcile shell only gathers observations and carries the decision out, so
//! every branch is a table test here.
//!
//! Three steps, one module each: [`admit`] (may the resource run at all: its step, its
//! target, its claims), [`outcome`] (which Job answers for it and where that Job
//! stands), [`summary`] (conditions, phase, reason, message and the events of the
//! transitions). Reasons are the [`crate::reason::Reason`] vocabulary.

pub mod admit;
pub mod outcome;
pub mod summary;

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{CheckpointConversion, CheckpointConversionStatus, PartsStatus};
use crate::step::{Invocation, Share};

/// What was observed of a Job of the resource.
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
    /// The `spec.retry` it was started for.
    pub retry: i32,
    /// The generation it was started for.
    pub generation: i64,
    /// What it does of the run (its labels say).
    pub share: Share,
}

impl JobView {
    /// The Job has finished (completed or failed).
    pub fn finished(&self) -> bool {
        self.complete || self.failure.is_some()
    }
}

/// What was observed of a pod of the Job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodView {
    /// Exit code of the converter container, once it terminated.
    pub exit_code: Option<i32>,
    /// Its termination message (the converter's summary, or a log tail).
    pub message: Option<String>,
    /// Why the container is waiting (`ImagePullBackOff`, `CreateContainerConfigError`).
    pub waiting: Option<(String, String)>,
    /// Why the pod is not scheduled (`Unschedulable`), with the scheduler's message.
    pub unschedulable: Option<String>,
    /// The part it writes, in the Indexed Job of a split run.
    pub index: Option<i32>,
}

/// One part of a split run that completed, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PartDone {
    /// Tensor bytes it wrote.
    pub bytes: i64,
    /// Seconds its pod ran.
    pub seconds: f64,
}

/// Everything the decision depends on besides the resource.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// The Job of the current run (the one started for the resource's `spec.retry`)
    /// that answers for it now: of a split run, the final step's once it exists.
    pub job: Option<JobView>,
    /// Of a split run, where its parts stand (from the parts' Job and pods, while
    /// that Job exists).
    pub parts: Option<PartsStatus>,
    /// Of a split run, the parts that completed.
    pub parts_done: Vec<PartDone>,
    /// Its most recent pod.
    pub pod: Option<PodView>,
    /// Its most recent failed pod (the last failed attempt).
    pub failed_pod: Option<PodView>,
    /// Why the Job could not create a pod (its latest `FailedCreate` event), when it
    /// has none.
    pub pod_creation_failure: Option<String>,
    /// A Job of an earlier run that has not finished (its name).
    pub previous_job: Option<String>,
    /// The resource that owns the target instead of this one (its name).
    pub conflict: Option<String>,
    /// When that resource is deleted: its pod that still runs.
    pub conflict_running_pod: Option<String>,
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
    /// Events, one per transition. A `JobCreated` event is for the shell to publish
    /// only if it did create the Job.
    pub events: Vec<Note>,
    /// When to look again without a watch event.
    pub requeue: Option<Duration>,
    /// `succeeded` or `failed` when the conversion finished in this decision (for metrics).
    pub finished: Option<&'static str>,
}

/// Phases shown by `kubectl get` (defined with the resource, in `ckpt-api`).
pub use ckpt_api::phase;

pub use summary::queued;

/// Decides for `cr` given `obs` at time `now`.
pub fn decide(cr: &CheckpointConversion, obs: &Observed, now: &Time) -> Decision {
    match admit::admit(cr, obs) {
        Err(refusal) => summary::refused(cr, refusal, now),
        Ok(inv) => {
            let outcome = outcome::outcome(cr, obs);
            summary::admitted(cr, obs, inv, outcome, now)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ArtifactKind;
    use crate::conditions::{self, types};
    use crate::fixtures::{at, sft_to_hf as cr};
    use crate::step::Share;

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
    fn a_job_waiting_for_its_creation_slot_is_pending_until_it_comes() {
        let d = decide(&cr(), &Observed::default(), &at(1));
        let q = queued(&cr(), d, Duration::from_secs(3), &at(1));
        assert!(q.create_job.is_none());
        assert_eq!(cond(&q, types::RUNNING), ("False", "JobQueued"));
        assert_eq!(q.status.phase.as_deref(), Some("Pending"));
        assert_eq!(q.status.reason.as_deref(), Some("JobQueued"));
        assert_eq!(q.requeue, Some(Duration::from_secs(3)));
        let told: Vec<&str> = q.events.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(told, ["Accepted"]);
        // Its slot came: the Job is created and told of, Accepted is not told again.
        let again = decide(&with_status(cr(), &q), &Observed::default(), &at(4));
        assert!(again.create_job.is_some());
        assert_eq!(cond(&again, types::RUNNING), ("True", "JobCreated"));
        let told: Vec<&str> = again.events.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(told, ["JobCreated"]);
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
    fn a_deleted_owners_running_pod_is_waited_for() {
        let d = decide(
            &cr(),
            &Observed {
                conflict: Some("older".into()),
                conflict_running_pod: Some("older-g1-abcde".into()),
                ..Observed::default()
            },
            &at(1),
        );
        assert!(d.create_job.is_none());
        assert_eq!(cond(&d, types::ACCEPTED), ("False", "TargetConflict"));
        assert_eq!(d.status.phase.as_deref(), Some("Pending"));
        assert!(
            d.status
                .message
                .unwrap()
                .contains("waiting for its pod older-g1-abcde")
        );
        assert_eq!(d.requeue, Some(Duration::from_secs(10)));
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
        // A new generation after a failure runs again, when it raises retry.
        let mut next = with_status(cr(), &d);
        next.metadata.generation = Some(2);
        next.spec.retry = Some(1);
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

    fn completed(message: &str) -> Observed {
        Observed {
            job: Some(JobView {
                name: "sft-to-hf-g1".into(),
                succeeded: 1,
                complete: true,
                completion_time: Some(at(50)),
                ..JobView::default()
            }),
            pod: Some(PodView {
                exit_code: Some(0),
                message: Some(message.into()),
                ..PodView::default()
            }),
            ..Observed::default()
        }
    }

    const SUMMARY: &str = r#"{"v":1,"step":"convert/megatron_to_hf","status":"succeeded","output":"/data/target/sft-hf","tensors":291,"bytes":6000000000,"seconds":12.0,"weights_digest":"d","checks_passed":6,"checks_failed":0}"#;

    fn reasons(d: &Decision) -> Vec<&str> {
        d.events.iter().map(|e| e.reason.as_str()).collect()
    }

    /// Regression (issue 10, finding 1): a Job setting changed on a finished
    /// resource bumps its generation; that must neither start a Job nor change the
    /// outcome, whether the Job is still there or gone with its TTL.
    #[test]
    fn a_new_generation_never_reruns_a_success() {
        let first = decide(&cr(), &Observed::default(), &at(1));
        let done = decide(&with_status(cr(), &first), &completed(SUMMARY), &at(60));
        let mut edited = with_status(cr(), &done);
        edited.metadata.generation = Some(2);
        edited.spec.job = Some(crate::api::JobOptions {
            ttl_seconds_after_finished: Some(5),
            ..Default::default()
        });
        for obs in [completed(SUMMARY), Observed::default()] {
            let d = decide(&edited, &obs, &at(99));
            assert!(d.create_job.is_none());
            assert!(d.events.is_empty(), "{:?}", d.events);
            assert_eq!(d.status.observed_generation, Some(2));
            assert_eq!(cond(&d, types::SUCCEEDED), ("True", "ConversionSucceeded"));
            assert_eq!(cond(&d, types::VALIDATED), ("True", "ValidationPassed"));
            assert_eq!(d.status.summary, done.status.summary);
            assert_eq!(d.status.phase.as_deref(), Some("Succeeded"));
        }
        // Not even a raised retry runs a success again.
        edited.spec.retry = Some(1);
        assert!(
            decide(&edited, &Observed::default(), &at(99))
                .create_job
                .is_none()
        );
    }

    #[test]
    fn a_failure_reruns_only_when_retry_is_raised() {
        let first = decide(&cr(), &Observed::default(), &at(1));
        let failed = Observed {
            job: Some(JobView {
                name: "sft-to-hf-g1".into(),
                failed: 3,
                failure: Some(("BackoffLimitExceeded".into(), "x".into())),
                ..JobView::default()
            }),
            pod: Some(PodView {
                exit_code: Some(1),
                message: Some("error: disk full".into()),
                ..PodView::default()
            }),
            ..Observed::default()
        };
        let d = decide(&with_status(cr(), &first), &failed, &at(5));
        let mut edited = with_status(cr(), &d);
        edited.metadata.generation = Some(2);
        for obs in [failed.clone(), Observed::default()] {
            let again = decide(&edited, &obs, &at(9));
            assert!(again.create_job.is_none());
            assert!(again.events.is_empty(), "{:?}", again.events);
            assert_eq!(
                cond(&again, types::FAILED),
                ("True", "BackoffLimitExceeded")
            );
        }
        edited.spec.retry = Some(1);
        let again = decide(&edited, &Observed::default(), &at(9));
        assert!(again.create_job.is_some());
        assert_eq!(again.status.retry, Some(1));
        // While the earlier run's Job still runs, the next one waits.
        let waiting = decide(
            &edited,
            &Observed {
                previous_job: Some("sft-to-hf-g1".into()),
                ..Observed::default()
            },
            &at(9),
        );
        assert!(waiting.create_job.is_none());
        assert_eq!(
            cond(&waiting, types::RUNNING),
            ("False", "PreviousJobRunning")
        );
        assert_eq!(waiting.status.phase.as_deref(), Some("Pending"));
    }

    /// Regression (issue 10, finding 7): between two attempts the Job briefly has
    /// no pod; that must not read as "starting" again, and JobCreated is told once.
    #[test]
    fn running_never_goes_back_to_starting() {
        let first = decide(&cr(), &Observed::default(), &at(1));
        let job = |active: i32, failed: i32| JobView {
            name: "sft-to-hf-g1".into(),
            active,
            failed,
            ..JobView::default()
        };
        let running = Observed {
            job: Some(job(1, 0)),
            pod: Some(PodView::default()),
            ..Observed::default()
        };
        let d = decide(&with_status(cr(), &first), &running, &at(2));
        assert_eq!(cond(&d, types::RUNNING), ("True", "JobRunning"));
        assert_eq!(reasons(&d), vec!["JobRunning"]);
        let gap = Observed {
            job: Some(job(0, 0)),
            ..Observed::default()
        };
        let d = decide(&with_status(cr(), &d), &gap, &at(3));
        assert_eq!(cond(&d, types::RUNNING), ("True", "JobRunning"));
        assert!(d.events.is_empty(), "{:?}", d.events);

        // A failed attempt: told once, with what the converter said.
        let failed_pod = PodView {
            exit_code: Some(1),
            message: Some(r#"{"v":1,"step":"s","status":"failed","exit_code":1,"error":"digest mismatch in model-00001.safetensors"}"#.into()),
            ..PodView::default()
        };
        let retrying = Observed {
            job: Some(job(0, 1)),
            pod: Some(failed_pod.clone()),
            failed_pod: Some(failed_pod.clone()),
            ..Observed::default()
        };
        let d = decide(&with_status(cr(), &d), &retrying, &at(4));
        assert_eq!(cond(&d, types::RUNNING), ("True", "Retrying"));
        assert_eq!(reasons(&d), vec!["AttemptFailed"]);
        assert!(d.events[0].warning);
        assert!(
            d.events[0]
                .message
                .contains("attempt 1 failed: converter exited 1: digest mismatch"),
            "{}",
            d.events[0].message
        );
        assert_eq!(d.status.failed_attempts, Some(1));
        let d = decide(&with_status(cr(), &d), &retrying, &at(5));
        assert!(d.events.is_empty(), "{:?}", d.events);
        // The next attempt runs.
        let second = Observed {
            job: Some(job(1, 1)),
            pod: Some(PodView::default()),
            failed_pod: Some(failed_pod),
            ..Observed::default()
        };
        let d = decide(&with_status(cr(), &d), &second, &at(6));
        assert_eq!(cond(&d, types::RUNNING), ("True", "JobRunning"));
        assert!(
            d.status
                .message
                .as_deref()
                .unwrap()
                .contains("attempt 2; 1 failed")
        );
    }

    /// Regression (issue 10, finding 5): a Job that cannot create its pod (here a
    /// missing ServiceAccount) says so instead of "starting".
    #[test]
    fn a_pod_that_cannot_be_created_is_reported() {
        let first = decide(&cr(), &Observed::default(), &at(1));
        let obs = Observed {
            job: Some(JobView {
                name: "sft-to-hf-g1".into(),
                ..JobView::default()
            }),
            pod_creation_failure: Some(r#"Error creating: pods "sft-to-hf-g1-x" is forbidden: error looking up service account training/conv: serviceaccount "conv" not found"#.into()),
            ..Observed::default()
        };
        let d = decide(&with_status(cr(), &first), &obs, &at(2));
        assert_eq!(cond(&d, types::RUNNING), ("True", "PodCreationFailed"));
        assert_eq!(d.status.phase.as_deref(), Some("Pending"));
        assert_eq!(d.status.reason.as_deref(), Some("PodCreationFailed"));
        assert!(
            d.status
                .message
                .as_deref()
                .unwrap()
                .contains("serviceaccount \"conv\" not found")
        );
        assert_eq!(reasons(&d), vec!["PodCreationFailed"]);
        assert!(d.events[0].warning);
        let unschedulable = Observed {
            job: Some(JobView {
                name: "sft-to-hf-g1".into(),
                active: 1,
                ..JobView::default()
            }),
            pod: Some(PodView {
                unschedulable: Some("0/3 nodes are available: 3 Insufficient memory.".into()),
                ..PodView::default()
            }),
            ..Observed::default()
        };
        let d = decide(&with_status(cr(), &d), &unschedulable, &at(3));
        assert_eq!(cond(&d, types::RUNNING), ("True", "Unschedulable"));
        assert_eq!(reasons(&d), vec!["Unschedulable"]);
    }

    /// Regression (issue 10, finding 7): Validated exists only when validation ran.
    #[test]
    fn validated_only_when_validation_ran() {
        let first = decide(&cr(), &Observed::default(), &at(1));
        let failed = Observed {
            job: Some(JobView {
                name: "sft-to-hf-g1".into(),
                failed: 1,
                failure: Some(("PodFailurePolicy".into(), "x".into())),
                ..JobView::default()
            }),
            pod: Some(PodView {
                exit_code: Some(2),
                message: Some(r#"{"v":1,"step":"s","status":"failed","exit_code":2,"error":"megatron_path=/data/source does not exist"}"#.into()),
                ..PodView::default()
            }),
            ..Observed::default()
        };
        let d = decide(&with_status(cr(), &first), &failed, &at(5));
        assert!(conditions::get(&d.status.conditions, types::VALIDATED).is_none());
        assert_eq!(d.status.reason.as_deref(), Some("InvalidInput"));
        // Switched off: no verdict, and none is invented.
        let mut off = cr();
        off.spec.validation = Some(crate::api::ValidationSpec {
            enabled: Some(false),
            smoke_test: None,
        });
        let first = decide(&off, &Observed::default(), &at(1));
        let unvalidated = r#"{"v":1,"step":"convert/megatron_to_hf","status":"succeeded","tensors":1,"bytes":2,"seconds":1.0}"#;
        let d = decide(
            &with_status(off.clone(), &first),
            &completed(unvalidated),
            &at(9),
        );
        assert!(conditions::get(&d.status.conditions, types::VALIDATED).is_none());
        assert_eq!(d.status.reason.as_deref(), Some("ConversionSucceeded"));
        // Asked for and not reported: Unknown, and that is what the phase says.
        let first = decide(&cr(), &Observed::default(), &at(1));
        let d = decide(&with_status(cr(), &first), &completed(unvalidated), &at(9));
        assert_eq!(
            cond(&d, types::VALIDATED),
            ("Unknown", "NoValidationReport")
        );
        assert_eq!(d.status.reason.as_deref(), Some("NoValidationReport"));
    }

    #[test]
    fn warnings_and_reuse_are_told() {
        let first = decide(&cr(), &Observed::default(), &at(1));
        let reused = r#"{"v":1,"step":"convert/megatron_to_hf","status":"succeeded","output":"/data/target/sft-hf","reused":true,"checks_passed":6,"checks_failed":0,"warnings":["base name could not be confirmed"]}"#;
        let d = decide(&with_status(cr(), &first), &completed(reused), &at(9));
        assert_eq!(cond(&d, types::SUCCEEDED), ("True", "OutputReused"));
        assert_eq!(
            reasons(&d),
            vec!["OutputReused", "ValidationPassed", "ConverterWarning"]
        );
        let warning = &d.events[2];
        assert!(warning.warning && warning.message == "base name could not be confirmed");
        let s = d.status.summary.clone().unwrap();
        assert_eq!((s.reused, s.warnings.len()), (Some(true), 1));
        // Told once.
        let again = decide(&with_status(cr(), &d), &completed(reused), &at(10));
        assert!(again.events.is_empty(), "{:?}", again.events);
    }

    /// A split run: the parts' Indexed Job, then, once every part completed, the
    /// final step's Job, named after the parts' generation even when the resource
    /// was edited since; the parts' progress in the status throughout; success
    /// only from the final step.
    #[test]
    fn a_split_run_finishes_its_parts_then_publishes_in_a_final_step() {
        let mut split = cr();
        split.spec.workers = Some(3);
        let d = decide(&split, &Observed::default(), &at(1));
        let inv = d.create_job.clone().unwrap();
        assert_eq!(inv.share, Share::Parts { workers: 3 });
        assert_eq!(d.status.job_name.as_deref(), Some("sft-to-hf-g1"));
        assert_eq!(
            d.status.parts.as_ref().map(|p| (p.workers, p.done)),
            Some((3, 0))
        );
        assert!(d.status.message.as_deref().unwrap().ends_with("in 3 parts"));
        let parts_job = |active: i32, succeeded: i32, complete: bool| JobView {
            name: "sft-to-hf-g1".into(),
            active,
            succeeded,
            complete,
            generation: 1,
            share: Share::Parts { workers: 3 },
            ..JobView::default()
        };
        let parts = |done: i32| PartsStatus {
            workers: 3,
            done,
            ..PartsStatus::default()
        };
        let running = Observed {
            job: Some(parts_job(2, 1, false)),
            parts: Some(parts(1)),
            pod: Some(PodView {
                index: Some(2),
                ..PodView::default()
            }),
            ..Observed::default()
        };
        let d = decide(&with_status(split.clone(), &d), &running, &at(2));
        assert!(d.create_job.is_none());
        assert_eq!(cond(&d, types::RUNNING), ("True", "JobRunning"));
        assert!(
            d.status
                .message
                .as_deref()
                .unwrap()
                .ends_with("1/3 parts done"),
            "{:?}",
            d.status.message
        );
        // Every part done; meanwhile a Job setting was edited (generation 2).
        let mut edited = with_status(split.clone(), &d);
        edited.metadata.generation = Some(2);
        let all_done = Observed {
            job: Some(parts_job(0, 3, true)),
            parts: Some(parts(3)),
            ..Observed::default()
        };
        let d = decide(&edited, &all_done, &at(3));
        let fin = d.create_job.clone().expect("the final step's Job");
        assert_eq!(
            fin.share,
            Share::Finalize {
                workers: 3,
                generation: 1
            }
        );
        assert_eq!(d.status.job_name.as_deref(), Some("sft-to-hf-g1-finalize"));
        assert_eq!(
            d.status.parts.as_ref().unwrap().finalize_job.as_deref(),
            Some("sft-to-hf-g1-finalize")
        );
        assert_eq!(cond(&d, types::RUNNING), ("True", "PartsDone"));
        assert!(conditions::get(&d.status.conditions, types::SUCCEEDED).is_none());
        assert_eq!(reasons(&d), vec!["PartsDone"]);
        // The final step answers from here; its success is the run's.
        let mut finished = completed(SUMMARY);
        let job = finished.job.as_mut().unwrap();
        job.name = "sft-to-hf-g1-finalize".into();
        job.generation = 1;
        job.share = fin.share;
        finished.parts = Some(PartsStatus {
            finalize_job: Some("sft-to-hf-g1-finalize".into()),
            ..parts(3)
        });
        let done = decide(&with_status(edited.clone(), &d), &finished, &at(60));
        assert!(done.create_job.is_none());
        assert_eq!(
            cond(&done, types::SUCCEEDED),
            ("True", "ConversionSucceeded")
        );
        assert_eq!(done.finished, Some("succeeded"));
        assert_eq!(done.status.parts.as_ref().unwrap().done, 3);
        // The parts' Job gone with its TTL: what the status said of the parts stays.
        finished.parts = None;
        let later = decide(&with_status(edited, &done), &finished, &at(70));
        assert_eq!(later.status.parts, done.status.parts);
        assert!(later.events.is_empty(), "{:?}", later.events);
    }

    #[test]
    fn a_failed_part_fails_the_run_naming_the_part() {
        let mut split = cr();
        split.spec.workers = Some(2);
        let first = decide(&split, &Observed::default(), &at(1));
        let failed_pod = PodView {
            exit_code: Some(1),
            message: Some("error: disk full".into()),
            index: Some(1),
            ..PodView::default()
        };
        let obs = Observed {
            job: Some(JobView {
                name: "sft-to-hf-g1".into(),
                failed: 3,
                failure: Some(("FailedIndexes".into(), "Job has failed indexes".into())),
                generation: 1,
                share: Share::Parts { workers: 2 },
                ..JobView::default()
            }),
            parts: Some(PartsStatus {
                workers: 2,
                done: 1,
                failed: Some("1".into()),
                ..PartsStatus::default()
            }),
            pod: Some(failed_pod.clone()),
            failed_pod: Some(failed_pod),
            ..Observed::default()
        };
        let d = decide(&with_status(split, &first), &obs, &at(5));
        assert!(d.create_job.is_none());
        let (_, reason, message) = {
            let c = conditions::get(&d.status.conditions, types::FAILED).unwrap();
            (c.status.clone(), c.reason.clone(), c.message.clone())
        };
        assert_eq!(reason, "BackoffLimitExceeded");
        let (first, rest) = message.split_once('\n').unwrap();
        assert_eq!(first, "part 1: converter exited 1: error: disk full");
        assert!(rest.contains("raising spec.retry"), "{rest}");
        assert_eq!(
            d.status.message.as_deref(),
            Some("part 1: converter exited 1: error: disk full")
        );
        assert_eq!(d.status.parts.unwrap().failed.as_deref(), Some("1"));
    }

    #[test]
    fn the_phase_comes_with_its_reason_and_a_short_message() {
        let d = decide(&cr(), &Observed::default(), &at(1));
        assert_eq!(d.status.reason.as_deref(), Some("JobCreated"));
        assert_eq!(
            d.status.message.as_deref(),
            Some("created Job sft-to-hf-g1 running convert/megatron_to_hf")
        );
        let long = format!("{}\nsecond line", "x".repeat(500));
        let d = decide(
            &cr(),
            &Observed {
                conflict: Some(long),
                ..Observed::default()
            },
            &at(1),
        );
        let m = d.status.message.unwrap();
        assert!(
            m.len() <= 204 && m.ends_with('…') && !m.contains('\n'),
            "{m}"
        );
    }
}
