//! The optional int8 output head of `CpuBackend` (bitnet.cpp's
//! lower-precision embedding): the tied head quantized once, per row, to int8
//! with an f32 scale, then multiplied with the per-token int8 normed hidden
//! state by an exact int8 x int8 GEMV. It reads half the bytes of an f16 head
//! per decode token, at the cost of the accuracy `cargo xtask crossval`
//! measures (scenario `cpu_i2s_int8_head`).

use bitnet_kernels::cpu::{self as k, CpuKernel, I8MatrixRef};
use bitnet_kernels::KernelError;
use bitnet_models::FloatTensor;
use rayon::prelude::*;

use crate::backend::BackendError;

/// Precision of the output head (the logits projection) in `CpuBackend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeadPrecision {
    /// The head as stored in the model file (f16, bf16 or f32), read in place.
    #[default]
    Native,
    /// An owned int8 copy, per-row absmax scales, int8 activations.
    Int8,
}

/// The head quantized to int8: `values` is `[rows, cols]` row-major, row `r`
/// approximates the float row as `values[r] * scales[r]`.
pub(crate) struct Int8Head {
    values: Vec<i8>,
    scales: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl Int8Head {
    /// Quantizes every row of `head` on the current rayon pool:
    /// `scale = max|row| / 127`, `q = round_half_even(x / scale)`. An all-zero
    /// row gets scale 0 and zero codes; a NaN or infinite weight is an error.
    pub(crate) fn quantize(kernel: CpuKernel, head: &FloatTensor) -> Result<Self, BackendError> {
        let (rows, cols) = (head.rows(), head.cols());
        let n = rows.checked_mul(cols).ok_or_else(|| BackendError::OutOfMemory("int8 head size overflows".into()))?;
        let mut values = Vec::new();
        values
            .try_reserve_exact(n)
            .map_err(|e| BackendError::OutOfMemory(format!("int8 head of {rows} x {cols}: {e}")))?;
        values.resize(n, 0i8);
        let mut scales = vec![0f32; rows];
        if cols > 0 {
            values
                .par_chunks_mut(cols)
                .zip(scales.par_iter_mut())
                .enumerate()
                .try_for_each_init(
                    || vec![0f32; cols],
                    |row_f32, (row_idx, (row_q, scale))| {
                        crate::cpu::float_row(kernel, head, row_idx, row_f32)?;
                        *scale = quantize_row(row_f32, row_q, row_idx * cols)?;
                        Ok(())
                    },
                )
                .map_err(|err: KernelError| BackendError::Device(format!("quantizing the output head: {err}")))?;
        }
        Ok(Self { values, scales, rows, cols })
    }

    /// Bytes read per decode token: the codes and the per-row scales.
    pub(crate) fn bytes(&self) -> usize {
        self.values.len() + self.scales.len() * std::mem::size_of::<f32>()
    }

    /// One row at a time (the tests' yardstick for [`Int8Head::logits_batch`]).
    /// `out[r] = acc[r] * scale[r] / s`, where `s` is the per-token absmax
    /// scale of `x` quantized to int8 and `acc = values @ q8(x)` is exact.
    /// Runs the GEMV on the current rayon pool. `q8` holds `cols` scratch
    /// values, `acc` `rows`.
    #[cfg(test)]
    pub(crate) fn logits(
        &self,
        kernel: CpuKernel,
        x: &[f32],
        q8: &mut [i8],
        acc: &mut [i32],
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        if out.len() != self.rows {
            return Err(KernelError::LengthMismatch { what: "logits", expected: self.rows, found: out.len() });
        }
        let s = k::quantize_act_i8(kernel, x, q8)?;
        k::gemv_i8_i8_par(kernel, I8MatrixRef::new(&self.values, self.rows, self.cols)?, q8, acc)?;
        for ((o, &a), &scale) in out.iter_mut().zip(acc.iter()).zip(&self.scales) {
            *o = a as f32 * scale / s;
        }
        Ok(())
    }
}

/// Row `row_idx` of a float tensor as f32.
impl Int8Head {
    /// [`Int8Head::logits`] for `n` rows of `x` (`[n, cols]`) at once: the
    /// int8 matrix is read from memory once for all of them. `out` is
    /// `[n, rows]`; every row equals what [`Int8Head::logits`] gives.
    pub(crate) fn logits_batch(
        &self,
        kernel: CpuKernel,
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        if out.len() != n * self.rows {
            return Err(KernelError::LengthMismatch {
                what: "batched logits",
                expected: n * self.rows,
                found: out.len(),
            });
        }
        let mut q8 = vec![0i8; n * self.cols];
        let mut s = vec![0f32; n];
        k::quantize_act_i8_rows(kernel, x, self.cols, &mut q8, &mut s)?;
        let mut acc = vec![0i32; n * self.rows];
        k::gemm_i8_i8_par(kernel, I8MatrixRef::new(&self.values, self.rows, self.cols)?, &q8, n, &mut acc)?;
        for ((out_row, acc_row), &st) in out.chunks_exact_mut(self.rows).zip(acc.chunks_exact(self.rows)).zip(&s) {
            for ((o, &a), &scale) in out_row.iter_mut().zip(acc_row).zip(&self.scales) {
                *o = a as f32 * scale / st;
            }
        }
        Ok(())
    }
}

fn quantize_row(x: &[f32], out: &mut [i8], first_index: usize) -> Result<f32, KernelError> {
    if let Some((index, &value)) = x.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(KernelError::NonFiniteValue { what: "output head weights", index: first_index + index, value });
    }
    let abs_max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = abs_max / 127.0;
    if scale == 0.0 {
        out.fill(0);
        return Ok(0.0);
    }
    for (o, &v) in out.iter_mut().zip(x) {
        // `|v / scale| <= 127` up to rounding, so the clamp only trims an ulp.
        *o = (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    Ok(scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_models::FloatDType;

    #[test]
    fn rows_quantize_by_absmax_with_ties_to_even() {
        fn check(x: &[f32], expected_q: &[i8], expected_scale: f32) {
            let mut q = vec![99i8; x.len()];
            assert_eq!(quantize_row(x, &mut q, 0), Ok(expected_scale), "{x:?}");
            assert_eq!(q, expected_q, "{x:?}");
        }
        // scale 1: the values are the codes; .5 ties go to even.
        check(&[127.0, -127.0, 0.5, 1.5, 2.5, -0.5], &[127, -127, 0, 2, 2, 0], 1.0);
        check(&[0.0, 0.0], &[0, 0], 0.0);
        check(&[-254.0, 127.0, 1.0], &[-127, 64, 0], 2.0);
        let mut q = [0i8; 3];
        assert!(matches!(
            quantize_row(&[1.0, f32::NAN, 2.0], &mut q, 30),
            Err(KernelError::NonFiniteValue { what: "output head weights", index: 31, .. })
        ));
    }

    #[test]
    fn batched_logits_equal_one_row_at_a_time() {
        let (rows, cols, n) = (40, 64, 3);
        let weights: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 16.0).collect();
        let head = FloatTensor::from_f32("head", rows, cols, &weights, FloatDType::F16).unwrap();
        let kernel = CpuKernel::Scalar;
        let int8 = Int8Head::quantize(kernel, &head).unwrap();
        let x: Vec<f32> = (0..n * cols).map(|i| ((i * 13 % 29) as f32 - 14.0) / 4.0).collect();
        let mut batch = vec![0f32; n * rows];
        int8.logits_batch(kernel, &x, n, &mut batch).unwrap();
        for t in 0..n {
            let (mut q8, mut acc, mut one) = (vec![0i8; cols], vec![0i32; rows], vec![0f32; rows]);
            int8.logits(kernel, &x[t * cols..(t + 1) * cols], &mut q8, &mut acc, &mut one).unwrap();
            assert_eq!(&batch[t * rows..(t + 1) * rows], &one[..], "row {t}");
        }
        assert!(int8.logits_batch(kernel, &x, n, &mut batch[1..]).is_err());
    }
}
