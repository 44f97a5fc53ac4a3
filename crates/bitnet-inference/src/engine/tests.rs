//! The engine on a simulated GPU (a CPU backend behind a fault injector):
//! decisions before running, recovery while running, health, reports.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bitnet_device::{FaultInjector, FaultPlan};
use bitnet_models::synthetic::{self, Preset};
use bitnet_models::{BitNetModel, FloatDType, FloatTensor};

use super::*;
use crate::simulated_gpu::{simulated_gpu_info, simulated_primary, SimulatedGpuBackend, SIMULATED_GPU_DEVICE};
use crate::{argmax, generate, CpuBackend, CpuBackendConfig, GenerationConfig};

mod prefix_cache;

/// The tiny synthetic model with an untied random head, so that greedy
/// outputs depend on everything fed (the tied synthetic head mostly repeats
/// the last token, which would hide a wrong re-run).
fn model() -> Arc<BitNetModel> {
    static MODEL: OnceLock<Arc<BitNetModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let mut model = synthetic::generate(Preset::Tiny, 5).unwrap();
            let (vocab, hidden) = (model.config.vocab_size, model.config.hidden_size);
            let mut state = 0x9E37_79B9_7F4A_7C15u64;
            let head: Vec<f32> = (0..vocab * hidden)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
                })
                .collect();
            model.output = Some(FloatTensor::from_f32("output.weight", vocab, hidden, &head, FloatDType::F16).unwrap());
            Arc::new(model)
        })
        .clone()
}

fn cpu_config() -> CpuBackendConfig {
    CpuBackendConfig { threads: 1, ..CpuBackendConfig::default() }
}

fn cpu() -> Box<dyn Backend> {
    Box::new(CpuBackend::new(model(), &cpu_config()).unwrap())
}

fn settings() -> EngineConfig {
    EngineConfig { max_batch_tokens: 64, cool_down: Duration::ZERO, ..EngineConfig::default() }
}

/// An engine whose GPU is the simulated one under `plan` (16 GiB before the plan).
fn simulated_engine(plan: FaultPlan) -> (Engine, Arc<FaultInjector>) {
    let gpu = plan.apply(&simulated_gpu_info(16 << 30));
    let injector = Arc::new(FaultInjector::new(plan));
    let primary = simulated_primary(model(), cpu_config(), gpu, injector.clone(), settings().max_batch_tokens);
    (Engine::new(cpu(), primary, settings()).unwrap(), injector)
}

fn wants(device: DevicePreference, mixed_precision: Option<bool>) -> RequestPreferences {
    RequestPreferences { device, mixed_precision, ..RequestPreferences::default() }
}

fn gpu_mixed() -> RequestPreferences {
    wants(DevicePreference::Gpu, Some(true))
}

fn prompt(i: u64) -> Vec<u32> {
    (0..3 + i % 5).map(|k| ((i * 131 + k * 17 + 7) % 500) as u32).collect()
}

/// Greedy tokens of `prompt` on a CPU backend alone.
fn cpu_alone(prompt: &[u32], new_tokens: usize) -> Vec<u32> {
    let mut backend = CpuBackend::new(model(), &cpu_config()).unwrap();
    generate(&mut backend, prompt, &GenerationConfig::greedy(new_tokens), |_| {}).unwrap().tokens
}

/// Runs every request to `new_tokens` greedy tokens in shared batched steps,
/// like the scheduler; `between` runs after every step.
fn run_all(
    engine: &mut Engine,
    requests: &[(SeqId, RequestPreferences)],
    new_tokens: usize,
    mut between: impl FnMut(&mut Engine, usize),
) -> Vec<(Vec<u32>, SequenceReport)> {
    for (seq, prefs) in requests {
        engine.add_sequence(*seq, prompt(*seq).len() + new_tokens, prefs).unwrap();
    }
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); requests.len()];
    for step in 0..new_tokens {
        let feeds: Vec<Vec<u32>> = requests
            .iter()
            .zip(&generated)
            .map(|((seq, _), out)| if out.is_empty() { prompt(*seq) } else { vec![*out.last().unwrap()] })
            .collect();
        let batch: Vec<StepInput<'_>> =
            requests.iter().zip(&feeds).map(|((seq, _), tokens)| StepInput { seq: *seq, tokens }).collect();
        // Requests ask for their logits, their greedy token or a top-1 draw
        // (the greedy token again), so every answer goes through every
        // scenario.
        let top1 = crate::SampleDraw { temperature: 0.8, top_k: 1, top_p: 1.0, u: 0.5 };
        let step_wants: Vec<StepWant> = requests
            .iter()
            .map(|(seq, _)| match seq % 3 {
                0 => StepWant::Greedy,
                1 => StepWant::Logits,
                _ => StepWant::Sample(top1),
            })
            .collect();
        let results = engine.step_select(&batch, &step_wants);
        for ((out, output), want) in generated.iter_mut().zip(results).zip(&step_wants) {
            out.push(match (output.expect("no request may fail"), want) {
                (StepOutput::Token(token), StepWant::Greedy | StepWant::Sample(_)) => token,
                (StepOutput::Logits(logits), StepWant::Logits) => argmax(&logits),
                (other, want) => panic!("asked for {want:?}, got {other:?}"),
            });
        }
        between(engine, step);
    }
    requests
        .iter()
        .zip(generated)
        .map(|((seq, _), tokens)| {
            let report = engine.report(*seq).unwrap().clone();
            engine.remove_sequence(*seq);
            (tokens, report)
        })
        .collect()
}

fn fallback_reason(report: &SequenceReport) -> Option<FallbackReason> {
    report.fallback.map(|f| f.reason)
}

#[test]
fn without_a_gpu_gpu_requests_fall_back_and_plain_ones_do_not() {
    let mut engine = Engine::cpu_only(cpu());
    assert_eq!(engine.health(), GpuHealth::Absent);
    let requests = [
        (1, wants(DevicePreference::Gpu, None)),
        (2, wants(DevicePreference::Auto, Some(true))),
        (3, wants(DevicePreference::Auto, None)),
        (4, wants(DevicePreference::Cpu, None)),
    ];
    let out = run_all(&mut engine, &requests, 6, |_, _| {});
    let reasons: Vec<_> = out.iter().map(|(_, r)| fallback_reason(r)).collect();
    assert_eq!(reasons, [Some(FallbackReason::GpuUnavailable), Some(FallbackReason::GpuUnavailable), None, None]);
    for ((seq, _), (tokens, report)) in requests.iter().zip(&out) {
        assert_eq!(*tokens, cpu_alone(&prompt(*seq), 6), "seq {seq}");
        assert_eq!((report.device.as_str(), report.quantization.as_str()), ("cpu", "i2s"));
    }
    let events = engine.take_events();
    assert_eq!(events.iter().filter(|e| matches!(e, EngineEvent::Fallback { .. })).count(), 2, "{events:?}");
}

#[test]
fn a_healthy_simulated_gpu_serves_and_says_so() {
    let (mut engine, injector) = simulated_engine(FaultPlan::default());
    assert_eq!(engine.health(), GpuHealth::Healthy);
    let requests: Vec<_> = (1..=4).map(|seq| (seq, gpu_mixed())).collect();
    let out = run_all(&mut engine, &requests, 5, |_, _| {});
    for ((seq, _), (tokens, report)) in requests.iter().zip(&out) {
        assert_eq!(report.device, SIMULATED_GPU_DEVICE);
        assert_eq!(report.precision, "bf16");
        assert_eq!(report.fallback, None);
        assert_eq!(*tokens, cpu_alone(&prompt(*seq), 5));
    }
    // An fp32 request gets its own backend, created on demand.
    let out = run_all(&mut engine, &[(9, wants(DevicePreference::Gpu, Some(false)))], 2, |_, _| {});
    assert_eq!(out[0].1.precision, "fp32");
    assert!(injector.launches() > 0);
    // Only the backends' weights and workspace stay allocated.
    let static_of = |p| {
        let plan = crate::memory_plan::gpu_memory_plan_for_model(&model(), p, 0, 64);
        plan.weights + plan.workspace
    };
    assert_eq!(injector.allocated(), static_of(Precision::Bf16) + static_of(Precision::Fp32));
}

#[test]
fn capability_and_memory_faults_decide_before_running() {
    let cases = [
        ("fp16=false,bf16=false", FallbackReason::NoMixedPrecision),
        ("cc=6.1", FallbackReason::TensorCoresUnavailable),
        ("tensor_cores=false", FallbackReason::TensorCoresUnavailable),
        ("gpu_memory_limit=1MB", FallbackReason::InsufficientGpuMemory),
    ];
    for (spec, reason) in cases {
        let (mut engine, injector) = simulated_engine(FaultPlan::parse(spec).unwrap());
        let requests: Vec<_> = (1..=3).map(|seq| (seq, gpu_mixed())).collect();
        let out = run_all(&mut engine, &requests, 4, |_, _| {});
        for ((seq, _), (tokens, report)) in requests.iter().zip(&out) {
            assert_eq!(fallback_reason(report), Some(reason), "{spec}");
            assert_eq!((report.device.as_str(), report.quantization.as_str()), ("cpu", "i2s"), "{spec}");
            assert_eq!(*tokens, cpu_alone(&prompt(*seq), 4), "{spec}");
        }
        assert_eq!(engine.health(), GpuHealth::Healthy, "{spec}: capability faults do not poison");
        // Nothing ran on the simulated GPU beyond warm-up and its self-test.
        let warm_launches = if spec.starts_with("gpu_memory_limit") { 0 } else { 2 };
        assert_eq!(injector.launches(), warm_launches, "{spec}");
    }
}

#[test]
fn the_memory_plan_admits_sequences_while_their_kv_fits() {
    let config = model().config.clone();
    let plan = |positions| crate::memory_plan::gpu_memory_plan_for_model(&model(), Precision::Bf16, positions, 64);
    // Room for the backend plus three sequences of 20 positions, at 100% utilization.
    let budget = plan(60).total();
    let gpu = FaultPlan::default().apply(&simulated_gpu_info(budget));
    let injector = Arc::new(FaultInjector::new(FaultPlan::default()));
    let primary = simulated_primary(model(), cpu_config(), gpu, injector, 64);
    let settings = EngineConfig { gpu_memory_utilization: 1.0, ..settings() };
    let mut engine = Engine::new(cpu(), primary, settings).unwrap();
    let placed = |engine: &mut Engine, seq| engine.add_sequence(seq, 20, &gpu_mixed()).unwrap().clone();
    for seq in 1..=3 {
        assert_eq!(placed(&mut engine, seq).fallback, None, "seq {seq}");
    }
    assert_eq!(fallback_reason(&placed(&mut engine, 4)), Some(FallbackReason::InsufficientGpuMemory));
    engine.remove_sequence(2);
    assert_eq!(placed(&mut engine, 5).fallback, None, "freed KV space is reused");
    assert!(config.max_position_embeddings >= 20);
}

#[test]
fn a_failing_cuda_call_reruns_sequences_on_the_cpu_with_identical_output() {
    // Warm-up: the context and the self-test step; then one launch per step,
    // so fail_after=5 lets the prefill and two decodes run.
    let (mut engine, _) = simulated_engine(FaultPlan::parse("fail_after=5").unwrap());
    engine.settings.cool_down = Duration::from_secs(3600);
    let requests: Vec<_> = (1..=5).map(|seq| (seq, gpu_mixed())).collect();
    let out = run_all(&mut engine, &requests, 8, |_, _| {});
    for ((seq, _), (tokens, report)) in requests.iter().zip(&out) {
        assert_eq!(*tokens, cpu_alone(&prompt(*seq), 8), "seq {seq}: the re-run must continue exactly");
        let fallback = report.fallback.expect("moved to the CPU");
        assert_eq!(fallback.reason, FallbackReason::CudaError);
        assert!(fallback.cost > Duration::ZERO);
        assert_eq!(report.device, "cpu");
    }
    assert_eq!(engine.health(), GpuHealth::CoolingDown);
    // New work avoids the unhealthy GPU.
    let report = engine.add_sequence(50, 8, &gpu_mixed()).unwrap();
    assert_eq!(fallback_reason(report), Some(FallbackReason::GpuUnhealthy));
    let events = engine.take_events();
    assert!(events.iter().any(|e| matches!(e, EngineEvent::Health { health: GpuHealth::CoolingDown, .. })));
}

/// A simulated GPU whose steps fail while `broken` is set.
fn switchable_engine(broken: Arc<AtomicBool>) -> Engine {
    let model = model();
    let untied_head = model.output.is_some();
    let factory: BackendFactory = Box::new(move |precision| {
        let plan = crate::memory_plan::gpu_memory_plan_for_model(&model, precision, 1, 64);
        let injector = Arc::new(FaultInjector::new(FaultPlan::default()));
        let inner = CpuBackend::new(model.clone(), &cpu_config())?;
        let backend = SimulatedGpuBackend::new(Box::new(inner), injector, precision, plan)?;
        Ok(Box::new(Switchable { inner: backend, broken: broken.clone() }) as Box<dyn Backend>)
    });
    let primary = PrimaryDevice { gpu: simulated_gpu_info(16 << 30), factory, untied_head };
    Engine::new(cpu(), primary, settings()).unwrap()
}

#[derive(Debug)]
struct Switchable {
    inner: SimulatedGpuBackend,
    broken: Arc<AtomicBool>,
}

impl Backend for Switchable {
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    fn config(&self) -> &BitNetConfig {
        self.inner.config()
    }
    fn add_sequence(&mut self, seq: SeqId, max_positions: usize) -> Result<(), BackendError> {
        self.inner.add_sequence(seq, max_positions)
    }
    fn remove_sequence(&mut self, seq: SeqId) {
        self.inner.remove_sequence(seq)
    }
    fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        self.inner.sequence_len(seq)
    }
    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, len: usize) -> Result<(), BackendError> {
        self.inner.copy_prefix(src, dst, len)
    }
    fn shrink_to_fit(&mut self, seq: SeqId) -> Result<(), BackendError> {
        self.inner.shrink_to_fit(seq)
    }
    fn step(&mut self, batch: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(BackendError::Device("illegal address (test)".into()));
        }
        self.inner.step(batch)
    }
}

/// Polls the engine until its GPU reaches `want` (the recovery runs on a
/// background thread); fails after a generous deadline.
fn wait_for_health(engine: &mut Engine, want: GpuHealth) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while engine.health() != want {
        assert!(Instant::now() < deadline, "GPU stuck in {:?}, want {want:?}", engine.health());
        engine.poll_health();
        std::thread::yield_now();
    }
}

#[test]
fn the_gpu_recovers_after_a_cool_down_and_passing_its_self_test() {
    let broken = Arc::new(AtomicBool::new(false));
    let mut engine = switchable_engine(broken.clone());
    engine.add_sequence(1, 16, &gpu_mixed()).unwrap();
    assert!(engine.step(&[StepInput { seq: 1, tokens: &prompt(1) }])[0].is_ok());
    broken.store(true, Ordering::SeqCst);
    let logits = engine.step(&[StepInput { seq: 1, tokens: &[3] }]);
    assert!(logits[0].is_ok(), "the failed step is re-run on the CPU");
    assert_eq!(fallback_reason(engine.report(1).unwrap()), Some(FallbackReason::CudaError));

    // While broken, every recovery fails its self-test and backs off.
    engine.settings.cool_down = Duration::from_millis(1);
    engine.settings.max_cool_down = Duration::from_millis(4);
    wait_for_health(&mut engine, GpuHealth::Recovering);
    wait_for_health(&mut engine, GpuHealth::CoolingDown);
    let failed = engine.take_events().into_iter().any(
        |e| matches!(e, EngineEvent::Health { health: GpuHealth::CoolingDown, detail } if detail.contains("self-test")),
    );
    assert!(failed, "a broken context must fail its self-test");

    broken.store(false, Ordering::SeqCst);
    wait_for_health(&mut engine, GpuHealth::Healthy);
    let report = engine.add_sequence(2, 16, &gpu_mixed()).unwrap();
    assert_eq!((report.device.as_str(), report.fallback), (SIMULATED_GPU_DEVICE, None));
    // The moved sequence stays on the CPU, and both go on.
    let results = engine.step(&[StepInput { seq: 1, tokens: &[4] }, StepInput { seq: 2, tokens: &prompt(2) }]);
    assert!(results.iter().all(Result::is_ok));
}

/// A GPU backend whose steps fail with `error` from the `fail_at`-th step on.
#[derive(Debug)]
struct FailingSteps {
    inner: CpuBackend,
    steps: usize,
    fail_at: usize,
    error: fn() -> Result<Vec<Vec<f32>>, BackendError>,
}

impl Backend for FailingSteps {
    fn info(&self) -> BackendInfo {
        BackendInfo { device: "test-gpu".into(), ..self.inner.info() }
    }
    fn config(&self) -> &BitNetConfig {
        self.inner.config()
    }
    fn add_sequence(&mut self, seq: SeqId, max_positions: usize) -> Result<(), BackendError> {
        self.inner.add_sequence(seq, max_positions)
    }
    fn remove_sequence(&mut self, seq: SeqId) {
        self.inner.remove_sequence(seq)
    }
    fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        self.inner.sequence_len(seq)
    }
    fn step(&mut self, batch: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        self.steps += 1;
        if self.steps >= self.fail_at {
            return (self.error)();
        }
        self.inner.step(batch)
    }
}

fn failing_engine(fail_at: usize, error: fn() -> Result<Vec<Vec<f32>>, BackendError>) -> Engine {
    let factory: BackendFactory = Box::new(move |_| {
        let inner = CpuBackend::new(model(), &cpu_config())?;
        Ok(Box::new(FailingSteps { inner, steps: 0, fail_at, error }) as Box<dyn Backend>)
    });
    let primary = PrimaryDevice { gpu: simulated_gpu_info(16 << 30), factory, untied_head: true };
    let mut engine = Engine::new(cpu(), primary, settings()).unwrap();
    engine.settings.cool_down = Duration::from_secs(3600);
    engine
}

#[test]
fn a_moved_sequence_can_restart_from_its_first_token_on_the_cpu() {
    let mut engine = failing_engine(3, || Err(BackendError::Device("launch failed (test)".into())));
    engine.add_sequence(1, 16, &gpu_mixed()).unwrap();
    let first = engine.step(&[StepInput { seq: 1, tokens: &prompt(1) }]).remove(0).unwrap();
    assert!(engine.restart_on_cpu(1).is_err(), "still on the GPU");
    engine.step(&[StepInput { seq: 1, tokens: &[argmax(&first)] }]).remove(0).unwrap();
    assert_eq!(engine.sequence_len(1), Some(prompt(1).len() + 1), "moved and re-prefilled");
    engine.restart_on_cpu(1).unwrap();
    assert_eq!(engine.sequence_len(1), Some(0));
    let again = engine.step(&[StepInput { seq: 1, tokens: &prompt(1) }]).remove(0).unwrap();
    assert_eq!(argmax(&again), cpu_alone(&prompt(1), 1)[0]);
    assert_eq!(fallback_reason(engine.report(1).unwrap()), Some(FallbackReason::CudaError), "the report stays");
    assert_eq!(engine.restart_on_cpu(9), Err(BackendError::UnknownSequence(9)));
}

#[test]
fn out_of_memory_while_running_moves_the_step_and_keeps_the_gpu() {
    // Step 1 is the warm-up self-test, then the prefill, then a decode fails.
    let mut engine = failing_engine(3, || Err(BackendError::OutOfMemory("test".into())));
    let requests: Vec<_> = (1..=3).map(|seq| (seq, gpu_mixed())).collect();
    let out = run_all(&mut engine, &requests, 4, |_, _| {});
    for ((seq, _), (tokens, report)) in requests.iter().zip(&out) {
        assert_eq!(*tokens, cpu_alone(&prompt(*seq), 4));
        assert_eq!(fallback_reason(report), Some(FallbackReason::OutOfMemory));
    }
    assert_eq!(engine.health(), GpuHealth::Healthy);
}

#[test]
fn a_panicking_gpu_backend_counts_as_a_cuda_error() {
    let mut engine = failing_engine(2, || panic!("driver bug (test)"));
    let requests: Vec<_> = (1..=2).map(|seq| (seq, gpu_mixed())).collect();
    let out = run_all(&mut engine, &requests, 3, |_, _| {});
    for ((seq, _), (tokens, report)) in requests.iter().zip(&out) {
        assert_eq!(*tokens, cpu_alone(&prompt(*seq), 3));
        assert_eq!(fallback_reason(report), Some(FallbackReason::CudaError));
    }
    assert_eq!(engine.health(), GpuHealth::CoolingDown);
}

#[test]
fn an_out_of_memory_placement_falls_back_without_poisoning() {
    // The engine plans with 16 GiB, but the device only lets the backend and
    // one 16-position sequence allocate.
    let plan = crate::memory_plan::gpu_memory_plan_for_model(&model(), Precision::Bf16, 16, 64);
    let injector =
        Arc::new(FaultInjector::new(FaultPlan { gpu_memory_limit: Some(plan.total()), ..FaultPlan::default() }));
    let primary = simulated_primary(model(), cpu_config(), simulated_gpu_info(16 << 30), injector, 64);
    let mut engine = Engine::new(cpu(), primary, settings()).unwrap();
    assert_eq!(engine.add_sequence(1, 16, &gpu_mixed()).unwrap().fallback, None);
    let report = engine.add_sequence(2, 16, &gpu_mixed()).unwrap();
    assert_eq!(fallback_reason(report), Some(FallbackReason::OutOfMemory));
    assert_eq!(report.device, "cpu");
    assert_eq!(engine.health(), GpuHealth::Healthy);
}

#[test]
fn a_backend_that_does_not_fit_after_all_is_not_created_again_for_every_request() {
    // The plan fits 16 GiB, but the device has room for the bf16 backend
    // and its self-test only, and refuses a second backend (fp32).
    let bf16 = crate::memory_plan::gpu_memory_plan_for_model(&model(), Precision::Bf16, 4, 64);
    let injector =
        Arc::new(FaultInjector::new(FaultPlan { gpu_memory_limit: Some(bf16.total()), ..FaultPlan::default() }));
    let primary = simulated_primary(model(), cpu_config(), simulated_gpu_info(16 << 30), injector.clone(), 64);
    let mut engine = Engine::new(cpu(), primary, settings()).unwrap();
    let fp32 = wants(DevicePreference::Gpu, Some(false));
    assert_eq!(fallback_reason(engine.add_sequence(1, 8, &fp32).unwrap()), Some(FallbackReason::OutOfMemory));
    let launches = injector.launches();
    assert_eq!(fallback_reason(engine.add_sequence(2, 8, &fp32).unwrap()), Some(FallbackReason::InsufficientGpuMemory));
    assert_eq!(injector.launches(), launches, "no second attempt at creating the fp32 backend");
    assert_eq!(engine.health(), GpuHealth::Healthy);
}

#[test]
fn bad_entries_fail_alone_and_bad_preferences_are_errors() {
    let (mut engine, _) = simulated_engine(FaultPlan::default());
    engine.add_sequence(1, 8, &gpu_mixed()).unwrap();
    engine.add_sequence(2, 8, &wants(DevicePreference::Cpu, None)).unwrap();
    engine.add_sequence(3, 8, &gpu_mixed()).unwrap();
    let results = engine.step(&[
        StepInput { seq: 1, tokens: &[1, 2] },
        StepInput { seq: 2, tokens: &[99_999] },
        StepInput { seq: 3, tokens: &[5] },
        StepInput { seq: 1, tokens: &[3] },
        StepInput { seq: 7, tokens: &[3] },
    ]);
    assert!(results[0].is_ok() && results[2].is_ok());
    assert!(matches!(results[1], Err(BackendError::Request(_))), "{:?}", results[1]);
    assert_eq!(results[3], Err(BackendError::RepeatedInStep { seq: 1 }));
    assert_eq!(results[4], Err(BackendError::UnknownSequence(7)));
    assert_eq!((engine.sequence_len(1), engine.sequence_len(2), engine.sequence_len(3)), (Some(2), Some(0), Some(1)));
    assert_eq!(engine.health(), GpuHealth::Healthy, "request errors are not device errors");

    let cpu_fp16 = RequestPreferences {
        device: DevicePreference::Cpu,
        precision: PrecisionPreference::Fp16,
        ..RequestPreferences::default()
    };
    let err = engine.add_sequence(4, 8, &cpu_fp16).unwrap_err();
    assert!(matches!(err, EngineError::Preference(PreferenceError::CpuCannotServe { .. })), "{err}");
    assert_eq!(engine.add_sequence(1, 8, &gpu_mixed()).unwrap_err(), BackendError::DuplicateSequence(1).into());
    assert!(matches!(
        Engine::new(
            cpu(),
            simulated_primary(
                model(),
                cpu_config(),
                simulated_gpu_info(1),
                Arc::new(FaultInjector::new(FaultPlan::default())),
                64
            ),
            EngineConfig { gpu_memory_utilization: 1.5, ..settings() }
        ),
        Err(EngineError::Config(_))
    ));
}

#[test]
fn step_select_answers_each_entry_as_asked_on_either_device() {
    // Two engines fed the same steps: one asked for logits everywhere, the
    // other for a mix; tokens must be the logits' argmax, logits identical.
    let requests: Vec<(SeqId, RequestPreferences)> = vec![
        (1, gpu_mixed()),
        (2, gpu_mixed()),
        (3, RequestPreferences::default()),
        (4, RequestPreferences::default()),
    ];
    let (mut all_logits, _) = simulated_engine(FaultPlan::default());
    let (mut mixed, _) = simulated_engine(FaultPlan::default());
    for engine in [&mut all_logits, &mut mixed] {
        for (seq, prefs) in &requests {
            engine.add_sequence(*seq, 16, prefs).unwrap();
        }
    }
    let step_wants = [StepWant::Greedy, StepWant::Logits, StepWant::Greedy, StepWant::Logits];
    let prompts: Vec<Vec<u32>> = requests.iter().map(|(seq, _)| prompt(*seq)).collect();
    let batch: Vec<StepInput<'_>> =
        requests.iter().zip(&prompts).map(|((seq, _), tokens)| StepInput { seq: *seq, tokens }).collect();
    let logits = all_logits.step(&batch);
    let selected = mixed.step_select(&batch, &step_wants);
    for ((logits, selected), want) in logits.into_iter().zip(selected).zip(step_wants) {
        let logits = logits.unwrap();
        match (selected.unwrap(), want) {
            (StepOutput::Token(token), StepWant::Greedy) => assert_eq!(token, argmax(&logits)),
            (StepOutput::Logits(got), StepWant::Logits) => assert_eq!(got, logits),
            (other, want) => panic!("asked for {want:?}, got {other:?}"),
        }
    }
    // One want short: that entry fails alone, and it did not advance.
    let tokens = [5u32];
    let batch = [StepInput { seq: 1, tokens: &tokens }, StepInput { seq: 3, tokens: &tokens }];
    let results = mixed.step_select(&batch, &[StepWant::Greedy]);
    assert!(matches!(results[0], Ok(StepOutput::Token(_))), "{:?}", results[0]);
    assert!(matches!(results[1], Err(BackendError::WantsMismatch { entries: 2, wants: 1 })), "{:?}", results[1]);
    assert_eq!(mixed.sequence_len(3), Some(prompts[2].len()));
}
