//! The portable int8 x int8 kernel on `wide` vectors (SSE2 on x86-64, NEON on
//! AArch64): 16 values at a time widened to `i16`, pairwise dot products into
//! `i32`. The activations are widened once per call and reused for every row.

use wide::{i16x16, i32x8, i8x16};

use super::tail_dot;

const LANES: usize = 16;

pub(super) fn gemv_rows(values: &[i8], q: &[i8], out: &mut [i32]) {
    let (q_chunks, _) = q.as_chunks::<LANES>();
    let q_wide: Vec<i16x16> = q_chunks.iter().map(|chunk| i16x16::from(i8x16::new(*chunk))).collect();
    let vector_end = q_chunks.len() * LANES;
    for (row, value) in values.chunks_exact(q.len()).zip(out.iter_mut()) {
        let (row_chunks, _) = row.as_chunks::<LANES>();
        let mut acc = i32x8::splat(0);
        for (chunk, &qv) in row_chunks.iter().zip(&q_wide) {
            acc += i16x16::from(i8x16::new(*chunk)).dot(qv);
        }
        *value = acc.reduce_add() + tail_dot(row, q, vector_end);
    }
}
