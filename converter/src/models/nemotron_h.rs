//! Nemotron-H and Nemotron-3 (`NemotronHForCausalLM`, `model_type` `nemotron_h`):
//! a hybrid of Mamba-2 (`M`), attention (`*`), squared-ReLU MLP (`-`) and
//! mixture-of-experts (`E`) layers in the order of its layer pattern
//! (`docs/mapping.md#nemotron-h`), saved by Megatron-Core's hybrid
//! stack with one key per layer. Every layer is one block after one norm;
//! attention has no rotary embedding; experts and the shared expert are plain
//! (not gated) squared-ReLU MLPs; the router scores with a sigmoid and selects
//! with a score-correction bias, which stays float32.
//!
//! The pattern comes from `hybrid_override_pattern` (what released checkpoints
//! carry) or `layers_block_type` (what transformers 5 writes); `|` (a pipeline
//! stage boundary) is ignored.

use super::blocks::{
    Attention, AttentionNames, HfName, Mamba, MambaNames, Mlp, MlpNames, Moe, MoeNames,
};
use super::config::{Config, ModelError};
use super::registry::{ExpertParam, Family};
use super::{Block, Divisor, HfNames, Model, Mtp};
use crate::formats::run_config::Yaml;

/// The Nemotron-H family.
pub struct NemotronH;

/// Megatron-Bridge's provider of hybrid models.
const PROVIDER: &str = "megatron.bridge.models.mamba.mamba_provider.MambaModelProvider";

const HF: HfNames = HfNames {
    embed: "backbone.embeddings.weight",
    layers: "backbone.layers.",
    final_norm: "backbone.norm_f.weight",
    head: "lm_head.weight",
};

/// Every layer's norm comes first in its state dict, then the mixer.
const NORM: HfName = HfName("norm", 0);

const ATTENTION: AttentionNames = AttentionNames {
    norm: NORM,
    q: HfName("mixer.q_proj", 1),
    k: HfName("mixer.k_proj", 3),
    v: HfName("mixer.v_proj", 5),
    o: HfName("mixer.o_proj", 7),
    q_norm: HfName("mixer.q_norm", 8),
    k_norm: HfName("mixer.k_norm", 9),
};

const MLP: MlpNames = MlpNames {
    norm: NORM,
    gate: HfName("mixer.gate_proj", 1),
    up: HfName("mixer.up_proj", 2),
    down: HfName("mixer.down_proj", 3),
};

const MOE: MoeNames = MoeNames {
    norm: NORM,
    router: HfName("mixer.gate", 1),
    router_bias: HfName("mixer.gate.e_score_correction_bias", 2),
    experts: "mixer.experts.",
    gate: "gate_proj",
    up: "up_proj",
    down: "down_proj",
    experts_order: 10,
    shared_gate: HfName("mixer.shared_experts.gate_proj", 3),
    shared_up: HfName("mixer.shared_experts.up_proj", 4),
    shared_down: HfName("mixer.shared_experts.down_proj", 5),
    fc1_latent: HfName("mixer.fc1_latent_proj", 6),
    fc2_latent: HfName("mixer.fc2_latent_proj", 7),
};

const MAMBA: MambaNames = MambaNames {
    norm: NORM,
    mixer: "mixer.",
};

/// The layer pattern: one of `M`, `*`, `-`, `E` per layer.
///
/// # Errors
/// [`ModelError`] for a missing pattern, a layer kind this converter does not map,
/// or a length that disagrees with `num_hidden_layers`.
pub fn pattern(c: &Config<'_>) -> Result<String, ModelError> {
    let pattern: String = if let Some(p) = c.text("hybrid_override_pattern") {
        // A pipeline boundary does not change the layers; `/` starts the MTP pattern.
        p.split('/').next().unwrap_or("").replace('|', "")
    } else if let Some(list) = c.get("layers_block_type").and_then(|v| v.as_array()) {
        list.iter()
            .map(|t| match t.as_str() {
                Some("linear_attention" | "mamba") => Ok('M'),
                Some("full_attention" | "attention") => Ok('*'),
                Some("mlp") => Ok('-'),
                Some("moe") => Ok('E'),
                _ => Err(c.field_error(
                    "layers_block_type",
                    "a list of linear_attention, full_attention, mlp and moe",
                )),
            })
            .collect::<Result<String, _>>()?
    } else {
        return Err(c.field_error(
            "hybrid_override_pattern",
            "the layer pattern (or layers_block_type)",
        ));
    };
    if let Some(bad) = pattern.chars().find(|ch| !"M*-E".contains(*ch)) {
        return Err(c.unsupported(
            format!("a {bad:?} layer in the pattern {pattern:?}"),
            Some("Mamba-2 (M), attention (*), MLP (-) and MoE (E) layers are mapped"),
        ));
    }
    if pattern.is_empty() {
        return Err(c.field_error("hybrid_override_pattern", "at least one layer"));
    }
    if let Some(n) = c.get("num_hidden_layers").and_then(|v| v.as_u64())
        && n != pattern.len() as u64
    {
        return Err(c.field_error(
            "num_hidden_layers",
            &format!(
                "{} (the length of the layer pattern {pattern:?})",
                pattern.len()
            ),
        ));
    }
    Ok(pattern)
}

/// The multi-token-prediction layers: `num_nextn_predict_layers` and their
/// pattern, from `mtp_hybrid_override_pattern`, `mtp_layers_block_type`
/// (transformers 5), or the part of `hybrid_override_pattern` after `/`.
///
/// # Errors
/// [`ModelError`] for depths without a pattern, layer kinds the multi-token
/// prediction of Megatron-Bridge does not map (Mamba), or depths that would
/// share one layer (`mtp_use_repeated_layer`, which Megatron-Core saves once).
pub fn mtp_pattern(c: &Config<'_>) -> Result<(u64, String), ModelError> {
    let depth = c.int_or("num_nextn_predict_layers", 0)?;
    if depth == 0 {
        return Ok((0, String::new()));
    }
    let pattern: String = if let Some(p) = c.text("mtp_hybrid_override_pattern") {
        p.to_owned()
    } else if let Some(list) = c.get("mtp_layers_block_type").and_then(|v| v.as_array()) {
        list.iter()
            .map(|t| match t.as_str() {
                Some("full_attention" | "attention") => Ok('*'),
                Some("mlp") => Ok('-'),
                Some("moe") => Ok('E'),
                Some("linear_attention" | "mamba") => Ok('M'),
                _ => Err(c.field_error(
                    "mtp_layers_block_type",
                    "a list of full_attention, mlp and moe",
                )),
            })
            .collect::<Result<String, _>>()?
    } else if let Some((_, p)) = c
        .text("hybrid_override_pattern")
        .and_then(|p| p.split_once('/'))
    {
        p.split('/').next().unwrap_or("").to_owned()
    } else {
        return Err(c.field_error(
            "mtp_hybrid_override_pattern",
            &format!("the pattern of the {depth} multi-token-prediction layers"),
        ));
    };
    if pattern.is_empty() {
        return Err(c.field_error("mtp_hybrid_override_pattern", "at least one layer"));
    }
    if let Some(bad) = pattern.chars().find(|ch| !"*-E".contains(*ch)) {
        return Err(c.unsupported(
            format!("a {bad:?} layer in the multi-token-prediction pattern {pattern:?}"),
            Some("Megatron-Bridge maps attention (*), MLP (-) and MoE (E) layers there"),
        ));
    }
    if depth > 1 && c.flag("mtp_use_repeated_layer") != Some(false) {
        return Err(c.unsupported(
            format!("num_nextn_predict_layers={depth} with one repeated layer"),
            Some("Megatron-Bridge shares the layer between the depths; set mtp_use_repeated_layer=false for separate layers"),
        ));
    }
    Ok((depth, pattern))
}

impl Family for NemotronH {
    fn name(&self) -> &'static str {
        "nemotron_h"
    }

    fn architectures(&self) -> &'static [&'static str] {
        &["NemotronHForCausalLM"]
    }

    fn model(&self, c: &Config<'_>) -> Result<Model, ModelError> {
        let pattern = pattern(c)?;
        let hidden = c.count("hidden_size")?;
        let vocab = c.count("vocab_size")?;
        for (key, bad) in [
            ("use_bias", true),
            ("mamba_proj_bias", true),
            ("attention_bias", true),
            ("mlp_bias", true),
            ("use_conv_bias", false),
        ] {
            if c.flag(key) == Some(bad) {
                return Err(c.unsupported(format!("{key}={bad}"), None));
            }
        }
        if c.get("quantization_config").is_some() {
            return Err(c.unsupported("quantization_config", Some("quantized weights")));
        }
        let (mtp_depth, mtp_pattern) = mtp_pattern(c)?;
        for (key, want) in [("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")] {
            if let Some(act) = c.text(key)
                && act != want
            {
                return Err(c.unsupported(
                    format!("{key}={act}"),
                    Some(&format!("Megatron-Core's hybrid model computes {want}")),
                ));
            }
        }
        let eps = match c.get("layer_norm_epsilon") {
            Some(_) => c.positive("layer_norm_epsilon", 1e-5)?,
            None => c.positive("norm_eps", 1e-5)?,
        };
        let has = |ch: char| pattern.contains(ch) || mtp_pattern.contains(ch);
        let mut divisors = Vec::new();
        let attention = if has('*') {
            let heads = c.count("num_attention_heads")?;
            let groups = c.count_or("num_key_value_heads", heads)?;
            if !heads.is_multiple_of(groups) {
                return Err(c.unsupported(
                    format!(
                        "num_attention_heads={heads} not a multiple of num_key_value_heads={groups}"
                    ),
                    None,
                ));
            }
            let head_dim = match c.get("head_dim") {
                Some(_) => c.count("head_dim")?,
                None => c.count_or("attention_head_dim", hidden / heads)?,
            };
            divisors.push(Divisor {
                param: "tp",
                field: "num_attention_heads",
                value: heads,
            });
            divisors.push(Divisor {
                param: "tp",
                field: "num_key_value_heads",
                value: groups,
            });
            Some(Attention {
                hidden,
                heads,
                groups,
                head_dim,
                qkv_bias: false,
                qk_norm: false,
                names: ATTENTION,
            })
        } else {
            None
        };
        let mlp = if has('-') {
            let ffn = c.count("intermediate_size")?;
            divisors.push(Divisor {
                param: "tp",
                field: "intermediate_size",
                value: ffn,
            });
            Some(Mlp {
                hidden,
                ffn,
                gated: false,
                names: MLP,
            })
        } else {
            None
        };
        let mamba = if has('M') {
            let heads = c.count("mamba_num_heads")?;
            let groups = c.count("n_groups")?;
            if !heads.is_multiple_of(groups) {
                return Err(c.unsupported(
                    format!("mamba_num_heads={heads} not a multiple of n_groups={groups}"),
                    None,
                ));
            }
            divisors.push(Divisor {
                param: "tp",
                field: "n_groups",
                value: groups,
            });
            divisors.push(Divisor {
                param: "tp",
                field: "mamba_num_heads",
                value: heads,
            });
            Some(Mamba {
                hidden,
                heads,
                head_dim: c.count("mamba_head_dim")?,
                groups,
                state: c.count("ssm_state_size")?,
                conv_kernel: c.count_or("conv_kernel", 4)?,
                names: MAMBA,
            })
        } else {
            None
        };
        let mut moe_fields = Vec::new();
        let moe = if has('E') {
            let experts = c.count("n_routed_experts")?;
            let topk = c.count("num_experts_per_tok")?;
            let groups = c.count_or("n_group", 1)?;
            let topk_group = c.count_or("topk_group", 1)?;
            if topk > experts || !experts.is_multiple_of(groups) || topk_group > groups {
                return Err(c.field_error(
                    "num_experts_per_tok",
                    &format!(
                        "at most n_routed_experts={experts}, with n_group={groups} dividing it and topk_group ≤ n_group"
                    ),
                ));
            }
            // Megatron-Core's sigmoid router renormalises the chosen weights
            // whenever it chooses more than one.
            if c.flag("norm_topk_prob") == Some(false) && topk > 1 {
                return Err(c.unsupported(
                    "norm_topk_prob=false",
                    Some("Megatron-Core's sigmoid router always renormalises the weights of the chosen experts, so the converted model would compute differently"),
                ));
            }
            let shared = c.int_or("n_shared_experts", 1)?;
            let shared_ffn = if shared > 0 {
                Some(c.count("moe_shared_expert_intermediate_size")? * shared)
            } else {
                None
            };
            let latent = match c.get("moe_latent_size") {
                Some(_) => Some(c.count("moe_latent_size")?),
                None => None,
            };
            let ffn = c.count("moe_intermediate_size")?;
            let scaling = c.positive("routed_scaling_factor", 1.0)?;
            divisors.push(Divisor {
                param: "ep",
                field: "n_routed_experts",
                value: experts,
            });
            divisors.push(Divisor {
                param: "etp",
                field: "moe_intermediate_size",
                value: ffn,
            });
            moe_fields = vec![
                ("num_moe_experts".into(), Yaml::Int(experts as i64)),
                ("moe_router_topk".into(), Yaml::Int(topk as i64)),
                ("moe_ffn_hidden_size".into(), Yaml::Int(ffn as i64)),
                (
                    "moe_shared_expert_intermediate_size".into(),
                    shared_ffn.map_or(Yaml::Null, |s| Yaml::Int(s as i64)),
                ),
                ("moe_router_score_function".into(), Yaml::str("sigmoid")),
                ("moe_router_enable_expert_bias".into(), Yaml::Bool(true)),
                ("moe_router_dtype".into(), Yaml::str("fp32")),
                (
                    "moe_router_topk_scaling_factor".into(),
                    Yaml::Float(scaling),
                ),
                ("moe_router_num_groups".into(), Yaml::Int(groups as i64)),
                ("moe_router_group_topk".into(), Yaml::Int(topk_group as i64)),
                ("moe_router_pre_softmax".into(), Yaml::Bool(false)),
                ("moe_grouped_gemm".into(), Yaml::Bool(true)),
                ("moe_token_dispatcher_type".into(), Yaml::str("alltoall")),
                ("moe_permute_fusion".into(), Yaml::Bool(true)),
                ("moe_shared_expert_overlap".into(), Yaml::Bool(true)),
                (
                    "moe_router_load_balancing_type".into(),
                    Yaml::str("seq_aux_loss"),
                ),
                ("moe_aux_loss_coeff".into(), Yaml::Float(0.0001)),
                (
                    "moe_latent_size".into(),
                    latent.map_or(Yaml::Null, |l| Yaml::Int(l as i64)),
                ),
            ];
            Some(Moe {
                hidden,
                experts,
                ffn,
                gated: false,
                router_bias: true,
                shared_ffn,
                latent,
                names: MOE,
            })
        } else {
            None
        };
        let block = |ch: char| match ch {
            'M' => Block::Mamba(mamba.clone().expect("an M layer has its mixer")),
            '*' => Block::Attention(attention.clone().expect("a * layer has attention")),
            '-' => Block::Mlp(mlp.clone().expect("a - layer has its MLP")),
            _ => Block::Moe(moe.clone().expect("an E layer has its experts")),
        };
        let layers: Vec<Vec<Block>> = pattern.chars().map(|ch| vec![block(ch)]).collect();
        let mtp = (mtp_depth > 0).then(|| Mtp {
            depth: mtp_depth,
            layers: mtp_pattern.chars().map(|ch| vec![block(ch)]).collect(),
        });
        let mut megatron_config: Vec<(String, Yaml)> = vec![
            ("_target_".into(), Yaml::str(PROVIDER)),
            ("num_layers".into(), Yaml::Int(pattern.len() as i64)),
            ("hidden_size".into(), Yaml::Int(hidden as i64)),
            ("hybrid_override_pattern".into(), Yaml::str(&pattern)),
            ("is_hybrid_model".into(), Yaml::Bool(true)),
            (
                "mamba_stack_spec".into(),
                Yaml::object(
                    "megatron.bridge.models.mamba.mamba_provider.get_default_mamba_stack_spec",
                ),
            ),
            (
                "activation_func".into(),
                Yaml::object("megatron.core.activations.squared_relu"),
            ),
            ("gated_linear_unit".into(), Yaml::Bool(false)),
            ("normalization".into(), Yaml::str("RMSNorm")),
            ("layernorm_epsilon".into(), Yaml::Float(eps)),
            ("add_bias_linear".into(), Yaml::Bool(false)),
            ("add_qkv_bias".into(), Yaml::Bool(false)),
            ("qk_layernorm".into(), Yaml::Bool(false)),
            ("position_embedding_type".into(), Yaml::str("none")),
            (
                "seq_length".into(),
                Yaml::Int(c.count_or("max_position_embeddings", 4096)? as i64),
            ),
            (
                "init_method_std".into(),
                Yaml::Float(c.number("initializer_range", 0.02)?),
            ),
            ("hidden_dropout".into(), Yaml::Float(0.0)),
            ("attention_dropout".into(), Yaml::Float(0.0)),
            ("first_last_layers_bf16".into(), Yaml::Bool(true)),
            (
                "fp32_residual_connection".into(),
                Yaml::Bool(c.flag("residual_in_fp32").unwrap_or(false)),
            ),
            ("perform_initialization".into(), Yaml::Bool(false)),
        ];
        if let Some(a) = &attention {
            megatron_config.extend([
                ("num_attention_heads".into(), Yaml::Int(a.heads as i64)),
                ("num_query_groups".into(), Yaml::Int(a.groups as i64)),
                ("kv_channels".into(), Yaml::Int(a.head_dim as i64)),
            ]);
        }
        if let Some(m) = &mlp {
            megatron_config.push(("ffn_hidden_size".into(), Yaml::Int(m.ffn as i64)));
        }
        if let Some(m) = &mamba {
            megatron_config.extend([
                ("mamba_num_heads".into(), Yaml::Int(m.heads as i64)),
                ("mamba_head_dim".into(), Yaml::Int(m.head_dim as i64)),
                ("mamba_num_groups".into(), Yaml::Int(m.groups as i64)),
                ("mamba_state_dim".into(), Yaml::Int(m.state as i64)),
            ]);
        }
        megatron_config.extend(moe_fields);
        if mtp_depth > 0 {
            megatron_config.extend([
                ("mtp_num_layers".into(), Yaml::Int(mtp_depth as i64)),
                (
                    "mtp_hybrid_override_pattern".into(),
                    Yaml::str(&mtp_pattern),
                ),
                ("mtp_use_repeated_layer".into(), Yaml::Bool(mtp_depth == 1)),
            ]);
        }
        Ok(Model {
            family: self.name(),
            architecture: c.architecture.clone(),
            config_path: c.path.clone(),
            vocab,
            hidden,
            tied: c.flag("tie_word_embeddings"),
            layers,
            hf: HF,
            stacked: false,
            final_norm: &[
                "decoder.final_norm.weight",
                "decoder.final_layernorm.weight",
            ],
            megatron_config,
            divisors,
            warnings: Vec::new(),
            output_extra_state: true,
            mtp,
        })
    }

    fn hf_module_renames(&self) -> &'static [(&'static str, &'static str)] {
        &[("model.", "backbone.")]
    }

    fn hf_expert_params(&self) -> &'static [ExpertParam] {
        &[
            ExpertParam {
                name: "up_proj",
                parts: &["up_proj"],
            },
            ExpertParam {
                name: "down_proj",
                parts: &["down_proj"],
            },
        ]
    }
}
