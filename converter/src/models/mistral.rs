//! Mistral (`MistralForCausalLM`): Llama's tensors; the configuration may carry a
//! sliding attention window, recorded for Megatron as `window_size`.

use super::Model;
use super::config::{Config, ModelError};
use super::gpt::{self, DenseConfig};
use super::registry::Family;

/// The Mistral family.
pub struct Mistral;

/// Megatron-Bridge's provider for Mistral.
const PROVIDER: &str = "megatron.bridge.models.mistral.mistral_provider.MistralModelProvider";

impl Family for Mistral {
    fn name(&self) -> &'static str {
        "mistral"
    }

    fn architectures(&self) -> &'static [&'static str] {
        &["MistralForCausalLM"]
    }

    fn model(&self, c: &Config<'_>) -> Result<Model, ModelError> {
        let d = DenseConfig::read(c)?;
        let o = gpt::Options {
            sliding_window: c.get("sliding_window").and_then(|v| v.as_u64()),
            ..gpt::Options::default()
        };
        Ok(gpt::model(c, self.name(), PROVIDER, &d, &o))
    }
}
