//! I2_S x int8 kernels: the scalar kernel against a decode-with-bitnet_quant
//! reference, and every other kernel against the scalar one, exactly.

mod common;

use bitnet_kernels::cpu::{self, CpuKernel, I2sMatrixRef, I2S_MAX_K};
use bitnet_kernels::KernelError;
use bitnet_quant::i2s;
use common::{runner, test_each_kernel};
use proptest::prelude::*;

/// The obvious reference: decode every row with `bitnet_quant`, then an i64 dot product.
fn naive_gemm(ternary: &[i8], rows: usize, k: usize, q: &[i8], n_tokens: usize) -> Vec<i32> {
    let codes = i2s::encode_i2s(ternary, 1.0).unwrap();
    let mut row = vec![0i8; k];
    let mut out = vec![0i32; n_tokens * rows];
    for j in 0..rows {
        i2s::decode_i2s_codes_into(&codes[j * k / 4..(j + 1) * k / 4], &mut row).unwrap();
        for t in 0..n_tokens {
            let dot: i64 = row.iter().zip(&q[t * k..(t + 1) * k]).map(|(&w, &a)| i64::from(w) * i64::from(a)).sum();
            out[t * rows + j] = i32::try_from(dot).unwrap();
        }
    }
    out
}

fn gemm(kernel: CpuKernel, codes: &[u8], rows: usize, k: usize, q: &[i8], n_tokens: usize) -> Vec<i32> {
    let w = I2sMatrixRef::new(codes, rows, k).unwrap();
    let mut out = vec![i32::MIN; n_tokens * rows];
    cpu::gemm_i2s_i8(kernel, w, q, n_tokens, &mut out).unwrap();
    out
}

/// Shapes with 0..=5 blocks per row (odd counts exercise the AVX-512 tail
/// block), 0..=37 rows (not a multiple of the 4-row or 16-row groupings) and
/// 0..=9 tokens (full and partial token tiles).
fn shape() -> impl Strategy<Value = (usize, usize, usize)> {
    (0..=37usize, 0..=5usize, 0..=9usize).prop_map(|(rows, blocks, n_tokens)| (rows, blocks * 128, n_tokens))
}

#[test]
fn scalar_matches_decode_then_dot() {
    let strategy = shape().prop_flat_map(|(rows, k, n_tokens)| {
        (
            Just((rows, k, n_tokens)),
            prop::collection::vec(prop::sample::select(vec![-1i8, 0, 1]), rows * k),
            prop::collection::vec(any::<i8>(), n_tokens * k),
        )
    });
    runner(64)
        .run(&strategy, |((rows, k, n_tokens), ternary, q)| {
            let codes = i2s::encode_i2s(&ternary, 1.0).unwrap();
            let found = gemm(CpuKernel::Scalar, &codes[..rows * k / 4], rows, k, &q, n_tokens);
            prop_assert_eq!(found, naive_gemm(&ternary, rows, k, &q, n_tokens));
            Ok(())
        })
        .unwrap();
}

/// Shapes `(rows, k, n_tokens)` from `shapes` with arbitrary code bytes and activations.
fn random_inputs(
    shapes: impl Strategy<Value = (usize, usize, usize)>,
) -> impl Strategy<Value = ((usize, usize, usize), Vec<u8>, Vec<i8>)> {
    shapes.prop_flat_map(|(rows, k, n_tokens)| {
        (
            Just((rows, k, n_tokens)),
            prop::collection::vec(any::<u8>(), rows * k / 4),
            prop::collection::vec(any::<i8>(), n_tokens * k),
        )
    })
}

/// Arbitrary code bytes, including the unused code 3: every kernel computes
/// `sum(code * q) - sum(q)`, so even those must agree exactly.
fn matches_scalar_on_random_inputs(kernel: CpuKernel) {
    matches_scalar_on(kernel, shape(), 96, true);
}
test_each_kernel!(random_inputs_match_scalar, matches_scalar_on_random_inputs);

/// Passes of 16 to 70 tokens (AMX's tiles: one token group, several, an odd
/// count, a partial last one), 0..=80 rows (blocks of 32 and 16 rows and a
/// remainder below 16) and 0..=5 blocks (even counts on the tiles, odd ones
/// on the AVX-512 kernel).
fn many_token_passes_match_scalar(kernel: CpuKernel) {
    let shapes =
        (0..=80usize, 0..=5usize, 16..=70usize).prop_map(|(rows, blocks, n_tokens)| (rows, blocks * 128, n_tokens));
    matches_scalar_on(kernel, shapes, 48, false);
}

/// `cases` random inputs of `shapes`: exactly the scalar kernel's result in
/// one call and split over a pool of 3 threads, and (`per_token`) token by
/// token through the GEMV entry points.
fn matches_scalar_on(
    kernel: CpuKernel,
    shapes: impl Strategy<Value = (usize, usize, usize)>,
    cases: u32,
    per_token: bool,
) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    runner(cases)
        .run(&random_inputs(shapes), |((rows, k, n_tokens), codes, q)| {
            let expected = gemm(CpuKernel::Scalar, &codes, rows, k, &q, n_tokens);
            prop_assert_eq!(&gemm(kernel, &codes, rows, k, &q, n_tokens), &expected);

            let w = I2sMatrixRef::new(&codes, rows, k).unwrap();
            let mut par = vec![i32::MIN; n_tokens * rows];
            pool.install(|| cpu::gemm_i2s_i8_par(kernel, w, &q, n_tokens, &mut par)).unwrap();
            prop_assert_eq!(&par, &expected);

            for t in (0..n_tokens).filter(|_| per_token) {
                let token_q = &q[t * k..(t + 1) * k];
                let mut single = vec![i32::MIN; rows];
                cpu::gemv_i2s_i8(kernel, w, token_q, &mut single).unwrap();
                prop_assert_eq!(&single[..], &expected[t * rows..(t + 1) * rows]);
                cpu::gemv_i2s_i8_par(kernel, w, token_q, &mut single).unwrap();
                prop_assert_eq!(&single[..], &expected[t * rows..(t + 1) * rows]);
            }
            Ok(())
        })
        .unwrap();
}
test_each_kernel!(many_token_passes, many_token_passes_match_scalar);

/// Prefill at the 2B-4T widths (k = 2560 and 6912: 10 and 27 block pairs),
/// 200 rows (six blocks of 32 and 8 rows left over), 16, 37, 128 and 200
/// tokens (AMX tasks take blocks of 128 tokens),
/// ternary weights against the decode-then-dot reference, extreme
/// activations included: one call and the parallel one on 1 and 4 threads.
fn prefill_matches_reference_at_model_widths(kernel: CpuKernel) {
    for k in [2560, 6912] {
        let rows = 200;
        let ternary: Vec<i8> = (0..rows * k).map(|i| ((i * 7 + i / 13) % 3) as i8 - 1).collect();
        let codes = i2s::encode_i2s(&ternary, 1.0).unwrap();
        for n_tokens in [16, 37, 128, 200] {
            let q: Vec<i8> = (0..n_tokens * k)
                .map(|i| match i % 97 {
                    0 => -128,
                    1 => 127,
                    _ => ((i * 31 + 7) % 256) as u8 as i8,
                })
                .collect();
            let expected = naive_gemm(&ternary, rows, k, &q, n_tokens);
            assert_eq!(
                gemm(kernel, &codes[..rows * k / 4], rows, k, &q, n_tokens),
                expected,
                "k {k}, {n_tokens} tokens"
            );
            let w = I2sMatrixRef::new(&codes[..rows * k / 4], rows, k).unwrap();
            for threads in [1, 4] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut par = vec![i32::MIN; n_tokens * rows];
                pool.install(|| cpu::gemm_i2s_i8_par(kernel, w, &q, n_tokens, &mut par)).unwrap();
                assert_eq!(par, expected, "k {k}, {n_tokens} tokens, {threads} threads");
            }
        }
    }
}
test_each_kernel!(prefill_at_model_widths, prefill_matches_reference_at_model_widths);

/// The 2B-4T projection width (k = 2560, 20 blocks) with enough rows for
/// several parallel chunks, ternary weights, and a prefill of 7 tokens.
fn matches_reference_at_model_width(kernel: CpuKernel) {
    let (rows, k, n_tokens) = (200, 2560, 7);
    let ternary: Vec<i8> = (0..rows * k).map(|i| ((i * 7 + i / 13) % 3) as i8 - 1).collect();
    let q: Vec<i8> = (0..n_tokens * k).map(|i| ((i * 31 + 7) % 256) as u8 as i8).collect();
    let codes = i2s::encode_i2s(&ternary, 1.0).unwrap();
    let expected = naive_gemm(&ternary, rows, k, &q, n_tokens);
    assert_eq!(gemm(kernel, &codes[..rows * k / 4], rows, k, &q, n_tokens), expected);
    let w = I2sMatrixRef::from_gguf_tensor(&codes, rows, k).unwrap();
    let mut par = vec![0; n_tokens * rows];
    cpu::gemm_i2s_i8_par(kernel, w, &q, n_tokens, &mut par).unwrap();
    assert_eq!(par, expected);
}
test_each_kernel!(model_width_matches_reference, matches_reference_at_model_width);

/// Decode (one token) at the 2B-4T widths (10 and 27 block pairs per row,
/// the shapes decode streams), 37 rows, one call and the parallel one.
fn decode_matches_reference_at_model_widths(kernel: CpuKernel) {
    for k in [2560, 6912] {
        let rows = 37;
        let ternary: Vec<i8> = (0..rows * k).map(|i| ((i * 5 + i / 11) % 3) as i8 - 1).collect();
        let q: Vec<i8> = (0..k).map(|i| ((i * 29 + 3) % 256) as u8 as i8).collect();
        let codes = i2s::encode_i2s(&ternary, 1.0).unwrap();
        let expected = naive_gemm(&ternary, rows, k, &q, 1);
        assert_eq!(gemm(kernel, &codes[..rows * k / 4], rows, k, &q, 1), expected, "k {k}");
        let w = I2sMatrixRef::new(&codes[..rows * k / 4], rows, k).unwrap();
        let mut par = vec![i32::MIN; rows];
        cpu::gemv_i2s_i8_par(kernel, w, &q, &mut par).unwrap();
        assert_eq!(par, expected, "k {k}, parallel");
    }
}
test_each_kernel!(decode_at_model_widths, decode_matches_reference_at_model_widths);

/// The largest magnitudes: codes 2 (and 0) against -128 and 127 over a long
/// row, where a saturating or 16-bit accumulation would show.
fn extreme_values_are_exact(kernel: CpuKernel) {
    let k = 16 * 1024;
    for (code_byte, value) in [(0xAAu8, -128i8), (0xAA, 127), (0x00, -128), (0x00, 127), (0xFF, -128), (0xFF, 127)] {
        let codes = vec![code_byte; k / 4];
        let q = vec![value; k];
        let code = i64::from(code_byte & 3);
        let expected = i32::try_from((code - 1) * i64::from(value) * k as i64).unwrap();
        assert_eq!(gemm(kernel, &codes, 1, k, &q, 1), [expected], "code byte {code_byte:#x}, q {value}");
    }
}
test_each_kernel!(extreme_values, extreme_values_are_exact);

/// Rows of a known pattern: row j is +1 at column j only, so the output is
/// the activation itself, in the right slot for every token.
fn identity_rows_pick_columns(kernel: CpuKernel) {
    let (rows, k, n_tokens) = (128, 128, 5);
    let mut ternary = vec![0i8; rows * k];
    for j in 0..rows {
        ternary[j * k + j] = 1;
    }
    let codes = i2s::encode_i2s(&ternary, 1.0).unwrap();
    let q: Vec<i8> = (0..n_tokens * k).map(|i| (i % 200) as i8).collect();
    assert_eq!(
        gemm(kernel, &codes[..rows * k / 4], rows, k, &q, n_tokens),
        q.iter().map(|&v| i32::from(v)).collect::<Vec<_>>()
    );
}
test_each_kernel!(identity_rows, identity_rows_pick_columns);

#[test]
fn bad_lengths_are_errors_not_panics() {
    let codes = vec![0x55u8; 2 * 32];
    let w = I2sMatrixRef::new(&codes, 2, 128).unwrap();
    for kernel in CpuKernel::all_available() {
        let mut out = vec![0; 2];
        assert_eq!(
            cpu::gemv_i2s_i8(kernel, w, &[0; 127], &mut out),
            Err(KernelError::LengthMismatch { what: "activations (n_tokens * k)", expected: 128, found: 127 })
        );
        assert_eq!(
            cpu::gemv_i2s_i8(kernel, w, &[0; 128], &mut out[..1]),
            Err(KernelError::LengthMismatch { what: "output (n_tokens * rows)", expected: 2, found: 1 })
        );
        assert_eq!(
            cpu::gemm_i2s_i8_par(kernel, w, &[0; 256], 2, &mut out),
            Err(KernelError::LengthMismatch { what: "output (n_tokens * rows)", expected: 4, found: 2 })
        );
        assert!(matches!(
            cpu::gemm_i2s_i8(kernel, w, &[0; 128], usize::MAX, &mut out),
            Err(KernelError::DimensionTooLarge { .. })
        ));
        // Zero tokens or zero rows: nothing to do, no error.
        assert_eq!(cpu::gemm_i2s_i8(kernel, w, &[], 0, &mut []), Ok(()));
    }
    assert!(matches!(I2sMatrixRef::new(&[], 0, I2S_MAX_K * 2), Err(KernelError::DimensionTooLarge { .. })));
}

#[test]
fn unavailable_kernels_are_refused() {
    let codes = vec![0x55u8; 32];
    let w = I2sMatrixRef::new(&codes, 1, 128).unwrap();
    for kernel in CpuKernel::ALL {
        let mut out = [7];
        let result = cpu::gemv_i2s_i8(kernel, w, &[1; 128], &mut out);
        if kernel.is_available() {
            assert_eq!((result, out), (Ok(()), [0]), "{kernel}");
        } else {
            assert_eq!(result, Err(KernelError::KernelUnavailable { kernel: kernel.name() }));
            assert_eq!(out, [7], "{kernel} wrote output");
        }
    }
}

#[test]
fn par_uses_the_current_pool() {
    // Results do not depend on the pool size; a one-thread pool runs everything inline.
    let (rows, k) = (100, 256);
    let codes: Vec<u8> = (0..rows * k / 4).map(|i| (i * 37 % 251) as u8).collect();
    let q: Vec<i8> = (0..3 * k).map(|i| (i as i32 * 5 - 300) as i8).collect();
    let expected = gemm(CpuKernel::Scalar, &codes, rows, k, &q, 3);
    let w = I2sMatrixRef::new(&codes, rows, k).unwrap();
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut out = vec![0; 3 * rows];
        pool.install(|| cpu::gemm_i2s_i8_par(cpu::select_kernel_from(None).unwrap(), w, &q, 3, &mut out)).unwrap();
        assert_eq!(out, expected, "{threads} threads");
    }
}

/// Ternary matrices of `shapes` rows and `k` columns (matrix `m`'s element
/// `i` from `pattern(m, i)`) and their I2_S codes.
fn ternary_group(shapes: &[usize], k: usize, pattern: impl Fn(usize, usize) -> i8) -> (Vec<Vec<i8>>, Vec<Vec<u8>>) {
    let ternaries: Vec<Vec<i8>> =
        shapes.iter().enumerate().map(|(m, &rows)| (0..rows * k).map(|i| pattern(m, i)).collect()).collect();
    let codes = ternaries.iter().map(|t| i2s::encode_i2s(t, 1.0).unwrap()).collect();
    (ternaries, codes)
}

/// A grouped call's jobs: each matrix's codes (without the GGUF trailer) and its output.
fn group_jobs<'a>(
    codes: &'a [Vec<u8>],
    shapes: &[usize],
    k: usize,
    outs: &'a mut [Vec<i32>],
) -> Vec<(I2sMatrixRef<'a>, &'a mut [i32])> {
    codes
        .iter()
        .zip(shapes)
        .zip(outs.iter_mut())
        .map(|((c, &rows), o)| (I2sMatrixRef::new(&c[..rows * k / 4], rows, k).unwrap(), o.as_mut_slice()))
        .collect()
}

/// Decode-sized passes (one to four tokens) run as one stream per pool
/// thread, in blocks an idle thread may take from another's share: at the
/// 2B-4T width, a group big enough for several blocks per share gives the
/// reference product on pools of 1, 2, 3 and 5 threads.
#[test]
fn streamed_shares_match_reference_on_any_pool() {
    let k = 2560;
    let shapes = [1000usize, 300, 17];
    let (ternaries, codes) = ternary_group(&shapes, k, |m, i| ((i * 11 + i / 7 + m) % 3) as i8 - 1);
    let kernel = cpu::select_kernel_from(None).unwrap();
    for n_tokens in [1, 4] {
        let q: Vec<i8> = (0..n_tokens * k).map(|i| ((i * 31 + 7) % 256) as u8 as i8).collect();
        let expected: Vec<Vec<i32>> =
            shapes.iter().zip(&ternaries).map(|(&rows, t)| naive_gemm(t, rows, k, &q, n_tokens)).collect();
        for threads in [1, 2, 3, 5] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut outs: Vec<Vec<i32>> = shapes.iter().map(|&rows| vec![i32::MIN; n_tokens * rows]).collect();
            let mut jobs = group_jobs(&codes, &shapes, k, &mut outs);
            pool.install(|| cpu::gemm_i2s_i8_par_group(kernel, &mut jobs, &q, n_tokens)).unwrap();
            assert_eq!(outs, expected, "{n_tokens} tokens, {threads} threads");
            let mut single = vec![i32::MIN; n_tokens * shapes[0]];
            let w = I2sMatrixRef::new(&codes[0][..shapes[0] * k / 4], shapes[0], k).unwrap();
            pool.install(|| cpu::gemm_i2s_i8_par(kernel, w, &q, n_tokens, &mut single)).unwrap();
            assert_eq!(single, expected[0], "one matrix, {n_tokens} tokens, {threads} threads");
        }
    }
}

/// Grouped matrices (q, k, v shapes of 2B-4T scaled down, different row
/// counts, one shared input) give each matrix the exact reference product.
fn group_matches_reference(kernel: CpuKernel) {
    let (k, n_tokens) = (512, 3);
    let q: Vec<i8> = (0..n_tokens * k).map(|i| ((i * 31 + 7) % 256) as u8 as i8).collect();
    let shapes = [200usize, 40, 40, 0, 17];
    let (ternaries, codes) = ternary_group(&shapes, k, |m, i| ((i * 7 + i / 13 + m) % 3) as i8 - 1);
    let mut outs: Vec<Vec<i32>> = shapes.iter().map(|&rows| vec![i32::MIN; n_tokens * rows]).collect();
    let mut jobs = group_jobs(&codes, &shapes, k, &mut outs);
    cpu::gemm_i2s_i8_par_group(kernel, &mut jobs, &q, n_tokens).unwrap();
    for (m, &rows) in shapes.iter().enumerate() {
        assert_eq!(outs[m], naive_gemm(&ternaries[m], rows, k, &q, n_tokens), "matrix {m}");
    }
    // A matrix of another width in the group is an error, not a panic.
    let other = i2s::encode_i2s(&vec![1i8; 4 * 256], 1.0).unwrap();
    let mut o1 = vec![0i32; n_tokens * 200];
    let mut o2 = vec![0i32; n_tokens * 4];
    let mut bad = vec![
        (I2sMatrixRef::new(&codes[0][..200 * k / 4], 200, k).unwrap(), o1.as_mut_slice()),
        (I2sMatrixRef::new(&other[..4 * 256 / 4], 4, 256).unwrap(), o2.as_mut_slice()),
    ];
    assert!(cpu::gemm_i2s_i8_par_group(kernel, &mut bad, &q, n_tokens).is_err());
}
test_each_kernel!(grouped_gemm, group_matches_reference);
