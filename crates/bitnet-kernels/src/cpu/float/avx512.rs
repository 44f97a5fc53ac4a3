//! AVX-512 float GEMV: sixteen weights per step (`vcvtph2ps zmm` for f16),
//! two accumulators per row. The output head is memory bound: a call's rows
//! are taken two at a time, row `i` of the first half with row `i` of the
//! second, so the weights are two sequential streams prefetched
//! `PREFETCH_AHEAD` bytes ahead, each load of `x` serving both rows. Each
//! row's sums are those of the one-row `dot_row`, in the same order.

use std::arch::x86_64::*;

use super::{tail_dot, FloatDtype, FloatWeight};
use crate::cpu::token::Avx512Token;
use crate::cpu::PREFETCH_AHEAD;

pub(super) fn gemv_rows<T: FloatWeight>(_token: Avx512Token, bytes: &[u8], x: &[f32], out: &mut [f32]) {
    // SAFETY (all three calls): an `Avx512Token` exists only after run-time
    // detection of AVX-512 F/BW/VL/VNNI, a superset of the features these functions enable.
    match T::DTYPE {
        FloatDtype::F16 => unsafe { f16_weights::gemv_rows(bytes, x, out) },
        FloatDtype::Bf16 => unsafe { bf16_weights::gemv_rows(bytes, x, out) },
        FloatDtype::F32 => unsafe { f32_weights::gemv_rows(bytes, x, out) },
    }
}

/// GEMV for one weight type, given how to load sixteen of them
/// (`$chunk_bytes` bytes) as a `__m512`.
macro_rules! gemv_for_dtype {
    ($module:ident, $dtype:ty, $chunk_bytes:literal, $load:ident) => {
        mod $module {
            use super::*;

            const CHUNK_BYTES: usize = $chunk_bytes;

            #[target_feature(enable = "avx512f,avx512bw")]
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
            #[target_feature(enable = "avx512f,avx512bw")]
            fn dot_rows2(ra: &[u8], rb: &[u8], x: &[f32]) -> (f32, f32) {
                let (x_chunks, _) = x.as_chunks::<16>();
                let n_chunks = x_chunks.len();
                let a_chunks = &ra.as_chunks::<CHUNK_BYTES>().0[..n_chunks];
                let b_chunks = &rb.as_chunks::<CHUNK_BYTES>().0[..n_chunks];
                let mut acc_a = [_mm512_setzero_ps(); 2];
                let mut acc_b = [_mm512_setzero_ps(); 2];
                let mut c = 0;
                while c + 2 <= n_chunks {
                    prefetch(ra.as_ptr(), PREFETCH_AHEAD + c * CHUNK_BYTES);
                    prefetch(rb.as_ptr(), PREFETCH_AHEAD + c * CHUNK_BYTES);
                    if CHUNK_BYTES == 64 {
                        prefetch(ra.as_ptr(), PREFETCH_AHEAD + (c + 1) * CHUNK_BYTES);
                        prefetch(rb.as_ptr(), PREFETCH_AHEAD + (c + 1) * CHUNK_BYTES);
                    }
                    let (x0, x1) = (load_f32x16(&x_chunks[c]), load_f32x16(&x_chunks[c + 1]));
                    acc_a[0] = _mm512_fmadd_ps($load(&a_chunks[c]), x0, acc_a[0]);
                    acc_b[0] = _mm512_fmadd_ps($load(&b_chunks[c]), x0, acc_b[0]);
                    acc_a[1] = _mm512_fmadd_ps($load(&a_chunks[c + 1]), x1, acc_a[1]);
                    acc_b[1] = _mm512_fmadd_ps($load(&b_chunks[c + 1]), x1, acc_b[1]);
                    c += 2;
                }
                if c < n_chunks {
                    let x0 = load_f32x16(&x_chunks[c]);
                    acc_a[0] = _mm512_fmadd_ps($load(&a_chunks[c]), x0, acc_a[0]);
                    acc_b[0] = _mm512_fmadd_ps($load(&b_chunks[c]), x0, acc_b[0]);
                }
                (
                    _mm512_reduce_add_ps(_mm512_add_ps(acc_a[0], acc_a[1])) + tail_dot::<$dtype>(ra, x, n_chunks * 16),
                    _mm512_reduce_add_ps(_mm512_add_ps(acc_b[0], acc_b[1])) + tail_dot::<$dtype>(rb, x, n_chunks * 16),
                )
            }

            #[target_feature(enable = "avx512f,avx512bw")]
            fn dot_row(row: &[u8], x: &[f32]) -> f32 {
                let (x_chunks, _) = x.as_chunks::<16>();
                let n_chunks = x_chunks.len();
                let row_chunks = &row.as_chunks::<CHUNK_BYTES>().0[..n_chunks];
                let mut acc = [_mm512_setzero_ps(); 2];
                let mut c = 0;
                while c + 2 <= n_chunks {
                    // Two chunks span one (f16, bf16) or two (f32) cache lines.
                    prefetch(row.as_ptr(), PREFETCH_AHEAD + c * CHUNK_BYTES);
                    if CHUNK_BYTES == 64 {
                        prefetch(row.as_ptr(), PREFETCH_AHEAD + (c + 1) * CHUNK_BYTES);
                    }
                    acc[0] = _mm512_fmadd_ps($load(&row_chunks[c]), load_f32x16(&x_chunks[c]), acc[0]);
                    acc[1] = _mm512_fmadd_ps($load(&row_chunks[c + 1]), load_f32x16(&x_chunks[c + 1]), acc[1]);
                    c += 2;
                }
                if c < n_chunks {
                    acc[0] = _mm512_fmadd_ps($load(&row_chunks[c]), load_f32x16(&x_chunks[c]), acc[0]);
                }
                _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + tail_dot::<$dtype>(row, x, n_chunks * 16)
            }
        }
    };
}

gemv_for_dtype!(f16_weights, half::f16, 32, load_f16x16);
gemv_for_dtype!(bf16_weights, half::bf16, 32, load_bf16x16);
gemv_for_dtype!(f32_weights, f32, 64, load_le_f32x16);

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
#[target_feature(enable = "avx512f")]
fn load_f16x16(bytes: &[u8; 32]) -> __m512 {
    // SAFETY: `bytes` refers to 32 readable bytes and `vmovdqu` has no alignment requirement.
    let raw = unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) };
    _mm512_cvtph_ps(raw)
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load_bf16x16(bytes: &[u8; 32]) -> __m512 {
    // SAFETY: `bytes` refers to 32 readable bytes and `vmovdqu` has no alignment requirement.
    let raw = unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) };
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load_le_f32x16(bytes: &[u8; 64]) -> __m512 {
    // SAFETY: `bytes` refers to 64 readable bytes and `vmovups` has no
    // alignment requirement; x86-64 is little endian, so the bytes are the floats.
    unsafe { _mm512_loadu_ps(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load_f32x16(values: &[f32; 16]) -> __m512 {
    // SAFETY: `values` refers to 16 readable floats and `vmovups` has no alignment requirement.
    unsafe { _mm512_loadu_ps(values.as_ptr()) }
}
