//! Bad inputs, each with its status and OpenAI error envelope.

use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::common::{self, open_gate, GatedBackend, MODEL_ID};

const KEY: &str = "sk-test-key";

/// The expected status, error type and error param of one case.
type Expected = (u16, &'static str, Option<&'static str>);
/// (method, path, bearer key, body, expected).
type Case = (&'static str, &'static str, Option<&'static str>, Option<String>, Expected);

/// (method, path, bearer key, body) -> (status, error type, error param).
async fn check(
    server: &common::TestServer,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<String>,
    expected: Expected,
) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = server.client.request(method.clone(), server.url(path));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body.clone() {
        request = request.header("content-type", "application/json").body(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let what = format!("{method} {path} {body:?}");
    assert_eq!(status, expected.0, "{what}: {text}");
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
    let error = &value["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {text}");
    assert_eq!(error["type"], expected.1, "{what}: {text}");
    assert_eq!(error["param"].as_str(), expected.2, "{what}: {text}");
    assert!(error.as_object().unwrap().contains_key("code"), "{what}: {text}");
}

fn completion(extra: Value) -> Option<String> {
    let mut body = json!({ "model": MODEL_ID, "prompt": "Hello", "max_tokens": 4 });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            body.as_object_mut().unwrap().remove(k);
        } else {
            body[k] = v.clone();
        }
    }
    Some(body.to_string())
}

fn chat(messages: Value) -> Option<String> {
    Some(json!({ "model": MODEL_ID, "messages": messages, "max_tokens": 4 }).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_status_and_envelope() {
    let mut config = common::config();
    config.api_key = Some(KEY.into());
    config.max_body_bytes = 4096;
    let server = common::start(config).await;
    let k = Some(KEY);
    let bad = "invalid_request_error";
    let c = "/v1/completions";
    let ctx = common::model().config.max_position_embeddings;
    let cases: Vec<Case> = vec![
        ("POST", c, None, completion(json!({})), (401, "authentication_error", None)),
        ("POST", c, Some("sk-wrong"), completion(json!({})), (401, "authentication_error", None)),
        ("GET", "/v1/models", None, None, (401, "authentication_error", None)),
        ("POST", c, k, Some("{".into()), (400, bad, None)),
        ("POST", c, k, Some("[]".into()), (400, bad, None)),
        ("POST", c, k, Some("".into()), (400, bad, None)),
        ("POST", c, k, completion(json!({ "prompt": null })), (400, bad, None)),
        ("POST", c, k, completion(json!({ "model": "gpt-4" })), (400, bad, Some("model"))),
        ("POST", c, k, completion(json!({ "prompt": "" })), (400, bad, Some("prompt"))),
        ("POST", c, k, completion(json!({ "prompt": ["a", "b"] })), (400, bad, Some("prompt"))),
        ("POST", c, k, completion(json!({ "max_tokens": 0 })), (400, bad, Some("max_tokens"))),
        ("POST", c, k, completion(json!({ "max_tokens": ctx + 1 })), (400, bad, Some("max_tokens"))),
        ("POST", c, k, completion(json!({ "max_tokens": ctx })), (400, bad, Some("max_tokens"))),
        ("POST", c, k, completion(json!({ "max_tokens": -1 })), (400, bad, None)),
        ("POST", c, k, completion(json!({ "max_tokens": 1.5 })), (400, bad, None)),
        ("POST", c, k, completion(json!({ "max_tokens": 1e300 })), (400, bad, None)),
        ("POST", c, k, completion(json!({ "max_tokens": "4" })), (400, bad, None)),
        ("POST", c, k, completion(json!({ "temperature": -0.1 })), (400, bad, Some("temperature"))),
        ("POST", c, k, completion(json!({ "temperature": 2.5 })), (400, bad, Some("temperature"))),
        ("POST", c, k, completion(json!({ "top_p": 0 })), (400, bad, Some("top_p"))),
        ("POST", c, k, completion(json!({ "top_p": 1.5 })), (400, bad, Some("top_p"))),
        ("POST", c, k, completion(json!({ "top_k": -3 })), (400, bad, None)),
        ("POST", c, k, completion(json!({ "n": 2 })), (400, bad, Some("n"))),
        ("POST", c, k, completion(json!({ "stop": ["a", "b", "c", "d", "e"] })), (400, bad, Some("stop"))),
        ("POST", c, k, completion(json!({ "stop": [""] })), (400, bad, Some("stop"))),
        ("POST", c, k, completion(json!({ "stop": 5 })), (400, bad, None)),
        ("POST", c, k, completion(json!({ "echo": true })), (400, bad, Some("echo"))),
        ("POST", c, k, completion(json!({ "logprobs": 3 })), (400, bad, Some("logprobs"))),
        ("POST", c, k, completion(json!({ "presence_penalty": 0.5 })), (400, bad, Some("presence_penalty"))),
        ("POST", c, k, completion(json!({ "device_preference": "tpu" })), (400, bad, Some("device_preference"))),
        ("POST", c, k, completion(json!({ "precision": "int4" })), (400, bad, Some("precision"))),
        (
            "POST",
            c,
            k,
            completion(json!({ "quantization_preference": "q4_0" })),
            (400, bad, Some("quantization_preference")),
        ),
        ("POST", c, k, completion(json!({ "mixed_precision": "yes" })), (400, bad, None)),
        ("POST", "/v1/chat/completions", k, chat(json!([])), (400, bad, Some("messages"))),
        (
            "POST",
            "/v1/chat/completions",
            k,
            chat(json!([{ "role": "tool", "content": "x" }])),
            (400, bad, Some("messages")),
        ),
        (
            "POST",
            "/v1/chat/completions",
            k,
            chat(json!([{ "role": "user", "content": [{ "type": "image_url" }] }])),
            (400, bad, Some("messages")),
        ),
        ("POST", "/v1/chat/completions", k, chat(json!("hello")), (400, bad, None)),
        ("POST", c, k, Some(format!("{{\"prompt\": \"{}\"}}", "x".repeat(5000))), (413, bad, None)),
        ("GET", "/nope", k, None, (404, bad, None)),
        ("GET", "/v1/nope", k, None, (404, bad, None)),
        ("GET", c, k, None, (405, bad, None)),
        ("DELETE", "/v1/chat/completions", k, None, (405, bad, None)),
        ("POST", "/health", None, None, (405, bad, None)),
    ];
    for (method, path, key, body, expected) in cases {
        check(&server, method, path, key, body, expected).await;
    }
    // Open endpoints need no key, and the key is accepted where required.
    for path in ["/health", "/live", "/metrics"] {
        assert_eq!(server.client.get(server.url(path)).send().await.unwrap().status(), 200, "{path}");
    }
    let ok =
        server.client.post(server.url(c)).bearer_auth(KEY).body(completion(json!({})).unwrap()).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let metrics = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(common::metric_value(&metrics, "bitnet_requests_rejected_total{reason=\"unauthorized\"}"), Some(3.0));
    assert_eq!(
        common::metric_value(&metrics, "bitnet_requests_rejected_total{reason=\"payload_too_large\"}"),
        Some(1.0)
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_in_flight_requests_get_429_with_retry_after() {
    let (backend, gate) = GatedBackend::new();
    let mut config = common::config();
    config.max_in_flight = 2;
    let server = common::start_with(Box::new(backend), config).await;
    let body = json!({ "model": MODEL_ID, "prompt": "Hello", "max_tokens": 3, "temperature": 0 });
    // Two requests held by the closed gate.
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (client, url, body) = (server.client.clone(), server.url("/v1/completions"), body.clone());
            tokio::spawn(async move { client.post(url).json(&body).send().await.unwrap().status().as_u16() })
        })
        .collect();
    server.wait_until(|s| s.metric("bitnet_num_requests_in_flight"), 2.0).await;
    let response = server.client.post(server.url("/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let value: Value = response.json().await.unwrap();
    assert_eq!(value["error"]["type"], "rate_limit_error");
    assert_eq!(value["error"]["code"], "rate_limit_exceeded");
    open_gate(&gate);
    let statuses: Vec<u16> = join_all(held).await.into_iter().map(Result::unwrap).collect();
    assert_eq!(statuses, [200, 200]);
    assert_eq!(server.metric("bitnet_requests_rejected_total{reason=\"too_many_requests\"}").await, 1.0);
    // Capacity is back once they are answered.
    let (status, _) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_timeout_get_504() {
    let (backend, gate) = GatedBackend::new();
    let mut config = common::config();
    config.request_timeout = std::time::Duration::from_millis(200);
    let server = common::start_with(Box::new(backend), config).await;
    let body = json!({ "model": MODEL_ID, "prompt": "Hello", "max_tokens": 3 });
    let (status, value) = server.post("/v1/completions", &body).await;
    assert_eq!((status, value["error"]["type"].as_str()), (504, Some("timeout_error")), "{value}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, chunks) = server.post_stream("/v1/completions", &streamed).await;
    assert_eq!(status, 200);
    let last: Value = serde_json::from_str(chunks.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "timeout_error", "{chunks:?}");
    open_gate(&gate);
    server.wait_until(|s| s.metric("bitnet_requests_cancelled_total"), 2.0).await;
    server.shutdown().await.unwrap();
}

/// A request whose client gave up while its step ran, and which that step
/// finished (here with a stop token), is cancelled: it is not a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_finished_after_its_client_left_counts_as_cancelled() {
    let (backend, gate) = GatedBackend::stopping_at_once();
    let mut config = common::config();
    config.request_timeout = std::time::Duration::from_millis(200);
    let server = common::start_with(Box::new(backend), config).await;
    let body = json!({ "model": MODEL_ID, "prompt": "Hello", "max_tokens": 3, "temperature": 0 });
    let (status, value) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 504, "{value}");
    open_gate(&gate);
    server.wait_until(|s| s.metric("bitnet_requests_cancelled_total"), 1.0).await;
    assert_eq!(server.metric("bitnet_request_success_total{finish_reason=\"stop\"}").await, 0.0);
    // The same backend with the client still there: the stop token ends it.
    let (status, value) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{value}");
    assert_eq!(value["choices"][0]["finish_reason"], "stop", "{value}");
    assert_eq!(server.metric("bitnet_request_success_total{finish_reason=\"stop\"}").await, 1.0);
    server.shutdown().await.unwrap();
}
