//! Leader election, judged by what the cluster records rather than by logs: the
//! Lease's `holderIdentity`, the replica each Job names as its creator
//! (`ckpt.dev/created-by`), and the reporting instance of each event.

use std::collections::BTreeSet;

use k8s_openapi::api::batch::v1::Job;

use crate::support::{Env, Operator, fixtures, succeeded};

fn created_by(j: &Job) -> Option<String> {
    j.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("ckpt.dev/created-by").cloned())
}

/// The replicas that reported events about `name`.
async fn reporters(env: &Env, name: &str) -> BTreeSet<String> {
    env.events_of(name)
        .await
        .iter()
        .map(|e| e.reporting_instance.clone().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn two_replicas_share_one_lease_and_only_the_holder_reconciles() {
    let mut env = Env::new("replicas").await;
    fixtures(&env);
    env.start_node().await;
    let mut a = Operator::start(&env, "replica-a").await;
    env.wait_lease_held_by("replica-a", &mut [&mut a]).await;
    let mut b = Operator::start(&env, "replica-b").await;
    env.apply_ok("megatron-to-hf.yaml").await;
    env.wait_for("sft-to-hf", "Succeeded", &mut [&mut a, &mut b], succeeded)
        .await;
    assert_eq!(env.lease_holder().await.as_deref(), Some("replica-a"));
    let jobs = env.jobs().await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(created_by(&jobs[0]).as_deref(), Some("replica-a"));
    assert_eq!(
        reporters(&env, "sft-to-hf").await,
        BTreeSet::from(["replica-a".to_owned()])
    );

    // The leader stops and releases the Lease; the standby takes it and is the one
    // that reconciles from then on.
    a.stop();
    env.wait_lease_held_by("replica-b", &mut [&mut b]).await;
    env.apply_ok("hf-to-megatron.yaml").await;
    env.wait_for("llama3b-to-megatron", "Succeeded", &mut [&mut b], succeeded)
        .await;
    let job = env
        .jobs()
        .await
        .into_iter()
        .find(|j| j.metadata.name.as_deref() == Some("llama3b-to-megatron-g1"))
        .expect("the second Job");
    assert_eq!(created_by(&job).as_deref(), Some("replica-b"));
    assert_eq!(
        reporters(&env, "llama3b-to-megatron").await,
        BTreeSet::from(["replica-b".to_owned()])
    );
    assert_eq!(env.pods_run().await, 2);
    b.stop();
}

#[tokio::test]
async fn a_restarted_operator_makes_no_second_job_and_picks_up_the_result() {
    let mut env = Env::new("restart").await;
    fixtures(&env);
    let mut first = Operator::start(&env, "restart-1").await;
    env.apply_ok("megatron-to-hf.yaml").await;
    // No node yet: the Job's pod waits, as on a busy cluster.
    env.wait_condition("sft-to-hf", "Running", "True", &mut first)
        .await;
    assert_eq!(env.jobs().await.len(), 1);
    first.stop();
    let mut second = Operator::start(&env, "restart-2").await;
    env.wait_lease_held_by("restart-2", &mut [&mut second])
        .await;
    env.start_node().await;
    let cr = env
        .wait_condition("sft-to-hf", "Succeeded", "True", &mut second)
        .await;
    let jobs = env.jobs().await;
    assert_eq!(jobs.len(), 1, "a second Job was created");
    assert_eq!(created_by(&jobs[0]).as_deref(), Some("restart-1"));
    assert_eq!(cr.status.unwrap().job_name.as_deref(), Some("sft-to-hf-g1"));
    assert_eq!(env.pods_run().await, 1);
    // The restarted replica is the one that saw the result.
    let succeeded = env
        .events_of("sft-to-hf")
        .await
        .into_iter()
        .find(|e| e.reason.as_deref() == Some("ConversionSucceeded"))
        .expect("a ConversionSucceeded event");
    assert_eq!(succeeded.reporting_instance.as_deref(), Some("restart-2"));
    second.stop();
}
