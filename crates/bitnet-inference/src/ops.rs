//! Scalar reference implementations of the forward pass's operations, written
//! for clarity: each is the formula in FORMATS.md, accumulating in f64 where
//! a sum is long, so that faster kernels have an unambiguous target.

use bitnet_models::TernaryMatrix;
use bitnet_quant::act_quant;

/// RMSNorm: `x * rsqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), weight.len());
    let mean_sq = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (mean_sq + f64::from(eps)).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = (f64::from(*v) * inv) as f32 * w;
    }
}

/// BitLinear on `n_tokens` rows of `x` (`[n_tokens, in]`), into `[n_tokens, out]`:
/// per-token int8 absmax quantization, an exact integer dot product with the
/// ternary weights, then `acc / s * w_scale`.
pub fn bitlinear(x: &[f32], n_tokens: usize, w: &TernaryMatrix, out: &mut [f32]) {
    let (k, n) = (w.in_features(), w.out_features());
    debug_assert_eq!(x.len(), n_tokens * k);
    debug_assert_eq!(out.len(), n_tokens * n);
    let mut q = vec![0i8; n_tokens * k];
    let mut s = vec![0f32; n_tokens];
    act_quant::quantize_activations_rows(x, k, &mut q, &mut s).expect("shapes checked above");
    let mut row = vec![0i8; k];
    for j in 0..n {
        w.decode_row(j, &mut row);
        for t in 0..n_tokens {
            let acc: i32 = q[t * k..(t + 1) * k].iter().zip(&row).map(|(a, b)| i32::from(*a) * i32::from(*b)).sum();
            out[t * n + j] = acc as f32 / s[t] * w.scale();
        }
    }
}

/// Inverse frequencies of rotary embedding pair `i` (of `head_dim / 2`),
/// computed as HF does: `1 / theta^(2i / head_dim)` in f32.
pub fn rope_inv_freq(theta: f32, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect()
}

/// Applies NEOX-style (rotate_half) rotary embedding at `position` to every
/// head of `x` (`[n_heads, head_dim]`): dimension `i` pairs with `i + head_dim/2`.
pub fn rope(x: &mut [f32], head_dim: usize, position: usize, inv_freq: &[f32]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let angle = position as f32 * inv_freq[i];
            let (sin, cos) = angle.sin_cos();
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos - b * sin;
            head[i + half] = b * cos + a * sin;
        }
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
    }
    for v in x.iter_mut() {
        *v = (f64::from(*v) / sum) as f32;
    }
}

/// `relu(gate)^2 * up`, the BitNet b1.58 gated activation, in f32.
pub fn relu2_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        let r = g.max(0.0);
        *o = r * r * u;
    }
}

/// Dot product accumulated in f64.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum::<f64>() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_hand_computed() {
        // mean(x^2) = (9 + 16) / 2 = 12.5; rsqrt(12.5 + 0) = 0.28284271
        let mut out = [0.0; 2];
        rms_norm(&[3.0, -4.0], &[1.0, 2.0], 0.0, &mut out);
        assert!((out[0] - 0.848_528_1).abs() < 1e-6 && (out[1] + 2.262_741_7).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn bitlinear_hand_computed() {
        // x = [1, -0.5, 0.25, 0, ...] over 128: absmax 1 -> s = 127;
        // q = [127, -64 (-63.5 ties to even), 32 (31.75), 0, ...].
        let mut x = vec![0.0f32; 128];
        x[..3].copy_from_slice(&[1.0, -0.5, 0.25]);
        let mut w = vec![0i8; 2 * 128];
        w[..3].copy_from_slice(&[1, 1, -1]); // row 0: 127 - 64 - 32 = 31
        w[128..131].copy_from_slice(&[-1, 0, 1]); // row 1: -127 + 32 = -95
        let m = TernaryMatrix::from_ternary("w", 2, 128, &w, 2.0).unwrap();
        let mut out = [0.0; 2];
        bitlinear(&x, 1, &m, &mut out);
        assert_eq!(out, [31.0 / 127.0 * 2.0, -95.0 / 127.0 * 2.0]);
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        // head_dim 4, theta 1e4: inv_freq = [1, 1e4^-0.5 = 0.01]; position 1 rotates pair (0, 2) by 1 rad.
        let inv = rope_inv_freq(10_000.0, 4);
        assert_eq!(inv[0], 1.0);
        assert!((inv[1] - 0.01).abs() < 1e-9);
        let mut x = [1.0, 0.0, 0.0, 0.0];
        rope(&mut x, 4, 1, &inv);
        let (s, c) = 1.0f32.sin_cos();
        assert_eq!(x, [c, 0.0, s, 0.0]);
        let mut y = [1.0, 2.0, 3.0, 4.0];
        rope(&mut y, 4, 0, &inv);
        assert_eq!(y, [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn softmax_and_relu2() {
        let mut x = [0.0, (2.0f32).ln()];
        softmax(&mut x);
        assert!((x[0] - 1.0 / 3.0).abs() < 1e-7 && (x[1] - 2.0 / 3.0).abs() < 1e-7);
        let mut out = [0.0; 3];
        relu2_mul(&[-2.0, 3.0, 300.0], &[5.0, 2.0, 1.0], &mut out);
        assert_eq!(out, [0.0, 18.0, 90_000.0]);
    }
}
