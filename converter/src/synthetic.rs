//! Deterministic synthetic checkpoints of real model shapes, for the demo, tests
//! and benchmarks: HF directories with `config.json`, a small tokenizer, a chat
//! template and sharded safetensors weights, written with positioned writes and
//! never held in memory whole. Dense Llama-family shapes come from
//! [`ModelShape`]; any other family from its config.json and tensor list
//! ([`write_hf_tensors`]).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;

use crate::formats::dtype::DType;
use crate::formats::hf::{self, INDEX_FILE};
use crate::formats::safetensors;

/// The shape of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// `architectures[0]` (`LlamaForCausalLM`, `Qwen2ForCausalLM`, ...).
    pub architecture: String,
    /// `model_type`.
    pub model_type: String,
    /// Decoder layers.
    pub layers: u64,
    /// Hidden size.
    pub hidden: u64,
    /// MLP intermediate size.
    pub intermediate: u64,
    /// Attention heads.
    pub heads: u64,
    /// Key/value heads (query groups).
    pub kv_heads: u64,
    /// Per-head dimension.
    pub head_dim: u64,
    /// Vocabulary size.
    pub vocab: u64,
    /// `tie_word_embeddings`.
    pub tied: bool,
    /// Biases on q/k/v (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm on q and k per head (Qwen3).
    pub qk_norm: bool,
    /// Weight dtype.
    pub dtype: DType,
}

impl ModelShape {
    /// A small Llama (2 layers, GQA with 2 query groups, hidden 64).
    pub fn tiny_llama() -> ModelShape {
        ModelShape {
            architecture: "LlamaForCausalLM".into(),
            model_type: "llama".into(),
            layers: 2,
            hidden: 64,
            intermediate: 128,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            vocab: 128,
            tied: false,
            qkv_bias: false,
            qk_norm: false,
            dtype: DType::BF16,
        }
    }

    /// The shape of Llama 3.2 3B (about 3.2 billion parameters, tied embeddings).
    pub fn llama_3b() -> ModelShape {
        ModelShape {
            architecture: "LlamaForCausalLM".into(),
            model_type: "llama".into(),
            layers: 28,
            hidden: 3072,
            intermediate: 8192,
            heads: 24,
            kv_heads: 8,
            head_dim: 128,
            vocab: 128_256,
            tied: true,
            qkv_bias: false,
            qk_norm: false,
            dtype: DType::BF16,
        }
    }

    /// Every tensor, in the order transformers registers the parameters.
    pub fn tensors(&self) -> Vec<(String, Vec<u64>)> {
        let (h, f, d) = (self.hidden, self.intermediate, self.head_dim);
        let mut out = vec![("model.embed_tokens.weight".to_owned(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            out.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![self.heads * d, h],
            ));
            if self.qkv_bias {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![self.heads * d]));
            }
            out.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![self.kv_heads * d, h],
            ));
            if self.qkv_bias {
                out.push((
                    format!("{p}.self_attn.k_proj.bias"),
                    vec![self.kv_heads * d],
                ));
            }
            out.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![self.kv_heads * d, h],
            ));
            if self.qkv_bias {
                out.push((
                    format!("{p}.self_attn.v_proj.bias"),
                    vec![self.kv_heads * d],
                ));
            }
            out.push((
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, self.heads * d],
            ));
            if self.qk_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), vec![d]));
                out.push((format!("{p}.self_attn.k_norm.weight"), vec![d]));
            }
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![f, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, f]));
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        out.push(("model.norm.weight".to_owned(), vec![h]));
        if !self.tied {
            out.push(("lm_head.weight".to_owned(), vec![self.vocab, h]));
        }
        out
    }

    /// Parameters in the model.
    pub fn parameters(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<u64>())
            .sum()
    }

    /// `config.json` as transformers writes it for this shape.
    pub fn config_json(&self) -> String {
        let mut cfg = serde_json::json!({
            "architectures": [self.architecture],
            "attention_bias": self.qkv_bias,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "dtype": self.dtype.torch_name(),
            "eos_token_id": 2,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 4096,
            "mlp_bias": false,
            "model_type": self.model_type,
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "tie_word_embeddings": self.tied,
            "vocab_size": self.vocab,
        });
        if self.model_type != "llama" {
            let obj = cfg.as_object_mut().expect("object");
            obj.remove("attention_bias");
            obj.remove("mlp_bias");
        }
        let mut s = serde_json::to_string_pretty(&cfg).expect("config serializes");
        s.push('\n');
        s
    }
}

/// A tiny deterministic generator (xorshift64*), fast enough to fill gigabytes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

fn seed_of(name: &str, seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes()) ^ seed
}

/// Fills `out` with the deterministic values of tensor `name`: weights uniform in
/// ±0.05, norm weights 1 ± 0.1, biases ±0.1 (so a swapped tensor shows).
pub fn fill(name: &str, dtype: DType, seed: u64, out: &mut [u8]) {
    let mut rng = Rng::new(seed_of(name, seed));
    // Large tensors are filled in parts named `tensor#part`: classify by the tensor.
    let tensor = name.split_once('#').map_or(name, |(t, _)| t);
    let norm = tensor.ends_with("norm.weight");
    let bias = tensor.ends_with(".bias");
    let es = dtype.size();
    for chunk in out.chunks_exact_mut(es) {
        let u = rng.unit();
        let v = if norm {
            1.0 + 0.1 * u
        } else if bias {
            0.1 * u
        } else {
            0.05 * u
        };
        crate::formats::dtype::encode(dtype, &[v], chunk);
    }
}

/// Writes a complete HF directory for `shape` into `dir` (which must not exist):
/// weights sharded at `max_shard_size`, config, generation config, tokenizer and
/// chat template.
///
/// # Errors
/// I/O errors.
pub fn write_hf(
    dir: &Path,
    shape: &ModelShape,
    seed: u64,
    max_shard_size: u64,
) -> std::io::Result<()> {
    let tensors: Vec<(String, DType, Vec<u64>)> = shape
        .tensors()
        .into_iter()
        .map(|(name, s)| (name, shape.dtype, s))
        .collect();
    write_hf_tensors(
        dir,
        &shape.config_json(),
        &tensors,
        shape.vocab,
        seed,
        max_shard_size,
    )
}

/// Writes a complete HF directory of any family into `dir`: `config` as its
/// config.json, `tensors` (name, dtype, shape) filled as [`fill`] does, sharded
/// at `max_shard_size`, and a tokenizer of `vocab` words.
///
/// # Errors
/// I/O errors.
pub fn write_hf_tensors(
    dir: &Path,
    config: &str,
    tensors: &[(String, DType, Vec<u64>)],
    vocab: u64,
    seed: u64,
    max_shard_size: u64,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let sizes: Vec<u64> = tensors.iter().map(|(_, d, s)| hf::nbytes(*d, s)).collect();
    let groups = hf::assign_shards(&sizes, max_shard_size);
    let n = groups.len();
    let mut weight_map = BTreeMap::new();
    for (g, group) in groups.iter().enumerate() {
        let name = hf::shard_name(g, n);
        let specs: Vec<(String, DType, Vec<u64>)> =
            group.iter().map(|&i| tensors[i].clone()).collect();
        let layout = safetensors::layout(&specs, &safetensors::pt_metadata())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(&name))?;
        file.set_len(layout.file_len)?;
        file.write_all_at(&layout.header, 0)?;
        group.par_iter().try_for_each(|&i| -> std::io::Result<()> {
            let (tname, dtype, tshape) = &tensors[i];
            // Large tensors are generated in slices so memory stays small.
            const SLICE: u64 = 64 << 20;
            let total = hf::nbytes(*dtype, tshape);
            let mut buf = vec![0u8; total.min(SLICE) as usize];
            let mut done = 0u64;
            let mut part = 0u64;
            while done < total {
                let n = (total - done).min(SLICE) as usize;
                fill(&format!("{tname}#{part}"), *dtype, seed, &mut buf[..n]);
                file.write_all_at(&buf[..n], layout.offsets[tname] + done)?;
                done += n as u64;
                part += 1;
            }
            Ok(())
        })?;
        file.sync_all()?;
        for &i in group {
            weight_map.insert(tensors[i].0.clone(), name.clone());
        }
    }
    if n > 1 {
        let total: u64 = sizes.iter().sum();
        let parameters = tensors
            .iter()
            .map(|(_, _, s)| s.iter().product::<u64>())
            .sum();
        std::fs::write(
            dir.join(INDEX_FILE),
            hf::index_json(&weight_map, total, parameters),
        )?;
    }
    std::fs::write(dir.join("config.json"), config)?;
    std::fs::write(
        dir.join("generation_config.json"),
        "{\n  \"bos_token_id\": 1,\n  \"eos_token_id\": 2,\n  \"transformers_version\": \"5.24.0\"\n}\n",
    )?;
    write_tokenizer(dir, vocab)?;
    Ok(())
}

/// A small word-level tokenizer over `vocab` tokens, with a chat template.
///
/// # Errors
/// I/O errors.
pub fn write_tokenizer(dir: &Path, vocab: u64) -> std::io::Result<()> {
    let mut words = serde_json::Map::new();
    for (i, special) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        words.insert((*special).into(), serde_json::json!(i));
    }
    for i in 3..vocab {
        words.insert(format!("w{i}"), serde_json::json!(i));
    }
    let added: Vec<serde_json::Value> = ["<unk>", "<s>", "</s>"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"},
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string_pretty(&tokenizer)? + "\n",
    )?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        "{\n  \"bos_token\": \"<s>\",\n  \"eos_token\": \"</s>\",\n  \"model_max_length\": 4096,\n  \"tokenizer_class\": \"PreTrainedTokenizerFast\",\n  \"unk_token\": \"<unk>\"\n}\n",
    )?;
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for message in messages %}<s>{{ message['role'] }} {{ message['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>assistant {% endif %}",
    )?;
    Ok(())
}
