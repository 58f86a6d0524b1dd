//! Faults around the operator (issue 11): a reconcile cut off between creating the
//! Job and writing status, and termination messages that are not what the converter
//! writes. Nothing is lost, nothing is done twice, and the operator keeps running.

use serde_json::json;

use crate::support::{
    Env, Operator, Waiting, condition, kubectl, nth_pod, phase, set_pod_status, succeeded,
    terminated,
};

/// Takes the permission to write status away from the operator's Role in `env`'s
/// namespace (`revoke`), or gives it back.
async fn status_writes(env: &Env, revoke: bool) {
    let out = kubectl(
        &[
            "get",
            "role",
            crate::support::RELEASE,
            "-n",
            &env.ns,
            "-o",
            "json",
        ],
        "",
    )
    .await
    .expect_ok("reading the operator's Role");
    let mut role: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rules = role["rules"].as_array_mut().unwrap();
    let status_rule = json!({"apiGroups": ["ckpt.dev"], "resources": ["checkpointconversions/status"], "verbs": ["patch"]});
    rules.retain(|r| r["resources"] != status_rule["resources"]);
    if !revoke {
        rules.push(status_rule);
    }
    kubectl(&["replace", "-f", "-"], &role.to_string())
        .await
        .expect_ok("replacing the operator's Role");
}

/// Regression (issue 11): an operator killed after creating a Job and before writing
/// status. Its status write is refused (RBAC taken away), then it is killed; the next
/// operator finds the Job rather than creating another, and the resource ends right.
#[tokio::test]
async fn an_operator_killed_between_job_and_status_leaves_one_job() {
    let mut env = Env::new("killed").await;
    crate::support::fixtures(&env);
    status_writes(&env, true).await;
    let mut first = Operator::start(&env, "killed-1").await;
    first.expect_denied("patch checkpointconversions/status");
    env.apply_ok("megatron-to-hf.yaml").await;
    let waiting = Waiting::new("the first operator's Job");
    loop {
        first.assert_running();
        if !env.jobs().await.is_empty() {
            break;
        }
        waiting.tick(|| first.log()).await;
    }
    assert!(
        env.get("sft-to-hf").await.status.is_none(),
        "the status was written although it may not be"
    );
    first.kill();
    status_writes(&env, false).await;
    env.start_node().await;
    let mut second = Operator::start(&env, "killed-2").await;
    second.expect_denied("patch checkpointconversions/status");
    let cr = env
        .wait_for("sft-to-hf", "Succeeded", &mut [&mut second], succeeded)
        .await;
    let jobs = env.jobs().await;
    assert_eq!(jobs.len(), 1, "one Job: {jobs:#?}");
    assert_eq!(
        jobs[0]
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("ckpt.dev/created-by"))
            .map(String::as_str),
        Some("killed-1")
    );
    assert_eq!(cr.status.unwrap().job_name.as_deref(), Some("sft-to-hf-g1"));
    assert_eq!(env.pods_run().await, 1);
    second.stop();
}

/// Regression (issue 11): a termination message that is not the converter's summary
/// (malformed JSON, far over the kubelet's 4 KiB) is reported as the failure's text,
/// bounded, and the operator keeps running.
#[tokio::test]
async fn malformed_and_oversized_termination_messages_are_reported() {
    let env = Env::new("bad-message").await;
    let mut op = Operator::start(&env, "bad-message").await;
    env.apply_ok("megatron-to-hf.yaml").await;
    let pod = nth_pod(&env, "sft-to-hf-g1", 0).await;
    let garbage = format!("{{\"v\": 1, \"error\": \"{}", "é".repeat(40_000));
    set_pod_status(&env, &pod, terminated(2, &garbage)).await;
    let cr = env
        .wait_condition("sft-to-hf", "Failed", "True", &mut op)
        .await;
    let (_, reason, message) = condition(&cr, "Failed");
    assert_eq!(reason, "InvalidInput");
    assert!(
        message.starts_with("converter exited 2: {\"v\": 1"),
        "{}",
        &message[..80]
    );
    assert!(message.len() <= 32_000, "{}", message.len());
    assert!(phase(&cr) == Some("Failed"));
    assert!(cr.status.unwrap().message.unwrap().len() <= 204);
    op.assert_running();
    op.stop();
}
