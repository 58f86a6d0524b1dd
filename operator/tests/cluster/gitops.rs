//! The operator as GitOps tools drive it (issue 10): manifests re-applied with
//! server-side apply, fields edited, several resources applied at once, owners
//! deleted. Each finding of the issue has a test here that fails on the operator as
//! it was.

use std::collections::BTreeMap;

use ckpt_operator::api::CheckpointConversion;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};

use crate::support::{
    Env, Operator, condition, condition_status, contents, converting, cp, finished, fixtures,
    kubectl, lora_adapters, phase, succeeded, validated,
};

/// The operator has decided on the resource's current spec.
fn caught_up(cr: &CheckpointConversion) -> bool {
    cr.status.as_ref().and_then(|s| s.observed_generation) == cr.metadata.generation
}

/// `kubectl patch` of resource `name` with a patch of `kind` (merge or json).
async fn patch(env: &Env, name: &str, kind: &str, patch: &str) -> crate::support::Run {
    let kind = format!("--type={kind}");
    kubectl(
        &[
            "patch",
            "checkpointconversion",
            name,
            "-n",
            &env.ns,
            &kind,
            "-p",
            patch,
        ],
        "",
    )
    .await
}

async fn merge_patch(env: &Env, name: &str, p: &str) -> crate::support::Run {
    patch(env, name, "merge", p).await
}

async fn json_patch(env: &Env, name: &str, p: &str) -> crate::support::Run {
    patch(env, name, "json", p).await
}

/// How many events with `reason` were told about `name` (a repeated one counts its
/// series).
async fn told(env: &Env, name: &str, reason: &str) -> i32 {
    env.events_of(name)
        .await
        .iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| e.series.as_ref().map_or(1, |s| s.count))
        .sum()
}

/// Regression (issue 10, finding 1): a Job setting changed on a finished resource
/// bumped its generation, started Job `-g2`, and the converter's refusal turned the
/// resource Failed. Job settings, labels and annotations must change nothing.
#[tokio::test]
async fn editing_what_does_not_define_the_output_reruns_nothing() {
    let (env, mut op) = converting("edit-finished").await;
    env.apply_ok("megatron-to-hf.yaml").await;
    let done = env
        .wait_for(
            "sft-to-hf",
            "Succeeded and Validated",
            &mut [&mut op],
            validated,
        )
        .await;
    let output = env.claim("lustre-shared").join("output/convert/sft-hf");
    let published = contents(&output);
    for (i, patch) in [
        r#"{"spec":{"job":{"ttlSecondsAfterFinished":3600,"backoffLimit":3}}}"#,
        r#"{"spec":{"job":{"resources":{"limits":{"memory":"32Gi"}},"image":"ghcr.io/ckpt-dev/ckpt-convert:other"}}}"#,
        r#"{"metadata":{"labels":{"team":"research"},"annotations":{"note":"edited"}}}"#,
    ]
    .iter()
    .enumerate()
    {
        let before = env.get("sft-to-hf").await.metadata.generation;
        merge_patch(&env, "sft-to-hf", patch)
            .await
            .expect_ok(&format!("edit {i}"));
        let cr = env
            .wait_for("sft-to-hf", "the edit seen", &mut [&mut op], |cr| {
                caught_up(cr) && (i == 2 || cr.metadata.generation > before)
            })
            .await;
        assert_eq!(phase(&cr), Some("Succeeded"), "{:#?}", cr.status);
        assert_eq!(condition(&cr, "Validated").0, "True");
        assert_eq!(
            cr.status.as_ref().unwrap().summary,
            done.status.as_ref().unwrap().summary
        );
    }
    assert_eq!(env.pods_run().await, 1, "one pod ran the conversion");
    // The Job is removed (as its TTL would); the result stays, and nothing starts.
    kubectl(
        &[
            "delete",
            "job",
            "sft-to-hf-g1",
            "-n",
            &env.ns,
            "--cascade=background",
        ],
        "",
    )
    .await
    .expect_ok("deleting the finished Job");
    let before = env.get("sft-to-hf").await.metadata.generation;
    merge_patch(
        &env,
        "sft-to-hf",
        r#"{"spec":{"job":{"ttlSecondsAfterFinished":7200}}}"#,
    )
    .await
    .expect_ok("an edit after the Job is gone");
    let cr = env
        .wait_for("sft-to-hf", "the last edit seen", &mut [&mut op], |cr| {
            caught_up(cr) && cr.metadata.generation > before
        })
        .await;
    assert_eq!(phase(&cr), Some("Succeeded"), "{:#?}", cr.status);
    let jobs: Vec<String> = env
        .jobs()
        .await
        .iter()
        .filter_map(|j| j.metadata.name.clone())
        .collect();
    assert!(jobs.is_empty() || jobs == ["sft-to-hf-g1"], "{jobs:?}");
    // No pod of another Job: on the real node the deleted Job's pod may still be
    // on its way out; the stand-in also counts what it ran.
    let pods: Api<Pod> = Api::namespaced(env.cp.client(), &env.ns);
    for pod in pods.list(&Default::default()).await.unwrap().items {
        let job = pod.labels().get("job-name").cloned();
        assert_eq!(
            job.as_deref(),
            Some("sft-to-hf-g1"),
            "{:?}",
            pod.metadata.name
        );
    }
    if env.standin.is_some() {
        assert_eq!(env.pods_run().await, 1);
    }
    assert_eq!(told(&env, "sft-to-hf", "JobCreated").await, 1);
    assert_eq!(contents(&output), published, "the output changed");
    op.stop();
}

/// Regression (issue 10, finding 2): `self == oldSelf` on an optional field only runs
/// when an old value exists, so `validation` could be added after creation. Every
/// optional field that defines the output can be neither added nor removed.
#[tokio::test]
async fn optional_output_fields_cannot_be_added_or_removed() {
    let env = Env::new("immutable").await;
    for example in [
        "megatron-to-hf.yaml",
        "hf-to-megatron.yaml",
        "merge-lora-hf-peft.yaml",
    ] {
        env.apply_example(example).await.expect_ok(example);
    }
    let refused =
        |name: &'static str, kind: &'static str, patch: &'static str, needle: &'static str| {
            let env = &env;
            async move {
                let run = match kind {
                    "merge" => merge_patch(env, name, patch).await,
                    _ => json_patch(env, name, patch).await,
                };
                let err = run.expect_err(&format!("{name}: {patch}"));
                assert!(err.contains(needle), "{name}: {patch}: {err}");
            }
        };
    // Added where absent.
    refused(
        "sft-to-hf",
        "merge",
        r#"{"spec":{"validation":{"enabled":false}}}"#,
        "validation is immutable",
    )
    .await;
    refused(
        "sft-to-hf",
        "merge",
        r#"{"spec":{"parallelism":{"tp":2}}}"#,
        "parallelism is immutable",
    )
    .await;
    refused(
        "llama3b-to-megatron",
        "merge",
        r#"{"spec":{"baseModel":{"pvc":"models","path":"hf/other"}}}"#,
        "baseModel is immutable",
    )
    .await;
    refused(
        "sft-to-hf",
        "merge",
        r#"{"spec":{"baseModel":{"modelId":"org/model"}}}"#,
        "baseModel is immutable",
    )
    .await;
    refused(
        "peft-merge",
        "merge",
        r#"{"spec":{"lora":{"baseDigest":"abc"}}}"#,
        "lora is immutable",
    )
    .await;
    // Removed where present.
    for (name, path, needle) in [
        ("sft-to-hf", "/spec/dtype", "dtype is immutable"),
        ("sft-to-hf", "/spec/baseModel", "baseModel is immutable"),
        (
            "llama3b-to-megatron",
            "/spec/parallelism",
            "parallelism is immutable",
        ),
        ("peft-merge", "/spec/lora", "lora is immutable"),
    ] {
        let patch = format!(r#"[{{"op":"remove","path":"{path}"}}]"#);
        let err = json_patch(&env, name, &patch)
            .await
            .expect_err(&format!("{name}: remove {path}"));
        assert!(err.contains(needle), "{name}: remove {path}: {err}");
    }
    // validation added at creation cannot be removed either.
    let with_validation = env
        .example("megatron-to-hf.yaml")
        .replace("name: sft-to-hf", "name: validated")
        .replace(
            "  dtype: bfloat16",
            "  dtype: bfloat16\n  validation:\n    smokeTest: true",
        );
    kubectl(&["apply", "-f", "-"], &with_validation)
        .await
        .expect_ok("a resource with validation");
    refused(
        "validated",
        "json",
        r#"[{"op":"remove","path":"/spec/validation"}]"#,
        "validation is immutable",
    )
    .await;
    // retry only goes up; the Job settings change freely.
    merge_patch(&env, "sft-to-hf", r#"{"spec":{"retry":2}}"#)
        .await
        .expect_ok("raising retry");
    refused(
        "sft-to-hf",
        "merge",
        r#"{"spec":{"retry":1}}"#,
        "retry may only be raised",
    )
    .await;
    merge_patch(
        &env,
        "sft-to-hf",
        r#"{"spec":{"job":{"threads":4,"nodeSelector":{"disk":"fast"}}}}"#,
    )
    .await
    .expect_ok("Job settings");
}

/// The resources `names`, all writing examples/megatron-to-hf.yaml's target, in one
/// manifest.
fn same_target(env: &Env, names: &[&str]) -> String {
    names
        .iter()
        .map(|n| {
            env.example("megatron-to-hf.yaml")
                .replace("name: sft-to-hf", &format!("name: {n}"))
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// Regression (issue 10, finding 3): resources naming one target, applied in one
/// `kubectl apply`, each got a Job, because each checked a watch cache that had not
/// seen the others. Names run backwards so that a check against the cache picks a
/// different "first" than the one reconciled first.
#[tokio::test]
async fn resources_applied_together_for_one_target_start_one_job() {
    let (env, mut op) = converting("race").await;
    let names = ["d-sft", "c-sft", "b-sft", "a-sft"];
    kubectl(&["apply", "-f", "-"], &same_target(&env, &names))
        .await
        .expect_ok("four resources for one target");
    let mut accepted = Vec::new();
    let mut owner = None;
    for name in names {
        let cr = env
            .wait_for(name, "Accepted decided", &mut [&mut op], |cr| {
                condition_status(cr, "Accepted").is_some()
            })
            .await;
        let (status, reason, message) = condition(&cr, "Accepted");
        if status == "True" {
            accepted.push(name);
        } else {
            assert_eq!(reason, "TargetConflict", "{name}: {message}");
            assert_eq!(phase(&cr), Some("Rejected"));
            owner.get_or_insert(message);
        }
    }
    assert_eq!(accepted.len(), 1, "exactly one owner: {accepted:?}");
    let owner_name = accepted[0];
    assert!(
        owner
            .unwrap()
            .contains(&format!("owned by CheckpointConversion {owner_name}")),
        "the refusal names the owner"
    );
    env.wait_for(owner_name, "Succeeded", &mut [&mut op], succeeded)
        .await;
    let jobs = env.jobs().await;
    assert_eq!(
        jobs.iter()
            .filter_map(|j| j.metadata.name.clone())
            .collect::<Vec<_>>(),
        vec![format!("{owner_name}-g1")]
    );
    assert_eq!(env.pods_run().await, 1);
    op.stop();
}

/// Regression (issue 10, finding 4): a resource refused for its target stayed
/// Rejected, naming an owner that was deleted, until something touched it. It is
/// looked at again when the owner goes, and takes the target.
#[tokio::test]
async fn a_refused_resource_is_reconsidered_when_the_owner_goes() {
    let (env, mut op) = converting("owner-gone").await;
    env.apply_ok("megatron-to-hf.yaml").await;
    env.wait_for("sft-to-hf", "Succeeded", &mut [&mut op], succeeded)
        .await;
    // The same target in float32: another output, so it may not overwrite.
    let second = env
        .example("megatron-to-hf.yaml")
        .replace("name: sft-to-hf", "name: sft-to-hf-fp32")
        .replace("dtype: bfloat16", "dtype: float32");
    kubectl(&["apply", "-f", "-"], &second)
        .await
        .expect_ok("the second resource");
    let cr = env
        .wait_for("sft-to-hf-fp32", "refused", &mut [&mut op], |cr| {
            condition_status(cr, "Accepted").as_deref() == Some("False")
        })
        .await;
    assert!(condition(&cr, "Accepted").2.contains("sft-to-hf"));
    let api: Api<CheckpointConversion> = Api::namespaced(cp().await.client(), &env.ns);
    api.delete("sft-to-hf", &DeleteParams::background())
        .await
        .unwrap();
    // Nothing touches the second resource: the owner's deletion is what wakes it.
    let cr = env
        .wait_for("sft-to-hf-fp32", "accepted", &mut [&mut op], |cr| {
            condition_status(cr, "Accepted").as_deref() == Some("True")
        })
        .await;
    assert_eq!(cr.metadata.generation, Some(1));
    let leases: Api<Lease> = Api::namespaced(cp().await.client(), &env.ns);
    let record = leases
        .get("ckpt-targets.lustre-shared")
        .await
        .expect("the claim record");
    let entries: serde_json::Value = serde_json::from_str(
        record
            .metadata
            .annotations
            .unwrap_or_default()
            .get("ckpt.dev/targets")
            .expect("entries"),
    )
    .unwrap();
    assert_eq!(
        entries["output/convert/sft-hf"]["name"], "sft-to-hf-fp32",
        "{entries}"
    );
    // It ran (and the converter, finding another conversion there, refused to
    // overwrite it).
    let cr = env
        .wait_for("sft-to-hf-fp32", "finished", &mut [&mut op], finished)
        .await;
    assert_eq!(
        cr.status.unwrap().job_name.as_deref(),
        Some("sft-to-hf-fp32-g1")
    );
    op.stop();
}

/// Server-side apply as GitOps tools use it: applying the same manifest again is a
/// no-op for the apiserver and the operator, `kubectl diff` finds no drift once the
/// operator has written status, and the applier alone owns the spec.
#[tokio::test]
async fn server_side_apply_is_idempotent_and_shows_no_drift() {
    let (env, mut op) = converting("ssa").await;
    let manifest = env.example("megatron-to-hf.yaml");
    env.apply_server_side(&manifest, "argocd-controller")
        .await
        .expect_ok("server-side apply");
    let done = env
        .wait_for("sft-to-hf", "Succeeded", &mut [&mut op], |cr| {
            succeeded(cr) && condition_status(cr, "Validated").is_some()
        })
        .await;
    for _ in 0..2 {
        let out = env
            .apply_server_side(&manifest, "argocd-controller")
            .await
            .expect_ok("server-side apply again");
        assert!(out.contains("serverside-applied"), "{out}");
    }
    let again = env.get("sft-to-hf").await;
    assert_eq!(
        again.metadata.resource_version, done.metadata.resource_version,
        "applying the same manifest changed the resource"
    );
    assert_eq!(again.metadata.generation, Some(1));
    let diff = kubectl(
        &[
            "diff",
            "--server-side",
            "--force-conflicts",
            "--field-manager=argocd-controller",
            "-f",
            "-",
        ],
        &manifest,
    )
    .await;
    assert!(
        diff.ok,
        "kubectl diff found drift:\n{}\n{}",
        diff.stdout, diff.stderr
    );
    // Field managers: the applier owns the spec, the operator only the status.
    let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for mf in again.metadata.managed_fields.unwrap_or_default() {
        let fields = mf.fields_v1.map(|f| f.0).unwrap_or_default();
        let top: Vec<String> = fields
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        owners
            .entry(format!(
                "{}:{}:{}",
                mf.manager.unwrap_or_default(),
                mf.operation.unwrap_or_default(),
                mf.subresource.unwrap_or_default()
            ))
            .or_default()
            .extend(top);
    }
    let spec_owners: Vec<&String> = owners
        .iter()
        .filter(|(_, f)| f.iter().any(|k| k == "f:spec"))
        .map(|(m, _)| m)
        .collect();
    assert_eq!(spec_owners, ["argocd-controller:Apply:"], "{owners:#?}");
    assert_eq!(
        owners.get("ckpt-operator:Apply:status"),
        Some(&vec!["f:status".to_owned()]),
        "{owners:#?}"
    );
    assert_eq!(owners.len(), 2, "{owners:#?}");
    op.stop();
}

/// The Argo CD loop the issue asks for: every example re-applied with server-side
/// apply ten times, each field that does not define the output edited once, and at
/// the end every resource in the phase it had, one Job per resource, and the outputs
/// unchanged.
#[tokio::test]
async fn an_argo_cd_style_sync_loop_changes_nothing_it_should_not() {
    let mut env = Env::new("argo-loop").await;
    fixtures(&env);
    lora_adapters(&env);
    env.start_node().await;
    let mut op = Operator::start(&env, "argo-loop").await;
    const MANAGER: &str = "argocd-controller";
    // The Megatron-Bridge merge reads hf-to-megatron's output: it comes once that
    // exists, as a sync wave would order it.
    let examples = [
        ("megatron-to-hf.yaml", "sft-to-hf"),
        ("hf-to-megatron.yaml", "llama3b-to-megatron"),
        ("merge-lora-hf-peft.yaml", "peft-merge"),
        ("merge-lora-megatron-bridge.yaml", "sft-lora-merge"),
    ];
    for (file, name) in &examples[..3] {
        env.apply_server_side(&env.example(file), MANAGER)
            .await
            .expect_ok(file);
        let _ = name;
    }
    env.wait_for(
        "llama3b-to-megatron",
        "Succeeded",
        &mut [&mut op],
        succeeded,
    )
    .await;
    let (file, _) = examples[3];
    env.apply_server_side(&env.example(file), MANAGER)
        .await
        .expect_ok(file);
    let mut phases = BTreeMap::new();
    for (_, name) in examples {
        let cr = env
            .wait_for(name, "finished", &mut [&mut op], |cr| {
                matches!(phase(cr), Some("Succeeded" | "Failed"))
            })
            .await;
        phases.insert(name, phase(&cr).unwrap().to_owned());
    }
    assert!(
        phases.values().all(|p| p == "Succeeded"),
        "every example converts: {phases:?}"
    );
    let outputs = [
        "output/convert/sft-hf",
        "output/convert/llama3b-megatron",
        "output/convert/peft-merged-hf",
        "output/convert/sft-lora-merged-hf",
        "output/convert/sft-lora-merged-megatron",
    ];
    let before: Vec<_> = outputs
        .iter()
        .map(|o| contents(&env.claim("lustre-shared").join(o)))
        .collect();

    // One edit per mutable field, each applied to every example as a changed manifest
    // (Git changed), between rounds of applying the manifests as they are.
    let edits: [(&str, &str); 17] = [
        ("image", "    image: ghcr.io/ckpt-dev/ckpt-convert:edited"),
        ("imagePullPolicy", "    imagePullPolicy: Always"),
        (
            "imagePullSecrets",
            "    imagePullSecrets:\n    - name: regcred",
        ),
        (
            "resources",
            "    resources:\n      limits:\n        memory: 64Gi",
        ),
        ("nodeSelector", "    nodeSelector:\n      disk: fast"),
        (
            "tolerations",
            "    tolerations:\n    - key: gpu\n      operator: Exists",
        ),
        ("serviceAccountName", "    serviceAccountName: other"),
        ("priorityClassName", "    priorityClassName: batch-low"),
        ("backoffLimit", "    backoffLimit: 5"),
        (
            "ttlSecondsAfterFinished",
            "    ttlSecondsAfterFinished: 999999",
        ),
        ("activeDeadlineSeconds", "    activeDeadlineSeconds: 86400"),
        ("fsGroup", "    fsGroup: 2000"),
        ("runAsUser", "    runAsUser: 1234"),
        ("runAsGroup", "    runAsGroup: 1234"),
        ("threads", "    threads: 3"),
        ("labels", ""),
        ("annotations", ""),
    ];
    let edited = |file: &str, field: &str, line: &str| -> String {
        let text = env.example(file);
        match field {
            "labels" => text.replacen(
                "metadata:\n",
                "metadata:\n  labels:\n    edited: \"yes\"\n",
                1,
            ),
            "annotations" => text.replacen(
                "metadata:\n",
                "metadata:\n  annotations:\n    argocd.argoproj.io/sync-wave: \"2\"\n",
                1,
            ),
            _ => {
                // Replace the field if the example sets it, else add it under job:.
                let key = format!("    {field}:");
                let mut text = if text.contains(&key) {
                    let start = text.find(&key).unwrap();
                    let mut end = start + text[start..].find('\n').unwrap() + 1;
                    while text[end..].starts_with("      ") || text[end..].starts_with("    - ") {
                        end += text[end..].find('\n').unwrap() + 1;
                    }
                    format!("{}{}\n{}", &text[..start], line, &text[end..])
                } else if text.contains("\n  job:\n") {
                    text.replacen("\n  job:\n", &format!("\n  job:\n{line}\n"), 1)
                } else {
                    format!(
                        "{}  job:\n{line}\n",
                        text.trim_end_matches('\n').to_owned() + "\n"
                    )
                };
                if !text.ends_with('\n') {
                    text.push('\n');
                }
                text
            }
        }
    };
    for round in 0..10 {
        for (file, _) in examples {
            env.apply_server_side(&env.example(file), MANAGER)
                .await
                .expect_ok(&format!("round {round}: {file}"));
        }
        for (field, line) in edits.iter().skip(round * 2).take(2) {
            for (file, _) in examples {
                env.apply_server_side(&edited(file, field, line), MANAGER)
                    .await
                    .expect_ok(&format!("edit {field} of {file}"));
            }
        }
    }
    // Back to the manifests as they are, and the operator has seen it all.
    for (file, _) in examples {
        env.apply_server_side(&env.example(file), MANAGER)
            .await
            .expect_ok(file);
    }
    for (_, name) in examples {
        let cr = env
            .wait_for(name, "caught up", &mut [&mut op], caught_up)
            .await;
        assert!(
            cr.metadata.generation.unwrap() > 15,
            "{name}: the spec edits were new generations: {:?}",
            cr.metadata.generation
        );
        assert_eq!(
            phase(&cr),
            Some(phases[name].as_str()),
            "{name}: {:#?}",
            cr.status
        );
        assert_eq!(told(&env, name, "JobCreated").await, 1, "{name}");
    }
    let mut jobs: Vec<String> = env
        .jobs()
        .await
        .iter()
        .filter_map(|j| j.metadata.name.clone())
        .collect();
    jobs.sort();
    assert_eq!(
        jobs,
        [
            "llama3b-to-megatron-g1",
            "peft-merge-g1",
            "sft-lora-merge-g1",
            "sft-to-hf-g1"
        ],
        "one Job per resource"
    );
    assert_eq!(env.pods_run().await, 4);
    for (o, b) in outputs.iter().zip(&before) {
        assert_eq!(
            &contents(&env.claim("lustre-shared").join(o)),
            b,
            "{o} changed"
        );
    }
    op.stop();
}
