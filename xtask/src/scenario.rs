//! `cargo xtask test --scenario NAME|all`: the GPU fallback matrix.
//!
//! Each scenario is a fault plan for the primary device. For every
//! concurrency level (16 and 128 by default) the real HTTP server is started
//! in-process on 127.0.0.1:0, that many greedy completion requests asking for
//! the GPU with mixed precision are sent at once, and every answer is
//! compared with the same request served by a CPU-only server. Without a
//! CUDA backend the primary device is the simulated GPU (the CPU backend
//! behind the fault injector, reported as `cpu-simulated-gpu`); the header
//! says which ran. Exits non-zero when a gate fails: every request succeeds,
//! outputs equal the CPU-only run, every CPU-served request used I2_S, the
//! fallback rate reaches the scenario's minimum, and /metrics agrees with
//! the responses. Added latency p99 < 500 ms is reported, not gated (it is a
//! benchmark figure; CI machines are noisy).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bitnet_device::{FaultPlan, GpuProbe, Precision};
use bitnet_inference::memory_plan::{gpu_memory_plan, gpu_memory_plan_for_model};
use bitnet_inference::simulated_gpu::SIMULATED_GPU_DEVICE;
use bitnet_inference::EngineConfig;
use bitnet_models::{BitNetConfig, BitNetModel};
use bitnet_server::server::{build_engine, serve_with_loader, EngineOptions, LoadError, ServerConfig};
use serde_json::{json, Value};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// insufficient_gpu_memory, no_mixed_precision_support, tensor_core_unavailable,
    /// cuda_context_failure, gpu_failure_mid_run, or all.
    #[arg(long)]
    scenario: String,
    #[arg(long, default_value = "models/bitnet-tiny-tasks/bitnet-tiny-tasks.gguf")]
    model: PathBuf,
    /// JSON lines with a "prompt" field; used in order, cycling.
    #[arg(long, default_value = "models/bitnet-tiny-tasks/heldout.jsonl")]
    prompts: PathBuf,
    /// Concurrent requests per batch (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "16,128")]
    concurrency: Vec<usize>,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// CPU threads per backend (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Seed of the injected CUDA call failures.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Cool-down before a poisoned GPU is recreated (`bitnet serve` waits 1 s;
    /// a batch here lasts well under a second, so recovery would never show).
    #[arg(long, default_value_t = 20)]
    cool_down_ms: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The limit the issue names for the memory scenario (sized for 2B-4T).
const MEMORY_LIMIT_BYTES: u64 = 500_000_000;

fn bytes(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2} GB", n as f64 / 1e9)
    } else {
        format!("{:.1} MB", n as f64 / 1e6)
    }
}

struct Scenario {
    name: &'static str,
    plan: FaultPlan,
    /// What the plan means, for the table.
    note: String,
    min_fallback_rate: f64,
}

fn scenarios(model: &BitNetModel, seed: u64, max_batch_tokens: usize) -> anyhow::Result<Vec<Scenario>> {
    // 500 MB starves 2B-4T (its bf16 weights and workspace need about 1.3
    // GB) but holds a small model many times over. For a model smaller than
    // 2B-4T the limit is scaled by the ratio of the two plans, so it is the
    // same fraction of what the model needs; 2B-4T itself gets 500 MB. The
    // table says which limit was used.
    let static_bytes = |plan: bitnet_inference::memory_plan::GpuMemoryPlan| plan.weights + plan.workspace;
    let needed = static_bytes(gpu_memory_plan_for_model(model, Precision::Bf16, 0, max_batch_tokens));
    let reference = static_bytes(gpu_memory_plan(&BitNetConfig::bitnet_2b4t(), Precision::Bf16, 0, max_batch_tokens));
    let scaled = (u128::from(MEMORY_LIMIT_BYTES) * u128::from(needed) / u128::from(reference)) as u64;
    let limit = scaled.min(MEMORY_LIMIT_BYTES);
    let note = if limit == MEMORY_LIMIT_BYTES {
        format!("gpu_memory_limit=500MB (the model needs {})", bytes(needed))
    } else {
        format!(
            "gpu_memory_limit={} = 500 MB scaled by this model's plan ({}) over 2B-4T's ({})",
            bytes(limit),
            bytes(needed),
            bytes(reference)
        )
    };
    let parse = |spec: &str| FaultPlan::parse(spec).with_context(|| format!("scenario plan `{spec}`"));
    Ok(vec![
        Scenario {
            name: "insufficient_gpu_memory",
            plan: FaultPlan { gpu_memory_limit: Some(limit), ..FaultPlan::default() },
            note,
            min_fallback_rate: 1.0,
        },
        Scenario {
            name: "no_mixed_precision_support",
            plan: parse("fp16=false,bf16=false")?,
            note: "fp16=false,bf16=false".into(),
            min_fallback_rate: 1.0,
        },
        Scenario {
            name: "tensor_core_unavailable",
            plan: parse("cc=6.1")?,
            note: "cc=6.1 (fp16, no bf16, no tensor cores)".into(),
            min_fallback_rate: 1.0,
        },
        Scenario {
            name: "cuda_context_failure",
            plan: parse(&format!("failure_rate=0.3,seed={seed}"))?,
            note: format!("failure_rate=0.3,seed={seed} (30% of CUDA calls fail)"),
            min_fallback_rate: 0.8,
        },
        // A GPU that works through its creation and self-test, then fails
        // while serving: the running sequences must finish on the CPU. (On
        // the real CUDA backend cuda_context_failure never gets it created.)
        Scenario {
            name: "gpu_failure_mid_run",
            plan: parse("fail_after_steps=3")?,
            note: "fail_after_steps=3 (every CUDA call fails from the backend's 4th step on; the self-test is its 1st)"
                .into(),
            min_fallback_rate: 0.8,
        },
    ])
}

/// What one request came back with.
#[derive(Debug, Clone)]
struct Outcome {
    status: u16,
    body: Value,
    e2e: Duration,
}

impl Outcome {
    fn text(&self) -> (&Value, &Value) {
        (&self.body["choices"][0]["text"], &self.body["choices"][0]["finish_reason"])
    }

    fn bitnet(&self) -> &Value {
        &self.body["bitnet"]
    }
}

/// Starts the server on an engine built with `options`, waits (a while) for
/// its GPU to be healthy, sends every body at once, returns the outcomes in
/// order and the final /metrics text.
async fn run_server(
    model: Arc<BitNetModel>,
    options: EngineOptions,
    bodies: Vec<Value>,
    model_id: &str,
) -> anyhow::Result<ServerRun> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let config = ServerConfig {
        max_in_flight: bodies.len().max(ServerConfig::DEFAULT_MAX_IN_FLIGHT),
        ..ServerConfig::new(model_id)
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let load = move || -> Result<_, LoadError> {
        let tokenizer = model.tokenizer.clone();
        // A real GPU is the primary device when there is one (the fault plan
        // acts on the CUDA backend); otherwise `options.simulate_gpu` gives a
        // CPU backend posing as one.
        let probe = if options.simulate_gpu {
            GpuProbe::NoDriver { reason: "simulated GPU".into() }
        } else {
            bitnet_device::probe_gpus()
        };
        Ok((build_engine(model, &options, &probe)?, tokenizer))
    };
    let server = tokio::spawn(serve_with_loader(listener, config, load, async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !client.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status() == 200) {
        if server.is_finished() || Instant::now() > deadline {
            let outcome = server.await?;
            bail!("the server did not become ready: {outcome:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Send the batch to a healthy GPU when there is one, as to a server that
    // has been up a while: a failed warm-up would otherwise turn every
    // request of a short batch into `gpu_unhealthy` and hide the run-time path.
    let health = |devices: Value| devices["gpu_backend"]["health"].as_str().map(str::to_owned);
    let mut gpu_health = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let devices: Value = client.get(format!("{base}/v1/devices")).send().await?.json().await?;
        gpu_health = health(devices).or(gpu_health);
        if gpu_health.as_deref().is_none_or(|h| h == "healthy") || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let url = format!("{base}/v1/completions");
    let requests = bodies.iter().map(|body| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let start = Instant::now();
            let response = client.post(&url).json(body).send().await?;
            let status = response.status().as_u16();
            let body: Value = response.json().await?;
            anyhow::Ok(Outcome { status, body, e2e: start.elapsed() })
        }
    });
    let outcomes: Vec<Outcome> = futures_util::future::try_join_all(requests).await?;
    let metrics = client.get(format!("{base}/metrics")).send().await?.text().await?;
    let _ = stop.send(());
    server.await?.context("the server failed")?;
    Ok(ServerRun { outcomes, metrics, gpu_health_at_start: gpu_health })
}

struct ServerRun {
    outcomes: Vec<Outcome>,
    metrics: String,
    /// The GPU's health when the batch was sent (`None` without a GPU).
    gpu_health_at_start: Option<String>,
}

fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// One row of the table: a scenario at one concurrency.
#[derive(Debug)]
struct Row {
    scenario: &'static str,
    requests: usize,
    succeeded: usize,
    fell_back: usize,
    reasons: BTreeMap<String, usize>,
    cpu_served: usize,
    cpu_i2s: usize,
    primary_device: Option<String>,
    added_ms: Vec<f64>,
    e2e_ms: Vec<f64>,
    baseline_e2e_ms: Vec<f64>,
    equal_outputs: usize,
    metrics_agree: bool,
    min_fallback_rate: f64,
    gpu_health_at_start: Option<String>,
}

impl Row {
    fn rate(&self, n: usize) -> f64 {
        n as f64 / self.requests.max(1) as f64
    }

    /// The gates that failed, empty when the row passes.
    fn failures(&self) -> Vec<String> {
        let mut failed = Vec::new();
        if self.succeeded != self.requests {
            failed.push(format!("{} of {} requests succeeded", self.succeeded, self.requests));
        }
        if self.equal_outputs != self.requests {
            failed.push(format!("{} of {} outputs equal the CPU-only run", self.equal_outputs, self.requests));
        }
        if self.cpu_i2s != self.cpu_served {
            failed.push(format!("{} of {} CPU-served requests used i2s", self.cpu_i2s, self.cpu_served));
        }
        if self.rate(self.fell_back) < self.min_fallback_rate {
            failed.push(format!(
                "fallback rate {:.1}% below {:.0}%",
                100.0 * self.rate(self.fell_back),
                100.0 * self.min_fallback_rate
            ));
        }
        if !self.metrics_agree {
            failed.push("/metrics fallback counters disagree with the responses".into());
        }
        failed
    }

    fn json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "requests": self.requests,
            "success_rate": self.rate(self.succeeded),
            "fallback_rate": self.rate(self.fell_back),
            "fallback_reasons": self.reasons,
            "cpu_served": self.cpu_served,
            "cpu_i2s_rate": self.cpu_i2s as f64 / self.cpu_served.max(1) as f64,
            "primary_device": self.primary_device,
            "added_latency_ms": { "p50": percentile(&self.added_ms, 0.5), "p99": percentile(&self.added_ms, 0.99) },
            "e2e_ms": { "p50": percentile(&self.e2e_ms, 0.5), "p99": percentile(&self.e2e_ms, 0.99) },
            "cpu_only_e2e_ms": {
                "p50": percentile(&self.baseline_e2e_ms, 0.5), "p99": percentile(&self.baseline_e2e_ms, 0.99)
            },
            "outputs_equal_cpu_only": self.equal_outputs,
            "metrics_agree": self.metrics_agree,
            "gpu_health_at_start": self.gpu_health_at_start,
            "gates_failed": self.failures(),
        })
    }
}

fn evaluate(scenario: &Scenario, outcomes: &[Outcome], baseline: &[Outcome], metrics: &str) -> Row {
    let mut row = Row {
        scenario: scenario.name,
        requests: outcomes.len(),
        succeeded: outcomes.iter().filter(|o| o.status == 200).count(),
        fell_back: 0,
        reasons: BTreeMap::new(),
        cpu_served: 0,
        cpu_i2s: 0,
        primary_device: None,
        added_ms: Vec::new(),
        e2e_ms: outcomes.iter().map(|o| o.e2e.as_secs_f64() * 1e3).collect(),
        baseline_e2e_ms: baseline.iter().map(|o| o.e2e.as_secs_f64() * 1e3).collect(),
        equal_outputs: outcomes
            .iter()
            .zip(baseline)
            .filter(|(o, b)| o.status == 200 && b.status == 200 && o.text() == b.text())
            .count(),
        metrics_agree: false,
        min_fallback_rate: scenario.min_fallback_rate,
        gpu_health_at_start: None,
    };
    for outcome in outcomes.iter().filter(|o| o.status == 200) {
        let info = outcome.bitnet();
        let device = info["device"].as_str().unwrap_or("?");
        if info["fallback_occurred"] == true {
            row.fell_back += 1;
            let reason = info["fallback_reason"].as_str().unwrap_or("?").to_owned();
            *row.reasons.entry(reason).or_default() += 1;
            row.added_ms.push(info["fallback_ms"].as_f64().unwrap_or(f64::NAN));
        } else {
            row.primary_device = Some(device.to_owned());
        }
        if device == "cpu" {
            row.cpu_served += 1;
            row.cpu_i2s += usize::from(info["quantization"] == "i2s");
        }
    }
    let counted: f64 = ["gpu_unavailable", "no_mixed_precision", "tensor_cores_unavailable", "insufficient_gpu_memory"]
        .iter()
        .chain(&["cuda_error", "out_of_memory", "gpu_unhealthy"])
        .filter_map(|r| metric(metrics, &format!("bitnet_fallbacks_total{{reason=\"{r}\"}}")))
        .sum();
    let histogram = metric(metrics, "bitnet_fallback_latency_seconds_count");
    row.metrics_agree = counted == row.fell_back as f64 && histogram == Some(row.fell_back as f64);
    row
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| if v < 1.0 { format!("{v:.3}") } else { format!("{v:.1}") })
}

fn print_table(rows: &[Row]) {
    println!(
        "| scenario | requests | GPU at start | success | fallback rate | reasons | CPU requests on i2s | added latency p50 / p99 (ms) | e2e p50 / p99 (ms), CPU-only | outputs = CPU-only |"
    );
    println!("|---|---:|---|---:|---:|---|---:|---:|---:|---:|");
    for row in rows {
        let reasons: Vec<String> = row.reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
        println!(
            "| {} | {} | {} | {:.0}% | {:.1}% | {} | {}/{} | {} / {} | {} / {}, {} / {} | {}/{} |",
            row.scenario,
            row.requests,
            row.gpu_health_at_start.as_deref().unwrap_or("none"),
            100.0 * row.rate(row.succeeded),
            100.0 * row.rate(row.fell_back),
            if reasons.is_empty() { "-".into() } else { reasons.join(", ") },
            row.cpu_i2s,
            row.cpu_served,
            ms(percentile(&row.added_ms, 0.5)),
            ms(percentile(&row.added_ms, 0.99)),
            ms(percentile(&row.e2e_ms, 0.5)),
            ms(percentile(&row.e2e_ms, 0.99)),
            ms(percentile(&row.baseline_e2e_ms, 0.5)),
            ms(percentile(&row.baseline_e2e_ms, 0.99)),
            row.equal_outputs,
            row.requests,
        );
    }
}

fn read_prompts(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line).with_context(|| format!("{}:{}", path.display(), i + 1))?;
        let prompt = value["prompt"].as_str().with_context(|| format!("{}:{}: no prompt", path.display(), i + 1))?;
        prompts.push(prompt.to_owned());
    }
    anyhow::ensure!(!prompts.is_empty(), "{} has no prompts", path.display());
    Ok(prompts)
}

pub fn run(args: TestArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.concurrency.is_empty() && !args.concurrency.contains(&0), "--concurrency must be positive");
    anyhow::ensure!(args.max_tokens > 0, "--max-tokens must be at least 1");
    let (model, _) = BitNetModel::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let model = Arc::new(model);
    let model_id = args.model.file_stem().map_or("bitnet".into(), |s| s.to_string_lossy().into_owned());
    let prompts = read_prompts(&args.prompts)?;
    let cool_down = Duration::from_millis(args.cool_down_ms);
    let engine = EngineConfig {
        max_batch_tokens: ServerConfig::DEFAULT_MAX_BATCH_TOKENS,
        cool_down,
        max_cool_down: Duration::from_secs(1).max(cool_down),
        ..EngineConfig::default()
    };
    let all = scenarios(&model, args.seed, engine.max_batch_tokens)?;
    let selected: Vec<&Scenario> = match args.scenario.as_str() {
        "all" => all.iter().collect(),
        name => match all.iter().find(|s| s.name == name) {
            Some(s) => vec![s],
            None => {
                let names: Vec<&str> = all.iter().map(|s| s.name).collect();
                bail!("unknown scenario `{name}`; expected one of {} or all", names.join(", "));
            }
        },
    };
    let cpu = bitnet_device::CpuInfo::probe();
    println!(
        "fallback scenarios: model {} ({}), machine {cpu}, {} threads per backend",
        args.model.display(),
        model_id,
        if args.threads == 0 { cpu.logical_cores } else { args.threads }
    );
    let real_gpu = bitnet_device::probe_gpus().gpus().iter().find(|g| g.compute_capability.0 >= 8).cloned();
    match &real_gpu {
        Some(g) => println!(
            "primary device: {} (cc {}.{}), the CUDA backend with the fault plan acting on its allocations and launches",
            g.name, g.compute_capability.0, g.compute_capability.1
        ),
        None => println!(
            "primary device: simulated GPU ({SIMULATED_GPU_DEVICE}: the CPU backend behind the fault injector; no usable CUDA GPU here)"
        ),
    }
    for scenario in &selected {
        println!("  {}: {}", scenario.name, scenario.note);
    }
    println!("  GPU cool-down after a poisoning error: {} ms, doubling up to 1 s", args.cool_down_ms);

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut rows = Vec::new();
    for &concurrency in &args.concurrency {
        let body = |i: usize, gpu: bool| {
            let mut body = json!({
                "model": model_id, "prompt": prompts[i % prompts.len()], "max_tokens": args.max_tokens,
                "temperature": 0,
            });
            let fields = if gpu {
                json!({ "device_preference": "gpu", "mixed_precision": true })
            } else {
                json!({ "device_preference": "cpu" })
            };
            body.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
            body
        };
        let cpu_only = EngineOptions { threads: args.threads, engine: engine.clone(), ..EngineOptions::default() };
        let bodies = (0..concurrency).map(|i| body(i, false)).collect();
        let baseline = runtime.block_on(run_server(model.clone(), cpu_only, bodies, &model_id))?.outcomes;
        for scenario in &selected {
            let options = EngineOptions {
                threads: args.threads,
                simulate_gpu: real_gpu.is_none(),
                fault_plan: scenario.plan.clone(),
                engine: engine.clone(),
                ..EngineOptions::default()
            };
            let bodies = (0..concurrency).map(|i| body(i, true)).collect();
            let run = runtime.block_on(run_server(model.clone(), options, bodies, &model_id))?;
            let mut row = evaluate(scenario, &run.outcomes, &baseline, &run.metrics);
            row.gpu_health_at_start = run.gpu_health_at_start;
            if let Some(failed) = run.outcomes.iter().find(|o| o.status != 200) {
                eprintln!("{} x{concurrency}: a request failed: {} {}", scenario.name, failed.status, failed.body);
            }
            rows.push(row);
        }
    }
    rows.sort_by_key(|r| (selected.iter().position(|s| s.name == r.scenario), r.requests));
    println!();
    print_table(&rows);
    let p99_ok = rows.iter().all(|r| percentile(&r.added_ms, 0.99).is_none_or(|p| p < 500.0));
    println!("\nadded latency p99 < 500 ms in every row: {} (reported, not gated)", if p99_ok { "yes" } else { "no" });
    if let Some(path) = &args.json {
        let report = json!({
            "model": args.model, "machine": cpu.to_string(), "primary_device": SIMULATED_GPU_DEVICE,
            "max_tokens": args.max_tokens,
            "scenarios": selected.iter().map(|s| json!({ "name": s.name, "fault_plan": s.plan.to_string(), "note": s.note })).collect::<Vec<_>>(),
            "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let failures: Vec<String> = rows
        .iter()
        .flat_map(|r| r.failures().into_iter().map(move |f| format!("{} x{}: {f}", r.scenario, r.requests)))
        .collect();
    if !failures.is_empty() {
        for failure in &failures {
            eprintln!("FAILED {failure}");
        }
        bail!("{} gate(s) failed", failures.len());
    }
    println!("all gates passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Row {
        Row {
            scenario: "s",
            requests: 10,
            succeeded: 10,
            fell_back: 10,
            reasons: BTreeMap::new(),
            cpu_served: 10,
            cpu_i2s: 10,
            primary_device: None,
            added_ms: vec![0.1; 10],
            e2e_ms: Vec::new(),
            baseline_e2e_ms: Vec::new(),
            equal_outputs: 10,
            metrics_agree: true,
            min_fallback_rate: 0.8,
            gpu_health_at_start: None,
        }
    }

    #[test]
    fn each_gate_fails_on_its_own() {
        assert!(row().failures().is_empty());
        let check = |row: Row, needle: &str| {
            let failures = row.failures();
            assert_eq!(failures.len(), 1, "{failures:?}");
            assert!(failures[0].contains(needle), "{failures:?}");
        };
        check(Row { succeeded: 9, ..row() }, "9 of 10 requests succeeded");
        check(Row { equal_outputs: 9, ..row() }, "outputs equal");
        check(Row { cpu_i2s: 9, ..row() }, "used i2s");
        check(Row { fell_back: 7, ..row() }, "fallback rate 70.0% below 80%");
        check(Row { metrics_agree: false, ..row() }, "/metrics");
        assert!(Row { fell_back: 8, ..row() }.failures().is_empty());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), Some(50.0));
        assert_eq!(percentile(&values, 0.99), Some(99.0));
        assert_eq!(percentile(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
