//! Mixtral (`MixtralForCausalLM`): Mistral's attention and a mixture of SwiGLU
//! experts (`w1` gate, `w3` up, `w2` down) in every layer, routed by a softmax
//! over all experts whose top-k weights are renormalised, which Megatron-Core's
//! router computes as a softmax after the top-k.
//!
//! Megatron-Bridge has no Mixtral bridge; the names follow its Qwen3-MoE mapping
//! (`docs/mapping.md#mixtral`), and the interop suite proves them
//! by the logits of megatron-core's MoE model against transformers'.

use super::Model;
use super::blocks::{HfName, MoeNames};
use super::config::{Config, ModelError};
use super::gpt::{self, DenseConfig, MoeOptions};
use super::registry::{ExpertParam, Family};

/// The Mixtral family.
pub struct Mixtral;

/// Transformers' names of the sparse block (one tensor per expert on disk).
const NAMES: MoeNames = MoeNames {
    norm: HfName("post_attention_layernorm", 21),
    router: HfName("block_sparse_moe.gate", 10),
    router_bias: HfName("block_sparse_moe.gate.e_score_correction_bias", 10),
    experts: "block_sparse_moe.experts.",
    gate: "w1",
    up: "w3",
    down: "w2",
    experts_order: 11,
    shared_gate: HfName("block_sparse_moe.shared_expert.w1", 9),
    shared_up: HfName("block_sparse_moe.shared_expert.w3", 9),
    shared_down: HfName("block_sparse_moe.shared_expert.w2", 9),
    fc1_latent: HfName("block_sparse_moe.fc1_latent_proj", 9),
    fc2_latent: HfName("block_sparse_moe.fc2_latent_proj", 9),
};

/// Megatron-Bridge's Mistral provider, which Mixtral's attention matches.
const PROVIDER: &str = "megatron.bridge.models.mistral.mistral_provider.MistralModelProvider";

impl Family for Mixtral {
    fn name(&self) -> &'static str {
        "mixtral"
    }

    fn architectures(&self) -> &'static [&'static str] {
        &["MixtralForCausalLM"]
    }

    fn model(&self, c: &Config<'_>) -> Result<Model, ModelError> {
        let d = DenseConfig::read(c)?;
        let o = gpt::Options {
            sliding_window: c.get("sliding_window").and_then(|v| v.as_u64()),
            // Mixtral always renormalises the top-k weights.
            moe: Some(MoeOptions::read(
                c,
                d.hidden,
                NAMES,
                "intermediate_size",
                true,
            )?),
            ..gpt::Options::default()
        };
        Ok(gpt::model(c, self.name(), PROVIDER, &d, &o))
    }

    fn hf_module_renames(&self) -> &'static [(&'static str, &'static str)] {
        &[(".mlp.", ".block_sparse_moe.")]
    }

    fn hf_expert_params(&self) -> &'static [ExpertParam] {
        &[
            ExpertParam {
                name: "gate_up_proj",
                parts: &["w1", "w3"],
            },
            ExpertParam {
                name: "down_proj",
                parts: &["w2"],
            },
        ]
    }
}
