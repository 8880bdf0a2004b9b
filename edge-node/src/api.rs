//! The HTTP JSON API for ward devices, under `/api/v1`, plus health, metrics
//! and the live feed.
//!
//! | method | path                                   | who                 | what |
//! |--------|----------------------------------------|---------------------|------|
//! | POST   | /api/v1/tickets                        | nurse, admin        | create a ticket (201) |
//! | GET    | /api/v1/tickets                        | nurse, admin        | list: `status`, `priority` (comma lists), `limit` (1-200), `page` |
//! | GET    | /api/v1/tickets/{id}                   | nurse, admin        | one ticket with its history |
//! | PATCH  | /api/v1/tickets/{id}                   | nurse, admin        | edit items and priority (until picking starts; an offline edit the pharmacy had not seen when it started picking becomes an `order_conflicts` entry), notes (`{"append": ..}` or `{"replace": ..}`); `receipt` per line once dispatched (`[{medication_code, quantity, discrepancy?: "missing" \| "damaged" \| "wrong-item", note?, lot?, expiry?: "YYYY-MM-DD", gs1?}]`: lot and expiry typed or read from the pack's GS1 string); assignee (admin only: assigning is the pharmacy's); an optional `reason`, kept in the trail |
//! | POST   | /api/v1/tickets/{id}/transitions       | nurse, admin        | cancel, confirm receipt (`delivered`), resolve a conflict |
//! | GET    | /api/v1/formulary                      | nurse, admin        | look codes up in the node's copy of the medication catalogue: `q` (code prefix or part of the name), `limit` (1-200) |
//! | GET    | /api/v1/events                         | nurse, admin        | live ticket changes (Server-Sent Events) |
//! | GET    | /api/v1/sync                           | nurse, admin        | sync state |
//! | POST   | /api/v1/sync/reconcile                 | admin               | compare every ticket with the cloud and send again what it lacks (202) |
//! | POST   | /api/v1/login                          | ward staff          | offline login while the cloud is unreachable: `{username, password}` -> token |
//! | GET    | /healthz, /readyz, /metrics            | anyone on the port  | liveness, readiness, Prometheus |
//!
//! Every refusal, the framework's own included, is
//! `{"error": {"code": "...", "message": "..."}}` with a stable code:
//!
//! | status | codes | when |
//! |--------|-------|------|
//! | 400 | `malformed_json`, `invalid_query`, `invalid_ticket_id`, `bad_request` | the body is not JSON at all; a query or path that does not parse |
//! | 401 | `missing_token`, `unsupported_auth_scheme`, `invalid_token`, `token_expired`, `token_revoked` | no `Authorization`, another scheme than `Bearer`, a token that does not verify |
//! | 403 | `forbidden_role`, `wrong_ward` | a role that does not work at wards (checked first) or may never make that change (a nurse assigning a ticket), a token of another ward |
//! | 404 | `ticket_not_found`, `not_found` | an unknown ticket, an unknown path |
//! | 405 | `method_not_allowed` | a path that does not take the method (the `Allow` header lists those it does) |
//! | 409 | `illegal_transition`, `illegal_edit`, `illegal_resolution`, `unknown_conflict`, `too_many_transitions`, `duplicate_ticket`, `cloud_reachable` | a transition or edit the ticket's state does not allow now; an offline login while the cloud is reachable |
//! | 413 | `body_too_large` | a body over the limit |
//! | 415 | `unsupported_media_type` | a body without a JSON content type |
//! | 422 | `unknown_medication`, `inactive_medication`, `wrong_unit` | a new or edited line the node's copy of the formulary does not list, lists as retired, or counts in another unit (nothing is refused before the node first fetched the catalogue; a line the cloud's newer catalogue flags is shown to the pharmacy) |
//! | 422 | `invalid_body`, `empty_items`, `quantity_zero`, `reason_required` (also a conflict's resolution without one), `over_receipt`, `discrepancy_required`, `note_required`, `lot_and_expiry_required`, `expired_product`, `label_mismatch`, `gs1_malformed`, `gs1_check_digit`, `gs1_bad_date`, `gs1_missing_identifier`, ... | well-formed JSON of the wrong shape or types, or content a rule refuses (`TicketError::code`) |
//! | 431 | `headers_too_large` | over [`service_kit::http::HEADER_COUNT_MAX`] headers or [`service_kit::http::HEADER_BYTES_MAX`] bytes of them |
//! | 503 | `overloaded`, `shutting_down` | the write queue is full, the node is stopping |
//!
//! *The rule for type errors:* a body that is not JSON is 400
//! `malformed_json`; JSON whose shape or types are wrong (a string where a
//! number belongs, an unknown field, a missing one) is 422 `invalid_body`,
//! like any other well-formed request the service refuses.
//!
//! The live feed is bound to its token: when the token expires (past the
//! configured leeway) or is revoked, the stream ends within one second of
//! the node learning it (revocations arrive every `auth.refresh_interval_s`)
//! with a last `event: session_ended` whose data is `{"code", "message"}`
//! (`token_expired`, `token_revoked`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, MatchedPath, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use service_kit::http::{
    ApiError, ApiJson, TicketPath, api_refusals, bearer_token, live_feed, log_refusals, page_limit, parse_list,
};
use sync_protocol::document::{DocumentError, HistoryEntry, TicketDocument, TicketEdit, TransitionRequest};
use sync_protocol::formulary::{self, Medication};
use sync_protocol::ids::{Role, TicketId};
use sync_protocol::ticket::{Actor, LineItem, NewTicket, Priority, Status, Ticket, utc_iso8601};
use sync_protocol::token::Principal;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::AppState;
use crate::cloud_auth::LoginError;
use crate::store::{self, ListQuery, QueuePosition, StoreError, Write};
use service_kit::clock::{now_ms, now_s};

const PAGE_SIZE_DEFAULT: usize = 50;
const PAGE_SIZE_MAX: usize = 200;

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(id) => {
                ApiError::new(StatusCode::NOT_FOUND, "ticket_not_found", format!("no ticket {id}"))
            }
            StoreError::Duplicate(id) => {
                ApiError::new(StatusCode::CONFLICT, "duplicate_ticket", format!("ticket {id} exists"))
            }
            StoreError::Document(DocumentError::Ticket(error)) => error.into(),
            StoreError::Overloaded => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", error.to_string()),
            StoreError::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", error.to_string()),
            other => ApiError::internal(other),
        }
    }
}

/// The authenticated caller of a device request, as an audit actor.
#[derive(Debug, Clone)]
pub struct Caller(pub Actor);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Ok(Caller(WardSession::from_request_parts(parts, state).await?.actor))
    }
}

/// A caller together with the token it was verified from, for what
/// outlives the request (the live feed ends when the token does).
#[derive(Debug, Clone)]
pub struct WardSession {
    pub actor: Actor,
    pub principal: Principal,
}

impl FromRequestParts<AppState> for WardSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = state.verifier.verify(bearer_token(parts)?, now_s())?;
        // The role first: a pharmacist is told this API is not theirs,
        // not that they hold the wrong ward. Pharmacists work through the
        // cloud; an edge-node token is for sync, not for people.
        let role = principal.acting_role(Role::works_at_ward).ok_or_else(|| {
            ApiError::new(StatusCode::FORBIDDEN, "forbidden_role", "this API serves ward nurses and admins")
        })?;
        let ward = &state.config.node.ward;
        if !principal.wards.contains(ward) {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "wrong_ward", format!("the token is not for {ward}")));
        }
        let actor = Actor {
            user: principal.user.clone(),
            role,
            device: state.config.node.id.clone(),
            offline_login: principal.offline_login,
        };
        Ok(WardSession { actor, principal })
    }
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/tickets", post(create_ticket).get(list_tickets))
        .route("/tickets/{id}", get(get_ticket).patch(edit_ticket))
        .route("/tickets/{id}/transitions", post(transition_ticket))
        .route("/events", get(live_events))
        .route("/formulary", get(search_formulary))
        .route("/sync", get(sync_status))
        .route("/sync/reconcile", post(request_reconcile))
        .route("/login", post(offline_login));
    let body_bytes_max = state.config.http.body_bytes_max;
    let timeout = Duration::from_millis(state.config.http.request_timeout_ms);
    Router::new()
        .nest("/api/v1", api)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(prometheus_metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(axum::extract::DefaultBodyLimit::max(body_bytes_max))
        .layer(middleware::from_fn(record_request))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, timeout))
        .layer(middleware::from_fn(api_refusals))
        .layer(middleware::from_fn(log_refusals))
        .with_state(state)
}

async fn record_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let method = request.method().to_string();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!("edge_http_request_duration_seconds", "route" => route.clone(), "method" => method.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("edge_http_requests_total", "route" => route, "method" => method, "status" => status)
        .increment(1);
    response
}

async fn create_ticket(
    State(state): State<AppState>,
    Caller(actor): Caller,
    ApiJson(new): ApiJson<NewTicket>,
) -> Result<impl IntoResponse, ApiError> {
    check_formulary(&state, &new.items).await?;
    let now = now_ms();
    let id = TicketId::new(now, rand::random());
    let created = TicketDocument::create(
        id,
        &state.config.node.ward,
        &new,
        &actor,
        now,
        &state.config.limits,
        state.store.replica().clone(),
    )
    .map_err(document_error)?;
    let mut document = created.document;
    let write = Write::Create { ticket: Box::new(created.ticket), document: document.save(), change: created.change };
    let ticket = state.store.write(write, now).await?;
    metrics::counter!("edge_tickets_created_total").increment(1);
    let location = format!("/api/v1/tickets/{id}");
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(ticket)))
}

/// Refuses lines the node's copy of the catalogue does not list, lists as
/// retired, or counts in another unit. With no copy yet (the node never
/// reached the cloud) nothing is refused: the pharmacy sees what its
/// catalogue flags.
async fn check_formulary(state: &AppState, items: &[LineItem]) -> Result<(), ApiError> {
    let codes: Vec<String> = items.iter().map(|item| item.medication_code.clone()).collect();
    let (entries, size) = state
        .store
        .read(move |conn| store::formulary_entries(conn, &codes.iter().map(String::as_str).collect::<Vec<_>>()))
        .await?;
    if size == 0 {
        return Ok(());
    }
    match formulary::check_items(items, |code| entries.iter().find(|entry| entry.code == code)).first() {
        Some(issue) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, issue.code(), issue.to_string())),
        None => Ok(()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FormularyParams {
    q: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct FormularyPage {
    entries: Vec<Medication>,
    /// When the copy was last fetched from the cloud; `None` if never.
    synced_at: Option<i64>,
    synced_at_utc: Option<String>,
}

async fn search_formulary(
    State(state): State<AppState>,
    _caller: Caller,
    params: Result<Query<FormularyParams>, QueryRejection>,
) -> Result<Json<FormularyPage>, ApiError> {
    let Query(params) = params?;
    let limit = page_limit(params.limit, PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX)?;
    let query = params.q.unwrap_or_default();
    let (entries, synced_at) = state
        .store
        .read(move |conn| {
            Ok((
                store::search_formulary(conn, query.trim(), limit)?,
                millis(store::sync_state(conn, store::FORMULARY_AT_KEY)?),
            ))
        })
        .await?;
    Ok(Json(FormularyPage { entries, synced_at, synced_at_utc: synced_at.map(utc_iso8601) }))
}

fn document_error(error: DocumentError) -> ApiError {
    match error {
        DocumentError::Ticket(error) => error.into(),
        other => ApiError::internal(other),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    status: Option<String>,
    priority: Option<String>,
    limit: Option<usize>,
    page: Option<String>,
}

#[derive(Serialize)]
struct TicketList {
    tickets: Vec<Box<RawValue>>,
    next_page: Option<String>,
}

async fn list_tickets(
    State(state): State<AppState>,
    _caller: Caller,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<TicketList>, ApiError> {
    let Query(params) = params?;
    let limit = page_limit(params.limit, PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX)?;
    let after = match params.page.as_deref() {
        Some(token) => Some(QueuePosition::parse(token).ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_page", "page is not a token from a list response")
        })?),
        None => None,
    };
    let query = ListQuery {
        statuses: parse_list(params.status.as_deref(), Status::parse, "invalid_status")?,
        priorities: parse_list(params.priority.as_deref(), Priority::parse, "invalid_priority")?,
        after,
        limit,
    };
    let page = state.store.read(move |conn| store::list_tickets(conn, &query)).await?;
    let tickets =
        page.tickets.into_iter().map(RawValue::from_string).collect::<Result<_, _>>().map_err(ApiError::internal)?;
    Ok(Json(TicketList { tickets, next_page: page.next.map(|p| p.token()) }))
}

#[derive(Serialize)]
struct TicketWithHistory {
    ticket: Ticket,
    history: Vec<HistoryEntry>,
}

async fn get_ticket(
    State(state): State<AppState>,
    _caller: Caller,
    TicketPath(id): TicketPath,
) -> Result<Json<TicketWithHistory>, ApiError> {
    let replica = state.store.replica().clone();
    let (ticket, history) = state.store.read(move |conn| store::ticket_with_history(conn, id, &replica)).await?;
    Ok(Json(TicketWithHistory { ticket, history }))
}

async fn edit_ticket(
    State(state): State<AppState>,
    Caller(actor): Caller,
    TicketPath(id): TicketPath,
    ApiJson(edit): ApiJson<TicketEdit>,
) -> Result<Json<Ticket>, ApiError> {
    if let Some(items) = &edit.items {
        check_formulary(&state, items).await?;
    }
    let now = now_ms();
    let limits = state.config.limits.clone();
    let mutation = Box::new(move |doc: &mut TicketDocument| doc.edit(&edit, &actor, now, &limits));
    Ok(Json(state.store.write(Write::Mutate { id, mutation }, now).await?))
}

async fn transition_ticket(
    State(state): State<AppState>,
    Caller(actor): Caller,
    TicketPath(id): TicketPath,
    ApiJson(request): ApiJson<TransitionRequest>,
) -> Result<Json<Ticket>, ApiError> {
    let now = now_ms();
    let limits = state.config.limits.clone();
    let to = request.to;
    let mutation = Box::new(move |doc: &mut TicketDocument| doc.transition(&request, &actor, now, &limits));
    let ticket = state.store.write(Write::Mutate { id, mutation }, now).await?;
    metrics::counter!("edge_ticket_transitions_total", "to" => to.as_str()).increment(1);
    Ok(Json(ticket))
}

/// Live ticket changes as Server-Sent Events: `event: ticket` with the
/// ticket's JSON, or `event: resync` when this subscriber fell behind and
/// must list again. Ends when the node shuts down, and with `event:
/// session_ended` when the caller's token is revoked or expires.
async fn live_events(
    State(state): State<AppState>,
    session: WardSession,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = BroadcastStream::new(state.store.subscribe()).map(|item| match item {
        Ok(event) => Event::default().event("ticket").id(event.id.to_string()).data(&*event.ticket_json),
        Err(BroadcastStreamRecvError::Lagged(missed)) => {
            Event::default().event("resync").data(format!("{{\"missed\":{missed}}}"))
        }
    });
    live_feed(events, Arc::clone(&state.verifier), session.principal, state.shutdown.clone())
}

#[derive(Serialize)]
struct SyncStatus {
    /// Whether the node has a bridge to sync with.
    bridge_configured: bool,
    #[serde(flatten)]
    link: crate::sync::LinkStatus,
    /// When the bridge last acknowledged or sent changes (ms since the epoch).
    last_sync_at: Option<i64>,
    last_sync_at_utc: Option<String>,
    outbox: store::OutboxCounts,
    /// Whether every ticket is to be compared with the cloud on the link
    /// (after a restore, or asked for); when that last finished.
    reconcile_requested: bool,
    reconciled_at: Option<i64>,
    reconciled_at_utc: Option<String>,
}

fn millis(bytes: Option<Vec<u8>>) -> Option<i64> {
    bytes.and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok()).map(i64::from_be_bytes)
}

async fn sync_status(State(state): State<AppState>, _caller: Caller) -> Result<Json<SyncStatus>, ApiError> {
    let (outbox, last_sync_at, reconcile_requested, reconciled_at) = state
        .store
        .read(|conn| {
            Ok((
                store::outbox_counts(conn)?,
                millis(store::sync_state(conn, "last_sync_at")?),
                store::sync_state(conn, store::RECONCILE_KEY)?.is_some(),
                millis(store::sync_state(conn, store::RECONCILED_AT_KEY)?),
            ))
        })
        .await?;
    let link = state.link.lock().map(|link| link.clone()).unwrap_or_default();
    let bridge_configured = state.config.sync.is_some();
    Ok(Json(SyncStatus {
        bridge_configured,
        link,
        last_sync_at,
        last_sync_at_utc: last_sync_at.map(utc_iso8601),
        outbox,
        reconcile_requested,
        reconciled_at,
        reconciled_at_utc: reconciled_at.map(utc_iso8601),
    }))
}

/// An operator asks for every ticket to be compared with the cloud: on the
/// link, what the cloud lacks of this node's changes is sent again.
async fn request_reconcile(State(state): State<AppState>, Caller(actor): Caller) -> Result<StatusCode, ApiError> {
    if actor.role != Role::Admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_role",
            "a reconciliation is an admin's to ask for",
        ));
    }
    state.store.write_all(Write::RequestReconcile, now_ms()).await?;
    tracing::info!(user = %actor.user, "reconciliation with the cloud requested");
    Ok(StatusCode::ACCEPTED)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    username: String,
    password: String,
}

/// Logs a ward's staff member in at the edge while the cloud is out of
/// reach, against the password hash cached while it was reachable. While
/// the node is linked, staff log in at the auth service instead.
async fn offline_login(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<LoginRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let linked = state.link.lock().map(|link| link.connected).unwrap_or(false);
    if linked {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "cloud_reachable",
            "the cloud is reachable: log in at the auth service",
        ));
    }
    let (token, expires_in) =
        state.cloud_auth.offline_login(&request.username, request.password).await.map_err(|error| match error {
            LoginError::Invalid => ApiError::new(StatusCode::UNAUTHORIZED, "invalid_credentials", error.to_string()),
            LoginError::Throttled => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_attempts", error.to_string())
            }
            LoginError::Task(_) | LoginError::Signing(_) => ApiError::internal(error),
        })?;
    Ok(Json(serde_json::json!({
        "access_token": token, "token_type": "Bearer", "expires_in": expires_in, "offline": true,
    })))
}

async fn ready(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state
        .store
        .read(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?))
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the database is not reachable"))?;
    if state.shutdown.is_cancelled() {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the node is shutting down"));
    }
    Ok("ready")
}

async fn prometheus_metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let outbox = state.store.read(store::outbox_counts).await?;
    metrics::gauge!("edge_outbox_pending").set(outbox.pending as f64);
    metrics::gauge!("edge_outbox_stuck").set(outbox.stuck as f64);
    let body = state.metrics.render();
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body))
}
