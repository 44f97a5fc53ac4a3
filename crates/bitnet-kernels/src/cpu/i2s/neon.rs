//! NEON I2_S kernel (AArch64): each 32-byte code block is two 16-byte
//! vectors, unpacked with `ushr` + `and`; codes (0..=2, so also valid `i8`)
//! times activations with `smull`/`smlal` into `i16` (at most 16 products of
//! magnitude <= 384 per lane and block), widened into `i32` with `sadalp`.

use std::arch::aarch64::*;

use super::{token_tiles, Activations, I2S_BLOCK_BYTES, I2S_BLOCK_ELEMS};
use crate::cpu::token::NeonToken;

pub(super) fn gemm_rows(_token: NeonToken, codes: &[u8], acts: &Activations<'_>, out: &mut [&mut [i32]]) {
    // SAFETY: a `NeonToken` exists only after run-time detection of NEON,
    // the feature `gemm_rows_impl` enables.
    unsafe { gemm_rows_impl(codes, acts, out) }
}

struct Tile<'a> {
    code_blocks: &'a [[u8; I2S_BLOCK_BYTES]],
    q_blocks: &'a [[i8; I2S_BLOCK_ELEMS]],
    blocks_per_row: usize,
    first: usize,
    sums: &'a [i32],
}

#[target_feature(enable = "neon")]
fn gemm_rows_impl(codes: &[u8], acts: &Activations<'_>, out: &mut [&mut [i32]]) {
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
            4 => run_tile::<4>(&tile, out),
            3 => run_tile::<3>(&tile, out),
            2 => run_tile::<2>(&tile, out),
            _ => run_tile::<1>(&tile, out),
        }
    }
}

// Rows and tokens index several parallel arrays (codes, activations, outputs).
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "neon")]
fn run_tile<const T: usize>(tile: &Tile<'_>, out: &mut [&mut [i32]]) {
    let bpr = tile.blocks_per_row;
    let n_rows = tile.code_blocks.len() / bpr;
    let q: [&[[i8; I2S_BLOCK_ELEMS]]; T] =
        std::array::from_fn(|t| &tile.q_blocks[(tile.first + t) * bpr..(tile.first + t + 1) * bpr]);
    let mask = vdupq_n_u8(0b11);
    for row in 0..n_rows {
        let mut acc = [vdupq_n_s32(0); T];
        for (b, block) in tile.code_blocks[row * bpr..(row + 1) * bpr].iter().enumerate() {
            let (halves, _) = block.as_chunks::<16>();
            let mut codes = [[vdupq_n_s8(0); 4]; 2];
            for (h, half) in halves.iter().enumerate() {
                let w = load_u8x16(half);
                codes[h] = [
                    vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8::<6>(w), mask)),
                    vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8::<4>(w), mask)),
                    vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8::<2>(w), mask)),
                    vreinterpretq_s8_u8(vandq_u8(w, mask)),
                ];
            }
            for t in 0..T {
                let (chunks, _) = q[t][b].as_chunks::<16>();
                let mut sum16 = vdupq_n_s16(0);
                for g in 0..4 {
                    for h in 0..2 {
                        let values = load_i8x16(&chunks[g * 2 + h]);
                        sum16 = vmlal_s8(sum16, vget_low_s8(codes[h][g]), vget_low_s8(values));
                        sum16 = vmlal_high_s8(sum16, codes[h][g], values);
                    }
                }
                acc[t] = vpadalq_s16(acc[t], sum16);
            }
        }
        for t in 0..T {
            out[tile.first + t][row] = vaddvq_s32(acc[t]) - tile.sums[tile.first + t];
        }
    }
}

#[inline]
#[target_feature(enable = "neon")]
fn load_u8x16(bytes: &[u8; 16]) -> uint8x16_t {
    // SAFETY: `bytes` refers to 16 readable bytes; `ld1` of bytes needs no alignment.
    unsafe { vld1q_u8(bytes.as_ptr()) }
}

#[inline]
#[target_feature(enable = "neon")]
fn load_i8x16(values: &[i8; 16]) -> int8x16_t {
    // SAFETY: `values` refers to 16 readable bytes; `ld1` of bytes needs no alignment.
    unsafe { vld1q_s8(values.as_ptr()) }
}
