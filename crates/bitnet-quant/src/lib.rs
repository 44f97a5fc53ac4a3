//! Ternary formats, ternarization and activation quantization for BitNet b1.58.
//!
//! This crate turns bytes into ternary tensors and back; it does no I/O and
//! contains no `unsafe`. Every function that takes a buffer or a length
//! checks it and returns a [`QuantError`] rather than panicking.
//!
//! - [`i2s`]: bitnet.cpp's I2_S (GGUF type 36), 2-bit codes and one f32 scale per tensor.
//! - [`tq2`], [`tq1`]: llama.cpp's TQ2_0 (35) and TQ1_0 (34), with one f16 scale
//!   per 256-element block, decoded to [`TernaryBlocks`].
//! - [`hf_pack`]: the uint8 packing of the HF `microsoft/bitnet-b1.58-2B-4T` safetensors.
//! - [`ternarize`]: absmean ternarization of float weights (transformers' `WeightQuant`).
//! - [`act_quant`]: per-token absmax int8 activation quantization (transformers' `ActQuant`).
//!
//! All ternary codes are `value + 1` (0, 1, 2 for -1, 0, +1); only the bit
//! placement differs between formats.
//!
//! ```
//! use bitnet_quant::{act_quant, i2s, ternarize};
//!
//! // Ternarize a [2, 128] float weight matrix and store it as I2_S.
//! let weights: Vec<f32> = (0..256).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
//! let ternarized = ternarize::ternarize_absmean(&weights)?;
//! let bytes = i2s::encode_i2s(&ternarized.values, ternarized.scale)?;
//! assert_eq!(bytes.len(), i2s::i2s_nbytes(256));
//!
//! // Read row 1 back and take its dot product with quantized activations.
//! let mut row = vec![0i8; 128];
//! i2s::decode_i2s_codes_into(&bytes[32..64], &mut row)?;
//! assert_eq!(row, &ternarized.values[128..]);
//!
//! let x = vec![0.5f32; 128];
//! let mut q = vec![0i8; 128];
//! let act_scale = act_quant::quantize_activations(&x, &mut q)?;
//! let dot: i32 = row.iter().zip(&q).map(|(&t, &q)| i32::from(t) * i32::from(q)).sum();
//! let y = dot as f32 / act_scale * i2s::i2s_scale(&bytes, 256)?;
//! let reference: f32 = weights[128..].iter().map(|w| w * 0.5).sum();
//! assert!((y - reference).abs() < 0.2);
//! # Ok::<(), bitnet_quant::QuantError>(())
//! ```

pub mod act_quant;
pub mod hf_pack;
pub mod i2s;
pub mod ternarize;
pub mod tq1;
pub mod tq2;

mod blocks;
mod codes;
mod error;

pub use blocks::TernaryBlocks;
pub use error::QuantError;
