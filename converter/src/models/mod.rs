//! Model families: how each architecture's tensors map between the Hugging Face
//! and Megatron-Core layouts, and the Megatron model configuration derived from
//! `config.json`. Pure: nothing here reads tensor data.
//!
//! A family ([`Family`]) reads a `config.json` into a [`Model`]: its layers as
//! lists of reusable blocks ([`blocks`]: attention, dense MLP, …), the names of
//! its embedding, final norm and head, and the fields of its `run_config.yaml`.
//! The model's rules ([`rules`]) are one table for both directions: the import
//! plans Megatron tensors from it, the export inverts it. A family is one file
//! plus its line in [`registry`]. [`identity`] keeps names and shapes (a raw
//! export, and the proof of the formats).

pub mod blocks;
pub mod config;
pub mod gpt;
pub mod identity;
pub mod llama;
pub mod mistral;
pub mod mixtral;
pub mod nemotron_h;
pub mod qwen2;
pub mod qwen3;
pub mod qwen3_moe;
pub mod registry;
pub mod rules;

use std::path::PathBuf;

use crate::formats::dtype::DType;
use crate::formats::hf::HfCheckpoint;
use crate::formats::megatron::{self, MegatronCheckpoint};
use crate::formats::run_config::{Parallelism, Yaml};
use crate::plan::PlanError;
use crate::plan::layout::DcpBytesSpec;
use crate::plan::tensor::{ChunkOut, TensorOut};

pub use config::{Config, ModelError, Overrides};
pub use registry::{ExpertParam, Family, family_of, for_config};

use blocks::{Attention, LayerAt, Mamba, Mlp, Moe};
use rules::{Context, HfTensor, McIndex, McKey, Precision, Rule, Transform};

/// What an import is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    /// The parallel layout the checkpoint is meant for.
    pub parallel: Parallelism,
    /// Parameter dtype.
    pub dtype: DType,
    /// `make_vocab_size_divisible_by`; `None` uses Megatron-Bridge's rule (the
    /// largest power of two up to 128 that divides the vocabulary: no padding).
    pub vocab_multiple: Option<u64>,
    /// The HF model id recorded in `run_config.yaml` (`model.hf_model_id`,
    /// `tokenizer.tokenizer_model`).
    pub hf_model_id: String,
    /// Keep float32 tensors of a lower-precision source in float32.
    pub keep_fp32: bool,
}

/// What an export is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    /// Output dtype of floating-point weights (`None` keeps the checkpoint's).
    pub dtype: Option<DType>,
    /// Keep float32 tensors of a lower-precision checkpoint in float32.
    pub keep_fp32: bool,
    /// Whether the HF model the output mirrors stores a (tied) `lm_head.weight`;
    /// `None` when there is no reference.
    pub reference_has_head: Option<bool>,
}

/// Planned Megatron output.
#[derive(Debug, Clone, Default)]
pub struct MegatronBuild {
    /// Tensor chunks.
    pub chunks: Vec<ChunkOut>,
    /// Bytes items (`_extra_state`).
    pub bytes: Vec<DcpBytesSpec>,
    /// Source tensors not converted, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Notes for the user.
    pub warnings: Vec<String>,
    /// The `model:` section of `run_config.yaml`.
    pub model_config: Vec<(String, Yaml)>,
}

/// Planned HF output.
#[derive(Debug, Clone, Default)]
pub struct HfBuild {
    /// Tensors in state-dict order.
    pub tensors: Vec<TensorOut>,
    /// Source tensors not converted, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Notes for the user.
    pub warnings: Vec<String>,
}

/// One block of a decoder layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    /// Self-attention and its norm.
    Attention(Attention),
    /// A dense MLP and its norm.
    Mlp(Mlp),
    /// A mixture of experts and its norm.
    Moe(Moe),
    /// A Mamba-2 mixer and its norm.
    Mamba(Mamba),
}

impl Block {
    fn rules(&self, at: &LayerAt) -> Vec<Rule> {
        match self {
            Block::Attention(a) => a.rules(at),
            Block::Mlp(m) => m.rules(at),
            Block::Moe(m) => m.rules(at),
            Block::Mamba(m) => m.rules(at),
        }
    }

    /// Modules with an `_extra_state` item, and whether they have one per expert.
    fn extra_state(&self) -> Vec<(&'static str, bool)> {
        let plain = |m: &[&'static str]| m.iter().map(|m| (*m, false)).collect();
        match self {
            Block::Attention(_) => plain(Attention::EXTRA_STATE),
            Block::Mlp(_) => plain(Mlp::EXTRA_STATE),
            Block::Moe(m) => m.extra_state(),
            Block::Mamba(_) => plain(Mamba::EXTRA_STATE),
        }
    }

    /// The routed experts of the block, if any.
    fn experts(&self) -> Option<u64> {
        match self {
            Block::Moe(m) => Some(m.experts),
            _ => None,
        }
    }
}

/// The HF names outside the layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HfNames {
    /// The embedding.
    pub embed: &'static str,
    /// The prefix of layer `N` (`model.layers.` → `model.layers.N.`).
    pub layers: &'static str,
    /// The final norm.
    pub final_norm: &'static str,
    /// The output projection.
    pub head: &'static str,
}

/// A model size that a parallel size must divide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divisor {
    /// `tp`, `pp`, `ep`.
    pub param: &'static str,
    /// The config field.
    pub field: &'static str,
    /// Its value.
    pub value: u64,
}

/// A model, as its family reads it from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// The family (`llama`).
    pub family: &'static str,
    /// `architectures[0]`.
    pub architecture: String,
    /// The configuration file.
    pub config_path: PathBuf,
    /// Vocabulary size.
    pub vocab: u64,
    /// Hidden size.
    pub hidden: u64,
    /// `tie_word_embeddings`, when the config says.
    pub tied: Option<bool>,
    /// The blocks of each layer.
    pub layers: Vec<Vec<Block>>,
    /// HF names outside the layers.
    pub hf: HfNames,
    /// Megatron keys of the layers are stacked on a leading layer axis (a
    /// homogeneous decoder); otherwise one key per layer.
    pub stacked: bool,
    /// Megatron names of the final norm, preferred first.
    pub final_norm: &'static [&'static str],
    /// Model fields of `run_config.yaml` that follow from `config.json` alone.
    pub megatron_config: Vec<(String, Yaml)>,
    /// Sizes the parallel sizes must divide.
    pub divisors: Vec<Divisor>,
    /// Things the user should know about this configuration.
    pub warnings: Vec<String>,
    /// The output layer has an `_extra_state` item (Megatron-Core's hybrid model
    /// keeps it; its GPT model does not).
    pub output_extra_state: bool,
    /// Multi-token-prediction layers, when the model has them.
    pub mtp: Option<Mtp>,
}

/// Multi-token-prediction layers (Nemotron-3 Super): `depth` times the layers of
/// a pattern, each depth with its input projection and norms. Hugging Face
/// numbers the layers flat (`mtp.layers.{depth · len + i}.`), Megatron-Core
/// nests them (`mtp.layers.{depth}.mtp_model_layer.layers.{i}.`); the input
/// projection and its two norms belong to the first inner layer in Hugging Face,
/// the final norm to the last.
#[derive(Debug, Clone, PartialEq)]
pub struct Mtp {
    /// `num_nextn_predict_layers`.
    pub depth: u64,
    /// The blocks of each layer of one depth.
    pub layers: Vec<Vec<Block>>,
}

/// Megatron-Bridge's default `make_vocab_size_divisible_by`: the largest power of
/// two up to 128 that divides the vocabulary.
pub fn default_vocab_multiple(vocab: u64) -> u64 {
    let mut m = 128;
    while m > 1 && !vocab.is_multiple_of(m) {
        m /= 2;
    }
    m
}

/// Megatron's padded vocabulary: a multiple of `multiple · tp`.
pub fn padded_vocab(vocab: u64, multiple: u64, tp: u64) -> u64 {
    let step = multiple * tp;
    vocab.div_ceil(step) * step
}

const EMBEDDING: &str = "embedding.word_embeddings.weight";
const OUTPUT: &str = "output_layer.weight";

impl Model {
    /// Whether any layer has routed experts (what `ep` and `etp` split).
    pub fn has_experts(&self) -> bool {
        self.experts().is_some()
    }

    /// The routed experts per MoE layer, if the model has any.
    pub fn experts(&self) -> Option<u64> {
        self.layers.iter().flatten().find_map(Block::experts)
    }

    /// The first attention block.
    pub fn first_attention(&self) -> Option<&Attention> {
        self.layers.iter().flatten().find_map(|b| match b {
            Block::Attention(a) => Some(a),
            _ => None,
        })
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> u64 {
        self.layers.len() as u64
    }

    fn ctx(&self) -> Context<'_> {
        Context {
            model: &self.architecture,
            config: &self.config_path,
        }
    }

    fn at(&self, l: u64) -> LayerAt {
        LayerAt {
            layer: l,
            layers: self.num_layers(),
            hf_prefix: format!("{}{l}.", self.hf.layers),
            order: l + 1,
            stacked: self.stacked,
            root: "decoder.layers.".into(),
        }
    }

    /// Every rule: embedding, layers, final norm and (untied) output layer, with
    /// the Megatron vocabulary `vocab_rows` rows (padding past the HF vocabulary).
    pub fn rules(&self, tied: bool, vocab_rows: u64) -> Vec<Rule> {
        let (v, h, end) = (self.vocab, self.hidden, self.num_layers() + 1);
        let vocab_rule = |hf: &str, mc: &str, order: u64| Rule {
            hf: vec![HfTensor {
                name: hf.to_owned(),
                shape: vec![v, h],
                order: (order, 0),
            }],
            mc: vec![McKey::plain(mc)],
            shape: vec![vocab_rows, h],
            transform: Transform::PadRows,
            or: Vec::new(),
        };
        let mut out = vec![vocab_rule(self.hf.embed, EMBEDDING, 0)];
        for (l, blocks) in self.layers.iter().enumerate() {
            let at = self.at(l as u64);
            for b in blocks {
                out.extend(b.rules(&at));
            }
        }
        out.push(blocks::copy(
            HfTensor {
                name: self.hf.final_norm.to_owned(),
                shape: vec![h],
                order: (end, 0),
            },
            self.final_norm.iter().map(|n| McKey::plain(*n)).collect(),
        ));
        if !tied {
            out.push(vocab_rule(self.hf.head, OUTPUT, end + 1));
        }
        if let Some(m) = &self.mtp {
            let per = m.layers.len() as u64;
            for d in 0..m.depth {
                for (i, blocks) in m.layers.iter().enumerate() {
                    let f = d * per + i as u64;
                    let at = LayerAt {
                        layer: i as u64,
                        layers: per,
                        hf_prefix: format!("mtp.layers.{f}."),
                        order: end + 2 + f,
                        stacked: false,
                        root: format!("mtp.layers.{d}.mtp_model_layer.layers."),
                    };
                    let own = |name: &str, shape: Vec<u64>, order: u64| {
                        blocks::copy(
                            at.hf_at(name, order, ".weight", shape),
                            vec![McKey::plain(format!("mtp.layers.{d}.{name}.weight"))],
                        )
                    };
                    if i == 0 {
                        out.push(own("enorm", vec![h], 100));
                        out.push(own("hnorm", vec![h], 101));
                        out.push(own("eh_proj", vec![h, 2 * h], 102));
                    }
                    for b in blocks {
                        out.extend(b.rules(&at));
                    }
                    if i as u64 == per - 1 {
                        out.push(own("final_layernorm", vec![h], 103));
                    }
                }
            }
        }
        out
    }

    /// Refuses parallel sizes the model cannot be split into.
    ///
    /// # Errors
    /// [`ModelError::Parallel`] naming the size and the dimension it must divide.
    pub fn check_parallelism(&self, p: &Parallelism) -> Result<(), ModelError> {
        let pp = Divisor {
            param: "pp",
            field: "num_hidden_layers",
            value: self.num_layers(),
        };
        for d in self.divisors.iter().chain(std::iter::once(&pp)) {
            let size = match d.param {
                "tp" => p.tp,
                "pp" => p.pp,
                "ep" => p.ep,
                _ => p.etp,
            };
            if !d.value.is_multiple_of(size) {
                return Err(ModelError::Parallel {
                    name: d.param.into(),
                    value: size,
                    dim: d.field.into(),
                    dim_value: d.value,
                    architecture: self.architecture.clone(),
                });
            }
        }
        Ok(())
    }

    /// Embedding rows on the Megatron side: the HF vocabulary unless padding was
    /// asked for with `make_vocab_size_divisible_by` (Megatron-Bridge pads only
    /// then; by default the embedding has exactly `vocab_size` rows).
    pub fn embedding_rows(&self, opts: &ImportOptions) -> u64 {
        match opts.vocab_multiple {
            Some(m) => padded_vocab(self.vocab, m, opts.parallel.tp),
            None => self.vocab,
        }
    }

    /// Plans the import of `src` (store `store`).
    ///
    /// # Errors
    /// [`ModelError`] for a vocabulary TP cannot split; [`PlanError`] for a source
    /// tensor missing, mis-shaped or without a place.
    pub fn import(
        &self,
        src: &HfCheckpoint,
        store: usize,
        opts: &ImportOptions,
    ) -> Result<MegatronBuild, crate::models::Error> {
        let has_head = src.by_name.contains_key(self.hf.head);
        let tied = self.tied.unwrap_or(!has_head);
        let vocab_rows = self.embedding_rows(opts);
        if !vocab_rows.is_multiple_of(opts.parallel.tp) {
            return Err(ModelError::Parallel {
                name: "tp".into(),
                value: opts.parallel.tp,
                dim: "vocab_size (or pass make_vocab_size_divisible_by to pad the vocabulary)"
                    .into(),
                dim_value: self.vocab,
                architecture: self.architecture.clone(),
            }
            .into());
        }
        let precision = Precision {
            to: Some(opts.dtype),
            keep_fp32: opts.keep_fp32,
            source: Precision::majority(&src.tensors),
        };
        let rules = self.rules(tied, vocab_rows);
        let imported = rules::import(&rules, src, store, &precision, &self.ctx())?;
        let mut skipped = Vec::new();
        for (i, t) in src.tensors.iter().enumerate() {
            if imported.used[i] {
                continue;
            }
            if tied && t.name == self.hf.head {
                skipped.push((
                    t.name.clone(),
                    "tie_word_embeddings: the output layer shares the embedding".to_owned(),
                ));
            } else if t.name.ends_with("rotary_emb.inv_freq") {
                skipped.push((
                    t.name.clone(),
                    "rotary frequencies are recomputed from rope_theta".into(),
                ));
            } else {
                return Err(PlanError::Unplaced {
                    path: src.root.join(&src.shard_of[&t.name]),
                    tensor: t.name.clone(),
                    model: self.architecture.clone(),
                }
                .into());
            }
        }
        let mut warnings = self.warnings.clone();
        if !imported.kept_fp32.is_empty() {
            warnings.push(kept_note(&imported.kept_fp32, &precision));
        }
        Ok(MegatronBuild {
            chunks: imported.chunks,
            bytes: self.extra_state(),
            skipped,
            warnings,
            model_config: self.run_config_model(opts, tied),
        })
    }

    /// The `_extra_state` items of a TransformerEngine model, which Megatron-Core's
    /// default load strictness requires: one per module and layer, holding the
    /// empty state of a module without FP8.
    fn extra_state(&self) -> Vec<DcpBytesSpec> {
        let payload = megatron::local_extra_state_payload();
        let nl = self.num_layers();
        let mut keys = Vec::new();
        if self.stacked {
            // Stacked keys name the layer (and expert) in a shard suffix, module
            // by module.
            let modules = self
                .layers
                .first()
                .map(|b| b.iter().flat_map(|b| b.extra_state()).collect::<Vec<_>>())
                .unwrap_or_default();
            let experts = self.experts().unwrap_or(1);
            for (module, per_expert) in modules {
                for l in 0..nl {
                    if per_expert {
                        for e in 0..experts {
                            keys.push(format!(
                                "decoder.layers.{module}._extra_state/shard_{l}.{e}_{nl}.{experts}"
                            ));
                        }
                    } else {
                        keys.push(format!(
                            "decoder.layers.{module}._extra_state/shard_{l}_{nl}"
                        ));
                    }
                }
            }
        } else {
            for (l, blocks) in self.layers.iter().enumerate() {
                for b in blocks {
                    for (module, per_expert) in b.extra_state() {
                        let experts = b.experts().filter(|_| per_expert).unwrap_or(1);
                        for e in 0..experts {
                            keys.push(format!(
                                "decoder.layers.{l}.{module}._extra_state/shard_{e}_{experts}"
                            ));
                        }
                    }
                }
            }
        }
        if let Some(m) = &self.mtp {
            for d in 0..m.depth {
                keys.push(format!("mtp.layers.{d}.eh_proj._extra_state/shard_0_1"));
                for (i, blocks) in m.layers.iter().enumerate() {
                    for b in blocks {
                        for (module, per_expert) in b.extra_state() {
                            let experts = b.experts().filter(|_| per_expert).unwrap_or(1);
                            for e in 0..experts {
                                keys.push(format!(
                                    "mtp.layers.{d}.mtp_model_layer.layers.{i}.{module}._extra_state/shard_{e}_{experts}"
                                ));
                            }
                        }
                    }
                }
            }
        }
        if self.output_extra_state {
            keys.push("output_layer._extra_state/shard_0_1".into());
        }
        keys.into_iter()
            .map(|fqn| DcpBytesSpec {
                fqn,
                payload: payload.clone(),
            })
            .collect()
    }

    /// The `model:` section of `run_config.yaml`.
    pub fn run_config_model(&self, opts: &ImportOptions, tied: bool) -> Vec<(String, Yaml)> {
        let multiple = opts
            .vocab_multiple
            .unwrap_or_else(|| default_vocab_multiple(self.vocab));
        let padded = self.embedding_rows(opts);
        let mut f = self.megatron_config.clone();
        f.extend([
            ("vocab_size".into(), Yaml::Int(self.vocab as i64)),
            (
                "make_vocab_size_divisible_by".into(),
                Yaml::Int(multiple as i64),
            ),
            ("should_pad_vocab".into(), Yaml::Bool(padded != self.vocab)),
            (
                "share_embeddings_and_output_weights".into(),
                Yaml::Bool(tied),
            ),
            ("hf_model_id".into(), Yaml::str(&opts.hf_model_id)),
        ]);
        f.extend(crate::formats::run_config::parallel_fields(
            &opts.parallel,
            opts.dtype,
        ));
        f
    }

    /// Plans the export of `ckpt` (store `store`).
    ///
    /// # Errors
    /// [`PlanError`] for a Megatron tensor missing, mis-shaped or without a place,
    /// or an output layer in a model whose configuration ties it.
    pub fn export(
        &self,
        ckpt: &MegatronCheckpoint,
        store: usize,
        opts: &ExportOptions,
    ) -> Result<HfBuild, PlanError> {
        let index = McIndex::new(ckpt);
        let has_output = index.get(OUTPUT).is_some();
        let tied = self.tied.unwrap_or(!has_output);
        if tied && has_output {
            return Err(PlanError::Inconsistent {
                path: ckpt.dir.clone(),
                why: format!(
                    "has {OUTPUT} but {} ties the embeddings (tie_word_embeddings=true); the checkpoint does not belong to this model",
                    self.config_path.display()
                ),
            });
        }
        let precision = Precision {
            to: opts.dtype,
            keep_fp32: opts.keep_fp32,
            source: Precision::majority(&ckpt.tensors),
        };
        let rules = self.rules(tied, self.vocab);
        let exported = rules::export(&rules, &index, store, &precision, &self.ctx())?;
        let mut tensors = exported.tensors;
        if tied && opts.reference_has_head == Some(true) {
            // The reference layout stores the tied head too: a copy under its name.
            let (_, emb) = tensors
                .iter()
                .find(|(_, t)| t.name == self.hf.embed)
                .expect("the embedding rule is always planned");
            let mut head = emb.clone();
            head.name = self.hf.head.to_owned();
            head.transform = "tied copy of the embedding".into();
            tensors.push(((self.num_layers() + 2, 0), head));
        }
        tensors.sort_by_key(|(order, _)| *order);
        if let Some(i) = exported.used.iter().position(|u| !u) {
            return Err(PlanError::Unplaced {
                path: ckpt.dir.clone(),
                tensor: ckpt.tensors[i].name.clone(),
                model: self.architecture.clone(),
            });
        }
        let mut skipped = Vec::new();
        if !ckpt.byte_items.is_empty() {
            skipped.push((
                format!("{} _extra_state items", ckpt.byte_items.len()),
                "module state (FP8 metadata), not weights".to_owned(),
            ));
        }
        if !ckpt.skipped.is_empty() {
            skipped.push((
                format!("{} optimizer/RNG entries", ckpt.skipped.len()),
                "not model weights".to_owned(),
            ));
        }
        let mut warnings = Vec::new();
        if !exported.kept_fp32.is_empty() {
            warnings.push(kept_note(&exported.kept_fp32, &precision));
        }
        Ok(HfBuild {
            tensors: tensors.into_iter().map(|(_, t)| t).collect(),
            skipped,
            warnings,
        })
    }

    /// The `config.json` to write on export: the HF model's own, with the dtype
    /// changed when the output's differs (`None`: copy it unchanged).
    pub fn export_config(config: &serde_json::Value, dtype: Option<DType>) -> Option<String> {
        let mut cfg = config.clone();
        let dtype = dtype?;
        let obj = cfg.as_object_mut()?;
        let mut changed = false;
        for key in ["torch_dtype", "dtype"] {
            if let Some(v) = obj.get_mut(key)
                && v.as_str() != Some(dtype.torch_name())
            {
                *v = serde_json::Value::String(dtype.torch_name().into());
                changed = true;
            }
        }
        changed.then(|| {
            let mut s = serde_json::to_string_pretty(&cfg).expect("config serializes");
            s.push('\n');
            s
        })
    }
}

fn kept_note(names: &[String], p: &Precision) -> String {
    let shown: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
    format!(
        "{} float32 tensors of a {} source kept in float32 instead of {} (keep_fp32=false casts them): {}{}",
        names.len(),
        p.source
            .map_or("mixed-precision".to_owned(), |d| d.to_string()),
        p.to.map_or("their dtype".to_owned(), |d| d.to_string()),
        shown.join(", "),
        if names.len() > shown.len() {
            ", …"
        } else {
            ""
        }
    )
}

/// Why a model's plan could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration or a parameter was refused.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The source does not fit the configuration.
    #[error(transparent)]
    Plan(#[from] PlanError),
}
