//! Faults around the operator (issue 11): a reconcile cut off between creating the
//! Job and writing status; termination messages that are not what the converter
//! writes; the apiserver restarted and etcd away while Jobs run; a pod evicted, or
//! lost with its node, mid-write; a resource deleted mid-write. Nothing is lost,
//! nothing is done twice, no partial output is ever visible, and the operator keeps
//! running.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::support::{
    Env, Gate, Operator, PrivateControlPlane, Waiting, condition, condition_status, contents,
    kubectl, nth_pod, phase, set_pod_status, succeeded, terminated, validated,
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
async fn malformed_and_oversized_termination_messages_are_reported_on_the_stand_in() {
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

// ---------------------------------------------------------------------------------
// The control plane goes away while Jobs run (each test on a control plane of its
// own: the others share one), and pods go away mid-write.

/// The two conversions these tests run: both example directions.
const CONVERSIONS: [(&str, &str); 2] = [
    ("megatron-to-hf.yaml", "sft-to-hf"),
    ("hf-to-megatron.yaml", "llama3b-to-megatron"),
];

/// An operator and the two conversions, their pods held at the gate (the node
/// reports them Running).
async fn held_at_the_gate(env: &mut Env, gate: &Gate, identity: &str) -> Operator {
    crate::support::fixtures(env);
    gate.node(env).await;
    let mut op = Operator::start(env, identity).await;
    for (file, _) in CONVERSIONS {
        env.apply_ok(file).await;
    }
    for (_, name) in CONVERSIONS {
        // Before the operator's first status write there is no condition yet.
        env.wait_for(name, "its pod running", &mut [&mut op], |cr| {
            condition_status(cr, "Running").is_some() && condition(cr, "Running").1 == "JobRunning"
        })
        .await;
    }
    op
}

/// Waits until the stand-in saw every pod's process exit (what a node knows,
/// whatever the apiserver does meanwhile).
async fn all_exited(env: &Env, n: usize) {
    let waiting = Waiting::new(format!("{n} converter processes to exit"));
    loop {
        let runs = env.runs();
        if runs.len() == n && runs.iter().all(|r| r.exit_code.is_some()) {
            assert!(
                runs.iter().all(|r| r.exit_code == Some(0)),
                "a conversion failed: {runs:#?}"
            );
            return;
        }
        waiting.tick(|| format!("{runs:#?}")).await;
    }
}

/// Both conversions end Succeeded and Validated, with one Job and one pod each,
/// the operator still running.
async fn both_succeed_once(env: &Env, op: &mut Operator) {
    for (_, name) in CONVERSIONS {
        let cr = env
            .wait_for(name, "Succeeded and Validated", &mut [&mut *op], validated)
            .await;
        assert_eq!(phase(&cr), Some("Succeeded"));
    }
    let jobs = env.jobs().await;
    assert_eq!(jobs.len(), 2, "one Job each: {jobs:#?}");
    assert_eq!(env.runs().len(), 2, "one pod each: {:#?}", env.runs());
    op.assert_running();
}

/// Issue 11: the apiserver restarts while conversion Jobs run, and the conversions
/// finish while it is away. The operator's and the Job controller's watches
/// reconnect, the node reports the pods' ends once it is back, and both resources
/// end Succeeded and Validated with one Job each; the operator keeps running.
#[tokio::test]
async fn conversions_finish_across_an_apiserver_restart_on_the_stand_in() {
    let private = PrivateControlPlane::start().await;
    let cp = private.get();
    let mut env = Env::on(cp, "apiserver-restart", &[]).await;
    let gate = Gate::all();
    let mut op = held_at_the_gate(&mut env, &gate, "apiserver-restart").await;
    cp.stop_component("kube-apiserver").unwrap();
    assert!(
        env.api().await.list(&Default::default()).await.is_err(),
        "the apiserver still answers"
    );
    gate.open("open");
    all_exited(&env, 2).await;
    cp.start_component("kube-apiserver")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    both_succeed_once(&env, &mut op).await;
    op.stop();
}

/// Issue 11: etcd is away for a few seconds while conversion Jobs run and finish.
/// The apiserver cannot read or write meanwhile; afterwards both resources end
/// Succeeded and Validated with one Job each, nothing lost and nothing done twice,
/// and the operator keeps running.
#[tokio::test]
async fn a_brief_etcd_outage_loses_and_repeats_nothing_on_the_stand_in() {
    let private = PrivateControlPlane::start().await;
    let cp = private.get();
    let mut env = Env::on(cp, "etcd-outage", &[]).await;
    let gate = Gate::all();
    let mut op = held_at_the_gate(&mut env, &gate, "etcd-outage").await;
    cp.stop_component("etcd").unwrap();
    let api = env.api().await;
    let read = tokio::time::timeout(Duration::from_secs(10), api.get("sft-to-hf")).await;
    assert!(
        !matches!(read, Ok(Ok(_))),
        "the apiserver served a read without etcd"
    );
    gate.open("open");
    all_exited(&env, 2).await;
    // The outage itself: writes of the node and the operator keep failing a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    cp.start_component("etcd")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    both_succeed_once(&env, &mut op).await;
    op.stop();
}

/// A Llama of about 21 M parameters (42 MB) at `hf/medium` on the models claim: its
/// conversion writes long enough to be caught mid-write.
fn medium_source(env: &Env) {
    use ckpt_convert::synthetic::{self, ModelShape};
    let shape = ModelShape {
        layers: 4,
        hidden: 512,
        intermediate: 1536,
        heads: 8,
        kv_heads: 4,
        head_dim: 64,
        vocab: 8192,
        ..ModelShape::tiny_llama()
    };
    synthetic::write_hf(&env.claim("models").join("hf/medium"), &shape, 7, 1 << 30).unwrap();
}

/// `medium` converted to Megatron at `output/convert/medium`, one thread.
fn medium_manifest(ns: &str) -> String {
    format!(
        "apiVersion: ckpt.dev/v1alpha1
kind: CheckpointConversion
metadata:
  name: medium
  namespace: {ns}
spec:
  source: {{kind: checkpoint_hf, pvc: models, path: hf/medium}}
  target: {{kind: checkpoint_megatron, pvc: lustre-shared, path: output/convert/medium}}
  job: {{threads: 1}}
"
    )
}

/// The environment of a mid-write fault: the medium source, a node, an operator
/// and the medium conversion applied.
async fn medium_conversion(prefix: &str) -> (Env, Operator) {
    let mut env = Env::new(prefix).await;
    env.needs_standin("stops and resumes the converter process on the node");
    medium_source(&env);
    env.start_node().await;
    let op = Operator::start(&env, prefix).await;
    env.kubectl(&["apply", "-f", "-"], &medium_manifest(&env.ns))
        .await
        .expect_ok("applying the medium conversion");
    (env, op)
}

fn medium_target(env: &Env) -> std::path::PathBuf {
    env.claim("lustre-shared").join("output/convert/medium")
}

/// The staging directories of `target`: beside it (an HF directory), or inside it
/// beside the iteration being written (a Megatron run directory).
fn stagings(target: &Path) -> Vec<std::path::PathBuf> {
    let beside = format!(
        ".{}.ckpt-staging-",
        target.file_name().unwrap().to_string_lossy()
    );
    let list = |dir: &Path, wanted: &dyn Fn(&str) -> bool| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| wanted(&e.file_name().to_string_lossy()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut found = list(target.parent().unwrap(), &|n| n.starts_with(&beside));
    found.extend(list(target, &|n| {
        n.starts_with(".iter_") && n.contains(".ckpt-staging-")
    }));
    found
}

/// Whether `target` looks published: an HF directory exists, or a Megatron run
/// directory holds an iteration or its tracker (the run directory itself exists
/// while the iteration is staged inside it).
pub(crate) fn published(target: &Path) -> bool {
    target.join("ckpt-manifest.json").exists()
        || target.join("latest_checkpointed_iteration.txt").exists()
        || std::fs::read_dir(target).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("iter_"))
        })
}

/// Whether any file under `dir` holds data.
fn has_data(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            let p = e.path();
            if p.is_dir() {
                has_data(&p)
            } else {
                e.metadata().is_ok_and(|m| m.len() > 0)
            }
        })
    })
}

fn proc_status(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: signals a converter process this test's node stand-in started.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Catches the converter writing `target` mid-write (the stand-in runs it as a local
/// process, whose pid its staging directory names): once a file in its staging
/// directory holds data, it is stopped there (SIGSTOP). Returns its pid and that
/// staging directory.
async fn stop_mid_write(target: &Path) -> (i32, std::path::PathBuf) {
    let started = std::time::Instant::now();
    loop {
        for staging in stagings(target) {
            let name = staging.file_name().unwrap().to_string_lossy().into_owned();
            let pid: i32 = name
                .rsplit(".ckpt-staging-")
                .next()
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no pid in {name}"));
            if has_data(&staging) {
                signal(pid, libc::SIGSTOP);
                assert!(!published(target), "published before it could be stopped");
                let stopped = Waiting::new(format!("converter {pid} stopped"));
                while !proc_status(pid).is_some_and(|s| s.contains("State:\tT")) {
                    stopped.tick(|| proc_status(pid).unwrap_or_default()).await;
                }
                return (pid, staging);
            }
        }
        assert!(
            started.elapsed() < crate::support::deadline(),
            "no staging directory of {} with data appeared",
            target.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Lets the stopped converter `pid` go on once the node has asked it to stop
/// (SIGTERM pending): it then handles that first.
async fn resume_on_sigterm(pid: i32) {
    let waiting = Waiting::new(format!("SIGTERM pending for converter {pid}"));
    loop {
        let Some(status) = proc_status(pid) else {
            return;
        };
        let pending = status
            .lines()
            .filter(|l| l.starts_with("ShdPnd:") || l.starts_with("SigPnd:"))
            .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
            .fold(0, |a, b| a | b);
        if pending & (1 << (libc::SIGTERM - 1)) != 0 {
            signal(pid, libc::SIGCONT);
            return;
        }
        waiting.tick(|| status.clone()).await;
    }
}

/// Whether `target` is a complete published output: its manifest (in it, or in
/// the `iter_*` directory of a Megatron run directory) lists files that are all
/// there with their recorded sizes.
fn complete(target: &Path) -> Result<(), String> {
    let dir = std::fs::read_dir(target)
        .map_err(|e| format!("{}: {e}", target.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("iter_"))
        })
        .unwrap_or_else(|| target.to_owned());
    let manifest = dir.join("ckpt-manifest.json");
    let text =
        std::fs::read_to_string(&manifest).map_err(|e| format!("{}: {e}", manifest.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", manifest.display()))?;
    for f in json["files"].as_array().into_iter().flatten() {
        let path = dir.join(f["path"].as_str().unwrap_or_default());
        let size = std::fs::metadata(&path).map(|m| m.len()).ok();
        if size != f["size"].as_u64() {
            return Err(format!(
                "{}: size {size:?}, manifest {}",
                path.display(),
                f["size"]
            ));
        }
    }
    Ok(())
}

/// Looks at `target` every few milliseconds from another thread until finished:
/// whenever it exists, it must be complete.
struct Watch {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl Watch {
    fn start(target: &Path) -> Watch {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (target, stop) = (target.to_owned(), done.clone());
        let thread = std::thread::spawn(move || {
            let (mut seen, mut partial) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if published(&target) {
                    match complete(&target) {
                        Ok(()) => seen += 1,
                        Err(e) => partial.push(e),
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (seen, partial)
        });
        Watch { done, thread }
    }

    /// Asserts that only a complete output was ever seen, and that it was seen.
    fn finish(self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        let (seen, partial) = self.thread.join().unwrap();
        assert!(
            partial.is_empty(),
            "a partial output was visible: {partial:#?}"
        );
        assert!(seen > 0, "the output was never seen");
    }
}

/// What a finished mid-write fault leaves: the medium conversion Succeeded and
/// Validated, its output complete with the converter's report, no staging
/// directory beside it, `runs` pods run, and the disruption not counted as a
/// failed attempt.
async fn medium_succeeded(env: &Env, op: &mut Operator, runs: usize) {
    let cr = env
        .wait_for("medium", "Succeeded and Validated", &mut [op], validated)
        .await;
    let target = medium_target(env);
    complete(&target).unwrap();
    let status = cr.status.unwrap();
    let summary = status.summary.unwrap();
    assert_eq!(summary.checks_failed, Some(0));
    assert!(
        env.claim("lustre-shared")
            .join(summary.report_path.unwrap())
            .is_file()
    );
    assert_eq!(
        status.failed_attempts, None,
        "a disruption is no failed attempt"
    );
    assert!(stagings(&target).is_empty(), "{:?}", stagings(&target));
    assert_eq!(env.runs().len(), runs, "{:#?}", env.runs());
    assert_eq!(env.jobs().await.len(), 1);
}

/// Issue 11: a pod evicted mid-write (the Eviction API: DisruptionTarget, then a
/// graceful deletion). The converter is told to stop and removes its staging
/// directory, the Job starts another pod without counting a failure, and the
/// retry publishes a complete output; nothing partial is ever visible at the
/// target.
#[tokio::test]
async fn an_evicted_pod_is_replaced_and_only_a_complete_output_is_visible_on_the_stand_in() {
    let (env, mut op) = medium_conversion("evicted").await;
    let target = medium_target(&env);
    let watch = Watch::start(&target);
    let (pid, staging) = stop_mid_write(&target).await;
    let pod = nth_pod(&env, "medium-g1", 0).await;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(env.cp.client(), &env.ns);
    pods.evict(
        pod.metadata.name.as_deref().unwrap(),
        &kube::api::EvictParams::default(),
    )
    .await
    .expect("eviction");
    resume_on_sigterm(pid).await;
    medium_succeeded(&env, &mut op, 2).await;
    watch.finish();
    assert!(!staging.exists());
    let runs = env.runs();
    assert_eq!(runs[0].end.as_deref(), Some("Deleted"), "{runs:#?}");
    op.stop();
}

/// Issue 11: the node of a pod is lost mid-write: its processes die with it
/// (SIGKILL, no cleanup) and it reports nothing more; the pod garbage collector
/// marks the pod failed by the disruption and deletes it. On a new node the Job's
/// next pod removes what the killed writer left, publishes a complete output, and
/// nothing partial is ever visible at the target.
#[tokio::test]
async fn a_pod_lost_with_its_node_mid_write_is_replaced_and_only_a_complete_output_is_visible_on_the_stand_in()
 {
    let (mut env, mut op) = medium_conversion("node-lost").await;
    let target = medium_target(&env);
    let watch = Watch::start(&target);
    let (pid, staging) = stop_mid_write(&target).await;
    let pod = nth_pod(&env, "medium-g1", 0).await;
    let name = pod.metadata.name.clone().unwrap();
    drop(env.standin.take());
    let gone = Waiting::new(format!("converter {pid} to die with its node"));
    while proc_status(pid).is_some() {
        // SAFETY: reaps the killed child of this process, if nothing else has.
        unsafe {
            libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
        }
        gone.tick(|| proc_status(pid).unwrap_or_default()).await;
    }
    assert!(staging.exists(), "a killed writer cannot clean up");
    // What the pod garbage collector does with a pod whose node no longer exists.
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(env.cp.client(), &env.ns);
    pods.patch_status(
        &name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Strategic(json!({"status": {"phase": "Failed", "conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC",
             "message": "PodGC: node no longer exists"}]}})),
    )
    .await
    .expect("marking the pod failed");
    pods.delete(
        &name,
        &kube::api::DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .expect("deleting the pod");
    env.start_node().await;
    medium_succeeded(&env, &mut op, 1).await;
    watch.finish();
    op.stop();
}

/// Issue 11: a resource deleted while its Job writes. The Job and its pod go (owner
/// references), the converter is told to stop and removes its staging directory,
/// nothing is published, and the source is untouched.
#[tokio::test]
async fn deleting_a_resource_mid_write_stops_its_pod_and_cleans_staging_on_the_stand_in() {
    let (env, mut op) = medium_conversion("deleted-mid-write").await;
    let source = env.claim("models").join("hf/medium");
    let before = contents(&source);
    let target = medium_target(&env);
    let (pid, staging) = stop_mid_write(&target).await;
    env.kubectl(
        &[
            "delete",
            "checkpointconversion",
            "medium",
            "-n",
            &env.ns,
            "--wait=false",
        ],
        "",
    )
    .await
    .expect_ok("deleting the resource");
    resume_on_sigterm(pid).await;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(env.cp.client(), &env.ns);
    let waiting = Waiting::new("the Job, its pod and the converter to go");
    loop {
        op.assert_running();
        let jobs = env.jobs().await;
        let left = pods.list(&Default::default()).await.unwrap().items.len();
        let exited = env.runs().iter().all(|r| r.exit_code.is_some());
        if jobs.is_empty() && left == 0 && exited {
            break;
        }
        waiting
            .tick(|| format!("{} Jobs, {left} pods, runs {:#?}", jobs.len(), env.runs()))
            .await;
    }
    let runs = env.runs();
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0].end.as_deref(), Some("Deleted"));
    assert_eq!(runs[0].exit_code, Some(128 + libc::SIGTERM), "{runs:#?}");
    assert!(
        !staging.exists(),
        "staging left behind: {}",
        staging.display()
    );
    assert!(stagings(&target).is_empty());
    assert!(!published(&target), "a stopped conversion published");
    assert_eq!(contents(&source), before, "the source changed");
    op.stop();
}
