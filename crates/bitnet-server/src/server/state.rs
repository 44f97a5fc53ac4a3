//! The state every handler shares: configuration, readiness phase, the
//! loaded model's facts, the engine's channel and the metrics.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use bitnet_device::GpuInfo;
use bitnet_inference::{BackendInfo, Engine};
use bitnet_models::Tokenizer;
use tokio::sync::Semaphore;

use super::api::ModelLimits;
use super::error::ApiError;
use super::metrics::Metrics;
use super::scheduler::{self, Job, SchedulerConfig};
use super::ServerConfig;

/// Readiness, as `/health` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Loading = 0,
    Ready = 1,
    Draining = 2,
}

/// What the handlers need of the loaded model.
#[derive(Debug)]
pub struct LoadedModel {
    pub tokenizer: Arc<Tokenizer>,
    /// The CPU backend (always there).
    pub info: BackendInfo,
    /// The GPU as the engine's decisions see it (after a fault plan), and
    /// its planning budget in bytes; `None` without a GPU backend.
    pub gpu: Option<(GpuInfo, u64)>,
    pub context_len: usize,
}

impl LoadedModel {
    pub fn limits<'a>(&'a self, model_id: &'a str) -> ModelLimits<'a> {
        ModelLimits { model_id, context_len: self.context_len, tokenizer: &self.tokenizer }
    }
}

#[derive(Debug)]
pub struct AppState {
    pub config: ServerConfig,
    phase: AtomicU8,
    model: OnceLock<LoadedModel>,
    engine: Mutex<Option<Sender<Job>>>,
    engine_thread: Mutex<Option<JoinHandle<()>>>,
    pub metrics: Arc<Metrics>,
    pub in_flight: Arc<Semaphore>,
    pub next_id: AtomicU64,
    pub started_unix: u64,
    pub cpu: bitnet_device::CpuInfo,
    /// GPUs found at start-up.
    pub gpu: bitnet_device::GpuProbe,
}

impl AppState {
    pub fn new(config: ServerConfig) -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            config,
            phase: AtomicU8::new(Phase::Loading as u8),
            model: OnceLock::new(),
            engine: Mutex::new(None),
            engine_thread: Mutex::new(None),
            metrics: Arc::new(Metrics::default()),
            next_id: AtomicU64::new(0),
            started_unix: super::routes::unix_now(),
            cpu: bitnet_device::CpuInfo::probe(),
            gpu: bitnet_device::probe_gpus(),
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Loading,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    pub fn model(&self) -> Option<&LoadedModel> {
        self.model.get()
    }

    /// Starts the scheduler on `engine` and turns the server ready (unless
    /// it is already draining).
    pub fn install(&self, engine: Engine, tokenizer: Tokenizer) -> std::io::Result<()> {
        let info = engine.cpu_info().clone();
        let gpu = engine.gpu_info().cloned().zip(engine.gpu_budget());
        let context_len = engine.config().max_position_embeddings;
        let tokenizer = Arc::new(tokenizer);
        let config = SchedulerConfig {
            max_batch_size: self.config.max_batch_size,
            max_batch_tokens: self.config.max_batch_tokens,
        };
        let (tx, thread) = scheduler::spawn(engine, tokenizer.clone(), config, self.metrics.clone())?;
        let _ = self.model.set(LoadedModel { tokenizer, info, gpu, context_len });
        *self.engine.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        *self.engine_thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
        let _ =
            self.phase.compare_exchange(Phase::Loading as u8, Phase::Ready as u8, Ordering::SeqCst, Ordering::SeqCst);
        Ok(())
    }

    /// False once the engine thread has ended while the server still runs
    /// (it only ends on its own if something inside it panicked).
    pub fn engine_alive(&self) -> bool {
        let thread = self.engine_thread.lock().unwrap_or_else(|e| e.into_inner());
        thread.as_ref().is_none_or(|t| !t.is_finished())
    }

    pub fn begin_draining(&self) {
        self.phase.store(Phase::Draining as u8, Ordering::SeqCst);
    }

    /// Hands a job to the engine.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        let engine = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = engine.as_ref() else {
            return Err(ApiError::Unavailable("the server is shutting down"));
        };
        tx.send(job).map_err(|_| ApiError::Internal("the engine thread has stopped".into()))
    }

    /// Closes the engine's channel and waits for it to finish its jobs.
    pub fn stop_engine(&self) {
        drop(self.engine.lock().unwrap_or_else(|e| e.into_inner()).take());
        let thread = self.engine_thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                eprintln!("bitnet serve: the engine thread panicked");
            }
        }
    }
}
