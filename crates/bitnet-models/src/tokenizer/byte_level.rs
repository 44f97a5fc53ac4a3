//! GPT-2's byte-to-unicode mapping, the spelling of byte-level BPE tokens.
//!
//! Byte-level BPE works on bytes, but vocabularies (tokenizer.json and GGUF
//! alike) store tokens as strings in which every byte is replaced by one
//! printable character: the printable Latin-1 bytes (`!`..=`~`, `¡`..=`¬`,
//! `®`..=`ÿ`) stand for themselves and the other 68 bytes, in increasing
//! order, take the code points U+0100, U+0101, ... So the space 0x20 is
//! `Ġ` (U+0120) and the newline 0x0A is `Ċ` (U+010A).

use std::sync::LazyLock;

/// Is this byte one of GPT-2's 188 bytes that stand for themselves?
fn is_printable(byte: u8) -> bool {
    matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

static BYTE_TO_CHAR: LazyLock<[char; 256]> = LazyLock::new(|| {
    let mut table = ['\0'; 256];
    let mut n_shifted = 0u32;
    for byte in 0..=255u8 {
        table[usize::from(byte)] = if is_printable(byte) {
            char::from(byte)
        } else {
            // 256 + at most 67 is far below the surrogate range, so this
            // conversion always succeeds; the fallback only keeps the code
            // free of panics.
            let c = char::from_u32(256 + n_shifted).unwrap_or(char::REPLACEMENT_CHARACTER);
            n_shifted += 1;
            c
        };
    }
    table
});

/// The character that spells `byte` in a byte-level token.
pub fn byte_to_char(byte: u8) -> char {
    BYTE_TO_CHAR[usize::from(byte)]
}

/// Inverse of [`BYTE_TO_CHAR`], indexed by code point (all mapped characters are below U+0200).
static CHAR_TO_BYTE: LazyLock<[Option<u8>; 512]> = LazyLock::new(|| {
    let mut table = [None; 512];
    for byte in 0..=255u8 {
        let code = u32::from(byte_to_char(byte));
        if let Some(slot) = usize::try_from(code).ok().and_then(|i| table.get_mut(i)) {
            *slot = Some(byte);
        }
    }
    table
});

/// The byte a byte-level character stands for, `None` for any other character.
pub fn char_to_byte(c: char) -> Option<u8> {
    let index = usize::try_from(u32::from(c)).ok()?;
    CHAR_TO_BYTE.get(index).copied().flatten()
}

/// Spells raw bytes as a byte-level token string.
pub fn bytes_to_token(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_to_char(b)).collect()
}

/// The raw bytes of a byte-level token string, `None` if some character is
/// not part of the mapping (such tokens, e.g. special tokens written with a
/// literal space, are raw text).
pub fn token_to_bytes(token: &str) -> Option<Vec<u8>> {
    token.chars().map(char_to_byte).collect()
}
