//! `validate … generate=true`: a few greedy tokens from a prompt, decoded to
//! text, as people check a conversion by hand. The prompt is tokenized with the
//! `tokenizers` crate from the checkpoint's own `tokenizer.json` (an HF
//! directory's, a Megatron iteration's `tokenizer/`, or `hf_model_id`'s), given
//! raw (no chat template: rendering Jinja templates is out of scope), and every
//! step recomputes the whole prefix with the streaming forward pass, which is
//! cheap for a handful of tokens and keeps memory bounded.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::Model;

/// What greedy decoding produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    /// The prompt.
    pub prompt: String,
    /// The tokenizer file used.
    pub tokenizer: PathBuf,
    /// The prompt's token ids (with the tokenizer's special tokens).
    pub prompt_ids: Vec<u32>,
    /// The generated token ids.
    pub new_ids: Vec<u32>,
    /// The generated text (special tokens skipped).
    pub text: String,
    /// Wall time.
    pub seconds: f64,
}

/// The tokenizer that belongs to `dir`: its `tokenizer.json`, a Megatron
/// iteration's `tokenizer/tokenizer.json`, else `hf_model`'s.
pub fn tokenizer_file(dir: &Path, hf_model: Option<&Path>) -> Option<PathBuf> {
    [
        Some(dir.join("tokenizer.json")),
        Some(dir.join("tokenizer").join("tokenizer.json")),
        hf_model.map(|h| h.join("tokenizer.json")),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_file())
}

/// End-of-sequence ids from a config.json or generation_config.json
/// (`eos_token_id`, a number or a list).
fn eos_ids(dirs: &[&Path]) -> Vec<u32> {
    let mut out = Vec::new();
    for dir in dirs {
        for f in ["generation_config.json", "config.json"] {
            let Ok(Some(text)) = crate::formats::file::read_text_opt(
                &dir.join(f),
                crate::formats::file::limit::CONFIG,
            ) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            match v.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => out.extend(n.as_u64().map(|n| n as u32)),
                Some(serde_json::Value::Array(a)) => {
                    out.extend(a.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
                }
                _ => {}
            }
        }
    }
    out
}

/// Greedy decoding of up to `max_new` tokens after `prompt`, stopping at an
/// end-of-sequence token.
///
/// # Errors
/// A message when the tokenizer cannot be read or the forward pass fails.
pub fn generate(
    model: &Model,
    tokenizer: &Path,
    prompt: &str,
    max_new: usize,
    hf_model: Option<&Path>,
) -> Result<Generation, String> {
    let started = Instant::now();
    let bytes = crate::formats::file::read(tokenizer, crate::formats::file::limit::TOKENIZER)
        .map_err(|e| e.to_string())?;
    let tok = tokenizers::Tokenizer::from_bytes(bytes)
        .map_err(|e| format!("{}: {e}", tokenizer.display()))?;
    let enc = tok
        .encode(prompt, true)
        .map_err(|e| format!("{}: cannot tokenize the prompt: {e}", tokenizer.display()))?;
    let prompt_ids = enc.get_ids().to_vec();
    if prompt_ids.is_empty() {
        return Err("the prompt tokenizes to nothing".into());
    }
    let vocab = model.arch.vocab;
    if let Some(bad) = prompt_ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(format!(
            "the tokenizer gives id {bad}, outside the model's vocabulary of {vocab}"
        ));
    }
    let mut dirs = vec![model.dir()];
    if let Some(h) = hf_model {
        dirs.push(h);
    }
    let eos = eos_ids(&dirs);
    let mut ids = prompt_ids.clone();
    let mut new_ids = Vec::new();
    for _ in 0..max_new {
        let logits = model.logits(&ids, None)?;
        let last = &logits.values[(logits.tokens - 1) * logits.cols..][..vocab];
        let next = last
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 { (i, v) } else { best }
            })
            .0 as u32;
        new_ids.push(next);
        ids.push(next);
        if eos.contains(&next) {
            break;
        }
    }
    let text = tok
        .decode(&new_ids, true)
        .map_err(|e| format!("{}: cannot decode: {e}", tokenizer.display()))?;
    Ok(Generation {
        prompt: prompt.to_owned(),
        tokenizer: tokenizer.to_owned(),
        prompt_ids,
        new_ids,
        text,
        seconds: started.elapsed().as_secs_f64(),
    })
}
