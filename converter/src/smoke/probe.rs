//! The smoke test of a LoRA merge: every merged tensor is probed with random
//! ±1 vectors `v`. The merged weight as published, times `v`, must equal the
//! base weight times `v` plus the scaled adapter product applied to `v`
//! (`s · B (A v)`), computed here in f64 from the inputs as read, without the
//! merge kernel ([`crate::plan::merge`]). DoRA updates rescale each output unit by
//! `m / ‖W + ΔW‖`; their norms are computed here too, in f64.
//!
//! # Tolerance
//! The merged weight is rounded to its dtype once per update (twice for PEFT's
//! embedding update, which rounds the delta first), so it differs from the exact
//! `W + ΔW` by at most half a unit in the last place per element. For each row
//! `i` the residual `e_i = W'ᵢ·v − expectedᵢ` is compared with
//! `σᵢ = sqrt(k · Σⱼ (½ ulp(W'ᵢⱼ) · vⱼ)²)` (k roundings) plus a bound on the f32
//! arithmetic of the merge (`(r + 2) · 2⁻²³ · s · |B| (|A| |v|)`): every row must
//! satisfy `|eᵢ| ≤ 6 σᵢ + f32 bound`, and over the tensor `Σ eᵢ² ≤ 2 Σ σᵢ²`
//! (beyond the f32 bound). Rounding errors are at most half an ulp and add up like
//! independent terms, so a correct merge stays well inside; a missing, doubled or
//! misplaced update adds `(ΔW v)ᵢ` coherently and is caught once the update is
//! larger than about one ulp of the weight, below which a bf16 merge cannot carry
//! it anyway.
//!
//! # Cost
//! A step probes each merged piece as it is written ([`Probe`], an
//! [`execute::Observer`]): the merged bytes are still in cache and the base was
//! just read, so the probe is one pass over both, in the low-rank form (`A v`
//! once per tensor, then `s · B[i] · (A v)` per row). Per element it takes the
//! difference `W'ᵢⱼ − Wᵢⱼ` (exact for weights of one dtype), its products with
//! both vectors and `(½ ulp(W'ᵢⱼ))²` from the exponent bits, in f64 lanes.
//! Validation then proves the bytes probed are the bytes published: it recomputes
//! the manifest's weights digest from the output's tensors as read back.

use ckpt_wire::ArtifactKind;
use rayon::prelude::*;
use serde::Serialize;

use crate::formats::dtype::DType;
use crate::formats::hf::HfCheckpoint;
use crate::formats::megatron::MegatronCheckpoint;
use std::sync::Mutex;
use std::time::Instant;

use crate::execute;
use crate::formats::source::{Files, GlobalTensor};
use crate::plan::{Operand, Piece, Plan, Rounding, TensorStore, Update};

use super::kernels;
use super::residual::{self, Elements, VECTORS};

/// Rows read at once (DoRA's two passes).
const BLOCK_ROWS: usize = 256;

/// Elements of the weight probed per block (a block of the base and of the merged
/// weight, in f32, stay in a core's cache).
const BLOCK_ELEMENTS: usize = 1 << 15;

/// What probing the merged tensors found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ProbeReport {
    /// Merged tensors probed.
    pub tensors: usize,
    /// Largest `|W'ᵢ·v − expectedᵢ|` over all tensors and rows.
    pub max_abs_diff: f64,
    /// The largest residual relative to its tolerance (≤ 1 passes).
    pub worst_ratio: f64,
    /// Tensors that failed, one line each.
    pub failures: Vec<String>,
    /// Time spent probing, summed over the workers.
    pub worker_seconds: f64,
}

/// What the probe found for one merged piece, as a split run's part records it:
/// the largest difference and its ratio to the tolerance as text (exact, and
/// NaN survives JSON), or why it could not be probed.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ProbedPiece {
    /// The piece.
    pub name: String,
    /// `(max_abs_diff, worst_ratio)`, or the error.
    pub result: Result<(String, String), String>,
    /// Time spent probing it.
    pub seconds: f64,
}

/// The output of a step, opened again through its format reader.
enum Output {
    Hf(HfCheckpoint),
    Megatron(MegatronCheckpoint),
}

impl Output {
    fn files(&self) -> &Files {
        match self {
            Output::Hf(c) => &c.files,
            Output::Megatron(c) => &c.files,
        }
    }

    fn tensor(&self, name: &str) -> Option<&GlobalTensor> {
        match self {
            Output::Hf(c) => c.tensor(name),
            Output::Megatron(c) => c.tensor(name),
        }
    }
}

/// Where a planned piece lies in the output: its tensor and box. Megatron pieces
/// that are a chunk of a key are named `key[o₀:e₀, o₁:e₁, …]`.
fn piece_box(p: &Piece) -> Option<(String, Vec<u64>)> {
    match p.name.split_once('[') {
        None => Some((p.name.clone(), vec![0; p.shape.len()])),
        Some((fqn, rest)) => {
            let inner = rest.strip_suffix(']')?;
            let offsets: Option<Vec<u64>> = inner
                .split(", ")
                .map(|r| r.split_once(':').and_then(|(o, _)| o.parse().ok()))
                .collect();
            Some((fqn.to_owned(), offsets?))
        }
    }
}

/// Random ±1 vectors, a function of the tensor name.
fn vectors(name: &str, n: usize) -> Vec<Vec<f64>> {
    let mut x = xxhash_rust::xxh3::xxh3_64(name.as_bytes()) | 1;
    (0..VECTORS)
        .map(|_| {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if x & 1 == 0 { 1.0 } else { -1.0 }
                })
                .collect()
        })
        .collect()
}

/// The mantissa bits and smallest normal exponent of `dtype` (f32 for anything
/// else that is merged).
fn ulp_params(dtype: DType) -> (i32, i32) {
    match dtype {
        DType::BF16 => (7, -126),
        DType::F16 => (10, -14),
        _ => (23, -126),
    }
}

/// The binary exponent of `x` as `dtype` spaces its values: `floor(log2 |x|)`,
/// at least the smallest normal exponent (zeros and subnormals share its ulp).
#[inline(always)]
fn exponent(x: f32, min_exp: i32) -> i32 {
    (((x.to_bits() >> 23) & 0xff) as i32 - 127).max(min_exp)
}

/// Half a unit in the last place of `x` in `dtype`.
fn half_ulp(x: f32, dtype: DType) -> f64 {
    let (mantissa, min_exp) = ulp_params(dtype);
    let e = if x.is_finite() {
        exponent(x, min_exp)
    } else {
        min_exp
    };
    2f64.powi(e - mantissa - 1)
}

/// Rows of a block as the probe reads them: widened, or bf16 bits as stored.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Rows<'a> {
    /// The bf16 bits of `bytes`, when they are aligned as u16.
    fn bf16(bytes: &'a [u8]) -> Option<Rows<'a>> {
        // SAFETY: any bit pattern is a valid u16; what is not aligned is refused.
        match unsafe { bytes.align_to::<u16>() } {
            (&[], words, &[]) if cfg!(target_endian = "little") => Some(Rows::Bf16(words)),
            _ => None,
        }
    }

    fn row(self, i: usize, cols: usize) -> Rows<'a> {
        match self {
            Rows::F32(v) => Rows::F32(&v[i * cols..(i + 1) * cols]),
            Rows::Bf16(v) => Rows::Bf16(&v[i * cols..(i + 1) * cols]),
        }
    }

    /// `Σⱼ xⱼ vⱼ` in f64.
    fn dot(self, v: &[f64]) -> f64 {
        match self {
            Rows::F32(x) => x.iter().zip(v).map(|(a, b)| f64::from(*a) * b).sum(),
            Rows::Bf16(x) => (0..x.len())
                .map(|j| f64::from(residual::Bf16(x).at(j)) * v[j])
                .sum(),
        }
    }
}

/// [`residual::row`] of a merged row over its base row.
fn row_residual(
    m: Rows<'_>,
    b: Rows<'_>,
    v: [&[f32]; VECTORS],
    mantissa: i32,
    min_exp: i32,
) -> ([f64; VECTORS], f64) {
    use residual::{Bf16, row};
    match (m, b) {
        (Rows::F32(m), Rows::F32(b)) => row(m, b, v, mantissa, min_exp),
        (Rows::F32(m), Rows::Bf16(b)) => row(m, Bf16(b), v, mantissa, min_exp),
        (Rows::Bf16(m), Rows::F32(b)) => row(Bf16(m), b, v, mantissa, min_exp),
        (Rows::Bf16(m), Rows::Bf16(b)) => row(Bf16(m), Bf16(b), v, mantissa, min_exp),
    }
}

/// Where the probe reads the merged weight: the piece's bytes as written, or the
/// output checkpoint through its reader.
enum Merged<'a> {
    /// Row-major bytes of the piece, in its dtype.
    Bytes(&'a [u8]),
    /// The tensor of the output holding the piece, and the piece's box offsets.
    Output {
        files: &'a Files,
        tensor: &'a GlobalTensor,
        offsets: Vec<u64>,
    },
}

impl Merged<'_> {
    /// Rows `start..start + n` of the merged piece into `out` (the rows of a
    /// 1-d piece are its elements).
    fn rows(&self, piece: &Piece, start: u64, n: u64, out: &mut [f32]) -> Result<(), String> {
        let cols = match piece.shape.len() {
            1 => 1,
            _ => piece.shape.last().copied().unwrap_or(1).max(1),
        };
        match self {
            Merged::Bytes(bytes) => {
                let es = piece.dtype.size() as u64;
                let range = (start * cols * es) as usize..((start + n) * cols * es) as usize;
                let b = bytes
                    .get(range)
                    .ok_or_else(|| format!("the piece holds {} bytes", bytes.len()))?;
                kernels::widen(piece.dtype, b, out, None)
            }
            Merged::Output {
                files,
                tensor,
                offsets,
            } => {
                let mut o_off = offsets.clone();
                let mut o_size = piece.shape.clone();
                // Leading axes of a merged piece are 1 wide (a layer's chunk) or absent.
                let k = if o_size.len() == 1 {
                    0
                } else {
                    o_size.len() - 2
                };
                o_off[k] += start;
                o_size[k] = n;
                kernels::read_box_f32(files, tensor, &o_off, &o_size, out, None)
            }
        }
    }
}

fn read_f32(
    files: &Files,
    t: &GlobalTensor,
    offsets: &[u64],
    sizes: &[u64],
) -> Result<Vec<f32>, String> {
    let mut out = vec![0f32; sizes.iter().product::<u64>() as usize];
    kernels::read_box_f32(files, t, offsets, sizes, &mut out, None)?;
    Ok(out)
}

/// The operand's matrix, rows × cols, in f64.
fn operand(op: &Operand, piece: &Piece, stores: &[&dyn TensorStore]) -> Result<Vec<f64>, String> {
    let mut out = Vec::with_capacity((op.rows * op.cols) as usize);
    for &i in &op.inputs {
        let input = piece
            .inputs
            .get(i)
            .ok_or_else(|| format!("operand input {i} is not planned"))?;
        let store = stores[input.store];
        let t = &store.tensors()[input.tensor];
        out.extend(
            read_f32(store.files(), t, &input.offsets, &input.sizes)?
                .into_iter()
                .map(f64::from),
        );
    }
    if out.len() as u64 != op.rows * op.cols {
        return Err(format!(
            "operand holds {} values, planned as {} × {}",
            out.len(),
            op.rows,
            op.cols
        ));
    }
    Ok(op.arrange(out))
}

/// Reads output rows `start..start + n` of the piece's base weight (its gather of
/// the inputs, cast to the piece's dtype as the merge holds it), `cols` wide.
fn base_rows(
    piece: &Piece,
    stores: &[&dyn TensorStore],
    start: u64,
    n: u64,
    cols: u64,
) -> Result<Vec<f32>, String> {
    let mut out = vec![0f32; (n * cols) as usize];
    base_rows_into(piece, stores, start, n, cols, &mut out)?;
    Ok(out)
}

/// [`base_rows`] into `out` (`n × cols`).
fn base_rows_into(
    piece: &Piece,
    stores: &[&dyn TensorStore],
    start: u64,
    n: u64,
    cols: u64,
    out: &mut [f32],
) -> Result<(), String> {
    let mut at = 0u64; // output row of the current run
    for run in &piece.gather.runs {
        let (lo, hi) = (start.max(at), (start + n).min(at + run.rows));
        if lo < hi {
            let dst = &mut out[((lo - start) * cols) as usize..((hi - start) * cols) as usize];
            if let Some(i) = run.input {
                let input = &piece.inputs[i];
                let store = stores[input.store];
                let t = &store.tensors()[input.tensor];
                let first = run.start + (lo - at);
                let k = input.sizes.len();
                let (mut offsets, mut sizes) = (input.offsets.clone(), input.sizes.clone());
                if k == 1 {
                    offsets[0] += first;
                    sizes[0] = hi - lo;
                } else if input.sizes[..k - 2].iter().all(|&s| s == 1) {
                    offsets[k - 2] += first;
                    sizes[k - 2] = hi - lo;
                } else {
                    return Err(format!(
                        "input box {:?} of {:?} is not a matrix of rows",
                        input.sizes, t.name
                    ));
                }
                kernels::read_box_f32(store.files(), t, &offsets, &sizes, dst, Some(piece.dtype))?;
            } else {
                dst.fill(0.0);
            }
        }
        at += run.rows;
    }
    Ok(())
}

/// The piece's weight when it is one input read whole, in the piece's dtype, as
/// rows of a matrix (its leading axes, if any, one wide): its store, tensor and box.
fn whole_input<'a>(
    piece: &'a Piece,
    stores: &[&'a dyn TensorStore],
) -> Option<(
    &'a dyn TensorStore,
    &'a GlobalTensor,
    &'a crate::plan::Input,
)> {
    let runs = &piece.gather.runs;
    let input = piece.inputs.first()?;
    let store = *stores.get(input.store)?;
    let t = store.tensors().get(input.tensor)?;
    let k = input.sizes.len();
    let whole = runs.len() == 1
        && runs[0].input == Some(0)
        && runs[0].start == 0
        && input.numel() == piece.shape.iter().product::<u64>()
        && t.dtype == piece.dtype
        && k >= 2
        && input.sizes[..k - 2].iter().all(|&s| s == 1)
        && input.sizes[k - 1] == piece.shape.last().copied().unwrap_or(0);
    whole.then_some((store, t, input))
}

/// One update in the form the probe evaluates.
enum Term {
    /// Row `i` (or the `i`-th updated row of `runs`) gains `s · B[i'] · (A v)`.
    Linear {
        a: Vec<f64>,
        b: Vec<f64>,
        r: usize,
        scale: f64,
        runs: Option<Vec<(u64, u64)>>,
        roundings: u32,
    },
    /// Row `i` gains `s · Σₖ A[k, i] (Bᵀ v)[k]` (a transposed linear layer or an
    /// embedding).
    Columns {
        a: Vec<f64>,
        b: Vec<f64>,
        r: usize,
        scale: f64,
        roundings: u32,
    },
    /// Row `i` gains `s · values[i] · v`.
    Bias { values: Vec<f64>, scale: f64 },
    /// Rows `indices` are replaced by `values`.
    Rows { indices: Vec<u64>, values: Vec<f64> },
}

/// Per-vector precomputations of a term.
fn prepare(term: &Term, v: &[f64], cols: usize) -> (Vec<f64>, Vec<f64>) {
    match term {
        Term::Linear { a, r, .. } => {
            let av: Vec<f64> = (0..*r)
                .map(|k| {
                    a[k * cols..(k + 1) * cols]
                        .iter()
                        .zip(v)
                        .map(|(x, y)| x * y)
                        .sum()
                })
                .collect();
            let abs: Vec<f64> = (0..*r)
                .map(|k| {
                    a[k * cols..(k + 1) * cols]
                        .iter()
                        .zip(v)
                        .map(|(x, y)| (x * y).abs())
                        .sum()
                })
                .collect();
            (av, abs)
        }
        Term::Columns { b, r, .. } => {
            // B is [cols, r]: (Bᵀ v)[k] = Σ_c B[c, k] v[c].
            let mut bv = vec![0f64; *r];
            let mut abs = vec![0f64; *r];
            for c in 0..cols {
                for k in 0..*r {
                    bv[k] += b[c * r + k] * v[c];
                    abs[k] += (b[c * r + k] * v[c]).abs();
                }
            }
            (bv, abs)
        }
        _ => (Vec::new(), Vec::new()),
    }
}

/// Index of row `i` among the updated rows of `runs`.
fn run_index(runs: &Option<Vec<(u64, u64)>>, i: u64) -> Option<u64> {
    match runs {
        None => Some(i),
        Some(runs) => {
            let mut before = 0;
            for &(s, n) in runs {
                if i >= s && i < s + n {
                    return Some(before + i - s);
                }
                before += n;
            }
            None
        }
    }
}

/// A piece's largest residual and its ratio to the tolerance, or why it was not
/// probed.
type Probed = Result<(f64, f64), String>;

const F32_GAMMA: f64 = 1.0 / (1u64 << 23) as f64;

fn probe_piece(piece: &Piece, stores: &[&dyn TensorStore], merged: &Merged<'_>) -> Probed {
    let merge = piece.merge.as_ref().expect("only merged pieces are probed");
    let shape = &piece.shape;
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let rows = shape.iter().product::<u64>() / cols;
    let dtype = piece.dtype;
    // DoRA: one update rescaled per output unit.
    if merge.updates.iter().any(|u| {
        matches!(
            u,
            Update::Linear {
                magnitude: Some(_),
                ..
            } | Update::Embedding {
                magnitude: Some(_),
                ..
            }
        )
    }) {
        if merge.updates.len() != 1 {
            return Err("DoRA combined with other updates is not probed".into());
        }
        return probe_dora(piece, stores, merged, rows, cols);
    }
    let mut terms = Vec::new();
    for u in &merge.updates {
        terms.push(match u {
            Update::Linear {
                a,
                b,
                scale,
                transposed: false,
                rows: runs,
                rounding,
                ..
            } => Term::Linear {
                a: operand(a, piece, stores)?,
                b: operand(b, piece, stores)?,
                r: a.rows as usize,
                scale: f64::from(*scale),
                runs: runs.clone(),
                // The product, its scaling and the sum each rounded, each within
                // half an ulp of a value about the weight's size.
                roundings: match rounding {
                    Rounding::Once => 1,
                    Rounding::DeltaFirst => 2,
                    Rounding::EachStep => 3,
                },
            },
            Update::Linear {
                a,
                b,
                scale,
                transposed: true,
                rounding,
                ..
            } => Term::Columns {
                a: operand(a, piece, stores)?,
                b: operand(b, piece, stores)?,
                r: a.rows as usize,
                scale: f64::from(*scale),
                roundings: match rounding {
                    Rounding::Once => 1,
                    Rounding::DeltaFirst => 2,
                    Rounding::EachStep => 3,
                },
            },
            Update::Embedding { a, b, scale, .. } => Term::Columns {
                a: operand(a, piece, stores)?,
                b: operand(b, piece, stores)?,
                r: a.rows as usize,
                scale: f64::from(*scale),
                roundings: 2,
            },
            Update::Bias { values, scale } => Term::Bias {
                values: operand(values, piece, stores)?,
                scale: f64::from(*scale),
            },
            Update::Rows { indices, values } => Term::Rows {
                indices: indices.clone(),
                values: operand(values, piece, stores)?,
            },
        });
    }
    if shape.len() == 1 {
        return probe_vector(piece, stores, merged, &terms);
    }
    let vs = vectors(&piece.name, cols as usize);
    let vs32: Vec<Vec<f32>> = vs
        .iter()
        .map(|v| v.iter().map(|&x| x as f32).collect())
        .collect();
    let preps: Vec<Vec<(Vec<f64>, Vec<f64>)>> = vs
        .iter()
        .map(|v| terms.iter().map(|t| prepare(t, v, cols as usize)).collect())
        .collect();
    let (mantissa, min_exp) = ulp_params(dtype);
    let (mut max_diff, mut worst) = (0f64, 0f64);
    let (mut sum_e2, mut sum_s2) = (0f64, 0f64);
    let c = cols as usize;
    let block = (BLOCK_ELEMENTS / c).max(1) as u64;
    let mut base_f32 = Vec::new();
    let mut merged_f32 = Vec::new();
    let mut start = 0u64;
    while start < rows {
        let n = block.min(rows - start);
        let len = n as usize * c;
        // bf16 rows are read as stored where they can be: the merged ones from
        // the piece's bytes, the base from the source when the piece's weight is
        // one bf16 input taken whole.
        let raw_base = (dtype == DType::BF16)
            .then(|| whole_input(piece, stores))
            .flatten()
            .map(|(store, t, input)| {
                let mut offsets = input.offsets.clone();
                let mut sizes = input.sizes.clone();
                let k = sizes.len();
                offsets[k - 2] += start;
                sizes[k - 2] = n;
                crate::formats::source::read_box(store.files(), t, &offsets, &sizes)
            });
        let base = match raw_base.as_deref().and_then(Rows::bf16) {
            Some(r) => r,
            None => {
                base_f32.resize(len, 0f32);
                base_rows_into(piece, stores, start, n, cols, &mut base_f32)?;
                Rows::F32(&base_f32)
            }
        };
        let es = dtype.size();
        let raw_merged = match merged {
            Merged::Bytes(b) if dtype == DType::BF16 => b
                .get(start as usize * c * es..(start as usize + n as usize) * c * es)
                .and_then(Rows::bf16),
            _ => None,
        };
        let merged_rows = match raw_merged {
            Some(r) => r,
            None => {
                merged_f32.resize(len, 0f32);
                merged.rows(piece, start, n, &mut merged_f32)?;
                Rows::F32(&merged_f32)
            }
        };
        for ri in 0..n as usize {
            let i = start + ri as u64;
            let wb = base.row(ri, c);
            // What the row moved under each vector, and its rounding spread (the
            // same for ±1 vectors).
            let (moved, s2_one) = row_residual(
                merged_rows.row(ri, c),
                wb,
                [&vs32[0], &vs32[1]],
                mantissa,
                min_exp,
            );
            for (vi, v) in vs.iter().enumerate() {
                // The change the updates make to row i, times v.
                let mut expected = 0f64;
                let mut roundings = 0u32;
                let mut lin = 0f64;
                for (term, (pre, pre_abs)) in terms.iter().zip(&preps[vi]) {
                    match term {
                        Term::Linear {
                            b,
                            r,
                            scale,
                            runs,
                            roundings: k,
                            ..
                        } => {
                            if let Some(ii) = run_index(runs, i) {
                                let row = &b[ii as usize * r..(ii as usize + 1) * r];
                                expected +=
                                    scale * row.iter().zip(pre).map(|(x, y)| x * y).sum::<f64>();
                                lin += (*r as f64 + 2.0)
                                    * F32_GAMMA
                                    * scale.abs()
                                    * row
                                        .iter()
                                        .zip(pre_abs)
                                        .map(|(x, y)| x.abs() * y)
                                        .sum::<f64>();
                                roundings += k;
                            }
                        }
                        Term::Columns {
                            a,
                            r,
                            scale,
                            roundings: k,
                            ..
                        } => {
                            let mut s = 0f64;
                            let mut s_abs = 0f64;
                            for kk in 0..*r {
                                s += a[kk * rows as usize + i as usize] * pre[kk];
                                s_abs += (a[kk * rows as usize + i as usize]).abs() * pre_abs[kk];
                            }
                            expected += scale * s;
                            lin += (*r as f64 + 2.0) * F32_GAMMA * scale.abs() * s_abs;
                            roundings += k;
                        }
                        Term::Bias { values, scale } => {
                            let row = &values[i as usize * c..(i as usize + 1) * c];
                            expected += scale * row.iter().zip(v).map(|(x, y)| x * y).sum::<f64>();
                            roundings += 1;
                        }
                        Term::Rows { indices, values } => {
                            if let Some(pos) = indices.iter().rposition(|&x| x == i) {
                                // The row is replaced: it moves from the base to the values.
                                let to: f64 = values[pos * c..(pos + 1) * c]
                                    .iter()
                                    .zip(v)
                                    .map(|(x, y)| x * y)
                                    .sum();
                                let from = wb.dot(v);
                                expected = to - from;
                                lin = 0.0;
                                roundings = 1;
                            }
                        }
                    }
                }
                let e = (moved[vi] - expected).abs();
                let s2 = f64::from(roundings) * s2_one;
                let sigma = s2.sqrt();
                let allowed = 6.0 * sigma + lin + 1e-30;
                if e.is_nan() {
                    return Ok((f64::INFINITY, f64::INFINITY));
                }
                max_diff = max_diff.max(e);
                worst = worst.max(e / allowed);
                let beyond = (e - lin).max(0.0);
                sum_e2 += beyond * beyond;
                sum_s2 += s2;
            }
        }
        start += n;
    }
    let aggregate = sum_e2 / (2.0 * sum_s2).max(1e-300);
    if sum_e2 > 0.0 && sum_e2 > 2.0 * sum_s2 {
        worst = worst.max(aggregate);
    }
    if !max_diff.is_finite() {
        worst = f64::INFINITY;
    }
    Ok((max_diff, worst))
}

/// A 1-d merged tensor (a bias): compared element by element.
fn probe_vector(
    piece: &Piece,
    stores: &[&dyn TensorStore],
    merged_at: &Merged<'_>,
    terms: &[Term],
) -> Probed {
    let n = piece.shape[0];
    let base = base_rows(piece, stores, 0, n, 1)?;
    let mut merged = vec![0f32; n as usize];
    merged_at.rows(piece, 0, n, &mut merged)?;
    let (mut max_diff, mut worst) = (0f64, 0f64);
    for j in 0..n as usize {
        let mut expected = f64::from(base[j]);
        let (mut roundings, mut lin) = (0u32, 0f64);
        for term in terms {
            match term {
                Term::Bias { values, scale } => {
                    expected += scale * values[j];
                    lin += F32_GAMMA * (scale * values[j]).abs();
                    roundings += 1;
                }
                Term::Rows { indices, values } => {
                    if let Some(pos) = indices.iter().rposition(|&x| x == j as u64) {
                        expected = values[pos];
                        (roundings, lin) = (1, 0.0);
                    }
                }
                _ => return Err("a matrix update of a 1-d tensor is not probed".into()),
            }
        }
        let got = merged[j];
        let e = (f64::from(got) - expected).abs();
        let allowed = f64::from(roundings) * half_ulp(got, piece.dtype) + lin + 1e-30;
        max_diff = max_diff.max(e);
        worst = worst.max(if e.is_nan() {
            f64::INFINITY
        } else {
            e / allowed
        });
    }
    Ok((max_diff, worst))
}

#[allow(clippy::too_many_arguments)]
fn probe_dora(
    piece: &Piece,
    stores: &[&dyn TensorStore],
    merged: &Merged<'_>,
    rows: u64,
    cols: u64,
) -> Probed {
    let merge = piece.merge.as_ref().expect("merged");
    let (a, b, m, scale, row_norms) = match &merge.updates[0] {
        Update::Linear {
            a,
            b,
            scale,
            transposed,
            magnitude: Some(m),
            rows: None,
            ..
        } => (a, b, m, *scale, !*transposed),
        Update::Embedding {
            a,
            b,
            scale,
            magnitude: Some(m),
        } => (a, b, m, *scale, false),
        _ => return Err("DoRA on part of a weight is not probed".into()),
    };
    let (av, bv, mv) = (
        operand(a, piece, stores)?,
        operand(b, piece, stores)?,
        operand(m, piece, stores)?,
    );
    let r = a.rows as usize;
    let (rn, c) = (rows as usize, cols as usize);
    let s = f64::from(scale);
    // ΔW row i in the stored orientation.
    let delta = |i: usize| -> Vec<f64> {
        if row_norms {
            // A [r, cols], B [rows, r].
            let mut d = vec![0f64; c];
            for k in 0..r {
                let bik = b_at(&bv, i, k, r);
                for (j, dj) in d.iter_mut().enumerate() {
                    *dj += bik * av[k * c + j];
                }
            }
            d.iter().map(|x| x * s).collect()
        } else {
            // A [r, rows], B [cols, r]: Δ[i, j] = s Σₖ A[k, i] B[j, k].
            (0..c)
                .map(|j| s * (0..r).map(|k| av[k * rn + i] * bv[j * r + k]).sum::<f64>())
                .collect()
        }
    };
    let read = |start: u64, n: u64| -> Result<(Vec<f32>, Vec<f32>), String> {
        let base = base_rows(piece, stores, start, n, cols)?;
        let mut out = vec![0f32; (n * cols) as usize];
        merged.rows(piece, start, n, &mut out)?;
        Ok((base, out))
    };
    // Column norms need a first pass over all rows.
    let mut col_sq = vec![0f64; c];
    if !row_norms {
        let mut start = 0;
        while start < rows {
            let n = (BLOCK_ROWS as u64).min(rows - start);
            let (base, _) = read(start, n)?;
            for ri in 0..n as usize {
                let d = delta(start as usize + ri);
                for j in 0..c {
                    let w = f64::from(base[ri * c + j]) + d[j];
                    col_sq[j] += w * w;
                }
            }
            start += n;
        }
    }
    let vs = vectors(&piece.name, c);
    let (mut max_diff, mut worst) = (0f64, 0f64);
    let mut start = 0;
    while start < rows {
        let n = (BLOCK_ROWS as u64).min(rows - start);
        let (base, merged) = read(start, n)?;
        for ri in 0..n as usize {
            let i = start as usize + ri;
            let d = delta(i);
            let w: Vec<f64> = (0..c).map(|j| f64::from(base[ri * c + j]) + d[j]).collect();
            let factor: Vec<f64> = if row_norms {
                let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
                vec![mv[i] / norm; c]
            } else {
                (0..c).map(|j| mv[j] / col_sq[j].sqrt()).collect()
            };
            let wm = &merged[ri * c..(ri + 1) * c];
            for v in &vs {
                let expected: f64 = (0..c).map(|j| w[j] * factor[j] * v[j]).sum();
                let got: f64 = wm.iter().zip(v).map(|(x, y)| f64::from(*x) * y).sum();
                let s2: f64 = wm
                    .iter()
                    .zip(v)
                    .map(|(x, y)| (half_ulp(*x, piece.dtype) * y).powi(2))
                    .sum();
                // The merge computes norms and factors in f32.
                let lin = 1e-5 * (0..c).map(|j| (w[j] * factor[j] * v[j]).abs()).sum::<f64>();
                let e = (got - expected).abs();
                max_diff = max_diff.max(e);
                worst = worst.max(e / (6.0 * s2.sqrt() + lin + 1e-30));
            }
        }
        start += n;
    }
    Ok((max_diff, worst))
}

fn b_at(b: &[f64], i: usize, k: usize, r: usize) -> f64 {
    b[i * r + k]
}

/// Probes every merged piece of `plan` against the output in `dir` (of `kind`),
/// in parallel: the published output, read through its format reader.
///
/// # Errors
/// A message when the output cannot be opened.
pub fn run(
    plan: &Plan,
    stores: &[&dyn TensorStore],
    dir: &std::path::Path,
    kind: ArtifactKind,
) -> Result<ProbeReport, String> {
    let merged: Vec<&Piece> = plan.pieces.iter().filter(|p| p.merge.is_some()).collect();
    if merged.is_empty() {
        return Ok(ProbeReport::default());
    }
    let out = if kind == ArtifactKind::CheckpointMegatron {
        Output::Megatron(MegatronCheckpoint::open(dir).map_err(|e| e.to_string())?)
    } else {
        Output::Hf(HfCheckpoint::open(dir).map_err(|e| e.to_string())?)
    };
    let started = Instant::now();
    let results: Vec<(String, Probed)> = merged
        .par_iter()
        .map(|p| {
            let probed = piece_box(p)
                .ok_or_else(|| "cannot place the piece in the output".to_owned())
                .and_then(|(name, offsets)| {
                    let tensor = out
                        .tensor(&name)
                        .ok_or_else(|| format!("tensor {name:?} is missing in the output"))?;
                    let at = Merged::Output {
                        files: out.files(),
                        tensor,
                        offsets,
                    };
                    probe_piece(p, stores, &at)
                });
            (p.name.clone(), probed)
        })
        .collect();
    Ok(summarize(results, started.elapsed().as_secs_f64()))
}

fn summarize(results: Vec<(String, Probed)>, worker_seconds: f64) -> ProbeReport {
    let mut report = ProbeReport {
        tensors: results.len(),
        worker_seconds,
        ..ProbeReport::default()
    };
    for (name, r) in results {
        match r {
            Ok((diff, ratio)) => {
                report.max_abs_diff = report.max_abs_diff.max(diff);
                report.worst_ratio = report.worst_ratio.max(ratio);
                if ratio > 1.0 || ratio.is_nan() {
                    report.failures.push(format!(
                        "{name}: merged weight × v differs from base × v + s·B(A v) by {diff:.3e}, {ratio:.1}× the rounding tolerance"
                    ));
                }
            }
            Err(e) => report.failures.push(format!("{name}: {e}")),
        }
    }
    report.failures.sort();
    report
}

/// The probe of a step, run as the merge writes: an [`execute::Observer`] that
/// probes each merged piece from its bytes as written, on the worker that
/// produced them. [`Probe::report`] then lists every merged piece of the plan,
/// a piece never seen as a failure.
pub struct Probe<'a> {
    stores: &'a [&'a dyn TensorStore],
    results: Mutex<Vec<(String, Probed, f64)>>,
}

impl<'a> Probe<'a> {
    /// A probe of merged pieces read from `stores`.
    pub fn new(stores: &'a [&'a dyn TensorStore]) -> Probe<'a> {
        Probe {
            stores,
            results: Mutex::new(Vec::new()),
        }
    }

    /// What the probe found so far, one line per merged piece (handed over).
    pub fn take(&self) -> Vec<ProbedPiece> {
        std::mem::take(&mut *self.results.lock().expect("probe lock"))
            .into_iter()
            .map(|(name, r, seconds)| ProbedPiece {
                name,
                result: r.map(|(diff, ratio)| (diff.to_string(), ratio.to_string())),
                seconds,
            })
            .collect()
    }

    /// Adds what another process found as it wrote its merged pieces ([`Probe::take`]
    /// there): the parts of a split run.
    pub fn add(&self, found: &[ProbedPiece]) {
        let number = |s: &str| s.parse::<f64>().unwrap_or(f64::NAN);
        self.results
            .lock()
            .expect("probe lock")
            .extend(found.iter().map(|p| {
                let r = p
                    .result
                    .as_ref()
                    .map(|(diff, ratio)| (number(diff), number(ratio)))
                    .map_err(Clone::clone);
                (p.name.clone(), r, p.seconds)
            }));
    }

    /// What the probe found for the merged pieces of `plan` (what it saw is
    /// handed over: a second call finds nothing probed).
    pub fn report(&self, plan: &Plan) -> ProbeReport {
        let mut seen: std::collections::HashMap<String, (Probed, f64)> =
            std::mem::take(&mut *self.results.lock().expect("probe lock"))
                .into_iter()
                .map(|(n, r, t)| (n, (r, t)))
                .collect();
        let mut seconds = 0.0;
        let results = plan
            .pieces
            .iter()
            .filter(|p| p.merge.is_some())
            .map(|p| match seen.remove(&p.name) {
                Some((r, t)) => {
                    seconds += t;
                    (p.name.clone(), r)
                }
                None => (p.name.clone(), Err("not probed as it was written".into())),
            })
            .collect();
        summarize(results, seconds)
    }
}

impl execute::Observer for Probe<'_> {
    fn written(&self, piece: &Piece, bytes: &[u8]) {
        if piece.merge.is_none() {
            return;
        }
        let started = Instant::now();
        let probed = probe_piece(piece, self.stores, &Merged::Bytes(bytes));
        let seconds = started.elapsed().as_secs_f64();
        self.results
            .lock()
            .expect("probe lock")
            .push((piece.name.clone(), probed, seconds));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_ulps() {
        assert_eq!(half_ulp(1.0, DType::BF16), 2f64.powi(-8));
        assert_eq!(half_ulp(1.5, DType::F32), 2f64.powi(-24));
        assert_eq!(half_ulp(-3.0, DType::F16), 2f64.powi(-10));
    }

    use crate::plan::{Dest, LoraMerge, RowGather};
    use std::path::Path;

    fn write(dir: &Path, tensors: &[(&str, DType, Vec<usize>, Vec<f32>)]) -> HfCheckpoint {
        std::fs::create_dir_all(dir).unwrap();
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, d, _, v)| {
                let mut b = vec![0u8; v.len() * d.size()];
                crate::formats::dtype::encode(*d, v, &mut b);
                b
            })
            .collect();
        let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((n, d, s, _), b)| {
                (
                    *n,
                    safetensors::tensor::TensorView::new(d.to_safetensors(), s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::tensor::serialize_to_file(views, None, &dir.join("model.safetensors"))
            .unwrap();
        HfCheckpoint::open(dir).unwrap()
    }

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }

    /// The probe passes the merge kernel's own output and fails a merge with a
    /// wrong scale, none at all, or one row left unmerged, in bf16 and f32, read
    /// back from the output and from the bytes as written.
    #[test]
    fn a_wrong_merge_is_caught_and_a_right_one_passes() {
        let (rows, cols, r) = (96usize, 160usize, 4usize);
        for dtype in [DType::BF16, DType::F32] {
            let dir = tempfile::tempdir().unwrap();
            let w = values(rows * cols, 3, 0.05);
            let a = values(r * cols, 5, 0.2);
            let b = values(rows * r, 7, 0.2);
            let base = write(
                &dir.path().join("base"),
                &[("w", dtype, vec![rows, cols], w)],
            );
            let adapter = write(
                &dir.path().join("adapter"),
                &[
                    ("a", DType::F32, vec![r, cols], a),
                    ("b", DType::F32, vec![rows, r], b),
                ],
            );
            let stores: [&dyn TensorStore; 2] = [&base, &adapter];
            let merge = |scale: f32| LoraMerge {
                updates: vec![Update::Linear {
                    a: Operand {
                        inputs: vec![1],
                        rows: r as u64,
                        cols: cols as u64,
                        transposed: false,
                    },
                    b: Operand {
                        inputs: vec![2],
                        rows: rows as u64,
                        cols: r as u64,
                        transposed: false,
                    },
                    scale,
                    rounding: Rounding::Once,
                    transposed: false,
                    rows: None,
                    magnitude: None,
                }],
            };
            let piece = Piece {
                name: "w".into(),
                dtype,
                shape: vec![rows as u64, cols as u64],
                inputs: vec![
                    crate::plan::Input::whole(0, 0, &base.tensors[0]),
                    crate::plan::Input::whole(1, 0, &adapter.tensors[0]),
                    crate::plan::Input::whole(1, 1, &adapter.tensors[1]),
                ],
                gather: RowGather::copy(rows as u64, cols as u64),
                dest: Dest::Raw { file: 0, offset: 0 },
                transform: String::new(),
                merge: Some(merge(0.5)),
            };
            let plan = Plan {
                pieces: vec![piece],
                ..Plan::default()
            };
            let inputs: Vec<(DType, &[u8])> = [(&base, 0), (&adapter, 0), (&adapter, 1)]
                .iter()
                .map(|(s, i)| {
                    let t = &s.tensors[*i];
                    (t.dtype, s.files.slice(t.chunks[0].footprint()))
                })
                .collect();
            let base_bytes = inputs[0].1.to_vec();
            // (what, scale, a row left unmerged, passes)
            for (what, scale, unmerged, ok) in [
                ("right", 0.5f32, None, true),
                ("scale ×1.5", 0.75, None, false),
                ("none", 0.0, None, false),
                ("row 37 unmerged", 0.5, Some(37), false),
            ] {
                let mut out = vec![0u8; base_bytes.len()];
                crate::plan::merge::apply(
                    &merge(scale),
                    dtype,
                    &[rows as u64, cols as u64],
                    &inputs,
                    Some(&base_bytes),
                    &mut out,
                );
                if let Some(r) = unmerged {
                    let row = cols * dtype.size();
                    out[r * row..(r + 1) * row]
                        .copy_from_slice(&base_bytes[r * row..(r + 1) * row]);
                }
                // As published (read back through the reader) …
                let mut vals = vec![0f32; rows * cols];
                crate::smoke::kernels::widen(dtype, &out, &mut vals, None).unwrap();
                let odir = dir.path().join(format!("out-{what}"));
                write(&odir, &[("w", dtype, vec![rows, cols], vals)]);
                let rep = run(&plan, &stores, &odir, ArtifactKind::CheckpointHf).unwrap();
                // … and as written (the bytes a step's probe sees).
                let probe = Probe::new(&stores);
                execute::Observer::written(&probe, &plan.pieces[0], &out);
                let seen = probe.report(&plan);
                for rep in [rep, seen] {
                    assert_eq!(rep.tensors, 1);
                    assert_eq!(rep.failures.is_empty(), ok, "{dtype} {what}: {rep:?}");
                    if ok {
                        assert!(rep.worst_ratio < 0.5, "{dtype}: {rep:?}");
                    }
                }
            }
            // A merged piece the step never showed the probe fails.
            let unseen = Probe::new(&stores).report(&plan);
            assert_eq!(unseen.failures.len(), 1, "{unseen:?}");
        }
    }

    #[test]
    fn pieces_are_placed() {
        let p = Piece {
            name: "decoder.layers.mlp.linear_fc1.weight[1:2, 128:256, 0:64]".into(),
            dtype: DType::BF16,
            shape: vec![1, 128, 64],
            inputs: Vec::new(),
            gather: crate::plan::RowGather::copy(128, 64),
            dest: crate::plan::Dest::Raw { file: 0, offset: 0 },
            transform: String::new(),
            merge: None,
        };
        assert_eq!(
            piece_box(&p),
            Some((
                "decoder.layers.mlp.linear_fc1.weight".into(),
                vec![1, 128, 0]
            ))
        );
    }
}
