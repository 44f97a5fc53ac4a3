//! Element-wise kernels: every kernel against the scalar reference (and
//! `bitnet_quant::act_quant` for quantization). Exact where the module docs
//! promise it; otherwise within the tolerances stated at each check.

mod common;

use bitnet_kernels::cpu::{self, CpuKernel};
use bitnet_kernels::KernelError;
use bitnet_quant::act_quant;
use common::{runner, test_each_kernel};
use proptest::prelude::*;

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Activations with exact ties: with max |x| = 127 the scale is 1, so
/// `k + 0.5` must round to even, and negative ties too.
fn tie_row(len: usize) -> Vec<f32> {
    let mut x: Vec<f32> = (0..len).map(|i| (i % 60) as f32 - 30.0 + 0.5).collect();
    if let Some(first) = x.first_mut() {
        *first = 127.0;
    }
    x
}

fn check_quantize(kernel: CpuKernel, x: &[f32]) -> Result<(), TestCaseError> {
    let mut expected = vec![0i8; x.len()];
    let expected_scale = act_quant::quantize_activations(x, &mut expected).unwrap();
    let mut found = vec![0i8; x.len()];
    let scale = cpu::quantize_act_i8(kernel, x, &mut found).unwrap();
    prop_assert_eq!(scale.to_bits(), expected_scale.to_bits());
    prop_assert_eq!(found, expected);
    Ok(())
}

fn quantize_matches_act_quant(kernel: CpuKernel) {
    // Magnitudes from tiny (below the 1e-5 clamp) to huge (relu^2 outputs).
    let strategy = (0..=300usize, prop::sample::select(vec![1e-7f32, 1e-3, 1.0, 50.0, 1e4, 1e8]))
        .prop_flat_map(|(len, magnitude)| prop::collection::vec(-magnitude..magnitude, len));
    runner(128).run(&strategy, |x| check_quantize(kernel, &x)).unwrap();
    for len in [1, 31, 32, 33, 64, 2560, 6912] {
        check_quantize(kernel, &tie_row(len)).unwrap();
    }
}
test_each_kernel!(quantize_exact, quantize_matches_act_quant);

fn quantize_rows_and_errors(kernel: CpuKernel) {
    let n_cols = 70;
    let x: Vec<f32> = (0..3 * n_cols).map(|i| ((i * 37 % 101) as f32 - 50.0) * (1 + i / n_cols) as f32).collect();
    let mut expected = vec![0i8; x.len()];
    let mut expected_scales = [0.0f32; 3];
    act_quant::quantize_activations_rows(&x, n_cols, &mut expected, &mut expected_scales).unwrap();
    let mut found = vec![0i8; x.len()];
    let mut scales = [0.0f32; 3];
    cpu::quantize_act_i8_rows(kernel, &x, n_cols, &mut found, &mut scales).unwrap();
    assert_eq!((found, scales), (expected, expected_scales));

    // A non-finite value anywhere (also in a SIMD-width chunk, not just a tail) names its flat index.
    for (index, bad) in [(0, f32::NAN), (40, f32::INFINITY), (69, f32::NEG_INFINITY), (150, f32::NAN)] {
        let mut x = x.clone();
        x[index] = bad;
        let mut out = vec![5i8; x.len()];
        let mut scales = [0.0f32; 3];
        let err = cpu::quantize_act_i8_rows(kernel, &x, n_cols, &mut out, &mut scales).unwrap_err();
        assert!(
            matches!(err, KernelError::NonFiniteValue { what: "activations", index: i, .. } if i == index),
            "{err:?}"
        );
    }
    let mut out = [0i8; 4];
    assert_eq!(
        cpu::quantize_act_i8(kernel, &[1.0; 5], &mut out),
        Err(KernelError::LengthMismatch { what: "quantized activations", expected: 5, found: 4 })
    );
    assert_eq!(
        cpu::quantize_act_i8_rows(kernel, &[1.0; 6], 0, &mut [0; 6], &mut []),
        Err(KernelError::ZeroDimension { what: "n_cols" })
    );
    assert_eq!(
        cpu::quantize_act_i8_rows(kernel, &[1.0; 6], 3, &mut [0; 6], &mut [0.0; 3]),
        Err(KernelError::LengthMismatch { what: "activation scales", expected: 2, found: 3 })
    );
}
test_each_kernel!(quantize_rows, quantize_rows_and_errors);

/// RMSNorm: the same f64 algorithm as the scalar reference, only the sum of
/// squares is added in another order, which can move `inv` by an f64 ulp and
/// so an output by at most one f32 ulp: `|a - b| <= 2.5e-7 * |b|`.
fn rms_norm_matches_scalar(kernel: CpuKernel) {
    let strategy = (0..=200usize, prop::sample::select(vec![1e-3f32, 1.0, 1e3])).prop_flat_map(|(len, magnitude)| {
        (prop::collection::vec(-magnitude..magnitude, len), prop::collection::vec(-2.0f32..2.0, len))
    });
    runner(96)
        .run(&strategy, |(x, weight)| {
            let mut expected = vec![0.0f32; x.len()];
            cpu::rms_norm_f32(CpuKernel::Scalar, &x, &weight, 1e-5, &mut expected).unwrap();
            let mut found = vec![0.0f32; x.len()];
            cpu::rms_norm_f32(kernel, &x, &weight, 1e-5, &mut found).unwrap();
            for (i, (&a, &b)) in found.iter().zip(&expected).enumerate() {
                prop_assert!((a - b).abs() <= 2.5e-7 * b.abs(), "index {i}: {a} vs {b}");
            }
            Ok(())
        })
        .unwrap();
    let mut out = [0.0f32; 2];
    cpu::rms_norm_f32(kernel, &[3.0, -4.0], &[1.0, 2.0], 0.0, &mut out).unwrap();
    // mean(x^2) = 12.5, rsqrt = 0.28284271...
    assert!((out[0] - 0.848_528_1).abs() < 1e-6 && (out[1] + 2.262_741_7).abs() < 1e-6, "{out:?}");
    assert_eq!(
        cpu::rms_norm_f32(kernel, &[1.0; 3], &[1.0; 2], 1e-5, &mut [0.0; 3]),
        Err(KernelError::LengthMismatch { what: "rms_norm weight", expected: 3, found: 2 })
    );
}
test_each_kernel!(rms_norm, rms_norm_matches_scalar);

/// Softmax: a polynomial `exp` (within 2 ulp) against libm's `expf`, sums in
/// f64: `|a - b| <= 1e-6 * |b| + 1e-37` per probability.
fn softmax_matches_scalar(kernel: CpuKernel) {
    let value = prop_oneof![8 => -40.0f32..40.0, 1 => Just(f32::NEG_INFINITY)];
    let strategy =
        prop::collection::vec(value, 1..=300).prop_filter("some finite entry", |x| x.iter().any(|v| v.is_finite()));
    runner(128)
        .run(&strategy, |x| {
            let mut expected = x.clone();
            cpu::softmax_f32(CpuKernel::Scalar, &mut expected).unwrap();
            let mut found = x.clone();
            cpu::softmax_f32(kernel, &mut found).unwrap();
            for (i, (&a, &b)) in found.iter().zip(&expected).enumerate() {
                prop_assert!((a - b).abs() <= 1e-6 * b.abs() + 1e-37, "index {i} (x = {}): {a} vs {b}", x[i]);
            }
            let total: f64 = found.iter().map(|&v| f64::from(v)).sum();
            prop_assert!((total - 1.0).abs() < 1e-5);
            Ok(())
        })
        .unwrap();
    let mut x = [0.0, 2f32.ln(), f32::NEG_INFINITY];
    cpu::softmax_f32(kernel, &mut x).unwrap();
    assert!((x[0] - 1.0 / 3.0).abs() < 1e-7 && (x[1] - 2.0 / 3.0).abs() < 1e-7 && x[2] == 0.0, "{x:?}");
    let mut masked = [f32::NEG_INFINITY; 9];
    assert_eq!(
        cpu::softmax_f32(kernel, &mut masked),
        Err(KernelError::NonFiniteValue { what: "softmax maximum", index: 0, value: f32::NEG_INFINITY })
    );
    assert_eq!(masked, [f32::NEG_INFINITY; 9]);
    assert_eq!(cpu::softmax_f32(kernel, &mut []), Ok(()));
}
test_each_kernel!(softmax, softmax_matches_scalar);

fn relu2_mul_is_exact(kernel: CpuKernel) {
    let strategy = (0..=200usize)
        .prop_flat_map(|len| (prop::collection::vec(-1e3f32..1e3, len), prop::collection::vec(-1e3f32..1e3, len)));
    runner(96)
        .run(&strategy, |(gate, up)| {
            let mut expected = gate.clone();
            cpu::relu2_mul_f32(CpuKernel::Scalar, &mut expected, &up).unwrap();
            let mut found = gate.clone();
            cpu::relu2_mul_f32(kernel, &mut found, &up).unwrap();
            prop_assert_eq!(bits(&found), bits(&expected));
            Ok(())
        })
        .unwrap();
    // relu(-2)^2 * 5 = 0, 3^2 * 2 = 18, 300^2 * 1 = 90000 (beyond f16), NaN gate -> 0.
    let mut gate = [-2.0, 3.0, 300.0, f32::NAN, 1.0, 1.0, 1.0, 1.0, 2.0];
    cpu::relu2_mul_f32(kernel, &mut gate, &[5.0, 2.0, 1.0, 7.0, 1.0, 1.0, 1.0, 1.0, -1.0]).unwrap();
    assert_eq!(gate, [0.0, 18.0, 90_000.0, 0.0, 1.0, 1.0, 1.0, 1.0, -4.0]);
    assert_eq!(
        cpu::relu2_mul_f32(kernel, &mut [0.0; 3], &[0.0; 4]),
        Err(KernelError::LengthMismatch { what: "relu2_mul up", expected: 3, found: 4 })
    );
}
test_each_kernel!(relu2_mul, relu2_mul_is_exact);

fn rope_is_exact(kernel: CpuKernel) {
    let strategy = (1..=4usize, 1..=40usize, 0..100_000usize).prop_flat_map(|(n_heads, half, position)| {
        let head_dim = 2 * half;
        (prop::collection::vec(-10.0f32..10.0, n_heads * head_dim), Just(head_dim), Just(position))
    });
    runner(96)
        .run(&strategy, |(x, head_dim, position)| {
            let half = head_dim / 2;
            let angles: Vec<f32> =
                (0..half).map(|i| position as f32 / 500_000f32.powf((2 * i) as f32 / head_dim as f32)).collect();
            let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
            let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
            let mut expected = x.clone();
            cpu::rope_neox_f32(CpuKernel::Scalar, &mut expected, head_dim, &cos, &sin).unwrap();
            let mut found = x.clone();
            cpu::rope_neox_f32(kernel, &mut found, head_dim, &cos, &sin).unwrap();
            prop_assert_eq!(bits(&found), bits(&expected));
            Ok(())
        })
        .unwrap();
    // head_dim 4, pair (0, 2) rotated by 90 degrees: (1, 0) -> (0, 1); pair (1, 3) unrotated.
    let mut x = [1.0, 5.0, 0.0, 7.0];
    cpu::rope_neox_f32(kernel, &mut x, 4, &[0.0, 1.0], &[1.0, 0.0]).unwrap();
    assert_eq!(x, [0.0, 5.0, 1.0, 7.0]);
    for (head_dim, cos_len, expected) in [
        (0, 0, KernelError::ZeroDimension { what: "head_dim" }),
        (3, 1, KernelError::NotMultiple { what: "head_dim", value: 3, multiple: 2 }),
        (6, 3, KernelError::NotMultiple { what: "rope input length", value: 4, multiple: 6 }),
        (4, 3, KernelError::LengthMismatch { what: "rope cos table (head_dim / 2)", expected: 2, found: 3 }),
    ] {
        let cos = vec![1.0; cos_len];
        assert_eq!(cpu::rope_neox_f32(kernel, &mut [0.0; 4], head_dim, &cos, &cos), Err(expected));
    }
}
test_each_kernel!(rope, rope_is_exact);

/// Attention scores against an f64 dot product: every kernel (the scalar
/// reference adds in order, the SIMD kernels in lanes) stays within
/// `2e-5 * scale * sum |q_i k_i|` of the exact value; rows are read
/// `stride` apart from the start of the slice.
fn dot_rows_within_tolerance(kernel: CpuKernel) {
    let strategy = (0..=140usize, 0..=6usize, 0..=20usize, prop::sample::select(vec![1e-3f32, 1.0, 1e3]))
        .prop_flat_map(|(len, pad, n, magnitude)| {
            let stride = len + pad;
            let rows_len = if n == 0 { 0 } else { (n - 1) * stride + len };
            (
                prop::collection::vec(-magnitude..magnitude, len),
                prop::collection::vec(-magnitude..magnitude, rows_len),
                Just(stride),
                Just(n),
            )
        });
    runner(96)
        .run(&strategy, |(q, rows, stride, n)| {
            let scale = 0.125f32;
            let mut found = vec![0.0f32; n];
            cpu::dot_rows_f32(kernel, &q, &rows, stride, scale, &mut found).unwrap();
            for (p, &f) in found.iter().enumerate() {
                let row = &rows[p * stride..p * stride + q.len()];
                let exact: f64 = q.iter().zip(row).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                let magnitude: f64 = q.iter().zip(row).map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs()).sum();
                let err = (f64::from(f) - exact * f64::from(scale)).abs();
                prop_assert!(err <= 2e-5 * f64::from(scale) * magnitude + 1e-30, "row {p}: {f} vs {}", exact * 0.125);
            }
            Ok(())
        })
        .unwrap();
    // Two rows of 3 values, 4 apart: (1,2,3).(1,0,2) = 7 and (1,2,3).(3,1,1) = 8, scaled by 0.5.
    let mut out = [0.0f32; 2];
    cpu::dot_rows_f32(kernel, &[1.0, 2.0, 3.0], &[1.0, 0.0, 2.0, 9.0, 3.0, 1.0, 1.0], 4, 0.5, &mut out).unwrap();
    assert_eq!(out, [3.5, 4.0]);
    assert_eq!(
        cpu::dot_rows_f32(kernel, &[1.0; 3], &[1.0; 6], 4, 1.0, &mut [0.0; 2]),
        Err(KernelError::LengthMismatch { what: "attention key rows", expected: 7, found: 6 })
    );
    assert!(matches!(
        cpu::dot_rows_f32(kernel, &[1.0; 3], &[1.0; 9], 2, 1.0, &mut [0.0; 2]),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert_eq!(cpu::dot_rows_f32(kernel, &[1.0; 3], &[], 3, 1.0, &mut []), Ok(()));
}
test_each_kernel!(dot_rows, dot_rows_within_tolerance);

/// The weighted sum of value rows gives the scalar reference's bits on
/// every kernel (multiply, then add, in order of the rows).
fn weighted_rows_is_exact(kernel: CpuKernel) {
    let strategy = (0..=140usize, 0..=6usize, 0..=20usize).prop_flat_map(|(len, pad, n)| {
        let stride = len + pad;
        let rows_len = if n == 0 { 0 } else { (n - 1) * stride + len };
        (
            prop::collection::vec(0.0f32..1.0, n),
            prop::collection::vec(-100.0f32..100.0, rows_len),
            Just(stride),
            Just(len),
        )
    });
    runner(96)
        .run(&strategy, |(weights, rows, stride, len)| {
            let mut expected = vec![f32::NAN; len];
            cpu::weighted_rows_f32(CpuKernel::Scalar, &weights, &rows, stride, &mut expected).unwrap();
            let mut found = vec![f32::NAN; len];
            cpu::weighted_rows_f32(kernel, &weights, &rows, stride, &mut found).unwrap();
            prop_assert_eq!(bits(&found), bits(&expected));
            Ok(())
        })
        .unwrap();
    // 0.25 * (4, 8) + 0.5 * (2, -6), rows 3 apart: (1 + 1, 2 - 3) = (2, -1).
    let mut out = [7.0f32; 2];
    cpu::weighted_rows_f32(kernel, &[0.25, 0.5], &[4.0, 8.0, 99.0, 2.0, -6.0], 3, &mut out).unwrap();
    assert_eq!(out, [2.0, -1.0]);
    let mut none = [7.0f32; 2];
    cpu::weighted_rows_f32(kernel, &[], &[], 2, &mut none).unwrap();
    assert_eq!(none, [0.0, 0.0]);
    assert_eq!(
        cpu::weighted_rows_f32(kernel, &[1.0, 1.0], &[0.0; 4], 3, &mut [0.0; 2]),
        Err(KernelError::LengthMismatch { what: "attention value rows", expected: 5, found: 4 })
    );
}
test_each_kernel!(weighted_rows, weighted_rows_is_exact);

/// The read-bandwidth probes' sums are the wrapping sum of the words on every
/// kernel (one stream, and two in lockstep): checked against `u128` arithmetic reduced mod 2^64, on lengths
/// around the 16-word step and with values that overflow `u64`.
fn sum_u64_is_exact(kernel: CpuKernel) {
    let strategy = (0..=200usize).prop_flat_map(|len| prop::collection::vec(any::<u64>(), len));
    runner(96)
        .run(&strategy, |words| {
            let expected = words.iter().map(|&w| u128::from(w)).sum::<u128>() as u64;
            prop_assert_eq!(cpu::sum_u64(kernel, &words).unwrap(), expected);
            // The two-stream probe, split anywhere (unequal halves too).
            for cut in [0, words.len() / 3, words.len() / 2, words.len()] {
                let (a, b) = words.split_at(cut);
                prop_assert_eq!(cpu::sum_u64_pair(kernel, a, b).unwrap(), expected, "cut at {}", cut);
            }
            Ok(())
        })
        .unwrap();
    // 1 + 2 + ... + 40 = 820; u64::MAX + 2 wraps to 1.
    let words: Vec<u64> = (1..=40).collect();
    assert_eq!(cpu::sum_u64(kernel, &words).unwrap(), 820);
    assert_eq!(cpu::sum_u64(kernel, &[u64::MAX, 2]).unwrap(), 1);
    assert_eq!(cpu::sum_u64(kernel, &[]).unwrap(), 0);
}
test_each_kernel!(sum_u64, sum_u64_is_exact);

/// Random shapes for the grouped-head kernels: heads 1-5 (2 and 4 take the
/// AVX2 grouped paths), 0-140 values per head, 0-6 of padding between rows,
/// 0-20 positions.
fn heads_shape() -> impl Strategy<Value = (usize, usize, usize, usize)> {
    (1..=5usize, 0..=140usize, 0..=6usize, 0..=20usize)
}

/// Scores of several heads at once: each head's scores within the bound of
/// [`dot_rows_within_tolerance`] of its f64 dot products.
fn dot_rows_heads_within_tolerance(kernel: CpuKernel) {
    let strategy = (heads_shape(), prop::sample::select(vec![1e-3f32, 1.0, 1e3])).prop_flat_map(
        |((heads, len, pad, n), magnitude)| {
            let stride = len + pad;
            let rows_len = if n == 0 { 0 } else { (n - 1) * stride + len };
            (
                prop::collection::vec(-magnitude..magnitude, heads * len),
                prop::collection::vec(-magnitude..magnitude, rows_len),
                Just((heads, len, stride, n)),
            )
        },
    );
    runner(96)
        .run(&strategy, |(q, rows, (heads, len, stride, n))| {
            let scale = 0.125f32;
            let mut found = vec![f32::NAN; heads * n];
            cpu::dot_rows_heads_f32(kernel, &q, heads, &rows, stride, scale, &mut found).unwrap();
            for h in 0..heads {
                let qh = &q[h * len..(h + 1) * len];
                for p in 0..n {
                    let row = &rows[p * stride..p * stride + len];
                    let exact: f64 = qh.iter().zip(row).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                    let magnitude: f64 = qh.iter().zip(row).map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs()).sum();
                    let f = found[h * n + p];
                    let err = (f64::from(f) - exact * f64::from(scale)).abs();
                    prop_assert!(err <= 2e-5 * f64::from(scale) * magnitude + 1e-30, "head {h} row {p}: {f}");
                }
            }
            Ok(())
        })
        .unwrap();
    // Two heads (1,2) and (0,1) over rows (3,4) and (5,6), 2 apart: 11, 17 and 4, 6.
    let mut out = [0.0f32; 4];
    cpu::dot_rows_heads_f32(kernel, &[1.0, 2.0, 0.0, 1.0], 2, &[3.0, 4.0, 5.0, 6.0], 2, 1.0, &mut out).unwrap();
    assert_eq!(out, [11.0, 17.0, 4.0, 6.0]);
    assert_eq!(
        cpu::dot_rows_heads_f32(kernel, &[1.0; 3], 2, &[1.0; 8], 2, 1.0, &mut [0.0; 4]),
        Err(KernelError::NotMultiple { what: "attention queries", value: 3, multiple: 2 })
    );
    assert_eq!(
        cpu::dot_rows_heads_f32(kernel, &[1.0; 4], 0, &[1.0; 8], 2, 1.0, &mut [0.0; 4]),
        Err(KernelError::ZeroDimension { what: "attention heads" })
    );
    assert_eq!(
        cpu::dot_rows_heads_f32(kernel, &[1.0; 4], 2, &[1.0; 5], 4, 1.0, &mut [0.0; 4]),
        Err(KernelError::LengthMismatch { what: "attention key rows", expected: 6, found: 5 })
    );
}
test_each_kernel!(dot_rows_heads, dot_rows_heads_within_tolerance);

/// Weighted sums of several heads at once: the scalar reference's bits,
/// head by head.
fn weighted_rows_heads_is_exact(kernel: CpuKernel) {
    let strategy = heads_shape().prop_flat_map(|(heads, len, pad, n)| {
        let stride = len + pad;
        let rows_len = if n == 0 { 0 } else { (n - 1) * stride + len };
        (
            prop::collection::vec(0.0f32..1.0, heads * n),
            prop::collection::vec(-100.0f32..100.0, rows_len),
            Just((heads, len, stride, n)),
        )
    });
    runner(96)
        .run(&strategy, |(weights, rows, (heads, len, stride, n))| {
            let mut found = vec![f32::NAN; heads * len];
            cpu::weighted_rows_heads_f32(kernel, &weights, heads, &rows, stride, &mut found).unwrap();
            for h in 0..heads {
                let mut expected = vec![f32::NAN; len];
                cpu::weighted_rows_f32(CpuKernel::Scalar, &weights[h * n..(h + 1) * n], &rows, stride, &mut expected)
                    .unwrap();
                prop_assert_eq!(bits(&found[h * len..(h + 1) * len]), bits(&expected), "head {}", h);
            }
            Ok(())
        })
        .unwrap();
    // Heads with weights (1, 0) and (0.5, 0.5) over rows (2, 4) and (6, 8), 3 apart.
    let mut out = [0.0f32; 4];
    cpu::weighted_rows_heads_f32(kernel, &[1.0, 0.0, 0.5, 0.5], 2, &[2.0, 4.0, 9.0, 6.0, 8.0], 3, &mut out).unwrap();
    assert_eq!(out, [2.0, 4.0, 4.0, 6.0]);
    assert_eq!(
        cpu::weighted_rows_heads_f32(kernel, &[1.0; 4], 2, &[1.0; 4], 3, &mut [0.0; 3]),
        Err(KernelError::NotMultiple { what: "attention outputs", value: 3, multiple: 2 })
    );
}
test_each_kernel!(weighted_rows_heads, weighted_rows_heads_is_exact);

/// The attention products over an f16 cache equal those over the same values
/// stored as f32, bit for bit, on the same kernel (every f16 converts to f32
/// exactly); the portable kernel computes the f16 products as the scalar one
/// does. Also checks the f16 entry points' length checks.
fn f16_cache_products_equal_f32_ones(kernel: CpuKernel) {
    use half::f16;
    let strategy = (heads_shape(), prop::sample::select(vec![1e-2f32, 1.0, 3e2])).prop_flat_map(
        |((heads, len, pad, n), magnitude)| {
            let stride = len + pad;
            let rows_len = if n == 0 { 0 } else { (n - 1) * stride + len };
            (
                prop::collection::vec(-magnitude..magnitude, heads * len),
                prop::collection::vec(-magnitude..magnitude, rows_len),
                prop::collection::vec(0.0f32..1.0, heads * n),
                Just((heads, len, stride, n)),
            )
        },
    );
    // The f32 products the f16 ones must equal: the same kernel, except that
    // the portable kernel's f16 products are the scalar code's.
    let same = if kernel == CpuKernel::Portable { CpuKernel::Scalar } else { kernel };
    runner(96)
        .run(&strategy, |(q, rows, weights, (heads, len, stride, n))| {
            let rows16: Vec<f16> = rows.iter().map(|&v| f16::from_f32(v)).collect();
            let rows32: Vec<f32> = rows16.iter().map(|v| v.to_f32()).collect();
            let (mut s16, mut s32) = (vec![f32::NAN; heads * n], vec![f32::NAN; heads * n]);
            cpu::dot_rows_heads_f16(kernel, &q, heads, &rows16, stride, 0.125, &mut s16).unwrap();
            cpu::dot_rows_heads_f32(same, &q, heads, &rows32, stride, 0.125, &mut s32).unwrap();
            prop_assert_eq!(
                s16.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                s32.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let (mut o16, mut o32) = (vec![f32::NAN; heads * len], vec![f32::NAN; heads * len]);
            cpu::weighted_rows_heads_f16(kernel, &weights, heads, &rows16, stride, &mut o16).unwrap();
            cpu::weighted_rows_heads_f32(same, &weights, heads, &rows32, stride, &mut o32).unwrap();
            prop_assert_eq!(
                o16.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                o32.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            Ok(())
        })
        .unwrap();
    // Hand-derived: heads (1, 2) and (0, 1) over f16 rows (3, 4), (5, 6).
    let rows: Vec<f16> = [3.0f32, 4.0, 5.0, 6.0].iter().map(|&v| f16::from_f32(v)).collect();
    let mut out = [0.0f32; 4];
    cpu::dot_rows_heads_f16(kernel, &[1.0, 2.0, 0.0, 1.0], 2, &rows, 2, 1.0, &mut out).unwrap();
    assert_eq!(out, [11.0, 17.0, 4.0, 6.0]);
    // Weights (0.5, 0.25) and (1, 0): 0.5 * (3, 4) + 0.25 * (5, 6) and (3, 4).
    let mut out = [0.0f32; 4];
    cpu::weighted_rows_heads_f16(kernel, &[0.5, 0.25, 1.0, 0.0], 2, &rows, 2, &mut out).unwrap();
    assert_eq!(out, [2.75, 3.5, 3.0, 4.0]);
    assert_eq!(
        cpu::dot_rows_heads_f16(kernel, &[1.0; 4], 2, &rows[..3], 2, 1.0, &mut [0.0; 4]),
        Err(KernelError::LengthMismatch { what: "attention key rows", expected: 4, found: 3 })
    );
    assert_eq!(
        cpu::weighted_rows_heads_f16(kernel, &[1.0; 4], 2, &rows[..3], 2, &mut [0.0; 4]),
        Err(KernelError::LengthMismatch { what: "attention value rows", expected: 4, found: 3 })
    );
}
test_each_kernel!(f16_cache_products, f16_cache_products_equal_f32_ones);
