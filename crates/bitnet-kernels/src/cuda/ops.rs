//! Launch wrappers: one per kernel family of `kernels/bitnet.cu`. Each checks
//! its dimensions and that every range covers what the kernel touches, then
//! launches on the context's stream.

use super::{Arg, CudaError, DevRange, GpuContext, GpuDType, HeadImpl, LaunchKind, TernaryBatch};

/// Bit set in the flags word when a kernel saw a NaN or infinity.
pub const FLAG_NONFINITE: i32 = 1;

/// Tokens per CTA of the ternary kernel.
const MM_TOKENS: usize = 32;
const HEAD_TOKENS: usize = 64;
/// The staged ternary kernels' pipeline (`TS_*` in the kernel): stages,
/// padded bytes per weight row and per activation row of a stage.
const TS_STAGES: usize = 4;
const TS_W_STRIDE: usize = 96;
const TS_A_STRIDE: usize = 288;

/// Dynamic shared memory of a staged ternary kernel: `mg` groups of 16
/// output rows (gate/up: 16 gate and 16 up rows each).
fn staged_smem(gate_up: bool, mg: usize) -> usize {
    let weight_rows = if gate_up { 2 } else { 1 } * mg * 16;
    TS_STAGES * (weight_rows * TS_W_STRIDE + MM_TOKENS * TS_A_STRIDE)
}

/// Whether a staged product of `n_rows` x `n_tok` (`gate_up`: two matrices
/// of `n_rows`) has the work of a full staged CTA (64 weight rows x 32
/// tokens) for every one of `sms` multiprocessors: [`TernaryBatch::Auto`]
/// takes the staged kernels then. A gate/up CTA multiplies 128 weight rows,
/// so it counts twice; a partial token tile counts for its share. On the
/// H200 (session 12): at 32 tokens gate/up's 108 CTAs (work of 216) run
/// faster staged, q|k|v's 60 and o's and down's 40 slower, and at 64 tokens
/// q|k|v's 120 CTAs and o's and down's 80 slower too.
fn staged_grid_fills(n_rows: usize, n_tok: usize, gate_up: bool, sms: usize) -> bool {
    let weight_rows = if gate_up { 2 * n_rows } else { n_rows };
    weight_rows.div_ceil(64) * n_tok >= sms * MM_TOKENS
}

/// Whether the K-split kernels' two-row-tile variant (`_b2`: 32 rows x 32
/// tokens per CTA, 140 registers a thread, so one CTA per SM) runs a pass
/// of `n_rows` x `n_tok` in one wave: [`TernaryBatch::Auto`] takes it then,
/// else the 16-row `_b` kernels. Each `_b2` warp multiplies two row tiles
/// with every activation fragment it loads, half the activation traffic
/// from L2 of `_b` (session 12, H200, 32 tokens: q|k|v 7.5 -> 6.7 us, o 7.9
/// -> 7.3, down 15.1 -> 14.7).
fn split2_fits(n_rows: usize, n_tok: usize, sms: usize) -> bool {
    n_rows.div_ceil(32) * n_tok.div_ceil(MM_TOKENS) <= sms
}

/// Most tokens of a pass that [`TernaryBatch::Auto`] runs on the one-tile
/// `_1` kernels (where the cluster kernels do not pay). On the H200
/// (session 16, BF16 decode steps, the cluster kernels taking gate/up and
/// down, two alternated runs each, ms/step): with q|k|v and o on `_1`
/// instead of `_b2` up to 16 tokens, batch 9 2.123 / 2.112 -> 2.049 /
/// 2.056, 12 2.145 / 2.170 -> 2.083 / 2.085, 13 2.106 / 2.124 -> 2.113 /
/// 2.115, 16 2.138 / 2.151 -> 2.185 / 2.177.
pub(super) const ONE_TILE_MAX_TOKENS: usize = 12;

/// Weight rows per cluster of the `_c` kernels (`TC_WROWS`; gate/up: 64
/// rows of each matrix).
const TC_WROWS: usize = 128;
/// Most CTAs per cluster (the portable limit).
const TC_MAX_CLUSTER: usize = 8;
/// Dynamic shared memory a `_c` CTA may take (set as the kernels' limit when
/// the context opens; two CTAs still fit an SM of any sm_90 GPU).
pub(super) const TC_MAX_SMEM: usize = 64 * 1024;

/// Dynamic shared memory of a `_c` CTA whose K slice is at most `nb`
/// 128-wide blocks: 32 tokens' activation rows of `128 nb + 32` bytes, or
/// after the products the partial sums (8 warps x 32 tokens x 16 rows of
/// i32) in the same place; then the 32 tokens' scales and sums.
fn cluster_smem(nb: usize) -> usize {
    (MM_TOKENS * (nb * 128 + 32)).max(8 * MM_TOKENS * 16 * 4) + 256
}

/// The cluster size of a `_c` product of `n_rows` x `n_tok` with inputs of
/// width `k` (`gate_up`: two matrices, 64 rows of each per cluster) and its
/// shared memory: the fewest CTAs per cluster that give the grid `target`
/// CTAs, at most 8 and one per 128-wide K block, more where a CTA would not
/// fit [`TC_MAX_SMEM`]; `None` when even the most do not fit.
fn cluster_split(n_rows: usize, n_tok: usize, k: usize, gate_up: bool, target: usize) -> Option<(usize, usize)> {
    let out_rows = if gate_up { TC_WROWS / 2 } else { TC_WROWS };
    let groups = n_rows.div_ceil(out_rows) * n_tok.div_ceil(MM_TOKENS);
    let nblk = k / 128;
    let most = TC_MAX_CLUSTER.min(nblk).max(1);
    let smem = |ks: usize| cluster_smem(nblk.div_ceil(ks));
    let mut ks = target.div_ceil(groups.max(1)).clamp(1, most);
    while smem(ks) > TC_MAX_SMEM {
        if ks >= most {
            return None;
        }
        ks += 1;
    }
    Some((ks, smem(ks)))
}

/// Whether [`TernaryBatch::Auto`] takes the cluster kernels for a pass of
/// `n_tok` tokens (more than 8: fewer run the one-tile kernels) through
/// `n_rows` x `k` weights (`gate_up`: two such matrices): when its clusters'
/// unsplit tiles (128 weight rows x 32 tokens) number fewer than the `sms`
/// multiprocessors, so that splitting K puts every SM to work, and either
/// the pass has more than 16 tokens or the product is big (at least 16 Mi
/// weights). Per kernel on the H200 (session 16, 2B-4T, us; `--kernels`):
/// at 32 tokens q|k|v 7.15 -> 6.90, o 7.67 -> 7.59, gate/up 14.99 -> 11.53,
/// down 14.80 -> 10.69; at 16 tokens gate/up 13.24 -> 9.89 and down 10.76
/// -> 9.91, but q|k|v 5.00 -> 6.59 and o 5.38 -> 7.26; at 64 and 128 tokens
/// q|k|v, o and down 27-45% faster, gate/up (216 and 432 tiles: the staged
/// kernel's grid fills the GPU) 17.05 -> 21.76 and 33.66 -> 36.68 slower.
fn cluster_pays(n_rows: usize, n_tok: usize, k: usize, gate_up: bool, sms: usize) -> bool {
    let weight_rows = if gate_up { 2 * n_rows } else { n_rows };
    let tiles = weight_rows.div_ceil(TC_WROWS) * n_tok.div_ceil(MM_TOKENS);
    n_tok > 8 && tiles < sms && (n_tok > 16 || weight_rows * k >= 16 << 20)
}

/// The kernels of one ternary product: one 8-token tile per CTA (`_1`),
/// the K split over a CTA's warps (`_b`, `_b2` with two row tiles per
/// warp), staged (`_s4`).
struct TernaryKernels {
    one: &'static str,
    split: &'static str,
    split2: &'static str,
    staged: &'static str,
    cluster: &'static str,
    gate_up: bool,
}

const TERNARY_STORE: TernaryKernels = TernaryKernels {
    one: "ternary_mm_store_1",
    split: "ternary_mm_store_b",
    split2: "ternary_mm_store_b2",
    staged: "ternary_mm_store_s4",
    cluster: "ternary_mm_store_c",
    gate_up: false,
};
const TERNARY_ADD: TernaryKernels = TernaryKernels {
    one: "ternary_mm_add_1",
    split: "ternary_mm_add_b",
    split2: "ternary_mm_add_b2",
    staged: "ternary_mm_add_s4",
    cluster: "ternary_mm_add_c",
    gate_up: false,
};
const TERNARY_GATE_UP: TernaryKernels = TernaryKernels {
    one: "ternary_mm_gate_up_1",
    split: "ternary_mm_gate_up_b",
    split2: "ternary_mm_gate_up_b2",
    staged: "ternary_mm_gate_up_s4",
    cluster: "ternary_mm_gate_up_c",
    gate_up: true,
};

/// The cluster kernels (each may take up to [`TC_MAX_SMEM`]).
pub(super) const CLUSTER_KERNELS: [&str; 3] = [TERNARY_STORE.cluster, TERNARY_ADD.cluster, TERNARY_GATE_UP.cluster];

/// Every staged kernel with its shared memory.
pub(super) fn staged_smem_sizes() -> [(&'static str, usize); 3] {
    [
        (TERNARY_STORE.staged, staged_smem(false, 4)),
        (TERNARY_ADD.staged, staged_smem(false, 4)),
        (TERNARY_GATE_UP.staged, staged_smem(true, 4)),
    ]
}

/// Entries per cuBLAS head call that [`GpuContext::verify_head_small_chunk`]
/// checks for calls of at most that many entries.
pub const HEAD_SMALL_CHUNKS: [usize; 3] = [8, 16, 32];

/// Positions per attention chunk (`ATT_CHUNK` in the kernel).
const ATT_CHUNK: usize = 32;
/// Most query heads per attention CTA (`ATT_G`).
const ATT_G: usize = 4;
/// Grouping heads needs at least this many CTAs (two per SM of an H100).
const ATT_GROUPED_MIN_CTAS: usize = 256;
/// Rows x splits of the attention scratch.
pub const ATT_PART_ROWS: usize = 4096;

/// At most `target_ctas / n_heads` splits (at least one) for a single row,
/// whose fused kernel runs one attention unit per query head and split;
/// `splits` unchanged for more rows.
fn one_row_cap(splits: usize, n: usize, n_heads: usize, target_ctas: usize) -> usize {
    if n == 1 {
        splits.min((target_ctas / n_heads.max(1)).max(1))
    } else {
        splits
    }
}
/// Positions per CTA iteration of the tensor-core attention kernel.
const ATT_MMA_CHUNK: usize = 64;

pub(super) fn i32_dim(what: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Shape(format!("{what} = {v} does not fit the kernels' 32-bit indices")))
}

pub(super) fn u32_grid(what: &str, v: usize) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| CudaError::Shape(format!("grid dimension {what} = {v} is too large")))
}

pub(super) fn bytes(what: &str, parts: &[usize]) -> Result<usize, CudaError> {
    parts
        .iter()
        .try_fold(1usize, |acc, &p| acc.checked_mul(p))
        .ok_or_else(|| CudaError::Shape(format!("{what}: size overflows")))
}

pub(super) fn multiple(what: &str, v: usize, m: usize) -> Result<(), CudaError> {
    if v == 0 || !v.is_multiple_of(m) {
        return Err(CudaError::Shape(format!("{what} = {v} must be a non-zero multiple of {m}")));
    }
    Ok(())
}

/// The scalars shared by the three ternary launches.
#[derive(Debug, Clone, Copy)]
pub struct TernaryActs {
    /// int8 activations `[n_tok, k]`.
    pub q: DevRange,
    /// Per-token scale `s` (f32 `[n_tok]`).
    pub scale: DevRange,
    /// Per-token sum of `q` (i32 `[n_tok]`).
    pub qsum: DevRange,
    pub n_tok: usize,
}

impl TernaryActs {
    fn args(&self, k: usize) -> Result<[Arg; 4], CudaError> {
        let q = self.q.need("int8 activations", bytes("activations", &[self.n_tok, k])?)?;
        let s = self.scale.need("activation scales", self.n_tok * 4)?;
        let qs = self.qsum.need("activation sums", self.n_tok * 4)?;
        Ok([Arg::Ptr(q), Arg::Ptr(s), Arg::Ptr(qs), Arg::I32(i32_dim("tokens", self.n_tok)?)])
    }
}

pub(super) fn check_ternary(w: DevRange, n_rows: usize, k: usize) -> Result<u64, CudaError> {
    multiple("ternary input width k", k, 128)?;
    if n_rows == 0 {
        return Err(CudaError::Shape("ternary matrix has no rows".into()));
    }
    w.need("I2_S weights", bytes("I2_S weights", &[n_rows, k / 4])?)
}

impl GpuContext {
    /// `out[i] = (to) src[i]` for `n` elements.
    pub fn convert(
        &self,
        from: GpuDType,
        to: GpuDType,
        src: DevRange,
        dst: DevRange,
        n: usize,
    ) -> Result<(), CudaError> {
        let s = src.need("conversion source", bytes("conversion", &[n, from.size()])?)?;
        let d = dst.need("conversion destination", bytes("conversion", &[n, to.size()])?)?;
        let name = match (from, to) {
            (GpuDType::F32, GpuDType::F32) => "convert_f32_f32",
            (GpuDType::F32, GpuDType::F16) => "convert_f32_f16",
            (GpuDType::F32, GpuDType::BF16) => "convert_f32_bf16",
            (GpuDType::F16, GpuDType::F32) => "convert_f16_f32",
            (GpuDType::F16, GpuDType::F16) => "convert_f16_f16",
            (GpuDType::F16, GpuDType::BF16) => "convert_f16_bf16",
            (GpuDType::BF16, GpuDType::F32) => "convert_bf16_f32",
            (GpuDType::BF16, GpuDType::F16) => "convert_bf16_f16",
            (GpuDType::BF16, GpuDType::BF16) => "convert_bf16_bf16",
        };
        let blocks = n.div_ceil(256).clamp(1, 65_535);
        self.launch(name, (blocks as u32, 1, 1), (256, 1, 1), 0, &[Arg::Ptr(s), Arg::Ptr(d), Arg::U64(n as u64)])
    }

    /// `x[r, :] = emb[tokens[r], :]` as f32. Token ids must be `< vocab`
    /// (checked by the caller on the host before upload).
    #[allow(clippy::too_many_arguments)]
    pub fn embed(
        &self,
        dt: GpuDType,
        emb: DevRange,
        vocab: usize,
        hidden: usize,
        tokens: DevRange,
        n: usize,
        x: DevRange,
    ) -> Result<(), CudaError> {
        let e = emb.need("embedding", bytes("embedding", &[vocab, hidden, dt.size()])?)?;
        let t = tokens.need("token ids", n * 4)?;
        let xp = x.need("residual stream", bytes("residual", &[n, hidden, 4])?)?;
        let name = match dt {
            GpuDType::F32 => "embed_f32",
            GpuDType::F16 => "embed_f16",
            GpuDType::BF16 => "embed_bf16",
        };
        self.launch(
            name,
            (u32_grid("rows", n)?, 1, 1),
            (256, 1, 1),
            0,
            &[Arg::Ptr(e), Arg::Ptr(t), Arg::Ptr(xp), Arg::I32(i32_dim("hidden", hidden)?)],
        )
    }

    /// RMSNorm of `rows` f32 rows of `width`, then int8 quantisation per row.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_quant(
        &self,
        x: DevRange,
        weight: DevRange,
        eps: f32,
        rows: usize,
        width: usize,
        acts: &TernaryActs,
        flags: DevRange,
    ) -> Result<(), CudaError> {
        if acts.n_tok != rows {
            return Err(CudaError::Shape(format!("rmsnorm of {rows} rows into {} quantised rows", acts.n_tok)));
        }
        let xp = x.need("norm input", bytes("norm input", &[rows, width, 4])?)?;
        let w = weight.need("norm weight", width * 4)?;
        let f = flags.need("flags", 4)?;
        let [q, s, qs, _] = acts.args(width)?;
        self.launch(
            "rmsnorm_quant_f32",
            (u32_grid("rows", rows)?, 1, 1),
            (256, 1, 1),
            0,
            &[Arg::Ptr(xp), Arg::Ptr(w), Arg::F32(eps), Arg::I32(i32_dim("width", width)?), q, s, qs, Arg::Ptr(f)],
        )
    }

    /// Bytes of the head input [`Self::final_norm`] writes for `entries`
    /// rows: the activation in `precision`, each followed by its low part for
    /// f16/bf16. Buffers for [`Self::head`] hold [`Self::head_input_bytes`]
    /// (rounded up to whole cuBLAS chunks).
    pub fn final_norm_bytes(precision: GpuDType, entries: usize, width: usize) -> usize {
        let parts = if precision == GpuDType::F32 { 1 } else { 2 };
        parts * entries * width * precision.size()
    }

    /// Entries per cuBLAS head call in `precision`.
    fn head_chunk(&self, precision: GpuDType) -> usize {
        if precision == GpuDType::F32 {
            self.head_chunk.0
        } else {
            self.head_chunk.1
        }
    }

    /// Entries per cuBLAS head call for a call of `n` entries on a head of
    /// this shape: the smallest verified small chunk that holds all `n` (one
    /// call), else whole chunks.
    fn head_call_chunk(&self, precision: GpuDType, vocab: usize, hidden: usize, n: usize) -> usize {
        let small = self.head_small.lock().unwrap_or_else(|e| e.into_inner());
        small
            .get(&(precision, vocab, hidden))
            .and_then(|sizes| sizes.iter().copied().find(|&s| n <= s))
            .unwrap_or_else(|| self.head_chunk(precision))
    }

    /// The cuBLAS head's entries per call for a head of this shape: whole
    /// chunks, and the small chunks (ascending) that calls of up to that
    /// many entries take, those [`Self::verify_head_small_chunk`] allowed.
    pub fn head_chunks(&self, precision: GpuDType, vocab: usize, hidden: usize) -> (usize, Vec<usize>) {
        let small = self.head_small.lock().unwrap_or_else(|e| e.into_inner());
        (self.head_chunk(precision), small.get(&(precision, vocab, hidden)).cloned().unwrap_or_default())
    }

    /// Lets calls of few entries run the cuBLAS head on chunks of that many
    /// entries instead of whole chunks, where the two shapes give every
    /// entry the same bits on these weights: checks each size of
    /// `HEAD_SMALL_CHUNKS` (or `BITNET_CUDA_HEAD_SMALL`, a comma-separated
    /// list; 0: none) that divides the whole chunk and keeps those that
    /// pass; a call then takes the smallest kept size that holds all its
    /// entries. A call's shape picks cuBLAS's algorithm, whose summation
    /// order decides the bits, so this is checked here, not assumed: random
    /// inputs, `small`
    /// distinct entries repeated over a whole chunk, one whole-chunk call
    /// against one small-chunk call of the `small`; every logit of every
    /// position must match bit for bit (which also checks that a whole-chunk
    /// call gives an entry the same bits at any position). Returns the sizes
    /// kept (ascending; empty when none passed, cuBLAS is not in use or the
    /// check's buffers did not fit). Measured on the H200 (2B-4T, session
    /// 22): the BF16 head at batch 1 takes 0.190 ms in chunks of 64, 0.164 in
    /// chunks of 8, while batch 128 needs chunks of 64 (4.56 ms/step against
    /// 6.83 in chunks of 8); BF16 passed at 8, FP32 at 16 (not at 8).
    /// `scratch` holds [`Self::head_scratch_bytes`]. Call it before
    /// capturing graphs.
    pub fn verify_head_small_chunk(
        &self,
        precision: GpuDType,
        w: DevRange,
        vocab: usize,
        hidden: usize,
        scratch: DevRange,
    ) -> Result<Vec<usize>, CudaError> {
        let key = (precision, vocab, hidden);
        self.head_small.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        let chunk = self.head_chunk(precision);
        if self.head_impl() != HeadImpl::Cublas {
            return Ok(Vec::new());
        }
        let mut sizes: Vec<usize> =
            self.head_small_try.iter().copied().filter(|&s| s > 0 && s < chunk && chunk.is_multiple_of(s)).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let mut kept = Vec::new();
        for small in sizes {
            match self.head_small_matches(precision, w, vocab, hidden, scratch, small)? {
                Some(true) => kept.push(small),
                Some(false) => {}
                None => break,
            }
        }
        if !kept.is_empty() {
            self.head_small.lock().unwrap_or_else(|e| e.into_inner()).insert(key, kept.clone());
        }
        Ok(kept)
    }

    /// One size of [`Self::verify_head_small_chunk`]: whether calls of
    /// `small` entries give the bits of whole chunks (`None`: the check's
    /// buffers did not fit).
    fn head_small_matches(
        &self,
        precision: GpuDType,
        w: DevRange,
        vocab: usize,
        hidden: usize,
        scratch: DevRange,
        small: usize,
    ) -> Result<Option<bool>, CudaError> {
        let chunk = self.head_chunk(precision);
        // Entry e holds entry e % small's values: hi rows (and lo rows, the
        // rounding error of hi, as final_norm writes them) of values in
        // [-2, 2) from a fixed xorshift sequence.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut row: Vec<u8> = Vec::new();
        for _ in 0..small {
            let mut hi = Vec::with_capacity(hidden * precision.size());
            let mut lo = Vec::with_capacity(hidden * precision.size());
            for _ in 0..hidden {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let v = ((seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0;
                match precision {
                    GpuDType::F32 => hi.extend_from_slice(&v.to_le_bytes()),
                    GpuDType::F16 => {
                        let h = half::f16::from_f32(v);
                        hi.extend_from_slice(&h.to_bits().to_le_bytes());
                        lo.extend_from_slice(&half::f16::from_f32(v - h.to_f32()).to_bits().to_le_bytes());
                    }
                    GpuDType::BF16 => {
                        let h = half::bf16::from_f32(v);
                        hi.extend_from_slice(&h.to_bits().to_le_bytes());
                        lo.extend_from_slice(&half::bf16::from_f32(v - h.to_f32()).to_bits().to_le_bytes());
                    }
                }
            }
            row.extend_from_slice(&hi);
            row.extend_from_slice(&lo);
        }
        let x = row.repeat(chunk / small);
        let (Ok(xb), Ok(whole), Ok(part)) = (
            self.upload("head check input", &x),
            self.alloc("head check logits", self.head_logits_bytes(precision, chunk, vocab)),
            self.alloc("head check logits", chunk * vocab * 4),
        ) else {
            return Ok(None);
        };
        self.head_in_calls(precision, w, vocab, hidden, xb.all(), chunk, whole.all(), scratch, Some(chunk))?;
        self.head_in_calls(precision, w, vocab, hidden, xb.all(), small, part.all(), scratch, Some(small))?;
        let mut a = vec![0u8; chunk * vocab * 4];
        let mut b = vec![0u8; small * vocab * 4];
        self.read(whole.all().sub(0, a.len())?, &mut a)?;
        self.read(part.all().sub(0, b.len())?, &mut b)?;
        Ok(Some(rows_repeat(&a, &b, vocab * 4)))
    }

    /// Entries the head reads and writes for `entries` rows: whole chunks on
    /// cuBLAS (rows past `entries` are computed and ignored).
    fn head_rows(&self, precision: GpuDType, entries: usize) -> usize {
        match self.head_impl() {
            HeadImpl::Cublas => entries.div_ceil(self.head_chunk(precision)) * self.head_chunk(precision),
            HeadImpl::Kernels => entries,
        }
    }

    /// Bytes of the head input buffer for up to `entries` rows.
    pub fn head_input_bytes(&self, precision: GpuDType, entries: usize, width: usize) -> usize {
        Self::final_norm_bytes(precision, self.head_rows(precision, entries), width)
    }

    /// `out = rmsnorm(x[rows[e], :])` for `entries` rows, in `precision`
    /// (hi and lo parts for f16/bf16, see [`Self::final_norm_bytes`]).
    /// `rows` holds indices `< x_rows` (validated by the caller).
    #[allow(clippy::too_many_arguments)]
    pub fn final_norm(
        &self,
        precision: GpuDType,
        x: DevRange,
        x_rows: usize,
        rows: DevRange,
        entries: usize,
        weight: DevRange,
        eps: f32,
        width: usize,
        out: DevRange,
    ) -> Result<(), CudaError> {
        let xp = x.need("final norm input", bytes("final norm", &[x_rows, width, 4])?)?;
        let r = rows.need("row indices", entries * 4)?;
        let w = weight.need("norm weight", width * 4)?;
        let o = out.need("final norm output", Self::final_norm_bytes(precision, entries, width))?;
        let name = match precision {
            GpuDType::F32 => "final_norm_f32",
            GpuDType::F16 => "final_norm_f16",
            GpuDType::BF16 => "final_norm_bf16",
        };
        self.launch(
            name,
            (u32_grid("entries", entries)?, 1, 1),
            (256, 1, 1),
            0,
            &[
                Arg::Ptr(xp),
                Arg::Ptr(r),
                Arg::I32(i32_dim("entries", entries)?),
                Arg::Ptr(w),
                Arg::F32(eps),
                Arg::I32(i32_dim("width", width)?),
                Arg::Ptr(o),
            ],
        )
    }

    /// `out[t, n] = dot(w[n], q[t]) * w_scale(n) / s[t]`, stored as f32 with
    /// row stride `ld_out`. Rows `< seg1` use `scales[0]`, `< seg2`
    /// `scales[1]`, the rest `scales[2]` (q, k and v fused in one matrix).
    #[allow(clippy::too_many_arguments)]
    pub fn ternary_store(
        &self,
        w: DevRange,
        n_rows: usize,
        k: usize,
        scales: [f32; 3],
        segments: [usize; 2],
        acts: &TernaryActs,
        out: DevRange,
        ld_out: usize,
    ) -> Result<(), CudaError> {
        let wp = check_ternary(w, n_rows, k)?;
        self.ternary(&TERNARY_STORE, [wp, wp], n_rows, k, scales, segments, acts, out, ld_out)
    }

    /// `out[t, n] += dot(w[n], q[t]) * w_scale / s[t]` (the residual add).
    #[allow(clippy::too_many_arguments)]
    pub fn ternary_add(
        &self,
        w: DevRange,
        n_rows: usize,
        k: usize,
        scale: f32,
        acts: &TernaryActs,
        out: DevRange,
        ld_out: usize,
    ) -> Result<(), CudaError> {
        let wp = check_ternary(w, n_rows, k)?;
        self.ternary(&TERNARY_ADD, [wp, wp], n_rows, k, [scale; 3], [n_rows; 2], acts, out, ld_out)
    }

    /// `out[t, n] = relu(gate[n] . q[t])^2 * (up[n] . q[t])`, each product
    /// rescaled as in [`Self::ternary_store`]; f32 throughout.
    #[allow(clippy::too_many_arguments)]
    pub fn ternary_gate_up(
        &self,
        gate: DevRange,
        up: DevRange,
        n_rows: usize,
        k: usize,
        scales: [f32; 2],
        acts: &TernaryActs,
        out: DevRange,
        ld_out: usize,
    ) -> Result<(), CudaError> {
        let gp = check_ternary(gate, n_rows, k)?;
        let up_p = check_ternary(up, n_rows, k)?;
        let s = [scales[0], scales[1], scales[1]];
        self.ternary(&TERNARY_GATE_UP, [gp, up_p], n_rows, k, s, [n_rows; 2], acts, out, ld_out)
    }

    /// The shared launch of the three ternary kernels (one argument list).
    #[allow(clippy::too_many_arguments)]
    fn ternary(
        &self,
        kernels: &TernaryKernels,
        w: [u64; 2],
        n_rows: usize,
        k: usize,
        scales: [f32; 3],
        segments: [usize; 2],
        acts: &TernaryActs,
        out: DevRange,
        ld_out: usize,
    ) -> Result<(), CudaError> {
        let n_tok = acts.n_tok;
        self.check_out(out, n_tok, n_rows, ld_out)?;
        let [act, act_s, act_sum, _] = acts.args(k)?;
        let choice = self.ternary_batch();
        // Auto: the cluster kernels where they pay (`cluster_pays`); passes
        // of up to 12 tokens on the one-tile kernels; the staged 64-row
        // kernels when their work fills every SM (on the H200: 2B-4T's
        // gate/up from 32 tokens, every product from 128); else the K-split
        // ones, whose small CTAs (16 or 32 rows) keep more loads in flight
        // on small grids (docs/perf/gpu.md, sessions 7, 12 and 16).
        let one_ok = n_tok <= self.one_max && self.ternary_one.load(std::sync::atomic::Ordering::Relaxed);
        let want_cluster = match choice {
            TernaryBatch::Cluster => !one_ok,
            TernaryBatch::Auto => self.cluster_ok() && cluster_pays(n_rows, n_tok, k, kernels.gate_up, self.sms),
            _ => false,
        };
        let target = if self.cluster_ctas > 0 { self.cluster_ctas } else { self.sms };
        let cluster = if want_cluster { cluster_split(n_rows, n_tok, k, kernels.gate_up, target) } else { None };
        let staged = cluster.is_none()
            && match choice {
                TernaryBatch::Split | TernaryBatch::Split2 | TernaryBatch::Cluster => false,
                TernaryBatch::Staged4 => true,
                TernaryBatch::Auto => self.staged_ok() && staged_grid_fills(n_rows, n_tok, kernels.gate_up, self.sms),
            };
        // Neither: passes of up to 12 tokens on the one-tile kernels (`_1`,
        // unless turned off), the others on the K-split ones (`_b2` when
        // their grid fits one wave, else `_b`).
        let one = !staged && cluster.is_none() && one_ok;
        let tok_tiles = u32_grid("tokens", n_tok.div_ceil(if one { 8 } else { MM_TOKENS }))?;
        let (kernel, rows_per_cta, smem) = if staged {
            (kernels.staged, 64, staged_smem(kernels.gate_up, 4))
        } else if one {
            (kernels.one, 16, 0)
        } else if let Some((_, smem)) = cluster {
            (kernels.cluster, if kernels.gate_up { TC_WROWS / 2 } else { TC_WROWS }, smem)
        } else if choice == TernaryBatch::Split2
            || (choice != TernaryBatch::Split && split2_fits(n_rows, n_tok, self.sms))
        {
            (kernels.split2, 32, 0)
        } else {
            (kernels.split, 16, 0)
        };
        let ks = cluster.map_or(1, |(ks, _)| ks);
        let grid = (u32_grid("row tiles", n_rows.div_ceil(rows_per_cta) * ks)?, tok_tiles, 1);
        let launch = match cluster {
            Some(_) => LaunchKind::Cluster(u32_grid("cluster", ks)?),
            None => LaunchKind::Plain,
        };
        self.launch_with(
            kernel,
            grid,
            (256, 1, 1),
            u32::try_from(smem).map_err(|_| CudaError::Shape("ternary shared memory".into()))?,
            &[
                Arg::Ptr(w[0]),
                Arg::Ptr(w[1]),
                Arg::I32(i32_dim("rows", n_rows)?),
                Arg::I32(i32_dim("k", k)?),
                Arg::F32(scales[0]),
                Arg::F32(scales[1]),
                Arg::F32(scales[2]),
                Arg::I32(i32_dim("segment", segments[0])?),
                Arg::I32(i32_dim("segment", segments[1])?),
                act,
                act_s,
                act_sum,
                Arg::I32(i32_dim("tokens", n_tok)?),
                Arg::Ptr(out.ptr),
                Arg::I32(i32_dim("ld_out", ld_out)?),
            ],
            launch,
        )
    }

    fn check_out(&self, out: DevRange, n_tok: usize, n_rows: usize, ld_out: usize) -> Result<(), CudaError> {
        if ld_out < n_rows {
            return Err(CudaError::Shape(format!("output stride {ld_out} < {n_rows} rows")));
        }
        let needed = if n_tok == 0 { 0 } else { bytes("output", &[n_tok - 1, ld_out])?.saturating_add(n_rows) * 4 };
        out.need("matrix output", needed)?;
        Ok(())
    }

    /// RoPE on q and k of `n` rows of `qkv` (f32 `[n, hidden + 2 kv_dim]`),
    /// q to `q_out` (f32 `[n, hidden]`), k and v into the cache
    /// slots `base[r] + pos[r]` of `kc`/`vc` (`[slots, kv_dim]`). Positions
    /// must be `< max_pos` (the rows of the cos/sin tables) and slots
    /// `< slots`: the caller validates both on the host.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv(
        &self,
        precision: GpuDType,
        qkv: DevRange,
        cos: DevRange,
        sin: DevRange,
        max_pos: usize,
        pos: DevRange,
        base: DevRange,
        n: usize,
        q_out: DevRange,
        kc: DevRange,
        vc: DevRange,
        slots: usize,
        heads: (usize, usize, usize),
    ) -> Result<(), CudaError> {
        let (n_heads, n_kv, hd) = heads;
        check_heads(n_heads, n_kv, hd)?;
        let (hidden, kv_dim) = (n_heads * hd, n_kv * hd);
        let e = precision.size();
        let qkv_p = qkv.need("qkv", bytes("qkv", &[n, hidden + 2 * kv_dim, 4])?)?;
        let c = cos.need("cos table", bytes("rope", &[max_pos, hd / 2, 4])?)?;
        let s = sin.need("sin table", bytes("rope", &[max_pos, hd / 2, 4])?)?;
        let p = pos.need("positions", n * 4)?;
        let b = base.need("cache bases", n * 4)?;
        let q = q_out.need("q", bytes("q", &[n, hidden, 4])?)?;
        let k = kc.need("key cache", bytes("cache", &[slots, kv_dim, e])?)?;
        let v = vc.need("value cache", bytes("cache", &[slots, kv_dim, e])?)?;
        let name = match precision {
            GpuDType::F32 => "rope_kv_f32",
            GpuDType::F16 => "rope_kv_f16",
            GpuDType::BF16 => "rope_kv_bf16",
        };
        self.launch(
            name,
            (u32_grid("rows", n)?, 1, 1),
            (128, 1, 1),
            0,
            &[
                Arg::Ptr(qkv_p),
                Arg::Ptr(c),
                Arg::Ptr(s),
                Arg::Ptr(p),
                Arg::Ptr(b),
                Arg::Ptr(q),
                Arg::Ptr(k),
                Arg::Ptr(v),
                Arg::I32(i32_dim("heads", n_heads)?),
                Arg::I32(i32_dim("kv heads", n_kv)?),
                Arg::I32(i32_dim("head_dim", hd)?),
            ],
        )
    }

    /// How many position splits [`Self::attention`] uses for `n` rows whose
    /// positions stay below `max_visible`: enough CTAs to fill the GPU at
    /// small batches, at most [`ATT_PART_ROWS`] (rows x splits) in total.
    pub fn attention_splits(n: usize, max_visible: usize) -> usize {
        let most = max_visible.div_ceil(ATT_CHUNK).clamp(1, 64);
        most.min((ATT_PART_ROWS / n.max(1)).max(1))
    }

    /// Split count of the tensor-core attention kernels (chunks of
    /// `ATT_MMA_CHUNK` positions) for `n` rows whose CTAs of one split
    /// number `units` (rows x kv heads x groups of up to four query heads):
    /// the fewest splits that give `target_ctas` CTAs, never more than one
    /// per chunk nor more than [`Self::attention_splits`]. Fewer splits
    /// mean less merging (none with one split: the decode kernel writes its
    /// output itself) but longer CTAs, so the target is the number of CTAs
    /// that keeps the GPU busy (two per SM, see [`Self::attention_split_count`]).
    /// Measured on the H200 (BF16 decode, 2B-4T, window 256): at batch 8
    /// and 16 four splits, at 32 two (equal to four), at 64 and 128 one
    /// (batch 64 6% faster than four); 1024-row prefill passes with one
    /// split 4% faster.
    pub fn attention_mma_splits(n: usize, units: usize, max_visible: usize, target_ctas: usize) -> usize {
        let most = max_visible.div_ceil(ATT_MMA_CHUNK).clamp(1, 64);
        let enough = target_ctas.div_ceil(units.max(1)).max(1);
        most.min(enough).min((ATT_PART_ROWS / n.max(1)).max(1))
    }

    /// [`Self::attention_mma_splits`] for `n` rows of a model with these
    /// query and kv heads (CTAs of one split: rows x kv heads x groups of
    /// up to four query heads), except that one row takes at most
    /// `target_ctas / n_heads` splits: the fused kernel runs a batch-1
    /// step's attention as one unit per query head and split, so the CTA
    /// count of the kv-head grouping (5 a split for 2B-4T) gave it far more
    /// units than the GPU holds at long windows. Measured on the H200
    /// (BF16, 2B-4T, target 264; session 17): windows 1024 / 2048 / 4096
    /// with 16 / 32 / 53 splits 1.56 / 2.02 / 2.34 ms per step, with 12 1.54
    /// / 1.64 / 1.74 and 14 1.55 / 1.67 / 1.78; two rows keep the general
    /// rule (27 splits at window 2048: 1.79 ms against 1.95 with 7).
    pub fn attention_mma_decode_splits(
        n: usize,
        (n_heads, n_kv): (usize, usize),
        max_visible: usize,
        target_ctas: usize,
    ) -> usize {
        let units = n * n_kv * (n_heads / n_kv.max(1)).div_ceil(ATT_G);
        one_row_cap(Self::attention_mma_splits(n, units, max_visible, target_ctas), n, n_heads, target_ctas)
    }

    /// Whether attention in `precision` with this head_dim runs on tensor
    /// cores (f16/bf16 caches, head_dim 64 or 128, unless turned off with
    /// [`Self::set_attention_mma`] or `BITNET_CUDA_ATTENTION=scalar`). The
    /// choice never depends on the batch, so neither do the results.
    pub fn attention_on_tensor_cores(&self, precision: GpuDType, head_dim: usize) -> bool {
        precision != GpuDType::F32
            && (head_dim == 64 || head_dim == 128)
            && self.attention_mma.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The split count [`Self::attention`], [`Self::attention_decode_rope`]
    /// and the fused kernel use for `n` rows (so their results are the
    /// same): on tensor cores, [`Self::attention_mma_decode_splits`] with a
    /// target of two CTAs per SM (or [`Self::set_attention_ctas`]'s).
    pub fn attention_split_count(
        &self,
        precision: GpuDType,
        (n_heads, n_kv, head_dim): (usize, usize, usize),
        n: usize,
        max_visible: usize,
    ) -> usize {
        let target = match self.attention_ctas.load(std::sync::atomic::Ordering::Relaxed) {
            0 => 2 * self.sms.max(1),
            t => t,
        };
        if self.attention_on_tensor_cores(precision, head_dim) {
            Self::attention_mma_decode_splits(n, (n_heads, n_kv), max_visible, target)
        } else {
            Self::attention_scalar_decode_splits(n, n_heads, max_visible, target)
        }
    }

    /// Split count of the scalar attention kernels: [`Self::attention_splits`],
    /// except that one row takes at most `target_ctas / n_heads` splits,
    /// for the reason given at [`Self::attention_mma_decode_splits`] (the
    /// fused kernel runs one unit per query head and split). Measured on
    /// the H200 (FP32, 2B-4T, target 264; session 17): windows 1024 / 2048
    /// 3.16 / 3.78 ms per step uncapped (16 / 32 splits), 2.30 / 2.49
    /// capped at 13.
    pub fn attention_scalar_decode_splits(n: usize, n_heads: usize, max_visible: usize, target_ctas: usize) -> usize {
        one_row_cap(Self::attention_splits(n, max_visible), n, n_heads, target_ctas)
    }

    /// Bytes of the scratch [`Self::attention`] needs for `n` rows.
    pub fn attention_scratch_bytes(n: usize, max_visible: usize, n_heads: usize, head_dim: usize) -> usize {
        let slots = n * n_heads * Self::attention_splits(n, max_visible);
        slots * (head_dim + 2) * 4
    }

    /// Causal GQA attention of `n` rows over their cache slots
    /// `base[r] ..= base[r] + pos[r]`; `pos[r] < max_visible` (validated by
    /// the caller). q f32, the caches in `precision`; output f32 `[n, hidden]`.
    /// `scratch` holds [`Self::attention_scratch_bytes`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        precision: GpuDType,
        q: DevRange,
        kc: DevRange,
        vc: DevRange,
        slots: usize,
        pos: DevRange,
        base: DevRange,
        n: usize,
        max_visible: usize,
        out: DevRange,
        heads: (usize, usize, usize),
        scratch: DevRange,
        flags: DevRange,
    ) -> Result<(), CudaError> {
        let (n_heads, n_kv, hd) = heads;
        check_heads(n_heads, n_kv, hd)?;
        if hd > 256 || !hd.is_multiple_of(4) {
            return Err(CudaError::Shape(format!(
                "head_dim {hd}: the attention kernel needs a multiple of 4 up to 256"
            )));
        }
        let (hidden, kv_dim) = (n_heads * hd, n_kv * hd);
        let e = precision.size();
        let qp = q.need("q", bytes("q", &[n, hidden, 4])?)?;
        let k = kc.need("key cache", bytes("cache", &[slots, kv_dim, e])?)?;
        let v = vc.need("value cache", bytes("cache", &[slots, kv_dim, e])?)?;
        let p = pos.need("positions", n * 4)?;
        let b = base.need("cache bases", n * 4)?;
        let o = out.need("attention output", bytes("attention", &[n, hidden, 4])?)?;
        let f = flags.need("flags", 4)?;
        let (splits, part, ml) = self.attention_parts(precision, heads, n, max_visible, scratch)?;
        let mma = self.attention_on_tensor_cores(precision, hd);
        // Tensor cores: one CTA per kv head and group of up to 4 of its query
        // heads. Scalar: the same with up to ATT_G heads, unless that leaves
        // too few CTAs (small batches): then one per head; head_dim up to 128:
        // one 128-wide group per lane set, else two (`_wide`).
        let hpc = if mma || n * n_kv * splits >= ATT_GROUPED_MIN_CTAS { ATT_G } else { 1 };
        let head_groups = n_kv * (n_heads / n_kv).div_ceil(hpc);
        let name = match (precision, hd <= 128, hpc == 1) {
            (GpuDType::F16, _, _) if mma => "attention_mma_f16",
            (GpuDType::BF16, _, _) if mma => "attention_mma_bf16",
            (GpuDType::F32, true, false) => "attention_f32",
            (GpuDType::F16, true, false) => "attention_f16",
            (GpuDType::BF16, true, false) => "attention_bf16",
            (GpuDType::F32, false, false) => "attention_f32_wide",
            (GpuDType::F16, false, false) => "attention_f16_wide",
            (GpuDType::BF16, false, false) => "attention_bf16_wide",
            (GpuDType::F32, true, true) => "attention_f32_h1",
            (GpuDType::F16, true, true) => "attention_f16_h1",
            (GpuDType::BF16, true, true) => "attention_bf16_h1",
            (GpuDType::F32, false, true) => "attention_f32_wide_h1",
            (GpuDType::F16, false, true) => "attention_f16_wide_h1",
            (GpuDType::BF16, false, true) => "attention_bf16_wide_h1",
        };
        // The tensor-core kernels also take the flags (q beyond f16's range).
        let mut args =
            vec![Arg::Ptr(qp), Arg::Ptr(k), Arg::Ptr(v), Arg::Ptr(p), Arg::Ptr(b), Arg::Ptr(part), Arg::Ptr(ml)];
        if mma {
            args.push(Arg::Ptr(f));
        }
        args.extend([
            Arg::I32(i32_dim("heads", n_heads)?),
            Arg::I32(i32_dim("kv heads", n_kv)?),
            Arg::I32(i32_dim("head_dim", hd)?),
            Arg::F32(1.0 / (hd as f32).sqrt()),
        ]);
        self.launch(
            name,
            (u32_grid("rows", n)?, u32_grid("heads", head_groups)?, splits as u32),
            (128, 1, 1),
            0,
            &args,
        )?;
        self.attention_combine(part, ml, n, n_heads, hd, splits, o, f)
    }

    /// [`Self::rope_kv`] then [`Self::attention`] for `n` decode rows, each
    /// the next position of its own sequence, in one tensor-core kernel (the
    /// fused decode kernel's attention stage; same results to the bit): q,
    /// k and v come straight from `qkv` and only the unit that attends to
    /// the new position writes its k and v into the caches. Only where
    /// [`Self::attention_on_tensor_cores`]; the caller guarantees the rows
    /// are of distinct sequences.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_rope(
        &self,
        precision: GpuDType,
        qkv: DevRange,
        (cos, sin, max_pos): (DevRange, DevRange, usize),
        pos: DevRange,
        base: DevRange,
        n: usize,
        max_visible: usize,
        (kc, vc, slots): (DevRange, DevRange, usize),
        out: DevRange,
        heads: (usize, usize, usize),
        scratch: DevRange,
        flags: DevRange,
    ) -> Result<(), CudaError> {
        let (n_heads, n_kv, hd) = heads;
        check_heads(n_heads, n_kv, hd)?;
        if !self.attention_on_tensor_cores(precision, hd) {
            return Err(CudaError::Shape(format!(
                "{precision:?} attention with head_dim {hd} does not run on tensor cores here"
            )));
        }
        let (hidden, kv_dim) = (n_heads * hd, n_kv * hd);
        let e = precision.size();
        let qkv_p = qkv.need("qkv", bytes("qkv", &[n, hidden + 2 * kv_dim, 4])?)?;
        let c = cos.need("cos table", bytes("rope", &[max_pos, hd / 2, 4])?)?;
        let s = sin.need("sin table", bytes("rope", &[max_pos, hd / 2, 4])?)?;
        let p = pos.need("positions", n * 4)?;
        let b = base.need("cache bases", n * 4)?;
        let k = kc.need("key cache", bytes("cache", &[slots, kv_dim, e])?)?;
        let v = vc.need("value cache", bytes("cache", &[slots, kv_dim, e])?)?;
        let o = out.need("attention output", bytes("attention", &[n, hidden, 4])?)?;
        let f = flags.need("flags", 4)?;
        let (splits, part, ml) = self.attention_parts(precision, heads, n, max_visible, scratch)?;
        let head_groups = n_kv * (n_heads / n_kv).div_ceil(ATT_G);
        let name = if precision == GpuDType::F16 { "attention_mma_rope_f16" } else { "attention_mma_rope_bf16" };
        self.launch(
            name,
            (u32_grid("rows", n)?, u32_grid("heads", head_groups)?, splits as u32),
            (128, 1, 1),
            0,
            &[
                Arg::Ptr(qkv_p),
                Arg::Ptr(p),
                Arg::Ptr(b),
                Arg::Ptr(c),
                Arg::Ptr(s),
                Arg::Ptr(k),
                Arg::Ptr(v),
                Arg::Ptr(part),
                Arg::Ptr(ml),
                Arg::Ptr(o),
                Arg::Ptr(f),
                Arg::I32(i32_dim("heads", n_heads)?),
                Arg::I32(i32_dim("kv heads", n_kv)?),
                Arg::I32(i32_dim("head_dim", hd)?),
                Arg::F32(1.0 / (hd as f32).sqrt()),
            ],
        )?;
        // One split: the kernel wrote the combined output itself.
        if splits == 1 {
            return Ok(());
        }
        self.attention_combine(part, ml, n, n_heads, hd, splits, o, f)
    }

    /// The split count of an attention call and where its parts (`n` x
    /// heads x splits rows of head_dim) and their (m, l) pairs go in `scratch`.
    pub(crate) fn attention_parts(
        &self,
        precision: GpuDType,
        (n_heads, n_kv, hd): (usize, usize, usize),
        n: usize,
        max_visible: usize,
        scratch: DevRange,
    ) -> Result<(usize, u64, u64), CudaError> {
        let splits = self.attention_split_count(precision, (n_heads, n_kv, hd), n, max_visible);
        let part_slots = n * n_heads * splits;
        let part = scratch.need("attention scratch", part_slots * (hd + 2) * 4)?;
        Ok((splits, part, part + (part_slots * hd * 4) as u64))
    }

    /// Merges the `splits` parts of each (row, head) into `out`.
    #[allow(clippy::too_many_arguments)]
    fn attention_combine(
        &self,
        part: u64,
        ml: u64,
        n: usize,
        n_heads: usize,
        hd: usize,
        splits: usize,
        out: u64,
        flags: u64,
    ) -> Result<(), CudaError> {
        self.launch(
            "attention_combine",
            (u32_grid("rows", n)?, u32_grid("heads", n_heads)?, 1),
            (128, 1, 1),
            0,
            &[
                Arg::Ptr(part),
                Arg::Ptr(ml),
                Arg::I32(i32_dim("heads", n_heads)?),
                Arg::I32(i32_dim("head_dim", hd)?),
                Arg::I32(i32_dim("splits", splits)?),
                Arg::Ptr(out),
                Arg::Ptr(flags),
            ],
        )
    }

    /// Bytes of the logits buffer [`Self::head`] needs for `entries` rows.
    pub fn head_logits_bytes(&self, precision: GpuDType, entries: usize, vocab: usize) -> usize {
        let rows = if precision == GpuDType::F32 { self.head_rows(precision, entries) } else { entries };
        rows * vocab * 4
    }

    /// Bytes of the scratch [`Self::head`] needs (f16/bf16 on cuBLAS: the
    /// hi and lo products of one chunk).
    pub fn head_scratch_bytes(&self, precision: GpuDType, vocab: usize) -> usize {
        match (precision, self.head_impl()) {
            (GpuDType::F16 | GpuDType::BF16, HeadImpl::Cublas) => 2 * self.head_chunk(precision) * vocab * 4,
            _ => 0,
        }
    }

    /// `logits[e, v] = sum_k w[v, k] * x[e, k]` (f32 `[n, vocab]`) with the
    /// input from [`Self::final_norm`] (hi and lo rows for f16/bf16, which
    /// are multiplied separately and added), on cuBLAS or our kernels (see
    /// [`Self::head_impl`]). `x`, `logits` and `scratch` hold
    /// [`Self::head_input_bytes`], [`Self::head_logits_bytes`] and
    /// [`Self::head_scratch_bytes`].
    ///
    /// Both implementations give every entry the same bits whatever the
    /// batch: our kernels compute each logit in a fixed order, and cuBLAS is
    /// called on whole chunks of entries (the rows past `n` are computed
    /// from whatever the buffer holds and ignored), a call's shape picking
    /// its algorithm, or on the small chunks
    /// [`Self::verify_head_small_chunk`] found to give the same bits.
    #[allow(clippy::too_many_arguments)]
    pub fn head(
        &self,
        precision: GpuDType,
        w: DevRange,
        vocab: usize,
        hidden: usize,
        x: DevRange,
        n: usize,
        logits: DevRange,
        scratch: DevRange,
    ) -> Result<(), CudaError> {
        self.head_in_calls(precision, w, vocab, hidden, x, n, logits, scratch, None)
    }

    /// [`Self::head`], on cuBLAS in calls of `calls` entries where given
    /// (else as [`Self::head_call_chunk`] chooses).
    #[allow(clippy::too_many_arguments)]
    fn head_in_calls(
        &self,
        precision: GpuDType,
        w: DevRange,
        vocab: usize,
        hidden: usize,
        x: DevRange,
        n: usize,
        logits: DevRange,
        scratch: DevRange,
        calls: Option<usize>,
    ) -> Result<(), CudaError> {
        multiple("hidden size", hidden, 16)?;
        let e = precision.size();
        let wp = w.need("head weights", bytes("head", &[vocab, hidden, e])?)?;
        let xp = x.need("head input", self.head_input_bytes(precision, n, hidden))?;
        let lp = logits.need("logits", self.head_logits_bytes(precision, n, vocab))?;
        if let Some(blas) = self.blas.as_ref().filter(|_| self.head_impl() == HeadImpl::Cublas) {
            let sp = scratch.need("head scratch", self.head_scratch_bytes(precision, vocab))?;
            let chunk = calls.unwrap_or_else(|| self.head_call_chunk(precision, vocab, hidden, n));
            let parts = if precision == GpuDType::F32 { 1 } else { 2 };
            let dt = match precision {
                GpuDType::F32 => cudarc::cublas::sys::cudaDataType::CUDA_R_32F,
                GpuDType::F16 => cudarc::cublas::sys::cudaDataType::CUDA_R_16F,
                GpuDType::BF16 => cudarc::cublas::sys::cudaDataType::CUDA_R_16BF,
            };
            let cols = i32_dim("head columns", parts * chunk)?;
            let (m, k) = (i32_dim("vocab", vocab)?, i32_dim("hidden", hidden)?);
            for c in 0..n.div_ceil(chunk) {
                let first = c * chunk;
                let rows = chunk.min(n - first);
                let xc = xp + (first * parts * hidden * e) as u64;
                let out = lp + (first * vocab * 4) as u64;
                self.hook_launch("cublasGemmEx")?;
                self.profiled("cublas_head", || {
                    self.ctx.bind_to_thread().map_err(super::driver("cuCtxSetCurrent"))?;
                    blas.gemm_tn(dt, wp, xc, if parts == 1 { out } else { sp }, m, cols, k)
                })?;
                if parts == 2 {
                    let blocks = (rows * vocab).div_ceil(256 * 4).clamp(1, 65_535);
                    self.launch(
                        "add_row_pairs",
                        (blocks as u32, 1, 1),
                        (256, 1, 1),
                        0,
                        &[Arg::Ptr(sp), Arg::Ptr(out), Arg::I32(i32_dim("rows", rows)?), Arg::I32(m)],
                    )?;
                }
            }
            return Ok(());
        }
        let args = [
            Arg::Ptr(wp),
            Arg::I32(i32_dim("vocab", vocab)?),
            Arg::I32(i32_dim("hidden", hidden)?),
            Arg::Ptr(xp),
            Arg::I32(i32_dim("entries", n)?),
            Arg::Ptr(lp),
        ];
        match precision {
            GpuDType::F32 => self.launch(
                "head_f32",
                (u32_grid("vocab", vocab.div_ceil(8))?, u32_grid("entries", n.div_ceil(8))?, 1),
                (256, 1, 1),
                0,
                &args,
            ),
            GpuDType::F16 | GpuDType::BF16 => {
                // Up to 8 entries: the one-tile variant (fewer registers).
                let small = n <= 8;
                let name = match (precision == GpuDType::F16, small) {
                    (true, false) => "head_f16",
                    (false, false) => "head_bf16",
                    (true, true) => "head_f16_small",
                    (false, true) => "head_bf16_small",
                };
                let per_cta = if small { 8 } else { HEAD_TOKENS };
                let grid = (u32_grid("vocab", vocab.div_ceil(64))?, u32_grid("entries", n.div_ceil(per_cta))?, 1);
                self.launch(name, grid, (128, 1, 1), 0, &args)
            }
        }
    }

    /// Bytes of the scratch [`Self::argmax`] needs to split rows of `vocab`
    /// logits over several CTAs, for up to `entries` rows: each row's
    /// partial maxima and indices, then one counter per row (zero when
    /// allocated; the kernel leaves it zero).
    pub fn argmax_scratch_bytes(entries: usize, vocab: usize) -> usize {
        let (splits, _) = argmax_splits(vocab);
        entries * (splits * 8 + 4)
    }

    /// `out[e] = argmax(logits[e, :])` (the first index of the maximum).
    /// With `scratch` of [`Self::argmax_scratch_bytes`] for at least `n`
    /// rows and at most [`ARGMAX_SPLIT_MAX_ROWS`] rows, each row is split
    /// over CTAs of 256 threads (`argmax_split`: 63 for 128256 logits)
    /// instead of one CTA of 1024 threads (`argmax_rows`); the result is
    /// the same.
    pub fn argmax(
        &self,
        logits: DevRange,
        vocab: usize,
        n: usize,
        out: DevRange,
        flags: DevRange,
        scratch: Option<DevRange>,
    ) -> Result<(), CudaError> {
        let lp = logits.need("logits", bytes("logits", &[n, vocab, 4])?)?;
        let o = out.need("argmax output", n * 4)?;
        let f = flags.need("flags", 4)?;
        if let Some(scratch) = scratch.filter(|_| n <= ARGMAX_SPLIT_MAX_ROWS) {
            let (splits, chunk) = argmax_splits(vocab);
            let sp = scratch.need("argmax scratch", Self::argmax_scratch_bytes(n, vocab))?;
            let (values, indices, counters) = (sp, sp + (n * splits * 4) as u64, sp + (n * splits * 8) as u64);
            return self.launch(
                "argmax_split",
                (u32_grid("splits", splits)?, u32_grid("entries", n)?, 1),
                (256, 1, 1),
                0,
                &[
                    Arg::Ptr(lp),
                    Arg::I32(i32_dim("vocab", vocab)?),
                    Arg::I32(i32_dim("chunk", chunk)?),
                    Arg::Ptr(o),
                    Arg::Ptr(f),
                    Arg::Ptr(values),
                    Arg::Ptr(indices),
                    Arg::Ptr(counters),
                ],
            );
        }
        self.launch(
            "argmax_rows",
            (u32_grid("entries", n)?, 1, 1),
            (1024, 1, 1),
            0,
            &[Arg::Ptr(lp), Arg::I32(i32_dim("vocab", vocab)?), Arg::Ptr(o), Arg::Ptr(f)],
        )
    }
}

/// Largest top-k [`GpuContext::sample_rows`] draws from on the device.
pub const SAMPLE_MAX_K: usize = 1024;

/// Largest vocabulary [`GpuContext::sample_rows`] takes: top-p alone sums
/// the weights (each at most 1) in fixed point with 41 fractional bits,
/// which this many keep below 2^63.
pub const SAMPLE_MAX_VOCAB: usize = 1 << 21;

/// One row's draw for [`GpuContext::sample_rows`]: temperature (a row whose
/// temperature is not above 0 keeps its token), top-k (0: off, else at most
/// [`SAMPLE_MAX_K`]), top-p (1: off), and the uniform number in [0, 1) the
/// draw uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleRow {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub u: f64,
}

impl SampleRow {
    /// Bytes of one row's parameters on the device (`SampleParams`).
    pub const BYTES: usize = 24;

    /// A row left alone (its argmax stands).
    pub const KEEP: Self = Self { temperature: 0.0, top_k: 0, top_p: 1.0, u: 0.0 };

    /// Whether the device kernel draws this row (else the host must).
    pub fn on_device(&self) -> bool {
        self.temperature > 0.0 && self.temperature.is_finite() && self.top_k <= SAMPLE_MAX_K
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let (temperature, top_k) = if self.on_device() { (self.temperature, self.top_k as i32) } else { (0.0, 0) };
        out.extend_from_slice(&temperature.to_le_bytes());
        out.extend_from_slice(&top_k.to_le_bytes());
        out.extend_from_slice(&self.top_p.to_le_bytes());
        out.extend_from_slice(&0i32.to_le_bytes());
        out.extend_from_slice(&self.u.to_le_bytes());
    }
}

/// Tokens each CTA of the sampling kernels takes (`SAMPLE_CHUNK` in
/// kernels/bitnet.cu).
const SAMPLE_CHUNK: usize = 2048;

/// Chunks each CTA of the sampling kernels takes for `rows` rows of `chunks`
/// chunks on `sms` multiprocessors: as many as keep the grid within about
/// four CTAs an SM (one wave: the chunk kernels are held to 64 registers a
/// thread, so four CTAs of 256 threads fit an SM), at least one. A CTA works its
/// chunks one after another exactly as CTAs of their own would, so this
/// changes the time, never the draw.
fn sample_group(rows: usize, chunks: usize, sms: usize) -> usize {
    (rows * chunks).div_ceil(4 * sms.max(1)).clamp(1, chunks.max(1))
}

/// Bytes of one row's scratch in [`GpuContext::sample_rows`]'s workspace for
/// rows of `chunks` chunks (device twin: `sample_row_bytes` in
/// kernels/bitnet.cu): the radix passes' bucket masses, five states of 32
/// bytes, each chunk's kept mass, largest logit, finite count and last-pass
/// counts, the passes' bucket counts, top-k's candidates and their count.
fn sample_row_bytes(chunks: usize) -> usize {
    let bytes = 4 * 256 * 8 + 5 * 32 + chunks * (8 + 4 + 4 + 256 * 4) + 4 * 256 * 4 + SAMPLE_MAX_K * 8 + 4;
    bytes.next_multiple_of(256)
}

impl GpuContext {
    /// Bytes of [`Self::sample_rows`]'s workspace for `rows` rows of `vocab`
    /// logits: the rows' parameters, then each row's scratch.
    pub fn sample_workspace_bytes(rows: usize, vocab: usize) -> usize {
        Self::sample_params_span(rows) + rows * sample_row_bytes(vocab.div_ceil(SAMPLE_CHUNK).max(1))
    }

    fn sample_params_span(rows: usize) -> usize {
        (rows * SampleRow::BYTES).next_multiple_of(256)
    }

    /// Draws the token of each row of `logits` (`rows.len()` rows of `vocab`,
    /// at most [`SAMPLE_MAX_VOCAB`]) whose [`SampleRow::on_device`] holds
    /// into `tokens[row]` (i32); other rows keep what `tokens` holds (the
    /// argmax of a greedy step). Every drawn row gets a token: top-p alone
    /// finds its nucleus however wide it is. Each row is split into chunks
    /// of 2048 logits worked by CTAs of 256 threads, one or more chunks a
    /// CTA (`sample_group`): `sample_stats`, four `sample_hist` passes when
    /// a row keeps its top-k or a top-p nucleus, `sample_gather`, then
    /// `sample_final` (one CTA a row). A row's draw depends on its logits,
    /// parameters and u alone, never on the other rows or the grid. `workspace` holds at least
    /// [`Self::sample_workspace_bytes`] for the rows and is written here.
    pub fn sample_rows(
        &self,
        logits: DevRange,
        vocab: usize,
        rows: &[SampleRow],
        workspace: DevRange,
        tokens: DevRange,
    ) -> Result<(), CudaError> {
        let n = rows.len();
        let lp = logits.need("logits", bytes("logits", &[n, vocab, 4])?)?;
        let tp = tokens.need("sampled tokens", n * 4)?;
        if n == 0 || !rows.iter().any(SampleRow::on_device) {
            return Ok(());
        }
        if vocab > SAMPLE_MAX_VOCAB {
            return Err(CudaError::Shape(format!(
                "sampling on the device takes vocabularies of at most {SAMPLE_MAX_VOCAB} tokens, not {vocab}"
            )));
        }
        if n > 65_535 {
            return Err(CudaError::Shape(format!("sampling on the device takes at most 65535 rows a call, not {n}")));
        }
        let wp = workspace.need("sampling workspace", Self::sample_workspace_bytes(n, vocab))?;
        let params = workspace.sub(0, n * SampleRow::BYTES)?;
        let scratch = wp + Self::sample_params_span(n) as u64;
        let mut encoded = Vec::with_capacity(n * SampleRow::BYTES);
        for row in rows {
            row.encode(&mut encoded);
        }
        self.write(params, &encoded)?;
        let chunks = vocab.div_ceil(SAMPLE_CHUNK).max(1);
        let group = match self.sample_group {
            0 => sample_group(n, chunks, self.sms),
            g => g.min(chunks),
        };
        let grid = (u32_grid("chunk groups", chunks.div_ceil(group))?, u32_grid("entries", n)?, 1);
        let (v, g) = (Arg::I32(i32_dim("vocab", vocab)?), Arg::I32(i32_dim("chunk group", group)?));
        let (lp, pp, sp) = (Arg::Ptr(lp), Arg::Ptr(wp), Arg::Ptr(scratch));
        self.launch("sample_stats", grid, (256, 1, 1), 0, &[lp, v, pp, sp, g])?;
        if rows.iter().any(|r| r.on_device() && (r.top_k > 0 || r.top_p < 1.0)) {
            for pass in 0..4 {
                self.launch("sample_hist", grid, (256, 1, 1), 0, &[lp, v, pp, sp, g, Arg::I32(pass)])?;
            }
        }
        self.launch("sample_gather", grid, (256, 1, 1), 0, &[lp, v, pp, sp, g])?;
        self.launch("sample_final", (grid.1, 1, 1), (1024, 1, 1), 0, &[lp, v, pp, sp, Arg::Ptr(tp)])
    }
}

/// Most rows [`GpuContext::argmax`] splits over CTAs. Measured on the H200
/// (session 23, 128256 logits a row, `xtask bench --kernels` and the eager
/// profile): 1 row 9.2 -> 3.4 us, 8 rows 12.1 -> 7.4, 32 rows 9.7 -> 7.9,
/// but 128 rows 22.3 -> 32.6 (128 CTAs of the row kernel already fill the GPU).
pub const ARGMAX_SPLIT_MAX_ROWS: usize = 32;

/// CTAs per row of [`GpuContext::argmax`]'s split kernel, and the elements
/// each reduces (a multiple of 4): about 2048, at most 256 CTAs.
fn argmax_splits(vocab: usize) -> (usize, usize) {
    let want = vocab.div_ceil(2048).clamp(1, 256);
    let chunk = vocab.div_ceil(want).next_multiple_of(4).max(4);
    (vocab.div_ceil(chunk).max(1), chunk)
}

/// Whether every row of `whole` (rows of `row_bytes` bytes) equals row
/// `p % n` of `part` (its `n` rows), bit for bit; `part` must hold whole
/// rows and `whole` at least one.
fn rows_repeat(whole: &[u8], part: &[u8], row_bytes: usize) -> bool {
    if row_bytes == 0 || part.is_empty() || !part.len().is_multiple_of(row_bytes) || whole.len() < row_bytes {
        return false;
    }
    let n = part.len() / row_bytes;
    whole.len().is_multiple_of(row_bytes)
        && whole.chunks_exact(row_bytes).enumerate().all(|(p, r)| r == &part[(p % n) * row_bytes..][..row_bytes])
}

fn check_heads(n_heads: usize, n_kv: usize, hd: usize) -> Result<(), CudaError> {
    if n_heads == 0 || n_kv == 0 || !n_heads.is_multiple_of(n_kv) || hd == 0 || !hd.is_multiple_of(2) {
        return Err(CudaError::Shape(format!(
            "{n_heads} heads / {n_kv} kv heads / head_dim {hd}: heads must be a multiple of kv heads and head_dim even"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_splits_cover_every_logit_once() {
        // 2B-4T's vocabulary: 63 CTAs of 2036 logits (the last 2028).
        assert_eq!(argmax_splits(128_256), (63, 2036));
        assert_eq!(argmax_splits(8192), (4, 2048));
        assert_eq!(argmax_splits(1001), (1, 1004));
        for vocab in (1..5000).chain([32_000, 128_256, 1 << 20, 3 << 20]) {
            let (splits, chunk) = argmax_splits(vocab);
            assert!(chunk.is_multiple_of(4) && (1..=256).contains(&splits), "{vocab}");
            // Every CTA has logits and together they hold the row.
            assert!((splits - 1) * chunk < vocab && splits * chunk >= vocab, "{vocab}: {splits} x {chunk}");
        }
        assert_eq!(GpuContext::argmax_scratch_bytes(2, 128_256), 2 * (63 * 8 + 4));
    }

    #[test]
    fn sampling_grid_stays_about_one_wave() {
        // 2B-4T's 63 chunks on the H200's 132 SMs (528 CTAs a wave).
        assert_eq!(sample_group(1, 63, 132), 1);
        assert_eq!(sample_group(8, 63, 132), 1);
        assert_eq!(sample_group(64, 63, 132), 8); // 8 CTAs a row, 512 in all
        assert_eq!(sample_group(128, 63, 132), 16);
        assert_eq!(sample_group(100_000, 63, 132), 63); // one CTA a row at most
        assert_eq!(sample_group(3, 1, 0), 1);
        for rows in 1..300 {
            let g = sample_group(rows, 63, 132);
            let ctas = rows * 63usize.div_ceil(g);
            assert!(g == 1 || ctas <= 528 + rows, "{rows} rows: {g} chunks a CTA, {ctas} CTAs");
        }
        // The workspace: parameters, then one scratch a row (2B-4T: 86164
        // bytes, rounded up to 86272).
        assert_eq!(sample_row_bytes(63), 86_272);
        assert_eq!(GpuContext::sample_workspace_bytes(3, 128_256), 256 + 3 * 86_272);
    }

    #[test]
    fn head_check_compares_every_row_with_its_repeat() {
        // Rows of 2 bytes; the part holds 2 rows: [1 2] [3 4].
        let part = [1u8, 2, 3, 4];
        assert!(rows_repeat(&[1, 2, 3, 4, 1, 2, 3, 4], &part, 2));
        assert!(rows_repeat(&[1, 2, 3, 4], &part, 2));
        // One byte off in the fourth row, or rows in another order.
        assert!(!rows_repeat(&[1, 2, 3, 4, 1, 2, 3, 5], &part, 2));
        assert!(!rows_repeat(&[3, 4, 1, 2], &part, 2));
        // A partial row, an empty part or comparison.
        assert!(!rows_repeat(&[1, 2, 3], &part, 2));
        assert!(!rows_repeat(&[], &part, 2));
        assert!(!rows_repeat(&[1, 2], &[], 2));
        assert!(!rows_repeat(&[1, 2], &[1, 2, 3], 2));
    }

    #[test]
    fn cluster_kernels_take_the_passes_they_speed_up() {
        let sms = 132;
        // 2B-4T (hand-derived tile counts, 128 weight rows x 32 tokens):
        // q|k|v 30 per 32 tokens, o and down 20, gate/up 108.
        for (rows, k, gate_up) in [(3840, 2560, false), (2560, 2560, false), (6912, 2560, true), (2560, 6912, false)] {
            // Up to 8 tokens: the one-tile kernels.
            assert!(!cluster_pays(rows, 8, k, gate_up, sms));
            // 17-64 tokens: every product but gate/up at 64 (216 tiles).
            assert!(cluster_pays(rows, 32, k, gate_up, sms));
            assert_eq!(cluster_pays(rows, 64, k, gate_up, sms), !gate_up);
            // 128 tokens: q|k|v 120 tiles, o and down 80: yes; gate/up 432: no.
            assert_eq!(cluster_pays(rows, 128, k, gate_up, sms), !gate_up);
            // 256 tokens: q|k|v 240 tiles, o and down 160: no.
            assert!(!cluster_pays(rows, 256, k, gate_up, sms));
        }
        // 9-16 tokens: only the big products (gate/up 2 x 6912 x 2560 and
        // down 2560 x 6912 weights are >= 16 Mi; q|k|v 9.8 Mi, o 6.6 Mi).
        assert!(cluster_pays(6912, 16, 2560, true, sms));
        assert!(cluster_pays(2560, 9, 6912, false, sms));
        assert!(!cluster_pays(3840, 16, 2560, false, sms));
        assert!(!cluster_pays(2560, 16, 2560, false, sms));
    }

    #[test]
    fn cluster_split_fills_the_gpu_within_shared_memory() {
        // 2B-4T at 32 tokens on 132 SMs (hand-derived): q|k|v has 30 groups
        // of 128 rows, so 5 CTAs per cluster (150 CTAs), each 4 of the 20 K
        // blocks: 32 x (512 + 32) bytes of activations, then 256 of scales
        // and sums; o 20 groups: 7 (3 blocks: the 16 KB of partial sums are
        // more); gate/up 108 groups of 64 rows: 2 (10 blocks); down 20
        // groups: 7 (8 of 54 blocks).
        assert_eq!(cluster_split(3840, 32, 2560, false, 132), Some((5, 17408 + 256)));
        assert_eq!(cluster_split(2560, 32, 2560, false, 132), Some((7, 16384 + 256)));
        assert_eq!(cluster_split(6912, 32, 2560, true, 132), Some((2, 41984 + 256)));
        assert_eq!(cluster_split(2560, 32, 6912, false, 132), Some((7, 33792 + 256)));
        // 64 tokens: twice the groups, half the split; gate/up's 216 groups
        // would take one CTA each, but its 20 blocks (32 x 2592 bytes) do
        // not fit 64 KB: two.
        assert_eq!(cluster_split(3840, 64, 2560, false, 132), Some((3, 32 * (7 * 128 + 32) + 256)));
        assert_eq!(cluster_split(6912, 64, 2560, true, 132), Some((2, 41984 + 256)));
        // A K range too long for one CTA's 64 KB: split further than the
        // target asks (one group: 54 blocks; 3 CTAs of 18 blocks would take
        // 74752 bytes of activations: 4 of 14, 58368).
        assert_eq!(cluster_split(128, 32, 6912, false, 1), Some((4, 58368 + 256)));
        // Never more CTAs than K blocks, never more than 8.
        assert_eq!(cluster_split(16, 1, 256, false, 132), Some((2, 16384 + 256)));
        assert_eq!(cluster_split(16, 1, 6912, false, 1000), Some((8, 32 * (7 * 128 + 32) + 256)));
        // Too long even for 8 CTAs (19 of 150 blocks each: 78848 bytes).
        assert_eq!(cluster_split(128, 32, 150 * 128, false, 132), None);
    }

    #[test]
    fn staged_kernels_take_passes_whose_grid_fills_the_gpu() {
        // 2B-4T on an H200 (132 SMs): at 32 tokens only gate/up (108 CTAs
        // of 128 weight rows: the work of 216) fills it, not q|k|v (60),
        // o/down (40) or a 6912-row product of one matrix (108); at 64
        // tokens not q|k|v (120) or o/down (80); at 128 every product.
        let sms = 132;
        assert!(staged_grid_fills(6912, 32, true, sms));
        assert!(!staged_grid_fills(6912, 32, false, sms));
        assert!(!staged_grid_fills(3840, 32, false, sms));
        assert!(!staged_grid_fills(2560, 32, false, sms));
        assert!(!staged_grid_fills(3840, 64, false, sms));
        assert!(!staged_grid_fills(2560, 64, false, sms));
        assert!(staged_grid_fills(2560, 128, false, sms));
        assert!(staged_grid_fills(3840, 1024, false, sms));
        // Below a full token tile, gate/up counts its share: 16 tokens of
        // 216 tiles are the work of 108 CTAs (not filled), 20 tokens of 135.
        assert!(!staged_grid_fills(6912, 16, true, sms));
        assert!(staged_grid_fills(6912, 20, true, sms));
        // Partial row tiles count whole: 65 rows are two CTAs.
        assert!(staged_grid_fills(65, 64, false, 4));
        assert!(!staged_grid_fills(64, 64, false, 3));
        assert!(staged_grid_fills(64, 32, true, 2));
    }

    #[test]
    fn two_row_tile_kernels_take_passes_that_fit_one_wave() {
        // 2B-4T on an H200 (132 SMs), 9-32 tokens: q|k|v (120 CTAs of 32
        // rows), o and down (80) fit; gate/up's 6912 rows (216) do not;
        // 33-64 tokens: q|k|v 240, o/down 160 do not.
        let sms = 132;
        assert!(split2_fits(3840, 32, sms));
        assert!(split2_fits(2560, 9, sms));
        assert!(!split2_fits(6912, 16, sms));
        assert!(!split2_fits(3840, 33, sms));
        assert!(!split2_fits(2560, 64, sms));
        // Partial tiles count whole: 33 rows are two CTAs.
        assert!(split2_fits(33, 32, 2));
        assert!(!split2_fits(33, 33, 3));
    }

    #[test]
    fn attention_splits_give_the_target_ctas_with_the_fewest_splits() {
        // 2B-4T (5 kv heads, one group of 4 query heads each) on an H200
        // (target 264 CTAs), window 256 (4 chunks of 64): batch 8 (40 CTAs
        // a split) and 16 (80) take every chunk's split, 32 (160) two, 64
        // (320) and 128 one.
        let units = |n: usize| n * 5;
        assert_eq!(GpuContext::attention_mma_splits(8, units(8), 256, 264), 4);
        assert_eq!(GpuContext::attention_mma_splits(16, units(16), 256, 264), 4);
        assert_eq!(GpuContext::attention_mma_splits(32, units(32), 256, 264), 2);
        assert_eq!(GpuContext::attention_mma_splits(64, units(64), 256, 264), 1);
        assert_eq!(GpuContext::attention_mma_splits(128, units(128), 256, 264), 1);
        // Batch 1 over 4096 positions: 53 splits of the 64 chunks give 265.
        assert_eq!(GpuContext::attention_mma_splits(1, units(1), 4096, 264), 53);
        // At most one split per chunk, at least one, and rows x splits
        // within the scratch (ATT_PART_ROWS).
        assert_eq!(GpuContext::attention_mma_splits(1, 1, 100, usize::MAX), 2);
        assert_eq!(GpuContext::attention_mma_splits(1, 0, 100, 0), 1);
        assert_eq!(GpuContext::attention_mma_splits(1024, 1, 4096, usize::MAX), ATT_PART_ROWS / 1024);
    }

    #[test]
    fn one_row_takes_no_more_splits_than_its_heads_fill() {
        // 2B-4T: 20 query heads, 5 kv heads (4 each). One row: at most
        // 264 / 20 = 13 splits, whatever the window...
        let heads = (20, 5);
        assert_eq!(GpuContext::attention_mma_decode_splits(1, heads, 2048, 264), 13);
        assert_eq!(GpuContext::attention_mma_decode_splits(1, heads, 4096, 264), 13);
        // ...but never more than one per chunk of 64 positions.
        assert_eq!(GpuContext::attention_mma_decode_splits(1, heads, 256, 264), 4);
        assert_eq!(GpuContext::attention_mma_decode_splits(1, heads, 1024, 264), 13);
        // Two rows keep the fewest splits giving 264 CTAs of 10: 27.
        assert_eq!(GpuContext::attention_mma_decode_splits(2, heads, 2048, 264), 27);
        assert_eq!(GpuContext::attention_mma_decode_splits(8, heads, 256, 264), 4);
        // A target below the head count still leaves one split.
        assert_eq!(GpuContext::attention_mma_decode_splits(1, heads, 2048, 1), 1);
    }

    #[test]
    fn one_scalar_row_takes_no_more_splits_than_its_heads_fill() {
        // Scalar attention splits the window in chunks of 32 positions, at
        // most 64 splits; 2B-4T's 20 query heads on 264 CTAs cap one row
        // at 13 (4096 positions would otherwise take 64).
        assert_eq!(GpuContext::attention_scalar_decode_splits(1, 20, 4096, 264), 13);
        assert_eq!(GpuContext::attention_scalar_decode_splits(1, 20, 32, 264), 1);
        assert_eq!(GpuContext::attention_scalar_decode_splits(1, 20, 96, 264), 3);
        // Two rows keep the general rule; a tiny target still leaves one.
        assert_eq!(GpuContext::attention_scalar_decode_splits(2, 20, 4096, 264), 64);
        assert_eq!(GpuContext::attention_scalar_decode_splits(1, 20, 4096, 1), 1);
    }

    #[test]
    fn staged_shared_memory_matches_the_kernel_layout() {
        // 4 stages x (64 weight rows x 96 + 32 tokens x 288) bytes; gate/up
        // holds 128 weight rows.
        assert_eq!(staged_smem(false, 4), 4 * (64 * 96 + 32 * 288));
        assert_eq!(staged_smem(true, 4), 4 * (128 * 96 + 32 * 288));
        assert!(staged_smem_sizes().iter().all(|&(_, b)| b <= 99 * 1024), "fits every sm_80+ GPU's opt-in limit");
    }

    // kernels/bitnet.cu's quant_i8, step for step in f32. max/min as fmaxf
    // and fminf (a NaN operand yields the other), which clamp is not.
    #[allow(clippy::manual_clamp)]
    fn quant_i8(t: f32) -> i32 {
        let c = t.max(-128.0).min(127.0);
        (c + 12_582_912.0).to_bits() as i32 - 0x4B40_0000
    }

    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    // A float of either sign with exponent field lo..lo+span (from one draw),
    // and an inverse norm as a row of mean square up to 1e4 gives.
    fn draw_f32(a: u64, lo: u32, span: u32) -> f32 {
        f32::from_bits(((a >> 40) as u32 & 0x807F_FFFF) | (((a >> 24) as u32 % span + lo) << 23))
    }
    fn draw_inv(a: u64) -> f64 {
        1.0 / ((a >> 11) as f64 / (1u64 << 53) as f64 * 1e4 + 1e-5).sqrt()
    }

    // kernels/bitnet.cu's inv_split and mul_inv.
    fn mul_inv(x: f32, inv: f64) -> f32 {
        let hi = inv as f32;
        let lo = (inv - f64::from(hi)) as f32;
        let ph = x * hi;
        let pl = x.mul_add(hi, -ph);
        ph + x.mul_add(lo, pl)
    }

    #[test]
    fn conversion_free_quantisation_rounds_as_rint_then_clamp() {
        // What the kernels computed before: clamp(rint(t)), ties to even,
        // NaN to -128 (fmaxf returns the other operand).
        let want = |t: f32| if t.is_nan() { -128 } else { t.round_ties_even().clamp(-128.0, 127.0) as i32 };
        let mut checked = 0;
        // Every half-integer tie of the range and beyond, its four nearest
        // floats on each side, and a fine grid.
        for k in -140..140 {
            let tie = k as f32 + 0.5;
            let mut up = tie;
            let mut down = tie;
            for _ in 0..5 {
                for t in [up, down, -up] {
                    assert_eq!(quant_i8(t), want(t), "t = {t:e}");
                    checked += 1;
                }
                up = f32::from_bits(up.to_bits() + 1);
                down = f32::from_bits(down.to_bits() - 1);
            }
        }
        for i in -300_000..300_000 {
            let t = i as f32 / 1024.0;
            assert_eq!(quant_i8(t), want(t), "t = {t}");
        }
        for t in [0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 127.49, -128.51] {
            assert_eq!(quant_i8(t), want(t), "t = {t:e}");
        }
        assert_eq!(checked, 280 * 5 * 3);
        // Hand-derived ties: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2, 126.5 -> 126.
        assert_eq!([quant_i8(0.5), quant_i8(1.5), quant_i8(-2.5), quant_i8(126.5)], [0, 2, -2, 126]);
    }

    #[test]
    fn f32_normalisation_equals_the_f64_product_away_from_midpoints() {
        // mul_inv(x, inv) against (x as f64 * inv) as f32 (the CPU's form):
        // equal, except where the f64 product lies within about 2^-47 of
        // the midpoint between two floats (then either side is one ulp off).
        let mut next = xorshift(0x9E37_79B9_7F4A_7C15);
        let (mut differ, n) = (0, 1_000_000);
        for _ in 0..n {
            // x over many binades (relu^2-sized too), inv as a norm makes it.
            let x = draw_f32(next(), 90, 80);
            let inv = draw_inv(next());
            let want = (f64::from(x) * inv) as f32;
            let got = mul_inv(x, inv);
            if got != want {
                differ += 1;
                let p = f64::from(x) * inv;
                let mid = (f64::from(got) + f64::from(want)) / 2.0;
                assert!(((p - mid) / p).abs() < 2f64.powi(-46), "x {x:e} inv {inv:e}: {got:e} vs {want:e}");
                assert_eq!(got.to_bits().abs_diff(want.to_bits()), 1);
            }
        }
        assert!(differ * 100_000 <= n, "{differ} of {n} differ");
    }

    #[test]
    fn max_of_the_normalised_row_is_mul_inv_of_max_x_w() {
        // The two-pass norm (NORM_2PASS) takes max |v| as mul_inv(max |x w|,
        // inv) without a pass over v: mul_inv must be odd and monotonic.
        let mut next = xorshift(0x2545_F491_4F6C_DD1D);
        for row in 0..2000 {
            let inv = draw_inv(next());
            let xw: Vec<f32> = (0..64).map(|_| draw_f32(next(), 100, 60)).collect();
            let m = xw.iter().fold(0f32, |m, v| m.max(v.abs()));
            let want = xw.iter().map(|&v| mul_inv(v, inv).abs()).fold(0f32, f32::max);
            assert_eq!(mul_inv(m, inv), want, "row {row}");
            for &v in &xw {
                // Odd, and monotonic across adjacent floats.
                assert_eq!(mul_inv(-v, inv), -mul_inv(v, inv));
                let up = f32::from_bits(v.abs().to_bits() + 1);
                assert!(mul_inv(up, inv) >= mul_inv(v.abs(), inv));
            }
        }
    }
}
