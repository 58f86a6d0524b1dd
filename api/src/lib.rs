//! The `CheckpointConversion` resource (`ckpt.dev/v1alpha1`).
//!
//! A conversion names a source artifact and a target artifact on PVCs; the step
//! follows from their kinds, as in the converter's vocabulary:
//!
//! | source | target | step |
//! |---|---|---|
//! | `checkpoint_hf` | `checkpoint_megatron` | `convert/hf_to_megatron` |
//! | `checkpoint_megatron` | `checkpoint_hf` | `convert/megatron_to_hf` |
//! | `checkpoint_lora` | `checkpoint_hf` | `convert/merge_lora` |
//!
//! # What defines the output
//!
//! `source`, `target`, `baseModel`, `lora`, `parallelism`, `dtype`, `validation` and
//! `parameters` define the output. They are fixed at creation: the CEL rules below
//! refuse a change, and refuse adding or removing an optional one (a rule at the
//! parent compares `has(self.x)` with `has(oldSelf.x)`, because a rule on the field
//! itself only runs when an old value exists).
//!
//! Everything else does not define the output and never decides whether a conversion
//! runs: `job` (how the Job runs) and `workers` (how many pods share it) apply to the
//! next run the resource starts, and labels and annotations are not looked at. A conversion runs once; one that failed
//! runs again only when `retry` is raised. One that succeeded never runs again. The
//! apiserver enforces the rules with CEL, so invalid resources never reach the operator.
//!
//! This crate is the resource as both of its clients see it: the operator, which
//! reconciles it, and `ckpt-convert run … --batch PROFILE`, which creates it from a
//! command line and reads the outcome from its status ([`phase`], [`reason`]).
#![deny(missing_docs)]

pub mod reason;

/// Phases shown by `kubectl get` (a summary of the conditions, not a state machine).
pub mod phase {
    /// Waiting: for a claim, for an earlier run, or for a pod that cannot start.
    pub const PENDING: &str = "Pending";
    /// The Job runs.
    pub const RUNNING: &str = "Running";
    /// Converted and validated.
    pub const SUCCEEDED: &str = "Succeeded";
    /// The conversion failed.
    pub const FAILED: &str = "Failed";
    /// The spec was refused (invalid, or another resource owns the target).
    pub const REJECTED: &str = "Rejected";
}

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{LocalObjectReference, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A directory inside a claim: relative, `/`-separated, no `.` or `..` components.
const PVC_PATH_PATTERN: &str =
    r"^[A-Za-z0-9_@+=-][A-Za-z0-9._@+=-]*(/[A-Za-z0-9_@+=-][A-Za-z0-9._@+=-]*)*$";

/// The kind of a checkpoint artifact: the vocabulary the converter speaks.
pub use ckpt_wire::ArtifactKind;

/// A checkpoint on a PVC.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[x_kube(cel)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// What the directory holds.
    pub kind: ArtifactKind,
    /// The PersistentVolumeClaim, in the resource's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub pvc: String,
    /// The directory inside the claim: relative, `/`-separated, no `.` or `..`.
    #[schemars(
        length(min = 1, max = 1024),
        regex(pattern = PVC_PATH_PATTERN)
    )]
    pub path: String,
}

/// A directory on a PVC.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcPath {
    /// The PersistentVolumeClaim, in the resource's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub pvc: String,
    /// The directory inside the claim.
    #[schemars(
        length(min = 1, max = 1024),
        regex(pattern = PVC_PATH_PATTERN)
    )]
    pub path: String,
}

/// The Hugging Face model that supplies config, tokenizer and chat template (and,
/// for LoRA, the base weights): a directory on a PVC, or a model id looked up in a
/// Hugging Face cache on a PVC (`path` is then the cache's `hub` directory).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BaseModel {
    /// The PersistentVolumeClaim.
    #[schemars(length(min = 1, max = 253))]
    pub pvc: String,
    /// The model directory, or the HF cache `hub` directory when `modelId` is set.
    #[schemars(
        length(min = 1, max = 1024),
        regex(pattern = PVC_PATH_PATTERN)
    )]
    pub path: String,
    /// A model id (`org/name`, optionally `@revision`) resolved offline in the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 256),
        regex(pattern = r"^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+(@[A-Za-z0-9._-]+)?$")
    )]
    pub model_id: Option<String>,
}

/// Which LoRA merge implementation to reproduce.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoraBackend {
    /// `megatron_bridge` when `baseMegatron` is given, else `hf_peft`.
    Auto,
    /// A PEFT adapter merged as `merge_and_unload` does.
    HfPeft,
    /// A Megatron-Bridge adapter merged into a Megatron base.
    MegatronBridge,
}

/// LoRA merge settings (only with a `checkpoint_lora` source).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoraSpec {
    /// The merge implementation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<LoraBackend>,
    /// The Megatron base checkpoint (an `iter_*` directory), for `megatron_bridge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_megatron: Option<PvcPath>,
    /// Where to write the merged Megatron checkpoint, for `megatron_bridge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub megatron_target: Option<PvcPath>,
    /// Also export the merged model to the HF target (`megatron_bridge`; default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_hf: Option<bool>,
    /// The base's expected digest (from its manifest), checked before merging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub base_digest: Option<String>,
    /// Downgrade the base-name check to a warning (shapes are always checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_base_mismatch: Option<bool>,
}

/// The parallel layout a Megatron checkpoint is written for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Parallelism {
    /// Tensor parallel size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub tp: Option<i32>,
    /// Pipeline parallel size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub pp: Option<i32>,
    /// Expert parallel size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub ep: Option<i32>,
    /// Expert tensor parallel size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub etp: Option<i32>,
}

/// Output weight dtype.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// `bfloat16` (the default).
    Bfloat16,
    /// `float16`.
    Float16,
    /// `float32`.
    Float32,
}

impl Dtype {
    /// The converter's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bfloat16 => "bfloat16",
            Dtype::Float16 => "float16",
            Dtype::Float32 => "float32",
        }
    }
}

/// The value of a step parameter, as typed after `key=` on the command line.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct Parameter(#[schemars(length(min = 1, max = 256))] pub String);

/// Validation after the conversion.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValidationSpec {
    /// Validate the output (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Include the numeric smoke test (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoke_test: Option<bool>,
}

/// How the conversion Job runs. These fields may change at any time; they do not
/// define the output, never start a Job by themselves, and apply to the next Job the
/// resource starts (see `retry`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobOptions {
    /// Converter image (default: the operator's `--converter-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub image: Option<String>,
    /// Image pull policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub image_pull_policy: Option<String>,
    /// Image pull secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    /// Container resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub tolerations: Option<Vec<Toleration>>,
    /// Service account of the converter pod (no token is mounted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub service_account_name: Option<String>,
    /// Priority class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub priority_class_name: Option<String>,
    /// Pod retries for failures other than bad input (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 20))]
    pub backoff_limit: Option<i32>,
    /// Seconds a finished Job is kept (default: kept until the resource is deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,
    /// Deadline for the Job, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// `fsGroup` of the pod (group ownership of writable volumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_group: Option<i64>,
    /// User id the converter runs as (non-root; default 65532).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub run_as_user: Option<i64>,
    /// Group id the converter runs as (default 65532).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub run_as_group: Option<i64>,
    /// Converter worker threads (default: the CPUs it is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub threads: Option<i32>,
}

/// The desired conversion.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "ckpt.dev",
    version = "v1alpha1",
    kind = "CheckpointConversion",
    plural = "checkpointconversions",
    shortname = "ckptconv",
    namespaced,
    status = "CheckpointConversionStatus",
    printcolumn(name = "Step", type_ = "string", json_path = ".status.step"),
    printcolumn(name = "Phase", type_ = "string", description = "Summary of the conditions", json_path = ".status.phase"),
    printcolumn(name = "Reason", type_ = "string", description = "Why the resource is in its phase", json_path = ".status.reason"),
    printcolumn(name = "Validated", type_ = "string", json_path = ".status.conditions[?(@.type==\"Validated\")].status"),
    printcolumn(name = "Message", type_ = "string", description = "What the reason means for this resource", json_path = ".status.message"),
    printcolumn(name = "Target", type_ = "string", priority = 1, json_path = ".spec.target.path"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 63").message("metadata.name must be at most 63 characters (it names the conversion Job)"),
)]
#[x_kube(
    cel,
    validation = Rule::new("(self.source.kind == 'checkpoint_hf' && self.target.kind == 'checkpoint_megatron') || (self.source.kind == 'checkpoint_megatron' && self.target.kind == 'checkpoint_hf') || (self.source.kind == 'checkpoint_lora' && self.target.kind == 'checkpoint_hf')").message("no step converts source.kind to target.kind: expected checkpoint_hf→checkpoint_megatron, checkpoint_megatron→checkpoint_hf or checkpoint_lora→checkpoint_hf"),
    validation = Rule::new("!(self.target.pvc == self.source.pvc && (self.target.path == self.source.path || self.target.path.startsWith(self.source.path + '/') || self.source.path.startsWith(self.target.path + '/')))").message("target.path must not equal, be inside, or contain source.path on the same PVC (the source must never be harmed)"),
    validation = Rule::new("!has(self.lora) || self.source.kind == 'checkpoint_lora'").message("lora is only valid with a checkpoint_lora source"),
    validation = Rule::new("self.source.kind == 'checkpoint_hf' || has(self.baseModel) || (has(self.lora) && has(self.lora.baseMegatron))").message("baseModel is required for this step (it supplies config, tokenizer and chat template)"),
    validation = Rule::new("!has(self.baseModel) || !(self.target.pvc == self.baseModel.pvc && (self.target.path == self.baseModel.path || self.target.path.startsWith(self.baseModel.path + '/') || self.baseModel.path.startsWith(self.target.path + '/')))").message("target.path must not equal, be inside, or contain baseModel.path on the same PVC"),
    validation = Rule::new("has(self.baseModel) == has(oldSelf.baseModel)").message("baseModel is immutable: it cannot be added or removed after creation"),
    validation = Rule::new("has(self.lora) == has(oldSelf.lora)").message("lora is immutable: it cannot be added or removed after creation"),
    validation = Rule::new("has(self.parallelism) == has(oldSelf.parallelism)").message("parallelism is immutable: it cannot be added or removed after creation"),
    validation = Rule::new("has(self.dtype) == has(oldSelf.dtype)").message("dtype is immutable: it cannot be added or removed after creation"),
    validation = Rule::new("has(self.validation) == has(oldSelf.validation)").message("validation is immutable: it cannot be added or removed after creation"),
    validation = Rule::new("has(self.parameters) == has(oldSelf.parameters)").message("parameters is immutable: it cannot be added or removed after creation"),
    validation = Rule::new("!has(oldSelf.retry) || (has(self.retry) && self.retry >= oldSelf.retry)").message("retry may only be raised"),
)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointConversionSpec {
    /// What to convert.
    #[x_kube(validation = Rule::new("self == oldSelf").message("source is immutable"))]
    pub source: Artifact,
    /// Where to write the result.
    #[x_kube(validation = Rule::new("self == oldSelf").message("target is immutable"))]
    pub target: Artifact,
    /// The Hugging Face model supplying config, tokenizer and chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("baseModel is immutable"))]
    pub base_model: Option<BaseModel>,
    /// LoRA merge settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("lora is immutable"))]
    pub lora: Option<LoraSpec>,
    /// Parallel layout of a Megatron target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("parallelism is immutable"))]
    pub parallelism: Option<Parallelism>,
    /// Output weight dtype (default bfloat16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("dtype is immutable"))]
    pub dtype: Option<Dtype>,
    /// Validation settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("validation is immutable"))]
    pub validation: Option<ValidationSpec>,
    /// Further parameters of the step, by the names `ckpt-convert run STEP --help`
    /// documents (`keep_fp32: "false"`, `make_vocab_size_divisible_by: "128"`). Those
    /// that name paths, and those with a field above (dtype, parallelism, validation,
    /// lora), are set there instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("parameters is immutable"))]
    pub parameters: Option<BTreeMap<String, Parameter>>,
    /// Job settings (mutable; they apply to the next Job and never start one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobOptions>,
    /// Raise to run a failed conversion again, with the current `job` settings (a
    /// conversion that succeeded never runs again). Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub retry: Option<i32>,
    /// Pods that share one conversion (default 1): each index of an Indexed Job
    /// writes its byte-balanced share of the output files into one staging
    /// directory beside the target, then one more pod checks every part, validates
    /// and publishes. The output is the same, byte for byte, for any number; like
    /// `job`, a change applies to the next run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 128))]
    pub workers: Option<i32>,
}

/// What the converter reported, parsed from its termination message.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConversionSummary {
    /// Tensors written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensors: Option<i64>,
    /// Tensor bytes written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    /// Files written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<i64>,
    /// Conversion wall time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Validation checks passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks_passed: Option<i64>,
    /// Validation checks failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks_failed: Option<i64>,
    /// Largest absolute logit difference of the smoke test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoke_test_max_abs_diff: Option<f64>,
    /// Layout-independent digest of the output tensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_digest: Option<String>,
    /// The full report on the PVC (path inside the target claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_path: Option<String>,
    /// The output directory (inside the target claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_path: Option<String>,
    /// The target was already published by an identical conversion (same step,
    /// parameters and source digests) and was not rewritten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused: Option<bool>,
    /// What the converter warned about (for example a base it could not confirm).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub warnings: Vec<String>,
}

/// Observed state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointConversionStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`, `Running`, `Succeeded`, `Failed`, `Validated`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    #[schemars(length(max = 8))]
    pub conditions: Vec<Condition>,
    /// A one-word summary of the conditions, for `kubectl get` (Pending, Running,
    /// Succeeded, Failed, Rejected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The reason of the condition that decides the phase (CamelCase).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The first line of that condition's message, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `spec.retry` the conversion described here ran for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<i32>,
    /// Pods of the current Job that failed (each one a failed attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_attempts: Option<i32>,
    /// The converter step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The conversion Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// When the Job started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the Job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// What the converter reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<ConversionSummary>,
    /// A run split across pods (`spec.workers` above 1): where its parts stand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<PartsStatus>,
}

/// The parts of a split run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartsStatus {
    /// The number of parts (the `spec.workers` the run started with).
    pub workers: i32,
    /// Parts whose pod completed.
    pub done: i32,
    /// Parts whose pod runs now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<i32>,
    /// Parts that failed beyond their retries, as the Job lists them (`1,3-4`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub failed: Option<String>,
    /// Tensor bytes the completed parts wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    /// The part that took (or, while parts run, is taking) longest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slowest: Option<SlowestPart>,
    /// The Job that checks the parts and publishes, once they are all done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalize_job: Option<String>,
}

/// The slowest part of a split run: while parts run, the one running longest;
/// once none runs, the one that took longest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SlowestPart {
    /// Its index.
    pub index: i32,
    /// Seconds its pod ran, once it completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<i64>,
    /// When its pod started, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_since: Option<Time>,
}
