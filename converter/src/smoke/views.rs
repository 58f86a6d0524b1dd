//! The two weight views of the smoke forward pass: a family's Hugging Face names
//! ([`crate::reference::HfNames`]) and Megatron-Core's names (fused tensors,
//! stacked on a leading layer axis or one key per layer, experts on an expert
//! axis or one key per expert, Mamba projections whole or per component, any
//! chunking). Each view checks every shape it uses against the configuration and
//! names the tensor when one is missing or wrong.

use crate::formats::dtype::DType;
use crate::formats::hf::HfCheckpoint;
use crate::formats::megatron::MegatronCheckpoint;
use crate::formats::source::{Files, GlobalTensor};
use crate::reference::{Act, Arch, HfNames, Sub, megatron};

use super::forward::{Block, Experts, Ffn, Linear, MambaWeights, Qkv, Up, View};
use super::kernels::{self, Mat};

fn vector(
    files: &Files,
    t: &GlobalTensor,
    prefix: &[u64],
    len: usize,
    round_to: Option<DType>,
) -> Result<Vec<f32>, String> {
    let rest: Vec<u64> = t.shape[prefix.len()..].to_vec();
    let mut offsets = prefix.to_vec();
    offsets.extend(std::iter::repeat_n(0, rest.len()));
    let mut sizes = vec![1u64; prefix.len()];
    sizes.extend(&rest);
    if rest.iter().product::<u64>() as usize != len {
        return Err(format!(
            "tensor {:?}: expected {len} values, found {:?}",
            t.name, t.shape
        ));
    }
    let mut out = vec![0f32; len];
    kernels::read_box_f32(files, t, &offsets, &sizes, &mut out, round_to)?;
    Ok(out)
}

fn embed_rows(
    files: &Files,
    t: &GlobalTensor,
    tokens: &[u32],
    vocab: usize,
    hidden: usize,
    round_to: Option<DType>,
) -> Result<Vec<f32>, String> {
    if t.shape.len() != 2 || (t.shape[0] as usize) < vocab || t.shape[1] as usize != hidden {
        return Err(format!(
            "tensor {:?}: expected shape [≥{vocab}, {hidden}] (from the configuration), found {:?}",
            t.name, t.shape
        ));
    }
    let mut out = vec![0f32; tokens.len() * hidden];
    for (i, &tok) in tokens.iter().enumerate() {
        if tok as usize >= vocab {
            return Err(format!("token {tok} is outside the vocabulary of {vocab}"));
        }
        kernels::read_box_f32(
            files,
            t,
            &[u64::from(tok), 0],
            &[1, hidden as u64],
            &mut out[i * hidden..(i + 1) * hidden],
            round_to,
        )?;
    }
    Ok(out)
}

/// A Hugging Face checkpoint seen through its family's names.
pub struct HfView<'a> {
    ckpt: &'a HfCheckpoint,
    arch: Arch,
    names: HfNames,
    round_to: Option<DType>,
}

impl<'a> HfView<'a> {
    /// The view of `ckpt` as `arch` describes it; with `round_to`, every weight is
    /// rounded to that dtype as it is read.
    ///
    /// # Errors
    /// A message when the configuration names no family.
    pub fn new(
        ckpt: &'a HfCheckpoint,
        arch: Arch,
        round_to: Option<DType>,
    ) -> Result<HfView<'a>, String> {
        Ok(HfView {
            names: arch.hf_names()?,
            ckpt,
            arch,
            round_to,
        })
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<&'a GlobalTensor, String> {
        let t = self.ckpt.tensor(name).ok_or_else(|| {
            format!(
                "{}: tensor {name:?} is missing (expected {shape:?} from config.json)",
                self.ckpt.root.display()
            )
        })?;
        if t.shape
            .iter()
            .map(|&s| s as usize)
            .ne(shape.iter().copied())
        {
            return Err(format!(
                "{}: tensor {name:?}: expected shape {shape:?} (from config.json), found {:?}",
                self.ckpt.root.display(),
                t.shape
            ));
        }
        Ok(t)
    }

    fn mat(&self, name: &str, rows: usize, cols: usize) -> Result<Mat<'a>, String> {
        let t = self.get(name, &[rows, cols])?;
        Mat::new(&self.ckpt.files, t, Vec::new(), self.round_to)
    }

    fn vec(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
        let t = self.get(name, shape)?;
        vector(
            &self.ckpt.files,
            t,
            &[],
            shape.iter().product(),
            self.round_to,
        )
    }

    fn tied(&self) -> bool {
        self.arch
            .tied
            .unwrap_or_else(|| self.ckpt.tensor(self.names.head).is_none())
    }

    fn ffn(
        &self,
        p: &str,
        names: [&str; 3],
        ffn: usize,
        act: Act,
        width: usize,
    ) -> Result<Ffn<'a>, String> {
        let w = |n: &str, r, c| self.mat(&format!("{p}{n}.weight"), r, c);
        Ok(Ffn {
            up: match act {
                Act::SwiGlu => Up::Split {
                    gate: w(names[0], ffn, width)?,
                    up: w(names[1], ffn, width)?,
                },
                Act::SquaredRelu => Up::Plain(w(names[1], ffn, width)?),
            },
            down: w(names[2], width, ffn)?,
        })
    }
}

impl View for HfView<'_> {
    fn arch(&self) -> &Arch {
        &self.arch
    }

    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, String> {
        let t = self.get(self.names.embed, &[self.arch.vocab, self.arch.hidden])?;
        embed_rows(
            &self.ckpt.files,
            t,
            tokens,
            self.arch.vocab,
            self.arch.hidden,
            self.round_to,
        )
    }

    fn block(&self, l: usize, i: usize) -> Result<(Vec<f32>, Block<'_>), String> {
        let a = &self.arch;
        let h = a.hidden;
        let n = &self.names;
        let p = format!("{}{l}.", n.layers);
        let norm = self.vec(&format!("{p}{}.weight", n.norms[i]), &[h])?;
        let block = match a.layers[l][i] {
            Sub::Attention => {
                let at = a.attn();
                let d = at.head_dim;
                let linear = |name: &str, rows: usize| -> Result<Linear<'_>, String> {
                    Ok(Linear {
                        w: self.mat(&format!("{p}{name}.weight"), rows, h)?,
                        b: if at.qkv_bias {
                            Some(self.vec(&format!("{p}{name}.bias"), &[rows])?)
                        } else {
                            None
                        },
                    })
                };
                Block::Attention {
                    qkv: Qkv::Split {
                        q: linear(n.attention[0], at.heads * d)?,
                        k: linear(n.attention[1], at.groups * d)?,
                        v: linear(n.attention[2], at.groups * d)?,
                    },
                    qk_norm: if at.qk_norm {
                        Some((
                            self.vec(&format!("{p}{}.weight", n.attention[4]), &[d])?,
                            self.vec(&format!("{p}{}.weight", n.attention[5]), &[d])?,
                        ))
                    } else {
                        None
                    },
                    output: self.mat(&format!("{p}{}.weight", n.attention[3]), h, at.heads * d)?,
                }
            }
            Sub::Mlp => {
                let m = a.mlp.as_ref().expect("an MLP layer has its configuration");
                Block::Mlp(self.ffn(&p, n.mlp, m.ffn, m.act, h)?)
            }
            Sub::Moe => {
                let m = a.moe.as_ref().expect("an MoE layer has its configuration");
                let width = m.latent.unwrap_or(h);
                let prefix = p.clone();
                let (ffn, act, experts) = (m.ffn, m.act, n.moe[2]);
                let proj = [n.moe[3], n.moe[4], n.moe[5]];
                Block::Moe(Experts {
                    router: self.mat(&format!("{p}{}.weight", n.moe[0]), m.experts, h)?,
                    bias: if m.expert_bias {
                        Some(self.vec(&format!("{p}{}", n.moe[1]), &[m.experts])?)
                    } else {
                        None
                    },
                    expert: Box::new(move |e| {
                        self.ffn(&format!("{prefix}{experts}{e}."), proj, ffn, act, width)
                    }),
                    shared: match m.shared_ffn {
                        Some(s) => Some(self.ffn(
                            &p,
                            [n.moe_extra[0], n.moe_extra[1], n.moe_extra[2]],
                            s,
                            m.act,
                            h,
                        )?),
                        None => None,
                    },
                    latent: match m.latent {
                        Some(lat) => Some((
                            self.mat(&format!("{p}{}.weight", n.moe_extra[3]), lat, h)?,
                            self.mat(&format!("{p}{}.weight", n.moe_extra[4]), h, lat)?,
                        )),
                        None => None,
                    },
                })
            }
            Sub::Mamba => {
                let m = a
                    .mamba
                    .as_ref()
                    .expect("a Mamba layer has its configuration");
                let (di, bc, nh) = (m.d_inner(), m.d_bc(), m.heads);
                let x = format!("{p}{}", n.mamba);
                let conv = di + 2 * bc;
                let conv_t = self
                    .ckpt
                    .tensor(&format!("{x}conv1d.weight"))
                    .ok_or_else(|| {
                        format!(
                            "{}: tensor {x}conv1d.weight is missing",
                            self.ckpt.root.display()
                        )
                    })?;
                let k = m
                    .conv_kernel
                    .unwrap_or(conv_t.shape.last().copied().unwrap_or(4) as usize);
                Block::Mamba(MambaWeights {
                    in_proj: vec![self.mat(
                        &format!("{x}in_proj.weight"),
                        2 * di + 2 * bc + nh,
                        h,
                    )?],
                    conv_w: self.vec(&format!("{x}conv1d.weight"), &[conv, 1, k])?,
                    conv_b: self.vec(&format!("{x}conv1d.bias"), &[conv])?,
                    conv_kernel: k,
                    dt_bias: self.vec(&format!("{x}dt_bias"), &[nh])?,
                    a_log: self.vec(&format!("{x}A_log"), &[nh])?,
                    d: self.vec(&format!("{x}D"), &[nh])?,
                    norm: self.vec(&format!("{x}norm.weight"), &[di])?,
                    out: self.mat(&format!("{x}out_proj.weight"), h, di)?,
                })
            }
        };
        Ok((norm, block))
    }

    fn final_norm(&self) -> Result<Vec<f32>, String> {
        self.vec(self.names.final_norm, &[self.arch.hidden])
    }

    fn head(&self) -> Result<Mat<'_>, String> {
        let name = if self.tied() {
            self.names.embed
        } else {
            self.names.head
        };
        self.mat(name, self.arch.vocab, self.arch.hidden)
    }
}

/// A Megatron-Core checkpoint seen through its run_config.yaml (or the HF config
/// it was made from).
pub struct MegatronView<'a> {
    ckpt: &'a MegatronCheckpoint,
    arch: Arch,
    round_to: Option<DType>,
}

const LAYERS: &str = "decoder.layers.";

impl<'a> MegatronView<'a> {
    /// The view of `ckpt` as `arch` describes it; with `round_to`, every weight is
    /// rounded to that dtype as it is read.
    pub fn new(
        ckpt: &'a MegatronCheckpoint,
        arch: Arch,
        round_to: Option<DType>,
    ) -> MegatronView<'a> {
        MegatronView {
            ckpt,
            arch,
            round_to,
        }
    }

    fn shape_error(&self, t: &GlobalTensor, want: &[u64]) -> String {
        format!(
            "{}: tensor {:?}: expected shape {want:?} (from {}), found {:?}",
            self.ckpt.dir.display(),
            t.name,
            self.arch.name,
            t.shape
        )
    }

    /// A layer tensor under any of `names`, with `inner` leading indices of its
    /// own (an expert): stacked (`decoder.layers.NAME`, a leading layer axis) or
    /// per layer (`decoder.layers.L.NAME`). Returns it with the leading indices
    /// to read; `None` when no name exists.
    fn try_find(
        &self,
        names: &[String],
        l: usize,
        inner: &[(u64, u64)],
        shape: &[usize],
    ) -> Result<Option<(&'a GlobalTensor, Vec<u64>)>, String> {
        let nl = self.arch.num_layers() as u64;
        let inner_dims: Vec<u64> = inner.iter().map(|x| x.1).collect();
        let inner_idx: Vec<u64> = inner.iter().map(|x| x.0).collect();
        let rest: Vec<u64> = shape.iter().map(|&s| s as u64).collect();
        for name in names {
            if let Some(t) = self.ckpt.tensor(&format!("{LAYERS}{name}")) {
                let want = [&[nl][..], &inner_dims, &rest].concat();
                if t.shape != want {
                    return Err(self.shape_error(t, &want));
                }
                return Ok(Some((t, [&[l as u64][..], &inner_idx].concat())));
            }
            if let Some(t) = self.ckpt.tensor(&format!("{LAYERS}{l}.{name}")) {
                let want = [&inner_dims[..], &rest].concat();
                if t.shape != want {
                    return Err(self.shape_error(t, &want));
                }
                return Ok(Some((t, inner_idx.clone())));
            }
        }
        Ok(None)
    }

    fn find(
        &self,
        names: &[String],
        l: usize,
        inner: &[(u64, u64)],
        shape: &[usize],
    ) -> Result<(&'a GlobalTensor, Vec<u64>), String> {
        self.try_find(names, l, inner, shape)?.ok_or_else(|| {
            format!(
                "{}: tensor {:?} of layer {l} is missing (expected {shape:?} from {})",
                self.ckpt.dir.display(),
                format!("{LAYERS}{}", names[0]),
                self.arch.name
            )
        })
    }

    fn mat(&self, names: &[String], l: usize, rows: usize, cols: usize) -> Result<Mat<'a>, String> {
        let (t, prefix) = self.find(names, l, &[], &[rows, cols])?;
        Mat::new(&self.ckpt.files, t, prefix, self.round_to)
    }

    fn vec(&self, names: &[String], l: usize, shape: &[usize]) -> Result<Vec<f32>, String> {
        let (t, prefix) = self.find(names, l, &[], shape)?;
        vector(
            &self.ckpt.files,
            t,
            &prefix,
            shape.iter().product(),
            self.round_to,
        )
    }

    fn top(&self, name: &str) -> Option<&'a GlobalTensor> {
        self.ckpt.tensor(name)
    }

    fn vocab_tensor(&self, name: &str) -> Result<&'a GlobalTensor, String> {
        let t = self
            .top(name)
            .ok_or_else(|| format!("{}: tensor {name:?} is missing", self.ckpt.dir.display()))?;
        let (v, h) = (self.arch.vocab as u64, self.arch.hidden as u64);
        if t.shape.len() != 2 || t.shape[0] < v || t.shape[1] != h {
            return Err(format!(
                "{}: tensor {name:?}: expected shape [≥{v}, {h}] (from {}), found {:?}",
                self.ckpt.dir.display(),
                self.arch.name,
                t.shape
            ));
        }
        Ok(t)
    }

    /// The first projection of an MLP or expert under `key` (`mlp.linear_fc1`):
    /// SwiGLU's `[gate; up]` fused (or its halves `weight_w`, `weight_v`, as
    /// singleton local shards save it), or a plain `up`.
    fn up(
        &self,
        key: &str,
        l: usize,
        inner: &[(u64, u64)],
        ffn: usize,
        width: usize,
        act: Act,
    ) -> Result<Up<'a>, String> {
        if act == Act::SwiGlu {
            let half =
                |s: &str| self.try_find(&[format!("{key}.weight{s}")], l, inner, &[ffn, width]);
            if let (Some((g, pg)), Some((u, pu))) = (half("_w")?, half("_v")?) {
                return Ok(Up::Split {
                    gate: Mat::new(&self.ckpt.files, g, pg, self.round_to)?,
                    up: Mat::new(&self.ckpt.files, u, pu, self.round_to)?,
                });
            }
        }
        let rows = if act == Act::SwiGlu { 2 * ffn } else { ffn };
        let (t, prefix) = self.find(&[format!("{key}.weight")], l, inner, &[rows, width])?;
        let m = Mat::new(&self.ckpt.files, t, prefix, self.round_to)?;
        Ok(if act == Act::SwiGlu {
            Up::Fused(m)
        } else {
            Up::Plain(m)
        })
    }

    /// Expert `e` of layer `l`: on the expert axis Megatron-Core saves, or one key
    /// per expert (singleton local shards `experts.{e}`, a gated `linear_fc1` as
    /// its halves `weight_w`/`weight_v`; grouped GEMM `weight{e}`; sequential
    /// `local_experts.{e}`).
    fn expert(
        &self,
        l: usize,
        e: usize,
        experts: usize,
        ffn: usize,
        width: usize,
        act: Act,
    ) -> Result<Ffn<'a>, String> {
        let rows = if act == Act::SwiGlu { 2 * ffn } else { ffn };
        let axis = [(e as u64, experts as u64)];
        let find =
            |module: &str, shape: &[usize]| -> Result<(&'a GlobalTensor, Vec<u64>), String> {
                if let Some(f) = self.try_find(
                    &[format!("mlp.experts.experts.{module}.weight")],
                    l,
                    &axis,
                    shape,
                )? {
                    return Ok(f);
                }
                self.find(
                    &[
                        format!("mlp.experts.experts.{e}.{module}.weight"),
                        format!("mlp.experts.{module}.weight{e}"),
                        format!("mlp.experts.local_experts.{e}.{module}.weight"),
                    ],
                    l,
                    &[],
                    shape,
                )
            };
        let half = |suffix: &str| {
            let name = format!("mlp.experts.experts.{e}.linear_fc1.weight{suffix}");
            self.try_find(&[name], l, &[], &[ffn, width])
        };
        let up = match (act, half("_w")?, half("_v")?) {
            (Act::SwiGlu, Some((g, pg)), Some((u, pu))) => Up::Split {
                gate: Mat::new(&self.ckpt.files, g, pg, self.round_to)?,
                up: Mat::new(&self.ckpt.files, u, pu, self.round_to)?,
            },
            _ => {
                let (t1, p1) = find("linear_fc1", &[rows, width])?;
                let fc1 = Mat::new(&self.ckpt.files, t1, p1, self.round_to)?;
                if act == Act::SwiGlu {
                    Up::Fused(fc1)
                } else {
                    Up::Plain(fc1)
                }
            }
        };
        let (t2, p2) = find("linear_fc2", &[width, ffn])?;
        Ok(Ffn {
            up,
            down: Mat::new(&self.ckpt.files, t2, p2, self.round_to)?,
        })
    }

    /// A Mamba projection saved whole under `key` or per component as `key.c`.
    fn parts(
        &self,
        key: &str,
        l: usize,
        parts: &[(&str, usize)],
        rest: &[usize],
    ) -> Result<Vec<(&'a GlobalTensor, Vec<u64>)>, String> {
        let total: usize = parts.iter().map(|p| p.1).sum();
        let whole = [&[total][..], rest].concat();
        if let Some(f) = self.try_find(&[key.to_owned()], l, &[], &whole)? {
            return Ok(vec![f]);
        }
        parts
            .iter()
            .map(|(c, rows)| {
                self.find(
                    &[format!("{key}.{c}")],
                    l,
                    &[],
                    &[&[*rows][..], rest].concat(),
                )
            })
            .collect()
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

impl View for MegatronView<'_> {
    fn arch(&self) -> &Arch {
        &self.arch
    }

    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, String> {
        let t = self.vocab_tensor("embedding.word_embeddings.weight")?;
        embed_rows(
            &self.ckpt.files,
            t,
            tokens,
            self.arch.vocab,
            self.arch.hidden,
            self.round_to,
        )
    }

    fn block(&self, l: usize, i: usize) -> Result<(Vec<f32>, Block<'_>), String> {
        let a = &self.arch;
        let h = a.hidden;
        let sub = a.layers[l][i];
        let norm = self.vec(&names(megatron::norm_names(sub)), l, &[h])?;
        let block = match sub {
            Sub::Attention => {
                let at = a.attn();
                let (d, qkv) = (at.head_dim, at.qkv_rows());
                Block::Attention {
                    qkv: Qkv::Fused(Linear {
                        w: self.mat(&names(&["self_attention.linear_qkv.weight"]), l, qkv, h)?,
                        b: if at.qkv_bias {
                            Some(self.vec(
                                &names(&["self_attention.linear_qkv.bias"]),
                                l,
                                &[qkv],
                            )?)
                        } else {
                            None
                        },
                    }),
                    qk_norm: if at.qk_norm {
                        Some((
                            self.vec(&names(&["self_attention.q_layernorm.weight"]), l, &[d])?,
                            self.vec(&names(&["self_attention.k_layernorm.weight"]), l, &[d])?,
                        ))
                    } else {
                        None
                    },
                    output: self.mat(
                        &names(&["self_attention.linear_proj.weight"]),
                        l,
                        h,
                        at.heads * d,
                    )?,
                }
            }
            Sub::Mlp => {
                let m = a.mlp.as_ref().expect("an MLP layer has its configuration");
                Block::Mlp(Ffn {
                    up: self.up("mlp.linear_fc1", l, &[], m.ffn, h, m.act)?,
                    down: self.mat(&names(&["mlp.linear_fc2.weight"]), l, h, m.ffn)?,
                })
            }
            Sub::Moe => {
                let m = a.moe.as_ref().expect("an MoE layer has its configuration");
                let width = m.latent.unwrap_or(h);
                let (experts, ffn, act) = (m.experts, m.ffn, m.act);
                Block::Moe(Experts {
                    router: self.mat(&names(&["mlp.router.weight"]), l, m.experts, h)?,
                    bias: if m.expert_bias {
                        Some(self.vec(&names(&["mlp.router.expert_bias"]), l, &[m.experts])?)
                    } else {
                        None
                    },
                    expert: Box::new(move |e| self.expert(l, e, experts, ffn, width, act)),
                    shared: match m.shared_ffn {
                        Some(s) => Some(Ffn {
                            up: self.up("mlp.shared_experts.linear_fc1", l, &[], s, h, m.act)?,
                            down: self.mat(
                                &names(&["mlp.shared_experts.linear_fc2.weight"]),
                                l,
                                h,
                                s,
                            )?,
                        }),
                        None => None,
                    },
                    latent: match m.latent {
                        Some(lat) => Some((
                            self.mat(&names(&["mlp.fc1_latent_proj.weight"]), l, lat, h)?,
                            self.mat(&names(&["mlp.fc2_latent_proj.weight"]), l, h, lat)?,
                        )),
                        None => None,
                    },
                })
            }
            Sub::Mamba => {
                let m = a
                    .mamba
                    .as_ref()
                    .expect("a Mamba layer has its configuration");
                let (di, bc, nh) = (m.d_inner(), m.d_bc(), m.heads);
                let in_parts = [("z", di), ("x", di), ("B", bc), ("C", bc), ("dt", nh)];
                let conv_parts = [("x", di), ("B", bc), ("C", bc)];
                let in_proj = self
                    .parts("mixer.in_proj.weight", l, &in_parts, &[h])?
                    .into_iter()
                    .map(|(t, p)| Mat::new(&self.ckpt.files, t, p, self.round_to))
                    .collect::<Result<Vec<_>, _>>()?;
                // The convolution width is not recorded: the stored weights say.
                let k = match m.conv_kernel {
                    Some(k) => k,
                    None => {
                        let probe = ["mixer.conv1d.weight", "mixer.conv1d.weight.x"]
                            .iter()
                            .find_map(|n| {
                                self.ckpt
                                    .tensor(&format!("{LAYERS}{l}.{n}"))
                                    .or_else(|| self.ckpt.tensor(&format!("{LAYERS}{n}")))
                            })
                            .ok_or_else(|| {
                                format!(
                                    "{}: layer {l} has no mixer.conv1d.weight",
                                    self.ckpt.dir.display()
                                )
                            })?;
                        probe.shape.last().copied().unwrap_or(4) as usize
                    }
                };
                let read = |key: &str, rest: &[usize]| -> Result<Vec<f32>, String> {
                    let mut out = Vec::new();
                    for (t, p) in self.parts(key, l, &conv_parts, rest)? {
                        let n: usize = t.shape[p.len()..].iter().product::<u64>() as usize;
                        out.extend(vector(&self.ckpt.files, t, &p, n, self.round_to)?);
                    }
                    Ok(out)
                };
                Block::Mamba(MambaWeights {
                    in_proj,
                    conv_w: read("mixer.conv1d.weight", &[1, k])?,
                    conv_b: read("mixer.conv1d.bias", &[])?,
                    conv_kernel: k,
                    dt_bias: self.vec(&names(&["mixer.dt_bias"]), l, &[nh])?,
                    a_log: self.vec(&names(&["mixer.A_log"]), l, &[nh])?,
                    d: self.vec(&names(&["mixer.D"]), l, &[nh])?,
                    norm: self.vec(&names(&["mixer.norm.weight"]), l, &[di])?,
                    out: self.mat(&names(&["mixer.out_proj.weight"]), l, h, di)?,
                })
            }
        };
        Ok((norm, block))
    }

    fn final_norm(&self) -> Result<Vec<f32>, String> {
        for name in [
            "decoder.final_layernorm.weight",
            "decoder.final_norm.weight",
        ] {
            if let Some(t) = self.top(name) {
                if t.shape != [self.arch.hidden as u64] {
                    return Err(format!(
                        "{}: tensor {name:?}: expected shape [{}], found {:?}",
                        self.ckpt.dir.display(),
                        self.arch.hidden,
                        t.shape
                    ));
                }
                return vector(&self.ckpt.files, t, &[], self.arch.hidden, self.round_to);
            }
        }
        Err(format!(
            "{}: tensor \"decoder.final_layernorm.weight\" is missing",
            self.ckpt.dir.display()
        ))
    }

    fn head(&self) -> Result<Mat<'_>, String> {
        let tied = self
            .arch
            .tied
            .unwrap_or_else(|| self.top("output_layer.weight").is_none());
        let t = self.vocab_tensor(if tied {
            "embedding.word_embeddings.weight"
        } else {
            "output_layer.weight"
        })?;
        Mat::new(&self.ckpt.files, t, Vec::new(), self.round_to)
    }
}
