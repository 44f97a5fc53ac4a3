//! Ternary tensors with one scale per block (what TQ1_0 and TQ2_0 decode to) and the size and f16-scale rules those formats share.

use half::f16;

use crate::codes::check_ternary;
use crate::QuantError;

/// A ternary tensor whose scale changes every `block_elems` elements.
///
/// Element `i` stands for `values[i] * block_scales[i / block_elems]`.
/// Decoders always produce consistent fields; since the fields are public,
/// the methods still cope with inconsistent ones without panicking.
#[derive(Debug, Clone, PartialEq)]
pub struct TernaryBlocks {
    /// One of -1, 0, +1 per element, in the tensor's flat order.
    pub values: Vec<i8>,
    /// One scale per block, already widened from the file's f16.
    pub block_scales: Vec<f32>,
    /// Elements per block (256 for TQ1_0 and TQ2_0).
    pub block_elems: usize,
}

impl TernaryBlocks {
    /// The real-valued tensor, `values[i] * block_scales[i / block_elems]`.
    ///
    /// Elements whose block has no scale (only possible when the public
    /// fields were set inconsistently, e.g. `block_elems == 0`) come out as
    /// NaN, so the output always has `values.len()` elements and the fault
    /// stays visible instead of panicking.
    pub fn dequantize(&self) -> Vec<f32> {
        if self.block_elems == 0 {
            return vec![f32::NAN; self.values.len()];
        }
        let mut out = Vec::with_capacity(self.values.len());
        for (block, chunk) in self.values.chunks(self.block_elems).enumerate() {
            let scale = self.block_scales.get(block).copied().unwrap_or(f32::NAN);
            out.extend(chunk.iter().map(|&value| f32::from(value) * scale));
        }
        out
    }

    /// One scale for the whole tensor, for engines that (like bitnet.cpp's
    /// I2_S) keep a single per-tensor weight scale.
    ///
    /// Succeeds when every block holding a non-zero value has the same scale,
    /// compared bitwise after rounding to f16 (the precision the files store).
    /// All-zero blocks are ignored because their scale multiplies nothing;
    /// llama.cpp's quantizer gives them `d = 0`. The returned scale is that of
    /// the first non-zero block, or 0.0 when no block holds a non-zero value
    /// (any scale reproduces an all-zero tensor).
    ///
    /// Errors: [`QuantError::NonUniformScales`] naming the first block that
    /// disagrees, or [`QuantError::InconsistentBlocks`] when the fields do not
    /// describe whole blocks.
    pub fn into_per_tensor(self) -> Result<(Vec<i8>, f32), QuantError> {
        self.check_consistent()?;
        let mut common: Option<(u16, f32)> = None;
        let blocks = self.values.chunks_exact(self.block_elems);
        for (block, (chunk, &scale)) in blocks.zip(&self.block_scales).enumerate() {
            if chunk.iter().all(|&value| value == 0) {
                continue;
            }
            let bits = f16::from_f32(scale).to_bits();
            match common {
                None => common = Some((bits, scale)),
                Some((first_bits, first)) if first_bits != bits => {
                    return Err(QuantError::NonUniformScales { first, other: scale, block });
                }
                Some(_) => {}
            }
        }
        let scale = common.map_or(0.0, |(_, scale)| scale);
        Ok((self.values, scale))
    }

    /// Checks that the fields describe whole blocks, one scale each.
    fn check_consistent(&self) -> Result<(), QuantError> {
        let expected_values = self.block_scales.len().checked_mul(self.block_elems);
        if self.block_elems == 0 || expected_values != Some(self.values.len()) {
            return Err(QuantError::InconsistentBlocks {
                n_values: self.values.len(),
                n_scales: self.block_scales.len(),
                block_elems: self.block_elems,
            });
        }
        Ok(())
    }
}

/// Size facts of a format made of fixed-size blocks, each ending in an f16 scale.
#[derive(Debug)]
pub(crate) struct BlockLayout {
    /// Format name for error messages.
    pub(crate) format: &'static str,
    /// What a bad element count is called in error messages.
    pub(crate) element_count: &'static str,
    pub(crate) block_elems: usize,
    pub(crate) block_bytes: usize,
}

impl BlockLayout {
    /// Bytes needed for `n_elements`, which the caller knows is a whole number of blocks.
    pub(crate) fn nbytes(&self, n_elements: usize) -> usize {
        // Dividing first cannot overflow, and block_bytes < block_elems keeps the product below n_elements.
        n_elements / self.block_elems * self.block_bytes
    }

    /// Number of blocks in `n_elements`, or an error if a block would be partial.
    pub(crate) fn n_blocks(&self, n_elements: usize) -> Result<usize, QuantError> {
        if n_elements % self.block_elems != 0 {
            return Err(QuantError::NotMultiple {
                what: self.element_count,
                value: n_elements,
                multiple: self.block_elems,
            });
        }
        Ok(n_elements / self.block_elems)
    }

    /// Validates encoder input and returns the scales already converted to
    /// the little-endian f16 bytes the blocks end with.
    pub(crate) fn check_encode_input(&self, ternary: &[i8], block_scales: &[f32]) -> Result<Vec<[u8; 2]>, QuantError> {
        let n_blocks = self.n_blocks(ternary.len())?;
        if block_scales.len() != n_blocks {
            return Err(QuantError::LengthMismatch {
                what: "block scales",
                expected: n_blocks,
                found: block_scales.len(),
            });
        }
        check_ternary(ternary)?;
        block_scales.iter().enumerate().map(|(block, &scale)| self.encode_scale(block, scale)).collect()
    }

    /// Validates decoder input and returns the number of blocks.
    pub(crate) fn check_decode_input(&self, bytes: &[u8], n_elements: usize) -> Result<usize, QuantError> {
        let n_blocks = self.n_blocks(n_elements)?;
        let expected = self.nbytes(n_elements);
        if bytes.len() != expected {
            return Err(QuantError::ByteLength { format: self.format, expected, found: bytes.len() });
        }
        Ok(n_blocks)
    }

    /// Rounds a block scale to f16 (nearest, ties to even, as ggml's
    /// `GGML_FP32_TO_FP16` does) and refuses scales that would not survive it.
    fn encode_scale(&self, block: usize, scale: f32) -> Result<[u8; 2], QuantError> {
        if !scale.is_finite() {
            return Err(QuantError::NonFiniteScale { format: self.format, block, value: scale });
        }
        let half = f16::from_f32(scale);
        if !half.is_finite() {
            return Err(QuantError::ScaleOutOfRange { format: self.format, block, value: scale });
        }
        Ok(half.to_le_bytes())
    }

    /// Reads the little-endian f16 scale at the end of `block_bytes`, which
    /// must be one whole block.
    pub(crate) fn decode_scale(&self, block: usize, block_bytes: &[u8]) -> Result<f32, QuantError> {
        let mut raw = [0u8; 2];
        raw.copy_from_slice(&block_bytes[self.block_bytes - 2..]);
        let scale = f16::from_le_bytes(raw).to_f32();
        if !scale.is_finite() {
            return Err(QuantError::NonFiniteScale { format: self.format, block, value: scale });
        }
        Ok(scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(values: &[i8], block_scales: &[f32], block_elems: usize) -> TernaryBlocks {
        TernaryBlocks { values: values.to_vec(), block_scales: block_scales.to_vec(), block_elems }
    }

    #[test]
    fn dequantize() {
        fn check(input: TernaryBlocks, expected: &[f32]) {
            let found = input.dequantize();
            assert_eq!(found.len(), expected.len());
            for (index, (&found, &expected)) in found.iter().zip(expected).enumerate() {
                // NaN marks elements without a scale; compare bit patterns so it matches itself.
                assert!(
                    found == expected || (found.is_nan() && expected.is_nan()),
                    "element {index}: found {found}, expected {expected}"
                );
            }
        }
        check(blocks(&[1, -1, 0, 1, -1, -1], &[0.5, 2.0], 3), &[0.5, -0.5, 0.0, 2.0, -2.0, -2.0]);
        check(blocks(&[], &[], 256), &[]);
        // Inconsistent fields: no panic, missing scales show up as NaN.
        check(blocks(&[1, 1, 1], &[3.0], 2), &[3.0, 3.0, f32::NAN]);
        check(blocks(&[1, 0], &[3.0], 0), &[f32::NAN, f32::NAN]);
    }

    #[test]
    fn into_per_tensor() {
        fn check(input: TernaryBlocks, expected: Result<(Vec<i8>, f32), QuantError>) {
            assert_eq!(input.into_per_tensor(), expected);
        }
        check(blocks(&[1, 0, -1, 1], &[0.75, 0.75], 2), Ok((vec![1, 0, -1, 1], 0.75)));
        // An all-zero block may carry any scale (llama.cpp writes d = 0 there).
        check(blocks(&[0, 0, -1, 1, 0, 0], &[0.0, 1.5, 9.0], 2), Ok((vec![0, 0, -1, 1, 0, 0], 1.5)));
        check(blocks(&[0, 0], &[4.0], 2), Ok((vec![0, 0], 0.0)));
        check(blocks(&[], &[], 2), Ok((vec![], 0.0)));
        // Scales that differ in f32 but round to the same f16 count as equal.
        check(blocks(&[1, 1], &[1.0, 1.0 + f32::EPSILON], 1), Ok((vec![1, 1], 1.0)));
        check(
            blocks(&[1, 0, 0, 0, 0, -1], &[0.5, 0.5, 0.25], 2),
            Err(QuantError::NonUniformScales { first: 0.5, other: 0.25, block: 2 }),
        );
        check(
            blocks(&[1, 1, 1], &[1.0], 2),
            Err(QuantError::InconsistentBlocks { n_values: 3, n_scales: 1, block_elems: 2 }),
        );
        check(blocks(&[], &[], 0), Err(QuantError::InconsistentBlocks { n_values: 0, n_scales: 0, block_elems: 0 }));
    }
}
