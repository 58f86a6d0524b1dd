//! The decoder forward pass over a weight view, one layer at a time.
//!
//! A view says where a layer's weights are; the pass reads them in row blocks
//! while it multiplies (see [`super::kernels`]), so only one layer's small
//! vectors (norms, biases) and a few blocks are held at once. The fused
//! Megatron-Core tensors are split the way Megatron-Core splits them at run time,
//! on the activations: `linear_qkv`'s output per query group into its query
//! heads, key and value ([`split_mixed_qkv`]), `linear_fc1`'s output into gate and
//! up halves ([`split_fc1`]); the converter's weight mapping is never used.

use super::arch::Arch;
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
// One value per layer, alive for that layer only: boxing the larger variant buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Attention<'a> {
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

/// How a layer computes the gate and up projections.
pub enum Mlp<'a> {
    /// Two projections (`gate_proj`, `up_proj`).
    Split {
        /// Gate.
        gate: Mat<'a>,
        /// Up.
        up: Mat<'a>,
    },
    /// One projection whose output is `[gate; up]` (`linear_fc1`).
    Fused(Mat<'a>),
}

/// One decoder layer's weights, as a view finds them.
pub struct Layer<'a> {
    /// The norm before attention.
    pub input_norm: Vec<f32>,
    /// q, k, v.
    pub attention: Attention<'a>,
    /// Per-head norms of q and k (Qwen3).
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// The attention output projection.
    pub output: Mat<'a>,
    /// The norm before the MLP.
    pub mlp_norm: Vec<f32>,
    /// Gate and up.
    pub mlp: Mlp<'a>,
    /// The down projection.
    pub down: Mat<'a>,
}

/// Where a checkpoint keeps the decoder's weights.
pub trait View: Sync {
    /// The configuration the forward follows.
    fn arch(&self) -> &Arch;
    /// The embedding rows of `tokens`, `t × hidden`.
    ///
    /// # Errors
    /// A message naming the missing or mis-shaped tensor.
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, String>;
    /// Layer `l`.
    ///
    /// # Errors
    /// A message naming the missing or mis-shaped tensor.
    fn layer(&self, l: usize) -> Result<Layer<'_>, String>;
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
    let (g, d, p) = (arch.groups, arch.head_dim, arch.heads_per_group());
    let width = (p + 2) * d;
    let mut q = Vec::with_capacity(t * arch.heads * d);
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
    let rope = RopeTable::new(&arch, t);
    for l in 0..arch.layers {
        let layer = view.layer(l)?;
        let mut n = x.clone();
        kernels::rms_norm(&mut n, &layer.input_norm, arch.eps);
        let (mut q, mut k, v) = match &layer.attention {
            Attention::Split { q, k, v } => (q.apply(&n, t)?, k.apply(&n, t)?, v.apply(&n, t)?),
            Attention::Fused(qkv) => split_mixed_qkv(&qkv.apply(&n, t)?, t, &arch),
        };
        if let Some((qn, kn)) = &layer.qk_norm {
            kernels::rms_norm(&mut q, qn, arch.eps);
            kernels::rms_norm(&mut k, kn, arch.eps);
        }
        rope.apply(&mut q, arch.heads);
        rope.apply(&mut k, arch.groups);
        let a = kernels::attention(&q, &k, &v, t, &arch);
        let o = kernels::matmul(&a, t, &layer.output)?;
        kernels::add(&mut x, &o);
        let mut n = x.clone();
        kernels::rms_norm(&mut n, &layer.mlp_norm, arch.eps);
        let (mut gate, up) = match &layer.mlp {
            Mlp::Split { gate, up } => (kernels::matmul(&n, t, gate)?, kernels::matmul(&n, t, up)?),
            Mlp::Fused(fc1) => split_fc1(&kernels::matmul(&n, t, fc1)?, arch.ffn),
        };
        kernels::swiglu(&mut gate, &up);
        let down = kernels::matmul(&gate, t, &layer.down)?;
        kernels::add(&mut x, &down);
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
}
