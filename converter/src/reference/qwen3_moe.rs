//! Qwen3-MoE as transformers defines it: Qwen3's attention (q/k norm) and, in
//! every layer, a softmax router over SwiGLU experts (`mlp.gate`,
//! `mlp.experts.{e}.{gate,up,down}_proj`), the top-k weights renormalised when
//! `norm_topk_prob`.

use serde_json::Value;

use super::dense::{self, NAMES as DENSE};
use super::{Act, Arch, Family, HfNames, MoeArch, NotSupported, Scoring, Sub, count, flag};

/// The Qwen3-MoE family.
pub static FAMILY: Family = Family {
    architecture: "Qwen3MoeForCausalLM",
    model_type: "qwen3_moe",
    read,
    names: HfNames {
        moe: [
            "mlp.gate",
            "",
            "mlp.experts.",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        ..DENSE
    },
};

/// The softmax router and SwiGLU experts of a GPT-style MoE configuration.
///
/// # Errors
/// A missing size.
pub fn moe(
    cfg: &Value,
    what: &str,
    ffn_key: &str,
    renormalise: bool,
) -> Result<MoeArch, NotSupported> {
    let experts =
        count(cfg, "num_experts", what).or_else(|_| count(cfg, "num_local_experts", what))?;
    Ok(MoeArch {
        experts,
        topk: count(cfg, "num_experts_per_tok", what)?,
        ffn: count(cfg, ffn_key, what)?,
        act: Act::SwiGlu,
        scoring: if renormalise {
            Scoring::TopkRenormalised
        } else {
            Scoring::SoftmaxThenTopk
        },
        expert_bias: false,
        groups: (1, 1),
        scaling: 1.0,
        shared_ffn: None,
        latent: None,
    })
}

fn read(cfg: &Value, name: &str) -> Result<Arch, NotSupported> {
    let what = format!("config.json ({name})");
    let (hidden, vocab, eps, tied) = dense::common(cfg, &what)?;
    if count(cfg, "decoder_sparse_step", &what).unwrap_or(1) != 1
        || cfg
            .get("mlp_only_layers")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    {
        return Err(format!("{what}: dense layers between the MoE layers"));
    }
    let attention = dense::attention(cfg, &what, false, true)?;
    let renormalise = flag(cfg, "norm_topk_prob").unwrap_or(false);
    Ok(Arch {
        attention: Some(attention),
        moe: Some(moe(cfg, &what, "moe_intermediate_size", renormalise)?),
        ..Arch::new(
            name,
            hidden,
            vocab,
            eps,
            tied,
            vec![vec![Sub::Attention, Sub::Moe]; count(cfg, "num_hidden_layers", &what)?],
        )
    })
}
