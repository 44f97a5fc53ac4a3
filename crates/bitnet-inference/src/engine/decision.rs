//! The decision made before a request runs: what it asked for
//! ([`RequestPreferences`]), what the GPU offers ([`GpuView`]), and where it
//! goes ([`Placement`]), with a typed [`FallbackReason`] when it does not go
//! where it asked. A pure function, so every combination is testable.

use std::fmt;
use std::str::FromStr;

use bitnet_device::{GpuCapabilities, Precision};

/// Which device a request would like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum DevicePreference {
    /// The GPU when one can serve the request, else the CPU.
    #[default]
    Auto,
    /// The GPU; served on the CPU (and reported as a fallback) when it cannot.
    Gpu,
    /// The CPU only.
    Cpu,
}

/// Which activation precision a request would like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum PrecisionPreference {
    /// The best the device offers: bf16 or fp16 on a GPU with tensor cores,
    /// else fp32; f32 on the CPU.
    #[default]
    Auto,
    Fp32,
    Fp16,
    Bf16,
}

/// Which weight format a request would like; the engine runs I2_S everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum QuantizationPreference {
    #[default]
    Auto,
    I2s,
}

macro_rules! named_enum {
    ($ty:ident, $what:literal, [$($variant:ident => $name:literal),+ $(,)?]) => {
        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl FromStr for $ty {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    other => Err(format!(
                        "{} must be one of {}, got `{other}`",
                        $what,
                        [$($name),+].join(", ")
                    )),
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named_enum!(DevicePreference, "device_preference", [Auto => "auto", Gpu => "gpu", Cpu => "cpu"]);
named_enum!(PrecisionPreference, "precision", [Auto => "auto", Fp32 => "fp32", Fp16 => "fp16", Bf16 => "bf16"]);
named_enum!(QuantizationPreference, "quantization_preference", [Auto => "auto", I2s => "i2s"]);

/// What one request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct RequestPreferences {
    pub device: DevicePreference,
    pub precision: PrecisionPreference,
    /// Shorthand: `true` asks for a mixed (16-bit) precision, `false`
    /// forbids one; `None` leaves it to `precision`.
    pub mixed_precision: Option<bool>,
    pub quantization: QuantizationPreference,
}

/// Why a request did not run where it asked (or stopped running there).
/// The snake_case names appear in responses and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum FallbackReason {
    /// No GPU, no CUDA driver, or no GPU backend in this build.
    GpuUnavailable,
    /// The request needs fp16/bf16 and the GPU supports neither (or not the one asked for).
    NoMixedPrecision,
    /// The precision needs tensor cores and the GPU has none.
    TensorCoresUnavailable,
    /// The memory plan (weights, this batch's KV cache, workspace) exceeds the free GPU memory.
    InsufficientGpuMemory,
    /// A CUDA call failed while the request ran on the GPU.
    CudaError,
    /// A GPU allocation failed while the request was placed or ran.
    OutOfMemory,
    /// The GPU is cooling down after an error that poisoned its context.
    GpuUnhealthy,
}

named_enum!(FallbackReason, "fallback_reason", [
    GpuUnavailable => "gpu_unavailable",
    NoMixedPrecision => "no_mixed_precision",
    TensorCoresUnavailable => "tensor_cores_unavailable",
    InsufficientGpuMemory => "insufficient_gpu_memory",
    CudaError => "cuda_error",
    OutOfMemory => "out_of_memory",
    GpuUnhealthy => "gpu_unhealthy",
]);

/// A request no device can serve as asked: answered as a client error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PreferenceError {
    #[error("precision {precision} is not available on the CPU, and device_preference is cpu")]
    CpuCannotServe { precision: &'static str },
    #[error("precision {precision} contradicts mixed_precision = {mixed_precision}")]
    Contradiction { precision: &'static str, mixed_precision: bool },
}

impl PreferenceError {
    /// The request field to blame.
    pub fn param(&self) -> &'static str {
        match self {
            Self::CpuCannotServe { .. } => "device_preference",
            Self::Contradiction { .. } => "mixed_precision",
        }
    }
}

/// The precision a request needs, with the `mixed_precision` shorthand folded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrecisionNeed {
    /// The best available; fp32 is fine.
    Any,
    /// bf16 or fp16.
    Mixed,
    Exactly(Precision),
}

impl PrecisionNeed {
    /// Whether only a GPU can serve this (the CPU backend computes in f32).
    pub fn requires_gpu(self) -> bool {
        match self {
            Self::Any => false,
            Self::Mixed => true,
            Self::Exactly(p) => p.is_mixed(),
        }
    }
}

impl RequestPreferences {
    /// Folds `mixed_precision` into `precision`; contradictions are errors.
    pub fn precision_need(&self) -> Result<PrecisionNeed, PreferenceError> {
        use PrecisionPreference as P;
        let exactly = |p: Precision| PrecisionNeed::Exactly(p);
        match (self.precision, self.mixed_precision) {
            (P::Auto, None) => Ok(PrecisionNeed::Any),
            (P::Auto, Some(true)) => Ok(PrecisionNeed::Mixed),
            (P::Auto, Some(false)) | (P::Fp32, None | Some(false)) => Ok(exactly(Precision::Fp32)),
            (P::Fp16, None | Some(true)) => Ok(exactly(Precision::Fp16)),
            (P::Bf16, None | Some(true)) => Ok(exactly(Precision::Bf16)),
            (P::Fp32, Some(true)) => Err(PreferenceError::Contradiction { precision: "fp32", mixed_precision: true }),
            (P::Fp16, Some(false)) => Err(PreferenceError::Contradiction { precision: "fp16", mixed_precision: false }),
            (P::Bf16, Some(false)) => Err(PreferenceError::Contradiction { precision: "bf16", mixed_precision: false }),
        }
    }

    /// Checks the request on its own (no device involved): contradictions,
    /// and GPU-only precisions on `device_preference: cpu`.
    pub fn validate(&self) -> Result<PrecisionNeed, PreferenceError> {
        let need = self.precision_need()?;
        if self.device == DevicePreference::Cpu && need.requires_gpu() {
            let precision = match need {
                PrecisionNeed::Exactly(p) => p.name(),
                _ => "mixed (fp16/bf16)",
            };
            return Err(PreferenceError::CpuCannotServe { precision });
        }
        Ok(need)
    }
}

/// The mixed precisions need tensor cores: the CUDA backend's fp16/bf16
/// kernels are tensor-core (mma) kernels; fp32 runs on the CUDA cores.
pub fn needs_tensor_cores(precision: Precision) -> bool {
    precision.is_mixed()
}

/// Whether `caps` can run `precision` at all (tensor cores aside).
pub fn supports(caps: GpuCapabilities, precision: Precision) -> bool {
    match precision {
        Precision::Fp32 => true,
        Precision::Fp16 => caps.fp16,
        Precision::Bf16 => caps.bf16,
    }
}

/// What the engine knows about its GPU when it decides.
#[derive(Clone, Copy)]
pub struct GpuView<'a> {
    /// False while cooling down after a poisoning error.
    pub healthy: bool,
    pub capabilities: GpuCapabilities,
    /// Whether the memory plan for this request at a precision fits the
    /// free memory (weights of a backend not created yet, the KV cache of
    /// every sequence on the GPU plus this one, the workspace).
    pub fits: &'a dyn Fn(Precision) -> bool,
}

impl fmt::Debug for GpuView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuView").field("healthy", &self.healthy).field("capabilities", &self.capabilities).finish()
    }
}

/// Where a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Gpu(Precision),
    /// On the CPU, with the reason when the request wanted the GPU.
    Cpu(Option<FallbackReason>),
}

/// Decides where a request runs. `gpu` is `None` when there is no GPU
/// backend at all. Checks, in order: the request itself, GPU presence and
/// health, the precision's support, tensor cores, memory. The precision is
/// chosen from capabilities before memory is looked at (a smaller precision
/// is not picked just to fit).
pub fn decide(prefs: &RequestPreferences, gpu: Option<GpuView<'_>>) -> Result<Placement, PreferenceError> {
    let need = prefs.validate()?;
    let wants_gpu = match prefs.device {
        DevicePreference::Cpu => false,
        DevicePreference::Gpu => true,
        DevicePreference::Auto => gpu.is_some() || need.requires_gpu(),
    };
    if !wants_gpu {
        return Ok(Placement::Cpu(None));
    }
    let Some(gpu) = gpu else { return Ok(Placement::Cpu(Some(FallbackReason::GpuUnavailable))) };
    if !gpu.healthy {
        return Ok(Placement::Cpu(Some(FallbackReason::GpuUnhealthy)));
    }
    let caps = gpu.capabilities;
    let mixed_choice = || {
        if caps.bf16 {
            Some(Precision::Bf16)
        } else if caps.fp16 {
            Some(Precision::Fp16)
        } else {
            None
        }
    };
    let precision = match need {
        PrecisionNeed::Any => match mixed_choice() {
            Some(p) if caps.tensor_cores => p,
            _ => Precision::Fp32,
        },
        PrecisionNeed::Mixed => match mixed_choice() {
            Some(p) => p,
            None => return Ok(Placement::Cpu(Some(FallbackReason::NoMixedPrecision))),
        },
        PrecisionNeed::Exactly(p) if supports(caps, p) => p,
        PrecisionNeed::Exactly(_) => return Ok(Placement::Cpu(Some(FallbackReason::NoMixedPrecision))),
    };
    if needs_tensor_cores(precision) && !caps.tensor_cores {
        return Ok(Placement::Cpu(Some(FallbackReason::TensorCoresUnavailable)));
    }
    if !(gpu.fits)(precision) {
        return Ok(Placement::Cpu(Some(FallbackReason::InsufficientGpuMemory)));
    }
    Ok(Placement::Gpu(precision))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn caps(fp16: bool, bf16: bool, tensor_cores: bool) -> GpuCapabilities {
        GpuCapabilities { fp16, bf16, tensor_cores }
    }

    fn prefs(device: &str, precision: &str, mixed: Option<bool>) -> RequestPreferences {
        RequestPreferences {
            device: device.parse().unwrap(),
            precision: precision.parse().unwrap(),
            mixed_precision: mixed,
            quantization: QuantizationPreference::Auto,
        }
    }

    /// (device, precision, mixed, gpu: None | (healthy, caps, free fp32?, free 16-bit?)) -> expected.
    #[test]
    fn decision_table() {
        use FallbackReason::*;
        use Placement::{Cpu, Gpu};
        use Precision::*;
        type GpuCase = Option<(bool, GpuCapabilities, bool, bool)>;
        type Case = (&'static str, &'static str, Option<bool>, GpuCase, Result<Placement, &'static str>);
        let h200 = Some((true, caps(true, true, true), true, true));
        let pascal = Some((true, caps(true, false, false), true, true)); // cc 6.1
        let no_mixed = Some((true, caps(false, false, true), true, true));
        let turing = Some((true, caps(true, false, true), true, true)); // cc 7.5
        let small = Some((true, caps(true, true, true), false, false));
        let only_16bit_fits = Some((true, caps(true, true, true), false, true));
        let sick = Some((false, caps(true, true, true), true, true));
        let cases: Vec<Case> = vec![
            // No GPU: the existing behaviour (plain requests are not fallbacks).
            ("auto", "auto", None, None, Ok(Cpu(None))),
            ("gpu", "auto", None, None, Ok(Cpu(Some(GpuUnavailable)))),
            ("auto", "auto", Some(true), None, Ok(Cpu(Some(GpuUnavailable)))),
            ("auto", "bf16", None, None, Ok(Cpu(Some(GpuUnavailable)))),
            ("auto", "fp32", None, None, Ok(Cpu(None))),
            ("cpu", "auto", None, h200, Ok(Cpu(None))),
            ("cpu", "fp32", Some(false), h200, Ok(Cpu(None))),
            // Insisting on the CPU with a GPU-only precision, or contradictions.
            ("cpu", "fp16", None, h200, Err("fp16 is not available on the CPU")),
            ("cpu", "auto", Some(true), None, Err("mixed (fp16/bf16) is not available on the CPU")),
            ("gpu", "fp32", Some(true), h200, Err("fp32 contradicts mixed_precision = true")),
            ("gpu", "bf16", Some(false), h200, Err("bf16 contradicts")),
            // A healthy GPU.
            ("auto", "auto", None, h200, Ok(Gpu(Bf16))),
            ("gpu", "auto", Some(true), h200, Ok(Gpu(Bf16))),
            ("gpu", "fp16", None, h200, Ok(Gpu(Fp16))),
            ("gpu", "fp32", None, h200, Ok(Gpu(Fp32))),
            ("gpu", "auto", Some(false), h200, Ok(Gpu(Fp32))),
            ("gpu", "auto", Some(true), turing, Ok(Gpu(Fp16))),
            ("gpu", "bf16", None, turing, Ok(Cpu(Some(NoMixedPrecision)))),
            // The scenarios.
            ("gpu", "auto", Some(true), no_mixed, Ok(Cpu(Some(NoMixedPrecision)))),
            ("gpu", "auto", Some(true), pascal, Ok(Cpu(Some(TensorCoresUnavailable)))),
            ("gpu", "auto", Some(true), small, Ok(Cpu(Some(InsufficientGpuMemory)))),
            ("gpu", "auto", Some(true), sick, Ok(Cpu(Some(GpuUnhealthy)))),
            // Auto precision without mixed support or tensor cores is fp32 on the GPU.
            ("gpu", "auto", None, no_mixed, Ok(Gpu(Fp32))),
            ("gpu", "auto", None, pascal, Ok(Gpu(Fp32))),
            ("auto", "auto", None, small, Ok(Cpu(Some(InsufficientGpuMemory)))),
            // The precision is not lowered to fit.
            ("gpu", "fp32", None, only_16bit_fits, Ok(Cpu(Some(InsufficientGpuMemory)))),
            ("gpu", "auto", None, only_16bit_fits, Ok(Gpu(Bf16))),
        ];
        for (device, precision, mixed, gpu, expected) in cases {
            let request = prefs(device, precision, mixed);
            let fits_of = |fp32: bool, half: bool| move |p: Precision| if p == Fp32 { fp32 } else { half };
            let fits = gpu.map(|(_, _, fp32, half)| fits_of(fp32, half));
            let view = gpu.zip(fits.as_ref()).map(|((healthy, capabilities, _, _), fits)| GpuView {
                healthy,
                capabilities,
                fits: fits as &dyn Fn(Precision) -> bool,
            });
            let got = decide(&request, view);
            match (&got, expected) {
                (Ok(placement), Ok(want)) => assert_eq!(*placement, want, "{request:?} {gpu:?}"),
                (Err(err), Err(needle)) => assert!(err.to_string().contains(needle), "{request:?}: {err}"),
                _ => panic!("{request:?} {gpu:?}: got {got:?}, want {expected:?}"),
            }
        }
    }

    #[test]
    fn names_round_trip_and_bad_names_say_what_is_allowed() {
        for reason in FallbackReason::ALL {
            assert_eq!(reason.as_str().parse::<FallbackReason>().unwrap(), *reason);
        }
        for device in DevicePreference::ALL {
            assert_eq!(device.to_string().parse::<DevicePreference>().unwrap(), *device);
        }
        let err = "tpu".parse::<DevicePreference>().unwrap_err();
        assert_eq!(err, "device_preference must be one of auto, gpu, cpu, got `tpu`");
        let err = "int4".parse::<QuantizationPreference>().unwrap_err();
        assert!(err.contains("auto, i2s"), "{err}");
    }

    fn any_prefs() -> impl Strategy<Value = RequestPreferences> {
        (
            prop::sample::select(DevicePreference::ALL),
            prop::sample::select(PrecisionPreference::ALL),
            prop::option::of(any::<bool>()),
            prop::sample::select(QuantizationPreference::ALL),
        )
            .prop_map(|(device, precision, mixed_precision, quantization)| RequestPreferences {
                device,
                precision,
                mixed_precision,
                quantization,
            })
    }

    /// A GPU: present?, healthy, capabilities, free bytes, and the bytes each
    /// precision needs (16-bit never more than fp32, as in the memory plan).
    fn any_gpu() -> impl Strategy<Value = Option<(bool, GpuCapabilities, u64, u64, u64)>> {
        prop::option::of((any::<bool>(), any::<(bool, bool, bool)>(), 0u64..1000, 0u64..1000, 0u64..1000).prop_map(
            |(healthy, (fp16, bf16, tc), free, a, b)| (healthy, caps(fp16, bf16, tc), free, a.min(b), a.max(b)),
        ))
    }

    proptest! {
        /// Every combination maps to a device and precision that can serve
        /// it, or to a fallback whose reason is true, or to an error only
        /// when the request itself is impossible.
        #[test]
        fn every_combination_is_served_correctly(request in any_prefs(), gpu in any_gpu()) {
            let need_of = |p: Precision, half: u64, full: u64| if p.is_mixed() { half } else { full };
            let fits = gpu.map(|(_, _, free, half, full)| move |p: Precision| need_of(p, half, full) <= free);
            let view = gpu.zip(fits.as_ref()).map(|((healthy, capabilities, ..), fits)| GpuView {
                healthy,
                capabilities,
                fits: fits as &dyn Fn(Precision) -> bool,
            });
            let outcome = decide(&request, view);

            // Which precisions the request accepts, and which this GPU can serve.
            let need = request.precision_need().ok();
            let accepted = |p: Precision| match need {
                Some(PrecisionNeed::Any) => true,
                Some(PrecisionNeed::Mixed) => p.is_mixed(),
                Some(PrecisionNeed::Exactly(q)) => p == q,
                None => false,
            };
            let servable = |p: Precision| gpu.is_some_and(|(healthy, caps, free, half, full)| {
                healthy && supports(caps, p) && (!needs_tensor_cores(p) || caps.tensor_cores)
                    && need_of(p, half, full) <= free && accepted(p)
            });
            let wants_gpu_only = need.is_some_and(PrecisionNeed::requires_gpu);

            match outcome {
                Err(PreferenceError::Contradiction { .. }) => prop_assert!(need.is_none()),
                Err(PreferenceError::CpuCannotServe { .. }) => {
                    prop_assert!(request.device == DevicePreference::Cpu && wants_gpu_only)
                }
                Ok(Placement::Gpu(p)) => {
                    prop_assert!(request.device != DevicePreference::Cpu);
                    prop_assert!(servable(p), "{p:?} cannot be served");
                    // Auto prefers 16-bit where tensor cores allow it.
                    if need == Some(PrecisionNeed::Any) && p == Precision::Fp32 {
                        let (_, caps, ..) = gpu.unwrap();
                        prop_assert!(!caps.tensor_cores || !(caps.fp16 || caps.bf16));
                    }
                }
                Ok(Placement::Cpu(None)) => {
                    prop_assert!(need.is_some());
                    prop_assert!(
                        request.device == DevicePreference::Cpu
                            || (request.device == DevicePreference::Auto && gpu.is_none() && !wants_gpu_only)
                    );
                }
                Ok(Placement::Cpu(Some(reason))) => {
                    prop_assert!(request.device != DevicePreference::Cpu);
                    match reason {
                        FallbackReason::GpuUnavailable => prop_assert!(gpu.is_none()),
                        FallbackReason::GpuUnhealthy => prop_assert!(gpu.is_some_and(|g| !g.0)),
                        _ => prop_assert!(gpu.is_some_and(|g| g.0)),
                    }
                    let (_, caps, ..) = gpu.unwrap_or((true, caps(true, true, true), 0, 0, 0));
                    let has_mixed = caps.fp16 || caps.bf16;
                    match reason {
                        FallbackReason::NoMixedPrecision => prop_assert!(
                            wants_gpu_only && !Precision::ALL.iter().any(|&p| accepted(p) && supports(caps, p))
                        ),
                        FallbackReason::TensorCoresUnavailable => {
                            prop_assert!(wants_gpu_only && has_mixed && !caps.tensor_cores)
                        }
                        FallbackReason::InsufficientGpuMemory => {
                            prop_assert!(Precision::ALL.iter().any(|&p| accepted(p) && supports(caps, p)))
                        }
                        _ => {}
                    }
                    // With 16-bit never needing more memory than fp32, a
                    // fallback happens only when nothing could serve it.
                    prop_assert!(!Precision::ALL.iter().any(|&p| servable(p)));
                }
            }
        }
    }
}
