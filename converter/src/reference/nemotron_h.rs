//! Nemotron-H as transformers 5 defines it (`NemotronHForCausalLM`): one block per
//! layer after an RMSNorm, by the layer pattern: a Mamba-2 mixer (`M`), attention
//! without position embedding (`*`), a squared-ReLU MLP (`-`), or a mixture of
//! squared-ReLU experts with a shared expert (`E`), routed by sigmoid scores
//! chosen with a score-correction bias within groups, renormalised and scaled.
//!
//! The Mamba-2 time step: transformers clamps it from below at `time_step_min`
//! (Megatron-Core at 0); the smoke test compares like with like, so a conversion
//! is checked with the source's rule on both sides.

use serde_json::Value;

use super::{
    Act, Arch, AttentionArch, Family, HfNames, MambaArch, MlpArch, MoeArch, NotSupported, Scoring,
    Sub, count, count_or, field, flag, number,
};

/// The Nemotron-H family.
pub static FAMILY: Family = Family {
    architecture: "NemotronHForCausalLM",
    model_type: "nemotron_h",
    read,
    names: HfNames {
        embed: "backbone.embeddings.weight",
        layers: "backbone.layers.",
        final_norm: "backbone.norm_f.weight",
        head: "lm_head.weight",
        norms: &["norm"],
        attention: [
            "mixer.q_proj",
            "mixer.k_proj",
            "mixer.v_proj",
            "mixer.o_proj",
            "",
            "",
        ],
        mlp: ["", "mixer.up_proj", "mixer.down_proj"],
        moe: [
            "mixer.gate",
            "mixer.gate.e_score_correction_bias",
            "mixer.experts.",
            "",
            "up_proj",
            "down_proj",
        ],
        moe_extra: [
            "",
            "mixer.shared_experts.up_proj",
            "mixer.shared_experts.down_proj",
            "mixer.fc1_latent_proj",
            "mixer.fc2_latent_proj",
        ],
        mamba: "mixer.",
    },
};

/// The blocks of a layer pattern (`M*-E`).
///
/// # Errors
/// A character that names no block.
pub fn pattern_layers(pattern: &str, what: &str) -> Result<Vec<Vec<Sub>>, NotSupported> {
    pattern
        .chars()
        .filter(|c| *c != '|')
        .map(|c| {
            Ok(vec![match c {
                'M' => Sub::Mamba,
                '*' => Sub::Attention,
                '-' => Sub::Mlp,
                'E' => Sub::Moe,
                other => {
                    return Err(format!(
                        "{what}: a {other:?} layer in the pattern {pattern:?}"
                    ));
                }
            }])
        })
        .collect()
}

/// `num_nextn_predict_layers` and the pattern of one depth
/// (`mtp_hybrid_override_pattern`, `mtp_layers_block_type`, or the part of
/// `hybrid_override_pattern` after `/`).
fn mtp(cfg: &Value, what: &str) -> Result<Option<(usize, Vec<Sub>)>, NotSupported> {
    let depth = count_or(cfg, "num_nextn_predict_layers", 0);
    if depth == 0 {
        return Ok(None);
    }
    let subs: Vec<Sub> =
        if let Some(p) = field(cfg, "mtp_hybrid_override_pattern").and_then(Value::as_str) {
            pattern_layers(p, what)?.into_iter().flatten().collect()
        } else if let Some(list) = field(cfg, "mtp_layers_block_type").and_then(Value::as_array) {
            list.iter()
                .map(|t| match t.as_str() {
                    Some("full_attention" | "attention") => Ok(Sub::Attention),
                    Some("mlp") => Ok(Sub::Mlp),
                    Some("moe") => Ok(Sub::Moe),
                    _ => Err(format!("{what}: multi-token-prediction layer type {t}")),
                })
                .collect::<Result<_, NotSupported>>()?
        } else if let Some((_, p)) = field(cfg, "hybrid_override_pattern")
            .and_then(Value::as_str)
            .and_then(|p| p.split_once('/'))
        {
            pattern_layers(p.split('/').next().unwrap_or(""), what)?
                .into_iter()
                .flatten()
                .collect()
        } else {
            return Err(format!(
                "{what}: num_nextn_predict_layers={depth} without the layers' pattern"
            ));
        };
    Ok(Some((depth, subs)))
}

fn read(cfg: &Value, name: &str) -> Result<Arch, NotSupported> {
    let what = format!("config.json ({name})");
    let layers = if let Some(p) = field(cfg, "hybrid_override_pattern").and_then(Value::as_str) {
        pattern_layers(p.split('/').next().unwrap_or(""), &what)?
    } else {
        let list = field(cfg, "layers_block_type")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("{what}: no hybrid_override_pattern or layers_block_type"))?;
        list.iter()
            .map(|t| {
                Ok(vec![match t.as_str() {
                    Some("linear_attention" | "mamba") => Sub::Mamba,
                    Some("full_attention" | "attention") => Sub::Attention,
                    Some("mlp") => Sub::Mlp,
                    Some("moe") => Sub::Moe,
                    _ => return Err(format!("{what}: layer type {t}")),
                }])
            })
            .collect::<Result<_, NotSupported>>()?
    };
    let mtp = mtp(cfg, &what)?;
    let has = |s: Sub| {
        layers.iter().flatten().any(|x| *x == s)
            || mtp.as_ref().is_some_and(|(_, l)| l.contains(&s))
    };
    let hidden = count(cfg, "hidden_size", &what)?;
    let attention = if has(Sub::Attention) {
        let heads = count(cfg, "num_attention_heads", &what)?;
        Some(AttentionArch {
            heads,
            groups: count_or(cfg, "num_key_value_heads", heads),
            head_dim: field(cfg, "head_dim")
                .or_else(|| field(cfg, "attention_head_dim"))
                .and_then(Value::as_u64)
                .map_or(hidden / heads, |n| n as usize),
            qkv_bias: false,
            qk_norm: false,
            rope: None,
            window: None,
        })
    } else {
        None
    };
    let mlp = if has(Sub::Mlp) {
        Some(MlpArch {
            ffn: count(cfg, "intermediate_size", &what)?,
            act: Act::SquaredRelu,
        })
    } else {
        None
    };
    let moe = if has(Sub::Moe) {
        let shared = count_or(cfg, "n_shared_experts", 1);
        if flag(cfg, "norm_topk_prob") == Some(false) {
            return Err(format!("{what}: norm_topk_prob=false"));
        }
        Some(MoeArch {
            experts: count(cfg, "n_routed_experts", &what)?,
            topk: count(cfg, "num_experts_per_tok", &what)?,
            ffn: count(cfg, "moe_intermediate_size", &what)?,
            act: Act::SquaredRelu,
            scoring: Scoring::Sigmoid,
            expert_bias: true,
            groups: (count_or(cfg, "n_group", 1), count_or(cfg, "topk_group", 1)),
            scaling: number(cfg, "routed_scaling_factor").unwrap_or(1.0) as f32,
            shared_ffn: (shared > 0)
                .then(|| count(cfg, "moe_shared_expert_intermediate_size", &what))
                .transpose()?
                .map(|s| s * shared),
            latent: field(cfg, "moe_latent_size")
                .and_then(Value::as_u64)
                .map(|l| l as usize),
        })
    } else {
        None
    };
    let mamba = if has(Sub::Mamba) {
        Some(MambaArch {
            heads: count(cfg, "mamba_num_heads", &what)?,
            head_dim: count(cfg, "mamba_head_dim", &what)?,
            groups: count(cfg, "n_groups", &what)?,
            state: count(cfg, "ssm_state_size", &what)?,
            conv_kernel: Some(count_or(cfg, "conv_kernel", 4)),
            dt_min: number(cfg, "time_step_min").unwrap_or(0.001) as f32,
        })
    } else {
        None
    };
    Ok(Arch {
        name: name.to_owned(),
        family: None,
        hidden,
        vocab: count(cfg, "vocab_size", &what)?,
        tied: flag(cfg, "tie_word_embeddings"),
        eps: number(cfg, "layer_norm_epsilon")
            .or_else(|| number(cfg, "norm_eps"))
            .unwrap_or(1e-5) as f32,
        layers,
        attention,
        mlp,
        moe,
        mamba,
        dtype: None,
        padded_vocab: None,
        mtp,
    })
}
