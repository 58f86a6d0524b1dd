//! The merge probe's pass over one row (see [`super::probe`]): for a merged row
//! `W'` and its base `W`, the products `Σⱼ (W'ⱼ − Wⱼ) vⱼ` with both probe vectors
//! and the rounding spread `Σⱼ (½ ulp(W'ⱼ))²`, at the speed the rows can be read.
//!
//! # Precision
//! `W'ⱼ − Wⱼ` is exact in f32 for two values of one 8- or 11-bit-mantissa dtype
//! (bf16, f16) and its product with ±1 is exact, so for those dtypes the products
//! are summed in f32 lanes over 256 elements and the lane sums carried in f64: the
//! error is below `2⁻²⁰ Σⱼ |W'ⱼ − Wⱼ|`, under a percent of the tolerance
//! (`sqrt(n) · 2⁻⁹ |W|` per row for bf16) even where the update is as large as the
//! weight. For f32 weights, whose ulps are 2¹⁶ times finer, everything is summed
//! in f64. The spread is the sum of `(2^e)²` over the binary exponents `e` of the
//! elements (at least the dtype's smallest normal exponent), scaled once per row;
//! it is a tolerance, where a relative error of `n · 2⁻²⁴` is of no account.

/// Probe vectors per tensor.
pub const VECTORS: usize = 2;

/// Lanes of the narrow kernel.
const LANES: usize = 16;

/// Elements per f32 partial sum of the products.
const SPAN: usize = 256;

/// Elements of a row.
pub trait Elements: Copy {
    /// How many.
    fn count(self) -> usize;
    /// Elements `o..o + 16`, widened.
    fn lanes(self, o: usize) -> [f32; LANES];
    /// Element `j`, widened.
    fn at(self, j: usize) -> f32;
}

impl Elements for &[f32] {
    #[inline(always)]
    fn count(self) -> usize {
        self.len()
    }
    #[inline(always)]
    fn lanes(self, o: usize) -> [f32; LANES] {
        self[o..o + LANES].try_into().expect("16 elements")
    }
    #[inline(always)]
    fn at(self, j: usize) -> f32 {
        self[j]
    }
}

/// A row of bfloat16 values as their bits.
#[derive(Debug, Clone, Copy)]
pub struct Bf16<'a>(pub &'a [u16]);

impl Elements for Bf16<'_> {
    #[inline(always)]
    fn count(self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn lanes(self, o: usize) -> [f32; LANES] {
        let w: &[u16; LANES] = self.0[o..o + LANES].try_into().expect("16 elements");
        w.map(|b| f32::from_bits(u32::from(b) << 16))
    }
    #[inline(always)]
    fn at(self, j: usize) -> f32 {
        f32::from_bits(u32::from(self.0[j]) << 16)
    }
}

/// The largest power of two not above `|x|`, at least `min_normal`.
#[inline(always)]
fn floor_pow2(x: f32, min_normal: f32) -> f32 {
    f32::from_bits(x.to_bits() & 0x7f80_0000).max(min_normal)
}

/// The plain f64 sums over elements `from..` (a kernel's remainder).
#[inline(always)]
fn tail<M: Elements, B: Elements>(
    m: M,
    b: B,
    v: [&[f32]; VECTORS],
    from: usize,
    min_normal: f32,
) -> ([f64; VECTORS], f64) {
    let mut out = ([0f64; VECTORS], 0f64);
    for (j, (x, y)) in v[0].iter().zip(v[1]).enumerate().take(m.count()).skip(from) {
        let mj = m.at(j);
        let d = f64::from(mj) - f64::from(b.at(j));
        out.0[0] += d * f64::from(*x);
        out.0[1] += d * f64::from(*y);
        let p = f64::from(floor_pow2(mj, min_normal));
        out.1 += p * p;
    }
    out
}

/// The narrow kernel (bf16, f16): `None` when the spread overflows f32 (weights
/// of 2²⁴ or more), for [`wide`] to redo.
#[inline(always)]
fn narrow<M: Elements, B: Elements>(
    m: M,
    b: B,
    v: [&[f32]; VECTORS],
    min_normal: f32,
) -> Option<([f64; VECTORS], f64)> {
    // The squares of powers of two from 2⁻¹²⁶ up stay normal in f32 once scaled.
    const SCALE: f32 = (1u64 << 40) as f32;
    let n = m.count();
    let (mut t0, mut t1) = (0f64, 0f64);
    let mut q2 = [0f32; LANES];
    let whole = n / LANES * LANES;
    let mut o = 0;
    while o < whole {
        let end = (o + SPAN).min(whole);
        let (mut a0, mut a1) = ([0f32; LANES], [0f32; LANES]);
        while o < end {
            let (mm, bb) = (m.lanes(o), b.lanes(o));
            let x: &[f32; LANES] = v[0][o..o + LANES].try_into().expect("16 elements");
            let y: &[f32; LANES] = v[1][o..o + LANES].try_into().expect("16 elements");
            for l in 0..LANES {
                let d = mm[l] - bb[l];
                a0[l] += d * x[l];
                a1[l] += d * y[l];
                let p = floor_pow2(mm[l], min_normal) * SCALE;
                q2[l] += p * p;
            }
            o += LANES;
        }
        t0 += a0.iter().map(|&x| f64::from(x)).sum::<f64>();
        t1 += a1.iter().map(|&x| f64::from(x)).sum::<f64>();
    }
    let s2 = q2.iter().map(|&x| f64::from(x)).sum::<f64>() / f64::from(SCALE) / f64::from(SCALE);
    let (rest, rest_s2) = tail(m, b, v, whole, min_normal);
    let s2 = s2 + rest_s2;
    s2.is_finite().then_some(([t0 + rest[0], t1 + rest[1]], s2))
}

/// The wide kernel (f32 weights, and the narrow one's overflow): f64 lanes.
#[inline(always)]
fn wide<M: Elements, B: Elements>(
    m: M,
    b: B,
    v: [&[f32]; VECTORS],
    min_normal: f32,
) -> ([f64; VECTORS], f64) {
    const W: usize = 8;
    let n = m.count();
    let (mut a0, mut a1, mut s2) = ([0f64; W], [0f64; W], [0f64; W]);
    for j0 in (0..n / W * W).step_by(W) {
        for l in 0..W {
            let (mj, bj) = (m.at(j0 + l), b.at(j0 + l));
            let d = f64::from(mj) - f64::from(bj);
            a0[l] += d * f64::from(v[0][j0 + l]);
            a1[l] += d * f64::from(v[1][j0 + l]);
            let p = f64::from(floor_pow2(mj, min_normal));
            s2[l] += p * p;
        }
    }
    let (rest, rest_s2) = tail(m, b, v, n / W * W, min_normal);
    (
        [
            a0.iter().sum::<f64>() + rest[0],
            a1.iter().sum::<f64>() + rest[1],
        ],
        s2.iter().sum::<f64>() + rest_s2,
    )
}

/// A row's operands.
#[derive(Clone, Copy)]
struct Operands<'a, M, B> {
    m: M,
    b: B,
    v: [&'a [f32]; VECTORS],
    min_normal: f32,
    narrow: bool,
}

#[inline(always)]
fn both<M: Elements, B: Elements>(o: Operands<'_, M, B>) -> ([f64; VECTORS], f64) {
    let narrowed = o
        .narrow
        .then(|| narrow(o.m, o.b, o.v, o.min_normal))
        .flatten();
    narrowed.unwrap_or_else(|| wide(o.m, o.b, o.v, o.min_normal))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn both_avx2<M: Elements, B: Elements>(o: Operands<'_, M, B>) -> ([f64; VECTORS], f64) {
    both(o)
}

/// The row's `([Σ (W' − W) v₁, Σ (W' − W) v₂], Σ (½ ulp(W'))²)` for weights of
/// `mantissa` bits and smallest normal exponent `min_exp`; with AVX2 where the
/// CPU has it (no fused multiply-adds, so the bits never depend on the path).
pub fn row<M: Elements, B: Elements>(
    m: M,
    b: B,
    v: [&[f32]; VECTORS],
    mantissa: i32,
    min_exp: i32,
) -> ([f64; VECTORS], f64) {
    let o = Operands {
        m,
        b,
        v,
        min_normal: 2f32.powi(min_exp),
        narrow: mantissa <= 10,
    };
    #[cfg(target_arch = "x86_64")]
    let (dv, s) = if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        unsafe { both_avx2(o) }
    } else {
        both(o)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (dv, s) = both(o);
    // (½ ulp)² = (2^e)² · 2^(−2 (mantissa + 1)).
    (dv, s * 2f64.powi(-2 * (mantissa + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both kernels against a plain f64 evaluation, on values spanning many
    /// binades, zeros and a remainder shorter than a lane.
    #[test]
    fn kernels_agree_with_the_definition() {
        let n = 1000;
        let mut x = 0x9E37_79B9u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let bf = |f: f32| half::bf16::from_f32(f);
        let base: Vec<f32> = (0..n)
            .map(|j| {
                let e = (next() % 40) as i32 - 30;
                let f = if j % 97 == 0 {
                    0.0
                } else {
                    2f32.powi(e) * (1.0 + (next() % 1000) as f32 / 1000.0)
                };
                bf(f).to_f32()
            })
            .collect();
        let merged: Vec<f32> = base
            .iter()
            .map(|&w| bf(w + w * 0.01 * ((next() % 7) as f32 - 3.0)).to_f32())
            .collect();
        let v: Vec<Vec<f32>> = (0..2)
            .map(|_| {
                (0..n)
                    .map(|_| if next() & 1 == 0 { 1.0 } else { -1.0 })
                    .collect()
            })
            .collect();
        // ½ ulp as the definition reads, for 7 and 23 mantissa bits.
        let half_ulp = |x: f32, mantissa: i32| {
            let e = if x == 0.0 {
                -126
            } else {
                (x.abs().log2().floor() as i32).max(-126)
            };
            2f64.powi(e - mantissa - 1)
        };
        let want_dv: Vec<f64> = (0..2)
            .map(|k| {
                (0..n)
                    .map(|j| (f64::from(merged[j]) - f64::from(base[j])) * f64::from(v[k][j]))
                    .sum()
            })
            .collect();
        let want_s2 =
            |mantissa| -> f64 { merged.iter().map(|&m| half_ulp(m, mantissa).powi(2)).sum() };
        let bits = |v: &[f32]| -> Vec<u16> { v.iter().map(|&f| bf(f).to_bits()).collect() };
        let (mb, bb) = (bits(&merged), bits(&base));
        let scale: f64 = (0..n)
            .map(|j| (f64::from(merged[j]) - f64::from(base[j])).abs())
            .sum();
        // Narrow from f32 and from bf16 bits, and wide (as for f32 weights).
        for (mantissa, (dv, s2)) in [
            (7, row(&merged[..], &base[..], [&v[0], &v[1]], 7, -126)),
            (7, row(Bf16(&mb), Bf16(&bb), [&v[0], &v[1]], 7, -126)),
            (23, row(&merged[..], &base[..], [&v[0], &v[1]], 23, -126)),
        ] {
            for k in 0..2 {
                assert!((dv[k] - want_dv[k]).abs() <= scale * 2f64.powi(-20));
            }
            let want = want_s2(mantissa);
            assert!((s2 - want).abs() <= want * 1e-4, "{s2} {want}");
        }
    }
}
