//! Element types shared by every format, and the casts between them.
//!
//! One enum names a dtype the way each format spells it (safetensors `BF16`, torch
//! `bfloat16`, torch storage class `BFloat16Storage`), so readers and writers never
//! carry their own tables. Casts round to nearest even, as `torch.Tensor.to` does.

use std::fmt;

use half::{bf16, f16};

/// An element type that a checkpoint can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DType {
    /// `torch.bool`, one byte per element.
    Bool,
    /// `torch.uint8`.
    U8,
    /// `torch.int8`.
    I8,
    /// `torch.float8_e5m2`.
    F8E5M2,
    /// `torch.float8_e4m3fn`.
    F8E4M3,
    /// `torch.int16`.
    I16,
    /// `torch.uint16`.
    U16,
    /// `torch.float16`.
    F16,
    /// `torch.bfloat16`.
    BF16,
    /// `torch.int32`.
    I32,
    /// `torch.uint32`.
    U32,
    /// `torch.float32`.
    F32,
    /// `torch.float64`.
    F64,
    /// `torch.int64`.
    I64,
    /// `torch.uint64`.
    U64,
}

impl DType {
    /// Every dtype, in the safetensors alignment order (narrowest first).
    pub const ALL: [DType; 15] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::F8E5M2,
        DType::F8E4M3,
        DType::I16,
        DType::U16,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U32,
        DType::F32,
        DType::F64,
        DType::I64,
        DType::U64,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E5M2 | DType::F8E4M3 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// True for floating-point types (the ones a `dtype=` cast applies to).
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F8E5M2 | DType::F8E4M3 | DType::F16 | DType::BF16 | DType::F32 | DType::F64
        )
    }

    /// The safetensors header spelling.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E4M3 => "F8_E4M3",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::U64 => "U64",
        }
    }

    /// The attribute name on the `torch` module (`torch.bfloat16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::F8E5M2 => "float8_e5m2",
            DType::F8E4M3 => "float8_e4m3fn",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::I64 => "int64",
            DType::U64 => "uint64",
        }
    }

    /// The legacy typed storage class `torch.save` names for this dtype, if it has one.
    /// Dtypes without one are saved through `UntypedStorage` and `_rebuild_tensor_v3`.
    pub fn torch_storage_class(self) -> Option<&'static str> {
        Some(match self {
            DType::Bool => "BoolStorage",
            DType::U8 => "ByteStorage",
            DType::I8 => "CharStorage",
            DType::I16 => "ShortStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            DType::I32 => "IntStorage",
            DType::F32 => "FloatStorage",
            DType::F64 => "DoubleStorage",
            DType::I64 => "LongStorage",
            _ => return None,
        })
    }

    /// Parses a safetensors header dtype.
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        Self::ALL.into_iter().find(|d| d.safetensors_name() == name)
    }

    /// Parses a `torch.<name>` dtype attribute, accepting torch's aliases.
    pub fn from_torch_name(name: &str) -> Option<DType> {
        let canonical = match name {
            "float" => "float32",
            "double" => "float64",
            "half" => "float16",
            "long" => "int64",
            "int" => "int32",
            "short" => "int16",
            other => other,
        };
        Self::ALL.into_iter().find(|d| d.torch_name() == canonical)
    }

    /// Parses a legacy typed storage class name (`BFloat16Storage`).
    pub fn from_torch_storage_class(name: &str) -> Option<DType> {
        Self::ALL
            .into_iter()
            .find(|d| d.torch_storage_class() == Some(name))
    }

    /// Parses the user-facing `dtype=` values (`bfloat16`, `float16`, `float32`, and
    /// the short forms `bf16`, `fp16`, `fp32`).
    pub fn from_user(name: &str) -> Option<DType> {
        match name {
            "bfloat16" | "bf16" => Some(DType::BF16),
            "float16" | "fp16" | "half" => Some(DType::F16),
            "float32" | "fp32" | "float" => Some(DType::F32),
            _ => None,
        }
    }

    /// Converts to the `safetensors` crate's enum.
    pub fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::Bool => S::BOOL,
            DType::U8 => S::U8,
            DType::I8 => S::I8,
            DType::F8E5M2 => S::F8_E5M2,
            DType::F8E4M3 => S::F8_E4M3,
            DType::I16 => S::I16,
            DType::U16 => S::U16,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::I32 => S::I32,
            DType::U32 => S::U32,
            DType::F32 => S::F32,
            DType::F64 => S::F64,
            DType::I64 => S::I64,
            DType::U64 => S::U64,
        }
    }

    /// Converts from the `safetensors` crate's enum; `None` for dtypes no checkpoint
    /// converter here can carry (sub-byte and complex types).
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        use safetensors::Dtype as S;
        Some(match d {
            S::BOOL => DType::Bool,
            S::U8 => DType::U8,
            S::I8 => DType::I8,
            S::F8_E5M2 => DType::F8E5M2,
            S::F8_E4M3 => DType::F8E4M3,
            S::I16 => DType::I16,
            S::U16 => DType::U16,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::I32 => DType::I32,
            S::U32 => DType::U32,
            S::F32 => DType::F32,
            S::F64 => DType::F64,
            S::I64 => DType::I64,
            S::U64 => DType::U64,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// Why a cast was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot cast {from} to {to}: only casts between floating-point types are supported")]
pub struct CastError {
    /// Source element type.
    pub from: DType,
    /// Requested element type.
    pub to: DType,
}

/// Checks that `from` can be cast to `to` by [`cast_into`].
pub fn check_cast(from: DType, to: DType) -> Result<(), CastError> {
    let castable = |d: DType| matches!(d, DType::F16 | DType::BF16 | DType::F32 | DType::F64);
    if from == to || (castable(from) && castable(to)) {
        Ok(())
    } else {
        Err(CastError { from, to })
    }
}

/// Converts little-endian elements of `from` in `src` into elements of `to` in `dst`.
///
/// `dst.len() / to.size()` must equal `src.len() / from.size()`. Rounding is
/// round-to-nearest-even, as torch does; NaN stays NaN. Callers check the pair with
/// [`check_cast`] when the plan is built, so an unsupported pair here is a bug.
pub fn cast_into(from: DType, src: &[u8], to: DType, dst: &mut [u8]) {
    assert_eq!(
        src.len() / from.size(),
        dst.len() / to.size(),
        "cast_into: element counts differ"
    );
    if from == to {
        dst.copy_from_slice(src);
        return;
    }
    // Every supported pair goes through f32 (exact for f16/bf16) or f64.
    match (from, to) {
        (DType::F64, _) | (_, DType::F64) => {
            for (s, d) in src
                .chunks_exact(from.size())
                .zip(dst.chunks_exact_mut(to.size()))
            {
                let v = read_f64(from, s);
                write_f64(to, v, d);
            }
        }
        _ => {
            for (s, d) in src
                .chunks_exact(from.size())
                .zip(dst.chunks_exact_mut(to.size()))
            {
                let v = read_f32(from, s);
                write_f32(to, v, d);
            }
        }
    }
}

fn read_f32(d: DType, b: &[u8]) -> f32 {
    match d {
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::BF16 => f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
        DType::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        other => unreachable!("read_f32 on {other}: refused by check_cast"),
    }
}

fn write_f32(d: DType, v: f32, out: &mut [u8]) {
    match d {
        DType::F32 => out.copy_from_slice(&v.to_le_bytes()),
        DType::BF16 => out.copy_from_slice(&bf16_bits(v).to_le_bytes()),
        DType::F16 => out.copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes()),
        other => unreachable!("write_f32 on {other}: refused by check_cast"),
    }
}

fn read_f64(d: DType, b: &[u8]) -> f64 {
    match d {
        DType::F64 => f64::from_le_bytes(b.try_into().expect("8-byte element")),
        other => f64::from(read_f32(other, b)),
    }
}

fn write_f64(d: DType, v: f64, out: &mut [u8]) {
    match d {
        DType::F64 => out.copy_from_slice(&v.to_le_bytes()),
        DType::BF16 => out.copy_from_slice(&bf16::from_f64(v).to_bits().to_le_bytes()),
        DType::F16 => out.copy_from_slice(&f16::from_f64(v).to_bits().to_le_bytes()),
        // f64 -> f32 with `as` rounds to nearest even, like torch.
        DType::F32 => out.copy_from_slice(&(v as f32).to_le_bytes()),
        other => unreachable!("write_f64 on {other}: refused by check_cast"),
    }
}

/// f32 → bf16 bits, round to nearest even as torch rounds; every NaN becomes the
/// quiet NaN 0x7FC0.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        0x7FC0
    } else {
        ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// `x` rounded to `dtype` and widened back: the value a tensor of `dtype` holds.
#[inline(always)]
pub fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => f32::from_bits(u32::from(bf16_bits(x)) << 16),
        DType::F16 => f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// Floating-point elements of `dtype` in `bytes`, widened to f32 (exact, but for
/// float64, which is rounded to nearest even).
///
/// # Panics
/// For a dtype that is not floating point: callers check dtypes when they plan.
pub fn decode(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::BF16 => {
            // SAFETY: any bit pattern is a valid u16; align_to splits off what is
            // not aligned, which the fallback below handles.
            match unsafe { bytes.align_to::<u16>() } {
                (&[], words, &[]) if cfg!(target_endian = "little") => {
                    for (o, &w) in out.iter_mut().zip(words) {
                        *o = f32::from_bits(u32::from(w) << 16);
                    }
                }
                _ => {
                    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                        *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
                    }
                }
            }
        }
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        DType::F64 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(b.try_into().expect("8-byte element")) as f32;
            }
        }
        other => panic!("decode of {other}: not a floating-point dtype"),
    }
}

/// Rounds f32 values into elements of `dtype` (round to nearest even, as torch).
///
/// # Panics
/// For a dtype that is not floating point: callers check dtypes when they plan.
pub fn encode(dtype: DType, vals: &[f32], bytes: &mut [u8]) {
    match dtype {
        DType::BF16 => {
            // SAFETY: any bit pattern is a valid u16; align_to splits off what is
            // not aligned, which the fallback below handles.
            match unsafe { bytes.align_to_mut::<u16>() } {
                (&mut [], words, &mut []) if cfg!(target_endian = "little") => {
                    for (w, &v) in words.iter_mut().zip(vals) {
                        *w = bf16_bits(v);
                    }
                }
                _ => {
                    for (b, &v) in bytes.chunks_exact_mut(2).zip(vals) {
                        b.copy_from_slice(&bf16_bits(v).to_le_bytes());
                    }
                }
            }
        }
        DType::F32 => {
            for (b, &v) in bytes.chunks_exact_mut(4).zip(vals) {
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            for (b, &v) in bytes.chunks_exact_mut(2).zip(vals) {
                b.copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
            }
        }
        DType::F64 => {
            for (b, &v) in bytes.chunks_exact_mut(8).zip(vals) {
                b.copy_from_slice(&f64::from(v).to_le_bytes());
            }
        }
        other => panic!("encode of {other}: not a floating-point dtype"),
    }
}

/// Elements of `words` whose bits under `mask` are all ones.
fn all_ones<T>(words: &[T], mask: T) -> u64
where
    T: Copy + std::ops::BitAnd<Output = T> + PartialEq,
{
    // Counted in u16 lanes per block, which vectorizes.
    words
        .chunks(1 << 15)
        .map(|b| u64::from(b.iter().map(|&w| u16::from(w & mask == mask)).sum::<u16>()))
        .sum()
}

/// `bytes` as little-endian words of `N` bytes: aligned in place, else copied.
fn counted<const N: usize, T>(bytes: &[u8], mask: T, word: impl Fn([u8; N]) -> T) -> u64
where
    T: Copy + std::ops::BitAnd<Output = T> + PartialEq,
{
    // SAFETY: every bit pattern is a valid integer; a misaligned start is refused.
    match unsafe { bytes.align_to::<T>() } {
        (&[], words, rest) if cfg!(target_endian = "little") && rest.len() < N => {
            all_ones(words, mask)
        }
        _ => {
            let words: Vec<T> = bytes
                .chunks_exact(N)
                .map(|c| word(c.try_into().expect("N bytes")))
                .collect();
            all_ones(&words, mask)
        }
    }
}

/// Counts elements whose exponent bits are all ones (NaN or ±inf).
pub fn count_non_finite(dtype: DType, bytes: &[u8]) -> u64 {
    match dtype {
        DType::BF16 => counted(bytes, 0x7f80u16, u16::from_le_bytes),
        DType::F16 => counted(bytes, 0x7c00u16, u16::from_le_bytes),
        DType::F32 => counted(bytes, 0x7f80_0000u32, u32::from_le_bytes),
        DType::F64 => counted(bytes, 0x7ff0_0000_0000_0000u64, u64::from_le_bytes),
        // e4m3fn has no infinities; its NaN is S.1111.111.
        DType::F8E4M3 => all_ones(bytes, 0x7fu8),
        DType::F8E5M2 => all_ones(bytes, 0x7cu8),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
            assert_eq!(DType::from_torch_name(d.torch_name()), Some(d));
            assert_eq!(DType::from_safetensors(d.to_safetensors()), Some(d));
            if let Some(class) = d.torch_storage_class() {
                assert_eq!(DType::from_torch_storage_class(class), Some(d));
            }
        }
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to even (1.0).
        let halfway = 1.0f32 + f32::powi(2.0, -8);
        let mut out = [0u8; 2];
        cast_into(DType::F32, &halfway.to_le_bytes(), DType::BF16, &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3f80);
        // Just above halfway rounds up.
        let above = f32::from_bits(halfway.to_bits() + 1);
        cast_into(DType::F32, &above.to_le_bytes(), DType::BF16, &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3f81);
    }

    #[test]
    fn integer_casts_are_refused() {
        assert!(check_cast(DType::I64, DType::F32).is_err());
        assert!(check_cast(DType::I64, DType::I64).is_ok());
        assert!(check_cast(DType::BF16, DType::F64).is_ok());
    }

    #[test]
    fn non_finite_values_are_counted_per_dtype() {
        let bf16: Vec<u8> = [0x3f80u16, 0x7f80, 0xff80, 0x7fc0, 0x0000]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(count_non_finite(DType::BF16, &bf16), 3);
        // Misaligned, as a tensor at an odd offset of a file is.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bf16);
        assert_eq!(count_non_finite(DType::BF16, &shifted[1..]), 3);
        let f32s: Vec<u8> = [1.0f32, f32::NAN, f32::NEG_INFINITY, f32::MAX]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(count_non_finite(DType::F32, &f32s), 2);
        assert_eq!(count_non_finite(DType::I64, &[0xff; 16]), 0);
        // Many blocks of lanes.
        let many: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (if i % 7 == 0 { 0x7fc0u16 } else { 0x3f80 }).to_le_bytes())
            .collect();
        assert_eq!(count_non_finite(DType::BF16, &many), 200_000u64.div_ceil(7));
    }
}
