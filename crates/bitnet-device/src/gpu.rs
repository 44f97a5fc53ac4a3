//! GPU probing through the CUDA driver API (cudarc, loaded at run time), and
//! the precision choice that follows from a GPU's capabilities.
//!
//! cudarc panics when a CUDA library is missing at its first use, so every
//! probe first checks that libcuda can be loaded and turns its absence into
//! [`GpuProbe::NoDriver`].

#![allow(unsafe_code)]

use std::fmt;

/// One CUDA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor)
    pub compute_capability: (i32, i32),
    pub total_memory_bytes: u64,
    pub free_memory_bytes: u64,
    /// Capabilities forced by a fault plan (`FaultPlan::apply`); a probed
    /// GPU has none, and its capabilities follow its compute capability.
    pub capability_overrides: CapabilityOverrides,
}

/// Per-capability overrides of what the compute capability implies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapabilityOverrides {
    pub fp16: Option<bool>,
    pub bf16: Option<bool>,
    pub tensor_cores: Option<bool>,
}

/// What a device's compute capability allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuCapabilities {
    /// Native f16 arithmetic (cc >= 5.3).
    pub fp16: bool,
    /// bf16 (cc >= 8.0).
    pub bf16: bool,
    /// Tensor cores (cc >= 7.0).
    pub tensor_cores: bool,
}

impl GpuCapabilities {
    pub fn from_compute_capability((major, minor): (i32, i32)) -> Self {
        let at_least = |ma: i32, mi: i32| (major, minor) >= (ma, mi);
        Self { fp16: at_least(5, 3), bf16: at_least(8, 0), tensor_cores: at_least(7, 0) }
    }
}

impl GpuInfo {
    /// What the compute capability allows, with any override applied.
    pub fn capabilities(&self) -> GpuCapabilities {
        let derived = GpuCapabilities::from_compute_capability(self.compute_capability);
        let o = self.capability_overrides;
        GpuCapabilities {
            fp16: o.fp16.unwrap_or(derived.fp16),
            bf16: o.bf16.unwrap_or(derived.bf16),
            tensor_cores: o.tensor_cores.unwrap_or(derived.tensor_cores),
        }
    }
}

/// The result of looking for GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GpuProbe {
    /// No CUDA driver library on this machine.
    NoDriver { reason: String },
    /// The driver loaded but a query failed (no device, driver too old, ...).
    DriverError { reason: String },
    /// The driver's version (e.g. 13000 for 13.0) and every device.
    Devices { driver_version: i32, gpus: Vec<GpuInfo> },
}

impl GpuProbe {
    pub fn gpus(&self) -> &[GpuInfo] {
        match self {
            Self::Devices { gpus, .. } => gpus,
            _ => &[],
        }
    }
}

impl fmt::Display for GpuProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDriver { reason } => write!(f, "no CUDA driver ({reason})"),
            Self::DriverError { reason } => write!(f, "CUDA driver error: {reason}"),
            Self::Devices { driver_version, gpus } => {
                write!(
                    f,
                    "CUDA driver {}.{}, {} GPU(s)",
                    driver_version / 1000,
                    (driver_version % 1000) / 10,
                    gpus.len()
                )
            }
        }
    }
}

/// Looks for CUDA devices. Never panics: a missing driver is `NoDriver`.
pub fn probe_gpus() -> GpuProbe {
    // SAFETY: `is_culib_present` only tries to dlopen libcuda and reports
    // whether that worked; it has no precondition. Checking it first is what
    // keeps the cudarc calls below from panicking on a machine without CUDA.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    if !present {
        return GpuProbe::NoDriver { reason: "libcuda could not be loaded".into() };
    }
    match query_devices() {
        Ok(probe) => probe,
        Err(err) => GpuProbe::DriverError { reason: err.to_string() },
    }
}

fn query_devices() -> Result<GpuProbe, cudarc::driver::DriverError> {
    use cudarc::driver::CudaContext;
    let count = CudaContext::device_count()?;
    let mut driver_version = 0i32;
    // SAFETY: libcuda is loaded (checked by the caller) and initialised by
    // `device_count`; `cuDriverGetVersion` only writes one i32 through the
    // pointer, which points at a live local.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }.result()?;
    let mut gpus = Vec::new();
    for ordinal in 0..usize::try_from(count).unwrap_or(0) {
        let ctx = CudaContext::new(ordinal)?;
        let (free, total) = ctx.mem_get_info()?;
        gpus.push(GpuInfo {
            ordinal,
            name: ctx.name()?,
            compute_capability: ctx.compute_capability()?,
            total_memory_bytes: total as u64,
            free_memory_bytes: free as u64,
            capability_overrides: CapabilityOverrides::default(),
        });
    }
    Ok(GpuProbe::Devices { driver_version, gpus })
}

/// Activation precision on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Fp16 => "fp16",
            Self::Bf16 => "bf16",
        }
    }

    /// Bytes of one element (activations, KV cache, float weights).
    pub fn element_bytes(self) -> u64 {
        match self {
            Self::Fp32 => 4,
            Self::Fp16 | Self::Bf16 => 2,
        }
    }

    /// Whether this is a mixed (16-bit) precision.
    pub fn is_mixed(self) -> bool {
        !matches!(self, Self::Fp32)
    }

    pub const ALL: [Precision; 3] = [Precision::Fp32, Precision::Fp16, Precision::Bf16];
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown precision `{s}` (expected fp32, fp16 or bf16)"))
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrecisionRequest {
    /// The best mixed precision the device supports.
    Auto,
    Exactly(Precision),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PrecisionError {
    #[error("{requested} was requested but this GPU (compute capability {major}.{minor}) does not support it")]
    Unsupported { requested: &'static str, major: i32, minor: i32 },
    #[error(
        "no mixed precision is available on this GPU (compute capability {major}.{minor}); the caller should fall back"
    )]
    NoMixedPrecision { major: i32, minor: i32 },
}

/// Auto picks BF16 where there are tensor cores and bf16, else FP16, else
/// reports that no mixed precision exists (the caller falls back). An
/// explicit request the device cannot serve is an error.
pub fn select_precision(request: PrecisionRequest, cc: (i32, i32)) -> Result<Precision, PrecisionError> {
    let caps = GpuCapabilities::from_compute_capability(cc);
    let (major, minor) = cc;
    match request {
        PrecisionRequest::Auto if caps.tensor_cores && caps.bf16 => Ok(Precision::Bf16),
        PrecisionRequest::Auto if caps.fp16 => Ok(Precision::Fp16),
        PrecisionRequest::Auto => Err(PrecisionError::NoMixedPrecision { major, minor }),
        PrecisionRequest::Exactly(Precision::Fp32) => Ok(Precision::Fp32),
        PrecisionRequest::Exactly(p @ Precision::Fp16) if caps.fp16 => Ok(p),
        PrecisionRequest::Exactly(p @ Precision::Bf16) if caps.bf16 => Ok(p),
        PrecisionRequest::Exactly(p) => Err(PrecisionError::Unsupported { requested: p.name(), major, minor }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_follow_compute_capability() {
        let check = |cc, fp16, bf16, tensor_cores| {
            assert_eq!(
                GpuCapabilities::from_compute_capability(cc),
                GpuCapabilities { fp16, bf16, tensor_cores },
                "{cc:?}"
            );
        };
        check((5, 2), false, false, false);
        check((5, 3), true, false, false);
        check((6, 1), true, false, false);
        check((7, 0), true, false, true);
        check((7, 5), true, false, true);
        check((8, 0), true, true, true);
        check((9, 0), true, true, true);
    }

    #[test]
    fn precision_selection_table() {
        use Precision::*;
        use PrecisionRequest::*;
        type Case = ((i32, i32), PrecisionRequest, Result<Precision, &'static str>);
        let cases: [Case; 10] = [
            ((9, 0), Auto, Ok(Bf16)),
            ((8, 0), Auto, Ok(Bf16)),
            ((7, 5), Auto, Ok(Fp16)),
            ((6, 1), Auto, Ok(Fp16)),
            ((5, 0), Auto, Err("no mixed precision")),
            ((9, 0), Exactly(Fp16), Ok(Fp16)),
            ((7, 5), Exactly(Bf16), Err("bf16 was requested")),
            ((5, 0), Exactly(Fp16), Err("fp16 was requested")),
            ((5, 0), Exactly(Fp32), Ok(Fp32)),
            ((6, 1), Exactly(Bf16), Err("compute capability 6.1")),
        ];
        for (cc, request, expected) in cases {
            match (select_precision(request, cc), expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{cc:?} {request:?}"),
                (Err(err), Err(needle)) => assert!(err.to_string().contains(needle), "{cc:?} {request:?}: {err}"),
                (got, want) => panic!("{cc:?} {request:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn probing_never_panics() {
        // On a machine without CUDA this is NoDriver; with one, Devices or an error.
        let probe = probe_gpus();
        match &probe {
            GpuProbe::NoDriver { .. } => eprintln!("SKIPPED: no CUDA driver on this machine ({probe})"),
            GpuProbe::DriverError { reason } => assert!(!reason.is_empty()),
            GpuProbe::Devices { gpus, driver_version } => {
                assert!(*driver_version > 0);
                for gpu in gpus {
                    assert!(gpu.total_memory_bytes >= gpu.free_memory_bytes && gpu.total_memory_bytes > 0);
                    assert!(gpu.compute_capability.0 >= 3, "{gpu:?}");
                }
            }
        }
        assert!(!probe.to_string().is_empty());
    }
}
