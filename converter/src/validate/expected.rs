//! The tensors a dense decoder must have, derived from its configuration alone
//! ([`crate::smoke::arch::Arch`]), independently of the conversion's mapping: a
//! second list written from the architectures' definitions (transformers'
//! `LlamaForCausalLM` family, Megatron-Core's `GPTModel` with SwiGLU), so a
//! mapping that drops, adds or mis-shapes a tensor fails validation.

use crate::formats::dtype::DType;
use crate::formats::source::GlobalTensor;
use crate::smoke::Arch;

/// One expected tensor (or a set of spellings of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Accepted names, preferred first.
    pub names: Vec<String>,
    /// Shape.
    pub shape: Vec<u64>,
    /// May be absent (a tied head stored anyway).
    pub optional: bool,
    /// The first axis may be larger (a padded vocabulary), when `Some(min)`.
    pub rows_at_least: Option<u64>,
}

fn one(name: String, shape: Vec<u64>) -> Expected {
    Expected {
        names: vec![name],
        shape,
        optional: false,
        rows_at_least: None,
    }
}

/// The tensors of a Hugging Face checkpoint of `arch`.
pub fn hf(arch: &Arch, has_lm_head: bool) -> Vec<Expected> {
    let (h, f, d) = (arch.hidden as u64, arch.ffn as u64, arch.head_dim as u64);
    let (q, kv) = (arch.heads as u64 * d, arch.groups as u64 * d);
    let v = arch.vocab as u64;
    let mut out = vec![one("model.embed_tokens.weight".into(), vec![v, h])];
    for l in 0..arch.layers {
        let p = format!("model.layers.{l}.");
        out.push(one(format!("{p}input_layernorm.weight"), vec![h]));
        for (name, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            out.push(one(format!("{p}self_attn.{name}.weight"), vec![rows, h]));
            if arch.qkv_bias {
                out.push(one(format!("{p}self_attn.{name}.bias"), vec![rows]));
            }
        }
        if arch.qk_norm {
            out.push(one(format!("{p}self_attn.q_norm.weight"), vec![d]));
            out.push(one(format!("{p}self_attn.k_norm.weight"), vec![d]));
        }
        out.push(one(format!("{p}self_attn.o_proj.weight"), vec![h, q]));
        out.push(one(format!("{p}post_attention_layernorm.weight"), vec![h]));
        out.push(one(format!("{p}mlp.gate_proj.weight"), vec![f, h]));
        out.push(one(format!("{p}mlp.up_proj.weight"), vec![f, h]));
        out.push(one(format!("{p}mlp.down_proj.weight"), vec![h, f]));
    }
    out.push(one("model.norm.weight".into(), vec![h]));
    let tied = arch.tied.unwrap_or(!has_lm_head);
    out.push(Expected {
        optional: tied,
        ..one("lm_head.weight".into(), vec![v, h])
    });
    out
}

/// The tensors of a Megatron-Core iteration of `arch`: stacked keys with a
/// leading layer axis, or with `per_layer` one key per layer
/// (`decoder.layers.L.…`).
pub fn megatron(arch: &Arch, per_layer: bool, has_output: bool) -> Vec<Expected> {
    let (h, f, d) = (arch.hidden as u64, arch.ffn as u64, arch.head_dim as u64);
    let qkv = arch.qkv_rows() as u64;
    let l = arch.layers as u64;
    let rows = arch.padded_vocab.unwrap_or(arch.vocab) as u64;
    // A padded vocabulary is exactly the padded size when the configuration says
    // how it is padded; otherwise at least the vocabulary.
    let at_least = arch.padded_vocab.is_none().then_some(arch.vocab as u64);
    let mut layer: Vec<(Vec<&str>, Vec<u64>)> = vec![
        (
            vec![
                "self_attention.linear_qkv.layer_norm_weight",
                "input_layernorm.weight",
            ],
            vec![h],
        ),
        (vec!["self_attention.linear_qkv.weight"], vec![qkv, h]),
        (
            vec!["self_attention.linear_proj.weight"],
            vec![h, arch.heads as u64 * d],
        ),
        (
            vec![
                "mlp.linear_fc1.layer_norm_weight",
                "pre_mlp_layernorm.weight",
            ],
            vec![h],
        ),
        (vec!["mlp.linear_fc1.weight"], vec![2 * f, h]),
        (vec!["mlp.linear_fc2.weight"], vec![h, f]),
    ];
    if arch.qkv_bias {
        layer.push((vec!["self_attention.linear_qkv.bias"], vec![qkv]));
    }
    if arch.qk_norm {
        layer.push((vec!["self_attention.q_layernorm.weight"], vec![d]));
        layer.push((vec!["self_attention.k_layernorm.weight"], vec![d]));
    }
    let mut out = vec![Expected {
        rows_at_least: at_least,
        ..one("embedding.word_embeddings.weight".into(), vec![rows, h])
    }];
    for (names, shape) in layer {
        if per_layer {
            for i in 0..l {
                out.push(Expected {
                    names: names
                        .iter()
                        .map(|n| format!("decoder.layers.{i}.{n}"))
                        .collect(),
                    shape: shape.clone(),
                    optional: false,
                    rows_at_least: None,
                });
            }
        } else {
            let mut s = vec![l];
            s.extend(shape);
            out.push(Expected {
                names: names
                    .iter()
                    .map(|n| format!("decoder.layers.{n}"))
                    .collect(),
                shape: s,
                optional: false,
                rows_at_least: None,
            });
        }
    }
    out.push(Expected {
        names: vec![
            "decoder.final_layernorm.weight".into(),
            "decoder.final_norm.weight".into(),
        ],
        ..one(String::new(), vec![h])
    });
    let tied = arch.tied.unwrap_or(!has_output);
    if !tied {
        out.push(Expected {
            rows_at_least: at_least,
            ..one("output_layer.weight".into(), vec![rows, h])
        });
    }
    out
}

/// Compares `tensors` with `expected`: every expected tensor present with its
/// shape, nothing else, every floating-point tensor of one dtype (`dtype` when
/// given). Returns what was found, or the problems.
///
/// # Errors
/// One line per problem, naming the tensor, the expectation and what was found.
pub fn check(
    tensors: &[GlobalTensor],
    expected: &[Expected],
    dtype: Option<DType>,
    source: &str,
) -> Result<String, Vec<String>> {
    let by_name: std::collections::HashMap<&str, &GlobalTensor> =
        tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut problems = Vec::new();
    let mut used = std::collections::HashSet::new();
    for e in expected {
        let found = e.names.iter().find_map(|n| by_name.get(n.as_str()));
        match found {
            None if e.optional => {}
            None => problems.push(format!(
                "tensor {:?} is missing (expected {:?} from {source})",
                e.names[0], e.shape
            )),
            Some(t) => {
                used.insert(t.name.as_str());
                let ok = match e.rows_at_least {
                    Some(min) => {
                        t.shape.len() == e.shape.len()
                            && t.shape[0] >= min
                            && t.shape[1..] == e.shape[1..]
                    }
                    None => t.shape == e.shape,
                };
                if !ok {
                    let want = match e.rows_at_least {
                        Some(min) => format!("[≥{min}, {:?}]", &e.shape[1..]),
                        None => format!("{:?}", e.shape),
                    };
                    problems.push(format!(
                        "tensor {:?}: expected shape {want} (from {source}), found {:?}",
                        t.name, t.shape
                    ));
                }
            }
        }
    }
    for t in tensors {
        if !used.contains(t.name.as_str()) {
            problems.push(format!(
                "tensor {:?} {:?} is not part of the architecture ({source})",
                t.name, t.shape
            ));
        }
    }
    let floats: Vec<&GlobalTensor> = tensors.iter().filter(|t| t.dtype.is_float()).collect();
    let want = dtype.or_else(|| floats.first().map(|t| t.dtype));
    if let Some(want) = want {
        let off: Vec<&&GlobalTensor> = floats.iter().filter(|t| t.dtype != want).collect();
        if let Some(t) = off.first() {
            problems.push(format!(
                "tensor {:?} is {} but {} {want} ({} tensors differ)",
                t.name,
                t.dtype,
                if dtype.is_some() {
                    format!("{source} says")
                } else {
                    "the other weights are".to_owned()
                },
                off.len()
            ));
        }
    }
    if let Some(t) = tensors.iter().find(|t| !t.dtype.is_float()) {
        problems.push(format!(
            "tensor {:?} is {}: expected floating-point weights",
            t.name, t.dtype
        ));
    }
    if problems.is_empty() {
        Ok(format!(
            "{} tensors: none missing or extra for the architecture, shapes as {source} says, all {}",
            tensors.len(),
            want.map_or("-".into(), |d| d.to_string())
        ))
    } else {
        Err(problems)
    }
}
