//! Megatron-Bridge LoRA adapter checkpoints (`docs/lora.md#megatron-bridge-adapter-checkpoints`):
//! a Megatron-Core `torch_dist` iteration holding adapter tensors
//! only, `<module>.adapter.linear_in.weight` (A, `[r, in]`) and
//! `<module>.adapter.linear_out.weight` (B, `[out, r]`), stacked on a leading
//! layer axis like the base (or one key per layer), and a `run_config.yaml` whose
//! `peft:` section gives `dim`, `alpha` and `target_modules`.
//!
//! Modules of the dense decoder: `self_attention.linear_qkv` (B rows in the fused
//! tensor's group-interleaved order), `self_attention.linear_proj`,
//! `mlp.linear_fc1` (B rows `[gate; up]`, like the weight) and `mlp.linear_fc2`.
//! Canonical LoRA keeps separate adapters, `adapter_q|k|v` (B rows in Hugging Face
//! head order) and `adapter_gate|up`, each with its own A.
//!
//! The merge is `W' = W + (alpha/dim) · (B @ A)` per fused tensor, in the
//! arithmetic of the Megatron-Bridge version reproduced (`merge_arithmetic`):
//! - `param_dtype` (the default; Megatron-Bridge ≤ 0.4's `merge_lora.py`, the
//!   version the Nemotron images ship and the one the interop suite runs): the
//!   product, its scaling and the sum are tensor operations in the parameter's
//!   dtype, each rounded (`rne(W + rne(rne(B @ A) · s))`); its HF export with
//!   merged adapters splits B per HF tensor and merges with the same arithmetic,
//!   so it equals the export of the merged Megatron checkpoint;
//! - `fp32` (Megatron-Bridge ≥ 0.5, `_merge_single_adapter_weight`): computed in
//!   float32 and rounded once.
//!
//! Because the update of an element depends only on its row of B and column of
//! A, the merged Megatron tensor and each HF tensor of the export are planned
//! with the same arithmetic on their rows, and agree exactly with each other.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::LoraError;
use crate::formats::megatron::{self, MegatronCheckpoint};
use crate::formats::source::GlobalTensor;
use crate::plan::{Input, Operand, Rounding, Update};

/// Store index of the adapter in the plans (the base is store 0).
const ADAPTER: usize = 1;

/// The iteration directory `lora_checkpoint` leads to.
///
/// # Errors
/// [`LoraError::Resolve`] when it is neither an iteration directory nor a run
/// directory with a tracker or `iter_*` directories.
pub fn resolve(path: &Path) -> Result<(PathBuf, Option<String>), LoraError> {
    megatron::resolve_iteration(
        path,
        "lora_checkpoint",
        "a Megatron-Bridge adapter checkpoint",
    )
    .map_err(|why| LoraError::Resolve {
        path: path.to_owned(),
        why,
    })
}

/// Reads a `run_config.yaml`, when present.
///
/// # Errors
/// [`LoraError::Config`] when it is present but cannot be read, or is not YAML.
pub fn read_run_config(dir: &Path) -> Result<Option<Value>, LoraError> {
    let path = dir.join("run_config.yaml");
    let text = crate::formats::file::read_text_opt(&path, crate::formats::file::limit::YAML)
        .map_err(|e| LoraError::Config {
            path: path.clone(),
            key: "(file)".into(),
            why: e.to_string(),
        })?;
    let Some(text) = text else {
        return Ok(None);
    };
    crate::formats::yaml::parse(&text)
        .map(Some)
        .map_err(|e| LoraError::Config {
            path,
            key: "(file)".into(),
            why: e.to_string(),
        })
}

/// A string field at a dotted path of a YAML/JSON value.
pub fn field<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

/// The `peft:` section of an adapter's `run_config.yaml`.
#[derive(Debug, Clone, PartialEq)]
pub struct BridgeConfig {
    /// The file.
    pub path: PathBuf,
    /// `dim` (the rank).
    pub dim: u64,
    /// `alpha`.
    pub alpha: f64,
    /// `target_modules`.
    pub target_modules: Vec<String>,
    /// Canonical LoRA (separate q/k/v and gate/up adapters).
    pub canonical: bool,
    /// `checkpoint.pretrained_checkpoint`: the base the adapter was trained from.
    pub pretrained_checkpoint: Option<String>,
    /// `model.hf_model_id`.
    pub hf_model_id: Option<String>,
}

impl BridgeConfig {
    /// Reads the adapter checkpoint's `run_config.yaml`.
    ///
    /// # Errors
    /// [`LoraError::Refused`] when it is missing or names a method other than
    /// LoRA and canonical LoRA (DoRA, for instance); [`LoraError::Config`] for a
    /// missing or malformed `dim`, `alpha` or `target_modules`.
    pub fn read(dir: &Path) -> Result<BridgeConfig, LoraError> {
        let path = dir.join("run_config.yaml");
        let v = read_run_config(dir)?.ok_or_else(|| LoraError::Refused {
            path: path.clone(),
            why: "is missing: the adapter's dim and alpha (its scale) are recorded only there"
                .into(),
        })?;
        let peft = field(&v, "peft").ok_or_else(|| LoraError::Refused {
            path: path.clone(),
            why: "has no peft: section: not a Megatron-Bridge PEFT checkpoint".into(),
        })?;
        let bad = |key: &str, why: String| LoraError::Config {
            path: path.clone(),
            key: format!("peft.{key}"),
            why,
        };
        let target = field(peft, "_target_")
            .and_then(Value::as_str)
            .unwrap_or("");
        let canonical = match target.rsplit('.').next().unwrap_or("") {
            "LoRA" | "" => false,
            "CanonicalLoRA" => true,
            other => {
                return Err(LoraError::Refused {
                    path: path.clone(),
                    why: format!(
                        "peft._target_ is {target}: only Megatron-Bridge LoRA and CanonicalLoRA adapters are merged ({other} has other tensors or math)"
                    ),
                });
            }
        };
        let dim = field(peft, "dim")
            .and_then(Value::as_u64)
            .filter(|d| *d > 0)
            .ok_or_else(|| {
                bad(
                    "dim",
                    format!(
                        "expected a positive integer, found {:?}",
                        field(peft, "dim")
                    ),
                )
            })?;
        let alpha = field(peft, "alpha")
            .and_then(Value::as_f64)
            .filter(|a| a.is_finite())
            .ok_or_else(|| {
                bad(
                    "alpha",
                    format!("expected a number, found {:?}", field(peft, "alpha")),
                )
            })?;
        let target_modules = match field(peft, "target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|t| {
                    t.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad("target_modules", format!("expected names, found {t}")))
                })
                .collect::<Result<Vec<_>, _>>()?,
            other => {
                return Err(bad(
                    "target_modules",
                    format!("expected a list of module names, found {other:?}"),
                ));
            }
        };
        Ok(BridgeConfig {
            path,
            dim,
            alpha,
            target_modules,
            canonical,
            pretrained_checkpoint: field(&v, "checkpoint.pretrained_checkpoint")
                .and_then(Value::as_str)
                .map(str::to_owned),
            hf_model_id: field(&v, "model.hf_model_id")
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }

    /// `alpha / dim`, as Python computes it, rounded to f32 as torch multiplies.
    pub fn scale(&self) -> f32 {
        (self.alpha / self.dim as f64) as f32
    }
}

/// A component of the Mamba-2 `in_proj` weight, which Megatron-Core saves (and
/// Megatron-Bridge's adapter of it) as one tensor per component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum InProjPart {
    /// `z` (the gate).
    Z,
    /// `x`.
    X,
    /// `B`.
    B,
    /// `C`.
    C,
    /// `dt`.
    Dt,
}

impl InProjPart {
    const ALL: [InProjPart; 5] = [
        InProjPart::Z,
        InProjPart::X,
        InProjPart::B,
        InProjPart::C,
        InProjPart::Dt,
    ];

    /// The key suffix (`z`, `x`, `B`, `C`, `dt`).
    pub fn suffix(self) -> &'static str {
        match self {
            InProjPart::Z => "z",
            InProjPart::X => "x",
            InProjPart::B => "B",
            InProjPart::C => "C",
            InProjPart::Dt => "dt",
        }
    }

    fn from_suffix(s: &str) -> Option<InProjPart> {
        InProjPart::ALL.into_iter().find(|p| p.suffix() == s)
    }
}

/// An adaptable linear module of a decoder layer: attention, dense MLP, an MoE
/// layer's shared expert, a Mamba-2 mixer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Module {
    /// `self_attention.linear_qkv`.
    Qkv,
    /// `self_attention.linear_proj`.
    Proj,
    /// `mlp.linear_fc1`.
    Fc1,
    /// `mlp.linear_fc2`.
    Fc2,
    /// `mlp.shared_experts.linear_fc1`.
    SharedFc1,
    /// `mlp.shared_experts.linear_fc2`.
    SharedFc2,
    /// One component of `mixer.in_proj` (its adapter's A is shared by all five).
    InProj(InProjPart),
    /// `mixer.out_proj`.
    OutProj,
}

impl Module {
    const WHOLE: [Module; 7] = [
        Module::Qkv,
        Module::Proj,
        Module::Fc1,
        Module::Fc2,
        Module::SharedFc1,
        Module::SharedFc2,
        Module::OutProj,
    ];

    /// The module's key inside a layer.
    pub fn key(self) -> &'static str {
        match self {
            Module::Qkv => "self_attention.linear_qkv",
            Module::Proj => "self_attention.linear_proj",
            Module::Fc1 => "mlp.linear_fc1",
            Module::Fc2 => "mlp.linear_fc2",
            Module::SharedFc1 => "mlp.shared_experts.linear_fc1",
            Module::SharedFc2 => "mlp.shared_experts.linear_fc2",
            Module::InProj(_) => "mixer.in_proj",
            Module::OutProj => "mixer.out_proj",
        }
    }

    /// The weight's key inside a layer (`mixer.in_proj.weight.z`).
    pub fn weight_key(self) -> String {
        match self {
            Module::InProj(p) => format!("{}.weight.{}", self.key(), p.suffix()),
            _ => format!("{}.weight", self.key()),
        }
    }

    /// The module of a weight key inside a layer.
    fn of_weight_key(k: &str) -> Option<Module> {
        if let Some(c) = k.strip_prefix("mixer.in_proj.weight.") {
            return InProjPart::from_suffix(c).map(Module::InProj);
        }
        let m = k.strip_suffix(".weight")?;
        Module::WHOLE.into_iter().find(|x| x.key() == m)
    }

    /// Whether a module key inside a layer is `in_proj`'s.
    fn is_in_proj(k: &str) -> bool {
        k == "mixer.in_proj"
    }

    fn from_key(k: &str) -> Option<Module> {
        Module::WHOLE.into_iter().find(|m| m.key() == k)
    }

    /// The module's leaf name, which Megatron-Bridge's `target_modules` match.
    pub fn leaf(self) -> &'static str {
        let k = self.key();
        k.rsplit('.').next().unwrap_or(k)
    }
}

/// Which adapter of a module: the fused one, or a canonical part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    /// `adapter.linear_in/out`.
    Fused,
    /// `adapter.adapter_q`.
    Q,
    /// `adapter.adapter_k`.
    K,
    /// `adapter.adapter_v`.
    V,
    /// `adapter.adapter_gate`.
    Gate,
    /// `adapter.adapter_up`.
    Up,
}

impl Part {
    fn from_name(s: &str) -> Option<Part> {
        Some(match s {
            "adapter_q" => Part::Q,
            "adapter_k" => Part::K,
            "adapter_v" => Part::V,
            "adapter_gate" => Part::Gate,
            "adapter_up" => Part::Up,
            _ => return None,
        })
    }

    /// The `target_modules` name of this adapter.
    pub fn target_name(self, m: Module) -> &'static str {
        match self {
            Part::Q => "linear_q",
            Part::K => "linear_k",
            Part::V => "linear_v",
            Part::Gate => "linear_fc1_gate",
            Part::Up => "linear_fc1_up",
            Part::Fused => m.leaf(),
        }
    }
}

/// One matrix of an adapter for one layer: a tensor of the adapter checkpoint,
/// stacked (a leading layer axis) or per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mat {
    /// The adapter tensor.
    pub tensor: usize,
    /// `Some(layer)` when the tensor is stacked.
    pub layer: Option<u64>,
}

impl Mat {
    /// The box of rows `rows` and columns `cols` (start, count) of this layer's matrix.
    fn input(self, rows: (u64, u64), cols: (u64, u64)) -> Input {
        match self.layer {
            Some(l) => Input {
                store: ADAPTER,
                tensor: self.tensor,
                offsets: vec![l, rows.0, cols.0],
                sizes: vec![1, rows.1, cols.1],
            },
            None => Input {
                store: ADAPTER,
                tensor: self.tensor,
                offsets: vec![rows.0, cols.0],
                sizes: vec![rows.1, cols.1],
            },
        }
    }

    /// This layer's `[rows, cols]`.
    fn shape(self, t: &GlobalTensor) -> Option<(u64, u64)> {
        match (self.layer, t.shape.as_slice()) {
            (Some(_), [_, r, c]) | (None, [r, c]) => Some((*r, *c)),
            _ => None,
        }
    }
}

/// The adapters of a checkpoint: per (module, layer), per part, A and B.
#[derive(Debug, Clone, Default)]
pub struct Adapters {
    /// (module, layer) → part → (A, B).
    pub modules: BTreeMap<(Module, u64), BTreeMap<Part, (Mat, Mat)>>,
    /// Layers of stacked adapter tensors (their first axis).
    pub stacked_layers: Option<u64>,
}

/// The layer and key of a `decoder.layers.…` name: `(Some(l), rest)` for a
/// per-layer key, `(None, rest)` for a stacked one.
fn split_layer(name: &str) -> Option<(Option<u64>, &str)> {
    let rest = name.strip_prefix("decoder.layers.")?;
    let (head, tail) = rest.split_once('.')?;
    match head.parse::<u64>() {
        Ok(l) => Some((Some(l), tail)),
        Err(_) => Some((None, rest)),
    }
}

/// Sorts the adapter checkpoint's tensors into adapters.
///
/// # Errors
/// [`LoraError::Refused`] for a tensor that is not an adapter of a supported
/// module (full fine-tuned tensors, experts, Mamba projections), or an adapter
/// with one matrix only.
pub fn classify(ckpt: &MegatronCheckpoint) -> Result<Adapters, LoraError> {
    let refuse = |name: &str, why: String| LoraError::Refused {
        path: ckpt.dir.clone(),
        why: format!("tensor {name:?}: {why}"),
    };
    // (module, layer if per-layer, part) → (A, B) tensor indices.
    type Halves = BTreeMap<(Module, Option<u64>, Part), (Option<usize>, Option<usize>)>;
    let mut halves: Halves = BTreeMap::new();
    let mut stacked: Option<u64> = None;
    for (i, t) in ckpt.tensors.iter().enumerate() {
        let Some((module_key, rest)) = t.name.split_once(".adapter.") else {
            return Err(refuse(
                &t.name,
                "is not an adapter tensor (no \".adapter.\"): a Megatron-Bridge LoRA checkpoint holds adapters only; full fine-tuned tensors are not merged".into(),
            ));
        };
        let Some((layer, key)) = split_layer(module_key) else {
            return Err(refuse(&t.name, "is not in decoder.layers".into()));
        };
        let in_proj = Module::is_in_proj(key);
        let module = if in_proj {
            None
        } else {
            Some(Module::from_key(key).ok_or_else(|| {
                refuse(
                    &t.name,
                    format!(
                        "adapters on {key} are not supported (those on linear_qkv, linear_proj, linear_fc1, linear_fc2, the shared expert's linear_fc1/linear_fc2, in_proj and out_proj are; routed experts' are not)"
                    ),
                )
            })?)
        };
        let (part, mat) = match rest.split_once('.') {
            Some((p, m)) if p.starts_with("adapter_") => (
                Part::from_name(p)
                    .ok_or_else(|| refuse(&t.name, format!("unknown canonical adapter {p}")))?,
                m,
            ),
            _ => (Part::Fused, rest),
        };
        if in_proj && part != Part::Fused {
            return Err(refuse(
                &t.name,
                "a canonical adapter on in_proj: canonical LoRA exists for linear_qkv and linear_fc1 only".into(),
            ));
        }
        // in_proj's A is shared by its five components; its B is saved per component.
        let (is_a, modules): (bool, Vec<Module>) = match (module, mat) {
            (Some(m), "linear_in.weight") => (true, vec![m]),
            (Some(m), "linear_out.weight") => (false, vec![m]),
            (None, "linear_in.weight") => (true, InProjPart::ALL.map(Module::InProj).to_vec()),
            (None, m) => match m
                .strip_prefix("linear_out.weight.")
                .and_then(InProjPart::from_suffix)
            {
                Some(c) => (false, vec![Module::InProj(c)]),
                None => {
                    return Err(refuse(
                        &t.name,
                        format!(
                            "{m} is not an in_proj adapter matrix (expected linear_in.weight, or linear_out.weight.z/.x/.B/.C/.dt as Megatron-Core saves in_proj)"
                        ),
                    ));
                }
            },
            (Some(_), other) => {
                return Err(refuse(
                    &t.name,
                    format!(
                        "{other} is not an adapter matrix (expected linear_in.weight or linear_out.weight)"
                    ),
                ));
            }
        };
        let expected_rank = if layer.is_none() { 3 } else { 2 };
        if t.shape.len() != expected_rank {
            return Err(refuse(
                &t.name,
                format!(
                    "has shape {:?}: expected {expected_rank} dimensions",
                    t.shape
                ),
            ));
        }
        if layer.is_none() {
            let l = t.shape[0];
            if stacked.is_some_and(|s| s != l) {
                return Err(refuse(
                    &t.name,
                    format!("stacks {l} layers, other adapters {}", stacked.unwrap_or(0)),
                ));
            }
            stacked = Some(l);
        }
        for module in modules {
            let slot = halves.entry((module, layer, part)).or_default();
            let cell = if is_a { &mut slot.0 } else { &mut slot.1 };
            if cell.replace(i).is_some() {
                return Err(refuse(&t.name, "appears twice".into()));
            }
        }
    }
    let mut out = Adapters {
        stacked_layers: stacked,
        ..Adapters::default()
    };
    for ((module, layer, part), (a, b)) in halves {
        let (Some(a), Some(b)) = (a, b) else {
            let name = a
                .or(b)
                .map(|i| ckpt.tensors[i].name.clone())
                .unwrap_or_default();
            return Err(refuse(
                &name,
                "has no partner (an adapter needs linear_in and linear_out)".into(),
            ));
        };
        let layers: Vec<u64> = match layer {
            Some(l) => vec![l],
            None => (0..stacked.unwrap_or(0)).collect(),
        };
        for l in layers {
            let mat = |t: usize| Mat {
                tensor: t,
                layer: layer.is_none().then_some(l),
            };
            if out
                .modules
                .entry((module, l))
                .or_default()
                .insert(part, (mat(a), mat(b)))
                .is_some()
            {
                return Err(refuse(
                    &ckpt.tensors[a].name,
                    format!("layer {l} has this adapter both stacked and per layer"),
                ));
            }
        }
    }
    Ok(out)
}

/// What the canonical row split needs of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvLayout {
    /// Attention heads.
    pub heads: u64,
    /// Query groups.
    pub groups: u64,
    /// Head dimension.
    pub head_dim: u64,
}

impl QkvLayout {
    /// From the model's first attention and MLP blocks.
    pub fn from_model(m: &crate::models::Model) -> Option<QkvLayout> {
        let a = m.first_attention()?;
        Some(QkvLayout {
            heads: a.heads,
            groups: a.groups,
            head_dim: a.head_dim,
        })
    }

    /// From `run_config.yaml`'s `model:` section.
    pub fn from_run_config(v: &Value) -> Option<QkvLayout> {
        let int = |k: &str| field(v, &format!("model.{k}")).and_then(Value::as_u64);
        let heads = int("num_attention_heads")?;
        let hidden = int("hidden_size")?;
        Some(QkvLayout {
            heads,
            groups: int("num_query_groups").unwrap_or(heads),
            head_dim: int("kv_channels").unwrap_or(hidden / heads.max(1)),
        })
    }
}

/// A run of fused rows served by one adapter part: `[start, start+len)` of the
/// fused tensor are rows `[part_start, …)` of the part's B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    start: u64,
    len: u64,
    part: Part,
    part_start: u64,
}

fn segments(
    module: Module,
    parts: &BTreeMap<Part, (Mat, Mat)>,
    fused_rows: u64,
    layout: Option<&QkvLayout>,
) -> Result<Vec<Segment>, String> {
    if parts.contains_key(&Part::Fused) {
        if parts.len() > 1 {
            return Err("has both a fused and canonical adapters".into());
        }
        return Ok(vec![Segment {
            start: 0,
            len: fused_rows,
            part: Part::Fused,
            part_start: 0,
        }]);
    }
    let l = layout.ok_or("canonical adapters need the model's heads, query groups and head size (from run_config.yaml's model: section, or from hf_model_id/base_hf_path)")?;
    let mut segs = Vec::new();
    match module {
        Module::Qkv => {
            let (p, d) = (l.heads / l.groups.max(1), l.head_dim);
            for g in 0..l.groups {
                let base = g * (p + 2) * d;
                segs.push(Segment {
                    start: base,
                    len: p * d,
                    part: Part::Q,
                    part_start: g * p * d,
                });
                segs.push(Segment {
                    start: base + p * d,
                    len: d,
                    part: Part::K,
                    part_start: g * d,
                });
                segs.push(Segment {
                    start: base + (p + 1) * d,
                    len: d,
                    part: Part::V,
                    part_start: g * d,
                });
            }
        }
        Module::Fc1 => {
            // `[gate; up]`: the two halves of the fused rows.
            let half = fused_rows / 2;
            segs.push(Segment {
                start: 0,
                len: half,
                part: Part::Gate,
                part_start: 0,
            });
            segs.push(Segment {
                start: half,
                len: half,
                part: Part::Up,
                part_start: 0,
            });
        }
        _ => return Err("canonical adapters exist only for linear_qkv and linear_fc1".into()),
    }
    let total: u64 = segs.iter().map(|s| s.len).sum();
    if total != fused_rows {
        return Err(format!(
            "the canonical split covers {total} rows, the fused weight has {fused_rows}"
        ));
    }
    for s in &segs {
        if !parts.contains_key(&s.part) {
            return Err(format!("lacks {}", s.part.target_name(module)));
        }
    }
    Ok(segs)
}

/// Rows of a part's B (for the shape check).
fn part_rows(segs: &[Segment], part: Part) -> u64 {
    segs.iter().filter(|s| s.part == part).map(|s| s.len).sum()
}

/// A merge planner for one base and one adapter checkpoint.
pub struct Planner<'a> {
    /// The adapter checkpoint.
    pub adapter: &'a MegatronCheckpoint,
    /// Its adapters.
    pub adapters: &'a Adapters,
    /// Its configuration.
    pub config: &'a BridgeConfig,
    /// The model's head layout, for canonical adapters.
    pub layout: Option<QkvLayout>,
    /// Where the merge rounds: as Megatron-Bridge ≤ 0.4's `LoRAMerge` in the
    /// parameter dtype ([`Rounding::EachStep`]), or once in float32 as Bridge ≥ 0.5.
    pub rounding: Rounding,
}

/// The updates of one output weight, with the inputs they read (to append to the
/// piece's inputs, whose count so far is `base_inputs`).
pub struct Planned {
    /// Inputs to append.
    pub inputs: Vec<Input>,
    /// The updates.
    pub updates: Vec<Update>,
}

impl Planner<'_> {
    /// Checks every adapter against the base (`base` with its stacked or per-layer
    /// weights) and the configuration.
    ///
    /// # Errors
    /// [`LoraError::Mismatch`] for a missing or mis-shaped base weight or adapter
    /// matrix (the shape check; never downgraded); [`LoraError::Refused`] for an
    /// adapter `target_modules` does not name, or a target without adapters.
    pub fn check(&self, base: &MegatronCheckpoint) -> Result<(), LoraError> {
        let at = |i: usize| &self.adapter.tensors[i];
        let mismatch = |tensor: &str, expected: String, found: String| LoraError::Mismatch {
            path: self.adapter.dir.clone(),
            tensor: tensor.to_owned(),
            expected,
            found,
        };
        let r = self.config.dim;
        let targets = self.target_matchers()?;
        for ((module, layer), parts) in &self.adapters.modules {
            let Some((_, w_rows, w_cols)) = base_weight(base, *module, *layer) else {
                let (a, _) = parts.values().next().expect("a module has an adapter");
                return Err(mismatch(
                    &at(a.tensor).name,
                    format!(
                        "a base weight {} for layer {layer} in {}",
                        module.weight_key(),
                        base.dir.display()
                    ),
                    "none (is this the base the adapter was trained on?)".into(),
                ));
            };
            let segs = segments(*module, parts, w_rows, self.layout.as_ref()).map_err(|why| {
                LoraError::Refused {
                    path: self.adapter.dir.clone(),
                    why: format!("layer {layer} {}: {why}", module.key()),
                }
            })?;
            for (part, (a, b)) in parts {
                let name = part.target_name(*module);
                let full = format!("decoder.layers.{layer}.{}", module.key());
                if !targets.iter().any(|(_, m)| m(name, &full)) {
                    return Err(LoraError::Refused {
                        path: self.config.path.clone(),
                        why: format!(
                            "the checkpoint has a {name} adapter for layer {layer}, but peft.target_modules ({}) does not name it",
                            self.config.target_modules.join(", ")
                        ),
                    });
                }
                let want_b = part_rows(&segs, *part);
                let (ta, tb) = (at(a.tensor), at(b.tensor));
                if a.shape(ta) != Some((r, w_cols)) {
                    return Err(mismatch(
                        &ta.name,
                        format!(
                            "[{r}, {w_cols}] for layer {layer} (dim={r} from run_config.yaml, {w_cols} input features of the base's {})",
                            module.key()
                        ),
                        format!("{:?}", ta.shape),
                    ));
                }
                if b.shape(tb) != Some((want_b, r)) {
                    return Err(mismatch(
                        &tb.name,
                        format!(
                            "[{want_b}, {r}] for layer {layer} (output rows of the base's {} served by this adapter, dim={r})",
                            module.key()
                        ),
                        format!("{:?}", tb.shape),
                    ));
                }
            }
        }
        // Every base weight a target names has its adapter, as Megatron-Bridge
        // wraps every module a target matches.
        for (module, layer) in base_modules(base) {
            let full = format!("decoder.layers.{layer}.{}", module.key());
            let parts: &[Part] = match (self.config.canonical, module) {
                (true, Module::Qkv) => &[Part::Q, Part::K, Part::V],
                (true, Module::Fc1) => &[Part::Gate, Part::Up],
                _ => &[Part::Fused],
            };
            for part in parts {
                let name = part.target_name(module);
                let Some((target, _)) = targets.iter().find(|(_, m)| m(name, &full)) else {
                    continue;
                };
                let have = self
                    .adapters
                    .modules
                    .get(&(module, layer))
                    .is_some_and(|p| p.contains_key(part));
                if !have {
                    return Err(LoraError::Refused {
                        path: self.adapter.dir.clone(),
                        why: format!(
                            "peft.target_modules names {target}, which matches the base's {} of layer {layer}, but the checkpoint has no {name} adapter there (a partial or mismatched checkpoint)",
                            module.weight_key()
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Target matchers: an exact module name (`linear_qkv`), or a wildcard pattern
    /// matched against the full module name (`*.layers.0.*.linear_qkv`).
    #[allow(clippy::type_complexity)]
    fn target_matchers(&self) -> Result<Vec<(String, Box<dyn Fn(&str, &str) -> bool>)>, LoraError> {
        self.config
            .target_modules
            .iter()
            .map(|t| {
                let t2 = t.clone();
                let m: Box<dyn Fn(&str, &str) -> bool> = if t.contains(['*', '?']) {
                    let re = regex::Regex::new(&format!(
                        "^{}$",
                        regex::escape(t).replace(r"\*", ".*").replace(r"\?", ".")
                    ))
                    .map_err(|e| LoraError::Config {
                        path: self.config.path.clone(),
                        key: "peft.target_modules".into(),
                        why: format!("{t:?}: {e}"),
                    })?;
                    Box::new(move |name, full| {
                        re.is_match(&format!("{full}.{name}")) || re.is_match(full)
                    })
                } else {
                    Box::new(move |name, _| name == t2)
                };
                Ok((t.clone(), m))
            })
            .collect()
    }

    /// The updates of the output rows `out.0..` of a piece of `out.1` rows, which
    /// are the fused rows `w_rows` (start, count; in the weight's order) and columns
    /// `cols` (start, count) of `module` in `layer`. `base_inputs` is the number of
    /// inputs the piece already has.
    #[allow(clippy::too_many_arguments)]
    pub fn updates(
        &self,
        module: Module,
        layer: u64,
        fused_total: u64,
        w_rows: &[(u64, u64)],
        cols: (u64, u64),
        out: (u64, u64),
        base_inputs: usize,
    ) -> Option<Planned> {
        let parts = self.adapters.modules.get(&(module, layer))?;
        let segs = segments(module, parts, fused_total, self.layout.as_ref())
            .expect("checked by Planner::check");
        // Walk the weight's rows and hand each run to the adapter part serving it.
        // part → (runs of the weight's rows, runs of the part's B rows).
        type Runs = Vec<(u64, u64)>;
        let mut per_part: Vec<(Part, Runs, Runs)> = Vec::new();
        let mut w_pos = out.0;
        for &(start, count) in w_rows {
            let mut cur = start;
            while cur < start + count {
                let s = segs
                    .iter()
                    .find(|s| s.start <= cur && cur < s.start + s.len)
                    .expect("segments cover the fused rows");
                let len = (start + count).min(s.start + s.len) - cur;
                let b_start = s.part_start + (cur - s.start);
                let entry = match per_part.iter_mut().find(|(p, _, _)| *p == s.part) {
                    Some(e) => e,
                    None => {
                        per_part.push((s.part, Vec::new(), Vec::new()));
                        per_part.last_mut().expect("just pushed")
                    }
                };
                push_run(&mut entry.1, (w_pos, len));
                push_run(&mut entry.2, (b_start, len));
                w_pos += len;
                cur += len;
            }
        }
        let r = self.config.dim;
        let mut inputs = Vec::new();
        let mut updates = Vec::new();
        for (part, w_runs, b_runs) in per_part {
            let (a, b) = parts[&part];
            inputs.push(a.input((0, r), cols));
            let a_op = Operand {
                inputs: vec![base_inputs + inputs.len() - 1],
                rows: r,
                cols: cols.1,
                transposed: false,
            };
            let mut b_inputs = Vec::new();
            for &run in &b_runs {
                inputs.push(b.input(run, (0, r)));
                b_inputs.push(base_inputs + inputs.len() - 1);
            }
            let rows_total: u64 = b_runs.iter().map(|r| r.1).sum();
            let all = w_runs.as_slice() == [(0, out.1)];
            updates.push(Update::Linear {
                a: a_op,
                b: Operand {
                    inputs: b_inputs,
                    rows: rows_total,
                    cols: r,
                    transposed: false,
                },
                scale: self.config.scale(),
                rounding: self.rounding,
                transposed: false,
                rows: (!all).then_some(w_runs),
                magnitude: None,
            });
        }
        Some(Planned { inputs, updates })
    }
}

fn push_run(runs: &mut Vec<(u64, u64)>, run: (u64, u64)) {
    if let Some(last) = runs.last_mut()
        && last.0 + last.1 == run.0
    {
        last.1 += run.1;
        return;
    }
    runs.push(run);
}

/// The base weight of `module` in `layer`: (tensor, rows, columns).
pub fn base_weight(
    base: &MegatronCheckpoint,
    module: Module,
    layer: u64,
) -> Option<(usize, u64, u64)> {
    let stacked = format!("decoder.layers.{}", module.weight_key());
    let per_layer = format!("decoder.layers.{layer}.{}", module.weight_key());
    base.tensors.iter().enumerate().find_map(|(i, t)| {
        if t.name == stacked {
            match t.shape.as_slice() {
                [l, r, c] if layer < *l => Some((i, *r, *c)),
                _ => None,
            }
        } else if t.name == per_layer {
            match t.shape.as_slice() {
                [r, c] => Some((i, *r, *c)),
                _ => None,
            }
        } else {
            None
        }
    })
}

/// Every adaptable weight of the base: (module, layer).
pub fn base_modules(base: &MegatronCheckpoint) -> Vec<(Module, u64)> {
    let mut out = Vec::new();
    for t in &base.tensors {
        let Some((layer, key)) = split_layer(&t.name) else {
            continue;
        };
        let Some(module) = Module::of_weight_key(key) else {
            continue;
        };
        match (layer, t.shape.as_slice()) {
            (None, [l, _, _]) => out.extend((0..*l).map(|l| (module, l))),
            (Some(l), [_, _]) => out.push((module, l)),
            _ => {}
        }
    }
    out.sort();
    out
}

/// The module and layer a base tensor chunk belongs to, when it is an adaptable
/// weight: (module, layer, fused rows of the weight).
pub fn weight_of_chunk(
    t: &GlobalTensor,
    offsets: &[u64],
    sizes: &[u64],
) -> Option<(Module, u64, u64)> {
    let (layer, key) = split_layer(&t.name)?;
    let module = Module::of_weight_key(key)?;
    match (layer, t.shape.as_slice()) {
        (None, [_, r, _]) if sizes.first() == Some(&1) => Some((module, offsets[0], *r)),
        (Some(l), [r, _]) => Some((module, l, *r)),
        _ => None,
    }
}

/// Whether a stacked chunk spans several layers (it cannot be merged as one).
pub fn spans_layers(t: &GlobalTensor, sizes: &[u64]) -> bool {
    split_layer(&t.name).is_some_and(|(l, key)| {
        l.is_none() && Module::of_weight_key(key).is_some() && sizes.first().is_some_and(|s| *s > 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(ps: &[Part]) -> BTreeMap<Part, (Mat, Mat)> {
        ps.iter()
            .enumerate()
            .map(|(i, p)| {
                let m = Mat {
                    tensor: i,
                    layer: Some(0),
                };
                (*p, (m, m))
            })
            .collect()
    }

    #[test]
    fn canonical_qkv_rows_follow_the_group_interleave() {
        // 4 heads, 2 groups, head_dim 1: fused rows q0 q1 k0 v0 q2 q3 k1 v1.
        let l = QkvLayout {
            heads: 4,
            groups: 2,
            head_dim: 1,
        };
        let segs = segments(
            Module::Qkv,
            &parts(&[Part::Q, Part::K, Part::V]),
            8,
            Some(&l),
        )
        .unwrap();
        let map: Vec<(u64, Part, u64)> = segs
            .iter()
            .flat_map(|s| (0..s.len).map(move |i| (s.start + i, s.part, s.part_start + i)))
            .collect();
        assert_eq!(
            map,
            vec![
                (0, Part::Q, 0),
                (1, Part::Q, 1),
                (2, Part::K, 0),
                (3, Part::V, 0),
                (4, Part::Q, 2),
                (5, Part::Q, 3),
                (6, Part::K, 1),
                (7, Part::V, 1)
            ]
        );
        let e = segments(Module::Qkv, &parts(&[Part::Q, Part::K]), 8, Some(&l)).unwrap_err();
        assert!(e.contains("linear_v"), "{e}");
        let segs = segments(Module::Fc1, &parts(&[Part::Gate, Part::Up]), 6, Some(&l)).unwrap();
        assert_eq!(
            segs[1],
            Segment {
                start: 3,
                len: 3,
                part: Part::Up,
                part_start: 0
            }
        );
    }

    #[test]
    fn layer_keys() {
        assert_eq!(
            split_layer("decoder.layers.self_attention.linear_qkv.weight"),
            Some((None, "self_attention.linear_qkv.weight"))
        );
        assert_eq!(
            split_layer("decoder.layers.3.mlp.linear_fc1.weight"),
            Some((Some(3), "mlp.linear_fc1.weight"))
        );
        assert_eq!(split_layer("embedding.word_embeddings.weight"), None);
    }
}
