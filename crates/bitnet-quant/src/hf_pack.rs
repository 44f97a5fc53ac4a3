//! The uint8 packing of ternary projection weights in HF microsoft/bitnet-b1.58-2B-4T safetensors: four output rows per byte, packed along dim 0.
//!
//! An unpacked `[out, in]` matrix is stored as a `[out/4, in]` uint8 matrix.
//! Packed row `p`, bits `2i .. 2i + 1` (i = 0..4, least significant pair
//! first) hold unpacked row `i * (out/4) + p`, same column; the value is the
//! field minus 1 (transformers' `pack_weights` / `unpack_weights` in
//! `integrations/bitnet.py`). So the first quarter of the output rows lives
//! in the low bit pairs, not four adjacent rows in one byte.

use crate::codes::{any_unused_code, check_ternary, code_from_ternary, ternary_from_code, CODE_MASK, UNUSED_CODE};
use crate::QuantError;

const FORMAT: &str = "HF packed";

/// Unpacked rows per packed byte.
const ROWS_PER_BYTE: usize = 4;

/// Packs a row-major ternary `[out_features, in_features]` matrix into the
/// row-major `[out_features / 4, in_features]` uint8 layout.
///
/// `out_features` must be a multiple of 4, `ternary.len()` must equal
/// `out_features * in_features`, and every value must be -1, 0 or +1.
pub fn pack_hf(ternary: &[i8], out_features: usize, in_features: usize) -> Result<Vec<u8>, QuantError> {
    let n_elements = check_shape(out_features, in_features)?;
    if ternary.len() != n_elements {
        return Err(QuantError::LengthMismatch {
            what: "HF unpacked weights",
            expected: n_elements,
            found: ternary.len(),
        });
    }
    check_ternary(ternary)?;

    let mut packed = vec![0u8; n_elements / ROWS_PER_BYTE];
    // An empty matrix needs no work, and chunking by a zero row length would panic.
    if n_elements == 0 {
        return Ok(packed);
    }
    let packed_rows = out_features / ROWS_PER_BYTE;
    for (row_idx, row) in ternary.chunks_exact(in_features).enumerate() {
        let shift = 2 * (row_idx / packed_rows);
        let packed_row_idx = row_idx % packed_rows;
        let packed_row = &mut packed[packed_row_idx * in_features..(packed_row_idx + 1) * in_features];
        for (byte, &value) in packed_row.iter_mut().zip(row) {
            *byte |= code_from_ternary(value) << shift;
        }
    }
    Ok(packed)
}

/// Unpacks the `[out_features / 4, in_features]` uint8 layout into a
/// row-major ternary `[out_features, in_features]` matrix.
///
/// `out_features` must be a multiple of 4 and `packed.len()` must equal
/// `out_features / 4 * in_features`. A field holding 3 (which transformers
/// would read as +2) is an error naming the unpacked flat index
/// `row * in_features + column`; the lowest such index is reported.
pub fn unpack_hf(packed: &[u8], out_features: usize, in_features: usize) -> Result<Vec<i8>, QuantError> {
    let n_elements = check_shape(out_features, in_features)?;
    let expected = n_elements / ROWS_PER_BYTE;
    if packed.len() != expected {
        return Err(QuantError::ByteLength { format: FORMAT, expected, found: packed.len() });
    }

    let mut ternary = vec![0i8; n_elements];
    if n_elements == 0 {
        return Ok(ternary);
    }
    let packed_rows = out_features / ROWS_PER_BYTE;
    let has_unused = any_unused_code(packed);
    for (row_idx, row) in ternary.chunks_exact_mut(in_features).enumerate() {
        let shift = 2 * (row_idx / packed_rows);
        let packed_row_idx = row_idx % packed_rows;
        let packed_row = &packed[packed_row_idx * in_features..(packed_row_idx + 1) * in_features];
        if has_unused {
            // Only a file with code 3 somewhere pays for the search that
            // names its first element in row-major order.
            if let Some(col) = packed_row.iter().position(|&byte| (byte >> shift) & CODE_MASK == UNUSED_CODE) {
                return Err(QuantError::InvalidCode {
                    format: FORMAT,
                    index: row_idx * in_features + col,
                    code: UNUSED_CODE,
                });
            }
        }
        for (value, &byte) in row.iter_mut().zip(packed_row) {
            *value = ternary_from_code((byte >> shift) & CODE_MASK);
        }
    }
    Ok(ternary)
}

/// Checks the shape both directions share and returns its element count.
fn check_shape(out_features: usize, in_features: usize) -> Result<usize, QuantError> {
    if out_features % ROWS_PER_BYTE != 0 {
        return Err(QuantError::NotMultiple { what: "HF out_features", value: out_features, multiple: ROWS_PER_BYTE });
    }
    out_features.checked_mul(in_features).ok_or(QuantError::ShapeOverflow { rows: out_features, cols: in_features })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Checks both directions against a packing worked out by hand.
    fn check(ternary: &[i8], out_features: usize, in_features: usize, expected: &[u8]) {
        assert_eq!(pack_hf(ternary, out_features, in_features).as_deref(), Ok(expected));
        assert_eq!(unpack_hf(expected, out_features, in_features).as_deref(), Ok(ternary));
    }

    #[test]
    fn known_answer_4x2() {
        // out = 4 -> one packed row; unpacked row i goes to bits 2i..2i+1.
        // Column 0 = [1, 0, -1, 1] -> codes 2, 1, 0, 2 -> 0b10_00_01_10.
        // Column 1 = [-1, 1, 0, 1] -> codes 0, 2, 1, 2 -> 0b10_01_10_00.
        #[rustfmt::skip]
        let ternary = [
             1, -1,
             0,  1,
            -1,  0,
             1,  1,
        ];
        check(&ternary, 4, 2, &[0b10_00_01_10, 0b10_01_10_00]);
    }

    #[test]
    fn known_answer_8x3() {
        // out = 8 -> two packed rows; unpacked row r goes to packed row r % 2,
        // bits 2 * (r / 2). Packed row 0 holds rows 0, 2, 4, 6; row 1 holds 1, 3, 5, 7.
        #[rustfmt::skip]
        let ternary = [
             1,  0, -1, // row 0: packed row 0, bits 1:0
            -1,  0,  1, // row 1: packed row 1, bits 1:0
             0,  1,  1, // row 2: packed row 0, bits 3:2
             1, -1,  0, // row 3: packed row 1, bits 3:2
            -1, -1, -1, // row 4: packed row 0, bits 5:4
             0,  0,  0, // row 5: packed row 1, bits 5:4
             1,  1,  1, // row 6: packed row 0, bits 7:6
            -1,  1,  0, // row 7: packed row 1, bits 7:6
        ];
        // Packed row 0, column 0: rows 0, 2, 4, 6 = 1, 0, -1, 1 -> codes 2, 1, 0, 2.
        // Packed row 0, column 1: 0, 1, -1, 1 -> codes 1, 2, 0, 2.
        // Packed row 0, column 2: -1, 1, -1, 1 -> codes 0, 2, 0, 2.
        // Packed row 1, column 0: rows 1, 3, 5, 7 = -1, 1, 0, -1 -> codes 0, 2, 1, 0.
        // Packed row 1, column 1: 0, -1, 0, 1 -> codes 1, 0, 1, 2.
        // Packed row 1, column 2: 1, 0, 0, 0 -> codes 2, 1, 1, 1.
        #[rustfmt::skip]
        let expected = [
            0b10_00_01_10, 0b10_00_10_01, 0b10_00_10_00,
            0b00_01_10_00, 0b10_01_00_01, 0b01_01_01_10,
        ];
        check(&ternary, 8, 3, &expected);
    }

    #[test]
    fn known_answer_transformers_docstring() {
        // The example in transformers' `unpack_weights` docstring: packed
        // [[0b10100001, 0b00011000], [0b10010000, 0b00001010]] unpacks to an
        // 8x2 matrix. Worked out with the rule above: packed row 0, column 0
        // = fields 01, 00, 10, 10 -> rows 0, 2, 4, 6 = 0, -1, 1, 1, and so on.
        #[rustfmt::skip]
        let ternary = [
             0, -1,
            -1,  1,
            -1,  1,
            -1,  1,
             1,  0,
             0, -1,
             1, -1,
             1, -1,
        ];
        check(&ternary, 8, 2, &[0b1010_0001, 0b0001_1000, 0b1001_0000, 0b0000_1010]);
    }

    #[test]
    fn empty_shapes() {
        check(&[], 0, 5, &[]);
        check(&[], 8, 0, &[]);
    }

    #[test]
    fn pack_errors() {
        fn check(ternary: &[i8], out_features: usize, in_features: usize, expected: QuantError) {
            assert_eq!(pack_hf(ternary, out_features, in_features), Err(expected));
        }
        check(&[0; 12], 6, 2, QuantError::NotMultiple { what: "HF out_features", value: 6, multiple: 4 });
        check(&[0; 7], 4, 2, QuantError::LengthMismatch { what: "HF unpacked weights", expected: 8, found: 7 });
        check(&[0, 0, 0, 0, 0, 0, 0, 9], 4, 2, QuantError::NotTernary { index: 7, value: 9 });
        check(&[], usize::MAX - 3, 2, QuantError::ShapeOverflow { rows: usize::MAX - 3, cols: 2 });
    }

    #[test]
    fn unpack_errors() {
        fn check(packed: &[u8], out_features: usize, in_features: usize, expected: QuantError) {
            assert_eq!(unpack_hf(packed, out_features, in_features), Err(expected));
        }
        check(&[0x55; 3], 4, 2, QuantError::ByteLength { format: "HF packed", expected: 2, found: 3 });
        check(&[0x55; 2], 5, 2, QuantError::NotMultiple { what: "HF out_features", value: 5, multiple: 4 });
        // [1, 2] packed, column 1 has field 2 (bits 5:4) = 3 -> unpacked row 2,
        // column 1 -> flat index 2 * 2 + 1 = 5.
        check(
            &[0b01_01_01_01, 0b00_11_01_01],
            4,
            2,
            QuantError::InvalidCode { format: "HF packed", index: 5, code: 3 },
        );
        check(&[], usize::MAX - 3, 2, QuantError::ShapeOverflow { rows: usize::MAX - 3, cols: 2 });
    }

    fn matrix() -> impl Strategy<Value = (Vec<i8>, usize, usize)> {
        (0..=6usize, 0..=9usize).prop_flat_map(|(packed_rows, in_features)| {
            let out_features = packed_rows * 4;
            prop::collection::vec(prop::sample::select(vec![-1i8, 0, 1]), out_features * in_features)
                .prop_map(move |ternary| (ternary, out_features, in_features))
        })
    }

    proptest! {
        #[test]
        fn round_trip((ternary, out_features, in_features) in matrix()) {
            let packed = pack_hf(&ternary, out_features, in_features).unwrap();
            prop_assert_eq!(packed.len(), out_features / 4 * in_features);
            prop_assert_eq!(unpack_hf(&packed, out_features, in_features).unwrap(), ternary);
        }
    }
}
