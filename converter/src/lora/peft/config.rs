//! `adapter_config.json`, with PEFT's defaults and matching rules.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::CONFIG_FILE;
use crate::lora::LoraError;

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
    /// `target_parameters`: parameters adapted directly (fused MoE experts).
    pub target_parameters: Vec<String>,
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
    /// BD-LoRA, KaSA, VeLoRA, MonteCLoRA; classification
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
                "layer_replication={} replicates base layers that share weights; the copies cannot be merged separately into one set of weights",
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
        let target_parameters = match get("target_parameters") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| LoraError::Config {
                            path: path.to_owned(),
                            key: "target_parameters".into(),
                            why: format!("expected parameter names, found {v}"),
                        })
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(LoraError::Config {
                    path: path.to_owned(),
                    key: "target_parameters".into(),
                    why: format!("expected a list of parameter names, found {other}"),
                });
            }
        };
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
            target_parameters,
        })
    }

    /// Whether `target_parameters` names the parameter `key` (`…experts.gate_up_proj`):
    /// the whole key or a dotted suffix of it, as PEFT matches them.
    pub fn targets_parameter(&self, key: &str) -> bool {
        self.target_parameters
            .iter()
            .any(|t| key == t || key.ends_with(&format!(".{t}")))
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
