//! `run_config.yaml`: the configuration Megatron-Bridge reads to load an iteration
//! (`specs/megatron-torch-dist.md` §6.3). We write the sections its loaders index:
//! `checkpoint` (format, no optimizer or RNG state), `model` (the provider and its
//! fields, so `load_model_config` can rebuild the model), `tokenizer`.

use crate::dtype::DType;
use crate::models::Parallelism;

/// A YAML scalar or list of scalars.
#[derive(Debug, Clone, PartialEq)]
pub enum Yaml {
    /// `null`.
    Null,
    /// `true`/`false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string (always quoted).
    Str(String),
    /// A flow list.
    List(Vec<Yaml>),
}

impl Yaml {
    /// A string value.
    pub fn str(s: impl Into<String>) -> Yaml {
        Yaml::Str(s.into())
    }

    fn render(&self) -> String {
        match self {
            Yaml::Null => "null".into(),
            Yaml::Bool(b) => b.to_string(),
            Yaml::Int(i) => i.to_string(),
            // Plain decimal with a dot: PyYAML reads `1e-5` as a string, `0.00001`
            // as a float.
            Yaml::Float(f) => {
                let s = f.to_string();
                if s.contains('.') || !f.is_finite() {
                    s
                } else {
                    format!("{s}.0")
                }
            }
            // JSON string syntax is valid YAML and escapes everything.
            Yaml::Str(s) => serde_json::to_string(s).expect("string serializes"),
            Yaml::List(items) => format!(
                "[{}]",
                items
                    .iter()
                    .map(Yaml::render)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// What goes into `run_config.yaml`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The `model:` section.
    pub model: Vec<(String, Yaml)>,
    /// The HF model the checkpoint was converted from.
    pub hf_model_id: String,
}

/// The parallel-size and dtype fields every model section carries.
pub fn parallel_fields(p: &Parallelism, dtype: DType) -> Vec<(String, Yaml)> {
    let torch = format!("torch.{}", dtype.torch_name());
    vec![
        ("tensor_model_parallel_size".into(), Yaml::Int(p.tp as i64)),
        (
            "pipeline_model_parallel_size".into(),
            Yaml::Int(p.pp as i64),
        ),
        ("expert_model_parallel_size".into(), Yaml::Int(p.ep as i64)),
        (
            "expert_tensor_parallel_size".into(),
            Yaml::Int(p.etp as i64),
        ),
        ("bf16".into(), Yaml::Bool(dtype == DType::BF16)),
        ("fp16".into(), Yaml::Bool(dtype == DType::F16)),
        ("params_dtype".into(), Yaml::Str(torch.clone())),
        ("pipeline_dtype".into(), Yaml::Str(torch)),
    ]
}

fn section(out: &mut String, name: &str, fields: &[(String, Yaml)]) {
    out.push_str(name);
    out.push_str(":\n");
    for (k, v) in fields {
        out.push_str("  ");
        out.push_str(k);
        out.push_str(": ");
        out.push_str(&v.render());
        out.push('\n');
    }
}

/// Renders the file.
pub fn render(rc: &RunConfig) -> String {
    let mut out = format!(
        "# Written by ckpt-convert {} for Megatron-Bridge: a weights-only checkpoint\n# (no optimizer or RNG state; fine-tune from it with checkpoint.pretrained_checkpoint).\n",
        env!("CARGO_PKG_VERSION")
    );
    out.push_str("_target_: \"megatron.bridge.training.config.ConfigContainer\"\n");
    section(
        &mut out,
        "checkpoint",
        &[
            (
                "_target_".into(),
                Yaml::str("megatron.bridge.training.config.CheckpointConfig"),
            ),
            ("ckpt_format".into(), Yaml::str("torch_dist")),
            ("save_optim".into(), Yaml::Bool(false)),
            ("save_rng".into(), Yaml::Bool(false)),
            ("load_optim".into(), Yaml::Bool(false)),
            ("load_rng".into(), Yaml::Bool(false)),
            ("fully_parallel_save".into(), Yaml::Bool(true)),
            (
                "dist_ckpt_strictness".into(),
                Yaml::str("assume_ok_unexpected"),
            ),
            ("save_tokenizer_assets".into(), Yaml::Bool(true)),
        ],
    );
    section(&mut out, "model", &rc.model);
    section(
        &mut out,
        "tokenizer",
        &[
            (
                "_target_".into(),
                Yaml::str("megatron.bridge.training.tokenizers.config.TokenizerConfig"),
            ),
            ("tokenizer_type".into(), Yaml::str("HuggingFaceTokenizer")),
            ("tokenizer_model".into(), Yaml::str(rc.hf_model_id.clone())),
        ],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_render_as_yaml() {
        assert_eq!(Yaml::Float(1e-5).render(), "0.00001");
        assert_eq!(Yaml::Float(500000.0).render(), "500000.0");
        assert_eq!(Yaml::str("a\"b").render(), "\"a\\\"b\"");
        assert_eq!(
            Yaml::List(vec![Yaml::Int(1), Yaml::Null]).render(),
            "[1, null]"
        );
    }
}
