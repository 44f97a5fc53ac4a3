//! I2_S, bitnet.cpp's GGUF type 36: 2-bit ternary codes in 128-element blocks followed by one f32 scale for the whole tensor.
//!
//! Layout of a tensor of `n` elements (row-major, the input dimension
//! contiguous), as written by `quantize_i2_s` in microsoft/BitNet's
//! `src/ggml-bitnet-mad.cpp` (x86 build):
//!
//! - bytes `0 .. n/4`: codes, 32 bytes per 128-element block. Byte `j` of a
//!   block holds elements `j`, `32 + j`, `64 + j`, `96 + j` of that block in
//!   bits 7:6, 5:4, 3:2, 1:0, i.e. element `k` lives in byte
//!   `(k / 128) * 32 + k % 32` at bit shift `6 - 2 * ((k % 128) / 32)`.
//!   Codes 0, 1, 2 mean -1, 0, +1; code 3 is never written.
//! - bytes `n/4 .. n/4 + 4`: the scale, f32 little endian.
//! - 28 bytes of padding, which readers ignore and we write as zeros.

use crate::codes::{check_ternary, code_from_ternary, has_unused_code, ternary_from_code, CODE_MASK, UNUSED_CODE};
use crate::QuantError;

const FORMAT: &str = "I2_S";

/// Elements per I2_S block.
pub const I2S_BLOCK_ELEMS: usize = 128;

/// Bytes of codes per I2_S block.
pub const I2S_BLOCK_BYTES: usize = 32;

/// Bytes after the codes: the f32 scale and padding to 32 bytes.
pub const I2S_TRAILER_BYTES: usize = 32;

/// Elements per bit-plane group: a block is four groups of 32, group `g`
/// occupying the same bit pair of all 32 bytes.
const GROUP_ELEMS: usize = 32;

/// Bit shift of group `group` (0..4) inside a byte; group 0 is the most significant pair.
fn group_shift(group: usize) -> usize {
    6 - 2 * group
}

/// Size in bytes of an I2_S tensor of `n_elements` elements: `n/4 + 32`.
///
/// Meaningful only when `n_elements` is a multiple of [`I2S_BLOCK_ELEMS`];
/// the generic ggml `block_size/type_size` arithmetic does not apply to I2_S.
pub fn i2s_nbytes(n_elements: usize) -> usize {
    n_elements / 4 + I2S_TRAILER_BYTES
}

/// The I2_S code of a ternary value: -1 -> 0, 0 -> 1, +1 -> 2.
///
/// The input is assumed ternary. Other values saturate to the nearest
/// ternary value (-5 -> code 0, 7 -> code 2), so the result is always a valid
/// code; use [`encode_i2s`] when the input needs checking.
pub fn i2s_code(t: i8) -> u8 {
    code_from_ternary(t)
}

/// Encodes a ternary tensor and its per-tensor scale as I2_S.
///
/// `ternary.len()` must be a multiple of 128, every value -1, 0 or +1, and
/// the scale finite. The output is `n/4` code bytes, the scale as f32 little
/// endian, then 28 zero bytes.
pub fn encode_i2s(ternary: &[i8], scale: f32) -> Result<Vec<u8>, QuantError> {
    check_element_count(ternary.len())?;
    check_scale(scale)?;
    check_ternary(ternary)?;

    let n_code_bytes = ternary.len() / 4;
    let mut bytes = vec![0u8; n_code_bytes + I2S_TRAILER_BYTES];
    let (codes, trailer) = bytes.split_at_mut(n_code_bytes);
    let blocks = ternary.chunks_exact(I2S_BLOCK_ELEMS);
    for (block, block_bytes) in blocks.zip(codes.chunks_exact_mut(I2S_BLOCK_BYTES)) {
        for (group, group_values) in block.chunks_exact(GROUP_ELEMS).enumerate() {
            let shift = group_shift(group);
            for (byte, &value) in block_bytes.iter_mut().zip(group_values) {
                *byte |= code_from_ternary(value) << shift;
            }
        }
    }
    trailer[..4].copy_from_slice(&scale.to_le_bytes());
    Ok(bytes)
}

/// Decodes an I2_S tensor of `n_elements` elements into its ternary values and scale.
///
/// Checks that `n_elements` is a multiple of 128, that `bytes` is exactly
/// `n/4 + 32` long, that the scale is finite, and that no code is 3 (the error
/// names the lowest offending element index). The padding is not inspected.
pub fn decode_i2s(bytes: &[u8], n_elements: usize) -> Result<(Vec<i8>, f32), QuantError> {
    let scale = i2s_scale(bytes, n_elements)?;
    let mut values = vec![0i8; n_elements];
    decode_i2s_codes_into(&bytes[..n_elements / 4], &mut values)?;
    Ok((values, scale))
}

/// Reads only the per-tensor scale of an I2_S tensor, with the same size
/// checks as [`decode_i2s`] and a finiteness check on the scale.
pub fn i2s_scale(bytes: &[u8], n_elements: usize) -> Result<f32, QuantError> {
    check_element_count(n_elements)?;
    let expected = i2s_nbytes(n_elements);
    if bytes.len() != expected {
        return Err(QuantError::ByteLength { format: FORMAT, expected, found: bytes.len() });
    }
    let offset = n_elements / 4;
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[offset..offset + 4]);
    let scale = f32::from_le_bytes(raw);
    check_scale(scale)?;
    Ok(scale)
}

/// Decodes whole 32-byte blocks of I2_S codes (no scale, no padding) into
/// ternary values.
///
/// This is how one row of a `[rows, K]` matrix is read when `K` is a multiple
/// of 128: row `r` is `codes[r * K / 4 .. (r + 1) * K / 4]`.
/// `packed.len()` must be a multiple of 32 and `out.len() == packed.len() * 4`.
/// A code 3 is an error naming the lowest offending index within `out`; on
/// that error `out` may be partly written.
pub fn decode_i2s_codes_into(packed: &[u8], out: &mut [i8]) -> Result<(), QuantError> {
    if packed.len() % I2S_BLOCK_BYTES != 0 {
        return Err(QuantError::NotMultiple {
            what: "I2_S code byte count",
            value: packed.len(),
            multiple: I2S_BLOCK_BYTES,
        });
    }
    // Saturating: a slice this long cannot exist, so saturation can only turn
    // an impossible size into a mismatch, never accept a wrong one.
    let expected = packed.len().saturating_mul(4);
    if out.len() != expected {
        return Err(QuantError::LengthMismatch { what: "I2_S decoded elements", expected, found: out.len() });
    }

    let blocks = packed.chunks_exact(I2S_BLOCK_BYTES);
    for (block_idx, (block_bytes, block_out)) in blocks.zip(out.chunks_exact_mut(I2S_BLOCK_ELEMS)).enumerate() {
        if block_bytes.iter().any(|&byte| has_unused_code(byte)) {
            return Err(first_unused_code(block_idx, block_bytes));
        }
        for (group, group_out) in block_out.chunks_exact_mut(GROUP_ELEMS).enumerate() {
            let shift = group_shift(group);
            for (value, &byte) in group_out.iter_mut().zip(block_bytes) {
                *value = ternary_from_code((byte >> shift) & CODE_MASK);
            }
        }
    }
    Ok(())
}

/// The error for a block known to contain code 3, naming the lowest element
/// index (element order is group-major, so bytes alone do not give it).
fn first_unused_code(block_idx: usize, block_bytes: &[u8]) -> QuantError {
    let index_in_block = (0..I2S_BLOCK_ELEMS)
        .find(|&k| {
            let byte = block_bytes[k % GROUP_ELEMS];
            (byte >> group_shift(k / GROUP_ELEMS)) & CODE_MASK == UNUSED_CODE
        })
        .unwrap_or(0);
    QuantError::InvalidCode { format: FORMAT, index: block_idx * I2S_BLOCK_ELEMS + index_in_block, code: UNUSED_CODE }
}

fn check_element_count(n_elements: usize) -> Result<(), QuantError> {
    if n_elements % I2S_BLOCK_ELEMS != 0 {
        return Err(QuantError::NotMultiple {
            what: "I2_S element count",
            value: n_elements,
            multiple: I2S_BLOCK_ELEMS,
        });
    }
    Ok(())
}

fn check_scale(scale: f32) -> Result<(), QuantError> {
    if !scale.is_finite() {
        return Err(QuantError::NonFiniteScale { format: FORMAT, block: 0, value: scale });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Byte of a block whose four elements are all 0 (code 1 in every field).
    const ZEROS: u8 = 0b01_01_01_01;

    /// Builds the expected bytes of an I2_S tensor: code bytes, then the
    /// scale, then 28 zero bytes.
    fn tensor_bytes(codes: &[u8], scale: f32) -> Vec<u8> {
        let mut bytes = codes.to_vec();
        bytes.extend_from_slice(&scale.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 28]);
        bytes
    }

    /// Checks both directions against bytes worked out by hand.
    fn check(ternary: &[i8], scale: f32, expected: &[u8]) {
        assert_eq!(encode_i2s(ternary, scale).as_deref(), Ok(expected));
        let (values, found_scale) = decode_i2s(expected, ternary.len()).unwrap();
        assert_eq!(values, ternary);
        assert_eq!(found_scale.to_bits(), scale.to_bits());
    }

    #[test]
    fn known_answer_one_block() {
        // Element 0 = +1, 32 = -1, 64 = 0, 96 = +1: byte 0 holds elements
        // 0, 32, 64, 96 in bits 7:6, 5:4, 3:2, 1:0 -> codes 2, 0, 1, 2.
        let mut ternary = vec![0i8; 128];
        ternary[0] = 1;
        ternary[32] = -1;
        ternary[96] = 1;
        let mut codes = vec![ZEROS; 32];
        codes[0] = 0b10_00_01_10;
        // 1.5f32 = 0x3FC00000.
        let expected = tensor_bytes(&codes, 1.5);
        assert_eq!(&expected[32..36], &[0x00, 0x00, 0xC0, 0x3F]);
        check(&ternary, 1.5, &expected);
    }

    #[test]
    fn known_answer_two_blocks() {
        let mut ternary = vec![0i8; 256];
        // Element 133 = 128 + 5: block 1, byte 32 + 5, group 0 (bits 7:6) -> code 0.
        ternary[133] = -1;
        // Element 255 = 128 + 127: block 1, byte 32 + 31, group 3 (bits 1:0) -> code 2.
        ternary[255] = 1;
        // Element 31: block 0, byte 31, group 0 -> code 2.
        ternary[31] = 1;
        // Element 77 = 64 + 13: block 0, byte 13, group 2 (bits 3:2) -> code 0.
        ternary[77] = -1;
        let mut codes = vec![ZEROS; 64];
        codes[37] = 0b00_01_01_01;
        codes[63] = 0b01_01_01_10;
        codes[31] = 0b10_01_01_01;
        codes[13] = 0b01_01_00_01;
        check(&ternary, 0.25, &tensor_bytes(&codes, 0.25));
    }

    #[test]
    fn known_answer_uniform() {
        check(&[-1; 128], 2.0, &tensor_bytes(&[0x00; 32], 2.0));
        check(&[1; 128], 2.0, &tensor_bytes(&[0xAA; 32], 2.0));
        check(&[0; 256], -3.0, &tensor_bytes(&[ZEROS; 64], -3.0));
        check(&[], 1.0, &tensor_bytes(&[], 1.0));
    }

    #[test]
    fn every_position_follows_the_layout_formula() {
        // For each k in two blocks, a tensor that is 0 except element k = -1
        // must have code 0 exactly at byte (k/128)*32 + k%32, shift
        // 6 - 2*((k%128)/32), and code 1 everywhere else.
        for k in 0..256 {
            let mut ternary = vec![0i8; 256];
            ternary[k] = -1;
            let byte = (k / 128) * 32 + k % 32;
            let shift = 6 - 2 * ((k % 128) / 32);
            let mut codes = vec![ZEROS; 64];
            codes[byte] &= !(0b11 << shift);
            check(&ternary, 1.0, &tensor_bytes(&codes, 1.0));
        }
    }

    #[test]
    fn code_of_each_value() {
        fn check(t: i8, expected: u8) {
            assert_eq!(i2s_code(t), expected, "t = {t}");
        }
        check(-1, 0);
        check(0, 1);
        check(1, 2);
        check(-5, 0);
        check(7, 2);
    }

    #[test]
    fn nbytes() {
        fn check(n_elements: usize, expected: usize) {
            assert_eq!(i2s_nbytes(n_elements), expected);
        }
        check(0, 32);
        check(128, 64);
        check(2560 * 2560, 1_638_432);
        // One layer of 2B-4T: q, o (2560x2560), k, v (640x2560), gate, up, down (6912x2560).
        let layer: usize = [2560, 2560, 640, 640, 6912, 6912, 6912].iter().map(|rows| i2s_nbytes(rows * 2560)).sum();
        assert_eq!(layer, 17_367_264);
    }

    #[test]
    fn encode_errors() {
        fn check(ternary: &[i8], scale: f32, expected: QuantError) {
            assert_eq!(encode_i2s(ternary, scale), Err(expected));
        }
        check(&[0; 64], 1.0, QuantError::NotMultiple { what: "I2_S element count", value: 64, multiple: 128 });
        let mut ternary = vec![0i8; 128];
        ternary[5] = 2;
        check(&ternary, 1.0, QuantError::NotTernary { index: 5, value: 2 });
        check(&[0; 128], f32::INFINITY, QuantError::NonFiniteScale { format: "I2_S", block: 0, value: f32::INFINITY });
        assert!(matches!(encode_i2s(&[0; 128], f32::NAN), Err(QuantError::NonFiniteScale { block: 0, .. })));
    }

    #[test]
    fn decode_errors() {
        fn check(bytes: &[u8], n_elements: usize, expected: QuantError) {
            assert_eq!(decode_i2s(bytes, n_elements), Err(expected.clone()));
            let scale_only_error = i2s_scale(bytes, n_elements);
            if !matches!(expected, QuantError::InvalidCode { .. }) {
                assert_eq!(scale_only_error, Err(expected));
            }
        }
        let valid = tensor_bytes(&[ZEROS; 64], 1.0);
        check(&valid[..valid.len() - 1], 256, QuantError::ByteLength { format: "I2_S", expected: 96, found: 95 });
        check(&valid, 128, QuantError::ByteLength { format: "I2_S", expected: 64, found: 96 });
        check(&valid, 100, QuantError::NotMultiple { what: "I2_S element count", value: 100, multiple: 128 });
        check(
            &tensor_bytes(&[ZEROS; 32], f32::NEG_INFINITY),
            128,
            QuantError::NonFiniteScale { format: "I2_S", block: 0, value: f32::NEG_INFINITY },
        );

        // Byte 35 = block 1, byte 3; bits 5:4 = group 1 -> element 128 + 32 + 3.
        let mut codes = vec![ZEROS; 64];
        codes[35] = 0b01_11_01_01;
        check(&tensor_bytes(&codes, 1.0), 256, QuantError::InvalidCode { format: "I2_S", index: 163, code: 3 });
        // Two bad fields in one block: byte 3 group 3 is element 99, byte 7
        // group 0 is element 7; the lower element index is reported.
        let mut codes = vec![ZEROS; 32];
        codes[3] = 0b01_01_01_11;
        codes[7] = 0b11_01_01_01;
        check(&tensor_bytes(&codes, 1.0), 128, QuantError::InvalidCode { format: "I2_S", index: 7, code: 3 });
    }

    #[test]
    fn nan_scale_is_rejected() {
        let bytes = tensor_bytes(&[ZEROS; 32], f32::NAN);
        assert!(matches!(decode_i2s(&bytes, 128), Err(QuantError::NonFiniteScale { block: 0, .. })));
    }

    #[test]
    fn padding_is_ignored() {
        let mut bytes = tensor_bytes(&[ZEROS; 32], 0.5);
        bytes[40] = 0xFF;
        assert_eq!(decode_i2s(&bytes, 128), Ok((vec![0; 128], 0.5)));
    }

    #[test]
    fn decode_one_row_of_a_matrix() {
        // A [3, 256] matrix: row r has value (r + j) % 3 - 1 at column j.
        let (rows, k) = (3, 256);
        let matrix: Vec<i8> = (0..rows * k).map(|i| ((i / k + i % k) % 3) as i8 - 1).collect();
        let bytes = encode_i2s(&matrix, 1.0).unwrap();
        for row in 0..rows {
            let mut out = vec![0i8; k];
            decode_i2s_codes_into(&bytes[row * k / 4..(row + 1) * k / 4], &mut out).unwrap();
            assert_eq!(out, &matrix[row * k..(row + 1) * k], "row {row}");
        }
    }

    #[test]
    fn decode_codes_into_errors() {
        fn check(packed: &[u8], out_len: usize, expected: QuantError) {
            let mut out = vec![0i8; out_len];
            assert_eq!(decode_i2s_codes_into(packed, &mut out), Err(expected));
        }
        check(&[ZEROS; 33], 132, QuantError::NotMultiple { what: "I2_S code byte count", value: 33, multiple: 32 });
        check(
            &[ZEROS; 32],
            127,
            QuantError::LengthMismatch { what: "I2_S decoded elements", expected: 128, found: 127 },
        );
        check(&[0xFF; 32], 128, QuantError::InvalidCode { format: "I2_S", index: 0, code: 3 });
    }

    fn ternary_vec(max_blocks: usize) -> impl Strategy<Value = Vec<i8>> {
        (0..=max_blocks).prop_flat_map(|n_blocks| {
            prop::collection::vec(prop::sample::select(vec![-1i8, 0, 1]), n_blocks * I2S_BLOCK_ELEMS)
        })
    }

    fn finite_f32() -> impl Strategy<Value = f32> {
        prop::num::f32::NORMAL | prop::num::f32::SUBNORMAL | prop::num::f32::ZERO
    }

    proptest! {
        #[test]
        fn round_trip(ternary in ternary_vec(5), scale in finite_f32()) {
            let bytes = encode_i2s(&ternary, scale).unwrap();
            prop_assert_eq!(bytes.len(), i2s_nbytes(ternary.len()));
            let (values, found_scale) = decode_i2s(&bytes, ternary.len()).unwrap();
            prop_assert_eq!(values, ternary);
            prop_assert_eq!(found_scale.to_bits(), scale.to_bits());
        }

        #[test]
        fn arbitrary_codes_decode_canonically_or_fail(
            codes in (0..=4usize).prop_flat_map(|n| prop::collection::vec(any::<u8>(), n * I2S_BLOCK_BYTES)),
        ) {
            let n_elements = codes.len() * 4;
            let bytes = tensor_bytes(&codes, 1.0);
            match decode_i2s(&bytes, n_elements) {
                Ok((values, _)) => {
                    prop_assert!(!codes.iter().any(|&byte| has_unused_code(byte)));
                    prop_assert_eq!(encode_i2s(&values, 1.0).unwrap(), bytes);
                }
                Err(QuantError::InvalidCode { index, .. }) => {
                    let byte = codes[(index / 128) * 32 + index % 32];
                    prop_assert_eq!((byte >> (6 - 2 * ((index % 128) / 32))) & 3, 3);
                }
                Err(other) => prop_assert!(false, "unexpected error {other}"),
            }
        }
    }
}
