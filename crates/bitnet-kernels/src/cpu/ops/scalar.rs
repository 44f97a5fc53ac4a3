//! Scalar element-wise kernels: the references (RMSNorm and softmax follow
//! `bitnet-inference`'s reference forward pass operation for operation).

use super::KvElement;

/// `sum(x^2)` in f64, in order.
pub(super) fn sum_squares_f64(x: &[f32]) -> f64 {
    x.iter().map(|&v| f64::from(v) * f64::from(v)).sum()
}

/// `out = (x * inv) as f32 * weight`, the product with `inv` in f64.
pub(super) fn scale_mul(x: &[f32], inv: f64, weight: &[f32], out: &mut [f32]) {
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = (f64::from(v) * inv) as f32 * w;
    }
}

pub(super) fn softmax_with_max(x: &mut [f32], max: f32) {
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
    }
    for v in x.iter_mut() {
        *v = (f64::from(*v) / sum) as f32;
    }
}

pub(super) fn relu2_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let r = g.max(0.0);
        *g = r * r * u;
    }
}

pub(super) fn rotate(first: &mut [f32], second: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (((a, b), &c), &s) in first.iter_mut().zip(second.iter_mut()).zip(cos).zip(sin) {
        let (x0, x1) = (*a, *b);
        *a = x0 * c - x1 * s;
        *b = x1 * c + x0 * s;
    }
}

/// The largest `|x|`, as the maximum of the sign-cleared bit patterns: for
/// non-negative floats integer order is numeric order, and NaN and infinity
/// sort above every finite value, so the result is non-finite exactly when
/// some input is.
pub(super) fn abs_max(x: &[f32]) -> f32 {
    f32::from_bits(x.iter().map(|v| v.to_bits() & 0x7fff_ffff).max().unwrap_or(0))
}

pub(super) fn quantize(x: &[f32], scale: f32, out: &mut [i8]) {
    for (q, &v) in out.iter_mut().zip(x) {
        *q = (v * scale).round_ties_even().clamp(-128.0, 127.0) as i8;
    }
}

/// `sum(a * b)` in f32, in order (`b` converted to f32 exactly).
pub(super) fn dot<T: KvElement>(a: &[f32], b: &[T]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum()
}

/// `out += w * row`, element by element (multiply, then add).
pub(super) fn add_scaled<T: KvElement>(out: &mut [f32], w: f32, row: &[T]) {
    for (o, &v) in out.iter_mut().zip(row) {
        *o += w * v.to_f32();
    }
}

pub(super) fn sum_u64(words: &[u64]) -> u64 {
    words.iter().fold(0u64, |acc, &w| acc.wrapping_add(w))
}
