//! Mistral (`MistralForCausalLM`): Llama's tensors; the configuration may carry a
//! sliding attention window, recorded for Megatron as `window_size`.

use super::gpt::{DenseConfig, DenseGpt};
use crate::preflight::PreflightError;

/// Architectures this family maps.
pub const ARCHITECTURES: &[&str] = &["MistralForCausalLM"];

/// Megatron-Bridge's provider for Mistral.
pub const PROVIDER: &str = "megatron.bridge.models.mistral.mistral_provider.MistralModelProvider";

/// Builds the mapping from `config.json`.
///
/// # Errors
/// [`PreflightError::Unsupported`] for options the dense mapping cannot carry.
pub fn mapping(cfg: &serde_json::Value) -> Result<DenseGpt, PreflightError> {
    let mut c = DenseConfig::parse(cfg, PROVIDER, ARCHITECTURES[0])?;
    c.sliding_window = cfg.get("sliding_window").and_then(|v| v.as_u64());
    Ok(DenseGpt { cfg: c })
}
