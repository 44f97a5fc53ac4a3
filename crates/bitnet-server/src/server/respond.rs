//! The JSON bodies of completion responses and stream chunks.

use serde_json::{json, Value};

use super::api::{BitnetInfo, Usage};
use super::scheduler::Finished;

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// What every body of one response shares.
#[derive(Debug, Clone)]
pub struct ResponseContext {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl ResponseContext {
    fn bitnet(&self, finished: &Finished) -> BitnetInfo {
        BitnetInfo::new(&finished.stats)
    }

    /// The whole (non-streamed) response.
    pub fn full(&self, finished: &Finished) -> Value {
        let reason = finished.finish_reason.as_str();
        let choice = match self.endpoint {
            Endpoint::Completions => {
                json!({ "index": 0, "text": finished.text, "logprobs": null, "finish_reason": reason })
            }
            Endpoint::Chat => json!({
                "index": 0,
                "message": { "role": "assistant", "content": finished.text },
                "logprobs": null,
                "finish_reason": reason,
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": Usage::of(finished),
            "bitnet": self.bitnet(finished),
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The chunk that opens a chat stream (the assistant role), if any.
    pub fn opening_chunk(&self) -> Option<Value> {
        (self.endpoint == Endpoint::Chat).then(|| {
            self.chunk(json!([{
                "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null
            }]))
        })
    }

    /// A chunk carrying new text.
    pub fn delta_chunk(&self, text: &str) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": null }),
            Endpoint::Chat => {
                json!({ "index": 0, "delta": { "content": text }, "logprobs": null, "finish_reason": null })
            }
        };
        self.chunk(json!([choice]))
    }

    /// The last chunk with choices: the finish reason and the `bitnet` object.
    pub fn final_chunk(&self, finished: &Finished) -> Value {
        let reason = finished.finish_reason.as_str();
        let choice = match self.endpoint {
            Endpoint::Completions => json!({ "index": 0, "text": "", "logprobs": null, "finish_reason": reason }),
            Endpoint::Chat => json!({ "index": 0, "delta": {}, "logprobs": null, "finish_reason": reason }),
        };
        let mut chunk = self.chunk(json!([choice]));
        chunk["bitnet"] = json!(self.bitnet(finished));
        chunk
    }

    /// OpenAI's usage chunk (`stream_options.include_usage`): no choices.
    pub fn usage_chunk(&self, finished: &Finished) -> Value {
        let mut chunk = self.chunk(json!([]));
        chunk["usage"] = json!(Usage::of(finished));
        chunk
    }
}
