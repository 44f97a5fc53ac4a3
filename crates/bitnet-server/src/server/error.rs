//! `ApiError`: every error the HTTP API answers with, in OpenAI's error
//! envelope `{"error": {"message", "type", "param", "code"}}`. Client errors
//! (4xx) show their message; internal ones (5xx) are logged and their detail
//! is hidden from the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Why a request was turned away, as the `reason` label of
/// `bitnet_requests_rejected_total`. Attached to error responses as an
/// extension so one middleware can count every rejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RejectReason(pub &'static str);

/// An error answer of the API.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// 400: the request is malformed or asks for something out of range.
    #[error("{message}")]
    BadRequest { message: String, param: Option<&'static str>, code: Option<&'static str> },
    /// 401: missing or wrong API key.
    #[error("invalid or missing API key")]
    Unauthorized,
    /// 404: no such route.
    #[error("no route for {0}")]
    NotFound(String),
    /// 405: the route exists but not for this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 413: the body is larger than `--max-body-bytes`.
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 429: `--max-in-flight` requests are already being served.
    #[error("too many requests in flight ({limit}); retry later")]
    TooManyRequests { limit: usize },
    /// 503: the model is still loading, or the server is shutting down.
    #[error("{0}")]
    Unavailable(&'static str),
    /// 504: the request ran past `--request-timeout-s`.
    #[error("request timed out after {seconds} s")]
    Timeout { seconds: f64 },
    /// 500: something failed inside the server; the detail is logged only.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::BadRequest { message: message.into(), param, code: None }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_type(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } | Self::NotFound(_) | Self::MethodNotAllowed | Self::PayloadTooLarge { .. } => {
                "invalid_request_error"
            }
            Self::Unauthorized => "authentication_error",
            Self::TooManyRequests { .. } => "rate_limit_error",
            Self::Unavailable(_) => "service_unavailable",
            Self::Timeout { .. } => "timeout_error",
            Self::Internal(_) => "server_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            Self::BadRequest { code, .. } => *code,
            Self::Unauthorized => Some("invalid_api_key"),
            Self::NotFound(_) => Some("not_found"),
            Self::MethodNotAllowed => Some("method_not_allowed"),
            Self::PayloadTooLarge { .. } => Some("payload_too_large"),
            Self::TooManyRequests { .. } => Some("rate_limit_exceeded"),
            Self::Unavailable(_) => Some("service_unavailable"),
            Self::Timeout { .. } => Some("timeout"),
            Self::Internal(_) => None,
        }
    }

    /// The `reason` label counted in `bitnet_requests_rejected_total`.
    pub fn reject_reason(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "invalid_request",
            Self::Unauthorized => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::TooManyRequests { .. } => "too_many_requests",
            Self::Unavailable(_) => "unavailable",
            Self::Timeout { .. } => "timeout",
            Self::Internal(_) => "internal_error",
        }
    }

    /// The envelope's JSON. Internal errors carry a fixed message.
    pub fn body(&self) -> serde_json::Value {
        let message = match self {
            Self::Internal(_) => "the server had an error while processing the request".to_owned(),
            other => other.to_string(),
        };
        let param = match self {
            Self::BadRequest { param, .. } => *param,
            _ => None,
        };
        json!({ "error": { "message": message, "type": self.error_type(), "param": param, "code": self.code() } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            eprintln!("bitnet serve: internal error: {detail}");
        }
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if matches!(self, Self::TooManyRequests { .. } | Self::Unavailable(_)) {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response.extensions_mut().insert(RejectReason(self.reject_reason()));
        response
    }
}
