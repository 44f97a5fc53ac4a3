//! Deterministic inputs shared by the kernel benches and the
//! `paired_stream` example (no RNG dependency).
#![allow(dead_code)]

/// Deterministic pseudo-random bytes (xorshift), so no RNG dependency.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Valid I2_S codes (0, 1, 2 in every field).
pub fn i2s_codes(rows: usize, k: usize, seed: u64) -> Vec<u8> {
    bytes(rows * k / 4, seed)
        .into_iter()
        .map(|b| {
            let field = |shift: u32| (((b >> shift) & 3) % 3) << shift;
            field(6) | field(4) | field(2) | field(0)
        })
        .collect()
}

pub fn activations(len: usize, seed: u64) -> Vec<i8> {
    bytes(len, seed).into_iter().map(|b| b as i8).collect()
}

/// The examples' plain summing loop (as the compiler builds it) over `buf`
/// on the current rayon pool: their bandwidth yardstick.
pub fn plain_sum(buf: &[u64]) -> u64 {
    use rayon::prelude::*;
    buf.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b))).reduce(|| 0, u64::wrapping_add)
}
