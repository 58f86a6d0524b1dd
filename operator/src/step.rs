//! The converter's vocabulary, as the operator speaks it: which step a resource
//! asks for, the parameters it passes, and where each artifact is mounted.
//!
//! Steps, parameter names and their scopes are the converter's own tables
//! ([`ckpt_wire`]): every parameter is looked up in the step's table as it is
//! rendered, so a name the converter does not document cannot reach a Job. The
//! operator never opens a checkpoint; the other half of its contract is the
//! termination summary ([`crate::summary`]).

use ckpt_wire::params::{Role, names};
use ckpt_wire::{Param, Step, Value};

use crate::api::{CheckpointConversionSpec, LoraBackend};

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

/// What one Job of a run does: the whole conversion, or its share of a run split
/// across pods (`spec.workers` above 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Share {
    /// The whole conversion, in one pod.
    #[default]
    Whole,
    /// Every part, one per index of an Indexed Job: `workers=N part=I`.
    Parts {
        /// The number of parts.
        workers: i32,
    },
    /// After every part completed: `workers=N finalize=true` checks the parts'
    /// records, validates and publishes.
    Finalize {
        /// The number of parts.
        workers: i32,
        /// The generation the parts' Job was started for (and this Job is named
        /// after): the resource may have been edited since.
        generation: i64,
    },
}

/// The environment variable the Job controller gives each pod of an Indexed Job:
/// its index, which a container argument names as `$(JOB_COMPLETION_INDEX)`.
pub const COMPLETION_INDEX_ENV: &str = "JOB_COMPLETION_INDEX";

/// How to run the converter for a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The step.
    pub step: Step,
    /// Arguments after the binary, without the split's: `run STEP key=value ...`.
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Mounts.
    pub mounts: Vec<Mount>,
    /// What the Job does of the run.
    pub share: Share,
}

impl Invocation {
    /// The same conversion, doing `share` of it.
    pub fn with_share(mut self, share: Share) -> Invocation {
        self.share = share;
        self
    }

    /// The container's arguments: the conversion's, then the split's.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = self.args.clone();
        match self.share {
            Share::Whole => {}
            Share::Parts { workers } => {
                argv.push(format!("{}={workers}", names::WORKERS));
                argv.push(format!("{}=$({COMPLETION_INDEX_ENV})", names::PART));
            }
            Share::Finalize { workers, .. } => {
                argv.push(format!("{}={workers}", names::WORKERS));
                argv.push(format!("{}=true", names::FINALIZE));
            }
        }
        argv
    }
}

/// A spec the operator cannot turn into a converter invocation (the CRD's CEL
/// rules stop most of these at the apiserver; `spec.parameters` is checked here,
/// against the converter's tables).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

/// The parameters a field of the spec sets, with that field: `spec.parameters`
/// may not set them too.
pub const SET_BY_FIELDS: &[(&str, &str)] = &[
    (names::DTYPE, "dtype"),
    (names::TP, "parallelism.tp"),
    (names::PP, "parallelism.pp"),
    (names::EP, "parallelism.ep"),
    (names::ETP, "parallelism.etp"),
    (names::VALIDATE, "validation.enabled"),
    (names::SMOKE_TEST, "validation.smokeTest"),
    (names::BACKEND, "lora.backend"),
    (names::EXPORT_HF, "lora.exportHf"),
    (names::BASE_DIGEST, "lora.baseDigest"),
    (names::ALLOW_BASE_MISMATCH, "lora.allowBaseMismatch"),
];

/// The parameters that split one conversion across processes: the operator sets
/// them from `spec.workers` on the Jobs of a split run, so `spec.parameters` may
/// not set them.
pub const SPLIT_ONLY: &[&str] = &[names::WORKERS, names::PART, names::FINALIZE];

/// The parameters of one step as they are rendered, each the table's entry.
struct Rendered {
    step: Step,
    params: Vec<(&'static str, String)>,
}

impl Rendered {
    /// Whether `key=value` (a parameter's `only`) has been rendered.
    fn has(&self, key_value: &str) -> bool {
        key_value
            .split_once('=')
            .is_some_and(|(k, v)| self.params.iter().any(|(pk, pv)| *pk == k && pv == v))
    }

    /// The table's entry for `name` in the scope rendered so far.
    fn lookup(&self, name: &str) -> Result<&'static Param, InvalidSpec> {
        let all = self.step.params().iter().filter(|p| p.name == name);
        let mut scopes = Vec::new();
        for p in all {
            match p.only {
                Some(only) if !self.has(only) => scopes.push(only),
                _ => return Ok(p),
            }
        }
        Err(InvalidSpec(if scopes.is_empty() {
            format!("{}: the converter takes no parameter {name}", self.step)
        } else {
            format!(
                "{}: the converter takes {name} only with {}",
                self.step,
                scopes.join(" or ")
            )
        }))
    }

    /// Renders `name=value` as the table's parameter `name`.
    fn set(&mut self, name: &str, value: impl Into<String>) -> Result<(), InvalidSpec> {
        let value = value.into();
        let param = self.lookup(name)?;
        if let Value::Choice(choices) = param.value
            && !choices.contains(&value.as_str())
        {
            return Err(InvalidSpec(format!(
                "{}: {name}={value}: expected one of {}",
                self.step,
                choices.join(", ")
            )));
        }
        self.params.push((param.name, value));
        Ok(())
    }

    /// Renders an entry of `spec.parameters`: a documented parameter of the step
    /// that no field of the spec sets and that names no path.
    fn set_extra(&mut self, name: &str, value: &str) -> Result<(), InvalidSpec> {
        let refuse = |why: String| Err(InvalidSpec(format!("parameters.{name}: {why}")));
        let alias_of = self
            .step
            .params()
            .iter()
            .find(|p| p.alias == Some(name))
            .map(|p| p.name);
        let canonical = alias_of.unwrap_or(name);
        if let Some((_, field)) = SET_BY_FIELDS.iter().find(|(n, _)| *n == canonical) {
            return refuse(format!("set spec.{field} instead"));
        }
        if let Some(canonical) = alias_of {
            return refuse(format!("spell it {canonical}"));
        }
        if SPLIT_ONLY.contains(&canonical) {
            return refuse(
                "splits a conversion across pods: set spec.workers, and the operator runs every part and the final step"
                    .into(),
            );
        }
        let param = self.lookup(name)?;
        match (param.role, param.value) {
            (_, Value::Ignored) => refuse(format!(
                "{} accepts it only for command lines written for the Python runners; it has no effect",
                self.step
            )),
            (Role::Input | Role::Output, _) => refuse(
                "names a path, which the operator mounts from source, target, baseModel and lora"
                    .into(),
            ),
            _ if self.params.iter().any(|(n, _)| *n == param.name) => {
                refuse("is set by another field of the spec".into())
            }
            _ => self.set(name, value),
        }
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

/// The invocation that removes what a split run of `spec` left beside its
/// outputs: `ckpt-convert clean TARGET [MEGATRON_TARGET]` (the second for a
/// Megatron-Bridge merge that writes its merged checkpoint too), with their
/// directories mounted.
pub fn clean(spec: &CheckpointConversionSpec) -> Invocation {
    let (parent, name) = split_target(&spec.target.path);
    let step = Step::for_kinds(spec.source.kind, spec.target.kind).unwrap_or(Step::Validate);
    let mut args = vec!["clean".to_owned(), format!("{}/{name}", paths::TARGET)];
    let mut mounts = vec![Mount {
        claim: spec.target.pvc.clone(),
        mount_path: paths::TARGET.into(),
        sub_path: parent,
        read_only: false,
    }];
    // A Megatron-Bridge merge's merged Megatron checkpoint is a second output.
    if let Some(mt) = spec.lora.as_ref().and_then(|l| l.megatron_target.as_ref()) {
        let (parent, name) = split_target(&mt.path);
        args.push(format!("{}/{name}", paths::MEGATRON_TARGET));
        mounts.push(Mount {
            claim: mt.pvc.clone(),
            mount_path: paths::MEGATRON_TARGET.into(),
            sub_path: parent,
            read_only: false,
        });
    }
    Invocation {
        step,
        args,
        env: Vec::new(),
        mounts,
        share: Share::Whole,
    }
}

/// Renders the converter invocation for `spec`.
///
/// # Errors
/// [`InvalidSpec`] for a kind pair no step converts, a missing base model, or a
/// parameter the step's table does not have (in that scope).
pub fn invocation(spec: &CheckpointConversionSpec) -> Result<Invocation, InvalidSpec> {
    let step = Step::for_kinds(spec.source.kind, spec.target.kind).ok_or_else(|| {
        InvalidSpec(format!(
            "no step converts {} to {}",
            spec.source.kind, spec.target.kind
        ))
    })?;
    let mut params = Rendered {
        step,
        params: Vec::new(),
    };
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
        Step::HfToMegatron => {
            params.set(names::HF_MODEL_ID, paths::SOURCE)?;
            params.set(names::MEGATRON_PATH, target)?;
        }
        Step::MegatronToHf => {
            params.set(names::MEGATRON_PATH, paths::SOURCE)?;
            params.set(names::HF_MODEL_ID, need_base()?)?;
            params.set(names::HF_PATH, target)?;
        }
        Step::MergeLora => {
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
            params.set(names::BACKEND, backend)?;
            params.set(names::LORA_CHECKPOINT, paths::SOURCE)?;
            if backend == "hf_peft" {
                params.set(names::BASE_HF_PATH, need_base()?)?;
                params.set(names::OUTPUT_HF_PATH, target)?;
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
                params.set(names::BASE_MEGATRON_PATH, paths::BASE_MEGATRON)?;
                if let Some(mt) = &lora.megatron_target {
                    let (parent, name) = split_target(&mt.path);
                    mounts.push(Mount {
                        claim: mt.pvc.clone(),
                        mount_path: paths::MEGATRON_TARGET.into(),
                        sub_path: parent,
                        read_only: false,
                    });
                    params.set(
                        names::OUTPUT_MEGATRON_PATH,
                        format!("{}/{name}", paths::MEGATRON_TARGET),
                    )?;
                }
                let export = lora.export_hf.unwrap_or(true);
                params.set(names::EXPORT_HF, export.to_string())?;
                if export {
                    params.set(names::HF_MODEL_ID, need_base()?)?;
                    params.set(names::OUTPUT_HF_PATH, target)?;
                }
            }
            if let Some(d) = &lora.base_digest {
                params.set(names::BASE_DIGEST, d.clone())?;
            }
            if lora.allow_base_mismatch == Some(true) {
                params.set(names::ALLOW_BASE_MISMATCH, "true")?;
            }
        }
        Step::Validate => {
            return Err(InvalidSpec(format!("{step} is not a conversion")));
        }
    }
    if let Some(dtype) = spec.dtype {
        params.set(names::DTYPE, dtype.as_str())?;
    }
    if let Some(p) = &spec.parallelism {
        // Parallel sizes shape the Megatron layout the converter writes.
        for (k, v) in [
            (names::TP, p.tp),
            (names::PP, p.pp),
            (names::EP, p.ep),
            (names::ETP, p.etp),
        ] {
            if let Some(v) = v {
                params.set(k, v.to_string())?;
            }
        }
    }
    if let Some(v) = &spec.validation {
        if v.enabled == Some(false) {
            params.set(names::VALIDATE, "false")?;
        }
        if v.smoke_test == Some(false) {
            params.set(names::SMOKE_TEST, "false")?;
        }
    }
    for (name, value) in spec.parameters.iter().flatten() {
        params.set_extra(name, &value.0)?;
    }
    let workers = spec.workers.unwrap_or(1);
    let share = if workers > 1 {
        if step.param(names::WORKERS).is_none() {
            let splits: Vec<&str> = Step::ALL
                .into_iter()
                .filter(|s| s.param(names::WORKERS).is_some())
                .map(Step::name)
                .collect();
            return Err(InvalidSpec(format!(
                "workers: {step} runs in one pod (the converter splits {}); set workers to 1",
                splits.join(" and ")
            )));
        }
        Share::Parts { workers }
    } else {
        Share::Whole
    };
    let mut args = vec!["run".to_owned(), step.name().to_owned()];
    args.extend(params.params.into_iter().map(|(k, v)| format!("{k}={v}")));
    if let Some(threads) = spec.job.as_ref().and_then(|j| j.threads) {
        args.push(format!("--threads={threads}"));
    }
    Ok(Invocation {
        step,
        args,
        env,
        mounts,
        share,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::{Artifact, ArtifactKind, BaseModel, Parallelism, Parameter, PvcPath};

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
            parameters: None,
            job: None,
            retry: None,
            workers: None,
        }
    }

    fn lora(backend: LoraBackend) -> crate::api::LoraSpec {
        crate::api::LoraSpec {
            backend: Some(backend),
            base_megatron: Some(PvcPath {
                pvc: "lustre-shared".into(),
                path: "base/iter_0000001".into(),
            }),
            megatron_target: Some(PvcPath {
                pvc: "lustre-shared".into(),
                path: "output/merged-megatron".into(),
            }),
            export_hf: Some(true),
            base_digest: Some("0123456789abcdef0123456789abcdef".into()),
            allow_base_mismatch: Some(true),
        }
    }

    fn keys(inv: &Invocation) -> Vec<String> {
        inv.argv()
            .iter()
            .filter_map(|a| a.split_once('=').map(|(k, _)| k.to_owned()))
            .collect()
    }

    #[test]
    fn megatron_to_hf_renders_the_documented_vocabulary() {
        let inv = invocation(&spec(
            ArtifactKind::CheckpointMegatron,
            ArtifactKind::CheckpointHf,
        ))
        .unwrap();
        assert_eq!(inv.step, Step::MegatronToHf);
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
    fn kind_pairs_without_a_step_are_invalid() {
        let err = invocation(&spec(
            ArtifactKind::CheckpointHf,
            ArtifactKind::CheckpointLora,
        ))
        .unwrap_err();
        assert_eq!(err.0, "no step converts checkpoint_hf to checkpoint_lora");
    }

    #[test]
    fn lora_auto_picks_megatron_bridge_with_a_megatron_base() {
        let mut s = spec(ArtifactKind::CheckpointLora, ArtifactKind::CheckpointHf);
        let mut l = lora(LoraBackend::Auto);
        l.megatron_target = None;
        s.lora = Some(l);
        let inv = invocation(&s).unwrap();
        assert!(inv.args.contains(&"backend=megatron_bridge".to_owned()));
        assert!(
            inv.args
                .contains(&"base_megatron_path=/data/base-megatron".to_owned())
        );
        assert!(
            inv.args
                .contains(&"base_digest=0123456789abcdef0123456789abcdef".to_owned())
        );
        s.lora.as_mut().unwrap().base_megatron = None;
        let inv = invocation(&s).unwrap();
        assert!(inv.args.contains(&"backend=hf_peft".to_owned()));
        assert!(inv.args.contains(&"base_hf_path=/data/base".to_owned()));
    }

    /// A sample value a parameter of this kind takes (not its default, so that it
    /// shows in the arguments).
    fn sample(value: Value) -> String {
        match value {
            Value::Bool => "true".into(),
            Value::Int { min } => min.max(2).to_string(),
            Value::Size => "2GB".into(),
            Value::DType { .. } => "float32".into(),
            Value::Choice(c) => c[c.len() - 1].into(),
            Value::Digest => "0123456789abcdef0123456789abcdef".into(),
            Value::Ints => "1,2".into(),
            other => panic!("no sample for {other:?}"),
        }
    }

    /// The specs that use every field the step's invocation reads, with every other
    /// parameter of the step's table in `spec.parameters`.
    fn everything(step: Step) -> Vec<CheckpointConversionSpec> {
        let (source, target) = match step {
            Step::HfToMegatron => (ArtifactKind::CheckpointHf, ArtifactKind::CheckpointMegatron),
            Step::MegatronToHf => (ArtifactKind::CheckpointMegatron, ArtifactKind::CheckpointHf),
            _ => (ArtifactKind::CheckpointLora, ArtifactKind::CheckpointHf),
        };
        let backends = match step {
            Step::MergeLora => vec![Some("hf_peft"), Some("megatron_bridge")],
            _ => vec![None],
        };
        backends
            .into_iter()
            .map(|backend| {
                let mut s = spec(source, target);
                s.lora = backend.map(|b| {
                    lora(if b == "hf_peft" {
                        LoraBackend::HfPeft
                    } else {
                        LoraBackend::MegatronBridge
                    })
                });
                let scoped = |p: &Param| {
                    p.only.is_none_or(|o| {
                        Some(o) == backend.map(|b| format!("backend={b}")).as_deref()
                    })
                };
                let has = |name: &str| step.params().iter().any(|p| p.name == name && scoped(p));
                s.parallelism = Some(Parallelism {
                    tp: has(names::TP).then_some(2),
                    pp: has(names::PP).then_some(2),
                    ep: has(names::EP).then_some(2),
                    etp: has(names::ETP).then_some(2),
                });
                s.validation = Some(crate::api::ValidationSpec {
                    enabled: Some(false),
                    smoke_test: Some(false),
                });
                let extra: BTreeMap<String, Parameter> = step
                    .params()
                    .iter()
                    .filter(|p| scoped(p))
                    .filter(|p| !matches!(p.role, Role::Input | Role::Output))
                    .filter(|p| !matches!(p.value, Value::Ignored))
                    .filter(|p| !SET_BY_FIELDS.iter().any(|(n, _)| *n == p.name))
                    .filter(|p| !SPLIT_ONLY.contains(&p.name))
                    .map(|p| (p.name.to_owned(), Parameter(sample(p.value))))
                    .collect();
                s.parameters = Some(extra);
                s
            })
            .collect()
    }

    /// Every parameter the converter documents for a conversion step can be set on a
    /// resource: through a field of the spec (the split's through `workers`), or
    /// through `spec.parameters`. Only the spellings kept for the Python runners'
    /// command lines (no effect) are not.
    #[test]
    fn every_documented_parameter_of_a_step_can_be_rendered() {
        for step in [Step::HfToMegatron, Step::MegatronToHf, Step::MergeLora] {
            let mut rendered: Vec<String> = Vec::new();
            for s in everything(step) {
                let inv = invocation(&s).unwrap_or_else(|e| panic!("{step}: {e}"));
                assert_eq!(inv.share, Share::Whole);
                rendered.extend(keys(&inv));
                let mut split = s.clone();
                split.workers = Some(3);
                match invocation(&split) {
                    Ok(parts) => {
                        assert_eq!(parts.share, Share::Parts { workers: 3 });
                        rendered.extend(keys(&parts));
                        rendered.extend(keys(&parts.with_share(Share::Finalize {
                            workers: 3,
                            generation: 1,
                        })));
                    }
                    Err(e) => assert!(
                        step.param(names::WORKERS).is_none() && e.0.starts_with("workers: "),
                        "{step}: {e}"
                    ),
                }
                for name in SPLIT_ONLY {
                    let mut split = s.clone();
                    split
                        .parameters
                        .get_or_insert_default()
                        .insert((*name).to_owned(), Parameter("1".into()));
                    let err = invocation(&split).expect_err("a split parameter is refused");
                    assert!(err.0.contains(&format!("parameters.{name}")), "{err}");
                }
            }
            for p in step.params() {
                let rendered = rendered.iter().any(|r| r == p.name);
                match p.value {
                    Value::Ignored => assert!(!rendered, "{step}: {} has no effect", p.name),
                    // Megatron-Bridge's base_hf_path stands in for hf_model_id, which
                    // the operator always passes.
                    _ if p.name == names::BASE_HF_PATH
                        && p.only == Some("backend=megatron_bridge") => {}
                    _ => assert!(rendered, "{step}: {} is never rendered", p.name),
                }
            }
        }
    }

    /// `workers` above 1 runs the parts as an Indexed Job whose pods find their
    /// part in the variable the Job controller sets, and the final step after them.
    #[test]
    fn workers_split_the_run_into_parts_and_a_final_step() {
        let mut s = spec(ArtifactKind::CheckpointMegatron, ArtifactKind::CheckpointHf);
        s.workers = Some(1);
        assert_eq!(invocation(&s).unwrap().share, Share::Whole);
        s.workers = Some(4);
        let parts = invocation(&s).unwrap();
        let argv = parts.argv();
        assert_eq!(argv[..parts.args.len()], parts.args[..]);
        assert_eq!(
            argv[parts.args.len()..],
            ["workers=4", "part=$(JOB_COMPLETION_INDEX)"]
        );
        let fin = parts.clone().with_share(Share::Finalize {
            workers: 4,
            generation: 1,
        });
        assert_eq!(
            fin.argv()[parts.args.len()..],
            ["workers=4", "finalize=true"]
        );
        // Merges split too; a Megatron-Bridge merge's cleanup covers both outputs.
        let mut merge = spec(ArtifactKind::CheckpointLora, ArtifactKind::CheckpointHf);
        merge.lora = Some(lora(LoraBackend::MegatronBridge));
        merge.workers = Some(2);
        assert_eq!(
            invocation(&merge).unwrap().share,
            Share::Parts { workers: 2 }
        );
        let c = clean(&merge);
        assert_eq!(
            c.args,
            [
                "clean".to_owned(),
                format!("{}/{}", paths::TARGET, "sft-hf"),
                format!("{}/merged-megatron", paths::MEGATRON_TARGET),
            ]
        );
        assert_eq!(
            c.mounts
                .iter()
                .map(|m| (m.mount_path.as_str(), m.sub_path.as_str(), m.read_only))
                .collect::<Vec<_>>(),
            [
                (paths::TARGET, "output/convert", false),
                (paths::MEGATRON_TARGET, "output", false)
            ]
        );
    }

    #[test]
    fn parameters_take_only_what_no_field_sets_and_no_path() {
        let with = |k: &str, v: &str| {
            let mut s = spec(ArtifactKind::CheckpointMegatron, ArtifactKind::CheckpointHf);
            s.parameters = Some(BTreeMap::from([(k.to_owned(), Parameter(v.to_owned()))]));
            invocation(&s).map(|i| i.args)
        };
        assert!(
            with("keep_fp32", "false")
                .unwrap()
                .contains(&"keep_fp32=false".to_owned())
        );
        for (k, v, why) in [
            (
                "dtype",
                "float32",
                "parameters.dtype: set spec.dtype instead",
            ),
            ("tp", "2", "parameters.tp: set spec.parallelism.tp instead"),
            (
                "torch_dtype",
                "float32",
                "parameters.torch_dtype: set spec.dtype instead",
            ),
            ("hf_path", "/elsewhere", "parameters.hf_path: names a path"),
            (
                "strict",
                "true",
                "parameters.strict: convert/megatron_to_hf accepts it only for command lines",
            ),
            (
                "no_such",
                "1",
                "convert/megatron_to_hf: the converter takes no parameter no_such",
            ),
            (
                "mapping",
                "onnx",
                "convert/megatron_to_hf: mapping=onnx: expected one of auto, identity",
            ),
        ] {
            let err = with(k, v).unwrap_err().0;
            assert!(err.starts_with(why), "{k}: {err}");
        }
        // A parameter of the other backend is refused with the scope that takes it.
        let mut s = spec(ArtifactKind::CheckpointLora, ArtifactKind::CheckpointHf);
        s.lora = Some(lora(LoraBackend::HfPeft));
        s.parameters = Some(BTreeMap::from([(
            "merge_arithmetic".to_owned(),
            Parameter("fp32".into()),
        )]));
        assert_eq!(
            invocation(&s).unwrap_err().0,
            "convert/merge_lora: the converter takes merge_arithmetic only with backend=megatron_bridge"
        );
        // A field the step does not take is refused, not passed on to fail later.
        let mut s = spec(ArtifactKind::CheckpointLora, ArtifactKind::CheckpointHf);
        s.lora = Some(lora(LoraBackend::HfPeft));
        s.parallelism = Some(Parallelism {
            tp: None,
            pp: None,
            ep: None,
            etp: Some(2),
        });
        assert_eq!(
            invocation(&s).unwrap_err().0,
            "convert/merge_lora: the converter takes no parameter etp"
        );
    }
}
