//! `run_config.yaml`: the configuration Megatron-Bridge reads to load an iteration
//! (`docs/megatron-torch-dist.md#run-configuration`). We write the sections its loaders index:
//! `checkpoint` (format, no optimizer or RNG state), `model` (the provider and its
//! fields, so `load_model_config` can rebuild the model), `tokenizer`.

use crate::formats::dtype::DType;

/// The parallel layout a Megatron checkpoint is meant for (recorded in its
/// `run_config.yaml`; the tensors are stored whole whatever it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parallelism {
    /// Tensor parallel size.
    pub tp: u64,
    /// Pipeline parallel size.
    pub pp: u64,
    /// Expert parallel size.
    pub ep: u64,
    /// Expert tensor parallel size.
    pub etp: u64,
}

impl Default for Parallelism {
    fn default() -> Self {
        Parallelism {
            tp: 1,
            pp: 1,
            ep: 1,
            etp: 1,
        }
    }
}

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
    /// A flow mapping (`{_target_: torch.bfloat16, _call_: false}`).
    Map(Vec<(String, Yaml)>),
}

impl Yaml {
    /// A string value.
    pub fn str(s: impl Into<String>) -> Yaml {
        Yaml::Str(s.into())
    }

    /// A reference to a Python object that Megatron-Bridge's loader resolves
    /// without calling it (`{_call_: false, _target_: torch.bfloat16}`).
    pub fn object(target: &str) -> Yaml {
        Yaml::Map(vec![
            ("_call_".into(), Yaml::Bool(false)),
            ("_target_".into(), Yaml::str(target)),
        ])
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
            Yaml::Map(items) => format!(
                "{{{}}}",
                items
                    .iter()
                    .map(|(k, v)| format!("{k}: {}", v.render()))
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
    let torch = Yaml::object(&torch);
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
        ("params_dtype".into(), torch.clone()),
        ("pipeline_dtype".into(), torch),
    ]
}

/// The `model:` parallel sizes of a `run_config.yaml` as PyYAML writes it (block
/// style, two-space indent) replaced by `p`'s, every other line kept; a size
/// absent from the section is added at its end.
///
/// # Errors
/// Why the text has no `model:` section to edit.
pub fn with_parallel(text: &str, p: &Parallelism) -> Result<String, String> {
    let fields = [
        ("tensor_model_parallel_size", p.tp),
        ("pipeline_model_parallel_size", p.pp),
        ("expert_model_parallel_size", p.ep),
        ("expert_tensor_parallel_size", p.etp),
    ];
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| *l == "model:")
        .ok_or("no top-level model: section")?;
    let end = lines[start + 1..]
        .iter()
        .position(|l| !l.is_empty() && !l.starts_with(' '))
        .map_or(lines.len(), |i| start + 1 + i);
    let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    let mut missing = Vec::new();
    for (key, value) in fields {
        let prefix = format!("  {key}:");
        match (start + 1..end).find(|&i| out[i].starts_with(&prefix)) {
            Some(i) => out[i] = format!("{prefix} {value}"),
            None => missing.push(format!("{prefix} {value}")),
        }
    }
    out.splice(end..end, missing);
    let mut s = out.join("\n");
    if text.ends_with('\n') {
        s.push('\n');
    }
    Ok(s)
}

/// Writes a block mapping with its keys sorted, as Megatron-Bridge's
/// `yaml.safe_dump` does (so `_target_` comes first).
fn section(out: &mut String, name: &str, fields: &[(String, Yaml)]) {
    out.push_str(name);
    out.push_str(":\n");
    let mut fields: Vec<&(String, Yaml)> = fields.iter().collect();
    fields.sort_by(|a, b| a.0.cmp(&b.0));
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
    // What Megatron-Bridge's save_megatron_model records; the load path reads
    // save_optim, save_rng and fully_parallel_save from here on resume.
    section(
        &mut out,
        "checkpoint",
        &[
            (
                "_target_".into(),
                Yaml::str("megatron.bridge.training.config.CheckpointConfig"),
            ),
            ("async_save".into(), Yaml::Bool(false)),
            ("ckpt_format".into(), Yaml::str("torch_dist")),
            ("dist_ckpt_optim_fully_reshardable".into(), Yaml::Bool(true)),
            ("fully_parallel_save".into(), Yaml::Bool(true)),
            ("save_optim".into(), Yaml::Bool(false)),
            ("save_rng".into(), Yaml::Bool(false)),
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
            ("hf_tokenizer_kwargs".into(), Yaml::Map(Vec::new())),
            ("tokenizer_type".into(), Yaml::str("HuggingFaceTokenizer")),
            ("tokenizer_model".into(), Yaml::str(rc.hf_model_id.clone())),
        ],
    );
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn parallel_sizes_are_replaced_in_place() {
        let text = "_target_: x\nmodel:\n  hidden_size: 8\n  tensor_model_parallel_size: 1\n  pipeline_model_parallel_size: 1\nrng:\n  seed: 1\n";
        let p = super::Parallelism {
            tp: 2,
            pp: 1,
            ep: 8,
            etp: 1,
        };
        let edited = super::with_parallel(text, &p).unwrap();
        assert_eq!(
            edited,
            "_target_: x\nmodel:\n  hidden_size: 8\n  tensor_model_parallel_size: 2\n  pipeline_model_parallel_size: 1\n  expert_model_parallel_size: 8\n  expert_tensor_parallel_size: 1\nrng:\n  seed: 1\n"
        );
        assert!(super::with_parallel("a: 1\n", &p).is_err());
    }

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
