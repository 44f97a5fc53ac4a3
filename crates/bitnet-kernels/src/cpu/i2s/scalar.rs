//! The scalar I2_S kernel: the reference the SIMD kernels must match exactly.

use super::{Activations, I2S_BLOCK_BYTES, I2S_BLOCK_ELEMS};

/// Bit shift of each 32-element group inside a code byte; group 0 is the high pair.
const GROUP_SHIFTS: [u32; 4] = [6, 4, 2, 0];

pub(super) fn gemm_rows(codes: &[u8], acts: &Activations<'_>, out: &mut [&mut [i32]]) {
    let row_bytes = acts.k / 4;
    for (t, token_out) in out.iter_mut().enumerate() {
        let q = &acts.q[t * acts.k..(t + 1) * acts.k];
        for (row, value) in token_out.iter_mut().enumerate() {
            let row_codes = &codes[row * row_bytes..(row + 1) * row_bytes];
            *value = code_dot(row_codes, q) - acts.sums[t];
        }
    }
}

/// `sum(code * q)` over one row.
fn code_dot(row_codes: &[u8], q: &[i8]) -> i32 {
    let mut sum = 0i32;
    for (block_codes, block_q) in row_codes.chunks_exact(I2S_BLOCK_BYTES).zip(q.chunks_exact(I2S_BLOCK_ELEMS)) {
        for (group, group_q) in block_q.chunks_exact(32).enumerate() {
            let shift = GROUP_SHIFTS[group];
            for (&byte, &value) in block_codes.iter().zip(group_q) {
                sum += i32::from((byte >> shift) & 0b11) * i32::from(value);
            }
        }
    }
    sum
}
