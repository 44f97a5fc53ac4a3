//! Per-token absmax int8 quantization of activations, the input half of every BitLinear (HF transformers' `ActQuant`).
//!
//! For a token (one row) `x`: `s = 127 / max(max |x|, 1e-5)` (evaluated as
//! `(1 / max) * 127` in f32, exactly as torch evaluates HF's expression) and
//! `q = clamp(round(x * s), -128, 127)`; the matmul result is divided by `s`
//! (and multiplied by the weight scale) afterwards.
//!
//! Rounding: we round half to even, as HF's `torch.round` does. bitnet.cpp's
//! `quantize_row_i8_s` rounds with C `round()`, half away from zero (some of
//! its builds use ggml's `nearest_int`, which is half to even again), so on an
//! exact `.5` tie the two can differ by one unit in `q`. bitnet.cpp also forms
//! `127 / max` in f64 before narrowing to f32, which can move `s` by one f32
//! ulp. Comparisons against bitnet.cpp must tolerate both.

use crate::QuantError;

/// Lower bound of a row's absolute maximum, so an all-zero row gets a finite scale (`127 / 1e-5`).
pub const ACT_QUANT_EPS: f32 = 1e-5;

/// Quantizes one token's activations into `out` and returns the scale `s`
/// (`x ≈ q / s`).
///
/// `out.len()` must equal `x.len()`. A NaN or infinite activation is an
/// error naming its index, since it would make `s` zero or the row garbage.
/// On error `out` is left unchanged.
pub fn quantize_activations(x: &[f32], out: &mut [i8]) -> Result<f32, QuantError> {
    if out.len() != x.len() {
        return Err(QuantError::LengthMismatch { what: "quantized activations", expected: x.len(), found: out.len() });
    }
    quantize_row(x, out, 0)
}

/// Quantizes a row-major `[rows, n_cols]` activation matrix, one scale per row.
///
/// `x.len()` must be a multiple of `n_cols` (which must be non-zero),
/// `out.len() == x.len()` and `scales.len() == x.len() / n_cols`. A non-finite
/// activation is an error naming its flat index in `x`; rows before it have
/// already been written.
pub fn quantize_activations_rows(
    x: &[f32],
    n_cols: usize,
    out: &mut [i8],
    scales: &mut [f32],
) -> Result<(), QuantError> {
    if n_cols == 0 {
        return Err(QuantError::ZeroDimension { what: "n_cols" });
    }
    if x.len() % n_cols != 0 {
        return Err(QuantError::NotMultiple { what: "activation count", value: x.len(), multiple: n_cols });
    }
    if out.len() != x.len() {
        return Err(QuantError::LengthMismatch { what: "quantized activations", expected: x.len(), found: out.len() });
    }
    let n_rows = x.len() / n_cols;
    if scales.len() != n_rows {
        return Err(QuantError::LengthMismatch { what: "activation scales", expected: n_rows, found: scales.len() });
    }
    let rows = x.chunks_exact(n_cols).zip(out.chunks_exact_mut(n_cols));
    for (row_idx, ((x_row, out_row), scale)) in rows.zip(scales.iter_mut()).enumerate() {
        *scale = quantize_row(x_row, out_row, row_idx * n_cols)?;
    }
    Ok(())
}

/// Quantizes one row whose output slice has the same length; `first_index`
/// is the row's offset in the caller's flat input, for error messages.
fn quantize_row(x: &[f32], out: &mut [i8], first_index: usize) -> Result<f32, QuantError> {
    let mut abs_max = 0.0f32;
    for (index, &value) in x.iter().enumerate() {
        // A NaN would be skipped by `max` and an infinity would make the scale
        // zero; either way the row would be garbage, so stop here.
        if !value.is_finite() {
            return Err(QuantError::NonFiniteValue { what: "activations", index: first_index + index, value });
        }
        abs_max = abs_max.max(value.abs());
    }
    // `(1 / m) * 127`, not `127 / m`: this is how torch evaluates HF's
    // `127 / tensor` (`Tensor.__rtruediv__` is `reciprocal() * 127`), and the
    // two can differ by one ulp, which moves `.5` ties.
    let scale = (1.0 / abs_max.max(ACT_QUANT_EPS)) * 127.0;
    for (q, &value) in out.iter_mut().zip(x) {
        *q = (value * scale).round_ties_even().clamp(-128.0, 127.0) as i8;
    }
    Ok(scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(x: &[f32], expected_q: &[i8], expected_scale: f32) {
        let mut out = vec![0i8; x.len()];
        let scale = quantize_activations(x, &mut out).unwrap();
        assert_eq!(out, expected_q, "x {x:?}");
        assert_eq!(scale.to_bits(), expected_scale.to_bits(), "x {x:?}: scale {scale}");
    }

    #[test]
    fn known_answers() {
        // max |x| = 1 -> s = 127: -0.5 * 127 = -63.5 ties to even -64;
        // 0.25 * 127 = 31.75 -> 32.
        check(&[1.0, -0.5, 0.25, 0.0], &[127, -64, 32, 0], 127.0);
        // max |x| = 127 -> s = 1, so x itself is rounded: ties go to the even
        // neighbour (half away from zero would give 1, 3, -3, -1, 5).
        check(&[127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 4.5], &[127, 0, 2, 2, -2, 0, 4], 1.0);
        // A negative maximum maps to -127; s = 127 / 2 = 63.5, 1 * 63.5 ties to 64.
        check(&[-2.0, 1.0, 0.0], &[-127, 64, 0], 63.5);
        // All-zero row: the maximum is clamped to 1e-5, s = 127 / 1e-5.
        check(&[0.0; 5], &[0; 5], (1.0 / 1e-5) * 127.0);
        // Below the clamp: x = 1e-6 -> 1e-6 * 1.27e7 = 12.7 -> 13.
        check(&[1e-6, -5e-7], &[13, -6], (1.0 / 1e-5) * 127.0);
        check(&[], &[], (1.0 / 1e-5) * 127.0);
    }

    #[test]
    fn rows() {
        // Row 0 has max 127 (s = 1); row 1 is all zero (s = 127 / 1e-5);
        // row 2 has max 0.5 (s = 254): 0.25 * 254 = 63.5 ties to 64.
        let x = [127.0, 0.5, -1.0, 0.0, 0.0, 0.0, 0.25, -0.5, 0.0];
        let mut out = [0i8; 9];
        let mut scales = [0.0f32; 3];
        quantize_activations_rows(&x, 3, &mut out, &mut scales).unwrap();
        assert_eq!(out, [127, 0, -1, 0, 0, 0, 64, -127, 0]);
        assert_eq!(scales, [1.0, (1.0 / 1e-5) * 127.0, 254.0]);
    }

    #[test]
    fn errors() {
        let mut out = [0i8; 3];
        assert_eq!(
            quantize_activations(&[1.0, 2.0], &mut out),
            Err(QuantError::LengthMismatch { what: "quantized activations", expected: 2, found: 3 })
        );
        assert_eq!(
            quantize_activations(&[1.0, f32::NEG_INFINITY, 0.0], &mut out),
            Err(QuantError::NonFiniteValue { what: "activations", index: 1, value: f32::NEG_INFINITY })
        );
        assert!(matches!(
            quantize_activations(&[f32::NAN, 0.0, 0.0], &mut out),
            Err(QuantError::NonFiniteValue { index: 0, .. })
        ));

        fn check_rows(x_len: usize, n_cols: usize, out_len: usize, scales_len: usize, expected: QuantError) {
            let x = vec![1.0f32; x_len];
            let mut out = vec![0i8; out_len];
            let mut scales = vec![0.0f32; scales_len];
            assert_eq!(quantize_activations_rows(&x, n_cols, &mut out, &mut scales), Err(expected));
        }
        check_rows(6, 0, 6, 0, QuantError::ZeroDimension { what: "n_cols" });
        check_rows(7, 3, 7, 2, QuantError::NotMultiple { what: "activation count", value: 7, multiple: 3 });
        check_rows(6, 3, 5, 2, QuantError::LengthMismatch { what: "quantized activations", expected: 6, found: 5 });
        check_rows(6, 3, 6, 3, QuantError::LengthMismatch { what: "activation scales", expected: 2, found: 3 });

        // The flat index of a bad value in a later row is reported.
        let x = [1.0, 2.0, 3.0, 4.0, f32::INFINITY, 6.0];
        let mut out = [0i8; 6];
        let mut scales = [0.0f32; 2];
        assert_eq!(
            quantize_activations_rows(&x, 3, &mut out, &mut scales),
            Err(QuantError::NonFiniteValue { what: "activations", index: 4, value: f32::INFINITY })
        );
    }

    #[test]
    fn scale_is_evaluated_like_torch() {
        // torch evaluates `127 / t` as `t.reciprocal() * 127`; find a maximum
        // where that differs from a true division and check we follow torch.
        let m = (1..100_000)
            .map(|i| 1.0f32 + i as f32 * 1.0e-3)
            .find(|m| (1.0 / m) * 127.0 != 127.0 / m)
            .expect("some maximum rounds differently");
        let mut out = [0i8; 2];
        let scale = quantize_activations(&[m, -0.5], &mut out).unwrap();
        assert_eq!(scale, (1.0 / m) * 127.0);
        assert_ne!(scale, 127.0 / m);
    }

    proptest! {
        #[test]
        fn quantized_values_reconstruct_the_input(
            x in prop::collection::vec(-1.0e4f32..1.0e4, 1..200),
        ) {
            let mut out = vec![0i8; x.len()];
            let scale = quantize_activations(&x, &mut out).unwrap();
            let abs_max = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            prop_assert_eq!(scale, (1.0 / abs_max.max(ACT_QUANT_EPS)) * 127.0);
            for (&value, &q) in x.iter().zip(&out) {
                prop_assert!(q >= -127, "q = {q}");
                // Rounding error is at most half a step (plus float slack).
                prop_assert!((f32::from(q) / scale - value).abs() <= 0.5 / scale * 1.0001 + 1e-30);
            }
            if abs_max >= ACT_QUANT_EPS {
                let (position, _) = x.iter().enumerate().fold((0, 0.0f32), |(bi, bm), (i, v)| {
                    if v.abs() > bm { (i, v.abs()) } else { (bi, bm) }
                });
                prop_assert_eq!(out[position].abs(), 127);
            }
        }

        #[test]
        fn rows_match_single_row_calls(
            (x, n_cols) in (1..=8usize, 0..=5usize).prop_flat_map(|(n_cols, n_rows)| {
                (prop::collection::vec(-10.0f32..10.0, n_cols * n_rows), Just(n_cols))
            }),
        ) {
            let n_rows = x.len() / n_cols;
            let mut out = vec![0i8; x.len()];
            let mut scales = vec![0.0f32; n_rows];
            quantize_activations_rows(&x, n_cols, &mut out, &mut scales).unwrap();
            for row in 0..n_rows {
                let mut expected = vec![0i8; n_cols];
                let scale = quantize_activations(&x[row * n_cols..(row + 1) * n_cols], &mut expected).unwrap();
                prop_assert_eq!(&out[row * n_cols..(row + 1) * n_cols], &expected[..]);
                prop_assert_eq!(scales[row], scale);
            }
        }
    }
}
