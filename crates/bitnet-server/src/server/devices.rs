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

/// What `bitnet devices` says of the GPU backend: whether this build has
/// it, and for each GPU where its kernels would come from.
pub fn gpu_backend_json(probe: &GpuProbe) -> Value {
    #[cfg(feature = "cuda")]
    {
        let gpus: Vec<Value> = probe
            .gpus()
            .iter()
            .map(|g| json!({ "ordinal": g.ordinal, "kernels": bitnet_inference::kernel_source_status(g.compute_capability) }))
            .collect();
        json!({ "built": true, "precisions": ["fp32", "fp16", "bf16"], "gpus": gpus })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = probe;
        json!({ "built": false, "why": "this binary was built without the `cuda` feature; inference runs on the CPU" })
    }
}

/// The same as lines of text.
pub fn gpu_backend_lines(probe: &GpuProbe) -> Vec<String> {
    let v = gpu_backend_json(probe);
    if v["built"] != true {
        return vec![format!("gpu backend: not in this build ({})", v["why"].as_str().unwrap_or(""))];
    }
    let mut lines = vec!["gpu backend: CUDA (fp32, fp16, bf16)".to_string()];
    match v["gpus"].as_array() {
        Some(gpus) if !gpus.is_empty() => {
            for g in gpus {
                lines.push(format!("gpu {} kernels: {}", g["ordinal"], g["kernels"].as_str().unwrap_or("")));
            }
        }
        _ => lines.push("gpu backend: no GPU to run on here; inference runs on the CPU".to_string()),
    }
    lines
}
