//! Continuous batching: concurrent requests equal the same requests run
//! alone, streams equal non-streamed answers, a failing sequence fails alone,
//! and a client that goes away frees its sequence.

use std::sync::Arc;

use bitnet_inference::{Backend, BackendError, BackendInfo, ReferenceBackend, SeqId, StepInput};
use bitnet_models::BitNetConfig;
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::common::{self, completion_prompt_tokens, model, run_alone, stream_text, MODEL_ID};

fn prompt(i: usize) -> String {
    format!("Request number {i}: the quick brown fox {}", "jumps ".repeat(i % 5))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_batch_and_equal_requests_run_alone() {
    let server = common::start(common::config()).await;
    let requests = (0..128).map(|i| {
        let body = json!({ "model": MODEL_ID, "prompt": prompt(i), "max_tokens": 4 + i % 9, "temperature": 0 });
        let server = &server;
        async move { server.post("/v1/completions", &body).await }
    });
    let responses = join_all(requests).await;
    let mut largest_batch = 0;
    for (i, (status, body)) in responses.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {body}");
        let max_tokens = 4 + i % 9;
        let tokens = completion_prompt_tokens(&prompt(i));
        let (text, reason, completion_tokens) = run_alone(&tokens, max_tokens);
        assert_eq!(body["choices"][0]["text"], text, "request {i}");
        assert_eq!(body["choices"][0]["finish_reason"], reason, "request {i}");
        assert_eq!(body["usage"]["completion_tokens"], completion_tokens, "request {i}");
        assert_eq!(body["usage"]["prompt_tokens"], tokens.len(), "request {i}");
        assert_eq!(body["usage"]["total_tokens"], tokens.len() + completion_tokens, "request {i}");
        largest_batch = largest_batch.max(body["bitnet"]["batch_size"].as_u64().unwrap());
    }
    assert!(largest_batch > 1, "no request ran in a batch of more than one");
    assert_eq!(
        server.metric("bitnet_request_success_total{finish_reason=\"length\"}").await
            + server.metric("bitnet_request_success_total{finish_reason=\"stop\"}").await,
        128.0
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_batch_size_one_gives_the_same_answers() {
    let mut config = common::config();
    config.max_batch_size = 1;
    let server = common::start(config).await;
    let requests = (0..6).map(|i| {
        let body = json!({ "model": MODEL_ID, "prompt": prompt(i), "max_tokens": 6, "temperature": 0 });
        let server = &server;
        async move { server.post("/v1/completions", &body).await }
    });
    for (i, (status, body)) in join_all(requests).await.into_iter().enumerate() {
        assert_eq!(status, 200);
        assert_eq!(body["bitnet"]["batch_size"], 1);
        let (text, _, _) = run_alone(&completion_prompt_tokens(&prompt(i)), 6);
        assert_eq!(body["choices"][0]["text"], text);
    }
    server.shutdown().await.unwrap();
}

/// A token budget smaller than the prompts: prefill runs in chunks, decodes
/// take turns, and the answers are unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_prefill_under_a_small_token_budget_gives_the_same_answers() {
    let mut config = common::config();
    config.max_batch_size = 4;
    config.max_batch_tokens = 3;
    let server = common::start(config).await;
    let requests = (0..8).map(|i| {
        let body = json!({ "model": MODEL_ID, "prompt": prompt(i), "max_tokens": 5, "temperature": 0 });
        let server = &server;
        async move { server.post("/v1/completions", &body).await }
    });
    for (i, (status, body)) in join_all(requests).await.into_iter().enumerate() {
        assert_eq!(status, 200, "{body}");
        let tokens = completion_prompt_tokens(&prompt(i));
        assert!(tokens.len() > 3, "prompt {i} fits one chunk");
        let (text, reason, _) = run_alone(&tokens, 5);
        assert_eq!(
            (body["choices"][0]["text"].as_str(), body["choices"][0]["finish_reason"].as_str()),
            (Some(text.as_str()), Some(reason))
        );
    }
    server.shutdown().await.unwrap();
}

/// Streams (completion and chat, with and without stop strings) against the
/// same request not streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_text_equals_non_streamed_text() {
    let server = common::start(common::config()).await;
    // Some prompts end early (a stop token); take the first prompt with a
    // long greedy output, to put a stop string in it.
    let mut long = None;
    for i in 0..20 {
        let body = json!({ "model": MODEL_ID, "prompt": prompt(i), "max_tokens": 40, "temperature": 0 });
        let (_, full) = server.post("/v1/completions", &body).await;
        let text = full["choices"][0]["text"].as_str().unwrap().to_owned();
        if text.chars().count() > 12 {
            long = Some((body, text));
            break;
        }
    }
    let (plain, full_text) = long.expect("a prompt with a long greedy output");
    let other = json!({ "model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0 });
    // A stop string that straddles a token boundary of the greedy output: the
    // stream must hold its first character back until it knows.
    let tokenizer = &model().tokenizer;
    let plain_prompt = plain["prompt"].as_str().unwrap();
    let tokens = common::greedy_tokens(&completion_prompt_tokens(plain_prompt), 40);
    let stop = (3..tokens.len())
        .find_map(|k| {
            let before = tokenizer.decode(&tokens[..k], true).ok()?;
            let after = tokenizer.decode(&tokens[..k + 1], true).ok()?;
            let last = before.chars().last()?;
            let next = after.strip_prefix(before.as_str())?.chars().next()?;
            let stop = format!("{last}{next}");
            (last != '\u{FFFD}' && next != '\u{FFFD}' && !before.contains(&stop)).then_some(stop)
        })
        .expect("a token boundary to put a stop string on");
    let expected_stopped = &full_text[..full_text.find(&stop).unwrap()];

    let chat = |extra: Value| {
        let mut body = json!({
            "model": MODEL_ID,
            "messages": [{ "role": "system", "content": "Be brief." }, { "role": "user", "content": "Tell me a story" }],
            "max_tokens": 30, "temperature": 0,
        });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let with = |body: &Value, extra: Value| {
        let mut body = body.clone();
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let cases = [
        ("/v1/completions", plain.clone()),
        ("/v1/completions", other),
        ("/v1/completions", with(&plain, json!({ "stop": [stop.clone(), "\u{1F600}never"] }))),
        ("/v1/chat/completions", chat(json!({}))),
        ("/v1/chat/completions", chat(json!({ "stop": stop.clone() }))),
    ];
    for (path, body) in cases {
        let (status, whole) = server.post(path, &body).await;
        assert_eq!(status, 200, "{whole}");
        let whole_text =
            whole["choices"][0]["text"].as_str().or_else(|| whole["choices"][0]["message"]["content"].as_str());
        let (status, chunks) = server.post_stream(path, &with(&body, json!({ "stream": true }))).await;
        assert_eq!(status, 200);
        let (streamed, finish) = stream_text(&chunks);
        assert_eq!(Some(streamed.as_str()), whole_text, "{path} {body}");
        assert_eq!(finish.as_deref(), whole["choices"][0]["finish_reason"].as_str());
    }
    let (_, stopped) = server.post("/v1/completions", &with(&plain, json!({ "stop": stop }))).await;
    assert_eq!(stopped["choices"][0]["text"], expected_stopped);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    server.shutdown().await.unwrap();
}

/// Fails every step whose prefill contains `poison`, alone or batched.
#[derive(Debug)]
struct PoisonedBackend {
    inner: ReferenceBackend,
    poison: u32,
}

impl Backend for PoisonedBackend {
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
        if batch.iter().any(|input| input.tokens.len() > 1 && input.tokens.contains(&self.poison)) {
            return Err(BackendError::Device("injected fault".into()));
        }
        self.inner.step(batch)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sequence_fails_alone() {
    let good: Vec<String> = (0..8).map(prompt).collect();
    let bad_prompt = "zzzz qqqq";
    let good_tokens: Vec<u32> = good.iter().flat_map(|p| completion_prompt_tokens(p)).collect();
    let poison =
        *completion_prompt_tokens(bad_prompt).iter().find(|t| !good_tokens.contains(t)).expect("a distinct token");
    let backend = PoisonedBackend { inner: ReferenceBackend::new(model()), poison };
    let server = common::start_with(Box::new(backend), common::config()).await;

    let mut prompts = good.clone();
    prompts.insert(3, bad_prompt.to_owned());
    let requests = prompts.iter().map(|p| {
        let body = json!({ "model": MODEL_ID, "prompt": p, "max_tokens": 8, "temperature": 0 });
        let server = &server;
        async move { server.post("/v1/completions", &body).await }
    });
    for (p, (status, body)) in prompts.iter().zip(join_all(requests).await) {
        if p == bad_prompt {
            assert_eq!(status, 500, "{body}");
            assert_eq!(body["error"]["type"], "server_error");
            assert!(!body["error"]["message"].as_str().unwrap().contains("injected"), "detail leaked: {body}");
        } else {
            assert_eq!(status, 200, "{body}");
            let (text, _, _) = run_alone(&completion_prompt_tokens(p), 8);
            assert_eq!(body["choices"][0]["text"], text);
        }
    }
    assert_eq!(server.metric("bitnet_requests_failed_total").await, 1.0);
    // The server goes on serving.
    let (status, _) =
        server.post("/v1/completions", &json!({ "model": MODEL_ID, "prompt": "again", "max_tokens": 2 })).await;
    assert_eq!(status, 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_is_cancelled() {
    let server = Arc::new(common::start(common::config()).await);
    let long = json!({ "model": MODEL_ID, "prompt": "Hi", "max_tokens": 500, "temperature": 0 });

    // Non-streamed: the handler's future is dropped when the connection closes.
    let request = {
        let (server, long) = (server.clone(), long.clone());
        tokio::spawn(async move { server.client.post(server.url("/v1/completions")).json(&long).send().await })
    };
    server.wait_until(|s| s.metric("bitnet_num_requests_running"), 1.0).await;
    request.abort();
    let _ = request.await;
    server.wait_until(|s| s.metric("bitnet_requests_cancelled_total"), 1.0).await;
    server.wait_until(|s| s.metric("bitnet_num_requests_running"), 0.0).await;

    // Streamed: dropping the response body drops the SSE stream.
    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    let mut response = server.client.post(server.url("/v1/completions")).json(&streamed).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().expect("a first chunk");
    assert!(first.starts_with(b"data: "));
    drop(response);
    server.wait_until(|s| s.metric("bitnet_requests_cancelled_total"), 2.0).await;
    server.wait_until(|s| s.metric("bitnet_num_requests_running"), 0.0).await;
    let generated = server.metric("bitnet_generation_tokens_total").await;
    assert!(generated < 1000.0, "cancelled requests ran to the end ({generated} tokens)");
    assert_eq!(server.metric("bitnet_request_success_total{finish_reason=\"length\"}").await, 0.0);
    Arc::try_unwrap(server).unwrap().shutdown().await.unwrap();
}
