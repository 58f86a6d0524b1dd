//! The dense GPT decoder that Llama, Mistral, Qwen2 and Qwen3 share, as
//! Megatron-Bridge maps it (`specs/megatron-bridge-mapping.md` §2–§4):
//!
//! | HF (layer N) | Megatron-Core (stacked on a leading layer axis) | transform |
//! |---|---|---|
//! | `model.embed_tokens.weight` | `embedding.word_embeddings.weight` | vocab pad |
//! | `model.layers.N.input_layernorm.weight` | `decoder.layers.self_attention.linear_qkv.layer_norm_weight` | copy |
//! | `…self_attn.{q,k,v}_proj.{weight,bias}` | `…self_attention.linear_qkv.{weight,bias}` | QKV interleave per query group |
//! | `…self_attn.o_proj.weight` | `…self_attention.linear_proj.weight` | copy |
//! | `…self_attn.{q,k}_norm.weight` | `…self_attention.{q,k}_layernorm.weight` | copy |
//! | `…post_attention_layernorm.weight` | `…mlp.linear_fc1.layer_norm_weight` | copy |
//! | `…mlp.{gate,up}_proj.weight` | `…mlp.linear_fc1.weight` (two chunks: gate, up) | concat |
//! | `…mlp.down_proj.weight` | `…mlp.linear_fc2.weight` | copy |
//! | `model.norm.weight` | `decoder.final_layernorm.weight` | copy |
//! | `lm_head.weight` (untied) | `output_layer.weight` | vocab pad |
//!
//! Every Megatron chunk is one layer's tensor, so memory stays at one layer's
//! tensors whatever the depth. Export reads any chunking (TP, PP) and both the
//! stacked and the per-layer key layouts.

use std::collections::HashSet;

use super::{HfBuild, ImportOptions, MegatronBuild, Parallelism};
use crate::dtype::DType;
use crate::error::Error;
use crate::formats::hf::HfCheckpoint;
use crate::formats::megatron::{self, MegatronCheckpoint};
use crate::layout::DcpBytesSpec;
use crate::plan::{Input, PlanError, RowGather, Run};
use crate::preflight::PreflightError;
use crate::run_config::Yaml;
use crate::source::GlobalTensor;
use crate::steps::{ChunkOut, TensorOut, copy_transform, out_dtype};

/// Rotary scaling, as far as these families use it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3.1 frequency scaling.
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: u64,
    },
    /// Linear position interpolation.
    Linear {
        /// `factor`.
        factor: f64,
    },
}

/// A dense decoder's configuration, from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseConfig {
    /// `architectures[0]`.
    pub architecture: String,
    /// Megatron-Bridge provider class for `run_config.yaml`.
    pub provider: &'static str,
    /// Decoder layers.
    pub layers: u64,
    /// Hidden size.
    pub hidden: u64,
    /// MLP intermediate size.
    pub ffn: u64,
    /// Attention heads.
    pub heads: u64,
    /// Query groups (key/value heads).
    pub groups: u64,
    /// Head dimension (kv channels).
    pub head_dim: u64,
    /// HF vocabulary size.
    pub vocab: u64,
    /// `tie_word_embeddings`, when the config says.
    pub tied: Option<bool>,
    /// Biases on q/k/v (Qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k (Qwen3).
    pub qk_norm: bool,
    /// `rope_theta`.
    pub rope_theta: f64,
    /// Rotary scaling.
    pub rope_scaling: RopeScaling,
    /// `rms_norm_eps`.
    pub norm_eps: f64,
    /// `max_position_embeddings`.
    pub max_positions: u64,
    /// `initializer_range`.
    pub init_std: f64,
    /// Sliding-window attention width (Mistral).
    pub sliding_window: Option<u64>,
    /// Provider fields a family sets beyond the shared ones.
    pub provider_extras: Vec<(&'static str, Yaml)>,
}

fn field<'a>(cfg: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    cfg.get(key).filter(|v| !v.is_null())
}

fn unsupported(arch: &str, option: String) -> PreflightError {
    PreflightError::Unsupported(format!(
        "config.json: {arch} with {option} is not supported"
    ))
}

impl DenseConfig {
    /// Reads the fields shared by the dense families; the family file then sets or
    /// refuses its own.
    ///
    /// # Errors
    /// [`PreflightError::Unsupported`] naming a missing field or an option these
    /// mappings cannot reproduce (another activation, MLP biases, quantization,
    /// rope scaling other than `llama3`/`linear`).
    pub fn parse(
        cfg: &serde_json::Value,
        provider: &'static str,
        family_arch: &str,
    ) -> Result<DenseConfig, PreflightError> {
        let arch = cfg
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .unwrap_or(family_arch)
            .to_owned();
        let int = |key: &str| -> Result<u64, PreflightError> {
            field(cfg, key)
                .and_then(|v| v.as_u64())
                .filter(|v| *v > 0)
                .ok_or_else(|| {
                    PreflightError::Unsupported(format!(
                        "config.json: {arch} needs a positive integer {key}, found {}",
                        cfg.get(key).map_or("nothing".into(), |v| v.to_string())
                    ))
                })
        };
        let float =
            |key: &str, default: f64| field(cfg, key).and_then(|v| v.as_f64()).unwrap_or(default);
        let layers = int("num_hidden_layers")?;
        let hidden = int("hidden_size")?;
        let ffn = int("intermediate_size")?;
        let heads = int("num_attention_heads")?;
        let groups = field(cfg, "num_key_value_heads")
            .and_then(|v| v.as_u64())
            .unwrap_or(heads);
        let head_dim = field(cfg, "head_dim")
            .and_then(|v| v.as_u64())
            .unwrap_or(hidden / heads);
        let vocab = int("vocab_size")?;
        if groups == 0 || heads % groups != 0 {
            return Err(unsupported(
                &arch,
                format!(
                    "num_attention_heads={heads} not a multiple of num_key_value_heads={groups}"
                ),
            ));
        }
        let act = field(cfg, "hidden_act")
            .and_then(|v| v.as_str())
            .unwrap_or("silu");
        if act != "silu" {
            return Err(unsupported(
                &arch,
                format!("hidden_act={act} (only silu, SwiGLU)"),
            ));
        }
        if field(cfg, "mlp_bias").and_then(|v| v.as_bool()) == Some(true) {
            return Err(unsupported(&arch, "mlp_bias=true".into()));
        }
        if field(cfg, "quantization_config").is_some() {
            return Err(unsupported(
                &arch,
                "quantization_config (quantized weights)".into(),
            ));
        }
        if field(cfg, "use_sliding_window").and_then(|v| v.as_bool()) == Some(true) {
            return Err(unsupported(&arch, "use_sliding_window=true".into()));
        }
        // transformers 5 keeps rope settings in rope_parameters, 4.x in rope_theta
        // and rope_scaling.
        let rope_params = field(cfg, "rope_parameters");
        let rope_theta = rope_params
            .and_then(|r| r.get("rope_theta"))
            .and_then(|v| v.as_f64())
            .unwrap_or_else(|| float("rope_theta", 10000.0));
        let scaling = field(cfg, "rope_scaling").or(rope_params);
        let rope_scaling = match scaling {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                let f = |k: &str| s.get(k).and_then(|v| v.as_f64());
                match kind {
                    "default" => RopeScaling::None,
                    "llama3" => RopeScaling::Llama3 {
                        factor: f("factor").unwrap_or(8.0),
                        low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
                        original_max_position_embeddings: s
                            .get("original_max_position_embeddings")
                            .and_then(|v| v.as_u64())
                            .unwrap_or(8192),
                    },
                    "linear" => RopeScaling::Linear {
                        factor: f("factor").unwrap_or(1.0),
                    },
                    other => {
                        return Err(unsupported(
                            &arch,
                            format!("rope_scaling.rope_type={other}"),
                        ));
                    }
                }
            }
        };
        Ok(DenseConfig {
            architecture: arch,
            provider,
            layers,
            hidden,
            ffn,
            heads,
            groups,
            head_dim,
            vocab,
            tied: field(cfg, "tie_word_embeddings").and_then(|v| v.as_bool()),
            qkv_bias: false,
            qk_norm: false,
            rope_theta,
            rope_scaling,
            norm_eps: float("rms_norm_eps", 1e-6),
            max_positions: field(cfg, "max_position_embeddings")
                .and_then(|v| v.as_u64())
                .unwrap_or(4096),
            init_std: float("initializer_range", 0.02),
            sliding_window: None,
            provider_extras: Vec::new(),
        })
    }

    /// Rows of the fused `linear_qkv`: (heads + 2 · groups) · head_dim.
    pub fn qkv_rows(&self) -> u64 {
        (self.heads + 2 * self.groups) * self.head_dim
    }

    /// Query heads per group.
    pub fn heads_per_group(&self) -> u64 {
        self.heads / self.groups
    }

    /// `attention_bias` for the families that may set it.
    pub fn attention_bias(cfg: &serde_json::Value) -> bool {
        field(cfg, "attention_bias")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }
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

/// The QKV interleave: for each query group, its query heads, then its key head,
/// then its value head. Inputs 0, 1, 2 are q, k, v; a row is one element of the
/// head dimension's last axis.
pub fn qkv_gather(c: &DenseConfig, row_len: u64) -> RowGather {
    let (p, d) = (c.heads_per_group(), c.head_dim);
    let mut runs = Vec::new();
    for g in 0..c.groups {
        runs.push(Run {
            input: Some(0),
            start: g * p * d,
            rows: p * d,
        });
        runs.push(Run {
            input: Some(1),
            start: g * d,
            rows: d,
        });
        runs.push(Run {
            input: Some(2),
            start: g * d,
            rows: d,
        });
    }
    RowGather { row_len, runs }
}

/// Rows of q (`which` = 0), k (1) or v (2) inside the fused tensor, per group.
pub fn qkv_rows_of(c: &DenseConfig, which: u64) -> Vec<(u64, u64)> {
    let (p, d) = (c.heads_per_group(), c.head_dim);
    (0..c.groups)
        .map(|g| {
            let base = g * (p + 2) * d;
            match which {
                0 => (base, p * d),
                1 => (base + p * d, d),
                _ => (base + (p + 1) * d, d),
            }
        })
        .collect()
}

/// The `_extra_state` modules of a TransformerEngine GPT layer; Megatron-Core's
/// default load strictness requires their items.
pub const EXTRA_STATE_MODULES: [&str; 5] = [
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "self_attention.core_attention",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
];

/// A dense family mapping.
#[derive(Debug, Clone)]
pub struct DenseGpt {
    /// The model.
    pub cfg: DenseConfig,
}

const L: &str = "decoder.layers.";

struct Src<'a> {
    ckpt: &'a HfCheckpoint,
    store: usize,
    used: HashSet<usize>,
}

impl<'a> Src<'a> {
    fn get(&mut self, name: &str, shape: &[u64]) -> Result<(usize, &'a GlobalTensor), Error> {
        let i = *self.ckpt.by_name.get(name).ok_or_else(|| {
            PlanError::Mismatch(format!(
                "{}: tensor {name:?} is missing (expected {shape:?} from config.json)",
                self.ckpt.root.display()
            ))
        })?;
        let t = &self.ckpt.tensors[i];
        if t.shape != shape {
            return Err(PlanError::Mismatch(format!(
                "{}: tensor {name:?}: expected shape {shape:?} (from config.json), found {:?}",
                self.ckpt.root.join(&self.ckpt.shard_of[name]).display(),
                t.shape
            ))
            .into());
        }
        self.used.insert(i);
        Ok((i, t))
    }

    fn whole(&mut self, name: &str, shape: &[u64]) -> Result<(Input, DType), Error> {
        let store = self.store;
        let (i, t) = self.get(name, shape)?;
        Ok((Input::whole(store, i, t), t.dtype))
    }
}

fn cast_check(name: &str, from: DType, to: DType) -> Result<(), Error> {
    crate::dtype::check_cast(from, to).map_err(|source| {
        PlanError::Cast {
            tensor: name.to_owned(),
            source,
        }
        .into()
    })
}

impl DenseGpt {
    fn tied(&self, has_lm_head: bool) -> bool {
        // An absent tie_word_embeddings is inferred from the checkpoint (no lm_head → tied).
        self.cfg.tied.unwrap_or(!has_lm_head)
    }

    fn vocab_multiple(&self, opts: &ImportOptions) -> u64 {
        opts.vocab_multiple
            .unwrap_or_else(|| default_vocab_multiple(self.cfg.vocab))
    }

    /// Embedding rows on the Megatron side: the HF vocabulary unless padding was
    /// asked for with `make_vocab_size_divisible_by` (Megatron-Bridge pads only
    /// then; by default the embedding has exactly `vocab_size` rows).
    pub fn embedding_rows(&self, opts: &ImportOptions) -> u64 {
        match opts.vocab_multiple {
            Some(m) => padded_vocab(self.cfg.vocab, m, opts.parallel.tp),
            None => self.cfg.vocab,
        }
    }

    /// Megatron parallelism checks (§4: query groups must split evenly over TP).
    pub fn check(&self, p: &Parallelism) -> Result<(), PreflightError> {
        let c = &self.cfg;
        let checks = [
            ("tp", p.tp, "num_attention_heads", c.heads),
            ("tp", p.tp, "num_key_value_heads", c.groups),
            ("tp", p.tp, "intermediate_size", c.ffn),
            ("pp", p.pp, "num_hidden_layers", c.layers),
        ];
        for (name, size, dim, value) in checks {
            if value % size != 0 {
                return Err(PreflightError::BadValue {
                    name: name.into(),
                    value: size.to_string(),
                    expected: format!("a divisor of {dim}={value} ({})", c.architecture),
                });
            }
        }
        Ok(())
    }

    /// Plans the import.
    pub fn import(
        &self,
        ckpt: &HfCheckpoint,
        store: usize,
        opts: &ImportOptions,
    ) -> Result<MegatronBuild, Error> {
        let c = &self.cfg;
        let (nl, h, f, d, qkv) = (c.layers, c.hidden, c.ffn, c.head_dim, c.qkv_rows());
        let mut src = Src {
            ckpt,
            store,
            used: HashSet::new(),
        };
        let has_lm_head = ckpt.by_name.contains_key("lm_head.weight");
        let tied = self.tied(has_lm_head);
        let vocab_p = self.embedding_rows(opts);
        if !vocab_p.is_multiple_of(opts.parallel.tp) {
            return Err(PreflightError::BadValue {
                name: "tp".into(),
                value: opts.parallel.tp.to_string(),
                expected: format!(
                    "a divisor of vocab_size={} (or pass make_vocab_size_divisible_by to pad the vocabulary)",
                    c.vocab
                ),
            }
            .into());
        }
        let mut chunks = Vec::new();
        let dtype = opts.dtype;
        let mut push = |fqn: String,
                        global: Vec<u64>,
                        offsets: Vec<u64>,
                        sizes: Vec<u64>,
                        inputs: Vec<(Input, DType)>,
                        gather: RowGather,
                        transform: &str|
         -> Result<(), Error> {
            let to = out_dtype(inputs[0].1, Some(dtype));
            for (inp, from) in &inputs {
                let _ = inp;
                cast_check(&fqn, *from, to)?;
            }
            let transform = if transform == "copy" {
                copy_transform(inputs[0].1, to)
            } else {
                transform.to_owned()
            };
            chunks.push(ChunkOut {
                fqn,
                global_shape: global,
                offsets,
                sizes,
                dtype: to,
                inputs: inputs.into_iter().map(|(i, _)| i).collect(),
                gather,
                transform,
            });
            Ok(())
        };
        let vocab_gather = |rows: u64| RowGather {
            row_len: h,
            runs: {
                let mut r = vec![Run {
                    input: Some(0),
                    start: 0,
                    rows,
                }];
                if vocab_p > rows {
                    r.push(Run {
                        input: None,
                        start: 0,
                        rows: vocab_p - rows,
                    });
                }
                r
            },
        };
        let pad_note = if vocab_p > c.vocab {
            format!("vocab pad {}→{vocab_p}", c.vocab)
        } else {
            "copy".into()
        };
        let emb = src.whole("model.embed_tokens.weight", &[c.vocab, h])?;
        push(
            "embedding.word_embeddings.weight".into(),
            vec![vocab_p, h],
            vec![0, 0],
            vec![vocab_p, h],
            vec![emb],
            vocab_gather(c.vocab),
            &pad_note,
        )?;
        for l in 0..nl {
            let p = format!("model.layers.{l}.");
            let n = |s: &str| format!("{p}{s}");
            let ln = src.whole(&n("input_layernorm.weight"), &[h])?;
            push(
                format!("{L}self_attention.linear_qkv.layer_norm_weight"),
                vec![nl, h],
                vec![l, 0],
                vec![1, h],
                vec![ln],
                RowGather::copy(h, 1),
                "copy",
            )?;
            let q = src.whole(&n("self_attn.q_proj.weight"), &[c.heads * d, h])?;
            let k = src.whole(&n("self_attn.k_proj.weight"), &[c.groups * d, h])?;
            let v = src.whole(&n("self_attn.v_proj.weight"), &[c.groups * d, h])?;
            push(
                format!("{L}self_attention.linear_qkv.weight"),
                vec![nl, qkv, h],
                vec![l, 0, 0],
                vec![1, qkv, h],
                vec![q, k, v],
                qkv_gather(c, h),
                "qkv interleave",
            )?;
            if c.qkv_bias {
                let q = src.whole(&n("self_attn.q_proj.bias"), &[c.heads * d])?;
                let k = src.whole(&n("self_attn.k_proj.bias"), &[c.groups * d])?;
                let v = src.whole(&n("self_attn.v_proj.bias"), &[c.groups * d])?;
                push(
                    format!("{L}self_attention.linear_qkv.bias"),
                    vec![nl, qkv],
                    vec![l, 0],
                    vec![1, qkv],
                    vec![q, k, v],
                    qkv_gather(c, 1),
                    "qkv interleave",
                )?;
            }
            let o = src.whole(&n("self_attn.o_proj.weight"), &[h, c.heads * d])?;
            push(
                format!("{L}self_attention.linear_proj.weight"),
                vec![nl, h, c.heads * d],
                vec![l, 0, 0],
                vec![1, h, c.heads * d],
                vec![o],
                RowGather::copy(h, c.heads * d),
                "copy",
            )?;
            if c.qk_norm {
                for (hf, mc) in [("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")] {
                    let t = src.whole(&n(&format!("self_attn.{hf}.weight")), &[d])?;
                    push(
                        format!("{L}self_attention.{mc}.weight"),
                        vec![nl, d],
                        vec![l, 0],
                        vec![1, d],
                        vec![t],
                        RowGather::copy(d, 1),
                        "copy",
                    )?;
                }
            }
            let ln2 = src.whole(&n("post_attention_layernorm.weight"), &[h])?;
            push(
                format!("{L}mlp.linear_fc1.layer_norm_weight"),
                vec![nl, h],
                vec![l, 0],
                vec![1, h],
                vec![ln2],
                RowGather::copy(h, 1),
                "copy",
            )?;
            // SwiGLU: the gate rows then the up rows, one chunk each (as MCore saves them).
            let gate = src.whole(&n("mlp.gate_proj.weight"), &[f, h])?;
            push(
                format!("{L}mlp.linear_fc1.weight"),
                vec![nl, 2 * f, h],
                vec![l, 0, 0],
                vec![1, f, h],
                vec![gate],
                RowGather::copy(f, h),
                "gate half of fc1",
            )?;
            let up = src.whole(&n("mlp.up_proj.weight"), &[f, h])?;
            push(
                format!("{L}mlp.linear_fc1.weight"),
                vec![nl, 2 * f, h],
                vec![l, f, 0],
                vec![1, f, h],
                vec![up],
                RowGather::copy(f, h),
                "up half of fc1",
            )?;
            let down = src.whole(&n("mlp.down_proj.weight"), &[h, f])?;
            push(
                format!("{L}mlp.linear_fc2.weight"),
                vec![nl, h, f],
                vec![l, 0, 0],
                vec![1, h, f],
                vec![down],
                RowGather::copy(h, f),
                "copy",
            )?;
        }
        let norm = src.whole("model.norm.weight", &[h])?;
        push(
            "decoder.final_layernorm.weight".into(),
            vec![h],
            vec![0],
            vec![h],
            vec![norm],
            RowGather::copy(h, 1),
            "copy",
        )?;
        let mut skipped = Vec::new();
        if !tied {
            let head = src.whole("lm_head.weight", &[c.vocab, h])?;
            push(
                "output_layer.weight".into(),
                vec![vocab_p, h],
                vec![0, 0],
                vec![vocab_p, h],
                vec![head],
                vocab_gather(c.vocab),
                &pad_note,
            )?;
        } else if has_lm_head {
            src.used.insert(ckpt.by_name["lm_head.weight"]);
            skipped.push((
                "lm_head.weight".to_owned(),
                "tie_word_embeddings: the output layer shares the embedding".to_owned(),
            ));
        }
        for (i, t) in ckpt.tensors.iter().enumerate() {
            if src.used.contains(&i) {
                continue;
            }
            if t.name.ends_with("rotary_emb.inv_freq") {
                skipped.push((
                    t.name.clone(),
                    "rotary frequencies are recomputed from rope_theta".into(),
                ));
                continue;
            }
            return Err(PlanError::Mismatch(format!(
                "{}: tensor {:?} has no place in a {} with this config.json (refusing to drop weights)",
                ckpt.root.join(&ckpt.shard_of[&t.name]).display(),
                t.name,
                c.architecture
            ))
            .into());
        }
        let payload = megatron::local_extra_state_payload();
        let mut bytes = Vec::new();
        for module in EXTRA_STATE_MODULES {
            for l in 0..nl {
                bytes.push(DcpBytesSpec {
                    fqn: format!("{L}{module}._extra_state/shard_{l}_{nl}"),
                    payload: payload.clone(),
                });
            }
        }
        let mut warnings = Vec::new();
        if opts.parallel.ep > 1 || opts.parallel.etp > 1 {
            warnings.push(format!(
                "ep={} etp={} have no effect on a dense {}",
                opts.parallel.ep, opts.parallel.etp, c.architecture
            ));
        }
        Ok(MegatronBuild {
            chunks,
            bytes,
            skipped,
            warnings,
            model_config: self.model_fields(opts, tied, &opts.hf_model_id),
        })
    }

    /// Plans the export.
    pub fn export(
        &self,
        ckpt: &MegatronCheckpoint,
        store: usize,
        dtype: Option<DType>,
        reference_has_lm_head: Option<bool>,
    ) -> Result<HfBuild, Error> {
        let c = &self.cfg;
        let (nl, h, f, d) = (c.layers, c.hidden, c.ffn, c.head_dim);
        let mut used = HashSet::new();
        let mut tensors = Vec::new();
        let stacked = ckpt
            .tensor(&format!("{L}self_attention.linear_qkv.weight"))
            .is_some();
        // Finds a key (stacked, or per-layer with the layer in the name) and checks its
        // per-layer shape; returns the tensor index and the offset prefix to use.
        let find = |used: &mut HashSet<usize>,
                    layer: Option<u64>,
                    suffixes: &[&str],
                    shape: &[u64]|
         -> Result<(usize, Vec<u64>), Error> {
            for suffix in suffixes {
                let (name, prefix, expect): (String, Vec<u64>, Vec<u64>) = match layer {
                    None => (suffix.to_string(), vec![], shape.to_vec()),
                    Some(l) if stacked => {
                        (format!("{L}{suffix}"), vec![l], [&[nl][..], shape].concat())
                    }
                    Some(l) => (format!("{L}{l}.{suffix}"), vec![], shape.to_vec()),
                };
                if let Some(i) = ckpt.tensors.iter().position(|t| t.name == name) {
                    let t = &ckpt.tensors[i];
                    if t.shape != expect {
                        return Err(PlanError::Mismatch(format!(
                            "{}: tensor {name:?}: expected shape {expect:?} (from config.json of {}), found {:?}",
                            ckpt.dir.display(),
                            c.architecture,
                            t.shape
                        ))
                        .into());
                    }
                    used.insert(i);
                    return Ok((i, prefix));
                }
            }
            Err(PlanError::Mismatch(format!(
                "{}: no tensor {} (expected for layer {} of a {})",
                ckpt.dir.display(),
                suffixes.join(" or "),
                layer.map_or("-".into(), |l| l.to_string()),
                c.architecture
            ))
            .into())
        };
        let mut out = |name: String,
                       shape: Vec<u64>,
                       i: usize,
                       boxes: Vec<(Vec<u64>, Vec<u64>)>,
                       row_len: u64,
                       transform: &str|
         -> Result<(), Error> {
            let t = &ckpt.tensors[i];
            let to = out_dtype(t.dtype, dtype);
            cast_check(&name, t.dtype, to)?;
            let runs: Vec<Run> = boxes
                .iter()
                .enumerate()
                .map(|(k, (_, s))| Run {
                    input: Some(k),
                    start: 0,
                    rows: s.iter().product::<u64>() / row_len,
                })
                .collect();
            let inputs = boxes
                .into_iter()
                .map(|(o, s)| Input {
                    store,
                    tensor: i,
                    offsets: o,
                    sizes: s,
                })
                .collect();
            let transform = if transform == "copy" {
                copy_transform(t.dtype, to)
            } else {
                transform.to_owned()
            };
            tensors.push(TensorOut {
                name,
                dtype: to,
                shape,
                inputs,
                gather: RowGather { row_len, runs },
                transform,
            });
            Ok(())
        };
        let with = |prefix: &[u64], rest: &[u64]| -> Vec<u64> { [prefix, rest].concat() };
        let ones = |prefix: &[u64]| -> Vec<u64> { vec![1; prefix.len()] };

        let by_name = |used: &mut HashSet<usize>, name: &str| -> Option<usize> {
            let i = ckpt.tensors.iter().position(|t| t.name == name)?;
            used.insert(i);
            Some(i)
        };
        // The embedding and the output layer: `[≥ vocab, hidden]`, exported without
        // the padding rows.
        let vocab_tensor = |used: &mut HashSet<usize>,
                            name: &str,
                            missing: &str|
         -> Result<(usize, String), Error> {
            let i = by_name(used, name).ok_or_else(|| {
                PlanError::Mismatch(format!("{}: no {name}{missing}", ckpt.dir.display()))
            })?;
            let rows = ckpt.tensors[i].shape.first().copied().unwrap_or(0);
            if ckpt.tensors[i].shape != [rows, h] || rows < c.vocab {
                return Err(PlanError::Mismatch(format!(
                    "{}: {name} is {:?}: expected [≥{}, {h}] (vocab_size and hidden_size of config.json)",
                    ckpt.dir.display(),
                    ckpt.tensors[i].shape,
                    c.vocab
                ))
                .into());
            }
            let transform = if rows > c.vocab {
                format!("vocab unpad {rows}→{}", c.vocab)
            } else {
                "copy".into()
            };
            Ok((i, transform))
        };
        let (emb, unpad) = vocab_tensor(&mut used, "embedding.word_embeddings.weight", "")?;
        out(
            "model.embed_tokens.weight".into(),
            vec![c.vocab, h],
            emb,
            vec![(vec![0, 0], vec![c.vocab, h])],
            h,
            &unpad,
        )?;
        for l in 0..nl {
            let p = format!("model.layers.{l}.");
            let (i, pre) = find(
                &mut used,
                Some(l),
                &["self_attention.linear_qkv.weight"],
                &[c.qkv_rows(), h],
            )?;
            for (which, hf) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                let boxes = qkv_rows_of(c, which as u64)
                    .into_iter()
                    .map(|(start, rows)| (with(&pre, &[start, 0]), with(&ones(&pre), &[rows, h])))
                    .collect();
                let rows = if which == 0 {
                    c.heads * d
                } else {
                    c.groups * d
                };
                out(
                    format!("{p}self_attn.{hf}.weight"),
                    vec![rows, h],
                    i,
                    boxes,
                    h,
                    "qkv split",
                )?;
            }
            if c.qkv_bias {
                let (i, pre) = find(
                    &mut used,
                    Some(l),
                    &["self_attention.linear_qkv.bias"],
                    &[c.qkv_rows()],
                )?;
                for (which, hf) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    let boxes = qkv_rows_of(c, which as u64)
                        .into_iter()
                        .map(|(start, rows)| (with(&pre, &[start]), with(&ones(&pre), &[rows])))
                        .collect();
                    let rows = if which == 0 {
                        c.heads * d
                    } else {
                        c.groups * d
                    };
                    out(
                        format!("{p}self_attn.{hf}.bias"),
                        vec![rows],
                        i,
                        boxes,
                        1,
                        "qkv split",
                    )?;
                }
            }
            let (i, pre) = find(
                &mut used,
                Some(l),
                &["self_attention.linear_proj.weight"],
                &[h, c.heads * d],
            )?;
            out(
                format!("{p}self_attn.o_proj.weight"),
                vec![h, c.heads * d],
                i,
                vec![(with(&pre, &[0, 0]), with(&ones(&pre), &[h, c.heads * d]))],
                c.heads * d,
                "copy",
            )?;
            if c.qk_norm {
                for (hf, mc) in [("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")] {
                    let (i, pre) = find(
                        &mut used,
                        Some(l),
                        &[&format!("self_attention.{mc}.weight")],
                        &[d],
                    )?;
                    out(
                        format!("{p}self_attn.{hf}.weight"),
                        vec![d],
                        i,
                        vec![(with(&pre, &[0]), with(&ones(&pre), &[d]))],
                        1,
                        "copy",
                    )?;
                }
            }
            let (i, pre) = find(&mut used, Some(l), &["mlp.linear_fc1.weight"], &[2 * f, h])
                .or_else(|_| find(&mut used, Some(l), &["mlp.linear_fc1.weight_w"], &[f, h]))?;
            // SwiGLU: the fused `[gate; up]`, or the two halves saved apart
            // (`weight_w`/`weight_v` with singleton local shards).
            let halves = if ckpt.tensors[i].name.ends_with("linear_fc1.weight") {
                [
                    (i, pre.clone(), 0, "gate half of fc1"),
                    (i, pre, f, "up half of fc1"),
                ]
            } else {
                let (j, pre_v) = find(&mut used, Some(l), &["mlp.linear_fc1.weight_v"], &[f, h])?;
                [(i, pre, 0, "copy"), (j, pre_v, 0, "copy")]
            };
            for ((t, pre, row, transform), hf) in halves.into_iter().zip(["gate_proj", "up_proj"]) {
                out(
                    format!("{p}mlp.{hf}.weight"),
                    vec![f, h],
                    t,
                    vec![(with(&pre, &[row, 0]), with(&ones(&pre), &[f, h]))],
                    h,
                    transform,
                )?;
            }
            let (i, pre) = find(&mut used, Some(l), &["mlp.linear_fc2.weight"], &[h, f])?;
            out(
                format!("{p}mlp.down_proj.weight"),
                vec![h, f],
                i,
                vec![(with(&pre, &[0, 0]), with(&ones(&pre), &[h, f]))],
                f,
                "copy",
            )?;
            let (i, pre) = find(
                &mut used,
                Some(l),
                &[
                    "self_attention.linear_qkv.layer_norm_weight",
                    "input_layernorm.weight",
                ],
                &[h],
            )?;
            out(
                format!("{p}input_layernorm.weight"),
                vec![h],
                i,
                vec![(with(&pre, &[0]), with(&ones(&pre), &[h]))],
                1,
                "copy",
            )?;
            let (i, pre) = find(
                &mut used,
                Some(l),
                &[
                    "mlp.linear_fc1.layer_norm_weight",
                    "pre_mlp_layernorm.weight",
                ],
                &[h],
            )?;
            out(
                format!("{p}post_attention_layernorm.weight"),
                vec![h],
                i,
                vec![(with(&pre, &[0]), with(&ones(&pre), &[h]))],
                1,
                "copy",
            )?;
        }
        let (i, _) = find(
            &mut used,
            None,
            &[
                "decoder.final_layernorm.weight",
                "decoder.final_norm.weight",
            ],
            &[h],
        )?;
        out(
            "model.norm.weight".into(),
            vec![h],
            i,
            vec![(vec![0], vec![h])],
            1,
            "copy",
        )?;
        let has_output = ckpt.tensor("output_layer.weight").is_some();
        let tied = self.tied(has_output);
        if tied && has_output {
            return Err(PlanError::Mismatch(format!(
                "{}: has output_layer.weight but config.json ties the embeddings (tie_word_embeddings=true); the checkpoint does not belong to this model",
                ckpt.dir.display()
            ))
            .into());
        }
        if !tied {
            let (i, unpad) = vocab_tensor(
                &mut used,
                "output_layer.weight",
                ", but config.json says tie_word_embeddings=false",
            )?;
            out(
                "lm_head.weight".into(),
                vec![c.vocab, h],
                i,
                vec![(vec![0, 0], vec![c.vocab, h])],
                h,
                &unpad,
            )?;
        } else if reference_has_lm_head == Some(true) {
            // The reference layout stores the tied head too: emit a copy under its name.
            out(
                "lm_head.weight".into(),
                vec![c.vocab, h],
                emb,
                vec![(vec![0, 0], vec![c.vocab, h])],
                h,
                "tied copy of the embedding",
            )?;
        }
        for (i, t) in ckpt.tensors.iter().enumerate() {
            if !used.contains(&i) {
                return Err(PlanError::Mismatch(format!(
                    "{}: tensor {:?} {:?} has no place in a {} with this config.json (refusing to drop weights)",
                    ckpt.dir.display(),
                    t.name,
                    t.shape,
                    c.architecture
                ))
                .into());
            }
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
        Ok(HfBuild {
            tensors,
            skipped,
            warnings: Vec::new(),
        })
    }

    /// The `model:` section fields shared by the dense providers.
    pub fn model_fields(
        &self,
        opts: &ImportOptions,
        tied: bool,
        hf_model_id: &str,
    ) -> Vec<(String, Yaml)> {
        let c = &self.cfg;
        let m = self.vocab_multiple(opts);
        let padded = self.embedding_rows(opts);
        let mut f: Vec<(String, Yaml)> = vec![
            ("_target_".into(), Yaml::str(c.provider)),
            ("num_layers".into(), Yaml::Int(c.layers as i64)),
            ("hidden_size".into(), Yaml::Int(c.hidden as i64)),
            ("ffn_hidden_size".into(), Yaml::Int(c.ffn as i64)),
            ("num_attention_heads".into(), Yaml::Int(c.heads as i64)),
            ("num_query_groups".into(), Yaml::Int(c.groups as i64)),
            ("kv_channels".into(), Yaml::Int(c.head_dim as i64)),
            ("vocab_size".into(), Yaml::Int(c.vocab as i64)),
            ("make_vocab_size_divisible_by".into(), Yaml::Int(m as i64)),
            ("should_pad_vocab".into(), Yaml::Bool(padded != c.vocab)),
            ("seq_length".into(), Yaml::Int(c.max_positions as i64)),
            ("normalization".into(), Yaml::str("RMSNorm")),
            ("layernorm_epsilon".into(), Yaml::Float(c.norm_eps)),
            ("gated_linear_unit".into(), Yaml::Bool(true)),
            ("add_bias_linear".into(), Yaml::Bool(false)),
            ("add_qkv_bias".into(), Yaml::Bool(c.qkv_bias)),
            ("qk_layernorm".into(), Yaml::Bool(c.qk_norm)),
            (
                "share_embeddings_and_output_weights".into(),
                Yaml::Bool(tied),
            ),
            ("position_embedding_type".into(), Yaml::str("rope")),
            ("rotary_base".into(), Yaml::Float(c.rope_theta)),
            ("rotary_percent".into(), Yaml::Float(1.0)),
            ("hidden_dropout".into(), Yaml::Float(0.0)),
            ("attention_dropout".into(), Yaml::Float(0.0)),
            ("init_method_std".into(), Yaml::Float(c.init_std)),
            (
                "activation_func".into(),
                Yaml::object("torch.nn.functional.silu"),
            ),
            (
                "transformer_layer_spec".into(),
                Yaml::object("megatron.bridge.models.gpt_provider.default_layer_spec"),
            ),
            ("perform_initialization".into(), Yaml::Bool(false)),
            ("hf_model_id".into(), Yaml::str(hf_model_id)),
        ];
        for (k, v) in &c.provider_extras {
            f.push(((*k).to_owned(), v.clone()));
        }
        match &c.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Llama3 { factor, .. } => {
                f.push(("rope_scaling".into(), Yaml::Bool(true)));
                f.push(("rope_scaling_factor".into(), Yaml::Float(*factor)));
            }
            RopeScaling::Linear { factor } => {
                f.push(("seq_len_interpolation_factor".into(), Yaml::Float(*factor)));
            }
        }
        if let Some(w) = c.sliding_window {
            f.push((
                "window_size".into(),
                Yaml::List(vec![Yaml::Int(w as i64 - 1), Yaml::Int(0)]),
            ));
        }
        f.extend(crate::run_config::parallel_fields(
            &opts.parallel,
            opts.dtype,
        ));
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(heads: u64, groups: u64, d: u64) -> DenseConfig {
        DenseConfig {
            architecture: "LlamaForCausalLM".into(),
            provider: "x",
            layers: 1,
            hidden: 8,
            ffn: 8,
            heads,
            groups,
            head_dim: d,
            vocab: 16,
            tied: Some(false),
            qkv_bias: false,
            qk_norm: false,
            rope_theta: 1e4,
            rope_scaling: RopeScaling::None,
            norm_eps: 1e-5,
            max_positions: 16,
            init_std: 0.02,
            sliding_window: None,
            provider_extras: Vec::new(),
        }
    }

    #[test]
    fn interleave_and_split_are_inverse() {
        // heads 4, groups 2, d 1: megatron rows = q0 q1 k0 v0 q2 q3 k1 v1.
        let c = cfg(4, 2, 1);
        let g = qkv_gather(&c, 1);
        let order: Vec<(usize, u64)> = g
            .runs
            .iter()
            .flat_map(|r| (r.start..r.start + r.rows).map(move |s| (r.input.unwrap(), s)))
            .collect();
        assert_eq!(
            order,
            vec![
                (0, 0),
                (0, 1),
                (1, 0),
                (2, 0),
                (0, 2),
                (0, 3),
                (1, 1),
                (2, 1)
            ]
        );
        // Splitting back picks exactly those rows.
        let q: Vec<u64> = qkv_rows_of(&c, 0)
            .into_iter()
            .flat_map(|(s, n)| s..s + n)
            .collect();
        let k: Vec<u64> = qkv_rows_of(&c, 1)
            .into_iter()
            .flat_map(|(s, n)| s..s + n)
            .collect();
        let v: Vec<u64> = qkv_rows_of(&c, 2)
            .into_iter()
            .flat_map(|(s, n)| s..s + n)
            .collect();
        assert_eq!(q, vec![0, 1, 4, 5]);
        assert_eq!(k, vec![2, 6]);
        assert_eq!(v, vec![3, 7]);
    }

    #[test]
    fn vocab_padding() {
        assert_eq!(default_vocab_multiple(128_256), 128);
        assert_eq!(default_vocab_multiple(151_936), 128);
        assert_eq!(default_vocab_multiple(32_000), 128);
        assert_eq!(default_vocab_multiple(50_257), 1);
        assert_eq!(padded_vocab(50_257, 128, 1), 50_304);
        assert_eq!(padded_vocab(128, 128, 2), 256);
        assert_eq!(padded_vocab(128_256, 128, 1), 128_256);
    }
}
