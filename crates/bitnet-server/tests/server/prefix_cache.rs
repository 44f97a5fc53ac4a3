//! The prefix cache through the HTTP API: requests that begin with an
//! earlier request's tokens copy their KV cache, say so in
//! `usage.prompt_tokens_details.cached_tokens`, and answer exactly what
//! they answer without it.

use bitnet_inference::{Engine, EngineConfig, ReferenceBackend};
use futures_util::future::join_all;
use serde_json::json;

use crate::common::{self, completion_prompt_tokens, model, run_alone, MODEL_ID};

fn cached_engine(tokens: usize) -> Engine {
    let settings = EngineConfig { prefix_cache_tokens: tokens, ..EngineConfig::default() };
    Engine::cpu_only_with(Box::new(ReferenceBackend::new(model())), settings)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[tokio::test]
async fn a_shared_beginning_is_copied_and_changes_no_answer() {
    let server = common::start_engine(cached_engine(4096), common::config()).await;
    let first = "A shared system prompt that many requests begin with. Then the first question";
    let second = "A shared system prompt that many requests begin with. And a second one";
    let (first_tokens, second_tokens) = (completion_prompt_tokens(first), completion_prompt_tokens(second));
    let mut cached_total = 0;
    for (i, (prompt, tokens)) in
        [(first, &first_tokens), (second, &second_tokens), (first, &first_tokens)].into_iter().enumerate()
    {
        let body = json!({ "model": MODEL_ID, "prompt": prompt, "max_tokens": 5, "temperature": 0 });
        let (status, body) = server.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{body}");
        let (text, reason, completion_tokens) = run_alone(tokens, 5);
        assert_eq!(body["choices"][0]["text"], text, "request {i}");
        assert_eq!(body["choices"][0]["finish_reason"], reason, "request {i}");
        assert_eq!(body["usage"]["prompt_tokens"], tokens.len());
        assert_eq!(body["usage"]["completion_tokens"], completion_tokens);
        // Nothing before the first; the shared beginning for the second; the
        // whole prompt but its last token for the third, a repeat of the first.
        let expected = match i {
            0 => 0,
            1 => common_prefix(&first_tokens, &second_tokens),
            _ => first_tokens.len() - 1,
        };
        assert!(expected > 0 || i == 0);
        assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], expected, "request {i}");
        cached_total += expected;
    }
    let metrics = server.metrics_text().await;
    assert_eq!(common::metric_value(&metrics, "bitnet_prompt_tokens_cached_total"), Some(cached_total as f64));
    assert_eq!(common::metric_value(&metrics, "bitnet_prefix_cache_hits_total"), Some(2.0));
    assert!(common::metric_value(&metrics, "bitnet_prefix_cache_tokens").is_some_and(|t| t > 0.0), "{metrics}");
    server.shutdown().await.unwrap();
}

/// Many concurrent requests sharing beginnings, on a cache small enough to
/// evict: each answer equals the prompt's run alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_with_shared_beginnings_equal_requests_run_alone() {
    let server = common::start_engine(cached_engine(200), common::config()).await;
    let prompt =
        |i: usize| format!("Shared beginning number {}: the quick brown fox {}", i % 3, "jumps ".repeat(i % 4));
    // Two waves, so the second finds the first's entries.
    for wave in 0..2 {
        let requests = (0..24).map(|i| {
            let body = json!({ "model": MODEL_ID, "prompt": prompt(i), "max_tokens": 3 + i % 4, "temperature": 0 });
            let server = &server;
            async move { server.post("/v1/completions", &body).await }
        });
        for (i, (status, body)) in join_all(requests).await.into_iter().enumerate() {
            assert_eq!(status, 200, "wave {wave} request {i}: {body}");
            let (text, _, completion_tokens) = run_alone(&completion_prompt_tokens(&prompt(i)), 3 + i % 4);
            assert_eq!(body["choices"][0]["text"], text, "wave {wave} request {i}");
            assert_eq!(body["usage"]["completion_tokens"], completion_tokens, "wave {wave} request {i}");
        }
    }
    let metrics = server.metrics_text().await;
    assert!(common::metric_value(&metrics, "bitnet_prefix_cache_hits_total").is_some_and(|h| h >= 24.0), "{metrics}");
    assert!(common::metric_value(&metrics, "bitnet_prefix_cache_tokens").is_some_and(|t| t <= 200.0), "{metrics}");
    server.shutdown().await.unwrap();
}
