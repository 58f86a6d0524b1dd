//! Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`): the dense decoder with biases on q, k
//! and v, interleaved into `linear_qkv.bias` like the weights.

use super::gpt::{DenseConfig, DenseGpt};
use crate::preflight::PreflightError;
use crate::run_config::Yaml;

/// Architectures this family maps.
pub const ARCHITECTURES: &[&str] = &["Qwen2ForCausalLM"];

/// Megatron-Bridge's provider (the generic GPT provider since v0.4).
pub const PROVIDER: &str = "megatron.bridge.models.gpt_provider.GPTModelProvider";

/// Builds the mapping from `config.json`.
///
/// # Errors
/// [`PreflightError::Unsupported`] for options the dense mapping cannot carry.
pub fn mapping(cfg: &serde_json::Value) -> Result<DenseGpt, PreflightError> {
    let mut c = DenseConfig::parse(cfg, PROVIDER, ARCHITECTURES[0])?;
    c.qkv_bias = true;
    c.provider_extras
        .push(("autocast_dtype", Yaml::object("torch.bfloat16")));
    Ok(DenseGpt { cfg: c })
}
