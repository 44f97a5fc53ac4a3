//! Fault injection at the device layer: a [`FaultPlan`] (from code, the
//! `BITNET_FAULT_PLAN` environment variable or a CLI flag) and the
//! [`FaultInjector`] a GPU backend consults before every allocation and
//! kernel launch.
//!
//! The plan acts in two places. [`FaultPlan::apply`] changes what the engine
//! believes about a GPU (compute capability, fp16/bf16/tensor cores, free
//! memory), which drives its decision before anything runs. The injector
//! makes calls fail while running: allocations past the memory limit fail as
//! out-of-memory, launches fail at the planned rate or after the planned
//! count. On a real GPU the CUDA backend calls the injector itself; on a
//! machine without one, a simulated GPU (the CPU backend standing in for the
//! primary device) does.
//!
//! ```
//! use bitnet_device::{FaultInjector, FaultPlan, InjectedFault};
//!
//! let plan = FaultPlan::parse("gpu_memory_limit=1KiB,fail_after=2").unwrap();
//! let injector = FaultInjector::new(plan);
//! assert!(injector.on_alloc(1000).is_ok());
//! assert!(matches!(injector.on_alloc(100), Err(InjectedFault::OutOfMemory { .. })));
//! assert!(injector.on_launch("gemv").is_ok());
//! assert!(injector.on_launch("gemv").is_ok());
//! assert!(matches!(injector.on_launch("gemv"), Err(InjectedFault::LaunchFailed { launch: 3, .. })));
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::gpu::GpuInfo;

/// The environment variable [`FaultPlan::from_env`] reads.
pub const FAULT_PLAN_ENV: &str = "BITNET_FAULT_PLAN";

/// What to break, and how. The default plan breaks nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultPlan {
    /// Device memory available to us, in bytes: the free memory the engine
    /// sees is at most this, and allocations past it fail.
    pub gpu_memory_limit: Option<u64>,
    pub fp16: Option<bool>,
    pub bf16: Option<bool>,
    pub tensor_cores: Option<bool>,
    /// (major, minor); capabilities not overridden follow it.
    pub compute_capability: Option<(u32, u32)>,
    /// Probability in [0, 1] that one CUDA call (launch) fails.
    pub failure_rate: f64,
    /// Seed of the failure draws, so a run can be repeated.
    pub seed: u64,
    /// Every launch after this many fails.
    pub fail_after_launches: Option<u64>,
    /// Every launch fails once the backend, after it was first created
    /// whole, has started more than this many steps (the engine's self-test
    /// is the first): a GPU that fails in the middle of serving.
    pub fail_after_steps: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FaultPlanError {
    #[error("fault plan entry `{entry}` is not of the form key=value")]
    NotKeyValue { entry: String },
    #[error(
        "unknown fault plan key `{key}` (expected gpu_memory_limit, cc, fp16, bf16, tensor_cores, failure_rate, seed, fail_after, fail_after_steps)"
    )]
    UnknownKey { key: String },
    #[error("fault plan key `{key}` is given twice")]
    DuplicateKey { key: String },
    #[error("fault plan key `{key}` has a bad value `{value}`: expected {expected}")]
    BadValue { key: String, value: String, expected: &'static str },
    #[error("environment variable {var} is not valid UTF-8")]
    EnvNotUnicode { var: &'static str },
}

/// A fault the injector made a call fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InjectedFault {
    #[error("injected failure of CUDA call `{call}` (launch {launch})")]
    LaunchFailed { call: String, launch: u64 },
    #[error("injected out-of-memory: {requested} bytes requested with {allocated} of {limit} allocated")]
    OutOfMemory { requested: u64, allocated: u64, limit: u64 },
}

/// The keys [`FaultPlan::parse`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    MemoryLimit,
    ComputeCapability,
    Fp16,
    Bf16,
    TensorCores,
    FailureRate,
    Seed,
    FailAfter,
    FailAfterSteps,
}

/// Each key's canonical name (first) and aliases.
const KEYS: [(Key, &[&str]); 9] = [
    (Key::MemoryLimit, &["gpu_memory_limit", "memory_limit"]),
    (Key::ComputeCapability, &["cc", "compute_capability"]),
    (Key::Fp16, &["fp16"]),
    (Key::Bf16, &["bf16"]),
    (Key::TensorCores, &["tensor_cores"]),
    (Key::FailureRate, &["failure_rate"]),
    (Key::Seed, &["seed"]),
    (Key::FailAfter, &["fail_after", "fail_after_launches"]),
    (Key::FailAfterSteps, &["fail_after_steps"]),
];

impl FaultPlan {
    /// True when the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self { seed: self.seed, ..Self::default() }
    }

    /// Parses `key=value` entries separated by commas, e.g.
    /// `gpu_memory_limit=500MB,cc=6.1,fp16=false,bf16=false,tensor_cores=false,failure_rate=0.3,seed=7,fail_after=100,fail_after_steps=3`.
    ///
    /// Sizes take a unit: B, KB/MB/GB (powers of 1000) or KiB/MiB/GiB
    /// (powers of 1024); a bare number is bytes. Booleans are true/false
    /// (or 1/0, yes/no). An empty spec (or `none`) is the empty plan.
    pub fn parse(spec: &str) -> Result<Self, FaultPlanError> {
        let mut plan = Self::default();
        let mut seen: Vec<Key> = Vec::new();
        let spec = spec.trim();
        if spec.is_empty() || spec.eq_ignore_ascii_case("none") {
            return Ok(plan);
        }
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (key, value) = entry
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .ok_or_else(|| FaultPlanError::NotKeyValue { entry: entry.to_owned() })?;
            let lower = key.to_ascii_lowercase();
            let (key, name) = KEYS
                .iter()
                .find(|(_, aliases)| aliases.contains(&lower.as_str()))
                .map(|(key, aliases)| (*key, aliases[0]))
                .ok_or_else(|| FaultPlanError::UnknownKey { key: key.to_owned() })?;
            if seen.contains(&key) {
                return Err(FaultPlanError::DuplicateKey { key: name.to_owned() });
            }
            seen.push(key);
            let bad = |expected: &'static str| FaultPlanError::BadValue {
                key: name.to_owned(),
                value: value.to_owned(),
                expected,
            };
            let boolean = || parse_bool(value).ok_or_else(|| bad("true or false"));
            match key {
                Key::MemoryLimit => {
                    plan.gpu_memory_limit =
                        Some(parse_bytes(value).ok_or_else(|| bad("a size such as 500MB, 2GiB or 1048576"))?)
                }
                Key::ComputeCapability => {
                    plan.compute_capability = Some(parse_cc(value).ok_or_else(|| bad("major.minor, e.g. 6.1"))?)
                }
                Key::Fp16 => plan.fp16 = Some(boolean()?),
                Key::Bf16 => plan.bf16 = Some(boolean()?),
                Key::TensorCores => plan.tensor_cores = Some(boolean()?),
                Key::FailureRate => {
                    plan.failure_rate = value
                        .parse::<f64>()
                        .ok()
                        .filter(|r| r.is_finite() && (0.0..=1.0).contains(r))
                        .ok_or_else(|| bad("a probability in [0, 1]"))?
                }
                Key::Seed => plan.seed = value.parse().map_err(|_| bad("an unsigned 64-bit integer"))?,
                Key::FailAfter => {
                    plan.fail_after_launches =
                        Some(value.parse().map_err(|_| bad("a number of launches (unsigned integer)"))?)
                }
                Key::FailAfterSteps => {
                    plan.fail_after_steps =
                        Some(value.parse().map_err(|_| bad("a number of steps (unsigned integer)"))?)
                }
            }
        }
        Ok(plan)
    }

    /// The plan in `BITNET_FAULT_PLAN`; `None` when it is unset or empty.
    pub fn from_env() -> Result<Option<Self>, FaultPlanError> {
        match std::env::var(FAULT_PLAN_ENV) {
            Ok(spec) if spec.trim().is_empty() => Ok(None),
            Ok(spec) => Self::parse(&spec).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(FaultPlanError::EnvNotUnicode { var: FAULT_PLAN_ENV }),
        }
    }

    /// The GPU as the engine should see it under this plan: compute
    /// capability and capability overrides applied, free (and total) memory
    /// capped at the limit.
    pub fn apply(&self, gpu: &GpuInfo) -> GpuInfo {
        let mut out = gpu.clone();
        if let Some((major, minor)) = self.compute_capability {
            out.compute_capability =
                (i32::try_from(major).unwrap_or(i32::MAX), i32::try_from(minor).unwrap_or(i32::MAX));
        }
        let overrides = &mut out.capability_overrides;
        overrides.fp16 = self.fp16.or(overrides.fp16);
        overrides.bf16 = self.bf16.or(overrides.bf16);
        overrides.tensor_cores = self.tensor_cores.or(overrides.tensor_cores);
        if let Some(limit) = self.gpu_memory_limit {
            out.free_memory_bytes = out.free_memory_bytes.min(limit);
            out.total_memory_bytes = out.total_memory_bytes.min(limit);
        }
        out
    }
}

/// The canonical spec, which [`FaultPlan::parse`] reads back to the same plan.
impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(limit) = self.gpu_memory_limit {
            parts.push(format!("gpu_memory_limit={limit}"));
        }
        if let Some((major, minor)) = self.compute_capability {
            parts.push(format!("cc={major}.{minor}"));
        }
        for (name, value) in [("fp16", self.fp16), ("bf16", self.bf16), ("tensor_cores", self.tensor_cores)] {
            if let Some(value) = value {
                parts.push(format!("{name}={value}"));
            }
        }
        if self.failure_rate != 0.0 {
            parts.push(format!("failure_rate={}", self.failure_rate));
        }
        if self.seed != 0 {
            parts.push(format!("seed={}", self.seed));
        }
        if let Some(n) = self.fail_after_launches {
            parts.push(format!("fail_after={n}"));
        }
        if let Some(n) = self.fail_after_steps {
            parts.push(format!("fail_after_steps={n}"));
        }
        if parts.is_empty() {
            return f.write_str("none");
        }
        f.write_str(&parts.join(","))
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

fn parse_cc(value: &str) -> Option<(u32, u32)> {
    let (major, minor) = value.split_once('.')?;
    let (major, minor): (u32, u32) = (major.parse().ok()?, minor.parse().ok()?);
    // Compute capabilities are small numbers; anything else is a typo.
    (major <= 99 && minor <= 99).then_some((major, minor))
}

fn parse_bytes(value: &str) -> Option<u64> {
    let split = value.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    };
    if number.is_empty() {
        return None;
    }
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(multiplier);
    }
    let fractional: f64 = number.parse().ok()?;
    let bytes = (fractional * multiplier as f64).round();
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Makes device calls fail according to a [`FaultPlan`]. Shared by every
/// backend instance created for one device (so launch counts and the
/// allocation tally survive re-creating a context), hence `Sync`.
#[derive(Debug)]
pub struct FaultInjector {
    plan: FaultPlan,
    launches: AtomicU64,
    /// Steps started since a backend was first created whole; `u64::MAX`
    /// until then ([`FaultInjector::on_ready`], [`FaultInjector::on_step`]).
    steps: AtomicU64,
    allocated: Mutex<u64>,
    rng: Mutex<ChaCha8Rng>,
}

impl FaultInjector {
    pub fn new(plan: FaultPlan) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(plan.seed);
        Self {
            plan,
            launches: AtomicU64::new(0),
            steps: AtomicU64::new(u64::MAX),
            allocated: Mutex::new(0),
            rng: Mutex::new(rng),
        }
    }

    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// Launches seen so far.
    pub fn launches(&self) -> u64 {
        self.launches.load(Ordering::Relaxed)
    }

    /// Bytes currently allocated through [`FaultInjector::on_alloc`].
    pub fn allocated(&self) -> u64 {
        *self.allocated.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Call when a backend has been created whole: the step count of
    /// `fail_after_steps` starts at the first such call (a backend created
    /// again later does not restart it).
    pub fn on_ready(&self) {
        let _ = self.steps.compare_exchange(u64::MAX, 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Call when a backend starts a step (counted once one was ready).
    pub fn on_step(&self) {
        let _ = self.steps.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| (s != u64::MAX).then(|| s + 1));
    }

    /// Call before every kernel launch or CUDA call: fails with probability
    /// `failure_rate`, always once more than `fail_after_launches` launches
    /// have happened, and always once more than `fail_after_steps` steps
    /// have started since a backend was first ready.
    pub fn on_launch(&self, what: &str) -> Result<(), InjectedFault> {
        let launch = self.launches.fetch_add(1, Ordering::Relaxed) + 1;
        let failed = |launch| InjectedFault::LaunchFailed { call: what.to_owned(), launch };
        if self.plan.fail_after_launches.is_some_and(|n| launch > n) {
            return Err(failed(launch));
        }
        let steps = self.steps.load(Ordering::Relaxed);
        if self.plan.fail_after_steps.is_some_and(|n| steps != u64::MAX && steps > n) {
            return Err(failed(launch));
        }
        if self.plan.failure_rate > 0.0 {
            let draw: f64 = self.rng.lock().unwrap_or_else(|e| e.into_inner()).random();
            if draw < self.plan.failure_rate {
                return Err(failed(launch));
            }
        }
        Ok(())
    }

    /// Call before allocating device memory: fails when the allocation would
    /// take the tally past the plan's limit, else adds it to the tally.
    pub fn on_alloc(&self, bytes: u64) -> Result<(), InjectedFault> {
        let mut allocated = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(limit) = self.plan.gpu_memory_limit {
            if allocated.saturating_add(bytes) > limit {
                return Err(InjectedFault::OutOfMemory { requested: bytes, allocated: *allocated, limit });
            }
        }
        *allocated = allocated.saturating_add(bytes);
        Ok(())
    }

    /// Call after freeing device memory allocated through [`FaultInjector::on_alloc`].
    pub fn on_free(&self, bytes: u64) {
        let mut allocated = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        *allocated = allocated.saturating_sub(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::CapabilityOverrides;

    fn h200() -> GpuInfo {
        GpuInfo {
            ordinal: 0,
            name: "NVIDIA H200".into(),
            compute_capability: (9, 0),
            total_memory_bytes: 150_000_000_000,
            free_memory_bytes: 149_000_000_000,
            capability_overrides: CapabilityOverrides::default(),
        }
    }

    #[test]
    fn parses_every_key() {
        let plan = FaultPlan::parse(
            "gpu_memory_limit=500MB, cc=6.1,fp16=false,bf16=no,tensor_cores=0,failure_rate=0.3,seed=7,fail_after=100,\
             fail_after_steps=3",
        )
        .unwrap();
        assert_eq!(
            plan,
            FaultPlan {
                gpu_memory_limit: Some(500_000_000),
                fp16: Some(false),
                bf16: Some(false),
                tensor_cores: Some(false),
                compute_capability: Some((6, 1)),
                failure_rate: 0.3,
                seed: 7,
                fail_after_launches: Some(100),
                fail_after_steps: Some(3),
            }
        );
        assert!(!plan.is_empty());
        for empty in ["", "  ", "none", "seed=9"] {
            assert!(FaultPlan::parse(empty).unwrap().is_empty(), "{empty:?}");
        }
    }

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        let check = |spec: &str, bytes: u64| {
            assert_eq!(FaultPlan::parse(&format!("gpu_memory_limit={spec}")).unwrap().gpu_memory_limit, Some(bytes));
        };
        check("1024", 1024);
        check("12B", 12);
        check("500MB", 500_000_000);
        check("500mb", 500_000_000);
        check("2GiB", 2 << 30);
        check("1.5GB", 1_500_000_000);
        check("64KiB", 65_536);
    }

    #[test]
    fn every_bad_entry_is_a_clear_error_naming_it() {
        let check = |spec: &str, needles: &[&str]| {
            let err = FaultPlan::parse(spec).unwrap_err().to_string();
            for needle in needles {
                assert!(err.contains(needle), "{spec}: {err}");
            }
        };
        check("gpu_memory_limit=lots", &["gpu_memory_limit", "lots", "size"]);
        check("gpu_memory_limit=5XB", &["gpu_memory_limit", "5XB"]);
        check("gpu_memory_limit=99999999999TB", &["gpu_memory_limit"]);
        check("cc=9", &["cc", "major.minor"]);
        check("cc=9.x", &["cc"]);
        check("cc=100.0", &["cc"]);
        check("fp16=maybe", &["fp16", "maybe", "true or false"]);
        check("failure_rate=1.5", &["failure_rate", "[0, 1]"]);
        check("failure_rate=NaN", &["failure_rate"]);
        check("seed=-1", &["seed"]);
        check("fail_after=soon", &["fail_after"]);
        check("fail_after_steps=-2", &["fail_after_steps", "number of steps"]);
        check("vram=1GB", &["unknown", "vram"]);
        check("fp16", &["fp16", "key=value"]);
        check("fp16=", &["key=value"]);
        check("cc=8.0,compute_capability=9.0", &["cc", "twice"]);
    }

    #[test]
    fn display_parses_back_to_the_same_plan() {
        let plans = [
            FaultPlan::default(),
            FaultPlan::parse("gpu_memory_limit=500MB").unwrap(),
            FaultPlan::parse("cc=6.1,fp16=true,bf16=false,tensor_cores=true,failure_rate=0.25,seed=3,fail_after=0")
                .unwrap(),
        ];
        for plan in plans {
            assert_eq!(FaultPlan::parse(&plan.to_string()).unwrap(), plan, "{plan}");
        }
    }

    #[test]
    fn apply_overrides_capabilities_and_caps_memory() {
        let gpu = h200();
        assert_eq!(FaultPlan::default().apply(&gpu), gpu);

        let old = FaultPlan::parse("cc=6.1").unwrap().apply(&gpu);
        assert_eq!(old.compute_capability, (6, 1));
        let caps = old.capabilities();
        assert!(caps.fp16 && !caps.bf16 && !caps.tensor_cores, "{caps:?}");

        let no_mixed = FaultPlan::parse("fp16=false,bf16=false").unwrap().apply(&gpu);
        let caps = no_mixed.capabilities();
        assert!(!caps.fp16 && !caps.bf16 && caps.tensor_cores, "{caps:?}");
        assert_eq!(no_mixed.compute_capability, (9, 0));

        let small = FaultPlan::parse("gpu_memory_limit=500MB").unwrap().apply(&gpu);
        assert_eq!((small.free_memory_bytes, small.total_memory_bytes), (500_000_000, 500_000_000));
        let roomy = FaultPlan::parse("gpu_memory_limit=1TB").unwrap().apply(&gpu);
        assert_eq!(roomy.free_memory_bytes, gpu.free_memory_bytes);
    }

    #[test]
    fn allocations_past_the_limit_fail_and_frees_make_room() {
        let injector = FaultInjector::new(FaultPlan { gpu_memory_limit: Some(100), ..FaultPlan::default() });
        injector.on_alloc(60).unwrap();
        assert_eq!(
            injector.on_alloc(41).unwrap_err(),
            InjectedFault::OutOfMemory { requested: 41, allocated: 60, limit: 100 }
        );
        injector.on_alloc(40).unwrap();
        assert_eq!(injector.allocated(), 100);
        injector.on_free(60);
        injector.on_alloc(41).unwrap();
        injector.on_free(1000);
        assert_eq!(injector.allocated(), 0);
        // Without a limit nothing fails.
        let unlimited = FaultInjector::new(FaultPlan::default());
        unlimited.on_alloc(u64::MAX).unwrap();
        unlimited.on_alloc(u64::MAX).unwrap();
    }

    #[test]
    fn launches_fail_after_the_planned_count() {
        let injector = FaultInjector::new(FaultPlan { fail_after_launches: Some(3), ..FaultPlan::default() });
        let outcomes: Vec<bool> = (0..6).map(|_| injector.on_launch("k").is_ok()).collect();
        assert_eq!(outcomes, [true, true, true, false, false, false]);
        assert_eq!(
            injector.on_launch("gemm").unwrap_err(),
            InjectedFault::LaunchFailed { call: "gemm".into(), launch: 7 }
        );
    }

    #[test]
    fn launches_fail_once_a_ready_backend_has_run_the_planned_steps() {
        let injector = FaultInjector::new(FaultPlan { fail_after_steps: Some(2), ..FaultPlan::default() });
        // Steps of a backend not yet created whole do not count.
        injector.on_step();
        assert!((0..100).all(|_| injector.on_launch("upload").is_ok()));
        injector.on_ready();
        let mut seen = Vec::new();
        for _ in 0..4 {
            injector.on_step();
            seen.push([injector.on_launch("a").is_ok(), injector.on_launch("b").is_ok()]);
        }
        assert_eq!(seen, [[true, true], [true, true], [false, false], [false, false]]);
        // A backend created again later (its uploads fail, so it would not be;
        // if it were) does not restart the count.
        injector.on_ready();
        assert!(injector.on_launch("c").is_err());
        // The plan reads back.
        let plan = FaultPlan { fail_after_steps: Some(2), ..FaultPlan::default() };
        assert_eq!(plan.to_string(), "fail_after_steps=2");
        assert_eq!(FaultPlan::parse(&plan.to_string()).unwrap(), plan);
    }

    #[test]
    fn failure_rate_is_seeded_and_close_to_the_plan() {
        let run = |seed| {
            let injector = FaultInjector::new(FaultPlan { failure_rate: 0.3, seed, ..FaultPlan::default() });
            (0..10_000).map(|_| injector.on_launch("k").is_err()).collect::<Vec<_>>()
        };
        let (a, b, c) = (run(7), run(7), run(8));
        assert_eq!(a, b, "the same seed must give the same failures");
        assert_ne!(a, c);
        let failed = a.iter().filter(|&&f| f).count();
        // Binomial(10000, 0.3): mean 3000, sd 46; 6 sd either side.
        assert!((2724..=3276).contains(&failed), "{failed} failures of 10000");
        let never = FaultInjector::new(FaultPlan::default());
        assert!((0..1000).all(|_| never.on_launch("k").is_ok()));
        let always = FaultInjector::new(FaultPlan { failure_rate: 1.0, ..FaultPlan::default() });
        assert!((0..1000).all(|_| always.on_launch("k").is_err()));
    }

    #[test]
    fn the_injector_is_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<FaultInjector>();
        let injector = std::sync::Arc::new(FaultInjector::new(FaultPlan::default()));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let injector = injector.clone();
                std::thread::spawn(move || (0..250).for_each(|_| injector.on_launch("k").unwrap()))
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(injector.launches(), 1000);
    }
}
