//! AVX2 + FMA element-wise kernels. Only `sum_squares_f64` (summation order)
//! and `softmax_with_max` (a Cephes-style `exp`, within 2 ulp) differ from the
//! scalar references; the rest are the same operations in the same order.

use std::arch::x86_64::*;

use super::{scalar, KvElement};
use crate::cpu::token::Avx2Token;
use crate::cpu::PREFETCH_AHEAD;

// SAFETY (every wrapper below): an `Avx2Token` exists only after run-time
// detection of AVX2, FMA and F16C, the features each `*_impl` enables.

pub(super) fn sum_squares_f64(_token: Avx2Token, x: &[f32]) -> f64 {
    // SAFETY: see the note above the wrappers.
    unsafe { sum_squares_f64_impl(x) }
}

pub(super) fn scale_mul(_token: Avx2Token, x: &[f32], inv: f64, weight: &[f32], out: &mut [f32]) {
    // SAFETY: see the note above the wrappers.
    unsafe { scale_mul_impl(x, inv, weight, out) }
}

pub(super) fn softmax_with_max(_token: Avx2Token, x: &mut [f32], max: f32) {
    // SAFETY: see the note above the wrappers.
    unsafe { softmax_with_max_impl(x, max) }
}

pub(super) fn relu2_mul(_token: Avx2Token, gate: &mut [f32], up: &[f32]) {
    // SAFETY: see the note above the wrappers.
    unsafe { relu2_mul_impl(gate, up) }
}

pub(super) fn rotate(_token: Avx2Token, first: &mut [f32], second: &mut [f32], cos: &[f32], sin: &[f32]) {
    // SAFETY: see the note above the wrappers.
    unsafe { rotate_impl(first, second, cos, sin) }
}

pub(super) fn sum_u64(_token: Avx2Token, words: &[u64]) -> u64 {
    // SAFETY: see the note above the wrappers.
    unsafe { sum_u64_impl(words) }
}

pub(super) fn sum_u64_pair(_token: Avx2Token, a: &[u64], b: &[u64]) -> u64 {
    // SAFETY: see the note above the wrappers.
    unsafe { sum_u64_pair_impl(a, b) }
}

pub(super) fn abs_max(_token: Avx2Token, x: &[f32]) -> f32 {
    // SAFETY: see the note above the wrappers.
    unsafe { abs_max_impl(x) }
}

pub(super) fn dot_rows<T: KvElement>(
    _token: Avx2Token,
    q: &[f32],
    rows: &[T],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    // SAFETY: see the note above the wrappers.
    unsafe { dot_rows_impl(q, rows, stride, scale, out) }
}

pub(super) fn weighted_rows<T: KvElement>(
    _token: Avx2Token,
    weights: &[f32],
    rows: &[T],
    stride: usize,
    out: &mut [f32],
) {
    // SAFETY: see the note above the wrappers.
    unsafe { weighted_rows_impl(weights, rows, stride, out) }
}

/// [`dot_rows`] for 2 or 4 query heads sharing the rows (lengths checked by
/// the caller: `q` and `out` hold `heads` equal runs); `false`, with nothing
/// written, for any other number of heads.
pub(super) fn dot_rows_heads<T: KvElement>(
    _token: Avx2Token,
    q: &[f32],
    heads: usize,
    rows: &[T],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) -> bool {
    // SAFETY (both calls): see the note above the wrappers.
    match heads {
        2 => unsafe { dot_rows_heads_impl::<T, 2, 4>(q, rows, stride, scale, out) },
        4 => unsafe { dot_rows_heads_impl::<T, 4, 2>(q, rows, stride, scale, out) },
        _ => return false,
    }
    true
}

/// [`weighted_rows`] for 2 or 4 query heads sharing the rows (lengths
/// checked by the caller: `weights` and `out` hold `heads` equal runs);
/// `false`, with nothing written, for any other number of heads.
pub(super) fn weighted_rows_heads<T: KvElement>(
    _token: Avx2Token,
    weights: &[f32],
    heads: usize,
    rows: &[T],
    stride: usize,
    out: &mut [f32],
) -> bool {
    // SAFETY (both calls): see the note above the wrappers.
    match heads {
        2 => unsafe { weighted_rows_heads_impl::<T, 2, 4>(weights, rows, stride, out) },
        4 => unsafe { weighted_rows_heads_impl::<T, 4, 2>(weights, rows, stride, out) },
        _ => return false,
    }
    true
}

pub(super) fn quantize(_token: Avx2Token, x: &[f32], scale: f32, out: &mut [i8]) {
    // SAFETY: see the note above the wrappers.
    unsafe { quantize_impl(x, scale, out) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn load(values: &[f32; 8]) -> __m256 {
    // SAFETY: `values` refers to 8 readable floats; `vmovups` has no alignment requirement.
    unsafe { _mm256_loadu_ps(values.as_ptr()) }
}

/// Eight cache elements as f32 lanes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn load_kv<T: KvElement>(values: &[T; 8]) -> __m256 {
    // SAFETY: AVX and F16C are enabled here (and an `Avx2Token` proved them).
    unsafe { T::load8(values) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn store(out: &mut [f32; 8], v: __m256) {
    // SAFETY: `out` refers to 8 writable floats borrowed exclusively; `vmovups` has no alignment requirement.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) }
}

#[target_feature(enable = "avx2,fma")]
fn sum_squares_f64_impl(x: &[f32]) -> f64 {
    let (chunks, tail) = x.as_chunks::<8>();
    let mut acc = [_mm256_setzero_pd(); 2];
    for chunk in chunks {
        let v = load(chunk);
        let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
        acc[0] = _mm256_fmadd_pd(lo, lo, acc[0]);
        acc[1] = _mm256_fmadd_pd(hi, hi, acc[1]);
    }
    let sum = _mm256_add_pd(acc[0], acc[1]);
    let pair = _mm_add_pd(_mm256_castpd256_pd128(sum), _mm256_extractf128_pd::<1>(sum));
    let total = _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
    total + scalar::sum_squares_f64(tail)
}

#[target_feature(enable = "avx2,fma")]
fn scale_mul_impl(x: &[f32], inv: f64, weight: &[f32], out: &mut [f32]) {
    let (x_chunks, x_tail) = x.as_chunks::<8>();
    let (w_chunks, w_tail) = weight.as_chunks::<8>();
    let (out_chunks, out_tail) = out.as_chunks_mut::<8>();
    let inv_v = _mm256_set1_pd(inv);
    for ((xs, ws), os) in x_chunks.iter().zip(w_chunks).zip(out_chunks.iter_mut()) {
        let v = load(xs);
        // (x * inv) in f64, rounded once to f32, then times the weight in f32: as the scalar code.
        let lo = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), inv_v));
        let hi = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)), inv_v));
        let scaled = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(lo), hi);
        store(os, _mm256_mul_ps(scaled, load(ws)));
    }
    scalar::scale_mul(x_tail, inv, w_tail, out_tail);
}

/// `exp(x)` for `x <= 0` (softmax arguments), Cephes' `expf` polynomial:
/// `x = n ln2 + r`, `|r| <= ln2 / 2`, `exp(r)` by a degree-7 polynomial,
/// times `2^n` built in the exponent field. Results below `exp(-87.3)` (and
/// `exp(-inf)`) are 0; the scalar `expf` gives subnormals there, a difference
/// below 1.2e-38.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp_nonpositive(x: __m256) -> __m256 {
    let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.3));
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_2e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
    let r2 = _mm256_mul_ps(r, r);
    let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    // n is in [-126, 0]: 2^n is a normal float.
    let pow2n =
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
    _mm256_andnot_ps(underflow, _mm256_mul_ps(y, pow2n))
}

#[target_feature(enable = "avx2,fma")]
fn softmax_with_max_impl(x: &mut [f32], max: f32) {
    let max_v = _mm256_set1_ps(max);
    let mut sum = [_mm256_setzero_pd(); 2];
    let (chunks, tail) = x.as_chunks_mut::<8>();
    for chunk in chunks.iter_mut() {
        let e = exp_nonpositive(_mm256_sub_ps(load(chunk), max_v));
        store(chunk, e);
        sum[0] = _mm256_add_pd(sum[0], _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        sum[1] = _mm256_add_pd(sum[1], _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
    }
    let mut lanes = [0.0f64; 4];
    // SAFETY: `lanes` is 4 writable f64s; `vmovupd` has no alignment requirement.
    unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), _mm256_add_pd(sum[0], sum[1])) };
    let mut total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    for v in tail.iter_mut() {
        *v = (*v - max).exp();
        total += f64::from(*v);
    }
    let total_v = _mm256_set1_pd(total);
    for chunk in chunks.iter_mut() {
        let v = load(chunk);
        // (v / total) in f64, rounded once to f32: as the scalar code.
        let lo = _mm256_cvtpd_ps(_mm256_div_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), total_v));
        let hi = _mm256_cvtpd_ps(_mm256_div_pd(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)), total_v));
        store(chunk, _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(lo), hi));
    }
    for v in tail.iter_mut() {
        *v = (f64::from(*v) / total) as f32;
    }
}

#[target_feature(enable = "avx2,fma")]
fn relu2_mul_impl(gate: &mut [f32], up: &[f32]) {
    let (g_chunks, g_tail) = gate.as_chunks_mut::<8>();
    let (u_chunks, u_tail) = up.as_chunks::<8>();
    for (g, u) in g_chunks.iter_mut().zip(u_chunks) {
        // `vmaxps` returns its second operand (0) when the first is NaN, as `f32::max(NaN, 0)` does.
        let r = _mm256_max_ps(load(g), _mm256_setzero_ps());
        store(g, _mm256_mul_ps(_mm256_mul_ps(r, r), load(u)));
    }
    scalar::relu2_mul(g_tail, u_tail);
}

#[target_feature(enable = "avx2,fma")]
fn rotate_impl(first: &mut [f32], second: &mut [f32], cos: &[f32], sin: &[f32]) {
    let (a_chunks, a_tail) = first.as_chunks_mut::<8>();
    let (b_chunks, b_tail) = second.as_chunks_mut::<8>();
    let (c_chunks, c_tail) = cos.as_chunks::<8>();
    let (s_chunks, s_tail) = sin.as_chunks::<8>();
    for (((a, b), c), s) in a_chunks.iter_mut().zip(b_chunks.iter_mut()).zip(c_chunks).zip(s_chunks) {
        let (x0, x1, cv, sv) = (load(a), load(b), load(c), load(s));
        // Separate multiplies and adds (no FMA): bit-identical to the scalar code.
        store(a, _mm256_sub_ps(_mm256_mul_ps(x0, cv), _mm256_mul_ps(x1, sv)));
        store(b, _mm256_add_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x0, sv)));
    }
    scalar::rotate(a_tail, b_tail, c_tail, s_tail);
}

#[target_feature(enable = "avx2,fma")]
fn abs_max_impl(x: &[f32]) -> f32 {
    let (chunks, tail) = x.as_chunks::<8>();
    let mask = _mm256_set1_epi32(0x7fff_ffff);
    let mut acc = _mm256_setzero_si256();
    for chunk in chunks {
        // Unsigned maximum of sign-cleared bit patterns (see `scalar::abs_max`).
        acc = _mm256_max_epu32(acc, _mm256_and_si256(_mm256_castps_si256(load(chunk)), mask));
    }
    let s = _mm_max_epu32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256::<1>(acc));
    let s = _mm_max_epu32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_max_epu32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    let lanes_max = _mm_cvtsi128_si32(s) as u32;
    f32::from_bits(lanes_max.max(scalar::abs_max(tail).to_bits()))
}

#[target_feature(enable = "avx2,fma")]
fn quantize_impl(x: &[f32], scale: f32, out: &mut [i8]) {
    let (x_chunks, x_tail) = x.as_chunks::<32>();
    let (out_chunks, out_tail) = out.as_chunks_mut::<32>();
    let scale_v = _mm256_set1_ps(scale);
    let lo = _mm256_set1_ps(-128.0);
    let hi = _mm256_set1_ps(127.0);
    // `packs` interleaves 128-bit lanes; this puts the 32-bit groups back in order.
    let unshuffle = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (xs, qs) in x_chunks.iter().zip(out_chunks.iter_mut()) {
        let (parts, _) = xs.as_chunks::<8>();
        let mut ints = [_mm256_setzero_si256(); 4];
        for (int, part) in ints.iter_mut().zip(parts) {
            let y = _mm256_mul_ps(load(part), scale_v);
            let rounded = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
            *int = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(rounded, lo), hi));
        }
        let words01 = _mm256_packs_epi32(ints[0], ints[1]);
        let words23 = _mm256_packs_epi32(ints[2], ints[3]);
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words01, words23), unshuffle);
        // SAFETY: `qs` refers to 32 writable bytes borrowed exclusively; `vmovdqu` has no alignment requirement.
        unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), bytes) };
    }
    scalar::quantize(x_tail, scale, out_tail);
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_impl<T: KvElement>(a: &[f32], b: &[T]) -> f32 {
    let (a_chunks, a_tail) = a.as_chunks::<8>();
    let (b_chunks, b_tail) = b.as_chunks::<8>();
    // One chain of fused multiply-adds, as each position of the grouped
    // kernels (`dot_rows_impl`, `dot_rows_heads_impl`): a key's score is the
    // same bits whichever positions it is scored with, so attention may cut
    // the positions anywhere (the CPU backend's split decode attention).
    let mut acc = _mm256_setzero_ps();
    for (x, y) in a_chunks.iter().zip(b_chunks) {
        acc = _mm256_fmadd_ps(load_kv(y), load(x), acc);
    }
    let tail_len = a_tail.len().min(b_tail.len());
    hsum(acc) + scalar::dot(&a_tail[..tail_len], &b_tail[..tail_len])
}

#[inline]
#[target_feature(enable = "avx2")]
fn hsum(v: __m256) -> f32 {
    let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
}

/// Positions scored together, sharing each load of `q`.
const SCORED_ROWS: usize = 4;

/// `out[p] = dot(q, row p) * scale`, rows `stride` apart (checked by the
/// caller): four positions at a time, one accumulator each (four
/// independent chains), so each load of `q` serves four keys.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_rows_impl<T: KvElement>(q: &[f32], rows: &[T], stride: usize, scale: f32, out: &mut [f32]) {
    let len = q.len();
    let (q_chunks, q_tail) = q.as_chunks::<8>();
    let vector_len = q_chunks.len() * 8;
    let mut blocks = out.chunks_exact_mut(SCORED_ROWS);
    let mut first = 0;
    for block in &mut blocks {
        let keys: [&[T]; SCORED_ROWS] = std::array::from_fn(|i| &rows[(first + i) * stride..][..len]);
        let key_chunks: [&[[T; 8]]; SCORED_ROWS] =
            std::array::from_fn(|i| &keys[i].as_chunks::<8>().0[..q_chunks.len()]);
        let mut acc = [_mm256_setzero_ps(); SCORED_ROWS];
        for (c, q_chunk) in q_chunks.iter().enumerate() {
            let qv = load(q_chunk);
            for (a, key) in acc.iter_mut().zip(&key_chunks) {
                *a = _mm256_fmadd_ps(load_kv(&key[c]), qv, *a);
            }
        }
        for ((o, a), key) in block.iter_mut().zip(acc).zip(keys) {
            *o = (hsum(a) + scalar::dot(q_tail, &key[vector_len..])) * scale;
        }
        first += SCORED_ROWS;
    }
    for (i, o) in blocks.into_remainder().iter_mut().enumerate() {
        *o = dot_impl(q, &rows[(first + i) * stride..][..len]) * scale;
    }
}

/// Output floats kept in registers per pass over the positions: 8 `ymm`.
const WEIGHTED_BLOCK: usize = 64;

/// `out = sum_p weights[p] * row p`, rows `stride` apart (checked by the
/// caller). Each block of 64 outputs stays in registers while every position
/// is added in order, with a multiply and then an add (no FMA): per element
/// the same operations in the same order as the scalar reference, so the
/// same bits.
#[target_feature(enable = "avx2,f16c")]
fn weighted_rows_impl<T: KvElement>(weights: &[f32], rows: &[T], stride: usize, out: &mut [f32]) {
    let (blocks, rest) = out.as_chunks_mut::<WEIGHTED_BLOCK>();
    for (b, block) in blocks.iter_mut().enumerate() {
        let mut acc = [_mm256_setzero_ps(); WEIGHTED_BLOCK / 8];
        for (p, &w) in weights.iter().enumerate() {
            let values: &[T; WEIGHTED_BLOCK] =
                rows[p * stride + b * WEIGHTED_BLOCK..][..WEIGHTED_BLOCK].try_into().expect("a block of values");
            let wv = _mm256_set1_ps(w);
            for (a, v) in acc.iter_mut().zip(values.as_chunks::<8>().0) {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(wv, load_kv(v)));
            }
        }
        for (o, a) in block.as_chunks_mut::<8>().0.iter_mut().zip(acc) {
            store(o, a);
        }
    }
    // The last partial block, one element at a time in the same order.
    let first = blocks.len() * WEIGHTED_BLOCK;
    for (i, o) in rest.iter_mut().enumerate() {
        *o = weights.iter().enumerate().fold(0.0f32, |s, (p, &w)| s + w * rows[p * stride + first + i].to_f32());
    }
}

#[target_feature(enable = "avx2")]
fn sum_u64_impl(words: &[u64]) -> u64 {
    let (steps, tail) = words.as_chunks::<16>();
    let mut acc = [_mm256_setzero_si256(); 4];
    for step in steps {
        let base = step.as_ptr().cast::<i8>();
        // `wrapping_add` and `prefetcht0` never fault: past the end of the
        // buffer this is a wasted hint, not a read.
        _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PREFETCH_AHEAD));
        _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PREFETCH_AHEAD + 64));
        for (a, quad) in acc.iter_mut().zip(step.as_chunks::<4>().0) {
            // SAFETY: `quad` refers to 32 readable bytes and `vmovdqu` has no alignment requirement.
            *a = _mm256_add_epi64(*a, unsafe { _mm256_loadu_si256(quad.as_ptr().cast()) });
        }
    }
    let total = _mm256_add_epi64(_mm256_add_epi64(acc[0], acc[1]), _mm256_add_epi64(acc[2], acc[3]));
    let mut lanes = [0u64; 4];
    // SAFETY: `lanes` is 32 writable bytes borrowed exclusively; `vmovdqu` has no alignment requirement.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), total) };
    lanes.iter().chain(tail).fold(0u64, |acc, &w| acc.wrapping_add(w))
}

/// [`sum_u64_impl`] over two slices in lockstep: two sequential streams,
/// 128 bytes of each per step, both prefetched; the longer one's rest and
/// the tails after.
#[target_feature(enable = "avx2")]
fn sum_u64_pair_impl(a: &[u64], b: &[u64]) -> u64 {
    let n = a.len().min(b.len()) / 16 * 16;
    let (a_steps, b_steps) = (a[..n].as_chunks::<16>().0, b[..n].as_chunks::<16>().0);
    let mut acc = [_mm256_setzero_si256(); 4];
    for (sa, sb) in a_steps.iter().zip(b_steps) {
        for base in [sa.as_ptr().cast::<i8>(), sb.as_ptr().cast::<i8>()] {
            // `wrapping_add` and `prefetcht0` never fault: past the end of
            // the buffer this is a wasted hint, not a read.
            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PREFETCH_AHEAD));
            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PREFETCH_AHEAD + 64));
        }
        for (step, pair) in [sa, sb].into_iter().zip([[0, 1], [2, 3]]) {
            for (quad, i) in step.as_chunks::<4>().0.iter().zip([pair[0], pair[1], pair[0], pair[1]]) {
                // SAFETY: `quad` refers to 32 readable bytes and `vmovdqu` has no alignment requirement.
                acc[i] = _mm256_add_epi64(acc[i], unsafe { _mm256_loadu_si256(quad.as_ptr().cast()) });
            }
        }
    }
    let total = _mm256_add_epi64(_mm256_add_epi64(acc[0], acc[1]), _mm256_add_epi64(acc[2], acc[3]));
    let mut lanes = [0u64; 4];
    // SAFETY: `lanes` is 32 writable bytes borrowed exclusively; `vmovdqu` has no alignment requirement.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), total) };
    let rest = sum_u64_impl(&a[n..]).wrapping_add(sum_u64_impl(&b[n..]));
    lanes.iter().fold(rest, |acc, &w| acc.wrapping_add(w))
}

/// How many positions ahead the attention kernels hint the KV cache's rows
/// (decode reads a layer's cache cold from DRAM after the weight stream).
const KV_PREFETCH_ROWS: usize = 16;

/// Hints the cache lines of the `len` elements at `rows[start..]` into L1,
/// if `start < end` (the first element past the rows in use). `wrapping_add`
/// and `prefetcht0` never fault and read nothing.
#[inline]
#[target_feature(enable = "avx2")]
fn prefetch_row<T>(rows: &[T], start: usize, len: usize, end: usize) {
    if start < end {
        let base = rows.as_ptr().wrapping_add(start).cast::<i8>();
        for offset in (0..len * std::mem::size_of::<T>()).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(offset));
        }
    }
}

/// `H` heads' scores over the same rows, `P` positions per pass: each load
/// of a key serves `H` queries and each load of a query `P` keys, one
/// accumulator per (head, position). `q` is `H` runs of `len`, `out` `H`
/// runs of `n` scores.
#[target_feature(enable = "avx2,fma,f16c")]
// Heads and positions index parallel arrays (queries, keys, accumulators).
#[allow(clippy::needless_range_loop)]
fn dot_rows_heads_impl<T: KvElement, const H: usize, const P: usize>(
    q: &[f32],
    rows: &[T],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    let (len, n) = (q.len() / H, out.len() / H);
    let n_chunks = len / 8;
    let vector_len = n_chunks * 8;
    let queries: [&[f32]; H] = std::array::from_fn(|h| &q[h * len..(h + 1) * len]);
    let query_chunks: [&[[f32; 8]]; H] = std::array::from_fn(|h| &queries[h].as_chunks::<8>().0[..n_chunks]);
    let mut first = 0;
    while first + P <= n {
        for i in 0..P {
            prefetch_row(rows, (first + i + KV_PREFETCH_ROWS) * stride, len, n * stride);
        }
        let keys: [&[T]; P] = std::array::from_fn(|i| &rows[(first + i) * stride..][..len]);
        let key_chunks: [&[[T; 8]]; P] = std::array::from_fn(|i| &keys[i].as_chunks::<8>().0[..n_chunks]);
        let mut acc = [[_mm256_setzero_ps(); P]; H];
        for c in 0..n_chunks {
            let mut k = [_mm256_setzero_ps(); P];
            for i in 0..P {
                k[i] = load_kv(&key_chunks[i][c]);
            }
            for h in 0..H {
                let qv = load(&query_chunks[h][c]);
                for i in 0..P {
                    acc[h][i] = _mm256_fmadd_ps(k[i], qv, acc[h][i]);
                }
            }
        }
        for h in 0..H {
            for i in 0..P {
                let tail = scalar::dot(&queries[h][vector_len..], &keys[i][vector_len..]);
                out[h * n + first + i] = (hsum(acc[h][i]) + tail) * scale;
            }
        }
        first += P;
    }
    for p in first..n {
        let key = &rows[p * stride..][..len];
        for h in 0..H {
            out[h * n + p] = dot_impl(queries[h], key) * scale;
        }
    }
}

/// `H` heads' weighted sums of the same rows, `8 * B` outputs per head per
/// pass over the positions, kept in registers: each load of a value serves
/// `H` heads. Per element the same multiply-then-add in order of `p` as the
/// scalar reference. `weights` is `H` runs of `n`, `out` `H` runs of `len`.
#[target_feature(enable = "avx2,f16c")]
// Heads and blocks index parallel arrays (weights, values, accumulators).
#[allow(clippy::needless_range_loop)]
fn weighted_rows_heads_impl<T: KvElement, const H: usize, const B: usize>(
    weights: &[f32],
    rows: &[T],
    stride: usize,
    out: &mut [f32],
) {
    let (n, len) = (weights.len() / H, out.len() / H);
    let head_weights: [&[f32]; H] = std::array::from_fn(|h| &weights[h * n..(h + 1) * n]);
    let blocks = len / (8 * B);
    for b in 0..blocks {
        let first = b * 8 * B;
        let mut acc = [[_mm256_setzero_ps(); B]; H];
        for p in 0..n {
            if b == 0 {
                // The first pass brings every position's whole row toward
                // L1/L2 for the passes over the later blocks.
                prefetch_row(rows, (p + KV_PREFETCH_ROWS) * stride, len, n * stride);
            }
            let values = &rows[p * stride + first..][..8 * B].as_chunks::<8>().0;
            let mut v = [_mm256_setzero_ps(); B];
            for j in 0..B {
                v[j] = load_kv(&values[j]);
            }
            for h in 0..H {
                let wv = _mm256_set1_ps(head_weights[h][p]);
                for j in 0..B {
                    // Separate multiply and add (no FMA): bit-identical to the scalar code.
                    acc[h][j] = _mm256_add_ps(acc[h][j], _mm256_mul_ps(wv, v[j]));
                }
            }
        }
        for h in 0..H {
            let head_out = &mut out[h * len + first..][..8 * B];
            for (o, a) in head_out.as_chunks_mut::<8>().0.iter_mut().zip(acc[h]) {
                store(o, a);
            }
        }
    }
    // The elements after the last whole block, one at a time in the same order.
    for h in 0..H {
        for i in blocks * 8 * B..len {
            out[h * len + i] =
                head_weights[h].iter().enumerate().fold(0.0f32, |s, (p, &w)| s + w * rows[p * stride + i].to_f32());
        }
    }
}
