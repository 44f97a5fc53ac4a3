//! Device-level code for bitnet-rs: what the machine can do, fault injection
//! for the device layer, and the few OS facilities (memory-mapped model
//! files, huge-page buffers) that need `unsafe`.
//!
//! This crate and `bitnet-kernels` are the only places where `unsafe` is allowed;
//! every block states its invariant in a `// SAFETY:` comment.

pub mod cpu;
pub mod fault;
pub mod gpu;
pub mod huge;
pub mod mmap;

pub use cpu::CpuInfo;
pub use fault::{FaultInjector, FaultPlan, FaultPlanError, InjectedFault, FAULT_PLAN_ENV};
pub use gpu::{
    probe_gpus, select_precision, CapabilityOverrides, GpuCapabilities, GpuInfo, GpuProbe, Precision, PrecisionRequest,
};
pub use huge::HugePageBuffer;
pub use mmap::MappedFile;
