//! What the controller observes, as the views [`crate::decide`] reads: a Job, its
//! pods and a split run's parts, from the objects the API returns. Pure, so the
//! mapping is tested without a server.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::api::CheckpointConversion;
use crate::api::{PartsStatus, SlowestPart};
use crate::decide::{JobView, PartDone, PodView};
use crate::job;
use crate::step::Share;
use ckpt_wire::Summary;

pub(crate) fn job_view(j: &Job) -> JobView {
    let status = j.status.clone().unwrap_or_default();
    let cond = |t: &str| {
        status
            .conditions
            .as_ref()
            .and_then(|cs| cs.iter().find(|c| c.type_ == t && c.status == "True"))
            .map(|c| {
                (
                    c.reason.clone().unwrap_or_default(),
                    c.message.clone().unwrap_or_default(),
                )
            })
    };
    JobView {
        name: j.name_any(),
        active: status.active.unwrap_or(0),
        succeeded: status.succeeded.unwrap_or(0),
        failed: status.failed.unwrap_or(0),
        complete: cond("Complete").is_some(),
        failure: cond("Failed"),
        start_time: status.start_time.clone(),
        completion_time: status.completion_time.clone(),
        retry: label_number(j, job::RETRY_LABEL) as i32,
        generation: label_number(j, job::GENERATION_LABEL),
        share: share_of(j),
    }
}

/// What a Job does of its run, from its labels.
pub(crate) fn share_of(j: &Job) -> Share {
    let workers = label_number(j, job::WORKERS_LABEL) as i32;
    match j.labels().get(job::STAGE_LABEL).map(String::as_str) {
        Some(job::STAGE_PARTS) => Share::Parts { workers },
        Some(job::STAGE_FINALIZE) => Share::Finalize {
            workers,
            generation: label_number(j, job::GENERATION_LABEL),
        },
        _ => Share::Whole,
    }
}

pub(crate) fn label_number(j: &Job, label: &str) -> i64 {
    j.labels()
        .get(label)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub(crate) fn pod_view(p: &Pod) -> PodView {
    let status = p.status.clone().unwrap_or_default();
    let container = status
        .container_statuses
        .as_ref()
        .and_then(|cs| cs.iter().find(|c| c.name == job::CONTAINER).cloned());
    let terminated = container
        .as_ref()
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.clone());
    let waiting = container
        .as_ref()
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.waiting.clone());
    let unschedulable = status
        .conditions
        .as_ref()
        .and_then(|cs| {
            cs.iter().find(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
        })
        .map(|c| c.message.clone().unwrap_or_default());
    PodView {
        exit_code: terminated.as_ref().map(|t| t.exit_code),
        message: terminated.and_then(|t| t.message),
        waiting: waiting
            .and_then(|w| w.reason.map(|r| (r, w.message.unwrap_or_default())))
            .filter(|(r, _)| r != "ContainerCreating" && r != "PodInitializing"),
        unschedulable,
        index: completion_index(p),
    }
}

/// The part a pod of an Indexed Job writes (the Job controller's label, or its
/// annotation).
pub(crate) fn completion_index(p: &Pod) -> Option<i32> {
    p.labels()
        .get(job::COMPLETION_INDEX_LABEL)
        .or_else(|| p.annotations().get(job::COMPLETION_INDEX_LABEL))
        .and_then(|v| v.parse().ok())
}

/// How many indexes a Job's `completedIndexes` lists (`1,3-5` is four).
pub(crate) fn count_indexes(list: &str) -> i32 {
    list.split(',')
        .filter(|r| !r.is_empty())
        .map(|r| match r.split_once('-') {
            Some((a, b)) => match (a.parse::<i32>(), b.parse::<i32>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => i32::from(r.parse::<i32>().is_ok()),
        })
        .sum()
}

/// Where the parts of a split run stand, from the parts' Job and its pods; and the
/// parts that completed, for the metrics.
pub(crate) fn parts_status(j: &Job, pods: &[Pod]) -> (PartsStatus, Vec<PartDone>) {
    let status = j.status.clone().unwrap_or_default();
    let workers = label_number(j, job::WORKERS_LABEL) as i32;
    let done = status
        .completed_indexes
        .as_deref()
        .map_or(status.succeeded.unwrap_or(0), count_indexes);
    let phase = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.clone());
    let container = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.name == job::CONTAINER).cloned())
            .and_then(|c| c.state)
    };
    // Each index's latest pod tells how that part went.
    let mut latest: std::collections::BTreeMap<i32, &Pod> = std::collections::BTreeMap::new();
    for p in pods {
        if let Some(i) = completion_index(p) {
            let newer = latest
                .get(&i)
                .is_none_or(|q| q.metadata.creation_timestamp <= p.metadata.creation_timestamp);
            if newer {
                latest.insert(i, p);
            }
        }
    }
    let mut parts_done = Vec::new();
    let mut bytes = None;
    let mut slowest_done: Option<SlowestPart> = None;
    let mut slowest_running: Option<(i32, Time)> = None;
    for (&i, p) in &latest {
        let state = container(p);
        match phase(p).as_deref() {
            Some("Succeeded") => {
                let t = state.and_then(|s| s.terminated);
                let seconds = t
                    .as_ref()
                    .and_then(|t| Some((t.started_at.clone()?, t.finished_at.clone()?)))
                    .map_or(0.0, |(a, b)| seconds_between(&a, &b));
                let wrote = t
                    .and_then(|t| t.message)
                    .and_then(|m| Summary::parse(&m))
                    .and_then(|s| s.bytes)
                    .map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX));
                bytes = Some(bytes.unwrap_or(0) + wrote);
                parts_done.push(PartDone {
                    bytes: wrote,
                    seconds,
                });
                if slowest_done
                    .as_ref()
                    .is_none_or(|s| s.seconds.is_some_and(|x| (x as f64) < seconds))
                {
                    slowest_done = Some(SlowestPart {
                        index: i,
                        seconds: Some(seconds.round() as i64),
                        running_since: None,
                    });
                }
            }
            Some("Running") => {
                if let Some(since) = state.and_then(|s| s.running).and_then(|r| r.started_at)
                    && slowest_running.as_ref().is_none_or(|(_, t)| since.0 < t.0)
                {
                    slowest_running = Some((i, since));
                }
            }
            _ => {}
        }
    }
    let running = latest
        .values()
        .filter(|p| phase(p).as_deref() == Some("Running"))
        .count() as i32;
    // While parts run, the one running longest (its start, which a status can keep
    // without being rewritten every reconcile); once none runs, the longest.
    let slowest = match slowest_running {
        Some((index, since)) => Some(SlowestPart {
            index,
            seconds: None,
            running_since: Some(since),
        }),
        None => slowest_done,
    };
    (
        PartsStatus {
            workers,
            done,
            running: (running > 0).then_some(running),
            failed: status.failed_indexes.filter(|f| !f.is_empty()),
            bytes,
            slowest,
            finalize_job: None,
        },
        parts_done,
    )
}

pub(crate) fn seconds_between(a: &Time, b: &Time) -> f64 {
    b.0.duration_since(a.0).as_secs_f64().max(0.0)
}

pub(crate) fn failed_pod(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
}

/// The Jobs of `cr`'s runs.
pub(crate) struct Runs {
    /// The current run's Job that answers for it: of a split run, the final step's
    /// once it exists.
    pub(crate) current: Option<Job>,
    /// Of a split run, the current run's parts' Job.
    pub(crate) parts: Option<Job>,
    /// A Job of an earlier run that has not finished.
    pub(crate) previous: Option<String>,
}

/// The Jobs of `cr` (by label, and owned by this very resource: one created again
/// under the same name does not inherit them).
pub(crate) fn runs(cr: &CheckpointConversion, jobs: Vec<Job>) -> Runs {
    let uid = cr.metadata.uid.clone();
    let retry = i64::from(cr.spec.retry.unwrap_or(0));
    let mut mine: Vec<Job> = jobs
        .into_iter()
        .filter(|j| {
            j.owner_references()
                .iter()
                .any(|r| Some(&r.uid) == uid.as_ref())
        })
        .collect();
    // By generation, and within one the final step after the parts it finishes.
    mine.sort_by_key(|j| {
        (
            label_number(j, job::GENERATION_LABEL),
            matches!(share_of(j), Share::Finalize { .. }),
        )
    });
    let current = mine
        .iter()
        .rev()
        .find(|j| label_number(j, job::RETRY_LABEL) == retry)
        .cloned();
    let parts = current.as_ref().and_then(|c| {
        let generation = label_number(c, job::GENERATION_LABEL);
        mine.iter()
            .find(|j| {
                matches!(share_of(j), Share::Parts { .. })
                    && label_number(j, job::GENERATION_LABEL) == generation
                    && label_number(j, job::RETRY_LABEL) == retry
            })
            .cloned()
    });
    let previous = mine
        .iter()
        .filter(|j| label_number(j, job::RETRY_LABEL) != retry && !job_view(j).finished())
        .map(ResourceExt::name_any)
        .next_back();
    Runs {
        current,
        parts,
        previous,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn runs_pick_the_current_retrys_job_and_an_unfinished_earlier_one() {
        let job = |name: &str, generation: i64, retry: i32, owner: &str, done: bool| -> Job {
            serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"ckpt.dev/generation": generation.to_string(), "ckpt.dev/retry": retry.to_string()},
                             "ownerReferences": [{"apiVersion": "ckpt.dev/v1alpha1", "kind": "CheckpointConversion", "name": "sft-to-hf", "uid": owner}]},
                "status": if done { json!({"conditions": [{"type": "Failed", "status": "True"}]}) } else { json!({"active": 1}) }
            }))
            .unwrap()
        };
        let mut cr = crate::fixtures::sft_to_hf();
        cr.spec.retry = Some(1);
        let r = runs(
            &cr,
            vec![
                job("sft-to-hf-g1", 1, 0, "u-1", false),
                job("sft-to-hf-g3", 3, 1, "u-1", false),
                job("sft-to-hf-g2", 2, 1, "u-1", true),
                job("sft-to-hf-g9", 9, 1, "u-other", false),
            ],
        );
        assert_eq!(r.current.unwrap().name_any(), "sft-to-hf-g3");
        assert_eq!(r.previous.as_deref(), Some("sft-to-hf-g1"));
        assert!(r.parts.is_none());
        // A split run: the final step's Job answers once it exists, the parts' Job
        // of the same generation tells how the parts went; an edit since (a later
        // generation, no Job of its own) changes neither.
        let staged = |mut j: Job, stage: &str| {
            let labels = j.metadata.labels.get_or_insert_default();
            labels.insert(job::STAGE_LABEL.into(), stage.into());
            labels.insert(job::WORKERS_LABEL.into(), "3".into());
            j
        };
        let parts = staged(job("sft-to-hf-g3", 3, 1, "u-1", true), job::STAGE_PARTS);
        let fin = staged(
            job("sft-to-hf-g3-finalize", 3, 1, "u-1", false),
            job::STAGE_FINALIZE,
        );
        cr.metadata.generation = Some(4);
        let r = runs(&cr, vec![fin.clone(), parts.clone()]);
        assert_eq!(r.current.unwrap().name_any(), "sft-to-hf-g3-finalize");
        assert_eq!(r.parts.unwrap().name_any(), "sft-to-hf-g3");
        assert_eq!(
            share_of(&fin),
            Share::Finalize {
                workers: 3,
                generation: 3
            }
        );
        let r = runs(&cr, vec![parts]);
        assert_eq!(r.current.unwrap().name_any(), "sft-to-hf-g3");
        assert_eq!(r.parts.unwrap().name_any(), "sft-to-hf-g3");
    }

    #[test]
    fn parts_are_counted_from_the_indexed_job_and_its_pods() {
        assert_eq!(count_indexes("0,2-4,7"), 5);
        assert_eq!(count_indexes(""), 0);
        let parts: Job = serde_json::from_value(json!({
            "metadata": {"name": "sft-to-hf-g1", "labels": {"ckpt.dev/stage": "parts", "ckpt.dev/workers": "4"}},
            "status": {"completedIndexes": "0,2", "failedIndexes": "", "succeeded": 2, "active": 2, "failed": 1}
        }))
        .unwrap();
        let pod = |index: i32, created: &str, state: Value, phase: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": format!("p{index}-{created}"), "creationTimestamp": created,
                             "labels": {"batch.kubernetes.io/job-completion-index": index.to_string()}},
                "status": {"phase": phase, "containerStatuses": [{"name": "convert", "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": state}]}
            }))
            .unwrap()
        };
        let done = |start: &str, end: &str, bytes: u64| {
            json!({"terminated": {"exitCode": 0, "startedAt": start, "finishedAt": end,
                                  "message": format!(r#"{{"v":1,"step":"convert/megatron_to_hf","status":"succeeded","bytes":{bytes}}}"#)}})
        };
        let pods = vec![
            pod(
                0,
                "2026-01-01T00:00:00Z",
                done("2026-01-01T00:00:01Z", "2026-01-01T00:00:11Z", 100),
                "Succeeded",
            ),
            pod(
                2,
                "2026-01-01T00:00:00Z",
                done("2026-01-01T00:00:01Z", "2026-01-01T00:00:31Z", 300),
                "Succeeded",
            ),
            // Index 1 failed once and runs again; index 3 runs since earlier.
            pod(
                1,
                "2026-01-01T00:00:00Z",
                json!({"terminated": {"exitCode": 1}}),
                "Failed",
            ),
            pod(
                1,
                "2026-01-01T00:00:20Z",
                json!({"running": {"startedAt": "2026-01-01T00:00:21Z"}}),
                "Running",
            ),
            pod(
                3,
                "2026-01-01T00:00:00Z",
                json!({"running": {"startedAt": "2026-01-01T00:00:02Z"}}),
                "Running",
            ),
        ];
        let (status, done) = parts_status(&parts, &pods);
        assert_eq!(
            (status.workers, status.done, status.running, status.bytes),
            (4, 2, Some(2), Some(400))
        );
        assert_eq!(status.failed, None);
        let slowest = status.slowest.unwrap();
        assert_eq!((slowest.index, slowest.seconds), (3, None));
        assert_eq!(
            slowest.running_since.unwrap().0.to_string(),
            "2026-01-01T00:00:02Z"
        );
        assert_eq!(
            done,
            vec![
                PartDone {
                    bytes: 100,
                    seconds: 10.0
                },
                PartDone {
                    bytes: 300,
                    seconds: 30.0
                }
            ]
        );
        // Once none runs, the one that took longest.
        let (status, _) = parts_status(&parts, &pods[..2]);
        let slowest = status.slowest.unwrap();
        assert_eq!(
            (slowest.index, slowest.seconds, slowest.running_since),
            (2, Some(30), None)
        );
    }
}
