//! Qwen3 (`Qwen3ForCausalLM`): the dense decoder with a per-head RMSNorm on q and
//! k (`q_layernorm`/`k_layernorm`), no biases.

use super::Model;
use super::config::{Config, ModelError};
use super::gpt::{self, DenseConfig};
use super::registry::Family;

/// The Qwen3 family.
pub struct Qwen3;

impl Family for Qwen3 {
    fn name(&self) -> &'static str {
        "qwen3"
    }

    fn architectures(&self) -> &'static [&'static str] {
        &["Qwen3ForCausalLM"]
    }

    /// Refuses `attention_bias=true`.
    fn model(&self, c: &Config<'_>) -> Result<Model, ModelError> {
        let d = DenseConfig::read(c)?;
        if gpt::attention_bias(c) {
            return Err(c.unsupported("attention_bias=true", None));
        }
        let o = gpt::Options {
            qk_norm: true,
            ..gpt::Options::default()
        };
        Ok(gpt::model(c, self.name(), gpt::PROVIDER, &d, &o))
    }
}
