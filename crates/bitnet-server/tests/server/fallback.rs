//! GPU fallback through HTTP: a simulated GPU (the CPU backend as the
//! primary device) under fault plans; every request succeeds, says where it
//! ran and why, and equals the same request run on the CPU.

use std::time::Duration;

use bitnet_device::{FaultPlan, GpuProbe};
use bitnet_inference::engine::BackendFactory;
use bitnet_inference::simulated_gpu::simulated_gpu_info;
use bitnet_inference::{
    argmax, Backend, BackendError, BackendInfo, CpuBackend, CpuBackendConfig, Engine, EngineConfig, PrimaryDevice,
    SeqId, StepInput,
};
use bitnet_models::BitNetConfig;
use bitnet_server::server::{build_engine, EngineOptions};
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::common::{self, metric_value, MODEL_ID};

async fn start(plan: &str) -> common::TestServer {
    let options = EngineOptions {
        threads: 1,
        simulate_gpu: true,
        fault_plan: FaultPlan::parse(plan).unwrap(),
        engine: EngineConfig { cool_down: Duration::from_secs(3600), ..EngineConfig::default() },
        ..EngineOptions::default()
    };
    let no_gpu = GpuProbe::NoDriver { reason: "test".into() };
    let engine = build_engine(common::model(), &options, &no_gpu).unwrap();
    common::start_engine(engine, common::config()).await
}

fn request(i: usize, device: &str, mixed: bool) -> Value {
    json!({
        "model": MODEL_ID, "prompt": format!("request {i}: the quick brown fox"), "max_tokens": 6,
        "temperature": 0, "device_preference": device, "mixed_precision": mixed,
    })
}

/// Sends `n` GPU requests with mixed precision at once, then the same on the CPU.
async fn run(server: &common::TestServer, n: usize) -> Vec<(Value, Value)> {
    let gpu = join_all((0..n).map(|i| async move { server.post("/v1/completions", &request(i, "gpu", true)).await }));
    let gpu = gpu.await;
    let cpu = join_all((0..n).map(|i| async move { server.post("/v1/completions", &request(i, "cpu", false)).await }));
    let cpu = cpu.await;
    gpu.into_iter()
        .zip(cpu)
        .map(|((gs, g), (cs, c))| {
            assert_eq!((gs, cs), (200, 200), "{g} {c}");
            (g, c)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_simulated_gpu_serves_gpu_requests_and_says_it_is_simulated() {
    let server = start("").await;
    for (gpu, cpu) in run(&server, 4).await {
        assert_eq!(gpu["bitnet"]["device"], "cpu-simulated-gpu");
        assert_eq!(gpu["bitnet"]["precision"], "bf16");
        assert_eq!(gpu["bitnet"]["fallback_occurred"], false);
        assert_eq!(cpu["bitnet"]["device"], "cpu");
        assert_eq!(cpu["bitnet"]["quantization"], "i2s");
        assert_eq!(gpu["choices"][0]["text"], cpu["choices"][0]["text"]);
    }
    let devices: Value = server.client.get(server.url("/v1/devices")).send().await.unwrap().json().await.unwrap();
    assert_eq!(devices["gpu_backend"]["health"], "healthy");
    assert_eq!(devices["gpu_backend"]["gpu"]["name"], "simulated GPU (cpu-simulated-gpu)");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capability_faults_fall_back_before_running_with_typed_reasons_and_metrics() {
    for (plan, reason) in [
        ("cc=6.1", "tensor_cores_unavailable"),
        ("fp16=false,bf16=false", "no_mixed_precision"),
        ("gpu_memory_limit=1MB", "insufficient_gpu_memory"),
    ] {
        let server = start(plan).await;
        let n = 6;
        for (gpu, cpu) in run(&server, n).await {
            let info = &gpu["bitnet"];
            assert_eq!(info["fallback_occurred"], true, "{plan}: {gpu}");
            assert_eq!(info["fallback_reason"], reason, "{plan}");
            assert_eq!((&info["device"], &info["quantization"]), (&json!("cpu"), &json!("i2s")), "{plan}");
            assert!(info["fallback_ms"].as_f64().unwrap() >= 0.0);
            assert_eq!(cpu["bitnet"]["fallback_occurred"], false);
            assert_eq!(gpu["choices"][0]["text"], cpu["choices"][0]["text"], "{plan}");
        }
        let metrics = server.metrics_text().await;
        let counter = |r: &str| metric_value(&metrics, &format!("bitnet_fallbacks_total{{reason=\"{r}\"}}"));
        assert_eq!(counter(reason), Some(n as f64), "{plan}\n{metrics}");
        assert_eq!(counter("cuda_error"), Some(0.0));
        assert_eq!(metric_value(&metrics, "bitnet_fallback_latency_seconds_count"), Some(n as f64));
        assert_eq!(metric_value(&metrics, "bitnet_gpu_health{state=\"healthy\"}"), Some(1.0), "{metrics}");
        server.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_cuda_calls_are_rerun_on_the_cpu_and_the_gpu_turns_unhealthy() {
    // Warm-up is two calls (context, self-test); the first step after it
    // fails, its sequences move, later ones see an unhealthy GPU.
    let server = start("fail_after=2").await;
    let results = run(&server, 8).await;
    for (gpu, cpu) in &results {
        assert_eq!(gpu["bitnet"]["device"], "cpu");
        assert_eq!(gpu["choices"][0]["text"], cpu["choices"][0]["text"]);
        let reason = gpu["bitnet"]["fallback_reason"].as_str().unwrap();
        assert!(["cuda_error", "gpu_unhealthy"].contains(&reason), "{gpu}");
    }
    let metrics = server.metrics_text().await;
    assert!(metric_value(&metrics, "bitnet_fallbacks_total{reason=\"cuda_error\"}").unwrap() >= 1.0, "{metrics}");
    assert_eq!(metric_value(&metrics, "bitnet_gpu_health{state=\"cooling_down\"}"), Some(1.0), "{metrics}");
    assert_eq!(metric_value(&metrics, "bitnet_requests_failed_total"), Some(0.0));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_no_device_can_serve_are_client_errors() {
    let server = common::start(common::config()).await;
    let cases = [
        (json!({ "device_preference": "cpu", "precision": "fp16" }), "device_preference", "not available on the CPU"),
        (json!({ "device_preference": "cpu", "mixed_precision": true }), "device_preference", "mixed"),
        (json!({ "precision": "fp32", "mixed_precision": true }), "mixed_precision", "contradicts"),
        (json!({ "precision": "int4" }), "precision", "must be one of auto, fp32, fp16, bf16"),
        (json!({ "quantization_preference": "q4_0" }), "quantization_preference", "auto, i2s"),
    ];
    for (fields, param, needle) in cases {
        let mut body = json!({ "model": MODEL_ID, "prompt": "x", "max_tokens": 1 });
        body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
        let (status, error) = server.post("/v1/completions", &body).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error["error"]["param"], param, "{body}");
        assert!(error["error"]["message"].as_str().unwrap().contains(needle), "{error}");
    }
    server.shutdown().await.unwrap();
}

/// A GPU whose decode steps disagree with the CPU (the two best logits of
/// every row swapped, so greedy picks another token) and whose `fail_at`-th
/// step fails with a device error. The warm-up self-test (a prefill) agrees.
struct DisagreeingGpu {
    inner: CpuBackend,
    steps: usize,
    fail_at: usize,
}

impl Backend for DisagreeingGpu {
    fn info(&self) -> BackendInfo {
        BackendInfo { device: "test-gpu".into(), precision: "bf16".into(), ..self.inner.info() }
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
        if self.steps == self.fail_at {
            return Err(BackendError::Device("illegal memory access (test)".into()));
        }
        let mut logits = self.inner.step(batch)?;
        for (input, row) in batch.iter().zip(&mut logits) {
            if input.tokens.len() == 1 {
                let best = argmax(row) as usize;
                let mut second = if best == 0 { 1 } else { 0 };
                for (i, &v) in row.iter().enumerate() {
                    if i != best && v > row[second] {
                        second = i;
                    }
                }
                row.swap(best, second);
            }
        }
        Ok(logits)
    }
}

async fn start_disagreeing(fail_at: usize) -> common::TestServer {
    let cpu_config = CpuBackendConfig { threads: 1, ..CpuBackendConfig::default() };
    let gpu_config = cpu_config.clone();
    let factory: BackendFactory = Box::new(move |_| {
        let inner = CpuBackend::new(common::model(), &gpu_config)?;
        Ok(Box::new(DisagreeingGpu { inner, steps: 0, fail_at }) as Box<dyn Backend>)
    });
    let primary = PrimaryDevice { gpu: simulated_gpu_info(16 << 30), factory, untied_head: true };
    let cpu = CpuBackend::new(common::model(), &cpu_config).unwrap();
    let settings = EngineConfig { cool_down: Duration::from_secs(3600), ..EngineConfig::default() };
    let engine = Engine::new(Box::new(cpu), primary, settings).unwrap();
    common::start_engine(engine, common::config()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_moved_mid_run_is_regenerated_on_the_cpu_unless_it_was_streamed() {
    // GPU steps: 1 the self-test, 2 the prompt, 3 a decode (disagreeing), 4 fails.
    let body = request(0, "gpu", true);
    let server = start_disagreeing(4).await;
    let (_, cpu_only) = server.post("/v1/completions", &request(0, "cpu", false)).await;
    let (status, replayed) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(replayed["bitnet"]["fallback_reason"], "cuda_error");
    assert_eq!(replayed["bitnet"]["device"], "cpu");
    assert_eq!(replayed["choices"][0]["text"], cpu_only["choices"][0]["text"], "regenerated from the prompt");
    server.shutdown().await.unwrap();

    // Streamed, the GPU's tokens were already sent: the CPU continues after them.
    let server = start_disagreeing(4).await;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, chunks) = server.post_stream("/v1/completions", &streamed).await;
    assert_eq!(status, 200);
    let (text, _) = common::stream_text(&chunks);
    assert_ne!(json!(text), cpu_only["choices"][0]["text"], "the disagreeing GPU token must show in the stream");
    let last: Value = serde_json::from_str(&chunks[chunks.len() - 2]).unwrap();
    assert_eq!(last["bitnet"]["fallback_reason"], "cuda_error");
    server.shutdown().await.unwrap();
}
