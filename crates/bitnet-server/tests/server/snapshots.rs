//! JSON response shapes as insta snapshots, volatile fields redacted.

use serde_json::{json, Value};

use crate::common::{self, MODEL_ID};

/// Replaces ids, timestamps, timings, machine facts and what the model
/// generated (the synthetic model may change; the equality of texts is
/// tested elsewhere) with placeholders, so the snapshots pin the shapes.
fn redact(mut value: Value) -> Value {
    fn walk(value: &mut Value, key: Option<&str>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    walk(v, Some(k));
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| walk(v, key)),
            other => {
                let placeholder = match key {
                    Some("id") if other.as_str().is_some_and(|s| s.contains("cmpl-")) => "[id]",
                    Some("created") => "[created]",
                    Some("queue_ms" | "compute_ms") => "[ms]",
                    Some("fallback_ms") if other.as_f64() != Some(0.0) => "[ms]",
                    Some("batch_id") => "[batch_id]",
                    Some("text" | "content") if other.as_str().is_some_and(|s| !s.is_empty()) => "[generated]",
                    Some("completion_tokens" | "total_tokens") => "[count]",
                    Some("finish_reason") if !other.is_null() => "[finish_reason]",
                    Some("logical_cores" | "total_memory_bytes" | "available_memory_bytes" | "arch") => "[machine]",
                    _ => return,
                };
                *other = Value::String(placeholder.into());
            }
        }
    }
    walk(&mut value, None);
    if let Some(features) = value.pointer_mut("/cpu/features") {
        *features = json!("[machine]");
    }
    // Whether this machine has a CUDA driver and GPUs is a machine fact too.
    for pointer in ["/cuda", "/gpus"] {
        if let Some(v) = value.pointer_mut(pointer) {
            *v = json!("[machine]");
        }
    }
    value
}

fn snapshot(name: &str, value: Value) {
    insta::with_settings!({ snapshot_path => "../snapshots", prepend_module_to_snapshot => false }, {
        insta::assert_json_snapshot!(name, redact(value));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_shapes() {
    let server = common::start(common::config()).await;
    let (_, completion) = server
        .post("/v1/completions", &json!({ "model": MODEL_ID, "prompt": "Hello", "max_tokens": 5, "temperature": 0 }))
        .await;
    snapshot("completion", completion);

    let chat = json!({
        "model": MODEL_ID,
        "messages": [{ "role": "user", "content": "What is 2 + 2?" }],
        "max_tokens": 5, "temperature": 0, "device_preference": "gpu",
    });
    let (_, response) = server.post("/v1/chat/completions", &chat).await;
    snapshot("chat_completion_gpu_fallback", response);

    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["max_tokens"] = json!(2);
    streamed["stream_options"] = json!({ "include_usage": true });
    let (_, chunks) = server.post_stream("/v1/chat/completions", &streamed).await;
    let chunks: Vec<Value> =
        chunks.iter().map(|c| serde_json::from_str(c).unwrap_or_else(|_| Value::String(c.clone()))).collect();
    let mut chunks: Vec<Value> = chunks.into_iter().map(redact).collect();
    // How many text chunks a stream has depends on the model's output.
    chunks.dedup();
    snapshot("chat_stream_chunks", Value::Array(chunks));

    let models: Value = server.client.get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    snapshot("models", models);
    let devices: Value = server.client.get(server.url("/v1/devices")).send().await.unwrap().json().await.unwrap();
    snapshot("devices", devices);
    let (_, error) = server.post("/v1/completions", &json!({ "model": "other", "prompt": "x" })).await;
    snapshot("error_unknown_model", error);
    server.shutdown().await.unwrap();
}
