//! Llama (`LlamaForCausalLM`: Llama 2, 3, 3.1 with `llama3` rope scaling, 3.2 with
//! tied embeddings): the dense decoder without biases.

use super::Model;
use super::config::{Config, ModelError};
use super::gpt::{self, DenseConfig};
use super::registry::Family;
use crate::formats::run_config::Yaml;

/// The Llama family.
pub struct Llama;

impl Family for Llama {
    fn name(&self) -> &'static str {
        "llama"
    }

    fn architectures(&self) -> &'static [&'static str] {
        &["LlamaForCausalLM"]
    }

    /// Refuses `attention_bias=true`: Megatron-Bridge's Llama mapping has no bias
    /// tensors.
    fn model(&self, c: &Config<'_>) -> Result<Model, ModelError> {
        let d = DenseConfig::read(c)?;
        if gpt::attention_bias(c) {
            return Err(c.unsupported(
                "attention_bias=true",
                Some("Megatron-Bridge's Llama mapping has no bias tensors"),
            ));
        }
        // Megatron-Bridge's Llama bridge turns on the fused kernels (runtime only).
        let provider_extras = [
            "apply_rope_fusion",
            "bias_activation_fusion",
            "bias_dropout_fusion",
            "masked_softmax_fusion",
            "persist_layer_norm",
        ]
        .map(|k| (k, Yaml::Bool(true)))
        .to_vec();
        let o = gpt::Options {
            provider_extras,
            ..gpt::Options::default()
        };
        Ok(gpt::model(c, self.name(), gpt::PROVIDER, &d, &o))
    }
}
