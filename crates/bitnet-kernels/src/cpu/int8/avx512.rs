//! AVX-512 VNNI int8 x int8 kernel: 64 weights per `zmm` load, flipped to
//! unsigned `w + 128` with one XOR of the sign bit, multiplied with the
//! signed activations by `vpdpbusd`; the offset adds `128 * sum(q)`, which is
//! subtracted once per row. All `i32` arithmetic wraps, so the result is
//! exact whenever the true dot product fits an `i32` (see `I8_MAX_K`).
//!
//! Rows go one after another, so the weights are one sequential stream
//! prefetched `PREFETCH_AHEAD` bytes ahead; elements past the last multiple
//! of 64 go through the scalar tail.

use std::arch::x86_64::*;

use super::tail_dot;
use crate::cpu::token::Avx512Token;
use crate::cpu::PREFETCH_AHEAD;

/// Values per `zmm`.
const LANES: usize = 64;

pub(super) fn gemv_rows(_token: Avx512Token, values: &[i8], q: &[i8], out: &mut [i32]) {
    // SAFETY: an `Avx512Token` exists only after run-time detection of
    // AVX-512 F/BW/VL/VNNI (and AVX2/FMA/F16C), the features `gemv_rows_impl` enables.
    unsafe { gemv_rows_impl(values, q, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn gemv_rows_impl(values: &[i8], q: &[i8], out: &mut [i32]) {
    let k = q.len();
    let vector_end = k / LANES * LANES;
    // `128 * sum(q)` over the vectorized part: at most 2^14 * k in magnitude.
    let offset = 128 * q[..vector_end].iter().map(|&v| i32::from(v)).sum::<i32>();
    for (row, value) in values.chunks_exact(k).zip(out.iter_mut()) {
        *value = dot_row(row, q, offset);
    }
}

/// One row (`q.len()` long) dotted with `q`; `offset` is `128 * sum(q)` over
/// the whole 64-value chunks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn dot_row(row: &[i8], q: &[i8], offset: i32) -> i32 {
    let (q_chunks, _) = q.as_chunks::<LANES>();
    let row_chunks = row.as_chunks::<LANES>().0;
    let sign = _mm512_set1_epi8(i8::MIN);
    let mut acc = _mm512_setzero_si512();
    for (c, (q_chunk, w_chunk)) in q_chunks.iter().zip(row_chunks).enumerate() {
        prefetch(row.as_ptr(), PREFETCH_AHEAD + c * LANES);
        // `w ^ 0x80` read as unsigned is `w + 128`.
        let unsigned = _mm512_xor_si512(load(w_chunk), sign);
        acc = _mm512_dpbusd_epi32(acc, unsigned, load(q_chunk));
    }
    _mm512_reduce_add_epi32(acc).wrapping_sub(offset).wrapping_add(tail_dot(row, q, q_chunks.len() * LANES))
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load(values: &[i8; LANES]) -> __m512i {
    // SAFETY: `values` refers to 64 readable bytes and `vmovdqu64` has no alignment requirement.
    unsafe { _mm512_loadu_si512(values.as_ptr().cast()) }
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
