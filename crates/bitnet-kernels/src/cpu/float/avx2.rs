//! AVX2 + FMA + F16C float GEMV and conversion: eight weights per step
//! (`vcvtph2ps` for f16, a zero-extend and shift for bf16), two accumulators
//! per row to cover the FMA latency. A call's rows are taken two at a time,
//! row `i` of the first half with row `i` of the second, so the weights are
//! two sequential streams prefetched `PREFETCH_AHEAD` bytes ahead, each load
//! of `x` serving both rows; each row's sums are those of the one-row
//! `dot_row`, in the same order.

use std::arch::x86_64::*;

use super::{tail_dot, FloatDtype, FloatWeight};
use crate::cpu::token::Avx2Token;
use crate::cpu::PREFETCH_AHEAD;

pub(super) fn gemv_rows<T: FloatWeight>(_token: Avx2Token, bytes: &[u8], x: &[f32], out: &mut [f32]) {
    // SAFETY (all three calls): an `Avx2Token` exists only after run-time
    // detection of AVX2, FMA and F16C, the features these functions enable.
    match T::DTYPE {
        FloatDtype::F16 => unsafe { f16_weights::gemv_rows(bytes, x, out) },
        FloatDtype::Bf16 => unsafe { bf16_weights::gemv_rows(bytes, x, out) },
        FloatDtype::F32 => unsafe { f32_weights::gemv_rows(bytes, x, out) },
    }
}

pub(super) fn convert<T: FloatWeight>(_token: Avx2Token, src: &[u8], out: &mut [f32]) {
    // SAFETY (all three calls): an `Avx2Token` exists only after run-time
    // detection of AVX2, FMA and F16C, the features these functions enable.
    match T::DTYPE {
        FloatDtype::F16 => unsafe { f16_weights::convert(src, out) },
        FloatDtype::Bf16 => unsafe { bf16_weights::convert(src, out) },
        FloatDtype::F32 => unsafe { f32_weights::convert(src, out) },
    }
}

/// GEMV and conversion for one weight type, given how to load eight of them
/// (`$chunk_bytes` bytes) as a `__m256`.
macro_rules! gemv_for_dtype {
    ($module:ident, $dtype:ty, $chunk_bytes:literal, $load:ident) => {
        mod $module {
            use super::*;

            const CHUNK_BYTES: usize = $chunk_bytes;

            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) fn gemv_rows(bytes: &[u8], x: &[f32], out: &mut [f32]) {
                let row_bytes = x.len() * <$dtype as FloatWeight>::SIZE;
                if row_bytes == 0 {
                    out.fill(0.0);
                    return;
                }
                // Row i of the first half with row i of the second: two
                // sequential streams per thread (docs/perf/cpu.md, session 14).
                super::super::two_streams(bytes, row_bytes, out, |r| dot_row(r, x), |ra, rb| dot_rows2(ra, rb, x));
            }

            /// [`dot_row`] of two rows at once (each with its own two
            /// accumulators, in the same order), sharing the loads of `x`.
            #[target_feature(enable = "avx2,fma,f16c")]
            fn dot_rows2(ra: &[u8], rb: &[u8], x: &[f32]) -> (f32, f32) {
                let (x_chunks, _) = x.as_chunks::<8>();
                let n_chunks = x_chunks.len();
                let a_chunks = &ra.as_chunks::<CHUNK_BYTES>().0[..n_chunks];
                let b_chunks = &rb.as_chunks::<CHUNK_BYTES>().0[..n_chunks];
                let mut acc_a = [_mm256_setzero_ps(); 2];
                let mut acc_b = [_mm256_setzero_ps(); 2];
                let mut c = 0;
                while c + 2 <= n_chunks {
                    prefetch(ra.as_ptr(), PREFETCH_AHEAD + c * CHUNK_BYTES);
                    prefetch(rb.as_ptr(), PREFETCH_AHEAD + c * CHUNK_BYTES);
                    let (x0, x1) = (load_f32x8(&x_chunks[c]), load_f32x8(&x_chunks[c + 1]));
                    acc_a[0] = _mm256_fmadd_ps($load(&a_chunks[c]), x0, acc_a[0]);
                    acc_b[0] = _mm256_fmadd_ps($load(&b_chunks[c]), x0, acc_b[0]);
                    acc_a[1] = _mm256_fmadd_ps($load(&a_chunks[c + 1]), x1, acc_a[1]);
                    acc_b[1] = _mm256_fmadd_ps($load(&b_chunks[c + 1]), x1, acc_b[1]);
                    c += 2;
                }
                if c < n_chunks {
                    let x0 = load_f32x8(&x_chunks[c]);
                    acc_a[0] = _mm256_fmadd_ps($load(&a_chunks[c]), x0, acc_a[0]);
                    acc_b[0] = _mm256_fmadd_ps($load(&b_chunks[c]), x0, acc_b[0]);
                }
                (
                    hsum_ps(_mm256_add_ps(acc_a[0], acc_a[1])) + tail_dot::<$dtype>(ra, x, n_chunks * 8),
                    hsum_ps(_mm256_add_ps(acc_b[0], acc_b[1])) + tail_dot::<$dtype>(rb, x, n_chunks * 8),
                )
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            fn dot_row(row: &[u8], x: &[f32]) -> f32 {
                let (x_chunks, _) = x.as_chunks::<8>();
                let n_chunks = x_chunks.len();
                let row_chunks = &row.as_chunks::<CHUNK_BYTES>().0[..n_chunks];
                let mut acc = [_mm256_setzero_ps(); 2];
                let mut c = 0;
                while c + 2 <= n_chunks {
                    // Two chunks span half (f16, bf16) or all (f32) of a cache line.
                    prefetch(row.as_ptr(), PREFETCH_AHEAD + c * CHUNK_BYTES);
                    acc[0] = _mm256_fmadd_ps($load(&row_chunks[c]), load_f32x8(&x_chunks[c]), acc[0]);
                    acc[1] = _mm256_fmadd_ps($load(&row_chunks[c + 1]), load_f32x8(&x_chunks[c + 1]), acc[1]);
                    c += 2;
                }
                if c < n_chunks {
                    acc[0] = _mm256_fmadd_ps($load(&row_chunks[c]), load_f32x8(&x_chunks[c]), acc[0]);
                }
                hsum_ps(_mm256_add_ps(acc[0], acc[1])) + tail_dot::<$dtype>(row, x, n_chunks * 8)
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            pub(super) fn convert(src: &[u8], out: &mut [f32]) {
                let (src_chunks, src_tail) = src.as_chunks::<CHUNK_BYTES>();
                let (out_chunks, out_tail) = out.as_chunks_mut::<8>();
                for (chunk, out) in src_chunks.iter().zip(out_chunks.iter_mut()) {
                    store_f32x8(out, $load(chunk));
                }
                super::super::scalar::convert::<$dtype>(src_tail, out_tail);
            }
        }
    };
}

gemv_for_dtype!(f16_weights, half::f16, 16, load_f16x8);
gemv_for_dtype!(bf16_weights, half::bf16, 16, load_bf16x8);
gemv_for_dtype!(f32_weights, f32, 32, load_le_f32x8);

/// Hints the cache to fetch the line at `base + offset` (`PREFETCH_AHEAD`
/// bytes further along the weights), so DRAM latency overlaps the arithmetic.
/// `wrapping_add` and `prefetcht0` never fault: past the end of the buffer
/// this is a wasted hint, not a read.
#[inline]
#[target_feature(enable = "avx2")]
fn prefetch(base: *const u8, offset: usize) {
    _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(offset).cast());
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
fn load_f16x8(bytes: &[u8; 16]) -> __m256 {
    // SAFETY: `bytes` refers to 16 readable bytes and `vmovdqu` has no alignment requirement.
    let raw = unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) };
    _mm256_cvtph_ps(raw)
}

#[inline]
#[target_feature(enable = "avx2")]
fn load_bf16x8(bytes: &[u8; 16]) -> __m256 {
    // SAFETY: `bytes` refers to 16 readable bytes and `vmovdqu` has no alignment requirement.
    let raw = unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
}

#[inline]
#[target_feature(enable = "avx2")]
fn load_le_f32x8(bytes: &[u8; 32]) -> __m256 {
    // SAFETY: `bytes` refers to 32 readable bytes and `vmovups` has no
    // alignment requirement; x86-64 is little endian, so the bytes are the floats.
    unsafe { _mm256_loadu_ps(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn load_f32x8(values: &[f32; 8]) -> __m256 {
    // SAFETY: `values` refers to 8 readable floats and `vmovups` has no alignment requirement.
    unsafe { _mm256_loadu_ps(values.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn store_f32x8(out: &mut [f32; 8], v: __m256) {
    // SAFETY: `out` refers to 8 writable floats, borrowed exclusively, and
    // `vmovups` has no alignment requirement.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) }
}

#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}
