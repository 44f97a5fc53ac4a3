//! AVX2 and AVX-VNNI I2_S kernels: one 32-byte code block (128 weights) per
//! `ymm` load, unpacked with a 16-bit shift and a `0b11` byte mask into four
//! vectors of unsigned codes, multiplied with signed activations by
//! `vpmaddubsw` + `vpmaddwd` (AVX2) or `vpdpbusd` (AVX-VNNI).
//!
//! A tile is `R` rows x `T` tokens: each weight block is loaded once for `T`
//! tokens and each activation vector once for `R` rows.
//!
//! `vpmaddubsw` adds two `code * q`, at most `2 * 3 * 128 = 768` in
//! magnitude (code 3 included), so 4 groups x 8 blocks of them still fit
//! `i16` (24576) before widening with `vpmaddwd`.

use std::arch::x86_64::*;

use super::{token_tiles, Activations, I2S_BLOCK_BYTES, I2S_BLOCK_ELEMS};
use crate::cpu::token::{Avx2Token, AvxVnniToken};
use crate::cpu::I2S_PREFETCH_AHEAD;

pub(super) fn gemm_rows_avx2(_token: Avx2Token, codes: &[u8], acts: &Activations<'_>, out: &mut [&mut [i32]]) {
    // SAFETY: an `Avx2Token` exists only after run-time detection of AVX2,
    // FMA and F16C, the features `with_maddubs::gemm_rows` enables.
    unsafe { with_maddubs::gemm_rows(codes, acts, out) }
}

pub(super) fn gemm_rows_avxvnni(_token: AvxVnniToken, codes: &[u8], acts: &Activations<'_>, out: &mut [&mut [i32]]) {
    // SAFETY: an `AvxVnniToken` exists only after run-time detection of AVX2,
    // FMA, F16C and AVX-VNNI, the features `with_vnni::gemm_rows` enables.
    unsafe { with_vnni::gemm_rows(codes, acts, out) }
}

/// One token tile's view of the inputs.
struct Tile<'a> {
    code_blocks: &'a [[u8; I2S_BLOCK_BYTES]],
    q_blocks: &'a [[i8; I2S_BLOCK_ELEMS]],
    blocks_per_row: usize,
    first: usize,
    sums: &'a [i32],
}

impl<'a> Tile<'a> {
    fn row_blocks(&self, row: usize) -> &'a [[u8; I2S_BLOCK_BYTES]] {
        &self.code_blocks[row * self.blocks_per_row..(row + 1) * self.blocks_per_row]
    }

    fn token_blocks(&self, t: usize) -> &'a [[i8; I2S_BLOCK_ELEMS]] {
        let token = self.first + t;
        &self.q_blocks[token * self.blocks_per_row..(token + 1) * self.blocks_per_row]
    }
}

/// `gemm_rows` for one module: token tiles of up to four, then rows in
/// groups of `R` (`$tiles` gives `R` for 2, 3 and 4 tokens, chosen to fit
/// the 16 `ymm` registers), leftover rows one at a time. A single token
/// takes row `i` of the first half of the rows with row `i` of the second,
/// so decode reads the weights as two sequential streams per thread (as
/// the AVX-512 kernel does; docs/perf/cpu.md, session 14).
macro_rules! driver {
    ($features:literal, tiles: [$r2:literal, $r3:literal, $r4:literal]) => {
        #[target_feature(enable = $features)]
        pub(super) fn gemm_rows(codes: &[u8], acts: &Activations<'_>, out: &mut [&mut [i32]]) {
            let blocks_per_row = acts.k / I2S_BLOCK_ELEMS;
            if blocks_per_row == 0 {
                for token_out in out.iter_mut() {
                    token_out.fill(0);
                }
                return;
            }
            let (code_blocks, _) = codes.as_chunks::<I2S_BLOCK_BYTES>();
            let (q_blocks, _) = acts.q.as_chunks::<I2S_BLOCK_ELEMS>();
            for (first, len) in token_tiles(acts.n_tokens()) {
                let tile = Tile { code_blocks, q_blocks, blocks_per_row, first, sums: &acts.sums };
                match len {
                    4 => run_rows::<$r4, 4>(&tile, out),
                    3 => run_rows::<$r3, 3>(&tile, out),
                    2 => run_rows::<$r2, 2>(&tile, out),
                    _ => run_two_streams(&tile, out),
                }
            }
        }

        #[target_feature(enable = $features)]
        fn run_rows<const R: usize, const T: usize>(tile: &Tile<'_>, out: &mut [&mut [i32]]) {
            let n_rows = tile.code_blocks.len() / tile.blocks_per_row;
            let grouped = n_rows / R * R;
            for first_row in (0..grouped).step_by(R) {
                run_tile::<R, T>(tile, std::array::from_fn(|r| first_row + r), out);
            }
            for row in grouped..n_rows {
                run_tile::<1, T>(tile, [row], out);
            }
        }

        /// One token: rows `i` and `half + i` together, an odd last row alone.
        #[target_feature(enable = $features)]
        fn run_two_streams(tile: &Tile<'_>, out: &mut [&mut [i32]]) {
            let n_rows = tile.code_blocks.len() / tile.blocks_per_row;
            let half = n_rows / 2;
            for i in 0..half {
                run_tile::<2, 1>(tile, [i, half + i], out);
            }
            if n_rows % 2 == 1 {
                run_tile::<1, 1>(tile, [n_rows - 1], out);
            }
        }
    };
}

mod with_maddubs {
    use super::*;

    driver!("avx2,fma,f16c", tiles: [2, 1, 1]);

    /// Blocks summed in `i16` before widening (see the module docs).
    const BLOCKS_PER_WIDEN: usize = 8;

    /// Rows `rows` x the tile's `T` tokens.
    #[target_feature(enable = "avx2,fma,f16c")]
    // Rows and tokens index several parallel arrays (codes, activations, outputs).
    #[allow(clippy::needless_range_loop)]
    fn run_tile<const R: usize, const T: usize>(tile: &Tile<'_>, rows: [usize; R], out: &mut [&mut [i32]]) {
        let mut w_rows: [&[[u8; I2S_BLOCK_BYTES]]; R] = [&[]; R];
        for r in 0..R {
            w_rows[r] = tile.row_blocks(rows[r]);
        }
        let mut q: [&[[i8; I2S_BLOCK_ELEMS]]; T] = [&[]; T];
        for t in 0..T {
            q[t] = tile.token_blocks(t);
        }
        let mask = _mm256_set1_epi8(0b11);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); T]; R];
        for first_block in (0..tile.blocks_per_row).step_by(BLOCKS_PER_WIDEN) {
            let last_block = (first_block + BLOCKS_PER_WIDEN).min(tile.blocks_per_row);
            let mut sum16 = [[_mm256_setzero_si256(); T]; R];
            for b in first_block..last_block {
                let mut w = [_mm256_setzero_si256(); R];
                for r in 0..R {
                    w[r] = load_u8x32(&w_rows[r][b]);
                    prefetch(w_rows[r].as_ptr().cast(), I2S_PREFETCH_AHEAD + b * I2S_BLOCK_BYTES);
                }
                for g in 0..4 {
                    let mut qv = [_mm256_setzero_si256(); T];
                    for t in 0..T {
                        qv[t] = load_i8x32(&q[t][b].as_chunks::<32>().0[g]);
                    }
                    for r in 0..R {
                        let codes = unpack(w[r], g, mask);
                        for t in 0..T {
                            sum16[r][t] = _mm256_add_epi16(sum16[r][t], _mm256_maddubs_epi16(codes, qv[t]));
                        }
                    }
                }
            }
            for r in 0..R {
                for t in 0..T {
                    acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(sum16[r][t], ones));
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                out[tile.first + t][rows[r]] = hsum_epi32(acc[r][t]) - tile.sums[tile.first + t];
            }
        }
    }
}

mod with_vnni {
    use super::*;

    driver!("avx2,fma,f16c,avxvnni", tiles: [2, 1, 1]);

    /// Accumulators per (row, token): consecutive groups alternate between
    /// two, so a register's `vpdpbusd` chain is half as long.
    const ACC: usize = 2;

    /// Rows `rows` x the tile's `T` tokens.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    // Rows and tokens index several parallel arrays (codes, activations, outputs).
    #[allow(clippy::needless_range_loop)]
    fn run_tile<const R: usize, const T: usize>(tile: &Tile<'_>, rows: [usize; R], out: &mut [&mut [i32]]) {
        let mut w_rows: [&[[u8; I2S_BLOCK_BYTES]]; R] = [&[]; R];
        for r in 0..R {
            w_rows[r] = tile.row_blocks(rows[r]);
        }
        let mut q: [&[[i8; I2S_BLOCK_ELEMS]]; T] = [&[]; T];
        for t in 0..T {
            q[t] = tile.token_blocks(t);
        }
        let mask = _mm256_set1_epi8(0b11);
        let mut acc = [[[_mm256_setzero_si256(); ACC]; T]; R];
        for b in 0..tile.blocks_per_row {
            let mut w = [_mm256_setzero_si256(); R];
            for r in 0..R {
                w[r] = load_u8x32(&w_rows[r][b]);
                prefetch(w_rows[r].as_ptr().cast(), I2S_PREFETCH_AHEAD + b * I2S_BLOCK_BYTES);
            }
            for g in 0..4 {
                let mut qv = [_mm256_setzero_si256(); T];
                for t in 0..T {
                    qv[t] = load_i8x32(&q[t][b].as_chunks::<32>().0[g]);
                }
                for r in 0..R {
                    let codes = unpack(w[r], g, mask);
                    for t in 0..T {
                        acc[r][t][g % ACC] = _mm256_dpbusd_avx_epi32(acc[r][t][g % ACC], codes, qv[t]);
                    }
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                let total = _mm256_add_epi32(acc[r][t][0], acc[r][t][1]);
                out[tile.first + t][rows[r]] = hsum_epi32(total) - tile.sums[tile.first + t];
            }
        }
    }
}

/// The codes of group `group` (elements `32 * group ..`) of a block, one per byte.
#[inline]
#[target_feature(enable = "avx2")]
fn unpack(w: __m256i, group: usize, mask: __m256i) -> __m256i {
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
#[target_feature(enable = "avx2")]
fn load_u8x32(bytes: &[u8; 32]) -> __m256i {
    // SAFETY: `bytes` refers to 32 readable bytes and `vmovdqu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn load_i8x32(values: &[i8; 32]) -> __m256i {
    // SAFETY: `values` refers to 32 readable bytes and `vmovdqu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(values.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2")]
fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}
