//! Mixtral as transformers defines it: Mistral's attention and, in every layer, a
//! softmax router over SwiGLU experts (`block_sparse_moe.gate`,
//! `block_sparse_moe.experts.{e}.w1` gate, `w3` up, `w2` down) whose top-k
//! weights are always renormalised.

use serde_json::Value;

use super::dense::{self, NAMES as DENSE};
use super::{Arch, Family, HfNames, NotSupported, Sub, count, field};

/// The Mixtral family.
pub static FAMILY: Family = Family {
    architecture: "MixtralForCausalLM",
    model_type: "mixtral",
    read,
    names: HfNames {
        moe: [
            "block_sparse_moe.gate",
            "",
            "block_sparse_moe.experts.",
            "w1",
            "w3",
            "w2",
        ],
        ..DENSE
    },
};

fn read(cfg: &Value, name: &str) -> Result<Arch, NotSupported> {
    let what = format!("config.json ({name})");
    let (hidden, vocab, eps, tied) = dense::common(cfg, &what)?;
    let mut attention = dense::attention(cfg, &what, false, false)?;
    attention.window = field(cfg, "sliding_window")
        .and_then(Value::as_u64)
        .map(|w| w as usize);
    Ok(Arch {
        attention: Some(attention),
        moe: Some(super::qwen3_moe::moe(
            cfg,
            &what,
            "intermediate_size",
            true,
        )?),
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
