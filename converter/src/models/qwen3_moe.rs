//! Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3's attention (QK norm, no biases) and
//! a mixture of SwiGLU experts in every layer, routed by a softmax router; the
//! norm before the experts is Megatron-Core's separate `pre_mlp_layernorm`.

use super::Model;
use super::blocks::{HfName, MoeNames};
use super::config::{Config, ModelError};
use super::gpt::{self, DenseConfig, MoeOptions};
use super::registry::{ExpertParam, Family};

/// The Qwen3-MoE family.
pub struct Qwen3Moe;

/// Transformers' names of the sparse block (one tensor per expert on disk).
const NAMES: MoeNames = MoeNames {
    norm: HfName("post_attention_layernorm", 21),
    router: HfName("mlp.gate", 10),
    router_bias: HfName("mlp.gate.e_score_correction_bias", 10),
    experts: "mlp.experts.",
    gate: "gate_proj",
    up: "up_proj",
    down: "down_proj",
    experts_order: 11,
    shared_gate: HfName("mlp.shared_expert.gate_proj", 9),
    shared_up: HfName("mlp.shared_expert.up_proj", 9),
    shared_down: HfName("mlp.shared_expert.down_proj", 9),
    fc1_latent: HfName("mlp.fc1_latent_proj", 9),
    fc2_latent: HfName("mlp.fc2_latent_proj", 9),
};

impl Family for Qwen3Moe {
    fn name(&self) -> &'static str {
        "qwen3_moe"
    }

    fn architectures(&self) -> &'static [&'static str] {
        &["Qwen3MoeForCausalLM"]
    }

    /// Refuses dense layers among the MoE ones (`mlp_only_layers`,
    /// `decoder_sparse_step` > 1): Megatron-Bridge's mapping assumes every layer
    /// is MoE.
    fn model(&self, c: &Config<'_>) -> Result<Model, ModelError> {
        let d = DenseConfig::read(c)?;
        if gpt::attention_bias(c) {
            return Err(c.unsupported("attention_bias=true", None));
        }
        let step = c.count_or("decoder_sparse_step", 1)?;
        if step != 1 {
            return Err(c.unsupported(
                format!("decoder_sparse_step={step}"),
                Some("dense layers between the MoE ones; Megatron-Bridge maps every layer as MoE"),
            ));
        }
        if c.get("mlp_only_layers")
            .and_then(|v| v.as_array())
            .is_some_and(|a| !a.is_empty())
        {
            return Err(c.unsupported(
                "mlp_only_layers",
                Some("dense layers between the MoE ones; Megatron-Bridge maps every layer as MoE"),
            ));
        }
        let o = gpt::Options {
            qk_norm: true,
            moe: Some(MoeOptions::read(
                c,
                d.hidden,
                NAMES,
                "moe_intermediate_size",
                false,
            )?),
            ..gpt::Options::default()
        };
        Ok(gpt::model(c, self.name(), gpt::PROVIDER, &d, &o))
    }

    fn hf_expert_params(&self) -> &'static [ExpertParam] {
        &[
            ExpertParam {
                name: "gate_up_proj",
                parts: &["gate_proj", "up_proj"],
            },
            ExpertParam {
                name: "down_proj",
                parts: &["down_proj"],
            },
        ]
    }
}
