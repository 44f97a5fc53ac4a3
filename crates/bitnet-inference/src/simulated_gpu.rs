//! A simulated GPU for machines without one: a CPU backend standing in for
//! the primary device, which allocates and launches through a
//! [`FaultInjector`] the way the CUDA backend does. It lets a fault plan
//! drive the fallback engine's decisions and recovery on any machine; its
//! results say `cpu-simulated-gpu`, so nobody mistakes them for GPU runs.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bitnet_device::{CapabilityOverrides, FaultInjector, GpuInfo, InjectedFault, Precision};

use bitnet_models::{BitNetConfig, BitNetModel};

use crate::backend::{Backend, BackendError, BackendInfo, SeqId, StepInput};
use crate::cpu::{CpuBackend, CpuBackendConfig};
use crate::engine::{BackendFactory, PrimaryDevice};
use crate::memory_plan::{gpu_memory_plan_for_model, GpuMemoryPlan};

/// The `device` a simulated GPU reports.
pub const SIMULATED_GPU_DEVICE: &str = "cpu-simulated-gpu";

/// The GPU a simulated device claims to be before a fault plan changes it:
/// an H200-like part (compute capability 9.0: fp16, bf16, tensor cores)
/// with `memory_bytes` of memory, all free.
pub fn simulated_gpu_info(memory_bytes: u64) -> GpuInfo {
    GpuInfo {
        ordinal: 0,
        name: format!("simulated GPU ({SIMULATED_GPU_DEVICE})"),
        compute_capability: (9, 0),
        total_memory_bytes: memory_bytes,
        free_memory_bytes: memory_bytes,
        capability_overrides: CapabilityOverrides::default(),
    }
}

/// The primary device of an engine on a machine without a GPU: a
/// [`SimulatedGpuBackend`] over a fresh [`CpuBackend`] at each precision,
/// seen as `gpu` (normally [`simulated_gpu_info`] after `FaultPlan::apply`),
/// faulting through `injector`.
pub fn simulated_primary(
    model: Arc<BitNetModel>,
    cpu_config: CpuBackendConfig,
    gpu: GpuInfo,
    injector: Arc<FaultInjector>,
    max_batch_tokens: usize,
) -> PrimaryDevice {
    let untied_head = model.output.is_some();
    let factory: BackendFactory = Box::new(move |precision| {
        let plan = gpu_memory_plan_for_model(&model, precision, 1, max_batch_tokens);
        let inner = CpuBackend::new(model.clone(), &cpu_config)?;
        let backend = SimulatedGpuBackend::new(Box::new(inner), injector.clone(), precision, plan)?;
        Ok(Box::new(backend) as Box<dyn Backend>)
    });
    PrimaryDevice { gpu, factory, untied_head }
}

fn injected(fault: InjectedFault) -> BackendError {
    match fault {
        InjectedFault::OutOfMemory { .. } => BackendError::OutOfMemory(fault.to_string()),
        _ => BackendError::Device(fault.to_string()),
    }
}

/// A backend (normally a `CpuBackend`) posing as a GPU at one precision.
///
/// Creation reserves the weights and workspace of the memory plan through
/// the injector, `add_sequence` the sequence's KV cache. Creating it is one
/// CUDA call (the context) and each step is one more (the step's kernels as
/// one graph launch); a failed call fails as a device error, a step with
/// nothing advanced. The arithmetic is the inner backend's (f32 on the
/// CPU), whatever `precision` says.
pub struct SimulatedGpuBackend {
    inner: Box<dyn Backend>,
    injector: Arc<FaultInjector>,
    precision: Precision,
    static_bytes: u64,
    kv_bytes_per_position: u64,
    kv_bytes: HashMap<SeqId, u64>,
}

impl fmt::Debug for SimulatedGpuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatedGpuBackend")
            .field("precision", &self.precision)
            .field("static_bytes", &self.static_bytes)
            .field("sequences", &self.kv_bytes.len())
            .finish()
    }
}

impl SimulatedGpuBackend {
    /// `plan` is the memory plan at `precision` for one KV position (its
    /// `weights + workspace` are reserved now, `kv_cache` per position later).
    pub fn new(
        inner: Box<dyn Backend>,
        injector: Arc<FaultInjector>,
        precision: Precision,
        plan: GpuMemoryPlan,
    ) -> Result<Self, BackendError> {
        injector.on_launch("create context").map_err(injected)?;
        let static_bytes = plan.weights.saturating_add(plan.workspace);
        injector.on_alloc(static_bytes).map_err(injected)?;
        injector.on_ready();
        Ok(Self {
            inner,
            injector,
            precision,
            static_bytes,
            kv_bytes_per_position: plan.kv_cache,
            kv_bytes: HashMap::new(),
        })
    }
}

impl Drop for SimulatedGpuBackend {
    fn drop(&mut self) {
        let kv: u64 = self.kv_bytes.values().sum();
        self.injector.on_free(self.static_bytes.saturating_add(kv));
    }
}

impl Backend for SimulatedGpuBackend {
    fn info(&self) -> BackendInfo {
        let inner = self.inner.info();
        BackendInfo {
            device: SIMULATED_GPU_DEVICE.into(),
            precision: self.precision.name().into(),
            quantization: inner.quantization,
            detail: format!(
                "{} standing in for a GPU at {} (computes in {}; memory planned and faults injected as for {})",
                inner.detail,
                self.precision.name(),
                inner.precision,
                self.precision.name()
            ),
        }
    }

    fn config(&self) -> &BitNetConfig {
        self.inner.config()
    }

    fn add_sequence(&mut self, seq: SeqId, max_positions: usize) -> Result<(), BackendError> {
        if self.kv_bytes.contains_key(&seq) {
            return Err(BackendError::DuplicateSequence(seq));
        }
        let bytes = self.kv_bytes_per_position.saturating_mul(max_positions as u64);
        self.injector.on_alloc(bytes).map_err(injected)?;
        if let Err(err) = self.inner.add_sequence(seq, max_positions) {
            self.injector.on_free(bytes);
            return Err(err);
        }
        self.kv_bytes.insert(seq, bytes);
        Ok(())
    }

    fn remove_sequence(&mut self, seq: SeqId) {
        if let Some(bytes) = self.kv_bytes.remove(&seq) {
            self.injector.on_free(bytes);
        }
        self.inner.remove_sequence(seq);
    }

    fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        self.inner.sequence_len(seq)
    }

    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, len: usize) -> Result<(), BackendError> {
        // A copy on the device is a launch: an injected launch failure fails it.
        self.injector.on_launch("KV prefix copy").map_err(injected)?;
        self.inner.copy_prefix(src, dst, len)
    }

    fn shrink_to_fit(&mut self, seq: SeqId) -> Result<(), BackendError> {
        self.inner.shrink_to_fit(seq)?;
        let len = self.inner.sequence_len(seq).unwrap_or(0);
        let kept = self.kv_bytes_per_position.saturating_mul(len as u64);
        if let Some(bytes) = self.kv_bytes.get_mut(&seq) {
            self.injector.on_free(bytes.saturating_sub(kept));
            *bytes = kept.min(*bytes);
        }
        Ok(())
    }

    fn step(&mut self, batch: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        // The launch is checked before anything runs, so a failure leaves
        // every sequence as it was (the Backend contract).
        self.injector.on_step();
        self.injector.on_launch("forward step").map_err(injected)?;
        self.inner.step(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_plan::gpu_memory_plan;
    use crate::ReferenceBackend;
    use bitnet_device::FaultPlan;
    use bitnet_models::synthetic::{self, Preset};

    fn simulated(plan: FaultPlan) -> (Result<SimulatedGpuBackend, BackendError>, Arc<FaultInjector>) {
        let model = Arc::new(synthetic::generate(Preset::Tiny, 3).unwrap());
        let memory = gpu_memory_plan(&model.config, Precision::Fp16, 1, 16);
        let injector = Arc::new(FaultInjector::new(plan));
        let backend =
            SimulatedGpuBackend::new(Box::new(ReferenceBackend::new(model)), injector.clone(), Precision::Fp16, memory);
        (backend, injector)
    }

    #[test]
    fn memory_is_reserved_through_the_injector_and_given_back() {
        let (backend, injector) = simulated(FaultPlan::default());
        let mut backend = backend.unwrap();
        let memory = gpu_memory_plan(backend.config(), Precision::Fp16, 1, 16);
        assert_eq!(injector.allocated(), memory.weights + memory.workspace);
        backend.add_sequence(1, 10).unwrap();
        assert_eq!(injector.allocated(), memory.weights + memory.workspace + 10 * memory.kv_cache);
        backend.remove_sequence(1);
        backend.add_sequence(2, 4).unwrap();
        drop(backend);
        assert_eq!(injector.allocated(), 0);
        assert_eq!(injector.launches(), 1, "creating the context is one call");
    }

    #[test]
    fn allocations_past_the_limit_are_out_of_memory() {
        let (backend, _) = simulated(FaultPlan { gpu_memory_limit: Some(1000), ..FaultPlan::default() });
        assert!(matches!(backend.unwrap_err(), BackendError::OutOfMemory(m) if m.contains("injected out-of-memory")));

        let memory = gpu_memory_plan(&synthetic::generate(Preset::Tiny, 3).unwrap().config, Precision::Fp16, 1, 16);
        let limit = memory.weights + memory.workspace + 8 * memory.kv_cache;
        let (backend, injector) = simulated(FaultPlan { gpu_memory_limit: Some(limit), ..FaultPlan::default() });
        let mut backend = backend.unwrap();
        backend.add_sequence(1, 8).unwrap();
        assert!(matches!(backend.add_sequence(2, 1).unwrap_err(), BackendError::OutOfMemory(_)));
        assert_eq!(backend.sequence_len(2), None, "a failed reservation leaves no sequence behind");
        backend.remove_sequence(1);
        backend.add_sequence(2, 8).unwrap();
        assert_eq!(injector.allocated(), limit);
    }

    #[test]
    fn a_failed_launch_fails_the_step_with_nothing_advanced() {
        // The context is launch 1, the first step launch 2.
        let (backend, _) = simulated(FaultPlan { fail_after_launches: Some(2), ..FaultPlan::default() });
        let mut backend = backend.unwrap();
        backend.add_sequence(1, 8).unwrap();
        backend.step(&[StepInput { seq: 1, tokens: &[1, 2] }]).unwrap();
        let err = backend.step(&[StepInput { seq: 1, tokens: &[3] }]).unwrap_err();
        assert!(
            matches!(&err, BackendError::Device(m) if m.contains("forward step") && m.contains("launch 3")),
            "{err}"
        );
        assert_eq!(backend.sequence_len(1), Some(2));
        let info = backend.info();
        assert_eq!((info.device.as_str(), info.precision.as_str()), (SIMULATED_GPU_DEVICE, "fp16"));
        assert!(info.detail.contains("computes in f64"), "{}", info.detail);
    }
}
