//! The Argo CD health check (`docs/argocd/health.lua`) run as Argo CD runs it: a Lua 5.1
//! state (Argo CD uses gopher-lua, a Lua 5.1 implementation) with only the base, package
//! and table libraries (its default sandbox has no `string` or `math`), the resource in the
//! global `obj` (JSON null as nil), and the chunk's returned table read as the health.
//!
//! The statuses come from the operator's own decision code ([`decide::decide`]), so a
//! change of conditions or reasons there shows up here.

use ckpt_operator::api::{
    Artifact, ArtifactKind, BaseModel, CheckpointConversion, CheckpointConversionSpec,
    ValidationSpec,
};
use ckpt_operator::conditions;
use ckpt_operator::decide::{self, JobView, Observed, PodView};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mlua::{Lua, LuaOptions, StdLib, Table, Value};
use serde_json::json;

const SCRIPT_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/argocd/health.lua");
const README_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/argocd/README.md");

fn script() -> String {
    std::fs::read_to_string(SCRIPT_PATH).unwrap_or_else(|e| panic!("{SCRIPT_PATH}: {e}"))
}

/// JSON → Lua as Argo CD's `decodeValue` does it: objects and arrays become tables
/// (arrays 1-based), numbers become numbers, null becomes nil.
fn to_lua(lua: &Lua, v: &serde_json::Value) -> mlua::Result<Value> {
    Ok(match v {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => Value::Number(n.as_f64().expect("a finite number")),
        serde_json::Value::String(s) => Value::String(lua.create_string(s)?),
        serde_json::Value::Array(items) => {
            let t = lua.create_table()?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, to_lua(lua, item)?)?;
            }
            Value::Table(t)
        }
        serde_json::Value::Object(map) => {
            let t = lua.create_table()?;
            for (k, item) in map {
                t.raw_set(k.as_str(), to_lua(lua, item)?)?;
            }
            Value::Table(t)
        }
    })
}

/// Runs the health script on `obj`: (status, message).
fn health(obj: &serde_json::Value) -> (String, String) {
    let lua =
        Lua::new_with(StdLib::PACKAGE | StdLib::TABLE, LuaOptions::default()).expect("a Lua state");
    let globals = lua.globals();
    for absent in ["string", "math", "io", "os", "debug"] {
        assert!(
            matches!(globals.get::<Value>(absent).unwrap(), Value::Nil),
            "the sandbox must not have {absent}"
        );
    }
    globals.set("obj", to_lua(&lua, obj).unwrap()).unwrap();
    let result: Table = lua
        .load(script())
        .set_name("health.lua")
        .eval()
        .unwrap_or_else(|e| panic!("health.lua failed on {obj:#}:\n{e}"));
    let status: String = result.get("status").expect("a status string");
    let message: String = result.get("message").expect("a message string");
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

fn at(secs: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
}

fn resource() -> CheckpointConversion {
    let mut c = CheckpointConversion::new(
        "sft-to-hf",
        CheckpointConversionSpec {
            source: Artifact {
                kind: ArtifactKind::CheckpointMegatron,
                pvc: "lustre-shared".into(),
                path: "output/sft/megatron_bridge/iter_0000100".into(),
            },
            target: Artifact {
                kind: ArtifactKind::CheckpointHf,
                pvc: "lustre-shared".into(),
                path: "output/convert/sft-hf".into(),
            },
            base_model: Some(BaseModel {
                pvc: "models".into(),
                path: "hf/Llama-3.2-3B".into(),
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
