//! A request as a `CheckpointConversion`: paths become claims and directories inside
//! them, model ids become a lookup in the profile's Hugging Face cache, and the
//! profile's image and resources become the Job settings. The step's other
//! parameters go into `spec.parameters` by their documented names; one the resource
//! cannot carry (a path it has no field for, a command-line option) is refused by
//! name rather than dropped.

use std::collections::BTreeMap;
use std::path::Path;

use ckpt_api::{
    Artifact, ArtifactKind, BaseModel, CheckpointConversion, CheckpointConversionSpec, Dtype,
    JobOptions, LoraBackend, LoraSpec, Parallelism, Parameter, PvcPath, ValidationSpec,
};
use ckpt_wire::params::names;
use ckpt_wire::{Role, Step, Value};
use k8s_openapi::api::core::v1::{LocalObjectReference, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;

use crate::error::{Error, Result};
use crate::mounts;
use crate::profile::Profile;
use crate::request::Request;

/// Annotation naming the profile a resource was submitted with.
pub const PROFILE_ANNOTATION: &str = "ckpt.dev/profile";
/// Label on resources `ckpt-convert` created.
pub const CREATED_BY_LABEL: &str = "app.kubernetes.io/created-by";

/// The parameters of one request, by canonical name, taken as they are used.
struct Taken<'a> {
    step: Step,
    profile: &'a Profile,
    left: BTreeMap<&'static str, (String, String)>,
}

impl<'a> Taken<'a> {
    fn new(profile: &'a Profile, req: &Request) -> Result<Taken<'a>> {
        let mut left = BTreeMap::new();
        for (k, v) in &req.params {
            let Some(p) = req.step.param(k) else {
                return Err(Error::Param {
                    param: k.clone(),
                    value: v.clone(),
                    why: format!("not a parameter of {}", req.step),
                });
            };
            if p.value == Value::Ignored || v.is_empty() || v == "null" {
                continue;
            }
            left.insert(p.name, (k.clone(), v.clone()));
        }
        Ok(Taken {
            step: req.step,
            profile,
            left,
        })
    }

    fn take(&mut self, name: &str) -> Option<(String, String)> {
        self.left.remove(name)
    }

    fn required(&mut self, name: &str) -> Result<(String, String)> {
        self.take(name).ok_or_else(|| Error::Param {
            param: name.to_owned(),
            value: String::new(),
            why: format!("{} needs it", self.step),
        })
    }

    /// The claim and the directory inside it of a path parameter.
    fn claim(&self, (param, value): &(String, String)) -> Result<(String, String)> {
        let bad = |why: String| Error::Param {
            param: param.clone(),
            value: value.clone(),
            why,
        };
        let Some(l) = mounts::locate(&self.profile.mounts, Path::new(value)) else {
            return Err(bad(format!(
                "outside every mount of profile {}: {}",
                self.profile.name,
                mounts::describe(&self.profile.mounts)
            )));
        };
        let claim = l
            .mount
            .claim
            .clone()
            .expect("kubernetes mounts have a claim (checked with the profile)");
        let dir = mounts::claim_dir(&l.claim_path()).map_err(bad)?;
        if dir.is_empty() {
            return Err(bad(format!(
                "is the root of claim {claim}; a CheckpointConversion names a directory inside its claim"
            )));
        }
        Ok((claim, dir))
    }

    fn artifact(&self, kind: ArtifactKind, arg: &(String, String)) -> Result<Artifact> {
        if !arg.1.starts_with('/') {
            return Err(Error::Param {
                param: arg.0.clone(),
                value: arg.1.clone(),
                why: "a model id cannot be the source of a CheckpointConversion (it names a directory on a claim): give the model's directory under a mount".into(),
            });
        }
        let (pvc, path) = self.claim(arg)?;
        Ok(Artifact { kind, pvc, path })
    }

    fn pvc_path(&self, arg: &(String, String)) -> Result<PvcPath> {
        let (pvc, path) = self.claim(arg)?;
        Ok(PvcPath { pvc, path })
    }

    /// A model: a directory under a mount, or a model id in the profile's cache.
    fn model(&self, arg: &(String, String)) -> Result<BaseModel> {
        let (param, value) = arg;
        if value.starts_with('/') {
            let (pvc, path) = self.claim(arg)?;
            return Ok(BaseModel {
                pvc,
                path,
                model_id: None,
            });
        }
        let bad = |why: String| Error::Param {
            param: param.clone(),
            value: value.clone(),
            why,
        };
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        };
        let (repo, revision) = value.split_once('@').unwrap_or((value, "main"));
        let id_ok =
            matches!(repo.split_once('/'), Some((o, n)) if valid(o) && valid(n)) && valid(revision);
        if !id_ok {
            return Err(bad(
                "neither an absolute path nor a model id of the form org/name[@revision]".into(),
            ));
        }
        let Some(home) = &self.profile.hf_home else {
            return Err(bad(format!(
                "a model id is looked up in the job's Hugging Face cache: set hf_home in profile {} to a cache under a mount",
                self.profile.name
            )));
        };
        let hub = home.join("hub");
        let (pvc, path) = self
            .claim(&("hf_home".to_owned(), hub.display().to_string()))
            .map_err(|e| bad(format!("the cache of hf_home: {e}")))?;
        Ok(BaseModel {
            pvc,
            path,
            model_id: Some(value.clone()),
        })
    }

    fn int(&mut self, name: &str) -> Result<Option<i32>> {
        let Some((param, value)) = self.take(name) else {
            return Ok(None);
        };
        value
            .parse::<i32>()
            .ok()
            .filter(|n| *n >= 1)
            .map(Some)
            .ok_or(Error::Param {
                param,
                value,
                why: "expected an integer ≥ 1".into(),
            })
    }

    fn flag(&mut self, name: &str) -> Result<Option<bool>> {
        let Some((param, value)) = self.take(name) else {
            return Ok(None);
        };
        match value.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(Some(true)),
            "false" | "0" | "no" => Ok(Some(false)),
            _ => Err(Error::Param {
                param,
                value,
                why: "expected true or false".into(),
            }),
        }
    }
}

/// The resource for `req` under `profile`, in `namespace`.
///
/// # Errors
/// [`Error::Param`] for a path outside every mount (naming the mounts), a model id
/// without `hf_home`, or a parameter or option the resource has no field for.
pub fn manifest(profile: &Profile, req: &Request, namespace: &str) -> Result<CheckpointConversion> {
    let mut t = Taken::new(profile, req)?;
    let mut base_model = None;
    let mut lora = None;
    let (source, target) = match req.step {
        Step::HfToMegatron => {
            let src = t.required("hf_model_id")?;
            let dst = t.required("megatron_path")?;
            (
                t.artifact(ArtifactKind::CheckpointHf, &src)?,
                t.artifact(ArtifactKind::CheckpointMegatron, &dst)?,
            )
        }
        Step::MegatronToHf => {
            let src = t.required("megatron_path")?;
            let dst = t.required("hf_path")?;
            let model = t.required("hf_model_id")?;
            base_model = Some(t.model(&model)?);
            (
                t.artifact(ArtifactKind::CheckpointMegatron, &src)?,
                t.artifact(ArtifactKind::CheckpointHf, &dst)?,
            )
        }
        Step::MergeLora => {
            let src = t.required("lora_checkpoint")?;
            let chosen = t.take("backend");
            let base_megatron = t.take("base_megatron_path");
            let backend = match chosen.as_ref().map(|(_, v)| v.as_str()) {
                None | Some("auto") if base_megatron.is_some() => "megatron_bridge",
                None | Some("auto") => "hf_peft",
                Some(b) => b,
            };
            let mut spec = LoraSpec {
                backend: chosen.as_ref().map(|(_, v)| match v.as_str() {
                    "hf_peft" => LoraBackend::HfPeft,
                    "megatron_bridge" => LoraBackend::MegatronBridge,
                    _ => LoraBackend::Auto,
                }),
                base_megatron: None,
                megatron_target: None,
                export_hf: None,
                base_digest: t.take("base_digest").map(|(_, v)| v),
                allow_base_mismatch: t.flag("allow_base_mismatch")?,
            };
            let dst = t.required("output_hf_path")?;
            if backend == "megatron_bridge" {
                let bm = base_megatron.ok_or(Error::Param {
                    param: "base_megatron_path".into(),
                    value: String::new(),
                    why: "backend=megatron_bridge needs it".into(),
                })?;
                spec.base_megatron = Some(t.pvc_path(&bm)?);
                let out = t.required("output_megatron_path")?;
                spec.megatron_target = Some(t.pvc_path(&out)?);
                if let Some((param, value)) = t.take("export_hf") {
                    if !matches!(value.as_str(), "true" | "1" | "yes") {
                        return Err(Error::Param {
                            param,
                            value,
                            why: "a CheckpointConversion always has an HF target: run a merge without an export locally or with a slurm profile".into(),
                        });
                    }
                    spec.export_hf = Some(true);
                }
                let model = t
                    .take("hf_model_id")
                    .or_else(|| t.take("base_hf_path"))
                    .ok_or(Error::Param {
                        param: "hf_model_id".into(),
                        value: String::new(),
                        why: "the HF export of a Megatron-Bridge merge needs the HF model".into(),
                    })?;
                base_model = Some(t.model(&model)?);
            } else {
                if let Some(bm) = base_megatron {
                    return Err(Error::Param {
                        param: bm.0,
                        value: bm.1,
                        why: "applies to backend=megatron_bridge".into(),
                    });
                }
                let base = t.required("base_hf_path")?;
                base_model = Some(t.model(&base)?);
            }
            lora = Some(spec);
            (
                t.artifact(ArtifactKind::CheckpointLora, &src)?,
                t.artifact(ArtifactKind::CheckpointHf, &dst)?,
            )
        }
        Step::Validate => {
            return Err(Error::Param {
                param: "step".into(),
                value: req.step.name().into(),
                why:
                    "validation runs here, over the shared filesystem: `ckpt-convert validate PATH`"
                        .into(),
            });
        }
    };
    let dtype = match t.take("dtype") {
        None => None,
        Some((param, value)) => Some(match value.as_str() {
            "bfloat16" | "bf16" => Dtype::Bfloat16,
            "float16" | "fp16" | "half" => Dtype::Float16,
            "float32" | "fp32" | "float" => Dtype::Float32,
            _ => {
                return Err(Error::Param {
                    param,
                    value,
                    why: "a CheckpointConversion takes bfloat16, float16 or float32".into(),
                });
            }
        }),
    };
    let par = Parallelism {
        tp: t.int("tp")?,
        pp: t.int("pp")?,
        ep: t.int("ep")?,
        etp: t.int("etp")?,
    };
    let parallelism =
        (par.tp.is_some() || par.pp.is_some() || par.ep.is_some() || par.etp.is_some())
            .then_some(par);
    // The operator runs the parts and the final step itself: `workers` alone.
    let workers = t.int(names::WORKERS)?;
    let enabled = t.flag("validate")?;
    let smoke_test = t.flag("smoke_test")?;
    let validation = (enabled.is_some() || smoke_test.is_some()).then_some(ValidationSpec {
        enabled,
        smoke_test,
    });
    // The rest by canonical name; the operator checks them against the same table.
    let mut parameters = BTreeMap::new();
    for (name, (param, value)) in std::mem::take(&mut t.left) {
        if req
            .step
            .param(name)
            .is_some_and(|p| matches!(p.role, Role::Input | Role::Output))
        {
            return Err(Error::Param {
                param,
                value,
                why: "the CheckpointConversion resource has no field for this path: run the step locally or with a slurm profile".into(),
            });
        }
        if [names::PART, names::FINALIZE].contains(&name) {
            return Err(Error::Param {
                param,
                value,
                why: "the operator runs every part and the final step of a CheckpointConversion itself: give workers=N alone".into(),
            });
        }
        parameters.insert(name.to_owned(), Parameter(value));
    }
    let option_refused = |param: &str, value: String| {
        Error::Param {
        param: param.into(),
        value,
        why: "the CheckpointConversion resource has no field for it: run the step locally or with a slurm profile".into(),
    }
    };
    if req.overwrite {
        return Err(option_refused("--overwrite", "true".into()));
    }
    if let Some(b) = &req.memory_budget {
        return Err(option_refused("--memory-budget", b.clone()));
    }
    if let Some((var, _)) = profile.env_vars.iter().next() {
        return Err(Error::Param {
            param: "env_vars".into(),
            value: var.clone(),
            why: format!(
                "profile {}: a CheckpointConversion's Job takes no extra environment",
                profile.name
            ),
        });
    }
    let spec = CheckpointConversionSpec {
        source,
        target,
        base_model,
        lora,
        parallelism,
        dtype,
        validation,
        parameters: (!parameters.is_empty()).then_some(parameters),
        job: job_options(profile, req)?,
        retry: None,
        workers,
    };
    let name = resource_name(req.step, &spec);
    let mut cr = CheckpointConversion::new(&name, spec);
    cr.metadata = ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_owned()),
        labels: Some(BTreeMap::from([(
            CREATED_BY_LABEL.to_owned(),
            "ckpt-convert".to_owned(),
        )])),
        annotations: Some(BTreeMap::from([(
            PROFILE_ANNOTATION.to_owned(),
            profile.name.clone(),
        )])),
        ..ObjectMeta::default()
    };
    Ok(cr)
}

fn job_options(profile: &Profile, req: &Request) -> Result<Option<JobOptions>> {
    let k = &profile.kubernetes;
    let quantities = |which: &str| {
        k.resources.get(which).map(|m| {
            m.iter()
                .map(|(r, q)| (r.clone(), Quantity(q.clone())))
                .collect::<BTreeMap<_, _>>()
        })
    };
    let resources = (!k.resources.is_empty()).then(|| ResourceRequirements {
        requests: quantities("requests"),
        limits: quantities("limits"),
        ..ResourceRequirements::default()
    });
    let threads = match req.threads {
        None => None,
        Some(n) => Some(i32::try_from(n).map_err(|_| Error::Param {
            param: "--threads".into(),
            value: n.to_string(),
            why: "too large".into(),
        })?),
    };
    let opts = JobOptions {
        image: profile.container_image.clone(),
        resources,
        node_selector: (!k.node_selector.is_empty()).then(|| k.node_selector.clone()),
        image_pull_secrets: (!k.image_pull_secrets.is_empty()).then(|| {
            k.image_pull_secrets
                .iter()
                .map(|n| LocalObjectReference { name: n.clone() })
                .collect()
        }),
        service_account_name: k.service_account.clone(),
        threads,
        ..JobOptions::default()
    };
    Ok((opts != JobOptions::default()).then_some(opts))
}

/// The fields that define the output: two submissions with the same ones are the
/// same conversion.
pub fn same_output(a: &CheckpointConversionSpec, b: &CheckpointConversionSpec) -> bool {
    identity(a) == identity(b)
}

fn identity(s: &CheckpointConversionSpec) -> String {
    serde_json::to_string(&(
        &s.source,
        &s.target,
        &s.base_model,
        &s.lora,
        &s.parallelism,
        &s.dtype,
        &s.validation,
    ))
    .expect("the spec serializes")
}

/// `megatron-to-hf-sft-hf-1a2b3c4d`: the step, the target's last directory and a
/// digest of what defines the output, so the same command names the same resource
/// (at most 63 characters, as the CRD requires).
pub fn resource_name(step: Step, spec: &CheckpointConversionSpec) -> String {
    let short = step.name().trim_start_matches("convert/").replace('_', "-");
    let last = spec.target.path.rsplit('/').next().unwrap_or_default();
    let mut word = String::new();
    for c in last.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            word.push(c);
        } else if !word.ends_with('-') {
            word.push('-');
        }
    }
    let digest = identity(spec)
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    let tag = format!("{:08x}", (digest >> 32) as u32 ^ digest as u32);
    let mut head = format!("{short}-{}", word.trim_matches('-'));
    head.truncate(63 - 1 - tag.len());
    format!("{}-{tag}", head.trim_end_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::EnvFile;

    fn lepton() -> Profile {
        EnvFile::parse(
            Path::new("env.toml"),
            r#"
[lepton_convert_model]
executor = "kubernetes"
namespace = "training"
container_image = "ghcr.io/ckpt-dev/ckpt-convert:0.1.0"
mounts = [{ path = "/mnt/lustre-shared", claim = "lustre-shared" }]
hf_home = "/mnt/lustre-shared/hf"
resources = { requests = { cpu = "8", memory = "32Gi" } }
"#,
        )
        .unwrap()
        .profile("lepton_convert_model")
        .unwrap()
    }

    fn req(step: Step, params: &[(&str, &str)]) -> Request {
        Request::new(
            step,
            params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            Path::new("/"),
        )
    }

    #[test]
    fn the_guide_command_becomes_claims_and_a_cached_model() {
        let r = req(
            Step::MegatronToHf,
            &[
                (
                    "megatron_path",
                    "/mnt/lustre-shared/output/sft/megatron_bridge/iter_0000100",
                ),
                (
                    "hf_model_id",
                    "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16",
                ),
                ("hf_path", "/mnt/lustre-shared/output/convert/sft-hf"),
                ("trust_remote_code", "true"),
            ],
        );
        let cr = manifest(&lepton(), &r, "training").unwrap();
        let s = &cr.spec;
        assert_eq!(
            (s.source.pvc.as_str(), s.source.path.as_str(), s.source.kind),
            (
                "lustre-shared",
                "output/sft/megatron_bridge/iter_0000100",
                ArtifactKind::CheckpointMegatron
            )
        );
        assert_eq!(s.target.path, "output/convert/sft-hf");
        let b = s.base_model.as_ref().unwrap();
        assert_eq!(
            (b.pvc.as_str(), b.path.as_str(), b.model_id.as_deref()),
            (
                "lustre-shared",
                "hf/hub",
                Some("nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16")
            )
        );
        let job = s.job.as_ref().unwrap();
        assert_eq!(
            job.image.as_deref(),
            Some("ghcr.io/ckpt-dev/ckpt-convert:0.1.0")
        );
        assert_eq!(
            job.resources.as_ref().unwrap().requests.as_ref().unwrap()["memory"],
            Quantity("32Gi".into())
        );
        assert_eq!(cr.metadata.namespace.as_deref(), Some("training"));
        let name = cr.metadata.name.unwrap();
        assert!(
            name.starts_with("megatron-to-hf-sft-hf-") && name.len() <= 63,
            "{name}"
        );
        // The same command names the same resource; another output another one.
        assert_eq!(resource_name(r.step, &cr.spec), name);
        let mut other = cr.spec.clone();
        other.dtype = Some(Dtype::Float32);
        assert_ne!(resource_name(r.step, &other), name);
    }

    #[test]
    fn paths_outside_the_mounts_are_refused_naming_both() {
        let r = req(
            Step::MegatronToHf,
            &[
                ("megatron_path", "/scratch/sft/iter_0000100"),
                ("hf_model_id", "/mnt/lustre-shared/hf/llama"),
                ("hf_path", "/mnt/lustre-shared/out"),
            ],
        );
        let e = manifest(&lepton(), &r, "training").unwrap_err().to_string();
        assert!(
            e.contains("megatron_path=/scratch/sft/iter_0000100")
                && e.contains("/mnt/lustre-shared (claim lustre-shared)"),
            "{e}"
        );
    }

    #[test]
    fn parameters_without_a_field_go_into_spec_parameters() {
        let r = req(
            Step::HfToMegatron,
            &[
                ("hf_model_id", "/mnt/lustre-shared/hf/llama"),
                ("megatron_path", "/mnt/lustre-shared/out"),
                ("keep_fp32", "false"),
                ("make_vocab_size_divisible_by", "128"),
            ],
        );
        let cr = manifest(&lepton(), &r, "t").unwrap();
        let p = cr.spec.parameters.expect("spec.parameters");
        let got: Vec<(&str, &str)> = p.iter().map(|(k, v)| (k.as_str(), v.0.as_str())).collect();
        assert_eq!(
            got,
            [
                ("keep_fp32", "false"),
                ("make_vocab_size_divisible_by", "128")
            ]
        );
    }

    #[test]
    fn options_without_a_field_are_refused_by_name() {
        let mut r = req(
            Step::HfToMegatron,
            &[
                ("hf_model_id", "meta/llama"),
                ("megatron_path", "/mnt/lustre-shared/out"),
            ],
        );
        assert!(
            manifest(&lepton(), &r, "t")
                .unwrap_err()
                .to_string()
                .contains("model id")
        );
        r.params
            .insert("hf_model_id".into(), "/mnt/lustre-shared/hf/llama".into());
        r.params.insert("workers".into(), "2".into());
        r.params.insert("part".into(), "0".into());
        let split = manifest(&lepton(), &r, "t").unwrap_err().to_string();
        assert!(split.contains("give workers=N alone"), "{split}");
        r.params.remove("part");
        let cr = manifest(&lepton(), &r, "t").unwrap();
        assert_eq!(cr.spec.workers, Some(2));
        assert!(
            cr.spec
                .parameters
                .as_ref()
                .is_none_or(|p| !p.contains_key("workers"))
        );
        r.params.remove("workers");
        r.overwrite = true;
        assert!(
            manifest(&lepton(), &r, "t")
                .unwrap_err()
                .to_string()
                .contains("--overwrite")
        );
    }

    #[test]
    fn merges_map_to_the_lora_fields() {
        let r = req(
            Step::MergeLora,
            &[
                ("lora_checkpoint", "/mnt/lustre-shared/lora/iter_0000200"),
                ("base_megatron_path", "/mnt/lustre-shared/base/iter_0000000"),
                ("output_megatron_path", "/mnt/lustre-shared/merged"),
                ("hf_model_path", "/mnt/lustre-shared/hf/llama"),
                ("output_hf_path", "/mnt/lustre-shared/merged-hf"),
                ("tp", "2"),
                ("smoke_test", "false"),
            ],
        );
        let cr = manifest(&lepton(), &r, "t").unwrap();
        let l = cr.spec.lora.unwrap();
        assert_eq!(l.base_megatron.unwrap().path, "base/iter_0000000");
        assert_eq!(l.megatron_target.unwrap().path, "merged");
        assert_eq!(cr.spec.base_model.unwrap().path, "hf/llama");
        assert_eq!(cr.spec.parallelism.unwrap().tp, Some(2));
        assert_eq!(cr.spec.validation.unwrap().smoke_test, Some(false));
        assert_eq!(cr.spec.source.kind, ArtifactKind::CheckpointLora);
    }
}
