//! The one error type of the services' HTTP edges: a status, a stable code
//! and a message, as `{"error": {"code", "message"}}`, never carrying
//! internal detail to the caller.
//!
//! Errors are logged once, by the [`log_refusals`] layer, with the request's
//! method and path: a conversion only records what the log should say.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sync_protocol::ticket::{ErrorClass, TicketError};
use sync_protocol::token::AuthError;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// What the log gets and the caller does not.
    detail: Option<Refusal>,
}

/// How loudly a refusal is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Expected in normal operation (a token refused).
    Info,
    /// The service is degraded (storage unavailable).
    Warn,
    /// A bug or a failure someone must look at.
    Error,
}

/// The log record of a refusal, carried to [`log_refusals`] in the
/// response's extensions.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub severity: Severity,
    pub code: &'static str,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), detail: None }
    }

    /// An unexpected failure: logged in full, answered without detail.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; it has been logged")
            .logged(Severity::Error, error)
    }

    /// This refusal, logged at `severity` with `detail` when it is answered.
    pub fn logged(mut self, severity: Severity, detail: impl std::fmt::Display) -> Self {
        self.detail = Some(Refusal { severity, code: self.code, detail: detail.to_string() });
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": { "code": self.code, "message": self.message } }));
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(refusal) = self.detail {
            response.extensions_mut().insert(refusal);
        }
        response
    }
}

/// The response layer that logs refusals, once each, with the request's
/// method and route: `Router::layer(axum::middleware::from_fn(log_refusals))`.
pub async fn log_refusals(request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let response = next.run(request).await;
    if let Some(Refusal { severity, code, detail }) = response.extensions().get::<Refusal>() {
        let status = response.status().as_u16();
        match severity {
            Severity::Info => tracing::info!(%method, path, status, code, error = %detail, "request refused"),
            Severity::Warn => tracing::warn!(%method, path, status, code, error = %detail, "request failed"),
            Severity::Error => tracing::error!(%method, path, status, code, error = %detail, "request failed"),
        }
    }
    response
}

impl From<TicketError> for ApiError {
    fn from(error: TicketError) -> Self {
        let status = match error.class() {
            ErrorClass::Conflict => StatusCode::CONFLICT,
            ErrorClass::Forbidden => StatusCode::FORBIDDEN,
            ErrorClass::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, error.code(), error.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        let message = match error {
            AuthError::Missing => "send an Authorization: Bearer token",
            AuthError::Expired => "the token has expired; log in again",
            AuthError::Revoked => "the token has been revoked; log in again",
            _ => "the token is not valid here",
        };
        ApiError::new(StatusCode::UNAUTHORIZED, error.code(), message).logged(Severity::Info, error)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let code = match rejection {
            JsonRejection::JsonSyntaxError(_) => "malformed_json",
            JsonRejection::JsonDataError(_) => "invalid_body",
            JsonRejection::MissingJsonContentType(_) => "unsupported_media_type",
            _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            _ => "unreadable_body",
        };
        ApiError::new(rejection.status(), code, rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", rejection.body_text())
    }
}

/// `Json` with our error body on rejection.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// The bearer token of a request.
pub fn bearer_token(parts: &Parts) -> Result<&str, AuthError> {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or(AuthError::Missing)
}

/// A comma-separated query value parsed item by item; an unknown item is a
/// 400 with `code`.
pub fn parse_list<T>(
    raw: Option<&str>,
    parse: impl Fn(&str) -> Option<T>,
    code: &'static str,
) -> Result<Vec<T>, ApiError> {
    raw.into_iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
        .map(|s| parse(s).ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, code, format!("unknown value {s:?}"))))
        .collect()
}
