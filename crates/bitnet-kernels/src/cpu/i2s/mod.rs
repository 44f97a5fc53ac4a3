//! I2_S ternary weights times int8 activations, exact in `i32`: the matmul of every BitLinear.
//!
//! Weights are bitnet.cpp's I2_S codes (GGUF type 36) for a row-major
//! `[rows, k]` matrix, `k` a multiple of 128: each row is `k / 4` bytes, in
//! 32-byte blocks of 128 elements where byte `j` holds elements `j`, `32 + j`,
//! `64 + j`, `96 + j` in bits 7:6, 5:4, 3:2, 1:0, and code 0/1/2 means -1/0/+1.
//! The per-tensor scale is not part of the matrix; the caller applies it.
//!
//! Every kernel computes `sum(code * q) - sum(q)` (bitnet.cpp's trick: codes
//! are `t + 1`, so unsigned codes times signed activations fit `vpmaddubsw` /
//! `vpdpbusd`). The identity holds for any byte, so even a (never written)
//! code 3 gives the same, deterministic result in every kernel.

mod portable;
mod scalar;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod amx;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512;
#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
mod neon;

use std::borrow::Cow;

use rayon::prelude::*;

use super::kernel::{CpuKernel, Resolved};
use super::partition::{chunk_outputs, par_chunk_rows};
use super::rows;
use crate::KernelError;

/// Elements per I2_S block.
pub const I2S_BLOCK_ELEMS: usize = 128;

/// Code bytes per I2_S block.
pub const I2S_BLOCK_BYTES: usize = 32;

/// Largest supported `k`: `|sum(code * q)| <= 2 * 128 * k` must fit an `i32`
/// with room to spare.
pub const I2S_MAX_K: usize = 1 << 22;

/// Fewest tokens a pass must have for [`CpuKernel::Amx`] to run it on AMX
/// tiles (fewer take its AVX-512 kernel, whose 4-token tiles waste no
/// arithmetic on padding; a tile holds 16 tokens).
pub const AMX_MIN_TOKENS: usize = 16;

/// Token tile of the GEMM kernels: each unpacked weight block is used for
/// this many tokens before moving on.
const TOKEN_TILE: usize = rows::MAX_TOKENS;

/// A borrowed `[rows, k]` I2_S code matrix (codes only, no scale), validated on construction.
#[derive(Debug, Clone, Copy)]
pub struct I2sMatrixRef<'a> {
    codes: &'a [u8],
    rows: usize,
    k: usize,
}

impl<'a> I2sMatrixRef<'a> {
    /// Wraps exactly `rows * k / 4` code bytes. `k` must be a multiple of 128
    /// and at most [`I2S_MAX_K`].
    pub fn new(codes: &'a [u8], rows: usize, k: usize) -> Result<Self, KernelError> {
        let expected = code_bytes(rows, k)?;
        if codes.len() != expected {
            return Err(KernelError::LengthMismatch { what: "I2_S code bytes", expected, found: codes.len() });
        }
        Ok(Self { codes, rows, k })
    }

    /// Wraps a whole GGUF I2_S tensor as stored in the file: `rows * k / 4`
    /// code bytes followed by the 32-byte trailer (f32 scale and padding),
    /// which is ignored here; read the scale with `bitnet_quant::i2s::i2s_scale`.
    pub fn from_gguf_tensor(tensor_bytes: &'a [u8], rows: usize, k: usize) -> Result<Self, KernelError> {
        let n_codes = code_bytes(rows, k)?;
        let expected = n_codes + I2S_BLOCK_BYTES;
        if tensor_bytes.len() != expected {
            return Err(KernelError::LengthMismatch { what: "I2_S tensor bytes", expected, found: tensor_bytes.len() });
        }
        Self::new(&tensor_bytes[..n_codes], rows, k)
    }

    /// Output features (rows of the matrix).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (elements per row).
    pub fn k(&self) -> usize {
        self.k
    }

    /// The code bytes, `rows * k / 4` of them.
    pub fn codes(&self) -> &'a [u8] {
        self.codes
    }

    /// Rows `start..end` as a matrix of their own (e.g. to split a fused projection).
    pub fn row_range(&self, start: usize, end: usize) -> Result<I2sMatrixRef<'a>, KernelError> {
        if end > self.rows {
            return Err(KernelError::DimensionTooLarge { what: "row range end", value: end, max: self.rows });
        }
        if start > end {
            return Err(KernelError::DimensionTooLarge { what: "row range start", value: start, max: end });
        }
        let row_bytes = self.k / 4;
        Ok(Self { codes: &self.codes[start * row_bytes..end * row_bytes], rows: end - start, k: self.k })
    }
}

fn code_bytes(rows: usize, k: usize) -> Result<usize, KernelError> {
    if !k.is_multiple_of(I2S_BLOCK_ELEMS) {
        return Err(KernelError::NotMultiple { what: "I2_S k", value: k, multiple: I2S_BLOCK_ELEMS });
    }
    if k > I2S_MAX_K {
        return Err(KernelError::DimensionTooLarge { what: "I2_S k", value: k, max: I2S_MAX_K });
    }
    let row_bytes = k / 4;
    rows.checked_mul(row_bytes).ok_or(KernelError::DimensionTooLarge {
        what: "I2_S rows",
        value: rows,
        max: usize::MAX / row_bytes.max(1),
    })
}

/// Activations as a kernel wants them: the per-token sums for the `- sum(q)`
/// correction, and the codes in the kernel's order (AVX-512 interleaves
/// pairs of blocks; everyone else reads them as given).
#[derive(Debug)]
pub(super) struct Activations<'a> {
    pub(super) q: Cow<'a, [i8]>,
    pub(super) sums: Vec<i32>,
    pub(super) k: usize,
    /// The AMX kernel's `B` tiles of `q` (`amx::tile_activations`), when
    /// this pass runs on the tiles.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) tiles: Option<Vec<i8>>,
}

impl Activations<'_> {
    pub(super) fn n_tokens(&self) -> usize {
        self.sums.len()
    }
}

/// Decode: `out[j] = sum_kk q[kk] * t[j][kk]` for one token; `out.len() == w.rows()`.
pub fn gemv_i2s_i8(kernel: CpuKernel, w: I2sMatrixRef<'_>, q: &[i8], out: &mut [i32]) -> Result<(), KernelError> {
    gemm_i2s_i8(kernel, w, q, 1, out)
}

/// [`gemv_i2s_i8`] split over rows on the current rayon pool.
pub fn gemv_i2s_i8_par(kernel: CpuKernel, w: I2sMatrixRef<'_>, q: &[i8], out: &mut [i32]) -> Result<(), KernelError> {
    gemm_i2s_i8_par(kernel, w, q, 1, out)
}

/// Batch (prefill): `q` is `[n_tokens, k]`, `out` is `[n_tokens, rows]`,
/// `out[t * rows + j] = sum_kk q[t * k + kk] * t[j][kk]`.
///
/// Each unpacked weight block is reused for up to four tokens, so this is
/// faster than `n_tokens` calls to [`gemv_i2s_i8`].
pub fn gemm_i2s_i8(
    kernel: CpuKernel,
    w: I2sMatrixRef<'_>,
    q: &[i8],
    n_tokens: usize,
    out: &mut [i32],
) -> Result<(), KernelError> {
    let resolved = kernel.resolve()?;
    check_shapes(w, q, n_tokens, out)?;
    if w.rows == 0 || n_tokens == 0 {
        return Ok(());
    }
    let acts = prepare(resolved, q, n_tokens, w.k, false);
    let mut outs: Vec<&mut [i32]> = out.chunks_mut(w.rows).collect();
    gemm_rows(resolved, w.codes, &acts, &mut outs);
    Ok(())
}

/// [`gemm_i2s_i8`] split over rows on the current rayon pool.
///
/// Up to four tokens (decode) run as one sequential stream per pool thread,
/// larger batches as row chunks: see [`gemm_i2s_i8_par_group`].
pub fn gemm_i2s_i8_par(
    kernel: CpuKernel,
    w: I2sMatrixRef<'_>,
    q: &[i8],
    n_tokens: usize,
    out: &mut [i32],
) -> Result<(), KernelError> {
    gemm_i2s_i8_par_group(kernel, &mut [(w, out)], q, n_tokens)
}

/// [`gemm_i2s_i8_par`] for several matrices with the same input width and the
/// same activations (q, k and v; gate and up): the activations are prepared
/// once and the rows of every matrix run as one parallel job, so a layer pays
/// one fork-join instead of one per matrix. Each output equals
/// [`gemm_i2s_i8`]'s, exactly.
///
/// Up to four tokens (decode: every weight is read once per call), the
/// group's rows, concatenated, are cut into one contiguous share per pool
/// thread, each read as one sequential stream, threads that finish early
/// claiming runs of the others' (the `rows` module; docs/perf/cpu.md,
/// "One share per thread"). Larger batches cut each
/// matrix into chunks of a multiple of 16 rows (whole 64-byte cache lines of
/// `i32` output per token, so threads never share a line), about eight per
/// thread, each with at most ~256 KiB of weights so the chunk is reused from
/// L2 across all token tiles.
pub fn gemm_i2s_i8_par_group(
    kernel: CpuKernel,
    jobs: &mut [(I2sMatrixRef<'_>, &mut [i32])],
    q: &[i8],
    n_tokens: usize,
) -> Result<(), KernelError> {
    let resolved = kernel.resolve()?;
    let Some(k) = jobs.first().map(|(w, _)| w.k) else { return Ok(()) };
    for (w, out) in jobs.iter_mut() {
        if w.k != k {
            return Err(KernelError::LengthMismatch {
                what: "grouped matrices' input width (k)",
                expected: k,
                found: w.k,
            });
        }
        check_shapes(*w, q, n_tokens, out)?;
    }
    if n_tokens == 0 {
        return Ok(());
    }
    if k == 0 {
        jobs.iter_mut().for_each(|(_, out)| out.fill(0));
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    if n_tokens <= TOKEN_TILE {
        let acts = prepare(resolved, q, n_tokens, k, false);
        let row_bytes = k / 4;
        let sizes: Vec<(usize, usize)> = jobs.iter().map(|(w, _)| (w.rows, row_bytes)).collect();
        let codes: Vec<&[u8]> = jobs.iter().map(|(w, _)| w.codes).collect();
        let mut outs: Vec<&mut [i32]> = jobs.iter_mut().map(|(_, out)| &mut **out).collect();
        rows::run_rows(&sizes, &mut outs, n_tokens, |job, rows, outs| {
            gemm_rows(resolved, &codes[job][rows.start * row_bytes..rows.end * row_bytes], &acts, outs)
        });
        return Ok(());
    }
    // Each task: a chunk of rows, for every token (`None`) or, on the AMX
    // tiles, for one block of tokens.
    type Task<'t> = (&'t [u8], Vec<&'t mut [i32]>, Option<std::ops::Range<usize>>);
    let mut tasks: Vec<Task<'_>> = Vec::new();
    let tiles = takes_tiles(resolved, n_tokens, k);
    for (w, out) in jobs.iter_mut() {
        if w.rows == 0 {
            continue;
        }
        if tiles {
            // Chunks of AMX_TASK_ROWS rows x AMX_TASK_TOKENS tokens: a
            // task's unpacked codes and activation tiles stay in its core's
            // L2 (row chunks alone streamed the whole pass's activations per
            // 32 rows, from L3 at the down product's width).
            let outs = chunk_outputs(out, w.rows, AMX_TASK_ROWS);
            for (codes, mut chunk_outs) in w.codes.chunks(AMX_TASK_ROWS * (k / 4)).zip(outs) {
                if codes.len() / (k / 4) % 16 != 0 {
                    // The last chunk, with rows past the last whole tile.
                    tasks.push((codes, chunk_outs, None));
                    continue;
                }
                let mut first = 0;
                while !chunk_outs.is_empty() {
                    let rest = chunk_outs.split_off(AMX_TASK_TOKENS.min(chunk_outs.len()));
                    let n = chunk_outs.len();
                    tasks.push((codes, chunk_outs, Some(first..first + n)));
                    first += n;
                    chunk_outs = rest;
                }
            }
            continue;
        }
        let chunk_rows = par_chunk_rows(w.rows, k / 4, threads);
        let outs = chunk_outputs(out, w.rows, chunk_rows);
        tasks.extend(w.codes.chunks(chunk_rows * (k / 4)).zip(outs).map(|(codes, outs)| (codes, outs, None)));
    }
    // The activations are prepared inside the section too: the AMX kernel's
    // tile layout is built in parallel.
    super::team::rayon_section(|| {
        let acts = prepare(resolved, q, n_tokens, k, true);
        tasks.into_par_iter().for_each(|(codes, mut outs, tokens)| match tokens {
            None => gemm_rows(resolved, codes, &acts, &mut outs),
            Some(tokens) => tiled_tokens(resolved, codes, &acts, &mut outs, tokens),
        });
    });
    Ok(())
}

fn check_shapes(w: I2sMatrixRef<'_>, q: &[i8], n_tokens: usize, out: &mut [i32]) -> Result<(), KernelError> {
    let q_len = n_tokens.checked_mul(w.k).ok_or(KernelError::DimensionTooLarge {
        what: "n_tokens * k",
        value: n_tokens,
        max: usize::MAX / w.k.max(1),
    })?;
    if q.len() != q_len {
        return Err(KernelError::LengthMismatch {
            what: "activations (n_tokens * k)",
            expected: q_len,
            found: q.len(),
        });
    }
    let out_len = n_tokens.checked_mul(w.rows).ok_or(KernelError::DimensionTooLarge {
        what: "n_tokens * rows",
        value: n_tokens,
        max: usize::MAX / w.rows.max(1),
    })?;
    if out.len() != out_len {
        return Err(KernelError::LengthMismatch {
            what: "output (n_tokens * rows)",
            expected: out_len,
            found: out.len(),
        });
    }
    Ok(())
}

/// The activations as the kernel wants them; `parallel`: on the current
/// pool (inside a `team::rayon_section`), for passes of many tokens.
fn prepare(resolved: Resolved, q: &[i8], n_tokens: usize, k: usize, parallel: bool) -> Activations<'_> {
    // Sums of 256 values fit an `i16` (256 * -128 = i16::MIN), which the
    // compiler vectorises twice as wide as an `i32` sum: 0.2 instead of 0.3
    // us for 2560 values on the dev box, on the calling thread of every
    // decode product.
    let token_sum = |token: &[i8]| {
        token.chunks(256).map(|c| i32::from(c.iter().fold(0i16, |a, &v| a.wrapping_add(i16::from(v))))).sum()
    };
    let sums = if k == 0 {
        vec![0; n_tokens]
    } else if parallel {
        q.par_chunks_exact(k).map(token_sum).collect()
    } else {
        q.chunks_exact(k).map(token_sum).collect()
    };
    let q = match resolved {
        #[cfg(target_arch = "x86_64")]
        Resolved::Avx512(_) | Resolved::Amx(_) => Cow::Owned(avx512::interleave_activations(q, k, parallel)),
        _ => Cow::Borrowed(q),
    };
    #[cfg(target_arch = "x86_64")]
    let tiles = takes_tiles(resolved, n_tokens, k).then(|| amx::tile_activations(&q, n_tokens, k));
    #[cfg(not(target_arch = "x86_64"))]
    let tiles = None;
    Activations { q, sums, k, tiles }
}

/// Rows per AMX task (two blocks of 32).
const AMX_TASK_ROWS: usize = 64;

/// Tokens per AMX task (eight tiles of 16): 128 tokens of the widest 2B-4T
/// input (6912) are 0.9 MB of activation tiles, which with the task's 0.4 MB
/// of unpacked codes fit a core's 2 MiB L2.
const AMX_TASK_TOKENS: usize = 128;

/// Whether a pass runs on the AMX tiles (and its activations get their tile layout).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn takes_tiles(resolved: Resolved, n_tokens: usize, k: usize) -> bool {
    match resolved {
        #[cfg(target_arch = "x86_64")]
        Resolved::Amx(_) => n_tokens >= AMX_MIN_TOKENS && amx::takes_width(k),
        _ => false,
    }
}

/// A task of rows (a multiple of 16) x the tokens `tokens` on the AMX tiles.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn tiled_tokens(
    resolved: Resolved,
    codes: &[u8],
    acts: &Activations<'_>,
    out: &mut [&mut [i32]],
    tokens: std::ops::Range<usize>,
) {
    match resolved {
        #[cfg(target_arch = "x86_64")]
        Resolved::Amx(token) => amx::gemm_tiled_tokens(token, codes, acts, out, tokens),
        _ => unreachable!("only the AMX kernel's passes are cut by tokens"),
    }
}

/// Runs one chunk of rows: `codes` holds `out[t].len()` rows, `out[t]` is
/// token `t`'s output for those rows.
fn gemm_rows(resolved: Resolved, codes: &[u8], acts: &Activations<'_>, out: &mut [&mut [i32]]) {
    match resolved {
        Resolved::Scalar => scalar::gemm_rows(codes, acts, out),
        Resolved::Portable => portable::gemm_rows(codes, acts, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::Avx2(token) => avx2::gemm_rows_avx2(token, codes, acts, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::AvxVnni(token) => avx2::gemm_rows_avxvnni(token, codes, acts, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::Avx512(token) => avx512::gemm_rows(token, codes, acts, out),
        #[cfg(target_arch = "x86_64")]
        Resolved::Amx(token) => amx::gemm_rows(token, codes, acts, out),
        #[cfg(target_arch = "aarch64")]
        Resolved::Neon(token) => neon::gemm_rows(token, codes, acts, out),
    }
}

/// Splits token indices into tiles of at most [`TOKEN_TILE`]: `(first, len)`.
pub(super) fn token_tiles(n_tokens: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n_tokens).step_by(TOKEN_TILE).map(move |first| (first, (n_tokens - first).min(TOKEN_TILE)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_validation() {
        let codes = [0u8; 64];
        assert!(I2sMatrixRef::new(&codes, 2, 128).is_ok());
        assert_eq!(
            I2sMatrixRef::new(&codes, 2, 64).unwrap_err(),
            KernelError::NotMultiple { what: "I2_S k", value: 64, multiple: 128 }
        );
        assert_eq!(
            I2sMatrixRef::new(&codes, 3, 128).unwrap_err(),
            KernelError::LengthMismatch { what: "I2_S code bytes", expected: 96, found: 64 }
        );
        assert!(matches!(I2sMatrixRef::new(&codes, usize::MAX, 128), Err(KernelError::DimensionTooLarge { .. })));
        assert!(matches!(I2sMatrixRef::new(&codes, 0, I2S_MAX_K + 128), Err(KernelError::DimensionTooLarge { .. })));
        let tensor = [0u8; 96];
        assert_eq!(I2sMatrixRef::from_gguf_tensor(&tensor, 2, 128).unwrap().codes().len(), 64);
        assert_eq!(
            I2sMatrixRef::from_gguf_tensor(&codes, 2, 128).unwrap_err(),
            KernelError::LengthMismatch { what: "I2_S tensor bytes", expected: 96, found: 64 }
        );
        let w = I2sMatrixRef::new(&codes, 2, 128).unwrap();
        assert_eq!(w.row_range(1, 2).unwrap().codes().len(), 32);
        assert!(w.row_range(1, 3).is_err() && w.row_range(2, 1).is_err());
    }
}
