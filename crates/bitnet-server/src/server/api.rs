//! The OpenAI request and response types, and the checks that turn a request
//! into a [`GenerationParams`] (every numeric field is range-checked here).

use bitnet_inference::engine::{DevicePreference, PrecisionPreference, QuantizationPreference, RequestPreferences};
use bitnet_inference::{SamplingConfig, SequenceReport};
use bitnet_models::tokenizer::{ChatMessage, ChatRole};
use bitnet_models::Tokenizer;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::scheduler::{Finished, RunStats};

/// The `max_tokens` of a completion request that gives none (OpenAI's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;
/// At most this many stop strings, as OpenAI.
pub const MAX_STOP_STRINGS: usize = 4;

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

/// Options shared by both endpoints, flattened into each request.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonOptions {
    pub model: String,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Extension: keep the `top_k` most likely tokens (0 = off).
    pub top_k: Option<u64>,
    pub seed: Option<i64>,
    pub stop: Option<StringOrList>,
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logprobs: Option<serde_json::Value>,
    pub device_preference: Option<String>,
    pub precision: Option<String>,
    pub mixed_precision: Option<bool>,
    pub quantization_preference: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: StringOrList,
    #[serde(default)]
    pub echo: bool,
    pub best_of: Option<u64>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub options: CommonOptions,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<RequestMessage>,
    /// The newer name of `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<u64>,
    pub tools: Option<serde_json::Value>,
    #[serde(flatten)]
    pub options: CommonOptions,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RequestMessage {
    pub role: String,
    pub content: Option<MessageContent>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// A validated request, ready for the engine.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Device, precision and quantization asked for; the engine decides.
    pub preferences: RequestPreferences,
}

/// What validation needs to know about the served model.
#[derive(Debug, Clone, Copy)]
pub struct ModelLimits<'a> {
    pub model_id: &'a str,
    pub context_len: usize,
    pub tokenizer: &'a Tokenizer,
}

fn bad(message: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::bad_request(message, Some(param))
}

impl CompletionRequest {
    pub fn validate(&self, limits: ModelLimits<'_>) -> Result<GenerationParams, ApiError> {
        if self.echo {
            return Err(bad("echo is not supported", "echo"));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(bad("best_of must be 1", "best_of"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(bad("suffix is not supported", "suffix"));
        }
        let text = match &self.prompt {
            StringOrList::One(text) => text,
            StringOrList::Many(list) if list.len() == 1 => &list[0],
            StringOrList::Many(_) => {
                return Err(bad("prompt must be a string or a list of exactly one string", "prompt"))
            }
        };
        if text.is_empty() {
            return Err(bad("prompt must not be empty", "prompt"));
        }
        let prompt = limits
            .tokenizer
            .encode(text, limits.tokenizer.add_bos())
            .map_err(|e| ApiError::Internal(format!("tokenizing the prompt: {e}")))?;
        self.options.validate(limits, prompt, None, DEFAULT_COMPLETION_MAX_TOKENS)
    }
}

impl ChatRequest {
    pub fn validate(&self, limits: ModelLimits<'_>) -> Result<GenerationParams, ApiError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(bad("tools are not supported", "tools"));
        }
        if self.messages.is_empty() {
            return Err(bad("messages must not be empty", "messages"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for message in &self.messages {
            let role = match message.role.as_str() {
                "system" | "developer" => ChatRole::System,
                "user" => ChatRole::User,
                "assistant" => ChatRole::Assistant,
                other => return Err(bad(format!("unsupported message role `{other}`"), "messages")),
            };
            let content = match &message.content {
                None => String::new(),
                Some(MessageContent::Text(text)) => text.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(bad(format!("unsupported content part `{kind}`"), "messages"));
                            }
                        }
                    }
                    text
                }
            };
            messages.push(ChatMessage::new(role, content));
        }
        let text =
            limits.tokenizer.chat_prompt(&messages).map_err(|e| bad(format!("bad chat messages: {e}"), "messages"))?;
        // The chat prompt already starts with the BOS token's text.
        let prompt = limits
            .tokenizer
            .encode(&text, false)
            .map_err(|e| ApiError::Internal(format!("tokenizing the chat prompt: {e}")))?;
        let remaining = limits.context_len.saturating_sub(prompt.len());
        let max_tokens = self.max_completion_tokens.or(self.options.max_tokens);
        self.options.validate(limits, prompt, max_tokens, remaining.max(1))
    }
}

impl CommonOptions {
    fn validate(
        &self,
        limits: ModelLimits<'_>,
        prompt: Vec<u32>,
        max_tokens_override: Option<u64>,
        default_max_tokens: usize,
    ) -> Result<GenerationParams, ApiError> {
        if self.model != limits.model_id {
            return Err(ApiError::BadRequest {
                message: format!("model `{}` does not exist; this server serves `{}`", self.model, limits.model_id),
                param: Some("model"),
                code: Some("model_not_found"),
            });
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(bad("only n = 1 is supported", "n"));
        }
        for (name, value) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if value.is_some_and(|v| v != 0.0) {
                return Err(bad(format!("{name} is not supported (only 0)"), name));
            }
        }
        if self.logprobs.as_ref().is_some_and(|v| !(v.is_null() || *v == serde_json::Value::Bool(false))) {
            return Err(bad("logprobs are not supported", "logprobs"));
        }
        let preferences = self.preferences()?;

        let context = limits.context_len;
        let max_tokens = match max_tokens_override.or(self.max_tokens) {
            None => default_max_tokens,
            Some(0) => return Err(bad("max_tokens must be at least 1", "max_tokens")),
            Some(n) if n > context as u64 => {
                return Err(bad(
                    format!("max_tokens must be at most the context length {context}, got {n}"),
                    "max_tokens",
                ))
            }
            Some(n) => n as usize,
        };
        if prompt.len() + max_tokens > context {
            return Err(ApiError::BadRequest {
                message: format!(
                    "the prompt ({} tokens) plus max_tokens ({max_tokens}) exceeds the context length {context}",
                    prompt.len()
                ),
                param: Some("max_tokens"),
                code: Some("context_length_exceeded"),
            });
        }

        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(bad(format!("temperature must be in [0, 2], got {temperature}"), "temperature"));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(bad(format!("top_p must be in (0, 1], got {top_p}"), "top_p"));
        }
        let top_k = match self.top_k {
            None => 0,
            Some(k) => usize::try_from(k).map_err(|_| bad("top_k is too large", "top_k"))?,
        };
        // Without a seed each request draws its own, so repeated requests differ as with OpenAI.
        let seed = self.seed.map_or_else(fresh_seed, |s| s as u64);

        let stop = match &self.stop {
            None => Vec::new(),
            Some(StringOrList::One(s)) => vec![s.clone()],
            Some(StringOrList::Many(list)) => list.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(bad(format!("at most {MAX_STOP_STRINGS} stop strings are allowed"), "stop"));
        }
        if stop.iter().any(String::is_empty) {
            return Err(bad("stop strings must not be empty", "stop"));
        }

        Ok(GenerationParams {
            prompt,
            max_tokens,
            sampling: SamplingConfig { temperature: temperature as f32, top_k, top_p: top_p as f32, seed },
            stop,
            stream: self.stream,
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
            preferences,
        })
    }

    /// Parses the device fields. A request no device could serve as asked
    /// (a GPU-only precision with `device_preference: cpu`, or a precision
    /// contradicting `mixed_precision`) is a client error; anything else is
    /// for the engine to place, falling back when it must.
    fn preferences(&self) -> Result<RequestPreferences, ApiError> {
        fn parse<T: std::str::FromStr<Err = String> + Default>(
            value: &Option<String>,
            param: &'static str,
        ) -> Result<T, ApiError> {
            value.as_deref().map_or(Ok(T::default()), |v| v.parse().map_err(|message: String| bad(message, param)))
        }
        let preferences = RequestPreferences {
            device: parse::<DevicePreference>(&self.device_preference, "device_preference")?,
            precision: parse::<PrecisionPreference>(&self.precision, "precision")?,
            mixed_precision: self.mixed_precision,
            quantization: parse::<QuantizationPreference>(&self.quantization_preference, "quantization_preference")?,
        };
        preferences.validate().map_err(|err| bad(err.to_string(), err.param()))?;
        Ok(preferences)
    }
}

fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// OpenAI's `prompt_tokens_details`: how many prompt tokens came from
    /// the prefix cache.
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl Usage {
    pub fn of(finished: &Finished) -> Self {
        Self {
            prompt_tokens: finished.prompt_tokens,
            completion_tokens: finished.completion_tokens,
            total_tokens: finished.prompt_tokens + finished.completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: finished.cached_tokens },
        }
    }
}

/// The `bitnet` object added to every response: where and how it ran.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BitnetInfo {
    pub device: String,
    pub precision: String,
    pub quantization: String,
    pub fallback_occurred: bool,
    pub fallback_reason: Option<&'static str>,
    /// Time the fallback added (0 without one): deciding before running, or
    /// the failed GPU attempt plus the CPU re-prefill.
    pub fallback_ms: f64,
    pub batch_id: u64,
    pub batch_size: usize,
    pub queue_ms: f64,
    pub compute_ms: f64,
}

impl BitnetInfo {
    pub fn new(stats: &RunStats) -> Self {
        let report: &SequenceReport = &stats.report;
        Self {
            device: report.device.clone(),
            precision: report.precision.clone(),
            quantization: report.quantization.clone(),
            fallback_occurred: report.fallback.is_some(),
            fallback_reason: report.fallback.map(|f| f.reason.as_str()),
            fallback_ms: report.fallback.map_or(0.0, |f| f.cost.as_secs_f64() * 1e3),
            batch_id: stats.batch_id,
            batch_size: stats.batch_size,
            queue_ms: stats.queue.as_secs_f64() * 1e3,
            compute_ms: stats.compute.as_secs_f64() * 1e3,
        }
    }
}
