//! Random request bodies, valid and not, in batches that run together: every
//! one gets a well-formed answer (200 with a completion, or a 4xx with the
//! error envelope), never a 5xx, and the server keeps serving.

use futures_util::future::join_all;
use serde_json::{json, Map, Value};

use crate::common::{self, sse_data, MODEL_ID};

/// xorshift64*: a fixed seed, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }
}

/// A value of any JSON type, often an odd one.
fn any_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 1 { 7 } else { 9 }) {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 => json!(rng.pick(&[0i64, 1, -1, 2, 7, 64, 511, 512, 513, 100_000, i64::MAX, i64::MIN])),
        3 => json!(rng.pick(&[0.0f64, -0.0, 0.5, 1.0, 1.5, 2.0, -1.0, 1e-30, 1e30, 1e308, f64::MIN_POSITIVE])),
        4 => json!(rng.pick(&["", "a", "Hello", "\u{1F600}", "\u{0}", "  ", "a\nb", "\u{FFFD}\u{200B}x"])),
        5 => json!("x ".repeat(rng.below(300))),
        6 => json!(rng.next()),
        7 => Value::Array((0..rng.below(4)).map(|_| any_value(rng, depth + 1)).collect()),
        _ => {
            let keys = ["type", "text", "role", "content", "include_usage", "x"];
            Value::Object((0..rng.below(4)).map(|_| (rng.pick(&keys).to_owned(), any_value(rng, depth + 1))).collect())
        }
    }
}

/// A value for `key` that is usually of the right kind and sometimes not.
fn value_for(rng: &mut Rng, key: &str, chat: bool) -> Value {
    if rng.chance(8) {
        return any_value(rng, 0);
    }
    match key {
        "model" => json!(if rng.chance(90) { MODEL_ID } else { "gpt-4" }),
        "prompt" => json!(rng.pick(&["Hello", "1+1=", "\u{1F600} and more", "a b c d e f g", "z"])),
        "messages" => {
            let roles = ["system", "user", "assistant", "tool", "developer"];
            let n = if chat { 1 + rng.below(3) } else { rng.below(3) };
            Value::Array(
                (0..n)
                    .map(|_| {
                        let content = if rng.chance(80) {
                            json!(rng.pick(&["Hi", "count by 2 from 4:", "", "\u{1F600}"]))
                        } else {
                            json!([{ "type": "text", "text": "part" }, { "type": "text", "text": "two" }])
                        };
                        json!({ "role": rng.pick(&roles), "content": content })
                    })
                    .collect(),
            )
        }
        "max_tokens" | "max_completion_tokens" => json!(rng.pick(&[1u64, 2, 3, 8, 16, 40, 0, 511, 512, 600])),
        "temperature" => json!(rng.pick(&[0.0f64, 0.2, 0.7, 1.0, 1.3, 2.0, 2.5, -0.5])),
        "top_p" => json!(rng.pick(&[1.0f64, 0.95, 0.5, 1e-6, 0.0, 1.5])),
        "top_k" => json!(rng.pick(&[0i64, 1, 2, 40, 512, 100_000, -3])),
        "seed" => json!(rng.pick(&[0i64, 1, -1, 42, i64::MAX, i64::MIN])),
        "stop" => match rng.below(3) {
            0 => json!(rng.pick(&["\n", "a", "\u{1F600}", ""])),
            1 => json!(["x", "yz", "\u{1F600}!"]),
            _ => json!(["a", "b", "c", "d", "e"]),
        },
        "n" | "best_of" => json!(rng.pick(&[1u64, 1, 2])),
        "stream" | "echo" | "mixed_precision" => json!(rng.chance(if key == "stream" { 40 } else { 10 })),
        "stream_options" => json!({ "include_usage": rng.chance(50) }),
        "presence_penalty" | "frequency_penalty" => json!(rng.pick(&[0.0f64, 0.5, -2.0, 3.0])),
        "device_preference" => json!(rng.pick(&["auto", "cpu", "gpu", "tpu"])),
        "precision" => json!(rng.pick(&["auto", "fp32", "fp16", "bf16", "fp8"])),
        "quantization_preference" => json!(rng.pick(&["auto", "i2s", "tl1", "int4"])),
        "logprobs" => json!(rng.pick(&[Value::Null, json!(false), json!(true), json!(2)])),
        _ => any_value(rng, 0),
    }
}

/// A random body for the completions or the chat endpoint.
fn random_body(rng: &mut Rng, chat: bool) -> Value {
    const COMMON: [&str; 18] = [
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "n",
        "stream",
        "stream_options",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
        "device_preference",
        "precision",
        "mixed_precision",
        "quantization_preference",
        "user",
    ];
    let specific: &[&str] =
        if chat { &["messages", "max_completion_tokens", "tools"] } else { &["prompt", "echo", "best_of", "suffix"] };
    let mut body = Map::new();
    // The fields a request needs, most of the time.
    for key in if chat { ["model", "messages"] } else { ["model", "prompt"] } {
        if rng.chance(90) {
            body.insert(key.to_owned(), value_for(rng, key, chat));
        }
    }
    for _ in 0..rng.below(7) {
        let key = if rng.chance(70) { rng.pick(&COMMON) } else { rng.pick(specific) };
        body.insert(key.to_owned(), value_for(rng, key, chat));
    }
    if rng.chance(3) {
        body.insert("unknown_field".to_owned(), any_value(rng, 0));
    }
    Value::Object(body)
}

/// Checks one answer; returns whether it was a success.
fn check_answer(i: usize, body: &Value, status: u16, text: &str) -> bool {
    assert!(status == 200 || (400..500).contains(&status), "request {i} ({body}): status {status}: {text}");
    if status != 200 {
        let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("request {i}: not JSON ({e}): {text}"));
        assert!(value["error"]["type"].is_string() && value["error"]["message"].is_string(), "request {i}: {text}");
        return false;
    }
    let streamed = body["stream"] == json!(true);
    let chunks: Vec<Value> = if streamed {
        let data = sse_data(text);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "request {i} ({body}): {data:?}");
        data[..data.len() - 1]
            .iter()
            .map(|c| serde_json::from_str(c).unwrap_or_else(|e| panic!("request {i}: chunk not JSON ({e}): {c}")))
            .collect()
    } else {
        vec![serde_json::from_str(text).unwrap_or_else(|e| panic!("request {i}: not JSON ({e}): {text}"))]
    };
    assert!(chunks.iter().all(|c| c.get("error").is_none()), "request {i} ({body}): {text}");
    let finish = chunks.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).next_back();
    assert!(matches!(finish, Some("stop" | "length")), "request {i} ({body}): finish {finish:?}: {text}");
    let completion_tokens = chunks.iter().filter_map(|c| c["usage"]["completion_tokens"].as_u64()).next_back();
    let limit = body.get("max_completion_tokens").or(body.get("max_tokens")).and_then(Value::as_u64);
    if let (Some(used), Some(limit)) = (completion_tokens, limit) {
        assert!(used >= 1 && used <= limit, "request {i} ({body}): {used} tokens for max {limit}");
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_requests_get_well_formed_answers_and_never_break_the_server() {
    let server = common::start(common::config()).await;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut ok, mut rejected) = (0, 0);
    for batch in 0..40 {
        let bodies: Vec<(bool, Value)> = (0..8)
            .map(|_| {
                let chat = rng.chance(40);
                (chat, random_body(&mut rng, chat))
            })
            .collect();
        let answers = join_all(bodies.iter().map(|(chat, body)| {
            let path = if *chat { "/v1/chat/completions" } else { "/v1/completions" };
            let request = server.client.post(server.url(path)).json(body).send();
            async move {
                let response = request.await.expect("request");
                let status = response.status().as_u16();
                (status, response.text().await.expect("body"))
            }
        }))
        .await;
        for (k, ((_, body), (status, text))) in bodies.iter().zip(answers).enumerate() {
            if check_answer(batch * 8 + k, body, status, &text) {
                ok += 1;
            } else {
                rejected += 1;
            }
        }
    }
    // Both kinds were exercised, nothing failed inside, and the server still answers.
    assert!(ok >= 40 && rejected >= 40, "{ok} answered, {rejected} rejected");
    assert_eq!(server.metric("bitnet_requests_failed_total").await, 0.0);
    let (status, _) =
        server.post("/v1/completions", &json!({ "model": MODEL_ID, "prompt": "Hi", "max_tokens": 2 })).await;
    assert_eq!(status, 200);
    server.shutdown().await.unwrap();
}
