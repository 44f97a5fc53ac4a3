//! Int8 weights times int8 activations, exact in `i32`: an int8-quantized
//! output head (bitnet.cpp's lower-precision embedding option), which reads a
//! quarter of the bytes of an f32 head and half of an f16 one.
//!
//! Weights are a row-major `[rows, k]` matrix of `i8` (no alignment needed:
//! `i8` has none); any per-row scale is the caller's. Every kernel computes
//! the plain sum `sum_kk w[j][kk] * q[kk]` in `i32`, exactly, so all kernels
//! agree bit for bit:
//! - scalar: the reference;
//! - portable: `wide` (SSE2 / NEON), widened to `i16`, pairwise `i32` dots;
//! - AVX2 (and AVX-VNNI): sign-extended to `i16`, `vpmaddwd` (no `vpmaddubsw`:
//!   `-128 * -128` pairs saturate its `i16` sums);
//! - AVX-512: `vpdpbusd` on `w + 128` as unsigned bytes, minus `128 * sum(q)`
//!   (the offset goes on the weights, so the correction is one sum over the
//!   activations, not a precomputed sum per row);
//! - NEON: the scalar kernel (the head is memory bound; the scalar loop
//!   auto-vectorizes).

mod portable;
mod scalar;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512;

use rayon::prelude::*;

use super::kernel::{CpuKernel, Resolved};
use super::partition::{chunk_outputs, par_chunk_rows};
use crate::KernelError;

/// Largest supported `k`: the exact result, at most `128 * 128 * k` in
/// magnitude, must fit an `i32` (with a factor of two to spare). SIMD partial
/// sums may wrap on the way (the AVX-512 offset sums reach `255 * 128 * k`);
/// wrapping arithmetic makes the total exact whenever the true value fits.
pub const I8_MAX_K: usize = 1 << 16;

/// A borrowed row-major `[rows, k]` int8 matrix, validated on construction.
#[derive(Debug, Clone, Copy)]
pub struct I8MatrixRef<'a> {
    values: &'a [i8],
    rows: usize,
    k: usize,
}

impl<'a> I8MatrixRef<'a> {
    /// Wraps exactly `rows * k` values; `k` at most [`I8_MAX_K`].
    pub fn new(values: &'a [i8], rows: usize, k: usize) -> Result<Self, KernelError> {
        if k > I8_MAX_K {
            return Err(KernelError::DimensionTooLarge { what: "int8 matrix k", value: k, max: I8_MAX_K });
        }
        let expected = rows.checked_mul(k).ok_or(KernelError::DimensionTooLarge {
            what: "int8 matrix rows",
            value: rows,
            max: usize::MAX / k.max(1),
        })?;
        if values.len() != expected {
            return Err(KernelError::LengthMismatch { what: "int8 matrix elements", expected, found: values.len() });
        }
        Ok(Self { values, rows, k })
    }

    /// Output features (rows of the matrix).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (elements per row).
    pub fn k(&self) -> usize {
        self.k
    }

    /// The values, `rows * k` of them.
    pub fn values(&self) -> &'a [i8] {
        self.values
    }
}

/// `out[j] = sum_kk w[j][kk] * q[kk]`, exact; `q.len() == w.k()`, `out.len() == w.rows()`.
pub fn gemv_i8_i8(kernel: CpuKernel, w: I8MatrixRef<'_>, q: &[i8], out: &mut [i32]) -> Result<(), KernelError> {
    let resolved = kernel.resolve()?;
    check_shapes(w, q, out)?;
    gemv_rows(resolved, w.values, q, out);
    Ok(())
}

/// [`gemv_i8_i8`] split over rows on the current rayon pool: one contiguous
/// share per thread, claimed in runs of a multiple of 16 rows (whole cache
/// lines of output), threads that finish early claiming runs of the
/// others' (the `rows` module).
pub fn gemv_i8_i8_par(kernel: CpuKernel, w: I8MatrixRef<'_>, q: &[i8], out: &mut [i32]) -> Result<(), KernelError> {
    let resolved = kernel.resolve()?;
    check_shapes(w, q, out)?;
    if w.rows == 0 {
        return Ok(());
    }
    if w.k == 0 {
        out.fill(0);
        return Ok(());
    }
    // One contiguous share per pool thread: one sequential stream each (the
    // `rows` module).
    super::rows::run_rows(&[(w.rows, w.k)], &mut [out], 1, |_, rows, outs| {
        gemv_rows(resolved, &w.values[rows.start * w.k..rows.end * w.k], q, &mut *outs[0])
    });
    Ok(())
}

/// `out[t][j] = sum_kk w[j][kk] * q[t][kk]` for `n` vectors (`q` is `[n, k]`,
/// `out` is `[n, rows]`), split over rows on the current rayon pool: each
/// chunk of rows is read from memory once for all vectors. Exact, equal to
/// [`gemv_i8_i8`] for every vector.
pub fn gemm_i8_i8_par(
    kernel: CpuKernel,
    w: I8MatrixRef<'_>,
    q: &[i8],
    n: usize,
    out: &mut [i32],
) -> Result<(), KernelError> {
    let resolved = kernel.resolve()?;
    let q_len = n.checked_mul(w.k).ok_or(KernelError::DimensionTooLarge {
        what: "int8 gemm input",
        value: n,
        max: usize::MAX / w.k.max(1),
    })?;
    if q.len() != q_len {
        return Err(KernelError::LengthMismatch { what: "int8 gemm input (n x k)", expected: q_len, found: q.len() });
    }
    let out_len = n.checked_mul(w.rows).ok_or(KernelError::DimensionTooLarge {
        what: "int8 gemm output",
        value: n,
        max: usize::MAX / w.rows.max(1),
    })?;
    if out.len() != out_len {
        return Err(KernelError::LengthMismatch {
            what: "int8 gemm output (n x rows)",
            expected: out_len,
            found: out.len(),
        });
    }
    if w.rows == 0 || n == 0 {
        return Ok(());
    }
    if w.k == 0 {
        out.fill(0);
        return Ok(());
    }
    if n == 1 {
        return gemv_i8_i8_par(kernel, w, q, out);
    }
    let chunk_rows = par_chunk_rows(w.rows, w.k, rayon::current_num_threads());
    let per_chunk = chunk_outputs(out, w.rows, chunk_rows);
    super::team::rayon_section(|| {
        per_chunk.into_par_iter().zip(w.values.par_chunks(chunk_rows * w.k)).for_each(|(outs, values)| {
            for (t, o) in outs.into_iter().enumerate() {
                gemv_rows(resolved, values, &q[t * w.k..(t + 1) * w.k], o);
            }
        });
    });
    Ok(())
}

fn check_shapes(w: I8MatrixRef<'_>, q: &[i8], out: &[i32]) -> Result<(), KernelError> {
    if q.len() != w.k {
        return Err(KernelError::LengthMismatch { what: "int8 gemv input (k)", expected: w.k, found: q.len() });
    }
    if out.len() != w.rows {
        return Err(KernelError::LengthMismatch {
            what: "int8 gemv output (rows)",
            expected: w.rows,
            found: out.len(),
        });
    }
    Ok(())
}

/// GEMV over `out.len()` rows of `values` (each `q.len()` long).
fn gemv_rows(resolved: Resolved, values: &[i8], q: &[i8], out: &mut [i32]) {
    if q.is_empty() {
        out.fill(0);
        return;
    }
    match resolved {
        Resolved::Scalar => scalar::gemv_rows(values, q, out),
        Resolved::Portable => portable::gemv_rows(values, q, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::Avx2(token) => avx2::gemv_rows(token, values, q, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::AvxVnni(token) => avx2::gemv_rows(token.avx2(), values, q, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::Avx512(token) => avx512::gemv_rows(token, values, q, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::Amx(token) => avx512::gemv_rows(token.avx512(), values, q, out),
        // NEON runs the scalar loop, which the compiler vectorizes for it.
        #[cfg(target_arch = "aarch64")]
        Resolved::Neon(_) => scalar::gemv_rows(values, q, out),
    }
}

/// Scalar dot of `row[start..]` with `q[start..]`, for SIMD tails.
pub(super) fn tail_dot(row: &[i8], q: &[i8], start: usize) -> i32 {
    row[start..].iter().zip(&q[start..]).map(|(&w, &v)| i32::from(w) * i32::from(v)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_validation() {
        let values = [0i8; 24];
        assert!(I8MatrixRef::new(&values, 3, 8).is_ok());
        assert_eq!(
            I8MatrixRef::new(&values, 3, 7).unwrap_err(),
            KernelError::LengthMismatch { what: "int8 matrix elements", expected: 21, found: 24 }
        );
        assert!(matches!(I8MatrixRef::new(&values, usize::MAX, 2), Err(KernelError::DimensionTooLarge { .. })));
        assert_eq!(
            I8MatrixRef::new(&[], 0, I8_MAX_K + 1).unwrap_err(),
            KernelError::DimensionTooLarge { what: "int8 matrix k", value: I8_MAX_K + 1, max: I8_MAX_K }
        );
    }
}
