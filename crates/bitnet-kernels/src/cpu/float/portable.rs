//! Portable float GEMV and conversion on `wide::f32x8` (SSE2 on x86-64,
//! NEON on AArch64). f16 is widened with integer operations and one exact
//! multiply (no F16C needed), bf16 with a shift.

use wide::{f32x8, u32x8, CmpGe};

use super::{tail_dot, FloatDtype, FloatWeight};

const LANES: usize = 8;

/// Rows handled together, sharing each load of `x`.
const ROWS: usize = 4;

pub(super) fn gemv_rows<T: FloatWeight>(bytes: &[u8], x: &[f32], out: &mut [f32]) {
    let row_bytes = x.len() * T::SIZE;
    let mut row_groups = bytes.chunks_exact(ROWS * row_bytes);
    let mut out_groups = out.chunks_exact_mut(ROWS);
    for (rows, out) in (&mut row_groups).zip(&mut out_groups) {
        let rows: [&[u8]; ROWS] = std::array::from_fn(|r| &rows[r * row_bytes..(r + 1) * row_bytes]);
        out.copy_from_slice(&dot_rows::<T, ROWS>(rows, x));
    }
    for (row, value) in row_groups.remainder().chunks_exact(row_bytes).zip(out_groups.into_remainder()) {
        *value = dot_rows::<T, 1>([row], x)[0];
    }
}

fn dot_rows<T: FloatWeight, const R: usize>(rows: [&[u8]; R], x: &[f32]) -> [f32; R] {
    let chunk_bytes = LANES * T::SIZE;
    let n_chunks = x.len() / LANES;
    let mut acc = [f32x8::splat(0.0); R];
    for c in 0..n_chunks {
        let mut xs = [0.0f32; LANES];
        xs.copy_from_slice(&x[c * LANES..(c + 1) * LANES]);
        let xv = f32x8::new(xs);
        for r in 0..R {
            let w = load::<T>(&rows[r][c * chunk_bytes..(c + 1) * chunk_bytes]);
            acc[r] = w.mul_add(xv, acc[r]);
        }
    }
    std::array::from_fn(|r| acc[r].reduce_add() + tail_dot::<T>(rows[r], x, n_chunks * LANES))
}

/// Eight elements from `8 * T::SIZE` little-endian bytes.
#[inline]
fn load<T: FloatWeight>(chunk: &[u8]) -> f32x8 {
    match T::DTYPE {
        FloatDtype::F16 => f16_bits_to_f32(u32x8::new(std::array::from_fn(|i| {
            u32::from(u16::from_le_bytes([chunk[2 * i], chunk[2 * i + 1]]))
        }))),
        FloatDtype::Bf16 => bytemuck::cast(
            u32x8::new(std::array::from_fn(|i| u32::from(u16::from_le_bytes([chunk[2 * i], chunk[2 * i + 1]])))) << 16,
        ),
        FloatDtype::F32 => f32x8::new(std::array::from_fn(|i| {
            f32::from_le_bytes([chunk[4 * i], chunk[4 * i + 1], chunk[4 * i + 2], chunk[4 * i + 3]])
        })),
    }
}

/// f16 bit patterns (in the low 16 bits of each lane) to f32, exact for
/// every finite value and infinities; NaN stays NaN.
///
/// The exponent and mantissa moved into f32 position read as a number
/// 2^-112 times too small (subnormal f16 become subnormal f32); one exact
/// multiply by 2^112 fixes the scale for normals and subnormals alike, and
/// anything that lands at or above 2^16 was an f16 infinity or NaN, whose
/// exponent is then saturated. (F. Giesen's `half_to_float_fast5`.)
#[inline]
pub(super) fn f16_bits_to_f32(h: u32x8) -> f32x8 {
    let magnitude = (h & u32x8::splat(0x7fff)) << 13;
    let scaled = bytemuck::cast::<u32x8, f32x8>(magnitude) * f32x8::splat(f32::from_bits((127 + 112) << 23));
    let was_inf_nan = bytemuck::cast::<f32x8, u32x8>(scaled.cmp_ge(f32x8::splat(65536.0)));
    let sign = (h & u32x8::splat(0x8000)) << 16;
    bytemuck::cast(bytemuck::cast::<f32x8, u32x8>(scaled) | (was_inf_nan & u32x8::splat(0x7f80_0000)) | sign)
}

pub(super) fn convert<T: FloatWeight>(src: &[u8], out: &mut [f32]) {
    let chunk_bytes = LANES * T::SIZE;
    let mut src_chunks = src.chunks_exact(chunk_bytes);
    let mut out_chunks = out.chunks_exact_mut(LANES);
    for (chunk, out) in (&mut src_chunks).zip(&mut out_chunks) {
        out.copy_from_slice(&load::<T>(chunk).to_array());
    }
    super::scalar::convert::<T>(src_chunks.remainder(), out_chunks.into_remainder());
}
