//! Products of f32 activations with weight rows stored as bf16, read straight
//! from the mapped bytes: each weight is widened in registers and used for
//! every token at once, so a forward pass streams its weights once and writes
//! no f32 copy of them (widening into a scratch block and packing it for a
//! general GEMM cost more than the few-token product itself).
//!
//! The arithmetic order is fixed by this code, not by the instruction set: each
//! token accumulates in [`LANES`] f32 lanes (element `k` of a row goes to lane
//! `k mod LANES`), the lanes are summed in order at the end, and Rust never
//! fuses a multiply and an add. The AVX2 build of the loop (chosen at run time)
//! and the portable one therefore give the same bits, and so do the source's and
//! the output's forward passes of a conversion that kept the weights exactly.

/// Accumulator lanes of a dot product (one AVX2 register).
pub const LANES: usize = 8;

/// `y[i·n + r] = Σ_k x[i·cols + k] · w[r][k]` for the `n` rows of `w` (`n × cols`
/// little-endian bf16 values) and the `t` rows of `x` (`t × cols`); `y` has a row
/// stride of `n`. A row (a few KiB) is read from memory once and from L1 for
/// every further token.
///
/// # Panics
/// When the lengths disagree (a caller's bug).
pub fn rows_times(x: &[f32], t: usize, cols: usize, w: &[u8], y: &mut [f32]) {
    assert_eq!(x.len(), t * cols, "x is t × cols");
    assert_eq!(w.len() % (2 * cols.max(1)), 0, "w is whole rows");
    let n = if cols == 0 { 0 } else { w.len() / (2 * cols) };
    assert_eq!(y.len(), t * n, "y is t × n");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { rows_times_avx2(x, t, cols, w, y, n) };
        return;
    }
    rows_times_portable(x, t, cols, w, y, n);
}

/// [`rows_times_portable`]'s arithmetic with AVX2 instructions: a row's eight
/// elements are widened once and multiplied with up to eight tokens at once
/// (one accumulator register each); multiply, then add, as the portable loop does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rows_times_avx2(x: &[f32], t: usize, cols: usize, w: &[u8], y: &mut [f32], n: usize) {
    use std::arch::x86_64::{
        __m256, _mm_loadu_si128, _mm256_add_ps, _mm256_castsi256_ps, _mm256_cvtepu16_epi32,
        _mm256_loadu_ps, _mm256_mul_ps, _mm256_setzero_ps, _mm256_slli_epi32, _mm256_storeu_ps,
    };
    const GROUP: usize = 8;
    let whole = cols / LANES * LANES;
    for r in 0..n {
        let row = &w[r * 2 * cols..(r + 1) * 2 * cols];
        for t0 in (0..t).step_by(GROUP) {
            let g = GROUP.min(t - t0);
            let mut acc: [__m256; GROUP] = [_mm256_setzero_ps(); GROUP];
            for k in (0..whole).step_by(LANES) {
                // SAFETY: k + LANES ≤ whole ≤ cols: 16 bytes of the row and 8 floats
                // of each token's activations are in bounds; loads are unaligned.
                unsafe {
                    let bits = _mm_loadu_si128(row.as_ptr().add(2 * k).cast());
                    let wv =
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)));
                    for (i, a) in acc.iter_mut().enumerate().take(g) {
                        let xv = _mm256_loadu_ps(x.as_ptr().add((t0 + i) * cols + k));
                        *a = _mm256_add_ps(*a, _mm256_mul_ps(wv, xv));
                    }
                }
            }
            for (i, a) in acc.iter().enumerate().take(g) {
                let mut lanes = [0f32; LANES];
                // SAFETY: `lanes` holds eight floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *a) };
                let xi = &x[(t0 + i) * cols..(t0 + i + 1) * cols];
                for k in whole..cols {
                    let bits = u16::from_le_bytes([row[2 * k], row[2 * k + 1]]);
                    lanes[k - whole] += f32::from_bits(u32::from(bits) << 16) * xi[k];
                }
                y[(t0 + i) * n + r] = lanes.iter().sum();
            }
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

/// `Σ_k bf16(row[k]) · x[k]`, element `k` accumulated in lane `k mod LANES`, the
/// lanes summed in order.
#[inline(always)]
fn dot(row: &[u8], x: &[f32]) -> f32 {
    let whole = x.len() / LANES * LANES;
    let mut acc = [0f32; LANES];
    for (wc, xc) in row[..2 * whole]
        .chunks_exact(2 * LANES)
        .zip(x[..whole].chunks_exact(LANES))
    {
        for l in 0..LANES {
            let bits = u16::from_le_bytes([wc[2 * l], wc[2 * l + 1]]);
            acc[l] += f32::from_bits(u32::from(bits) << 16) * xc[l];
        }
    }
    for k in whole..x.len() {
        let bits = u16::from_le_bytes([row[2 * k], row[2 * k + 1]]);
        acc[k - whole] += f32::from_bits(u32::from(bits) << 16) * x[k];
    }
    acc.iter().sum()
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
        let (t, cols, n) = (8, 2048 + 7, 6);
        let x = values(t * cols, 3);
        let w = bf16_bytes(&values(n * cols, 5));
        let (mut a, mut b) = (vec![0f32; t * n], vec![0f32; t * n]);
        rows_times(&x, t, cols, &w, &mut a);
        rows_times_portable(&x, t, cols, &w, &mut b, n);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
    }
}
