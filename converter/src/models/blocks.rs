//! Layer kinds as reusable rule sets: a decoder layer is a list of blocks, so a
//! hybrid model is a list of layer kinds, not a new code path. The Megatron-Core
//! names of a block are fixed by the layer kind (`specs/megatron-bridge-mapping.md`
//! §3); the Hugging Face names are the family's ([`HfName`]).
//!
//! | block | HF (family's names) | Megatron-Core (per layer) | transform |
//! |---|---|---|---|
//! | attention | norm | `self_attention.linear_qkv.layer_norm_weight` (or `input_layernorm.weight`) | copy |
//! | | q, k, v (`.weight`, `.bias`) | `self_attention.linear_qkv.{weight,bias}` | QKV interleave |
//! | | o | `self_attention.linear_proj.weight` | copy |
//! | | q norm, k norm | `self_attention.{q,k}_layernorm.weight` | copy |
//! | gated MLP | norm | `mlp.linear_fc1.layer_norm_weight` (or `pre_mlp_layernorm.weight`) | copy |
//! | | gate, up | `mlp.linear_fc1.weight` (`[gate; up]`, one chunk each) | concat |
//! | | down | `mlp.linear_fc2.weight` | copy |

use super::rules::{HfTensor, McKey, Rule, Transform};

/// A Hugging Face tensor name relative to the layer prefix, without the
/// `.weight`/`.bias` suffix, and its position in the layer's state-dict order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HfName(pub &'static str, pub u64);

/// Where one decoder layer's tensors are, on both sides.
#[derive(Debug, Clone)]
pub struct LayerAt {
    /// The layer index.
    pub layer: u64,
    /// Layers in the model.
    pub layers: u64,
    /// The HF prefix (`model.layers.3.`).
    pub hf_prefix: String,
    /// The layer's position in the state-dict order.
    pub order: u64,
    /// Megatron keys are stacked on a leading layer axis (a homogeneous
    /// `TransformerBlock`); otherwise one key per layer.
    pub stacked: bool,
}

impl LayerAt {
    /// The HF tensor `name` + `suffix` of this layer.
    pub fn hf(&self, name: HfName, suffix: &str, shape: Vec<u64>) -> HfTensor {
        HfTensor {
            name: format!("{}{}{suffix}", self.hf_prefix, name.0),
            shape,
            order: (self.order, name.1),
        }
    }

    /// The Megatron keys of the layer tensor spelled `names` (preferred first):
    /// the layout the model is saved in first, then the other, then the other
    /// spellings.
    pub fn mc(&self, names: &[&str]) -> Vec<McKey> {
        let stacked = |n: &str| McKey {
            name: format!("decoder.layers.{n}"),
            prefix: vec![self.layer],
            prefix_dims: vec![self.layers],
        };
        let per_layer = |n: &str| McKey::plain(format!("decoder.layers.{}.{n}", self.layer));
        let mut keys = Vec::with_capacity(2 * names.len());
        for n in names {
            if self.stacked {
                keys.push(stacked(n));
                keys.push(per_layer(n));
            } else {
                keys.push(per_layer(n));
                keys.push(stacked(n));
            }
        }
        keys
    }
}

/// A rule from one HF tensor to one Megatron tensor of the same shape.
pub fn copy(hf: HfTensor, mc: Vec<McKey>) -> Rule {
    Rule {
        shape: hf.shape.clone(),
        hf: vec![hf],
        mc,
        transform: Transform::Copy,
        or: Vec::new(),
    }
}

/// The HF names of an attention block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionNames {
    /// The norm before attention.
    pub norm: HfName,
    /// Query projection.
    pub q: HfName,
    /// Key projection.
    pub k: HfName,
    /// Value projection.
    pub v: HfName,
    /// Output projection.
    pub o: HfName,
    /// Per-head query norm.
    pub q_norm: HfName,
    /// Per-head key norm.
    pub k_norm: HfName,
}

/// Self-attention with grouped queries (and the norm before it, which
/// Megatron-Core fuses into `linear_qkv`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attention {
    /// Hidden size.
    pub hidden: u64,
    /// Query heads.
    pub heads: u64,
    /// Key/value heads (query groups).
    pub groups: u64,
    /// Per-head size.
    pub head_dim: u64,
    /// Biases on q, k and v.
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k.
    pub qk_norm: bool,
    /// HF names.
    pub names: AttentionNames,
}

impl Attention {
    /// Rows of the fused `linear_qkv`: (heads + 2 · groups) · head_dim.
    pub fn qkv_rows(&self) -> u64 {
        (self.heads + 2 * self.groups) * self.head_dim
    }

    fn qkv(&self) -> Transform {
        Transform::Qkv {
            heads_per_group: self.heads / self.groups,
            groups: self.groups,
            head_dim: self.head_dim,
        }
    }

    /// The rules of layer `at`.
    pub fn rules(&self, at: &LayerAt) -> Vec<Rule> {
        let (h, d, n) = (self.hidden, self.head_dim, &self.names);
        let (q, kv) = (self.heads * d, self.groups * d);
        let mut out = vec![copy(
            at.hf(n.norm, ".weight", vec![h]),
            at.mc(&[
                "self_attention.linear_qkv.layer_norm_weight",
                "input_layernorm.weight",
            ]),
        )];
        out.push(Rule {
            hf: vec![
                at.hf(n.q, ".weight", vec![q, h]),
                at.hf(n.k, ".weight", vec![kv, h]),
                at.hf(n.v, ".weight", vec![kv, h]),
            ],
            mc: at.mc(&["self_attention.linear_qkv.weight"]),
            shape: vec![self.qkv_rows(), h],
            transform: self.qkv(),
            or: Vec::new(),
        });
        if self.qkv_bias {
            let bias = |x: HfName, rows| at.hf(HfName(x.0, x.1 + 1), ".bias", vec![rows]);
            out.push(Rule {
                hf: vec![bias(n.q, q), bias(n.k, kv), bias(n.v, kv)],
                mc: at.mc(&["self_attention.linear_qkv.bias"]),
                shape: vec![self.qkv_rows()],
                transform: self.qkv(),
                or: Vec::new(),
            });
        }
        out.push(copy(
            at.hf(n.o, ".weight", vec![h, q]),
            at.mc(&["self_attention.linear_proj.weight"]),
        ));
        if self.qk_norm {
            out.push(copy(
                at.hf(n.q_norm, ".weight", vec![d]),
                at.mc(&["self_attention.q_layernorm.weight"]),
            ));
            out.push(copy(
                at.hf(n.k_norm, ".weight", vec![d]),
                at.mc(&["self_attention.k_layernorm.weight"]),
            ));
        }
        out
    }

    /// Modules of the block with an `_extra_state` item in a TransformerEngine
    /// layer (Megatron-Core's default load strictness requires them).
    pub const EXTRA_STATE: &'static [&'static str] = &[
        "self_attention.linear_qkv",
        "self_attention.linear_proj",
        "self_attention.core_attention",
    ];
}

/// The HF names of a dense MLP block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpNames {
    /// The norm before the MLP.
    pub norm: HfName,
    /// Gate projection (gated MLPs only).
    pub gate: HfName,
    /// Up projection.
    pub up: HfName,
    /// Down projection.
    pub down: HfName,
}

/// A dense MLP: SwiGLU (`[gate; up]` in `linear_fc1`) or a plain one
/// (`up` alone, with another activation), and the norm before it, which
/// Megatron-Core fuses into `linear_fc1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mlp {
    /// Hidden size.
    pub hidden: u64,
    /// Intermediate size.
    pub ffn: u64,
    /// Gated (gate and up projections).
    pub gated: bool,
    /// HF names.
    pub names: MlpNames,
}

impl Mlp {
    /// The rules of layer `at`.
    pub fn rules(&self, at: &LayerAt) -> Vec<Rule> {
        let (h, f, n) = (self.hidden, self.ffn, &self.names);
        let mut out = vec![copy(
            at.hf(n.norm, ".weight", vec![h]),
            at.mc(&[
                "mlp.linear_fc1.layer_norm_weight",
                "pre_mlp_layernorm.weight",
            ]),
        )];
        if self.gated {
            out.push(Rule {
                hf: vec![
                    at.hf(n.gate, ".weight", vec![f, h]),
                    at.hf(n.up, ".weight", vec![f, h]),
                ],
                mc: at.mc(&["mlp.linear_fc1.weight"]),
                shape: vec![2 * f, h],
                transform: Transform::Concat,
                or: self.split_fc1(at),
            });
        } else {
            out.push(copy(
                at.hf(n.up, ".weight", vec![f, h]),
                at.mc(&["mlp.linear_fc1.weight"]),
            ));
        }
        out.push(copy(
            at.hf(n.down, ".weight", vec![h, f]),
            at.mc(&["mlp.linear_fc2.weight"]),
        ));
        out
    }

    /// The other way Megatron-Core saves a SwiGLU `linear_fc1`: its halves under
    /// keys of their own (`weight_w`, `weight_v`), with singleton local shards.
    fn split_fc1(&self, at: &LayerAt) -> Vec<Rule> {
        let (h, f, n) = (self.hidden, self.ffn, &self.names);
        vec![
            copy(
                at.hf(n.gate, ".weight", vec![f, h]),
                at.mc(&["mlp.linear_fc1.weight_w"]),
            ),
            copy(
                at.hf(n.up, ".weight", vec![f, h]),
                at.mc(&["mlp.linear_fc1.weight_v"]),
            ),
        ]
    }

    /// Modules with an `_extra_state` item in a TransformerEngine layer.
    pub const EXTRA_STATE: &'static [&'static str] = &["mlp.linear_fc1", "mlp.linear_fc2"];
}
