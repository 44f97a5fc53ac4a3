//! BitNet b1.58 inference: the reference forward pass (the yardstick every
//! faster path is checked against), the fast CPU backend, the `Backend`
//! interface they share, the fallback [`Engine`] that places requests on the
//! GPU or the CPU, sampling, and generation.
//!
//! ```
//! use std::sync::Arc;
//! use bitnet_inference::{generate, CpuBackend, CpuBackendConfig, GenerationConfig};
//! use bitnet_models::synthetic::{self, Preset};
//!
//! let model = Arc::new(synthetic::generate(Preset::Tiny, 1).unwrap());
//! let mut backend = CpuBackend::new(model.clone(), &CpuBackendConfig::default()).unwrap();
//! let prompt = model.tokenizer.encode("Hello", true).unwrap();
//! let out = generate(&mut backend, &prompt, &GenerationConfig::greedy(4), |_| {}).unwrap();
//! assert_eq!(out.tokens.len(), 4);
//! ```

pub mod backend;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod engine;
mod error;
mod generate;
mod int8_head;
pub mod memory_plan;
pub mod ops;
mod reference;
pub mod sampling;
pub mod simulated_gpu;

pub use backend::{Backend, BackendError, BackendInfo, ReferenceBackend, SeqId, StepInput, StepOutput, StepWant};
#[cfg(feature = "cuda")]
pub use bitnet_kernels::cuda::{kernel_compile_notice, kernel_source_status, DeviceHooks};
pub use cpu::{CpuBackend, CpuBackendConfig, KvCachePrecision, PhaseTimes};
#[cfg(feature = "cuda")]
pub use cuda::{CudaBackend, CudaBackendConfig, CudaMemory};
pub use engine::{
    DevicePreference, Engine, EngineConfig, EngineError, EngineEvent, FallbackReason, GpuHealth, PrecisionPreference,
    PrefixCacheStats, PrimaryDevice, QuantizationPreference, RequestPreferences, SequenceReport,
};
pub use error::InferenceError;
pub use generate::{generate, GenerationConfig, GenerationOutput, StopReason};
pub use int8_head::HeadPrecision;
pub use reference::{KvCache, LogitsMode, ReferenceForward};
pub use sampling::{argmax, SampleDraw, Sampler, SamplingConfig};
