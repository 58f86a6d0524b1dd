//! The reference description of each model family, written from the
//! architectures' definitions (transformers' modeling code and Megatron-Core's
//! models) and independent of the conversion's mapping ([`crate::models`]): what
//! the smoke test's forward pass computes ([`crate::smoke`]) and which tensors
//! validation expects ([`crate::validate`]).
//!
//! One file per family reads its `config.json` into an [`Arch`] and names its
//! Hugging Face tensors ([`HfNames`]); [`megatron`] reads the `model:` section of
//! a Megatron-Bridge `run_config.yaml` and names Megatron-Core's tensors. Reading
//! the Megatron side from its own `run_config.yaml` puts the converter's
//! configuration derivation under test: a wrong field there makes the two
//! forward passes disagree.

pub mod dense;
pub mod megatron;
pub mod mixtral;
pub mod nemotron_h;
pub mod qwen3_moe;

use serde_json::Value;

use crate::formats::dtype::DType;

/// Rotary frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rope {
    /// Plain RoPE.
    Default,
    /// Llama 3.1 (`rope_type: llama3`; Megatron-Core `rope_scaling=True`).
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_positions: f64,
    },
    /// Linear position interpolation (`rope_type: linear`;
    /// `seq_len_interpolation_factor`).
    Linear {
        /// The factor positions are divided by.
        factor: f64,
    },
}

impl Rope {
    /// The scaling as Megatron-Core 0.16 computes it: a Llama 3 scaling with its
    /// fixed low and high frequency factors and original context (it takes only
    /// the factor).
    pub fn as_megatron_computes(self) -> Rope {
        match self {
            Rope::Llama3 { factor, .. } => Rope::Llama3 {
                factor,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_positions: 8192.0,
            },
            other => other,
        }
    }
}

/// Self-attention with grouped queries.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionArch {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (query groups).
    pub groups: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Biases on q, k and v.
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE.
    pub qk_norm: bool,
    /// RoPE base and scaling; `None`: no position embedding (Nemotron-H).
    pub rope: Option<(f64, Rope)>,
    /// Sliding attention window (keys older than this many positions are masked).
    pub window: Option<usize>,
}

impl AttentionArch {
    /// Query heads per key/value head.
    pub fn heads_per_group(&self) -> usize {
        self.heads / self.groups
    }

    /// Rows of the fused `linear_qkv`: (heads + 2 · groups) · head_dim.
    pub fn qkv_rows(&self) -> usize {
        (self.heads + 2 * self.groups) * self.head_dim
    }
}

/// The activation of an MLP or expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// `silu(gate) · up` (two projections).
    SwiGlu,
    /// `relu(up)²` (one projection).
    SquaredRelu,
}

/// A dense MLP.
#[derive(Debug, Clone, PartialEq)]
pub struct MlpArch {
    /// Intermediate size.
    pub ffn: usize,
    /// Activation.
    pub act: Act,
}

/// How a router scores experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// Softmax over all experts, then the top k (weights not renormalised):
    /// transformers with `norm_topk_prob=false`, Megatron-Core `pre_softmax`.
    SoftmaxThenTopk,
    /// The top k, with weights renormalised to one (a softmax over the chosen
    /// logits): transformers with `norm_topk_prob=true`, Mixtral, Megatron-Core
    /// without `pre_softmax`.
    TopkRenormalised,
    /// Sigmoid scores, chosen with a correction bias (and groups), weights
    /// renormalised then scaled (Nemotron-H).
    Sigmoid,
}

/// A mixture of experts.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeArch {
    /// Routed experts.
    pub experts: usize,
    /// Experts per token.
    pub topk: usize,
    /// An expert's intermediate size.
    pub ffn: usize,
    /// The experts' activation.
    pub act: Act,
    /// Router scoring.
    pub scoring: Scoring,
    /// A score-correction bias picks the experts (sigmoid routers).
    pub expert_bias: bool,
    /// Expert groups, and how many of them the top-k may use.
    pub groups: (usize, usize),
    /// The chosen weights are multiplied by this.
    pub scaling: f32,
    /// The shared expert's intermediate size, if any.
    pub shared_ffn: Option<usize>,
    /// The experts' latent size, if they work in a projected space.
    pub latent: Option<usize>,
}

/// A Mamba-2 mixer.
#[derive(Debug, Clone, PartialEq)]
pub struct MambaArch {
    /// Heads.
    pub heads: usize,
    /// Head size.
    pub head_dim: usize,
    /// Groups of B and C.
    pub groups: usize,
    /// State size.
    pub state: usize,
    /// Convolution width (`None`: taken from the stored weights).
    pub conv_kernel: Option<usize>,
    /// The time step is clamped from below at this value after its softplus
    /// (transformers clamps at `time_step_min`; Megatron-Core at 0).
    pub dt_min: f32,
}

impl MambaArch {
    /// `heads · head_dim`.
    pub fn d_inner(&self) -> usize {
        self.heads * self.head_dim
    }

    /// `groups · state`.
    pub fn d_bc(&self) -> usize {
        self.groups * self.state
    }
}

/// One residual block of a layer: the norm before it is implied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    /// Self-attention.
    Attention,
    /// A dense MLP.
    Mlp,
    /// A mixture of experts.
    Moe,
    /// A Mamba-2 mixer.
    Mamba,
}

/// What the forward pass and validation need to know of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    /// Where the configuration came from, for messages (`LlamaForCausalLM`,
    /// `run_config.yaml`).
    pub name: String,
    /// The family, when read from an HF configuration (`llama`, `nemotron_h`).
    pub family: Option<String>,
    /// Hidden size.
    pub hidden: usize,
    /// Vocabulary size (logits compared over these columns).
    pub vocab: usize,
    /// Tied input and output embeddings, when the configuration says.
    pub tied: Option<bool>,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// The blocks of every layer, in order.
    pub layers: Vec<Vec<Sub>>,
    /// The attention, when any layer has one.
    pub attention: Option<AttentionArch>,
    /// The dense MLP, when any layer has one.
    pub mlp: Option<MlpArch>,
    /// The mixture of experts, when any layer has one.
    pub moe: Option<MoeArch>,
    /// The Mamba-2 mixer, when any layer has one.
    pub mamba: Option<MambaArch>,
    /// The parameter dtype the configuration names, if any.
    pub dtype: Option<DType>,
    /// Megatron only: rows of the embedding and output layer when the vocabulary
    /// is padded (`should_pad_vocab`), from `make_vocab_size_divisible_by` × TP.
    pub padded_vocab: Option<usize>,
    /// Multi-token-prediction layers: their depth and the blocks of one depth's
    /// layers (checked for completeness; the forward is of the main model).
    pub mtp: Option<(usize, Vec<Sub>)>,
}

impl Arch {
    /// A model of `layers` with these sizes; the blocks' configurations are
    /// filled in by the caller.
    pub fn new(
        name: &str,
        hidden: usize,
        vocab: usize,
        eps: f32,
        tied: Option<bool>,
        layers: Vec<Vec<Sub>>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            family: None,
            hidden,
            vocab,
            tied,
            eps,
            layers,
            attention: None,
            mlp: None,
            moe: None,
            mamba: None,
            dtype: None,
            padded_vocab: None,
            mtp: None,
        }
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Whether any layer, multi-token prediction included, has a `sub` block.
    pub fn has(&self, sub: Sub) -> bool {
        self.layers.iter().flatten().any(|s| *s == sub)
            || self.mtp.as_ref().is_some_and(|(_, l)| l.contains(&sub))
    }

    /// Whether every layer has the same blocks (Megatron-Core's GPT model stacks
    /// such layers' keys on a leading layer axis).
    pub fn homogeneous(&self) -> bool {
        self.layers.windows(2).all(|w| w[0] == w[1])
    }

    /// The attention; only called for layers that have one.
    pub fn attn(&self) -> &AttentionArch {
        self.attention.as_ref().expect("a layer with attention")
    }
}

/// The tensor names of a family's Hugging Face checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HfNames {
    /// The embedding.
    pub embed: &'static str,
    /// The prefix of layer `N` (`model.layers.`).
    pub layers: &'static str,
    /// The final norm.
    pub final_norm: &'static str,
    /// The output projection.
    pub head: &'static str,
    /// The norm before each block of a layer, in block order (relative to the
    /// layer prefix, without `.weight`).
    pub norms: &'static [&'static str],
    /// Attention: q, k, v, o, q norm, k norm.
    pub attention: [&'static str; 6],
    /// Dense MLP: gate, up, down.
    pub mlp: [&'static str; 3],
    /// MoE: router (weight and score-correction bias), the experts' prefix and
    /// their gate, up and down projections.
    pub moe: [&'static str; 6],
    /// MoE: the shared expert's gate, up and down, and the latent projections.
    pub moe_extra: [&'static str; 5],
    /// The Mamba-2 mixer's prefix.
    pub mamba: &'static str,
}

/// Why no forward pass or expectation exists for a configuration.
pub type NotSupported = String;

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|v| !v.is_null())
}

/// A positive integer field.
fn count(v: &Value, key: &str, what: &str) -> Result<usize, String> {
    field(v, key)
        .and_then(Value::as_u64)
        .filter(|n| *n > 0)
        .map(|n| n as usize)
        .ok_or_else(|| {
            format!(
                "{what} needs a positive integer {key}, found {}",
                v.get(key).map_or("nothing".into(), |x| x.to_string())
            )
        })
}

fn count_or(v: &Value, key: &str, default: usize) -> usize {
    field(v, key)
        .and_then(Value::as_u64)
        .map_or(default, |n| n as usize)
}

fn flag(v: &Value, key: &str) -> Option<bool> {
    field(v, key).and_then(Value::as_bool)
}

fn number(v: &Value, key: &str) -> Option<f64> {
    field(v, key).and_then(Value::as_f64)
}

/// A dtype named as `bfloat16`, `torch.bfloat16` or `{_target_: torch.bfloat16}`.
fn dtype_of(v: &Value) -> Option<DType> {
    let s = match v {
        Value::String(s) => s.as_str(),
        Value::Object(o) => o.get("_target_")?.as_str()?,
        _ => return None,
    };
    DType::from_torch_name(s.strip_prefix("torch.").unwrap_or(s))
}

/// A family's reference: which configurations it reads and its names.
pub struct Family {
    /// `architectures[0]`.
    pub architecture: &'static str,
    /// `model_type`.
    pub model_type: &'static str,
    /// Reads `config.json`.
    pub read: fn(&Value, &str) -> Result<Arch, NotSupported>,
    /// The HF tensor names.
    pub names: HfNames,
}

/// The families with a reference.
pub static FAMILIES: &[&Family] = &[
    &dense::LLAMA,
    &dense::MISTRAL,
    &dense::QWEN2,
    &dense::QWEN3,
    &qwen3_moe::FAMILY,
    &mixtral::FAMILY,
    &nemotron_h::FAMILY,
];

/// The reference of the family named `family` (`llama`).
pub fn family(family: &str) -> Option<&'static Family> {
    FAMILIES.iter().copied().find(|f| f.model_type == family)
}

impl Arch {
    /// Reads an HF `config.json`.
    ///
    /// # Errors
    /// Why no forward pass is implemented for it: another architecture, or an
    /// option the forward does not compute.
    pub fn from_hf_config(cfg: &Value) -> Result<Arch, NotSupported> {
        let arch = cfg
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str);
        let model_type = field(cfg, "model_type").and_then(Value::as_str);
        let family = FAMILIES
            .iter()
            .find(|f| match arch {
                Some(arch) => arch == f.architecture,
                None => model_type == Some(f.model_type),
            })
            .ok_or_else(|| {
                format!(
                    "architecture {} has no forward pass here (these do: {})",
                    arch.or(model_type).unwrap_or("(none)"),
                    FAMILIES
                        .iter()
                        .map(|f| f.architecture)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        let name = arch.unwrap_or(family.architecture);
        let mut a = (family.read)(cfg, name)?;
        a.family = Some(family.model_type.to_owned());
        a.name = name.to_owned();
        a.dtype = field(cfg, "dtype")
            .or_else(|| field(cfg, "torch_dtype"))
            .and_then(dtype_of);
        Ok(a)
    }

    /// Reads the `model:` section of a Megatron-Bridge `run_config.yaml`.
    ///
    /// # Errors
    /// Why no forward pass is implemented for it.
    pub fn from_run_config(rc: &Value) -> Result<Arch, NotSupported> {
        megatron::read(rc)
    }

    /// The HF names of this model's family.
    ///
    /// # Errors
    /// A message when the family is unknown (a configuration read from a
    /// `run_config.yaml` has no HF names).
    pub fn hf_names(&self) -> Result<HfNames, String> {
        self.family
            .as_deref()
            .and_then(family)
            .map(|f| f.names)
            .ok_or_else(|| format!("{}: no Hugging Face names for this model", self.name))
    }
}
