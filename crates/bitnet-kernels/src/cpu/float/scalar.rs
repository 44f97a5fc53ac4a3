//! Scalar float GEMV and conversion, the reference for the SIMD versions.
//!
//! Each row is summed in eight interleaved f32 partial sums (element `i`
//! into sum `i % 8`), added pairwise at the end: the same accuracy class as
//! the SIMD kernels, without their speed.

use super::{decode_le, FloatWeight};

const PARTIALS: usize = 8;

pub(super) fn gemv_rows<T: FloatWeight>(bytes: &[u8], x: &[f32], out: &mut [f32]) {
    let row_bytes = x.len() * T::SIZE;
    for (row, value) in bytes.chunks_exact(row_bytes).zip(out.iter_mut()) {
        *value = dot_row::<T>(row, x);
    }
}

fn dot_row<T: FloatWeight>(row: &[u8], x: &[f32]) -> f32 {
    let mut partial = [0.0f32; PARTIALS];
    for (i, (w, &v)) in row.chunks_exact(T::SIZE).zip(x).enumerate() {
        partial[i % PARTIALS] += decode_le::<T>(w) * v;
    }
    let [a, b, c, d, e, f, g, h] = partial;
    ((a + b) + (c + d)) + ((e + f) + (g + h))
}

pub(super) fn convert<T: FloatWeight>(src: &[u8], out: &mut [f32]) {
    for (bytes, value) in src.chunks_exact(T::SIZE).zip(out.iter_mut()) {
        *value = decode_le::<T>(bytes);
    }
}
