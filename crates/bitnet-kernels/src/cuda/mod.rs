//! CUDA kernels (`kernels/bitnet.cu`) and their launch wrappers.
//!
//! [`GpuContext::open`](crate::cuda::GpuContext::open) checks that libcuda and libnvrtc can be loaded
//! (cudarc would panic otherwise), creates a context and a stream on one
//! device, and loads the kernel module once (prebuilt PTX, cached PTX or an
//! NVRTC compile; see [`ptx`](crate::cuda::ptx)). Device memory is handed out as [`DevBuf`](crate::cuda::DevBuf)s
//! and addressed through checked [`DevRange`](crate::cuda::DevRange)s: every launch wrapper checks
//! that each range covers what the kernel will touch for the dimensions it
//! is given before anything is launched. The only values a kernel reads that
//! the wrapper cannot check are indices stored in device memory (token ids,
//! positions, cache slots); their producers validate them on the host.
//!
//! Launches are asynchronous; errors of a kernel show up at the next
//! synchronising call ([`GpuContext::read`](crate::cuda::GpuContext::read), [`GpuContext::synchronize`](crate::cuda::GpuContext::synchronize)).

mod blas;
mod fused;
mod ops;
mod pinned;
pub mod ptx;

use std::fmt;
use std::sync::Arc;

use cudarc::driver::{result as cu, sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream};
use rayon::prelude::*;

pub use fused::{FusedLayer, FusedLayers, FusedShape, FusedStep, FusedTrace, FUSED_ROWS};
pub use ops::{
    SampleRow, TernaryActs, ARGMAX_SPLIT_MAX_ROWS, ATT_PART_ROWS, FLAG_NONFINITE, SAMPLE_MAX_K, SAMPLE_MAX_VOCAB,
};
pub use pinned::{PINNED_MAX_BYTES, PINNED_MIN_BYTES};

/// Little-endian f32 values of `row` (a multiple of 4 bytes): one copy
/// where the bytes are 4-aligned, as page-locked rows are.
fn row_to_f32(row: &[u8]) -> Vec<f32> {
    match bytemuck::try_cast_slice::<u8, f32>(row) {
        Ok(values) if cfg!(target_endian = "little") => values.to_vec(),
        _ => row.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
    }
}

/// Bytes per task when the rayon pool copies a page-locked piece out.
const COPY_OUT_CHUNK: usize = 1 << 20;
pub use ptx::PtxOrigin;

/// Every kernel of the module; a missing one is a load error.
pub const KERNEL_NAMES: &[&str] = &[
    "convert_f32_f32",
    "convert_f32_f16",
    "convert_f32_bf16",
    "convert_f16_f32",
    "convert_f16_f16",
    "convert_f16_bf16",
    "convert_bf16_f32",
    "convert_bf16_f16",
    "convert_bf16_bf16",
    "embed_f32",
    "embed_f16",
    "embed_bf16",
    "rmsnorm_quant_f32",
    "final_norm_f32",
    "final_norm_f16",
    "final_norm_bf16",
    "ternary_mm_store_b",
    "ternary_mm_add_b",
    "ternary_mm_gate_up_b",
    "ternary_mm_store_b2",
    "ternary_mm_add_b2",
    "ternary_mm_gate_up_b2",
    "ternary_mm_store_1",
    "ternary_mm_add_1",
    "ternary_mm_gate_up_1",
    "ternary_mm_store_s4",
    "ternary_mm_add_s4",
    "ternary_mm_gate_up_s4",
    "ternary_mm_store_c",
    "ternary_mm_add_c",
    "ternary_mm_gate_up_c",
    "rope_kv_f32",
    "rope_kv_f16",
    "rope_kv_bf16",
    "attention_f32",
    "attention_f16",
    "attention_bf16",
    "attention_f32_wide",
    "attention_f16_wide",
    "attention_bf16_wide",
    "attention_f32_h1",
    "attention_f16_h1",
    "attention_bf16_h1",
    "attention_f32_wide_h1",
    "attention_f16_wide_h1",
    "attention_bf16_wide_h1",
    "attention_mma_f16",
    "attention_mma_bf16",
    "attention_mma_rope_f16",
    "attention_mma_rope_bf16",
    "attention_combine",
    "fused_decode_f32",
    "fused_decode_f16",
    "fused_decode_bf16",
    "fused_decode_f32_w1",
    "fused_decode_f16_w1",
    "fused_decode_bf16_w1",
    "fused_decode_f16_scalar",
    "fused_decode_bf16_scalar",
    "fused_decode_f32_wide",
    "fused_decode_f16_wide",
    "fused_decode_bf16_wide",
    "sample_stats",
    "sample_hist",
    "sample_gather",
    "sample_final",
    "head_f32",
    "head_f16",
    "head_bf16",
    "head_f16_small",
    "head_bf16_small",
    "add_row_pairs",
    "argmax_rows",
    "argmax_split",
];

/// Element type of a device tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GpuDType {
    F32,
    F16,
    BF16,
}

impl GpuDType {
    pub fn size(self) -> usize {
        match self {
            GpuDType::F32 => 4,
            GpuDType::F16 | GpuDType::BF16 => 2,
        }
    }

    /// The suffix of the kernel instantiations.
    pub fn name(self) -> &'static str {
        match self {
            GpuDType::F32 => "f32",
            GpuDType::F16 => "f16",
            GpuDType::BF16 => "bf16",
        }
    }
}

/// Errors of the CUDA layer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    #[error("no CUDA driver: libcuda could not be loaded")]
    NoDriver,
    #[error("libnvrtc could not be loaded and this binary has no prebuilt PTX (set LD_LIBRARY_PATH to the CUDA lib64 folder)")]
    NoNvrtc,
    #[error("GPU {ordinal} has compute capability {}.{}; the CUDA kernels need {}.{} or newer", .cc.0, .cc.1, ptx::MIN_COMPUTE_CAPABILITY.0, ptx::MIN_COMPUTE_CAPABILITY.1)]
    Unsupported { ordinal: usize, cc: (u32, u32) },
    #[error("NVRTC failed to compile the kernels for {arch}: {log}")]
    Compile { arch: String, log: String },
    #[error("CUDA driver error in {call}: {message}")]
    Driver { call: &'static str, message: String },
    /// A stream capture that the driver invalidated: another thread
    /// synchronised the device (cuCtxSynchronize, a synchronous copy or
    /// free) while this stream was capturing a graph. Only the capture is
    /// lost; the stream works again once the capture has ended.
    #[error("CUDA graph capture broken in {call}: {message}")]
    CaptureBroken { call: &'static str, message: String },
    #[error("out of GPU memory allocating {bytes} bytes for {what}: {message}")]
    OutOfMemory { what: String, bytes: usize, message: String },
    #[error("{what}: needs {needed} bytes, the buffer has {available}")]
    Range { what: &'static str, needed: usize, available: usize },
    #[error("{0}")]
    Shape(String),
    #[error("injected fault: {0}")]
    Injected(String),
}

fn driver(call: &'static str) -> impl FnOnce(cu::DriverError) -> CudaError {
    move |e| {
        use sys::CUresult::*;
        let message = e.to_string();
        match e.0 {
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
            | CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
            | CUDA_ERROR_STREAM_CAPTURE_IMPLICIT => CudaError::CaptureBroken { call, message },
            _ => CudaError::Driver { call, message },
        }
    }
}

/// Hooks the device layer consults before each allocation and launch: the
/// fault-injection plan acts through them.
pub trait DeviceHooks: Send + Sync + fmt::Debug {
    /// Called before every kernel launch and copy; an error fails the call.
    fn on_launch(&self, what: &str) -> Result<(), String>;
    /// Called before every allocation; an error fails it as out-of-memory.
    fn on_alloc(&self, bytes: u64) -> Result<(), String>;
    /// Called when an allocation is freed.
    fn on_free(&self, bytes: u64);
    /// Called when a backend on this context has been created whole.
    fn on_ready(&self) {}
    /// Called when such a backend starts a step.
    fn on_step(&self) {}
}

/// The fault-injection plan of `bitnet-device` acts on the CUDA layer.
impl DeviceHooks for bitnet_device::FaultInjector {
    fn on_launch(&self, what: &str) -> Result<(), String> {
        bitnet_device::FaultInjector::on_launch(self, what).map_err(|e| e.to_string())
    }
    fn on_alloc(&self, bytes: u64) -> Result<(), String> {
        bitnet_device::FaultInjector::on_alloc(self, bytes).map_err(|e| e.to_string())
    }
    fn on_free(&self, bytes: u64) {
        bitnet_device::FaultInjector::on_free(self, bytes);
    }
    fn on_ready(&self) {
        bitnet_device::FaultInjector::on_ready(self);
    }
    fn on_step(&self) {
        bitnet_device::FaultInjector::on_step(self);
    }
}

/// A device allocation (bytes), made with `cuMemAlloc` (not the stream-ordered
/// pool, so free-memory figures are exact) and freed on drop.
pub struct DevBuf {
    /// The stream of the context that made it: every use of the buffer is
    /// queued there (and the stream keeps the context alive).
    stream: Arc<CudaStream>,
    ptr: u64,
    len: usize,
    hooks: Option<Arc<dyn DeviceHooks>>,
}

impl fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevBuf").field("ptr", &format_args!("{:#x}", self.ptr)).field("len", &self.len).finish()
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if let Some(hooks) = &self.hooks {
            hooks.on_free(self.len as u64);
        }
        // Work that may still use the buffer must finish first. That work
        // is all on the owning context's one stream, so waiting for that
        // stream suffices; a context-wide cuCtxSynchronize would also wait
        // for every other user of the device in this process, break their
        // graph captures, and crashed inside libcuda (580.159.04, H200)
        // while other threads destroyed streams and instantiated graphs
        // (backend tests on parallel threads, session 28).
        if self.stream.context().bind_to_thread().is_ok() && self.stream.synchronize().is_ok() {
            // cuMemFree may synchronise the whole context (see context_wide).
            let _wide = context_wide();
            // SAFETY: `ptr` came from `cuMemAlloc` in this context, is freed
            // exactly once (here), and every use of it was queued on
            // `stream` (DevBuf's owner launches only there), synchronised
            // above, so no queued kernel or copy can still touch it.
            let _ = unsafe { cu::free_sync(self.ptr) };
        }
    }
}

impl DevBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole buffer.
    pub fn all(&self) -> DevRange {
        DevRange { ptr: self.ptr, len: self.len }
    }

    /// `len` bytes from `offset`, checked against the allocation.
    pub fn range(&self, offset: usize, len: usize) -> Result<DevRange, CudaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(DevRange { ptr: self.ptr + offset as u64, len }),
            _ => Err(CudaError::Range { what: "sub-range", needed: offset.saturating_add(len), available: self.len }),
        }
    }
}

/// A checked window into a [`DevBuf`]: a device address and a length in
/// bytes. Only [`DevBuf::all`] and [`DevBuf::range`] make one, so a range
/// always lies inside a live allocation while the buffer lives; callers keep
/// the buffer alive while work using the range may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevRange {
    ptr: u64,
    len: usize,
}

impl DevRange {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A sub-window of this range.
    pub fn sub(&self, offset: usize, len: usize) -> Result<DevRange, CudaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(DevRange { ptr: self.ptr + offset as u64, len }),
            _ => Err(CudaError::Range { what: "sub-range", needed: offset.saturating_add(len), available: self.len }),
        }
    }

    fn need(&self, what: &'static str, bytes: usize) -> Result<u64, CudaError> {
        if bytes > self.len {
            return Err(CudaError::Range { what, needed: bytes, available: self.len });
        }
        Ok(self.ptr)
    }
}

/// A captured sequence of launches, replayed with one call.
pub struct GpuGraph {
    graph: cudarc::driver::CudaGraph,
}

// SAFETY: a CUDA graph and its executable instance are plain driver handles
// that may be used from any thread; `GpuGraph` is not `Sync`, so it is never
// launched from two threads at once, and each launch binds the owning context
// to the calling thread first (`CudaGraph::launch`).
unsafe impl Send for GpuGraph {}

impl fmt::Debug for GpuGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GpuGraph")
    }
}

/// One device: its context, the stream every call runs on, and the loaded
/// kernel module.
pub struct GpuContext {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    functions: Functions,
    ordinal: usize,
    name: String,
    cc: (u32, u32),
    origin: PtxOrigin,
    hooks: Option<Arc<dyn DeviceHooks>>,
    /// The page-locked buffer large reads go through (see [`GpuContext::read`]).
    pinned: std::sync::Mutex<Option<pinned::PinnedBuffer>>,
    /// Large reads through `pinned` (`BITNET_CUDA_PINNED=0` turns it off).
    pinned_on: bool,
    /// When set, every launch is bracketed by events (see [`GpuContext::set_profiling`]).
    profile: std::sync::Mutex<Option<Vec<LaunchEvents>>>,
    /// Launch with programmatic stream serialisation (see [`GpuContext::set_pdl`]).
    pdl: std::sync::atomic::AtomicBool,
    /// cuBLAS for the head, or why not.
    blas: Option<blas::Blas>,
    blas_note: std::sync::Mutex<String>,
    head_cublas: std::sync::atomic::AtomicBool,
    /// Entries per cuBLAS head call (f32, f16/bf16); see [`GpuContext::head`].
    head_chunk: (usize, usize),
    /// Entries per cuBLAS head call for calls of at most that many entries
    /// (ascending), by (precision, vocab, hidden): the sizes
    /// [`GpuContext::verify_head_small_chunk`] found to give every entry the
    /// bits of the whole-chunk calls.
    head_small: std::sync::Mutex<std::collections::HashMap<(GpuDType, usize, usize), Vec<usize>>>,
    /// The small chunks that check tries (`BITNET_CUDA_HEAD_SMALL`, a
    /// comma-separated list, default [`ops::HEAD_SMALL_CHUNKS`]; 0: none).
    head_small_try: Vec<usize>,
    /// [`TernaryBatch`] code of the per-operation ternary kernels.
    ternary_batch: std::sync::atomic::AtomicU8,
    /// The staged kernels could be given their shared memory (else every
    /// choice resolves to the K-split kernels).
    staged_ok: bool,
    /// The cluster ternary kernels can run here (see [`GpuContext::cluster_ok`]).
    cluster_ok: bool,
    /// Streaming multiprocessors of the device.
    sms: usize,
    /// Chunks of 2048 logits each CTA of the sampling kernels takes
    /// (`BITNET_CUDA_SAMPLE_GROUP`; 0, the default: as many as make a call's
    /// grid about one wave, see [`GpuContext::sample_rows`]).
    sample_group: usize,
    /// CTAs of the fused decode kernel by (kernel, shared memory bytes).
    fused_grid: std::sync::Mutex<fused::FusedGrids>,
    /// Most fused-decode CTAs per SM (`BITNET_CUDA_FUSED_CTAS`, default 2).
    fused_ctas_per_sm: u32,
    /// Virtual CTAs of 256 threads per fused-decode CTA: 1 or 2, or 0 to
    /// choose per launch (`BITNET_CUDA_FUSED_HALVES`,
    /// [`GpuContext::set_fused_halves`]).
    fused_halves: std::sync::atomic::AtomicUsize,
    /// The fused kernel's weight prefetch schedule (`BITNET_CUDA_FUSED_PREFETCH`,
    /// [`GpuContext::set_fused_prefetch`]): 0 none; 1 into L2 a layer ahead;
    /// 2 into L2 a stage ahead, the default (BF16 batch 1 on the H200,
    /// session 9: 1.697 ms/step with none, 1.761 with 1, 1.661 with 2;
    /// docs/perf/gpu.md).
    fused_prefetch: std::sync::atomic::AtomicI32,
    /// The fused kernel's weight buffer per norm, where it fits (the default;
    /// `BITNET_CUDA_FUSED_SEPW=0` and [`GpuContext::set_fused_sep_w`] turn it
    /// off: the `_w1` kernels).
    pub(crate) fused_sep_w: std::sync::atomic::AtomicBool,
    /// Attention of f16/bf16 caches on tensor cores (`BITNET_CUDA_ATTENTION=scalar`
    /// turns it off; see [`GpuContext::attention_on_tensor_cores`]).
    pub(crate) attention_mma: std::sync::atomic::AtomicBool,
    /// CTAs the attention's split count aims for (0: two per SM;
    /// `BITNET_CUDA_ATTENTION_CTAS`; see [`GpuContext::attention_split_count`]).
    pub(crate) attention_ctas: std::sync::atomic::AtomicUsize,
    /// Passes of up to `one_max` tokens on the one-tile kernels (`_1`; else `_b`).
    pub(crate) ternary_one: std::sync::atomic::AtomicBool,
    /// CTAs the cluster ternary kernels' split count aims for (0: one per
    /// SM; `BITNET_CUDA_CLUSTER_CTAS`).
    pub(crate) cluster_ctas: usize,
    /// Most tokens of a pass on the one-tile kernels where the cluster
    /// kernels do not pay (`BITNET_CUDA_ONE_MAX`, default
    /// [`ops::ONE_TILE_MAX_TOKENS`]).
    pub(crate) one_max: usize,
    /// Decode steps take RoPE and the KV write inside the tensor-core
    /// attention kernel (`BITNET_CUDA_ATTENTION_ROPE=0`: a separate rope_kv).
    decode_rope_in_attention: bool,
}

/// Which kernels run the per-operation ternary products
/// (`BITNET_CUDA_TERNARY_TILE=b|b2|s4|c|auto`; see [`GpuContext::set_ternary_batch`];
/// where `Split` applies, passes of up to 12 tokens take the one-tile `_1`
/// kernels instead unless [`GpuContext::set_ternary_one`] turns them off).
/// Every choice gives the same bits: the products are exact integer sums.
/// A device that refuses the staged kernels' shared memory runs `Split` for
/// `Staged4`, and `Auto` never stages there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TernaryBatch {
    /// `ternary_mm_*_b`: 16 rows per CTA, the K range split over its warps.
    Split,
    /// `ternary_mm_*_b2`: as `Split` with 32 rows per CTA, each warp
    /// multiplying two 16-row tiles with every activation fragment it loads.
    Split2,
    /// `ternary_mm_*_s4`: 64 rows x 32 tokens per CTA, cp.async pipeline.
    Staged4,
    /// `ternary_mm_*_c`: 128 weight rows x 32 tokens per thread-block
    /// cluster, the K range split over the cluster's CTAs, for passes the
    /// one-tile kernels do not take (where the device has no clusters:
    /// `Split`; for a K range too long for the kernel's shared memory:
    /// `Split2` when its grid fits one wave, else `Split`).
    Cluster,
    /// Per launch: `Cluster` where it pays (more than 8 tokens, fewer
    /// unsplit cluster tiles than SMs, and more than 16 tokens or at least
    /// 16 Mi weights; compute capability 9.0+); else passes of up to 12
    /// tokens on the one-tile kernels; else `Staged4` when its work fills
    /// every SM (gate/up CTAs count twice, a partial token tile for its
    /// share); else `Split2` when its grid fits one wave (a CTA per SM),
    /// else `Split`.
    Auto,
}

impl TernaryBatch {
    fn code(self) -> u8 {
        match self {
            Self::Split => 0,
            Self::Staged4 => 1,
            Self::Auto => 2,
            Self::Split2 => 3,
            Self::Cluster => 4,
        }
    }

    fn from_code(c: u8) -> Self {
        match c {
            0 => Self::Split,
            1 => Self::Staged4,
            3 => Self::Split2,
            4 => Self::Cluster,
            _ => Self::Auto,
        }
    }
}

/// How a kernel is launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LaunchKind {
    /// With programmatic dependent launch where it is on.
    Plain,
    /// With the cooperative attribute (the driver refuses a grid whose CTAs
    /// cannot all be resident at once, which grid-wide barriers need) and
    /// without programmatic dependent launch (the kernel starts once the
    /// previous one has completed).
    Cooperative,
    /// As `Plain`, in thread-block clusters of this many CTAs along x
    /// (compute capability 9.0+; the grid's x a multiple of it).
    Cluster(u32),
}

/// The launch attribute for thread-block clusters of `x` CTAs along x.
fn cluster_attribute(x: u32) -> sys::CUlaunchAttribute {
    // SAFETY: a zeroed launch attribute is a valid plain-data value; the id
    // and the union member of that id are set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = x;
    attr.value.clusterDim.y = 1;
    attr.value.clusterDim.z = 1;
    attr
}

/// Which code computes the output head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadImpl {
    /// `head_*` in `kernels/bitnet.cu`.
    Kernels,
    /// cuBLAS `cublasGemmEx` (f32 accumulation; no TF32).
    Cublas,
}

impl fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuContext")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("cc", &self.cc)
            .field("ptx", &self.origin)
            .field("pdl", &self.pdl_enabled())
            .field("head", &self.head_impl())
            .finish()
    }
}

type Functions = std::collections::HashMap<&'static str, CudaFunction>;

/// A profiled launch: kernel name, start and end events.
type LaunchEvents = (&'static str, CudaEvent, CudaEvent);

type Loaded = (Arc<CudaModule>, Functions, PtxOrigin);

/// The kernels' module of each device this process has opened.
fn modules() -> std::sync::MutexGuard<'static, std::collections::HashMap<usize, Loaded>> {
    static MODULES: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<usize, Loaded>>> =
        std::sync::OnceLock::new();
    MODULES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds the process-wide lock on driver calls that act on a whole context
/// (see [`context_wide`]); a no-op when this thread already held it.
pub(crate) struct ContextWide(Option<std::sync::MutexGuard<'static, ()>>);

thread_local! {
    static CONTEXT_WIDE_HELD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Drop for ContextWide {
    fn drop(&mut self) {
        if self.0.is_some() {
            CONTEXT_WIDE_HELD.set(false);
        }
    }
}

/// Serialises, across every `GpuContext` of the process, the driver calls
/// that synchronise or restructure a whole context: graph capture and
/// instantiation, `cuMemFree`, `cuMemFreeHost`, cuBLAS handle creation and destruction
/// (`cublasDestroy` synchronises the context). Every context of a device
/// is its primary context, and libcuda 580.159.04 on the H200 crashed
/// (null dereference at 0x298 inside cuCtxSynchronize) when one thread
/// synchronised the context while another instantiated a graph (backend
/// tests on parallel threads, session 28); a context synchronisation also
/// invalidates any capture running meanwhile. These calls are rare (setup,
/// teardown, the first step of each shape), so the lock costs nothing on
/// the replayed steps. Re-entrant on one thread (a nested call is a no-op),
/// so a buffer freed while its thread captures cannot deadlock.
pub(crate) fn context_wide() -> ContextWide {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if CONTEXT_WIDE_HELD.get() {
        return ContextWide(None);
    }
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    CONTEXT_WIDE_HELD.set(true);
    ContextWide(Some(guard))
}

/// A capture in progress ([`GpuContext::begin_capture`]): holds
/// `context_wide` until [`GpuContext::end_capture`] has instantiated the
/// graph, so no other context user of this process breaks it.
#[must_use = "pass it to GpuContext::end_capture"]
pub struct Capturing {
    _lock: ContextWide,
}

impl fmt::Debug for Capturing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Capturing")
    }
}

/// A line for the user when opening device `ordinal` (compute capability
/// `cc`, as the device probe reports it) is about to compile the kernels
/// with NVRTC (33 s on the H200 machine's host; once per build and
/// architecture: no PTX built in by nvcc, none cached, the module not
/// loaded yet in this process); `None` otherwise.
pub fn kernel_compile_notice(ordinal: usize, cc: (i32, i32)) -> Option<String> {
    if modules().contains_key(&ordinal) {
        return None;
    }
    let cc = (cc.0.max(0) as u32, cc.1.max(0) as u32);
    let dir = ptx::cache_dir();
    if !ptx::will_compile(cc, dir.as_deref()).unwrap_or(false) {
        return None;
    }
    let cached = match &dir {
        Some(d) => format!("then cached in {}", d.display()),
        None => "not cached: no cache folder (set BITNET_PTX_CACHE or HOME)".to_string(),
    };
    Some(format!("compiling the CUDA kernels for compute_{}{} with NVRTC (up to a minute, once; {cached})", cc.0, cc.1))
}

/// Where the kernels for a device of compute capability `cc` (as the probe
/// reports it) would come from, for `bitnet devices`; opens no context.
pub fn kernel_source_status(cc: (i32, i32)) -> String {
    let cc = (cc.0.max(0) as u32, cc.1.max(0) as u32);
    if cc < ptx::MIN_COMPUTE_CAPABILITY {
        let (major, minor) = ptx::MIN_COMPUTE_CAPABILITY;
        return format!("none: the kernels need compute capability {major}.{minor} or newer");
    }
    let dir = ptx::cache_dir();
    let shown = dir.as_ref().map_or("nowhere (no cache folder)".to_string(), |d| d.display().to_string());
    match ptx::will_compile(cc, dir.as_deref()) {
        Err(e) => format!("unknown: {e}"),
        Ok(false) if ptx::prebuilt() => "PTX built in by nvcc".to_string(),
        Ok(false) => format!("cached NVRTC PTX for compute_{}{} in {shown}", cc.0, cc.1),
        Ok(true) if ptx::nvrtc_present() => {
            format!("compiled by NVRTC for compute_{}{} on first use, then cached in {shown}", cc.0, cc.1)
        }
        Ok(true) => "cannot be compiled here: libnvrtc not found (put it on the loader path, e.g. \
                     LD_LIBRARY_PATH=/usr/local/cuda/lib64)"
            .to_string(),
    }
}

/// The kernel module of each device's primary context, loaded once per
/// process (every `GpuContext` on a device shares the primary context).
fn load_module_once(
    ctx: &Arc<CudaContext>,
    ordinal: usize,
    cc: (u32, u32),
) -> Result<(Arc<CudaModule>, Functions, PtxOrigin), CudaError> {
    let mut modules = modules();
    if let Some(loaded) = modules.get(&ordinal) {
        return Ok(loaded.clone());
    }
    let (ptx, origin) = ptx::load(cc)?;
    let module = ctx.load_module(ptx).map_err(driver("cuModuleLoadData"))?;
    let mut functions = Functions::new();
    for &name in KERNEL_NAMES {
        functions.insert(name, module.load_function(name).map_err(driver("cuModuleGetFunction"))?);
    }
    let loaded = (module, functions, origin);
    modules.insert(ordinal, loaded.clone());
    Ok(loaded)
}

/// One kernel argument.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    U64(u64),
    F32(f32),
}

/// The developer switch `name` parsed as a number in `range`, else
/// `default` (unset, unparsable or out of range).
fn env_in<T: std::str::FromStr + PartialOrd>(name: &str, range: std::ops::RangeInclusive<T>, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse::<T>().ok()).filter(|v| range.contains(v)).unwrap_or(default)
}

impl GpuContext {
    /// Opens device `ordinal`: checks the libraries, the compute capability
    /// (>= 8.0), creates the context and a stream, and loads the kernels.
    pub fn open(ordinal: usize, hooks: Option<Arc<dyn DeviceHooks>>) -> Result<Self, CudaError> {
        // SAFETY: `is_culib_present` only tries to dlopen libcuda and reports
        // whether that worked; checking it first keeps cudarc from panicking.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("cuCtxCreate"))?;
        let (major, minor) = ctx.compute_capability().map_err(driver("cuDeviceGetAttribute"))?;
        let cc = (major.max(0) as u32, minor.max(0) as u32);
        if cc < ptx::MIN_COMPUTE_CAPABILITY {
            return Err(CudaError::Unsupported { ordinal, cc });
        }
        let name = ctx.name().map_err(driver("cuDeviceGetName"))?;
        // SAFETY: every buffer and launch of this context goes through the
        // one stream below, in order, so cudarc's per-buffer event tracking
        // (meant for several streams) is not needed; it would also record
        // events inside graph captures.
        unsafe { ctx.disable_event_tracking() };
        // A non-default stream: the legacy default stream cannot be captured.
        let stream = ctx.new_stream().map_err(driver("cuStreamCreate"))?;
        let (module, functions, origin) = load_module_once(&ctx, ordinal, cc)?;
        let pdl = cc >= (9, 0) && std::env::var("BITNET_CUDA_PDL").map_or(true, |v| v != "0");
        let mut me = Self {
            ctx,
            stream,
            _module: module,
            functions,
            ordinal,
            name,
            cc,
            origin,
            hooks,
            profile: Default::default(),
            pdl: pdl.into(),
            blas: None,
            blas_note: Default::default(),
            head_cublas: false.into(),
            head_chunk: match std::env::var("BITNET_CUDA_HEAD_CHUNK").ok().and_then(|v| v.parse::<usize>().ok()) {
                Some(c) if c > 0 => (c, c),
                // Measured on the H200 (docs/perf/gpu.md): 64 is the fastest
                // fixed chunk at batches 32-128 and within noise of the
                // smaller ones at batch 1 for f16/bf16 (f32 batch 1 pays 8%).
                _ => (64, 64),
            },
            head_small: Default::default(),
            head_small_try: match std::env::var("BITNET_CUDA_HEAD_SMALL") {
                Ok(v) => v.split(',').filter_map(|s| s.trim().parse::<usize>().ok()).collect(),
                Err(_) => ops::HEAD_SMALL_CHUNKS.to_vec(),
            },
            ternary_batch: match std::env::var("BITNET_CUDA_TERNARY_TILE").as_deref() {
                Ok("b") => TernaryBatch::Split,
                Ok("b2") => TernaryBatch::Split2,
                Ok("s4") => TernaryBatch::Staged4,
                Ok("c") => TernaryBatch::Cluster,
                _ => TernaryBatch::Auto,
            }
            .code()
            .into(),
            staged_ok: false,
            cluster_ok: false,
            sms: 0,
            sample_group: env_in("BITNET_CUDA_SAMPLE_GROUP", 0..=1024, 0),
            fused_grid: Default::default(),
            fused_ctas_per_sm: env_in("BITNET_CUDA_FUSED_CTAS", 1..=2, 2),
            pinned: std::sync::Mutex::new(None),
            pinned_on: std::env::var("BITNET_CUDA_PINNED").map_or(true, |v| v != "0"),
            fused_halves: env_in("BITNET_CUDA_FUSED_HALVES", 0..=2, 0).into(),
            fused_prefetch: env_in("BITNET_CUDA_FUSED_PREFETCH", 0..=2, 2).into(),
            fused_sep_w: std::env::var("BITNET_CUDA_FUSED_SEPW").map_or(true, |v| v != "0").into(),
            attention_mma: std::env::var("BITNET_CUDA_ATTENTION").map_or(true, |v| v != "scalar").into(),
            attention_ctas: std::env::var("BITNET_CUDA_ATTENTION_CTAS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0)
                .into(),
            ternary_one: std::env::var("BITNET_CUDA_TERNARY_ONE").map_or(true, |v| v != "0").into(),
            one_max: std::env::var("BITNET_CUDA_ONE_MAX")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(ops::ONE_TILE_MAX_TOKENS),
            cluster_ctas: std::env::var("BITNET_CUDA_CLUSTER_CTAS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0),
            decode_rope_in_attention: std::env::var("BITNET_CUDA_ATTENTION_ROPE").map_or(true, |v| v != "0"),
        };
        me.sms = me.sm_count()?;
        // The staged ternary kernels take more than the default 48 KB of
        // dynamic shared memory; a device that refuses it keeps the K-split
        // kernels for every pass (same results).
        me.staged_ok = ops::staged_smem_sizes().iter().all(|&(name, bytes)| {
            bytes <= 48 * 1024
                || (i32::try_from(bytes).ok()).zip(me.function(name).ok()).is_some_and(|(b, f)| {
                    f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, b)
                        .is_ok()
                })
        });
        // The cluster kernels: compute capability 9.0 and up to 64 KB of
        // dynamic shared memory (`BITNET_CUDA_CLUSTER=0` turns them off);
        // elsewhere every choice resolves to others.
        me.cluster_ok = me.cc >= (9, 0)
            && std::env::var("BITNET_CUDA_CLUSTER").map_or(true, |v| v != "0")
            && ops::CLUSTER_KERNELS.iter().all(|&name| {
                me.function(name).is_ok_and(|f| {
                    f.set_attribute(
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        ops::TC_MAX_SMEM as i32,
                    )
                    .is_ok()
                        && me.clusters_fit(f.cu_function())
                })
            });
        // cuBLAS for the head unless BITNET_CUDA_HEAD=kernels; without it
        // (or when it cannot start) our kernels compute the head.
        if std::env::var("BITNET_CUDA_HEAD").is_ok_and(|v| v == "kernels") {
            me.set_cublas_note("BITNET_CUDA_HEAD=kernels".into());
        } else {
            let made = me
                .alloc("cuBLAS workspace", blas::WORKSPACE_BYTES)
                .map_err(|e| e.to_string())
                .and_then(|ws| blas::Blas::new(me.stream.cu_stream(), ws));
            match made {
                Ok(b) => {
                    me.blas = Some(b);
                    me.head_cublas.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Err(why) => me.set_cublas_note(why),
            }
        }
        Ok(me)
    }

    /// Which code computes the head now.
    pub fn head_impl(&self) -> HeadImpl {
        if self.blas.is_some() && self.head_cublas.load(std::sync::atomic::Ordering::Relaxed) {
            HeadImpl::Cublas
        } else {
            HeadImpl::Kernels
        }
    }

    /// Why the head is not on cuBLAS (empty when it is).
    pub fn cublas_note(&self) -> String {
        self.blas_note.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records why the head left (or never used) cuBLAS.
    pub fn set_cublas_note(&self, why: String) {
        *self.blas_note.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Chooses cuBLAS (when it loaded) or our kernels for the head; returns
    /// the choice in effect. Buffers sized by [`Self::head_logits_bytes`]
    /// must be sized again after a change.
    pub fn set_head_impl(&self, want: HeadImpl) -> HeadImpl {
        self.head_cublas.store(want == HeadImpl::Cublas, std::sync::atomic::Ordering::Relaxed);
        self.head_impl()
    }

    /// Chooses the kernels of the per-operation ternary products
    /// (all give the same bits; for A/B runs and tests); returns the choice
    /// in effect ([`TernaryBatch::Split`] for `Staged4` where the device
    /// cannot give the staged kernels their shared memory; `Auto` then never
    /// picks them).
    pub fn set_ternary_batch(&self, which: TernaryBatch) -> TernaryBatch {
        self.ternary_batch.store(which.code(), std::sync::atomic::Ordering::Relaxed);
        self.ternary_batch()
    }

    /// Runs per-operation ternary products of up to 12 tokens on the
    /// one-tile kernels (`ternary_mm_*_1`, true: the default) or on the
    /// K-split ones (`_b`); the same bits (for A/B runs and tests;
    /// `BITNET_CUDA_TERNARY_ONE=0` turns them off).
    pub fn set_ternary_one(&self, on: bool) {
        self.ternary_one.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn ternary_batch(&self) -> TernaryBatch {
        match TernaryBatch::from_code(self.ternary_batch.load(std::sync::atomic::Ordering::Relaxed)) {
            TernaryBatch::Staged4 if !self.staged_ok => TernaryBatch::Split,
            TernaryBatch::Cluster if !self.cluster_ok() => TernaryBatch::Split,
            which => which,
        }
    }

    /// Whether the staged ternary kernels could be given their shared memory.
    pub(crate) fn staged_ok(&self) -> bool {
        self.staged_ok
    }

    /// Whether the `_c` ternary kernels run here: thread-block clusters
    /// (compute capability 9.0+), their shared memory, a cluster of the
    /// largest shape they use resident at once, and not turned off
    /// (`BITNET_CUDA_CLUSTER=0`).
    pub fn cluster_ok(&self) -> bool {
        self.cluster_ok
    }

    /// Whether the driver can make at least one cluster of the largest
    /// shape the `_c` kernels launch resident (8 CTAs of 256 threads with
    /// [`ops::TC_MAX_SMEM`] bytes each), asked before the first launch so
    /// that a device or partition that cannot is never sent one.
    fn clusters_fit(&self, f: sys::CUfunction) -> bool {
        let mut attr = cluster_attribute(8);
        let cfg = sys::CUlaunchConfig {
            gridDimX: 8,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: 256,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: ops::TC_MAX_SMEM as u32,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        let mut clusters: std::ffi::c_int = 0;
        if self.ctx.bind_to_thread().is_err() {
            return false;
        }
        // SAFETY: `f` is a function of this context's loaded module, `cfg`
        // and `attr` live across the call, and `clusters` is a valid out
        // pointer; the driver only reads the configuration.
        let rc = unsafe { sys::cuOccupancyMaxActiveClusters(&mut clusters, f, &cfg) };
        rc == sys::CUresult::CUDA_SUCCESS && clusters >= 1
    }

    /// Programmatic dependent launch (compute capability 9.0+, on by default;
    /// `BITNET_CUDA_PDL=0` turns it off): each kernel may be launched while
    /// the previous one still runs, waits for it inside (`pdl_wait` in
    /// `kernels/bitnet.cu`) and meanwhile prefetches its weights. Asking for
    /// it below 9.0 leaves it off.
    pub fn set_pdl(&self, on: bool) {
        self.pdl.store(on && self.cc >= (9, 0), std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets the fused decode kernel's weight prefetch schedule (0 ..= 2, see
    /// `BITNET_CUDA_FUSED_PREFETCH`; the same results in each); returns the
    /// schedule in effect (unchanged for a value out of range). A backend
    /// sets it before its first step: CUDA graphs keep the launch they
    /// captured.
    pub fn set_fused_prefetch(&self, mode: i32) -> i32 {
        if (0..=2).contains(&mode) {
            self.fused_prefetch.store(mode, std::sync::atomic::Ordering::Relaxed);
        }
        self.fused_prefetch.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs the fused decode kernel in CTAs of 256 threads (`halves` 1), of
    /// 512 threads (2: each CTA holds two of the 256-thread CTAs for the
    /// products and four attention units, but runs each norm, grid-barrier
    /// arrival and row load once; one CTA per SM), or (0, the default) in
    /// whichever [`GpuContext::fused_halves_for`] picks; the same results in
    /// each. Returns the setting in effect (unchanged for a value above 2).
    /// A backend sets it before its first step.
    pub fn set_fused_halves(&self, halves: usize) -> usize {
        if halves <= 2 {
            self.fused_halves.store(halves, std::sync::atomic::Ordering::Relaxed);
        }
        self.fused_halves.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The fused kernel's halves per CTA for a launch with attention on
    /// tensor cores (`att_mma`) or not, in `splits` position splits, and
    /// whether the setting asked for it (else it was chosen). Chosen: two
    /// halves with tensor-core attention in at most 4 splits, else one.
    /// Measured on the H200 (2B-4T, batch 1, alternated in one call; session
    /// 20): BF16 at prompt 128 (4 splits) 1.320-1.323 -> 1.278-1.290 ms per
    /// step, at prompt 32 (1 split) 1.306-1.308 -> 1.293-1.295; at prompt
    /// 1024 (13 splits) 1.519-1.521 -> 1.533-1.541 and FP32 (scalar
    /// attention) at 128 1.947-1.950 -> 1.976-1.994, both slower.
    pub fn fused_halves_for(&self, att_mma: bool, splits: usize) -> (usize, bool) {
        fused::choose_halves(self.fused_halves.load(std::sync::atomic::Ordering::Relaxed), att_mma, splits)
    }

    /// Gives the fused kernel's norms a weight buffer each where the shared
    /// memory allows (true, the default) or one buffer (the `_w1` kernels);
    /// the same results either way. A backend sets it before its first step.
    pub fn set_fused_sep_w(&self, on: bool) {
        self.fused_sep_w.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs attention of f16/bf16 caches on tensor cores (the default) or
    /// on the scalar kernels. Changes the split count and the last bits of
    /// the results: a backend sets it before its first step, never between.
    pub fn set_attention_mma(&self, on: bool) {
        self.attention_mma.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets the number of CTAs the attention's split count aims for (0, the
    /// default: two per SM, or `BITNET_CUDA_ATTENTION_CTAS`; see
    /// [`GpuContext::attention_split_count`]): on tensor cores 1 gives every
    /// row one split, a large number one split per chunk; scalar attention
    /// uses it for one row only (at most target / query heads splits). Changes the last bits of the
    /// results: a backend sets it before its first step, never between.
    pub fn set_attention_ctas(&self, ctas: usize) {
        self.attention_ctas.store(ctas, std::sync::atomic::Ordering::Relaxed);
    }

    /// Streaming multiprocessors of the device.
    pub(crate) fn sm_count(&self) -> Result<usize, CudaError> {
        let sms = self
            .ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("cuDeviceGetAttribute"))?;
        usize::try_from(sms).map_err(|_| CudaError::Shape(format!("device reports {sms} multiprocessors")))
    }

    /// Whether a decode step of `precision` and this head_dim should use
    /// [`GpuContext::attention_decode_rope`] (tensor-core attention, unless
    /// `BITNET_CUDA_ATTENTION_ROPE=0`).
    pub fn decode_rope_in_attention(&self, precision: GpuDType, head_dim: usize) -> bool {
        self.decode_rope_in_attention && self.attention_on_tensor_cores(precision, head_dim)
    }

    pub fn pdl_enabled(&self) -> bool {
        self.pdl.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn compute_capability(&self) -> (u32, u32) {
        self.cc
    }

    pub fn ptx_origin(&self) -> &PtxOrigin {
        &self.origin
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize), CudaError> {
        self.ctx.mem_get_info().map_err(driver("cuMemGetInfo"))
    }

    /// Tells the hooks that a backend on this context is ready.
    pub fn notify_ready(&self) {
        if let Some(h) = &self.hooks {
            h.on_ready();
        }
    }

    /// Tells the hooks that a backend on this context starts a step.
    pub fn notify_step(&self) {
        if let Some(h) = &self.hooks {
            h.on_step();
        }
    }

    fn hook_launch(&self, what: &str) -> Result<(), CudaError> {
        match &self.hooks {
            Some(h) => h.on_launch(what).map_err(CudaError::Injected),
            None => Ok(()),
        }
    }

    /// A zeroed allocation of `bytes` (at least 1) for `what`.
    pub fn alloc(&self, what: &str, bytes: usize) -> Result<DevBuf, CudaError> {
        let bytes = bytes.max(1);
        if let Some(h) = &self.hooks {
            h.on_alloc(bytes as u64).map_err(|message| CudaError::OutOfMemory {
                what: what.to_string(),
                bytes,
                message: format!("injected: {message}"),
            })?;
        }
        self.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
        // SAFETY: a plain allocation of `bytes` > 0 bytes in the bound context.
        let ptr = unsafe { cu::malloc_sync(bytes) }.map_err(|e| {
            if let Some(h) = &self.hooks {
                h.on_free(bytes as u64);
            }
            CudaError::OutOfMemory { what: what.to_string(), bytes, message: e.to_string() }
        })?;
        let buf = DevBuf { stream: self.stream.clone(), ptr, len: bytes, hooks: self.hooks.clone() };
        // On this stream, so later copies and kernels on it are ordered after
        // it (the legacy-stream cuMemsetD8 is not ordered with a
        // non-blocking stream and could zero the buffer after an upload).
        // SAFETY: `ptr` is the start of the `bytes`-byte allocation just made.
        unsafe { cu::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }.map_err(driver("cuMemsetD8Async"))?;
        Ok(buf)
    }

    /// An allocation holding `data`.
    pub fn upload(&self, what: &str, data: &[u8]) -> Result<DevBuf, CudaError> {
        let buf = self.alloc(what, data.len())?;
        self.write(buf.all(), data)?;
        Ok(buf)
    }

    /// Copies `data` to the start of `dst` (asynchronous on the stream; the
    /// host buffer may be reused on return).
    pub fn write(&self, dst: DevRange, data: &[u8]) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
        let ptr = dst.need("host-to-device copy", data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        self.hook_launch("cuMemcpyHtoDAsync")?;
        // SAFETY: `dst` lies inside a live allocation and holds at least
        // `data.len()` bytes (checked above); for pageable host memory the
        // driver stages the copy before returning, so `data` may go.
        unsafe { cu::memcpy_htod_async(ptr, data, self.stream.cu_stream()) }.map_err(driver("cuMemcpyHtoDAsync"))
    }

    /// Copies the first `out.len()` bytes of `src` to the host, waiting for
    /// all earlier work on the stream. Reads of at least
    /// [`PINNED_MIN_BYTES`] go through a page-locked buffer kept for the
    /// purpose (several times faster than the driver's staging of pageable
    /// memory), or directly where none can be had.
    pub fn read(&self, src: DevRange, out: &mut [u8]) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
        let ptr = src.need("device-to-host copy", out.len())?;
        self.hook_launch("cuMemcpyDtoHAsync")?;
        if self.pinned_on && out.len() >= PINNED_MIN_BYTES {
            let total = out.len();
            let copied = self.read_pinned(ptr, total, 1, |offset, staged| {
                // Large pieces are copied out by the rayon pool.
                out[offset..offset + staged.len()]
                    .par_chunks_mut(COPY_OUT_CHUNK)
                    .zip(staged.par_chunks(COPY_OUT_CHUNK))
                    .for_each(|(dst, src)| dst.copy_from_slice(src));
            });
            if let Some(result) = copied {
                return result;
            }
        }
        self.read_pageable(ptr, out)
    }

    /// The copy of [`Self::read`] straight into `out` (pageable memory, the
    /// driver staging it); `src` holds `out.len()` bytes, the context is
    /// bound and the hooks were consulted.
    fn read_pageable(&self, src: sys::CUdeviceptr, out: &mut [u8]) -> Result<(), CudaError> {
        if !out.is_empty() {
            // SAFETY: `src` lies inside a live allocation with at least
            // `out.len()` bytes (checked by the caller); the stream is
            // synchronised below before `out` is used or freed.
            unsafe { cu::memcpy_dtoh_async(out, src, self.stream.cu_stream()) }.map_err(driver("cuMemcpyDtoHAsync"))?;
        }
        self.synchronize()
    }

    /// `rows` rows of `row_len` f32 values starting at `src`, one vector a
    /// row, waiting for all earlier work on the stream: through the
    /// page-locked buffer in pieces of whole rows, each piece's rows copied
    /// out by the rayon pool (reading logits row by row through pageable
    /// memory cost about 0.1 ms a 513 KB row on the H200 host).
    pub fn read_rows_f32(&self, src: DevRange, row_len: usize, rows: usize) -> Result<Vec<Vec<f32>>, CudaError> {
        let row_bytes = ops::bytes("rows read", &[row_len, 4])?;
        let total = ops::bytes("rows read", &[rows, row_len, 4])?;
        self.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
        let ptr = src.need("device-to-host copy", total)?;
        self.hook_launch("cuMemcpyDtoHAsync")?;
        if self.pinned_on && total >= PINNED_MIN_BYTES && row_bytes <= PINNED_MAX_BYTES {
            let mut out: Vec<Vec<f32>> = Vec::with_capacity(rows);
            let copied = self.read_pinned(ptr, total, row_bytes, |_, staged| {
                let piece: Vec<Vec<f32>> = staged.par_chunks(row_bytes).map(row_to_f32).collect();
                out.extend(piece);
            });
            if let Some(result) = copied {
                return result.map(|()| out);
            }
        }
        let mut all = vec![0u8; total];
        self.read_pageable(ptr, &mut all)?;
        Ok(all.chunks_exact(row_bytes.max(1)).take(rows).map(row_to_f32).collect())
    }

    /// Copies `total` bytes at `src` (which holds them) through the
    /// page-locked buffer, grown to the read (up to [`PINNED_MAX_BYTES`],
    /// rounded down to a multiple of `align`), in pieces of that size, each
    /// handed to `sink` with its offset once it has arrived. `None` when no
    /// page-locked memory could be allocated (nothing was copied then).
    fn read_pinned(
        &self,
        src: sys::CUdeviceptr,
        total: usize,
        align: usize,
        mut sink: impl FnMut(usize, &[u8]),
    ) -> Option<Result<(), CudaError>> {
        let align = align.max(1);
        let mut slot = self.pinned.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let want = total.min(PINNED_MAX_BYTES / align * align);
        if want == 0 {
            return None;
        }
        if slot.as_ref().is_none_or(|buffer| buffer.len() < want) {
            // Free the smaller buffer before taking the larger one.
            *slot = None;
            *slot = Some(pinned::PinnedBuffer::new(&self.ctx, want).ok()?);
        }
        let buffer = slot.as_mut()?;
        let piece_len = buffer.len().min(PINNED_MAX_BYTES) / align * align;
        let mut offset = 0;
        while offset < total {
            let n = piece_len.min(total - offset);
            let staged = buffer.bytes_mut(n);
            // SAFETY: `src` holds `total` bytes (checked by the caller), so
            // the `n` bytes at `offset` lie inside it; `staged` is page-locked
            // host memory of `n` bytes, borrowed mutably here and read only
            // after the stream is synchronised below.
            let copied = unsafe { cu::memcpy_dtoh_async(staged, src + offset as u64, self.stream.cu_stream()) }
                .map_err(driver("cuMemcpyDtoHAsync"))
                .and_then(|()| self.synchronize());
            if let Err(err) = copied {
                return Some(Err(err));
            }
            sink(offset, buffer.bytes_mut(n));
            offset += n;
        }
        Some(Ok(()))
    }

    /// Sets the bytes of `dst` to zero (asynchronous; capturable).
    pub fn zero(&self, dst: DevRange) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
        if dst.is_empty() {
            return Ok(());
        }
        self.hook_launch("cuMemsetD8Async")?;
        // SAFETY: `dst` lies inside a live allocation of at least `dst.len` bytes.
        unsafe { cu::memset_d8_async(dst.ptr, 0, dst.len, self.stream.cu_stream()) }.map_err(driver("cuMemsetD8Async"))
    }

    /// Copies `src` to `dst` on the device (lengths must match).
    pub fn copy(&self, dst: DevRange, src: DevRange) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
        let ptr = dst.need("device-to-device copy", src.len)?;
        if src.is_empty() {
            return Ok(());
        }
        self.hook_launch("cuMemcpyDtoDAsync")?;
        // SAFETY: both ranges lie inside live allocations; `dst` holds at least `src.len` bytes.
        unsafe { cu::memcpy_dtod_async(ptr, src.ptr, src.len, self.stream.cu_stream()) }
            .map_err(driver("cuMemcpyDtoDAsync"))
    }

    /// Waits for all work on the stream; reports asynchronous kernel errors.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(driver("cuStreamSynchronize"))
    }

    /// Starts capturing the stream's launches into a graph; hand the token
    /// to [`Self::end_capture`]. Until then this process's other context
    /// users wait to free buffers, capture or destroy cuBLAS handles (see
    /// `context_wide`), and this thread must not wait on them.
    pub fn begin_capture(&self) -> Result<Capturing, CudaError> {
        let lock = context_wide();
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver("cuStreamBeginCapture"))?;
        Ok(Capturing { _lock: lock })
    }

    /// Ends the capture and instantiates the graph.
    pub fn end_capture(&self, capturing: Capturing) -> Result<GpuGraph, CudaError> {
        let _capturing = capturing;
        let graph = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(driver("cuStreamEndCapture"))?
            .ok_or(CudaError::Driver { call: "cuStreamEndCapture", message: "empty graph".into() })?;
        Ok(GpuGraph { graph })
    }

    /// Replays a captured graph on the stream.
    pub fn launch_graph(&self, graph: &GpuGraph) -> Result<(), CudaError> {
        self.hook_launch("cuGraphLaunch")?;
        graph.graph.launch().map_err(driver("cuGraphLaunch"))
    }

    /// Times `f` with CUDA events on the stream, in milliseconds.
    pub fn time_ms(&self, f: impl FnOnce() -> Result<(), CudaError>) -> Result<f32, CudaError> {
        let start = self.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver("cuEventCreate"))?;
        let end = self.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver("cuEventCreate"))?;
        start.record(&self.stream).map_err(driver("cuEventRecord"))?;
        f()?;
        end.record(&self.stream).map_err(driver("cuEventRecord"))?;
        end.synchronize().map_err(driver("cuEventSynchronize"))?;
        start.elapsed_ms(&end).map_err(driver("cuEventElapsedTime"))
    }

    /// Starts (or stops) timing every kernel launch with CUDA events.
    pub fn set_profiling(&self, on: bool) {
        let mut p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
        *p = on.then(Vec::new);
    }

    /// Per kernel name: (total milliseconds, launches) since profiling
    /// started, in order of total time; waits for the stream.
    pub fn take_profile(&self) -> Result<Vec<(&'static str, f64, usize)>, CudaError> {
        self.synchronize()?;
        let mut p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
        let mut totals: Vec<(&'static str, f64, usize)> = Vec::new();
        for (name, start, end) in p.take().unwrap_or_default() {
            let ms = f64::from(start.elapsed_ms(&end).map_err(driver("cuEventElapsedTime"))?);
            match totals.iter_mut().find(|t| t.0 == name) {
                Some(t) => {
                    t.1 += ms;
                    t.2 += 1;
                }
                None => totals.push((name, ms, 1)),
            }
        }
        totals.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(totals)
    }

    fn function(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        self.functions.get(name).ok_or_else(|| CudaError::Shape(format!("no kernel named {name}")))
    }

    /// Launches kernel `name`. The caller (a wrapper in `ops`) has checked
    /// every pointer argument's range against the dimensions it passes.
    pub(crate) fn launch(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        self.launch_with(name, grid, block, smem, args, LaunchKind::Plain)
    }

    /// [`Self::launch`] of a [`LaunchKind`].
    pub(crate) fn launch_with(
        &self,
        name: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[Arg],
        kind: LaunchKind,
    ) -> Result<(), CudaError> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        self.hook_launch(name)?;
        let f = self.function(name)?.cu_function();
        // Each argument's bytes in an 8-byte slot; the driver reads the
        // kernel's parameter sizes from the function itself.
        #[repr(C, align(8))]
        #[derive(Clone, Copy)]
        struct Slot([u8; 8]);
        let mut slots: Vec<Slot> = args
            .iter()
            .map(|arg| {
                let mut b = [0u8; 8];
                match *arg {
                    Arg::Ptr(p) | Arg::U64(p) => b.copy_from_slice(&p.to_ne_bytes()),
                    Arg::I32(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
                    Arg::F32(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
                }
                Slot(b)
            })
            .collect();
        let mut params: Vec<*mut std::ffi::c_void> =
            slots.iter_mut().map(|s| s.0.as_mut_ptr().cast::<std::ffi::c_void>()).collect();
        // SAFETY: a zeroed launch attribute is a valid plain-data value; only
        // the id and the union member of that id are set below.
        let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
        let mut n_attrs = 0usize;
        if kind == LaunchKind::Cooperative {
            attrs[0].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
            attrs[0].value.cooperative = 1;
            n_attrs = 1;
        } else if self.pdl_enabled() {
            attrs[0].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attrs[0].value.programmaticStreamSerializationAllowed = 1;
            n_attrs = 1;
        }
        if let LaunchKind::Cluster(x) = kind {
            if x == 0 || !grid.0.is_multiple_of(x) {
                return Err(CudaError::Shape(format!("{name}: grid {} is not a multiple of the cluster {x}", grid.0)));
            }
            attrs[n_attrs] = cluster_attribute(x);
            n_attrs += 1;
        }
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: smem,
            hStream: self.stream.cu_stream(),
            attrs: if n_attrs > 0 { attrs.as_mut_ptr() } else { std::ptr::null_mut() },
            numAttrs: n_attrs as u32,
        };
        self.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
        self.profiled(name, || {
            // SAFETY: the argument list matches the kernel's C signature (each
            // wrapper in `ops` is written against `kernels/bitnet.cu`), every
            // pointer is a checked `DevRange` of a live allocation large enough
            // for the dimensions passed with it; `params` points into `slots`,
            // and both (and `attrs`) outlive this call (the driver copies the
            // values at launch). `f` belongs to this context's loaded module.
            let rc = unsafe { sys::cuLaunchKernelEx(&cfg, f, params.as_mut_ptr(), std::ptr::null_mut()) };
            rc.result().map_err(driver("cuLaunchKernelEx"))
        })
    }

    /// Runs `enqueue` (work on the stream), bracketed by events named `name`
    /// while profiling is on.
    fn profiled(&self, name: &'static str, enqueue: impl FnOnce() -> Result<(), CudaError>) -> Result<(), CudaError> {
        let mut profile = self.profile.lock().unwrap_or_else(|e| e.into_inner());
        let start = match profile.as_ref() {
            Some(_) => Some(
                self.stream
                    .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(driver("cuEventRecord"))?,
            ),
            None => None,
        };
        enqueue()?;
        if let (Some(start), Some(list)) = (start, profile.as_mut()) {
            let end = self
                .stream
                .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(driver("cuEventRecord"))?;
            list.push((name, start, end));
        }
        Ok(())
    }
}
