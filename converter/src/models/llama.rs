//! Llama (`LlamaForCausalLM`: Llama 2, 3, 3.1 with `llama3` rope scaling, 3.2 with
//! tied embeddings): the dense decoder without biases.

use super::gpt::{DenseConfig, DenseGpt};
use crate::preflight::PreflightError;

/// Architectures this family maps.
pub const ARCHITECTURES: &[&str] = &["LlamaForCausalLM"];

/// Megatron-Bridge's provider for Llama.
pub const PROVIDER: &str = "megatron.bridge.models.llama.llama_provider.LlamaModelProvider";

/// Builds the mapping from `config.json`.
///
/// # Errors
/// [`PreflightError::Unsupported`] for options Megatron-Bridge's Llama mapping does
/// not carry (`attention_bias=true`: its registry has no bias mappings).
pub fn mapping(cfg: &serde_json::Value) -> Result<DenseGpt, PreflightError> {
    let c = DenseConfig::parse(cfg, PROVIDER)?;
    if DenseConfig::attention_bias(cfg) {
        return Err(PreflightError::Unsupported(format!(
            "config.json: {} with attention_bias=true is not supported (Megatron-Bridge's Llama mapping has no bias tensors)",
            c.architecture
        )));
    }
    Ok(DenseGpt { cfg: c })
}
