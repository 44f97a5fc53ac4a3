//! Float-weight GEMV, dot and conversion: every kernel against the scalar
//! reference and an f64 reference, on random shapes, from unaligned bytes.
//!
//! Tolerance: float sums differ only in order, so for a row `r`,
//! `|kernel - f64| <= 1e-5 * sum|w x|` and `|kernel - scalar| <= 2e-5 * sum|w x|`
//! (plus 1e-30). With at most ~1000 terms per lane that is far above the
//! worst case of the summation orders used, and far below any real bug.

mod common;

use bitnet_kernels::cpu::{self, CpuKernel, FloatMatrixRef, FloatWeight};
use bitnet_kernels::KernelError;
use common::{runner, test_each_kernel};
use half::{bf16, f16};
use proptest::prelude::*;

/// A matrix stored one byte past an aligned start, so every load is unaligned.
struct Unaligned {
    storage: Vec<u8>,
}

impl Unaligned {
    fn new(bytes: &[u8]) -> Self {
        let mut storage = vec![0u8; bytes.len() + 1];
        storage[1..].copy_from_slice(bytes);
        Self { storage }
    }

    fn bytes(&self) -> &[u8] {
        &self.storage[1..]
    }
}

/// Per-type test plumbing: storage rounding and the public entry points.
trait TestWeight: FloatWeight {
    fn store(v: f32) -> (Vec<u8>, f64);
    fn gemv(kernel: CpuKernel, w: FloatMatrixRef<'_, Self>, x: &[f32], out: &mut [f32]) -> Result<(), KernelError>;
    fn gemv_par(kernel: CpuKernel, w: FloatMatrixRef<'_, Self>, x: &[f32], out: &mut [f32]) -> Result<(), KernelError>;
    fn dot(kernel: CpuKernel, w_le: &[u8], x: &[f32]) -> Result<f32, KernelError>;
    fn gemm_par(
        kernel: CpuKernel,
        w: FloatMatrixRef<'_, Self>,
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError>;
}

macro_rules! test_weight {
    ($t:ty, $store:expr, $gemv:path, $gemv_par:path, $dot:path, $gemm_par:path) => {
        impl TestWeight for $t {
            fn store(v: f32) -> (Vec<u8>, f64) {
                $store(v)
            }
            fn gemv(
                kernel: CpuKernel,
                w: FloatMatrixRef<'_, Self>,
                x: &[f32],
                out: &mut [f32],
            ) -> Result<(), KernelError> {
                $gemv(kernel, w, x, out)
            }
            fn gemv_par(
                kernel: CpuKernel,
                w: FloatMatrixRef<'_, Self>,
                x: &[f32],
                out: &mut [f32],
            ) -> Result<(), KernelError> {
                $gemv_par(kernel, w, x, out)
            }
            fn dot(kernel: CpuKernel, w_le: &[u8], x: &[f32]) -> Result<f32, KernelError> {
                $dot(kernel, w_le, x)
            }
            fn gemm_par(
                kernel: CpuKernel,
                w: FloatMatrixRef<'_, Self>,
                x: &[f32],
                n: usize,
                out: &mut [f32],
            ) -> Result<(), KernelError> {
                $gemm_par(kernel, w, x, n, out)
            }
        }
    };
}

test_weight!(
    f16,
    |v| {
        let h = f16::from_f32(v);
        (h.to_le_bytes().to_vec(), f64::from(h.to_f32()))
    },
    cpu::gemv_f16_f32,
    cpu::gemv_f16_f32_par,
    cpu::dot_f16_f32,
    cpu::gemm_f16_f32_par
);
test_weight!(
    bf16,
    |v| {
        let h = bf16::from_f32(v);
        (h.to_le_bytes().to_vec(), f64::from(h.to_f32()))
    },
    cpu::gemv_bf16_f32,
    cpu::gemv_bf16_f32_par,
    cpu::dot_bf16_f32,
    cpu::gemm_bf16_f32_par
);
test_weight!(
    f32,
    |v: f32| (v.to_le_bytes().to_vec(), f64::from(v)),
    cpu::gemv_f32_f32,
    cpu::gemv_f32_f32_par,
    cpu::dot_f32_f32,
    cpu::gemm_f32_f32_par
);

fn to_le_bytes<T: TestWeight>(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|&v| T::store(v).0).collect()
}

/// What the weights are after storage rounding, as f64.
fn stored<T: TestWeight>(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| T::store(v).1).collect()
}

fn check_gemv<T: TestWeight>(
    kernel: CpuKernel,
    rows: usize,
    k: usize,
    weights: &[f32],
    x: &[f32],
) -> Result<(), TestCaseError> {
    let bytes = Unaligned::new(&to_le_bytes::<T>(weights));
    let w = FloatMatrixRef::<T>::from_le_bytes(bytes.bytes(), rows, k).unwrap();
    let mut scalar = vec![f32::NAN; rows];
    T::gemv(CpuKernel::Scalar, w, x, &mut scalar).unwrap();
    let mut found = vec![f32::NAN; rows];
    T::gemv(kernel, w, x, &mut found).unwrap();
    let mut found_par = vec![f32::NAN; rows];
    T::gemv_par(kernel, w, x, &mut found_par).unwrap();
    // Same rows, same code per row: the parallel split changes nothing.
    prop_assert_eq!(&found_par, &found);
    let w64 = stored::<T>(weights);
    for j in 0..rows {
        let row = &w64[j * k..(j + 1) * k];
        let exact: f64 = row.iter().zip(x).map(|(&w, &v)| w * f64::from(v)).sum();
        let magnitude: f64 = row.iter().zip(x).map(|(&w, &v)| (w * f64::from(v)).abs()).sum();
        let tol = 1e-5 * magnitude + 1e-30;
        prop_assert!((f64::from(found[j]) - exact).abs() <= tol, "{} row {j}: {} vs exact {exact}", T::NAME, found[j]);
        prop_assert!(
            (f64::from(found[j]) - f64::from(scalar[j])).abs() <= 2.0 * tol,
            "{} row {j}: {} vs scalar {}",
            T::NAME,
            found[j],
            scalar[j]
        );
    }
    Ok(())
}

/// 0..=21 rows (full and partial 4-row groups) and k up to 300 (every tail length mod 8 and 16).
fn gemv_case() -> impl Strategy<Value = (usize, usize, Vec<f32>, Vec<f32>)> {
    (0..=21usize, 0..=300usize).prop_flat_map(|(rows, k)| {
        (Just(rows), Just(k), prop::collection::vec(-2.0f32..2.0, rows * k), prop::collection::vec(-4.0f32..4.0, k))
    })
}

fn gemv_matches_scalar(kernel: CpuKernel) {
    runner(48)
        .run(&gemv_case(), |(rows, k, weights, x)| {
            check_gemv::<f16>(kernel, rows, k, &weights, &x)?;
            check_gemv::<bf16>(kernel, rows, k, &weights, &x)?;
            check_gemv::<f32>(kernel, rows, k, &weights, &x)
        })
        .unwrap();
}
test_each_kernel!(gemv_random_matches_scalar, gemv_matches_scalar);

/// The output-head width (k = 2560) with a few hundred rows.
fn gemv_at_model_width(kernel: CpuKernel) {
    let (rows, k) = (300, 2560);
    let weights: Vec<f32> = (0..rows * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 4000.0).collect();
    let x: Vec<f32> = (0..k).map(|i| ((i * 104_729 % 977) as f32 - 488.0) / 100.0).collect();
    check_gemv::<f16>(kernel, rows, k, &weights, &x).unwrap();
    check_gemv::<bf16>(kernel, rows, k, &weights, &x).unwrap();
    check_gemv::<f32>(kernel, rows, k, &weights, &x).unwrap();
}
test_each_kernel!(gemv_model_width, gemv_at_model_width);

/// A GEMV of several rows (which the AVX-512 kernel reads two at a time,
/// row `i` of the first half with row `i` of the second) gives every row
/// the bits of the one-row dot product, for even and odd row counts and
/// every tail length class.
fn gemv_rows_equal_dot(kernel: CpuKernel) {
    fn check<T: TestWeight>(kernel: CpuKernel, rows: usize, k: usize) {
        let weights: Vec<f32> = (0..rows * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 4000.0).collect();
        let x: Vec<f32> = (0..k).map(|i| ((i * 104_729 % 977) as f32 - 488.0) / 100.0).collect();
        let bytes = to_le_bytes::<T>(&weights);
        let w = FloatMatrixRef::<T>::from_le_bytes(&bytes, rows, k).unwrap();
        let mut out = vec![f32::NAN; rows];
        T::gemv(kernel, w, &x, &mut out).unwrap();
        let row_bytes = k * T::SIZE;
        for (j, o) in out.iter().enumerate() {
            let dot = T::dot(kernel, &bytes[j * row_bytes..(j + 1) * row_bytes], &x).unwrap();
            assert_eq!(o.to_bits(), dot.to_bits(), "{} rows {rows}, k {k}, row {j}", T::NAME);
        }
    }
    for (rows, k) in [(2, 16), (3, 77), (7, 2560), (10, 33), (64, 136)] {
        check::<f16>(kernel, rows, k);
        check::<bf16>(kernel, rows, k);
        check::<f32>(kernel, rows, k);
    }
}
test_each_kernel!(gemv_rows_match_dot, gemv_rows_equal_dot);

/// The parallel GEMV runs one share per pool thread in blocks an idle thread
/// may take from another's share; on any pool size every row equals the
/// one-thread GEMV's bit for bit (1000 f16 rows of the head width: about
/// twenty blocks).
#[test]
fn gemv_par_is_the_same_on_any_pool() {
    let (rows, k) = (1000, 2560);
    let weights: Vec<f32> = (0..rows * k).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 4000.0).collect();
    let x: Vec<f32> = (0..k).map(|i| ((i * 104_729 % 977) as f32 - 488.0) / 100.0).collect();
    let bytes = to_le_bytes::<f16>(&weights);
    let w = FloatMatrixRef::<f16>::from_le_bytes(&bytes, rows, k).unwrap();
    let kernel = cpu::select_kernel_from(None).unwrap();
    let mut want = vec![f32::NAN; rows];
    f16::gemv(kernel, w, &x, &mut want).unwrap();
    for threads in [1, 2, 3, 5] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut got = vec![f32::NAN; rows];
        pool.install(|| f16::gemv_par(kernel, w, &x, &mut got)).unwrap();
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{threads} threads");
    }
}

fn dot_matches_gemv(kernel: CpuKernel) {
    fn check<T: TestWeight>(kernel: CpuKernel, weights: &[f32], x: &[f32], what: &'static str) {
        let bytes = to_le_bytes::<T>(weights);
        let mut out = [0.0];
        T::gemv(kernel, FloatMatrixRef::from_le_bytes(&bytes, 1, x.len()).unwrap(), x, &mut out).unwrap();
        assert_eq!(T::dot(kernel, &bytes, x).unwrap().to_bits(), out[0].to_bits(), "{what}");
        assert_eq!(
            T::dot(kernel, &bytes[1..], x),
            Err(KernelError::LengthMismatch { what, expected: bytes.len(), found: bytes.len() - 1 })
        );
    }
    let k = 77;
    let weights: Vec<f32> = (0..k).map(|i| (i as f32 - 30.0) / 8.0).collect();
    let x: Vec<f32> = (0..k).map(|i| (i % 5) as f32 - 2.0).collect();
    check::<f16>(kernel, &weights, &x, "f16 matrix bytes");
    check::<bf16>(kernel, &weights, &x, "bf16 matrix bytes");
    check::<f32>(kernel, &weights, &x, "f32 matrix bytes");
}
test_each_kernel!(dot_equals_one_row_gemv, dot_matches_gemv);

/// Every one of the 65536 f16 bit patterns converts exactly (NaN to NaN).
fn f16_conversion_is_exact(kernel: CpuKernel) {
    let bits: Vec<u16> = (0..=u16::MAX).collect();
    let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let source = Unaligned::new(&bytes);
    let mut out = vec![0.0f32; bits.len()];
    cpu::convert_f16_f32(kernel, source.bytes(), &mut out).unwrap();
    for (&b, &v) in bits.iter().zip(&out) {
        let expected = f16::from_bits(b).to_f32();
        if expected.is_nan() {
            assert!(v.is_nan(), "f16 {b:#06x} -> {v}");
        } else {
            assert_eq!(v.to_bits(), expected.to_bits(), "f16 {b:#06x}");
        }
    }
    let mut bf_out = vec![0.0f32; bits.len()];
    cpu::convert_bf16_f32(kernel, source.bytes(), &mut bf_out).unwrap();
    for (&b, &v) in bits.iter().zip(&bf_out) {
        assert_eq!(v.to_bits(), u32::from(b) << 16, "bf16 {b:#06x}");
    }
    assert_eq!(
        cpu::convert_f16_f32(kernel, &bytes[..3], &mut out[..2]),
        Err(KernelError::LengthMismatch { what: "f16 matrix bytes", expected: 4, found: 3 })
    );
}
test_each_kernel!(conversion_exact, f16_conversion_is_exact);

/// Head weights with f16 extremes (max normal, subnormals) stay finite and exact enough.
fn f16_extremes(kernel: CpuKernel) {
    let k = 40;
    let weights: Vec<f32> = (0..k).map(|i| if i % 2 == 0 { 65504.0 } else { 6.0e-8 }).collect();
    let x: Vec<f32> = (0..k).map(|i| if i % 2 == 0 { 1e-3 } else { 1e3 }).collect();
    check_gemv::<f16>(kernel, 1, k, &weights, &x).unwrap();
}
test_each_kernel!(f16_extreme_values, f16_extremes);

#[test]
fn bad_shapes_are_errors() {
    let bytes = vec![0u8; 2 * 3 * 4];
    let w = FloatMatrixRef::<f16>::from_le_bytes(&bytes, 3, 4).unwrap();
    for kernel in CpuKernel::all_available() {
        let mut out = vec![0.0; 3];
        assert_eq!(
            cpu::gemv_f16_f32(kernel, w, &[0.0; 5], &mut out),
            Err(KernelError::LengthMismatch { what: "gemv input (k)", expected: 4, found: 5 })
        );
        assert_eq!(
            cpu::gemv_f16_f32_par(kernel, w, &[0.0; 4], &mut out[..2]),
            Err(KernelError::LengthMismatch { what: "gemv output (rows)", expected: 3, found: 2 })
        );
        // k = 0: every dot product is 0.
        let empty = FloatMatrixRef::<f32>::from_le_bytes(&[], 3, 0).unwrap();
        let mut out = vec![f32::NAN; 3];
        cpu::gemv_f32_f32_par(kernel, empty, &[], &mut out).unwrap();
        assert_eq!(out, [0.0; 3]);
    }
    for kernel in CpuKernel::ALL.into_iter().filter(|k| !k.is_available()) {
        let mut out = vec![0.0; 3];
        assert_eq!(
            cpu::gemv_f16_f32(kernel, w, &[0.0; 4], &mut out),
            Err(KernelError::KernelUnavailable { kernel: kernel.name() })
        );
    }
}

/// The batched GEMM equals one GEMV per vector bit for bit (same kernel, same
/// summation order), across parallel chunks and a partial last chunk.
fn gemm_case<T: TestWeight>(kernel: CpuKernel) {
    for (rows, k, n) in [(300, 2560, 5), (17, 64, 3), (1000, 136, 1), (33, 96, 0)] {
        let mut bytes = Vec::new();
        for i in 0..rows * k {
            bytes.extend(T::store(((i * 37 % 101) as f32 - 50.0) / 64.0).0);
        }
        let w = FloatMatrixRef::<T>::from_le_bytes(&bytes, rows, k).unwrap();
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 13 % 29) as f32 - 14.0) / 8.0).collect();
        let mut out = vec![f32::NAN; n * rows];
        T::gemm_par(kernel, w, &x, n, &mut out).unwrap();
        for t in 0..n {
            let mut want = vec![0f32; rows];
            T::gemv(kernel, w, &x[t * k..(t + 1) * k], &mut want).unwrap();
            let got = &out[t * rows..(t + 1) * rows];
            assert!(
                got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "vector {t} of {n}, rows {rows}, k {k}"
            );
        }
        assert!(T::gemm_par(kernel, w, &x, n + 1, &mut out).is_err(), "a short input is an error");
    }
}

fn gemm_equals_gemv_per_vector(kernel: CpuKernel) {
    gemm_case::<f16>(kernel);
    gemm_case::<bf16>(kernel);
    gemm_case::<f32>(kernel);
}
test_each_kernel!(gemm_matches_gemv, gemm_equals_gemv_per_vector);
