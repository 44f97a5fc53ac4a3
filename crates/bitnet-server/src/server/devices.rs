//! JSON descriptions of the machine's CPU and GPUs, shared by `bitnet devices
//! --json` and `GET /v1/devices`.

use bitnet_device::{select_precision, CpuInfo, GpuInfo, GpuProbe, PrecisionRequest};
use serde_json::{json, Value};

pub fn cpu_json(cpu: &CpuInfo) -> Value {
    json!({
        "arch": cpu.arch,
        "logical_cores": cpu.logical_cores,
        "features": cpu.feature_names(),
        "total_memory_bytes": cpu.total_memory_bytes,
        "available_memory_bytes": cpu.available_memory_bytes,
    })
}

/// One entry per GPU found (empty without a driver), with its capabilities
/// and the precision `auto` would pick on it.
pub fn gpus_json(probe: &GpuProbe) -> Value {
    probe.gpus().iter().map(gpu_json).collect()
}

/// One GPU with its capabilities (overrides included) and the precision
/// `auto` would pick on it.
pub fn gpu_json(g: &GpuInfo) -> Value {
    let caps = g.capabilities();
    let auto = select_precision(PrecisionRequest::Auto, g.compute_capability);
    json!({
        "ordinal": g.ordinal,
        "name": g.name,
        "compute_capability": format!("{}.{}", g.compute_capability.0, g.compute_capability.1),
        "total_memory_bytes": g.total_memory_bytes,
        "free_memory_bytes": g.free_memory_bytes,
        "fp16": caps.fp16,
        "bf16": caps.bf16,
        "tensor_cores": caps.tensor_cores,
        "auto_precision": auto.as_ref().map(|p| p.name()).ok(),
    })
}
