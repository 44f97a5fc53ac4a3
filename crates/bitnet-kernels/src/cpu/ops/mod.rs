//! The element-wise steps of the forward pass: RMSNorm, softmax, the
//! `relu(gate)^2 * up` activation, NEOX RoPE, per-token int8 activation
//! quantization, and attention's two products over the KV cache (scores and
//! the weighted sum of values).
//!
//! These touch a few thousand floats per token, so they are written for
//! exactness first: [`relu2_mul_f32`], [`rope_neox_f32`] and
//! [`quantize_act_i8`] give the same bits on every kernel, and
//! [`rms_norm_f32`] / [`softmax_f32`] follow the reference forward pass
//! (f64 sums) with only summation order and `exp` differing.
//! AVX-VNNI and AVX-512 use the AVX2 versions; NEON uses the portable ones
//! (`wide` compiles to NEON there).

mod portable;
mod scalar;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2;

use super::kernel::{CpuKernel, Resolved};
use crate::KernelError;

/// An element type of the KV cache the attention products read: `f32`, or
/// `half::f16` (half the bytes; every f16 converts to f32 exactly, so the
/// products of f16 rows equal those of the same values stored as f32, on
/// the same kernel). Sealed: implemented for those two types only.
pub trait KvElement: Copy + Send + Sync + sealed::Sealed + 'static {
    fn to_f32(self) -> f32;
    /// `sum(a * b)` on the portable kernels.
    #[doc(hidden)]
    fn portable_dot(a: &[f32], b: &[Self]) -> f32;
    /// `out += w * row` on the portable kernels.
    #[doc(hidden)]
    fn portable_add_scaled(out: &mut [f32], w: f32, row: &[Self]);
    /// Eight elements as f32 lanes.
    ///
    /// # Safety
    /// The CPU must support AVX and F16C (an `Avx2Token` proves both).
    #[doc(hidden)]
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    unsafe fn load8(chunk: &[Self; 8]) -> std::arch::x86_64::__m256;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

impl KvElement for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn portable_dot(a: &[f32], b: &[f32]) -> f32 {
        portable::dot(a, b)
    }
    fn portable_add_scaled(out: &mut [f32], w: f32, row: &[f32]) {
        portable::add_scaled(out, w, row)
    }
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    #[inline(always)]
    unsafe fn load8(chunk: &[f32; 8]) -> std::arch::x86_64::__m256 {
        // SAFETY: `chunk` is 8 readable floats (`vmovups` needs no alignment); AVX per the caller.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(chunk.as_ptr()) }
    }
}

impl KvElement for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    // The portable kernels convert element by element (the scalar code).
    fn portable_dot(a: &[f32], b: &[half::f16]) -> f32 {
        scalar::dot(a, b)
    }
    fn portable_add_scaled(out: &mut [f32], w: f32, row: &[half::f16]) {
        scalar::add_scaled(out, w, row)
    }
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    #[inline(always)]
    unsafe fn load8(chunk: &[half::f16; 8]) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::{_mm256_cvtph_ps, _mm_loadu_si128};
        // SAFETY: `chunk` is 16 readable bytes (`vmovdqu` needs no alignment); F16C per the caller.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(chunk.as_ptr().cast())) }
    }
}

/// Lower bound of a token's absolute maximum in [`quantize_act_i8`], so an
/// all-zero token gets a finite scale (`127 / 1e-5`); as `bitnet_quant::act_quant`.
pub const ACT_QUANT_EPS: f32 = 1e-5;

#[derive(Debug, Clone, Copy)]
enum Isa {
    Scalar,
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2(super::token::Avx2Token),
}

fn isa(kernel: CpuKernel) -> Result<Isa, KernelError> {
    Ok(match kernel.resolve()? {
        Resolved::Scalar => Isa::Scalar,
        Resolved::Portable => Isa::Portable,
        #[cfg(target_arch = "x86_64")]
        Resolved::Avx2(token) => Isa::Avx2(token),
        #[cfg(target_arch = "x86_64")]
        Resolved::AvxVnni(token) => Isa::Avx2(token.avx2()),
        #[cfg(target_arch = "x86_64")]
        Resolved::Avx512(token) => Isa::Avx2(token.avx2()),
        #[cfg(target_arch = "x86_64")]
        Resolved::Amx(token) => Isa::Avx2(token.avx512().avx2()),
        #[cfg(target_arch = "aarch64")]
        Resolved::Neon(_) => Isa::Portable,
    })
}

/// The wrapping sum of `words`: the read-bandwidth probe of the benchmarks.
/// The x86 kernels read 128 bytes per step into four accumulators and
/// prefetch `PREFETCH_AHEAD` bytes ahead, as the
/// decode kernels stream their weights, so a floor measured with it is not
/// one those kernels beat by prefetching alone. Identical on every kernel
/// (wrapping addition is exact in any order).
pub fn sum_u64(kernel: CpuKernel, words: &[u64]) -> Result<u64, KernelError> {
    Ok(match isa(kernel)? {
        Isa::Scalar | Isa::Portable => scalar::sum_u64(words),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(token) => avx2::sum_u64(token, words),
    })
}

/// The wrapping sum of `a` and `b`, read as two streams in lockstep (128
/// bytes of each per step, both prefetched as [`sum_u64`] does): the
/// benchmarks' second read-bandwidth probe, since the AVX-512 decode
/// kernels read two streams per thread (on the dev box one stream per
/// thread did not reach the memory's bandwidth). Identical on every kernel.
pub fn sum_u64_pair(kernel: CpuKernel, a: &[u64], b: &[u64]) -> Result<u64, KernelError> {
    Ok(match isa(kernel)? {
        Isa::Scalar | Isa::Portable => scalar::sum_u64(a).wrapping_add(scalar::sum_u64(b)),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(token) => avx2::sum_u64_pair(token, a, b),
    })
}

fn check_len(what: &'static str, expected: usize, found: usize) -> Result<(), KernelError> {
    if expected != found {
        return Err(KernelError::LengthMismatch { what, expected, found });
    }
    Ok(())
}

/// RMSNorm: `out = x * rsqrt(mean(x^2) + eps) * weight`, as the reference
/// forward pass computes it: the mean of squares and the reciprocal root in
/// f64, `(x * inv) as f32 * weight` per element.
///
/// `weight` and `out` must have `x.len()` elements; an empty `x` does nothing.
pub fn rms_norm_f32(
    kernel: CpuKernel,
    x: &[f32],
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let isa = isa(kernel)?;
    check_len("rms_norm weight", x.len(), weight.len())?;
    check_len("rms_norm output", x.len(), out.len())?;
    if x.is_empty() {
        return Ok(());
    }
    let sum_sq = match isa {
        Isa::Scalar => scalar::sum_squares_f64(x),
        Isa::Portable => portable::sum_squares_f64(x),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(token) => avx2::sum_squares_f64(token, x),
    };
    let inv = 1.0 / (sum_sq / x.len() as f64 + f64::from(eps)).sqrt();
    match isa {
        Isa::Scalar | Isa::Portable => scalar::scale_mul(x, inv, weight, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(token) => avx2::scale_mul(token, x, inv, weight, out),
    }
    Ok(())
}

/// Softmax in place: `exp(x - max) / sum`, the sum in f64.
///
/// Entries of `-inf` (masked positions) become 0. The maximum must be finite:
/// a row that is all `-inf` (or NaN), or holds `+inf`, is
/// [`KernelError::NonFiniteValue`] and is left unchanged. A NaN entry beside
/// finite ones makes the row NaN. An empty row does nothing.
pub fn softmax_f32(kernel: CpuKernel, x: &mut [f32]) -> Result<(), KernelError> {
    let isa = isa(kernel)?;
    if x.is_empty() {
        return Ok(());
    }
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        let index = x.iter().position(|&v| v == max).unwrap_or(0);
        return Err(KernelError::NonFiniteValue { what: "softmax maximum", index, value: max });
    }
    match isa {
        Isa::Scalar => scalar::softmax_with_max(x, max),
        Isa::Portable => portable::softmax_with_max(x, max),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(token) => avx2::softmax_with_max(token, x, max),
    }
    Ok(())
}

/// BitNet's gated activation in place: `gate = relu(gate)^2 * up`, as
/// `(r * r) * up` with `r = max(gate, 0)` (a NaN gate counts as 0).
/// f32 throughout; the product can exceed the f16 range, never f32's here.
pub fn relu2_mul_f32(kernel: CpuKernel, gate: &mut [f32], up: &[f32]) -> Result<(), KernelError> {
    let isa = isa(kernel)?;
    check_len("relu2_mul up", gate.len(), up.len())?;
    match isa {
        Isa::Scalar => scalar::relu2_mul(gate, up),
        Isa::Portable => portable::relu2_mul(gate, up),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(token) => avx2::relu2_mul(token, gate, up),
    }
    Ok(())
}

/// NEOX-style (rotate_half) rotary embedding in place on `x = [n_heads, head_dim]`:
/// with `h = head_dim / 2`, for each head and `i < h`,
/// `x[i], x[i + h] = x[i] * cos[i] - x[i + h] * sin[i], x[i + h] * cos[i] + x[i] * sin[i]`.
///
/// `cos`/`sin` hold the `h` values for this token's position
/// (`cos(position * inv_freq[i])`); `head_dim` must be even and non-zero and
/// divide `x.len()`.
pub fn rope_neox_f32(
    kernel: CpuKernel,
    x: &mut [f32],
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
) -> Result<(), KernelError> {
    let isa = isa(kernel)?;
    if head_dim == 0 {
        return Err(KernelError::ZeroDimension { what: "head_dim" });
    }
    if !head_dim.is_multiple_of(2) {
        return Err(KernelError::NotMultiple { what: "head_dim", value: head_dim, multiple: 2 });
    }
    if !x.len().is_multiple_of(head_dim) {
        return Err(KernelError::NotMultiple { what: "rope input length", value: x.len(), multiple: head_dim });
    }
    check_len("rope cos table (head_dim / 2)", head_dim / 2, cos.len())?;
    check_len("rope sin table (head_dim / 2)", head_dim / 2, sin.len())?;
    for head in x.chunks_exact_mut(head_dim) {
        let (first, second) = head.split_at_mut(head_dim / 2);
        match isa {
            Isa::Scalar => scalar::rotate(first, second, cos, sin),
            Isa::Portable => portable::rotate(first, second, cos, sin),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2(token) => avx2::rotate(token, first, second, cos, sin),
        }
    }
    Ok(())
}

/// Checks that `rows` holds `n` rows of `len` values `stride` apart.
fn check_rows<T>(what: &'static str, rows: &[T], stride: usize, len: usize, n: usize) -> Result<(), KernelError> {
    if n == 0 {
        return Ok(());
    }
    if stride < len {
        return Err(KernelError::LengthMismatch {
            what: "row stride (at least the row length)",
            expected: len,
            found: stride,
        });
    }
    let needed = (n - 1)
        .checked_mul(stride)
        .and_then(|v| v.checked_add(len))
        .ok_or(KernelError::DimensionTooLarge { what, value: n, max: usize::MAX / stride.max(1) })?;
    if rows.len() < needed {
        return Err(KernelError::LengthMismatch { what, expected: needed, found: rows.len() });
    }
    Ok(())
}

/// Attention scores of one head: `out[p] = dot(q, row p) * scale` for
/// `p < out.len()`, where row `p` is `rows[p * stride..][..q.len()]` (the
/// head's key at position `p` of a KV cache whose positions are `stride`
/// values apart). f32 products and sums: the scalar reference adds in order,
/// the SIMD kernels in 8 or 16 lanes with fused multiply-adds (AVX2: four
/// positions at a time, 8 lanes each, sharing the loads of `q`), so results
/// differ by rounding only (`|a - b| <= 2e-5 * scale * sum |q_i k_i|`).
///
/// `rows` must hold `(out.len() - 1) * stride + q.len()` values and
/// `stride >= q.len()` (nothing is needed when `out` is empty).
pub fn dot_rows_f32(
    kernel: CpuKernel,
    q: &[f32],
    rows: &[f32],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    dot_rows(kernel, q, rows, stride, scale, out)
}

fn dot_rows<T: KvElement>(
    kernel: CpuKernel,
    q: &[f32],
    rows: &[T],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let isa = isa(kernel)?;
    check_rows("attention key rows", rows, stride, q.len(), out.len())?;
    let dot: fn(&[f32], &[T]) -> f32 = match isa {
        Isa::Scalar => scalar::dot,
        Isa::Portable => T::portable_dot,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(token) => {
            avx2::dot_rows(token, q, rows, stride, scale, out);
            return Ok(());
        }
    };
    for (p, o) in out.iter_mut().enumerate() {
        *o = dot(q, &rows[p * stride..p * stride + q.len()]) * scale;
    }
    Ok(())
}

/// Attention output of one head: `out = sum_p weights[p] * row p` with row
/// `p` = `rows[p * stride..][..out.len()]` (the head's value at position
/// `p`), `out` overwritten and each element added in order of `p` with
/// separate multiplies and adds: the same bits on every kernel (AVX2 keeps
/// 64 outputs in registers across all positions).
///
/// `rows` must hold `(weights.len() - 1) * stride + out.len()` values and
/// `stride >= out.len()`; no weights give zeros.
pub fn weighted_rows_f32(
    kernel: CpuKernel,
    weights: &[f32],
    rows: &[f32],
    stride: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    weighted_rows(kernel, weights, rows, stride, out)
}

fn weighted_rows<T: KvElement>(
    kernel: CpuKernel,
    weights: &[f32],
    rows: &[T],
    stride: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let isa = isa(kernel)?;
    check_rows("attention value rows", rows, stride, out.len(), weights.len())?;
    let add_scaled: fn(&mut [f32], f32, &[T]) = match isa {
        Isa::Scalar => scalar::add_scaled,
        Isa::Portable => T::portable_add_scaled,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(token) => {
            avx2::weighted_rows(token, weights, rows, stride, out);
            return Ok(());
        }
    };
    out.fill(0.0);
    let len = out.len();
    for (p, &w) in weights.iter().enumerate() {
        add_scaled(out, w, &rows[p * stride..p * stride + len]);
    }
    Ok(())
}

/// Splits `len` values into `heads` equal runs, or says what is wrong.
fn head_runs(what: &'static str, len: usize, heads: usize) -> Result<usize, KernelError> {
    if heads == 0 {
        return Err(KernelError::ZeroDimension { what: "attention heads" });
    }
    if !len.is_multiple_of(heads) {
        return Err(KernelError::NotMultiple { what, value: len, multiple: heads });
    }
    Ok(len / heads)
}

/// [`dot_rows_f32`] for `heads` query heads that share one KV head (GQA):
/// `q` holds their queries one after another (`heads` runs of equal
/// length) and `out` their scores (`heads` runs of `n` positions):
/// `out[h * n + p] = dot(q_h, row p) * scale`. Each head's scores are within
/// the same bound of the exact value as [`dot_rows_f32`]'s; the AVX2 kernels
/// read each key once for 2 or 4 heads.
pub fn dot_rows_heads_f32(
    kernel: CpuKernel,
    q: &[f32],
    heads: usize,
    rows: &[f32],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    dot_rows_heads(kernel, q, heads, rows, stride, scale, out)
}

/// [`dot_rows_heads_f32`] over an f16 cache: the same results as over the
/// same values stored as f32, on the same kernel (the portable kernel
/// computes these as the scalar one does).
pub fn dot_rows_heads_f16(
    kernel: CpuKernel,
    q: &[f32],
    heads: usize,
    rows: &[half::f16],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    dot_rows_heads(kernel, q, heads, rows, stride, scale, out)
}

fn dot_rows_heads<T: KvElement>(
    kernel: CpuKernel,
    q: &[f32],
    heads: usize,
    rows: &[T],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let isa = isa(kernel)?;
    let len = head_runs("attention queries", q.len(), heads)?;
    let n = head_runs("attention scores", out.len(), heads)?;
    check_rows("attention key rows", rows, stride, len, n)?;
    let grouped = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(token) => avx2::dot_rows_heads(token, q, heads, rows, stride, scale, out),
        _ => false,
    };
    if !grouped {
        for h in 0..heads {
            dot_rows(kernel, &q[h * len..(h + 1) * len], rows, stride, scale, &mut out[h * n..(h + 1) * n])?;
        }
    }
    Ok(())
}

/// [`weighted_rows_f32`] for `heads` query heads that share one KV head:
/// `weights` holds their weights one after another (`heads` runs of `n`)
/// and `out` their outputs (`heads` runs of equal length). The same bits as
/// [`weighted_rows_f32`] head by head, on every kernel; the AVX2 kernels
/// read each value once for 2 or 4 heads.
pub fn weighted_rows_heads_f32(
    kernel: CpuKernel,
    weights: &[f32],
    heads: usize,
    rows: &[f32],
    stride: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    weighted_rows_heads(kernel, weights, heads, rows, stride, out)
}

/// [`weighted_rows_heads_f32`] over an f16 cache: the same bits as over the
/// same values stored as f32, on every kernel.
pub fn weighted_rows_heads_f16(
    kernel: CpuKernel,
    weights: &[f32],
    heads: usize,
    rows: &[half::f16],
    stride: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    weighted_rows_heads(kernel, weights, heads, rows, stride, out)
}

fn weighted_rows_heads<T: KvElement>(
    kernel: CpuKernel,
    weights: &[f32],
    heads: usize,
    rows: &[T],
    stride: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let isa = isa(kernel)?;
    let n = head_runs("attention weights", weights.len(), heads)?;
    let len = head_runs("attention outputs", out.len(), heads)?;
    check_rows("attention value rows", rows, stride, len, n)?;
    let grouped = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(token) => avx2::weighted_rows_heads(token, weights, heads, rows, stride, out),
        _ => false,
    };
    if !grouped {
        for h in 0..heads {
            let head_out = &mut out[h * len..(h + 1) * len];
            weighted_rows(kernel, &weights[h * n..(h + 1) * n], rows, stride, head_out)?;
        }
    }
    Ok(())
}

/// Per-token absmax int8 quantization of one token, bit-identical to
/// `bitnet_quant::act_quant::quantize_activations`: `s = (1 / max(max|x|, 1e-5)) * 127`,
/// `q = clamp(round_half_even(x * s), -128, 127)`. Returns `s` (`x ≈ q / s`).
///
/// `out.len()` must equal `x.len()`. A NaN or infinite activation is
/// [`KernelError::NonFiniteValue`] naming the lowest such index, with `out` unchanged.
pub fn quantize_act_i8(kernel: CpuKernel, x: &[f32], out: &mut [i8]) -> Result<f32, KernelError> {
    let isa = isa(kernel)?;
    check_len("quantized activations", x.len(), out.len())?;
    quantize_row(isa, x, out, 0)
}

/// [`quantize_act_i8`] on a row-major `[n_rows, n_cols]` matrix, one scale
/// per row into `scales`. A non-finite value is an error naming its flat
/// index; rows before it have been written.
pub fn quantize_act_i8_rows(
    kernel: CpuKernel,
    x: &[f32],
    n_cols: usize,
    out: &mut [i8],
    scales: &mut [f32],
) -> Result<(), KernelError> {
    let isa = isa(kernel)?;
    if n_cols == 0 {
        return Err(KernelError::ZeroDimension { what: "n_cols" });
    }
    if !x.len().is_multiple_of(n_cols) {
        return Err(KernelError::NotMultiple { what: "activation count", value: x.len(), multiple: n_cols });
    }
    check_len("quantized activations", x.len(), out.len())?;
    check_len("activation scales", x.len() / n_cols, scales.len())?;
    let rows = x.chunks_exact(n_cols).zip(out.chunks_exact_mut(n_cols));
    for (row_idx, ((x_row, out_row), scale)) in rows.zip(scales.iter_mut()).enumerate() {
        *scale = quantize_row(isa, x_row, out_row, row_idx * n_cols)?;
    }
    Ok(())
}

fn quantize_row(isa: Isa, x: &[f32], out: &mut [i8], first_index: usize) -> Result<f32, KernelError> {
    let abs_max = match isa {
        Isa::Scalar => scalar::abs_max(x),
        Isa::Portable => portable::abs_max(x),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(token) => avx2::abs_max(token, x),
    };
    // `abs_max` (a maximum over bit patterns) is NaN or infinite exactly when
    // some value is; find the first.
    if !abs_max.is_finite() {
        let (index, &value) = x.iter().enumerate().find(|(_, v)| !v.is_finite()).unwrap_or((0, &abs_max));
        return Err(KernelError::NonFiniteValue { what: "activations", index: first_index + index, value });
    }
    // `(1 / m) * 127`, not `127 / m`, as `bitnet_quant::act_quant` (and torch,
    // which evaluates HF's `127 / tensor` as `reciprocal() * 127`); the two can
    // differ by one ulp, which moves `.5` ties.
    let scale = (1.0 / abs_max.max(ACT_QUANT_EPS)) * 127.0;
    match isa {
        Isa::Scalar => scalar::quantize(x, scale, out),
        Isa::Portable => portable::quantize(x, scale, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2(token) => avx2::quantize(token, x, scale, out),
    }
    Ok(scale)
}
