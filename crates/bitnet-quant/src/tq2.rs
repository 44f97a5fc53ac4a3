//! TQ2_0, llama.cpp's GGUF type 35: 256-element blocks of 2-bit ternary codes, each block with its own f16 scale.
//!
//! A block is 66 bytes: `qs[64]`, then `d` as f16 little endian. The block
//! is two 128-element halves of 32 bytes each; byte `m` of half `h` holds
//! element `h * 128 + m + 32 * n` in bits `2n .. 2n + 1` (n = 0..4, least
//! significant pair first, the reverse of I2_S). The value is `code - 1`,
//! times `d`; code 3 is never written (ggml's `quantize_row_tq2_0_ref` and
//! `dequantize_row_tq2_0` in `ggml/src/ggml-quants.c`).

use half::f16;

use crate::blocks::{BlockLayout, TernaryBlocks};
use crate::codes::{any_unused_code, code_from_ternary, has_unused_code, ternary_from_code, CODE_MASK, UNUSED_CODE};
use crate::i2s::i2s_nbytes;
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

/// A TQ2_0 tensor of `n_elements` elements straight to I2_S bytes (codes,
/// then the trailer holding the scale) and its per-tensor scale: the same
/// result, errors included, as [`decode_tq2_0`], then
/// [`TernaryBlocks::into_per_tensor`], then [`encode_i2s`](crate::i2s::encode_i2s),
/// without the values in between.
///
/// Both formats pack 128 elements in 32 bytes, element `32n + m` of them in
/// byte `m`; TQ2_0 puts it in bits `2n`, I2_S in bits `6 - 2n` (and both
/// code a value as `value + 1`), so an I2_S byte is the TQ2_0 byte with its
/// four 2-bit fields in reverse order, and each TQ2_0 block gives two I2_S
/// blocks. The block scales must agree (as f16) wherever a block holds a
/// non-zero value.
pub fn tq2_0_to_i2s(bytes: &[u8], n_elements: usize) -> Result<(Vec<u8>, f32), QuantError> {
    let n_blocks = LAYOUT.check_decode_input(bytes, n_elements)?;
    let mut out = vec![0u8; i2s_nbytes(n_elements)];
    let (codes, trailer) = out.split_at_mut(n_blocks * QS_BYTES);
    let mut common: Option<(u16, f32)> = None;
    // A decoding error in any block comes first, as in `decode_tq2_0`
    // followed by `into_per_tensor`.
    let mut non_uniform = None;
    for (block_idx, (block_bytes, out_qs)) in
        bytes.chunks_exact(TQ2_0_BLOCK_BYTES).zip(codes.chunks_exact_mut(QS_BYTES)).enumerate()
    {
        let scale = LAYOUT.decode_scale(block_idx, block_bytes)?;
        let qs = &block_bytes[..QS_BYTES];
        if any_unused_code(qs) {
            return Err(first_unused_code(block_idx, qs));
        }
        for (o, &b) in out_qs.iter_mut().zip(qs) {
            *o = (b << 6) | ((b << 2) & 0x30) | ((b >> 2) & 0x0C) | (b >> 6);
        }
        // All elements zero is every code 1, every byte 0b01_01_01_01.
        if non_uniform.is_none() && qs.iter().any(|&b| b != 0x55) {
            let bits = f16::from_f32(scale).to_bits();
            match common {
                None => common = Some((bits, scale)),
                Some((first_bits, first)) if first_bits != bits => {
                    non_uniform = Some(QuantError::NonUniformScales { first, other: scale, block: block_idx });
                }
                Some(_) => {}
            }
        }
    }
    if let Some(err) = non_uniform {
        return Err(err);
    }
    let scale = common.map_or(0.0, |(_, scale)| scale);
    trailer[..4].copy_from_slice(&scale.to_le_bytes());
    Ok((out, scale))
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

        /// The direct repack gives what decoding, `into_per_tensor` and
        /// `encode_i2s` give, errors included: random blocks whose bytes
        /// are mostly zeros (0x55) or codes 0-2, sometimes code 3, whose
        /// scales are drawn from a few f16 values (negative, zero, NaN,
        /// infinite among them) so that uniform and mixed tensors both occur.
        #[test]
        fn direct_repack_to_i2s_matches_decode_then_encode(
            blocks in prop::collection::vec(
                (
                    prop::collection::vec(
                        prop_oneof![
                            6 => Just(0x55u8),
                            6 => any::<u8>().prop_map(|b| b & !((b & (b >> 1)) & 0x55)),
                            1 => any::<u8>(),
                        ],
                        QS_BYTES,
                    ),
                    prop::sample::select(vec![1.0f32, 1.0, 1.0, 0.5, -2.0, 0.0, f32::NAN, f32::INFINITY]),
                ),
                0..6,
            ),
        ) {
            let mut bytes = Vec::new();
            for (qs, scale) in &blocks {
                bytes.extend_from_slice(qs);
                bytes.extend_from_slice(&f16::from_f32(*scale).to_le_bytes());
            }
            let n = blocks.len() * TQ2_0_BLOCK_ELEMS;
            let reference = decode_tq2_0(&bytes, n)
                .and_then(TernaryBlocks::into_per_tensor)
                .and_then(|(values, scale)| crate::i2s::encode_i2s(&values, scale).map(|b| (b, scale)));
            let direct = tq2_0_to_i2s(&bytes, n);
            match (reference, direct) {
                (Ok((rb, rs)), Ok((db, ds))) => {
                    prop_assert_eq!(rb, db);
                    prop_assert_eq!(rs.to_bits(), ds.to_bits());
                }
                (Err(re), Err(de)) => prop_assert_eq!(format!("{re:?}"), format!("{de:?}")),
                (r, d) => prop_assert!(false, "reference {r:?}, direct {d:?}"),
            }
        }
    }

    #[test]
    fn direct_repack_refuses_what_decoding_refuses() {
        let mut bytes = vec![0x55u8; TQ2_0_BLOCK_BYTES];
        bytes[..2].copy_from_slice(&[0b00_00_11_01, 0x55]);
        bytes[64..].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        // Byte 0, field 1 (bits 3:2) = 3: element 32 of the block.
        assert_eq!(
            tq2_0_to_i2s(&bytes, 256).unwrap_err(),
            QuantError::InvalidCode { format: FORMAT, index: 32, code: UNUSED_CODE }
        );
        assert!(matches!(tq2_0_to_i2s(&bytes[..65], 256), Err(QuantError::ByteLength { .. })));
    }
}
