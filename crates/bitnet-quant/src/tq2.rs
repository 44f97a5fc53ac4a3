//! TQ2_0, llama.cpp's GGUF type 35: 256-element blocks of 2-bit ternary codes, each block with its own f16 scale.
//!
//! A block is 66 bytes: `qs[64]`, then `d` as f16 little endian. The block
//! is two 128-element halves of 32 bytes each; byte `m` of half `h` holds
//! element `h * 128 + m + 32 * n` in bits `2n .. 2n + 1` (n = 0..4, least
//! significant pair first, the reverse of I2_S). The value is `code - 1`,
//! times `d`; code 3 is never written (ggml's `quantize_row_tq2_0_ref` and
//! `dequantize_row_tq2_0` in `ggml/src/ggml-quants.c`).

use crate::blocks::{BlockLayout, TernaryBlocks};
use crate::codes::{code_from_ternary, has_unused_code, ternary_from_code, CODE_MASK, UNUSED_CODE};
use crate::QuantError;

/// Elements per TQ2_0 block (ggml's `QK_K`).
pub const TQ2_0_BLOCK_ELEMS: usize = 256;

/// Bytes per TQ2_0 block: 64 bytes of codes and an f16 scale.
pub const TQ2_0_BLOCK_BYTES: usize = 66;

const FORMAT: &str = "TQ2_0";
const LAYOUT: BlockLayout = BlockLayout {
    format: FORMAT,
    element_count: "TQ2_0 element count",
    block_elems: TQ2_0_BLOCK_ELEMS,
    block_bytes: TQ2_0_BLOCK_BYTES,
};

/// Bytes of codes per block.
const QS_BYTES: usize = 64;
/// Elements per half block; each half is packed into 32 bytes.
const HALF_ELEMS: usize = 128;
/// Elements per 2-bit field position within a half: field `n` of the 32
/// bytes holds elements `32n .. 32n + 32` of the half.
const FIELD_ELEMS: usize = 32;

/// Size in bytes of a TQ2_0 tensor of `n_elements` elements (a multiple of 256).
pub fn tq2_0_nbytes(n_elements: usize) -> usize {
    LAYOUT.nbytes(n_elements)
}

/// Encodes a ternary tensor with one scale per 256-element block as TQ2_0.
///
/// `ternary.len()` must be a multiple of 256 with values -1, 0, +1, and
/// `block_scales` must hold one finite scale per block that fits in f16
/// (scales are rounded to nearest f16, ties to even).
pub fn encode_tq2_0(ternary: &[i8], block_scales: &[f32]) -> Result<Vec<u8>, QuantError> {
    let scale_bytes = LAYOUT.check_encode_input(ternary, block_scales)?;
    let mut bytes = Vec::with_capacity(tq2_0_nbytes(ternary.len()));
    for (block, scale) in ternary.chunks_exact(TQ2_0_BLOCK_ELEMS).zip(scale_bytes) {
        let mut qs = [0u8; QS_BYTES];
        for (half, half_qs) in block.chunks_exact(HALF_ELEMS).zip(qs.chunks_exact_mut(FIELD_ELEMS)) {
            for (field, field_values) in half.chunks_exact(FIELD_ELEMS).enumerate() {
                for (byte, &value) in half_qs.iter_mut().zip(field_values) {
                    *byte |= code_from_ternary(value) << (2 * field);
                }
            }
        }
        bytes.extend_from_slice(&qs);
        bytes.extend_from_slice(&scale);
    }
    Ok(bytes)
}

/// Decodes a TQ2_0 tensor of `n_elements` elements into ternary values with
/// per-block scales.
///
/// Checks that `n_elements` is a multiple of 256, that `bytes` is exactly
/// `n/256 * 66` long, that every scale is finite, and that no code is 3 (the
/// error names the lowest offending element index; ggml would silently read
/// it as +2).
pub fn decode_tq2_0(bytes: &[u8], n_elements: usize) -> Result<TernaryBlocks, QuantError> {
    let n_blocks = LAYOUT.check_decode_input(bytes, n_elements)?;
    let mut values = vec![0i8; n_elements];
    let mut block_scales = Vec::with_capacity(n_blocks);
    let blocks = bytes.chunks_exact(TQ2_0_BLOCK_BYTES).zip(values.chunks_exact_mut(TQ2_0_BLOCK_ELEMS));
    for (block_idx, (block_bytes, block_values)) in blocks.enumerate() {
        block_scales.push(LAYOUT.decode_scale(block_idx, block_bytes)?);
        let qs = &block_bytes[..QS_BYTES];
        if qs.iter().any(|&byte| has_unused_code(byte)) {
            return Err(first_unused_code(block_idx, qs));
        }
        for (half_qs, half) in qs.chunks_exact(FIELD_ELEMS).zip(block_values.chunks_exact_mut(HALF_ELEMS)) {
            for (field, field_values) in half.chunks_exact_mut(FIELD_ELEMS).enumerate() {
                for (value, &byte) in field_values.iter_mut().zip(half_qs) {
                    *value = ternary_from_code((byte >> (2 * field)) & CODE_MASK);
                }
            }
        }
    }
    Ok(TernaryBlocks { values, block_scales, block_elems: TQ2_0_BLOCK_ELEMS })
}

/// The error for a block known to contain code 3, naming its lowest element index.
fn first_unused_code(block_idx: usize, qs: &[u8]) -> QuantError {
    let index_in_block = (0..TQ2_0_BLOCK_ELEMS)
        .find(|&k| {
            let (half, within) = (k / HALF_ELEMS, k % HALF_ELEMS);
            let byte = qs[half * FIELD_ELEMS + within % FIELD_ELEMS];
            (byte >> (2 * (within / FIELD_ELEMS))) & CODE_MASK == UNUSED_CODE
        })
        .unwrap_or(0);
    QuantError::InvalidCode { format: FORMAT, index: block_idx * TQ2_0_BLOCK_ELEMS + index_in_block, code: UNUSED_CODE }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Byte whose four elements are all 0 (code 1 in every field).
    const ZEROS: u8 = 0b01_01_01_01;

    fn block_bytes(qs: &[u8; 64], scale_f16_bits: u16) -> Vec<u8> {
        let mut bytes = qs.to_vec();
        bytes.extend_from_slice(&scale_f16_bits.to_le_bytes());
        bytes
    }

    /// Checks both directions against bytes worked out by hand.
    fn check(ternary: &[i8], block_scales: &[f32], expected: &[u8]) {
        assert_eq!(encode_tq2_0(ternary, block_scales).as_deref(), Ok(expected));
        let decoded = decode_tq2_0(expected, ternary.len()).unwrap();
        assert_eq!(decoded.values, ternary);
        assert_eq!(decoded.block_scales, block_scales);
        assert_eq!(decoded.block_elems, 256);
    }

    #[test]
    fn known_answer() {
        let mut ternary = vec![0i8; 512];
        // Block 0, scale 0.5 (f16 0x3800).
        // Element 0: half 0, m = 0, n = 0 -> byte 0 bits 1:0 = code 2.
        ternary[0] = 1;
        // Element 33 = 1 + 32*1: half 0, m = 1, n = 1 -> byte 1 bits 3:2 = code 0.
        ternary[33] = -1;
        // Element 130 = 128 + 2: half 1, m = 2, n = 0 -> byte 32 + 2 bits 1:0 = code 2.
        ternary[130] = 1;
        // Element 255 = 128 + 31 + 32*3: half 1, m = 31, n = 3 -> byte 63 bits 7:6 = code 0.
        ternary[255] = -1;
        let mut qs0 = [ZEROS; 64];
        qs0[0] = 0b01_01_01_10;
        qs0[1] = 0b01_01_00_01;
        qs0[34] = 0b01_01_01_10;
        qs0[63] = 0b00_01_01_01;
        // Block 1, scale -2.0 (f16 0xC000): all +1 -> code 2 everywhere.
        ternary[256..].fill(1);
        let qs1 = [0b10_10_10_10; 64];

        let mut expected = block_bytes(&qs0, 0x3800);
        expected.extend(block_bytes(&qs1, 0xC000));
        assert_eq!(&expected[64..66], &[0x00, 0x38]);
        check(&ternary, &[0.5, -2.0], &expected);

        let dequantized = decode_tq2_0(&expected, 512).unwrap().dequantize();
        assert_eq!(dequantized[0], 0.5);
        assert_eq!(dequantized[33], -0.5);
        assert_eq!(dequantized[34], 0.0);
        assert_eq!(dequantized[255], -0.5);
        assert_eq!(dequantized[256], -2.0);
    }

    #[test]
    fn every_position_follows_the_layout_formula() {
        // Element k = h*128 + m + 32n must be the only non-zero field, at
        // byte h*32 + m, bits 2n..2n+1.
        for k in 0..256 {
            let mut ternary = vec![0i8; 256];
            ternary[k] = -1;
            let (h, m, n) = (k / 128, k % 32, (k % 128) / 32);
            let mut qs = [ZEROS; 64];
            qs[h * 32 + m] &= !(0b11 << (2 * n));
            check(&ternary, &[1.0], &block_bytes(&qs, 0x3C00));
        }
    }

    #[test]
    fn scales_round_to_f16() {
        // 0.1 is not an f16; it rounds to 0x2E66 = 0.0999755859375.
        let bytes = encode_tq2_0(&[1; 256], &[0.1]).unwrap();
        assert_eq!(&bytes[64..], &[0x66, 0x2E]);
        assert_eq!(decode_tq2_0(&bytes, 256).unwrap().block_scales, [0.099_975_586]);
    }

    #[test]
    fn nbytes() {
        assert_eq!(tq2_0_nbytes(0), 0);
        assert_eq!(tq2_0_nbytes(256), 66);
        assert_eq!(tq2_0_nbytes(2560 * 2560), 25_600 * 66);
    }

    #[test]
    fn encode_errors() {
        fn check(ternary: &[i8], block_scales: &[f32], expected: QuantError) {
            assert_eq!(encode_tq2_0(ternary, block_scales), Err(expected));
        }
        check(&[0; 128], &[1.0], QuantError::NotMultiple { what: "TQ2_0 element count", value: 128, multiple: 256 });
        check(&[0; 512], &[1.0], QuantError::LengthMismatch { what: "block scales", expected: 2, found: 1 });
        let mut ternary = vec![0i8; 256];
        ternary[200] = -3;
        check(&ternary, &[1.0], QuantError::NotTernary { index: 200, value: -3 });
        check(
            &[0; 512],
            &[1.0, f32::INFINITY],
            QuantError::NonFiniteScale { format: "TQ2_0", block: 1, value: f32::INFINITY },
        );
        check(&[0; 256], &[1.0e6], QuantError::ScaleOutOfRange { format: "TQ2_0", block: 0, value: 1.0e6 });
    }

    #[test]
    fn decode_errors() {
        fn check(bytes: &[u8], n_elements: usize, expected: QuantError) {
            assert_eq!(decode_tq2_0(bytes, n_elements), Err(expected));
        }
        let valid = block_bytes(&[ZEROS; 64], 0x3C00);
        check(&valid[..65], 256, QuantError::ByteLength { format: "TQ2_0", expected: 66, found: 65 });
        check(&valid, 257, QuantError::NotMultiple { what: "TQ2_0 element count", value: 257, multiple: 256 });
        check(
            &block_bytes(&[ZEROS; 64], 0x7C00),
            256,
            QuantError::NonFiniteScale { format: "TQ2_0", block: 0, value: f32::INFINITY },
        );
        assert!(matches!(
            decode_tq2_0(&block_bytes(&[ZEROS; 64], 0x7E00), 256),
            Err(QuantError::NonFiniteScale { block: 0, .. })
        ));

        // Block 1, byte 40 = half 1, m = 8; bits 5:4 = n = 2 -> element
        // 256 + 128 + 8 + 64 = 456.
        let mut qs = [ZEROS; 64];
        qs[40] = 0b01_11_01_01;
        let mut bytes = valid.clone();
        bytes.extend(block_bytes(&qs, 0x3C00));
        check(&bytes, 512, QuantError::InvalidCode { format: "TQ2_0", index: 456, code: 3 });
        // Byte 5 field 1 is element 37; byte 9 field 0 is element 9, the lower index.
        let mut qs = [ZEROS; 64];
        qs[5] = 0b01_01_11_01;
        qs[9] = 0b01_01_01_11;
        check(&block_bytes(&qs, 0x3C00), 256, QuantError::InvalidCode { format: "TQ2_0", index: 9, code: 3 });
    }

    fn ternary_blocks(max_blocks: usize) -> impl Strategy<Value = (Vec<i8>, Vec<f32>)> {
        (0..=max_blocks).prop_flat_map(|n_blocks| {
            (
                prop::collection::vec(prop::sample::select(vec![-1i8, 0, 1]), n_blocks * TQ2_0_BLOCK_ELEMS),
                // Any finite f16, so the scale survives the round trip exactly.
                prop::collection::vec(
                    any::<u16>()
                        .prop_map(half::f16::from_bits)
                        .prop_filter("finite", |h| h.is_finite())
                        .prop_map(half::f16::to_f32),
                    n_blocks,
                ),
            )
        })
    }

    proptest! {
        #[test]
        fn round_trip((ternary, block_scales) in ternary_blocks(4)) {
            let bytes = encode_tq2_0(&ternary, &block_scales).unwrap();
            prop_assert_eq!(bytes.len(), tq2_0_nbytes(ternary.len()));
            let decoded = decode_tq2_0(&bytes, ternary.len()).unwrap();
            prop_assert_eq!(decoded.values, ternary);
            let found_bits: Vec<u32> = decoded.block_scales.iter().map(|s| s.to_bits()).collect();
            let expected_bits: Vec<u32> = block_scales.iter().map(|s| s.to_bits()).collect();
            prop_assert_eq!(found_bits, expected_bits);
        }
    }
}
