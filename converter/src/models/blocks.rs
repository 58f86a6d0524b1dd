//! Layer kinds as reusable rule sets: a decoder layer is a list of blocks, so a
//! hybrid model is a list of layer kinds, not a new code path. The Megatron-Core
//! names of a block are fixed by the layer kind (`docs/mapping.md#layer-kinds`); the
//! Hugging Face names are the family's ([`HfName`]).
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
    /// The Megatron prefix of the layer stack (`decoder.layers.`; a
    /// multi-token-prediction depth's `mtp.layers.0.mtp_model_layer.layers.`).
    pub root: String,
}

impl LayerAt {
    /// The HF tensor `name` + `suffix` of this layer.
    pub fn hf(&self, name: HfName, suffix: &str, shape: Vec<u64>) -> HfTensor {
        self.hf_at(name.0, name.1, suffix, shape)
    }

    /// The HF tensor `name` + `suffix` of this layer, at `order` in the layer.
    pub fn hf_at(&self, name: &str, order: u64, suffix: &str, shape: Vec<u64>) -> HfTensor {
        HfTensor {
            name: format!("{}{name}{suffix}", self.hf_prefix),
            shape,
            order: (self.order, order),
        }
    }

    /// The Megatron keys of expert `e`'s `module` (`linear_fc1`) of this layer:
    /// the expert axis Megatron-Core saves (`mlp.experts.experts.linear_fc1.weight`
    /// with (layer,) expert leading axes) first, then the per-expert keys of
    /// singleton local shards (`experts.experts.{e}.linear_fc1.weight`), the
    /// grouped-GEMM (`experts.linear_fc1.weight{e}`) and sequential
    /// (`experts.local_experts.{e}.linear_fc1.weight`) layouts.
    pub fn expert_mc(&self, module: &str, e: u64, experts: u64) -> Vec<McKey> {
        let (l, n) = (self.layer, self.layers);
        let axis = format!("mlp.experts.experts.{module}.weight");
        let stacked = McKey {
            name: format!("{}{axis}", self.root),
            prefix: vec![l, e],
            prefix_dims: vec![n, experts],
        };
        let per_layer = McKey {
            name: format!("{}{l}.{axis}", self.root),
            prefix: vec![e],
            prefix_dims: vec![experts],
        };
        let mut keys = if self.stacked {
            vec![stacked, per_layer]
        } else {
            vec![per_layer, stacked]
        };
        keys.extend(self.expert_singleton_mc(module, e, ""));
        for name in [
            format!("mlp.experts.{module}.weight{e}"),
            format!("mlp.experts.local_experts.{e}.{module}.weight"),
        ] {
            keys.push(McKey::plain(format!("{}{l}.{name}", self.root)));
            keys.push(McKey {
                name: format!("{}{name}", self.root),
                prefix: vec![l],
                prefix_dims: vec![n],
            });
        }
        keys
    }

    /// Expert `e`'s `module` saved with singleton local shards, one key per
    /// expert: `mlp.experts.experts.{e}.linear_fc1.weight{suffix}`, where a gated
    /// `linear_fc1` is saved as its halves (`suffix` `_w` gate, `_v` up).
    pub fn expert_singleton_mc(&self, module: &str, e: u64, suffix: &str) -> Vec<McKey> {
        let name = format!("mlp.experts.experts.{e}.{module}.weight{suffix}");
        let per_layer = McKey::plain(format!("{}{}.{name}", self.root, self.layer));
        let stacked = McKey {
            name: format!("{}{name}", self.root),
            prefix: vec![self.layer],
            prefix_dims: vec![self.layers],
        };
        vec![per_layer, stacked]
    }

    /// The Megatron keys of the layer tensor spelled `names` (preferred first):
    /// the layout the model is saved in first, then the other, then the other
    /// spellings.
    pub fn mc(&self, names: &[&str]) -> Vec<McKey> {
        let stacked = |n: &str| McKey {
            name: format!("{}{n}", self.root),
            prefix: vec![self.layer],
            prefix_dims: vec![self.layers],
        };
        let per_layer = |n: &str| McKey::plain(format!("{}{}.{n}", self.root, self.layer));
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

/// The HF names of a mixture-of-experts block. Expert `e`'s projections are
/// `{experts}{e}.{gate|up|down}.weight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeNames {
    /// The norm before the block.
    pub norm: HfName,
    /// The router (`.weight`).
    pub router: HfName,
    /// The router's expert-score correction bias (a parameter, no suffix).
    pub router_bias: HfName,
    /// The experts' prefix (`mlp.experts.`).
    pub experts: &'static str,
    /// An expert's gate projection (gated experts).
    pub gate: &'static str,
    /// An expert's up projection.
    pub up: &'static str,
    /// An expert's down projection.
    pub down: &'static str,
    /// Where the experts start in the layer's state-dict order (three per expert).
    pub experts_order: u64,
    /// The shared expert's gate projection (gated shared experts).
    pub shared_gate: HfName,
    /// The shared expert's up projection.
    pub shared_up: HfName,
    /// The shared expert's down projection.
    pub shared_down: HfName,
    /// The projection into the experts' latent space.
    pub fc1_latent: HfName,
    /// The projection out of it.
    pub fc2_latent: HfName,
}

/// A mixture of experts: a router (with an optional score-correction bias),
/// routed experts (SwiGLU or plain), an optional shared expert and optional
/// latent projections, and the norm before it, which Megatron-Core keeps
/// separate (`pre_mlp_layernorm`): an MoE block has no fused `linear_fc1`.
///
/// | HF | Megatron-Core (per layer; experts on an expert axis) | transform |
/// |---|---|---|
/// | norm | `pre_mlp_layernorm.weight` | copy |
/// | router | `mlp.router.weight` | copy |
/// | router bias | `mlp.router.expert_bias` | copy (float32 kept) |
/// | expert e gate, up | `mlp.experts.experts.linear_fc1.weight[e]` (`[gate; up]`) | concat |
/// | expert e down | `mlp.experts.experts.linear_fc2.weight[e]` | copy |
/// | shared expert | `mlp.shared_experts.linear_fc{1,2}.weight` | as a dense MLP |
/// | latent projections | `mlp.fc{1,2}_latent_proj.weight` | copy |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moe {
    /// Hidden size.
    pub hidden: u64,
    /// Routed experts.
    pub experts: u64,
    /// An expert's intermediate size.
    pub ffn: u64,
    /// Experts are gated (SwiGLU); otherwise `up` alone with another activation.
    pub gated: bool,
    /// The router has a score-correction bias.
    pub router_bias: bool,
    /// The shared expert's intermediate size, when there is one.
    pub shared_ffn: Option<u64>,
    /// The experts' latent size, when they work in a projected space.
    pub latent: Option<u64>,
    /// HF names.
    pub names: MoeNames,
}

impl Moe {
    /// The width the experts read and write: the latent size, else the hidden size.
    pub fn expert_width(&self) -> u64 {
        self.latent.unwrap_or(self.hidden)
    }

    /// The rules of layer `at`.
    pub fn rules(&self, at: &LayerAt) -> Vec<Rule> {
        let (h, f, n, w) = (self.hidden, self.ffn, &self.names, self.expert_width());
        let mut out = vec![
            copy(
                at.hf(n.norm, ".weight", vec![h]),
                at.mc(&["pre_mlp_layernorm.weight"]),
            ),
            copy(
                at.hf(n.router, ".weight", vec![self.experts, h]),
                at.mc(&["mlp.router.weight"]),
            ),
        ];
        if self.router_bias {
            out.push(copy(
                at.hf(n.router_bias, "", vec![self.experts]),
                at.mc(&["mlp.router.expert_bias"]),
            ));
        }
        if let Some(l) = self.latent {
            out.push(copy(
                at.hf(n.fc1_latent, ".weight", vec![l, h]),
                at.mc(&["mlp.fc1_latent_proj.weight"]),
            ));
            out.push(copy(
                at.hf(n.fc2_latent, ".weight", vec![h, l]),
                at.mc(&["mlp.fc2_latent_proj.weight"]),
            ));
        }
        for e in 0..self.experts {
            let expert = |proj: &str, k: u64, shape: Vec<u64>| {
                at.hf_at(
                    &format!("{}{e}.{proj}", n.experts),
                    n.experts_order + 3 * e + k,
                    ".weight",
                    shape,
                )
            };
            let fc1 = at.expert_mc("linear_fc1", e, self.experts);
            if self.gated {
                out.push(Rule {
                    hf: vec![expert(n.gate, 0, vec![f, w]), expert(n.up, 1, vec![f, w])],
                    mc: fc1,
                    shape: vec![2 * f, w],
                    transform: Transform::Concat,
                    // Singleton local shards save the halves under keys of their own.
                    or: vec![
                        copy(
                            expert(n.gate, 0, vec![f, w]),
                            at.expert_singleton_mc("linear_fc1", e, "_w"),
                        ),
                        copy(
                            expert(n.up, 1, vec![f, w]),
                            at.expert_singleton_mc("linear_fc1", e, "_v"),
                        ),
                    ],
                });
            } else {
                out.push(copy(expert(n.up, 1, vec![f, w]), fc1));
            }
            out.push(copy(
                expert(n.down, 2, vec![w, f]),
                at.expert_mc("linear_fc2", e, self.experts),
            ));
        }
        if let Some(s) = self.shared_ffn {
            if self.gated {
                out.push(Rule {
                    hf: vec![
                        at.hf(n.shared_gate, ".weight", vec![s, h]),
                        at.hf(n.shared_up, ".weight", vec![s, h]),
                    ],
                    mc: at.mc(&["mlp.shared_experts.linear_fc1.weight"]),
                    shape: vec![2 * s, h],
                    transform: Transform::Concat,
                    or: Vec::new(),
                });
            } else {
                out.push(copy(
                    at.hf(n.shared_up, ".weight", vec![s, h]),
                    at.mc(&["mlp.shared_experts.linear_fc1.weight"]),
                ));
            }
            out.push(copy(
                at.hf(n.shared_down, ".weight", vec![h, s]),
                at.mc(&["mlp.shared_experts.linear_fc2.weight"]),
            ));
        }
        out
    }

    /// Modules with an `_extra_state` item, and whether they have one per expert.
    pub fn extra_state(&self) -> Vec<(&'static str, bool)> {
        let mut out = vec![
            ("mlp.experts.experts.linear_fc1", true),
            ("mlp.experts.experts.linear_fc2", true),
        ];
        if self.shared_ffn.is_some() {
            out.push(("mlp.shared_experts.linear_fc1", false));
            out.push(("mlp.shared_experts.linear_fc2", false));
        }
        out
    }
}

/// The HF names of a Mamba-2 block: the layer's norm, and the mixer's prefix
/// (`mixer.`), under which the parameters have Mamba-2's own names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MambaNames {
    /// The norm before the mixer.
    pub norm: HfName,
    /// The mixer's prefix.
    pub mixer: &'static str,
}

/// A Mamba-2 mixer (`docs/mapping.md#mamba-2`) and the norm before
/// it, which Megatron-Core fuses into `in_proj`. Megatron-Core saves the fused
/// projections per component so their layout does not depend on TP: `in_proj` as
/// `in_proj.weight.{z,x,B,C,dt}`, the convolution as `conv1d.{weight,bias}.{x,B,C}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mamba {
    /// Hidden size.
    pub hidden: u64,
    /// Heads.
    pub heads: u64,
    /// Head size.
    pub head_dim: u64,
    /// Groups of B and C.
    pub groups: u64,
    /// State size.
    pub state: u64,
    /// Convolution width.
    pub conv_kernel: u64,
    /// HF names.
    pub names: MambaNames,
}

impl Mamba {
    /// `heads · head_dim`.
    pub fn d_inner(&self) -> u64 {
        self.heads * self.head_dim
    }

    /// `groups · state`: the rows of B (and of C).
    pub fn d_bc(&self) -> u64 {
        self.groups * self.state
    }

    /// The components of `in_proj`, in order, with their rows.
    pub fn in_proj_parts(&self) -> [(&'static str, u64); 5] {
        let (di, bc) = (self.d_inner(), self.d_bc());
        [
            ("z", di),
            ("x", di),
            ("B", bc),
            ("C", bc),
            ("dt", self.heads),
        ]
    }

    /// The components of the convolution, in order, with their channels.
    pub fn conv_parts(&self) -> [(&'static str, u64); 3] {
        let (di, bc) = (self.d_inner(), self.d_bc());
        [("x", di), ("B", bc), ("C", bc)]
    }

    /// The rules of layer `at`.
    pub fn rules(&self, at: &LayerAt) -> Vec<Rule> {
        let (h, di, nh) = (self.hidden, self.d_inner(), self.heads);
        let m = self.names.mixer;
        let tensor = |s: &str, k: u64, suffix: &str, shape: Vec<u64>| {
            at.hf_at(&format!("{m}{s}"), k, suffix, shape)
        };
        let mut out = vec![copy(
            at.hf(self.names.norm, ".weight", vec![h]),
            at.mc(&["mixer.in_proj.layer_norm_weight", "norm.weight"]),
        )];
        // One HF tensor, one Megatron key per component.
        let split = |out: &mut Vec<Rule>, hf: HfTensor, key: &str, parts: &[(&str, u64)]| {
            let mut start = 0;
            for (c, rows) in parts {
                let mut shape = hf.shape.clone();
                shape[0] = *rows;
                out.push(Rule {
                    hf: vec![hf.clone()],
                    mc: at.mc(&[&format!("{key}.{c}")]),
                    shape,
                    transform: Transform::Rows { start },
                    or: Vec::new(),
                });
                start += rows;
            }
        };
        let in_rows: u64 = self.in_proj_parts().iter().map(|p| p.1).sum();
        split(
            &mut out,
            tensor("in_proj", 1, ".weight", vec![in_rows, h]),
            "mixer.in_proj.weight",
            &self.in_proj_parts(),
        );
        let conv: u64 = self.conv_parts().iter().map(|p| p.1).sum();
        split(
            &mut out,
            tensor("conv1d", 2, ".weight", vec![conv, 1, self.conv_kernel]),
            "mixer.conv1d.weight",
            &self.conv_parts(),
        );
        split(
            &mut out,
            tensor("conv1d", 3, ".bias", vec![conv]),
            "mixer.conv1d.bias",
            &self.conv_parts(),
        );
        for (p, k) in [("dt_bias", 4), ("A_log", 5), ("D", 7)] {
            out.push(copy(
                tensor(p, k, "", vec![nh]),
                at.mc(&[&format!("mixer.{p}")]),
            ));
        }
        out.push(copy(
            tensor("norm", 6, ".weight", vec![di]),
            at.mc(&["mixer.norm.weight"]),
        ));
        out.push(copy(
            tensor("out_proj", 8, ".weight", vec![h, di]),
            at.mc(&["mixer.out_proj.weight"]),
        ));
        out
    }

    /// Modules with an `_extra_state` item in a TransformerEngine layer.
    pub const EXTRA_STATE: &'static [&'static str] = &["mixer.in_proj", "mixer.out_proj"];
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: MoeNames = MoeNames {
        norm: HfName("post_attention_layernorm", 0),
        router: HfName("mlp.gate", 1),
        router_bias: HfName("mlp.gate.e_score_correction_bias", 2),
        experts: "mlp.experts.",
        gate: "gate_proj",
        up: "up_proj",
        down: "down_proj",
        experts_order: 3,
        shared_gate: HfName("mlp.shared_expert.gate_proj", 9),
        shared_up: HfName("mlp.shared_expert.up_proj", 9),
        shared_down: HfName("mlp.shared_expert.down_proj", 9),
        fc1_latent: HfName("mlp.fc1_latent_proj", 9),
        fc2_latent: HfName("mlp.fc2_latent_proj", 9),
    };

    fn keys(r: &Rule) -> Vec<&str> {
        r.mc.iter().map(|k| k.name.as_str()).collect()
    }

    /// Megatron-Core saves with singleton local shards (`experts.experts.{e}.…`,
    /// a gated `linear_fc1` as `weight_w`/`weight_v`) when its metadata asks for
    /// it; the export reads that layout too.
    #[test]
    fn experts_saved_as_singleton_local_shards() {
        let at = LayerAt {
            layer: 1,
            layers: 2,
            hf_prefix: "model.layers.1.".into(),
            order: 1,
            stacked: true,
            root: "decoder.layers.".into(),
        };
        let moe = Moe {
            hidden: 8,
            experts: 4,
            ffn: 2,
            gated: true,
            router_bias: false,
            shared_ffn: None,
            latent: None,
            names: NAMES,
        };
        let rules = moe.rules(&at);
        let fc1 = rules
            .iter()
            .find(|r| r.hf[0].name == "model.layers.1.mlp.experts.3.gate_proj.weight")
            .unwrap();
        assert_eq!(
            keys(fc1)[0],
            "decoder.layers.mlp.experts.experts.linear_fc1.weight"
        );
        let halves: Vec<(&str, &str)> = fc1
            .or
            .iter()
            .map(|r| (r.hf[0].name.as_str(), r.mc[0].name.as_str()))
            .collect();
        assert_eq!(
            halves,
            vec![
                (
                    "model.layers.1.mlp.experts.3.gate_proj.weight",
                    "decoder.layers.1.mlp.experts.experts.3.linear_fc1.weight_w"
                ),
                (
                    "model.layers.1.mlp.experts.3.up_proj.weight",
                    "decoder.layers.1.mlp.experts.experts.3.linear_fc1.weight_v"
                ),
            ]
        );
        assert!(fc1.or.iter().all(|r| r.shape == vec![2, 8]));
        let fc2 = rules
            .iter()
            .find(|r| r.hf[0].name == "model.layers.1.mlp.experts.3.down_proj.weight")
            .unwrap();
        assert!(keys(fc2).contains(&"decoder.layers.1.mlp.experts.experts.3.linear_fc2.weight"));
        // A plain (squared-ReLU) expert keeps its linear_fc1 whole.
        let plain = Moe {
            gated: false,
            ..moe
        }
        .rules(&at);
        let up = plain
            .iter()
            .find(|r| r.hf[0].name == "model.layers.1.mlp.experts.3.up_proj.weight")
            .unwrap();
        assert!(keys(up).contains(&"decoder.layers.1.mlp.experts.experts.3.linear_fc1.weight"));
        assert!(up.or.is_empty());
    }
}
