//! The fused decode step: `fused_decode_*` in `kernels/bitnet.cu`, every
//! layer of a decode pass of up to [`FUSED_ROWS`] rows in one persistent,
//! cooperatively launched kernel with grid-wide barriers between its stages
//! (see the kernel's comment). It computes exactly what the per-operation
//! kernels compute for the same rows and attention split count.
//!
//! The layers' weights and caches are described once, in a device array of
//! [`FusedLayers`] whose every pointer was checked against the model's
//! shape when it was built.

use super::ops::{bytes, check_ternary, i32_dim, multiple};
use super::{driver, Arg, CudaError, DevBuf, DevRange, GpuContext, GpuDType, LaunchKind};
use cudarc::driver::sys;

/// Most token rows one fused launch runs (`FUSED_ROWS` in the kernel).
pub const FUSED_ROWS: usize = 2;
/// Threads of one of the kernel's (virtual) CTAs; a launch's CTAs hold one
/// or two of them (see [`GpuContext::set_fused_halves`]).
const FUSED_THREADS: u32 = 256;
/// Bytes of one layer's descriptor (`struct FusedLayer`: 11 pointers, 8 floats).
const LAYER_BYTES: usize = 11 * 8 + 8 * 4;
/// Bytes of the ternary partial sums in shared memory (8 warps x 16 rows x
/// 8 tokens, i32).
const SMEM_RED: usize = 8 * 16 * 8 * 4;

/// `FUSED_ATT_FLOATS` of the kernel: the larger of the scalar attention
/// unit's scratch (32 + 4 x 256 + 3 x 256) and the tensor-core unit's
/// (4 x 4 x (16 + 2 + 128) + 16 x 32 + 4 x 128 + 128).
const FUSED_ATT_FLOATS: usize = {
    let scalar = 32 + 4 * 256 + 3 * 256;
    let mma = 4 * 4 * (16 + 2 + 128) + 16 * 32 + 4 * 128 + 128;
    if scalar > mma {
        scalar
    } else {
        mma
    }
};

/// The kernel for a shape: the cache type, `_scalar` for f16/bf16 caches
/// whose attention does not run on tensor cores (`att_mma` false), `_wide`
/// for head_dim > 128 (never on tensor cores). Each kernel holds one
/// attention stage: both in one kernel cost the 16-bit kernels registers
/// (108 / 164 bytes of spill stores / loads against 64 / 88; ptxas,
/// sm_90). The main kernels (f32, and f16/bf16 on tensor cores, head_dim
/// <= 128) give each norm its own weight buffer, staged during the
/// attention stage (`sep_w`, see [`FusedShape::smem`]); their `_w1` twins,
/// and the other kernels, stage one buffer before each barrier.
fn fused_kernel_name(s: &FusedShape, att_mma: bool, sep_w: bool) -> &'static str {
    match (s.cache, s.head_dim <= 128, att_mma, sep_w && has_sep_w(s, att_mma)) {
        (GpuDType::F32, true, _, true) => "fused_decode_f32",
        (GpuDType::F32, true, _, false) => "fused_decode_f32_w1",
        (GpuDType::F16, true, true, true) => "fused_decode_f16",
        (GpuDType::F16, true, true, false) => "fused_decode_f16_w1",
        (GpuDType::BF16, true, true, true) => "fused_decode_bf16",
        (GpuDType::BF16, true, true, false) => "fused_decode_bf16_w1",
        (GpuDType::F16, true, false, _) => "fused_decode_f16_scalar",
        (GpuDType::BF16, true, false, _) => "fused_decode_bf16_scalar",
        (GpuDType::F32, false, _, _) => "fused_decode_f32_wide",
        (GpuDType::F16, false, _, _) => "fused_decode_f16_wide",
        (GpuDType::BF16, false, _, _) => "fused_decode_bf16_wide",
    }
}

/// Whether the shape's kernel has a variant with a weight buffer per norm.
fn has_sep_w(s: &FusedShape, att_mma: bool) -> bool {
    s.head_dim <= 128 && (s.cache == GpuDType::F32 || att_mma)
}

/// [`GpuContext::fused_halves_for`] with `setting` in effect (0: choose).
pub(crate) fn choose_halves(setting: usize, att_mma: bool, splits: usize) -> (usize, bool) {
    match setting {
        0 => (if att_mma && splits <= 4 { 2 } else { 1 }, false),
        h => (h, true),
    }
}

/// The fused kernels' grid sizes per (kernel, shared memory, threads), and
/// the dynamic shared memory each kernel was last allowed (the attribute
/// only ever grows, so every cached size stays launchable).
#[derive(Debug, Default)]
pub(crate) struct FusedGrids {
    grids: std::collections::HashMap<(&'static str, usize, u32), u32>,
}

/// The dynamic shared memory each fused kernel is allowed, by (GPU, kernel).
/// Process-wide, as the module and so each kernel's attributes are shared
/// by every `GpuContext` of that GPU: a context that set a kernel's limit
/// below what another context's launches use made them fail
/// (CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, backend tests on parallel
/// threads, session 27). The limit only ever rises, under this lock.
fn smem_allowed() -> std::sync::MutexGuard<'static, std::collections::HashMap<(usize, &'static str), usize>> {
    static ALLOWED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<(usize, &'static str), usize>>> =
        std::sync::OnceLock::new();
    ALLOWED.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

/// The model dimensions a [`FusedLayers`] was built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusedShape {
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    /// Rows of the RoPE tables.
    pub max_pos: usize,
    /// Positions of each layer's KV cache.
    pub kv_slots: usize,
    /// Element type of the KV caches.
    pub cache: GpuDType,
}

impl FusedShape {
    /// Why the fused kernel cannot run this shape, if it cannot.
    pub fn check(&self) -> Result<(), CudaError> {
        let (h, nh, nkv, hd) = (self.hidden, self.n_heads, self.n_kv_heads, self.head_dim);
        if self.n_layers == 0 || nh == 0 || nkv == 0 || !nh.is_multiple_of(nkv) || nh * hd != h {
            return Err(CudaError::Shape(format!(
                "fused decode: {nh} heads x head_dim {hd} must equal hidden {h}, with heads a multiple of {nkv} kv heads"
            )));
        }
        if hd > 256 || !hd.is_multiple_of(4) {
            return Err(CudaError::Shape(format!("fused decode: head_dim {hd} must be a multiple of 4 up to 256")));
        }
        multiple("fused decode hidden size", h, 128)?;
        multiple("fused decode intermediate size", self.inter, 128)?;
        Ok(())
    }

    fn qkv_rows(&self) -> usize {
        self.hidden + 2 * self.n_kv_heads * self.head_dim
    }

    /// Shared memory of a launch of `n` rows by CTAs of `halves` virtual
    /// CTAs (the kernel's layout): the partial sums of each half; one region
    /// for the attention units' scratch (two per half, stage C) or the norm
    /// rows (f32) and int8 activations (the other stages); the norm weights;
    /// the rows' scales and sums; the layer descriptors (16-byte aligned);
    /// with `sep_w`, three more norm-weight buffers of `hidden` floats
    /// (16-byte aligned).
    fn smem(&self, n: usize, sep_w: bool, halves: usize) -> usize {
        let w = self.hidden.max(self.inter);
        let region = (halves * 2 * FUSED_ATT_FLOATS * 4).max(5 * n * w).next_multiple_of(16);
        let base =
            (halves * SMEM_RED + region + 4 * w + FUSED_ROWS * 8).next_multiple_of(16) + self.n_layers * LAYER_BYTES;
        if sep_w {
            base.next_multiple_of(16) + 3 * self.hidden * 4
        } else {
            base
        }
    }

    /// Entries of the trace: the start, three per barrier (five per layer),
    /// then four per layer (the norms' ends), then the sub-stage clocks of a
    /// `FUSED_SUBTRACE` kernel build (60 per layer and 4), then the
    /// attention units' entries of a `FUSED_UNITTRACE` build (12 for each of
    /// 128 units per layer).
    fn trace_len(&self) -> usize {
        1 + 19 * self.n_layers + 60 * self.n_layers + 4 + 12 * 128 * self.n_layers
    }
}

/// One layer's device tensors, as the backend holds them.
#[derive(Debug, Clone, Copy)]
pub struct FusedLayer {
    /// q, k and v rows in one I2_S matrix `[hidden + 2 kv_dim, hidden]`.
    pub qkv: DevRange,
    pub o: DevRange,
    pub gate: DevRange,
    pub up: DevRange,
    pub down: DevRange,
    pub attn_norm: DevRange,
    pub attn_sub_norm: DevRange,
    pub ffn_norm: DevRange,
    pub ffn_sub_norm: DevRange,
    pub k_cache: DevRange,
    pub v_cache: DevRange,
    pub qkv_scales: [f32; 3],
    pub o_scale: f32,
    pub gate_scale: f32,
    pub up_scale: f32,
    pub down_scale: f32,
}

/// The device array of layer descriptors the fused kernel reads. The
/// buffers it points into must outlive it (the backend owns both).
#[derive(Debug)]
pub struct FusedLayers {
    buf: DevBuf,
    shape: FusedShape,
    /// Barrier timestamps of the last launch (`BITNET_CUDA_FUSED_TRACE=1`).
    trace: Option<DevBuf>,
}

impl FusedLayers {
    pub fn shape(&self) -> &FusedShape {
        &self.shape
    }

    /// Device bytes this holds (the descriptors and the optional trace).
    pub fn bytes(&self) -> usize {
        self.buf.len() + self.trace.as_ref().map_or(0, DevBuf::len)
    }
}

/// Per stage of a layer (q|k|v, attention, o, gate/up, down), in
/// microseconds: CTA 0's work, its norm's part of it, the slowest CTA's
/// work, the barrier's release after the last arrival.
pub type FusedTrace = [(f64, f64, f64, f64); 5];

/// The per-step device buffers of [`GpuContext::fused_decode`].
#[derive(Debug, Clone, Copy)]
pub struct FusedStep {
    /// The residual stream, f32 `[n, hidden]`: the embeddings in, the last
    /// layer's output out.
    pub x: DevRange,
    /// Positions and cache bases, i32 `[n]` each.
    pub pos: DevRange,
    pub base: DevRange,
    /// RoPE tables, f32 `[max_pos, head_dim / 2]`.
    pub cos: DevRange,
    pub sin: DevRange,
    /// Scratch: f32 `[n, hidden + 2 kv_dim]`, `[n, hidden]`, `[n, inter]`.
    pub qkv: DevRange,
    pub attn: DevRange,
    pub h: DevRange,
    /// Attention parts ([`GpuContext::attention_scratch_bytes`]).
    pub att_scratch: DevRange,
    /// Barrier and attention counters ([`GpuContext::fused_sync_bytes`]);
    /// zeroed by the launch.
    pub sync: DevRange,
    pub flags: DevRange,
}

impl GpuContext {
    /// Uploads the layer descriptors after checking every tensor's size
    /// against `shape`.
    pub fn fused_layers(&self, shape: FusedShape, layers: &[FusedLayer]) -> Result<FusedLayers, CudaError> {
        shape.check()?;
        if layers.len() != shape.n_layers {
            return Err(CudaError::Shape(format!(
                "fused decode: {} layers, shape says {}",
                layers.len(),
                shape.n_layers
            )));
        }
        let (h, inter) = (shape.hidden, shape.inter);
        let kv_dim = shape.n_kv_heads * shape.head_dim;
        let cache_bytes = bytes("KV cache", &[shape.kv_slots, kv_dim, shape.cache.size()])?;
        let mut out = Vec::with_capacity(layers.len() * LAYER_BYTES);
        for l in layers {
            let ptrs = [
                check_ternary(l.qkv, shape.qkv_rows(), h)?,
                check_ternary(l.o, h, h)?,
                check_ternary(l.gate, inter, h)?,
                check_ternary(l.up, inter, h)?,
                check_ternary(l.down, h, inter)?,
                l.attn_norm.need("attention norm", h * 4)?,
                l.attn_sub_norm.need("attention sub-norm", h * 4)?,
                l.ffn_norm.need("FFN norm", h * 4)?,
                l.ffn_sub_norm.need("FFN sub-norm", inter * 4)?,
                l.k_cache.need("key cache", cache_bytes)?,
                l.v_cache.need("value cache", cache_bytes)?,
            ];
            for p in ptrs {
                out.extend_from_slice(&p.to_le_bytes());
            }
            let scales = [
                l.qkv_scales[0],
                l.qkv_scales[1],
                l.qkv_scales[2],
                l.o_scale,
                l.gate_scale,
                l.up_scale,
                l.down_scale,
                0.0,
            ];
            for s in scales {
                out.extend_from_slice(&s.to_le_bytes());
            }
        }
        let trace = match std::env::var("BITNET_CUDA_FUSED_TRACE") {
            Ok(v) if v == "1" => Some(self.alloc("fused decode trace", shape.trace_len() * 8)?),
            _ => None,
        };
        Ok(FusedLayers { buf: self.upload("fused layer descriptors", &out)?, shape, trace })
    }

    /// Bytes of the `sync` buffer of a fused step of `n` rows.
    pub fn fused_sync_bytes(n: usize, n_heads: usize) -> usize {
        (1 + n * n_heads) * 4
    }

    /// CTAs of the fused kernel of `threads` threads for `n` rows: as many
    /// per SM as can be resident (at most 2, or `BITNET_CUDA_FUSED_CTAS`),
    /// on every SM.
    fn fused_grid(&self, name: &'static str, smem: usize, threads: u32) -> Result<u32, CudaError> {
        let mut cache = self.fused_grid.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&g) = cache.grids.get(&(name, smem, threads)) {
            return Ok(g);
        }
        let f = self.function(name)?;
        let smem_i = i32::try_from(smem).map_err(|_| CudaError::Shape("fused decode shared memory".into()))?;
        if smem > 48 * 1024 {
            let mut allowed = smem_allowed();
            let key = (self.ordinal, name);
            if allowed.get(&key).is_none_or(|&a| a < smem) {
                f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_i)
                    .map_err(driver("cuFuncSetAttribute"))?;
                allowed.insert(key, smem);
            }
        }
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
            .map_err(driver("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?;
        let sms = self.sm_count()?;
        let per_sm = per_sm.min(self.fused_ctas_per_sm);
        if per_sm == 0 || sms == 0 {
            return Err(CudaError::Shape(format!("fused decode: no CTA of {smem} bytes of shared memory fits an SM")));
        }
        let g = per_sm * sms as u32;
        cache.grids.insert((name, smem, threads), g);
        Ok(g)
    }

    /// The kernel, its shared memory, grid and CTA size for `n` rows: the
    /// variant with a weight buffer per norm where the shape has one and its
    /// larger shared memory still lets as many CTAs per SM run (on the H200
    /// not so for two rows of 2B-4T in CTAs of one half: 135 KB a CTA).
    fn fused_launch_shape(
        &self,
        s: &FusedShape,
        att_mma: bool,
        n: usize,
        halves: usize,
    ) -> Result<(&'static str, usize, u32, u32), CudaError> {
        let threads = FUSED_THREADS * halves as u32;
        let one = fused_kernel_name(s, att_mma, false);
        let one_smem = s.smem(n, false, halves);
        let one_grid = self.fused_grid(one, one_smem, threads)?;
        if has_sep_w(s, att_mma) && self.fused_sep_w.load(std::sync::atomic::Ordering::Relaxed) {
            let sep = fused_kernel_name(s, att_mma, true);
            let sep_smem = s.smem(n, true, halves);
            if self.fused_grid(sep, sep_smem, threads).is_ok_and(|g| g == one_grid) {
                return Ok((sep, sep_smem, one_grid, threads));
            }
        }
        Ok((one, one_smem, one_grid, threads))
    }

    /// The most rows (up to `want`, at most [`FUSED_ROWS`]) a fused launch
    /// can run on this GPU for this model: its shared memory must fit a CTA
    /// and at least one CTA an SM. 0 when not even one row fits.
    pub fn fused_rows_that_fit(&self, layers: &FusedLayers, want: usize) -> usize {
        let s = &layers.shape;
        let att_mma = self.attention_on_tensor_cores(s.cache, s.head_dim);
        (1..=want.min(FUSED_ROWS))
            .take_while(|&n| self.fused_launch_shape(s, att_mma, n, 1).is_ok())
            .last()
            .unwrap_or(0)
    }

    /// Every layer of a decode pass of `n` rows (`1..=FUSED_ROWS`, each at
    /// position `pos[r] < max_visible`, validated by the caller) in one
    /// launch; x holds the embeddings before and the last layer's output
    /// after. Uses the attention kernel and split count of
    /// [`Self::attention_split_count`], so the results equal the
    /// per-operation kernels'.
    pub fn fused_decode(
        &self,
        layers: &FusedLayers,
        eps: f32,
        n: usize,
        max_visible: usize,
        step: &FusedStep,
    ) -> Result<(), CudaError> {
        let s = &layers.shape;
        if n == 0 || n > FUSED_ROWS {
            return Err(CudaError::Shape(format!("fused decode runs 1..={FUSED_ROWS} rows, not {n}")));
        }
        let (h, hd, nh, nkv, inter) = (s.hidden, s.head_dim, s.n_heads, s.n_kv_heads, s.inter);
        let x = step.x.need("residual stream", bytes("residual", &[n, h, 4])?)?;
        let pos = step.pos.need("positions", n * 4)?;
        let base = step.base.need("cache bases", n * 4)?;
        let cos = step.cos.need("cos table", bytes("rope", &[s.max_pos, hd / 2, 4])?)?;
        let sin = step.sin.need("sin table", bytes("rope", &[s.max_pos, hd / 2, 4])?)?;
        let qkv = step.qkv.need("qkv", bytes("qkv", &[n, s.qkv_rows(), 4])?)?;
        let attn = step.attn.need("attention output", bytes("attention", &[n, h, 4])?)?;
        let hb = step.h.need("FFN activations", bytes("ffn", &[n, inter, 4])?)?;
        let (splits, part, ml) =
            self.attention_parts(s.cache, (nh, s.n_kv_heads, hd), n, max_visible, step.att_scratch)?;
        // Tensor cores only for head_dim 64 or 128, so never in the `_wide`
        // kernels (which have no tensor-core stage).
        let att_mma = self.attention_on_tensor_cores(s.cache, hd);
        let sync = step.sync.sub(0, Self::fused_sync_bytes(n, nh))?;
        let flags = step.flags.need("flags", 4)?;
        let (name, smem, grid, threads) = match self.fused_halves_for(att_mma, splits) {
            // Chosen, not asked for: CTAs of one half wherever two do not fit.
            (2, false) => {
                self.fused_launch_shape(s, att_mma, n, 2).or_else(|_| self.fused_launch_shape(s, att_mma, n, 1))?
            }
            (halves, _) => self.fused_launch_shape(s, att_mma, n, halves)?,
        };
        self.zero(sync)?;
        self.launch_with(
            name,
            (grid, 1, 1),
            (threads, 1, 1),
            smem as u32,
            &[
                Arg::Ptr(layers.buf.all().ptr),
                Arg::I32(i32_dim("layers", s.n_layers)?),
                Arg::Ptr(x),
                Arg::I32(i32_dim("rows", n)?),
                Arg::Ptr(pos),
                Arg::Ptr(base),
                Arg::Ptr(cos),
                Arg::Ptr(sin),
                Arg::Ptr(qkv),
                Arg::Ptr(attn),
                Arg::Ptr(hb),
                Arg::Ptr(part),
                Arg::Ptr(ml),
                Arg::Ptr(sync.ptr),
                Arg::Ptr(flags),
                Arg::I32(i32_dim("heads", nh)?),
                Arg::I32(i32_dim("kv heads", nkv)?),
                Arg::I32(i32_dim("head_dim", hd)?),
                Arg::I32(i32_dim("intermediate", inter)?),
                Arg::F32(eps),
                Arg::I32(i32_dim("splits", splits)?),
                Arg::F32(1.0 / (hd as f32).sqrt()),
                Arg::I32(self.fused_prefetch.load(std::sync::atomic::Ordering::Relaxed)),
                Arg::Ptr(layers.trace.as_ref().map_or(0, |t| t.all().ptr)),
            ],
            LaunchKind::Cooperative,
        )
    }

    /// With `BITNET_CUDA_FUSED_TRACE=1`: per stage of a layer, the means
    /// over the layers of the last launch ([`FusedTrace`]). Waits for the
    /// stream.
    pub fn fused_trace(&self, layers: &FusedLayers) -> Result<Option<FusedTrace>, CudaError> {
        let Some(t) = &layers.trace else { return Ok(None) };
        let mut raw = vec![0u8; t.len()];
        self.read(t.all(), &mut raw)?;
        let entries: Vec<u64> =
            raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        // The raw entries, one per line (docs/perf/tools/fused_subtrace.py).
        if let Ok(path) = std::env::var("BITNET_CUDA_FUSED_TRACE_DUMP") {
            let text: Vec<String> = entries.iter().map(u64::to_string).collect();
            std::fs::write(&path, text.join("\n"))
                .map_err(|e| CudaError::Shape(format!("BITNET_CUDA_FUSED_TRACE_DUMP={path}: {e}")))?;
        }
        let ns: Vec<f64> = entries.iter().map(|&v| v as f64).collect();
        let mut out = [(0.0, 0.0, 0.0, 0.0); 5];
        let n_layers = layers.shape.n_layers;
        for l in 0..n_layers {
            for (st, o) in out.iter_mut().enumerate() {
                let e = 5 * l + st + 1;
                let prev_leave = ns[3 * (e - 1)];
                let (arrive0, last, leave0) = (ns[3 * e - 2], ns[3 * e - 1], ns[3 * e]);
                let norm_end = match st {
                    0 => ns[1 + 15 * n_layers + 4 * l],
                    2..=4 => ns[1 + 15 * n_layers + 4 * l + st - 1],
                    _ => prev_leave,
                };
                let k = n_layers as f64 * 1e3;
                o.0 += (arrive0 - prev_leave) / k;
                o.1 += (norm_end - prev_leave) / k;
                o.2 += (last - prev_leave) / k;
                o.3 += (leave0 - last) / k;
            }
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape_2b4t(cache: GpuDType, head_dim: usize) -> FusedShape {
        FusedShape {
            n_layers: 30,
            hidden: 2560,
            n_heads: 20,
            n_kv_heads: 5,
            head_dim,
            inter: 6912,
            max_pos: 4096,
            kv_slots: 4096,
            cache,
        }
    }

    #[test]
    fn norm_weight_buffers_follow_the_layer_descriptors() {
        // The kernel's layout (fused_decode_impl), 2B-4T: partial sums 4096 B,
        // the region (one row: the larger of two attention scratches of 3488
        // floats, 27904 B, and 5 x 6912 B), the norm weights (6912 floats), the
        // rows' scales and sums (16 B); the 30 descriptors of 120 B at the next
        // 16 B; then the three 2560-float buffers at the next 16 B.
        let s = shape_2b4t(GpuDType::BF16, 128);
        let desc = 4096 + 34560 + 4 * 6912 + 16; // 66320, a multiple of 16
        assert_eq!(s.smem(1, false, 1), desc + 30 * 120);
        assert_eq!(s.smem(1, true, 1), (desc + 30 * 120).next_multiple_of(16) + 3 * 2560 * 4);
        assert_eq!(s.smem(1, true, 1), 100_640);
        // Two rows: a region of 2 x 5 x 6912 B; with the buffers a CTA needs
        // 135200 B, so two no longer fit an H200 SM (228 KB): the _w1 kernel.
        assert_eq!(s.smem(2, false, 1), 4096 + 69120 + 4 * 6912 + 16 + 30 * 120);
        assert_eq!(s.smem(2, true, 1), 135_200);
        // CTAs of two halves: two sets of partial sums, and a region of four
        // attention scratches (55808 B) for one row, 2 x 5 x 6912 B for two.
        assert_eq!(s.smem(1, false, 2), 2 * 4096 + 55808 + 4 * 6912 + 16 + 30 * 120);
        assert_eq!(s.smem(2, true, 2), 4096 + 135_200);
    }

    #[test]
    fn two_halves_only_where_they_measured_faster() {
        // Tensor-core attention in 1-4 splits (BF16/FP16 at short windows).
        for splits in 1..=4 {
            assert_eq!(choose_halves(0, true, splits), (2, false));
        }
        // Longer windows and scalar attention (FP32): one half.
        assert_eq!(choose_halves(0, true, 5), (1, false));
        assert_eq!(choose_halves(0, true, 13), (1, false));
        assert_eq!(choose_halves(0, false, 4), (1, false));
        // A setting is kept, and marked as asked for.
        assert_eq!(choose_halves(1, true, 4), (1, true));
        assert_eq!(choose_halves(2, false, 13), (2, true));
    }

    #[test]
    fn kernels_by_precision_attention_and_weight_buffers() {
        let name = |cache, hd, mma, sep| fused_kernel_name(&shape_2b4t(cache, hd), mma, sep);
        assert_eq!(name(GpuDType::F32, 128, false, true), "fused_decode_f32");
        assert_eq!(name(GpuDType::F32, 128, false, false), "fused_decode_f32_w1");
        assert_eq!(name(GpuDType::BF16, 128, true, true), "fused_decode_bf16");
        assert_eq!(name(GpuDType::BF16, 128, true, false), "fused_decode_bf16_w1");
        assert_eq!(name(GpuDType::F16, 64, true, true), "fused_decode_f16");
        // Scalar attention in f16/bf16 and head_dim > 128: one buffer only.
        assert_eq!(name(GpuDType::BF16, 128, false, true), "fused_decode_bf16_scalar");
        assert_eq!(name(GpuDType::F16, 48, false, true), "fused_decode_f16_scalar");
        assert_eq!(name(GpuDType::F32, 256, false, true), "fused_decode_f32_wide");
        assert_eq!(name(GpuDType::BF16, 256, false, false), "fused_decode_bf16_wide");
        assert!(!has_sep_w(&shape_2b4t(GpuDType::BF16, 128), false));
        assert!(!has_sep_w(&shape_2b4t(GpuDType::F32, 256), false));
        // Every name is a kernel the module loads.
        for cache in [GpuDType::F32, GpuDType::F16, GpuDType::BF16] {
            for (hd, mma, sep) in [(128, true, true), (128, true, false), (128, false, true), (256, false, false)] {
                let n = name(cache, hd, mma, sep);
                assert!(super::super::KERNEL_NAMES.contains(&n), "{n}");
            }
        }
    }
}
