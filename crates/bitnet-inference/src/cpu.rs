//! `CpuBackend`: the fast CPU forward pass. Ternary weights stay packed in
//! I2_S and are multiplied by int8 activations with the SIMD kernels of
//! `bitnet-kernels` (chosen at run time); everything else is f32. A batched
//! step runs all new tokens of all sequences through each projection in one
//! GEMM, so prefill chunks and decode tokens of many sequences share the
//! weight reads. The output head is the file's float tensor, or optionally
//! an int8 copy ([`HeadPrecision::Int8`]); the KV cache holds f32, or
//! optionally f16 ([`KvCachePrecision::F16`]: half the memory and the bytes
//! attention reads).

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitnet_device::HugePageBuffer;
use bitnet_kernels::cpu::team::{self, Team};
use bitnet_kernels::cpu::{self as k, CpuKernel, FloatMatrixRef, I2sMatrixRef};
use bitnet_kernels::KernelError;
use bitnet_models::{BitNetConfig, BitNetModel, FloatDType, FloatTensor, TernaryMatrix};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::backend::{validate_prefix_copy, validate_step, Backend, BackendError, BackendInfo, SeqId, StepInput};
use crate::error::InferenceError;
use crate::int8_head::{HeadPrecision, Int8Head};

/// How to run the CPU backend.
#[derive(Debug, Clone, Default)]
pub struct CpuBackendConfig {
    /// Worker threads; 0 means one per logical core.
    pub threads: usize,
    /// Kernel to use; `None` picks the best available (or `BITNET_CPU_KERNEL`).
    pub kernel: Option<CpuKernel>,
    /// Output head precision; [`HeadPrecision::Native`] reads the file's tensor.
    pub head: HeadPrecision,
    /// Element type of the KV cache.
    pub kv_cache: KvCachePrecision,
}

/// Element type of the CPU backend's KV cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvCachePrecision {
    /// f32: attention reads exactly what the projections produced.
    #[default]
    F32,
    /// f16 (llama.cpp's default): half the memory and the bytes attention
    /// reads per token; keys and values are rounded to f16 when stored (RoPE
    /// is applied before), and the products read them back exactly.
    F16,
}

impl KvCachePrecision {
    /// Bytes of one cached element.
    pub fn bytes(self) -> usize {
        match self {
            KvCachePrecision::F32 => 4,
            KvCachePrecision::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvCachePrecision::F32 => "f32",
            KvCachePrecision::F16 => "f16",
        }
    }
}

impl std::str::FromStr for KvCachePrecision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(KvCachePrecision::F32),
            "f16" => Ok(KvCachePrecision::F16),
            other => Err(format!("KV cache precision {other:?}: expected f32 or f16")),
        }
    }
}

/// A layer's keys or values, one `[positions, head_dim]` slice per KV head:
/// the positions one head's attention reads are contiguous
/// (docs/perf/cpu.md, session 14).
enum KvView<'a> {
    F32(Vec<&'a [f32]>),
    F16(Vec<&'a [half::f16]>),
}

/// A callback receiving `(layer, residual stream)` after each block.
pub type LayerTrace<'a> = &'a mut (dyn FnMut(usize, &[f32]) + Send);

/// One sequence's KV cache: every layer's keys and values in one buffer
/// asked to use 2 MiB pages ([`HugePageBuffer`]: attention reads the whole
/// cache cold every token, and in 4 KiB pages a TLB miss every 4 KiB cost
/// it about a fifth of its time on the dev box, docs/perf/cpu.md session
/// 15), laid out `[layer][keys, values][KV head][reserved positions][head_dim]`
/// in the cache's precision. The whole reservation is committed as the first
/// step touches each head's run (2 MiB at a time), as a preallocated cache
/// is; positions at or past `len` hold nothing the backend reads.
struct CpuSequence {
    kv: HugePageBuffer,
    precision: KvCachePrecision,
    len: usize,
    reserved: usize,
}

impl CpuSequence {
    fn new(c: &BitNetConfig, precision: KvCachePrecision, reserved: usize) -> Result<Self, String> {
        let bytes = [c.n_layers, 2, c.n_kv_heads, reserved, c.head_dim, precision.bytes()]
            .into_iter()
            .try_fold(1usize, usize::checked_mul)
            .ok_or_else(|| "its size overflows usize".to_owned())?;
        let kv = HugePageBuffer::zeroed(bytes).map_err(|e| format!("{bytes} bytes: {e}"))?;
        Ok(Self { kv, precision, len: 0, reserved })
    }

    /// Element index where KV head `g`'s run of layer `layer`'s keys
    /// (`which` 0) or values (1) starts.
    fn run_start(&self, c: &BitNetConfig, layer: usize, which: usize, g: usize) -> usize {
        ((layer * 2 + which) * c.n_kv_heads + g) * self.reserved * c.head_dim
    }

    /// Stores position `pos` of layer `layer`: `keys` and `values` are
    /// `[kv_dim]` rows, head after head (f16 rounds to nearest even, with
    /// F16C where the CPU has it).
    fn store(&mut self, c: &BitNetConfig, layer: usize, pos: usize, keys: &[f32], values: &[f32]) {
        // The layer's 2 x n_kv_heads runs (keys' heads, then values') follow
        // one another, `reserved * head_dim` elements apart.
        let (hd, run) = (c.head_dim, self.reserved * c.head_dim);
        let first = self.run_start(c, layer, 0, 0) + pos * hd;
        let parts = keys.chunks_exact(hd).chain(values.chunks_exact(hd)).enumerate();
        match self.precision {
            KvCachePrecision::F32 => {
                let data: &mut [f32] = bytemuck::cast_slice_mut(self.kv.as_bytes_mut());
                for (i, part) in parts {
                    data[first + i * run..][..hd].copy_from_slice(part);
                }
            }
            KvCachePrecision::F16 => {
                let data: &mut [half::f16] = bytemuck::cast_slice_mut(self.kv.as_bytes_mut());
                for (i, part) in parts {
                    data[first + i * run..][..hd].convert_from_f32_slice(part);
                }
            }
        }
    }

    /// Copies the first `len` positions of every run of `src` (same model
    /// and precision; `len` fits both reservations) into `self`, byte for
    /// byte, and makes them `self`'s positions.
    fn copy_prefix_from(&mut self, c: &BitNetConfig, src: &CpuSequence, len: usize) {
        let e = self.precision.bytes();
        let n = len * c.head_dim * e;
        // Runs follow one another in `[layer][keys, values][KV head]` order, `reserved * head_dim` apart.
        let (src_run, dst_run) = (src.reserved * c.head_dim * e, self.reserved * c.head_dim * e);
        let (from, to) = (src.kv.as_bytes(), self.kv.as_bytes_mut());
        for run in 0..c.n_layers * 2 * c.n_kv_heads {
            to[run * dst_run..][..n].copy_from_slice(&from[run * src_run..][..n]);
        }
        self.len = len;
    }

    /// Makes the reservation the length: each run moved down to its place
    /// at the new stride (in run order, so a run never overwrites one not
    /// yet moved), then the buffer's tail given back to the OS.
    fn shrink_to_fit(&mut self, c: &BitNetConfig) {
        let e = self.precision.bytes();
        let (old, new) = (self.reserved * c.head_dim * e, self.len * c.head_dim * e);
        let runs = c.n_layers * 2 * c.n_kv_heads;
        let bytes = self.kv.as_bytes_mut();
        for run in 1..runs {
            bytes.copy_within(run * old..run * old + new, run * new);
        }
        self.kv.truncate(runs * new);
        self.reserved = self.len;
    }

    /// Layer `layer`'s keys and values of the first `positions` positions.
    fn view(&self, c: &BitNetConfig, layer: usize, positions: usize) -> (KvView<'_>, KvView<'_>) {
        let n = positions * c.head_dim;
        let runs = |which: usize| (0..c.n_kv_heads).map(move |g| self.run_start(c, layer, which, g));
        match self.precision {
            KvCachePrecision::F32 => {
                let data: &[f32] = bytemuck::cast_slice(self.kv.as_bytes());
                let heads = |which| KvView::F32(runs(which).map(|s| &data[s..s + n]).collect());
                (heads(0), heads(1))
            }
            KvCachePrecision::F16 => {
                let data: &[half::f16] = bytemuck::cast_slice(self.kv.as_bytes());
                let heads = |which| KvView::F16(runs(which).map(|s| &data[s..s + n]).collect());
                (heads(0), heads(1))
            }
        }
    }
}

pub struct CpuBackend {
    model: Arc<BitNetModel>,
    kernel: CpuKernel,
    pool: rayon::ThreadPool,
    threads: usize,
    /// `[max_positions, head_dim / 2]` rotary tables.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    /// The int8 copy of the head, with [`HeadPrecision::Int8`].
    int8_head: Option<Int8Head>,
    kv_cache: KvCachePrecision,
    sequences: HashMap<SeqId, CpuSequence>,
    /// Time per phase of the steps since [`CpuBackend::time_phases`].
    phase_times: Option<PhaseTimes>,
}

/// Where the CPU backend's steps spent their time, summed over the steps
/// since [`CpuBackend::time_phases`] (`cargo xtask bench --phases`). The
/// phases partition a step from its embedding lookup to its logits, so
/// their sum is the step's time less the checks and buffer allocations
/// before it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PhaseTimes {
    pub steps: u64,
    /// Embedding rows.
    pub embedding: Duration,
    /// Norms, activation quantisation, relu^2 * up and the residual adds
    /// (on the calling thread, or split over the pool's threads for steps of
    /// 8 rows or more).
    pub elementwise: Duration,
    /// RoPE (split like the norms) and the KV cache append (on the calling thread).
    pub rope_kv: Duration,
    /// The q, k and v products, one parallel call.
    pub qkv: Duration,
    /// Attention over the KV cache (parallel).
    pub attention: Duration,
    /// The attention output product (parallel).
    pub o_proj: Duration,
    /// The gate and up products, one parallel call.
    pub gate_up: Duration,
    /// The down product (parallel).
    pub down: Duration,
    /// The output head, with the final norm.
    pub head: Duration,
}

impl PhaseTimes {
    /// Each phase with its name, in step order.
    pub fn phases(&self) -> [(&'static str, Duration); 9] {
        [
            ("embedding", self.embedding),
            ("norms, quantisation, relu^2, residual adds", self.elementwise),
            ("RoPE + KV append", self.rope_kv),
            ("q/k/v products", self.qkv),
            ("attention", self.attention),
            ("o product", self.o_proj),
            ("gate/up products", self.gate_up),
            ("down product", self.down),
            ("head (with final norm)", self.head),
        ]
    }

    /// The sum of the phases.
    pub fn total(&self) -> Duration {
        self.phases().iter().map(|(_, d)| *d).sum()
    }

    fn add(&mut self, other: &PhaseTimes) {
        self.steps += other.steps;
        self.embedding += other.embedding;
        self.elementwise += other.elementwise;
        self.rope_kv += other.rope_kv;
        self.qkv += other.qkv;
        self.attention += other.attention;
        self.o_proj += other.o_proj;
        self.gate_up += other.gate_up;
        self.down += other.down;
        self.head += other.head;
    }
}

/// A stopwatch that adds each lap to a phase; does nothing when off.
struct Laps {
    last: Option<Instant>,
}

impl Laps {
    fn new(on: bool) -> Self {
        Self { last: on.then(Instant::now) }
    }

    fn lap(&mut self, phase: &mut Duration) {
        if let Some(last) = self.last.as_mut() {
            let now = Instant::now();
            *phase += now - *last;
            *last = now;
        }
    }
}

impl fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuBackend")
            .field("kernel", &self.kernel)
            .field("threads", &self.threads)
            .field("int8_head", &self.int8_head.is_some())
            .field("kv_cache", &self.kv_cache)
            .field("sequences", &self.sequences.len())
            .finish()
    }
}

fn kernel_error(err: KernelError) -> BackendError {
    BackendError::Device(format!("CPU kernel: {err}"))
}

impl CpuBackend {
    pub fn new(model: Arc<BitNetModel>, config: &CpuBackendConfig) -> Result<Self, BackendError> {
        let kernel = match config.kernel {
            Some(kernel) => kernel,
            None => k::select_kernel().map_err(kernel_error)?,
        };
        if !kernel.is_available() {
            return Err(BackendError::Device(format!("CPU kernel {} is not available on this CPU", kernel.name())));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads)
            .thread_name(|i| format!("bitnet-cpu-{i}"))
            .build()
            .map_err(|e| BackendError::Device(format!("cannot start CPU worker threads: {e}")))?;
        let threads = pool.current_num_threads();
        let c = &model.config;
        let (rope_cos, rope_sin) = crate::ops::rope_tables_f32(c.rope_theta, c.head_dim, c.max_position_embeddings);
        let int8_head = match config.head {
            HeadPrecision::Native => None,
            HeadPrecision::Int8 => Some(pool.install(|| Int8Head::quantize(kernel, model.head()))?),
        };
        Ok(Self {
            model,
            kernel,
            pool,
            threads,
            rope_cos,
            rope_sin,
            int8_head,
            kv_cache: config.kv_cache,
            sequences: HashMap::new(),
            phase_times: None,
        })
    }

    /// Times the phases of every step from now on, from zero (a few tens
    /// of nanoseconds a phase; off until called).
    pub fn time_phases(&mut self) {
        self.phase_times = Some(PhaseTimes::default());
    }

    /// The phase times summed since [`CpuBackend::time_phases`], which stops
    /// timing; `None` when it was not called.
    pub fn take_phase_times(&mut self) -> Option<PhaseTimes> {
        self.phase_times.take()
    }

    pub fn kernel(&self) -> CpuKernel {
        self.kernel
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The output head's precision.
    pub fn head_precision(&self) -> HeadPrecision {
        if self.int8_head.is_some() {
            HeadPrecision::Int8
        } else {
            HeadPrecision::Native
        }
    }

    /// The KV cache's element type.
    pub fn kv_cache_precision(&self) -> KvCachePrecision {
        self.kv_cache
    }

    /// Bytes of output-head weights read per decode token: the file's tensor,
    /// or the owned int8 copy and its f32 row scales.
    pub fn head_bytes(&self) -> usize {
        match &self.int8_head {
            Some(head) => head.bytes(),
            None => self.model.head().bytes().len(),
        }
    }

    /// Like [`Backend::step`], calling `trace(layer, hidden)` with the residual
    /// stream (`[new tokens of the whole batch, hidden]`) after each block, to
    /// find where this backend departs from the reference (`crossval --trace`).
    pub fn step_traced(
        &mut self,
        batch: &[StepInput<'_>],
        trace: LayerTrace<'_>,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        self.checked_step(batch, Some(trace))
    }

    fn checked_step(
        &mut self,
        batch: &[StepInput<'_>],
        trace: Option<LayerTrace<'_>>,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        validate_step(batch, &self.model.config, |seq| self.sequences.get(&seq).map(|s| (s.len, s.reserved)))?;
        let lens: Vec<usize> = batch.iter().map(|i| self.sequences[&i.seq].len).collect();
        self.run_step(batch, trace).map_err(|err| {
            // The failed step leaves no trace: positions at or past a
            // sequence's length are never read, and the next step overwrites them.
            for (input, &len) in batch.iter().zip(&lens) {
                if let Some(seq) = self.sequences.get_mut(&input.seq) {
                    seq.len = len;
                }
            }
            kernel_error(err)
        })
    }

    fn run_step(
        &mut self,
        batch: &[StepInput<'_>],
        mut trace: Option<LayerTrace<'_>>,
    ) -> Result<Vec<Vec<f32>>, KernelError> {
        let model = Arc::clone(&self.model);
        let c = &model.config;
        let kernel = self.kernel;
        let (h, kv_dim, hd, inter) = (c.hidden_size, c.kv_dim(), c.head_dim, c.intermediate_size);

        // Rows of this step: (entry index, absolute position).
        let mut rows: Vec<(usize, usize)> = Vec::new();
        let mut tokens: Vec<u32> = Vec::new();
        for (e, input) in batch.iter().enumerate() {
            let start = self.sequences[&input.seq].len;
            for (i, &token) in input.tokens.iter().enumerate() {
                rows.push((e, start + i));
                tokens.push(token);
            }
        }
        let n = rows.len();
        let mut x = vec![0f32; n * h];
        let mut t = PhaseTimes { steps: 1, ..PhaseTimes::default() };
        let mut laps = Laps::new(self.phase_times.is_some());
        for (row, &token) in x.chunks_exact_mut(h).zip(&tokens) {
            float_row(kernel, &model.embedding, token as usize, row)?;
        }
        laps.lap(&mut t.embedding);

        let mut normed = vec![0f32; n * h];
        let mut q8 = vec![0i8; n * inter.max(h)];
        let mut scales = vec![0f32; n];
        // Exact products of the widest group: q, k and v, or gate and up.
        let mut acc = vec![0i32; n * (h + 2 * kv_dim).max(2 * inter)];
        let mut q = vec![0f32; n * h];
        let mut kk = vec![0f32; n * kv_dim];
        let mut vv = vec![0f32; n * kv_dim];
        let mut attn = vec![0f32; n * h];
        let mut proj = vec![0f32; n * h];
        let mut gate = vec![0f32; n * inter];
        let mut up = vec![0f32; n * inter];
        let mut act_normed = vec![0f32; n * inter];
        let pool = &self.pool;
        let sequences = &mut self.sequences;
        let (rope_cos, rope_sin) = (&self.rope_cos, &self.rope_sin);
        let half = hd / 2;

        // The head's input and output, allocated before the pool's threads
        // are held as a team.
        let entries = batch.len();
        let mut normed_rows = vec![0f32; entries * h];
        let mut all_logits = vec![0f32; entries * c.vocab_size];
        let int8_head = &self.int8_head;
        pool.install(|| -> Result<(), KernelError> {
            // The pool's other threads spin for the step's parallel calls
            // (`bitnet_kernels::cpu::team`), until dropped after the head.
            let team = Team::start();
            for (layer_idx, layer) in model.layers.iter().enumerate() {
                // Attention block.
                norm_quant_rows(
                    kernel,
                    &x,
                    &layer.attn_norm,
                    c.rms_norm_eps,
                    &mut normed,
                    &mut q8[..n * h],
                    &mut scales,
                )?;
                laps.lap(&mut t.elementwise);
                let mut qkv = [(&layer.attn_q, &mut q[..]), (&layer.attn_k, &mut kk[..]), (&layer.attn_v, &mut vv[..])];
                bitlinear_group(kernel, &q8[..n * h], &scales, n, &mut acc, &mut qkv)?;
                laps.lap(&mut t.qkv);
                let rope = |r: usize, q_row: &mut [f32], k_row: &mut [f32]| {
                    let pos = rows[r].1;
                    let (cos, sin) = (&rope_cos[pos * half..(pos + 1) * half], &rope_sin[pos * half..(pos + 1) * half]);
                    k::rope_neox_f32(kernel, q_row, hd, cos, sin)?;
                    k::rope_neox_f32(kernel, k_row, hd, cos, sin)
                };
                for_rows2(&mut q, h, &mut kk, kv_dim, rope)?;
                for (r, &(e, pos)) in rows.iter().enumerate() {
                    let seq = sequences.get_mut(&batch[e].seq).expect("validated sequence");
                    let span = r * kv_dim..(r + 1) * kv_dim;
                    seq.store(c, layer_idx, pos, &kk[span.clone()], &vv[span]);
                }
                let caches: Vec<(KvView, KvView)> = batch
                    .iter()
                    .map(|input| {
                        let seq = &sequences[&input.seq];
                        seq.view(c, layer_idx, seq.len + input.tokens.len())
                    })
                    .collect();
                laps.lap(&mut t.rope_kv);
                attention(kernel, c, &rows, &caches, &q, &mut attn)?;
                laps.lap(&mut t.attention);
                norm_quant_rows(
                    kernel,
                    &attn,
                    &layer.attn_sub_norm,
                    c.rms_norm_eps,
                    &mut normed,
                    &mut q8[..n * h],
                    &mut scales,
                )?;
                laps.lap(&mut t.elementwise);
                bitlinear(kernel, &q8[..n * h], &scales, n, &layer.attn_output, &mut acc, &mut proj)?;
                laps.lap(&mut t.o_proj);
                add_rows(&mut x, &proj, h);

                // Feed-forward block. relu^2 and its sub-norm stay in f32.
                norm_quant_rows(
                    kernel,
                    &x,
                    &layer.ffn_norm,
                    c.rms_norm_eps,
                    &mut normed,
                    &mut q8[..n * h],
                    &mut scales,
                )?;
                let mut gate_up = [(&layer.ffn_gate, &mut gate[..]), (&layer.ffn_up, &mut up[..])];
                laps.lap(&mut t.elementwise);
                bitlinear_group(kernel, &q8[..n * h], &scales, n, &mut acc, &mut gate_up)?;
                laps.lap(&mut t.gate_up);
                relu2_mul_rows(kernel, &mut gate, &up, inter)?;
                norm_quant_rows(
                    kernel,
                    &gate,
                    &layer.ffn_sub_norm,
                    c.rms_norm_eps,
                    &mut act_normed,
                    &mut q8[..n * inter],
                    &mut scales,
                )?;
                laps.lap(&mut t.elementwise);
                bitlinear(kernel, &q8[..n * inter], &scales, n, &layer.ffn_down, &mut acc, &mut proj)?;
                laps.lap(&mut t.down);
                add_rows(&mut x, &proj, h);
                if let Some(trace) = trace.as_mut() {
                    trace(layer_idx, &x);
                }
                laps.lap(&mut t.elementwise);
            }

            // Logits of each entry's last new position, with one pass over the
            // head for the whole batch (it is the largest matrix of the model).
            let mut last = 0usize;
            for (input, normed_row) in batch.iter().zip(normed_rows.chunks_exact_mut(h)) {
                last += input.tokens.len();
                let r = last - 1;
                k::rms_norm_f32(kernel, &x[r * h..(r + 1) * h], &model.output_norm, c.rms_norm_eps, normed_row)?;
            }
            let logits = match int8_head {
                Some(int8_head) => int8_head.logits_batch(kernel, &normed_rows, entries, &mut all_logits),
                None => head_gemm(kernel, model.head(), &normed_rows, entries, &mut all_logits),
            };
            drop(team);
            laps.lap(&mut t.head);
            logits
        })?;
        if let Some(times) = self.phase_times.as_mut() {
            times.add(&t);
        }
        let out: Vec<Vec<f32>> = all_logits.chunks_exact(c.vocab_size).map(<[f32]>::to_vec).collect();
        for input in batch {
            let seq = sequences.get_mut(&input.seq).expect("validated sequence");
            seq.len += input.tokens.len();
        }
        Ok(out)
    }
}

/// Converts row `row` of a float tensor to f32 (embedding lookups, the int8
/// head's quantisation).
pub(crate) fn float_row(kernel: CpuKernel, t: &FloatTensor, row: usize, out: &mut [f32]) -> Result<(), KernelError> {
    let size = t.dtype().size_bytes();
    let bytes = &t.bytes()[row * t.cols() * size..(row + 1) * t.cols() * size];
    match t.dtype() {
        FloatDType::F16 => k::convert_f16_f32(kernel, bytes, out),
        FloatDType::BF16 => k::convert_bf16_f32(kernel, bytes, out),
        FloatDType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            Ok(())
        }
    }
}

/// `logits[t] = head @ x[t]` for `n` rows of `x`, reading the tied embedding
/// or untied output matrix once for all of them.
fn head_gemm(kernel: CpuKernel, head: &FloatTensor, x: &[f32], n: usize, out: &mut [f32]) -> Result<(), KernelError> {
    let (bytes, rows, cols) = (head.bytes().as_slice(), head.rows(), head.cols());
    match head.dtype() {
        FloatDType::F16 => k::gemm_f16_f32_par(kernel, FloatMatrixRef::from_le_bytes(bytes, rows, cols)?, x, n, out),
        FloatDType::BF16 => k::gemm_bf16_f32_par(kernel, FloatMatrixRef::from_le_bytes(bytes, rows, cols)?, x, n, out),
        FloatDType::F32 => k::gemm_f32_f32_par(kernel, FloatMatrixRef::from_le_bytes(bytes, rows, cols)?, x, n, out),
    }
}

/// Steps of at least this many rows (prefill, batched decode) run their
/// per-row work (norms, quantisation, the products' rescaling, relu^2, RoPE,
/// residual adds) split over the pool's threads, in contiguous runs of rows;
/// fewer rows (decode) stay on the calling thread, where a parallel call
/// costs more than the work. Rows are independent, so the bits are the same
/// either way. On the H200 host (session 35, 16 threads) this work took
/// about 0.4 s of a 512-token prefill's 1.3 s on the calling thread alone.
const PAR_ROWS_MIN: usize = 8;

/// Rows per parallel run: one run per pool thread.
fn rows_per_run(n: usize) -> usize {
    n.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// `f(first_row, a_rows, b_rows)` over matching runs of rows of `a` (rows of
/// `wa`) and `b` (rows of `wb`): in parallel from [`PAR_ROWS_MIN`] rows on.
fn for_rows2<A: Send, B: Send>(
    a: &mut [A],
    wa: usize,
    b: &mut [B],
    wb: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) -> Result<(), KernelError> + Sync,
) -> Result<(), KernelError> {
    let n = a.len() / wa.max(1);
    let each = |first: usize, a: &mut [A], b: &mut [B]| -> Result<(), KernelError> {
        for (i, (ar, br)) in a.chunks_exact_mut(wa).zip(b.chunks_exact_mut(wb)).enumerate() {
            f(first + i, ar, br)?;
        }
        Ok(())
    };
    if n < PAR_ROWS_MIN || wa == 0 || wb == 0 {
        return each(0, a, b);
    }
    let per = rows_per_run(n);
    team::rayon_section(|| {
        a.par_chunks_mut(per * wa)
            .zip(b.par_chunks_mut(per * wb))
            .enumerate()
            .try_for_each(|(i, (a, b))| each(i * per, a, b))
    })
}

/// RMSNorm then int8 quantisation of every row of `x` (`width` wide):
/// `normed` and `q8` rows, one scale per row.
fn norm_quant_rows(
    kernel: CpuKernel,
    x: &[f32],
    weight: &[f32],
    eps: f32,
    normed: &mut [f32],
    q8: &mut [i8],
    scales: &mut [f32],
) -> Result<(), KernelError> {
    let width = weight.len();
    let run = |first: usize, x: &[f32], normed: &mut [f32], q8: &mut [i8], scales: &mut [f32]| {
        rms_norm_rows(kernel, x, weight, eps, normed, width)?;
        k::quantize_act_i8_rows(kernel, normed, width, q8, scales).map_err(|e| match e {
            // The index within the step, not within this run.
            KernelError::NonFiniteValue { what, index, value } => {
                KernelError::NonFiniteValue { what, index: index + first * width, value }
            }
            e => e,
        })
    };
    let n = scales.len();
    if n < PAR_ROWS_MIN || width == 0 {
        return run(0, x, normed, q8, scales);
    }
    let per = rows_per_run(n);
    team::rayon_section(|| {
        x.par_chunks(per * width)
            .zip(normed.par_chunks_mut(per * width))
            .zip(q8.par_chunks_mut(per * width))
            .zip(scales.par_chunks_mut(per))
            .enumerate()
            .try_for_each(|(i, (((x, normed), q8), scales))| run(i * per, x, normed, q8, scales))
    })
}

/// `gate = relu(gate)^2 * up`, rows of `width`.
fn relu2_mul_rows(kernel: CpuKernel, gate: &mut [f32], up: &[f32], width: usize) -> Result<(), KernelError> {
    let n = gate.len() / width.max(1);
    if n < PAR_ROWS_MIN {
        return k::relu2_mul_f32(kernel, gate, up);
    }
    let per = rows_per_run(n) * width;
    team::rayon_section(|| {
        gate.par_chunks_mut(per).zip(up.par_chunks(per)).try_for_each(|(g, u)| k::relu2_mul_f32(kernel, g, u))
    })
}

/// `x += y`, rows of `width`.
fn add_rows(x: &mut [f32], y: &[f32], width: usize) {
    let n = x.len() / width.max(1);
    if n < PAR_ROWS_MIN {
        add_in_place(x, y);
        return;
    }
    let per = rows_per_run(n) * width;
    team::rayon_section(|| x.par_chunks_mut(per).zip(y.par_chunks(per)).for_each(|(x, y)| add_in_place(x, y)));
}

/// `out[t, j] = acc[t, j] * (w_scale / s[t])` for rows of `rows` outputs.
fn rescale_rows(out: &mut [f32], acc: &[i32], scales: &[f32], rows: usize, w_scale: f32) {
    let run = |out: &mut [f32], acc: &[i32], scales: &[f32]| {
        for ((out_row, acc_row), s) in out.chunks_exact_mut(rows).zip(acc.chunks_exact(rows)).zip(scales) {
            let factor = w_scale / s;
            for (o, a) in out_row.iter_mut().zip(acc_row) {
                *o = *a as f32 * factor;
            }
        }
    };
    let n = scales.len();
    if n < PAR_ROWS_MIN || rows == 0 {
        run(out, acc, scales);
        return;
    }
    let per = rows_per_run(n);
    team::rayon_section(|| {
        out.par_chunks_mut(per * rows)
            .zip(acc.par_chunks(per * rows))
            .zip(scales.par_chunks(per))
            .for_each(|((out, acc), scales)| run(out, acc, scales))
    });
}

fn rms_norm_rows(
    kernel: CpuKernel,
    x: &[f32],
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
    width: usize,
) -> Result<(), KernelError> {
    for (xr, or) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        k::rms_norm_f32(kernel, xr, weight, eps, or)?;
    }
    Ok(())
}

/// `out[t, j] = (sum_k q[t, k] * w[j, k]) / s[t] * w_scale` for `n` tokens.
fn bitlinear(
    kernel: CpuKernel,
    q8: &[i8],
    scales: &[f32],
    n: usize,
    w: &TernaryMatrix,
    acc: &mut [i32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    let rows = w.out_features();
    let matrix = I2sMatrixRef::new(w.codes(), rows, w.in_features())?;
    let acc = &mut acc[..n * rows];
    k::gemm_i2s_i8_par(kernel, matrix, q8, n, acc)?;
    rescale_rows(&mut out[..n * rows], acc, &scales[..n], rows, w.scale());
    Ok(())
}

/// [`bitlinear`] for matrices sharing one input (q, k, v; gate, up): one
/// parallel GEMM over all of them (`gemm_i2s_i8_par_group`), then the same
/// rescaling. `acc` holds at least `n` x (sum of their rows).
fn bitlinear_group(
    kernel: CpuKernel,
    q8: &[i8],
    scales: &[f32],
    n: usize,
    acc: &mut [i32],
    mats: &mut [(&TernaryMatrix, &mut [f32])],
) -> Result<(), KernelError> {
    let mut jobs = Vec::with_capacity(mats.len());
    let mut rest = acc;
    for (w, _) in mats.iter() {
        let rows = w.out_features();
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(n * rows);
        rest = tail;
        jobs.push((I2sMatrixRef::new(w.codes(), rows, w.in_features())?, mine));
    }
    k::gemm_i2s_i8_par_group(kernel, &mut jobs, q8, n)?;
    for ((w, out), (_, acc)) in mats.iter_mut().zip(&jobs) {
        let rows = w.out_features();
        rescale_rows(&mut out[..n * rows], acc, &scales[..n], rows, w.scale());
    }
    Ok(())
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Query heads per attention task: the most heads of one KV group (a
/// divisor of the group) that still leave at least four tasks per thread.
/// Heads of one task read their KV head's keys and values once
/// (`dot_rows_heads_f32`, `weighted_rows_heads_f32`) instead of once each;
/// enough tasks keep the threads balanced. One decode row of 2B-4T (5 KV
/// heads of 4) on 2 threads: 2 heads per task, 10 tasks.
fn heads_per_task(rows: usize, n_kv_heads: usize, group: usize, threads: usize) -> usize {
    (1..=group).rev().filter(|h| group % h == 0).find(|h| rows * n_kv_heads * (group / h) >= 4 * threads).unwrap_or(1)
}

/// Causal GQA attention of every row over its sequence's cache (which
/// already holds this step's keys and values): with few rows, each KV head's
/// positions cut between the threads ([`Attention::split`]), otherwise tasks
/// of query heads sharing a KV head ([`Attention::tasks`]); the same bits
/// either way.
fn attention(
    kernel: CpuKernel,
    c: &BitNetConfig,
    rows: &[(usize, usize)],
    caches: &[(KvView, KvView)],
    q: &[f32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    let attention = Attention { kernel, c, rows, caches, q };
    let threads = rayon::current_num_threads();
    if splits_positions(rows.len(), c.n_kv_heads, threads) {
        attention.split(out)
    } else {
        attention.tasks(out, threads)
    }
}

/// Whether [`attention`] cuts each KV head's positions between threads
/// ([`Attention::split`]): when rows x KV heads are too few tasks to keep
/// every thread busy (a decode step of a few sequences: 2B-4T has 5 KV
/// heads) and there is more than one thread.
fn splits_positions(rows: usize, n_kv_heads: usize, threads: usize) -> bool {
    threads > 1 && rows * n_kv_heads < 4 * threads
}

/// Output dimensions per unit of [`Attention::split`]'s second pass.
const SPLIT_DIMS: usize = 16;

/// The inputs every attention path of a step shares: the step's rows
/// (entry, position), each entry's cache views, the rows' rotated queries.
struct Attention<'a> {
    kernel: CpuKernel,
    c: &'a BitNetConfig,
    rows: &'a [(usize, usize)],
    caches: &'a [(KvView<'a>, KvView<'a>)],
    q: &'a [f32],
}

impl Attention<'_> {
    /// `out` (`heads` runs of `positions.len()`) = the scores of row `row`'s
    /// query heads `first..first + heads` (one KV group) against their KV
    /// head's keys at `positions`.
    fn scores(
        &self,
        row: usize,
        first: usize,
        heads: usize,
        positions: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let (h, hd) = (self.c.hidden_size, self.c.head_dim);
        let (entry, g) = (self.rows[row].0, first / self.c.group_size());
        let q = &self.q[row * h + first * hd..row * h + (first + heads) * hd];
        let scale = 1.0 / (hd as f32).sqrt();
        let span = positions.start * hd..positions.end * hd;
        match &self.caches[entry].0 {
            KvView::F32(keys) => k::dot_rows_heads_f32(self.kernel, q, heads, &keys[g][span], hd, scale, out),
            KvView::F16(keys) => k::dot_rows_heads_f16(self.kernel, q, heads, &keys[g][span], hd, scale, out),
        }
    }

    /// `out` (`heads` runs of `dims.len()`) = output dimensions `dims` of the
    /// weighted sums of row `row`'s query heads `first..first + heads` over
    /// their KV head's values at the positions `weights` (`heads` runs) covers.
    fn weighted(
        &self,
        row: usize,
        first: usize,
        weights: &[f32],
        dims: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let hd = self.c.head_dim;
        let heads = out.len() / dims.len().max(1);
        let (entry, g) = (self.rows[row].0, first / self.c.group_size());
        let n = weights.len() / heads.max(1);
        let span = dims.start..n.saturating_sub(1) * hd + dims.end;
        match &self.caches[entry].1 {
            KvView::F32(values) => k::weighted_rows_heads_f32(self.kernel, weights, heads, &values[g][span], hd, out),
            KvView::F16(values) => k::weighted_rows_heads_f16(self.kernel, weights, heads, &values[g][span], hd, out),
        }
    }

    /// Parallel tasks of a row's query heads that share a KV head
    /// ([`heads_per_task`]).
    fn tasks(&self, out: &mut [f32], threads: usize) -> Result<(), KernelError> {
        let (hd, group) = (self.c.head_dim, self.c.group_size());
        let heads = heads_per_task(self.rows.len(), self.c.n_kv_heads, group, threads);
        let tasks_per_row = self.c.n_heads / heads;
        team::rayon_section(|| {
            out.par_chunks_mut(heads * hd).enumerate().try_for_each(|(idx, out_heads)| -> Result<(), KernelError> {
                let (r, first) = (idx / tasks_per_row, idx % tasks_per_row * heads);
                let n = self.rows[r].1 + 1;
                let mut scores = vec![0f32; heads * n];
                self.scores(r, first, heads, 0..n, &mut scores)?;
                for head_scores in scores.chunks_exact_mut(n) {
                    k::softmax_f32(self.kernel, head_scores)?;
                }
                self.weighted(r, first, &scores, 0..hd, out_heads)
            })
        })
    }

    /// [`attention`] for a few rows, in two passes on every thread of the current
    /// pool (`team::broadcast`), each thread taking one contiguous run of the work:
    /// first the scores, the (row, KV head, position) triples cut into equal
    /// runs, so each thread reads about the same bytes of keys as one or two
    /// long streams; then softmax and the weighted sums, the (row, KV head,
    /// 16 output dimensions) triples cut the same way, each thread copying
    /// the scores of the (row, KV head)s it takes from the first pass's pieces
    /// (until session 34 the caller copied all of them into one buffer between
    /// the passes, a serial step: docs/perf/cpu.md). Each score and each
    /// output element goes through the same operations in the same order as in
    /// the per-head tasks of [`Attention::tasks`] (the kernels score each position
    /// alone and sum each element over the positions in order), so the two give
    /// the same bits; only who computes what changes. On the 2-vCPU dev box, one
    /// 2B-4T decode row at 192 positions (session 15, docs/perf/cpu.md), ms of
    /// attention per token: per-head tasks 4.0-4.3, this 3.4-3.9 (the bench,
    /// threads kept awake, KV cache then in 4 KiB pages).
    fn split(&self, out: &mut [f32]) -> Result<(), KernelError> {
        let (rows, kernel) = (self.rows, self.kernel);
        let (h, hd, group, kv_heads) = (self.c.hidden_size, self.c.head_dim, self.c.group_size(), self.c.n_kv_heads);
        // Scores of (row r, KV head g): `group` runs of `pos + 1`, at `offsets[r * kv_heads + g]`.
        let mut offsets = Vec::with_capacity(rows.len() * kv_heads + 1);
        offsets.push(0usize);
        for &(_, pos) in rows {
            for _ in 0..kv_heads {
                offsets.push(offsets.last().copied().unwrap_or(0) + group * (pos + 1));
            }
        }
        // Pass 1: thread t scores positions [t * total / threads, (t + 1) * total / threads)
        // of the (row, KV head, position) sequence.
        let total = offsets.last().copied().unwrap_or(0) / group.max(1);
        let parts = team::broadcast(|t, n_threads| -> Result<Vec<(usize, usize, Vec<f32>)>, KernelError> {
            let (from, to) = (t * total / n_threads, (t + 1) * total / n_threads);
            let mut parts = Vec::new();
            for (unit, &offset) in offsets[..rows.len() * kv_heads].iter().enumerate() {
                let (row, g) = (unit / kv_heads, unit % kv_heads);
                let start = offset / group;
                let (a, b) = (from.max(start) - start, to.min(start + rows[row].1 + 1).saturating_sub(start));
                if a >= b {
                    continue;
                }
                let mut scores = vec![0f32; group * (b - a)];
                self.scores(row, g * group, group, a..b, &mut scores)?;
                parts.push((unit, a, scores));
            }
            Ok(parts)
        });
        let parts = parts.into_iter().collect::<Result<Vec<_>, _>>()?;
        // The pieces of each (row, KV head)'s scores: (first position, `group`
        // runs of scores), in position order (threads in index order).
        let mut pieces: Vec<Vec<(usize, &[f32])>> = vec![Vec::new(); rows.len() * kv_heads];
        for (unit, a, part) in parts.iter().flatten() {
            pieces[*unit].push((*a, part.as_slice()));
        }
        // Pass 2: thread t takes units [t * total / threads, ...) of the
        // (row, KV head, block of SPLIT_DIMS outputs) sequence; each (row, KV
        // head) it touches gets its scores from the pieces and its softmax
        // (computed again by the other thread where a cut falls inside one).
        let blocks = hd.div_ceil(SPLIT_DIMS);
        let total = rows.len() * kv_heads * blocks;
        let pieces = &pieces;
        let parts = team::broadcast(|t, n_threads| -> Result<Vec<(usize, usize, Vec<f32>)>, KernelError> {
            let (from, to) = (t * total / n_threads, (t + 1) * total / n_threads);
            let mut parts = Vec::new();
            let first = from / blocks;
            for (unit, unit_pieces) in pieces.iter().enumerate().take(to.div_ceil(blocks)).skip(first) {
                let (b0, b1) = (from.max(unit * blocks) - unit * blocks, to.min((unit + 1) * blocks) - unit * blocks);
                if b0 >= b1 {
                    continue;
                }
                let (d0, d1) = (b0 * SPLIT_DIMS, (b1 * SPLIT_DIMS).min(hd));
                let (row, g) = (unit / kv_heads, unit % kv_heads);
                let n = rows[row].1 + 1;
                let mut weights = vec![0f32; group * n];
                for &(a, part) in unit_pieces {
                    let m = part.len() / group;
                    for (head, run) in part.chunks_exact(m).enumerate() {
                        weights[head * n + a..head * n + a + m].copy_from_slice(run);
                    }
                }
                for head_scores in weights.chunks_exact_mut(n) {
                    k::softmax_f32(kernel, head_scores)?;
                }
                let mut sums = vec![0f32; group * (d1 - d0)];
                self.weighted(row, g * group, &weights, d0..d1, &mut sums)?;
                parts.push((unit, d0, sums));
            }
            Ok(parts)
        });
        for (unit, d0, sums) in parts.into_iter().collect::<Result<Vec<_>, _>>()?.into_iter().flatten() {
            let (row, g) = (unit / kv_heads, unit % kv_heads);
            let m = sums.len() / group;
            for (head, run) in sums.chunks_exact(m).enumerate() {
                let at = row * h + (g * group + head) * hd + d0;
                out[at..at + m].copy_from_slice(run);
            }
        }
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            device: "cpu".into(),
            precision: "f32".into(),
            quantization: "i2s".into(),
            detail: {
                let mut d = format!("{} kernels, {} threads", self.kernel.name(), self.threads);
                if self.kv_cache == KvCachePrecision::F16 {
                    d.push_str(", f16 KV cache");
                }
                if self.int8_head.is_some() {
                    d.push_str(", int8 head");
                }
                d
            },
        }
    }

    fn config(&self) -> &BitNetConfig {
        &self.model.config
    }

    fn add_sequence(&mut self, seq: SeqId, max_positions: usize) -> Result<(), BackendError> {
        if self.sequences.contains_key(&seq) {
            return Err(BackendError::DuplicateSequence(seq));
        }
        let c = &self.model.config;
        if max_positions > c.max_position_embeddings {
            return Err(
                InferenceError::ContextOverflow { needed: max_positions, max: c.max_position_embeddings }.into()
            );
        }
        let precision = self.kv_cache;
        let sequence = CpuSequence::new(c, precision, max_positions).map_err(|e| {
            BackendError::OutOfMemory(format!("{} KV cache of {max_positions} positions: {e}", precision.name()))
        })?;
        self.sequences.insert(seq, sequence);
        Ok(())
    }

    fn remove_sequence(&mut self, seq: SeqId) {
        self.sequences.remove(&seq);
    }

    fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        self.sequences.get(&seq).map(|s| s.len)
    }

    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, len: usize) -> Result<(), BackendError> {
        let dst_state = self.sequences.get(&dst).map(|s| (s.len, s.reserved));
        validate_prefix_copy((src, self.sequence_len(src)), (dst, dst_state), len)?;
        // Both are in the map (validated, and distinct): take `dst` out to borrow `src` beside it.
        let mut target = self.sequences.remove(&dst).expect("validated above");
        target.copy_prefix_from(&self.model.config, &self.sequences[&src], len);
        self.sequences.insert(dst, target);
        Ok(())
    }

    fn shrink_to_fit(&mut self, seq: SeqId) -> Result<(), BackendError> {
        let sequence = self.sequences.get_mut(&seq).ok_or(BackendError::UnknownSequence(seq))?;
        sequence.shrink_to_fit(&self.model.config);
        Ok(())
    }

    fn step(&mut self, batch: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        self.checked_step(batch, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The split attention equals the per-head tasks bit for bit: any pool,
    /// head shape, cut and cache precision, on every kernel.
    #[test]
    fn split_attention_equals_the_per_head_tasks() {
        let values = |n: usize, seed: usize| -> Vec<f32> {
            (0..n).map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0).collect()
        };
        // (n_heads, n_kv_heads, head_dim): 2B-4T, groups of 3, a head_dim off the 16-dim blocks.
        for (n_heads, kv_heads, hd) in [(20, 5, 128), (6, 2, 64), (2, 2, 40)] {
            let c = BitNetConfig {
                n_heads,
                n_kv_heads: kv_heads,
                head_dim: hd,
                hidden_size: n_heads * hd,
                ..BitNetConfig::bitnet_2b4t()
            };
            // Rows (entry, position) over two sequences' caches of 200 positions.
            for rows in [vec![(0usize, 0usize)], vec![(0, 192)], vec![(1, 6), (0, 37)]] {
                let cache =
                    |seed: usize| -> Vec<Vec<f32>> { (0..kv_heads).map(|g| values(200 * hd, seed * 10 + g)).collect() };
                let (k32, v32): (Vec<_>, Vec<_>) =
                    ((0..2).map(|s| cache(2 * s + 1)).collect(), (0..2).map(|s| cache(2 * s + 2)).collect());
                let to_f16 = |x: &Vec<Vec<f32>>| -> Vec<Vec<half::f16>> {
                    x.iter().map(|v| v.iter().map(|&f| half::f16::from_f32(f)).collect()).collect()
                };
                let (k16, v16): (Vec<_>, Vec<_>) = (k32.iter().map(to_f16).collect(), v32.iter().map(to_f16).collect());
                let q = values(rows.len() * c.hidden_size, 99);
                for kernel in CpuKernel::all_available() {
                    for f16 in [false, true] {
                        let caches: Vec<(KvView, KvView)> = (0..2)
                            .map(|s| {
                                if f16 {
                                    (
                                        KvView::F16(k16[s].iter().map(Vec::as_slice).collect()),
                                        KvView::F16(v16[s].iter().map(Vec::as_slice).collect()),
                                    )
                                } else {
                                    (
                                        KvView::F32(k32[s].iter().map(Vec::as_slice).collect()),
                                        KvView::F32(v32[s].iter().map(Vec::as_slice).collect()),
                                    )
                                }
                            })
                            .collect();
                        let mut tasks = vec![0f32; q.len()];
                        Attention { kernel, c: &c, rows: &rows, caches: &caches, q: &q }.tasks(&mut tasks, 2).unwrap();
                        for threads in [2, 3, 5, 16] {
                            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                            let mut split = vec![f32::NAN; q.len()];
                            pool.install(|| {
                                Attention { kernel, c: &c, rows: &rows, caches: &caches, q: &q }.split(&mut split)
                            })
                            .unwrap();
                            let same = tasks.iter().zip(&split).all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(
                                same,
                                "{kernel:?} f16 {f16} heads {n_heads}/{kv_heads}x{hd} rows {rows:?} {threads} threads"
                            );
                        }
                    }
                }
            }
        }
        // Decode of one or two 2B-4T rows on 2 threads splits; 8 rows or one thread do not.
        assert!(
            splits_positions(1, 5, 2)
                && splits_positions(1, 5, 16)
                && !splits_positions(8, 5, 2)
                && !splits_positions(1, 5, 1)
        );
    }

    #[test]
    fn attention_tasks_keep_four_per_thread() {
        // 2B-4T, one decode row, 2 threads: 4 heads a task would give 5 tasks
        // (fewer than 8), 2 heads give 10.
        assert_eq!(heads_per_task(1, 5, 4, 2), 2);
        // Eight rows: 40 tasks of 4 heads.
        assert_eq!(heads_per_task(8, 5, 4, 2), 4);
        // 16 threads and one row: even single heads give only 20 tasks.
        assert_eq!(heads_per_task(1, 5, 4, 16), 1);
        // Groups of 3 (divisors 3 and 1): 2 tasks of 3 heads are too few for one thread.
        assert_eq!(heads_per_task(1, 2, 3, 1), 1);
        assert_eq!(heads_per_task(2, 2, 3, 1), 3);
        // No grouping (multi-head attention).
        assert_eq!(heads_per_task(1, 20, 1, 2), 1);
    }
}
