//! The 2-bit ternary code shared by I2_S, TQ2_0 and the HF packing (code = value + 1), and the ternary-input check.

use crate::QuantError;

/// Mask of one 2-bit field.
pub(crate) const CODE_MASK: u8 = 0b11;

/// Every format here leaves code 3 unused; readers reject it rather than guess a value.
pub(crate) const UNUSED_CODE: u8 = 3;

/// Code of a ternary value: -1 -> 0, 0 -> 1, +1 -> 2.
///
/// Values outside -1..=1 saturate to the nearest ternary value, so the result
/// is always a valid code and the addition cannot overflow.
pub(crate) fn code_from_ternary(value: i8) -> u8 {
    (value.clamp(-1, 1) + 1) as u8
}

/// Ternary value of a code the caller has already checked is 0, 1 or 2.
pub(crate) fn ternary_from_code(code: u8) -> i8 {
    code as i8 - 1
}

/// True when any of the four 2-bit fields of `byte` holds code 3.
///
/// A field is 3 exactly when both of its bits are set, so AND-ing the byte
/// with itself shifted by one and keeping the low bit of each field finds it
/// in one step.
pub(crate) fn has_unused_code(byte: u8) -> bool {
    byte & (byte >> 1) & 0b0101_0101 != 0
}

/// True when any byte of `bytes` has a 2-bit field holding code 3: one
/// pass without an early exit, which the compiler vectorises (a search
/// for the first such byte does not).
pub(crate) fn any_unused_code(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |acc, &byte| acc | (byte & (byte >> 1))) & 0b0101_0101 != 0
}

/// Rejects the first element that is not -1, 0 or +1.
pub(crate) fn check_ternary(values: &[i8]) -> Result<(), QuantError> {
    // The common case, all valid, in one vectorised pass (v + 1, wrapping,
    // read as u8 is at most 2 exactly for -1, 0 and +1); the search runs
    // only for an error.
    if values.iter().fold(0u8, |max, &v| max.max(v.wrapping_add(1) as u8)) <= 2 {
        return Ok(());
    }
    match values.iter().position(|value| !(-1..=1).contains(value)) {
        None => Ok(()),
        Some(index) => Err(QuantError::NotTernary { index, value: values[index] }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_mapping() {
        fn check(value: i8, expected: u8) {
            assert_eq!(code_from_ternary(value), expected, "value {value}");
        }
        check(-1, 0);
        check(0, 1);
        check(1, 2);
        // Saturation keeps non-ternary input away from code 3.
        check(-128, 0);
        check(-2, 0);
        check(2, 2);
        check(127, 2);

        for code in 0..3u8 {
            assert_eq!(code_from_ternary(ternary_from_code(code)), code);
        }
    }

    #[test]
    fn unused_code_detection() {
        fn check(byte: u8, expected: bool) {
            assert_eq!(has_unused_code(byte), expected, "byte {byte:#010b}");
        }
        check(0b0000_0000, false);
        check(0b1010_1010, false);
        check(0b0101_0101, false);
        check(0b1001_0110, false);
        check(0b1100_0000, true);
        check(0b0011_0000, true);
        check(0b0000_1100, true);
        check(0b0000_0011, true);
        check(0b0110_0110, false);
        // Exhaustive: a byte is flagged exactly when one of its fields is 3.
        for byte in 0..=u8::MAX {
            let any_three = (0..4).any(|field| (byte >> (2 * field)) & CODE_MASK == UNUSED_CODE);
            assert_eq!(has_unused_code(byte), any_three, "byte {byte:#010b}");
        }
    }

    #[test]
    fn ternary_check() {
        fn check(values: &[i8], expected: Result<(), QuantError>) {
            assert_eq!(check_ternary(values), expected, "values {values:?}");
        }
        check(&[], Ok(()));
        check(&[-1, 0, 1, 1, 0, -1], Ok(()));
        check(&[0, 1, 2, -5], Err(QuantError::NotTernary { index: 2, value: 2 }));
        check(&[-2], Err(QuantError::NotTernary { index: 0, value: -2 }));
        // Every i8 alone and after a long valid run (the vectorised pass).
        for value in i8::MIN..=i8::MAX {
            let mut values = vec![1i8; 100];
            values.push(value);
            let expected =
                if (-1..=1).contains(&value) { Ok(()) } else { Err(QuantError::NotTernary { index: 100, value }) };
            check(&values, expected.clone());
            check(&[value], expected.map_err(|_| QuantError::NotTernary { index: 0, value }));
        }
    }

    #[test]
    fn any_unused_code_matches_a_byte_by_byte_search() {
        for byte in 0..=u8::MAX {
            let mut bytes = vec![0b1001_0110u8; 70];
            bytes.push(byte);
            assert_eq!(any_unused_code(&bytes), has_unused_code(byte), "byte {byte:#010b}");
        }
        assert!(!any_unused_code(&[]));
    }
}
