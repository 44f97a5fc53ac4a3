//! Starting a real server on 127.0.0.1:0 with an injected backend, and
//! talking HTTP to it.

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use bitnet_inference::{
    generate, Backend, BackendError, BackendInfo, GenerationConfig, ReferenceBackend, SamplingConfig, SeqId, StepInput,
    StopReason,
};
use bitnet_models::synthetic::{self, Preset};
use bitnet_models::{BitNetConfig, BitNetModel, FloatDType, FloatTensor};
use bitnet_server::server::{serve, serve_with_loader, ServeError, ServerConfig};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const MODEL_ID: &str = "bitnet-test";

/// The tiny synthetic model (seed 42) with an untied random output head.
///
/// The synthetic model's tied head mostly predicts the token it was just
/// fed, so its greedy output repeats one token; a scheduler feeding the wrong
/// token back would still match a run alone. With a random head each next
/// token is a scrambled function of what was fed, so such bugs show.
pub fn model() -> Arc<BitNetModel> {
    static MODEL: OnceLock<Arc<BitNetModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let mut model = synthetic::generate(Preset::Tiny, 42).expect("synthetic model");
            let (vocab, hidden) = (model.config.vocab_size, model.config.hidden_size);
            let mut state = 0x2545_F491_4F6C_DD1Du64;
            let head: Vec<f32> = (0..vocab * hidden)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
                })
                .collect();
            let head = FloatTensor::from_f32("output.weight", vocab, hidden, &head, FloatDType::F16).expect("head");
            model.output = Some(head);
            Arc::new(model)
        })
        .clone()
}

pub fn config() -> ServerConfig {
    ServerConfig::new(MODEL_ID)
}

#[derive(Debug)]
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

/// Starts the reference backend on the tiny model and waits until ready.
pub async fn start(config: ServerConfig) -> TestServer {
    start_with(Box::new(ReferenceBackend::new(model())), config).await
}

pub async fn start_with(backend: Box<dyn Backend>, config: ServerConfig) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    let (tx, rx) = oneshot::channel::<()>();
    let tokenizer = model().tokenizer.clone();
    let task = tokio::spawn(serve(listener, backend, tokenizer, config, async move {
        let _ = rx.await;
    }));
    let server = TestServer { base, client: reqwest::Client::new(), shutdown: Some(tx), task };
    server.wait_until(|s| s.get_status("/health"), 200).await;
    server
}

/// Starts a server on a ready-made engine (for GPU fallback tests).
pub async fn start_engine(engine: bitnet_inference::Engine, config: ServerConfig) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    let (tx, rx) = oneshot::channel::<()>();
    let tokenizer = model().tokenizer.clone();
    let load = move || Ok((engine, tokenizer));
    let task = tokio::spawn(serve_with_loader(listener, config, load, async move {
        let _ = rx.await;
    }));
    let server = TestServer { base, client: reqwest::Client::new(), shutdown: Some(tx), task };
    server.wait_until(|s| s.get_status("/health"), 200).await;
    server
}

impl TestServer {
    /// The whole `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        self.client.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get_status(&self, path: &str) -> u16 {
        match self.client.get(self.url(path)).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// Polls until `probe` returns `want`; panics after 60 s.
    pub async fn wait_until<'a, F, Fut, T>(&'a self, probe: F, want: T)
    where
        F: Fn(&'a Self) -> Fut,
        Fut: std::future::Future<Output = T>,
        T: PartialEq + std::fmt::Debug,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let got = probe(self).await;
            if got == want {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "gave up waiting: got {got:?}, want {want:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// One sample of `/metrics` (a metric without labels).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.client.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap();
        metric_value(&text, name).unwrap_or_else(|| panic!("metric {name} missing"))
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self.client.post(self.url(path)).json(body).send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
    }

    /// A streamed request: every `data:` payload in order.
    pub async fn post_stream(&self, path: &str, body: &Value) -> (u16, Vec<String>) {
        let response = self.client.post(self.url(path)).json(body).send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, sse_data(&text))
    }

    /// Triggers the injected shutdown and waits for `serve` to return.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await.expect("server task")
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn join(self) -> Result<(), ServeError> {
        self.task.await.expect("server task")
    }
}

pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| {
            event
                .lines()
                .filter_map(|l| l.strip_prefix("data:").map(|d| d.strip_prefix(' ').unwrap_or(d)))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

/// The concatenated text of streamed chunks (completion or chat), and the finish reason.
pub fn stream_text(chunks: &[String]) -> (String, Option<String>) {
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"), "stream must end with [DONE]: {chunks:?}");
    let mut text = String::new();
    let mut finish = None;
    for chunk in &chunks[..chunks.len() - 1] {
        let value: Value = serde_json::from_str(chunk).unwrap_or_else(|e| panic!("chunk not JSON ({e}): {chunk}"));
        for choice in value["choices"].as_array().expect("choices") {
            let piece = choice["text"].as_str().or_else(|| choice["delta"]["content"].as_str()).unwrap_or("");
            text.push_str(piece);
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = Some(reason.to_owned());
            }
        }
    }
    (text, finish)
}

/// What the library's `generate` over `ReferenceForward` makes of a prompt
/// run alone: (text, finish_reason, completion_tokens).
pub fn run_alone(prompt_tokens: &[u32], max_tokens: usize) -> (String, &'static str, usize) {
    let model = model();
    let tokenizer = &model.tokenizer;
    let stop_tokens = [tokenizer.eos_id(), tokenizer.eot_id()].into_iter().flatten().collect();
    let config = GenerationConfig { max_new_tokens: max_tokens, sampling: SamplingConfig::greedy(), stop_tokens };
    let mut backend = ReferenceBackend::new(model.clone());
    let out = generate(&mut backend, prompt_tokens, &config, |_| {}).expect("generate");
    let shown = match out.stop_reason {
        StopReason::Stop => &out.tokens[..out.tokens.len() - 1],
        _ => &out.tokens[..],
    };
    let text = model.tokenizer.decode(shown, true).expect("decode");
    let reason = match out.stop_reason {
        StopReason::Stop => "stop",
        _ => "length",
    };
    (text, reason, out.tokens.len())
}

/// The greedy tokens of a run alone (stop token included).
pub fn greedy_tokens(prompt_tokens: &[u32], max_tokens: usize) -> Vec<u32> {
    let model = model();
    let tokenizer = &model.tokenizer;
    let stop_tokens = [tokenizer.eos_id(), tokenizer.eot_id()].into_iter().flatten().collect();
    let config = GenerationConfig { max_new_tokens: max_tokens, sampling: SamplingConfig::greedy(), stop_tokens };
    let mut backend = ReferenceBackend::new(model.clone());
    generate(&mut backend, prompt_tokens, &config, |_| {}).expect("generate").tokens
}

pub fn completion_prompt_tokens(prompt: &str) -> Vec<u32> {
    let tokenizer = &model().tokenizer;
    tokenizer.encode(prompt, tokenizer.add_bos()).expect("encode")
}

/// Wraps a backend and blocks every step until the gate is opened.
#[derive(Debug)]
pub struct GatedBackend {
    pub inner: ReferenceBackend,
    pub gate: Arc<(Mutex<bool>, Condvar)>,
    /// When set, every step's logits put this token first (by a margin of 100).
    pub favour: Option<u32>,
}

impl GatedBackend {
    pub fn new() -> (Self, Arc<(Mutex<bool>, Condvar)>) {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        (Self { inner: ReferenceBackend::new(model()), gate: gate.clone(), favour: None }, gate)
    }

    /// A gated backend whose greedy choice is always the end-of-sequence
    /// token, so every request ends at its first generated token.
    pub fn stopping_at_once() -> (Self, Arc<(Mutex<bool>, Condvar)>) {
        let (mut backend, gate) = Self::new();
        backend.favour = Some(model().tokenizer.eos_id().expect("the test model has an end-of-sequence token"));
        (backend, gate)
    }
}

pub fn open_gate(gate: &(Mutex<bool>, Condvar)) {
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
}

impl Backend for GatedBackend {
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
    fn step(&mut self, batch: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        let (open, cv) = &*self.gate;
        let _open = cv.wait_while(open.lock().unwrap(), |open| !*open).unwrap();
        let mut logits = self.inner.step(batch)?;
        if let Some(token) = self.favour {
            for row in &mut logits {
                let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                row[token as usize] = top + 100.0;
            }
        }
        Ok(logits)
    }
}
