//! The families, one line each. Preflight, the CLI's help, validation and the
//! merge steps all find a model's family here.

use std::path::Path;

use super::config::{Config, ModelError, Overrides, architecture};
use super::{Model, llama, mistral, mixtral, nemotron_h, qwen2, qwen3, qwen3_moe};

/// A model family: which architectures it claims and how it reads their
/// `config.json`.
pub trait Family: Sync {
    /// The family's name (`llama`), its `model_type`.
    fn name(&self) -> &'static str;
    /// The `architectures` it maps (`LlamaForCausalLM`).
    fn architectures(&self) -> &'static [&'static str];
    /// Reads `config.json` into the model, refusing what the family cannot
    /// convert faithfully.
    ///
    /// # Errors
    /// [`ModelError`] naming the field and value.
    fn model(&self, config: &Config<'_>) -> Result<Model, ModelError>;
    /// Where transformers 5 names a module in memory (and so in the adapters
    /// PEFT makes with it) otherwise than the checkpoint does: `(in memory,
    /// checkpoint)`, the first occurrence replaced.
    fn hf_module_renames(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }
    /// The parameters of the fused `experts` module transformers 5 builds from the
    /// checkpoint's per-expert matrices, in registration order (the order PEFT's
    /// `target_parameters` nests its wrappers in).
    fn hf_expert_params(&self) -> &'static [ExpertParam] {
        &[]
    }
}

/// A parameter of a fused `experts` module, `[experts, out, in]` in memory: per
/// expert, the checkpoint's matrices `experts.{e}.{part}.weight` stacked on rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertParam {
    /// The parameter (`gate_up_proj`).
    pub name: &'static str,
    /// The checkpoint's matrices, in row order (`gate_proj`, `up_proj`).
    pub parts: &'static [&'static str],
}

/// Every family, in the order help lists them.
pub static FAMILIES: &[&dyn Family] = &[
    &llama::Llama,
    &mistral::Mistral,
    &qwen2::Qwen2,
    &qwen3::Qwen3,
    &qwen3_moe::Qwen3Moe,
    &mixtral::Mixtral,
    &nemotron_h::NemotronH,
];

/// The family of a configuration: by `architectures[0]`, or by `model_type`
/// when there is no `architectures`.
pub fn family_of(json: &serde_json::Value) -> Option<&'static dyn Family> {
    let arch = json
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str());
    let model_type = json.get("model_type").and_then(|m| m.as_str());
    FAMILIES.iter().copied().find(|f| match arch {
        Some(a) => f.architectures().contains(&a),
        None => model_type == Some(f.name()),
    })
}

/// Every architecture the families map, for messages and help.
pub fn supported() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| f.architectures().iter().copied())
        .collect()
}

/// The model of the HF directory `dir` from its `config.json`.
///
/// # Errors
/// [`ModelError`] without a configuration, for an architecture no family maps,
/// or for an option the family refuses.
pub fn for_config(
    dir: &Path,
    json: Option<&serde_json::Value>,
    overrides: Overrides,
) -> Result<Model, ModelError> {
    let json = json.ok_or_else(|| ModelError::NoConfig {
        dir: dir.to_owned(),
    })?;
    let family = family_of(json).ok_or_else(|| ModelError::Architecture {
        path: dir.join("config.json"),
        architecture: architecture(json).unwrap_or_else(|| "(none)".into()),
        supported: supported().join(", "),
    })?;
    let mut config = Config::new(json, dir);
    config.overrides = overrides;
    family.model(&config)
}
