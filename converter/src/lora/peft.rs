//! PEFT LoRA adapter directories (`specs/peft-lora-and-hf-layout.md` §1–§3): which
//! directory `lora_checkpoint` means, `adapter_config.json` with PEFT's defaults
//! and matching rules, and the keys of `adapter_model.safetensors`.
//!
//! Matching follows the PEFT version the interop suite pins (0.21.2):
//! `target_modules` (list: exact name or `.`-suffix, then the layer filter; string:
//! a regular expression matched against the whole name), `exclude_modules`
//! (same forms, checked first), modules inside `modules_to_save` never carry
//! LoRA, `layers_to_transform` with the first numbered segment (or the one after
//! a `layers_pattern`), and `rank_pattern`/`alpha_pattern` as the first key in
//! JSON order whose `(.*\.)?(KEY)$` matches. Patterns are Python regular
//! expressions, evaluated with a backtracking engine ([`PyRegex`]) that has
//! Python `re`'s look-around and back-references.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::LoraError;
use crate::formats::safetensors;
use crate::formats::source::{Files, GlobalTensor};
use crate::plan::TensorStore;

/// The adapter's configuration file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The legacy pickled weights (`safe_serialization=False`), never read.
pub const PICKLED_WEIGHTS_FILE: &str = "adapter_model.bin";
/// The prefix of every saved key (`PeftModel` → `LoraModel` → the transformers model).
pub const KEY_PREFIX: &str = "base_model.model.";

// ---------------------------------------------------------------------------------------------
// lora_checkpoint → adapter directory
// ---------------------------------------------------------------------------------------------

/// The adapter directory `lora_checkpoint` leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The directory holding `adapter_config.json`.
    pub dir: PathBuf,
    /// How it was chosen, when it is not the path given.
    pub note: Option<String>,
}

/// The step a checkpoint directory is named after: the last number in the
/// deepest component of `rel` that has one (`checkpoint-1000` → 1000,
/// `checkpoint-1000/my_adapter` → 1000, `global_step300` → 300).
pub fn step_of(rel: &Path) -> Option<u64> {
    rel.components().rev().find_map(|c| {
        let s = c.as_os_str().to_string_lossy();
        let mut last = None;
        let mut cur = String::new();
        for ch in s.chars().chain(std::iter::once('/')) {
            if ch.is_ascii_digit() {
                cur.push(ch);
            } else if !cur.is_empty() {
                last = cur.parse::<u64>().ok().or(last);
                cur.clear();
            }
        }
        last
    })
}

/// Directories under `root` (not `root` itself) holding `adapter_config.json`,
/// searched to a bounded depth without following directory links.
fn adapter_dirs(root: &Path) -> Vec<PathBuf> {
    const MAX_DEPTH: usize = 6;
    const MAX_DIRS: usize = 20_000;
    let mut found = Vec::new();
    let mut stack = vec![(root.to_owned(), 0usize)];
    let mut seen = 0usize;
    while let Some((dir, depth)) = stack.pop() {
        seen += 1;
        if seen > MAX_DIRS {
            break;
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if !is_dir {
                continue;
            }
            let p = e.path();
            if p.join(CONFIG_FILE).is_file() {
                found.push(p.clone());
            }
            if depth + 1 < MAX_DEPTH {
                stack.push((p, depth + 1));
            }
        }
    }
    found.sort();
    found
}

/// Resolves `lora_checkpoint` as users expect: the directory itself when it holds
/// `adapter_config.json` (a file inside it is accepted too); otherwise, inside a
/// training output directory, the adapter directory with the highest step number
/// in its path (`checkpoint-1000` over `checkpoint-500`), and a note saying which.
///
/// # Errors
/// [`LoraError::Resolve`] when the path does not exist, holds no adapter, or
/// holds several that no step number tells apart (listing them).
pub fn resolve(path: &Path) -> Result<Resolved, LoraError> {
    let err = |why: String| LoraError::Resolve {
        path: path.to_owned(),
        why,
    };
    if path.is_file() {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let parent = path.parent().map(Path::to_owned).unwrap_or_default();
        return match name.as_deref() {
            Some(CONFIG_FILE | WEIGHTS_FILE | PICKLED_WEIGHTS_FILE)
                if parent.join(CONFIG_FILE).is_file() =>
            {
                Ok(Resolved {
                    dir: parent.clone(),
                    note: Some(format!(
                        "lora_checkpoint={} is a file; using its directory {}",
                        path.display(),
                        parent.display()
                    )),
                })
            }
            _ => Err(err(format!(
                "is a file: expected an adapter directory holding {CONFIG_FILE}"
            ))),
        };
    }
    if !path.is_dir() {
        return Err(err("does not exist: expected an adapter directory".into()));
    }
    if path.join(CONFIG_FILE).is_file() {
        return Ok(Resolved {
            dir: path.to_owned(),
            note: None,
        });
    }
    let found = adapter_dirs(path);
    let rel = |p: &Path| p.strip_prefix(path).unwrap_or(p).to_owned();
    let list = |v: &[PathBuf]| {
        v.iter()
            .map(|p| rel(p).display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match found.as_slice() {
        [] => Err(err(format!(
            "expected a directory holding {CONFIG_FILE} (or a training output directory with one inside), found none"
        ))),
        [only] => Ok(Resolved {
            dir: only.clone(),
            note: Some(format!(
                "lora_checkpoint={} resolved to the only adapter directory inside it, {}",
                path.display(),
                only.display()
            )),
        }),
        many => {
            let best = many.iter().filter_map(|p| step_of(&rel(p))).max();
            let Some(best) = best else {
                return Err(err(format!(
                    "holds {} adapter directories and none is named after a step ({}): name the one to merge",
                    many.len(),
                    list(many)
                )));
            };
            let top: Vec<PathBuf> = many
                .iter()
                .filter(|p| step_of(&rel(p)) == Some(best))
                .cloned()
                .collect();
            match top.as_slice() {
                [one] => Ok(Resolved {
                    dir: one.clone(),
                    note: Some(format!(
                        "lora_checkpoint={} resolved to {} (step {best}, the highest of {} adapter directories: {})",
                        path.display(),
                        one.display(),
                        many.len(),
                        list(many)
                    )),
                }),
                _ => Err(err(format!(
                    "holds {} adapter directories at step {best} ({}): name the one to merge",
                    top.len(),
                    list(&top)
                ))),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// adapter_config.json
// ---------------------------------------------------------------------------------------------

/// A Python regular expression (PEFT's `target_modules`, `rank_pattern`, …),
/// evaluated by `fancy-regex`, which has `re`'s syntax beyond Rust's `regex`:
/// look-around (`(?!…)`, `(?<=…)`) and back-references.
#[derive(Debug, Clone)]
pub struct PyRegex {
    /// As written in the configuration.
    pattern: String,
    re: fancy_regex::Regex,
    path: PathBuf,
    key: String,
}

impl PyRegex {
    /// Compiles `wrapped` (`pattern` inside the anchors PEFT uses for `key`).
    ///
    /// # Errors
    /// [`LoraError::Config`] for a pattern that does not compile.
    fn new(path: &Path, key: &str, pattern: &str, wrapped: &str) -> Result<PyRegex, LoraError> {
        let re = fancy_regex::Regex::new(wrapped).map_err(|e| LoraError::Config {
            path: path.to_owned(),
            key: key.into(),
            why: format!("pattern {pattern:?} is not a regular expression: {e}"),
        })?;
        Ok(PyRegex {
            pattern: pattern.to_owned(),
            re,
            path: path.to_owned(),
            key: key.to_owned(),
        })
    }

    fn limit(&self, module: &str, e: fancy_regex::Error) -> LoraError {
        LoraError::Config {
            path: self.path.clone(),
            key: self.key.clone(),
            why: format!(
                "pattern {:?} could not be evaluated on {module:?} ({e}); simplify it",
                self.pattern
            ),
        }
    }

    /// Whether the expression matches `module`.
    ///
    /// # Errors
    /// [`LoraError::Config`] when evaluating it exceeds the engine's backtracking
    /// limit (a pathological pattern), rather than a silent mismatch.
    pub fn is_match(&self, module: &str) -> Result<bool, LoraError> {
        self.re.is_match(module).map_err(|e| self.limit(module, e))
    }

    /// The integer in the capture group `idx`, when the expression matches.
    fn index(&self, module: &str) -> Result<Option<u64>, LoraError> {
        let caps = self
            .re
            .captures(module)
            .map_err(|e| self.limit(module, e))?;
        Ok(caps.and_then(|c| c.name("idx")?.as_str().parse().ok()))
    }
}

fn py_regex(path: &Path, key: &str, pattern: &str, wrapped: &str) -> Result<PyRegex, LoraError> {
    PyRegex::new(path, key, pattern, wrapped)
}

/// `target_modules` / `exclude_modules`.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Exact module names or `.`-suffixes.
    List(Vec<String>),
    /// A regular expression matched against the whole module name.
    Regex {
        /// As written.
        pattern: String,
        /// Compiled, anchored at both ends.
        re: PyRegex,
    },
    /// `"all-linear"`: every linear layer except the output embedding.
    AllLinear,
}

impl Targets {
    fn parse(path: &Path, key: &str, v: &Value) -> Result<Option<Targets>, LoraError> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) if s.eq_ignore_ascii_case("all-linear") => {
                Ok(Some(Targets::AllLinear))
            }
            Value::String(s) => Ok(Some(Targets::Regex {
                pattern: s.clone(),
                re: py_regex(path, key, s, &format!("^(?:{s})$"))?,
            })),
            Value::Array(items) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| LoraError::Config {
                            path: path.to_owned(),
                            key: key.into(),
                            why: format!("expected module names (strings), found {i}"),
                        })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| Some(Targets::List(v))),
            other => Err(LoraError::Config {
                path: path.to_owned(),
                key: key.into(),
                why: format!(
                    "expected a list of module names or a regular expression, found {other}"
                ),
            }),
        }
    }

    /// Whether `module` is named: a list entry equal to it or a `.`-suffix of it,
    /// or the expression matching all of it. Also says whether the name was an
    /// exact list entry (which skips the layer filter).
    fn matches(&self, module: &str) -> Result<(bool, bool), LoraError> {
        Ok(match self {
            Targets::List(v) => {
                if v.iter().any(|t| t == module) {
                    (true, true)
                } else {
                    (v.iter().any(|t| module.ends_with(&format!(".{t}"))), false)
                }
            }
            Targets::Regex { re, .. } => (re.is_match(module)?, true),
            Targets::AllLinear => (false, false),
        })
    }
}

/// `bias`: which base biases the adapter trained (they are saved in full).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bias {
    /// `"none"`.
    None,
    /// `"all"`: every bias of the model.
    All,
    /// `"lora_only"`: the biases of LoRA-wrapped modules.
    LoraOnly,
}

/// `trainable_token_indices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenIndices {
    /// Rows of the input embedding.
    Embedding(Vec<u64>),
    /// Rows per module (matched by name suffix).
    Modules(Vec<(String, Vec<u64>)>),
}

/// A `rank_pattern` / `alpha_pattern` entry.
#[derive(Debug, Clone)]
struct Pattern<T> {
    key: String,
    re: PyRegex,
    value: T,
}

/// A parsed `adapter_config.json`, with PEFT's defaults for absent fields.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// The file.
    pub path: PathBuf,
    /// `r` (default 8).
    pub r: u64,
    /// `lora_alpha` (default 8).
    pub alpha: f64,
    /// `use_rslora`.
    pub use_rslora: bool,
    /// `use_dora`.
    pub use_dora: bool,
    /// `fan_in_fan_out` as saved (PEFT forces it per module type; see the planner).
    pub fan_in_fan_out: bool,
    /// `bias`.
    pub bias: Bias,
    /// `lora_bias`.
    pub lora_bias: bool,
    /// `target_modules` (`None`: the per-model default of PEFT).
    pub target_modules: Option<Targets>,
    /// `exclude_modules`.
    pub exclude_modules: Option<Targets>,
    /// `layers_to_transform` (an int is a list of one; an empty list is no filter).
    pub layers_to_transform: Option<Vec<u64>>,
    /// `layers_pattern`, compiled as PEFT wraps it.
    layers_pattern: Vec<PyRegex>,
    rank_pattern: Vec<Pattern<u64>>,
    alpha_pattern: Vec<Pattern<f64>>,
    /// `modules_to_save` (with the heads PEFT adds for classification task types).
    pub modules_to_save: Vec<String>,
    modules_to_save_re: Vec<PyRegex>,
    /// `trainable_token_indices`.
    pub trainable_token_indices: Option<TokenIndices>,
    /// `ensure_weight_tying`.
    pub ensure_weight_tying: bool,
    /// `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
    /// `revision`.
    pub revision: Option<String>,
    /// `task_type`.
    pub task_type: Option<String>,
}

/// PEFT's default `target_modules` per `model_type`
/// (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, peft 0.21.2).
pub fn default_targets(model_type: &str) -> Option<&'static [&'static str]> {
    Some(match model_type {
        "llama" | "llama4" | "mistral" | "mixtral" | "qwen2" | "qwen3" | "gemma" | "gemma2"
        | "gemma3_text" | "stablelm" | "opt" | "gptj" | "gpt_neo" | "bart" => &["q_proj", "v_proj"],
        "gpt2" | "gpt_bigcode" => &["c_attn"],
        "bloom" | "gpt_neox" | "falcon" | "chatglm" => &["query_key_value"],
        "phi" => &["q_proj", "v_proj", "fc1", "fc2"],
        "nemotron_h" => &["q_proj", "k_proj", "v_proj", "o_proj"],
        "t5" | "mt5" => &["q", "v"],
        "mpt" => &["Wqkv"],
        "codegen" => &["qkv_proj"],
        "btlm" => &["c_proj", "c_attn"],
        _ => return None,
    })
}

fn opt_str(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .map(str::to_owned)
        .filter(|s| !s.is_empty())
}

fn present(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

impl AdapterConfig {
    /// Reads and checks `dir/adapter_config.json`.
    ///
    /// # Errors
    /// [`LoraError::Refused`] for what cannot be merged faithfully (another
    /// `peft_type`; `layer_replication`; initialisations that rewrite the base:
    /// PiSSA, OLoRA, LoftQ, CorDA, MiCA; the variants aLoRA, Arrow, QALoRA,
    /// BD-LoRA, KaSA, VeLoRA, MonteCLoRA; `target_parameters`; classification
    /// task types, whose merged model has another head); [`LoraError::Config`] for
    /// a field of the wrong type or a pattern that cannot be evaluated.
    pub fn read(dir: &Path) -> Result<AdapterConfig, LoraError> {
        let path = dir.join(CONFIG_FILE);
        let text = crate::formats::file::read_text(&path, crate::formats::file::limit::CONFIG)
            .map_err(|e| LoraError::Refused {
                path: path.clone(),
                why: format!("cannot be read: {e}"),
            })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| LoraError::Refused {
            path: path.clone(),
            why: format!("is not valid JSON: {e}"),
        })?;
        let obj = json.as_object().ok_or_else(|| LoraError::Refused {
            path: path.clone(),
            why: "expected a JSON object".into(),
        })?;
        Self::from_json(&path, obj)
    }

    /// Builds the configuration from the JSON object of `path`.
    ///
    /// # Errors
    /// As [`AdapterConfig::read`].
    pub fn from_json(
        path: &Path,
        obj: &serde_json::Map<String, Value>,
    ) -> Result<AdapterConfig, LoraError> {
        let refuse = |why: String| LoraError::Refused {
            path: path.to_owned(),
            why,
        };
        let bad = |key: &str, why: String| LoraError::Config {
            path: path.to_owned(),
            key: key.into(),
            why,
        };
        let get = |k: &str| obj.get(k);
        match get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            Some(other) => {
                return Err(refuse(format!(
                    "peft_type is {other:?}: only LoRA adapters (\"LORA\") are merged; other PEFT methods use other tensors and other math"
                )));
            }
            None => {
                return Err(refuse(
                    "has no peft_type: expected \"LORA\" (is this a PEFT adapter?)".into(),
                ));
            }
        }
        if present(get("layer_replication")) {
            return Err(refuse(format!(
                "layer_replication={} replicates base layers that share weights; the copies cannot be merged separately into one set of weights (peft#1707)",
                get("layer_replication").expect("present")
            )));
        }
        if let Some(init) = get("init_lora_weights").and_then(Value::as_str) {
            let lower = init.to_ascii_lowercase();
            let rewrites = ["pissa", "olora", "loftq", "corda"];
            if rewrites.iter().any(|r| lower.starts_with(r)) {
                return Err(refuse(format!(
                    "init_lora_weights={init:?}: this initialisation rewrites the base weights when the adapter is loaded (W ← W − s·B₀A₀, recomputed by SVD/QR/quantization), so merging into the original base would not reproduce the trained model; convert the adapter to plain LoRA first (PEFT save_pretrained(path_initial_model_for_weight_conversion=…))"
                )));
            }
            if lower == "mica" {
                return Err(refuse(
                    "init_lora_weights=\"mica\": the MiCA variant's merge (delta cast to the base dtype before the add) is not verified against PEFT by this converter".into(),
                ));
            }
        }
        for (key, what) in [
            (
                "alora_invocation_tokens",
                "aLoRA (activated LoRA) cannot be merged: its delta applies only after the invocation tokens",
            ),
            (
                "arrow_config",
                "Arrow routes among several adapters per token and cannot be merged",
            ),
            (
                "use_qalora",
                "QALoRA adapters are trained against a quantized base and cannot be merged into full-precision weights",
            ),
            (
                "use_bdlora",
                "the BD-LoRA variant's merge is not verified against PEFT by this converter",
            ),
            (
                "kasa_config",
                "the KaSA variant's merge (its own delta) is not verified against PEFT by this converter",
            ),
            (
                "velora_config",
                "the VeLoRA variant's merge is not verified against PEFT by this converter",
            ),
            (
                "monteclora_config",
                "the MonteCLoRA variant's merge is not verified against PEFT by this converter",
            ),
        ] {
            if present(get(key)) {
                return Err(refuse(format!("{key} is set: {what}")));
            }
        }
        if present(get("target_parameters")) {
            return Err(refuse(
                "target_parameters is set: LoRA on raw parameters (fused MoE experts) is not supported by this converter".into(),
            ));
        }
        let task_type = opt_str(get("task_type"));
        if let Some(t) = task_type.as_deref()
            && matches!(t, "SEQ_CLS" | "TOKEN_CLS" | "QUESTION_ANS")
        {
            return Err(refuse(format!(
                "task_type={t}: the merged model is a classification model whose head (score/classifier/qa_outputs) is not in the base checkpoint; merge it with PEFT, or train with task_type CAUSAL_LM"
            )));
        }
        let uint = |k: &str, default: u64| -> Result<u64, LoraError> {
            match get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| bad(k, format!("expected a positive integer, found {v}"))),
            }
        };
        let float = |k: &str, default: f64| -> Result<f64, LoraError> {
            match get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_f64()
                    .filter(|f| f.is_finite())
                    .ok_or_else(|| bad(k, format!("expected a number, found {v}"))),
            }
        };
        let flag = |k: &str| -> Result<bool, LoraError> {
            match get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(bad(k, format!("expected true or false, found {v}"))),
            }
        };
        let r = uint("r", 8)?;
        let alpha = float("lora_alpha", 8.0)?;
        let bias = match get("bias").and_then(Value::as_str).unwrap_or("none") {
            "none" => Bias::None,
            "all" => Bias::All,
            "lora_only" => Bias::LoraOnly,
            other => {
                return Err(bad(
                    "bias",
                    format!("expected \"none\", \"all\" or \"lora_only\", found {other:?}"),
                ));
            }
        };
        let target_modules = Targets::parse(
            path,
            "target_modules",
            get("target_modules").unwrap_or(&Value::Null),
        )?;
        let exclude_modules = match Targets::parse(
            path,
            "exclude_modules",
            get("exclude_modules").unwrap_or(&Value::Null),
        )? {
            Some(Targets::AllLinear) => Some(Targets::List(vec!["all-linear".into()])),
            other => other,
        };
        let layers_to_transform = match get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) if a.is_empty() => None,
            Some(v) => {
                let items: Vec<&Value> = match v {
                    Value::Array(a) => a.iter().collect(),
                    one => vec![one],
                };
                Some(
                    items
                        .into_iter()
                        .map(|i| {
                            i.as_u64().ok_or_else(|| {
                                bad(
                                    "layers_to_transform",
                                    format!("expected layer indices, found {i}"),
                                )
                            })
                        })
                        .collect::<Result<Vec<u64>, _>>()?,
                )
            }
        };
        let layers_pattern = match get("layers_pattern") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) if s.is_empty() => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|i| {
                    i.as_str().map(str::to_owned).ok_or_else(|| {
                        bad("layers_pattern", format!("expected strings, found {i}"))
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(bad(
                    "layers_pattern",
                    format!("expected a string or a list of strings, found {other}"),
                ));
            }
        };
        if layers_to_transform.is_some() && matches!(target_modules, Some(Targets::Regex { .. })) {
            return Err(bad(
                "layers_to_transform",
                "is set with a regular-expression target_modules, which PEFT does not allow".into(),
            ));
        }
        let layers_pattern = layers_pattern
            .iter()
            .map(|p| {
                py_regex(
                    path,
                    "layers_pattern",
                    p,
                    &format!(r"^(?:|.*?\.)(?:{p})\.(?P<idx>\d+)\."),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let patterns = |key: &str| -> Result<Vec<(String, PyRegex, Value)>, LoraError> {
            match get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, v)| {
                        Ok((
                            k.clone(),
                            py_regex(path, key, k, &format!(r"^(?:.*\.)?(?:{k})$"))?,
                            v.clone(),
                        ))
                    })
                    .collect(),
                Some(other) => Err(bad(key, format!("expected an object, found {other}"))),
            }
        };
        let rank_pattern = patterns("rank_pattern")?
            .into_iter()
            .map(|(key, re, v)| {
                let value = v.as_u64().filter(|n| *n > 0).ok_or_else(|| {
                    bad(
                        "rank_pattern",
                        format!("{key:?}: expected a positive integer, found {v}"),
                    )
                })?;
                Ok(Pattern { key, re, value })
            })
            .collect::<Result<Vec<_>, LoraError>>()?;
        let alpha_pattern = patterns("alpha_pattern")?
            .into_iter()
            .map(|(key, re, v)| {
                let value = v.as_f64().filter(|f| f.is_finite()).ok_or_else(|| {
                    bad(
                        "alpha_pattern",
                        format!("{key:?}: expected a number, found {v}"),
                    )
                })?;
                Ok(Pattern { key, re, value })
            })
            .collect::<Result<Vec<_>, LoraError>>()?;
        let mut modules_to_save: Vec<String> = match get("modules_to_save") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|i| {
                    i.as_str().map(str::to_owned).ok_or_else(|| {
                        bad(
                            "modules_to_save",
                            format!("expected module names, found {i}"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(bad(
                    "modules_to_save",
                    format!("expected a list of module names, found {other}"),
                ));
            }
        };
        modules_to_save.dedup();
        let modules_to_save_re = modules_to_save
            .iter()
            .map(|m| {
                py_regex(
                    path,
                    "modules_to_save",
                    m,
                    &format!(r"^(?:|.*\.)(?:{m})(?:\..*)?$"),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let trainable_token_indices = match get("trainable_token_indices") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let indices = |v: &Value| -> Result<Vec<u64>, LoraError> {
                    v.as_array()
                        .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
                        .ok_or_else(|| {
                            bad(
                                "trainable_token_indices",
                                format!("expected token indices, found {v}"),
                            )
                        })
                };
                match v {
                    Value::Array(_) => Some(TokenIndices::Embedding(indices(v)?)),
                    Value::Object(m) => Some(TokenIndices::Modules(
                        m.iter()
                            .map(|(k, v)| Ok((k.clone(), indices(v)?)))
                            .collect::<Result<_, LoraError>>()?,
                    )),
                    other => {
                        return Err(bad(
                            "trainable_token_indices",
                            format!("expected a list or an object, found {other}"),
                        ));
                    }
                }
            }
        };
        Ok(AdapterConfig {
            path: path.to_owned(),
            r,
            alpha,
            use_rslora: flag("use_rslora")?,
            use_dora: flag("use_dora")?,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            bias,
            lora_bias: flag("lora_bias")?,
            target_modules,
            exclude_modules,
            layers_to_transform,
            layers_pattern,
            rank_pattern,
            alpha_pattern,
            modules_to_save,
            modules_to_save_re,
            trainable_token_indices,
            ensure_weight_tying: flag("ensure_weight_tying")?,
            base_model_name_or_path: opt_str(get("base_model_name_or_path")),
            revision: opt_str(get("revision")),
            task_type,
        })
    }

    /// The layer index PEFT reads from `module` for `layers_to_transform`.
    fn layer_index(&self, module: &str) -> Result<Option<u64>, LoraError> {
        if self.layers_pattern.is_empty() {
            static FIRST: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
            let re = FIRST.get_or_init(|| {
                regex::Regex::new(r"^.*?\.[^.]*\.(?P<idx>\d+)\.").expect("a valid expression")
            });
            return Ok(re
                .captures(module)
                .and_then(|c| c.name("idx")?.as_str().parse().ok()));
        }
        for re in &self.layers_pattern {
            if let Some(i) = re.index(module)? {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// Whether `module` sits inside a `modules_to_save` module (LoRA never targets those).
    ///
    /// # Errors
    /// [`LoraError::Config`] when a pattern cannot be evaluated.
    pub fn inside_modules_to_save(&self, module: &str) -> Result<bool, LoraError> {
        for re in &self.modules_to_save_re {
            if re.is_match(module)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether `module` is wrapped as a `modules_to_save` module (PEFT's
    /// `key.endswith(name)`), i.e. trained as a full copy.
    pub fn wraps_as_modules_to_save(&self, module: &str) -> bool {
        self.modules_to_save
            .iter()
            .any(|m| module.ends_with(m.as_str()))
    }

    /// PEFT's `check_target_module_exists` for `module`. `linear` says whether it is
    /// a linear layer other than the output embedding (for `"all-linear"`);
    /// `model_type` picks PEFT's default when `target_modules` is null.
    ///
    /// # Errors
    /// [`LoraError::Refused`] when `target_modules` is null and PEFT has no
    /// default for `model_type`.
    pub fn targets(&self, module: &str, linear: bool, model_type: &str) -> Result<bool, LoraError> {
        if let Some(ex) = &self.exclude_modules
            && ex.matches(module)?.0
        {
            return Ok(false);
        }
        if self.inside_modules_to_save(module)? {
            return Ok(false);
        }
        let default;
        let targets = match &self.target_modules {
            Some(t) => t,
            None => {
                let names = default_targets(model_type).ok_or_else(|| LoraError::Refused {
                    path: self.path.clone(),
                    why: format!(
                        "target_modules is null and PEFT has no default target modules for model_type {model_type:?}"
                    ),
                })?;
                default = Targets::List(names.iter().map(|s| (*s).to_owned()).collect());
                &default
            }
        };
        if let Targets::AllLinear = targets {
            return Ok(linear);
        }
        let (found, exact) = targets.matches(module)?;
        if !found || exact {
            return Ok(found);
        }
        match &self.layers_to_transform {
            None => Ok(true),
            Some(layers) => Ok(self
                .layer_index(module)?
                .is_some_and(|i| layers.contains(&i))),
        }
    }

    /// The rank and alpha of `module`: the first `rank_pattern`/`alpha_pattern` key
    /// (in JSON order) matching `(.*\.)?(KEY)$`, else `r`/`lora_alpha`.
    ///
    /// # Errors
    /// [`LoraError::Config`] when a pattern cannot be evaluated.
    pub fn rank_and_alpha(&self, module: &str) -> Result<(u64, f64), LoraError> {
        // get_pattern_key: the first key whose expression matches, else the module
        // name itself (found only if it is literally a key).
        fn lookup<T: Copy>(patterns: &[Pattern<T>], module: &str) -> Result<Option<T>, LoraError> {
            for p in patterns {
                if p.re.is_match(module)? {
                    return Ok(Some(p.value));
                }
            }
            Ok(patterns.iter().find(|p| p.key == module).map(|p| p.value))
        }
        Ok((
            lookup(&self.rank_pattern, module)?.unwrap_or(self.r),
            lookup(&self.alpha_pattern, module)?.unwrap_or(self.alpha),
        ))
    }

    /// The scale of `module`, as PEFT computes it in Python (f64), rounded to f32 as
    /// torch does when multiplying an f32 tensor by a Python float.
    ///
    /// # Errors
    /// [`LoraError::Config`] when a pattern cannot be evaluated.
    pub fn scale(&self, module: &str) -> Result<(u64, f64, f32), LoraError> {
        let (r, alpha) = self.rank_and_alpha(module)?;
        let s = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        Ok((r, alpha, s as f32))
    }

    /// The trainable-token rows of `module`, if the configuration names any.
    pub fn token_indices(&self, module: &str, is_input_embedding: bool) -> Option<&[u64]> {
        match self.trainable_token_indices.as_ref()? {
            TokenIndices::Embedding(v) => is_input_embedding.then_some(v.as_slice()),
            TokenIndices::Modules(m) => m
                .iter()
                .find(|(name, _)| module.ends_with(name.as_str()))
                .map(|(_, v)| v.as_slice()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// adapter_model.safetensors
// ---------------------------------------------------------------------------------------------

/// The adapter's weights, opened for reading (a store of the merge plan).
#[derive(Debug)]
pub struct AdapterWeights {
    /// The weights file.
    pub path: PathBuf,
    /// The mapped file.
    pub files: Files,
    /// Its tensors, in offset order.
    pub tensors: Vec<GlobalTensor>,
    /// Name → index in `tensors`.
    pub by_name: HashMap<String, usize>,
    /// The header bytes (for the provenance digest).
    pub header: Vec<u8>,
}

impl AdapterWeights {
    /// Opens `dir/adapter_model.safetensors`.
    ///
    /// # Errors
    /// [`LoraError::Refused`] when only the pickled `adapter_model.bin` is there
    /// (never unpickled: a pickle can run code) or no weights at all; a format
    /// error for a broken safetensors file.
    pub fn open(dir: &Path) -> Result<AdapterWeights, LoraError> {
        let path = dir.join(WEIGHTS_FILE);
        if !path.is_file() {
            let pickled = dir.join(PICKLED_WEIGHTS_FILE);
            let why = if pickled.is_file() {
                format!(
                    "holds {PICKLED_WEIGHTS_FILE} (a pickle, saved with safe_serialization=False) and no {WEIGHTS_FILE}: pickles can run code when loaded and are never read here; re-save the adapter with save_pretrained(safe_serialization=True)"
                )
            } else {
                format!("expected {WEIGHTS_FILE} next to {CONFIG_FILE}, found none")
            };
            return Err(LoraError::Refused {
                path: dir.to_owned(),
                why,
            });
        }
        let mut files = Files::default();
        let (id, file) = safetensors::open(&mut files, &path)
            .map_err(|e| LoraError::Unreadable(e.to_string()))?;
        let header = files.get(id).bytes()[..file.header_len as usize].to_vec();
        let by_name = file
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(AdapterWeights {
            path,
            files,
            tensors: file.tensors,
            by_name,
            header,
        })
    }
}

impl TensorStore for AdapterWeights {
    fn files(&self) -> &Files {
        &self.files
    }
    fn tensors(&self) -> &[GlobalTensor] {
        &self.tensors
    }
    fn label(&self) -> &str {
        "adapter"
    }
}

/// A LoRA tensor's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    /// `lora_A.weight`, `[r, in]`.
    A,
    /// `lora_B.weight`, `[out, r]`.
    B,
    /// `lora_B.bias`, `[out]` (`lora_bias`).
    BBias,
    /// `lora_embedding_A`, `[r, vocab]`.
    EmbeddingA,
    /// `lora_embedding_B`, `[dim, r]`.
    EmbeddingB,
    /// `lora_magnitude_vector` (DoRA).
    Magnitude,
    /// `token_adapter.trainable_tokens_delta`, `[rows, dim]`.
    TokensDelta,
}

const SUFFIXES: [(&str, Part); 7] = [
    (".lora_A.weight", Part::A),
    (".lora_B.weight", Part::B),
    (".lora_B.bias", Part::BBias),
    (".lora_embedding_A", Part::EmbeddingA),
    (".lora_embedding_B", Part::EmbeddingB),
    (".lora_magnitude_vector", Part::Magnitude),
    (".token_adapter.trainable_tokens_delta", Part::TokensDelta),
];

/// A saved tensor that replaces a base tensor whole (`modules_to_save`, saved
/// embedding layers, trained biases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacement {
    /// Index of the adapter tensor.
    pub tensor: usize,
    /// The base tensor it replaces (key without `base_model.model.` and `.base_layer`).
    pub target: String,
    /// The module whose parameter it is.
    pub module: String,
    /// Whether the key had `.base_layer` (the base weight under a LoRA wrapper,
    /// loaded into the base parameter itself).
    pub base_layer: bool,
}

/// The adapter's keys, sorted by role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys {
    /// Module path → its LoRA tensors (adapter tensor indices).
    pub modules: BTreeMap<String, BTreeMap<Part, usize>>,
    /// Whole-tensor replacements.
    pub replacements: Vec<Replacement>,
}

/// Sorts the adapter's tensor names (`names[i]` is tensor `i`) into LoRA tensors
/// per module and replacements, after removing `base_model.model.`.
///
/// # Errors
/// [`LoraError::Refused`] naming `path` and the key: a key without the prefix, a
/// LoRA key of another method or layout (`lora_E`, nested `base_layer.lora_A`),
/// or one of a module wrapper's internals.
pub fn classify(path: &Path, names: &[&str]) -> Result<Keys, LoraError> {
    let mut keys = Keys::default();
    for (i, name) in names.iter().enumerate() {
        let refuse = |why: String| LoraError::Refused {
            path: path.to_owned(),
            why: format!("tensor {name:?}: {why}"),
        };
        let rest = name.strip_prefix(KEY_PREFIX).ok_or_else(|| {
            refuse(format!(
                "expected every key to start with {KEY_PREFIX:?} (as PeftModel.save_pretrained writes them)"
            ))
        })?;
        if let Some((module, part)) = SUFFIXES
            .iter()
            .find_map(|(s, p)| rest.strip_suffix(s).map(|m| (m, *p)))
        {
            if module.ends_with(".base_layer") || module.contains(".base_layer.") {
                return Err(refuse(
                    "nested LoRA layers (LoRA on parameters, target_parameters) are not supported"
                        .into(),
                ));
            }
            if keys
                .modules
                .entry(module.to_owned())
                .or_default()
                .insert(part, i)
                .is_some()
            {
                return Err(refuse("appears twice".into()));
            }
            continue;
        }
        if rest.contains(".lora_") || rest.starts_with("lora_") {
            return Err(refuse(
                "is a LoRA tensor of a kind this converter does not merge (expected lora_A.weight, lora_B.weight, lora_B.bias, lora_embedding_A/B, lora_magnitude_vector)".into(),
            ));
        }
        if rest.contains(".modules_to_save.") || rest.contains(".original_module.") {
            return Err(refuse(
                "names a modules_to_save wrapper's internals, which PEFT never saves".into(),
            ));
        }
        let (param_path, param) = rest.rsplit_once('.').unwrap_or(("", rest));
        let (module, base_layer) = match param_path.strip_suffix(".base_layer") {
            Some(m) => (m, true),
            None => (param_path, false),
        };
        let target = if module.is_empty() {
            param.to_owned()
        } else {
            format!("{module}.{param}")
        };
        keys.replacements.push(Replacement {
            tensor: i,
            target,
            module: module.to_owned(),
            base_layer,
        });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: serde_json::Value) -> Result<AdapterConfig, LoraError> {
        let mut obj = json.as_object().unwrap().clone();
        obj.insert("peft_type".into(), "LORA".into());
        AdapterConfig::from_json(Path::new("adapter_config.json"), &obj)
    }

    #[test]
    fn list_targets_match_exact_names_and_dotted_suffixes() {
        let c =
            cfg(serde_json::json!({"target_modules": ["q_proj", "model.layers.1.mlp.up_proj"]}))
                .unwrap();
        let t = |m: &str| c.targets(m, true, "llama").unwrap();
        assert!(t("model.layers.0.self_attn.q_proj"));
        assert!(!t("model.layers.0.self_attn.qq_proj"));
        assert!(t("model.layers.1.mlp.up_proj"));
        assert!(!t("model.layers.0.mlp.up_proj"));
    }

    #[test]
    fn regex_targets_match_the_whole_name() {
        let c = cfg(serde_json::json!({"target_modules": r".*\.(q|v)_proj"})).unwrap();
        assert!(
            c.targets("model.layers.0.self_attn.q_proj", true, "llama")
                .unwrap()
        );
        assert!(
            !c.targets("model.layers.0.self_attn.q_proj.x", true, "llama")
                .unwrap()
        );
        assert!(
            !c.targets("model.layers.0.self_attn.k_proj", true, "llama")
                .unwrap()
        );
    }

    #[test]
    fn exclusions_modules_to_save_and_layer_filters() {
        let c = cfg(serde_json::json!({
            "target_modules": ["q_proj", "v_proj", "lm_head"],
            "exclude_modules": ["model.layers.2.self_attn.q_proj"],
            "modules_to_save": ["lm_head"],
            "layers_to_transform": [0, 2],
        }))
        .unwrap();
        let t = |m: &str| c.targets(m, true, "llama").unwrap();
        assert!(t("model.layers.0.self_attn.q_proj"));
        assert!(
            !t("model.layers.1.self_attn.q_proj"),
            "layer 1 is not transformed"
        );
        assert!(!t("model.layers.2.self_attn.q_proj"), "excluded");
        assert!(t("model.layers.2.self_attn.v_proj"));
        assert!(!t("lm_head"), "inside modules_to_save");
        // A layers_pattern picks the number after it (and accepts a root-level list).
        let c = cfg(serde_json::json!({
            "target_modules": ["w"], "layers_to_transform": 3, "layers_pattern": "blocks",
        }))
        .unwrap();
        assert!(c.targets("encoder.layers.1.blocks.3.w", true, "x").unwrap());
        assert!(c.targets("blocks.3.w", true, "x").unwrap());
        assert!(!c.targets("encoder.layers.3.blocks.1.w", true, "x").unwrap());
    }

    #[test]
    fn patterns_take_the_first_match_in_json_order() {
        let c = cfg(serde_json::json!({
            "r": 8, "lora_alpha": 16,
            "rank_pattern": {"q_proj": 4, r"layers\.0\.self_attn\.q_proj": 2},
            "alpha_pattern": {r"layers\.0\..*": 3},
        }))
        .unwrap();
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.q_proj").unwrap(),
            (4, 3.0)
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.1.self_attn.v_proj").unwrap(),
            (8, 16.0)
        );
        // "^q_proj" never matches a nested module: the ^ only fits an empty prefix.
        let c = cfg(serde_json::json!({"rank_pattern": {"^q_proj": 2}})).unwrap();
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.q_proj")
                .unwrap()
                .0,
            8
        );
        // rslora.
        let c = cfg(serde_json::json!({"r": 16, "lora_alpha": 8, "use_rslora": true})).unwrap();
        assert_eq!(c.scale("m").unwrap().2, 2.0);
    }

    #[test]
    fn unsupported_patterns_and_variants_are_refused_with_the_reason() {
        // Python re syntax is evaluated now; only what is not a pattern is refused.
        assert!(cfg(serde_json::json!({"rank_pattern": {r"(a)\1": 2}})).is_ok());
        let e = cfg(serde_json::json!({"rank_pattern": {"(a": 2}})).unwrap_err();
        assert!(e.to_string().contains("is not a regular expression"), "{e}");
        for (k, v, says) in [
            (
                "layer_replication",
                serde_json::json!([[0, 2]]),
                "layer_replication",
            ),
            (
                "init_lora_weights",
                serde_json::json!("pissa_niter_4"),
                "rewrites the base",
            ),
            (
                "init_lora_weights",
                serde_json::json!("loftq"),
                "rewrites the base",
            ),
            (
                "init_lora_weights",
                serde_json::json!("olora"),
                "rewrites the base",
            ),
            ("use_qalora", serde_json::json!(true), "QALoRA"),
            (
                "target_parameters",
                serde_json::json!(["experts.gate_up_proj"]),
                "target_parameters",
            ),
            ("task_type", serde_json::json!("SEQ_CLS"), "classification"),
        ] {
            let e = cfg(serde_json::json!({ k: v })).unwrap_err();
            assert!(e.to_string().contains(says), "{k}: {e}");
        }
        let mut obj = serde_json::Map::new();
        obj.insert("peft_type".into(), "IA3".into());
        let e = AdapterConfig::from_json(Path::new("a"), &obj).unwrap_err();
        assert!(e.to_string().contains("only LoRA"), "{e}");
        // Harmless values of the same fields are accepted.
        cfg(serde_json::json!({"init_lora_weights": "gaussian", "layer_replication": null, "use_qalora": false})).unwrap();
    }

    #[test]
    fn keys_are_sorted_into_lora_tensors_and_replacements() {
        let names = [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.embed_tokens.base_layer.weight",
            "base_model.model.lm_head.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias",
        ];
        let k = classify(Path::new("a"), &names).unwrap();
        assert_eq!(k.modules["model.layers.0.self_attn.q_proj"][&Part::B], 1);
        assert_eq!(k.modules["model.embed_tokens"][&Part::EmbeddingA], 2);
        let targets: Vec<(&str, bool)> = k
            .replacements
            .iter()
            .map(|r| (r.target.as_str(), r.base_layer))
            .collect();
        assert_eq!(
            targets,
            vec![
                ("model.embed_tokens.weight", true),
                ("lm_head.weight", false),
                ("model.layers.0.self_attn.q_proj.bias", true)
            ]
        );
        let e = classify(Path::new("a"), &["model.layers.0.q.lora_A.weight"]).unwrap_err();
        assert!(e.to_string().contains("base_model.model."), "{e}");
        let e = classify(Path::new("a"), &["base_model.model.x.lora_E"]).unwrap_err();
        assert!(e.to_string().contains("does not merge"), "{e}");
    }

    #[test]
    fn steps_come_from_checkpoint_names() {
        assert_eq!(step_of(Path::new("checkpoint-1000")), Some(1000));
        assert_eq!(
            step_of(Path::new("run/checkpoint-500/my_adapter")),
            Some(500)
        );
        assert_eq!(step_of(Path::new("global_step300")), Some(300));
        assert_eq!(step_of(Path::new("final")), None);
    }

    #[test]
    fn target_patterns_have_python_re_semantics() {
        let c = cfg(serde_json::json!({"target_modules": r".*(?<!k)_proj"})).unwrap();
        let t = |m: &str| c.targets(m, true, "llama").unwrap();
        assert!(t("model.layers.0.self_attn.q_proj"));
        assert!(t("model.layers.0.mlp.up_proj"));
        assert!(!t("model.layers.0.self_attn.k_proj"));
        // A back-reference: the layer digit must not reappear.
        let c = cfg(serde_json::json!({"target_modules": r".*layers\.(\d)\.x(?!\1)\d"})).unwrap();
        assert!(c.targets("m.layers.1.x2", true, "llama").unwrap());
        assert!(!c.targets("m.layers.1.x1", true, "llama").unwrap());
        let bad = cfg(serde_json::json!({"target_modules": "(unclosed"}));
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("is not a regular expression")
        );
    }
}
