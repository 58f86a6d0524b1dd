//! The decoder forward pass over a weight view, one block at a time.
//!
//! A view says where a block's weights are; the pass reads them in row blocks
//! while it multiplies (see [`super::kernels`]), so only one block's small
//! vectors (norms, biases, Mamba parameters) and a few weight blocks are held at
//! once. Every block is `x += block(rms_norm(x))`. The fused Megatron-Core
//! tensors are split the way Megatron-Core splits them at run time, on the
//! activations: `linear_qkv`'s output per query group into its query heads, key
//! and value ([`split_mixed_qkv`]), a SwiGLU `linear_fc1`'s output into gate and
//! up halves ([`split_fc1`]); the converter's weight mapping is never used.

use crate::reference::{Act, Arch, MoeArch, Scoring};

use super::kernels::{self, Mat, RopeTable};

/// A projection with an optional bias.
pub struct Linear<'a> {
    /// The weight, `[out, in]`.
    pub w: Mat<'a>,
    /// The bias, `[out]`.
    pub b: Option<Vec<f32>>,
}

impl Linear<'_> {
    fn apply(&self, x: &[f32], t: usize) -> Result<Vec<f32>, String> {
        let mut y = kernels::matmul(x, t, &self.w)?;
        if let Some(b) = &self.b {
            kernels::add_bias(&mut y, b);
        }
        Ok(y)
    }
}

/// How a layer computes q, k and v.
// One value per block, alive for that block only: boxing the larger variant buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Qkv<'a> {
    /// Three projections (Hugging Face `q_proj`, `k_proj`, `v_proj`).
    Split {
        /// Queries.
        q: Linear<'a>,
        /// Keys.
        k: Linear<'a>,
        /// Values.
        v: Linear<'a>,
    },
    /// One projection whose output holds, per query group, its query heads, its
    /// key head and its value head (Megatron-Core `linear_qkv`).
    Fused(Linear<'a>),
}

/// The first projection of an MLP or expert.
pub enum Up<'a> {
    /// Gate and up, apart (Hugging Face `gate_proj`, `up_proj`).
    Split {
        /// Gate.
        gate: Mat<'a>,
        /// Up.
        up: Mat<'a>,
    },
    /// One projection whose output is `[gate; up]` (`linear_fc1` of a SwiGLU).
    Fused(Mat<'a>),
    /// Up alone (a plain MLP).
    Plain(Mat<'a>),
}

/// An MLP or expert: the first projection, the activation, the down projection.
pub struct Ffn<'a> {
    /// Up (and gate).
    pub up: Up<'a>,
    /// Down.
    pub down: Mat<'a>,
}

impl Ffn<'_> {
    fn apply(&self, x: &[f32], t: usize, act: Act) -> Result<Vec<f32>, String> {
        let mut h = match (&self.up, act) {
            (Up::Split { gate, up }, Act::SwiGlu) => {
                let mut g = kernels::matmul(x, t, gate)?;
                kernels::swiglu(&mut g, &kernels::matmul(x, t, up)?);
                g
            }
            (Up::Fused(fc1), Act::SwiGlu) => {
                let y = kernels::matmul(x, t, fc1)?;
                let (mut g, u) = split_fc1(&y, fc1.rows / 2);
                kernels::swiglu(&mut g, &u);
                g
            }
            (Up::Plain(up), Act::SquaredRelu) => {
                let mut h = kernels::matmul(x, t, up)?;
                kernels::squared_relu(&mut h);
                h
            }
            _ => return Err("the weights do not fit the activation".into()),
        };
        h = kernels::matmul(&h, t, &self.down)?;
        Ok(h)
    }
}

/// A mixture of experts, as a view finds it.
pub struct Experts<'a> {
    /// The router, `[experts, hidden]`.
    pub router: Mat<'a>,
    /// The score-correction bias.
    pub bias: Option<Vec<f32>>,
    /// Expert `e`'s weights, on demand (only routed experts are read).
    pub expert: Box<dyn Fn(usize) -> Result<Ffn<'a>, String> + Sync + 'a>,
    /// The shared expert.
    pub shared: Option<Ffn<'a>>,
    /// The projections into and out of the experts' latent space.
    pub latent: Option<(Mat<'a>, Mat<'a>)>,
}

/// A Mamba-2 mixer, as a view finds it.
pub struct MambaWeights<'a> {
    /// `in_proj`, as one matrix or its components in order (`z, x, B, C, dt`).
    pub in_proj: Vec<Mat<'a>>,
    /// The depthwise convolution, `[channels × width]`.
    pub conv_w: Vec<f32>,
    /// Its bias, `[channels]`.
    pub conv_b: Vec<f32>,
    /// Convolution width.
    pub conv_kernel: usize,
    /// `dt_bias`, `[heads]`.
    pub dt_bias: Vec<f32>,
    /// `A_log`, `[heads]`.
    pub a_log: Vec<f32>,
    /// `D`, `[heads]`.
    pub d: Vec<f32>,
    /// The gated group norm's weight, `[heads · head_dim]`.
    pub norm: Vec<f32>,
    /// `out_proj`.
    pub out: Mat<'a>,
}

/// One residual block and the norm before it.
// One value per block, alive for that block only.
#[allow(clippy::large_enum_variant)]
pub enum Block<'a> {
    /// Self-attention.
    Attention {
        /// q, k, v.
        qkv: Qkv<'a>,
        /// Per-head norms of q and k (Qwen3).
        qk_norm: Option<(Vec<f32>, Vec<f32>)>,
        /// The output projection.
        output: Mat<'a>,
    },
    /// A dense MLP.
    Mlp(Ffn<'a>),
    /// A mixture of experts.
    Moe(Experts<'a>),
    /// A Mamba-2 mixer.
    Mamba(MambaWeights<'a>),
}

/// Where a checkpoint keeps the model's weights.
pub trait View: Sync {
    /// The configuration the forward follows.
    fn arch(&self) -> &Arch;
    /// The embedding rows of `tokens`, `t × hidden`.
    ///
    /// # Errors
    /// A message naming the missing or mis-shaped tensor.
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, String>;
    /// Block `i` of layer `l` and the norm before it.
    ///
    /// # Errors
    /// A message naming the missing or mis-shaped tensor.
    fn block(&self, l: usize, i: usize) -> Result<(Vec<f32>, Block<'_>), String>;
    /// The final norm.
    ///
    /// # Errors
    /// A message naming the missing or mis-shaped tensor.
    fn final_norm(&self) -> Result<Vec<f32>, String>;
    /// The output projection (at least `vocab` rows; padded rows follow).
    ///
    /// # Errors
    /// A message naming the missing or mis-shaped tensor.
    fn head(&self) -> Result<Mat<'_>, String>;
}

/// Logits of a forward pass: `tokens` rows of `cols` (the output projection's
/// rows, which may include padding beyond the vocabulary).
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    /// Positions.
    pub tokens: usize,
    /// Values per position.
    pub cols: usize,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// Splits `linear_qkv`'s output (`t` rows of `(heads + 2·groups)·d`) as
/// Megatron-Core's `SelfAttention.get_query_key_value_tensors` does: each row is
/// viewed as `groups × (heads/groups + 2) × d` and split into the group's query
/// heads, then its key, then its value. Returns (q `t × heads·d`, k and v
/// `t × groups·d`).
pub fn split_mixed_qkv(mixed: &[f32], t: usize, arch: &Arch) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let a = arch.attn();
    let (g, d, p) = (a.groups, a.head_dim, a.heads_per_group());
    let width = (p + 2) * d;
    let mut q = Vec::with_capacity(t * a.heads * d);
    let mut k = Vec::with_capacity(t * g * d);
    let mut v = Vec::with_capacity(t * g * d);
    for row in mixed.chunks_exact(g * width) {
        for group in row.chunks_exact(width) {
            q.extend_from_slice(&group[..p * d]);
            k.extend_from_slice(&group[p * d..(p + 1) * d]);
            v.extend_from_slice(&group[(p + 1) * d..]);
        }
    }
    (q, k, v)
}

/// Splits `linear_fc1`'s output (`t` rows of `2·ffn`) as Megatron-Core's gated
/// linear unit does (`torch.chunk(x, 2, dim=-1)`): the first half is the gate, the
/// second the up projection.
pub fn split_fc1(y: &[f32], ffn: usize) -> (Vec<f32>, Vec<f32>) {
    let mut gate = Vec::with_capacity(y.len() / 2);
    let mut up = Vec::with_capacity(y.len() / 2);
    for row in y.chunks_exact(2 * ffn) {
        gate.extend_from_slice(&row[..ffn]);
        up.extend_from_slice(&row[ffn..]);
    }
    (gate, up)
}

fn attention(
    arch: &Arch,
    rope: Option<&RopeTable>,
    qkv: &Qkv<'_>,
    qk_norm: &Option<(Vec<f32>, Vec<f32>)>,
    output: &Mat<'_>,
    n: &[f32],
    t: usize,
) -> Result<Vec<f32>, String> {
    let a = arch.attn();
    let (mut q, mut k, v) = match qkv {
        Qkv::Split { q, k, v } => (q.apply(n, t)?, k.apply(n, t)?, v.apply(n, t)?),
        Qkv::Fused(l) => split_mixed_qkv(&l.apply(n, t)?, t, arch),
    };
    if let Some((qn, kn)) = qk_norm {
        kernels::rms_norm(&mut q, qn, arch.eps);
        kernels::rms_norm(&mut k, kn, arch.eps);
    }
    if let Some(rope) = rope {
        rope.apply(&mut q, a.heads);
        rope.apply(&mut k, a.groups);
    }
    let o = kernels::attention(&q, &k, &v, t, a);
    kernels::matmul(&o, t, output)
}

/// The experts each token goes to and their weights, as the router computes
/// them: (expert, weight) per token.
pub fn route(logits: &[f32], bias: Option<&[f32]>, m: &MoeArch) -> Vec<Vec<(usize, f32)>> {
    logits
        .chunks_exact(m.experts)
        .map(|l| {
            let by_score = |scores: &[f32]| {
                let mut idx: Vec<usize> = (0..scores.len()).collect();
                // Highest first; the lower index first among equal scores.
                idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
                idx
            };
            let mut chosen: Vec<(usize, f32)> = match m.scoring {
                Scoring::SoftmaxThenTopk => {
                    let p = kernels::softmax(l);
                    by_score(&p)[..m.topk].iter().map(|&e| (e, p[e])).collect()
                }
                Scoring::TopkRenormalised => {
                    let top: Vec<usize> = by_score(l)[..m.topk].to_vec();
                    let p = kernels::softmax(&top.iter().map(|&e| l[e]).collect::<Vec<_>>());
                    top.into_iter().zip(p).collect()
                }
                Scoring::Sigmoid => {
                    let s: Vec<f32> = l.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
                    let mut choice: Vec<f32> = match bias {
                        Some(b) => s.iter().zip(b).map(|(s, b)| s + b).collect(),
                        None => s.clone(),
                    };
                    let (groups, keep) = m.groups;
                    if groups > 1 {
                        // Groups ranked by the sum of their two best choice scores.
                        let per = m.experts / groups;
                        let group_score: Vec<f32> = choice
                            .chunks_exact(per)
                            .map(|g| by_score(g).iter().take(2).map(|&e| g[e]).sum())
                            .collect();
                        let kept: Vec<usize> = by_score(&group_score)[..keep].to_vec();
                        for (e, c) in choice.iter_mut().enumerate() {
                            if !kept.contains(&(e / per)) {
                                *c = f32::NEG_INFINITY;
                            }
                        }
                    }
                    let top: Vec<usize> = by_score(&choice)[..m.topk].to_vec();
                    let total: f32 = top.iter().map(|&e| s[e]).sum::<f32>() + 1e-20;
                    top.into_iter()
                        .map(|e| {
                            let w = if m.topk > 1 { s[e] / total } else { s[e] };
                            (e, w)
                        })
                        .collect()
                }
            };
            for c in &mut chosen {
                c.1 *= m.scaling;
            }
            chosen
        })
        .collect()
}

fn experts(arch: &Arch, w: &Experts<'_>, n: &[f32], t: usize) -> Result<Vec<f32>, String> {
    let m = arch
        .moe
        .as_ref()
        .expect("an MoE block has its configuration");
    let h = arch.hidden;
    let logits = kernels::matmul(n, t, &w.router)?;
    let routes = route(&logits, w.bias.as_deref(), m);
    let x = match &w.latent {
        Some((fc1, _)) => kernels::matmul(n, t, fc1)?,
        None => n.to_vec(),
    };
    let width = x.len() / t;
    let mut y = vec![0f32; t * width];
    for e in 0..m.experts {
        let tokens: Vec<(usize, f32)> = routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.iter().find(|(x, _)| *x == e).map(|(_, w)| (i, *w)))
            .collect();
        if tokens.is_empty() {
            continue;
        }
        let input: Vec<f32> = tokens
            .iter()
            .flat_map(|(i, _)| x[i * width..(i + 1) * width].iter().copied())
            .collect();
        let out = (w.expert)(e)?.apply(&input, tokens.len(), m.act)?;
        for (k, (i, wt)) in tokens.iter().enumerate() {
            for (a, b) in y[i * width..(i + 1) * width]
                .iter_mut()
                .zip(&out[k * width..(k + 1) * width])
            {
                *a += wt * b;
            }
        }
    }
    let mut y = match &w.latent {
        Some((_, fc2)) => kernels::matmul(&y, t, fc2)?,
        None => y,
    };
    if let Some(s) = &w.shared {
        kernels::add(&mut y, &s.apply(n, t, m.act)?);
    }
    debug_assert_eq!(y.len(), t * h);
    Ok(y)
}

fn mamba(arch: &Arch, w: &MambaWeights<'_>, n: &[f32], t: usize) -> Result<Vec<f32>, String> {
    let m = arch
        .mamba
        .as_ref()
        .expect("a Mamba block has its configuration");
    let (nh, hd, ng, ds) = (m.heads, m.head_dim, m.groups, m.state);
    let (di, bc) = (m.d_inner(), m.d_bc());
    let conv = di + 2 * bc;
    let parts: Vec<Vec<f32>> = w
        .in_proj
        .iter()
        .map(|p| kernels::matmul(n, t, p))
        .collect::<Result<_, _>>()?;
    let widths: Vec<usize> = parts.iter().map(|p| p.len() / t).collect();
    let total: usize = widths.iter().sum();
    if total != 2 * di + 2 * bc + nh {
        return Err(format!(
            "in_proj gives {total} values per token, expected {} (z, x, B, C, dt)",
            2 * di + 2 * bc + nh
        ));
    }
    // The projection per token, its parts side by side.
    let mut zxbcdt = vec![0f32; t * total];
    let mut col = 0;
    for (p, wd) in parts.iter().zip(&widths) {
        for i in 0..t {
            zxbcdt[i * total + col..i * total + col + wd].copy_from_slice(&p[i * wd..(i + 1) * wd]);
        }
        col += wd;
    }
    let k = w.conv_kernel;
    // Causal depthwise convolution of xBC, then SiLU.
    let mut xbc = vec![0f32; t * conv];
    for i in 0..t {
        for c in 0..conv {
            let mut s = w.conv_b[c];
            for j in 0..k {
                // Tap j sees the input k-1-j positions back.
                let back = k - 1 - j;
                if i >= back {
                    s += w.conv_w[c * k + j] * zxbcdt[(i - back) * total + di + c];
                }
            }
            xbc[i * conv + c] = s / (1.0 + (-s).exp());
        }
    }
    let a: Vec<f32> = w.a_log.iter().map(|v| -v.exp()).collect();
    let per_group = nh / ng;
    let mut state = vec![0f32; nh * hd * ds];
    let mut y = vec![0f32; t * di];
    for i in 0..t {
        let row = &xbc[i * conv..(i + 1) * conv];
        let (x, rest) = row.split_at(di);
        let (b, c) = rest.split_at(bc);
        for head in 0..nh {
            let raw = zxbcdt[i * total + di + conv + head] + w.dt_bias[head];
            let dt = kernels::softplus(raw).max(m.dt_min);
            let decay = (dt * a[head]).exp();
            let g = head / per_group;
            let (bg, cg) = (&b[g * ds..(g + 1) * ds], &c[g * ds..(g + 1) * ds]);
            for p in 0..hd {
                let xv = x[head * hd + p];
                let h = &mut state[(head * hd + p) * ds..(head * hd + p + 1) * ds];
                let mut out = 0f32;
                for s in 0..ds {
                    h[s] = h[s] * decay + dt * xv * bg[s];
                    out += h[s] * cg[s];
                }
                y[i * di + head * hd + p] = out + w.d[head] * xv;
            }
        }
    }
    // Gated group RMSNorm: y · silu(z), normalised per group of B/C groups.
    for i in 0..t {
        let z = &zxbcdt[i * total..i * total + di];
        let yi = &mut y[i * di..(i + 1) * di];
        for (v, zv) in yi.iter_mut().zip(z) {
            *v *= zv / (1.0 + (-zv).exp());
        }
        let gs = di / ng;
        for (grp, wg) in yi.chunks_exact_mut(gs).zip(w.norm.chunks_exact(gs)) {
            kernels::rms_norm(grp, wg, arch.eps);
        }
    }
    kernels::matmul(&y, t, &w.out)
}

/// The forward pass of `tokens` through `view`.
///
/// # Errors
/// A message naming the first missing or mis-shaped tensor.
pub fn forward(view: &dyn View, tokens: &[u32]) -> Result<Logits, String> {
    let arch = view.arch().clone();
    let t = tokens.len();
    let h = arch.hidden;
    let mut x = view.embed(tokens)?;
    if x.len() != t * h {
        return Err(format!(
            "embedding rows have {} values, expected {t} × {h}",
            x.len()
        ));
    }
    let rope = arch.attention.as_ref().and_then(|a| {
        a.rope
            .map(|(theta, r)| RopeTable::new(a.head_dim, theta, r, t))
    });
    for (l, subs) in arch.layers.iter().enumerate() {
        for i in 0..subs.len() {
            let (norm, block) = view.block(l, i)?;
            let mut n = x.clone();
            kernels::rms_norm(&mut n, &norm, arch.eps);
            let y = match &block {
                Block::Attention {
                    qkv,
                    qk_norm,
                    output,
                } => attention(&arch, rope.as_ref(), qkv, qk_norm, output, &n, t)?,
                Block::Mlp(f) => {
                    let act = arch
                        .mlp
                        .as_ref()
                        .expect("an MLP block has its configuration")
                        .act;
                    f.apply(&n, t, act)?
                }
                Block::Moe(e) => experts(&arch, e, &n, t)?,
                Block::Mamba(m) => mamba(&arch, m, &n, t)?,
            };
            kernels::add(&mut x, &y);
        }
    }
    let norm = view.final_norm()?;
    kernels::rms_norm(&mut x, &norm, arch.eps);
    let head = view.head()?;
    let values = kernels::matmul(&x, t, &head)?;
    Ok(Logits {
        tokens: t,
        cols: head.rows,
        values,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_outputs_split_per_group() {
        let arch = Arch::from_hf_config(&serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 4, "intermediate_size": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 1,
            "num_hidden_layers": 1, "vocab_size": 4
        }))
        .unwrap();
        // One token; per group: q q k v.
        let mixed = [0., 1., 10., 20., 2., 3., 11., 21.];
        let (q, k, v) = split_mixed_qkv(&mixed, 1, &arch);
        assert_eq!(q, vec![0., 1., 2., 3.]);
        assert_eq!(k, vec![10., 11.]);
        assert_eq!(v, vec![20., 21.]);
        assert_eq!(
            split_fc1(&[1., 2., 3., 4.], 2),
            (vec![1., 2.], vec![3., 4.])
        );
    }

    fn moe(scoring: Scoring, topk: usize, groups: (usize, usize)) -> MoeArch {
        MoeArch {
            experts: 4,
            topk,
            ffn: 1,
            act: Act::SwiGlu,
            scoring,
            expert_bias: true,
            groups,
            scaling: 2.0,
            shared_ffn: None,
            latent: None,
        }
    }

    #[test]
    fn routing_follows_each_scoring() {
        let logits = [0.0f32, 2.0, 1.0, -1.0];
        // Softmax first: the weights keep their share of all four.
        let r = route(&logits, None, &moe(Scoring::SoftmaxThenTopk, 2, (1, 1)));
        let p = kernels::softmax(&logits);
        assert_eq!(r[0], vec![(1, 2.0 * p[1]), (2, 2.0 * p[2])]);
        // Renormalised: the two weights sum to the scaling.
        let r = route(&logits, None, &moe(Scoring::TopkRenormalised, 2, (1, 1)));
        assert_eq!(r[0].iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((r[0][0].1 + r[0][1].1 - 2.0).abs() < 1e-6);
        // Sigmoid: the bias picks expert 3, the weights come from the sigmoid alone.
        let bias = [0.0f32, 0.0, 0.0, 5.0];
        let r = route(&logits, Some(&bias), &moe(Scoring::Sigmoid, 2, (1, 1)));
        assert_eq!(r[0].iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 1]);
        let s = |x: f32| 1.0 / (1.0 + (-x).exp());
        let total = s(-1.0) + s(2.0);
        assert!((r[0][0].1 - 2.0 * s(-1.0) / total).abs() < 1e-6);
        // Two groups, one kept: the best two of the group with the higher pair sum.
        let r = route(
            &[3.0, -3.0, 1.0, 1.0],
            None,
            &moe(Scoring::Sigmoid, 2, (2, 1)),
        );
        assert_eq!(r[0].iter().map(|x| x.0).collect::<Vec<_>>(), vec![2, 3]);
    }
}
