//! Absmean ternarization of a float weight master, as HF transformers' `WeightQuant` does it (for converters and model generators).

use crate::QuantError;

/// Lower bound of the absmean scale, so an all-zero tensor does not divide by zero.
pub const TERNARIZE_EPS: f32 = 1e-5;

/// A ternary tensor and the per-tensor scale that turns it back into weights
/// (`W_real = values * scale`).
#[derive(Debug, Clone, PartialEq)]
pub struct Ternarized {
    /// One of -1, 0, +1 per weight, in input order.
    pub values: Vec<i8>,
    /// `max(mean |W|, 1e-5)`, the multiplier (not divisor) of `values`.
    pub scale: f32,
}

/// Ternarizes weights with the absmean rule of BitNet b1.58.
///
/// `scale = max(mean |W|, 1e-5)` and
/// `t = clamp(round_half_even(W * (1 / scale)), -1, 1)`, matching
/// transformers' `WeightQuant.forward`, which multiplies by the f32
/// reciprocal rather than dividing and rounds with `torch.round` (half to
/// even). The mean is accumulated in f64 so that summing millions of weights
/// does not drift; torch reduces in f32, so the two scales can differ in the
/// last bit for large tensors.
///
/// Errors: [`QuantError::EmptyInput`] for no weights (the mean is undefined)
/// and [`QuantError::NonFiniteValue`] naming the first NaN or infinite weight.
pub fn ternarize_absmean(weights: &[f32]) -> Result<Ternarized, QuantError> {
    if weights.is_empty() {
        return Err(QuantError::EmptyInput { what: "weights" });
    }
    if let Some(index) = weights.iter().position(|w| !w.is_finite()) {
        return Err(QuantError::NonFiniteValue { what: "weights", index, value: weights[index] });
    }

    let abs_sum: f64 = weights.iter().map(|&w| f64::from(w.abs())).sum();
    let mean = (abs_sum / weights.len() as f64) as f32;
    let scale = mean.max(TERNARIZE_EPS);
    let inverse = 1.0 / scale;
    let values = weights.iter().map(|&w| (w * inverse).round_ties_even().clamp(-1.0, 1.0) as i8).collect();
    Ok(Ternarized { values, scale })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(weights: &[f32], expected_values: &[i8], expected_scale: f32) {
        assert_eq!(
            ternarize_absmean(weights),
            Ok(Ternarized { values: expected_values.to_vec(), scale: expected_scale }),
            "weights {weights:?}"
        );
    }

    #[test]
    fn known_answers() {
        // mean |W| = (0.5 + 1.5 + 0 + 2) / 4 = 1; 0.5 rounds to even 0;
        // -1.5 rounds to -2 and clamps to -1; 2 clamps to 1.
        check(&[0.5, -1.5, 0.0, 2.0], &[0, -1, 0, 1], 1.0);
        // Ties: -0.5 also rounds to 0 (half away from zero would give +-1).
        check(&[0.5, -0.5, 1.0, 2.0], &[0, 0, 1, 1], 1.0);
        // mean = (0.125 + 0.375 + 0.25 + 0.25) / 4 = 0.25, inverse 4:
        // 0.5 -> 0, -1.5 -> -2 -> -1, 1 -> 1, 1 -> 1.
        check(&[0.125, -0.375, 0.25, 0.25], &[0, -1, 1, 1], 0.25);
        // mean = 2, inverse 0.5: 2.9 * 0.5 = 1.45 -> 1; -0.9 * 0.5 = -0.45 -> 0;
        // 3 * 0.5 = 1.5 -> 2 -> 1; -1.2 * 0.5 = -0.6 -> -1.
        check(&[2.9, -0.9, 3.0, -1.2], &[1, 0, 1, -1], 2.0);
        // All zeros: the scale is clamped to 1e-5 and every value stays 0.
        check(&[0.0; 4], &[0; 4], 1e-5);
        // Tiny weights: mean 1e-7 is clamped to 1e-5, so 1e-7 * 1e5 = 0.01 -> 0.
        check(&[1e-7, -1e-7], &[0, 0], 1e-5);
    }

    #[test]
    fn errors() {
        fn check(weights: &[f32], expected: QuantError) {
            assert_eq!(ternarize_absmean(weights), Err(expected));
        }
        check(&[], QuantError::EmptyInput { what: "weights" });
        check(
            &[1.0, 2.0, f32::INFINITY],
            QuantError::NonFiniteValue { what: "weights", index: 2, value: f32::INFINITY },
        );
        assert!(matches!(ternarize_absmean(&[1.0, f32::NAN]), Err(QuantError::NonFiniteValue { index: 1, .. })));
    }

    proptest! {
        #[test]
        fn values_are_ternary_and_scale_is_the_mean(
            weights in prop::collection::vec(-100.0f32..100.0, 1..300),
        ) {
            let Ternarized { values, scale } = ternarize_absmean(&weights).unwrap();
            prop_assert_eq!(values.len(), weights.len());
            prop_assert!(values.iter().all(|t| (-1..=1).contains(t)));
            let mean = weights.iter().map(|w| f64::from(w.abs())).sum::<f64>() / weights.len() as f64;
            prop_assert!(scale >= TERNARIZE_EPS);
            prop_assert!((f64::from(scale) - mean.max(1e-5)).abs() <= mean * 1e-6 + 1e-12);
            // Weights well inside (-0.5, 0.5) * scale become 0; well outside become their sign.
            for (&w, &t) in weights.iter().zip(&values) {
                let ratio = w / scale;
                if ratio.abs() < 0.49 {
                    prop_assert_eq!(t, 0);
                } else if ratio.abs() > 0.51 {
                    prop_assert_eq!(t, ratio.signum() as i8);
                }
            }
        }
    }
}
