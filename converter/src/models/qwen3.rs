//! Qwen3 (`Qwen3ForCausalLM`): the dense decoder with a per-head RMSNorm on q and
//! k (`q_layernorm`/`k_layernorm`), no biases.

use super::gpt::{DenseConfig, DenseGpt};
use crate::preflight::PreflightError;

/// Architectures this family maps.
pub const ARCHITECTURES: &[&str] = &["Qwen3ForCausalLM"];

/// Megatron-Bridge's provider (the generic GPT provider since v0.4).
pub const PROVIDER: &str = "megatron.bridge.models.gpt_provider.GPTModelProvider";

/// Builds the mapping from `config.json`.
///
/// # Errors
/// [`PreflightError::Unsupported`] for `attention_bias=true` and options the dense
/// mapping cannot carry.
pub fn mapping(cfg: &serde_json::Value) -> Result<DenseGpt, PreflightError> {
    let mut c = DenseConfig::parse(cfg, PROVIDER, ARCHITECTURES[0])?;
    if DenseConfig::attention_bias(cfg) {
        return Err(PreflightError::Unsupported(format!(
            "config.json: {} with attention_bias=true is not supported",
            c.architecture
        )));
    }
    c.qk_norm = true;
    Ok(DenseGpt { cfg: c })
}
