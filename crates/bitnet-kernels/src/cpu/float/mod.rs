//! Float-weight GEMV (f16, bf16 or f32 weights times an f32 vector), dot
//! products and conversions: the tied output head and embedding rows.
//!
//! Weights are read straight from little-endian bytes (a memory-mapped GGUF
//! or safetensors buffer) with unaligned loads: no copy, no alignment
//! requirement. [`FloatMatrixRef::from_slice`] wraps typed slices the same way.

mod portable;
mod scalar;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512;
#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
mod neon;

use std::marker::PhantomData;

use half::{bf16, f16};
use rayon::prelude::*;

use super::kernel::{CpuKernel, Resolved};
use super::partition::{chunk_outputs, par_chunk_rows};
use crate::KernelError;

/// The storage type of a float weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FloatDtype {
    F16,
    Bf16,
    F32,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for f32 {}
}

/// A weight element type the float kernels read: [`half::f16`], [`half::bf16`] or `f32`.
pub trait FloatWeight: sealed::Sealed + bytemuck::Pod + Send + Sync + 'static {
    /// Which of the three it is.
    const DTYPE: FloatDtype;
    /// Bytes per element.
    const SIZE: usize;
    /// Name for error messages.
    const NAME: &'static str;
}

impl FloatWeight for f16 {
    const DTYPE: FloatDtype = FloatDtype::F16;
    const SIZE: usize = 2;
    const NAME: &'static str = "f16";
}

impl FloatWeight for bf16 {
    const DTYPE: FloatDtype = FloatDtype::Bf16;
    const SIZE: usize = 2;
    const NAME: &'static str = "bf16";
}

impl FloatWeight for f32 {
    const DTYPE: FloatDtype = FloatDtype::F32;
    const SIZE: usize = 4;
    const NAME: &'static str = "f32";
}

/// A borrowed row-major `[rows, k]` matrix of `T`, stored little endian in
/// bytes (any alignment), validated on construction.
#[derive(Debug)]
pub struct FloatMatrixRef<'a, T: FloatWeight> {
    bytes: &'a [u8],
    rows: usize,
    k: usize,
    dtype: PhantomData<T>,
}

impl<T: FloatWeight> Clone for FloatMatrixRef<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T: FloatWeight> Copy for FloatMatrixRef<'_, T> {}

impl<'a, T: FloatWeight> FloatMatrixRef<'a, T> {
    /// Wraps `rows * k * size_of::<T>()` little-endian bytes, e.g. a tensor
    /// of a memory-mapped file. No copy; the bytes need no alignment.
    pub fn from_le_bytes(bytes: &'a [u8], rows: usize, k: usize) -> Result<Self, KernelError> {
        let expected =
            rows.checked_mul(k).and_then(|n| n.checked_mul(T::SIZE)).ok_or(KernelError::DimensionTooLarge {
                what: "float matrix rows",
                value: rows,
                max: usize::MAX / k.max(1) / T::SIZE,
            })?;
        if bytes.len() != expected {
            return Err(KernelError::LengthMismatch { what: float_bytes_what::<T>(), expected, found: bytes.len() });
        }
        Ok(Self { bytes, rows, k, dtype: PhantomData })
    }

    /// Wraps a typed slice of `rows * k` values without copying (its bytes
    /// are little endian on the little-endian targets this is compiled for).
    #[cfg(target_endian = "little")]
    pub fn from_slice(values: &'a [T], rows: usize, k: usize) -> Result<Self, KernelError> {
        let expected = rows.checked_mul(k).ok_or(KernelError::DimensionTooLarge {
            what: "float matrix rows",
            value: rows,
            max: usize::MAX / k.max(1),
        })?;
        if values.len() != expected {
            return Err(KernelError::LengthMismatch { what: "float matrix elements", expected, found: values.len() });
        }
        Self::from_le_bytes(bytemuck::cast_slice(values), rows, k)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The little-endian bytes, `rows * k * size_of::<T>()` of them.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Row `row` as little-endian bytes (e.g. an embedding lookup for [`convert_f16_f32`]).
    pub fn row_bytes(&self, row: usize) -> Result<&'a [u8], KernelError> {
        if row >= self.rows {
            return Err(KernelError::DimensionTooLarge {
                what: "row index",
                value: row,
                max: self.rows.saturating_sub(1),
            });
        }
        let len = self.k * T::SIZE;
        Ok(&self.bytes[row * len..(row + 1) * len])
    }
}

fn float_bytes_what<T: FloatWeight>() -> &'static str {
    match T::DTYPE {
        FloatDtype::F16 => "f16 matrix bytes",
        FloatDtype::Bf16 => "bf16 matrix bytes",
        FloatDtype::F32 => "f32 matrix bytes",
    }
}

/// `out[j] = sum_kk w[j][kk] * x[kk]` with f16 weights: the tied output head.
pub fn gemv_f16_f32(
    kernel: CpuKernel,
    w: FloatMatrixRef<'_, f16>,
    x: &[f32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    gemv(kernel, w, x, out)
}

/// [`gemv_f16_f32`] split over rows on the current rayon pool.
pub fn gemv_f16_f32_par(
    kernel: CpuKernel,
    w: FloatMatrixRef<'_, f16>,
    x: &[f32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    gemv_par(kernel, w, x, out)
}

/// `out[j] = sum_kk w[j][kk] * x[kk]` with bf16 weights (HF safetensors embeddings).
pub fn gemv_bf16_f32(
    kernel: CpuKernel,
    w: FloatMatrixRef<'_, bf16>,
    x: &[f32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    gemv(kernel, w, x, out)
}

/// [`gemv_bf16_f32`] split over rows on the current rayon pool.
pub fn gemv_bf16_f32_par(
    kernel: CpuKernel,
    w: FloatMatrixRef<'_, bf16>,
    x: &[f32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    gemv_par(kernel, w, x, out)
}

/// `out[j] = sum_kk w[j][kk] * x[kk]` with f32 weights.
pub fn gemv_f32_f32(
    kernel: CpuKernel,
    w: FloatMatrixRef<'_, f32>,
    x: &[f32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    gemv(kernel, w, x, out)
}

/// [`gemv_f32_f32`] split over rows on the current rayon pool.
pub fn gemv_f32_f32_par(
    kernel: CpuKernel,
    w: FloatMatrixRef<'_, f32>,
    x: &[f32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    gemv_par(kernel, w, x, out)
}

/// `out[t][j] = sum_kk w[j][kk] * x[t][kk]` for `n` vectors at once (`x` is
/// `[n, k]`, `out` is `[n, rows]`), split over rows on the current rayon pool:
/// each chunk of rows is read from memory once and reused from cache for every
/// vector. Every output equals [`gemv_f16_f32`]'s bit for bit.
pub fn gemm_f16_f32_par(
    kernel: CpuKernel,
    w: FloatMatrixRef<'_, f16>,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    gemm_par(kernel, w, x, n, out)
}

/// [`gemm_f16_f32_par`] with bf16 weights.
pub fn gemm_bf16_f32_par(
    kernel: CpuKernel,
    w: FloatMatrixRef<'_, bf16>,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    gemm_par(kernel, w, x, n, out)
}

/// [`gemm_f16_f32_par`] with f32 weights.
pub fn gemm_f32_f32_par(
    kernel: CpuKernel,
    w: FloatMatrixRef<'_, f32>,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    gemm_par(kernel, w, x, n, out)
}

/// Dot product of little-endian f16 values (`2 * x.len()` bytes) with `x`.
pub fn dot_f16_f32(kernel: CpuKernel, w_le: &[u8], x: &[f32]) -> Result<f32, KernelError> {
    dot::<f16>(kernel, w_le, x)
}

/// Dot product of little-endian bf16 values (`2 * x.len()` bytes) with `x`.
pub fn dot_bf16_f32(kernel: CpuKernel, w_le: &[u8], x: &[f32]) -> Result<f32, KernelError> {
    dot::<bf16>(kernel, w_le, x)
}

/// Dot product of little-endian f32 values (`4 * x.len()` bytes) with `x`.
pub fn dot_f32_f32(kernel: CpuKernel, w_le: &[u8], x: &[f32]) -> Result<f32, KernelError> {
    dot::<f32>(kernel, w_le, x)
}

/// Converts little-endian f16 values (`2 * out.len()` bytes) to f32, exactly
/// (every kernel gives the same bits; NaN payloads are kept, quieted).
pub fn convert_f16_f32(kernel: CpuKernel, src_le: &[u8], out: &mut [f32]) -> Result<(), KernelError> {
    convert::<f16>(kernel, src_le, out)
}

/// Converts little-endian bf16 values (`2 * out.len()` bytes) to f32, exactly.
pub fn convert_bf16_f32(kernel: CpuKernel, src_le: &[u8], out: &mut [f32]) -> Result<(), KernelError> {
    convert::<bf16>(kernel, src_le, out)
}

fn check_gemv<T: FloatWeight>(w: FloatMatrixRef<'_, T>, x: &[f32], out: &[f32]) -> Result<(), KernelError> {
    if x.len() != w.k {
        return Err(KernelError::LengthMismatch { what: "gemv input (k)", expected: w.k, found: x.len() });
    }
    if out.len() != w.rows {
        return Err(KernelError::LengthMismatch { what: "gemv output (rows)", expected: w.rows, found: out.len() });
    }
    Ok(())
}

fn gemv<T: FloatWeight>(
    kernel: CpuKernel,
    w: FloatMatrixRef<'_, T>,
    x: &[f32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    let resolved = kernel.resolve()?;
    check_gemv(w, x, out)?;
    gemv_rows::<T>(resolved, w.bytes, x, out);
    Ok(())
}

fn gemv_par<T: FloatWeight>(
    kernel: CpuKernel,
    w: FloatMatrixRef<'_, T>,
    x: &[f32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    let resolved = kernel.resolve()?;
    check_gemv(w, x, out)?;
    if w.rows == 0 {
        return Ok(());
    }
    let row_bytes = w.k * T::SIZE;
    if row_bytes == 0 {
        out.fill(0.0);
        return Ok(());
    }
    // One contiguous share per pool thread: one sequential stream each (the
    // `rows` module).
    super::rows::run_rows(&[(w.rows, row_bytes)], &mut [out], 1, |_, rows, outs| {
        gemv_rows::<T>(resolved, &w.bytes[rows.start * row_bytes..rows.end * row_bytes], x, &mut *outs[0])
    });
    Ok(())
}

fn gemm_par<T: FloatWeight>(
    kernel: CpuKernel,
    w: FloatMatrixRef<'_, T>,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let resolved = kernel.resolve()?;
    let x_len = n.checked_mul(w.k).ok_or(KernelError::DimensionTooLarge {
        what: "gemm input",
        value: n,
        max: usize::MAX / w.k.max(1),
    })?;
    if x.len() != x_len {
        return Err(KernelError::LengthMismatch { what: "gemm input (n x k)", expected: x_len, found: x.len() });
    }
    let out_len = n.checked_mul(w.rows).ok_or(KernelError::DimensionTooLarge {
        what: "gemm output",
        value: n,
        max: usize::MAX / w.rows.max(1),
    })?;
    if out.len() != out_len {
        return Err(KernelError::LengthMismatch {
            what: "gemm output (n x rows)",
            expected: out_len,
            found: out.len(),
        });
    }
    if w.rows == 0 || n == 0 {
        return Ok(());
    }
    let row_bytes = w.k * T::SIZE;
    if row_bytes == 0 {
        out.fill(0.0);
        return Ok(());
    }
    if n == 1 {
        return gemv_par::<T>(kernel, w, x, out);
    }
    let chunk_rows = par_chunk_rows(w.rows, row_bytes, rayon::current_num_threads());
    let per_chunk = chunk_outputs(out, w.rows, chunk_rows);
    crate::cpu::team::rayon_section(|| {
        per_chunk.into_par_iter().zip(w.bytes.par_chunks(chunk_rows * row_bytes)).for_each(|(outs, bytes)| {
            for (t, o) in outs.into_iter().enumerate() {
                gemv_rows::<T>(resolved, bytes, &x[t * w.k..(t + 1) * w.k], o);
            }
        });
    });
    Ok(())
}

fn dot<T: FloatWeight>(kernel: CpuKernel, w_le: &[u8], x: &[f32]) -> Result<f32, KernelError> {
    let resolved = kernel.resolve()?;
    let expected = x.len().checked_mul(T::SIZE).ok_or(KernelError::DimensionTooLarge {
        what: "dot length",
        value: x.len(),
        max: usize::MAX / T::SIZE,
    })?;
    if w_le.len() != expected {
        return Err(KernelError::LengthMismatch { what: float_bytes_what::<T>(), expected, found: w_le.len() });
    }
    let mut out = [0.0f32];
    gemv_rows::<T>(resolved, w_le, x, &mut out);
    Ok(out[0])
}

fn convert<T: FloatWeight>(kernel: CpuKernel, src_le: &[u8], out: &mut [f32]) -> Result<(), KernelError> {
    let resolved = kernel.resolve()?;
    let expected = out.len().checked_mul(T::SIZE).ok_or(KernelError::DimensionTooLarge {
        what: "conversion length",
        value: out.len(),
        max: usize::MAX / T::SIZE,
    })?;
    if src_le.len() != expected {
        return Err(KernelError::LengthMismatch { what: float_bytes_what::<T>(), expected, found: src_le.len() });
    }
    match resolved {
        Resolved::Scalar => scalar::convert::<T>(src_le, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::Avx2(token) => avx2::convert::<T>(token, src_le, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::AvxVnni(token) => avx2::convert::<T>(token.avx2(), src_le, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::Avx512(token) => avx2::convert::<T>(token.avx2(), src_le, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::Amx(token) => avx2::convert::<T>(token.avx512().avx2(), src_le, out),
        // `wide` is NEON on AArch64, so the NEON kernel's conversion is the portable one.
        _ => portable::convert::<T>(src_le, out),
    }
    Ok(())
}

/// GEMV over `out.len()` rows of `bytes` (each `x.len()` elements of `T`).
fn gemv_rows<T: FloatWeight>(resolved: Resolved, bytes: &[u8], x: &[f32], out: &mut [f32]) {
    if x.is_empty() {
        out.fill(0.0);
        return;
    }
    match resolved {
        Resolved::Scalar => scalar::gemv_rows::<T>(bytes, x, out),
        Resolved::Portable => portable::gemv_rows::<T>(bytes, x, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::Avx2(token) => avx2::gemv_rows::<T>(token, bytes, x, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::AvxVnni(token) => avx2::gemv_rows::<T>(token.avx2(), bytes, x, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::Avx512(token) => avx512::gemv_rows::<T>(token, bytes, x, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::Amx(token) => avx512::gemv_rows::<T>(token.avx512(), bytes, x, out),
        #[cfg(target_arch = "aarch64")]
        Resolved::Neon(token) => neon::gemv_rows::<T>(token, bytes, x, out),
    }
}

/// A GEMV's rows two at a time: row `i` of the first half of `out` with row
/// `i` of the second (`two`), so the weights are read as two sequential
/// streams; an odd last row alone (`one`). `bytes` holds `out.len()` rows of
/// `row_bytes` bytes. Inlined into each ISA's `#[target_feature]` kernel.
#[inline(always)]
// Only the x86 kernels read two streams.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn two_streams(
    bytes: &[u8],
    row_bytes: usize,
    out: &mut [f32],
    one: impl Fn(&[u8]) -> f32,
    two: impl Fn(&[u8], &[u8]) -> (f32, f32),
) {
    let half = out.len() / 2;
    let (first, second) = bytes.split_at(half * row_bytes);
    let (out_a, out_b) = out.split_at_mut(half);
    for ((ra, rb), (oa, ob)) in
        first.chunks_exact(row_bytes).zip(second.chunks_exact(row_bytes)).zip(out_a.iter_mut().zip(out_b.iter_mut()))
    {
        (*oa, *ob) = two(ra, rb);
    }
    if out_b.len() > half {
        out_b[half] = one(&second[half * row_bytes..]);
    }
}

/// Decodes one little-endian element (`T::SIZE` bytes); the scalar reference
/// conversion, also used for the tails of the SIMD kernels.
#[inline]
pub(super) fn decode_le<T: FloatWeight>(bytes: &[u8]) -> f32 {
    match T::DTYPE {
        FloatDtype::F16 => f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32(),
        FloatDtype::Bf16 => f32::from_bits(u32::from(u16::from_le_bytes([bytes[0], bytes[1]])) << 16),
        FloatDtype::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
    }
}

/// Scalar dot of the elements `start..` of a row with `x[start..]`, for SIMD tails.
pub(super) fn tail_dot<T: FloatWeight>(row: &[u8], x: &[f32], start: usize) -> f32 {
    row[start * T::SIZE..].chunks_exact(T::SIZE).zip(&x[start..]).map(|(w, &v)| decode_le::<T>(w) * v).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_validation() {
        let bytes = [0u8; 24];
        assert!(FloatMatrixRef::<f16>::from_le_bytes(&bytes, 3, 4).is_ok());
        assert!(FloatMatrixRef::<f32>::from_le_bytes(&bytes, 3, 2).is_ok());
        assert_eq!(
            FloatMatrixRef::<bf16>::from_le_bytes(&bytes, 2, 4).unwrap_err(),
            KernelError::LengthMismatch { what: "bf16 matrix bytes", expected: 16, found: 24 }
        );
        assert!(matches!(
            FloatMatrixRef::<f32>::from_le_bytes(&bytes, usize::MAX, 2),
            Err(KernelError::DimensionTooLarge { .. })
        ));
        let values = [f16::ONE; 6];
        let w = FloatMatrixRef::from_slice(&values, 2, 3).unwrap();
        assert_eq!(w.row_bytes(1).unwrap(), &[0x00, 0x3C, 0x00, 0x3C, 0x00, 0x3C]);
        assert!(w.row_bytes(2).is_err());
        assert_eq!(
            FloatMatrixRef::from_slice(&values, 2, 2).unwrap_err(),
            KernelError::LengthMismatch { what: "float matrix elements", expected: 4, found: 6 }
        );
    }

    #[test]
    fn decode_known_values() {
        assert_eq!(decode_le::<f16>(&[0x00, 0x3C]), 1.0);
        assert_eq!(decode_le::<f16>(&[0x00, 0xC0]), -2.0);
        assert_eq!(decode_le::<f16>(&[0x01, 0x00]), 2f32.powi(-24));
        assert_eq!(decode_le::<bf16>(&[0x80, 0x3F]), 1.0);
        assert_eq!(decode_le::<f32>(&1.5f32.to_le_bytes()), 1.5);
    }
}
