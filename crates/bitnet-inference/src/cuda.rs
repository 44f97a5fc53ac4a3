//! The CUDA backend: the batched forward step of [`crate::CpuBackend`] on an
//! NVIDIA GPU, in FP32, FP16 or BF16.
//!
//! - Weights are uploaded once. Ternary projections keep the I2_S bytes of
//!   the file (q, k and v fused into one matrix per layer); the embedding
//!   (and an untied head) are converted on the device to the step precision.
//! - The KV cache is one preallocated pool of `kv_slots` positions per layer
//!   in the step precision; each sequence reserves a contiguous range of it.
//! - A step uploads one small index array (tokens, positions, cache slots),
//!   runs every kernel on one stream without host synchronisation, and
//!   synchronises only to read back the logits (or, with
//!   [`Backend::step_greedy`], the sampled token ids).
//! - Decode steps (one token per sequence) are captured into a CUDA graph per
//!   batch size after their first run and replayed afterwards.
//!
//! What each precision changes: the embedding and head weights, q and the KV
//! cache are held in the precision, attention reads them in it, and the head
//! runs on tensor cores (f16/bf16: the activation as a hi + lo pair of that
//! type). With head_dim 64 or 128, f16/bf16 attention runs on tensor cores
//! too (q * scale and the probabilities as hi + lo pairs; f32 accumulation;
//! `BITNET_CUDA_ATTENTION=scalar` keeps the scalar kernels). Norms, softmax,
//! relu^2, the residual stream and the attention output are f32, and
//! ternary products are exact int8 x ternary sums in int32.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use bitnet_device::Precision;
use bitnet_kernels::cuda::{CudaError, DevBuf, DevRange, DeviceHooks, GpuContext, GpuDType, GpuGraph, HeadImpl};
use bitnet_kernels::cuda::{FusedLayer, FusedLayers, FusedShape, FusedStep, FUSED_ROWS};
use bitnet_kernels::cuda::{
    SampleRow, TernaryActs, ARGMAX_SPLIT_MAX_ROWS, ATT_PART_ROWS, FLAG_NONFINITE, SAMPLE_MAX_VOCAB,
};
use bitnet_models::{BitNetConfig, BitNetModel, FloatDType, FloatTensor, TernaryMatrix};
use rayon::prelude::*;

use crate::backend::{
    check_wants, validate_prefix_copy, validate_step, Backend, BackendError, BackendInfo, SeqId, StepInput, StepOutput,
    StepWant,
};
use crate::error::InferenceError;
use crate::sampling::SampleDraw;

/// How to build a [`CudaBackend`].
#[derive(Clone)]
pub struct CudaBackendConfig {
    /// CUDA device ordinal.
    pub ordinal: usize,
    pub precision: Precision,
    /// KV-cache positions preallocated for all sequences together.
    pub kv_slots: usize,
    /// Token rows one forward pass runs at most (longer steps are split).
    pub max_step_tokens: usize,
    /// Sequences one forward pass returns logits for at most.
    pub max_step_entries: usize,
    /// Capture decode steps in CUDA graphs.
    pub cuda_graphs: bool,
    /// Run decode passes of up to this many rows (at most [`FUSED_ROWS`];
    /// 0: never) as one persistent kernel, with the same results as the
    /// per-operation kernels. Default 1: on the H200 it makes batch-1 decode
    /// 1.5x faster and gains nothing at 2 rows (docs/perf/gpu.md). The
    /// environment variable `BITNET_CUDA_FUSED_ROWS` overrides it.
    pub fused_max_rows: usize,
    /// Fault-injection hooks consulted before each allocation and launch.
    pub hooks: Option<Arc<dyn DeviceHooks>>,
}

impl fmt::Debug for CudaBackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBackendConfig")
            .field("ordinal", &self.ordinal)
            .field("precision", &self.precision)
            .field("kv_slots", &self.kv_slots)
            .field("max_step_tokens", &self.max_step_tokens)
            .field("max_step_entries", &self.max_step_entries)
            .field("cuda_graphs", &self.cuda_graphs)
            .field("fused_max_rows", &self.fused_max_rows)
            .field("hooks", &self.hooks.is_some())
            .finish()
    }
}

impl Default for CudaBackendConfig {
    fn default() -> Self {
        Self {
            ordinal: 0,
            precision: Precision::Bf16,
            kv_slots: 16 * 4096,
            max_step_tokens: 512,
            max_step_entries: 256,
            cuda_graphs: true,
            fused_max_rows: 1,
            hooks: None,
        }
    }
}

/// Bytes of device memory by purpose, as allocated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CudaMemory {
    pub weights: usize,
    pub kv_cache: usize,
    pub workspace: usize,
}

impl CudaMemory {
    pub fn total(&self) -> usize {
        self.weights + self.kv_cache + self.workspace
    }
}

fn dtype(p: Precision) -> GpuDType {
    match p {
        Precision::Fp32 => GpuDType::F32,
        Precision::Fp16 => GpuDType::F16,
        Precision::Bf16 => GpuDType::BF16,
    }
}

fn file_dtype(d: FloatDType) -> GpuDType {
    match d {
        FloatDType::F32 => GpuDType::F32,
        FloatDType::F16 => GpuDType::F16,
        FloatDType::BF16 => GpuDType::BF16,
    }
}

fn cuda_error(err: CudaError) -> BackendError {
    match err {
        CudaError::OutOfMemory { .. } => BackendError::OutOfMemory(err.to_string()),
        other => BackendError::Device(format!("CUDA: {other}")),
    }
}

struct Layer {
    qkv: DevBuf,
    qkv_scales: [f32; 3],
    o: DevBuf,
    o_scale: f32,
    gate: DevBuf,
    gate_scale: f32,
    up: DevBuf,
    up_scale: f32,
    down: DevBuf,
    down_scale: f32,
    attn_norm: DevBuf,
    attn_sub_norm: DevBuf,
    ffn_norm: DevBuf,
    ffn_sub_norm: DevBuf,
    k_cache: DevBuf,
    v_cache: DevBuf,
}

/// Per-step scratch, sized for `rows` token rows and `entries` logits rows.
struct Workspace {
    rows: usize,
    entries: usize,
    /// tokens | positions | cache bases | last rows (i32 each).
    inputs: DevBuf,
    x: DevBuf,
    q8: DevBuf,
    scale: DevBuf,
    qsum: DevBuf,
    qkv: DevBuf,
    q: DevBuf,
    attn: DevBuf,
    attn_scratch: DevBuf,
    h: DevBuf,
    head_in: DevBuf,
    head_scratch: DevBuf,
    logits: DevBuf,
    /// The flags word (i32: FLAG_NONFINITE), then the sampled tokens
    /// (`entries` i32): a greedy step reads both back in one copy.
    flags_tokens: DevBuf,
    /// The argmax's partial maxima and row counters.
    argmax_scratch: DevBuf,
    /// The draws of the rows sampled on the device and their scratch
    /// (`sample_rows`).
    sample_workspace: DevBuf,
    /// The fused decode kernel's barrier and attention counters.
    sync: DevBuf,
}

#[derive(Debug, Clone, Copy)]
struct Sequence {
    base: usize,
    reserved: usize,
    len: usize,
}

/// First-fit allocator of contiguous KV-cache ranges.
#[derive(Debug)]
struct SlotPool {
    /// start -> length of each free range, coalesced.
    free: BTreeMap<usize, usize>,
}

impl SlotPool {
    fn new(slots: usize) -> Self {
        let mut free = BTreeMap::new();
        if slots > 0 {
            free.insert(0, slots);
        }
        Self { free }
    }

    fn take(&mut self, len: usize) -> Option<usize> {
        let (&start, &size) = self.free.iter().find(|(_, &size)| size >= len)?;
        self.free.remove(&start);
        if size > len {
            self.free.insert(start + len, size - len);
        }
        Some(start)
    }

    fn give(&mut self, start: usize, len: usize) {
        let mut start = start;
        let mut len = len;
        if let Some((&next_start, &next_len)) = self.free.range(start + len..).next() {
            if next_start == start + len {
                self.free.remove(&next_start);
                len += next_len;
            }
        }
        if let Some((&prev_start, &prev_len)) = self.free.range(..start).next_back() {
            if prev_start + prev_len == start {
                self.free.remove(&prev_start);
                start = prev_start;
                len += prev_len;
            }
        }
        self.free.insert(start, len);
    }

    fn largest(&self) -> usize {
        self.free.values().copied().max().unwrap_or(0)
    }
}

/// One forward pass: rows of tokens, and the entries that want logits.
struct Group {
    tokens: Vec<i32>,
    pos: Vec<i32>,
    base: Vec<i32>,
    /// (index of the batch entry, row of its last token in this group).
    outputs: Vec<(usize, usize)>,
    /// Entries whose length grows by this group, and by how much.
    advances: Vec<(SeqId, usize)>,
    decode_only: bool,
}

/// The CUDA backend. See the module documentation.
pub struct CudaBackend {
    model: Arc<BitNetModel>,
    gpu: GpuContext,
    precision: Precision,
    dt: GpuDType,
    layers: Vec<Layer>,
    embedding: DevBuf,
    /// The untied output matrix, if the model has one.
    output: Option<DevBuf>,
    output_norm: DevBuf,
    rope_cos: DevBuf,
    rope_sin: DevBuf,
    ws: Workspace,
    kv_slots: usize,
    pool: SlotPool,
    sequences: HashMap<SeqId, Sequence>,
    /// Decode graphs by (rows, attention window bucket, greedy: the argmax
    /// captured too).
    graphs: HashMap<(usize, usize, bool), GpuGraph>,
    use_graphs: bool,
    /// Graph captures the driver invalidated (see [`Self::captures_broken`]).
    captures_broken: usize,
    /// The greedy argmax splits each row over CTAs (`argmax_split`; session
    /// 23); `BITNET_CUDA_ARGMAX=rows` keeps one CTA a row (`argmax_rows`).
    argmax_split: bool,
    /// Sampled entries of `step_select` drawn on the device (`sample_rows`)
    /// where their settings allow; `BITNET_CUDA_SAMPLE=host` reads their
    /// logits back and draws on the host instead.
    device_sampling: bool,
    /// The layer descriptors of the fused decode kernel, when it is on.
    fused: Option<FusedLayers>,
    /// Decode passes of up to this many rows use it.
    fused_rows: usize,
    memory: CudaMemory,
    max_context: usize,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBackend")
            .field("gpu", &self.gpu)
            .field("precision", &self.precision)
            .field("kv_slots", &self.kv_slots)
            .field("sequences", &self.sequences.len())
            .field("memory", &self.memory)
            .finish()
    }
}

fn upload_ternary(gpu: &GpuContext, what: &str, parts: &[&TernaryMatrix]) -> Result<DevBuf, CudaError> {
    let total: usize = parts.iter().map(|m| m.codes().len()).sum();
    let mut bytes = Vec::with_capacity(total);
    for m in parts {
        bytes.extend_from_slice(m.codes());
    }
    gpu.upload(what, &bytes)
}

fn upload_f32(gpu: &GpuContext, what: &str, values: &[f32]) -> Result<DevBuf, CudaError> {
    gpu.upload(what, bytemuck_f32(values))
}

fn bytemuck_f32(values: &[f32]) -> &[u8] {
    bytemuck::cast_slice(values)
}

/// Uploads a float matrix and converts it on the device to `dt`.
fn upload_float(gpu: &GpuContext, what: &str, t: &FloatTensor, dt: GpuDType) -> Result<DevBuf, CudaError> {
    let from = file_dtype(t.dtype());
    let n = t.rows() * t.cols();
    if from == dt {
        return gpu.upload(what, t.bytes().as_slice());
    }
    let staging = gpu.upload("staging", t.bytes().as_slice())?;
    let out = gpu.alloc(what, n * dt.size())?;
    gpu.convert(from, dt, staging.all(), out.all(), n)?;
    gpu.synchronize()?;
    Ok(out)
}

/// The shapes the kernels support, checked before the GPU is touched so an
/// unsupported model is a clear error rather than a failed launch mid-step.
fn check_supported(model: &BitNetModel) -> Result<(), String> {
    let c = &model.config;
    if c.hidden_size % 16 != 0 {
        return Err(format!("hidden size {} is not a multiple of 16 (the tensor-core head)", c.hidden_size));
    }
    if c.head_dim == 0 || c.head_dim % 4 != 0 || c.head_dim > 256 {
        return Err(format!("head_dim {} must be a multiple of 4 up to 256 (the attention kernel)", c.head_dim));
    }
    if c.n_kv_heads == 0 || c.n_heads % c.n_kv_heads != 0 {
        return Err(format!("{} heads are not a multiple of {} kv heads", c.n_heads, c.n_kv_heads));
    }
    for (i, layer) in model.layers.iter().enumerate() {
        for m in layer.projections() {
            if m.in_features() % 128 != 0 {
                return Err(format!(
                    "layer {i} {}: input width {} is not a multiple of 128",
                    m.name(),
                    m.in_features()
                ));
            }
        }
    }
    Ok(())
}

impl CudaBackend {
    /// Opens the GPU, uploads the model and allocates the KV pool and the
    /// workspace. Fails with `OutOfMemory` when they do not fit.
    pub fn new(model: Arc<BitNetModel>, config: &CudaBackendConfig) -> Result<Self, BackendError> {
        let c = &model.config;
        if config.max_step_tokens == 0 || config.max_step_entries == 0 {
            return Err(BackendError::Device("max_step_tokens and max_step_entries must be positive".into()));
        }
        check_supported(&model)
            .map_err(|why| BackendError::Device(format!("the CUDA kernels cannot run this model: {why}")))?;
        let gpu = GpuContext::open(config.ordinal, config.hooks.clone()).map_err(cuda_error)?;
        let dt = dtype(config.precision);
        let (h, kv_dim, inter, vocab) = (c.hidden_size, c.kv_dim(), c.intermediate_size, c.vocab_size);
        let e = dt.size();
        let mut memory = CudaMemory::default();

        let mut layers = Vec::with_capacity(c.n_layers);
        for (i, l) in model.layers.iter().enumerate() {
            let qkv = upload_ternary(&gpu, &format!("layer {i} qkv"), &[&l.attn_q, &l.attn_k, &l.attn_v])
                .map_err(cuda_error)?;
            let o = upload_ternary(&gpu, &format!("layer {i} attn_output"), &[&l.attn_output]).map_err(cuda_error)?;
            let gate = upload_ternary(&gpu, &format!("layer {i} ffn_gate"), &[&l.ffn_gate]).map_err(cuda_error)?;
            let up = upload_ternary(&gpu, &format!("layer {i} ffn_up"), &[&l.ffn_up]).map_err(cuda_error)?;
            let down = upload_ternary(&gpu, &format!("layer {i} ffn_down"), &[&l.ffn_down]).map_err(cuda_error)?;
            let norms = [&l.attn_norm, &l.attn_sub_norm, &l.ffn_norm, &l.ffn_sub_norm]
                .map(|n| upload_f32(&gpu, &format!("layer {i} norm"), n));
            let [attn_norm, attn_sub_norm, ffn_norm, ffn_sub_norm] = norms;
            let k_cache =
                gpu.alloc(&format!("layer {i} key cache"), config.kv_slots * kv_dim * e).map_err(cuda_error)?;
            let v_cache =
                gpu.alloc(&format!("layer {i} value cache"), config.kv_slots * kv_dim * e).map_err(cuda_error)?;
            let layer = Layer {
                qkv,
                qkv_scales: [l.attn_q.scale(), l.attn_k.scale(), l.attn_v.scale()],
                o,
                o_scale: l.attn_output.scale(),
                gate,
                gate_scale: l.ffn_gate.scale(),
                up,
                up_scale: l.ffn_up.scale(),
                down,
                down_scale: l.ffn_down.scale(),
                attn_norm: attn_norm.map_err(cuda_error)?,
                attn_sub_norm: attn_sub_norm.map_err(cuda_error)?,
                ffn_norm: ffn_norm.map_err(cuda_error)?,
                ffn_sub_norm: ffn_sub_norm.map_err(cuda_error)?,
                k_cache,
                v_cache,
            };
            memory.weights +=
                [&layer.qkv, &layer.o, &layer.gate, &layer.up, &layer.down].iter().map(|b| b.len()).sum::<usize>()
                    + [&layer.attn_norm, &layer.attn_sub_norm, &layer.ffn_norm, &layer.ffn_sub_norm]
                        .iter()
                        .map(|b| b.len())
                        .sum::<usize>();
            memory.kv_cache += layer.k_cache.len() + layer.v_cache.len();
            layers.push(layer);
        }
        let embedding = upload_float(&gpu, "embedding", &model.embedding, dt).map_err(cuda_error)?;
        memory.weights += embedding.len();
        let output = match &model.output {
            Some(t) => {
                let buf = upload_float(&gpu, "output head", t, dt).map_err(cuda_error)?;
                memory.weights += buf.len();
                Some(buf)
            }
            None => None,
        };
        let output_norm = upload_f32(&gpu, "output norm", &model.output_norm).map_err(cuda_error)?;
        memory.weights += output_norm.len();

        let (cos, sin) = crate::ops::rope_tables_f32(c.rope_theta, c.head_dim, c.max_position_embeddings);
        let rope_cos = upload_f32(&gpu, "rope cos", &cos).map_err(cuda_error)?;
        let rope_sin = upload_f32(&gpu, "rope sin", &sin).map_err(cuda_error)?;
        memory.workspace += rope_cos.len() + rope_sin.len();

        let rows = config.max_step_tokens;
        let entries = config.max_step_entries.min(rows);
        let alloc = |what: &str, bytes: usize| gpu.alloc(what, bytes).map_err(cuda_error);
        let ws = Workspace {
            rows,
            entries,
            inputs: alloc("step inputs", 4 * rows * 4)?,
            x: alloc("residual stream", rows * h * 4)?,
            q8: alloc("int8 activations", rows * h.max(inter))?,
            scale: alloc("activation scales", rows * 4)?,
            qsum: alloc("activation sums", rows * 4)?,
            qkv: alloc("qkv", rows * (h + 2 * kv_dim) * 4)?,
            q: alloc("q", rows * h * 4)?,
            attn: alloc("attention output", rows * h * 4)?,
            // rows x splits never exceeds max(ATT_PART_ROWS, rows).
            attn_scratch: alloc("attention scratch", ATT_PART_ROWS.max(rows) * c.n_heads * (c.head_dim + 2) * 4)?,
            h: alloc("ffn activations", rows * inter * 4)?,
            head_in: alloc("head input", gpu.head_input_bytes(dt, entries, h))?,
            head_scratch: alloc("head scratch", gpu.head_scratch_bytes(dt, vocab))?,
            logits: alloc("logits", gpu.head_logits_bytes(dt, entries, vocab))?,
            flags_tokens: alloc("flags and sampled tokens", 4 + entries * 4)?,
            argmax_scratch: alloc(
                "argmax partials",
                GpuContext::argmax_scratch_bytes(entries.min(ARGMAX_SPLIT_MAX_ROWS), vocab),
            )?,
            sync: alloc("fused decode counters", GpuContext::fused_sync_bytes(FUSED_ROWS, c.n_heads))?,
            sample_workspace: alloc("sampling workspace", GpuContext::sample_workspace_bytes(entries, vocab))?,
        };
        memory.workspace += [
            &ws.inputs,
            &ws.x,
            &ws.q8,
            &ws.scale,
            &ws.qsum,
            &ws.qkv,
            &ws.q,
            &ws.attn,
            &ws.attn_scratch,
            &ws.h,
            &ws.head_in,
            &ws.head_scratch,
            &ws.logits,
            &ws.flags_tokens,
            &ws.argmax_scratch,
            &ws.sync,
            &ws.sample_workspace,
        ]
        .iter()
        .map(|b| b.len())
        .sum::<usize>();
        // One head call now (on the zeroed input): cuBLAS loads its kernels
        // at the first call, which should not land on a request or in a
        // graph capture. Should cuBLAS fail here, the head moves to our
        // kernels (the buffers above are large enough for both).
        let head = output.as_ref().unwrap_or(&embedding);
        let warm = |gpu: &GpuContext| -> Result<(), CudaError> {
            gpu.head(dt, head.all(), vocab, h, ws.head_in.all(), 1, ws.logits.all(), ws.head_scratch.all())?;
            gpu.synchronize()
        };
        if let Err(err) = warm(&gpu) {
            if gpu.head_impl() != HeadImpl::Cublas {
                return Err(cuda_error(err));
            }
            gpu.set_head_impl(HeadImpl::Kernels);
            gpu.set_cublas_note(format!("cuBLAS failed its first call: {err}"));
            warm(&gpu).map_err(cuda_error)?;
        }
        // Steps of a few entries on cuBLAS calls of a few entries, where
        // that gives every entry the bits of the whole-chunk calls (checked
        // on these weights; see verify_head_small_chunk), so an entry's
        // logits still do not depend on its batch.
        if gpu.head_impl() == HeadImpl::Cublas {
            gpu.verify_head_small_chunk(dt, head.all(), vocab, h, ws.head_scratch.all()).map_err(cuda_error)?;
        }

        // The fused decode kernel, for the shapes it supports.
        let fused_rows = std::env::var("BITNET_CUDA_FUSED_ROWS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(config.fused_max_rows)
            .min(FUSED_ROWS);
        let fused_shape = FusedShape {
            n_layers: c.n_layers,
            hidden: h,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            inter,
            max_pos: c.max_position_embeddings,
            kv_slots: config.kv_slots,
            cache: dt,
        };
        let fused = if fused_rows > 0 && fused_shape.check().is_ok() {
            let descs: Vec<FusedLayer> = layers
                .iter()
                .map(|l| FusedLayer {
                    qkv: l.qkv.all(),
                    o: l.o.all(),
                    gate: l.gate.all(),
                    up: l.up.all(),
                    down: l.down.all(),
                    attn_norm: l.attn_norm.all(),
                    attn_sub_norm: l.attn_sub_norm.all(),
                    ffn_norm: l.ffn_norm.all(),
                    ffn_sub_norm: l.ffn_sub_norm.all(),
                    k_cache: l.k_cache.all(),
                    v_cache: l.v_cache.all(),
                    qkv_scales: l.qkv_scales,
                    o_scale: l.o_scale,
                    gate_scale: l.gate_scale,
                    up_scale: l.up_scale,
                    down_scale: l.down_scale,
                })
                .collect();
            let f = gpu.fused_layers(fused_shape, &descs).map_err(cuda_error)?;
            memory.workspace += f.bytes();
            Some(f)
        } else {
            None
        };
        // As many rows as the GPU can run fused for this model (shared memory).
        let fused_rows = fused.as_ref().map_or(0, |f| gpu.fused_rows_that_fit(f, fused_rows));
        let fused = fused.filter(|_| fused_rows > 0);

        let max_context = c.max_position_embeddings;
        gpu.notify_ready();
        Ok(Self {
            precision: config.precision,
            dt,
            layers,
            embedding,
            output,
            output_norm,
            rope_cos,
            rope_sin,
            ws,
            kv_slots: config.kv_slots,
            pool: SlotPool::new(config.kv_slots),
            sequences: HashMap::new(),
            graphs: HashMap::new(),
            use_graphs: config.cuda_graphs,
            captures_broken: 0,
            argmax_split: std::env::var("BITNET_CUDA_ARGMAX").map_or(true, |v| v != "rows"),
            device_sampling: std::env::var("BITNET_CUDA_SAMPLE").map_or(true, |v| v != "host"),
            fused,
            fused_rows,
            memory,
            max_context,
            gpu,
            model,
        })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Decode-graph captures the driver invalidated because another thread
    /// synchronised the device while they ran; each cost only its graph
    /// (that step ran eagerly, and the next step of its shape captures
    /// again), never a failed step.
    pub fn captures_broken(&self) -> usize {
        self.captures_broken
    }

    /// Device memory this backend allocated, by purpose.
    pub fn memory(&self) -> CudaMemory {
        self.memory
    }

    /// The GPU: name, compute capability, where the PTX came from.
    pub fn gpu(&self) -> &GpuContext {
        &self.gpu
    }

    /// Runs `batch` once without graphs, timing every kernel; returns per
    /// kernel name (total ms, launches). The step really runs (sequences advance).
    pub fn profile_step(&mut self, batch: &[StepInput<'_>]) -> Result<Vec<(&'static str, f64, usize)>, BackendError> {
        let graphs = self.use_graphs;
        self.use_graphs = false;
        self.gpu.set_profiling(true);
        let result = self.step_greedy(batch);
        self.use_graphs = graphs;
        let profile = self.gpu.take_profile().map_err(cuda_error);
        self.gpu.set_profiling(false);
        result?;
        profile
    }

    /// The fused decode kernel's stage timings of its last launch, when
    /// `BITNET_CUDA_FUSED_TRACE=1` (see [`GpuContext::fused_trace`]).
    pub fn fused_trace(&self) -> Result<Option<bitnet_kernels::cuda::FusedTrace>, BackendError> {
        match &self.fused {
            Some(f) => self.gpu.fused_trace(f).map_err(cuda_error),
            None => Ok(None),
        }
    }

    /// Splits a validated batch into forward passes that fit the workspace.
    fn plan(&self, batch: &[StepInput<'_>]) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::new();
        let mut current = Group::empty();
        for (e, input) in batch.iter().enumerate() {
            let seq = self.sequences[&input.seq];
            let mut start = 0;
            while start < input.tokens.len() {
                let room_rows = self.ws.rows - current.tokens.len();
                let room_entries = self.ws.entries - current.outputs.len();
                if room_rows == 0 || room_entries == 0 {
                    groups.push(std::mem::replace(&mut current, Group::empty()));
                    continue;
                }
                let take = (input.tokens.len() - start).min(room_rows);
                for (i, &t) in input.tokens[start..start + take].iter().enumerate() {
                    current.tokens.push(t as i32);
                    current.pos.push((seq.len + start + i) as i32);
                    current.base.push(seq.base as i32);
                }
                current.advances.push((input.seq, take));
                start += take;
                if start == input.tokens.len() {
                    current.outputs.push((e, current.tokens.len() - 1));
                } else {
                    // The rest of this entry's tokens go to the next pass,
                    // which must see these positions in the cache.
                    groups.push(std::mem::replace(&mut current, Group::empty()));
                }
            }
        }
        if !current.tokens.is_empty() {
            groups.push(current);
        }
        for g in &mut groups {
            g.decode_only = g.tokens.len() == g.outputs.len() && g.advances.iter().all(|&(_, n)| n == 1);
        }
        groups
    }

    /// Runs the forward pass of one group up to the logits of its outputs.
    /// `greedy`: the pass ends with the argmax of each output row's logits
    /// into the flags-and-tokens buffer (in the step's graph).
    fn forward(&mut self, group: &Group, greedy: bool) -> Result<(), CudaError> {
        let n = group.tokens.len();
        let n_out = group.outputs.len();
        // Inputs: tokens | positions | cache bases | output rows.
        let mut inputs: Vec<i32> = Vec::with_capacity(4 * self.ws.rows);
        inputs.extend(&group.tokens);
        inputs.resize(self.ws.rows, 0);
        inputs.extend(&group.pos);
        inputs.resize(2 * self.ws.rows, 0);
        inputs.extend(&group.base);
        inputs.resize(3 * self.ws.rows, 0);
        inputs.extend(group.outputs.iter().map(|&(_, row)| row as i32));
        inputs.resize(4 * self.ws.rows, 0);
        self.gpu.write(self.ws.inputs.all(), bytemuck::cast_slice(&inputs))?;

        // The attention window, rounded up to a power of two: the kernels'
        // position splits depend on it, and graphs are kept per bucket.
        let furthest = group.pos.iter().copied().max().unwrap_or(0) as usize + 1;
        let window = furthest.next_power_of_two().clamp(32, self.max_context.max(32));
        let fused = group.decode_only && n <= self.fused_rows && self.fused.is_some();
        if self.use_graphs && group.decode_only {
            if let Some(graph) = self.graphs.get(&(n, window, greedy)) {
                return self.gpu.launch_graph(graph);
            }
            // First run of this shape: run eagerly (warms up and checks
            // every launch), then capture for the next time.
            self.launch_forward(n, n_out, window, fused, true, greedy)?;
            let capturing = self.gpu.begin_capture()?;
            let captured = self.launch_forward(n, n_out, window, fused, true, greedy);
            match (captured, self.gpu.end_capture(capturing)) {
                (Ok(()), Ok(graph)) => {
                    self.graphs.insert((n, window, greedy), graph);
                }
                // The driver invalidated the capture: another thread
                // synchronised the device meanwhile (a cuCtxSynchronize, a
                // synchronous copy or free on another context user). The
                // eager run above already produced this step's results and
                // a capture records without running, so only the graph is
                // lost: the next step of this shape tries again.
                (_, Err(CudaError::CaptureBroken { .. })) | (Err(CudaError::CaptureBroken { .. }), Ok(_)) => {
                    self.captures_broken += 1;
                }
                (Err(e), _) | (Ok(()), Err(e)) => return Err(e),
            }
            return Ok(());
        }
        self.launch_forward(n, n_out, window, fused, group.decode_only, greedy)
    }

    /// Enqueues every kernel of a forward pass over `n` rows (inputs already
    /// on the device; positions below `window`) and the head for `n_out`
    /// output rows; `fused`: the layers as one fused decode kernel;
    /// `decode_only`: every row is the next position of its own sequence;
    /// `greedy`: then the argmax of each output row (see [`Self::forward`]).
    fn launch_forward(
        &self,
        n: usize,
        n_out: usize,
        window: usize,
        fused: bool,
        decode_only: bool,
        greedy: bool,
    ) -> Result<(), CudaError> {
        let c = &self.model.config;
        let (h, kv_dim, inter, vocab) = (c.hidden_size, c.kv_dim(), c.intermediate_size, c.vocab_size);
        let (dt, gpu, ws) = (self.dt, &self.gpu, &self.ws);
        let heads = (c.n_heads, c.n_kv_heads, c.head_dim);
        let rows = ws.rows;
        let tokens = ws.inputs.range(0, rows * 4)?;
        let pos = ws.inputs.range(rows * 4, rows * 4)?;
        let base = ws.inputs.range(2 * rows * 4, rows * 4)?;
        let out_rows = ws.inputs.range(3 * rows * 4, rows * 4)?;
        let flags = ws.flags()?;
        let acts = TernaryActs { q: ws.q8.all(), scale: ws.scale.all(), qsum: ws.qsum.all(), n_tok: n };
        let eps = c.rms_norm_eps;
        let qkv_rows = h + 2 * kv_dim;
        gpu.zero(flags)?;
        gpu.embed(dt, self.embedding.all(), vocab, h, tokens, n, ws.x.all())?;
        let fused_layers = if fused { self.fused.as_ref() } else { None };
        if let Some(f) = fused_layers {
            let step = FusedStep {
                x: ws.x.all(),
                pos,
                base,
                cos: self.rope_cos.all(),
                sin: self.rope_sin.all(),
                qkv: ws.qkv.all(),
                attn: ws.attn.all(),
                h: ws.h.all(),
                att_scratch: ws.attn_scratch.all(),
                sync: ws.sync.all(),
                flags,
            };
            gpu.fused_decode(f, eps, n, window, &step)?;
        }
        // Decode rows (each its own sequence's next position) on tensor-core
        // attention skip the separate rope_kv launch.
        let rope_in_attention = decode_only && gpu.decode_rope_in_attention(dt, c.head_dim);
        for layer in self.layers.iter().filter(|_| fused_layers.is_none()) {
            // Attention block.
            gpu.rmsnorm_quant(ws.x.all(), layer.attn_norm.all(), eps, n, h, &acts, flags)?;
            gpu.ternary_store(
                layer.qkv.all(),
                qkv_rows,
                h,
                layer.qkv_scales,
                [h, h + kv_dim],
                &acts,
                ws.qkv.all(),
                qkv_rows,
            )?;
            if rope_in_attention {
                gpu.attention_decode_rope(
                    dt,
                    ws.qkv.all(),
                    (self.rope_cos.all(), self.rope_sin.all(), c.max_position_embeddings),
                    pos,
                    base,
                    n,
                    window,
                    (layer.k_cache.all(), layer.v_cache.all(), self.kv_slots),
                    ws.attn.all(),
                    heads,
                    ws.attn_scratch.all(),
                    flags,
                )?;
            } else {
                gpu.rope_kv(
                    dt,
                    ws.qkv.all(),
                    self.rope_cos.all(),
                    self.rope_sin.all(),
                    c.max_position_embeddings,
                    pos,
                    base,
                    n,
                    ws.q.all(),
                    layer.k_cache.all(),
                    layer.v_cache.all(),
                    self.kv_slots,
                    heads,
                )?;
                gpu.attention(
                    dt,
                    ws.q.all(),
                    layer.k_cache.all(),
                    layer.v_cache.all(),
                    self.kv_slots,
                    pos,
                    base,
                    n,
                    window,
                    ws.attn.all(),
                    heads,
                    ws.attn_scratch.all(),
                    flags,
                )?;
            }
            gpu.rmsnorm_quant(ws.attn.all(), layer.attn_sub_norm.all(), eps, n, h, &acts, flags)?;
            gpu.ternary_add(layer.o.all(), h, h, layer.o_scale, &acts, ws.x.all(), h)?;
            // Feed-forward block: relu^2 * up and its sub-norm in f32.
            gpu.rmsnorm_quant(ws.x.all(), layer.ffn_norm.all(), eps, n, h, &acts, flags)?;
            gpu.ternary_gate_up(
                layer.gate.all(),
                layer.up.all(),
                inter,
                h,
                [layer.gate_scale, layer.up_scale],
                &acts,
                ws.h.all(),
                inter,
            )?;
            gpu.rmsnorm_quant(ws.h.all(), layer.ffn_sub_norm.all(), eps, n, inter, &acts, flags)?;
            gpu.ternary_add(layer.down.all(), h, inter, layer.down_scale, &acts, ws.x.all(), h)?;
        }
        gpu.final_norm(dt, ws.x.all(), n, out_rows, n_out, self.output_norm.all(), eps, h, ws.head_in.all())?;
        let head = self.output.as_ref().unwrap_or(&self.embedding);
        gpu.head(dt, head.all(), vocab, h, ws.head_in.all(), n_out, ws.logits.all(), ws.head_scratch.all())?;
        if greedy {
            gpu.argmax(
                ws.logits.all(),
                vocab,
                n_out,
                ws.flags_tokens.range(4, n_out * 4)?,
                ws.flags()?,
                self.argmax_split.then(|| ws.argmax_scratch.all()),
            )?;
        }
        Ok(())
    }

    fn read_flags(&self) -> Result<(), CudaError> {
        let mut flags = [0u8; 4];
        self.gpu.read(self.ws.flags()?, &mut flags)?;
        check_flags(flags)
    }

    /// Runs a validated batch; `sink` receives each group's outputs while
    /// they are on the device. On error every length is restored.
    fn run(
        &mut self,
        batch: &[StepInput<'_>],
        greedy: bool,
        mut sink: impl FnMut(&Self, &Group) -> Result<(), CudaError>,
    ) -> Result<(), BackendError> {
        validate_step(batch, &self.model.config, |seq| self.sequences.get(&seq).map(|s| (s.len, s.reserved)))?;
        self.gpu.notify_step();
        let lens: Vec<(SeqId, usize)> = batch.iter().map(|i| (i.seq, self.sequences[&i.seq].len)).collect();
        let groups = self.plan(batch);
        let result = (|| -> Result<(), CudaError> {
            for group in &groups {
                self.forward(group, greedy)?;
                sink(self, group)?;
                for &(seq, n) in &group.advances {
                    if let Some(s) = self.sequences.get_mut(&seq) {
                        s.len += n;
                    }
                }
            }
            Ok(())
        })();
        if let Err(err) = result {
            for (seq, len) in lens {
                if let Some(s) = self.sequences.get_mut(&seq) {
                    s.len = len;
                }
            }
            // A failed capture or launch can leave a graph in a bad state.
            self.graphs.clear();
            return Err(cuda_error(err));
        }
        Ok(())
    }
}

/// A draw as the device kernel takes it.
fn sample_row(draw: &SampleDraw) -> SampleRow {
    SampleRow { temperature: draw.temperature, top_k: draw.top_k, top_p: draw.top_p, u: draw.u }
}

impl Workspace {
    /// The flags word kernels raise FLAG_NONFINITE in.
    fn flags(&self) -> Result<DevRange, CudaError> {
        self.flags_tokens.range(0, 4)
    }
}

/// The flags word read back from the device: an error if a kernel found
/// non-finite activations.
fn check_flags(flags: [u8; 4]) -> Result<(), CudaError> {
    if i32::from_le_bytes(flags) & FLAG_NONFINITE != 0 {
        return Err(CudaError::Shape("a kernel produced NaN or infinity (non-finite activations)".into()));
    }
    Ok(())
}

impl Group {
    fn empty() -> Self {
        Self {
            tokens: Vec::new(),
            pos: Vec::new(),
            base: Vec::new(),
            outputs: Vec::new(),
            advances: Vec::new(),
            decode_only: false,
        }
    }
}

impl Backend for CudaBackend {
    fn info(&self) -> BackendInfo {
        let (major, minor) = self.gpu.compute_capability();
        BackendInfo {
            device: "cuda".into(),
            precision: match self.precision {
                Precision::Fp32 => "f32",
                Precision::Fp16 => "f16",
                Precision::Bf16 => "bf16",
            }
            .into(),
            quantization: "i2s".into(),
            detail: format!(
                "{} (cc {major}.{minor}), device {}, {} KV slots{}{}, head on {}{}{}, kernels: {}",
                self.gpu.name(),
                self.gpu.ordinal(),
                self.kv_slots,
                match (self.use_graphs, self.captures_broken) {
                    (false, _) => String::new(),
                    (true, 0) => ", CUDA graphs".into(),
                    (true, n) => format!(
                        ", CUDA graphs ({n} captures broken by another thread's device-wide synchronisation: \
                         those steps ran without a graph)"
                    ),
                },
                if self.fused.is_some() {
                    format!(", fused decode kernel (up to {} rows)", self.fused_rows)
                } else {
                    String::new()
                },
                match self.gpu.head_impl() {
                    HeadImpl::Cublas => {
                        let c = &self.model.config;
                        let (chunk, small) = self.gpu.head_chunks(self.dt, c.vocab_size, c.hidden_size);
                        if small.is_empty() {
                            format!("cuBLAS (calls of {chunk} entries)")
                        } else {
                            let small: Vec<String> = small.iter().map(usize::to_string).collect();
                            format!(
                                "cuBLAS (calls of {chunk} entries, smaller steps in calls of {})",
                                small.join(" / ")
                            )
                        }
                    }
                    HeadImpl::Kernels => format!("our kernels ({})", self.gpu.cublas_note()),
                },
                if self.gpu.pdl_enabled() { ", programmatic dependent launch" } else { "" },
                if self.gpu.cluster_ok() { ", cluster ternary kernels" } else { "" },
                self.gpu.ptx_origin()
            ),
        }
    }

    fn config(&self) -> &BitNetConfig {
        &self.model.config
    }

    fn add_sequence(&mut self, seq: SeqId, max_positions: usize) -> Result<(), BackendError> {
        if self.sequences.contains_key(&seq) {
            return Err(BackendError::DuplicateSequence(seq));
        }
        if max_positions > self.max_context {
            return Err(InferenceError::ContextOverflow { needed: max_positions, max: self.max_context }.into());
        }
        if max_positions == 0 {
            // As on the other backends: a sequence with no room, which every
            // step refuses (ReservationExceeded); it holds no KV slots.
            self.sequences.insert(seq, Sequence { base: 0, reserved: 0, len: 0 });
            return Ok(());
        }
        let base = self.pool.take(max_positions).ok_or_else(|| {
            BackendError::OutOfMemory(format!(
                "KV cache: {max_positions} positions requested, the largest free range has {} of {} slots",
                self.pool.largest(),
                self.kv_slots
            ))
        })?;
        self.sequences.insert(seq, Sequence { base, reserved: max_positions, len: 0 });
        Ok(())
    }

    fn remove_sequence(&mut self, seq: SeqId) {
        if let Some(s) = self.sequences.remove(&seq) {
            if s.reserved > 0 {
                self.pool.give(s.base, s.reserved);
            }
        }
    }

    fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        self.sequences.get(&seq).map(|s| s.len)
    }

    /// One device-to-device copy per layer for the keys and one for the
    /// values (a sequence's slots are contiguous), queued on the step's
    /// stream, so the next step reads them after the copy.
    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, len: usize) -> Result<(), BackendError> {
        let dst_state = self.sequences.get(&dst).map(|s| (s.len, s.reserved));
        validate_prefix_copy((src, self.sequence_len(src)), (dst, dst_state), len)?;
        if len > 0 {
            let row = self.model.config.kv_dim() * self.dt.size();
            let (from, to) = (self.sequences[&src].base * row, self.sequences[&dst].base * row);
            for layer in &self.layers {
                for cache in [&layer.k_cache, &layer.v_cache] {
                    let (to, from) = (cache.range(to, len * row), cache.range(from, len * row));
                    self.gpu.copy(to.map_err(cuda_error)?, from.map_err(cuda_error)?).map_err(cuda_error)?;
                }
            }
        }
        self.sequences.get_mut(&dst).expect("validated above").len = len;
        Ok(())
    }

    fn shrink_to_fit(&mut self, seq: SeqId) -> Result<(), BackendError> {
        let s = self.sequences.get_mut(&seq).ok_or(BackendError::UnknownSequence(seq))?;
        if s.reserved > s.len {
            self.pool.give(s.base + s.len, s.reserved - s.len);
            s.reserved = s.len;
            if s.len == 0 {
                s.base = 0;
            }
        }
        Ok(())
    }

    fn step(&mut self, batch: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        let vocab = self.model.config.vocab_size;
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); batch.len()];
        self.run(batch, false, |this, group| {
            let n_out = group.outputs.len();
            let rows = this.gpu.read_rows_f32(this.ws.logits.range(0, n_out * vocab * 4)?, vocab, n_out)?;
            this.read_flags()?;
            for (&(e, _), row) in group.outputs.iter().zip(rows) {
                out[e] = row;
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The greedy step (the argmax on the device) for every entry; then
    /// the draws of sampled entries on the device (`sample_rows`: top-k up
    /// to [`bitnet_kernels::cuda::SAMPLE_MAX_K`] or none, any top-p), and
    /// the logits of the entries that want them or whose draw the device
    /// does not make (a larger top-k, `BITNET_CUDA_SAMPLE=host`), one read
    /// per run of consecutive rows, those draws then made on the host. A
    /// step of greedy and device-drawn entries reads back token ids alone.
    fn step_select(&mut self, batch: &[StepInput<'_>], wants: &[StepWant]) -> Result<Vec<StepOutput>, BackendError> {
        check_wants(batch, wants)?;
        let vocab = self.model.config.vocab_size;
        let device_sampling = self.device_sampling && vocab <= SAMPLE_MAX_VOCAB;
        let drawn_here = |want: &StepWant| match want {
            StepWant::Sample(draw) => device_sampling && sample_row(draw).on_device(),
            _ => false,
        };
        let mut out: Vec<StepOutput> = vec![StepOutput::Token(0); batch.len()];
        self.run(batch, true, |this, group| {
            let n_out = group.outputs.len();
            let ws = &this.ws;
            if group.outputs.iter().any(|&(e, _)| drawn_here(&wants[e])) {
                let rows: Vec<SampleRow> = group
                    .outputs
                    .iter()
                    .map(|&(e, _)| match wants[e] {
                        StepWant::Sample(draw) if drawn_here(&wants[e]) => sample_row(&draw),
                        _ => SampleRow::KEEP,
                    })
                    .collect();
                let tokens = ws.flags_tokens.range(4, n_out * 4)?;
                this.gpu.sample_rows(ws.logits.all(), vocab, &rows, ws.sample_workspace.all(), tokens)?;
            }
            let mut bytes = vec![0u8; 4 + n_out * 4];
            this.gpu.read(ws.flags_tokens.range(0, bytes.len())?, &mut bytes)?;
            check_flags([bytes[0], bytes[1], bytes[2], bytes[3]])?;
            // The rows read back (one read per run of consecutive rows):
            // those that want logits, and draws the device does not make.
            let mut wanted: Vec<usize> = Vec::new();
            for (i, &(e, _)) in group.outputs.iter().enumerate() {
                let b = &bytes[4 + 4 * i..8 + 4 * i];
                let token = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let to_host = match wants[e] {
                    StepWant::Logits => true,
                    StepWant::Sample(_) => !drawn_here(&wants[e]),
                    StepWant::Greedy => false,
                };
                if to_host {
                    wanted.push(i);
                    continue;
                }
                match u32::try_from(token) {
                    Ok(t) if (t as usize) < vocab => out[e] = StepOutput::Token(t),
                    _ => {
                        return Err(CudaError::Shape(format!(
                            "the device returned token {token} for entry {e} (vocabulary of {vocab})"
                        )))
                    }
                }
            }
            let mut host_draws: Vec<(usize, SampleDraw, Vec<f32>)> = Vec::new();
            for run in wanted.chunk_by(|a, b| a + 1 == *b) {
                let (first, n) = (run[0], run.len());
                let rows = this.gpu.read_rows_f32(ws.logits.range(first * vocab * 4, n * vocab * 4)?, vocab, n)?;
                for (&i, row) in run.iter().zip(rows) {
                    let e = group.outputs[i].0;
                    match wants[e] {
                        StepWant::Sample(draw) => host_draws.push((e, draw, row)),
                        _ => out[e] = StepOutput::Logits(row),
                    }
                }
            }
            let tokens: Vec<(usize, u32)> = host_draws.par_iter().map(|(e, draw, row)| (*e, draw.apply(row))).collect();
            for (e, token) in tokens {
                out[e] = StepOutput::Token(token);
            }
            Ok(())
        })?;
        Ok(out)
    }

    fn step_greedy(&mut self, batch: &[StepInput<'_>]) -> Result<Vec<u32>, BackendError> {
        let mut out = vec![0u32; batch.len()];
        self.run(batch, true, |this, group| {
            let n_out = group.outputs.len();
            let ws = &this.ws;
            // The flags word and the tokens (the forward pass ended with the
            // argmax) in one copy: a second read cost about 9 us a step on
            // the H200.
            let mut bytes = vec![0u8; 4 + n_out * 4];
            this.gpu.read(ws.flags_tokens.range(0, bytes.len())?, &mut bytes)?;
            check_flags([bytes[0], bytes[1], bytes[2], bytes[3]])?;
            for (i, &(e, _)) in group.outputs.iter().enumerate() {
                let b = &bytes[4 + 4 * i..8 + 4 * i];
                out[e] = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            Ok(())
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::{check_flags, check_supported, SlotPool};
    use bitnet_models::synthetic::{self, Preset};

    #[test]
    fn the_flags_word_read_back_with_the_tokens_refuses_non_finite_steps() {
        // Little-endian i32 words as the device writes them; bit 0 is
        // FLAG_NONFINITE, other bits are not ours to judge.
        assert!(check_flags([0, 0, 0, 0]).is_ok());
        assert!(check_flags([2, 0, 0, 0]).is_ok());
        for word in [[1, 0, 0, 0], [3, 0, 0, 0], [1, 0, 0, 0x80]] {
            let err = check_flags(word).unwrap_err().to_string();
            assert!(err.contains("NaN or infinity"), "{err}");
        }
    }

    #[test]
    fn unsupported_shapes_are_refused_before_touching_the_gpu() {
        for preset in [Preset::Tiny, Preset::Small] {
            assert_eq!(check_supported(&synthetic::generate(preset, 1).unwrap()), Ok(()), "{preset:?}");
        }
        // One head of 384 dims: valid BitNet, too wide for the attention kernel.
        let mut config = Preset::Tiny.config();
        (config.hidden_size, config.n_heads, config.n_kv_heads, config.head_dim) = (384, 1, 1, 384);
        let model = std::sync::Arc::new(synthetic::generate_with_config(config, 1).unwrap());
        let why = check_supported(&model).unwrap_err();
        assert!(why.contains("head_dim 384"), "{why}");
        // The constructor reports it as such on any machine, GPU or not.
        let err = super::CudaBackend::new(model, &super::CudaBackendConfig::default()).unwrap_err();
        assert!(err.to_string().contains("cannot run this model: head_dim 384"), "{err}");
    }

    #[test]
    fn slot_pool_first_fit_and_coalescing() {
        let mut pool = SlotPool::new(100);
        let a = pool.take(30).unwrap();
        let b = pool.take(30).unwrap();
        let c = pool.take(30).unwrap();
        assert_eq!((a, b, c), (0, 30, 60));
        assert_eq!(pool.take(20), None, "only 10 slots left");
        pool.give(b, 30);
        assert_eq!(pool.largest(), 30);
        pool.give(a, 30);
        assert_eq!(pool.largest(), 60, "a and b coalesce");
        pool.give(c, 30);
        assert_eq!(pool.largest(), 100, "everything coalesces back");
        assert_eq!(pool.take(100), Some(0));
    }
}
