//! The tensors a model must have, derived from its configuration alone
//! ([`crate::reference::Arch`]: the layer pattern, the expert count, the sizes),
//! independently of the conversion's mapping: a second list written from the
//! architectures' definitions (transformers' modeling code, Megatron-Core's GPT
//! and hybrid models), so a mapping that drops, adds or mis-shapes a tensor fails
//! validation.

use crate::formats::dtype::DType;
use crate::formats::source::GlobalTensor;
use crate::reference::{Act, Arch, HfNames, Sub, megatron};

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
    /// May be float32 in a lower-precision model (routers, Mamba's `A_log` and
    /// `D`: tensors models keep in float32).
    pub fp32_ok: bool,
}

fn one(name: String, shape: Vec<u64>) -> Expected {
    Expected {
        names: vec![name],
        shape,
        optional: false,
        rows_at_least: None,
        fp32_ok: false,
    }
}

fn fp32_ok(mut e: Expected) -> Expected {
    e.fp32_ok = true;
    e
}

/// The shape of the first projection of an MLP or expert (Megatron-Core fuses
/// SwiGLU's gate and up).
fn ffn_up(act: Act, ffn: u64, width: u64) -> Vec<u64> {
    match act {
        Act::SwiGlu => vec![2 * ffn, width],
        Act::SquaredRelu => vec![ffn, width],
    }
}

/// A `linear_fc1` under `key` (`mlp.linear_fc1.weight`): fused, or a gated one's
/// halves `{key}_w`, `{key}_v` when the checkpoint saves those.
fn fc1(layout: Layout, key: &str, act: Act, ffn: u64, width: u64) -> Vec<LayerTensor> {
    if layout.fc1_halves && act == Act::SwiGlu {
        ["_w", "_v"]
            .iter()
            .map(|s| (vec![format!("{key}{s}")], vec![ffn, width], false))
            .collect()
    } else {
        vec![(vec![key.to_owned()], ffn_up(act, ffn, width), false)]
    }
}

/// The tensors every Hugging Face checkpoint of the configuration `config`
/// holds (name, dtype, shape), in bfloat16 but for those kept in float32: what a
/// synthetic checkpoint of any family is made of (tests, benchmarks).
///
/// # Errors
/// Why the configuration has no forward pass or no HF names here.
pub fn required_hf_bf16(
    config: &serde_json::Value,
) -> Result<Vec<(String, DType, Vec<u64>)>, String> {
    let arch = Arch::from_hf_config(config).map_err(|e| e.to_string())?;
    let names = arch.hf_names().map_err(|e| e.to_string())?;
    let tied = config["tie_word_embeddings"].as_bool().unwrap_or(false);
    Ok(hf(&arch, &names, !tied)
        .into_iter()
        .filter(|e| !e.optional)
        .map(|e| {
            let dtype = if e.fp32_ok { DType::F32 } else { DType::BF16 };
            (e.names[0].clone(), dtype, e.shape)
        })
        .collect())
}

/// The tensors of a Hugging Face checkpoint of `arch`, named as its family names
/// them.
pub fn hf(arch: &Arch, names: &HfNames, has_lm_head: bool) -> Vec<Expected> {
    let h = arch.hidden as u64;
    let v = arch.vocab as u64;
    let mut out = vec![one(names.embed.into(), vec![v, h])];
    for (l, subs) in arch.layers.iter().enumerate() {
        let p = format!("{}{l}.", names.layers);
        for (i, sub) in subs.iter().enumerate() {
            hf_sub(&mut out, arch, names, &p, i, *sub);
        }
    }
    out.push(one(names.final_norm.into(), vec![h]));
    let tied = arch.tied.unwrap_or(!has_lm_head);
    out.push(Expected {
        optional: tied,
        ..one(names.head.into(), vec![v, h])
    });
    // Multi-token prediction, numbered flat: `mtp.layers.{depth · len + i}.`.
    if let Some((depth, subs)) = &arch.mtp {
        for d in 0..*depth {
            for (i, sub) in subs.iter().enumerate() {
                let p = format!("mtp.layers.{}.", d * subs.len() + i);
                if i == 0 {
                    out.push(one(format!("{p}enorm.weight"), vec![h]));
                    out.push(one(format!("{p}hnorm.weight"), vec![h]));
                    out.push(one(format!("{p}eh_proj.weight"), vec![h, 2 * h]));
                }
                hf_sub(&mut out, arch, names, &p, 0, *sub);
                if i + 1 == subs.len() {
                    out.push(one(format!("{p}final_layernorm.weight"), vec![h]));
                }
            }
        }
    }
    out
}

/// The tensors of block `sub` (the `i`-th of its layer) under the HF prefix `p`.
fn hf_sub(out: &mut Vec<Expected>, arch: &Arch, names: &HfNames, p: &str, i: usize, sub: Sub) {
    let h = arch.hidden as u64;
    out.push(one(format!("{p}{}.weight", names.norms[i]), vec![h]));
    match sub {
        Sub::Attention => {
            let a = arch.attn();
            let d = a.head_dim as u64;
            let (q, kv) = (a.heads as u64 * d, a.groups as u64 * d);
            for (n, rows) in [(0, q), (1, kv), (2, kv)] {
                let name = names.attention[n];
                out.push(one(format!("{p}{name}.weight"), vec![rows, h]));
                if a.qkv_bias {
                    out.push(one(format!("{p}{name}.bias"), vec![rows]));
                }
            }
            if a.qk_norm {
                out.push(one(format!("{p}{}.weight", names.attention[4]), vec![d]));
                out.push(one(format!("{p}{}.weight", names.attention[5]), vec![d]));
            }
            out.push(one(format!("{p}{}.weight", names.attention[3]), vec![h, q]));
        }
        Sub::Mlp => {
            let m = arch
                .mlp
                .as_ref()
                .expect("an MLP layer has its configuration");
            hf_ffn(
                out,
                p,
                [names.mlp[0], names.mlp[1], names.mlp[2]],
                m.act,
                m.ffn as u64,
                h,
            );
        }
        Sub::Moe => {
            let m = arch
                .moe
                .as_ref()
                .expect("an MoE layer has its configuration");
            let e = m.experts as u64;
            let w = m.latent.map_or(h, |l| l as u64);
            out.push(fp32_ok(one(
                format!("{p}{}.weight", names.moe[0]),
                vec![e, h],
            )));
            if m.expert_bias {
                out.push(fp32_ok(one(format!("{p}{}", names.moe[1]), vec![e])));
            }
            for x in 0..m.experts {
                let ep = format!("{p}{}{x}.", names.moe[2]);
                hf_ffn(
                    out,
                    &ep,
                    [names.moe[3], names.moe[4], names.moe[5]],
                    m.act,
                    m.ffn as u64,
                    w,
                );
            }
            if let Some(s) = m.shared_ffn {
                let extra = &names.moe_extra;
                hf_ffn(out, p, [extra[0], extra[1], extra[2]], m.act, s as u64, h);
            }
            if let Some(lat) = m.latent {
                out.push(one(
                    format!("{p}{}.weight", names.moe_extra[3]),
                    vec![lat as u64, h],
                ));
                out.push(one(
                    format!("{p}{}.weight", names.moe_extra[4]),
                    vec![h, lat as u64],
                ));
            }
        }
        Sub::Mamba => {
            let m = arch
                .mamba
                .as_ref()
                .expect("a Mamba layer has its configuration");
            let (di, bc, nh) = (m.d_inner() as u64, m.d_bc() as u64, m.heads as u64);
            let k = m.conv_kernel.unwrap_or(4) as u64;
            let x = format!("{p}{}", names.mamba);
            out.push(one(
                format!("{x}in_proj.weight"),
                vec![2 * di + 2 * bc + nh, h],
            ));
            out.push(one(format!("{x}conv1d.weight"), vec![di + 2 * bc, 1, k]));
            out.push(one(format!("{x}conv1d.bias"), vec![di + 2 * bc]));
            out.push(one(format!("{x}dt_bias"), vec![nh]));
            out.push(fp32_ok(one(format!("{x}A_log"), vec![nh])));
            out.push(fp32_ok(one(format!("{x}D"), vec![nh])));
            out.push(one(format!("{x}norm.weight"), vec![di]));
            out.push(one(format!("{x}out_proj.weight"), vec![h, di]));
        }
    }
}

fn hf_ffn(out: &mut Vec<Expected>, p: &str, names: [&str; 3], act: Act, ffn: u64, width: u64) {
    if act == Act::SwiGlu {
        out.push(one(format!("{p}{}.weight", names[0]), vec![ffn, width]));
    }
    out.push(one(format!("{p}{}.weight", names[1]), vec![ffn, width]));
    out.push(one(format!("{p}{}.weight", names[2]), vec![width, ffn]));
}

/// How a Megatron-Core checkpoint lays out what can be saved more than one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// One key per layer (`decoder.layers.N.…`), not stacked.
    pub per_layer: bool,
    /// Experts on an expert axis (`mlp.experts.experts.…`), not one key each.
    pub expert_axis: bool,
    /// A gated `linear_fc1` saved as its halves (`weight_w`, `weight_v`), as
    /// singleton local shards save it.
    pub fc1_halves: bool,
    /// Mamba's `in_proj` and `conv1d` saved per component.
    pub mamba_split: bool,
}

impl Layout {
    /// The layout of a checkpoint's tensors.
    pub fn of(tensors: &[GlobalTensor]) -> Layout {
        let any = |f: &dyn Fn(&str) -> bool| tensors.iter().any(|t| f(&t.name));
        Layout {
            per_layer: any(&|n| n.starts_with("decoder.layers.0.")),
            expert_axis: !any(&|n| {
                n.contains(".local_experts.")
                    || n.contains(".linear_fc1.weight0")
                    || n.contains(".experts.experts.0.")
            }),
            fc1_halves: any(&|n| n.ends_with(".linear_fc1.weight_w")),
            mamba_split: !any(&|n| n.ends_with("mixer.in_proj.weight")),
        }
    }
}

/// One tensor of a layer: its accepted spellings, its shape, whether float32 is
/// allowed.
type LayerTensor = (Vec<String>, Vec<u64>, bool);

/// The tensors of block `sub`, relative to its layer, into `t`.
fn mc_sub(t: &mut Vec<LayerTensor>, arch: &Arch, layout: Layout, sub: Sub) {
    let h = arch.hidden as u64;
    let names = |ns: &[&str]| ns.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    t.push((names(megatron::norm_names(sub)), vec![h], false));
    match sub {
        Sub::Attention => {
            let a = arch.attn();
            let (d, qkv) = (a.head_dim as u64, a.qkv_rows() as u64);
            t.push((
                names(&["self_attention.linear_qkv.weight"]),
                vec![qkv, h],
                false,
            ));
            if a.qkv_bias {
                t.push((names(&["self_attention.linear_qkv.bias"]), vec![qkv], false));
            }
            t.push((
                names(&["self_attention.linear_proj.weight"]),
                vec![h, a.heads as u64 * d],
                false,
            ));
            if a.qk_norm {
                t.push((
                    names(&["self_attention.q_layernorm.weight"]),
                    vec![d],
                    false,
                ));
                t.push((
                    names(&["self_attention.k_layernorm.weight"]),
                    vec![d],
                    false,
                ));
            }
        }
        Sub::Mlp => {
            let m = arch
                .mlp
                .as_ref()
                .expect("an MLP layer has its configuration");
            let f = m.ffn as u64;
            t.extend(fc1(layout, "mlp.linear_fc1.weight", m.act, f, h));
            t.push((names(&["mlp.linear_fc2.weight"]), vec![h, f], false));
        }
        Sub::Moe => {
            let m = arch
                .moe
                .as_ref()
                .expect("an MoE layer has its configuration");
            let (e, f) = (m.experts as u64, m.ffn as u64);
            let w = m.latent.map_or(h, |l| l as u64);
            t.push((names(&["mlp.router.weight"]), vec![e, h], true));
            if m.expert_bias {
                t.push((names(&["mlp.router.expert_bias"]), vec![e], true));
            }
            let fc1 = ffn_up(m.act, f, w);
            if layout.expert_axis {
                t.push((
                    names(&["mlp.experts.experts.linear_fc1.weight"]),
                    [&[e][..], &fc1].concat(),
                    false,
                ));
                t.push((
                    names(&["mlp.experts.experts.linear_fc2.weight"]),
                    vec![e, w, f],
                    false,
                ));
            } else {
                for x in 0..m.experts {
                    if layout.fc1_halves && m.act == Act::SwiGlu {
                        let key = format!("mlp.experts.experts.{x}.linear_fc1.weight");
                        t.extend(self::fc1(layout, &key, m.act, f, w));
                    } else {
                        t.push((
                            vec![
                                format!("mlp.experts.experts.{x}.linear_fc1.weight"),
                                format!("mlp.experts.linear_fc1.weight{x}"),
                                format!("mlp.experts.local_experts.{x}.linear_fc1.weight"),
                            ],
                            fc1.clone(),
                            false,
                        ));
                    }
                    t.push((
                        vec![
                            format!("mlp.experts.experts.{x}.linear_fc2.weight"),
                            format!("mlp.experts.linear_fc2.weight{x}"),
                            format!("mlp.experts.local_experts.{x}.linear_fc2.weight"),
                        ],
                        vec![w, f],
                        false,
                    ));
                }
            }
            if let Some(s) = m.shared_ffn {
                let s = s as u64;
                t.push((
                    names(&["mlp.shared_experts.linear_fc1.weight"]),
                    ffn_up(m.act, s, h),
                    false,
                ));
                t.push((
                    names(&["mlp.shared_experts.linear_fc2.weight"]),
                    vec![h, s],
                    false,
                ));
            }
            if let Some(lat) = m.latent {
                let lat = lat as u64;
                t.push((names(&["mlp.fc1_latent_proj.weight"]), vec![lat, h], false));
                t.push((names(&["mlp.fc2_latent_proj.weight"]), vec![h, lat], false));
            }
        }
        Sub::Mamba => {
            let m = arch
                .mamba
                .as_ref()
                .expect("a Mamba layer has its configuration");
            let (di, bc, nh) = (m.d_inner() as u64, m.d_bc() as u64, m.heads as u64);
            let k = m.conv_kernel.unwrap_or(4) as u64;
            if layout.mamba_split {
                for (c, r) in [("z", di), ("x", di), ("B", bc), ("C", bc), ("dt", nh)] {
                    t.push((vec![format!("mixer.in_proj.weight.{c}")], vec![r, h], false));
                }
                for (c, r) in [("x", di), ("B", bc), ("C", bc)] {
                    t.push((
                        vec![format!("mixer.conv1d.weight.{c}")],
                        vec![r, 1, k],
                        false,
                    ));
                    t.push((vec![format!("mixer.conv1d.bias.{c}")], vec![r], false));
                }
            } else {
                t.push((
                    names(&["mixer.in_proj.weight"]),
                    vec![2 * di + 2 * bc + nh, h],
                    false,
                ));
                t.push((
                    names(&["mixer.conv1d.weight"]),
                    vec![di + 2 * bc, 1, k],
                    false,
                ));
                t.push((names(&["mixer.conv1d.bias"]), vec![di + 2 * bc], false));
            }
            t.push((names(&["mixer.dt_bias"]), vec![nh], false));
            t.push((names(&["mixer.A_log"]), vec![nh], true));
            t.push((names(&["mixer.D"]), vec![nh], true));
            t.push((names(&["mixer.norm.weight"]), vec![di], false));
            t.push((names(&["mixer.out_proj.weight"]), vec![h, di], false));
        }
    }
}

/// The tensors of a Megatron-Core iteration of `arch`, laid out as `layout`.
pub fn megatron(arch: &Arch, layout: Layout, has_output: bool) -> Vec<Expected> {
    let h = arch.hidden as u64;
    let nl = arch.num_layers() as u64;
    let rows = arch.padded_vocab.unwrap_or(arch.vocab) as u64;
    // A padded vocabulary is exactly the padded size when the configuration says
    // how it is padded; otherwise at least the vocabulary.
    let at_least = arch.padded_vocab.is_none().then_some(arch.vocab as u64);
    let mut out = vec![Expected {
        rows_at_least: at_least,
        ..one("embedding.word_embeddings.weight".into(), vec![rows, h])
    }];
    // Per layer, relative to the layer; stacked layers share one key.
    let mut layer_tensors: Vec<Vec<LayerTensor>> = Vec::new();
    for subs in &arch.layers {
        let mut t: Vec<LayerTensor> = Vec::new();
        for sub in subs {
            mc_sub(&mut t, arch, layout, *sub);
        }
        layer_tensors.push(t);
    }
    if layout.per_layer {
        for (l, t) in layer_tensors.into_iter().enumerate() {
            for (ns, shape, fp32) in t {
                out.push(Expected {
                    names: ns
                        .iter()
                        .map(|n| format!("decoder.layers.{l}.{n}"))
                        .collect(),
                    shape,
                    optional: false,
                    rows_at_least: None,
                    fp32_ok: fp32,
                });
            }
        }
    } else if let Some(first) = layer_tensors.first() {
        // Stacked keys exist for homogeneous layers only: every layer has `first`.
        for (ns, shape, fp32) in first.clone() {
            out.push(Expected {
                names: ns.iter().map(|n| format!("decoder.layers.{n}")).collect(),
                shape: [&[nl][..], &shape].concat(),
                optional: false,
                rows_at_least: None,
                fp32_ok: fp32,
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
    // Multi-token prediction, nested: `mtp.layers.{depth}.mtp_model_layer.layers.{i}.`.
    if let Some((depth, subs)) = &arch.mtp {
        for d in 0..*depth {
            for (i, sub) in subs.iter().enumerate() {
                let mut t: Vec<LayerTensor> = Vec::new();
                mc_sub(&mut t, arch, layout, *sub);
                for (ns, shape, fp32) in t {
                    out.push(Expected {
                        names: ns
                            .iter()
                            .map(|n| format!("mtp.layers.{d}.mtp_model_layer.layers.{i}.{n}"))
                            .collect(),
                        shape,
                        optional: false,
                        rows_at_least: None,
                        fp32_ok: fp32,
                    });
                }
            }
            for (name, shape) in [
                ("enorm", vec![h]),
                ("hnorm", vec![h]),
                ("eh_proj", vec![h, 2 * h]),
                ("final_layernorm", vec![h]),
            ] {
                out.push(one(format!("mtp.layers.{d}.{name}.weight"), shape));
            }
        }
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
    // Tensors a model keeps in float32 may be float32 whatever the others are.
    let fp32_ok: std::collections::HashSet<&str> = expected
        .iter()
        .filter(|e| e.fp32_ok)
        .flat_map(|e| e.names.iter().map(String::as_str))
        .collect();
    let floats: Vec<&GlobalTensor> = tensors.iter().filter(|t| t.dtype.is_float()).collect();
    let want = dtype.or_else(|| {
        floats
            .iter()
            .find(|t| !fp32_ok.contains(t.name.as_str()))
            .map(|t| t.dtype)
    });
    if let Some(want) = want {
        let off: Vec<&&GlobalTensor> = floats
            .iter()
            .filter(|t| {
                t.dtype != want && !(t.dtype == DType::F32 && fp32_ok.contains(t.name.as_str()))
            })
            .collect();
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
        let kept = floats
            .iter()
            .filter(|t| Some(t.dtype) != want && t.dtype == DType::F32)
            .count();
        Ok(format!(
            "{} tensors: none missing or extra for the architecture, shapes as {source} says, all {}{}",
            tensors.len(),
            want.map_or("-".into(), |d| d.to_string()),
            if kept > 0 {
                format!(" except {kept} kept float32 (routers, Mamba A_log and D)")
            } else {
                String::new()
            }
        ))
    } else {
        Err(problems)
    }
}
