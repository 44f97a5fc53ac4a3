//! `bitnet serve`: an OpenAI-compatible HTTP server with continuous batching.
//!
//! The engine is injected: [`serve`] takes any `Box<dyn Backend>` (run as a
//! CPU-only [`Engine`]) and its tokenizer, [`serve_with_loader`] any
//! [`Engine`], so tests run it on a synthetic model and `bitnet serve` on
//! the model file it was given ([`engine_setup`]). One engine thread
//! ([`scheduler`]) batches every request in flight; handlers talk to it
//! through channels.

pub mod api;
pub mod devices;
pub mod engine_setup;
pub mod error;
pub mod metrics;
mod respond;
mod routes;
pub mod scheduler;
mod sse;
mod state;
pub mod text;

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitnet_device::FaultPlan;
use bitnet_inference::{Backend, Engine, EngineConfig, HeadPrecision, KvCachePrecision};
use bitnet_models::{BitNetModel, Tokenizer};
use tokio::net::TcpListener;

pub use engine_setup::{build_engine, EngineOptions, ServeBackend};
use state::AppState;

/// The error a model loader may return.
pub type LoadError = Box<dyn std::error::Error + Send + Sync>;

/// Limits and identity of one server.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// The id clients must name in `model` (the file stem, or `bitnet-default`).
    pub model_id: String,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Most sequences in one engine step.
    pub max_batch_size: usize,
    /// Most tokens (decode tokens plus prompt chunks) in one engine step.
    pub max_batch_tokens: usize,
    /// Most generation requests in flight; more are answered 429.
    pub max_in_flight: usize,
    /// Deadline of a generation request from its arrival; past it, 504.
    pub request_timeout: Duration,
    /// Largest request body; larger ones are answered 413.
    pub max_body_bytes: usize,
}

impl ServerConfig {
    pub const DEFAULT_MAX_BATCH_SIZE: usize = 64;
    pub const DEFAULT_MAX_BATCH_TOKENS: usize = 2048;
    pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
    pub const DEFAULT_REQUEST_TIMEOUT_S: f64 = 600.0;
    pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
    /// `bitnet serve --prefix-cache-tokens`' default.
    pub const DEFAULT_PREFIX_CACHE_TOKENS: usize = 4096;

    /// The defaults of `bitnet serve`, for the model `model_id`.
    pub fn new(model_id: impl Into<String>) -> Self {
        Self {
            model_id: model_id.into(),
            api_key: None,
            max_batch_size: Self::DEFAULT_MAX_BATCH_SIZE,
            max_batch_tokens: Self::DEFAULT_MAX_BATCH_TOKENS,
            max_in_flight: Self::DEFAULT_MAX_IN_FLIGHT,
            request_timeout: Duration::from_secs_f64(Self::DEFAULT_REQUEST_TIMEOUT_S),
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
        }
    }

    fn validate(&self) -> Result<(), ServeError> {
        let positive = [
            ("max_batch_size", self.max_batch_size),
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_in_flight", self.max_in_flight),
            ("max_body_bytes", self.max_body_bytes),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ServeError::Config(format!("{name} must be at least 1")));
        }
        if self.max_in_flight > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(ServeError::Config("max_in_flight is too large".into()));
        }
        if self.request_timeout.is_zero() {
            return Err(ServeError::Config("the request timeout must be positive".into()));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error("invalid server configuration: {0}")]
    Config(String),
    #[error("loading the model failed")]
    Load(#[source] LoadError),
    #[error("starting the engine thread failed")]
    Engine(#[source] std::io::Error),
    #[error("serving HTTP failed")]
    Io(#[source] std::io::Error),
}

/// Serves `backend` on `listener` until `shutdown` completes, then stops
/// accepting, answers every request already accepted, and returns.
pub async fn serve(
    listener: TcpListener,
    backend: Box<dyn Backend>,
    tokenizer: Tokenizer,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with_loader(listener, config, move || Ok((backend, tokenizer)), shutdown).await
}

/// Like [`serve`], but loads the engine (an [`Engine`], or a backend run as a
/// CPU-only one) on a blocking thread while already answering: `/health` is
/// 503 and generation requests are 503 until it is loaded. A failed load
/// stops the server with [`ServeError::Load`].
pub async fn serve_with_loader<L, E>(
    listener: TcpListener,
    config: ServerConfig,
    load: L,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError>
where
    L: FnOnce() -> Result<(E, Tokenizer), LoadError> + Send + 'static,
    E: Into<Engine>,
{
    config.validate()?;
    let state = Arc::new(AppState::new(config));
    let app = routes::router(state.clone());

    let load_failure: Arc<Mutex<Option<ServeError>>> = Arc::default();
    let load_failed = Arc::new(tokio::sync::Notify::new());
    let loading = {
        let (state, load_failure, load_failed) = (state.clone(), load_failure.clone(), load_failed.clone());
        tokio::task::spawn_blocking(move || {
            let outcome = load()
                .map_err(ServeError::Load)
                .and_then(|(engine, tokenizer)| state.install(engine.into(), tokenizer).map_err(ServeError::Engine));
            if let Err(err) = outcome {
                *load_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(err);
                load_failed.notify_one();
            }
        })
    };

    let draining = state.clone();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                () = shutdown => {}
                () = load_failed.notified() => {}
            }
            draining.begin_draining();
        })
        .await
        .map_err(ServeError::Io);
    // Every connection is closed now, so every accepted request has its answer.
    let _ = loading.await;
    let stopping = state.clone();
    let _ = tokio::task::spawn_blocking(move || stopping.stop_engine()).await;
    result?;
    if let Some(err) = load_failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(err);
    }
    Ok(())
}

/// Arguments of `bitnet serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Model file (.gguf) or HF folder; the embedded default model when omitted.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (health, live and metrics stay open).
    #[arg(long, env = "BITNET_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most sequences in one engine step.
    #[arg(long, default_value_t = ServerConfig::DEFAULT_MAX_BATCH_SIZE)]
    pub max_batch_size: usize,
    /// Most tokens (decode tokens plus prompt chunks) in one engine step.
    #[arg(long, default_value_t = ServerConfig::DEFAULT_MAX_BATCH_TOKENS)]
    pub max_batch_tokens: usize,
    /// Most generation requests in flight; more are answered 429.
    #[arg(long, default_value_t = ServerConfig::DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,
    /// Seconds a generation request may take from arrival; past it, 504.
    #[arg(long, default_value_t = ServerConfig::DEFAULT_REQUEST_TIMEOUT_S)]
    pub request_timeout_s: f64,
    /// Largest request body in bytes; larger ones are answered 413.
    #[arg(long, default_value_t = ServerConfig::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Forward pass on the CPU: the fast CPU backend, or the slow exact reference.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: ServeBackend,
    /// CPU worker threads for the engine (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Quantize the output head to int8 (faster decode, small accuracy cost: docs/perf/cpu.md).
    #[arg(long)]
    pub int8_head: bool,
    /// Element type of the CPU backend's KV cache: f32, or f16 (half the memory
    /// and the bytes attention reads; small accuracy cost: docs/perf/cpu.md).
    #[arg(long, default_value = "f32")]
    pub kv_cache: KvCachePrecision,
    /// Faults for the primary device, e.g. `gpu_memory_limit=500MB,cc=6.1,failure_rate=0.3,seed=7`
    /// (keys: gpu_memory_limit, cc, fp16, bf16, tensor_cores, failure_rate, seed, fail_after, fail_after_steps).
    #[arg(long, env = "BITNET_FAULT_PLAN")]
    pub fault_plan: Option<String>,
    /// Without a GPU: run a simulated one (the CPU backend as the primary device,
    /// reported as `cpu-simulated-gpu`) so a fault plan can drive the fallback logic.
    #[arg(long)]
    pub simulate_gpu: bool,
    /// Share of the GPU's free memory (measured at start-up) the memory plan may use.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// KV positions the prefix cache keeps from finished requests, so a request
    /// that starts with the same tokens (the next turn of a chat, a shared system
    /// prompt) copies their KV cache instead of running them again; 0 turns it
    /// off. Each position holds n_layers x 2 x kv_dim values (2b4t: 154 KB in
    /// f32, 77 KB in f16); GPU entries give way to new requests.
    #[arg(long, default_value_t = ServerConfig::DEFAULT_PREFIX_CACHE_TOKENS)]
    pub prefix_cache_tokens: usize,
    /// Seconds the GPU rests after an error that poisoned its context before it is
    /// recreated and self-tested (doubling after each failed attempt, up to 60 s).
    #[arg(long, default_value_t = 1.0)]
    pub gpu_cool_down_s: f64,
}

/// `bitnet serve`: binds, loads the model (`load_model` gets `--model`),
/// serves the chosen backend (the CPU SIMD backend by default) until SIGTERM
/// or SIGINT, then drains.
pub fn run<F>(args: ServeArgs, load_model: F) -> anyhow::Result<()>
where
    F: FnOnce(Option<&PathBuf>) -> anyhow::Result<BitNetModel> + Send + 'static,
{
    use anyhow::Context;
    if !(args.request_timeout_s.is_finite() && args.request_timeout_s > 0.0 && args.request_timeout_s < 1e9) {
        anyhow::bail!("--request-timeout-s must be a positive number of seconds");
    }
    let model_id = match &args.model {
        None => "bitnet-default".to_owned(),
        Some(path) => path.file_stem().map_or_else(|| "bitnet".to_owned(), |s| s.to_string_lossy().into_owned()),
    };
    let config = ServerConfig {
        model_id,
        api_key: args.api_key.filter(|k| !k.is_empty()),
        max_batch_size: args.max_batch_size,
        max_batch_tokens: args.max_batch_tokens,
        max_in_flight: args.max_in_flight,
        request_timeout: Duration::from_secs_f64(args.request_timeout_s),
        max_body_bytes: args.max_body_bytes,
    };
    if !(args.gpu_cool_down_s.is_finite() && args.gpu_cool_down_s >= 0.0 && args.gpu_cool_down_s < 1e6) {
        anyhow::bail!("--gpu-cool-down-s must be a non-negative number of seconds");
    }
    let fault_plan = match args.fault_plan.as_deref() {
        Some(spec) => FaultPlan::parse(spec).context("--fault-plan / BITNET_FAULT_PLAN")?,
        None => FaultPlan::default(),
    };
    let cool_down = Duration::from_secs_f64(args.gpu_cool_down_s);
    let options = EngineOptions {
        backend: args.backend,
        threads: args.threads,
        head: if args.int8_head { HeadPrecision::Int8 } else { HeadPrecision::Native },
        kv_cache: args.kv_cache,
        simulate_gpu: args.simulate_gpu,
        fault_plan,
        engine: EngineConfig {
            max_batch_tokens: config.max_batch_tokens,
            gpu_memory_utilization: args.gpu_memory_utilization,
            cool_down,
            max_cool_down: EngineConfig::default().max_cool_down.max(cool_down),
            prefix_cache_tokens: args.prefix_cache_tokens,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async move {
        let listener = TcpListener::bind((args.host, args.port))
            .await
            .with_context(|| format!("binding {}:{}", args.host, args.port))?;
        eprintln!("bitnet serve: listening on http://{} (model `{}`)", listener.local_addr()?, config.model_id);
        let path = args.model;
        let load = move || -> Result<(Engine, Tokenizer), LoadError> {
            let model = Arc::new(load_model(path.as_ref())?);
            let tokenizer = model.tokenizer.clone();
            let engine = build_engine(model, &options, &bitnet_device::probe_gpus())?;
            eprintln!("bitnet serve: model loaded ({})", engine.cpu_info().detail);
            Ok((engine, tokenizer))
        };
        serve_with_loader(listener, config, load, shutdown_signal()).await?;
        eprintln!("bitnet serve: stopped");
        Ok(())
    })
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    eprintln!("bitnet serve: shutting down; finishing the requests in flight");
}
