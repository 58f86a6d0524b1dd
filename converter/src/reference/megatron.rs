//! Megatron-Core's side: the `model:` section of a Megatron-Bridge
//! `run_config.yaml` read with Megatron-Core's `TransformerConfig` names and
//! defaults, and the names Megatron-Core gives a model's tensors.

use serde_json::Value;

use super::{
    Act, Arch, AttentionArch, MambaArch, MlpArch, MoeArch, NotSupported, Rope, Scoring, Sub, count,
    count_or, dtype_of, field, flag, number,
};

fn activation(m: &Value, what: &str, gated: bool) -> Result<Act, NotSupported> {
    let name = field(m, "activation_func")
        .map(|a| {
            a.get("_target_")
                .and_then(Value::as_str)
                .or(a.as_str())
                .unwrap_or("")
        })
        .unwrap_or(if gated { "silu" } else { "gelu" });
    match (gated, name) {
        (true, n) if n.ends_with("silu") => Ok(Act::SwiGlu),
        (false, n) if n.ends_with("squared_relu") => Ok(Act::SquaredRelu),
        (g, n) => Err(format!(
            "{what}: activation_func={n} with gated_linear_unit={g} (the forward computes SwiGLU and squared ReLU)"
        )),
    }
}

/// Reads the `model:` section of a `run_config.yaml` (as JSON).
///
/// # Errors
/// Why no forward pass is implemented for it: a missing size, or an option the
/// forward does not compute.
pub fn read(rc: &Value) -> Result<Arch, NotSupported> {
    let m = rc
        .get("model")
        .ok_or("run_config.yaml has no model section")?;
    let what = "run_config.yaml model";
    let norm = field(m, "normalization")
        .and_then(Value::as_str)
        .unwrap_or("LayerNorm");
    if norm != "RMSNorm" {
        return Err(format!(
            "{what}: normalization={norm} (the forward computes RMSNorm)"
        ));
    }
    if flag(m, "add_bias_linear") == Some(true) {
        return Err(format!("{what}: add_bias_linear=true"));
    }
    if number(m, "rotary_percent").is_some_and(|p| p != 1.0) {
        return Err(format!("{what}: rotary_percent other than 1.0"));
    }
    let hidden = count(m, "hidden_size", what)?;
    let gated = flag(m, "gated_linear_unit").unwrap_or(false);
    let hybrid =
        flag(m, "is_hybrid_model") == Some(true) || field(m, "hybrid_override_pattern").is_some();
    let experts = field(m, "num_moe_experts").and_then(Value::as_u64);
    let layers: Vec<Vec<Sub>> = if hybrid {
        let p = field(m, "hybrid_override_pattern")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{what}: a hybrid model without hybrid_override_pattern"))?;
        super::nemotron_h::pattern_layers(p.split('/').next().unwrap_or(""), what)?
    } else {
        if experts.is_some() && count_or(m, "moe_layer_freq", 1) != 1 {
            return Err(format!("{what}: moe_layer_freq other than 1"));
        }
        let ffn = if experts.is_some() {
            Sub::Moe
        } else {
            Sub::Mlp
        };
        vec![vec![Sub::Attention, ffn]; count(m, "num_layers", what)?]
    };
    let mtp = match count_or(m, "mtp_num_layers", 0) {
        0 => None,
        depth => {
            let p = field(m, "mtp_hybrid_override_pattern")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    format!("{what}: mtp_num_layers={depth} without mtp_hybrid_override_pattern")
                })?;
            let subs = super::nemotron_h::pattern_layers(p, what)?
                .into_iter()
                .flatten()
                .collect::<Vec<_>>();
            Some((depth, subs))
        }
    };
    let has = |s: Sub| {
        layers.iter().flatten().any(|x| *x == s)
            || mtp.as_ref().is_some_and(|(_, l)| l.contains(&s))
    };
    let attention = if has(Sub::Attention) {
        let heads = count(m, "num_attention_heads", what)?;
        let groups = count_or(m, "num_query_groups", heads);
        if groups == 0 || heads % groups != 0 {
            return Err(format!(
                "{what}: num_attention_heads={heads} is not a multiple of num_query_groups={groups}"
            ));
        }
        let rope = match field(m, "position_embedding_type").and_then(Value::as_str) {
            Some("none") => None,
            Some("rope") | None => {
                let scaling = if flag(m, "rope_scaling") == Some(true) {
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
                Some((number(m, "rotary_base").unwrap_or(10000.0), scaling))
            }
            Some(p) => return Err(format!("{what}: position_embedding_type={p}")),
        };
        Some(AttentionArch {
            heads,
            groups,
            head_dim: field(m, "kv_channels")
                .and_then(Value::as_u64)
                .map_or(hidden / heads, |n| n as usize),
            qkv_bias: flag(m, "add_qkv_bias") == Some(true),
            qk_norm: flag(m, "qk_layernorm") == Some(true),
            rope,
            window: field(m, "window_size")
                .and_then(Value::as_array)
                .and_then(|w| w.first())
                .and_then(Value::as_i64)
                .filter(|w| *w >= 0)
                .map(|w| w as usize + 1),
        })
    } else {
        None
    };
    let mlp = if has(Sub::Mlp) {
        Some(MlpArch {
            ffn: count(m, "ffn_hidden_size", what)?,
            act: activation(m, what, gated)?,
        })
    } else {
        None
    };
    let moe = if has(Sub::Moe) {
        let score = field(m, "moe_router_score_function")
            .and_then(Value::as_str)
            .unwrap_or("softmax");
        let scoring = match score {
            "softmax" if flag(m, "moe_router_pre_softmax") == Some(true) => {
                Scoring::SoftmaxThenTopk
            }
            "softmax" => Scoring::TopkRenormalised,
            "sigmoid" => Scoring::Sigmoid,
            other => return Err(format!("{what}: moe_router_score_function={other}")),
        };
        Some(MoeArch {
            experts: count(m, "num_moe_experts", what)?,
            topk: count(m, "moe_router_topk", what)?,
            ffn: count(m, "moe_ffn_hidden_size", what)?,
            act: activation(m, what, gated)?,
            scoring,
            expert_bias: flag(m, "moe_router_enable_expert_bias") == Some(true),
            groups: (
                count_or(m, "moe_router_num_groups", 1),
                count_or(m, "moe_router_group_topk", 1),
            ),
            scaling: number(m, "moe_router_topk_scaling_factor").unwrap_or(1.0) as f32,
            shared_ffn: field(m, "moe_shared_expert_intermediate_size")
                .and_then(Value::as_u64)
                .map(|s| s as usize),
            latent: field(m, "moe_latent_size")
                .and_then(Value::as_u64)
                .map(|l| l as usize),
        })
    } else {
        None
    };
    let mamba = if has(Sub::Mamba) {
        Some(MambaArch {
            heads: count(m, "mamba_num_heads", what)?,
            head_dim: count(m, "mamba_head_dim", what)?,
            groups: count(m, "mamba_num_groups", what)?,
            state: count(m, "mamba_state_dim", what)?,
            // Not recorded by Megatron-Bridge (Megatron-Core's default is 4); the
            // stored convolution says.
            conv_kernel: None,
            dt_min: 0.0,
        })
    } else {
        None
    };
    let vocab = count(m, "vocab_size", what)?;
    let tp = count_or(m, "tensor_model_parallel_size", 1).max(1);
    let padded_vocab = if flag(m, "should_pad_vocab") == Some(true) {
        let multiple = count_or(m, "make_vocab_size_divisible_by", 128).max(1);
        Some(vocab.div_ceil(multiple * tp) * multiple * tp)
    } else {
        None
    };
    Ok(Arch {
        name: "run_config.yaml".into(),
        family: None,
        hidden,
        vocab,
        tied: flag(m, "share_embeddings_and_output_weights"),
        eps: number(m, "layernorm_epsilon").unwrap_or(1e-5) as f32,
        layers,
        attention,
        mlp,
        moe,
        mamba,
        dtype: field(m, "params_dtype").and_then(dtype_of),
        padded_vocab,
        mtp,
    })
}

/// Megatron-Core's name of a layer tensor, relative to the layer: the norm before
/// block `sub` (fused into its first projection, or separate), with the
/// alternative spelling Megatron-Core accepts.
pub fn norm_names(sub: Sub) -> &'static [&'static str] {
    match sub {
        Sub::Attention => &[
            "self_attention.linear_qkv.layer_norm_weight",
            "input_layernorm.weight",
        ],
        Sub::Mlp => &[
            "mlp.linear_fc1.layer_norm_weight",
            "pre_mlp_layernorm.weight",
        ],
        Sub::Moe => &["pre_mlp_layernorm.weight"],
        Sub::Mamba => &["mixer.in_proj.layer_norm_weight", "norm.weight"],
    }
}
