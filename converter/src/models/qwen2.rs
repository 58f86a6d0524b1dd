//! Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`): the dense decoder with biases on q, k
//! and v, interleaved into `linear_qkv.bias` like the weights.

use super::gpt::{DenseConfig, DenseGpt};
use crate::preflight::PreflightError;

/// Architectures this family maps.
pub const ARCHITECTURES: &[&str] = &["Qwen2ForCausalLM"];

/// Megatron-Bridge's provider for Qwen2.
pub const PROVIDER: &str = "megatron.bridge.models.qwen.qwen_provider.Qwen2ModelProvider";

/// Builds the mapping from `config.json`.
///
/// # Errors
/// [`PreflightError::Unsupported`] for options the dense mapping cannot carry.
pub fn mapping(cfg: &serde_json::Value) -> Result<DenseGpt, PreflightError> {
    let mut c = DenseConfig::parse(cfg, PROVIDER)?;
    c.qkv_bias = true;
    Ok(DenseGpt { cfg: c })
}
