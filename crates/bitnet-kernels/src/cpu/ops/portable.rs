//! Portable element-wise kernels on `wide` vectors (SSE2 on x86-64, NEON on AArch64).

use wide::{f32x8, f64x4, u32x8};

use super::scalar;

const LANES: usize = 8;

/// 1.5 * 2^23: adding and subtracting it rounds any `|y| < 2^22` to the
/// nearest integer, ties to even, in the default rounding mode.
const ROUND_MAGIC: f32 = 12_582_912.0;

fn load(values: &[f32]) -> f32x8 {
    let mut lanes = [0.0f32; LANES];
    lanes.copy_from_slice(values);
    f32x8::new(lanes)
}

pub(super) fn sum_squares_f64(x: &[f32]) -> f64 {
    let mut chunks = x.chunks_exact(4);
    let mut acc = f64x4::splat(0.0);
    for chunk in &mut chunks {
        let v = f64x4::new([f64::from(chunk[0]), f64::from(chunk[1]), f64::from(chunk[2]), f64::from(chunk[3])]);
        acc = v.mul_add(v, acc);
    }
    acc.reduce_add() + scalar::sum_squares_f64(chunks.remainder())
}

pub(super) fn softmax_with_max(x: &mut [f32], max: f32) {
    let max_v = f32x8::splat(max);
    let mut chunks = x.chunks_exact_mut(LANES);
    let mut sum = 0.0f64;
    for chunk in &mut chunks {
        let e = (load(chunk) - max_v).exp();
        chunk.copy_from_slice(&e.to_array());
        sum += chunk.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    for v in chunks.into_remainder() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
    }
    for v in x.iter_mut() {
        *v = (f64::from(*v) / sum) as f32;
    }
}

pub(super) fn relu2_mul(gate: &mut [f32], up: &[f32]) {
    let mut gate_chunks = gate.chunks_exact_mut(LANES);
    let mut up_chunks = up.chunks_exact(LANES);
    for (g, u) in (&mut gate_chunks).zip(&mut up_chunks) {
        // `max` with the zero second returns 0 for a NaN gate, as `f32::max` does.
        let r = load(g).max(f32x8::ZERO);
        g.copy_from_slice(&(r * r * load(u)).to_array());
    }
    scalar::relu2_mul(gate_chunks.into_remainder(), up_chunks.remainder());
}

pub(super) fn rotate(first: &mut [f32], second: &mut [f32], cos: &[f32], sin: &[f32]) {
    let mut a_chunks = first.chunks_exact_mut(LANES);
    let mut b_chunks = second.chunks_exact_mut(LANES);
    let mut c_chunks = cos.chunks_exact(LANES);
    let mut s_chunks = sin.chunks_exact(LANES);
    for (((a, b), c), s) in (&mut a_chunks).zip(&mut b_chunks).zip(&mut c_chunks).zip(&mut s_chunks) {
        let (x0, x1, cv, sv) = (load(a), load(b), load(c), load(s));
        a.copy_from_slice(&(x0 * cv - x1 * sv).to_array());
        b.copy_from_slice(&(x1 * cv + x0 * sv).to_array());
    }
    scalar::rotate(a_chunks.into_remainder(), b_chunks.into_remainder(), c_chunks.remainder(), s_chunks.remainder());
}

pub(super) fn abs_max(x: &[f32]) -> f32 {
    let mut chunks = x.chunks_exact(LANES);
    let mut acc = u32x8::splat(0);
    for chunk in &mut chunks {
        acc = acc.max(bytemuck::cast::<f32x8, u32x8>(load(chunk)) & u32x8::splat(0x7fff_ffff));
    }
    let lanes_max = acc.to_array().into_iter().max().unwrap_or(0);
    // Combined as bits, like the lanes: `f32::max` would drop a NaN.
    f32::from_bits(lanes_max.max(scalar::abs_max(chunks.remainder()).to_bits()))
}

pub(super) fn quantize(x: &[f32], scale: f32, out: &mut [i8]) {
    let scale_v = f32x8::splat(scale);
    let magic = f32x8::splat(ROUND_MAGIC);
    let mut x_chunks = x.chunks_exact(LANES);
    let mut out_chunks = out.chunks_exact_mut(LANES);
    for (chunk, q) in (&mut x_chunks).zip(&mut out_chunks) {
        // |x * scale| <= 127 * (1 + 2^-23), far inside the magic constant's range.
        let rounded = (load(chunk) * scale_v + magic) - magic;
        let clamped = rounded.max(f32x8::splat(-128.0)).min(f32x8::splat(127.0));
        for (q, v) in q.iter_mut().zip(clamped.to_array()) {
            *q = v as i8;
        }
    }
    scalar::quantize(x_chunks.remainder(), scale, out_chunks.into_remainder());
}

pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut a_chunks = a.chunks_exact(LANES);
    let mut b_chunks = b.chunks_exact(LANES);
    let mut acc = f32x8::ZERO;
    for (x, y) in (&mut a_chunks).zip(&mut b_chunks) {
        acc += load(x) * load(y);
    }
    acc.reduce_add() + scalar::dot(a_chunks.remainder(), b_chunks.remainder())
}

pub(super) fn add_scaled(out: &mut [f32], w: f32, row: &[f32]) {
    let wv = f32x8::splat(w);
    let mut o_chunks = out.chunks_exact_mut(LANES);
    let mut r_chunks = row.chunks_exact(LANES);
    for (o, r) in (&mut o_chunks).zip(&mut r_chunks) {
        // Multiply, then add: the scalar reference's rounding.
        o.copy_from_slice(&(load(o) + wv * load(r)).to_array());
    }
    scalar::add_scaled(o_chunks.into_remainder(), w, r_chunks.remainder());
}
