//! `cargo xtask loadtest`: an HTTP load generator for `bitnet serve`.
//!
//! Sends `--requests` completion requests, `--concurrency` at a time, to
//! `--url`, or to a `bitnet serve` it starts itself from
//! `target/release/bitnet` on a free loopback port (then it also reports the
//! server's peak RSS, VmHWM, and stops it with SIGTERM). Reports TTFT, TPOT,
//! ITL and end-to-end latency percentiles, throughput, failures, and 429s
//! counted apart from failures.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use serde_json::{json, Value};

#[derive(Debug, clap::Args)]
pub struct LoadtestArgs {
    /// Base URL of a running server (e.g. http://127.0.0.1:8080); when
    /// omitted, `--server-bin serve` is started on a free loopback port.
    #[arg(long)]
    url: Option<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 256)]
    requests: usize,
    /// Stream responses (needed for TTFT, TPOT and ITL).
    #[arg(long)]
    stream: bool,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Sampling temperature of every request (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// top_p of every request (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// top_k of every request (the server's extension; 0: off).
    #[arg(long, default_value_t = 0)]
    top_k: u64,
    #[arg(long, default_value = "The quick brown fox")]
    prompt: String,
    /// Model id to ask for; the server's first model when omitted.
    #[arg(long)]
    model: Option<String>,
    #[arg(long, env = "BITNET_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The server binary started when --url is omitted.
    #[arg(long, default_value = "target/release/bitnet")]
    server_bin: PathBuf,
    /// An argument for `bitnet serve` when it is started here (repeat it),
    /// e.g. --server-arg=--max-in-flight=2048.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// What one request measured.
#[derive(Debug, Default)]
struct Sample {
    ok: bool,
    rejected: bool,
    error: Option<String>,
    e2e: f64,
    ttft: Option<f64>,
    tpot: Option<f64>,
    itl: Vec<f64>,
    completion_tokens: u64,
}

struct Server {
    child: Child,
}

impl Server {
    fn start(bin: &PathBuf, args: &[String]) -> anyhow::Result<(Self, String)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(bin)
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| {
                format!("starting {} (build it with cargo build --release -p bitnet-server)", bin.display())
            })?;
        Ok((Self { child }, format!("http://127.0.0.1:{port}")))
    }

    /// Peak resident set size in bytes (VmHWM), Linux only.
    fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// SIGTERM, then waits for a graceful exit.
    fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        if !sent.is_ok_and(|s| s.success()) {
            self.child.kill()?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                bail!("the server did not exit within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn run(args: LoadtestArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.requests == 0 || args.max_tokens == 0 {
        bail!("--concurrency, --requests and --max-tokens must be at least 1");
    }
    let (server, base) = match &args.url {
        Some(url) => (None, url.trim_end_matches('/').to_owned()),
        None => {
            let (server, base) = Server::start(&args.server_bin, &args.server_args)?;
            (Some(server), base)
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(drive(&args, &base))?;
    let peak_rss = server.as_ref().and_then(Server::peak_rss_bytes);
    let exit = match server {
        Some(server) => Some(server.stop()?),
        None => None,
    };
    let mut report = report;
    report["server"] = json!({
        "started_here": args.url.is_none(),
        "peak_rss_bytes": peak_rss,
        "exit_code": exit.and_then(|s| s.code()),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    if report["failed"].as_u64().unwrap_or(0) > 0 {
        bail!("{} requests failed", report["failed"]);
    }
    Ok(())
}

async fn drive(args: &LoadtestArgs, base: &str) -> anyhow::Result<Value> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build()?;
    wait_ready(&client, base).await?;
    let model = match &args.model {
        Some(model) => model.clone(),
        None => {
            let mut request = client.get(format!("{base}/v1/models"));
            if let Some(key) = &args.api_key {
                request = request.bearer_auth(key);
            }
            let models: Value = request.send().await?.error_for_status()?.json().await?;
            models["data"][0]["id"].as_str().context("the server lists no model")?.to_owned()
        }
    };
    let body = Arc::new(json!({
        "model": model, "prompt": args.prompt, "max_tokens": args.max_tokens,
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "stream": args.stream, "stream_options": if args.stream { json!({ "include_usage": true }) } else { Value::Null },
    }));
    let url = Arc::new(format!("{base}/v1/completions"));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency.min(args.requests))
        .map(|_| {
            let (client, body, url, next, key) =
                (client.clone(), body.clone(), url.clone(), next.clone(), args.api_key.clone());
            let total = args.requests;
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    samples.push(one_request(&client, &url, &body, key.as_deref()).await);
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(args.requests);
    for worker in workers {
        samples.extend(worker.await?);
    }
    let wall = started.elapsed().as_secs_f64();
    Ok(summarize(args, &samples, wall))
}

async fn wait_ready(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = client.get(format!("{base}/health")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{base}/health did not answer 200 within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn one_request(client: &reqwest::Client, url: &str, body: &Value, key: Option<&str>) -> Sample {
    let start = Instant::now();
    let mut request = client.post(url).json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let fail = |error: String| Sample { error: Some(error), e2e: start.elapsed().as_secs_f64(), ..Sample::default() };
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return fail(format!("transport: {e}")),
    };
    match response.status().as_u16() {
        200 => {}
        429 => return Sample { rejected: true, e2e: start.elapsed().as_secs_f64(), ..Sample::default() },
        status => return fail(format!("status {status}: {}", response.text().await.unwrap_or_default())),
    }
    if body["stream"] != json!(true) {
        let value: Value = match response.json().await {
            Ok(v) => v,
            Err(e) => return fail(format!("body: {e}")),
        };
        let Some(tokens) = value["usage"]["completion_tokens"].as_u64() else {
            return fail(format!("no usage in {value}"));
        };
        return Sample { ok: true, e2e: start.elapsed().as_secs_f64(), completion_tokens: tokens, ..Sample::default() };
    }
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let (mut first, mut last, mut itl, mut tokens, mut done) = (None, None::<Instant>, Vec::new(), None, false);
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return fail(format!("stream: {e}")),
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(value) = serde_json::from_str::<Value>(data) else {
                return fail(format!("bad chunk {data}"));
            };
            if value.get("error").is_some() {
                return fail(format!("error chunk {data}"));
            }
            if let Some(n) = value["usage"]["completion_tokens"].as_u64() {
                tokens = Some(n);
            }
            if value["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
                let now = Instant::now();
                first.get_or_insert(now);
                if let Some(previous) = last {
                    itl.push(now.duration_since(previous).as_secs_f64());
                }
                last = Some(now);
            }
        }
    }
    let e2e = start.elapsed().as_secs_f64();
    let (true, Some(tokens)) = (done, tokens) else {
        return fail("stream ended without usage and [DONE]".into());
    };
    let ttft = first.map(|t| t.duration_since(start).as_secs_f64());
    let tpot = ttft.filter(|_| tokens > 1).map(|ttft| (e2e - ttft) / (tokens - 1) as f64);
    Sample { ok: true, e2e, ttft, tpot, itl, completion_tokens: tokens, ..Sample::default() }
}

fn percentiles(mut values: Vec<f64>) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    values.sort_by(f64::total_cmp);
    let at = |p: f64| {
        let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
        values[rank.clamp(1, values.len()) - 1] * 1e3
    };
    json!({ "p50_ms": at(50.0), "p90_ms": at(90.0), "p99_ms": at(99.0), "n": values.len() })
}

fn summarize(args: &LoadtestArgs, samples: &[Sample], wall: f64) -> Value {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.error.is_some()).collect();
    let tokens: u64 = ok.iter().map(|s| s.completion_tokens).sum();
    let first_errors: Vec<&str> = failed.iter().filter_map(|s| s.error.as_deref()).take(5).collect();
    json!({
        "requests": args.requests,
        "concurrency": args.concurrency,
        "stream": args.stream,
        "max_tokens": args.max_tokens,
        "sampling": { "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k },
        "succeeded": ok.len(),
        "failed": failed.len(),
        "rejected_429": samples.iter().filter(|s| s.rejected).count(),
        "first_errors": first_errors,
        "wall_s": wall,
        "requests_per_s": ok.len() as f64 / wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens as f64 / wall,
        "ttft": percentiles(ok.iter().filter_map(|s| s.ttft).collect()),
        "tpot": percentiles(ok.iter().filter_map(|s| s.tpot).collect()),
        "itl": percentiles(ok.iter().flat_map(|s| s.itl.iter().copied()).collect()),
        "e2e": percentiles(ok.iter().map(|s| s.e2e).collect()),
    })
}

fn print_table(report: &Value) {
    println!(
        "requests {} (concurrency {}, stream {}, max_tokens {}, sampling {})",
        report["requests"], report["concurrency"], report["stream"], report["max_tokens"], report["sampling"]
    );
    println!(
        "succeeded {}  failed {}  rejected (429) {}",
        report["succeeded"], report["failed"], report["rejected_429"]
    );
    println!(
        "wall {:.2} s  {:.1} req/s  {:.1} output tok/s ({} tokens)",
        report["wall_s"].as_f64().unwrap_or(0.0),
        report["requests_per_s"].as_f64().unwrap_or(0.0),
        report["output_tokens_per_s"].as_f64().unwrap_or(0.0),
        report["output_tokens"]
    );
    println!();
    println!("| metric | p50 ms | p90 ms | p99 ms | samples |");
    println!("|---|---:|---:|---:|---:|");
    for (name, key) in [("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e")] {
        let p = &report[key];
        if p.is_null() {
            println!("| {name} | n/a | n/a | n/a | 0 |");
        } else {
            let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
            println!("| {name} | {:.1} | {:.1} | {:.1} | {} |", f("p50_ms"), f("p90_ms"), f("p99_ms"), p["n"]);
        }
    }
    if let Some(rss) = report["server"]["peak_rss_bytes"].as_u64() {
        println!("\npeak server RSS (VmHWM): {:.1} MiB", rss as f64 / (1u64 << 20) as f64);
    }
    if let Some(code) = report["server"]["exit_code"].as_i64() {
        println!("server exit code after SIGTERM: {code}");
    }
    for error in report["first_errors"].as_array().into_iter().flatten() {
        println!("error: {}", error.as_str().unwrap_or_default());
    }
}
