//! Streamed responses: engine events as server-sent events, `data: {json}`
//! chunks ending in `data: [DONE]`. Dropping the stream (the client went
//! away) drops the event receiver, which cancels the request in the engine.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::error::ApiError;
use super::metrics::Metrics;
use super::respond::ResponseContext;
use super::scheduler::Event;

struct StreamState {
    events: UnboundedReceiver<Event>,
    context: ResponseContext,
    include_usage: bool,
    deadline: Instant,
    timeout_s: f64,
    metrics: Arc<Metrics>,
    pending: VecDeque<String>,
    finished: bool,
    /// Held until the stream ends: the request counts against `--max-in-flight`.
    _permit: OwnedSemaphorePermit,
}

/// The SSE response of one request. A failure after the stream has started
/// is sent as a `data: {"error": ...}` chunk and ends the stream without `[DONE]`.
pub fn response(
    events: UnboundedReceiver<Event>,
    context: ResponseContext,
    include_usage: bool,
    deadline: Instant,
    timeout_s: f64,
    metrics: Arc<Metrics>,
    permit: OwnedSemaphorePermit,
) -> Response {
    let pending = context.opening_chunk().map(|c| c.to_string()).into_iter().collect();
    let state = StreamState {
        events,
        context,
        include_usage,
        deadline,
        timeout_s,
        metrics,
        pending,
        finished: false,
        _permit: permit,
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(data) = state.pending.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), state));
            }
            if state.finished {
                return None;
            }
            state.next_event().await;
        }
    });
    Sse::new(stream).into_response()
}

impl StreamState {
    /// Waits for the engine's next event and queues the chunks it makes.
    async fn next_event(&mut self) {
        let event = match tokio::time::timeout_at(self.deadline, self.events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => Event::Failed("the engine stopped before the request finished".into()),
            Err(_) => {
                let error = ApiError::Timeout { seconds: self.timeout_s };
                self.metrics.requests_rejected.inc(error.reject_reason());
                return self.end_with(error);
            }
        };
        match event {
            Event::Delta(text) => self.pending.push_back(self.context.delta_chunk(&text).to_string()),
            Event::Done(finished) => {
                self.pending.push_back(self.context.final_chunk(&finished).to_string());
                if self.include_usage {
                    self.pending.push_back(self.context.usage_chunk(&finished).to_string());
                }
                self.pending.push_back("[DONE]".into());
                self.finished = true;
            }
            Event::Failed(detail) => {
                eprintln!("bitnet serve: internal error in stream {}: {detail}", self.context.id);
                self.metrics.requests_rejected.inc("internal_error");
                self.end_with(ApiError::Internal(detail));
            }
        }
    }

    fn end_with(&mut self, error: ApiError) {
        self.pending.push_back(error.body().to_string());
        self.finished = true;
    }
}
