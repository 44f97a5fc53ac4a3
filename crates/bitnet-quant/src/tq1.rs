//! TQ1_0, llama.cpp's GGUF type 34: 256-element blocks of base-3 packed trits (1.6875 bits per weight), each block with its own f16 scale.
//!
//! A block is 54 bytes: `qs[48]`, `qh[4]`, then `d` as f16 little endian
//! (ggml's `quantize_row_tq1_0_ref` and `dequantize_row_tq1_0` in
//! `ggml/src/ggml-quants.c`). Each byte holds up to five trits (code =
//! value + 1, in 0..3), most significant trit first, stored as the fixed-point
//! fraction `ceil(q * 256 / 243)` of the base-3 number `q` so that trit `n`
//! is recovered with one multiply: `((byte * 3^n) mod 256) * 3 >> 8`.
//!
//! Which elements share a byte (all offsets within the block):
//!
//! | bytes   | elements  | byte `m` of the section holds elements          |
//! |---------|-----------|-------------------------------------------------|
//! | 0..32   | 0..160    | `m + 32n`, n = 0..5                             |
//! | 32..48  | 160..240  | `160 + m + 16n`, n = 0..5                       |
//! | 48..52  | 240..256  | `240 + m + 4n`, n = 0..4, then one zero trit    |

use crate::blocks::{BlockLayout, TernaryBlocks};
use crate::codes::code_from_ternary;
use crate::QuantError;

/// Elements per TQ1_0 block (ggml's `QK_K`).
pub const TQ1_0_BLOCK_ELEMS: usize = 256;

/// Bytes per TQ1_0 block: 48 bytes of five trits, 4 bytes of four trits, an f16 scale.
pub const TQ1_0_BLOCK_BYTES: usize = 54;

const LAYOUT: BlockLayout = BlockLayout {
    format: "TQ1_0",
    element_count: "TQ1_0 element count",
    block_elems: TQ1_0_BLOCK_ELEMS,
    block_bytes: TQ1_0_BLOCK_BYTES,
};

/// Trits per byte in the fixed-point encoding (3^5 = 243 <= 256).
const TRITS_PER_BYTE: usize = 5;

/// Powers of three, for shifting trit `n` to the most significant position.
const POW3: [u8; TRITS_PER_BYTE] = [1, 3, 9, 27, 81];

/// A run of bytes in a block whose byte `m` holds elements
/// `first_elem + m + n * n_bytes` for `n` in `0..trits`.
#[derive(Debug)]
struct Section {
    first_byte: usize,
    n_bytes: usize,
    first_elem: usize,
    trits: usize,
}

/// The three sections of a block, in file order; together they cover
/// elements 0..256 exactly once.
const SECTIONS: [Section; 3] = [
    Section { first_byte: 0, n_bytes: 32, first_elem: 0, trits: 5 },
    Section { first_byte: 32, n_bytes: 16, first_elem: 160, trits: 5 },
    Section { first_byte: 48, n_bytes: 4, first_elem: 240, trits: 4 },
];

/// Size in bytes of a TQ1_0 tensor of `n_elements` elements (a multiple of 256).
pub fn tq1_0_nbytes(n_elements: usize) -> usize {
    LAYOUT.nbytes(n_elements)
}

/// Packs up to five codes (each 0..3), most significant first, into one byte.
///
/// Missing trits are zeros at the bottom, which is how the 4-trit `qh` bytes
/// keep their first trit in the most significant position.
fn pack_trits(codes: impl Iterator<Item = u8>) -> u8 {
    let mut q: u16 = 0;
    let mut n_trits = 0;
    for code in codes {
        q = q * 3 + u16::from(code);
        n_trits += 1;
    }
    for _ in n_trits..TRITS_PER_BYTE {
        q *= 3;
    }
    // q <= 242, so the ceiling of q * 256 / 243 is at most 255.
    (q * 256).div_ceil(243) as u8
}

/// Trit `n` (0 = most significant) of a packed byte, as a code 0..3.
///
/// Every byte value yields codes 0..=2 here: `(255 * 3) >> 8` is 2.
fn unpack_trit(byte: u8, n: usize) -> u8 {
    let shifted = byte.wrapping_mul(POW3[n]);
    ((u16::from(shifted) * 3) >> 8) as u8
}

/// Encodes a ternary tensor with one scale per 256-element block as TQ1_0.
///
/// `ternary.len()` must be a multiple of 256 with values -1, 0, +1, and
/// `block_scales` must hold one finite scale per block that fits in f16
/// (scales are rounded to nearest f16, ties to even).
pub fn encode_tq1_0(ternary: &[i8], block_scales: &[f32]) -> Result<Vec<u8>, QuantError> {
    let scale_bytes = LAYOUT.check_encode_input(ternary, block_scales)?;
    let mut bytes = vec![0u8; tq1_0_nbytes(ternary.len())];
    let blocks = ternary.chunks_exact(TQ1_0_BLOCK_ELEMS).zip(bytes.chunks_exact_mut(TQ1_0_BLOCK_BYTES));
    for ((block, block_bytes), scale) in blocks.zip(scale_bytes) {
        for section in &SECTIONS {
            let section_bytes = &mut block_bytes[section.first_byte..section.first_byte + section.n_bytes];
            for (m, byte) in section_bytes.iter_mut().enumerate() {
                let elems = (0..section.trits).map(|n| section.first_elem + m + n * section.n_bytes);
                *byte = pack_trits(elems.map(|k| code_from_ternary(block[k])));
            }
        }
        block_bytes[TQ1_0_BLOCK_BYTES - 2..].copy_from_slice(&scale);
    }
    Ok(bytes)
}

/// Decodes a TQ1_0 tensor of `n_elements` elements into ternary values with
/// per-block scales.
///
/// Checks that `n_elements` is a multiple of 256, that `bytes` is exactly
/// `n/256 * 54` long and that every scale is finite. Every byte value decodes
/// to valid trits, so there is no invalid-code error; bytes no encoder would
/// write decode as ggml decodes them.
pub fn decode_tq1_0(bytes: &[u8], n_elements: usize) -> Result<TernaryBlocks, QuantError> {
    let n_blocks = LAYOUT.check_decode_input(bytes, n_elements)?;
    let mut values = vec![0i8; n_elements];
    let mut block_scales = Vec::with_capacity(n_blocks);
    let blocks = bytes.chunks_exact(TQ1_0_BLOCK_BYTES).zip(values.chunks_exact_mut(TQ1_0_BLOCK_ELEMS));
    for (block_idx, (block_bytes, block_values)) in blocks.enumerate() {
        block_scales.push(LAYOUT.decode_scale(block_idx, block_bytes)?);
        for section in &SECTIONS {
            let section_bytes = &block_bytes[section.first_byte..section.first_byte + section.n_bytes];
            for (m, &byte) in section_bytes.iter().enumerate() {
                for n in 0..section.trits {
                    let k = section.first_elem + m + n * section.n_bytes;
                    block_values[k] = unpack_trit(byte, n) as i8 - 1;
                }
            }
        }
    }
    Ok(TernaryBlocks { values, block_scales, block_elems: TQ1_0_BLOCK_ELEMS })
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
    use proptest::prelude::*;

    /// Byte of five zero trits: q = 11111 (base 3) = 121, ceil(121 * 256 / 243) = 128.
    const ZEROS5: u8 = 0x80;
    /// `qh` byte of four zero trits: q = 1111 (base 3) * 3 = 120, ceil(120 * 256 / 243) = 127.
    const ZEROS4: u8 = 0x7F;

    fn block_bytes(qs: &[u8; 48], qh: &[u8; 4], scale: f32) -> Vec<u8> {
        let mut bytes = qs.to_vec();
        bytes.extend_from_slice(qh);
        bytes.extend_from_slice(&f16::from_f32(scale).to_le_bytes());
        bytes
    }

    /// Checks both directions against bytes worked out by hand.
    fn check(ternary: &[i8], block_scales: &[f32], expected: &[u8]) {
        assert_eq!(encode_tq1_0(ternary, block_scales).as_deref(), Ok(expected));
        let decoded = decode_tq1_0(expected, ternary.len()).unwrap();
        assert_eq!(decoded.values, ternary);
        assert_eq!(decoded.block_scales, block_scales);
        assert_eq!(decoded.block_elems, 256);
    }

    #[test]
    fn known_answer_zero_block() {
        check(&[0; 256], &[0.0], &block_bytes(&[ZEROS5; 48], &[ZEROS4; 4], 0.0));
    }

    #[test]
    fn known_answer_mixed_block() {
        let mut ternary = vec![0i8; 256];
        let mut qs = [ZEROS5; 48];
        let mut qh = [ZEROS4; 4];

        // Element 0 = +1 shares byte 0 with 32, 64, 96, 128 (all 0):
        // codes 2,1,1,1,1 -> q = 2*81 + 27 + 9 + 3 + 1 = 202,
        // ceil(202 * 256 / 243) = ceil(212.80) = 213.
        ternary[0] = 1;
        qs[0] = 213;
        // Element 97 = 1 + 32*3 = -1: byte 1, trit 3 -> codes 1,1,1,0,1 ->
        // q = 81 + 27 + 9 + 0 + 1 = 118, ceil(118 * 256 / 243) = ceil(124.31) = 125.
        ternary[97] = -1;
        qs[1] = 125;
        // Element 160 = -1 is byte 32, trit 0 (with 176, 192, 208, 224):
        // codes 0,1,1,1,1 -> q = 40, ceil(40 * 256 / 243) = ceil(42.14) = 43.
        ternary[160] = -1;
        qs[32] = 43;
        // Element 175 = 160 + 15 = +1: byte 32 + 15, trit 0 -> q = 202 -> 213.
        ternary[175] = 1;
        qs[47] = 213;
        // Element 240 = +1: qh[0], trit 0 (with 244, 248, 252):
        // codes 2,1,1,1 -> q = 54 + 9 + 3 + 1 = 67, times 3 = 201,
        // ceil(201 * 256 / 243) = ceil(211.75) = 212.
        ternary[240] = 1;
        qh[0] = 212;
        // Element 255 = 240 + 3 + 4*3 = -1: qh[3], trit 3 (with 243, 247, 251):
        // codes 1,1,1,0 -> q = 27 + 9 + 3 = 39, times 3 = 117,
        // ceil(117 * 256 / 243) = ceil(123.26) = 124.
        ternary[255] = -1;
        qh[3] = 124;

        // 1.0 is f16 0x3C00.
        let expected = block_bytes(&qs, &qh, 1.0);
        assert_eq!(&expected[52..], &[0x00, 0x3C]);
        check(&ternary, &[1.0], &expected);
    }

    #[test]
    fn trit_extraction_matches_base3_digits() {
        // For every base-3 number q of five digits, the stored byte is
        // ceil(q * 256 / 243), and unpacking trit n must give digit n (most
        // significant first). This checks the multiply-and-shift decode
        // against plain base-3 arithmetic, independent of our encoder.
        for q in 0..243u16 {
            let byte = u8::try_from((q * 256).div_ceil(243)).unwrap();
            for n in 0..5 {
                let digit = (q / 3u16.pow(4 - n as u32) % 3) as u8;
                assert_eq!(unpack_trit(byte, n), digit, "q = {q}, byte = {byte}, trit {n}");
            }
            let digits = (0..5).map(|n| (q / 3u16.pow(4 - n) % 3) as u8);
            assert_eq!(pack_trits(digits), byte, "q = {q}");
        }
    }

    #[test]
    fn sections_cover_each_element_once() {
        let mut seen = [0u8; 256];
        for section in &SECTIONS {
            for m in 0..section.n_bytes {
                for n in 0..section.trits {
                    seen[section.first_elem + m + n * section.n_bytes] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&count| count == 1));
        let last = &SECTIONS[2];
        assert_eq!(last.first_byte + last.n_bytes + 2, TQ1_0_BLOCK_BYTES);
    }

    #[test]
    fn every_position_round_trips_alone() {
        for k in 0..256 {
            for value in [-1i8, 1] {
                let mut ternary = vec![0i8; 256];
                ternary[k] = value;
                let bytes = encode_tq1_0(&ternary, &[1.0]).unwrap();
                // Exactly one byte differs from the all-zero block.
                let zero_block = block_bytes(&[ZEROS5; 48], &[ZEROS4; 4], 1.0);
                let differing = bytes.iter().zip(&zero_block).filter(|(a, b)| a != b).count();
                assert_eq!(differing, 1, "element {k}");
                assert_eq!(decode_tq1_0(&bytes, 256).unwrap().values, ternary, "element {k}");
            }
        }
    }

    #[test]
    fn any_byte_decodes() {
        // Bytes no encoder writes (e.g. 0xFF) still decode to valid trits, as in ggml.
        let bytes = block_bytes(&[0xFF; 48], &[0xFF; 4], 1.0);
        let decoded = decode_tq1_0(&bytes, 256).unwrap();
        assert!(decoded.values.iter().all(|v| (-1..=1).contains(v)));
        // 0xFF: trit 0 = (255*3)>>8 = 2 -> +1; trit 1 = ((255*3) mod 256 = 253)*3>>8 = 2 -> +1.
        assert_eq!(decoded.values[0], 1);
        assert_eq!(decoded.values[32], 1);
    }

    #[test]
    fn nbytes() {
        assert_eq!(tq1_0_nbytes(0), 0);
        assert_eq!(tq1_0_nbytes(512), 108);
    }

    #[test]
    fn encode_errors() {
        fn check(ternary: &[i8], block_scales: &[f32], expected: QuantError) {
            assert_eq!(encode_tq1_0(ternary, block_scales), Err(expected));
        }
        check(
            &[0; 300],
            &[1.0, 1.0],
            QuantError::NotMultiple { what: "TQ1_0 element count", value: 300, multiple: 256 },
        );
        check(&[0; 256], &[], QuantError::LengthMismatch { what: "block scales", expected: 1, found: 0 });
        let mut ternary = vec![0i8; 512];
        ternary[300] = 5;
        check(&ternary, &[1.0, 1.0], QuantError::NotTernary { index: 300, value: 5 });
        check(&[0; 256], &[-7.0e4], QuantError::ScaleOutOfRange { format: "TQ1_0", block: 0, value: -7.0e4 });
        assert!(matches!(encode_tq1_0(&[0; 256], &[f32::NAN]), Err(QuantError::NonFiniteScale { block: 0, .. })));
    }

    #[test]
    fn decode_errors() {
        fn check(bytes: &[u8], n_elements: usize, expected: QuantError) {
            assert_eq!(decode_tq1_0(bytes, n_elements), Err(expected));
        }
        let valid = block_bytes(&[ZEROS5; 48], &[ZEROS4; 4], 1.0);
        check(&valid, 512, QuantError::ByteLength { format: "TQ1_0", expected: 108, found: 54 });
        check(&valid, 255, QuantError::NotMultiple { what: "TQ1_0 element count", value: 255, multiple: 256 });
        let mut bytes = valid.clone();
        bytes.extend(block_bytes(&[ZEROS5; 48], &[ZEROS4; 4], f32::NEG_INFINITY));
        check(&bytes, 512, QuantError::NonFiniteScale { format: "TQ1_0", block: 1, value: f32::NEG_INFINITY });
    }

    fn ternary_blocks(max_blocks: usize) -> impl Strategy<Value = (Vec<i8>, Vec<f32>)> {
        (0..=max_blocks).prop_flat_map(|n_blocks| {
            (
                prop::collection::vec(prop::sample::select(vec![-1i8, 0, 1]), n_blocks * TQ1_0_BLOCK_ELEMS),
                prop::collection::vec(
                    any::<u16>()
                        .prop_map(f16::from_bits)
                        .prop_filter("finite", |h| h.is_finite())
                        .prop_map(f16::to_f32),
                    n_blocks,
                ),
            )
        })
    }

    proptest! {
        #[test]
        fn round_trip((ternary, block_scales) in ternary_blocks(4)) {
            let bytes = encode_tq1_0(&ternary, &block_scales).unwrap();
            prop_assert_eq!(bytes.len(), tq1_0_nbytes(ternary.len()));
            let decoded = decode_tq1_0(&bytes, ternary.len()).unwrap();
            prop_assert_eq!(decoded.values, ternary);
            let found_bits: Vec<u32> = decoded.block_scales.iter().map(|s| s.to_bits()).collect();
            let expected_bits: Vec<u32> = block_scales.iter().map(|s| s.to_bits()).collect();
            prop_assert_eq!(found_bits, expected_bits);
        }

        #[test]
        fn tq1_and_tq2_agree((ternary, block_scales) in ternary_blocks(3)) {
            let from_tq1 = decode_tq1_0(&encode_tq1_0(&ternary, &block_scales).unwrap(), ternary.len()).unwrap();
            let from_tq2 = crate::tq2::decode_tq2_0(
                &crate::tq2::encode_tq2_0(&ternary, &block_scales).unwrap(),
                ternary.len(),
            ).unwrap();
            prop_assert_eq!(from_tq1.values, from_tq2.values);
        }
    }
}
