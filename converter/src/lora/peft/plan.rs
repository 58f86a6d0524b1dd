//! The merged HF checkpoint of a PEFT adapter, planned from headers: every base
//! tensor, copied, replaced by the adapter's full tensor (`modules_to_save`, saved
//! embedding layers, trained biases; cast to the base dtype as loading does), or
//! updated by its LoRA matrices (`docs/lora.md#peft-merge-arithmetic`).
//!
//! Tied embeddings (`tie_word_embeddings=true`, one matrix for input and output)
//! are planned as two tensors, the input embedding and the output head, each with
//! what applies to it in the unmerged PEFT model: a LoRA on `lm_head` changes the
//! head only, a LoRA on the embedding the embedding only, a `modules_to_save` copy
//! only its module; what PEFT loads into the shared parameter itself (a saved
//! embedding layer, trainable tokens) applies to both, and so does the embedding's
//! `modules_to_save` copy under `ensure_weight_tying` (the head is tied to it).
//! When the two end up different, both are written and `tie_word_embeddings` is set
//! to false; the merged model then computes what the unmerged one did. (PEFT's own
//! `merge_and_unload` adds a head LoRA to the shared storage, changing the input
//! embedding too; the interop suite measures both: `docs/lora.md#tied-embeddings`.)

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

use super::{AdapterConfig, AdapterWeights, Keys, Part};
use crate::formats::dtype::DType;
use crate::formats::hf::HfCheckpoint;
use crate::formats::source::GlobalTensor;
use crate::lora::LoraError;
use crate::models::ExpertParam;
use crate::plan::tensor::{TensorOut, row_len, rows};
use crate::plan::{Input, LoraMerge, Operand, Rounding, RowGather, Update};

/// Store indices of the plan: the base, then the adapter.
const BASE: usize = 0;
const ADAPTER: usize = 1;

/// Names of input embeddings, by suffix, and of output heads.
const INPUT_EMBEDDINGS: [&str; 4] = [
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
];
const OUTPUT_HEADS: [&str; 2] = ["lm_head.weight", "embed_out.weight"];

/// Model types whose square projections are transformers `Conv1D` (stored
/// `[in, out]`); non-square weights tell their layout by shape.
const CONV1D_MODEL_TYPES: [&str; 4] = ["gpt2", "openai-gpt", "imagegpt", "decision_transformer"];

/// How the base's family names its modules in memory where that differs from
/// the checkpoint (adapters made with transformers 5 name them so).
#[derive(Debug, Clone, Copy, Default)]
pub struct Naming {
    /// `(in memory, checkpoint)`, the first occurrence replaced.
    pub renames: &'static [(&'static str, &'static str)],
    /// The fused experts' parameters, in registration order.
    pub expert_params: &'static [ExpertParam],
}

/// An adapted experts parameter: its description, lora_A and lora_B.
type WrappedParam = (ExpertParam, usize, usize);

/// The planned merge.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Output tensors in state-dict order (the base's, then a newly untied head).
    pub tensors: Vec<TensorOut>,
    /// The merge of each tensor (same order).
    pub merges: Vec<Option<LoraMerge>>,
    /// The input embedding and output head differ after the merge:
    /// `tie_word_embeddings` becomes false.
    pub untie: bool,
    /// The new `vocab_size`, when saved embedding layers resized the vocabulary.
    pub vocab_size: Option<u64>,
    /// Modules updated by LoRA matrices.
    pub lora_modules: usize,
    /// Base tensors replaced whole.
    pub replaced: usize,
    /// Things the user should know (a tie undone, adapter tensors that are tied copies).
    pub notes: Vec<String>,
    /// Adapter tensors not used, with the reason.
    pub skipped: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Source {
    Base(usize),
    Adapter(usize),
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Linear {
        a: usize,
        b: usize,
        scale: f32,
        transposed: bool,
        magnitude: Option<usize>,
        note: String,
    },
    Embedding {
        a: usize,
        b: usize,
        scale: f32,
        magnitude: Option<usize>,
        note: String,
    },
    Bias {
        values: usize,
        scale: f32,
    },
    Rows {
        indices: Vec<u64>,
        values: usize,
    },
    /// Rows `rows` (start, count) of expert `expert`'s slice of a fused experts
    /// parameter adapted through `target_parameters`: `A` rows `expert·r..`, `B`
    /// columns `k·experts + expert` (PEFT lays the experts' ranks out so).
    Expert {
        a: usize,
        b: usize,
        expert: u64,
        experts: u64,
        r: u64,
        rows: (u64, u64),
        scale: f32,
        note: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct Spec {
    name: String,
    source: Source,
    shape: Vec<u64>,
    dtype: DType,
    ops: Vec<Op>,
}

impl Spec {
    fn changed(&self) -> bool {
        !self.ops.is_empty() || matches!(self.source, Source::Adapter(_))
    }

    fn same_values(&self, other: &Spec) -> bool {
        self.source == other.source && self.ops == other.ops && self.shape == other.shape
    }
}

/// Plans the merge of `adapter` (configuration `cfg`, keys `keys`) into `base`.
///
/// # Errors
/// [`LoraError::Mismatch`] when an adapter tensor has no base tensor of the right
/// shape (never downgraded), or the adapter's matrices disagree with each other or
/// with the configured rank; [`LoraError::Refused`] for what is not merged
/// faithfully (convolutions, DoRA with `lora_bias`, quantized base weights, LoRA
/// weights the configuration does not target, targets without weights).
pub fn plan(
    base: &HfCheckpoint,
    base_config: Option<&Value>,
    adapter: &AdapterWeights,
    cfg: &AdapterConfig,
    keys: &Keys,
    naming: Naming,
) -> Result<Planned, LoraError> {
    let tie = Tie::of(base, base_config);
    let wrapped = wrapped_experts(adapter, cfg, keys, naming)?;
    let names = Names::resolve(base, &tie, adapter, keys, &wrapped, naming)?;
    let planner = Planner {
        base,
        base_config,
        adapter,
        cfg,
        keys,
        naming,
        model_type: base_config
            .and_then(|c| c.get("model_type"))
            .and_then(Value::as_str)
            .unwrap_or(""),
        tie,
        names,
        wrapped,
    };
    let mut d = Draft::new(base, &planner.tie);
    planner.replacements(&mut d)?;
    planner.lora_modules(&mut d)?;
    planner.experts(&mut d)?;
    planner.check_complete()?;
    let untie = planner.tie(&mut d);
    let vocab_size = planner.vocab(&mut d)?;
    let mut tensors = Vec::new();
    let mut merges = Vec::new();
    for name in &d.order {
        let Some(s) = d.specs.get(name) else {
            continue;
        };
        let (t, m) = to_tensor(s, base, adapter);
        tensors.push(t);
        merges.push(m);
    }
    Ok(Planned {
        tensors,
        merges,
        untie,
        vocab_size,
        lora_modules: d.lora_modules,
        replaced: d.replaced,
        notes: d.notes,
        skipped: d.skipped,
    })
}

/// The input embedding and the output head, and whether they are one matrix.
struct Tie {
    emb: Option<usize>,
    emb_name: Option<String>,
    head_name: String,
    tied: bool,
    /// Tied, with the head not on disk (it is the embedding).
    virtual_head: bool,
}

impl Tie {
    fn of(base: &HfCheckpoint, base_config: Option<&Value>) -> Tie {
        let emb = base.tensors.iter().position(|t| {
            t.shape.len() == 2 && INPUT_EMBEDDINGS.iter().any(|s| t.name.ends_with(s))
        });
        let head_on_disk = OUTPUT_HEADS.iter().find(|h| base.by_name.contains_key(**h));
        let tied = base_config
            .and_then(|c| c.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(head_on_disk.is_none() && emb.is_some());
        let head_name = head_on_disk.copied().unwrap_or(OUTPUT_HEADS[0]).to_owned();
        let emb_name = emb.map(|i| base.tensors[i].name.clone());
        let virtual_head = tied && head_on_disk.is_none() && emb.is_some();

        Tie {
            emb,
            emb_name,
            head_name,
            tied,
            virtual_head,
        }
    }

    /// A base tensor by name: on disk, or the head that is the embedding.
    fn lookup(&self, base: &HfCheckpoint, name: &str) -> Option<usize> {
        base.by_name.get(name).copied().or_else(|| {
            (self.virtual_head && name == self.head_name)
                .then(|| self.emb.expect("virtual head has an embedding"))
        })
    }
}

/// Fused experts adapted through `target_parameters`: per module, its adapted
/// parameters with their lora_A and lora_B, one nested wrapper each, the first
/// registered innermost.
fn wrapped_experts(
    adapter: &AdapterWeights,
    cfg: &AdapterConfig,
    keys: &Keys,
    naming: Naming,
) -> Result<Vec<(String, Vec<WrappedParam>)>, LoraError> {
    let mismatch = |tensor: &str, expected: String, found: String| LoraError::Mismatch {
        path: adapter.path.clone(),
        tensor: tensor.to_owned(),
        expected,
        found,
    };
    let refuse = |why: String| LoraError::Refused {
        path: adapter.path.clone(),
        why,
    };
    let mut wrapped: Vec<(String, Vec<WrappedParam>)> = Vec::new();
    if !cfg.target_parameters.is_empty() {
        let modules: BTreeSet<&String> = keys.modules.keys().chain(keys.nested.keys()).collect();
        for m in modules {
            let targeted: Vec<ExpertParam> = naming
                .expert_params
                .iter()
                .filter(|p| cfg.targets_parameter(&format!("{m}.{}", p.name)))
                .copied()
                .collect();
            if targeted.is_empty() {
                continue;
            }
            let n = targeted.len();
            let mut params = Vec::new();
            for (i, p) in targeted.into_iter().enumerate() {
                let depth = n - 1 - i;
                let key = |part: &str| {
                    format!(
                        "{}{m}{}.{part}",
                        super::KEY_PREFIX,
                        ".base_layer".repeat(depth)
                    )
                };
                let parts = if depth == 0 {
                    keys.modules.get(m)
                } else {
                    keys.nested.get(m).and_then(|d| d.get(&depth))
                };
                let (Some(a), Some(b)) = (
                    parts.and_then(|p| p.get(&Part::A)),
                    parts.and_then(|p| p.get(&Part::B)),
                ) else {
                    return Err(mismatch(
                        &key("lora_A.weight"),
                        format!(
                            "the LoRA matrices of parameter {m}.{} (target_parameters), the {} of {n} nested wrappers",
                            p.name,
                            depth + 1
                        ),
                        "no such tensors in the adapter".into(),
                    ));
                };
                if let Some(other) =
                    parts.and_then(|p| p.keys().find(|k| !matches!(k, Part::A | Part::B)))
                {
                    return Err(refuse(format!(
                        "{}: a {other:?} tensor on a parameter wrapper, which PEFT does not allow",
                        key("")
                    )));
                }
                params.push((p, *a, *b));
            }
            if let Some(extra) = keys.nested.get(m).and_then(|d| d.keys().find(|k| **k >= n)) {
                return Err(refuse(format!(
                    "module {m} has {} nested LoRA wrappers, but target_parameters names {n} of its parameters",
                    extra + 1
                )));
            }
            wrapped.push((m.clone(), params));
        }
    }
    // PEFT refuses a target_parameters entry that matches nothing, so an adapter
    // whose entry adapts no parameter it holds is not of this base.
    for t in &cfg.target_parameters {
        let used = wrapped.iter().any(|(m, ps)| {
            ps.iter().any(|(p, _, _)| {
                let key = format!("{m}.{}", p.name);
                key == *t || key.ends_with(&format!(".{t}"))
            })
        });
        if !used {
            return Err(LoraError::Refused {
                path: cfg.path.clone(),
                why: format!(
                    "target_parameters names {t:?}, but the adapter holds no LoRA weights of such a parameter ({})",
                    if naming.expert_params.is_empty() {
                        "this model family has no fused parameters to adapt".to_owned()
                    } else {
                        format!(
                            "this family's fused experts have {}",
                            naming
                                .expert_params
                                .iter()
                                .map(|p| p.name)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                ),
            });
        }
    }
    let is_wrapped = |m: &str| wrapped.iter().any(|(w, _)| w == m);
    if let Some(m) = keys.nested.keys().find(|m| !is_wrapped(m)) {
        return Err(refuse(format!(
            "module {m} has nested LoRA wrappers (target_parameters), but no parameter of it that target_parameters names is one this converter maps (fused experts of Qwen3-MoE, Mixtral, Nemotron-H)"
        )));
    }
    Ok(wrapped)
}

/// How the adapter's module names become the base's tensor names.
struct Names {
    prefix: &'static str,
    rename: Option<(&'static str, &'static str)>,
}

impl Names {
    /// Adapters trained on a headless model (AutoModel) name `layers.0…` where the
    /// checkpoint has `model.layers.0…`, and transformers 5 names some modules
    /// otherwise than the checkpoint: the naming under which everything fits.
    fn resolve(
        base: &HfCheckpoint,
        tie: &Tie,
        adapter: &AdapterWeights,
        keys: &Keys,
        wrapped: &[(String, Vec<WrappedParam>)],
        naming: Naming,
    ) -> Result<Names, LoraError> {
        let at = |i: usize| &adapter.tensors[i];
        let lookup = |name: &str| tie.lookup(base, name);
        let is_wrapped = |m: &str| wrapped.iter().any(|(w, _)| w == m);
        let mismatch = |tensor: &str, expected: String, found: String| LoraError::Mismatch {
            path: adapter.path.clone(),
            tensor: tensor.to_owned(),
            expected,
            found,
        };
        let names_to_fit: Vec<String> = keys
            .modules
            .keys()
            .filter(|m| !is_wrapped(m))
            .map(|m| format!("{m}.weight"))
            .chain(
                wrapped
                    .iter()
                    .map(|(m, ps)| format!("{m}.0.{}.weight", ps[0].0.parts[0])),
            )
            .chain(keys.replacements.iter().map(|r| r.target.clone()))
            .collect();
        let renames: Vec<Option<(&str, &str)>> = std::iter::once(None)
            .chain(naming.renames.iter().map(|r| Some(*r)))
            .collect();
        let map_name = |prefix: &str, rename: Option<(&str, &str)>, n: &str| -> String {
            match rename {
                Some((from, to)) => format!("{prefix}{}", n.replacen(from, to, 1)),
                None => format!("{prefix}{n}"),
            }
        };
        let (prefix, rename) = ["", "model."]
            .into_iter()
            .flat_map(|p| renames.iter().map(move |r| (p, *r)))
            .find(|(p, r)| {
                names_to_fit
                    .iter()
                    .all(|n| lookup(&map_name(p, *r, n)).is_some())
            })
            .ok_or_else(|| {
                let missing = names_to_fit
                    .iter()
                    .find(|n| lookup(n).is_none())
                    .cloned()
                    .unwrap_or_default();
                let user = keys
                    .modules
                    .iter()
                    .find(|(m, _)| format!("{m}.weight") == missing)
                    .and_then(|(_, parts)| parts.values().next())
                    .map(|&i| at(i).name.clone())
                    .or_else(|| {
                        keys.replacements
                            .iter()
                            .find(|r| r.target == missing)
                            .map(|r| at(r.tensor).name.clone())
                    })
                    .unwrap_or_else(|| missing.clone());
                mismatch(
                    &user,
                    format!(
                        "base tensor {missing:?} in {} (the adapter changes it)",
                        base.root.display()
                    ),
                    "no such tensor in the base (is this the base the adapter was trained on?)"
                        .into(),
                )
            })?;
        Ok(Names { prefix, rename })
    }

    fn map(prefix: &str, rename: Option<(&str, &str)>, n: &str) -> String {
        match rename {
            Some((from, to)) => format!("{prefix}{}", n.replacen(from, to, 1)),
            None => format!("{prefix}{n}"),
        }
    }

    /// The base's name of an adapter name.
    fn full(&self, n: &str) -> String {
        Names::map(self.prefix, self.rename, n)
    }

    /// The adapter's name of a base tensor's module (the inverse of `full`).
    fn adapter_name(&self, n: &str) -> Option<String> {
        let n = n.strip_prefix(self.prefix)?;
        Some(match self.rename {
            Some((from, to)) => n.replacen(to, from, 1),
            None => n.to_owned(),
        })
    }
}

/// What the plan builds: one spec per output tensor, in order, and what the
/// report says about them.
struct Draft {
    specs: BTreeMap<String, Spec>,
    order: Vec<String>,
    notes: Vec<String>,
    skipped: Vec<(String, String)>,
    lora_modules: usize,
    replaced: usize,
}

impl Draft {
    /// One spec per base tensor (and the head when it is the embedding on disk).
    fn new(base: &HfCheckpoint, tie: &Tie) -> Draft {
        let (emb, head_name, virtual_head) = (tie.emb, &tie.head_name, tie.virtual_head);
        let mut specs: BTreeMap<String, Spec> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        for (i, t) in base.tensors.iter().enumerate() {
            order.push(t.name.clone());
            specs.insert(
                t.name.clone(),
                Spec {
                    name: t.name.clone(),
                    source: Source::Base(i),
                    shape: t.shape.clone(),
                    dtype: t.dtype,
                    ops: Vec::new(),
                },
            );
        }
        if virtual_head {
            let e = &base.tensors[emb.expect("virtual head has an embedding")];
            specs.insert(
                head_name.clone(),
                Spec {
                    name: head_name.clone(),
                    source: Source::Base(emb.expect("checked")),
                    shape: e.shape.clone(),
                    dtype: e.dtype,
                    ops: Vec::new(),
                },
            );
        }
        Draft {
            specs,
            order,
            notes: Vec::new(),
            skipped: Vec::new(),
            lora_modules: 0,
            replaced: 0,
        }
    }
}

/// The planning context: the base, the adapter, its configuration and keys, and
/// what was derived from them.
struct Planner<'a> {
    base: &'a HfCheckpoint,
    base_config: Option<&'a Value>,
    adapter: &'a AdapterWeights,
    cfg: &'a AdapterConfig,
    keys: &'a Keys,
    naming: Naming,
    model_type: &'a str,
    tie: Tie,
    names: Names,
    wrapped: Vec<(String, Vec<WrappedParam>)>,
}

impl Planner<'_> {
    fn at(&self, i: usize) -> &GlobalTensor {
        &self.adapter.tensors[i]
    }

    fn mismatch(&self, tensor: &str, expected: String, found: String) -> LoraError {
        LoraError::Mismatch {
            path: self.adapter.path.clone(),
            tensor: tensor.to_owned(),
            expected,
            found,
        }
    }

    fn refuse(&self, why: String) -> LoraError {
        LoraError::Refused {
            path: self.adapter.path.clone(),
            why,
        }
    }

    fn lookup(&self, name: &str) -> Option<usize> {
        self.tie.lookup(self.base, name)
    }

    fn is_wrapped(&self, m: &str) -> bool {
        self.wrapped.iter().any(|(w, _)| w == m)
    }

    fn is_head_module(&self, m: &str) -> bool {
        format!("{}.weight", self.names.full(m)) == self.tie.head_name
    }

    fn is_emb_module(&self, m: &str) -> bool {
        Some(format!("{}.weight", self.names.full(m))) == self.tie.emb_name
    }

    fn is_tied_pair(&self, name: &str) -> bool {
        self.tie.tied && (Some(name) == self.tie.emb_name.as_deref() || name == self.tie.head_name)
    }

    /// Under ensure_weight_tying PEFT ties the head's modules_to_save copy to the
    /// embedding's (the head's saved copy is the same values), and targets the head
    /// with LoRA whenever the embedding is targeted. Its LoRA matrices start as the
    /// embedding's transposed but are separate parameters once the adapter is cast
    /// to the model's dtype (peft 0.21.2), so they are merged as the head's own.
    fn derived_head(&self, name: &str) -> bool {
        self.tie.tied && self.cfg.ensure_weight_tying && name == self.tie.head_name
    }

    fn implicit_head(&self, module: &str) -> bool {
        self.tie.tied && self.cfg.ensure_weight_tying && self.is_head_module(module)
    }

    /// Replacements first: they set the value the updates start from.
    fn replacements(&self, d: &mut Draft) -> Result<(), LoraError> {
        let (base, cfg, keys, head_name, emb_name) = (
            self.base,
            self.cfg,
            self.keys,
            &self.tie.head_name,
            &self.tie.emb_name,
        );
        let Draft {
            specs,
            skipped,
            replaced,
            ..
        } = d;
        // Replacements first: they set the value the updates start from.
        let mut replaced_by: HashMap<String, usize> = HashMap::new();
        let mut shared_replacement: Option<usize> = None;
        for r in &keys.replacements {
            let target = self.names.full(&r.target);
            let t = self.at(r.tensor);
            if self.derived_head(&target) {
                skipped.push((
                    t.name.clone(),
                    format!("ensure_weight_tying: {head_name} is the embedding's tied copy"),
                ));
                continue;
            }
            let base_i = self
                .lookup(&target)
                .expect("every target resolves under the prefix");
            let b = &base.tensors[base_i];
            let resizable = self.is_tied_pair(&target)
                || Some(target.as_str()) == emb_name.as_deref()
                || OUTPUT_HEADS.contains(&target.as_str());
            let fits = t.shape == b.shape
                || (resizable
                    && t.shape.len() == 2
                    && b.shape.len() == 2
                    && t.shape[1] == b.shape[1]);
            if !fits {
                return Err(self.mismatch(
                    &t.name,
                    format!(
                        "shape {:?} of base tensor {target:?} (it replaces it whole)",
                        b.shape
                    ),
                    format!("{:?}", t.shape),
                ));
            }
            crate::formats::dtype::check_cast(t.dtype, b.dtype).map_err(|e| {
                self.mismatch(
                    &t.name,
                    format!("a float tensor like {target:?}"),
                    e.to_string(),
                )
            })?;
            if replaced_by.insert(target.clone(), r.tensor).is_some() {
                return Err(self.refuse(format!(
                    "tensor {:?} replaces {target:?}, which another adapter tensor replaces too",
                    t.name
                )));
            }
            *replaced += 1;
            let own = cfg.wraps_as_modules_to_save(&r.module) && !r.base_layer;
            if self.is_tied_pair(&target) && !own {
                // Loaded into the shared parameter: both the embedding and the head.
                shared_replacement = Some(r.tensor);
            } else {
                let s = specs.get_mut(&target).expect("a spec per base tensor");
                s.source = Source::Adapter(r.tensor);
                s.shape = t.shape.clone();
            }
        }
        if let Some(tensor) = shared_replacement {
            for name in [emb_name.clone().unwrap_or_default(), head_name.clone()] {
                if let Some(s) = specs.get_mut(&name)
                    && !matches!(s.source, Source::Adapter(_))
                {
                    s.source = Source::Adapter(tensor);
                    s.shape = self.at(tensor).shape.clone();
                }
            }
        }
        Ok(())
    }

    /// LoRA modules: their updates, biases and trainable tokens.
    fn lora_modules(&self, d: &mut Draft) -> Result<(), LoraError> {
        let (base, cfg, keys, model_type, head_name, emb_name) = (
            self.base,
            self.cfg,
            self.keys,
            self.model_type,
            &self.tie.head_name,
            &self.tie.emb_name,
        );
        let Draft {
            specs,
            lora_modules,
            ..
        } = d;
        // LoRA modules.
        let mut shared_rows: Vec<Op> = Vec::new();
        for (module, parts) in &keys.modules {
            if self.is_wrapped(module) {
                continue;
            }
            let weight = format!("{}.weight", self.names.full(module));
            let part = |p: Part| parts.get(&p).copied();
            let first = parts
                .values()
                .next()
                .map(|&i| self.at(i).name.clone())
                .unwrap_or_default();
            let linear = !self.is_emb_module(module) && !self.is_head_module(module);
            let lora_parts = parts.keys().any(|p| *p != Part::TokensDelta);
            if lora_parts
                && !self.implicit_head(module)
                && !cfg.targets(module, linear, model_type)?
            {
                return Err(self.refuse(format!(
                    "tensor {first:?} is a LoRA weight of module {module}, which adapter_config.json does not target (target_modules, exclude_modules, layers_to_transform, modules_to_save); PEFT would silently ignore it, so the adapter and its configuration disagree"
                )));
            }
            let spec_shape = specs
                .get(&weight)
                .map(|s| s.shape.clone())
                .expect("every module resolves under the prefix");
            let w_dtype = specs[&weight].dtype;
            if lora_parts && !matches!(w_dtype, DType::BF16 | DType::F16 | DType::F32) {
                return Err(self.refuse(format!(
                    "base tensor {weight:?} is {w_dtype}: merging into quantized or integer weights is not supported (dequantize the base first)"
                )));
            }
            let (r, alpha, scale) = cfg.scale(module)?;
            let rank_of = |i: usize, axis: usize| self.at(i).shape.get(axis).copied();
            let check_rank = |i: usize, axis: usize| -> Result<(), LoraError> {
                match rank_of(i, axis) {
                    Some(found) if found == r && self.at(i).shape.len() == 2 => Ok(()),
                    _ => Err(self.mismatch(
                        &self.at(i).name,
                        format!(
                            "a matrix of rank {r} on axis {axis} (r={} with rank_pattern, for {module})",
                            r
                        ),
                        format!("{:?}", self.at(i).shape),
                    )),
                }
            };
            let magnitude = part(Part::Magnitude);
            if magnitude.is_some() != cfg.use_dora && lora_parts {
                return Err(match magnitude {
                    Some(m) => self.refuse(format!(
                        "tensor {:?} is a DoRA magnitude vector, but adapter_config.json has use_dora=false",
                        self.at(m).name
                    )),
                    None => self.mismatch(
                        &format!(
                            "{KEY}{module}.lora_magnitude_vector",
                            KEY = super::KEY_PREFIX
                        ),
                        "a DoRA magnitude vector (use_dora=true)".into(),
                        "no such tensor in the adapter".into(),
                    ),
                });
            }
            let mut ops = Vec::new();
            match (
                part(Part::A),
                part(Part::B),
                part(Part::EmbeddingA),
                part(Part::EmbeddingB),
            ) {
                (Some(a), Some(b), None, None) => {
                    let (ta, tb) = (self.at(a), self.at(b));
                    if ta.shape.len() != 2 || tb.shape.len() != 2 || spec_shape.len() != 2 {
                        return Err(self.refuse(format!(
                            "module {module}: lora_A {:?}, lora_B {:?}, base {:?}: LoRA on convolutions (or other non-matrix weights) is not supported",
                            ta.shape, tb.shape, spec_shape
                        )));
                    }
                    check_rank(a, 0)?;
                    check_rank(b, 1)?;
                    let (out, inn) = (tb.shape[0], ta.shape[1]);
                    let transposed = if spec_shape == [out, inn] && spec_shape != [inn, out] {
                        false
                    } else if spec_shape == [inn, out] && spec_shape != [out, inn] {
                        true
                    } else if spec_shape == [out, inn] {
                        CONV1D_MODEL_TYPES.contains(&model_type)
                    } else {
                        return Err(self.mismatch(
                            &weight,
                            format!(
                                "shape [{out}, {inn}] (lora_B rows × lora_A columns of the adapter), or [{inn}, {out}] for a Conv1D"
                            ),
                            format!("{spec_shape:?} in the base"),
                        ));
                    };
                    if let Some(m) = magnitude
                        && self.at(m).numel() != out
                    {
                        return Err(self.mismatch(
                            &self.at(m).name,
                            format!("{out} elements"),
                            format!("{:?}", self.at(m).shape),
                        ));
                    }
                    ops.push(Op::Linear {
                        a,
                        b,
                        scale,
                        transposed,
                        magnitude,
                        note: format!(
                            "{}lora r={r} alpha={alpha}{}{}",
                            if magnitude.is_some() { "dora " } else { "" },
                            if cfg.use_rslora { " rslora" } else { "" },
                            if transposed { " conv1d" } else { "" }
                        ),
                    });
                    match (part(Part::BBias), cfg.lora_bias) {
                        (Some(bb), true) => {
                            if magnitude.is_some() {
                                return Err(self.refuse(format!(
                                    "module {module}: DoRA with lora_bias cannot be merged (PEFT does not allow the combination)"
                                )));
                            }
                            let bias = format!("{}.bias", self.names.full(module));
                            let Some(bs) = specs.get_mut(&bias) else {
                                return Err(self.refuse(format!(
                                    "module {module}: lora_bias=true needs a bias in the base, but {} has no {bias:?}",
                                    base.root.display()
                                )));
                            };
                            if bs.shape != [out] || self.at(bb).numel() != out {
                                return Err(self.mismatch(
                                    &self.at(bb).name,
                                    format!(
                                        "{out} elements, like base tensor {bias:?} {:?}",
                                        bs.shape
                                    ),
                                    format!("{:?}", self.at(bb).shape),
                                ));
                            }
                            bs.ops.push(Op::Bias { values: bb, scale });
                        }
                        (Some(bb), false) => {
                            return Err(self.refuse(format!(
                                "tensor {:?} is a LoRA bias, but adapter_config.json has lora_bias=false",
                                self.at(bb).name
                            )));
                        }
                        (None, true) => {
                            return Err(self.mismatch(
                                &format!("{}{module}.lora_B.bias", super::KEY_PREFIX),
                                "a LoRA bias (lora_bias=true)".into(),
                                "no such tensor in the adapter".into(),
                            ));
                        }
                        (None, false) => {}
                    }
                }
                (None, None, Some(a), Some(b)) => {
                    let (ta, tb) = (self.at(a), self.at(b));
                    check_rank(a, 0)?;
                    check_rank(b, 1)?;
                    let expect = [ta.shape[1], tb.shape[0]];
                    if spec_shape != expect {
                        return Err(self.mismatch(
                            &weight,
                            format!(
                                "shape {expect:?} (lora_embedding_A columns × lora_embedding_B rows of the adapter)"
                            ),
                            format!("{spec_shape:?}"),
                        ));
                    }
                    if let Some(m) = magnitude
                        && self.at(m).numel() != expect[1]
                    {
                        return Err(self.mismatch(
                            &self.at(m).name,
                            format!("{} elements", expect[1]),
                            format!("{:?}", self.at(m).shape),
                        ));
                    }
                    ops.push(Op::Embedding {
                        a,
                        b,
                        scale,
                        magnitude,
                        note: format!(
                            "{}lora embedding r={r} alpha={alpha}{}",
                            if magnitude.is_some() { "dora " } else { "" },
                            if cfg.use_rslora { " rslora" } else { "" }
                        ),
                    });
                }
                (None, None, None, None) => {}
                _ => {
                    return Err(self.mismatch(
                        &first,
                        format!(
                            "both matrices of module {module} (lora_A and lora_B, or lora_embedding_A and lora_embedding_B)"
                        ),
                        format!(
                            "only {}",
                            parts
                                .values()
                                .map(|&i| self.at(i).name.clone())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
            if !ops.is_empty() {
                *lora_modules += 1;
            }
            let spec = specs.get_mut(&weight).expect("checked");
            spec.ops.extend(ops);
            if let Some(d) = part(Part::TokensDelta) {
                let indices = cfg
                    .token_indices(module, self.is_emb_module(module))
                    .ok_or_else(|| {
                        self.refuse(format!(
                            "tensor {:?} holds trainable tokens, but adapter_config.json's trainable_token_indices names none for {module}",
                            self.at(d).name
                        ))
                    })?
                    .to_vec();
                let dim = spec.shape.get(1).copied().unwrap_or(0);
                if self.at(d).shape != [indices.len() as u64, dim] {
                    return Err(self.mismatch(
                        &self.at(d).name,
                        format!("[{}, {dim}] (one row per trainable token)", indices.len()),
                        format!("{:?}", self.at(d).shape),
                    ));
                }
                if let Some(bad) = indices.iter().find(|&&i| i >= spec.shape[0]) {
                    return Err(self.mismatch(
                        &self.at(d).name,
                        format!("token indices below {} (rows of {weight})", spec.shape[0]),
                        format!("index {bad}"),
                    ));
                }
                let op = Op::Rows { indices, values: d };
                if self.is_tied_pair(&weight) {
                    // PEFT ties the head's trainable tokens to the embedding's.
                    shared_rows.push(op);
                } else {
                    spec.ops.push(op);
                }
            }
        }
        for op in shared_rows {
            for name in [emb_name.clone().unwrap_or_default(), head_name.clone()] {
                if let Some(s) = specs.get_mut(&name) {
                    s.ops.push(op.clone());
                }
            }
        }
        Ok(())
    }

    /// The fused experts' parameters, per expert and checkpoint matrix.
    fn experts(&self, d: &mut Draft) -> Result<(), LoraError> {
        let (cfg, wrapped) = (self.cfg, &self.wrapped);
        let Draft {
            specs,
            lora_modules,
            ..
        } = d;
        // The fused experts' parameters, per expert and checkpoint matrix.
        for (m, params) in wrapped {
            for &(p, a, b) in params {
                let key = format!("{m}.{}", p.name);
                let (r, alpha, scale) = cfg.scale(&key)?;
                let (ta, tb) = (self.at(a), self.at(b));
                let (Some(&[ra, inn]), Some(&[out, rb])) = (
                    ta.shape.as_slice().try_into().ok().map(|s: &[u64; 2]| s),
                    tb.shape.as_slice().try_into().ok().map(|s: &[u64; 2]| s),
                ) else {
                    return Err(self.mismatch(
                        &ta.name,
                        format!(
                            "matrices [r·experts, in] and [out, r·experts] for parameter {key}"
                        ),
                        format!("{:?} and {:?}", ta.shape, tb.shape),
                    ));
                };
                if ra % r != 0 || rb != ra {
                    return Err(self.mismatch(
                        &tb.name,
                        format!(
                            "[{out}, {ra}] with {ra} a multiple of r={r} (one rank block per expert) for {key}"
                        ),
                        format!("{:?} (lora_A {:?})", tb.shape, ta.shape),
                    ));
                }
                let experts = ra / r;
                let more = self
                    .names
                    .full(&format!("{m}.{experts}.{}.weight", p.parts[0]));
                if self.lookup(&more).is_some() {
                    return Err(self.mismatch(
                        &ta.name,
                        format!("rank blocks for every expert of the base (it has {more:?})"),
                        format!("{experts} experts' ({ra} rows at r={r})"),
                    ));
                }
                let mut row = 0u64;
                for part in p.parts {
                    let mut rows_here = None;
                    for e in 0..experts {
                        let name = self.names.full(&format!("{m}.{e}.{part}.weight"));
                        let Some(spec) = specs.get_mut(&name) else {
                            return Err(self.mismatch(
                                &ta.name,
                                format!("base tensor {name:?} (expert {e} of {experts})"),
                                "no such tensor in the base".into(),
                            ));
                        };
                        if !matches!(spec.dtype, DType::BF16 | DType::F16 | DType::F32) {
                            return Err(self.refuse(format!(
                                "base tensor {name:?} is {}: merging into quantized or integer weights is not supported (dequantize the base first)",
                                spec.dtype
                            )));
                        }
                        let n = match spec.shape.as_slice() {
                            [n, i] if *i == inn => *n,
                            other => {
                                return Err(self.mismatch(
                                    &name,
                                    format!("[rows, {inn}] (lora_A of {key} has {inn} columns)"),
                                    format!("{other:?}"),
                                ));
                            }
                        };
                        if rows_here.is_some_and(|h| h != n) {
                            return Err(self.mismatch(
                                &name,
                                format!("{} rows like expert 0's {part}", rows_here.unwrap_or(0)),
                                format!("{n}"),
                            ));
                        }
                        rows_here = Some(n);
                        spec.ops.push(Op::Expert {
                            a,
                            b,
                            expert: e,
                            experts,
                            r,
                            rows: (row, n),
                            scale,
                            note: format!("lora r={r} alpha={alpha} on {key}, expert {e}"),
                        });
                    }
                    row += rows_here.unwrap_or(0);
                }
                if row != out {
                    return Err(self.mismatch(
                        &tb.name,
                        format!(
                            "{row} rows (the experts' {} stacked) for {key}",
                            p.parts.join(" and ")
                        ),
                        format!("{out}"),
                    ));
                }
                *lora_modules += 1;
            }
        }
        Ok(())
    }

    /// Every module the configuration targets must have its weights.
    fn check_complete(&self) -> Result<(), LoraError> {
        let (base, adapter, cfg, keys, naming, model_type, virtual_head, head_name) = (
            self.base,
            self.adapter,
            self.cfg,
            self.keys,
            self.naming,
            self.model_type,
            self.tie.virtual_head,
            &self.tie.head_name,
        );
        // Every module the configuration targets must have its weights.
        let mut candidates: Vec<String> = base
            .tensors
            .iter()
            .filter(|t| t.shape.len() == 2)
            .filter_map(|t| t.name.strip_suffix(".weight").map(str::to_owned))
            .collect();
        if virtual_head && let Some(h) = head_name.strip_suffix(".weight") {
            candidates.push(h.to_owned());
        }
        // With fused experts in memory (transformers 5), the checkpoint's per-expert
        // matrices are no modules PEFT could have targeted; an adapter made where
        // they are modules names some of them.
        let per_expert_modules = keys.modules.keys().any(|m| is_expert_matrix(m));
        for base_module in candidates {
            let Some(module) = self.names.adapter_name(&base_module) else {
                continue;
            };
            let module = module.as_str();
            if !naming.expert_params.is_empty() && !per_expert_modules && is_expert_matrix(module) {
                continue;
            }
            if keys
                .modules
                .get(module)
                .is_some_and(|p| p.keys().any(|k| *k != Part::TokensDelta))
            {
                continue;
            }
            if self.implicit_head(module) {
                continue;
            }
            let linear = !self.is_emb_module(module) && !self.is_head_module(module);
            if cfg.targets(module, linear, model_type)? {
                return Err(self.mismatch(
                    &format!("{}{module}.lora_A.weight", super::KEY_PREFIX),
                    format!("LoRA weights for {module}, which adapter_config.json targets"),
                    format!(
                        "none in {} (a partial or mismatched adapter; PEFT would leave the module at its initialisation)",
                        adapter.path.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The tie: whether the head and the embedding must be untied.
    fn tie(&self, d: &mut Draft) -> bool {
        let (cfg, tied, virtual_head, head_name, emb_name) = (
            self.cfg,
            self.tie.tied,
            self.tie.virtual_head,
            &self.tie.head_name,
            &self.tie.emb_name,
        );
        let Draft {
            specs,
            order,
            notes,
            ..
        } = d;
        // The tie.
        let mut untie = false;
        if tied && let Some(e) = emb_name.clone() {
            if cfg.ensure_weight_tying {
                let (source, shape) = (specs[&e].source.clone(), specs[&e].shape.clone());
                let h = specs.get_mut(head_name).expect("a tied head has a spec");
                h.source = source;
                h.shape = shape;
            }
            let same = specs[&e].same_values(&specs[head_name]);
            if !same {
                untie = true;
                notes.push(format!(
                    "{head_name} and {e} differ after the merge ({}), so both are written and tie_word_embeddings is set to false",
                    describe_difference(&specs[&e], &specs[head_name])
                ));
            }
            if virtual_head && !untie {
                specs.remove(head_name);
            } else if virtual_head {
                order.push(head_name.clone());
            }
        }
        untie
    }

    /// The vocabulary: the new `vocab_size` when saved embeddings resized it.
    fn vocab(&self, d: &mut Draft) -> Result<Option<u64>, LoraError> {
        let (base_config, head_name, emb_name) =
            (self.base_config, &self.tie.head_name, &self.tie.emb_name);
        let Draft { specs, .. } = d;
        // The vocabulary.
        let config_vocab = base_config
            .and_then(|c| c.get("vocab_size"))
            .and_then(Value::as_u64);
        let mut vocab_size = None;
        if let Some(e) = emb_name {
            let rows = specs[e].shape[0];
            if Some(rows) != config_vocab && specs[e].changed() {
                vocab_size = Some(rows);
            }
            if let Some(h) = specs.get(head_name)
                && h.shape[0] != rows
            {
                return Err(self.mismatch(
                    head_name,
                    format!("{rows} rows, like the merged {e}"),
                    format!(
                        "{} rows (resize the vocabulary of both, or of neither)",
                        h.shape[0]
                    ),
                ));
            }
        }
        Ok(vocab_size)
    }
}

/// Whether a module is one expert's matrix (`….experts.3.up_proj`).
fn is_expert_matrix(module: &str) -> bool {
    module
        .split_once(".experts.")
        .and_then(|(_, rest)| rest.split('.').next())
        .is_some_and(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()))
}

fn describe_difference(e: &Spec, h: &Spec) -> String {
    let what = |s: &Spec| -> String {
        let mut parts = Vec::new();
        if let Source::Adapter(_) = s.source {
            parts.push("replaced by the adapter".to_owned());
        }
        for op in &s.ops {
            parts.push(match op {
                Op::Linear { note, .. } | Op::Embedding { note, .. } => note.clone(),
                Op::Bias { .. } => "lora bias".into(),
                Op::Rows { .. } => "trainable tokens".into(),
                Op::Expert { note, .. } => note.clone(),
            });
        }
        if parts.is_empty() {
            "unchanged".into()
        } else {
            parts.join(" + ")
        }
    };
    format!("{}: {}; {}: {}", e.name, what(e), h.name, what(h))
}

/// A whole adapter tensor as an operand, appended to `inputs`.
fn whole_operand(inputs: &mut Vec<Input>, adapter: &AdapterWeights, i: usize) -> Operand {
    let t = &adapter.tensors[i];
    inputs.push(Input::whole(ADAPTER, i, t));
    let (rows, cols) = match t.shape.as_slice() {
        [r, c] => (*r, *c),
        _ => (1, t.numel()),
    };
    Operand {
        inputs: vec![inputs.len() - 1],
        rows,
        cols,
        transposed: false,
    }
}

/// The output tensor and merge of a spec: input 0 is the starting value (base or
/// replacement), then one input per adapter operand.
fn to_tensor(
    s: &Spec,
    base: &HfCheckpoint,
    adapter: &AdapterWeights,
) -> (TensorOut, Option<LoraMerge>) {
    let (first, from) = match s.source {
        Source::Base(i) => (
            Input::whole(BASE, i, &base.tensors[i]),
            base.tensors[i].dtype,
        ),
        Source::Adapter(i) => (
            Input::whole(ADAPTER, i, &adapter.tensors[i]),
            adapter.tensors[i].dtype,
        ),
    };
    let mut inputs = vec![first];
    let mut updates = Vec::new();
    let mut words = Vec::new();
    match s.source {
        Source::Base(_) => words.push(crate::plan::tensor::copy_transform(from, s.dtype)),
        Source::Adapter(i) => words.push(format!(
            "replaced by adapter tensor {}{}",
            adapter.tensors[i].name,
            if from == s.dtype {
                String::new()
            } else {
                format!(" (cast {from}→{})", s.dtype)
            }
        )),
    }
    for op in &s.ops {
        match op {
            Op::Linear {
                a,
                b,
                scale,
                transposed,
                magnitude,
                note,
            } => {
                let a = whole_operand(&mut inputs, adapter, *a);
                let b = whole_operand(&mut inputs, adapter, *b);
                let magnitude = magnitude.map(|m| whole_operand(&mut inputs, adapter, m));
                updates.push(Update::Linear {
                    a,
                    b,
                    scale: *scale,
                    rounding: Rounding::Once,
                    transposed: *transposed,
                    rows: None,
                    magnitude,
                });
                words.push(format!("+ {note}"));
            }
            Op::Embedding {
                a,
                b,
                scale,
                magnitude,
                note,
            } => {
                let a = whole_operand(&mut inputs, adapter, *a);
                let b = whole_operand(&mut inputs, adapter, *b);
                let magnitude = magnitude.map(|m| whole_operand(&mut inputs, adapter, m));
                updates.push(Update::Embedding {
                    a,
                    b,
                    scale: *scale,
                    magnitude,
                });
                words.push(format!("+ {note}"));
            }
            Op::Bias { values, scale } => {
                let values = whole_operand(&mut inputs, adapter, *values);
                updates.push(Update::Bias {
                    values,
                    scale: *scale,
                });
                words.push("+ lora bias".into());
            }
            Op::Rows { indices, values } => {
                let values = whole_operand(&mut inputs, adapter, *values);
                updates.push(Update::Rows {
                    indices: indices.clone(),
                    values,
                });
                words.push(format!("+ {} trainable token rows", indices.len()));
            }
            Op::Expert {
                a,
                b,
                expert,
                experts,
                r,
                rows,
                scale,
                note,
            } => {
                let inn = adapter.tensors[*a].shape[1];
                inputs.push(Input {
                    store: ADAPTER,
                    tensor: *a,
                    offsets: vec![expert * r, 0],
                    sizes: vec![*r, inn],
                });
                let a_op = Operand {
                    inputs: vec![inputs.len() - 1],
                    rows: *r,
                    cols: inn,
                    transposed: false,
                };
                // B's columns for this expert are strided: one input per rank.
                let mut b_inputs = Vec::new();
                for k in 0..*r {
                    inputs.push(Input {
                        store: ADAPTER,
                        tensor: *b,
                        offsets: vec![rows.0, k * experts + expert],
                        sizes: vec![rows.1, 1],
                    });
                    b_inputs.push(inputs.len() - 1);
                }
                updates.push(Update::Linear {
                    a: a_op,
                    b: Operand {
                        inputs: b_inputs,
                        rows: rows.1,
                        cols: *r,
                        transposed: true,
                    },
                    scale: *scale,
                    rounding: Rounding::DeltaFirst,
                    transposed: false,
                    rows: None,
                    magnitude: None,
                });
                words.push(format!("+ {note}"));
            }
        }
    }
    let t = TensorOut {
        name: s.name.clone(),
        dtype: s.dtype,
        shape: s.shape.clone(),
        inputs,
        gather: RowGather::copy(rows(&s.shape), row_len(&s.shape)),
        transform: words.join(" "),
    };
    let merge = (!updates.is_empty()).then_some(LoraMerge { updates });
    (t, merge)
}
