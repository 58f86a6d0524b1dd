//! Products of f32 activations with weight rows stored as bf16, read straight
//! from the mapped bytes: each weight is widened in registers and used for
//! every token at once, so a forward pass streams its weights once and writes
//! no f32 copy of them (widening into a scratch block and packing it for a
//! general GEMM cost more than the few-token product itself).
//!
//! The arithmetic order is fixed by this code, not by the instruction set: each
//! token accumulates in [`LANES`] f32 lanes (element `k` of a row goes to lane
//! `k mod LANES`, as a fused multiply-add, in order of `k`), and the lanes are
//! summed in order at the end. The AVX2 build of the loop (chosen at run time)
//! and the portable one therefore give the same bits, and so do the source's and
//! the output's forward passes of a conversion that kept the weights exactly.

/// Accumulator lanes of a dot product (one AVX2 register).
pub const LANES: usize = 8;

/// Whether this CPU multiplies by [`rows_times`] at speed: with AVX2 and FMA on
/// x86-64 (without FMA, the portable loop's `mul_add` is a library call per
/// element), natively on AArch64. Elsewhere weights take the f32 path.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    return cfg!(target_arch = "aarch64");
}

/// `y[i·n + r] = Σ_k x[i·cols + k] · w[r][k]` for the `n` rows of `w` (`n × cols`
/// little-endian bf16 values) and the `t` rows of `x` (`t × cols`); `y` has a row
/// stride of `n`. Each weight is read from memory once and used for every token.
///
/// # Panics
/// When the lengths disagree (a caller's bug).
pub fn rows_times(x: &[f32], t: usize, cols: usize, w: &[u8], y: &mut [f32]) {
    assert_eq!(x.len(), t * cols, "x is t × cols");
    assert_eq!(w.len() % (2 * cols.max(1)), 0, "w is whole rows");
    let n = if cols == 0 { 0 } else { w.len() / (2 * cols) };
    assert_eq!(y.len(), t * n, "y is t × n");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX2 and FMA (`available` checked).
        unsafe { rows_times_avx2(x, t, cols, w, y, n) };
        return;
    }
    rows_times_portable(x, t, cols, w, y, n);
}

/// Rows of `w` taken together, sharing each load of the activations.
#[cfg(target_arch = "x86_64")]
const ROWS: usize = 2;
/// Tokens taken together: `ROWS × TOKENS` accumulators, a weight register per
/// row and an activation register fit the sixteen AVX2 registers.
#[cfg(target_arch = "x86_64")]
const TOKENS: usize = 4;

/// [`rows_times_portable`]'s arithmetic with AVX2 instructions, in blocks of up
/// to [`ROWS`] rows and [`TOKENS`] tokens: each block's weights are widened once
/// per eight elements and each activation load serves every row of the block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_times_avx2(x: &[f32], t: usize, cols: usize, w: &[u8], y: &mut [f32], n: usize) {
    let mut r = 0;
    while r < n {
        let rows = ROWS.min(n - r);
        let mut t0 = 0;
        while t0 < t {
            let g = TOKENS.min(t - t0);
            // SAFETY: the caller checked AVX2 and FMA; the block lies inside `w`
            // (rows r..r + rows ≤ n) and `x` (tokens t0..t0 + g ≤ t).
            unsafe {
                match (rows, g) {
                    (2, 4) => block::<2, 4>(x, t0, cols, w, r, y, n),
                    (2, 3) => block::<2, 3>(x, t0, cols, w, r, y, n),
                    (2, 2) => block::<2, 2>(x, t0, cols, w, r, y, n),
                    (2, _) => block::<2, 1>(x, t0, cols, w, r, y, n),
                    (_, 4) => block::<1, 4>(x, t0, cols, w, r, y, n),
                    (_, 3) => block::<1, 3>(x, t0, cols, w, r, y, n),
                    (_, 2) => block::<1, 2>(x, t0, cols, w, r, y, n),
                    (_, _) => block::<1, 1>(x, t0, cols, w, r, y, n),
                }
            }
            t0 += g;
        }
        r += rows;
    }
}

/// Rows `r..r + R` of `w` times tokens `t0..t0 + G` of `x`, into `y`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block<const R: usize, const G: usize>(
    x: &[f32],
    t0: usize,
    cols: usize,
    w: &[u8],
    r: usize,
    y: &mut [f32],
    n: usize,
) {
    use std::arch::x86_64::{
        __m256, _mm_loadu_si128, _mm256_castsi256_ps, _mm256_cvtepu16_epi32, _mm256_fmadd_ps,
        _mm256_loadu_ps, _mm256_setzero_ps, _mm256_slli_epi32, _mm256_storeu_ps,
    };
    let whole = cols / LANES * LANES;
    // By token, then by row.
    let mut acc: [[__m256; R]; G] = [[_mm256_setzero_ps(); R]; G];
    let row_at = |j: usize| (r + j) * 2 * cols;
    for k in (0..whole).step_by(LANES) {
        // SAFETY: k + LANES ≤ whole ≤ cols: 16 bytes of each row and 8 floats of
        // each token's activations are in bounds (the caller's block lies inside
        // `w` and `x`); loads are unaligned.
        unsafe {
            let mut wv = [_mm256_setzero_ps(); R];
            for (j, v) in wv.iter_mut().enumerate() {
                let bits = _mm_loadu_si128(w.as_ptr().add(row_at(j) + 2 * k).cast());
                *v = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)));
            }
            for (i, by_row) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.as_ptr().add((t0 + i) * cols + k));
                for (a, wj) in by_row.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(*wj, xv, *a);
                }
            }
        }
    }
    for (i, by_row) in acc.iter().enumerate() {
        let xi = &x[(t0 + i) * cols..(t0 + i + 1) * cols];
        for (j, a) in by_row.iter().enumerate() {
            let row = &w[row_at(j)..row_at(j) + 2 * cols];
            let mut lanes = [0f32; LANES];
            // SAFETY: `lanes` holds eight floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *a) };
            y[(t0 + i) * n + r + j] = finish(lanes, &row[2 * whole..], &xi[whole..]);
        }
    }
}

#[inline(always)]
fn rows_times_portable(x: &[f32], t: usize, cols: usize, w: &[u8], y: &mut [f32], n: usize) {
    for r in 0..n {
        let row = &w[r * 2 * cols..(r + 1) * 2 * cols];
        for i in 0..t {
            y[i * n + r] = dot(row, &x[i * cols..(i + 1) * cols]);
        }
    }
}

fn widen(lo: u8, hi: u8) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes([lo, hi])) << 16)
}

/// `Σ_k bf16(row[k]) · x[k]`, element `k` accumulated in lane `k mod LANES` by a
/// fused multiply-add, the lanes summed in order.
#[inline(always)]
fn dot(row: &[u8], x: &[f32]) -> f32 {
    let whole = x.len() / LANES * LANES;
    let mut acc = [0f32; LANES];
    for (wc, xc) in row[..2 * whole]
        .chunks_exact(2 * LANES)
        .zip(x[..whole].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] = widen(wc[2 * l], wc[2 * l + 1]).mul_add(xc[l], acc[l]);
        }
    }
    finish(acc, &row[2 * whole..], &x[whole..])
}

/// The lanes of a dot product with its last `x.len() < LANES` elements (`row`'s
/// bytes) added, then summed in order.
#[inline(always)]
fn finish(mut lanes: [f32; LANES], row: &[u8], x: &[f32]) -> f32 {
    for (l, (wc, xv)) in lanes.iter_mut().zip(row.chunks_exact(2).zip(x)) {
        *l = widen(wc[0], wc[1]).mul_add(*xv, *l);
    }
    lanes.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|f| ((f.to_bits() >> 16) as u16).to_le_bytes())
            .collect()
    }

    fn values(n: usize, salt: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ salt).wrapping_mul(0x9E37_79B9).rotate_left(13);
                // Exactly representable in bf16, so the reference sees the same weights.
                f32::from_bits(((h % 2001) as f32 / 1000.0 - 1.0).to_bits() & 0xFFFF_0000)
            })
            .collect()
    }

    #[test]
    fn products_equal_a_float64_reference_for_every_shape_of_tail() {
        for (t, cols, n) in [(1, 1, 1), (3, 15, 2), (8, 16, 3), (9, 37, 5), (13, 64, 4)] {
            let x = values(t * cols, 7);
            let wf = values(n * cols, 11);
            let mut y = vec![0f32; t * n];
            rows_times(&x, t, cols, &bf16_bytes(&wf), &mut y);
            for i in 0..t {
                for r in 0..n {
                    let want: f64 = (0..cols)
                        .map(|k| f64::from(x[i * cols + k]) * f64::from(wf[r * cols + k]))
                        .sum();
                    let got = f64::from(y[i * n + r]);
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "t {t} cols {cols} n {n}: y[{i}][{r}] = {got}, expected {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_loop_chosen_at_run_time_gives_the_portable_loops_bits() {
        for (t, cols, n) in [(8, 2048 + 7, 6), (7, 64, 5), (1, 9, 1), (3, 8, 2)] {
            let x = values(t * cols, 3);
            let w = bf16_bytes(&values(n * cols, 5));
            let (mut a, mut b) = (vec![0f32; t * n], vec![0f32; t * n]);
            rows_times(&x, t, cols, &w, &mut a);
            rows_times_portable(&x, t, cols, &w, &mut b, n);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "t {t} cols {cols} n {n}");
        }
    }
}
