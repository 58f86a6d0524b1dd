//! The dense GPT decoder that Llama, Mistral, Qwen2 and Qwen3 share, as
//! Megatron-Bridge maps it (`docs/mapping.md#dense-gpt`): every
//! layer an attention block and a SwiGLU MLP block, Megatron keys stacked on a
//! leading layer axis, and the `GPTModelProvider` fields of `run_config.yaml`.
//! A family reads its options here and adds or refuses its own.

use super::blocks::{Attention, AttentionNames, HfName, Mlp, MlpNames, Moe, MoeNames};
use super::config::{Config, ModelError};
use super::{Block, Divisor, HfNames, Model};
use crate::formats::run_config::Yaml;

/// Megatron-Bridge's provider of the dense families (the generic GPT provider
/// since v0.4; the family-specific Llama and Qwen providers are gone).
pub const PROVIDER: &str = "megatron.bridge.models.gpt_provider.GPTModelProvider";

/// Rotary scaling, as far as these families use it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3.1 frequency scaling; Megatron-Core takes only the factor.
    Llama3 {
        /// `factor`.
        factor: f64,
    },
    /// Linear position interpolation.
    Linear {
        /// `factor`.
        factor: f64,
    },
}

/// The parts of a Llama-style `config.json` every dense family shares.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseConfig {
    /// Decoder layers.
    pub layers: u64,
    /// Hidden size.
    pub hidden: u64,
    /// MLP intermediate size.
    pub ffn: u64,
    /// Attention heads.
    pub heads: u64,
    /// Query groups (key/value heads).
    pub groups: u64,
    /// Head dimension (kv channels).
    pub head_dim: u64,
    /// HF vocabulary size.
    pub vocab: u64,
    /// `tie_word_embeddings`, when the config says.
    pub tied: Option<bool>,
    /// `rope_theta`.
    pub rope_theta: f64,
    /// Rotary scaling.
    pub rope_scaling: RopeScaling,
    /// `rms_norm_eps`.
    pub norm_eps: f64,
    /// `max_position_embeddings`.
    pub max_positions: u64,
    /// `initializer_range`.
    pub init_std: f64,
    /// Things the user should know (a difference converted anyway).
    pub warnings: Vec<String>,
}

/// The values Megatron-Core 0.16's Llama 3 rope scaling fixes (it takes only the
/// factor): `original_max_position_embeddings`, `low_freq_factor`,
/// `high_freq_factor`.
pub const MCORE_LLAMA3_ROPE: [(&str, f64); 3] = [
    ("original_max_position_embeddings", 8192.0),
    ("low_freq_factor", 1.0),
    ("high_freq_factor", 4.0),
];

impl DenseConfig {
    /// Reads the fields shared by the dense families.
    ///
    /// # Errors
    /// [`ModelError`] naming a missing or impossible field, or an option these
    /// mappings cannot reproduce (another activation, MLP biases, quantization,
    /// rope scaling other than `llama3`/`linear` or a `llama3` scaling that
    /// Megatron-Core computes differently).
    pub fn read(c: &Config<'_>) -> Result<DenseConfig, ModelError> {
        let layers = c.count("num_hidden_layers")?;
        let hidden = c.count("hidden_size")?;
        let ffn = c.count("intermediate_size")?;
        let heads = c.count("num_attention_heads")?;
        let groups = c.count_or("num_key_value_heads", heads)?;
        let head_dim = c.count_or("head_dim", hidden / heads)?;
        let vocab = c.count("vocab_size")?;
        if !heads.is_multiple_of(groups) {
            return Err(c.unsupported(
                format!(
                    "num_attention_heads={heads} not a multiple of num_key_value_heads={groups}"
                ),
                None,
            ));
        }
        let act = c.text("hidden_act").unwrap_or("silu");
        if act != "silu" {
            return Err(c.unsupported(format!("hidden_act={act}"), Some("only silu, SwiGLU")));
        }
        if c.flag("mlp_bias") == Some(true) {
            return Err(c.unsupported("mlp_bias=true", None));
        }
        if c.get("quantization_config").is_some() {
            return Err(c.unsupported("quantization_config", Some("quantized weights")));
        }
        if c.flag("use_sliding_window") == Some(true) {
            return Err(c.unsupported("use_sliding_window=true", None));
        }
        // transformers 5 keeps rope settings in rope_parameters, 4.x in rope_theta
        // and rope_scaling.
        let params = c.get("rope_parameters");
        let rope_theta = match params.and_then(|p| p.get("rope_theta")) {
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| {
                    c.field_error("rope_parameters.rope_theta", "a number greater than 0")
                })?,
            None => c.positive("rope_theta", 10000.0)?,
        };
        let mut warnings = Vec::new();
        let rope_scaling = match c.get("rope_scaling").or(params) {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                let f = |k: &str| s.get(k).and_then(|v| v.as_f64());
                match kind {
                    "default" => RopeScaling::None,
                    "llama3" => {
                        let differ: Vec<String> = MCORE_LLAMA3_ROPE
                            .iter()
                            .filter_map(|(k, fixed)| {
                                f(k).filter(|v| v != fixed)
                                    .map(|v| format!("{k}={v} (Megatron-Core uses {fixed})"))
                            })
                            .collect();
                        if !differ.is_empty() && !c.overrides.rope_mismatch {
                            return Err(c.unsupported(
                                format!("llama3 rope scaling {}", differ.join(", ")),
                                Some("Megatron-Core 0.16 takes only the factor and fixes the others, so the converted model would compute different logits; allow_rope_mismatch=true converts anyway"),
                            ));
                        }
                        if !differ.is_empty() {
                            warnings.push(format!(
                                "llama3 rope scaling {}: converted anyway (allow_rope_mismatch=true); Megatron-Core computes with its own values, and the smoke test compares both under them",
                                differ.join(", ")
                            ));
                        }
                        RopeScaling::Llama3 {
                            factor: f("factor").unwrap_or(8.0),
                        }
                    }
                    "linear" => RopeScaling::Linear {
                        factor: f("factor").unwrap_or(1.0),
                    },
                    other => {
                        return Err(c.unsupported(format!("rope_scaling.rope_type={other}"), None));
                    }
                }
            }
        };
        Ok(DenseConfig {
            layers,
            hidden,
            ffn,
            heads,
            groups,
            head_dim,
            vocab,
            tied: c.flag("tie_word_embeddings"),
            rope_theta,
            rope_scaling,
            norm_eps: c.positive("rms_norm_eps", 1e-6)?,
            max_positions: c.count_or("max_position_embeddings", 4096)?,
            init_std: c.number("initializer_range", 0.02)?,
            warnings,
        })
    }
}

/// `attention_bias` for the families that may set it.
pub fn attention_bias(c: &Config<'_>) -> bool {
    c.flag("attention_bias").unwrap_or(false)
}

/// Transformers' Llama-style names, in state-dict order within a layer.
pub const ATTENTION_NAMES: AttentionNames = AttentionNames {
    q: HfName("self_attn.q_proj", 0),
    k: HfName("self_attn.k_proj", 2),
    v: HfName("self_attn.v_proj", 4),
    o: HfName("self_attn.o_proj", 6),
    q_norm: HfName("self_attn.q_norm", 7),
    k_norm: HfName("self_attn.k_norm", 8),
    norm: HfName("input_layernorm", 20),
};

/// Transformers' Llama-style MLP names.
pub const MLP_NAMES: MlpNames = MlpNames {
    gate: HfName("mlp.gate_proj", 10),
    up: HfName("mlp.up_proj", 11),
    down: HfName("mlp.down_proj", 12),
    norm: HfName("post_attention_layernorm", 21),
};

/// Transformers' names outside the layers.
pub const HF_NAMES: HfNames = HfNames {
    embed: "model.embed_tokens.weight",
    layers: "model.layers.",
    final_norm: "model.norm.weight",
    head: "lm_head.weight",
};

/// The mixture of experts that replaces the dense MLP in every layer of a
/// GPT-style MoE family (Qwen3-MoE, Mixtral).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeOptions {
    /// The block (its HF names are the family's).
    pub block: Moe,
    /// Experts each token is routed to.
    pub topk: u64,
    /// The routing weights of the chosen experts are renormalised to sum to one
    /// (`norm_topk_prob`); Megatron-Core's softmax router computes that as a
    /// softmax after the top-k (`moe_router_pre_softmax=false`).
    pub norm_topk: bool,
    /// `router_aux_loss_coef` (a training setting, recorded).
    pub aux_loss_coeff: f64,
}

impl MoeOptions {
    /// Reads the router and experts of a GPT-style MoE family: `num_experts` (or
    /// `num_local_experts`), `num_experts_per_tok`, `moe_intermediate_size` (or
    /// `intermediate_size`), `norm_topk_prob`, `router_aux_loss_coef`.
    ///
    /// # Errors
    /// [`ModelError`] for a missing or impossible field.
    pub fn read(
        c: &Config<'_>,
        hidden: u64,
        names: MoeNames,
        ffn_key: &str,
        norm_topk_default: bool,
    ) -> Result<MoeOptions, ModelError> {
        let experts = match c.get("num_experts") {
            Some(_) => c.count("num_experts")?,
            None => c.count("num_local_experts")?,
        };
        let topk = c.count("num_experts_per_tok")?;
        if topk > experts {
            return Err(c.field_error(
                "num_experts_per_tok",
                &format!("at most the {experts} experts"),
            ));
        }
        Ok(MoeOptions {
            block: Moe {
                hidden,
                experts,
                ffn: c.count(ffn_key)?,
                gated: true,
                router_bias: false,
                shared_ffn: None,
                latent: None,
                names,
            },
            topk,
            norm_topk: c.flag("norm_topk_prob").unwrap_or(norm_topk_default),
            aux_loss_coeff: c.number("router_aux_loss_coef", 0.001)?,
        })
    }

    /// The `model:` fields of Megatron-Bridge's MoE GPT provider.
    fn provider_fields(&self) -> Vec<(String, Yaml)> {
        let m = &self.block;
        vec![
            ("num_moe_experts".into(), Yaml::Int(m.experts as i64)),
            ("moe_router_topk".into(), Yaml::Int(self.topk as i64)),
            ("moe_ffn_hidden_size".into(), Yaml::Int(m.ffn as i64)),
            ("moe_router_score_function".into(), Yaml::str("softmax")),
            ("moe_router_pre_softmax".into(), Yaml::Bool(!self.norm_topk)),
            ("moe_grouped_gemm".into(), Yaml::Bool(true)),
            (
                "moe_router_load_balancing_type".into(),
                Yaml::str("aux_loss"),
            ),
            (
                "moe_aux_loss_coeff".into(),
                Yaml::Float(self.aux_loss_coeff),
            ),
            ("moe_token_dispatcher_type".into(), Yaml::str("alltoall")),
            ("moe_permute_fusion".into(), Yaml::Bool(true)),
            ("moe_layer_freq".into(), Yaml::Int(1)),
        ]
    }
}

/// What a dense family adds to the shared decoder.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    /// Biases on q, k and v (Qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k (Qwen3).
    pub qk_norm: bool,
    /// Sliding-window attention width (Mistral), recorded as `window_size`.
    pub sliding_window: Option<u64>,
    /// Provider fields a family sets beyond the shared ones.
    pub provider_extras: Vec<(&'static str, Yaml)>,
    /// A mixture of experts in every layer instead of the dense MLP.
    pub moe: Option<MoeOptions>,
}

/// Builds the model of a dense family: `provider` is Megatron-Bridge's provider
/// class for `run_config.yaml`.
pub fn model(
    c: &Config<'_>,
    family: &'static str,
    provider: &str,
    d: &DenseConfig,
    o: &Options,
) -> Model {
    let attention = Attention {
        hidden: d.hidden,
        heads: d.heads,
        groups: d.groups,
        head_dim: d.head_dim,
        qkv_bias: o.qkv_bias,
        qk_norm: o.qk_norm,
        names: ATTENTION_NAMES,
    };
    let ffn = match &o.moe {
        Some(m) => Block::Moe(m.block.clone()),
        None => Block::Mlp(Mlp {
            hidden: d.hidden,
            ffn: d.ffn,
            gated: true,
            names: MLP_NAMES,
        }),
    };
    let layer = vec![Block::Attention(attention), ffn];
    let mut divisors = vec![
        Divisor {
            param: "tp",
            field: "num_attention_heads",
            value: d.heads,
        },
        Divisor {
            param: "tp",
            field: "num_key_value_heads",
            value: d.groups,
        },
    ];
    match &o.moe {
        Some(m) => divisors.extend([
            Divisor {
                param: "ep",
                field: "num_experts",
                value: m.block.experts,
            },
            Divisor {
                param: "etp",
                field: "moe_intermediate_size",
                value: m.block.ffn,
            },
        ]),
        None => divisors.push(Divisor {
            param: "tp",
            field: "intermediate_size",
            value: d.ffn,
        }),
    }
    Model {
        family,
        architecture: c.architecture.clone(),
        config_path: c.path.clone(),
        vocab: d.vocab,
        hidden: d.hidden,
        tied: d.tied,
        layers: vec![layer; d.layers as usize],
        hf: HF_NAMES,
        stacked: true,
        final_norm: &[
            "decoder.final_layernorm.weight",
            "decoder.final_norm.weight",
        ],
        megatron_config: provider_fields(provider, d, o),
        warnings: d.warnings.clone(),
        output_extra_state: false,
        mtp: None,
        divisors,
    }
}

/// The `model:` fields of a `GPTModelProvider` that follow from `config.json`.
fn provider_fields(provider: &str, d: &DenseConfig, o: &Options) -> Vec<(String, Yaml)> {
    let mut f: Vec<(String, Yaml)> = vec![
        ("_target_".into(), Yaml::str(provider)),
        ("num_layers".into(), Yaml::Int(d.layers as i64)),
        ("hidden_size".into(), Yaml::Int(d.hidden as i64)),
        ("ffn_hidden_size".into(), Yaml::Int(d.ffn as i64)),
        ("num_attention_heads".into(), Yaml::Int(d.heads as i64)),
        ("num_query_groups".into(), Yaml::Int(d.groups as i64)),
        ("kv_channels".into(), Yaml::Int(d.head_dim as i64)),
        ("seq_length".into(), Yaml::Int(d.max_positions as i64)),
        ("normalization".into(), Yaml::str("RMSNorm")),
        ("layernorm_epsilon".into(), Yaml::Float(d.norm_eps)),
        ("gated_linear_unit".into(), Yaml::Bool(true)),
        ("add_bias_linear".into(), Yaml::Bool(false)),
        ("add_qkv_bias".into(), Yaml::Bool(o.qkv_bias)),
        ("qk_layernorm".into(), Yaml::Bool(o.qk_norm)),
        ("position_embedding_type".into(), Yaml::str("rope")),
        ("rotary_base".into(), Yaml::Float(d.rope_theta)),
        ("rotary_percent".into(), Yaml::Float(1.0)),
        ("hidden_dropout".into(), Yaml::Float(0.0)),
        ("attention_dropout".into(), Yaml::Float(0.0)),
        ("init_method_std".into(), Yaml::Float(d.init_std)),
        (
            "activation_func".into(),
            Yaml::object("torch.nn.functional.silu"),
        ),
        (
            "transformer_layer_spec".into(),
            Yaml::object("megatron.bridge.models.gpt_provider.default_layer_spec"),
        ),
        ("perform_initialization".into(), Yaml::Bool(false)),
    ];
    for (k, v) in &o.provider_extras {
        f.push(((*k).to_owned(), v.clone()));
    }
    if let Some(m) = &o.moe {
        f.extend(m.provider_fields());
    }
    match &d.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Llama3 { factor } => {
            f.push(("rope_scaling".into(), Yaml::Bool(true)));
            f.push(("rope_scaling_factor".into(), Yaml::Float(*factor)));
        }
        RopeScaling::Linear { factor } => {
            f.push(("seq_len_interpolation_factor".into(), Yaml::Float(*factor)));
        }
    }
    if let Some(w) = o.sliding_window {
        f.push((
            "window_size".into(),
            Yaml::List(vec![Yaml::Int(w as i64 - 1), Yaml::Int(0)]),
        ));
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn llama3_scaling_megatron_cannot_express_is_refused_by_name() {
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 128,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        });
        let e = DenseConfig::read(&Config::new(&json, Path::new("/m")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("low_freq_factor=2 (Megatron-Core uses 1)"),
            "{e}"
        );
        assert!(!e.contains("high_freq_factor"), "{e}");
        let mut ok = json.clone();
        ok["rope_scaling"]["low_freq_factor"] = 1.0.into();
        let d = DenseConfig::read(&Config::new(&ok, Path::new("/m"))).unwrap();
        assert_eq!(d.rope_scaling, RopeScaling::Llama3 { factor: 32.0 });
        assert!(d.warnings.is_empty());
        // Asked for, it converts and says so.
        let mut c = Config::new(&json, Path::new("/m"));
        c.overrides.rope_mismatch = true;
        let d = DenseConfig::read(&c).unwrap();
        assert!(
            d.warnings[0].contains("low_freq_factor=2"),
            "{:?}",
            d.warnings
        );
    }

    #[test]
    fn impossible_rope_and_norm_values_are_refused() {
        let base = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 128});
        for (key, value) in [("rope_theta", 0.0), ("rms_norm_eps", -1e-5)] {
            let mut j = base.clone();
            j[key] = value.into();
            let e = DenseConfig::read(&Config::new(&j, Path::new("/m")))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!(
                    "/m/config.json: {key}: expected a number greater than 0"
                )),
                "{e}"
            );
        }
    }
}
