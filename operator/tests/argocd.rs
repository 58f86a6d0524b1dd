//! The Argo CD health check (`docs/argocd/health.lua`) run by Argo CD's own Lua engine:
//! gopher-lua, at the version Argo CD pins, through `e2e/argocd-lua` (a small Go program
//! that runs a script as Argo CD's `util/lua` does: only the package, base and table
//! libraries, no `string` or `math`, the resource in the global `obj`, the returned
//! table encoded with gopher-json and read as the health).
//!
//! The statuses come from the operator's own decision code ([`decide::decide`]), so a
//! change of conditions or reasons there shows up here.

use std::io::Write;
use std::process::{Command, Stdio};

use ckpt_operator::api::{ArtifactKind, CheckpointConversion, ValidationSpec};
use ckpt_operator::conditions;
use ckpt_operator::decide::{self, JobView, Observed, PodView};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::json;

const SCRIPT_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/argocd/health.lua");
const README_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/argocd/README.md");

fn script() -> String {
    std::fs::read_to_string(SCRIPT_PATH).unwrap_or_else(|e| panic!("{SCRIPT_PATH}: {e}"))
}

/// Runs `script_path` on `obj` in Argo CD's engine: its JSON answer.
fn run_lua(script_path: &str, obj: &serde_json::Value) -> serde_json::Value {
    let bin = ckpt_testcluster::argocd_health_binary().unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(&bin)
        .arg(script_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let mut stdin = child.stdin.take().expect("piped");
    writeln!(stdin, "{obj}").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON answer")
}

/// Runs the health script on `obj`: (status, message).
fn health(obj: &serde_json::Value) -> (String, String) {
    let answer = run_lua(SCRIPT_PATH, obj);
    if let Some(e) = answer["error"].as_str() {
        panic!("health.lua failed on {obj:#}:\n{e}");
    }
    let status = answer["status"].as_str().expect("a status").to_owned();
    let message = answer["message"].as_str().unwrap_or_default().to_owned();
    assert!(
        [
            "Healthy",
            "Progressing",
            "Degraded",
            "Suspended",
            "Missing",
            "Unknown"
        ]
        .contains(&status.as_str()),
        "not an Argo CD health status: {status}"
    );
    (status, message)
}

#[test]
fn the_engine_is_argo_cds_sandbox() {
    // What a health script may use without useOpenLibs: no string or math library,
    // no io, os or debug.
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe.lua");
    std::fs::write(
        &probe,
        "local present = {}\n\
         for _, name in ipairs({'string', 'math', 'io', 'os', 'debug', 'table', 'pairs', 'require'}) do\n\
           if _G[name] ~= nil then table.insert(present, name) end\n\
         end\n\
         return { status = 'Healthy', message = table.concat(present, ',') }\n",
    )
    .unwrap();
    let answer = run_lua(probe.to_str().unwrap(), &json!({}));
    assert_eq!(answer["message"], "table,pairs,require", "{answer}");
    // A status Argo CD does not know is Unknown, as in Argo CD.
    std::fs::write(&probe, "return { status = 'Fine', message = 'x' }\n").unwrap();
    let answer = run_lua(probe.to_str().unwrap(), &json!({}));
    assert_eq!(answer["status"], "Unknown", "{answer}");
    // The resource arrives in `obj`, null as nil, integers as numbers.
    std::fs::write(
        &probe,
        "return { status = 'Healthy', message = tostring(obj.metadata.generation + 1) .. tostring(obj.status) }\n",
    )
    .unwrap();
    let answer = run_lua(
        probe.to_str().unwrap(),
        &json!({"metadata": {"generation": 2}, "status": null}),
    );
    assert_eq!(answer["message"], "3nil", "{answer}");
}

fn at(secs: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
}

/// examples/megatron-to-hf.yaml as the apiserver stores it at creation.
fn resource() -> CheckpointConversion {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/megatron-to-hf.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut c: CheckpointConversion = serde_yaml_ng::from_str(&text).expect("the example parses");
    c.metadata.generation = Some(1);
    c.metadata.creation_timestamp = Some(at(1_000));
    c
}

/// The resource after one decision on `obs` (and one before it, as the operator goes:
/// first the Job is created, then it is observed).
fn decided(cr: CheckpointConversion, obs: &Observed) -> CheckpointConversion {
    let created = decide::decide(&cr, &Observed::default(), &at(1_010));
    let mut cr = cr;
    cr.status = Some(created.status);
    let d = decide::decide(&cr, obs, &at(1_020));
    cr.status = Some(d.status);
    cr
}

fn job(obs: impl FnOnce(&mut JobView)) -> JobView {
    let mut j = JobView {
        name: "sft-to-hf-g1".into(),
        start_time: Some(at(1_011)),
        ..JobView::default()
    };
    obs(&mut j);
    j
}

fn finished(summary: serde_json::Value) -> Observed {
    Observed {
        job: Some(job(|j| {
            j.succeeded = 1;
            j.complete = true;
            j.completion_time = Some(at(1_019));
        })),
        pod: Some(PodView {
            exit_code: Some(0),
            message: Some(summary.to_string()),
            ..PodView::default()
        }),
        ..Observed::default()
    }
}

fn success_summary(checks_failed: i64) -> serde_json::Value {
    json!({
        "v": 1, "step": "convert/megatron_to_hf",
        "status": if checks_failed == 0 { "succeeded" } else { "failed" },
        "output": "/data/target/sft-hf", "tensors": 291, "bytes": 6_425_673_728_i64, "files": 9,
        "seconds": 12.5, "weights_digest": "ab12", "checks_passed": 14,
        "checks_failed": checks_failed, "smoke_test_max_abs_diff": 0.0
    })
}

fn message_of(cr: &CheckpointConversion, type_: &str) -> String {
    conditions::get(&cr.status.as_ref().unwrap().conditions, type_)
        .unwrap_or_else(|| panic!("no {type_} condition"))
        .message
        .clone()
}

fn json_of(cr: &CheckpointConversion) -> serde_json::Value {
    serde_json::to_value(cr).unwrap()
}

#[test]
fn a_new_resource_without_status_is_progressing() {
    let (status, message) = health(&json_of(&resource()));
    assert_eq!(status, "Progressing");
    assert!(message.contains("Waiting for the operator"), "{message}");
    // An empty status object, as some tools write, too.
    let mut obj = json_of(&resource());
    obj["status"] = json!({});
    assert_eq!(health(&obj).0, "Progressing");
}

#[test]
fn a_created_or_running_job_is_progressing_with_the_running_message() {
    let created = decided(resource(), &Observed::default());
    assert_eq!(
        health(&json_of(&created)),
        (
            "Progressing".into(),
            message_of(&created, "Running").to_string()
        )
    );

    let running = decided(
        resource(),
        &Observed {
            job: Some(job(|j| j.active = 1)),
            ..Observed::default()
        },
    );
    let (status, message) = health(&json_of(&running));
    assert_eq!(status, "Progressing");
    assert_eq!(message, message_of(&running, "Running"));
    assert!(
        message.contains("is running convert/megatron_to_hf"),
        "{message}"
    );

    // A pod stuck pulling its image is still Progressing; the message says why.
    let pulling = decided(
        resource(),
        &Observed {
            job: Some(job(|j| j.active = 1)),
            pod: Some(PodView {
                waiting: Some(("ImagePullBackOff".into(), "back-off pulling".into())),
                ..PodView::default()
            }),
            ..Observed::default()
        },
    );
    let (status, message) = health(&json_of(&pulling));
    assert_eq!(status, "Progressing");
    assert!(message.contains("ImagePullBackOff"), "{message}");
}

#[test]
fn a_missing_claim_is_waited_for() {
    let cr = resource();
    let d = decide::decide(
        &cr,
        &Observed {
            missing_pvcs: vec!["models".into()],
            ..Observed::default()
        },
        &at(1_010),
    );
    let mut pending = cr;
    pending.status = Some(d.status);
    assert_eq!(
        pending.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );
    let (status, message) = health(&json_of(&pending));
    assert_eq!(status, "Progressing");
    assert_eq!(message, message_of(&pending, "Accepted"));
    assert!(message.contains("models"), "{message}");
}

#[test]
fn succeeded_and_validated_is_healthy() {
    let done = decided(resource(), &finished(success_summary(0)));
    assert_eq!(
        done.status.as_ref().unwrap().phase.as_deref(),
        Some("Succeeded")
    );
    let (status, message) = health(&json_of(&done));
    assert_eq!(status, "Healthy");
    assert_eq!(
        message,
        format!(
            "{}; validated: {}",
            message_of(&done, "Succeeded"),
            message_of(&done, "Validated")
        )
    );
    assert!(message.contains("wrote 291 tensors"), "{message}");
    assert!(message.contains("14 checks passed"), "{message}");
}

#[test]
fn succeeded_without_validation_depends_on_why() {
    // Validation failed: Degraded, with the Validated message.
    let bad = decided(resource(), &finished(success_summary(2)));
    let (status, message) = health(&json_of(&bad));
    assert_eq!(status, "Degraded");
    assert!(
        message.ends_with(&message_of(&bad, "Validated")),
        "{message}"
    );
    assert!(message.contains("2 of 16 checks failed"), "{message}");

    // No validation report from the converter: Degraded too.
    let mut summary = success_summary(0);
    summary.as_object_mut().unwrap().remove("checks_passed");
    summary.as_object_mut().unwrap().remove("checks_failed");
    let unreported = decided(resource(), &finished(summary.clone()));
    assert_eq!(health(&json_of(&unreported)).0, "Degraded");

    // Validation switched off in the spec: the conversion is what was asked for.
    let mut off = resource();
    off.spec.validation = Some(ValidationSpec {
        enabled: Some(false),
        smoke_test: None,
    });
    let off = decided(off, &finished(summary));
    let (status, message) = health(&json_of(&off));
    assert_eq!(status, "Healthy");
    assert!(message.contains("not validated"), "{message}");
}

#[test]
fn a_failed_conversion_is_degraded_with_the_converter_error() {
    let failed = decided(
        resource(),
        &Observed {
            job: Some(job(|j| {
                j.failed = 1;
                j.failure = Some(("PodFailurePolicy".into(), "exit code 2".into()));
            })),
            pod: Some(PodView {
                exit_code: Some(2),
                message: Some(
                    json!({"v": 1, "step": "convert/megatron_to_hf", "status": "failed",
                           "exit_code": 2,
                           "error": "megatron_path /data/source is a run directory; latest iteration is iter_0000100"})
                    .to_string(),
                ),
                ..PodView::default()
            }),
            ..Observed::default()
        },
    );
    assert_eq!(
        failed.status.as_ref().unwrap().phase.as_deref(),
        Some("Failed")
    );
    let (status, message) = health(&json_of(&failed));
    assert_eq!(status, "Degraded");
    assert_eq!(message, message_of(&failed, "Failed"));
    assert!(message.contains("converter exited 2"), "{message}");
}

#[test]
fn a_rejected_resource_is_degraded() {
    // Another resource writes the same target and was created first.
    let cr = resource();
    let d = decide::decide(
        &cr,
        &Observed {
            conflict: Some("older".into()),
            ..Observed::default()
        },
        &at(1_010),
    );
    let mut rejected = cr;
    rejected.status = Some(d.status);
    assert_eq!(
        rejected.status.as_ref().unwrap().phase.as_deref(),
        Some("Rejected")
    );
    let (status, message) = health(&json_of(&rejected));
    assert_eq!(status, "Degraded");
    assert_eq!(message, message_of(&rejected, "Accepted"));
    assert!(message.contains("older"), "{message}");

    // A spec no step can run (the CRD's CEL rules normally stop it earlier).
    let mut invalid = resource();
    invalid.spec.target.kind = ArtifactKind::CheckpointMegatron;
    let d = decide::decide(&invalid, &Observed::default(), &at(1_010));
    invalid.status = Some(d.status);
    let (status, message) = health(&json_of(&invalid));
    assert_eq!(status, "Degraded");
    assert!(message.contains("no step converts"), "{message}");
}

#[test]
fn a_status_of_an_older_generation_is_progressing() {
    let mut done = decided(resource(), &finished(success_summary(0)));
    done.metadata.generation = Some(2);
    let (status, message) = health(&json_of(&done));
    assert_eq!(status, "Progressing");
    assert!(message.contains("generation 2"), "{message}");
}

#[test]
fn the_readme_snippet_is_the_tested_script() {
    let readme = std::fs::read_to_string(README_PATH).unwrap();
    let key = "  resource.customizations.health.ckpt.dev_CheckpointConversion: |\n";
    let start = readme
        .find(key)
        .unwrap_or_else(|| panic!("{README_PATH} has no line {key:?}"))
        + key.len();
    let block: String = readme[start..]
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert_eq!(
        block.trim_end(),
        script().trim_end(),
        "the argocd-cm snippet in {README_PATH} differs from {SCRIPT_PATH}: paste the script into it, indented by four spaces"
    );
}
