//! The fallback engine: owns the CPU backend (always there) and the GPU
//! backend (when there is one), places each request before it runs, and
//! moves requests to the CPU when the GPU fails under them.
//!
//! **Before running** ([`decision::decide`]): a request goes to the CPU,
//! with a typed [`FallbackReason`], when there is no GPU, the GPU is
//! unhealthy, the precision it needs is unsupported or needs tensor cores
//! the GPU lacks, or the memory plan (weights, the KV cache of every
//! sequence on the GPU plus this one, the workspace;
//! [`crate::memory_plan`]) exceeds the free memory measured at start-up
//! times `gpu_memory_utilization`.
//!
//! **While running**: the engine keeps every GPU sequence's tokens. When a
//! GPU call fails, the affected sequences are removed from the GPU, added to
//! the CPU backend and prefilled there with all their tokens, then run the
//! step's new tokens on the CPU, so no request is lost. An out-of-memory
//! error moves the sequences of the failed step and leaves the GPU healthy;
//! any other device error poisons the context: every GPU sequence moves,
//! the GPU backends are dropped, and the GPU is unhealthy for a cool-down
//! (doubling after each failed recovery). Then a new backend is created on
//! a background thread and must pass a self-test (its logits for a fixed
//! prompt against the CPU backend's) before new work goes to it.
//!
//! Every sequence has a [`SequenceReport`]: device, precision, quantization,
//! and the fallback with its reason and what it cost (the failed GPU
//! attempt plus the CPU re-prefill; for a decision before running, the time
//! the decision took).
//!
//! ```
//! use std::sync::Arc;
//! use bitnet_inference::engine::{Engine, RequestPreferences, DevicePreference, FallbackReason};
//! use bitnet_inference::{CpuBackend, CpuBackendConfig, StepInput};
//! use bitnet_models::synthetic::{self, Preset};
//!
//! let model = Arc::new(synthetic::generate(Preset::Tiny, 1).unwrap());
//! let cpu = CpuBackend::new(model, &CpuBackendConfig::default()).unwrap();
//! let mut engine = Engine::cpu_only(Box::new(cpu));
//! let wants_gpu = RequestPreferences { device: DevicePreference::Gpu, ..Default::default() };
//! let report = engine.add_sequence(7, 16, &wants_gpu).unwrap();
//! assert_eq!(report.device, "cpu");
//! assert_eq!(report.fallback.unwrap().reason, FallbackReason::GpuUnavailable);
//! let logits = engine.step(&[StepInput { seq: 7, tokens: &[1, 2, 3] }]);
//! assert!(logits[0].is_ok());
//! ```

pub mod decision;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitnet_device::{GpuInfo, Precision};
use bitnet_models::BitNetConfig;

use crate::backend::{validate_step, Backend, BackendError, BackendInfo, SeqId, StepInput, StepOutput, StepWant};
use crate::memory_plan::{gpu_memory_plan, GpuMemoryPlan};

pub use decision::{
    decide, DevicePreference, FallbackReason, GpuView, Placement, PrecisionNeed, PrecisionPreference, PreferenceError,
    QuantizationPreference, RequestPreferences,
};

/// Creates the GPU backend at a precision; called at start-up and again to
/// recreate the context after a cool-down.
pub type BackendFactory = Box<dyn Fn(Precision) -> Result<Box<dyn Backend>, BackendError> + Send + Sync>;

type SharedFactory = Arc<dyn Fn(Precision) -> Result<Box<dyn Backend>, BackendError> + Send + Sync>;

/// The GPU side given to [`Engine::new`].
pub struct PrimaryDevice {
    /// The GPU as decisions should see it (after `FaultPlan::apply`).
    pub gpu: GpuInfo,
    pub factory: BackendFactory,
    /// Whether the model has an untied output head (it then takes memory
    /// again on the GPU; see [`crate::memory_plan::gpu_memory_plan_for_model`]).
    pub untied_head: bool,
}

impl fmt::Debug for PrimaryDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrimaryDevice").field("gpu", &self.gpu).field("untied_head", &self.untied_head).finish()
    }
}

/// Tuning of the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// The largest step, in tokens (sizes the GPU workspace in the memory plan).
    pub max_batch_tokens: usize,
    /// Share of the free GPU memory measured at start-up that the plan may
    /// use (vLLM's `gpu_memory_utilization`).
    pub gpu_memory_utilization: f64,
    /// Wait after a poisoning error before recreating the GPU context.
    pub cool_down: Duration,
    /// The cool-down doubles after each failed recovery, up to this.
    pub max_cool_down: Duration,
    /// The prefix cache's size, in KV positions (0: off). A sequence ended
    /// with [`Engine::retire_sequence`] keeps its KV cache while the entries
    /// fit this many positions together (least recently used evicted first);
    /// [`Engine::reuse_prefix`] starts a new sequence from the longest one
    /// its prompt begins with.
    pub prefix_cache_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 2048,
            gpu_memory_utilization: 0.9,
            cool_down: Duration::from_secs(1),
            max_cool_down: Duration::from_secs(60),
            prefix_cache_tokens: 0,
        }
    }
}

/// A fallback that happened to one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackRecord {
    pub reason: FallbackReason,
    /// Time the fallback added: deciding (before running), or the failed GPU
    /// attempt plus the CPU re-prefill (while running).
    pub cost: Duration,
}

/// Where and how a sequence ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceReport {
    pub device: String,
    pub precision: String,
    pub quantization: String,
    pub fallback: Option<FallbackRecord>,
}

/// The GPU's state, as metrics report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GpuHealth {
    /// No GPU backend.
    Absent,
    Healthy,
    /// Unhealthy after a poisoning error, waiting out the cool-down.
    CoolingDown,
    /// A new context is being created and self-tested.
    Recovering,
}

impl GpuHealth {
    pub const ALL: [GpuHealth; 4] = [Self::Absent, Self::Healthy, Self::CoolingDown, Self::Recovering];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Absent => "absent",
            Self::Healthy => "healthy",
            Self::CoolingDown => "cooling_down",
            Self::Recovering => "recovering",
        }
    }
}

/// Something metrics and logs should hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    Fallback { seq: SeqId, reason: FallbackReason, cost: Duration },
    Health { health: GpuHealth, detail: String },
}

#[derive(Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Preference(#[from] PreferenceError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("invalid engine configuration: {0}")]
    Config(String),
}

/// The sequence id the engine uses for self-tests, on backends that hold no
/// other sequence at that moment.
const SELF_TEST_SEQ: SeqId = SeqId::MAX;

/// Smallest Pearson correlation between a recreated GPU backend's logits and
/// the CPU backend's on the self-test prompt. fp16/bf16 and f32 forward
/// passes of a BitNet model correlate far above this; a broken context
/// gives noise, NaN, or nothing.
pub const SELF_TEST_MIN_CORRELATION: f64 = 0.99;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Location {
    Gpu(Precision),
    Cpu,
}

struct SequenceState {
    location: Location,
    max_positions: usize,
    /// Every token its cache holds: for a re-run on the CPU when it is on
    /// the GPU, and as the key of its prefix-cache entry once retired.
    tokens: Vec<u32>,
    /// KV bytes planned on the GPU.
    kv_bytes: u64,
    report: SequenceReport,
    /// Why moving to the CPU failed; the sequence then fails at its next step.
    failed: Option<String>,
}

/// A retired sequence kept for its KV cache: the prefix cache's entry.
struct CachedPrefix {
    /// The retired sequence's id, still held on the backend at `location`
    /// (a caller adding a sequence of that id evicts the entry).
    seq: SeqId,
    location: Location,
    /// The tokens of the positions it holds (its reservation shrunk to them).
    tokens: Vec<u32>,
    /// KV bytes planned on the GPU.
    kv_bytes: u64,
    /// When it was stored or last reused ([`PrefixCache::clock`]).
    last_used: u64,
}

/// The prefix cache: entries, and what it has done (for metrics).
#[derive(Default)]
struct PrefixCache {
    entries: Vec<CachedPrefix>,
    clock: u64,
    stats: PrefixCacheStats,
}

/// What the prefix cache holds and has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Entries held now.
    pub entries: usize,
    /// Positions they hold together.
    pub tokens: usize,
    /// New sequences that started from an entry, and the positions copied.
    pub hits: u64,
    pub reused_tokens: u64,
    /// Entries evicted to stay within the budget or to make room on the GPU.
    pub evictions: u64,
}

impl PrefixCache {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn tokens(&self) -> usize {
        self.entries.iter().map(|e| e.tokens.len()).sum()
    }
}

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

struct GpuSlot {
    backend: Box<dyn Backend>,
    info: BackendInfo,
    static_bytes: u64,
}

enum Health {
    Healthy,
    CoolingDown { until: Instant },
    Recovering { result: Receiver<Result<Box<dyn Backend>, String>> },
}

struct GpuSide {
    info: GpuInfo,
    factory: SharedFactory,
    untied_head: bool,
    /// Bytes the plan may use: free memory at start-up x utilization.
    budget: u64,
    slots: BTreeMap<Precision, GpuSlot>,
    kv_bytes: u64,
    health: Health,
    /// Precisions whose backend could not be created for lack of memory
    /// although the plan fitted: treated as not fitting until the context is
    /// recreated, instead of failing (slowly) again for every request.
    unfit: BTreeSet<Precision>,
    /// The precision created at warm-up and on recovery (auto's choice).
    warm_precision: Precision,
    failed_recoveries: u32,
}

impl GpuSide {
    fn plan(
        &self,
        config: &BitNetConfig,
        precision: Precision,
        kv_positions: usize,
        batch_tokens: usize,
    ) -> GpuMemoryPlan {
        let mut plan = gpu_memory_plan(config, precision, kv_positions, batch_tokens);
        if self.untied_head {
            plan.weights += config.vocab_size as u64 * config.hidden_size as u64 * precision.element_bytes();
        }
        plan
    }

    fn used(&self) -> u64 {
        self.slots.values().map(|s| s.static_bytes).sum::<u64>() + self.kv_bytes
    }

    fn health(&self) -> GpuHealth {
        match self.health {
            Health::Healthy => GpuHealth::Healthy,
            Health::CoolingDown { .. } => GpuHealth::CoolingDown,
            Health::Recovering { .. } => GpuHealth::Recovering,
        }
    }
}

/// The CPU backend, the GPU backend when present, and the decision and
/// recovery logic between them. See the module documentation.
pub struct Engine {
    cpu: Box<dyn Backend>,
    cpu_info: BackendInfo,
    config: BitNetConfig,
    gpu: Option<GpuSide>,
    settings: EngineConfig,
    sequences: HashMap<SeqId, SequenceState>,
    events: Vec<EngineEvent>,
    /// The CPU backend's logits for the self-test prompt.
    self_test: (Vec<u32>, Vec<f32>),
    prefix_cache: PrefixCache,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("cpu", &self.cpu_info.detail)
            .field("gpu", &self.gpu.as_ref().map(|g| &g.info.name))
            .field("health", &self.health())
            .field("sequences", &self.sequences.len())
            .finish()
    }
}

impl From<Box<dyn Backend>> for Engine {
    fn from(cpu: Box<dyn Backend>) -> Self {
        Self::cpu_only(cpu)
    }
}

/// Runs a backend call; a panic becomes a device error instead of taking
/// the engine thread down.
fn guarded<T>(call: impl FnOnce() -> Result<T, BackendError>) -> Result<T, BackendError> {
    std::panic::catch_unwind(AssertUnwindSafe(call))
        .unwrap_or_else(|_| Err(BackendError::Device("the backend panicked".into())))
}

/// Whether a GPU error poisons the context (anything but out-of-memory and
/// errors about the request itself).
fn poisons(err: &BackendError) -> bool {
    matches!(err, BackendError::Device(_))
}

fn pearson(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().map(|&x| x as f64).sum::<f64>() / n, b.iter().map(|&x| x as f64).sum::<f64>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        cov += dx * dy;
        va += dx * dx;
        vb += dy * dy;
    }
    if va == 0.0 || vb == 0.0 {
        return if va == vb { 1.0 } else { 0.0 };
    }
    cov / (va.sqrt() * vb.sqrt())
}

/// Runs the self-test prompt on a fresh backend and compares with the CPU.
fn self_test(backend: &mut dyn Backend, tokens: &[u32], expected: &[f32]) -> Result<(), String> {
    let outcome = guarded(|| {
        backend.add_sequence(SELF_TEST_SEQ, tokens.len())?;
        backend.step(&[StepInput { seq: SELF_TEST_SEQ, tokens }])
    });
    backend.remove_sequence(SELF_TEST_SEQ);
    let logits = outcome.map_err(|e| format!("self-test step failed: {e}"))?;
    let logits = logits.first().ok_or("self-test step returned no logits")?;
    if logits.len() != expected.len() {
        return Err(format!("self-test returned {} logits, expected {}", logits.len(), expected.len()));
    }
    if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
        return Err(format!("self-test logit {i} is {}", logits[i]));
    }
    let r = pearson(logits, expected);
    if r < SELF_TEST_MIN_CORRELATION {
        return Err(format!("self-test logits correlate {r:.4} with the CPU's (need {SELF_TEST_MIN_CORRELATION})"));
    }
    Ok(())
}

impl Engine {
    /// An engine without a GPU: every request runs on `cpu`.
    pub fn cpu_only(cpu: Box<dyn Backend>) -> Self {
        Self::cpu_only_with(cpu, EngineConfig::default())
    }

    /// [`Engine::cpu_only`] with `settings` (of which only the prefix
    /// cache's matters without a GPU).
    pub fn cpu_only_with(cpu: Box<dyn Backend>, settings: EngineConfig) -> Self {
        let cpu_info = cpu.info();
        let config = cpu.config().clone();
        Self {
            cpu,
            cpu_info,
            config,
            gpu: None,
            settings,
            sequences: HashMap::new(),
            events: Vec::new(),
            self_test: (Vec::new(), Vec::new()),
            prefix_cache: PrefixCache::default(),
        }
    }

    /// An engine with a GPU: measures the self-test reference on the CPU,
    /// then warms the GPU up at auto's precision when its memory plan fits
    /// (a warm-up failure starts a cool-down, as a failure later would).
    pub fn new(cpu: Box<dyn Backend>, primary: PrimaryDevice, settings: EngineConfig) -> Result<Self, EngineError> {
        let utilization = settings.gpu_memory_utilization;
        if !(utilization > 0.0 && utilization <= 1.0) {
            return Err(EngineError::Config(format!("gpu_memory_utilization must be in (0, 1], got {utilization}")));
        }
        if settings.max_batch_tokens == 0 {
            return Err(EngineError::Config("max_batch_tokens must be at least 1".into()));
        }
        let mut engine = Self::cpu_only_with(cpu, settings);
        let vocab = engine.config.vocab_size as u32;
        let tokens: Vec<u32> = (1..=4u32).map(|t| t % vocab).collect();
        engine.cpu.add_sequence(SELF_TEST_SEQ, tokens.len())?;
        let expected = guarded(|| engine.cpu.step(&[StepInput { seq: SELF_TEST_SEQ, tokens: &tokens }]));
        engine.cpu.remove_sequence(SELF_TEST_SEQ);
        let expected = expected?.pop().unwrap_or_default();
        engine.self_test = (tokens, expected);

        let caps = primary.gpu.capabilities();
        let warm_precision = match (caps.tensor_cores, caps.bf16, caps.fp16) {
            (true, true, _) => Precision::Bf16,
            (true, false, true) => Precision::Fp16,
            _ => Precision::Fp32,
        };
        let budget = (primary.gpu.free_memory_bytes as f64 * utilization) as u64;
        engine.gpu = Some(GpuSide {
            info: primary.gpu,
            factory: Arc::from(primary.factory),
            untied_head: primary.untied_head,
            budget,
            slots: BTreeMap::new(),
            unfit: BTreeSet::new(),
            kv_bytes: 0,
            health: Health::Healthy,
            warm_precision,
            failed_recoveries: 0,
        });
        engine.warm_up(warm_precision);
        Ok(engine)
    }

    fn warm_up(&mut self, precision: Precision) {
        let Some(gpu) = &self.gpu else { return };
        let plan = gpu.plan(&self.config, precision, 0, self.settings.max_batch_tokens);
        if plan.total() > gpu.budget {
            let detail = format!(
                "no warm-up: the {} plan needs {} bytes (weights {} + workspace {}) of a {}-byte budget",
                precision.name(),
                plan.total(),
                plan.weights,
                plan.workspace,
                gpu.budget
            );
            self.events.push(EngineEvent::Health { health: GpuHealth::Healthy, detail });
            return;
        }
        match self.create_slot(precision) {
            Ok(()) => {
                let detail = format!("warmed up at {}", precision.name());
                self.events.push(EngineEvent::Health { health: GpuHealth::Healthy, detail });
            }
            Err(err) => self.poison(format!("warm-up at {} failed: {err}", precision.name()), Duration::ZERO),
        }
    }

    /// Creates and self-tests the GPU backend at `precision`.
    fn create_slot(&mut self, precision: Precision) -> Result<(), BackendError> {
        let Some(gpu) = &mut self.gpu else { return Err(BackendError::Device("no GPU".into())) };
        let plan = gpu.plan(&self.config, precision, 0, self.settings.max_batch_tokens);
        let factory = gpu.factory.clone();
        let mut backend = match guarded(|| factory(precision)) {
            Ok(backend) => backend,
            Err(err) => {
                if matches!(err, BackendError::OutOfMemory(_)) {
                    gpu.unfit.insert(precision);
                }
                return Err(err);
            }
        };
        let (tokens, expected) = &self.self_test;
        self_test(backend.as_mut(), tokens, expected).map_err(BackendError::Device)?;
        let info = backend.info();
        gpu.slots.insert(precision, GpuSlot { backend, info, static_bytes: plan.weights + plan.workspace });
        Ok(())
    }

    /// The model's hyperparameters.
    pub fn config(&self) -> &BitNetConfig {
        &self.config
    }

    /// The CPU backend's description.
    pub fn cpu_info(&self) -> &BackendInfo {
        &self.cpu_info
    }

    /// The GPU as decisions see it, if there is one.
    pub fn gpu_info(&self) -> Option<&GpuInfo> {
        self.gpu.as_ref().map(|g| &g.info)
    }

    /// The planning budget in bytes (free memory at start-up x utilization).
    pub fn gpu_budget(&self) -> Option<u64> {
        self.gpu.as_ref().map(|g| g.budget)
    }

    pub fn health(&self) -> GpuHealth {
        self.gpu.as_ref().map_or(GpuHealth::Absent, GpuSide::health)
    }

    /// Events since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<EngineEvent> {
        std::mem::take(&mut self.events)
    }

    /// Where and how `seq` runs (so far).
    pub fn report(&self, seq: SeqId) -> Option<&SequenceReport> {
        self.sequences.get(&seq).map(|s| &s.report)
    }

    pub fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        let state = self.sequences.get(&seq)?;
        match state.location {
            Location::Cpu => self.cpu.sequence_len(seq),
            Location::Gpu(p) => self.gpu.as_ref()?.slots.get(&p)?.backend.sequence_len(seq),
        }
    }

    fn cpu_report(&self, fallback: Option<FallbackRecord>) -> SequenceReport {
        SequenceReport {
            device: self.cpu_info.device.clone(),
            precision: self.cpu_info.precision.clone(),
            quantization: self.cpu_info.quantization.clone(),
            fallback,
        }
    }

    /// Advances the GPU's health: starts a recovery once the cool-down is
    /// over, installs a recovered backend that passed its self-test.
    pub fn poll_health(&mut self) {
        let Some(gpu) = &mut self.gpu else { return };
        let now = Instant::now();
        match &gpu.health {
            Health::Healthy => {}
            Health::CoolingDown { until } if now < *until => {}
            Health::CoolingDown { .. } => {
                let (tx, rx) = std::sync::mpsc::channel();
                let factory = gpu.factory.clone();
                let precision = gpu.warm_precision;
                let (tokens, expected) = self.self_test.clone();
                let spawned = std::thread::Builder::new().name("bitnet-gpu-recovery".into()).spawn(move || {
                    let outcome = guarded(|| factory(precision)).map_err(|e| format!("recreating the backend: {e}"));
                    let outcome = outcome
                        .and_then(|mut backend| self_test(backend.as_mut(), &tokens, &expected).map(|()| backend));
                    let _ = tx.send(outcome);
                });
                match spawned {
                    Ok(_) => {
                        gpu.health = Health::Recovering { result: rx };
                        let detail = format!("recreating the GPU context at {}", precision.name());
                        self.events.push(EngineEvent::Health { health: GpuHealth::Recovering, detail });
                    }
                    Err(err) => self.fail_recovery(format!("could not start the recovery thread: {err}")),
                }
            }
            Health::Recovering { result } => match result.try_recv() {
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => {
                    self.fail_recovery("the recovery thread ended without a result".into())
                }
                Ok(Err(detail)) => self.fail_recovery(detail),
                Ok(Ok(backend)) => {
                    let precision = gpu.warm_precision;
                    let plan = gpu.plan(&self.config, precision, 0, self.settings.max_batch_tokens);
                    let info = backend.info();
                    gpu.slots.insert(precision, GpuSlot { backend, info, static_bytes: plan.weights + plan.workspace });
                    gpu.health = Health::Healthy;
                    gpu.failed_recoveries = 0;
                    let detail = format!("GPU context recreated at {} and self-tested", precision.name());
                    self.events.push(EngineEvent::Health { health: GpuHealth::Healthy, detail });
                }
            },
        }
    }

    fn fail_recovery(&mut self, detail: String) {
        let Some(gpu) = &mut self.gpu else { return };
        gpu.failed_recoveries += 1;
        let wait = cool_down(&self.settings, gpu.failed_recoveries);
        gpu.health = Health::CoolingDown { until: Instant::now() + wait };
        let detail = format!("recovery failed ({detail}); next attempt in {:.1} s", wait.as_secs_f64());
        self.events.push(EngineEvent::Health { health: GpuHealth::CoolingDown, detail });
    }

    /// Registers a request's sequence with room for `max_positions`, on the
    /// device [`decide`] picks; returns where it went.
    pub fn add_sequence(
        &mut self,
        seq: SeqId,
        max_positions: usize,
        prefs: &RequestPreferences,
    ) -> Result<&SequenceReport, EngineError> {
        if self.sequences.contains_key(&seq) || seq == SELF_TEST_SEQ {
            return Err(BackendError::DuplicateSequence(seq).into());
        }
        // A retired sequence of that id is only a cache entry: it gives way.
        self.evict_where(|e| e.seq == seq);
        self.poll_health();
        let started = Instant::now();
        // The prefix cache's GPU entries give way to a new sequence
        // (`make_room_on_gpu`), so they count as free here.
        let cached: u64 = self.prefix_cache.entries.iter().map(|e| e.kv_bytes).sum();
        let placement = {
            let config = &self.config;
            let batch_tokens = self.settings.max_batch_tokens;
            let fits = |precision: Precision| {
                self.gpu.as_ref().is_some_and(|gpu| {
                    if gpu.unfit.contains(&precision) {
                        return false;
                    }
                    let plan = gpu.plan(config, precision, max_positions, batch_tokens);
                    let new_static = if gpu.slots.contains_key(&precision) { 0 } else { plan.weights + plan.workspace };
                    gpu.used().saturating_sub(cached).saturating_add(new_static).saturating_add(plan.kv_cache)
                        <= gpu.budget
                })
            };
            let view = self.gpu.as_ref().map(|gpu| GpuView {
                healthy: matches!(gpu.health, Health::Healthy),
                capabilities: gpu.info.capabilities(),
                fits: &fits,
            });
            decide(prefs, view)?
        };
        let reason = match placement {
            Placement::Cpu(reason) => reason,
            Placement::Gpu(precision) => match self.add_on_gpu(seq, max_positions, precision) {
                Ok(()) => return Ok(&self.sequences[&seq].report),
                Err(GpuAddError::Request(err)) => return Err(err.into()),
                Err(GpuAddError::Fallback(reason)) => Some(reason),
            },
        };
        self.cpu.add_sequence(seq, max_positions)?;
        let fallback = reason.map(|reason| FallbackRecord { reason, cost: started.elapsed() });
        if let Some(record) = fallback {
            self.events.push(EngineEvent::Fallback { seq, reason: record.reason, cost: record.cost });
        }
        let report = self.cpu_report(fallback);
        let state = SequenceState {
            location: Location::Cpu,
            max_positions,
            tokens: Vec::new(),
            kv_bytes: 0,
            report,
            failed: None,
        };
        Ok(&self.sequences.entry(seq).or_insert(state).report)
    }

    /// Places a sequence on the GPU; on success it is registered.
    fn add_on_gpu(&mut self, seq: SeqId, max_positions: usize, precision: Precision) -> Result<(), GpuAddError> {
        let exists = self.gpu.as_ref().is_some_and(|g| g.slots.contains_key(&precision));
        let Some(plan) = self.gpu.as_ref().map(|g| g.plan(&self.config, precision, max_positions, 0)) else {
            return Err(GpuAddError::Fallback(FallbackReason::GpuUnavailable));
        };
        let new_static = if exists { 0 } else { plan.weights + plan.workspace };
        self.make_room_on_gpu(new_static + plan.kv_cache);
        if !exists {
            if let Err(err) = self.create_slot(precision) {
                return Err(self.gpu_add_failed(err));
            }
        }
        let kv_bytes = plan.kv_cache;
        let mut added = self.gpu_slot(precision).map(|b| guarded(|| b.add_sequence(seq, max_positions)));
        if matches!(added, Some(Err(BackendError::OutOfMemory(_))))
            && self.evict_where(|e| e.location == Location::Gpu(precision))
        {
            // The KV pool's ranges, not the plan, ran out: entries hold them.
            added = self.gpu_slot(precision).map(|b| guarded(|| b.add_sequence(seq, max_positions)));
        }
        match added {
            None => return Err(GpuAddError::Fallback(FallbackReason::GpuUnavailable)),
            Some(Err(err)) => return Err(self.gpu_add_failed(err)),
            Some(Ok(())) => {}
        }
        let Some(gpu) = &mut self.gpu else { return Err(GpuAddError::Fallback(FallbackReason::GpuUnavailable)) };
        let Some(slot) = gpu.slots.get(&precision) else {
            return Err(GpuAddError::Fallback(FallbackReason::GpuUnavailable));
        };
        gpu.kv_bytes += kv_bytes;
        let report = SequenceReport {
            device: slot.info.device.clone(),
            precision: slot.info.precision.clone(),
            quantization: slot.info.quantization.clone(),
            fallback: None,
        };
        let state = SequenceState {
            location: Location::Gpu(precision),
            max_positions,
            tokens: Vec::new(),
            kv_bytes,
            report,
            failed: None,
        };
        self.sequences.insert(seq, state);
        Ok(())
    }

    fn gpu_add_failed(&mut self, err: BackendError) -> GpuAddError {
        match err {
            BackendError::OutOfMemory(_) => GpuAddError::Fallback(FallbackReason::OutOfMemory),
            err if poisons(&err) => {
                self.poison(format!("placing a sequence failed: {err}"), Duration::ZERO);
                GpuAddError::Fallback(FallbackReason::CudaError)
            }
            err => GpuAddError::Request(err),
        }
    }

    /// Empties a sequence that runs on the CPU, keeping its report, so its
    /// caller can feed it again from the first token. A caller that has
    /// shown nothing of a request's output yet uses this after the request
    /// moved off the GPU mid-run: regenerating from the prompt on the CPU
    /// gives exactly a CPU-only run's output, which continuing from tokens
    /// the GPU chose need not (the two forward passes differ numerically).
    pub fn restart_on_cpu(&mut self, seq: SeqId) -> Result<(), BackendError> {
        let state = self.sequences.get_mut(&seq).ok_or(BackendError::UnknownSequence(seq))?;
        if state.location != Location::Cpu {
            return Err(BackendError::Device(format!("sequence {seq} is on the GPU, not the CPU")));
        }
        self.cpu.remove_sequence(seq);
        state.tokens.clear();
        if let Err(err) = self.cpu.add_sequence(seq, state.max_positions) {
            state.failed = Some(err.to_string());
            return Err(err);
        }
        Ok(())
    }

    /// Frees a sequence wherever it is; unknown ids are ignored.
    pub fn remove_sequence(&mut self, seq: SeqId) {
        let Some(state) = self.sequences.remove(&seq) else { return };
        match state.location {
            Location::Cpu => self.cpu.remove_sequence(seq),
            Location::Gpu(precision) => {
                if let Some(gpu) = &mut self.gpu {
                    gpu.kv_bytes = gpu.kv_bytes.saturating_sub(state.kv_bytes);
                    if let Some(slot) = gpu.slots.get_mut(&precision) {
                        slot.backend.remove_sequence(seq);
                    }
                }
            }
        }
    }

    /// Marks the GPU unhealthy after an error that poisons its context:
    /// every GPU sequence moves to the CPU, the backends are dropped, and
    /// the cool-down starts.
    fn poison(&mut self, detail: String, failed_for: Duration) {
        let Some(gpu) = &mut self.gpu else { return };
        let on_gpu: Vec<SeqId> = self
            .sequences
            .iter()
            .filter(|(_, s)| matches!(s.location, Location::Gpu(_)))
            .map(|(&seq, _)| seq)
            .collect();
        gpu.slots.clear();
        gpu.unfit.clear();
        gpu.kv_bytes = 0;
        // The prefix cache's GPU entries went with the backends.
        self.prefix_cache.entries.retain(|e| e.location == Location::Cpu);
        let wait = self.settings.cool_down;
        gpu.health = Health::CoolingDown { until: Instant::now() + wait };
        self.events.push(EngineEvent::Health {
            health: GpuHealth::CoolingDown,
            detail: format!("GPU marked unhealthy ({detail}); recreating it in {:.1} s", wait.as_secs_f64()),
        });
        self.move_to_cpu(&on_gpu, FallbackReason::CudaError, failed_for);
    }

    /// Re-runs sequences on the CPU from their tokens: removed from the GPU
    /// (if its backend is still there), added to the CPU backend and
    /// prefilled with every token they had, so the CPU continues exactly
    /// where a CPU-only run of those tokens would be.
    fn move_to_cpu(&mut self, seqs: &[SeqId], reason: FallbackReason, failed_for: Duration) {
        let started = Instant::now();
        let mut moved: Vec<SeqId> = Vec::new();
        let mut prefill: Vec<SeqId> = Vec::new();
        for &seq in seqs {
            let Some(state) = self.sequences.get_mut(&seq) else { continue };
            let Location::Gpu(precision) = state.location else { continue };
            if let Some(gpu) = &mut self.gpu {
                gpu.kv_bytes = gpu.kv_bytes.saturating_sub(state.kv_bytes);
                if let Some(slot) = gpu.slots.get_mut(&precision) {
                    slot.backend.remove_sequence(seq);
                }
            }
            moved.push(seq);
            state.location = Location::Cpu;
            state.kv_bytes = 0;
            match self.cpu.add_sequence(seq, state.max_positions) {
                Ok(()) if !state.tokens.is_empty() => prefill.push(seq),
                Ok(()) => {}
                Err(err) => state.failed = Some(err.to_string()),
            }
        }
        let outcomes = {
            let inputs: Vec<StepInput<'_>> =
                prefill.iter().map(|seq| StepInput { seq: *seq, tokens: &self.sequences[seq].tokens }).collect();
            // Only the KV cache is wanted: no logits.
            run_each(self.cpu.as_mut(), &inputs, &vec![StepWant::Greedy; inputs.len()])
        };
        for (seq, outcome) in prefill.iter().zip(outcomes) {
            if let Err(err) = outcome {
                self.cpu.remove_sequence(*seq);
                if let Some(state) = self.sequences.get_mut(seq) {
                    state.failed = Some(err.to_string());
                }
            }
        }
        let cost = failed_for + started.elapsed();
        for seq in moved {
            let fallback = Some(FallbackRecord { reason, cost });
            let report = self.cpu_report(fallback);
            if let Some(state) = self.sequences.get_mut(&seq) {
                state.report = report;
                self.events.push(EngineEvent::Fallback { seq, reason, cost });
            }
        }
    }

    /// The backend at `location`, if it is there.
    fn backend_at(&mut self, location: Location) -> Option<&mut Box<dyn Backend>> {
        match location {
            Location::Cpu => Some(&mut self.cpu),
            Location::Gpu(precision) => self.gpu_slot(precision),
        }
    }

    fn gpu_slot(&mut self, precision: Precision) -> Option<&mut Box<dyn Backend>> {
        self.gpu.as_mut()?.slots.get_mut(&precision).map(|slot| &mut slot.backend)
    }

    /// What the prefix cache holds and has done.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        let cache = &self.prefix_cache;
        PrefixCacheStats { entries: cache.entries.len(), tokens: cache.tokens(), ..cache.stats }
    }

    /// Frees a prefix-cache entry's sequence and its planned GPU bytes.
    fn drop_entry(&mut self, entry: CachedPrefix) {
        if let Location::Gpu(_) = entry.location {
            if let Some(gpu) = &mut self.gpu {
                gpu.kv_bytes = gpu.kv_bytes.saturating_sub(entry.kv_bytes);
            }
        }
        if let Some(backend) = self.backend_at(entry.location) {
            backend.remove_sequence(entry.seq);
        }
    }

    /// Evicts the least recently used entry that `which` accepts; says
    /// whether there was one.
    fn evict_where(&mut self, which: impl Fn(&CachedPrefix) -> bool) -> bool {
        let lru =
            self.prefix_cache.entries.iter().enumerate().filter(|(_, e)| which(e)).min_by_key(|(_, e)| e.last_used);
        let Some((index, _)) = lru else { return false };
        let entry = self.prefix_cache.entries.swap_remove(index);
        self.prefix_cache.stats.evictions += 1;
        self.drop_entry(entry);
        true
    }

    /// Evicts GPU entries, least recently used first, until `bytes` more fit
    /// the GPU's budget (or none is left).
    fn make_room_on_gpu(&mut self, bytes: u64) {
        while self.gpu.as_ref().is_some_and(|g| g.used().saturating_add(bytes) > g.budget) {
            if !self.evict_where(|e| e.location != Location::Cpu) {
                break;
            }
        }
    }

    /// Ends a finished sequence as [`Engine::remove_sequence`] does, but
    /// with the prefix cache on ([`EngineConfig::prefix_cache_tokens`]) keeps
    /// its KV cache for later requests that start with the same tokens: its
    /// reservation shrinks to the positions it holds ([`Backend::shrink_to_fit`]:
    /// nothing copied, the rest of its memory freed) and it stays on its
    /// device as an entry, then the least recently used entries are evicted
    /// until the entries fit the budget. A sequence longer than the whole
    /// budget, one whose step failed, or one on a backend that cannot shrink
    /// is only removed. A GPU error while shrinking is handled as a failed
    /// step's.
    pub fn retire_sequence(&mut self, seq: SeqId) {
        let budget = self.settings.prefix_cache_tokens;
        let Some(state) = self.sequences.get(&seq) else { return };
        let (len, location) = (state.tokens.len(), state.location);
        if len == 0 || len > budget || state.failed.is_some() || self.sequence_len(seq) != Some(len) {
            return self.remove_sequence(seq);
        }
        let shrunk = match self.backend_at(location) {
            Some(backend) => guarded(|| backend.shrink_to_fit(seq)),
            None => Err(BackendError::Device("the sequence's backend is gone".into())),
        };
        if let Err(err) = shrunk {
            self.remove_sequence(seq);
            if location != Location::Cpu && poisons(&err) {
                self.poison(format!("keeping a finished sequence's KV cache failed: {err}"), Duration::ZERO);
            }
            return;
        }
        let Some(state) = self.sequences.remove(&seq) else { return };
        let mut kv_bytes = 0;
        if let (Location::Gpu(precision), Some(gpu)) = (location, self.gpu.as_mut()) {
            kv_bytes = gpu.plan(&self.config, precision, len, 0).kv_cache;
            gpu.kv_bytes = gpu.kv_bytes.saturating_sub(state.kv_bytes) + kv_bytes;
        }
        let last_used = self.prefix_cache.tick();
        self.prefix_cache.entries.push(CachedPrefix { seq, location, tokens: state.tokens, kv_bytes, last_used });
        while self.prefix_cache.tokens() > budget && self.evict_where(|_| true) {}
    }

    /// Starts `seq` (just added, nothing run yet) from the prefix-cache
    /// entry on its device that shares the longest prefix with `prompt`:
    /// the KV cache of those positions is copied, and the caller then feeds
    /// `prompt[n..]`, where `n` is returned (0: nothing reused). `n` stops
    /// short of the prompt's last token, so the step that feeds the rest
    /// still gives the prompt's logits, and within what `seq` reserved.
    /// Every backend computes a position the same way whichever step ran it,
    /// so the results are the same bits as without the cache. Ties go to the
    /// most recently used entry. A GPU error while copying is handled as a
    /// failed step's (the sequence may then be on the CPU, reusing nothing).
    pub fn reuse_prefix(&mut self, seq: SeqId, prompt: &[u32]) -> usize {
        let Some(state) = self.sequences.get(&seq) else { return 0 };
        if state.failed.is_some() || !state.tokens.is_empty() || self.sequence_len(seq) != Some(0) {
            return 0;
        }
        let (location, limit) = (state.location, prompt.len().saturating_sub(1).min(state.max_positions));
        let best = self
            .prefix_cache
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.location == location)
            .map(|(i, e)| (common_prefix(&e.tokens, &prompt[..limit]), e.last_used, i))
            .max();
        let Some((len, _, index)) = best.filter(|&(len, _, _)| len > 0) else { return 0 };
        let src = self.prefix_cache.entries[index].seq;
        let copied = match self.backend_at(location) {
            Some(backend) => guarded(|| backend.copy_prefix(src, seq, len)),
            None => Err(BackendError::Device("the sequence's backend is gone".into())),
        };
        if let Err(err) = copied {
            if location != Location::Cpu && poisons(&err) {
                self.poison(format!("copying a cached prefix failed: {err}"), Duration::ZERO);
            }
            return 0;
        }
        if let Some(state) = self.sequences.get_mut(&seq) {
            state.tokens = prompt[..len].to_vec();
        }
        let cache = &mut self.prefix_cache;
        cache.entries[index].last_used = cache.clock + 1;
        cache.clock += 1;
        cache.stats.hits += 1;
        cache.stats.reused_tokens += len as u64;
        len
    }

    /// Runs one batched step over sequences on either device and returns,
    /// for each input in order, its logits or its error. A failing entry
    /// fails alone; GPU failures move their sequences to the CPU, where the
    /// step's tokens then run.
    pub fn step(&mut self, batch: &[StepInput<'_>]) -> Vec<Result<Vec<f32>, BackendError>> {
        let wants = vec![StepWant::Logits; batch.len()];
        self.step_select(batch, &wants)
            .into_iter()
            .map(|outcome| match outcome? {
                StepOutput::Logits(logits) => Ok(logits),
                StepOutput::Token(_) => Err(BackendError::Device("a step asked for logits returned a token".into())),
            })
            .collect()
    }

    /// [`Engine::step`] in which each entry says what it needs back
    /// ([`Backend::step_select`]): its logits, or only its greedy token,
    /// which a GPU computes on the device without reading the logits back.
    /// `wants` holds one want per entry (a missing want fails its entry).
    pub fn step_select(
        &mut self,
        batch: &[StepInput<'_>],
        wants: &[StepWant],
    ) -> Vec<Result<StepOutput, BackendError>> {
        self.poll_health();
        let mut results: Vec<Option<Result<StepOutput, BackendError>>> = (0..batch.len()).map(|_| None).collect();
        for (i, result) in results.iter_mut().enumerate() {
            if i >= wants.len() {
                *result = Some(Err(BackendError::WantsMismatch { entries: batch.len(), wants: wants.len() }));
            }
        }
        let mut seen = HashSet::with_capacity(batch.len());
        for (i, input) in batch.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            if !seen.insert(input.seq) {
                results[i] = Some(Err(BackendError::RepeatedInStep { seq: input.seq }));
                continue;
            }
            if let Some(err) = self.sequences.get(&input.seq).and_then(|s| s.failed.as_deref()) {
                results[i] = Some(Err(moving_failed(err)));
                continue;
            }
            let lookup = |seq| Some((self.sequence_len(seq)?, self.sequences.get(&seq)?.max_positions));
            if let Err(err) = validate_step(std::slice::from_ref(input), &self.config, lookup) {
                results[i] = Some(Err(err));
            }
        }
        let pending = |results: &Vec<Option<_>>, i: usize| results[i].is_none();

        let mut by_precision: BTreeMap<Precision, Vec<usize>> = BTreeMap::new();
        for i in (0..batch.len()).filter(|&i| pending(&results, i)) {
            if let Location::Gpu(p) = self.sequences[&batch[i].seq].location {
                by_precision.entry(p).or_default().push(i);
            }
        }
        for (precision, indices) in by_precision {
            // An earlier group's failure may have moved these to the CPU already.
            let indices: Vec<usize> = indices
                .into_iter()
                .filter(|&i| self.sequences[&batch[i].seq].location == Location::Gpu(precision))
                .collect();
            if indices.is_empty() {
                continue;
            }
            let inputs: Vec<StepInput<'_>> = indices.iter().map(|&i| batch[i]).collect();
            let input_wants: Vec<StepWant> = indices.iter().map(|&i| wants[i]).collect();
            let started = Instant::now();
            let outcome = match self.gpu.as_mut().and_then(|g| g.slots.get_mut(&precision)) {
                Some(slot) => guarded(|| slot.backend.step_select(&inputs, &input_wants)),
                None => Err(BackendError::Device(format!("the {} GPU backend is gone", precision.name()))),
            };
            let outcome = match outcome {
                Ok(logits) if logits.len() != inputs.len() => Err(BackendError::Device(format!(
                    "the GPU backend returned {} results for {} inputs",
                    logits.len(),
                    inputs.len()
                ))),
                other => other,
            };
            match outcome {
                Ok(logits) => {
                    for (&i, logits) in indices.iter().zip(logits) {
                        if let Some(state) = self.sequences.get_mut(&batch[i].seq) {
                            state.tokens.extend_from_slice(batch[i].tokens);
                        }
                        results[i] = Some(Ok(logits));
                    }
                }
                Err(err) => {
                    let failed_for = started.elapsed();
                    let seqs: Vec<SeqId> = inputs.iter().map(|input| input.seq).collect();
                    match err {
                        BackendError::OutOfMemory(_) => {
                            self.move_to_cpu(&seqs, FallbackReason::OutOfMemory, failed_for)
                        }
                        err if poisons(&err) => self.poison(format!("a step failed: {err}"), failed_for),
                        _ => self.move_to_cpu(&seqs, FallbackReason::CudaError, failed_for),
                    }
                    for &i in &indices {
                        if let Some(err) = self.sequences.get(&batch[i].seq).and_then(|s| s.failed.as_deref()) {
                            results[i] = Some(Err(moving_failed(err)));
                        }
                    }
                }
            }
        }

        let cpu_indices: Vec<usize> = (0..batch.len())
            .filter(|&i| pending(&results, i) && self.sequences[&batch[i].seq].location == Location::Cpu)
            .collect();
        let inputs: Vec<StepInput<'_>> = cpu_indices.iter().map(|&i| batch[i]).collect();
        let input_wants: Vec<StepWant> = cpu_indices.iter().map(|&i| wants[i]).collect();
        for (&i, outcome) in cpu_indices.iter().zip(run_each(self.cpu.as_mut(), &inputs, &input_wants)) {
            if outcome.is_ok() {
                if let Some(state) = self.sequences.get_mut(&batch[i].seq) {
                    state.tokens.extend_from_slice(batch[i].tokens);
                }
            }
            results[i] = Some(outcome);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(BackendError::Device("the engine left an input unanswered".into()))))
            .collect()
    }
}

fn moving_failed(detail: &str) -> BackendError {
    BackendError::Device(format!("re-running the sequence on the CPU failed: {detail}"))
}

/// The cool-down after `failures` failed recoveries: doubling, capped.
fn cool_down(settings: &EngineConfig, failures: u32) -> Duration {
    let factor = 1u32 << failures.min(16);
    settings.cool_down.saturating_mul(factor).min(settings.max_cool_down.max(settings.cool_down))
}

enum GpuAddError {
    /// The request itself is bad (it would fail on the CPU too).
    Request(BackendError),
    Fallback(FallbackReason),
}

/// Runs a batch on one backend; when the batch fails, retries each entry
/// alone (on error nothing advanced), so a bad entry fails alone.
fn run_each(
    backend: &mut dyn Backend,
    inputs: &[StepInput<'_>],
    wants: &[StepWant],
) -> Vec<Result<StepOutput, BackendError>> {
    if inputs.is_empty() {
        return Vec::new();
    }
    let outcome = match guarded(|| backend.step_select(inputs, wants)) {
        Ok(logits) if logits.len() == inputs.len() => return logits.into_iter().map(Ok).collect(),
        Ok(logits) => Err(BackendError::Device(format!(
            "the backend returned {} results for {} inputs",
            logits.len(),
            inputs.len()
        ))),
        Err(err) => Err(err),
    };
    match inputs {
        [_] => vec![outcome],
        _ => inputs
            .iter()
            .zip(wants)
            .flat_map(|(input, want)| run_each(backend, std::slice::from_ref(input), std::slice::from_ref(want)))
            .collect(),
    }
}

#[cfg(test)]
mod tests;
