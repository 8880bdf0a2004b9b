//! The one error type of the services' HTTP edges: a status, a stable code
//! and a message, as `{"error": {"code", "message"}}`, never carrying
//! internal detail to the caller.
//!
//! Errors are logged once, by the [`log_refusals`] layer, with the request's
//! method and path: a conversion only records what the log should say.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt, stream};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::error::Category;
use serde_json::json;
use sync_protocol::ids::TicketId;
use sync_protocol::ticket::{ErrorClass, TicketError};
use sync_protocol::token::{AuthError, Principal, Verifier};
use tokio_util::sync::CancellationToken;

use crate::keys::token_lapses;

/// How often an idle live feed sends a comment, under the idle timeouts
/// of common proxies (60 s).
pub const LIVE_FEED_KEEP_ALIVE: Duration = Duration::from_secs(15);

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
        response.extensions_mut().insert(ShapedRefusal);
        if let Some(refusal) = self.detail {
            response.extensions_mut().insert(refusal);
        }
        response
    }
}

/// Most headers a request may carry, and most bytes of names and values
/// together. Refused past either with 431 and the service's error body.
/// Far above what a browser or the services' own clients send; they bound
/// what one request may make the service hold. (The HTTP library itself
/// stops reading at 100 headers or about 400 KiB; past those it closes the
/// connection with a bare 431, which no service can shape.)
pub const HEADER_COUNT_MAX: usize = 64;
pub const HEADER_BYTES_MAX: usize = 16 * 1024;

/// Marks a response whose body already has the service's error shape, so
/// [`reshape_refusals`] leaves it as it is.
#[derive(Debug, Clone, Copy)]
pub struct ShapedRefusal;

/// The stable code and message of a refusal the HTTP framework made
/// itself (no route, no such method, a body over the limit, ...), by status.
pub fn framework_refusal(status: StatusCode) -> (&'static str, &'static str) {
    match status {
        StatusCode::BAD_REQUEST => ("bad_request", "the request is malformed"),
        StatusCode::NOT_FOUND => ("not_found", "no such endpoint"),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "this endpoint does not take that method; see Allow"),
        StatusCode::REQUEST_TIMEOUT => ("request_timeout", "the request took too long"),
        StatusCode::PAYLOAD_TOO_LARGE => ("body_too_large", "the request body is over the limit"),
        StatusCode::URI_TOO_LONG => ("uri_too_long", "the request's URI is over the limit"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "the body's content type is not accepted"),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
            ("headers_too_large", "the request's headers are over the limit")
        }
        status if status.is_server_error() => ("internal", "internal error; it has been logged"),
        _ => ("refused", "the request was refused"),
    }
}

/// Why a request's headers are refused, if they are.
fn header_limits_broken(headers: &axum::http::HeaderMap) -> Option<String> {
    if headers.len() > HEADER_COUNT_MAX {
        return Some(format!("{} headers, over the limit of {HEADER_COUNT_MAX}", headers.len()));
    }
    let bytes: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len()).sum();
    (bytes > HEADER_BYTES_MAX).then(|| format!("{bytes} bytes of headers, over the limit of {HEADER_BYTES_MAX}"))
}

/// The layer that gives every refusal the service's error body: it
/// enforces the header limits, and reshapes any error response a handler
/// did not shape (the framework's 404, 405, 413, 408, rejected paths and
/// upgrades) with `shape(status, code, message)`, keeping its `Allow`.
/// Mount it inside [`log_refusals`], which then logs these too:
/// `.layer(from_fn(|r, n| reshape_refusals(r, n, shape))).layer(from_fn(log_refusals))`.
pub async fn reshape_refusals(
    request: Request,
    next: Next,
    shape: fn(StatusCode, &'static str, String) -> Response,
) -> Response {
    let refusal = |status: StatusCode, detail: String| {
        let (code, message) = framework_refusal(status);
        let mut response = shape(status, code, message.to_owned());
        response.extensions_mut().insert(Refusal { severity: Severity::Info, code, detail });
        response
    };
    if let Some(detail) = header_limits_broken(request.headers()) {
        return refusal(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, detail);
    }
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || response.extensions().get::<ShapedRefusal>().is_some()
    {
        return response;
    }
    let mut shaped = refusal(status, format!("answered by the framework with {status}"));
    if let Some(allow) = response.headers().get(header::ALLOW) {
        shaped.headers_mut().insert(header::ALLOW, allow.clone());
    }
    shaped
}

/// [`reshape_refusals`] with [`ApiError`]'s body.
pub async fn api_refusals(request: Request, next: Next) -> Response {
    reshape_refusals(request, next, |status, code, message| ApiError::new(status, code, message).into_response()).await
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

/// What a caller is told of a refused token: what to do, not which check failed.
fn token_refusal_message(error: &AuthError) -> &'static str {
    match error {
        AuthError::Missing => "send an Authorization: Bearer token",
        AuthError::NotBearer => "send the token as Authorization: Bearer",
        AuthError::Expired => "the token has expired; log in again",
        AuthError::Revoked => "the token has been revoked; log in again",
        AuthError::AccountDisabled => "the account has been disabled; ask the hospital's IT",
        _ => "the token is not valid here",
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, error.code(), token_refusal_message(&error))
            .logged(Severity::Info, error)
    }
}

/// A live feed (Server-Sent Events) that lives no longer than the token
/// that opened it: it ends when `stop` is cancelled (the service shuts
/// down), or, once the token is revoked or expires, with a last
/// `event: session_ended` whose data is `{"code", "message"}` (the codes of
/// a refused token), so the client knows to sign in again rather than
/// reconnect with the same token. Comments keep idle proxies from closing it.
pub fn live_feed<S>(
    events: S,
    verifier: Arc<Verifier>,
    principal: Principal,
    stop: CancellationToken,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>>
where
    S: Stream<Item = Event> + Send + 'static,
{
    enum Part {
        Event(Event),
        Lapsed(AuthError),
        End,
    }
    let end = stream::once(async move {
        tokio::select! {
            error = token_lapses(&verifier, &principal) => Some(error),
            _ = stop.cancelled() => None,
        }
    })
    .flat_map(|lapsed| stream::iter(lapsed.map(Part::Lapsed).into_iter().chain([Part::End])));
    let parts = stream::select(events.map(Part::Event), end);
    let feed = parts.scan(false, |ended, part| {
        std::future::ready(match part {
            _ if *ended => None,
            Part::Event(event) => Some(event),
            Part::Lapsed(error) => {
                *ended = true;
                let body = json!({ "code": error.code(), "message": token_refusal_message(&error) });
                Some(Event::default().event("session_ended").data(body.to_string()))
            }
            Part::End => None,
        })
    });
    Sse::new(feed.map(Ok)).keep_alive(KeepAlive::new().interval(LIVE_FEED_KEEP_ALIVE))
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

/// A ticket id from the path (`/tickets/{id}`), with a clear error when it
/// is not one (including a path that is not UTF-8 once decoded).
#[derive(Debug)]
pub struct TicketPath(pub TicketId);

impl<S: Send + Sync> FromRequestParts<S> for TicketPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let invalid = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_ticket_id", message);
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| invalid("the ticket id is not text".to_owned()))?;
        raw.parse().map(TicketPath).map_err(|e: sync_protocol::ids::IdError| invalid(e.to_string()))
    }
}

/// A JSON request body, refused with our error body and one rule for
/// every endpoint (the API docs state it): no JSON content type is 415
/// `unsupported_media_type`; text that is not JSON (a syntax error, cut
/// short) is 400 `malformed_json`; JSON of the wrong shape (a wrong type, a
/// missing or unknown field, an unknown enum value) is 422 `invalid_body`;
/// a body over the limit is 413 `body_too_large`.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(request.headers()) {
            let (code, _) = framework_refusal(StatusCode::UNSUPPORTED_MEDIA_TYPE);
            return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, code, "send the body as application/json"));
        }
        let body = Bytes::from_request(request, state).await.map_err(|rejection| {
            let (code, message) = framework_refusal(rejection.status());
            ApiError::new(rejection.status(), code, message)
        })?;
        parse_json(&body).map(ApiJson)
    }
}

/// Whether the content type is JSON (`application/json`, or a `+json` type).
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Parses a body by the rule of [`ApiJson`]. serde_json reports some shape
/// errors (a number where an enum's name belongs) as syntax errors, so a
/// syntax error is checked against the body as plain JSON, on that path only.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        let shape = error.classify() == Category::Data || serde_json::from_slice::<IgnoredAny>(body).is_ok();
        if shape {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", error.to_string())
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", error.to_string())
        }
    })
}

/// The bearer token of a request: [`AuthError::Missing`] without an
/// `Authorization` header, [`AuthError::NotBearer`] with another scheme
/// (`Basic`, say). The scheme is case-insensitive (RFC 9110, 11.1).
pub fn bearer_token(parts: &Parts) -> Result<&str, AuthError> {
    let value = parts.headers.get(header::AUTHORIZATION).ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::NotBearer)?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    match token.trim() {
        _ if !scheme.eq_ignore_ascii_case("bearer") => Err(AuthError::NotBearer),
        "" => Err(AuthError::Missing),
        token => Ok(token),
    }
}

/// A page size from a query: `default` when absent, else 1 to `max`; out
/// of range is a 400 `invalid_limit` naming the range.
pub fn page_limit(limit: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(default);
    if !(1..=max).contains(&limit) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_limit", format!("limit must be 1 to {max}")));
    }
    Ok(limit)
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
