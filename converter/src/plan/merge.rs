//! The merge kernels: a planned [`LoraMerge`] applied to a gathered weight.
//!
//! Why the arithmetic is spelled out: a merged checkpoint is only as good as its
//! agreement with what the reference tools compute, and bf16 leaves no room for
//! "close". PEFT (`merge_and_unload` on CPU, adapters upcast to f32) and
//! Megatron-Bridge's HF export compute `B @ A` with an f32 sgemm, multiply by the
//! scale in f32, add in f32 and round once to the parameter's dtype; PEFT's
//! embedding merge rounds the delta first. Each step here is one IEEE operation in
//! that order: the product is a fused multiply-add per rank term, in rank order,
//! from zero (what sgemm micro-kernels do for small inner dimensions), then a
//! separate multiply by the scale, then a separate add (Rust never contracts `a *
//! b + c`), then round-to-nearest-even. The interop suite measures the agreement
//! with PEFT element by element.
//!
//! Memory: the weight is processed in blocks of rows, in parallel, in the output
//! buffer itself; only the adapter's matrices are widened to f32. A block needs
//! two rows of f32 scratch, so a large tensor neither serializes the run nor
//! doubles its footprint.

use rayon::prelude::*;

use crate::formats::dtype::{DType, decode, encode, round_to};
use crate::plan::{LoraMerge, Operand, Rounding, Update};

/// Elements of the weight handled by one task.
const BLOCK_ELEMENTS: u64 = 1 << 16;

/// Columns of the product accumulated in registers at once.
const TILE: usize = 64;

/// What a merge's checks know of one input: its dtype and the element count of
/// its box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputMeta {
    /// Element type.
    pub dtype: DType,
    /// Elements in the box.
    pub numel: u64,
}

/// The weight as a matrix: rows of its last axis.
fn matrix(shape: &[u64]) -> (u64, u64) {
    let numel: u64 = shape.iter().product();
    let cols = shape.last().copied().unwrap_or(1).max(1);
    (numel / cols, cols)
}

fn is_merge_dtype(d: DType) -> bool {
    matches!(d, DType::BF16 | DType::F16 | DType::F32)
}

fn check_operand(
    what: &str,
    op: &Operand,
    inputs: &[InputMeta],
    rows: u64,
    cols: u64,
) -> Result<(), String> {
    if op.rows != rows || op.cols != cols {
        return Err(format!(
            "{what} is planned as [{}, {}], expected [{rows}, {cols}]",
            op.rows, op.cols
        ));
    }
    let mut numel = 0u64;
    for &i in &op.inputs {
        let m = inputs
            .get(i)
            .ok_or_else(|| format!("{what} reads missing input {i}"))?;
        if !is_merge_dtype(m.dtype) {
            return Err(format!(
                "{what} is {}: expected bfloat16, float16 or float32",
                m.dtype
            ));
        }
        numel += m.numel;
    }
    if numel != rows * cols {
        return Err(format!(
            "{what} inputs hold {numel} elements, expected {rows} x {cols}"
        ));
    }
    Ok(())
}

/// Checks a merge against the piece it belongs to (`shape`, `dtype`) and the
/// piece's inputs.
///
/// # Errors
/// A message saying which operand or update does not fit.
pub fn check(
    merge: &LoraMerge,
    shape: &[u64],
    dtype: DType,
    inputs: &[InputMeta],
) -> Result<(), String> {
    if !is_merge_dtype(dtype) {
        return Err(format!(
            "a merged weight is {dtype}: expected bfloat16, float16 or float32"
        ));
    }
    let (rows, cols) = matrix(shape);
    for (n, u) in merge.updates.iter().enumerate() {
        let what = |s: &str| format!("update {n}: {s}");
        match u {
            Update::Linear {
                a,
                b,
                scale,
                transposed,
                rows: runs,
                magnitude,
                rounding,
            } => {
                if *rounding == Rounding::EachStep && magnitude.is_some() {
                    return Err(what("DoRA is merged with one rounding"));
                }
                if shape.len() < 2 {
                    return Err(what("a linear update needs a matrix"));
                }
                let r = a.rows;
                let (out, inn) = if *transposed {
                    (cols, rows)
                } else {
                    let updated = match runs {
                        Some(runs) => {
                            let mut total = 0u64;
                            let mut end = 0u64;
                            for &(start, count) in runs {
                                if start < end || start + count > rows {
                                    return Err(what(&format!(
                                        "row run {start}+{count} is out of order or outside {rows} rows"
                                    )));
                                }
                                end = start + count;
                                total += count;
                            }
                            total
                        }
                        None => rows,
                    };
                    (updated, cols)
                };
                if *transposed && runs.is_some() {
                    return Err(what("row runs of a transposed weight"));
                }
                if runs.is_some() && magnitude.is_some() {
                    return Err(what("DoRA on part of a weight"));
                }
                check_operand(&what("A"), a, inputs, r, inn)?;
                check_operand(&what("B"), b, inputs, out, r)?;
                if let Some(m) = magnitude {
                    check_operand(&what("magnitude"), m, inputs, 1, out)
                        .or_else(|_| check_operand(&what("magnitude"), m, inputs, out, 1))?;
                }
                if !scale.is_finite() {
                    return Err(what("the scale is not finite"));
                }
            }
            Update::Embedding {
                a,
                b,
                scale,
                magnitude,
            } => {
                if shape.len() != 2 {
                    return Err(what("an embedding update needs a matrix"));
                }
                let r = a.rows;
                check_operand(&what("A"), a, inputs, r, rows)?;
                check_operand(&what("B"), b, inputs, cols, r)?;
                if let Some(m) = magnitude {
                    check_operand(&what("magnitude"), m, inputs, 1, cols)
                        .or_else(|_| check_operand(&what("magnitude"), m, inputs, cols, 1))?;
                }
                if !scale.is_finite() {
                    return Err(what("the scale is not finite"));
                }
            }
            Update::Bias { values, scale } => {
                check_operand(&what("bias"), values, inputs, 1, rows * cols)
                    .or_else(|_| check_operand(&what("bias"), values, inputs, rows * cols, 1))?;
                if !scale.is_finite() {
                    return Err(what("the scale is not finite"));
                }
            }
            Update::Rows { indices, values } => {
                check_operand(&what("rows"), values, inputs, indices.len() as u64, cols)?;
                if let Some(bad) = indices.iter().find(|&&i| i >= rows) {
                    return Err(what(&format!("row {bad} is outside {rows} rows")));
                }
            }
        }
    }
    Ok(())
}

/// Bytes of scratch a merge holds besides the output buffer: its operands in f32
/// and a block of rows per worker.
pub fn scratch_bytes(merge: &LoraMerge, shape: &[u64]) -> u64 {
    let (_, cols) = matrix(shape);
    let operands: u64 = merge
        .updates
        .iter()
        .map(|u| match u {
            Update::Linear {
                a, b, magnitude, ..
            }
            | Update::Embedding {
                a, b, magnitude, ..
            } => {
                a.rows * a.cols
                    + b.rows * b.cols
                    + magnitude.as_ref().map_or(0, |m| m.rows * m.cols)
            }
            Update::Bias { values, .. } | Update::Rows { values, .. } => values.rows * values.cols,
        })
        .max()
        .unwrap_or(0);
    let threads = rayon::current_num_threads() as u64;
    4 * (operands + threads * 2 * cols.max(BLOCK_ELEMENTS))
}

/// Widens the operand's inputs to f32, concatenated.
fn operand(op: &Operand, inputs: &[(DType, &[u8])]) -> Vec<f32> {
    let mut out = vec![0f32; (op.rows * op.cols) as usize];
    let mut at = 0usize;
    for &i in &op.inputs {
        let (d, bytes) = inputs[i];
        let n = bytes.len() / d.size();
        decode(d, bytes, &mut out[at..at + n]);
        at += n;
    }
    op.arrange(out)
}

/// Row-major transpose of a `rows` × `cols` matrix.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = m[i * cols + j];
        }
    }
    t
}

/// `acc[i][j] = Σ_k coef[i][k] · basis[k][j]` for the `N` rows of `coef` (`[N, r]`)
/// into `acc` (`[N, cols]`): one fused multiply-add per term, k in order, from +0.
/// Columns are done in register tiles shared by the rows (each basis load feeds
/// `N` multiply-adds); every element sees the same operation sequence whatever
/// the tiling, so the bits never depend on it.
#[inline(always)]
fn delta_rows_portable<const N: usize>(coef: &[f32], basis: &[f32], acc: &mut [f32]) {
    let r = coef.len() / N;
    let cols = acc.len() / N;
    let mut j = 0;
    while j + TILE <= cols {
        let mut t = [[0f32; TILE]; N];
        for k in 0..r {
            let b: &[f32; TILE] = basis[k * cols + j..k * cols + j + TILE]
                .try_into()
                .expect("a tile of the basis row");
            for (i, ti) in t.iter_mut().enumerate() {
                let a = coef[i * r + k];
                for (y, &x) in ti.iter_mut().zip(b) {
                    *y = a.mul_add(x, *y);
                }
            }
        }
        for (i, ti) in t.iter().enumerate() {
            acc[i * cols + j..i * cols + j + TILE].copy_from_slice(ti);
        }
        j += TILE;
    }
    for i in 0..N {
        for x in j..cols {
            let mut s = 0f32;
            for k in 0..r {
                s = coef[i * r + k].mul_add(basis[k * cols + x], s);
            }
            acc[i * cols + x] = s;
        }
    }
}

/// Rows of the product per call of the kernel.
const ROWS: usize = 4;

#[inline(always)]
fn delta_rows_any(coef: &[f32], basis: &[f32], acc: &mut [f32], n: usize) {
    match n {
        4 => delta_rows_portable::<4>(coef, basis, acc),
        3 => delta_rows_portable::<3>(coef, basis, acc),
        2 => delta_rows_portable::<2>(coef, basis, acc),
        _ => delta_rows_portable::<1>(coef, basis, acc),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn delta_rows_avx512(coef: &[f32], basis: &[f32], acc: &mut [f32], n: usize) {
    delta_rows_any(coef, basis, acc, n);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn delta_rows_avx2(coef: &[f32], basis: &[f32], acc: &mut [f32], n: usize) {
    delta_rows_any(coef, basis, acc, n);
}

/// `n` rows (at most [`ROWS`]) of `B @ A` in the layout of the weight, with the
/// widest fused multiply-add the CPU has. `f32::mul_add` is fused on every path (a
/// library call where the CPU has no FMA), so the bits never depend on the path.
fn delta_rows(coef: &[f32], basis: &[f32], acc: &mut [f32], n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above), and AVX-512F implies AVX2 and FMA.
            return unsafe { delta_rows_avx512(coef, basis, acc, n) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { delta_rows_avx2(coef, basis, acc, n) };
        }
    }
    delta_rows_any(coef, basis, acc, n);
}

/// One row of the product (the kernel with `n = 1`).
fn delta_row(coef: &[f32], basis: &[f32], acc: &mut [f32]) {
    delta_rows(coef, basis, acc, 1);
}

/// How a row of the weight is updated by a product row.
#[derive(Clone, Copy)]
enum Combine {
    /// `w + acc·s`.
    Add,
    /// `w + rne(acc·s)`.
    AddRounded,
    /// `w + rne(rne(acc)·s)`.
    AddStepwise,
}

/// The product of a low-rank update laid out as the weight: row `i` of the delta
/// is `coef[i] @ basis` (`coef` `[n, r]`, `basis` `[r, cols]`).
struct Product {
    coef: Vec<f32>,
    basis: Vec<f32>,
    r: usize,
    scale: f32,
}

impl Product {
    fn row(&self, j: usize, acc: &mut [f32]) {
        delta_row(&self.coef[j * self.r..(j + 1) * self.r], &self.basis, acc);
    }

    /// Product rows `js` (at most [`ROWS`]) into `acc` (`[js.len(), cols]`).
    fn rows(&self, js: &[usize], coef: &mut Vec<f32>, acc: &mut [f32]) {
        coef.clear();
        for &j in js {
            coef.extend_from_slice(&self.coef[j * self.r..(j + 1) * self.r]);
        }
        delta_rows(coef, &self.basis, acc, js.len());
    }
}

/// Which product row updates weight row `i` (`None`: the row is kept).
enum RowMap {
    All,
    Some(Vec<u32>),
}

impl RowMap {
    fn new(runs: Option<&Vec<(u64, u64)>>, rows: u64) -> RowMap {
        match runs {
            None => RowMap::All,
            Some(runs) => {
                let mut map = vec![u32::MAX; rows as usize];
                let mut j = 0u32;
                for &(start, count) in runs {
                    for i in start..start + count {
                        map[i as usize] = j;
                        j += 1;
                    }
                }
                RowMap::Some(map)
            }
        }
    }

    fn get(&self, i: usize) -> Option<usize> {
        match self {
            RowMap::All => Some(i),
            RowMap::Some(m) => (m[i] != u32::MAX).then_some(m[i] as usize),
        }
    }
}

fn block_rows(cols: u64) -> usize {
    (BLOCK_ELEMENTS / cols.max(1)).max(1) as usize
}

/// Applies `merge` to `out`, the gathered weight (`dtype`, `shape`), reading the
/// operands from `inputs` (the piece's inputs, as read). With `base`, the weight
/// has not been gathered: it is `base` (same dtype and length as `out`), and `out`
/// is written whole (the gather's copy is saved).
///
/// The plan was checked with [`check`]; a mismatch here is a bug.
pub fn apply(
    merge: &LoraMerge,
    dtype: DType,
    shape: &[u64],
    inputs: &[(DType, &[u8])],
    base: Option<&[u8]>,
    out: &mut [u8],
) {
    let (rows, cols) = matrix(shape);
    // The first update of every row may read the weight straight from `base`;
    // anything else starts from a copy in `out`.
    let mut src = base;
    for u in &merge.updates {
        let direct = matches!(
            u,
            Update::Linear {
                rows: None,
                magnitude: None,
                ..
            } | Update::Embedding {
                magnitude: None,
                ..
            }
        );
        if !direct && let Some(b) = src.take() {
            out.copy_from_slice(b);
        }
        let from = src.take();
        match u {
            Update::Linear {
                a,
                b,
                scale,
                transposed,
                rows: runs,
                magnitude,
                rounding,
            } => {
                let (av, bv) = (operand(a, inputs), operand(b, inputs));
                let r = a.rows as usize;
                let p = if *transposed {
                    // W is [in, out]: row i of Δᵀ is Σ_k A[k, i] · B[:, k].
                    Product {
                        coef: transpose(&av, r, a.cols as usize),
                        basis: transpose(&bv, b.rows as usize, r),
                        r,
                        scale: *scale,
                    }
                } else {
                    Product {
                        coef: bv,
                        basis: av,
                        r,
                        scale: *scale,
                    }
                };
                let map = RowMap::new(runs.as_ref(), rows);
                let how = match rounding {
                    Rounding::Once => Combine::Add,
                    Rounding::EachStep => Combine::AddStepwise,
                    Rounding::DeltaFirst => Combine::AddRounded,
                };
                match magnitude {
                    None => update_rows(dtype, from, out, cols, &p, &map, how),
                    Some(m) if !*transposed => {
                        dora_row_norms(dtype, out, cols, &p, &operand(m, inputs))
                    }
                    Some(m) => dora_column_norms(dtype, out, cols, &p, &operand(m, inputs)),
                }
            }
            Update::Embedding {
                a,
                b,
                scale,
                magnitude,
            } => {
                // W is [vocab, dim]: row v of Δ = (B @ A)ᵀ is Σ_k A[k, v] · B[:, k].
                let r = a.rows as usize;
                let p = Product {
                    coef: transpose(&operand(a, inputs), r, a.cols as usize),
                    basis: transpose(&operand(b, inputs), b.rows as usize, r),
                    r,
                    scale: *scale,
                };
                match magnitude {
                    None => update_rows(
                        dtype,
                        from,
                        out,
                        cols,
                        &p,
                        &RowMap::All,
                        Combine::AddRounded,
                    ),
                    Some(m) => dora_column_norms(dtype, out, cols, &p, &operand(m, inputs)),
                }
            }
            Update::Bias { values, scale } => {
                let v = operand(values, inputs);
                let mut w = vec![0f32; v.len()];
                decode(dtype, out, &mut w);
                for (w, &b) in w.iter_mut().zip(&v) {
                    *w += b * *scale;
                }
                encode(dtype, &w, out);
            }
            Update::Rows { indices, values } => {
                let v = operand(values, inputs);
                let (c, es) = (cols as usize, dtype.size());
                for (n, &i) in indices.iter().enumerate() {
                    let i = i as usize;
                    encode(
                        dtype,
                        &v[n * c..(n + 1) * c],
                        &mut out[i * c * es..(i + 1) * c * es],
                    );
                }
            }
        }
    }
}

/// `W ← rne(W + Δ)` (or with the delta rounded first), rows in parallel blocks,
/// [`ROWS`] product rows at a time.
/// With `src`, the weight is read from `src` (every row is updated).
fn update_rows(
    dtype: DType,
    src: Option<&[u8]>,
    out: &mut [u8],
    cols: u64,
    p: &Product,
    map: &RowMap,
    how: Combine,
) {
    let c = cols as usize;
    let row_bytes = c * dtype.size();
    let per_block = block_rows(cols);
    out.par_chunks_mut(per_block * row_bytes)
        .enumerate()
        .for_each(|(bi, block)| {
            let mut w = vec![0f32; c];
            let mut acc = vec![0f32; ROWS * c];
            let mut coef = Vec::with_capacity(ROWS * p.r);
            let block_src = src.map(|s| &s[bi * per_block * row_bytes..][..block.len()]);
            let mut rows: Vec<(usize, usize, &mut [u8])> = block
                .chunks_exact_mut(row_bytes)
                .enumerate()
                .filter_map(|(ri, row)| map.get(bi * per_block + ri).map(|j| (j, ri, row)))
                .collect();
            for group in rows.chunks_mut(ROWS) {
                let js: Vec<usize> = group.iter().map(|(j, _, _)| *j).collect();
                let acc = &mut acc[..group.len() * c];
                p.rows(&js, &mut coef, acc);
                for ((_, ri, row), d) in group.iter_mut().zip(acc.chunks_exact(c)) {
                    match block_src {
                        Some(s) => decode(dtype, &s[*ri * row_bytes..][..row_bytes], &mut w),
                        None => decode(dtype, row, &mut w),
                    }
                    match how {
                        Combine::Add => {
                            for (w, &d) in w.iter_mut().zip(d) {
                                *w += d * p.scale;
                            }
                        }
                        Combine::AddRounded => {
                            for (w, &d) in w.iter_mut().zip(d) {
                                *w += round_to(dtype, d * p.scale);
                            }
                        }
                        Combine::AddStepwise => {
                            for (w, &d) in w.iter_mut().zip(d) {
                                *w += round_to(dtype, round_to(dtype, d) * p.scale);
                            }
                        }
                    }
                    encode(dtype, &w, row);
                }
            }
        });
}

/// The L2 norm of `v` in f64, rounded to f32 (torch's f32 norm is within an ulp).
fn norm(sumsq: f64) -> f32 {
    sumsq.sqrt() as f32
}

/// DoRA with one norm per row (a linear layer stored `[out, in]`):
/// `W ← rne(m / ‖V‖ · V)`, `V = W + Δ`.
fn dora_row_norms(dtype: DType, out: &mut [u8], cols: u64, p: &Product, m: &[f32]) {
    let c = cols as usize;
    let row_bytes = c * dtype.size();
    let per_block = block_rows(cols);
    out.par_chunks_mut(per_block * row_bytes)
        .enumerate()
        .for_each(|(bi, block)| {
            let mut w = vec![0f32; c];
            let mut acc = vec![0f32; c];
            for (ri, row) in block.chunks_exact_mut(row_bytes).enumerate() {
                let i = bi * per_block + ri;
                decode(dtype, row, &mut w);
                p.row(i, &mut acc);
                let mut sumsq = 0f64;
                for (w, &d) in w.iter_mut().zip(&acc) {
                    *w += d * p.scale;
                    sumsq += f64::from(*w) * f64::from(*w);
                }
                let f = m[i] / norm(sumsq);
                for w in w.iter_mut() {
                    *w *= f;
                }
                encode(dtype, &w, row);
            }
        });
}

/// DoRA with one norm per column (an embedding `[vocab, dim]`, or a transposed
/// linear layer `[in, out]`): a first pass sums the squares of `V = W + Δ` per
/// column, a second recomputes `V` and scales it.
fn dora_column_norms(dtype: DType, out: &mut [u8], cols: u64, p: &Product, m: &[f32]) {
    let c = cols as usize;
    let row_bytes = c * dtype.size();
    let per_block = block_rows(cols);
    let v_row = |row: &[u8], i: usize, w: &mut [f32], acc: &mut [f32]| {
        decode(dtype, row, w);
        p.row(i, acc);
        for (w, &d) in w.iter_mut().zip(acc.iter()) {
            *w += d * p.scale;
        }
    };
    let sums = out
        .par_chunks(per_block * row_bytes)
        .enumerate()
        .map(|(bi, block)| {
            let mut w = vec![0f32; c];
            let mut acc = vec![0f32; c];
            let mut s = vec![0f64; c];
            for (ri, row) in block.chunks_exact(row_bytes).enumerate() {
                v_row(row, bi * per_block + ri, &mut w, &mut acc);
                for (s, &w) in s.iter_mut().zip(&w) {
                    *s += f64::from(w) * f64::from(w);
                }
            }
            s
        })
        .reduce(
            || vec![0f64; c],
            |mut a, b| {
                for (a, b) in a.iter_mut().zip(b) {
                    *a += b;
                }
                a
            },
        );
    let factor: Vec<f32> = m.iter().zip(&sums).map(|(&m, &s)| m / norm(s)).collect();
    out.par_chunks_mut(per_block * row_bytes)
        .enumerate()
        .for_each(|(bi, block)| {
            let mut w = vec![0f32; c];
            let mut acc = vec![0f32; c];
            for (ri, row) in block.chunks_exact_mut(row_bytes).enumerate() {
                v_row(row, bi * per_block + ri, &mut w, &mut acc);
                for (w, &f) in w.iter_mut().zip(&factor) {
                    *w *= f;
                }
                encode(dtype, &w, row);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16(v: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; v.len() * 2];
        encode(DType::BF16, v, &mut out);
        out
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn read_bf16(b: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; b.len() / 2];
        decode(DType::BF16, b, &mut out);
        out
    }

    fn op(input: usize, rows: u64, cols: u64) -> Operand {
        Operand {
            inputs: vec![input],
            rows,
            cols,
            transposed: false,
        }
    }

    /// A deterministic pseudo-random value in about ±1.
    fn val(i: usize, salt: u32) -> f32 {
        let x = (i as u32)
            .wrapping_mul(2_654_435_761)
            .wrapping_add(salt.wrapping_mul(40_503));
        ((x >> 8) as f32 / (1u32 << 24) as f32) * 2.0 - 1.0
    }

    /// The reference, written from the formula with f64 products checked to be
    /// exact in f32 sums: for small integers every operation is exact, so any
    /// summation order or rounding mistake in the kernel's indexing shows.
    #[test]
    fn linear_transposed_and_embedding_updates_index_the_product_as_peft() {
        // W [3, 4] bf16 (small integers), A [2, 4], B [3, 2]: integers, exact.
        let w: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let a: Vec<f32> = (0..8).map(|i| (i % 3) as f32 - 1.0).collect();
        let b: Vec<f32> = (0..6).map(|i| (i % 4) as f32 - 2.0).collect();
        let (wb, ab, bb) = (bf16(&w), f32s(&a), f32s(&b));
        let inputs = [(DType::F32, &ab[..]), (DType::F32, &bb[..])];
        let mut out = wb.clone();
        let m = LoraMerge {
            updates: vec![Update::Linear {
                a: op(0, 2, 4),
                b: op(1, 3, 2),
                scale: 2.0,
                rounding: Rounding::Once,
                transposed: false,
                rows: None,
                magnitude: None,
            }],
        };
        let metas: Vec<InputMeta> = inputs
            .iter()
            .map(|(d, b)| InputMeta {
                dtype: *d,
                numel: (b.len() / d.size()) as u64,
            })
            .collect();
        check(&m, &[3, 4], DType::BF16, &metas).unwrap();
        apply(&m, DType::BF16, &[3, 4], &inputs, None, &mut out);
        let got = read_bf16(&out);
        for o in 0..3 {
            for i in 0..4 {
                let d: f32 = (0..2).map(|k| b[o * 2 + k] * a[k * 4 + i]).sum();
                assert_eq!(got[o * 4 + i], w[o * 4 + i] + 2.0 * d, "W[{o},{i}]");
            }
        }
        // The same weight stored transposed ([4, 3], a Conv1D) gets Δᵀ.
        let wt = transpose(&w, 3, 4);
        let mut out = bf16(&wt);
        let m = LoraMerge {
            updates: vec![Update::Linear {
                a: op(0, 2, 4),
                b: op(1, 3, 2),
                scale: 2.0,
                rounding: Rounding::Once,
                transposed: true,
                rows: None,
                magnitude: None,
            }],
        };
        check(&m, &[4, 3], DType::BF16, &metas).unwrap();
        apply(&m, DType::BF16, &[4, 3], &inputs, None, &mut out);
        let got = read_bf16(&out);
        for o in 0..3 {
            for i in 0..4 {
                let d: f32 = (0..2).map(|k| b[o * 2 + k] * a[k * 4 + i]).sum();
                assert_eq!(got[i * 3 + o], wt[i * 3 + o] + 2.0 * d, "Wt[{i},{o}]");
            }
        }
        // An embedding [vocab 4, dim 3]: A [2, 4] (r, vocab), B [3, 2] (dim, r).
        let mut out = bf16(&wt);
        let m = LoraMerge {
            updates: vec![Update::Embedding {
                a: op(0, 2, 4),
                b: op(1, 3, 2),
                scale: 2.0,
                magnitude: None,
            }],
        };
        check(&m, &[4, 3], DType::BF16, &metas).unwrap();
        apply(&m, DType::BF16, &[4, 3], &inputs, None, &mut out);
        assert_eq!(read_bf16(&out), got);
    }

    #[test]
    fn one_rounding_for_linear_two_for_embedding() {
        // W = 1, Δ = 2^-8 + 2^-17. bf16 near 1 has spacing 2^-7, so 1 + 2^-8 is the
        // halfway point. One rounding: 1 + Δ is just above it and rounds up to
        // 1 + 2^-7. Two roundings: rne(Δ) = 2^-8, then 1 + 2^-8 ties to even, 1.
        let delta = f32::powi(2.0, -8) + f32::powi(2.0, -17);
        let w = bf16(&[1.0]);
        let a = f32s(&[1.0]);
        let b = f32s(&[delta]);
        let inputs = [(DType::F32, &a[..]), (DType::F32, &b[..])];
        let linear = LoraMerge {
            updates: vec![Update::Linear {
                a: op(0, 1, 1),
                b: op(1, 1, 1),
                scale: 1.0,
                rounding: Rounding::Once,
                transposed: false,
                rows: None,
                magnitude: None,
            }],
        };
        let mut out = w.clone();
        apply(&linear, DType::BF16, &[1, 1], &inputs, None, &mut out);
        assert_eq!(read_bf16(&out), vec![1.0 + f32::powi(2.0, -7)]);
        let embedding = LoraMerge {
            updates: vec![Update::Embedding {
                a: op(0, 1, 1),
                b: op(1, 1, 1),
                scale: 1.0,
                magnitude: None,
            }],
        };
        let mut out = w.clone();
        apply(&embedding, DType::BF16, &[1, 1], &inputs, None, &mut out);
        // rne(Δ) = 2^-8 (the 2^-17 is lost), then 1 + 2^-8 ties to even: 1.
        assert_eq!(read_bf16(&out), vec![1.0]);
    }

    #[test]
    fn the_product_is_fused_in_rank_order_from_zero() {
        // acc = fma(b1, a1, fma(b0, a0, 0)): the first product is rounded alone, the
        // second is fused with the sum. Pick values where that differs from both
        // f64 accumulation and unfused f32.
        let (a0, b0) = (1.0 + f32::EPSILON, 1.0 + f32::EPSILON);
        let (a1, b1) = (-1.0f32, 1.0f32);
        let fused = b1.mul_add(a1, (b0 * a0).mul_add(1.0, 0.0));
        let mut acc = [0f32; 1];
        delta_row(&[b0, b1], &[a0, a1], &mut acc);
        assert_eq!(acc[0].to_bits(), fused.to_bits());
        // Every dispatch path and the tiling agree on long rows.
        let r = 16;
        let cols = 333;
        let coef: Vec<f32> = (0..r).map(|i| val(i, 1)).collect();
        let basis: Vec<f32> = (0..r * cols).map(|i| val(i, 2)).collect();
        let mut fast = vec![0f32; cols];
        let mut portable = vec![0f32; cols];
        delta_row(&coef, &basis, &mut fast);
        delta_rows_portable::<1>(&coef, &basis, &mut portable);
        // Four rows at once (the shared-tile kernel) give each row's bits.
        let coef4: Vec<f32> = (0..4 * r).map(|i| val(i, 3)).collect();
        let mut four = vec![0f32; 4 * cols];
        delta_rows(&coef4, &basis, &mut four, 4);
        for i in 0..4 {
            let mut one = vec![0f32; cols];
            delta_row(&coef4[i * r..(i + 1) * r], &basis, &mut one);
            assert_eq!(&four[i * cols..(i + 1) * cols], &one[..], "row {i}");
        }
        for j in 0..cols {
            let mut s = 0f32;
            for k in 0..r {
                s = coef[k].mul_add(basis[k * cols + j], s);
            }
            assert_eq!(fast[j].to_bits(), s.to_bits(), "column {j}");
            assert_eq!(portable[j].to_bits(), s.to_bits(), "column {j}");
        }
    }

    #[test]
    fn row_runs_touch_only_their_rows() {
        // W [4, 2] = 0; B rows go to W rows 1 and 3.
        let w = bf16(&[0.0; 8]);
        let a = f32s(&[1.0, 2.0]);
        let b = f32s(&[3.0, 5.0]);
        let inputs = [(DType::F32, &a[..]), (DType::F32, &b[..])];
        let m = LoraMerge {
            updates: vec![Update::Linear {
                a: op(0, 1, 2),
                b: op(1, 2, 1),
                scale: 1.0,
                rounding: Rounding::Once,
                transposed: false,
                rows: Some(vec![(1, 1), (3, 1)]),
                magnitude: None,
            }],
        };
        let metas = [
            InputMeta {
                dtype: DType::F32,
                numel: 2,
            },
            InputMeta {
                dtype: DType::F32,
                numel: 2,
            },
        ];
        check(&m, &[4, 2], DType::BF16, &metas).unwrap();
        let mut out = w.clone();
        apply(&m, DType::BF16, &[4, 2], &inputs, None, &mut out);
        assert_eq!(
            read_bf16(&out),
            vec![0.0, 0.0, 3.0, 6.0, 0.0, 0.0, 5.0, 10.0]
        );
    }

    #[test]
    fn dora_scales_rows_or_columns_by_magnitude_over_norm() {
        // W = [[-1, 2], [3, -1]], Δ = B·A = [[1, 1], [1, 1]]: V = W + Δ = [[0, 3], [4, 0]],
        // whose row norms (3, 4) and column norms (4, 3) differ, so a mix-up of the two, or a
        // norm taken of W instead of V, gives other numbers.
        let w = bf16(&[-1.0, 2.0, 3.0, -1.0]);
        let a = f32s(&[1.0, 1.0]);
        let b = f32s(&[1.0, 1.0]);
        let m = f32s(&[6.0, 2.0]);
        let inputs = [
            (DType::F32, &a[..]),
            (DType::F32, &b[..]),
            (DType::F32, &m[..]),
        ];
        // Rows: row 0 by 6/3, row 1 by 2/4. Columns: column 0 by 6/4, column 1 by 2/3.
        for (transposed, want) in [(false, [0.0, 6.0, 2.0, 0.0]), (true, [0.0, 2.0, 6.0, 0.0])] {
            let merge = LoraMerge {
                updates: vec![Update::Linear {
                    a: op(0, 1, 2),
                    b: op(1, 2, 1),
                    scale: 1.0,
                    rounding: Rounding::Once,
                    transposed,
                    rows: None,
                    magnitude: Some(op(2, 1, 2)),
                }],
            };
            let mut out = w.clone();
            apply(&merge, DType::BF16, &[2, 2], &inputs, None, &mut out);
            assert_eq!(read_bf16(&out), want.to_vec(), "transposed: {transposed}");
        }
    }

    #[test]
    fn bias_and_rows_updates() {
        let w = bf16(&[1.0, 2.0, 3.0, 4.0]);
        let v = f32s(&[0.5, 0.25, 1.0, 2.0]);
        let inputs = [(DType::F32, &v[..])];
        let bias = LoraMerge {
            updates: vec![Update::Bias {
                values: op(0, 4, 1),
                scale: 2.0,
            }],
        };
        let mut out = w.clone();
        apply(&bias, DType::BF16, &[4], &inputs, None, &mut out);
        assert_eq!(read_bf16(&out), vec![2.0, 2.5, 5.0, 8.0]);
        let rows = LoraMerge {
            updates: vec![Update::Rows {
                indices: vec![1],
                values: op(0, 1, 4),
            }],
        };
        let mut out = bf16(&[0.0; 8]);
        apply(&rows, DType::BF16, &[2, 4], &inputs, None, &mut out);
        assert_eq!(
            read_bf16(&out),
            vec![0.0, 0.0, 0.0, 0.0, 0.5, 0.25, 1.0, 2.0]
        );
    }

    #[test]
    fn reading_the_weight_in_place_gives_the_same_bits() {
        // Every kind of update, and two in a row: with `base` (no gathered copy)
        // the output equals the one from a gathered copy, bit for bit.
        let (rows, cols, r) = (6usize, 40usize, 3usize);
        let w: Vec<f32> = (0..rows * cols).map(|i| val(i, 9) * 0.1).collect();
        let a = f32s(&(0..r * cols).map(|i| val(i, 4)).collect::<Vec<_>>());
        let b = f32s(&(0..rows * r).map(|i| val(i, 5)).collect::<Vec<_>>());
        let ae = f32s(&(0..r * rows).map(|i| val(i, 6)).collect::<Vec<_>>());
        let be = f32s(&(0..cols * r).map(|i| val(i, 7)).collect::<Vec<_>>());
        let m = f32s(&(0..rows).map(|i| 1.0 + val(i, 8).abs()).collect::<Vec<_>>());
        let v = f32s(&(0..cols).map(|i| val(i, 10)).collect::<Vec<_>>());
        let inputs = [
            (DType::F32, &a[..]),
            (DType::F32, &b[..]),
            (DType::F32, &ae[..]),
            (DType::F32, &be[..]),
            (DType::F32, &m[..]),
            (DType::F32, &v[..]),
        ];
        let linear = |runs: Option<Vec<(u64, u64)>>, magnitude: Option<Operand>| Update::Linear {
            a: op(0, r as u64, cols as u64),
            b: Operand {
                inputs: vec![1],
                rows: runs
                    .as_ref()
                    .map_or(rows as u64, |v| v.iter().map(|x| x.1).sum()),
                cols: r as u64,
                transposed: false,
            },
            scale: 0.75,
            rounding: Rounding::Once,
            transposed: false,
            rows: runs,
            magnitude,
        };
        let embedding = Update::Embedding {
            a: op(2, r as u64, rows as u64),
            b: op(3, cols as u64, r as u64),
            scale: 1.25,
            magnitude: None,
        };
        let cases = vec![
            vec![linear(None, None)],
            vec![embedding.clone()],
            vec![linear(None, Some(op(4, 1, rows as u64)))],
            vec![Update::Rows {
                indices: vec![2],
                values: op(5, 1, cols as u64),
            }],
            vec![embedding, linear(None, None)],
        ];
        for updates in cases {
            let merge = LoraMerge { updates };
            let base = bf16(&w);
            let mut gathered = base.clone();
            apply(
                &merge,
                DType::BF16,
                &[rows as u64, cols as u64],
                &inputs,
                None,
                &mut gathered,
            );
            let mut direct = vec![0u8; base.len()];
            apply(
                &merge,
                DType::BF16,
                &[rows as u64, cols as u64],
                &inputs,
                Some(&base),
                &mut direct,
            );
            assert_eq!(direct, gathered, "{merge:?}");
        }
    }

    #[test]
    fn checks_name_the_operand_that_does_not_fit() {
        let m = LoraMerge {
            updates: vec![Update::Linear {
                a: op(0, 2, 4),
                b: op(1, 3, 2),
                scale: 1.0,
                rounding: Rounding::Once,
                transposed: false,
                rows: None,
                magnitude: None,
            }],
        };
        let metas = [
            InputMeta {
                dtype: DType::F32,
                numel: 8,
            },
            InputMeta {
                dtype: DType::F32,
                numel: 6,
            },
        ];
        assert!(check(&m, &[3, 4], DType::BF16, &metas).is_ok());
        let e = check(&m, &[3, 5], DType::BF16, &metas).unwrap_err();
        assert!(e.contains("update 0: A"), "{e}");
        let e = check(&m, &[3, 4], DType::I64, &metas).unwrap_err();
        assert!(e.contains("int64"), "{e}");
        let short = [
            metas[0],
            InputMeta {
                numel: 5,
                ..metas[1]
            },
        ];
        let e = check(&m, &[3, 4], DType::BF16, &short).unwrap_err();
        assert!(e.contains("update 0: B"), "{e}");
    }
}
