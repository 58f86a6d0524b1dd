//! Llama (`LlamaForCausalLM`: Llama 2, 3, 3.1 with `llama3` rope scaling, 3.2 with
//! tied embeddings): the dense decoder without biases.

use super::gpt::{DenseConfig, DenseGpt};
use crate::preflight::PreflightError;
use crate::run_config::Yaml;

/// Architectures this family maps.
pub const ARCHITECTURES: &[&str] = &["LlamaForCausalLM"];

/// Megatron-Bridge's provider (since v0.4 the generic GPT provider; the
/// family-specific Llama providers are gone).
pub const PROVIDER: &str = "megatron.bridge.models.gpt_provider.GPTModelProvider";

/// Builds the mapping from `config.json`.
///
/// # Errors
/// [`PreflightError::Unsupported`] for options Megatron-Bridge's Llama mapping does
/// not carry (`attention_bias=true`: its registry has no bias mappings).
pub fn mapping(cfg: &serde_json::Value) -> Result<DenseGpt, PreflightError> {
    let mut c = DenseConfig::parse(cfg, PROVIDER, ARCHITECTURES[0])?;
    // Megatron-Bridge's Llama bridge turns on the fused kernels (runtime only).
    for k in [
        "apply_rope_fusion",
        "bias_activation_fusion",
        "bias_dropout_fusion",
        "masked_softmax_fusion",
        "persist_layer_norm",
    ] {
        c.provider_extras.push((k, Yaml::Bool(true)));
    }
    if DenseConfig::attention_bias(cfg) {
        return Err(PreflightError::Unsupported(format!(
            "config.json: {} with attention_bias=true is not supported (Megatron-Bridge's Llama mapping has no bias tensors)",
            c.architecture
        )));
    }
    Ok(DenseGpt { cfg: c })
}
