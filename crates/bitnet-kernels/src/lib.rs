//! CPU kernels for BitNet b1.58 inference: the arithmetic of the forward pass,
//! with a scalar reference and SIMD versions chosen at run time.
//!
//! Everything lives in [`cpu`]. A [`cpu::CpuKernel`] names an instruction set
//! (scalar, portable `wide` SIMD, AVX2, AVX-VNNI, AVX-512 VNNI, AMX-INT8, NEON); every
//! operation takes one and refuses with [`KernelError::KernelUnavailable`]
//! when the CPU lacks it, so a wrong choice is an error, never an illegal
//! instruction. [`cpu::select_kernel`] picks the best one (or the one named in
//! `BITNET_CPU_KERNEL`).
//!
//! - I2_S ternary weights x int8 activations, exact in `i32`:
//!   [`cpu::gemv_i2s_i8`], [`cpu::gemm_i2s_i8`], [`cpu::gemm_i2s_i8_par`].
//! - Int8 weights x int8 activations, exact in `i32`, for an int8 output head:
//!   [`cpu::gemv_i8_i8`], [`cpu::gemv_i8_i8_par`].
//! - Float weights (f16, bf16, f32, read from little-endian bytes without a
//!   copy) x f32 vector: [`cpu::gemv_f16_f32`] and friends, for the tied output head.
//! - The element-wise steps: [`cpu::rms_norm_f32`], [`cpu::softmax_f32`],
//!   [`cpu::relu2_mul_f32`], [`cpu::rope_neox_f32`], [`cpu::quantize_act_i8`].
//!
//! This crate knows nothing of models or files: it sees slices and shapes.
//! `unsafe` is confined to the per-ISA modules, [`cpu::team`] (one block:
//! a call's borrowed closure handed to the pool's other threads) and
//! `cpu::rows` (a decode product's claimed output rows made slices), each block
//! with a `// SAFETY:` comment; the `#[target_feature]` functions are private
//! and reached only through a token that proves the CPU was checked.
//!
//! ```
//! use bitnet_kernels::cpu::{self, I2sMatrixRef};
//!
//! // A [2, 128] ternary matrix: row 0 all +1 (code 2 = 0b10 in every field),
//! // row 1 all -1 (code 0).
//! let mut codes = vec![0b1010_1010u8; 32];
//! codes.extend([0u8; 32]);
//! let w = I2sMatrixRef::new(&codes, 2, 128)?;
//!
//! let kernel = cpu::select_kernel()?;
//! let q: Vec<i8> = (0..128).map(|i| (i % 5) as i8 - 2).collect(); // sums to -3
//! let mut out = [0i32; 2];
//! cpu::gemv_i2s_i8(kernel, w, &q, &mut out)?;
//! assert_eq!(out, [-3, 3]);
//! # Ok::<(), bitnet_kernels::KernelError>(())
//! ```

#![deny(unsafe_op_in_unsafe_fn)]

pub mod cpu;
/// CUDA kernels and launch wrappers (feature `cuda`). `unsafe` here is the
/// driver calls and launches, each with its `// SAFETY:` invariant.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub mod cuda;

mod error;

pub use error::KernelError;
