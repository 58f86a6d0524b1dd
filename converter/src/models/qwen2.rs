//! Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`): the dense decoder with biases on q, k
//! and v, interleaved into `linear_qkv.bias` like the weights.

use super::Model;
use super::config::{Config, ModelError};
use super::gpt::{self, DenseConfig};
use super::registry::Family;
use crate::formats::run_config::Yaml;

/// The Qwen2 family.
pub struct Qwen2;

impl Family for Qwen2 {
    fn name(&self) -> &'static str {
        "qwen2"
    }

    fn architectures(&self) -> &'static [&'static str] {
        &["Qwen2ForCausalLM"]
    }

    fn model(&self, c: &Config<'_>) -> Result<Model, ModelError> {
        let d = DenseConfig::read(c)?;
        let o = gpt::Options {
            qkv_bias: true,
            provider_extras: vec![("autocast_dtype", Yaml::object("torch.bfloat16"))],
            ..gpt::Options::default()
        };
        Ok(gpt::model(c, self.name(), gpt::PROVIDER, &d, &o))
    }
}
