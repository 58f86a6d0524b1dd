//! The f32 arithmetic of the smoke forward pass, shared by both weight views:
//! widening stored elements, a streamed matrix product, RMSNorm, RoPE, causal
//! GQA attention and SwiGLU, each following what transformers' Llama/Qwen code
//! and Megatron-Core's local layer spec compute (f32 softmax, `rotate_half` RoPE).
//!
//! Why weights are streamed in row blocks: the validator must stay within the
//! converter's memory promise (bounded by the largest tensor, not the model).
//! A product reads blocks of rows straight from the mapped files (bf16 rows are
//! multiplied from their stored bytes, [`super::bf16_rows`]; other dtypes are
//! widened to f32 in a per-task scratch first) and drops the pages after use, so
//! memory is a few megabytes per thread whatever the layer size.

use rayon::prelude::*;

use crate::formats::dtype::DType;
use crate::formats::source::{self, ChunkData, Files, GlobalTensor};

use crate::reference::{AttentionArch, Rope};

/// Elements of a weight block widened at once by one task (1 MiB of f32): the
/// block, and matrixmultiply's packed copy of it, stay in a core's L2 cache.
const BLOCK_ELEMENTS: usize = 1 << 18;

/// Elements of a bf16 weight block multiplied from its stored bytes by one task
/// (2 MiB): no scratch to keep in cache, and each block's mapped pages are
/// dropped with one call (each call interrupts the other cores to flush their
/// address translations).
const STORED_BLOCK_ELEMENTS: usize = 1 << 20;

/// Widens stored elements to f32; with `round_to`, each value is then rounded to
/// that dtype (round to nearest even, as `Tensor.to` does) and widened again, so a
/// source can be seen as the converter's cast of it would be.
///
/// # Errors
/// A message for a dtype that is not floating point.
pub fn widen(
    dtype: DType,
    bytes: &[u8],
    out: &mut [f32],
    round_to: Option<DType>,
) -> Result<(), String> {
    if !matches!(dtype, DType::BF16 | DType::F16 | DType::F32 | DType::F64) {
        return Err(format!(
            "{dtype} weights are not computed by the smoke test"
        ));
    }
    crate::formats::dtype::decode(dtype, bytes, out);
    if let Some(to) = round_to.filter(|t| *t != dtype) {
        for o in out.iter_mut() {
            *o = crate::formats::dtype::round_to(to, *o);
        }
    }
    Ok(())
}

/// A matrix stored in a checkpoint: the last two axes of a tensor at fixed
/// leading indices (the layer of a stacked Megatron tensor), read by rows.
#[derive(Debug, Clone)]
pub struct Mat<'a> {
    /// The tensor's name, for messages.
    pub name: String,
    files: &'a Files,
    tensor: &'a GlobalTensor,
    prefix: Vec<u64>,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    round_to: Option<DType>,
}

impl<'a> Mat<'a> {
    /// The matrix at leading indices `prefix` of `tensor`.
    ///
    /// # Errors
    /// A message when the tensor has another rank, or a prefix index is outside it.
    pub fn new(
        files: &'a Files,
        tensor: &'a GlobalTensor,
        prefix: Vec<u64>,
        round_to: Option<DType>,
    ) -> Result<Mat<'a>, String> {
        let n = tensor.shape.len();
        if n != prefix.len() + 2 || prefix.iter().zip(&tensor.shape).any(|(i, s)| i >= s) {
            return Err(format!(
                "tensor {:?} {:?}: expected a matrix at index {prefix:?}",
                tensor.name, tensor.shape
            ));
        }
        Ok(Mat {
            name: tensor.name.clone(),
            files,
            tensor,
            prefix,
            rows: tensor.shape[n - 2] as usize,
            cols: tensor.shape[n - 1] as usize,
            round_to,
        })
    }

    /// The box (offsets, sizes) of rows `start..start + n` in the tensor.
    fn rows_box(&self, start: usize, n: usize) -> (Vec<u64>, Vec<u64>) {
        let mut offsets = self.prefix.clone();
        offsets.extend([start as u64, 0]);
        let mut sizes = vec![1u64; self.prefix.len()];
        sizes.extend([n as u64, self.cols as u64]);
        (offsets, sizes)
    }

    /// Whether rows are multiplied from their stored bytes
    /// ([`super::bf16_rows`]): bf16, kept as stored, on a CPU that does it at speed.
    fn stored_as_bf16(&self) -> bool {
        self.tensor.dtype == DType::BF16
            && self.round_to.is_none_or(|d| d == DType::BF16)
            && super::bf16_rows::available()
    }

    /// `f` of the stored bytes of rows `start..start + n`; the mapped pages are
    /// dropped after.
    fn with_stored_rows<R>(&self, start: usize, n: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        let (offsets, sizes) = self.rows_box(start, n);
        let out = f(&source::read_box(self.files, self.tensor, &offsets, &sizes));
        release_box(self.files, self.tensor, &offsets, &sizes);
        out
    }

    /// Rows `start..start + out.len() / cols`, widened to f32 into `out`.
    ///
    /// # Errors
    /// A message for a dtype the smoke test does not compute.
    pub fn read_rows(&self, start: usize, out: &mut [f32]) -> Result<(), String> {
        let (offsets, sizes) = self.rows_box(start, out.len() / self.cols);
        read_box_f32(
            self.files,
            self.tensor,
            &offsets,
            &sizes,
            out,
            self.round_to,
        )
    }
}

/// Reads a box of `t` into `out` as f32 and drops the mapped pages it touched.
///
/// # Errors
/// A message for a dtype the smoke test does not compute.
pub fn read_box_f32(
    files: &Files,
    t: &GlobalTensor,
    offsets: &[u64],
    sizes: &[u64],
    out: &mut [f32],
    round_to: Option<DType>,
) -> Result<(), String> {
    {
        let bytes = source::read_box(files, t, offsets, sizes);
        widen(t.dtype, &bytes, out, round_to).map_err(|e| format!("tensor {:?}: {e}", t.name))?;
    }
    release_box(files, t, offsets, sizes);
    Ok(())
}

/// Drops our page-table entries for the contiguous parts of a box after use, so
/// the resident set follows the blocks in flight (the page cache keeps the data).
fn release_box(files: &Files, t: &GlobalTensor, offsets: &[u64], sizes: &[u64]) {
    let es = t.dtype.size() as u64;
    for c in &t.chunks {
        let ChunkData::Contiguous(r) = &c.data else {
            continue;
        };
        let mut rel = Vec::with_capacity(sizes.len());
        let mut extent = Vec::with_capacity(sizes.len());
        let mut inside = true;
        for ((&co, &cs), (&o, &s)) in c
            .offsets
            .iter()
            .zip(&c.sizes)
            .zip(offsets.iter().zip(sizes))
        {
            let lo = co.max(o);
            let hi = (co + cs).min(o + s);
            if hi <= lo {
                inside = false;
                break;
            }
            rel.push(lo - co);
            extent.push(hi - lo);
        }
        if inside && let Some((start, n)) = source::contiguous_run(&c.sizes, &rel, &extent) {
            files.get(r.file).release(r.offset + start * es, n * es);
        }
    }
}

/// `x` (`t` rows of `w.cols`) times `wᵀ`: `t` rows of `w.rows`. Blocks of weight
/// rows are read and multiplied in parallel.
///
/// # Errors
/// A message when the widths disagree or a block cannot be read.
pub fn matmul(x: &[f32], t: usize, w: &Mat<'_>) -> Result<Vec<f32>, String> {
    let (rows, cols) = (w.rows, w.cols);
    if x.len() != t * cols {
        return Err(format!(
            "{}: input of {} values is not {t} rows of {cols}",
            w.name,
            x.len()
        ));
    }
    let per_block = if w.stored_as_bf16() {
        STORED_BLOCK_ELEMENTS
    } else {
        BLOCK_ELEMENTS
    };
    let block = (per_block / cols.max(1)).clamp(1, rows.max(1));
    let starts: Vec<usize> = (0..rows).step_by(block).collect();
    let parts: Vec<(usize, usize, Vec<f32>)> = starts
        .par_iter()
        // One scratch block per task, reused for the blocks it takes.
        .map_init(
            Vec::new,
            |scratch: &mut Vec<f32>, &r0| -> Result<_, String> {
                let n = block.min(rows - r0);
                if w.stored_as_bf16() {
                    let mut y = vec![0f32; t * n];
                    w.with_stored_rows(r0, n, |bytes| {
                        super::bf16_rows::rows_times(x, t, cols, bytes, &mut y);
                    });
                    return Ok((r0, n, y));
                }
                if scratch.len() < n * cols {
                    scratch.resize(n * cols, 0.0);
                }
                let scratch = &mut scratch[..n * cols];
                w.read_rows(r0, scratch)?;
                let mut y = vec![0f32; t * n];
                // SAFETY: x is t×cols row-major (checked above), scratch is n×cols
                // row-major and read as its transpose (row stride 1, column stride
                // cols), y is t×n row-major; every pointer covers its extent.
                unsafe {
                    matrixmultiply::sgemm(
                        t,
                        cols,
                        n,
                        1.0,
                        x.as_ptr(),
                        cols as isize,
                        1,
                        scratch.as_ptr(),
                        1,
                        cols as isize,
                        0.0,
                        y.as_mut_ptr(),
                        n as isize,
                        1,
                    );
                }
                Ok((r0, n, y))
            },
        )
        .collect::<Result<_, _>>()?;
    let mut out = vec![0f32; t * rows];
    for (r0, n, y) in parts {
        for i in 0..t {
            out[i * rows + r0..i * rows + r0 + n].copy_from_slice(&y[i * n..(i + 1) * n]);
        }
    }
    Ok(out)
}

/// Adds `bias` to every row of `y`.
pub fn add_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// RMSNorm of every row of `x` (rows of `w.len()`): `w · x / sqrt(mean(x²) + eps)`,
/// the mean of squares accumulated in f64.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for row in x.chunks_exact_mut(n) {
        let ms = row
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            / n as f64;
        let inv = 1.0 / (ms as f32 + eps).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v = g * (*v * inv);
        }
    }
}

/// The rotary tables for positions `0..t`: `cos` and `sin` of `t × head_dim/2`.
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// The inverse frequencies of a RoPE of `head_dim` with base `theta` and
/// `scaling`, as transformers' `_compute_*_rope_parameters` and Megatron-Core's
/// `RotaryEmbedding` compute them.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: Rope) -> Vec<f64> {
    let d = head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / d as f64))
        .collect();
    match scaling {
        Rope::Default => base,
        Rope::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        Rope::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_positions,
        } => {
            let low_wavelen = original_max_positions / low_freq_factor;
            let high_wavelen = original_max_positions / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (original_max_positions / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl RopeTable {
    /// Tables for `t` positions of a RoPE of `head_dim` with base `theta` and
    /// `scaling`.
    pub fn new(head_dim: usize, theta: f64, scaling: Rope, t: usize) -> RopeTable {
        let freqs = inv_freq(head_dim, theta, scaling);
        let half = freqs.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in 0..t {
            for f in &freqs {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeTable { half, cos, sin }
    }

    /// Rotates every head of `x` (`t` rows of `heads × head_dim`) in place, the
    /// `rotate_half` way: halves `(x₁, x₂)` become `(x₁c − x₂s, x₂c + x₁s)`.
    pub fn apply(&self, x: &mut [f32], heads: usize) {
        let d = 2 * self.half;
        for (p, row) in x.chunks_exact_mut(heads * d).enumerate() {
            let c = &self.cos[p * self.half..(p + 1) * self.half];
            let s = &self.sin[p * self.half..(p + 1) * self.half];
            for head in row.chunks_exact_mut(d) {
                let (x1, x2) = head.split_at_mut(self.half);
                for i in 0..self.half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * c[i] - b * s[i];
                    x2[i] = b * c[i] + a * s[i];
                }
            }
        }
    }
}

/// Causal attention with grouped keys and values: `q` is `t × heads × d`, `k` and
/// `v` are `t × groups × d`; query head `h` reads group `h / (heads / groups)`.
/// Scores are scaled by `1/sqrt(d)`, masked causally (and outside `window`), and
/// normalized with an f32 softmax. Returns `t × heads × d`.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], t: usize, arch: &AttentionArch) -> Vec<f32> {
    let (h, g, d) = (arch.heads, arch.groups, arch.head_dim);
    let per = h / g;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; t * h * d];
    out.par_chunks_mut(h * d).enumerate().for_each(|(i, orow)| {
        let mut scores = vec![0f32; t];
        for head in 0..h {
            let grp = head / per;
            let qi = &q[(i * h + head) * d..(i * h + head + 1) * d];
            let first = arch.window.map_or(0, |w| (i + 1).saturating_sub(w));
            let mut max = f32::NEG_INFINITY;
            for j in first..=i {
                let kj = &k[(j * g + grp) * d..(j * g + grp + 1) * d];
                let s = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                scores[j] = s;
                max = max.max(s);
            }
            let mut total = 0f32;
            for s in &mut scores[first..=i] {
                *s = (*s - max).exp();
                total += *s;
            }
            let o = &mut orow[head * d..(head + 1) * d];
            o.fill(0.0);
            for j in first..=i {
                let p = scores[j] / total;
                let vj = &v[(j * g + grp) * d..(j * g + grp + 1) * d];
                for (a, b) in o.iter_mut().zip(vj) {
                    *a += p * b;
                }
            }
        }
    });
    out
}

/// SwiGLU: `silu(gate) · up`, element-wise, into `gate`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `relu(x)²`, element-wise.
pub fn squared_relu(x: &mut [f32]) {
    for v in x {
        let r = v.max(0.0);
        *v = r * r;
    }
}

/// `log(1 + eˣ)`, linear above 20 as torch's `softplus`.
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

/// The softmax of `x`, in f32.
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - max).exp()).collect();
    let total: f32 = e.iter().sum();
    e.into_iter().map(|v| v / total).collect()
}

/// `x += y`.
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = inv_freq(128, 500000.0, Rope::Default);
        let scaled = inv_freq(
            128,
            500000.0,
            Rope::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_positions: 8192.0,
            },
        );
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 32.0).abs() < 1e-18);
    }

    #[test]
    fn widening_and_rounding() {
        let bytes: Vec<u8> = [1.0f32 + f32::EPSILON, 2.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut out = [0f32; 2];
        widen(DType::F32, &bytes, &mut out, Some(DType::BF16)).unwrap();
        assert_eq!(out, [1.0, 2.5]);
        assert!(widen(DType::I64, &[0; 8], &mut out[..1], None).is_err());
    }
}
