//! Building the fallback engine `bitnet serve` runs: the CPU backend it
//! always has, and the primary device: the CUDA backend where there is one,
//! or with `--simulate-gpu` a CPU backend posing as a GPU, under the fault
//! plan from `--fault-plan` / `BITNET_FAULT_PLAN`.

use std::sync::Arc;

use bitnet_device::{CpuInfo, FaultInjector, FaultPlan, GpuProbe};
use bitnet_inference::simulated_gpu::{simulated_gpu_info, simulated_primary};
use bitnet_inference::{
    Backend, CpuBackend, CpuBackendConfig, Engine, EngineConfig, HeadPrecision, PrimaryDevice, ReferenceBackend,
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
    let cpu_config = CpuBackendConfig { threads: options.threads, kernel: None, head: options.head };
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
        return Ok(Engine::cpu_only(cpu));
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
    // The CUDA backend becomes the primary device here when the probe found
    // a GPU; until it exists, GPUs are reported by /v1/devices but unused.
    if !probe.gpus().is_empty() && !options.simulate_gpu {
        eprintln!("bitnet serve: {probe}, but this build has no CUDA backend; requests run on the CPU");
    }
    if !options.simulate_gpu {
        return None;
    }
    let gpu = options.fault_plan.apply(&simulated_gpu_info(simulated_memory()));
    let injector = Arc::new(FaultInjector::new(options.fault_plan.clone()));
    Some(simulated_primary(model, cpu_config, gpu, injector, options.engine.max_batch_tokens))
}
