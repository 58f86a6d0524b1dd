//! The converter accepts what the operator renders (issue 16): for each conversion
//! step, and each LoRA backend, a resource that sets every field its step reads and
//! every other parameter of the step's table through `spec.parameters` is rendered
//! into the Job's arguments and run by the real converter on the fixtures, with the
//! container paths mapped to the claims' directories. No control plane is needed:
//! this is the Job's command line, as the pod would run it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use ckpt_operator::api::{
    Artifact, ArtifactKind, BaseModel, CheckpointConversionSpec, Dtype, LoraBackend, LoraSpec,
    Parallelism, Parameter, PvcPath, ValidationSpec,
};
use ckpt_operator::step::{Invocation, invocation};
use ckpt_testcluster::converter_binary;
use ckpt_wire::Step;
use ckpt_wire::params::Value;

use crate::support::{convert, fixtures_in, lora_fixtures_in};

fn artifact(kind: ArtifactKind, pvc: &str, path: &str) -> Artifact {
    Artifact {
        kind,
        pvc: pvc.into(),
        path: path.into(),
    }
}

fn pvc_path(pvc: &str, path: &str) -> PvcPath {
    PvcPath {
        pvc: pvc.into(),
        path: path.into(),
    }
}

fn parameters(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, Parameter>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Parameter((*v).to_owned())))
            .collect(),
    )
}

/// The weights digest of the HF base (what its ckpt-manifest.json would record):
/// that of an HF checkpoint with the same weights, the SFT checkpoint (converted
/// from the base) converted back.
fn base_digest(dir: &Path) -> String {
    let copy = dir.join("scratch/base-copy");
    convert(&[
        "run".into(),
        "convert/megatron_to_hf".into(),
        format!(
            "megatron_path={}",
            dir.join("lustre-shared/output/sft/megatron_bridge/iter_0000100")
                .display()
        ),
        format!(
            "hf_model_id={}",
            dir.join("models/hf/Llama-3.2-3B").display()
        ),
        format!("hf_path={}", copy.display()),
    ]);
    let manifest = copy.join("ckpt-manifest.json");
    let text = std::fs::read_to_string(&manifest)
        .unwrap_or_else(|e| panic!("{}: {e}", manifest.display()));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["output"]["weights_digest"]
        .as_str()
        .unwrap_or_else(|| panic!("no weights_digest in {}", manifest.display()))
        .to_owned()
}

/// One resource per step (two for merge_lora), using every field and parameter.
fn specs(dir: &Path) -> Vec<CheckpointConversionSpec> {
    let base = Some(BaseModel {
        pvc: "models".into(),
        path: "hf/Llama-3.2-3B".into(),
        model_id: None,
    });
    let all_sizes = Some(Parallelism {
        tp: Some(2),
        pp: Some(2),
        ep: Some(1),
        etp: Some(1),
    });
    let unchecked = Some(ValidationSpec {
        enabled: Some(false),
        smoke_test: Some(false),
    });
    let checked = Some(ValidationSpec {
        enabled: Some(true),
        smoke_test: Some(false),
    });
    let spec = |source, target| CheckpointConversionSpec {
        source,
        target,
        base_model: base.clone(),
        lora: None,
        parallelism: None,
        dtype: None,
        validation: None,
        parameters: None,
        job: None,
        retry: None,
        workers: None,
    };
    let mut hf_to_megatron = spec(
        artifact(ArtifactKind::CheckpointHf, "models", "hf/Llama-3.2-3B"),
        artifact(
            ArtifactKind::CheckpointMegatron,
            "lustre-shared",
            "p/megatron",
        ),
    );
    hf_to_megatron.base_model = None;
    hf_to_megatron.parallelism = all_sizes.clone();
    hf_to_megatron.dtype = Some(Dtype::Float32);
    hf_to_megatron.validation = unchecked.clone();
    hf_to_megatron.parameters = parameters(&[
        ("make_vocab_size_divisible_by", "8"),
        ("mapping", "auto"),
        ("iteration", "7"),
        ("distcp_files", "1"),
        ("keep_fp32", "false"),
        ("allow_rope_mismatch", "false"),
    ]);

    let mut megatron_to_hf = spec(
        artifact(
            ArtifactKind::CheckpointMegatron,
            "lustre-shared",
            "output/sft/megatron_bridge/iter_0000100",
        ),
        artifact(ArtifactKind::CheckpointHf, "lustre-shared", "p/hf"),
    );
    megatron_to_hf.parallelism = all_sizes;
    megatron_to_hf.dtype = Some(Dtype::Float16);
    megatron_to_hf.validation = unchecked.clone();
    megatron_to_hf.parameters = parameters(&[
        ("mapping", "auto"),
        ("max_shard_size", "1GB"),
        ("mirror_shards", "false"),
        ("keep_fp32", "true"),
        ("allow_rope_mismatch", "false"),
    ]);

    let lora_sizes = Some(Parallelism {
        tp: Some(1),
        pp: Some(1),
        ep: Some(1),
        etp: None,
    });
    let mut peft = spec(
        artifact(
            ArtifactKind::CheckpointLora,
            "lustre-shared",
            "output/peft/adapter",
        ),
        artifact(ArtifactKind::CheckpointHf, "lustre-shared", "p/merged-peft"),
    );
    peft.lora = Some(LoraSpec {
        backend: Some(LoraBackend::HfPeft),
        base_megatron: None,
        megatron_target: None,
        export_hf: None,
        base_digest: Some(base_digest(dir)),
        allow_base_mismatch: Some(true),
    });
    peft.parallelism = lora_sizes.clone();
    peft.validation = checked;
    // A merge keeps the base's dtype.
    peft.dtype = Some(Dtype::Bfloat16);

    let mut bridge = spec(
        artifact(
            ArtifactKind::CheckpointLora,
            "lustre-shared",
            "output/sft-lora/iter_0000200",
        ),
        artifact(ArtifactKind::CheckpointHf, "lustre-shared", "p/merged-hf"),
    );
    bridge.lora = Some(LoraSpec {
        backend: Some(LoraBackend::MegatronBridge),
        base_megatron: Some(pvc_path(
            "lustre-shared",
            "output/convert/llama3b-megatron/iter_0000000",
        )),
        megatron_target: Some(pvc_path("lustre-shared", "p/merged-megatron")),
        export_hf: Some(true),
        base_digest: None,
        allow_base_mismatch: None,
    });
    bridge.parallelism = lora_sizes;
    bridge.validation = unchecked;
    bridge.parameters = parameters(&[
        ("merge_arithmetic", "fp32"),
        ("iteration", "3"),
        ("distcp_files", "1"),
        ("max_shard_size", "1GB"),
    ]);
    vec![hf_to_megatron, megatron_to_hf, peft, bridge]
}

/// Runs `inv` with its mounts mapped to the claim directories under `dir`, as the
/// pod would see them.
fn run(inv: &Invocation, dir: &Path) -> std::process::Output {
    let mut args = inv.args.clone();
    for m in &inv.mounts {
        let local = dir.join(&m.claim).join(&m.sub_path);
        if !m.read_only {
            std::fs::create_dir_all(&local).unwrap();
        }
        for a in &mut args {
            if let Some((k, v)) = a.split_once('=')
                && let Some(rest) = v.strip_prefix(&m.mount_path)
                && (rest.is_empty() || rest.starts_with('/'))
            {
                *a = format!("{k}={}{rest}", local.display());
            }
        }
    }
    Command::new(converter_binary().unwrap_or_else(|e| panic!("{e}")))
        .args(&args)
        .envs(inv.env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap()
}

/// Every parameter a conversion step documents (but the spellings kept for the
/// Python runners) reaches the converter from a resource, and the converter accepts
/// it: each run exits 0, warns of no ignored parameter, and publishes its output.
#[test]
fn the_converter_accepts_every_parameter_the_operator_renders() {
    let dir = tempfile::tempdir().unwrap();
    fixtures_in(dir.path());
    lora_fixtures_in(dir.path());
    let mut rendered: BTreeMap<Step, Vec<String>> = BTreeMap::new();
    for spec in specs(dir.path()) {
        let inv = invocation(&spec).unwrap_or_else(|e| panic!("{e}"));
        let out = run(&inv, dir.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{:?} exited {}:\n{stderr}",
            inv.args,
            out.status
        );
        assert!(
            !stderr.contains("has no effect"),
            "{:?}:\n{stderr}",
            inv.args
        );
        let target = dir.path().join(&spec.target.pvc).join(&spec.target.path);
        assert!(target.is_dir(), "{:?} published nothing", inv.args);
        rendered.entry(inv.step).or_default().extend(
            inv.args
                .iter()
                .filter_map(|a| a.split_once('=').map(|(k, _)| k.to_owned())),
        );
    }
    for (step, names) in &rendered {
        for p in step.params() {
            let covered = names.iter().any(|n| n == p.name);
            match p.value {
                Value::Ignored => {}
                // Megatron-Bridge's base_hf_path stands in for hf_model_id, which
                // the operator always passes.
                _ if p.name == "base_hf_path" && p.only == Some("backend=megatron_bridge") => {}
                // Refused in spec.parameters: a resource runs a conversion as one Job.
                _ if ckpt_operator::step::SPLIT_ONLY.contains(&p.name) => {}
                _ => assert!(covered, "{step}: {} was not exercised", p.name),
            }
        }
    }
    assert_eq!(rendered.len(), 3, "{:?}", rendered.keys());
}
