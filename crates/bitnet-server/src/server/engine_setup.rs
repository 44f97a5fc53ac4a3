//! Building the fallback engine `bitnet serve` runs: the CPU backend it
//! always has, and the primary device: the CUDA backend where there is one,
//! or with `--simulate-gpu` a CPU backend posing as a GPU, under the fault
//! plan from `--fault-plan` / `BITNET_FAULT_PLAN`.

use std::sync::Arc;

use bitnet_device::{CpuInfo, FaultInjector, FaultPlan, GpuProbe};
use bitnet_inference::simulated_gpu::{simulated_gpu_info, simulated_primary};
use bitnet_inference::{
    Backend, CpuBackend, CpuBackendConfig, Engine, EngineConfig, HeadPrecision, KvCachePrecision, PrimaryDevice,
    ReferenceBackend,
};
use bitnet_models::BitNetModel;

use super::LoadError;

/// Which forward pass serves the CPU side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServeBackend {
    Cpu,
    Reference,
}

/// Everything that decides how the engine is built.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineOptions {
    pub backend: ServeBackend,
    /// CPU worker threads (0 = one per core).
    pub threads: usize,
    pub head: HeadPrecision,
    /// Element type of the CPU backend's KV cache.
    pub kv_cache: KvCachePrecision,
    /// Run a simulated GPU (the CPU backend as the primary device) when the
    /// machine has no usable GPU backend.
    pub simulate_gpu: bool,
    /// Faults for the primary device; the empty plan breaks nothing.
    pub fault_plan: FaultPlan,
    pub engine: EngineConfig,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            backend: ServeBackend::Cpu,
            threads: 0,
            head: HeadPrecision::Native,
            kv_cache: KvCachePrecision::F32,
            simulate_gpu: false,
            fault_plan: FaultPlan::default(),
            engine: EngineConfig::default(),
        }
    }
}

/// Memory of a simulated GPU before a fault plan caps it: what the host has
/// available (the simulated device is the host), else 16 GiB.
fn simulated_memory() -> u64 {
    CpuInfo::probe().available_memory_bytes.unwrap_or(16 << 30)
}

/// Builds the engine for `model`; `probe` is what GPU probing found. Says on
/// stderr which device is primary, so logs tell a simulated GPU from a real one.
pub fn build_engine(model: Arc<BitNetModel>, options: &EngineOptions, probe: &GpuProbe) -> Result<Engine, LoadError> {
    let cpu_config =
        CpuBackendConfig { threads: options.threads, kernel: None, head: options.head, kv_cache: options.kv_cache };
    let cpu: Box<dyn Backend> = match options.backend {
        ServeBackend::Cpu => {
            Box::new(CpuBackend::new(model.clone(), &cpu_config).map_err(|e| format!("starting the CPU backend: {e}"))?)
        }
        ServeBackend::Reference => Box::new(ReferenceBackend::new(model.clone())),
    };
    let primary = primary_device(model, cpu_config, options, probe);
    let Some(primary) = primary else {
        if !options.fault_plan.is_empty() {
            eprintln!(
                "bitnet serve: warning: the fault plan `{}` has no GPU to act on (add --simulate-gpu)",
                options.fault_plan
            );
        }
        return Ok(Engine::cpu_only_with(cpu, options.engine.clone()));
    };
    let gpu = &primary.gpu;
    let caps = gpu.capabilities();
    eprintln!(
        "bitnet serve: primary device {} (cc {}.{}, fp16 {}, bf16 {}, tensor cores {}, {:.1} MB free), fault plan `{}`",
        gpu.name,
        gpu.compute_capability.0,
        gpu.compute_capability.1,
        caps.fp16,
        caps.bf16,
        caps.tensor_cores,
        gpu.free_memory_bytes as f64 / 1e6,
        options.fault_plan
    );
    Ok(Engine::new(cpu, primary, options.engine.clone())?)
}

/// The GPU side of the engine, if any.
fn primary_device(
    model: Arc<BitNetModel>,
    cpu_config: CpuBackendConfig,
    options: &EngineOptions,
    probe: &GpuProbe,
) -> Option<PrimaryDevice> {
    if !options.simulate_gpu {
        return cuda_primary(model, options, probe);
    }
    let gpu = options.fault_plan.apply(&simulated_gpu_info(simulated_memory()));
    let injector = Arc::new(FaultInjector::new(options.fault_plan.clone()));
    Some(simulated_primary(model, cpu_config, gpu, injector, options.engine.max_batch_tokens))
}

/// The CUDA backend on the first GPU the kernels support, under the fault
/// plan: the plan's capability and memory overrides shape the engine's
/// decisions, and its injector fails allocations and launches of the real
/// backend. Each backend's KV pool is sized from the measured free memory
/// (after the plan), as vLLM sizes its cache at warm-up.
#[cfg(feature = "cuda")]
fn cuda_primary(model: Arc<BitNetModel>, options: &EngineOptions, probe: &GpuProbe) -> Option<PrimaryDevice> {
    use bitnet_inference::memory_plan::gpu_memory_plan_for_model;
    use bitnet_inference::DeviceHooks;
    use bitnet_inference::{BackendError, CudaBackend, CudaBackendConfig};

    let found = probe.gpus().first()?;
    if found.compute_capability.0 < 8 {
        eprintln!(
            "bitnet serve: {} has compute capability {}.{}; the CUDA kernels need 8.0, requests run on the CPU",
            found.name, found.compute_capability.0, found.compute_capability.1
        );
        return None;
    }
    let gpu = options.fault_plan.apply(found);
    let injector = Arc::new(FaultInjector::new(options.fault_plan.clone()));
    let hooks: Option<Arc<dyn DeviceHooks>> =
        if options.fault_plan.is_empty() { None } else { Some(injector as Arc<dyn DeviceHooks>) };
    let untied_head = model.output.is_some();
    let (ordinal, free, compute_capability) = (gpu.ordinal, gpu.free_memory_bytes, gpu.compute_capability);
    let (max_batch_tokens, utilization) = (options.engine.max_batch_tokens, options.engine.gpu_memory_utilization);
    let factory: bitnet_inference::engine::BackendFactory = Box::new(move |precision| {
        let fixed = gpu_memory_plan_for_model(&model, precision, 0, max_batch_tokens).total();
        let per_position = gpu_memory_plan_for_model(&model, precision, 1, max_batch_tokens).kv_cache.max(1);
        // Half of what is left for this precision's pool: a second precision
        // created later must fit too.
        let budget = ((free as f64 * utilization) as u64).saturating_sub(fixed) / 2;
        let cap = 64 * model.config.max_position_embeddings as u64;
        let kv_slots = (budget / per_position).min(cap) as usize;
        if kv_slots < model.config.max_position_embeddings.min(256) {
            return Err(BackendError::OutOfMemory(format!(
                "{} B free leave room for only {kv_slots} KV positions at {precision:?}",
                free
            )));
        }
        if let Some(notice) = bitnet_inference::kernel_compile_notice(ordinal, compute_capability) {
            eprintln!("bitnet serve: {notice}");
        }
        let config = CudaBackendConfig {
            ordinal,
            precision,
            kv_slots,
            max_step_tokens: max_batch_tokens.clamp(64, 4096),
            max_step_entries: 256,
            hooks: hooks.clone(),
            ..Default::default()
        };
        Ok(Box::new(CudaBackend::new(model.clone(), &config)?) as Box<dyn Backend>)
    });
    Some(PrimaryDevice { gpu, factory, untied_head })
}

#[cfg(not(feature = "cuda"))]
fn cuda_primary(_model: Arc<BitNetModel>, _options: &EngineOptions, probe: &GpuProbe) -> Option<PrimaryDevice> {
    if !probe.gpus().is_empty() {
        eprintln!("bitnet serve: {probe}, but this build has no `cuda` feature; requests run on the CPU");
    }
    None
}
