//! Int8 x int8 GEMV: the scalar kernel against an i64 reference, and every
//! other kernel against the scalar one, exactly, on random shapes and from
//! unaligned storage.

mod common;

use bitnet_kernels::cpu::{self, CpuKernel, I8MatrixRef, I8_MAX_K};
use bitnet_kernels::KernelError;
use common::{runner, test_each_kernel};
use proptest::prelude::*;

/// The obvious reference: an i64 dot product per row.
fn naive_gemv(w: &[i8], rows: usize, k: usize, q: &[i8]) -> Vec<i32> {
    (0..rows)
        .map(|j| {
            let dot: i64 = w[j * k..(j + 1) * k].iter().zip(q).map(|(&a, &b)| i64::from(a) * i64::from(b)).sum();
            i32::try_from(dot).unwrap()
        })
        .collect()
}

fn gemv(kernel: CpuKernel, w: &[i8], rows: usize, k: usize, q: &[i8]) -> Vec<i32> {
    let matrix = I8MatrixRef::new(w, rows, k).unwrap();
    let mut out = vec![i32::MIN; rows];
    cpu::gemv_i8_i8(kernel, matrix, q, &mut out).unwrap();
    out
}

/// 0..=41 rows (not a multiple of the 4-row groups or the 16-row parallel
/// chunks) and k in 0..=300 (every tail length of the 16- and 64-wide steps).
fn shape() -> impl Strategy<Value = (usize, usize)> {
    (0..=41usize, 0..=300usize)
}

fn inputs() -> impl Strategy<Value = ((usize, usize), Vec<i8>, Vec<i8>)> {
    shape().prop_flat_map(|(rows, k)| {
        (Just((rows, k)), prop::collection::vec(any::<i8>(), rows * k), prop::collection::vec(any::<i8>(), k))
    })
}

#[test]
fn scalar_matches_the_i64_reference() {
    runner(64)
        .run(&inputs(), |((rows, k), w, q)| {
            prop_assert_eq!(gemv(CpuKernel::Scalar, &w, rows, k, &q), naive_gemv(&w, rows, k, &q));
            Ok(())
        })
        .unwrap();
}

fn matches_scalar_on_random_inputs(kernel: CpuKernel) {
    runner(96)
        .run(&inputs(), |((rows, k), w, q)| {
            let expected = gemv(CpuKernel::Scalar, &w, rows, k, &q);
            // One byte past the start of the buffer, so no load is aligned.
            let mut storage = vec![0i8; w.len() + 1];
            storage[1..].copy_from_slice(&w);
            let unaligned = &storage[1..];
            prop_assert_eq!(&gemv(kernel, unaligned, rows, k, &q), &expected);

            let matrix = I8MatrixRef::new(unaligned, rows, k).unwrap();
            let mut par = vec![i32::MIN; rows];
            cpu::gemv_i8_i8_par(kernel, matrix, &q, &mut par).unwrap();
            prop_assert_eq!(&par, &expected);
            Ok(())
        })
        .unwrap();
}
test_each_kernel!(random_inputs_match_scalar, matches_scalar_on_random_inputs);

/// The 2B-4T head width (k = 2560) with enough rows for several parallel chunks.
fn matches_reference_at_model_width(kernel: CpuKernel) {
    let (rows, k) = (300, 2560);
    let w: Vec<i8> = (0..rows * k).map(|i| ((i * 131 + i / 7) % 256) as u8 as i8).collect();
    let q: Vec<i8> = (0..k).map(|i| ((i * 31 + 7) % 256) as u8 as i8).collect();
    let expected = naive_gemv(&w, rows, k, &q);
    assert_eq!(gemv(kernel, &w, rows, k, &q), expected);
    let mut par = vec![0; rows];
    cpu::gemv_i8_i8_par(kernel, I8MatrixRef::new(&w, rows, k).unwrap(), &q, &mut par).unwrap();
    assert_eq!(par, expected);
}
test_each_kernel!(model_width_matches_reference, matches_reference_at_model_width);

/// The largest magnitudes over the longest allowed row: `-128 * -128` pairs
/// (which saturate `vpmaddubsw`) and the sign flips around them.
fn extreme_values_are_exact(kernel: CpuKernel) {
    let k = I8_MAX_K;
    for (weight, value) in [(-128i8, -128i8), (-128, 127), (127, -128), (127, 127), (-1, -128)] {
        let w = vec![weight; k];
        let q = vec![value; k];
        let expected = i32::try_from(i64::from(weight) * i64::from(value) * k as i64).unwrap();
        assert_eq!(gemv(kernel, &w, 1, k, &q), [expected], "w {weight}, q {value}");
    }
}
test_each_kernel!(extreme_values, extreme_values_are_exact);

#[test]
fn bad_lengths_are_errors_not_panics() {
    let w = vec![1i8; 2 * 8];
    let matrix = I8MatrixRef::new(&w, 2, 8).unwrap();
    for kernel in CpuKernel::all_available() {
        let mut out = vec![0; 2];
        assert_eq!(
            cpu::gemv_i8_i8(kernel, matrix, &[0; 7], &mut out),
            Err(KernelError::LengthMismatch { what: "int8 gemv input (k)", expected: 8, found: 7 })
        );
        assert_eq!(
            cpu::gemv_i8_i8_par(kernel, matrix, &[0; 8], &mut out[..1]),
            Err(KernelError::LengthMismatch { what: "int8 gemv output (rows)", expected: 2, found: 1 })
        );
        // Zero rows, or zero-length rows: nothing to multiply, no error.
        assert_eq!(cpu::gemv_i8_i8(kernel, I8MatrixRef::new(&[], 0, 8).unwrap(), &[0; 8], &mut []), Ok(()));
        let mut zeros = vec![9; 3];
        assert_eq!(cpu::gemv_i8_i8_par(kernel, I8MatrixRef::new(&[], 3, 0).unwrap(), &[], &mut zeros), Ok(()));
        assert_eq!(zeros, [0, 0, 0]);
    }
    assert_eq!(
        I8MatrixRef::new(&w, 3, 8).unwrap_err(),
        KernelError::LengthMismatch { what: "int8 matrix elements", expected: 24, found: 16 }
    );
}

#[test]
fn unavailable_kernels_are_refused() {
    let w = vec![1i8; 64];
    let matrix = I8MatrixRef::new(&w, 1, 64).unwrap();
    for kernel in CpuKernel::ALL {
        let mut out = [7];
        let result = cpu::gemv_i8_i8(kernel, matrix, &[2; 64], &mut out);
        if kernel.is_available() {
            assert_eq!((result, out), (Ok(()), [128]), "{kernel}");
        } else {
            assert_eq!(result, Err(KernelError::KernelUnavailable { kernel: kernel.name() }));
            assert_eq!(out, [7], "{kernel} wrote output");
        }
    }
}

/// The parallel GEMV runs one share per pool thread in blocks an idle thread
/// may take from another's share: the same result on any pool, for a matrix
/// of one block and one of about twenty (2000 rows of the head width).
#[test]
fn par_uses_the_current_pool() {
    for (rows, k) in [(150, 200), (2000, 2560)] {
        let w: Vec<i8> = (0..rows * k).map(|i| (i * 37 % 251) as u8 as i8).collect();
        let q: Vec<i8> = (0..k).map(|i| (i as i32 * 5 - 300) as i8).collect();
        let expected = naive_gemv(&w, rows, k, &q);
        let matrix = I8MatrixRef::new(&w, rows, k).unwrap();
        for threads in [1, 2, 3, 5] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut out = vec![0; rows];
            pool.install(|| cpu::gemv_i8_i8_par(cpu::select_kernel_from(None).unwrap(), matrix, &q, &mut out)).unwrap();
            assert_eq!(out, expected, "{rows} rows, {threads} threads");
        }
    }
}

/// The batched GEMM equals one GEMV per vector, exactly, with enough rows for
/// several parallel chunks and rows that do not fill the last chunk.
fn gemm_equals_gemv_per_vector(kernel: CpuKernel) {
    for (rows, k, n) in [(300, 2560, 5), (17, 64, 3), (1000, 128, 1), (33, 96, 0)] {
        let w: Vec<i8> = (0..rows * k).map(|i| ((i * 131 + i / 7) % 256) as u8 as i8).collect();
        let q: Vec<i8> = (0..n * k).map(|i| ((i * 31 + 7) % 256) as u8 as i8).collect();
        let matrix = I8MatrixRef::new(&w, rows, k).unwrap();
        let mut out = vec![i32::MIN; n * rows];
        cpu::gemm_i8_i8_par(kernel, matrix, &q, n, &mut out).unwrap();
        for t in 0..n {
            assert_eq!(&out[t * rows..(t + 1) * rows], &naive_gemv(&w, rows, k, &q[t * k..(t + 1) * k]), "vector {t}");
        }
        // Bad lengths are errors, not panics.
        assert!(cpu::gemm_i8_i8_par(kernel, matrix, &q[..q.len().saturating_sub(1)], n.max(1), &mut out).is_err());
    }
}
test_each_kernel!(gemm_matches_gemv, gemm_equals_gemv_per_vector);
