//! The dense decoders: Llama, Mistral, Qwen2 (biases on q, k, v) and Qwen3 (per-head
//! q/k norm), as transformers' modeling code defines them: every layer attention
//! then a SwiGLU MLP, each after an RMSNorm.

use serde_json::Value;

use super::{
    Act, Arch, AttentionArch, Family, HfNames, MlpArch, NotSupported, Rope, Sub, count, field,
    flag, number,
};

/// Transformers' Llama-style names.
pub const NAMES: HfNames = HfNames {
    embed: "model.embed_tokens.weight",
    layers: "model.layers.",
    final_norm: "model.norm.weight",
    head: "lm_head.weight",
    norms: &["input_layernorm", "post_attention_layernorm"],
    attention: [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "self_attn.q_norm",
        "self_attn.k_norm",
    ],
    mlp: ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    moe: [
        "mlp.gate",
        "",
        "mlp.experts.",
        "gate_proj",
        "up_proj",
        "down_proj",
    ],
    moe_extra: ["", "", "", "", ""],
    mamba: "",
};

/// Llama.
pub static LLAMA: Family = Family {
    architecture: "LlamaForCausalLM",
    model_type: "llama",
    read: |c, n| read(c, n, "llama"),
    names: NAMES,
};

/// Mistral.
pub static MISTRAL: Family = Family {
    architecture: "MistralForCausalLM",
    model_type: "mistral",
    read: |c, n| read(c, n, "mistral"),
    names: NAMES,
};

/// Qwen2.
pub static QWEN2: Family = Family {
    architecture: "Qwen2ForCausalLM",
    model_type: "qwen2",
    read: |c, n| read(c, n, "qwen2"),
    names: NAMES,
};

/// Qwen3.
pub static QWEN3: Family = Family {
    architecture: "Qwen3ForCausalLM",
    model_type: "qwen3",
    read: |c, n| read(c, n, "qwen3"),
    names: NAMES,
};

/// The attention of a Llama-style `config.json` (rope from `rope_parameters` in
/// transformers 5, `rope_theta`/`rope_scaling` in 4.x).
///
/// # Errors
/// Why the forward does not compute it.
pub fn attention(
    cfg: &Value,
    what: &str,
    qkv_bias: bool,
    qk_norm: bool,
) -> Result<AttentionArch, NotSupported> {
    let heads = count(cfg, "num_attention_heads", what)?;
    let hidden = count(cfg, "hidden_size", what)?;
    let groups = field(cfg, "num_key_value_heads")
        .and_then(Value::as_u64)
        .map_or(heads, |n| n as usize);
    if groups == 0 || heads % groups != 0 {
        return Err(format!(
            "{what}: num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}"
        ));
    }
    let params = field(cfg, "rope_parameters");
    let theta = params
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
    Ok(AttentionArch {
        heads,
        groups,
        head_dim: field(cfg, "head_dim")
            .and_then(Value::as_u64)
            .map_or(hidden / heads, |n| n as usize),
        qkv_bias,
        qk_norm,
        rope: Some((theta, rope)),
        window: None,
    })
}

/// What the dense and MoE GPT families share: the size fields and the refusals.
///
/// # Errors
/// Why the forward does not compute the model.
pub fn common(cfg: &Value, what: &str) -> Result<(usize, usize, f32, Option<bool>), NotSupported> {
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
    Ok((
        count(cfg, "hidden_size", what)?,
        count(cfg, "vocab_size", what)?,
        number(cfg, "rms_norm_eps").unwrap_or(1e-6) as f32,
        flag(cfg, "tie_word_embeddings"),
    ))
}

fn read(cfg: &Value, name: &str, family: &str) -> Result<Arch, NotSupported> {
    let what = format!("config.json ({name})");
    let (hidden, vocab, eps, tied) = common(cfg, &what)?;
    let attention_bias = flag(cfg, "attention_bias") == Some(true);
    if attention_bias && family != "qwen2" {
        return Err(format!(
            "{what}: attention_bias=true (biases on the output projection)"
        ));
    }
    if family == "qwen2" && flag(cfg, "use_sliding_window") == Some(true) {
        return Err(format!("{what}: use_sliding_window=true"));
    }
    let mut attention = attention(cfg, &what, family == "qwen2", family == "qwen3")?;
    if family == "mistral" {
        attention.window = field(cfg, "sliding_window")
            .and_then(Value::as_u64)
            .map(|w| w as usize);
    }
    let layers = count(cfg, "num_hidden_layers", &what)?;
    Ok(Arch {
        attention: Some(attention),
        mlp: Some(MlpArch {
            ffn: count(cfg, "intermediate_size", &what)?,
            act: Act::SwiGlu,
        }),
        ..Arch::new(
            name,
            hidden,
            vocab,
            eps,
            tied,
            vec![vec![Sub::Attention, Sub::Mlp]; layers],
        )
    })
}
