//! Scalar reference implementations of the forward pass's operations, written
//! for clarity. Activations are f64, so the reference is as close to the exact
//! math as a computer gets; the one place where precision is part of the
//! model's definition, the int8 activation quantizer, works in f32 exactly as
//! HF transformers' `ActQuant` does (cast to f32, `(1/max) * 127`, round half
//! to even, dequantize as `q / s` in f32).

use bitnet_models::TernaryMatrix;
use bitnet_quant::act_quant;

/// RMSNorm: `x * rsqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm(x: &[f64], weight: &[f32], eps: f32, out: &mut [f64]) {
    debug_assert_eq!(x.len(), weight.len());
    let mean_sq = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (mean_sq + f64::from(eps)).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * f64::from(*w);
    }
}

/// Quantizes one token's activations as HF's `ActQuant` does and returns the
/// dequantized values `q / s` (each exactly an f32).
pub fn fake_quantize_activations(x: &[f64]) -> Vec<f64> {
    let x32: Vec<f32> = x.iter().map(|v| *v as f32).collect();
    let mut q = vec![0i8; x.len()];
    // Non-finite activations cannot come out of finite weights and inputs;
    // the loaders reject non-finite weights.
    let s = act_quant::quantize_activations(&x32, &mut q).expect("finite activations");
    q.iter().map(|&v| f64::from(f32::from(v) / s)).collect()
}

/// BitLinear on `n_tokens` rows of `x` (`[n_tokens, in]`), into `[n_tokens, out]`:
/// per-token int8 absmax quantization, a dot product with the ternary
/// weights, then the per-tensor weight scale.
pub fn bitlinear(x: &[f64], n_tokens: usize, w: &TernaryMatrix, out: &mut [f64]) {
    let (k, n) = (w.in_features(), w.out_features());
    debug_assert_eq!(x.len(), n_tokens * k);
    debug_assert_eq!(out.len(), n_tokens * n);
    let dequantized: Vec<Vec<f64>> = x.chunks_exact(k).map(fake_quantize_activations).collect();
    let scale = f64::from(w.scale());
    let mut row = vec![0i8; k];
    for j in 0..n {
        w.decode_row(j, &mut row);
        for (t, xq) in dequantized.iter().enumerate() {
            let acc: f64 = xq.iter().zip(&row).map(|(a, &b)| a * f64::from(b)).sum();
            out[t * n + j] = acc * scale;
        }
    }
}

/// Inverse frequency of each rotary pair: `1 / theta^(2i / head_dim)`.
pub fn rope_inv_freq(theta: f32, head_dim: usize) -> Vec<f64> {
    (0..head_dim / 2).map(|i| 1.0 / f64::from(theta).powf((2 * i) as f64 / head_dim as f64)).collect()
}

/// The f32 cos/sin tables of the fast backends, `[max_positions, head_dim / 2]`
/// each: angles computed in f64 and rounded once, so long positions stay
/// accurate. Every fast backend (CPU, CUDA) uses these same tables.
pub fn rope_tables_f32(theta: f32, head_dim: usize, max_positions: usize) -> (Vec<f32>, Vec<f32>) {
    let inv_freq = rope_inv_freq(theta, head_dim);
    let mut cos = Vec::with_capacity(max_positions * inv_freq.len());
    let mut sin = Vec::with_capacity(max_positions * inv_freq.len());
    for pos in 0..max_positions {
        for &f in &inv_freq {
            let (s, c) = (pos as f64 * f).sin_cos();
            cos.push(c as f32);
            sin.push(s as f32);
        }
    }
    (cos, sin)
}

/// Applies NEOX-style (rotate_half) rotary embedding at `position` to every
/// head of `x` (`[n_heads, head_dim]`): dimension `i` pairs with `i + head_dim/2`.
pub fn rope(x: &mut [f64], head_dim: usize, position: usize, inv_freq: &[f64]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (sin, cos) = (position as f64 * inv_freq[i]).sin_cos();
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos - b * sin;
            head[i + half] = b * cos + a * sin;
        }
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f64]) {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// `relu(gate)^2 * up`, the BitNet b1.58 gated activation.
pub fn relu2_mul(gate: &[f64], up: &[f64], out: &mut [f64]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        let r = g.max(0.0);
        *o = r * r * u;
    }
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_hand_computed() {
        // mean(x^2) = (9 + 16) / 2 = 12.5; 1/sqrt(12.5) = 0.282842712474619
        let mut out = [0.0; 2];
        rms_norm(&[3.0, -4.0], &[1.0, 2.0], 0.0, &mut out);
        assert!((out[0] - 0.848_528_137_423_857).abs() < 1e-12, "{out:?}");
        assert!((out[1] + 2.262_741_699_796_952).abs() < 1e-12, "{out:?}");
    }

    #[test]
    fn bitlinear_hand_computed() {
        // x = [1, -0.5, 0.25, 0, ...] over 128: absmax 1 -> s = 127;
        // q = [127, -64 (-63.5 ties to even), 32 (31.75), 0, ...].
        let mut x = vec![0.0f64; 128];
        x[..3].copy_from_slice(&[1.0, -0.5, 0.25]);
        let mut w = vec![0i8; 2 * 128];
        w[..3].copy_from_slice(&[1, 1, -1]); // row 0: (127 - 64 - 32) / 127 = 31 / 127
        w[128..131].copy_from_slice(&[-1, 0, 1]); // row 1: (-127 + 32) / 127 = -95 / 127
        let m = TernaryMatrix::from_ternary("w", 2, 128, &w, 2.0).unwrap();
        let mut out = [0.0; 2];
        bitlinear(&x, 1, &m, &mut out);
        assert!((out[0] - 31.0 / 127.0 * 2.0).abs() < 1e-7, "{out:?}");
        assert!((out[1] + 95.0 / 127.0 * 2.0).abs() < 1e-7, "{out:?}");
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        // head_dim 4, theta 1e4: inv_freq = [1, 1e4^-0.5 = 0.01]; position 1 rotates pair (0, 2) by 1 rad.
        let inv = rope_inv_freq(10_000.0, 4);
        assert_eq!(inv[0], 1.0);
        assert!((inv[1] - 0.01).abs() < 1e-15);
        let mut x = [1.0, 0.0, 0.0, 0.0];
        rope(&mut x, 4, 1, &inv);
        let (s, c) = 1.0f64.sin_cos();
        assert_eq!(x, [c, 0.0, s, 0.0]);
        let mut y = [1.0, 2.0, 3.0, 4.0];
        rope(&mut y, 4, 0, &inv);
        assert_eq!(y, [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn softmax_and_relu2() {
        let mut x = [0.0, 2.0f64.ln()];
        softmax(&mut x);
        assert!((x[0] - 1.0 / 3.0).abs() < 1e-15 && (x[1] - 2.0 / 3.0).abs() < 1e-15);
        let mut out = [0.0; 3];
        relu2_mul(&[-2.0, 3.0, 300.0], &[5.0, 2.0, 1.0], &mut out);
        assert_eq!(out, [0.0, 18.0, 90_000.0]);
    }

    #[test]
    fn fake_quantization_matches_hf_act_quant_by_hand() {
        // absmax 2 -> s = (1/2) * 127 = 63.5; 1 * 63.5 = 63.5 ties to 64; 0.3 * 63.5 = 19.05 -> 19.
        let out = fake_quantize_activations(&[2.0, 1.0, -0.3]);
        let s = 63.5f32;
        assert_eq!(out, [f64::from(127.0 / s), f64::from(64.0 / s), f64::from(-19.0 / s)]);
    }
}
