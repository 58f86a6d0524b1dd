//! The converter's vocabulary, as the operator speaks it: which step a resource
//! asks for, the parameters it passes, and where each artifact is mounted.
//!
//! The operator never opens a checkpoint; this module is its whole contract with
//! the converter (the other half is [`crate::summary`]).

use crate::api::{ArtifactKind, CheckpointConversionSpec, LoraBackend};

/// Where artifacts appear inside the converter's container.
pub mod paths {
    /// The source artifact (read-only).
    pub const SOURCE: &str = "/data/source";
    /// The base model (read-only).
    pub const BASE: &str = "/data/base";
    /// The Megatron base of a Megatron-Bridge LoRA merge (read-only).
    pub const BASE_MEGATRON: &str = "/data/base-megatron";
    /// The parent directory of the target (read-write).
    pub const TARGET: &str = "/data/target";
    /// The parent directory of the merged Megatron target (read-write).
    pub const MEGATRON_TARGET: &str = "/data/megatron-target";
}

/// One mount of a claim directory into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The claim.
    pub claim: String,
    /// Where it appears.
    pub mount_path: String,
    /// The directory of the claim that is mounted (`""` for the claim root).
    pub sub_path: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// How to run the converter for a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The step (`convert/megatron_to_hf`).
    pub step: &'static str,
    /// Arguments after the binary: `run STEP key=value ...`.
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Mounts.
    pub mounts: Vec<Mount>,
}

/// A spec the operator cannot turn into a step (the CRD's CEL rules normally stop
/// these at the apiserver).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

/// The step for a pair of artifact kinds.
pub fn step_for(source: ArtifactKind, target: ArtifactKind) -> Option<&'static str> {
    match (source, target) {
        (ArtifactKind::CheckpointHf, ArtifactKind::CheckpointMegatron) => {
            Some("convert/hf_to_megatron")
        }
        (ArtifactKind::CheckpointMegatron, ArtifactKind::CheckpointHf) => {
            Some("convert/megatron_to_hf")
        }
        (ArtifactKind::CheckpointLora, ArtifactKind::CheckpointHf) => Some("convert/merge_lora"),
        _ => None,
    }
}

/// Splits `a/b/c` into the parent (`a/b`, mounted) and the last component (`c`,
/// created by the converter inside the mount, next to its staging directory).
fn split_target(path: &str) -> (String, String) {
    match path.rsplit_once('/') {
        Some((parent, name)) => (parent.to_owned(), name.to_owned()),
        None => (String::new(), path.to_owned()),
    }
}

/// Renders the converter invocation for `spec`.
///
/// # Errors
/// [`InvalidSpec`] for a kind pair no step converts or a missing base model.
pub fn invocation(spec: &CheckpointConversionSpec) -> Result<Invocation, InvalidSpec> {
    let step = step_for(spec.source.kind, spec.target.kind).ok_or_else(|| {
        InvalidSpec(format!(
            "no step converts {} to {}",
            spec.source.kind.as_str(),
            spec.target.kind.as_str()
        ))
    })?;
    let mut params: Vec<(String, String)> = Vec::new();
    let mut env = Vec::new();
    let mut mounts = vec![Mount {
        claim: spec.source.pvc.clone(),
        mount_path: paths::SOURCE.into(),
        sub_path: spec.source.path.clone(),
        read_only: true,
    }];
    let (target_parent, target_name) = split_target(&spec.target.path);
    mounts.push(Mount {
        claim: spec.target.pvc.clone(),
        mount_path: paths::TARGET.into(),
        sub_path: target_parent,
        read_only: false,
    });
    let target = format!("{}/{target_name}", paths::TARGET);
    let mut base = None;
    if let Some(b) = &spec.base_model {
        mounts.push(Mount {
            claim: b.pvc.clone(),
            mount_path: paths::BASE.into(),
            sub_path: b.path.clone(),
            read_only: true,
        });
        base = Some(match &b.model_id {
            Some(id) => {
                // A model id resolved offline in the cache mounted at BASE.
                env.push(("HF_HUB_CACHE".to_owned(), paths::BASE.to_owned()));
                env.push(("HF_HUB_OFFLINE".to_owned(), "1".to_owned()));
                id.clone()
            }
            None => paths::BASE.to_owned(),
        });
    }
    let need_base = || {
        base.clone().ok_or_else(|| {
            InvalidSpec(format!(
                "{step} needs baseModel (config, tokenizer and chat template)"
            ))
        })
    };
    match step {
        "convert/hf_to_megatron" => {
            params.push(("hf_model_id".into(), paths::SOURCE.into()));
            params.push(("megatron_path".into(), target));
        }
        "convert/megatron_to_hf" => {
            params.push(("megatron_path".into(), paths::SOURCE.into()));
            params.push(("hf_model_id".into(), need_base()?));
            params.push(("hf_path".into(), target));
        }
        _ => {
            let lora = spec.lora.clone().unwrap_or(crate::api::LoraSpec {
                backend: None,
                base_megatron: None,
                megatron_target: None,
                export_hf: None,
                base_digest: None,
                allow_base_mismatch: None,
            });
            let backend = match lora.backend.unwrap_or(LoraBackend::Auto) {
                LoraBackend::Auto if lora.base_megatron.is_some() => "megatron_bridge",
                LoraBackend::Auto | LoraBackend::HfPeft => "hf_peft",
                LoraBackend::MegatronBridge => "megatron_bridge",
            };
            params.push(("backend".into(), backend.into()));
            params.push(("lora_checkpoint".into(), paths::SOURCE.into()));
            if backend == "hf_peft" {
                params.push(("base_hf_path".into(), need_base()?));
                params.push(("output_hf_path".into(), target));
            } else {
                let bm = lora.base_megatron.as_ref().ok_or_else(|| {
                    InvalidSpec("lora.backend megatron_bridge needs lora.baseMegatron".into())
                })?;
                mounts.push(Mount {
                    claim: bm.pvc.clone(),
                    mount_path: paths::BASE_MEGATRON.into(),
                    sub_path: bm.path.clone(),
                    read_only: true,
                });
                params.push(("base_megatron_path".into(), paths::BASE_MEGATRON.into()));
                if let Some(mt) = &lora.megatron_target {
                    let (parent, name) = split_target(&mt.path);
                    mounts.push(Mount {
                        claim: mt.pvc.clone(),
                        mount_path: paths::MEGATRON_TARGET.into(),
                        sub_path: parent,
                        read_only: false,
                    });
                    params.push((
                        "output_megatron_path".into(),
                        format!("{}/{name}", paths::MEGATRON_TARGET),
                    ));
                }
                let export = lora.export_hf.unwrap_or(true);
                params.push(("export_hf".into(), export.to_string()));
                if export {
                    params.push(("hf_model_id".into(), need_base()?));
                    params.push(("output_hf_path".into(), target));
                }
            }
            if let Some(d) = &lora.base_digest {
                params.push(("base_digest".into(), d.clone()));
            }
            if lora.allow_base_mismatch == Some(true) {
                params.push(("allow_base_mismatch".into(), "true".into()));
            }
        }
    }
    if let Some(dtype) = spec.dtype {
        params.push(("dtype".into(), dtype.as_str().into()));
    }
    if let Some(p) = &spec.parallelism {
        // Parallel sizes shape the Megatron layout the converter writes.
        for (k, v) in [("tp", p.tp), ("pp", p.pp), ("ep", p.ep), ("etp", p.etp)] {
            if let Some(v) = v {
                params.push((k.into(), v.to_string()));
            }
        }
    }
    if let Some(v) = &spec.validation {
        if v.enabled == Some(false) {
            params.push(("validate".into(), "false".into()));
        }
        if v.smoke_test == Some(false) {
            params.push(("smoke_test".into(), "false".into()));
        }
    }
    let mut args = vec!["run".to_owned(), step.to_owned()];
    args.extend(params.into_iter().map(|(k, v)| format!("{k}={v}")));
    if let Some(threads) = spec.job.as_ref().and_then(|j| j.threads) {
        args.push(format!("--threads={threads}"));
    }
    Ok(Invocation {
        step,
        args,
        env,
        mounts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Artifact, BaseModel};

    fn spec(source: ArtifactKind, target: ArtifactKind) -> CheckpointConversionSpec {
        CheckpointConversionSpec {
            source: Artifact {
                kind: source,
                pvc: "lustre-shared".into(),
                path: "output/sft/megatron_bridge/iter_0000100".into(),
            },
            target: Artifact {
                kind: target,
                pvc: "lustre-shared".into(),
                path: "output/convert/sft-hf".into(),
            },
            base_model: Some(BaseModel {
                pvc: "models".into(),
                path: "hf/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16".into(),
                model_id: None,
            }),
            lora: None,
            parallelism: None,
            dtype: Some(crate::api::Dtype::Bfloat16),
            validation: None,
            job: None,
            retry: None,
        }
    }

    #[test]
    fn megatron_to_hf_renders_the_documented_vocabulary() {
        let inv = invocation(&spec(
            ArtifactKind::CheckpointMegatron,
            ArtifactKind::CheckpointHf,
        ))
        .unwrap();
        assert_eq!(
            inv.args,
            vec![
                "run",
                "convert/megatron_to_hf",
                "megatron_path=/data/source",
                "hf_model_id=/data/base",
                "hf_path=/data/target/sft-hf",
                "dtype=bfloat16",
            ]
        );
        assert_eq!(
            inv.mounts[0],
            Mount {
                claim: "lustre-shared".into(),
                mount_path: "/data/source".into(),
                sub_path: "output/sft/megatron_bridge/iter_0000100".into(),
                read_only: true
            }
        );
        assert_eq!(inv.mounts[1].sub_path, "output/convert");
        assert!(!inv.mounts[1].read_only);
        assert!(inv.mounts[2].read_only);
    }

    #[test]
    fn cached_model_ids_use_the_mounted_cache_offline() {
        let mut s = spec(ArtifactKind::CheckpointMegatron, ArtifactKind::CheckpointHf);
        s.base_model.as_mut().unwrap().model_id =
            Some("nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16".into());
        let inv = invocation(&s).unwrap();
        assert!(
            inv.args.contains(
                &"hf_model_id=nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16".to_owned()
            )
        );
        assert!(
            inv.env
                .contains(&("HF_HUB_CACHE".to_owned(), "/data/base".to_owned()))
        );
    }

    #[test]
    fn kind_pairs_pick_the_step() {
        assert_eq!(
            step_for(ArtifactKind::CheckpointHf, ArtifactKind::CheckpointMegatron),
            Some("convert/hf_to_megatron")
        );
        assert_eq!(
            step_for(ArtifactKind::CheckpointLora, ArtifactKind::CheckpointHf),
            Some("convert/merge_lora")
        );
        assert_eq!(
            step_for(ArtifactKind::CheckpointHf, ArtifactKind::CheckpointHf),
            None
        );
        assert!(
            invocation(&spec(
                ArtifactKind::CheckpointHf,
                ArtifactKind::CheckpointLora
            ))
            .is_err()
        );
    }

    #[test]
    fn lora_auto_picks_megatron_bridge_with_a_megatron_base() {
        let mut s = spec(ArtifactKind::CheckpointLora, ArtifactKind::CheckpointHf);
        s.lora = Some(crate::api::LoraSpec {
            backend: None,
            base_megatron: Some(crate::api::PvcPath {
                pvc: "lustre-shared".into(),
                path: "base/iter_0000001".into(),
            }),
            megatron_target: None,
            export_hf: None,
            base_digest: Some("abc".into()),
            allow_base_mismatch: None,
        });
        let inv = invocation(&s).unwrap();
        assert!(inv.args.contains(&"backend=megatron_bridge".to_owned()));
        assert!(
            inv.args
                .contains(&"base_megatron_path=/data/base-megatron".to_owned())
        );
        assert!(inv.args.contains(&"base_digest=abc".to_owned()));
        s.lora.as_mut().unwrap().base_megatron = None;
        let inv = invocation(&s).unwrap();
        assert!(inv.args.contains(&"backend=hf_peft".to_owned()));
        assert!(inv.args.contains(&"base_hf_path=/data/base".to_owned()));
    }
}
