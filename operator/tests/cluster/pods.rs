//! What the Job's pods go through, told in status and events as it happens (issue 10,
//! findings 5 to 7): a pod that cannot be created, scheduled or started; an attempt
//! that fails and is retried; what the converter warns about.
//!
//! Where a scheduler or kubelet would act (no node runs here), the test writes the
//! pod status they would write; the Job controller, the operator and the apiserver
//! are real. The converter's own side of these cases is exercised with the real
//! converter at the end of this file.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ckpt_operator::api::CheckpointConversion;
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use crate::support::{
    Env, Operator, Waiting, condition, cp, kubectl, nth_pod, phase, running, set_pod_status,
    terminated,
};

/// "Within seconds": a pod-level cause shows in status this soon (the operator
/// watches pods and Job events; it used to notice only on a one-minute requeue).
const PROMPTLY: Duration = Duration::from_secs(45);

async fn wait_reason(
    env: &Env,
    name: &str,
    reason: &str,
    limit: Duration,
    op: &mut Operator,
) -> CheckpointConversion {
    let waiting = Waiting::within(format!("{name}: reason {reason}"), limit);
    loop {
        op.assert_running();
        let cr = env.get(name).await;
        if cr.status.as_ref().and_then(|s| s.reason.as_deref()) == Some(reason) {
            return cr;
        }
        waiting
            .tick(|| format!("{:#?}\n{}", cr.status, op.log()))
            .await;
    }
}

/// Regression (issue 10, finding 5): in a namespace the converter's ServiceAccount
/// was not created in, the Job cannot create its pod; the resource said "Job … is
/// starting" forever while only the Job's events told why.
#[tokio::test]
async fn a_namespace_without_the_converter_account_says_why_nothing_starts() {
    let other = cp().await.new_namespace("no-account-other").await.unwrap();
    let watch = format!("watchNamespaces={{$NS,{other}}}");
    let env = Env::with_values(
        "no-account",
        &[watch.as_str(), "converter.serviceAccount.namespaces={$NS}"],
    )
    .await;
    env.create_claims(&other, &["lustre-shared", "models"])
        .await;
    let mut op = Operator::start(&env, "no-account").await;
    let manifest = env.example("megatron-to-hf.yaml").replace(
        &format!("namespace: {}", env.ns),
        &format!("namespace: {other}"),
    );
    kubectl(&["apply", "-f", "-"], &manifest)
        .await
        .expect_ok("a resource in the other namespace");
    let api: Api<CheckpointConversion> = Api::namespaced(cp().await.client(), &other);
    let waiting = Waiting::new("PodCreationFailed in the other namespace");
    let cr = loop {
        op.assert_running();
        let cr = api.get("sft-to-hf").await.unwrap();
        if cr.status.as_ref().and_then(|s| s.reason.as_deref()) == Some("PodCreationFailed") {
            break cr;
        }
        waiting.tick(|| format!("{:#?}", cr.status)).await;
    };
    assert_eq!(phase(&cr), Some("Pending"));
    let (_, reason, message) = condition(&cr, "Running");
    assert_eq!(reason, "PodCreationFailed");
    assert!(
        message.contains("serviceaccount \"ckpt-operator-converter\" not found"),
        "{message}"
    );
    op.stop();
}

/// Regression (issue 10, finding 5): pods were not watched, so an unschedulable pod
/// or one whose image cannot be pulled read "JobRunning" until a requeue a minute
/// later.
#[tokio::test]
async fn pods_that_cannot_start_are_reported_within_seconds_on_the_stand_in() {
    let env = Env::new("pod-waits").await;
    let mut op = Operator::start(&env, "pod-waits").await;
    env.apply_ok("megatron-to-hf.yaml").await;
    let pod = nth_pod(&env, "sft-to-hf-g1", 0).await;
    env.wait_condition("sft-to-hf", "Running", "True", &mut op)
        .await;
    // As the scheduler writes it.
    set_pod_status(
        &env,
        &pod,
        json!({"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient memory."}]}),
    )
    .await;
    let cr = wait_reason(&env, "sft-to-hf", "Unschedulable", PROMPTLY, &mut op).await;
    assert!(
        cr.status
            .unwrap()
            .message
            .unwrap()
            .contains("Insufficient memory"),
        "the scheduler's words"
    );
    // Scheduled, then the kubelet cannot pull the image.
    set_pod_status(
        &env,
        &pod,
        json!({"conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "convert", "image": "ghcr.io/ckpt-dev/ckpt-convert:0.1.0",
                "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff",
                    "message": "Back-off pulling image \"ghcr.io/ckpt-dev/ckpt-convert:0.1.0\""}}}]}),
    )
    .await;
    let cr = wait_reason(&env, "sft-to-hf", "ImagePullBackOff", PROMPTLY, &mut op).await;
    assert_eq!(phase(&cr), Some("Pending"));
    let reasons: Vec<String> = env
        .events_of("sft-to-hf")
        .await
        .iter()
        .filter_map(|e| e.reason.clone())
        .collect();
    for r in ["Unschedulable", "ImagePullBackOff"] {
        assert!(reasons.iter().any(|x| x == r), "no {r} event: {reasons:?}");
    }
    op.stop();
}

/// Every `status.reason` of `name`, in the order the apiserver had them.
async fn record_reasons(env: &Env, name: &str) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let api: Api<CheckpointConversion> = Api::namespaced(cp().await.client(), &env.ns);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let sink = seen.clone();
    tokio::spawn(async move {
        let stream = watcher(api, cfg).applied_objects();
        futures::pin_mut!(stream);
        while let Some(Ok(cr)) = stream.next().await {
            if let Some(r) = cr.status.and_then(|s| s.reason) {
                let mut v = sink.lock().unwrap();
                if v.last() != Some(&r) {
                    v.push(r);
                }
            }
        }
    });
    seen
}

/// Regression (issue 10, findings 6 and 7): failed attempts appeared nowhere before
/// the Job gave up, status flipped back to "starting" (JobRunning → JobCreated)
/// whenever the Job briefly had no pod, and JobCreated was told once per flip.
#[tokio::test]
async fn a_failed_attempt_is_told_at_once_and_running_never_reads_as_starting_on_the_stand_in() {
    let env = Env::new("attempts").await;
    let mut op = Operator::start(&env, "attempts").await;
    let reasons = record_reasons(&env, "sft-to-hf").await;
    env.apply_ok("megatron-to-hf.yaml").await;
    let first = nth_pod(&env, "sft-to-hf-g1", 0).await;
    set_pod_status(&env, &first, running()).await;
    wait_reason(
        &env,
        "sft-to-hf",
        "JobRunning",
        crate::support::deadline(),
        &mut op,
    )
    .await;
    let error = "digest of model-00001-of-00002.safetensors changed while it was read";
    let summary = json!({"v": 1, "step": "convert/megatron_to_hf", "status": "failed",
        "exit_code": 1, "error": error});
    set_pod_status(&env, &first, terminated(1, &summary.to_string())).await;
    // Told while the Job still runs (it waits before starting the next pod).
    let cr = wait_reason(&env, "sft-to-hf", "Retrying", PROMPTLY, &mut op).await;
    assert!(
        cr.status
            .as_ref()
            .unwrap()
            .message
            .as_deref()
            .unwrap()
            .contains(error),
        "{:#?}",
        cr.status
    );
    assert_eq!(cr.status.as_ref().unwrap().failed_attempts, Some(1));
    assert_eq!(phase(&cr), Some("Running"));
    let attempt = env
        .events_of("sft-to-hf")
        .await
        .into_iter()
        .find(|e| e.reason.as_deref() == Some("AttemptFailed"))
        .expect("an AttemptFailed event");
    assert_eq!(attempt.type_.as_deref(), Some("Warning"));
    assert!(
        attempt
            .note
            .as_deref()
            .unwrap()
            .contains(&format!("attempt 1 failed: converter exited 1: {error}")),
        "{attempt:?}"
    );
    // The second attempt runs and succeeds.
    let second = nth_pod(&env, "sft-to-hf-g1", 1).await;
    set_pod_status(&env, &second, running()).await;
    let ok = json!({"v": 1, "step": "convert/megatron_to_hf", "status": "succeeded",
        "output": "/data/target/sft-hf", "tensors": 3, "bytes": 12, "seconds": 1.0,
        "checks_passed": 4, "checks_failed": 0});
    set_pod_status(&env, &second, terminated(0, &ok.to_string())).await;
    let cr = env
        .wait_condition("sft-to-hf", "Succeeded", "True", &mut op)
        .await;
    assert_eq!(cr.status.as_ref().unwrap().failed_attempts, Some(1));
    // Never back to "starting" once it ran.
    let seen = reasons.lock().unwrap().clone();
    let first_running = seen
        .iter()
        .position(|r| r == "JobRunning")
        .expect("JobRunning seen");
    assert!(
        !seen[first_running..].iter().any(|r| r == "JobCreated"),
        "status went back to JobCreated: {seen:?}"
    );
    let created = env
        .events_of("sft-to-hf")
        .await
        .iter()
        .filter(|e| e.reason.as_deref() == Some("JobCreated"))
        .map(|e| e.series.as_ref().map_or(1, |s| s.count))
        .sum::<i32>();
    assert_eq!(created, 1, "JobCreated told once");
    op.stop();
}

/// Converter warnings and a reused output (wire format version 1, optional fields)
/// reach status and events, each told once.
#[tokio::test]
async fn converter_warnings_and_reuse_reach_status_and_events_on_the_stand_in() {
    let env = Env::new("warnings").await;
    let mut op = Operator::start(&env, "warnings").await;
    env.apply_ok("megatron-to-hf.yaml").await;
    let pod = nth_pod(&env, "sft-to-hf-g1", 0).await;
    let summary = json!({"v": 1, "step": "convert/megatron_to_hf", "status": "succeeded",
        "output": "/data/target/sft-hf", "reused": true, "checks_passed": 4, "checks_failed": 0,
        "warnings": ["base name could not be confirmed: config.json names no _name_or_path"]});
    set_pod_status(&env, &pod, terminated(0, &summary.to_string())).await;
    let cr = env
        .wait_condition("sft-to-hf", "Succeeded", "True", &mut op)
        .await;
    assert_eq!(condition(&cr, "Succeeded").1, "OutputReused");
    let s = cr.status.unwrap().summary.unwrap();
    assert_eq!(s.reused, Some(true));
    assert_eq!(
        s.warnings,
        ["base name could not be confirmed: config.json names no _name_or_path"]
    );
    let waiting = Waiting::new("a ConverterWarning event");
    loop {
        let events = env.events_of("sft-to-hf").await;
        if let Some(e) = events
            .iter()
            .find(|e| e.reason.as_deref() == Some("ConverterWarning"))
        {
            assert_eq!(e.type_.as_deref(), Some("Warning"));
            assert!(e.series.is_none(), "told once: {e:?}");
            break;
        }
        waiting.tick(|| format!("{events:#?}")).await;
    }
    op.stop();
}
