//! NEON float GEMV (AArch64): eight weights per step as two `float32x4_t`,
//! f16 widened with integer operations and one exact multiply (the stable
//! `core::arch` has no f16 vector type), four rows at a time sharing `x`.

use std::arch::aarch64::*;

use super::{tail_dot, FloatDtype, FloatWeight};
use crate::cpu::token::NeonToken;

/// Rows handled together, sharing each load of `x`.
const ROWS: usize = 4;

pub(super) fn gemv_rows<T: FloatWeight>(_token: NeonToken, bytes: &[u8], x: &[f32], out: &mut [f32]) {
    // SAFETY (all three calls): a `NeonToken` exists only after run-time
    // detection of NEON, the feature these functions enable.
    match T::DTYPE {
        FloatDtype::F16 => unsafe { f16_weights::gemv_rows(bytes, x, out) },
        FloatDtype::Bf16 => unsafe { bf16_weights::gemv_rows(bytes, x, out) },
        FloatDtype::F32 => unsafe { f32_weights::gemv_rows(bytes, x, out) },
    }
}

macro_rules! gemv_for_dtype {
    ($module:ident, $dtype:ty, $chunk_bytes:literal, $load:ident) => {
        mod $module {
            use super::*;

            const CHUNK_BYTES: usize = $chunk_bytes;

            #[target_feature(enable = "neon")]
            pub(super) fn gemv_rows(bytes: &[u8], x: &[f32], out: &mut [f32]) {
                let row_bytes = x.len() * <$dtype as FloatWeight>::SIZE;
                let mut row_groups = bytes.chunks_exact(ROWS * row_bytes);
                let mut out_groups = out.chunks_exact_mut(ROWS);
                for (rows, out) in (&mut row_groups).zip(&mut out_groups) {
                    let (r0, rest) = rows.split_at(row_bytes);
                    let (r1, rest) = rest.split_at(row_bytes);
                    let (r2, r3) = rest.split_at(row_bytes);
                    out.copy_from_slice(&dot_rows::<ROWS>([r0, r1, r2, r3], x));
                }
                for (row, value) in row_groups.remainder().chunks_exact(row_bytes).zip(out_groups.into_remainder()) {
                    *value = dot_rows::<1>([row], x)[0];
                }
            }

            #[target_feature(enable = "neon")]
            fn dot_rows<const R: usize>(rows: [&[u8]; R], x: &[f32]) -> [f32; R] {
                let (x_chunks, _) = x.as_chunks::<8>();
                let n_chunks = x_chunks.len();
                let mut row_chunks: [&[[u8; CHUNK_BYTES]]; R] = [&[]; R];
                for r in 0..R {
                    row_chunks[r] = &rows[r].as_chunks::<CHUNK_BYTES>().0[..n_chunks];
                }
                let mut acc = [[vdupq_n_f32(0.0); 2]; R];
                for c in 0..n_chunks {
                    let (x_lo, x_hi) = load_f32x8(&x_chunks[c]);
                    for r in 0..R {
                        let (w_lo, w_hi) = $load(&row_chunks[r][c]);
                        acc[r][0] = vfmaq_f32(acc[r][0], w_lo, x_lo);
                        acc[r][1] = vfmaq_f32(acc[r][1], w_hi, x_hi);
                    }
                }
                let mut sums = [0.0f32; R];
                for r in 0..R {
                    sums[r] =
                        vaddvq_f32(vaddq_f32(acc[r][0], acc[r][1])) + tail_dot::<$dtype>(rows[r], x, n_chunks * 8);
                }
                sums
            }
        }
    };
}

gemv_for_dtype!(f16_weights, half::f16, 16, load_f16x8);
gemv_for_dtype!(bf16_weights, half::bf16, 16, load_bf16x8);
gemv_for_dtype!(f32_weights, f32, 32, load_le_f32x8);

#[inline]
#[target_feature(enable = "neon")]
fn load_u16x8(bytes: &[u8; 16]) -> uint16x8_t {
    // SAFETY: `bytes` refers to 16 readable bytes; `ld1` of bytes needs no
    // alignment, and on little-endian AArch64 the reinterpretation reads each
    // pair of bytes as a little-endian u16.
    vreinterpretq_u16_u8(unsafe { vld1q_u8(bytes.as_ptr()) })
}

/// f16 to f32 exactly (see `portable::f16_bits_to_f32` for the method).
#[inline]
#[target_feature(enable = "neon")]
fn f16_bits_to_f32(h: uint32x4_t) -> float32x4_t {
    let magnitude = vshlq_n_u32::<13>(vandq_u32(h, vdupq_n_u32(0x7fff)));
    let scaled = vmulq_f32(vreinterpretq_f32_u32(magnitude), vdupq_n_f32(f32::from_bits((127 + 112) << 23)));
    let was_inf_nan = vcgeq_f32(scaled, vdupq_n_f32(65536.0));
    let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
    let bits =
        vorrq_u32(vorrq_u32(vreinterpretq_u32_f32(scaled), vandq_u32(was_inf_nan, vdupq_n_u32(0x7f80_0000))), sign);
    vreinterpretq_f32_u32(bits)
}

#[inline]
#[target_feature(enable = "neon")]
fn load_f16x8(bytes: &[u8; 16]) -> (float32x4_t, float32x4_t) {
    let h = load_u16x8(bytes);
    (f16_bits_to_f32(vmovl_u16(vget_low_u16(h))), f16_bits_to_f32(vmovl_high_u16(h)))
}

#[inline]
#[target_feature(enable = "neon")]
fn load_bf16x8(bytes: &[u8; 16]) -> (float32x4_t, float32x4_t) {
    let h = load_u16x8(bytes);
    (vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))), vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)))
}

#[inline]
#[target_feature(enable = "neon")]
fn load_le_f32x8(bytes: &[u8; 32]) -> (float32x4_t, float32x4_t) {
    let (halves, _) = bytes.as_chunks::<16>();
    // SAFETY: each half refers to 16 readable bytes; `ld1` of bytes needs no
    // alignment, and on little-endian AArch64 the bytes are the floats.
    let (lo, hi) = unsafe { (vld1q_u8(halves[0].as_ptr()), vld1q_u8(halves[1].as_ptr())) };
    (vreinterpretq_f32_u8(lo), vreinterpretq_f32_u8(hi))
}

#[inline]
#[target_feature(enable = "neon")]
fn load_f32x8(values: &[f32; 8]) -> (float32x4_t, float32x4_t) {
    let (halves, _) = values.as_chunks::<4>();
    // SAFETY: each half refers to 4 readable, aligned floats.
    unsafe { (vld1q_f32(halves[0].as_ptr()), vld1q_f32(halves[1].as_ptr())) }
}
