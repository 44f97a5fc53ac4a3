//! AVX-512 VNNI I2_S kernel: two code blocks (256 weights) per `zmm` load,
//! unpacked with 16-bit shifts and a byte mask, multiplied with `vpdpbusd`.
//!
//! A 64-byte load holds blocks `b` and `b + 1`, so shifting out group `g`
//! gives elements `g*32..g*32+32` of both blocks side by side. The
//! activations are interleaved once per call to the same order
//! ([`interleave_activations`]) so that each group is one contiguous 64-byte
//! load. An odd last block is done with the 256-bit form of `vpdpbusd`.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::{token_tiles, Activations, I2S_BLOCK_BYTES, I2S_BLOCK_ELEMS};
use crate::cpu::token::Avx512Token;
use crate::cpu::I2S_PREFETCH_AHEAD;

/// Weights per pair of blocks.
const PAIR_ELEMS: usize = 2 * I2S_BLOCK_ELEMS;

/// Reorders each token's activations so that, for every pair of blocks,
/// group `g` of the first block is followed by group `g` of the second:
/// `[b0 g0, b1 g0, b0 g1, b1 g1, ...]`, 32 values each. An odd last block
/// keeps its order.
/// `parallel`: tokens split over the current pool (the caller marks the
/// rayon work, see `team`).
pub(super) fn interleave_activations(q: &[i8], k: usize, parallel: bool) -> Vec<i8> {
    let mut interleaved = vec![0i8; q.len()];
    if k == 0 {
        return interleaved;
    }
    let one = |(src_token, dst_token): (&[i8], &mut [i8])| {
        let mut src_pairs = src_token.chunks_exact(PAIR_ELEMS);
        let mut dst_pairs = dst_token.chunks_exact_mut(PAIR_ELEMS);
        for (src, dst) in (&mut src_pairs).zip(&mut dst_pairs) {
            for g in 0..4 {
                dst[g * 64..g * 64 + 32].copy_from_slice(&src[g * 32..g * 32 + 32]);
                dst[g * 64 + 32..g * 64 + 64].copy_from_slice(&src[128 + g * 32..128 + g * 32 + 32]);
            }
        }
        dst_pairs.into_remainder().copy_from_slice(src_pairs.remainder());
    };
    if parallel {
        q.par_chunks_exact(k).zip(interleaved.par_chunks_exact_mut(k)).for_each(one);
    } else {
        q.chunks_exact(k).zip(interleaved.chunks_exact_mut(k)).for_each(one);
    }
    interleaved
}

pub(super) fn gemm_rows(_token: Avx512Token, codes: &[u8], acts: &Activations<'_>, out: &mut [&mut [i32]]) {
    // SAFETY: an `Avx512Token` exists only after run-time detection of
    // AVX-512 F/BW/VL/VNNI (and AVX2/FMA/F16C), the features `gemm_rows_impl` enables.
    unsafe { gemm_rows_impl(codes, acts, out) }
}

/// One token tile's view of the inputs; `acts.q` is interleaved.
struct Tile<'a> {
    codes: &'a [u8],
    q: &'a [i8],
    k: usize,
    first: usize,
    sums: &'a [i32],
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn gemm_rows_impl(codes: &[u8], acts: &Activations<'_>, out: &mut [&mut [i32]]) {
    if acts.k == 0 {
        for token_out in out.iter_mut() {
            token_out.fill(0);
        }
        return;
    }
    for (first, len) in token_tiles(acts.n_tokens()) {
        let tile = Tile { codes, q: &acts.q, k: acts.k, first, sums: &acts.sums };
        // (rows, tokens) per tile: 12 to 16 accumulators of the 32 `zmm`
        // registers for batches; for a single token two rows half the
        // chunk apart, so decode reads the weights as two sequential
        // streams (`I2S_PREFETCH_AHEAD`).
        match len {
            4 => run_rows::<2, 4>(&tile, out),
            3 => run_rows::<2, 3>(&tile, out),
            2 => run_rows::<2, 2>(&tile, out),
            _ => run_two_streams(&tile, out),
        }
    }
}

/// One token: row `i` of the first half of the rows with row `i` of the
/// second half ([`two_row_pairs`]), so the thread reads two sequential
/// streams half a block apart, each activation load serving both rows; an
/// odd last row (or a `k` with an odd block count) one row at a time.
/// Measured on the Intel Xeon dev box (docs/perf/cpu.md, session 14): 16
/// gate-sized GEMVs streamed from DRAM at 81-91% of the summing loop
/// against 64-77% for one row at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn run_two_streams(tile: &Tile<'_>, out: &mut [&mut [i32]]) {
    let row_bytes = tile.k / 4;
    let n_rows = tile.codes.len() / row_bytes;
    if n_rows < 2 || !tile.k.is_multiple_of(PAIR_ELEMS) {
        run_rows::<1, 1>(tile, out);
        return;
    }
    let half = n_rows / 2;
    let q = tile.q[tile.first * tile.k..(tile.first + 1) * tile.k].as_chunks::<PAIR_ELEMS>().0;
    let sum = tile.sums[tile.first];
    for i in 0..half {
        let a = tile.codes[i * row_bytes..(i + 1) * row_bytes].as_chunks::<64>().0;
        let b = tile.codes[(half + i) * row_bytes..(half + i + 1) * row_bytes].as_chunks::<64>().0;
        let (ra, rb) = two_row_pairs(a, b, q);
        out[tile.first][i] = _mm512_reduce_add_epi32(ra) - sum;
        out[tile.first][half + i] = _mm512_reduce_add_epi32(rb) - sum;
    }
    if n_rows % 2 == 1 {
        run_tile::<1, 1>(tile, n_rows - 1, out);
    }
}

/// [`single_row_pairs`] for two rows at once: the same masked products per
/// row (so the same exact sums), one activation load per group for both.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn two_row_pairs(a: &[[u8; 64]], b: &[[u8; 64]], q: &[[i8; PAIR_ELEMS]]) -> (__m512i, __m512i) {
    let masks = [0b1100_0000u8, 0b0011_0000, 0b0000_1100, 0b0000_0011].map(|m| _mm512_set1_epi8(m as i8));
    let mut acc_a = [_mm512_setzero_si512(); 4];
    let mut acc_b = [_mm512_setzero_si512(); 4];
    for (p, ((wa, wb), q_pair)) in a.iter().zip(b).zip(q).enumerate() {
        let wa = load_512(wa);
        let wb = load_512(wb);
        prefetch(a.as_ptr().cast(), I2S_PREFETCH_AHEAD + p * 64);
        prefetch(b.as_ptr().cast(), I2S_PREFETCH_AHEAD + p * 64);
        for (g, q_group) in q_pair.as_chunks::<64>().0.iter().enumerate() {
            let qv = load_512_i8(q_group);
            acc_a[g] = _mm512_dpbusd_epi32(acc_a[g], _mm512_and_si512(wa, masks[g]), qv);
            acc_b[g] = _mm512_dpbusd_epi32(acc_b[g], _mm512_and_si512(wb, masks[g]), qv);
        }
    }
    (fold_groups(acc_a), fold_groups(acc_b))
}

/// One row's lanes from its four group accumulators: group `g`'s products
/// were `code * 4^(3 - g) * q`, so each is divided back exactly (see
/// [`single_row_pairs`]) and the four added.
#[inline]
#[target_feature(enable = "avx512f")]
fn fold_groups(acc: [__m512i; 4]) -> __m512i {
    _mm512_add_epi32(
        _mm512_add_epi32(_mm512_srai_epi32::<6>(acc[0]), _mm512_srai_epi32::<4>(acc[1])),
        _mm512_add_epi32(_mm512_srai_epi32::<2>(acc[2]), acc[3]),
    )
}

/// Rows in groups of `R`, leftover rows one at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn run_rows<const R: usize, const T: usize>(tile: &Tile<'_>, out: &mut [&mut [i32]]) {
    let n_rows = tile.codes.len() / (tile.k / 4);
    let grouped = n_rows / R * R;
    for first_row in (0..grouped).step_by(R) {
        run_tile::<R, T>(tile, first_row, out);
    }
    for row in grouped..n_rows {
        run_tile::<1, T>(tile, row, out);
    }
}

/// Accumulators per (row, token): consecutive groups alternate between two,
/// halving each register's `vpdpbusd` dependency chain.
const ACC: usize = 2;

/// Rows `first_row..first_row + R` x the tile's `T` tokens.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
// Rows and tokens index several parallel arrays (codes, activations, outputs).
#[allow(clippy::needless_range_loop)]
fn run_tile<const R: usize, const T: usize>(tile: &Tile<'_>, first_row: usize, out: &mut [&mut [i32]]) {
    let row_bytes = tile.k / 4;
    let mut code_pairs: [&[[u8; 64]]; R] = [&[]; R];
    let mut code_tails: [&[u8]; R] = [&[]; R];
    for r in 0..R {
        let row = first_row + r;
        (code_pairs[r], code_tails[r]) = tile.codes[row * row_bytes..(row + 1) * row_bytes].as_chunks::<64>();
    }
    let mut q_pairs: [&[[i8; PAIR_ELEMS]]; T] = [&[]; T];
    let mut q_tails: [&[i8]; T] = [&[]; T];
    for t in 0..T {
        let token = tile.first + t;
        (q_pairs[t], q_tails[t]) = tile.q[token * tile.k..(token + 1) * tile.k].as_chunks::<PAIR_ELEMS>();
    }
    let n_pairs = tile.k / PAIR_ELEMS;
    let mask = _mm512_set1_epi8(0b11);
    let mut acc = [[[_mm512_setzero_si512(); ACC]; T]; R];
    // Decode (one row, one token) takes the path with fewer instructions.
    let pairs = if R == 1 && T == 1 {
        acc[0][0][0] = single_row_pairs(code_pairs[0], q_pairs[0]);
        0
    } else {
        n_pairs
    };
    for p in 0..pairs {
        let mut w = [_mm512_setzero_si512(); R];
        for r in 0..R {
            w[r] = load_512(&code_pairs[r][p]);
            prefetch(code_pairs[r].as_ptr().cast(), I2S_PREFETCH_AHEAD + p * 64);
        }
        for g in 0..4 {
            let mut qv = [_mm512_setzero_si512(); T];
            for t in 0..T {
                qv[t] = load_512_i8(&q_pairs[t][p].as_chunks::<64>().0[g]);
            }
            for r in 0..R {
                let codes = unpack_512(w[r], g, mask);
                for t in 0..T {
                    acc[r][t][g % ACC] = _mm512_dpbusd_epi32(acc[r][t][g % ACC], codes, qv[t]);
                }
            }
        }
    }
    // An odd last block, in the natural order, with 256-bit `vpdpbusd`.
    let mut tail = [[_mm256_setzero_si256(); T]; R];
    if !tile.k.is_multiple_of(PAIR_ELEMS) {
        let mask256 = _mm256_set1_epi8(0b11);
        for r in 0..R {
            let Ok(block) = <&[u8; I2S_BLOCK_BYTES]>::try_from(code_tails[r]) else { continue };
            let w = load_256(block);
            for g in 0..4 {
                let codes = unpack_256(w, g, mask256);
                for t in 0..T {
                    let values = &q_tails[t].as_chunks::<32>().0[g];
                    tail[r][t] = _mm256_dpbusd_epi32(tail[r][t], codes, load_256_i8(values));
                }
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            // Zero-extending: the upper half of the 256-bit tail must add nothing.
            let total =
                _mm512_add_epi32(_mm512_add_epi32(acc[r][t][0], acc[r][t][1]), _mm512_zextsi256_si512(tail[r][t]));
            out[tile.first + t][first_row + r] = _mm512_reduce_add_epi32(total) - tile.sums[tile.first + t];
        }
    }
}

/// One row times one token over whole block pairs, per `i32` lane. The codes
/// are masked in place instead of shifted down: group `g`'s mask keeps bits
/// `6 - 2g` and `7 - 2g` of every byte, so each product is
/// `code * 4^(3 - g) * q`, summed into the group's own accumulator, which is
/// divided by `4^(3 - g)` at the end: exact, as every lane of it is a
/// multiple of that, and `|lane| <= 192 * 128 * k / 64` fits an `i32` for
/// `k <= I2S_MAX_K`. Three shifts fewer per 64 code bytes than
/// [`unpack_512`], which matters when two threads share one core's
/// execution units and the memory runs fast enough to make decode compute
/// bound.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn single_row_pairs(codes: &[[u8; 64]], q: &[[i8; PAIR_ELEMS]]) -> __m512i {
    let masks = [0b1100_0000u8, 0b0011_0000, 0b0000_1100, 0b0000_0011].map(|m| _mm512_set1_epi8(m as i8));
    let mut acc = [_mm512_setzero_si512(); 4];
    for (p, (w, q_pair)) in codes.iter().zip(q).enumerate() {
        let w = load_512(w);
        prefetch(codes.as_ptr().cast(), I2S_PREFETCH_AHEAD + p * 64);
        for (g, q_group) in q_pair.as_chunks::<64>().0.iter().enumerate() {
            acc[g] = _mm512_dpbusd_epi32(acc[g], _mm512_and_si512(w, masks[g]), load_512_i8(q_group));
        }
    }
    fold_groups(acc)
}

/// The codes of group `group` of both blocks in a 64-byte pair, one per byte.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn unpack_512(w: __m512i, group: usize, mask: __m512i) -> __m512i {
    let shifted = match group {
        0 => _mm512_srli_epi16::<6>(w),
        1 => _mm512_srli_epi16::<4>(w),
        2 => _mm512_srli_epi16::<2>(w),
        _ => w,
    };
    _mm512_and_si512(shifted, mask)
}

/// The codes of group `group` of one block, one per byte.
#[inline]
#[target_feature(enable = "avx2")]
fn unpack_256(w: __m256i, group: usize, mask: __m256i) -> __m256i {
    let shifted = match group {
        0 => _mm256_srli_epi16::<6>(w),
        1 => _mm256_srli_epi16::<4>(w),
        2 => _mm256_srli_epi16::<2>(w),
        _ => w,
    };
    _mm256_and_si256(shifted, mask)
}

/// Hints the cache to fetch the line at `base + offset` (`I2S_PREFETCH_AHEAD`
/// bytes further along the codes), so DRAM latency overlaps the arithmetic.
/// `wrapping_add` and `prefetcht0` never fault: past the end of the buffer
/// this is a wasted hint, not a read.
#[inline]
#[target_feature(enable = "avx2")]
fn prefetch(base: *const u8, offset: usize) {
    _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(offset).cast());
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load_512(bytes: &[u8; 64]) -> __m512i {
    // SAFETY: `bytes` refers to 64 readable bytes and `vmovdqu64` has no alignment requirement.
    unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load_512_i8(values: &[i8; 64]) -> __m512i {
    // SAFETY: `values` refers to 64 readable bytes and `vmovdqu64` has no alignment requirement.
    unsafe { _mm512_loadu_si512(values.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn load_256(bytes: &[u8; 32]) -> __m256i {
    // SAFETY: `bytes` refers to 32 readable bytes and `vmovdqu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn load_256_i8(values: &[i8; 32]) -> __m256i {
    // SAFETY: `values` refers to 32 readable bytes and `vmovdqu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(values.as_ptr().cast()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaving_pairs_groups_of_consecutive_blocks() {
        // Three blocks: the first two are interleaved, the third kept.
        let k = 3 * I2S_BLOCK_ELEMS;
        let q: Vec<i8> = (0..k).map(|i| (i % 251) as i8).collect();
        let interleaved = interleave_activations(&q, k, false);
        assert_eq!(interleave_activations(&q, k, true), interleaved);
        for g in 0..4 {
            for j in 0..32 {
                assert_eq!(interleaved[g * 64 + j], q[g * 32 + j]);
                assert_eq!(interleaved[g * 64 + 32 + j], q[128 + g * 32 + j]);
            }
        }
        assert_eq!(&interleaved[256..], &q[256..]);
    }
}
