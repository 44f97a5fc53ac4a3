//! CPU kernels with run-time instruction-set dispatch.
//!
//! Every public function takes a [`CpuKernel`], checks it against the running
//! CPU, validates every length (returning [`KernelError`](crate::KernelError)
//! with expected and found values) and only then touches memory.
//!
//! Numerics in one place:
//! - I2_S x int8 and int8 x int8 kernels are exact (`i32`), identical across kernels.
//! - [`quantize_act_i8`], [`relu2_mul_f32`] and [`rope_neox_f32`] are
//!   bit-identical across kernels (same operations in the same order, no FMA
//!   contraction).
//! - Float GEMV/dot, [`rms_norm_f32`] and [`softmax_f32`] differ between
//!   kernels only by summation order and (softmax) the `exp` approximation;
//!   the tests state the bounds.

mod float;
mod i2s;
mod int8;
mod kernel;
mod ops;
mod partition;
// Decode products' rows claimed at run time by the pool's threads; `unsafe`
// for one step, a claimed range of output rows made a slice (`SharedRows`,
// its `// SAFETY:` invariants).
#[allow(unsafe_code)]
mod rows;
mod stream;
// A pool's threads held for a step's parallel calls; `unsafe` in one place,
// handing a borrowed call to the other threads (its `// SAFETY:` invariant).
#[allow(unsafe_code)]
pub mod team;
mod token;

/// How far ahead of the current read the streaming kernels prefetch, in bytes
/// of the same row-major buffer. Every decode kernel (I2_S, int8 and float
/// GEMV) reads its rows one after another as one sequential stream and hints
/// the line this far ahead (the I2_S kernels [`I2S_PREFETCH_AHEAD`]). Measured on the 2-vCPU dev box (AMD EPYC, Zen 5;
/// docs/perf/cpu.md, "One stream per thread"): 16 gate-sized I2_S GEMVs reach
/// 97% of a plain summing loop this way, against 73% when four rows were
/// interleaved and each prefetched its successor in the next group of four.
// Only the x86 kernels prefetch.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const PREFETCH_AHEAD: usize = 4096;

/// [`PREFETCH_AHEAD`] for the I2_S kernels, which do more arithmetic per byte
/// and so need more lines in flight: single-thread I2_S GEMVs over 70 MB read
/// 34.8 and 38.9 GB/s at 4 and 8 KiB ahead in two runs during one of the dev
/// box's fast-memory minutes (equal, 25-28 GB/s, in its usual state), and on
/// two threads 51.2-51.4 against 51.9-52.8 GB/s; the f16 head GEMV is
/// slightly better at 4 KiB (107.8% against 105.4% of the summing loop).
// Only the x86 kernels prefetch.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const I2S_PREFETCH_AHEAD: usize = 8192;

pub use float::{
    convert_bf16_f32, convert_f16_f32, dot_bf16_f32, dot_f16_f32, dot_f32_f32, gemm_bf16_f32_par, gemm_f16_f32_par,
    gemm_f32_f32_par, gemv_bf16_f32, gemv_bf16_f32_par, gemv_f16_f32, gemv_f16_f32_par, gemv_f32_f32, gemv_f32_f32_par,
    FloatDtype, FloatMatrixRef, FloatWeight,
};
pub use i2s::{
    gemm_i2s_i8, gemm_i2s_i8_par, gemm_i2s_i8_par_group, gemv_i2s_i8, gemv_i2s_i8_par, I2sMatrixRef, AMX_MIN_TOKENS,
    I2S_BLOCK_BYTES, I2S_BLOCK_ELEMS, I2S_MAX_K,
};
pub use int8::{gemm_i8_i8_par, gemv_i8_i8, gemv_i8_i8_par, I8MatrixRef, I8_MAX_K};
pub use kernel::{select_kernel, select_kernel_from, CpuKernel, KERNEL_ENV_VAR};
pub use ops::{
    dot_rows_f32, dot_rows_heads_f16, dot_rows_heads_f32, quantize_act_i8, quantize_act_i8_rows, relu2_mul_f32,
    rms_norm_f32, rope_neox_f32, softmax_f32, sum_u64, sum_u64_pair, weighted_rows_f32, weighted_rows_heads_f16,
    weighted_rows_heads_f32, KvElement, ACT_QUANT_EPS,
};
