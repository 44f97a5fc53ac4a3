//! AVX-512 VNNI int8 x int8 kernel: 64 weights per `zmm` load, flipped to
//! unsigned `w + 128` with one XOR of the sign bit, multiplied with the
//! signed activations by `vpdpbusd`; the offset adds `128 * sum(q)`, which is
//! subtracted once per row. All `i32` arithmetic wraps, so the result is
//! exact whenever the true dot product fits an `i32` (see `I8_MAX_K`).
//!
//! Rows go in groups of [`ROWS`], so each activation load is reused four
//! times; elements past the last multiple of 64 go through the scalar tail.

use std::arch::x86_64::*;

use super::tail_dot;
use crate::cpu::token::Avx512Token;

/// Rows sharing each activation load.
const ROWS: usize = 4;

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
    let mut row_groups = values.chunks_exact(ROWS * k);
    let mut out_groups = out.chunks_exact_mut(ROWS);
    for (rows, out) in (&mut row_groups).zip(&mut out_groups) {
        let rows: [&[i8]; ROWS] = std::array::from_fn(|r| &rows[r * k..(r + 1) * k]);
        out.copy_from_slice(&dot_rows::<ROWS>(rows, q, offset));
    }
    for (row, value) in row_groups.remainder().chunks_exact(k).zip(out_groups.into_remainder()) {
        *value = dot_rows::<1>([row], q, offset)[0];
    }
}

/// `R` rows (each `q.len()` long) dotted with `q`; `offset` is `128 * sum(q)`
/// over the whole 64-value chunks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
// Rows index parallel arrays (chunks, accumulators).
#[allow(clippy::needless_range_loop)]
fn dot_rows<const R: usize>(rows: [&[i8]; R], q: &[i8], offset: i32) -> [i32; R] {
    let (q_chunks, _) = q.as_chunks::<LANES>();
    let row_chunks: [&[[i8; LANES]]; R] = std::array::from_fn(|r| rows[r].as_chunks::<LANES>().0);
    let sign = _mm512_set1_epi8(i8::MIN);
    let mut acc = [_mm512_setzero_si512(); R];
    for (c, q_chunk) in q_chunks.iter().enumerate() {
        let qv = load(q_chunk);
        for r in 0..R {
            prefetch(rows[r].as_ptr(), R * rows[r].len() + c * LANES);
            // `w ^ 0x80` read as unsigned is `w + 128`.
            let unsigned = _mm512_xor_si512(load(&row_chunks[r][c]), sign);
            acc[r] = _mm512_dpbusd_epi32(acc[r], unsigned, qv);
        }
    }
    let vector_end = q_chunks.len() * LANES;
    std::array::from_fn(|r| {
        _mm512_reduce_add_epi32(acc[r]).wrapping_sub(offset).wrapping_add(tail_dot(rows[r], q, vector_end))
    })
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load(values: &[i8; LANES]) -> __m512i {
    // SAFETY: `values` refers to 64 readable bytes and `vmovdqu64` has no alignment requirement.
    unsafe { _mm512_loadu_si512(values.as_ptr().cast()) }
}

/// Hints the cache to fetch the line at `base + offset` (the same position in
/// the rows of the next group), so DRAM latency overlaps the arithmetic.
/// `wrapping_add` and `prefetcht0` never fault: past the end of the buffer
/// this is a wasted hint, not a read.
#[inline]
#[target_feature(enable = "avx2")]
fn prefetch(base: *const i8, offset: usize) {
    _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(offset));
}
