//! The dense decoder's configuration as the smoke test reads it: from an HF
//! `config.json` (transformers' field names and defaults) or from the `model:`
//! section of a Megatron-Bridge `run_config.yaml` (Megatron-Core's
//! `TransformerConfig` names and defaults).
//!
//! Why a second reader beside [`crate::models::gpt::DenseConfig`]: the validator
//! must not share the conversion's code path. Reading the Megatron side from its
//! own `run_config.yaml` also puts the converter's config derivation (rotary base,
//! epsilon, head layout) under test: a wrong field there makes the two forward
//! passes disagree.

use serde_json::Value;

use crate::formats::dtype::DType;

/// Rotary frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rope {
    /// Plain RoPE.
    Default,
    /// Llama 3.1 (`rope_type: llama3`; Megatron-Core `rope_scaling=True`).
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_positions: f64,
    },
    /// Linear position interpolation (`rope_type: linear`;
    /// `seq_len_interpolation_factor`).
    Linear {
        /// The factor positions are divided by.
        factor: f64,
    },
}

impl Rope {
    /// The scaling as Megatron-Core 0.16 computes it: a Llama 3 scaling with its
    /// fixed low and high frequency factors and original context (it takes only
    /// the factor).
    pub fn as_megatron_computes(self) -> Rope {
        match self {
            Rope::Llama3 { factor, .. } => Rope::Llama3 {
                factor,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_positions: 8192.0,
            },
            other => other,
        }
    }
}

/// What the forward pass needs to know of a dense decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    /// Where the configuration came from, for messages (`LlamaForCausalLM`,
    /// `run_config.yaml`).
    pub name: String,
    /// The HF `model_type` family when known (`llama`, `mistral`, `qwen2`, `qwen3`).
    pub family: Option<String>,
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP intermediate size.
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (query groups).
    pub groups: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Vocabulary size (logits compared over these columns).
    pub vocab: usize,
    /// Biases on q, k and v (Qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Tied input and output embeddings, when the configuration says.
    pub tied: Option<bool>,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope: Rope,
    /// Sliding attention window (keys older than this many positions are masked).
    pub window: Option<usize>,
    /// The parameter dtype the configuration names, if any.
    pub dtype: Option<DType>,
    /// Megatron only: rows of the embedding and output layer when the vocabulary
    /// is padded (`should_pad_vocab`), from `make_vocab_size_divisible_by` × TP.
    pub padded_vocab: Option<usize>,
}

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|v| !v.is_null())
}

fn count(v: &Value, key: &str, what: &str) -> Result<usize, String> {
    field(v, key)
        .and_then(Value::as_u64)
        .filter(|n| *n > 0)
        .map(|n| n as usize)
        .ok_or_else(|| {
            format!(
                "{what} needs a positive integer {key}, found {}",
                v.get(key).map_or("nothing".into(), |x| x.to_string())
            )
        })
}

fn flag(v: &Value, key: &str) -> Option<bool> {
    field(v, key).and_then(Value::as_bool)
}

fn number(v: &Value, key: &str) -> Option<f64> {
    field(v, key).and_then(Value::as_f64)
}

/// A dtype named as `bfloat16`, `torch.bfloat16` or `{_target_: torch.bfloat16}`.
fn dtype_of(v: &Value) -> Option<DType> {
    let s = match v {
        Value::String(s) => s.as_str(),
        Value::Object(o) => o.get("_target_")?.as_str()?,
        _ => return None,
    };
    DType::from_torch_name(s.strip_prefix("torch.").unwrap_or(s))
}

/// The families whose forward pass is implemented, by HF architecture.
pub const ARCHITECTURES: [(&str, &str); 4] = [
    ("LlamaForCausalLM", "llama"),
    ("MistralForCausalLM", "mistral"),
    ("Qwen2ForCausalLM", "qwen2"),
    ("Qwen3ForCausalLM", "qwen3"),
];

impl Arch {
    /// Reads an HF `config.json`.
    ///
    /// # Errors
    /// Why no forward pass is implemented for it: another architecture, or an
    /// option the forward does not compute (another activation, MLP or output
    /// biases, rope types other than default/llama3/linear, quantized weights).
    pub fn from_hf_config(cfg: &Value) -> Result<Arch, String> {
        let arch = cfg
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str);
        let model_type = field(cfg, "model_type").and_then(Value::as_str);
        let family = ARCHITECTURES
            .iter()
            .find(|(a, t)| match arch {
                Some(arch) => arch == *a,
                None => model_type == Some(*t),
            })
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                format!(
                    "architecture {} has no forward pass here (dense Llama, Mistral, Qwen2 and Qwen3 do)",
                    arch.or(model_type).unwrap_or("(none)")
                )
            })?;
        let name = arch.unwrap_or(family).to_owned();
        let what = format!("config.json ({name})");
        let heads = count(cfg, "num_attention_heads", &what)?;
        let hidden = count(cfg, "hidden_size", &what)?;
        let groups = field(cfg, "num_key_value_heads")
            .and_then(Value::as_u64)
            .map_or(heads, |n| n as usize);
        if groups == 0 || heads % groups != 0 {
            return Err(format!(
                "{what}: num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}"
            ));
        }
        let act = field(cfg, "hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            return Err(format!(
                "{what}: hidden_act={act} (the forward computes SwiGLU)"
            ));
        }
        if flag(cfg, "mlp_bias") == Some(true) {
            return Err(format!("{what}: mlp_bias=true"));
        }
        if field(cfg, "quantization_config").is_some() {
            return Err(format!("{what}: quantized weights"));
        }
        let attention_bias = flag(cfg, "attention_bias") == Some(true);
        if attention_bias && family != "qwen2" {
            return Err(format!(
                "{what}: attention_bias=true (biases on the output projection)"
            ));
        }
        if family == "qwen2" && flag(cfg, "use_sliding_window") == Some(true) {
            return Err(format!("{what}: use_sliding_window=true"));
        }
        // transformers 5 keeps rope settings in rope_parameters; 4.x in rope_theta
        // and rope_scaling.
        let params = field(cfg, "rope_parameters");
        let rope_theta = params
            .and_then(|p| number(p, "rope_theta"))
            .or_else(|| number(cfg, "rope_theta"))
            .unwrap_or(10000.0);
        let rope = match field(cfg, "rope_scaling").or(params) {
            None => Rope::Default,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => Rope::Default,
                    "llama3" => Rope::Llama3 {
                        factor: number(s, "factor").unwrap_or(8.0),
                        low_freq_factor: number(s, "low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: number(s, "high_freq_factor").unwrap_or(4.0),
                        original_max_positions: number(s, "original_max_position_embeddings")
                            .unwrap_or(8192.0),
                    },
                    "linear" => Rope::Linear {
                        factor: number(s, "factor").unwrap_or(1.0),
                    },
                    other => return Err(format!("{what}: rope_type={other}")),
                }
            }
        };
        Ok(Arch {
            family: Some(family.to_owned()),
            layers: count(cfg, "num_hidden_layers", &what)?,
            hidden,
            ffn: count(cfg, "intermediate_size", &what)?,
            heads,
            groups,
            head_dim: field(cfg, "head_dim")
                .and_then(Value::as_u64)
                .map_or(hidden / heads, |n| n as usize),
            vocab: count(cfg, "vocab_size", &what)?,
            qkv_bias: family == "qwen2",
            qk_norm: family == "qwen3",
            tied: flag(cfg, "tie_word_embeddings"),
            eps: number(cfg, "rms_norm_eps").unwrap_or(1e-6) as f32,
            rope_theta,
            rope,
            window: if family == "mistral" {
                field(cfg, "sliding_window")
                    .and_then(Value::as_u64)
                    .map(|w| w as usize)
            } else {
                None
            },
            dtype: field(cfg, "dtype")
                .or_else(|| field(cfg, "torch_dtype"))
                .and_then(dtype_of),
            padded_vocab: None,
            name,
        })
    }

    /// Reads the `model:` section of a Megatron-Bridge `run_config.yaml` (as JSON).
    ///
    /// # Errors
    /// Why no forward pass is implemented for it: a missing size, or a model
    /// option the dense forward does not compute.
    pub fn from_run_config(rc: &Value) -> Result<Arch, String> {
        let m = rc
            .get("model")
            .ok_or("run_config.yaml has no model section")?;
        let what = "run_config.yaml model";
        let heads = count(m, "num_attention_heads", what)?;
        let hidden = count(m, "hidden_size", what)?;
        let groups = field(m, "num_query_groups")
            .and_then(Value::as_u64)
            .map_or(heads, |n| n as usize);
        if groups == 0 || heads % groups != 0 {
            return Err(format!(
                "{what}: num_attention_heads={heads} is not a multiple of num_query_groups={groups}"
            ));
        }
        let norm = field(m, "normalization")
            .and_then(Value::as_str)
            .unwrap_or("LayerNorm");
        if norm != "RMSNorm" {
            return Err(format!(
                "{what}: normalization={norm} (the forward computes RMSNorm)"
            ));
        }
        if flag(m, "gated_linear_unit") == Some(false) {
            return Err(format!("{what}: gated_linear_unit=false"));
        }
        if flag(m, "add_bias_linear") == Some(true) {
            return Err(format!("{what}: add_bias_linear=true"));
        }
        if let Some(act) = field(m, "activation_func") {
            let name = act
                .get("_target_")
                .and_then(Value::as_str)
                .or(act.as_str())
                .unwrap_or("");
            if !name.ends_with("silu") {
                return Err(format!(
                    "{what}: activation_func={name} (SwiGLU needs silu)"
                ));
            }
        }
        if let Some(p) = field(m, "position_embedding_type").and_then(Value::as_str)
            && p != "rope"
        {
            return Err(format!("{what}: position_embedding_type={p}"));
        }
        if number(m, "rotary_percent").is_some_and(|p| p != 1.0) {
            return Err(format!("{what}: rotary_percent other than 1.0"));
        }
        if m.get("num_moe_experts").is_some_and(|v| !v.is_null()) {
            return Err(format!("{what}: a mixture of experts"));
        }
        let rope = if flag(m, "rope_scaling") == Some(true) {
            // Megatron-Core's apply_rope_scaling fixes these three.
            Rope::Llama3 {
                factor: number(m, "rope_scaling_factor").unwrap_or(8.0),
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_positions: 8192.0,
            }
        } else if let Some(f) = number(m, "seq_len_interpolation_factor") {
            Rope::Linear { factor: f }
        } else {
            Rope::Default
        };
        let vocab = count(m, "vocab_size", what)?;
        let tp = field(m, "tensor_model_parallel_size")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .max(1) as usize;
        let padded_vocab = if flag(m, "should_pad_vocab") == Some(true) {
            let multiple = field(m, "make_vocab_size_divisible_by")
                .and_then(Value::as_u64)
                .unwrap_or(128)
                .max(1) as usize;
            Some(vocab.div_ceil(multiple * tp) * multiple * tp)
        } else {
            None
        };
        let window = field(m, "window_size")
            .and_then(Value::as_array)
            .and_then(|w| w.first())
            .and_then(Value::as_i64)
            .filter(|w| *w >= 0)
            .map(|w| w as usize + 1);
        Ok(Arch {
            name: "run_config.yaml".into(),
            family: None,
            layers: count(m, "num_layers", what)?,
            hidden,
            ffn: count(m, "ffn_hidden_size", what)?,
            heads,
            groups,
            head_dim: field(m, "kv_channels")
                .and_then(Value::as_u64)
                .map_or(hidden / heads, |n| n as usize),
            vocab,
            qkv_bias: flag(m, "add_qkv_bias") == Some(true),
            qk_norm: flag(m, "qk_layernorm") == Some(true),
            tied: flag(m, "share_embeddings_and_output_weights"),
            eps: number(m, "layernorm_epsilon").unwrap_or(1e-5) as f32,
            rope_theta: number(m, "rotary_base").unwrap_or(10000.0),
            rope,
            window,
            dtype: field(m, "params_dtype").and_then(dtype_of),
            padded_vocab,
        })
    }

    /// Query heads per key/value head.
    pub fn heads_per_group(&self) -> usize {
        self.heads / self.groups
    }

    /// Rows of the fused `linear_qkv`: (heads + 2 · groups) · head_dim.
    pub fn qkv_rows(&self) -> usize {
        (self.heads + 2 * self.groups) * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_and_megatron_configs_read_alike() {
        let hf = serde_json::json!({
            "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "num_hidden_layers": 2, "vocab_size": 130, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192},
            "tie_word_embeddings": true, "dtype": "bfloat16"
        });
        let a = Arch::from_hf_config(&hf).unwrap();
        assert_eq!((a.heads, a.groups, a.head_dim, a.vocab), (4, 2, 32, 130));
        assert!(a.qk_norm && !a.qkv_bias);
        assert_eq!(a.dtype, Some(DType::BF16));
        assert!(matches!(a.rope, Rope::Llama3 { factor, .. } if factor == 32.0));
        let rc = crate::formats::yaml::parse(
            "model:\n  num_layers: 2\n  hidden_size: 64\n  ffn_hidden_size: 96\n  num_attention_heads: 4\n  num_query_groups: 2\n  kv_channels: 32\n  vocab_size: 130\n  make_vocab_size_divisible_by: 128\n  should_pad_vocab: true\n  tensor_model_parallel_size: 2\n  normalization: \"RMSNorm\"\n  qk_layernorm: true\n  rope_scaling: true\n  rope_scaling_factor: 32.0\n  layernorm_epsilon: 0.000001\n  rotary_base: 500000.0\n  params_dtype: {_call_: false, _target_: torch.bfloat16}\n",
        )
        .unwrap();
        let m = Arch::from_run_config(&rc).unwrap();
        assert_eq!(m.padded_vocab, Some(256));
        assert_eq!((m.heads, m.groups, m.head_dim, m.layers), (4, 2, 32, 2));
        assert_eq!(m.rope, a.rope);
        assert_eq!(m.dtype, Some(DType::BF16));
        assert!(
            Arch::from_hf_config(&serde_json::json!({"architectures": ["GPT2LMHeadModel"]}))
                .is_err()
        );
    }
}
