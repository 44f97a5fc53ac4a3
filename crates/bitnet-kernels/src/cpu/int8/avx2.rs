//! AVX2 int8 x int8 kernel: 16 weights per step sign-extended to `i16`
//! (`vpmovsxbw`) and multiplied with the equally widened activations by
//! `vpmaddwd` into `i32` lanes. Pairs of products reach at most
//! `2 * 128 * 128 = 32768`, which `i32` holds; `vpmaddubsw` would saturate it.
//!
//! Rows go one after another, so the weights are one sequential stream
//! prefetched `PREFETCH_AHEAD` bytes ahead.

use std::arch::x86_64::*;

use super::tail_dot;
use crate::cpu::token::Avx2Token;
use crate::cpu::PREFETCH_AHEAD;

/// Values per step.
const LANES: usize = 16;

pub(super) fn gemv_rows(_token: Avx2Token, values: &[i8], q: &[i8], out: &mut [i32]) {
    // SAFETY: an `Avx2Token` exists only after run-time detection of AVX2,
    // FMA and F16C, the features `gemv_rows_impl` enables.
    unsafe { gemv_rows_impl(values, q, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn gemv_rows_impl(values: &[i8], q: &[i8], out: &mut [i32]) {
    for (row, value) in values.chunks_exact(q.len()).zip(out.iter_mut()) {
        *value = dot_row(row, q);
    }
}

/// One row (`q.len()` long) dotted with `q`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_row(row: &[i8], q: &[i8]) -> i32 {
    let (q_chunks, _) = q.as_chunks::<LANES>();
    let row_chunks = row.as_chunks::<LANES>().0;
    let mut acc = _mm256_setzero_si256();
    for (c, (q_chunk, w_chunk)) in q_chunks.iter().zip(row_chunks).enumerate() {
        if c % 4 == 0 {
            prefetch(row.as_ptr(), PREFETCH_AHEAD + c * LANES);
        }
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(widen(w_chunk), widen(q_chunk)));
    }
    hsum_epi32(acc).wrapping_add(tail_dot(row, q, q_chunks.len() * LANES))
}

/// Sixteen `i8` sign-extended to sixteen `i16`.
#[inline]
#[target_feature(enable = "avx2")]
fn widen(values: &[i8; LANES]) -> __m256i {
    // SAFETY: `values` refers to 16 readable bytes and `vmovdqu` has no alignment requirement.
    let bytes = unsafe { _mm_loadu_si128(values.as_ptr().cast()) };
    _mm256_cvtepi8_epi16(bytes)
}

#[inline]
#[target_feature(enable = "avx2")]
fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Hints the cache to fetch the line at `base + offset` (`PREFETCH_AHEAD`
/// bytes further along the weights), so DRAM latency overlaps the arithmetic.
/// `wrapping_add` and `prefetcht0` never fault: past the end of the buffer
/// this is a wasted hint, not a read.
#[inline]
#[target_feature(enable = "avx2")]
fn prefetch(base: *const i8, offset: usize) {
    _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(offset));
}
