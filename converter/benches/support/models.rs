//! The synthetic models the benchmarks convert (`CKPT_BENCH_MODELS` names them):
//! `llama-1b` (TinyLlama-1.1B's shape), `llama-3b`, `qwen3-moe` (Qwen3-MoE-30B-A3B's
//! shapes, 2 layers), `nemotron-h` (Nemotron-3 Nano 30B-A3B's, 3 layers by
//! default, `CKPT_BENCH_NEMOTRON_PATTERN`), `tiny`.

use std::path::Path;

use ckpt_convert::formats::dtype::DType;
use ckpt_convert::reference::Arch;
use ckpt_convert::synthetic::ModelShape;

/// A synthetic model: its config.json and tensors.
pub struct Model {
    /// config.json.
    pub config: String,
    /// Name, dtype and shape of every tensor.
    pub tensors: Vec<(String, DType, Vec<u64>)>,
    /// The vocabulary size.
    pub vocab: u64,
}

impl Model {
    /// Bytes of all tensors.
    pub fn bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|(_, d, s)| s.iter().product::<u64>() * d.size() as u64)
            .sum()
    }

    /// Bytes of the largest tensor.
    pub fn largest(&self) -> u64 {
        self.tensors
            .iter()
            .map(|(_, d, s)| s.iter().product::<u64>() * d.size() as u64)
            .max()
            .unwrap_or(0)
    }

    fn dense(shape: &ModelShape) -> Model {
        Model {
            config: shape.config_json(),
            tensors: shape
                .tensors()
                .into_iter()
                .map(|(n, s)| (n, shape.dtype, s))
                .collect(),
            vocab: shape.vocab,
        }
    }

    /// Any family, from its config.json: the tensors its architecture has
    /// (bf16; float32 where models keep it), as validation expects them.
    fn from_config(config: serde_json::Value) -> Model {
        let arch = Arch::from_hf_config(&config).expect("a configuration the forward computes");
        let tensors = ckpt_convert::validate::expected::required_hf_bf16(&config)
            .expect("HF names for the family");
        let mut text = serde_json::to_string_pretty(&config).expect("config serializes");
        text.push('\n');
        Model {
            config: text,
            tensors,
            vocab: arch.vocab as u64,
        }
    }
}

fn tinyllama() -> ModelShape {
    ModelShape {
        architecture: "LlamaForCausalLM".into(),
        model_type: "llama".into(),
        layers: 22,
        hidden: 2048,
        intermediate: 5632,
        heads: 32,
        kv_heads: 4,
        head_dim: 64,
        vocab: 32_000,
        tied: false,
        qkv_bias: false,
        qk_norm: false,
        dtype: DType::BF16,
    }
}

fn qwen3_moe() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
        "max_window_layers": 48, "mlp_only_layers": [], "moe_intermediate_size": 768,
        "norm_topk_prob": true, "num_attention_heads": 32, "num_experts": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 2, "num_key_value_heads": 4,
        "output_router_logits": false, "rms_norm_eps": 1e-6, "rope_scaling": null,
        "rope_theta": 1_000_000.0, "router_aux_loss_coef": 0.001, "sliding_window": null,
        "tie_word_embeddings": false, "dtype": "bfloat16", "use_cache": true,
        "use_sliding_window": false, "vocab_size": 151_936
    })
}

fn nemotron_h() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../e2e/bridge/nemotron3_nano_30b_a3b_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the Nemotron-3 Nano config"))
            .expect("JSON");
    let pattern = std::env::var("CKPT_BENCH_NEMOTRON_PATTERN").unwrap_or_else(|_| "M*E".into());
    cfg["num_hidden_layers"] = pattern.len().into();
    cfg["hybrid_override_pattern"] = pattern.into();
    cfg
}

/// The model `name` of `CKPT_BENCH_MODELS`.
pub fn model(name: &str) -> Model {
    match name {
        "llama-1b" => Model::dense(&tinyllama()),
        "llama-3b" => Model::dense(&ModelShape::llama_3b()),
        "qwen3-moe" => Model::from_config(qwen3_moe()),
        "nemotron-h" => Model::from_config(nemotron_h()),
        "tiny" => {
            let mut s = ModelShape::tiny_llama();
            s.layers = 8;
            s.hidden = 512;
            s.intermediate = 1536;
            s.heads = 8;
            s.kv_heads = 2;
            s.head_dim = 64;
            s.vocab = 32_000;
            Model::dense(&s)
        }
        other => panic!(
            "CKPT_BENCH_MODELS: unknown model {other:?} (llama-1b, llama-3b, qwen3-moe, nemotron-h, tiny)"
        ),
    }
}
