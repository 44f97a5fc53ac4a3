//! AMX-INT8 I2_S kernel for passes of many tokens (prefill, batched decode):
//! the ternary codes, unpacked to one byte each, are the unsigned tile of
//! `tdpbusd`, the int8 activations the signed one; the codes' `- sum(q)`
//! correction is the same as every other kernel's, so the results are the
//! same exact integers.
//!
//! Shapes. A `tdpbusd` multiplies a 16 x 64 byte tile `A` (16 weight rows,
//! 64 values of `k`) by a 16 x 64 byte tile `B` (16 groups of 4 values of
//! `k`, each for 16 tokens) into a 16 x 16 `i32` tile `C` (rows x tokens):
//! `C[m][n] += sum_i A[m][4r + i] * B[r][4n + i]`. Eight tile registers hold
//! a 2 x 2 block: `tmm0..tmm3` the four `C` tiles, `tmm4`/`tmm5` the `A`
//! tiles of 32 rows, `tmm6`/`tmm7` the `B` tiles of 32 tokens.
//!
//! Order of `k`. The sum over `k` does not depend on the order of its terms,
//! so the codes are unpacked in the order a 64-byte load of two blocks gives
//! them (group `g` of both blocks side by side, as in the AVX-512 kernel) and
//! the activations are laid out in that same order: chunk `c = 4p + g` of 64
//! values is group `g` of block pair `p`, which is the AVX-512 kernel's
//! interleaved activations `[c * 64, c * 64 + 64)`. Hence `k` must be a
//! multiple of 256 (whole block pairs); other widths take the AVX-512 kernel.
//!
//! Memory. Per call the activations are laid out once as `B` tiles
//! ([`tile_activations`]: for each group of 16 tokens and each chunk, 1 KiB,
//! the tokens past the end zero). Per block of 32 rows the codes are
//! unpacked once into a per-thread buffer (`[chunk][row][64]`, so each `A`
//! tile is 1 KiB contiguous) and reused for every token group of the task.
//! A parallel pass is cut into tasks of 64 rows x 128 tokens
//! ([`gemm_tiled_tokens`]), so that a task's unpacked codes and activation
//! tiles stay in its core's L2.
//!
//! Safety. Tile instructions fault unless this thread loaded a tile
//! configuration, and kill the process unless Linux granted it the tile
//! state: an [`AmxToken`] exists only after that grant, and every entry
//! point here runs `ldtilecfg` first and `tilerelease` last. Every tile load
//! and store reads or writes 16 rows of 64 bytes at a stride of 64, i.e. one
//! contiguous KiB, and each is given a `&[u8; 1024]`-sized slice.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use super::Activations;
use crate::cpu::token::AmxToken;

/// Values of `k` per tile row (and per chunk).
const CHUNK: usize = 64;

/// Rows of a tile: weight rows of `A`, tokens of `C`.
const TILE_ROWS: usize = 16;

/// Bytes of one tile (16 rows of 64 bytes).
const TILE_BYTES: usize = 1024;

/// Widths (`k`) the tiles take: whole pairs of 128-value blocks.
pub(crate) fn takes_width(k: usize) -> bool {
    k > 0 && k.is_multiple_of(256)
}

/// The interleaved activations `q` (`[n_tokens, k]`) as `B` tiles: for token
/// group `t` (16 tokens) and chunk `c`, the KiB at `(t * chunks + c) * 1024`
/// holds in row `r` the values `4r..4r + 4` of chunk `c` of each of the 16
/// tokens in turn; tokens past `n_tokens` are zero.
pub(super) fn tile_activations(q: &[i8], n_tokens: usize, k: usize) -> Vec<i8> {
    let chunks = k / CHUNK;
    let groups = n_tokens.div_ceil(TILE_ROWS);
    let mut tiles = vec![0i8; groups * chunks * TILE_BYTES];
    // Rayon work during a step is marked (see `team`).
    crate::cpu::team::rayon_section(|| {
        tiles.par_chunks_mut(chunks * TILE_BYTES).enumerate().for_each(|(group, group_tiles)| {
            let first = group * TILE_ROWS;
            for n in 0..TILE_ROWS.min(n_tokens - first) {
                let token = &q[(first + n) * k..(first + n + 1) * k];
                for (chunk, tile) in token.chunks_exact(CHUNK).zip(group_tiles.chunks_exact_mut(TILE_BYTES)) {
                    for (r, word) in chunk.chunks_exact(4).enumerate() {
                        tile[r * 64 + n * 4..r * 64 + n * 4 + 4].copy_from_slice(word);
                    }
                }
            }
        });
    });
    tiles
}

thread_local! {
    /// Unpacked codes of the current block of rows (up to 32 rows x k bytes).
    static UNPACKED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The tile configuration: palette 1, tiles 0-7 of 16 rows x 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn full() -> Self {
        let mut bytes = [0u8; 64];
        bytes[0] = 1; // palette 1
        for tile in 0..8 {
            // colsb[tile]: u16 little-endian at 16 + 2 * tile; rows[tile] at 48 + tile.
            bytes[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&(CHUNK as u16).to_le_bytes());
            bytes[48 + tile] = TILE_ROWS as u8;
        }
        Self(bytes)
    }
}

/// Rows `0..rows / 16 * 16` of `codes` on the tiles (requires
/// `acts.tiles`), the rest on the AVX-512 kernel; `out[t]` is token `t`'s
/// output for these rows.
pub(super) fn gemm_rows(token: AmxToken, codes: &[u8], acts: &Activations<'_>, out: &mut [&mut [i32]]) {
    if acts.tiles.is_none() {
        super::avx512::gemm_rows(token.avx512(), codes, acts, out);
        return;
    }
    let row_bytes = acts.k / 4;
    let n_rows = codes.len() / row_bytes;
    let tiled = n_rows / TILE_ROWS * TILE_ROWS;
    if tiled > 0 {
        let mut tiled_out: Vec<&mut [i32]> = out.iter_mut().map(|token_out| &mut token_out[..tiled]).collect();
        gemm_tiled_tokens(token, &codes[..tiled * row_bytes], acts, &mut tiled_out, 0..acts.n_tokens());
    }
    if tiled < n_rows {
        let mut rest: Vec<&mut [i32]> = out.iter_mut().map(|token_out| &mut token_out[tiled..]).collect();
        super::avx512::gemm_rows(token.avx512(), &codes[tiled * row_bytes..], acts, &mut rest);
    }
}

/// Rows of `codes` (a multiple of 16) for the tokens `tokens` only (`out[i]`
/// is token `tokens.start + i`'s output): one task of a pass cut by rows and
/// tokens. `tokens.start` must be a multiple of 16 and `acts.tiles` present.
pub(super) fn gemm_tiled_tokens(
    _token: AmxToken,
    codes: &[u8],
    acts: &Activations<'_>,
    out: &mut [&mut [i32]],
    tokens: std::ops::Range<usize>,
) {
    let Some(tiles) = acts.tiles.as_deref() else {
        unreachable!("a pass cut by tokens for the tiles has its tile layout")
    };
    assert!(tokens.start.is_multiple_of(TILE_ROWS) && tokens.end <= acts.n_tokens() && out.len() == tokens.len());
    if codes.is_empty() || tokens.is_empty() {
        return;
    }
    UNPACKED.with(|unpacked| {
        let mut unpacked = unpacked.borrow_mut();
        unpacked.resize(2 * TILE_ROWS * acts.k, 0);
        // SAFETY: the token proves AMX-INT8 with the tile state granted to
        // this process and AVX-512 F/BW; `tiled_rows` loads the tile
        // configuration before its first tile instruction and releases the
        // tiles before it returns.
        unsafe { tiled_rows(codes, acts, tiles, &mut unpacked, out, tokens) };
    });
}

/// `codes` holds a multiple of 16 rows; `out[i]` is token `tokens.start + i`.
///
/// # Safety
/// AMX-INT8 and AVX-512 F/BW must be present and the tile state granted.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn tiled_rows(
    codes: &[u8],
    acts: &Activations<'_>,
    tiles: &[i8],
    unpacked: &mut [u8],
    out: &mut [&mut [i32]],
    tokens: std::ops::Range<usize>,
) {
    let k = acts.k;
    let row_bytes = k / 4;
    let n_rows = codes.len() / row_bytes;
    let n_tokens = tokens.end;
    let groups = n_tokens.div_ceil(TILE_ROWS);
    let config = TileConfig::full();
    // SAFETY: the caller guarantees AMX with the tile state granted; the
    // configuration is 64 readable bytes in palette 1's format.
    unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
    let mut block = 0;
    while block < n_rows {
        let block_rows = if n_rows - block >= 2 * TILE_ROWS { 2 * TILE_ROWS } else { TILE_ROWS };
        let block_codes = &codes[block * row_bytes..(block + block_rows) * row_bytes];
        let block_unpacked = &mut unpacked[..block_rows * k];
        unpack_rows(block_codes, row_bytes, block_rows, block_unpacked);
        let mut group = tokens.start / TILE_ROWS;
        while group < groups {
            let two_groups = groups - group >= 2;
            let mut c = [[0i32; TILE_ROWS * TILE_ROWS]; 4];
            // SAFETY: the configuration above is loaded on this thread.
            unsafe {
                match (block_rows == 2 * TILE_ROWS, two_groups) {
                    (true, true) => block_product::<2, 2>(block_unpacked, tiles, group, k, &mut c),
                    (true, false) => block_product::<2, 1>(block_unpacked, tiles, group, k, &mut c),
                    (false, true) => block_product::<1, 2>(block_unpacked, tiles, group, k, &mut c),
                    (false, false) => block_product::<1, 1>(block_unpacked, tiles, group, k, &mut c),
                }
            }
            let tile_groups = if two_groups { 2 } else { 1 };
            for a in 0..block_rows / TILE_ROWS {
                for b in 0..tile_groups {
                    let first_token = (group + b) * TILE_ROWS;
                    // Tokens (rows of the transposed tile) that exist.
                    let valid = TILE_ROWS.min(n_tokens - first_token);
                    let by_token = transpose16(load_tile(&c[2 * a + b]));
                    for (n, values) in by_token.into_iter().take(valid).enumerate() {
                        let token = first_token + n;
                        let corrected = _mm512_sub_epi32(values, _mm512_set1_epi32(acts.sums[token]));
                        let token_out: &mut [i32; TILE_ROWS] = (&mut out[token - tokens.start]
                            [block + a * TILE_ROWS..block + (a + 1) * TILE_ROWS])
                            .try_into()
                            .unwrap();
                        // SAFETY: `token_out` is 16 writable `i32`; no alignment needed.
                        unsafe { _mm512_storeu_si512(token_out.as_mut_ptr().cast(), corrected) };
                    }
                }
            }
            group += tile_groups;
        }
        block += block_rows;
    }
    // SAFETY: returns the tile registers to their initial state; valid
    // whenever AMX is present.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// The 16 rows of a stored `C` tile.
#[inline]
#[target_feature(enable = "avx512f")]
fn load_tile(tile: &[i32; TILE_ROWS * TILE_ROWS]) -> [__m512i; 16] {
    // SAFETY: each row is 16 readable `i32` inside `tile`; no alignment needed.
    std::array::from_fn(|m| unsafe { _mm512_loadu_si512(tile[m * TILE_ROWS..].as_ptr().cast()) })
}

/// Transposes a 16 x 16 matrix of `i32` held as 16 rows: lane `m` of result
/// `n` is lane `n` of input `m`. Four rounds of two-register shuffles
/// (32-bit, 64-bit, then 128-bit lanes twice), 64 instructions.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    // Round 1: pairs of rows, 32-bit interleave.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // Round 2: 64-bit interleave of rounds' results two apart.
    let mut u = [_mm512_setzero_si512(); 16];
    for q in 0..4 {
        let b = 4 * q;
        u[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
        u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
        u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
        u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
    }
    // Round 3: 128-bit lanes of groups four apart (even lanes, then odd).
    let mut v = [_mm512_setzero_si512(); 16];
    for h in 0..2 {
        let b = 8 * h;
        for j in 0..4 {
            v[b + j] = _mm512_shuffle_i32x4::<0x88>(u[b + j], u[b + 4 + j]);
            v[b + 4 + j] = _mm512_shuffle_i32x4::<0xdd>(u[b + j], u[b + 4 + j]);
        }
    }
    // Round 4: 128-bit lanes of the two halves.
    let mut w = [_mm512_setzero_si512(); 16];
    for j in 0..8 {
        w[j] = _mm512_shuffle_i32x4::<0x88>(v[j], v[8 + j]);
        w[8 + j] = _mm512_shuffle_i32x4::<0xdd>(v[j], v[8 + j]);
    }
    w
}

/// Unpacks `block_rows` rows of codes into `[chunk][row][64]` bytes, chunk
/// `4p + g` holding group `g` of block pair `p` (see the module docs).
#[target_feature(enable = "avx512f,avx512bw")]
fn unpack_rows(codes: &[u8], row_bytes: usize, block_rows: usize, unpacked: &mut [u8]) {
    let mask = _mm512_set1_epi8(0b11);
    let (out_lines, _) = unpacked.as_chunks_mut::<64>();
    // Block pair by block pair, row by row: four sequential streams of stores
    // (one per group), the loads `row_bytes` apart. Row by row over every
    // pair instead wrote 4 x pairs streams and took twice as long (session 36).
    for p in 0..row_bytes / 64 {
        for m in 0..block_rows {
            let pair: &[u8; 64] = codes[m * row_bytes + p * 64..][..64].try_into().expect("64 bytes");
            // SAFETY: `pair` is 64 readable bytes; no alignment needed.
            let w = unsafe { _mm512_loadu_si512(pair.as_ptr().cast()) };
            let groups = [_mm512_srli_epi16::<6>(w), _mm512_srli_epi16::<4>(w), _mm512_srli_epi16::<2>(w), w];
            for (g, shifted) in groups.into_iter().enumerate() {
                let line = &mut out_lines[(4 * p + g) * block_rows + m];
                // SAFETY: `line` is 64 writable bytes; no alignment needed.
                unsafe { _mm512_storeu_si512(line.as_mut_ptr().cast(), _mm512_and_si512(shifted, mask)) };
            }
        }
    }
}

/// The `RA * 16` unpacked rows times token groups `group..group + TB`, over
/// every chunk; `c[2a + b]` gets `C` tile (rows `a`, tokens `b`) as 16 rows
/// of 16 `i32`.
///
/// # Safety
/// The tile configuration of [`TileConfig::full`] must be loaded on this thread.
#[inline(always)]
unsafe fn block_product<const RA: usize, const TB: usize>(
    unpacked: &[u8],
    tiles: &[i8],
    group: usize,
    k: usize,
    c: &mut [[i32; TILE_ROWS * TILE_ROWS]; 4],
) {
    let chunks = k / CHUNK;
    let stride = CHUNK;
    // SAFETY (every block below): the configuration is loaded (caller); each
    // tile load reads 16 rows of 64 bytes at a stride of 64 from the start of
    // a slice that is exactly 1024 bytes long (the slicing panics otherwise).
    unsafe {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        for chunk in 0..chunks {
            let a_base = chunk * RA * TILE_BYTES;
            let a0: &[u8; TILE_BYTES] = unpacked[a_base..a_base + TILE_BYTES].try_into().unwrap();
            asm!("tileloadd tmm4, [{p} + {s}]", p = in(reg) a0.as_ptr(), s = in(reg) stride, options(nostack, readonly));
            if RA == 2 {
                let a1: &[u8; TILE_BYTES] = unpacked[a_base + TILE_BYTES..a_base + 2 * TILE_BYTES].try_into().unwrap();
                asm!("tileloadd tmm5, [{p} + {s}]", p = in(reg) a1.as_ptr(), s = in(reg) stride, options(nostack, readonly));
            }
            let b_base = (group * chunks + chunk) * TILE_BYTES;
            let b0: &[i8; TILE_BYTES] = tiles[b_base..b_base + TILE_BYTES].try_into().unwrap();
            asm!("tileloadd tmm6, [{p} + {s}]", p = in(reg) b0.as_ptr(), s = in(reg) stride, options(nostack, readonly));
            if TB == 2 {
                let b_base = b_base + chunks * TILE_BYTES;
                let b1: &[i8; TILE_BYTES] = tiles[b_base..b_base + TILE_BYTES].try_into().unwrap();
                asm!("tileloadd tmm7, [{p} + {s}]", p = in(reg) b1.as_ptr(), s = in(reg) stride, options(nostack, readonly));
            }
            asm!("tdpbusd tmm0, tmm4, tmm6", options(nostack, nomem));
            if TB == 2 {
                asm!("tdpbusd tmm1, tmm4, tmm7", options(nostack, nomem));
            }
            if RA == 2 {
                asm!("tdpbusd tmm2, tmm5, tmm6", options(nostack, nomem));
                if TB == 2 {
                    asm!("tdpbusd tmm3, tmm5, tmm7", options(nostack, nomem));
                }
            }
        }
        let (c0, rest) = c.split_at_mut(1);
        let (c1, rest) = rest.split_at_mut(1);
        let (c2, c3) = rest.split_at_mut(1);
        asm!("tilestored [{p} + {s}], tmm0", p = in(reg) c0[0].as_mut_ptr(), s = in(reg) stride, options(nostack));
        if TB == 2 {
            asm!("tilestored [{p} + {s}], tmm1", p = in(reg) c1[0].as_mut_ptr(), s = in(reg) stride, options(nostack));
        }
        if RA == 2 {
            asm!("tilestored [{p} + {s}], tmm2", p = in(reg) c2[0].as_mut_ptr(), s = in(reg) stride, options(nostack));
            if TB == 2 {
                asm!("tilestored [{p} + {s}], tmm3", p = in(reg) c3[0].as_mut_ptr(), s = in(reg) stride, options(nostack));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_tiles_hold_each_tokens_words_in_columns() {
        // 20 tokens (two groups, the second with 4), k = 256 (4 chunks).
        let (n_tokens, k) = (20, 256);
        let q: Vec<i8> = (0..n_tokens * k).map(|i| (i % 251) as i8).collect();
        let tiles = tile_activations(&q, n_tokens, k);
        assert_eq!(tiles.len(), 2 * 4 * TILE_BYTES);
        for group in 0..2 {
            for chunk in 0..4 {
                let tile = &tiles[(group * 4 + chunk) * TILE_BYTES..][..TILE_BYTES];
                for r in 0..16 {
                    for n in 0..16 {
                        for i in 0..4 {
                            let token = group * 16 + n;
                            let expected = if token < n_tokens { q[token * k + chunk * 64 + 4 * r + i] } else { 0 };
                            assert_eq!(tile[r * 64 + 4 * n + i], expected, "group {group} chunk {chunk} r {r} n {n}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn transpose16_transposes() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            let _ =
                std::io::Write::write_all(&mut std::io::stderr(), b"SKIPPED: no AVX-512 (transpose16_transposes)\n");
            return;
        }
        let m: [i32; 256] = std::array::from_fn(|i| i as i32 * 7 - 900);
        // SAFETY: AVX-512 F was detected above.
        let rows = unsafe { transpose16(load_tile(&m)) };
        for (n, row) in rows.iter().enumerate() {
            let mut lanes = [0i32; 16];
            // SAFETY: as above; `lanes` is 16 writable `i32`.
            unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), *row) };
            for (lane, &value) in lanes.iter().enumerate() {
                assert_eq!(value, m[lane * 16 + n], "result {n} lane {lane}");
            }
        }
    }

    #[test]
    fn tile_configuration_is_palette_one_with_eight_full_tiles() {
        let config = TileConfig::full();
        assert_eq!(config.0[0], 1);
        assert_eq!(config.0[1], 0);
        for tile in 0..16 {
            let colsb = u16::from_le_bytes([config.0[16 + 2 * tile], config.0[17 + 2 * tile]]);
            let rows = config.0[48 + tile];
            assert_eq!((colsb, rows), if tile < 8 { (64, 16) } else { (0, 0) }, "tile {tile}");
        }
        assert_eq!(std::mem::align_of::<TileConfig>(), 64);
    }
}
