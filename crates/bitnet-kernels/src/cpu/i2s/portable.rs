//! The portable I2_S kernel on `wide` vectors: SSE2 on x86-64, NEON on
//! AArch64. Codes and activations are widened to `i16` and multiplied with
//! `pmaddwd`-style pairwise dot products into `i32`.

use wide::{i16x16, i32x8, i8x16, u8x16};

use super::{token_tiles, Activations, I2S_BLOCK_BYTES, I2S_BLOCK_ELEMS};

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
            4 => tile.run::<4>(out),
            3 => tile.run::<3>(out),
            2 => tile.run::<2>(out),
            _ => tile.run::<1>(out),
        }
    }
}

struct Tile<'a> {
    code_blocks: &'a [[u8; I2S_BLOCK_BYTES]],
    q_blocks: &'a [[i8; I2S_BLOCK_ELEMS]],
    blocks_per_row: usize,
    first: usize,
    sums: &'a [i32],
}

impl Tile<'_> {
    /// Tokens `first..first + T` against every row.
    // Rows and tokens index several parallel arrays (codes, activations, outputs).
    #[allow(clippy::needless_range_loop)]
    fn run<const T: usize>(&self, out: &mut [&mut [i32]]) {
        let n_rows = self.code_blocks.len() / self.blocks_per_row;
        let bpr = self.blocks_per_row;
        let q: [&[[i8; I2S_BLOCK_ELEMS]]; T] =
            std::array::from_fn(|t| &self.q_blocks[(self.first + t) * bpr..(self.first + t + 1) * bpr]);
        let mask = i16x16::splat(0b11);
        for row in 0..n_rows {
            let mut acc = [i32x8::splat(0); T];
            for (b, block) in self.code_blocks[row * bpr..(row + 1) * bpr].iter().enumerate() {
                for half in 0..2 {
                    let mut bytes = [0u8; 16];
                    bytes.copy_from_slice(&block[half * 16..half * 16 + 16]);
                    let wide_codes = i16x16::from(u8x16::new(bytes));
                    let groups = [
                        (wide_codes >> 6) & mask,
                        (wide_codes >> 4) & mask,
                        (wide_codes >> 2) & mask,
                        wide_codes & mask,
                    ];
                    for t in 0..T {
                        let block_q = &q[t][b];
                        for (g, group_codes) in groups.iter().enumerate() {
                            let start = g * 32 + half * 16;
                            let mut values = [0i8; 16];
                            values.copy_from_slice(&block_q[start..start + 16]);
                            acc[t] += group_codes.dot(i16x16::from(i8x16::new(values)));
                        }
                    }
                }
            }
            for t in 0..T {
                out[self.first + t][row] = acc[t].reduce_add() - self.sums[self.first + t];
            }
        }
    }
}
