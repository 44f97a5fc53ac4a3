//! The router: endpoints, API-key check, body limit, rejection counting and
//! the panic guard.

use std::any::Any;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;
use tower_http::catch_panic::CatchPanicLayer;

use super::api::{ChatRequest, CompletionRequest, GenerationParams};
use super::error::{ApiError, RejectReason};
use super::respond::{Endpoint, ResponseContext};
use super::scheduler::{Event, Finished, Job};
use super::sse;
use super::state::{AppState, Phase};

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/devices", get(devices))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), count_rejections))
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

async fn require_api_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|given| constant_time_eq(given.as_bytes(), key.as_bytes())) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

/// Compares without an early exit, so timing does not reveal the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn count_rejections(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if let Some(RejectReason(reason)) = response.extensions().get::<RejectReason>() {
        state.metrics.requests_rejected.inc(reason);
    }
    response
}

fn panic_response(_: Box<dyn Any + Send + 'static>) -> Response {
    ApiError::Internal("a request handler panicked".into()).into_response()
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let (status, text) = match state.phase() {
        Phase::Loading => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
        Phase::Ready if !state.engine_alive() => (StatusCode::SERVICE_UNAVAILABLE, "engine_stopped"),
        Phase::Ready => (StatusCode::OK, "ok"),
        Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
    };
    (status, Json(json!({ "status": text }))).into_response()
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let in_flight = state.config.max_in_flight.saturating_sub(state.in_flight.available_permits());
    state.metrics.num_requests_in_flight.store(in_flight as u64, Ordering::Relaxed);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}

async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.config.model_id,
            "object": "model",
            "created": state.started_unix,
            "owned_by": "bitnet-rs",
        }],
    }))
}

async fn devices(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let cpu = &state.cpu;
    let backend = state.model().map(|m| {
        json!({
            "device": m.info.device,
            "precision": m.info.precision,
            "quantization": m.info.quantization,
            "detail": m.info.detail,
        })
    });
    let gpu_backend = state.model().map(|m| match &m.gpu {
        None => json!(null),
        Some((gpu, budget)) => json!({
            "gpu": super::devices::gpu_json(gpu),
            "planning_budget_bytes": budget,
            "health": state.metrics.gpu_health().as_str(),
        }),
    });
    let fallbacks = state.metrics.fallbacks.snapshot();
    Json(json!({
        "cpu": super::devices::cpu_json(cpu),
        "backend": backend,
        "cuda": state.gpu.to_string(),
        "gpus": super::devices::gpus_json(&state.gpu),
        "gpu_backend": gpu_backend,
        "fallbacks": {
            "total": fallbacks.values().sum::<u64>(),
            "by_reason": fallbacks,
        },
    }))
}

async fn completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    run_endpoint::<CompletionRequest>(state, body, Endpoint::Completions, |r, l| r.validate(l)).await
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    run_endpoint::<ChatRequest>(state, body, Endpoint::Chat, |r, l| r.validate(l)).await
}

/// Admission, parsing and validation shared by both generation endpoints.
async fn run_endpoint<R: DeserializeOwned>(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
    validate: impl FnOnce(&R, super::api::ModelLimits<'_>) -> Result<GenerationParams, ApiError>,
) -> Response {
    let arrived = Instant::now();
    let result = async {
        let permit = state
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::TooManyRequests { limit: state.config.max_in_flight })?;
        let model = match state.phase() {
            Phase::Loading => return Err(ApiError::Unavailable("the model is still loading")),
            Phase::Draining => return Err(ApiError::Unavailable("the server is shutting down")),
            Phase::Ready => state.model().ok_or(ApiError::Unavailable("the model is still loading"))?,
        };
        let body = body.map_err(|rejection| match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit: state.config.max_body_bytes },
            _ => ApiError::bad_request(format!("could not read the request body: {rejection}"), None),
        })?;
        let request: R = parse_json(&body)?;
        let params = validate(&request, model.limits(&state.config.model_id))?;
        Ok((permit, params))
    }
    .await;
    let (permit, params) = match result {
        Ok(ok) => ok,
        Err(error) => return error.into_response(),
    };

    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        prompt: params.prompt,
        max_tokens: params.max_tokens,
        sampling: params.sampling,
        stop: params.stop,
        preferences: params.preferences,
        replay_on_fallback: !params.stream,
        arrived,
        events: events_tx,
    };
    if let Err(error) = state.submit(job) {
        return error.into_response();
    }
    let context = ResponseContext {
        endpoint,
        id: state.next_response_id(endpoint),
        created: unix_now(),
        model: state.config.model_id.clone(),
    };
    let timeout = state.config.request_timeout;
    let deadline = tokio::time::Instant::from_std(arrived) + timeout;
    if params.stream {
        let metrics = state.metrics.clone();
        return sse::response(events, context, params.include_usage, deadline, timeout.as_secs_f64(), metrics, permit);
    }
    let outcome = tokio::time::timeout_at(deadline, wait_finished(&mut events)).await;
    drop(permit);
    match outcome {
        Ok(Ok(finished)) => Json(context.full(&finished)).into_response(),
        Ok(Err(error)) => error.into_response(),
        // Dropping `events` cancels the request in the engine.
        Err(_) => ApiError::Timeout { seconds: timeout.as_secs_f64() }.into_response(),
    }
}

async fn wait_finished(events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> Result<Finished, ApiError> {
    loop {
        match events.recv().await {
            Some(Event::Delta(_)) => {}
            Some(Event::Done(finished)) => return Ok(finished),
            Some(Event::Failed(detail)) => return Err(ApiError::Internal(detail)),
            None => return Err(ApiError::Internal("the engine stopped before the request finished".into())),
        }
    }
}

fn parse_json<R: DeserializeOwned>(body: &[u8]) -> Result<R, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}"), None))
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl AppState {
    fn next_response_id(&self, endpoint: Endpoint) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let prefix = match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        };
        format!("{prefix}-{:x}{n:08x}", self.started_unix)
    }
}
