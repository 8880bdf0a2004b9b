//! The pharmacy's HTTP API. [`crate::router`] mounts it under `/api/v1`
//! beside the sync endpoint and the health routes.
//!
//! | method | path                              | who                | what |
//! |--------|-----------------------------------|--------------------|------|
//! | GET    | /api/v1/queue                     | pharmacist, admin  | all wards' tickets, priority then age; `ward`, `status`, `priority` (comma lists), `backorder=open` (tickets with a line still owed, delivered ones included), `limit` (1-500) |
//! | GET    | /api/v1/tickets/{id}              | pharmacist, admin  | one ticket with its history and `formulary_issues`: lines whose code the catalogue lacks or retired, or whose unit differs (a ward may have ordered offline against an older catalogue; none are flagged while the catalogue is empty) |
//! | PATCH  | /api/v1/tickets/{id}              | pharmacist, admin  | notes (`{"notes": {"append": ..}}` or `{"replace": ..}`, merged with the ward's character by character), assignee (take a ticket: your own user; assign a colleague; `null` to release), `supply` per line (`[{medication_code, quantity, substitute?: {medication_code, description, reason}, shortfall?: "backorder" \| "closed-short", reason?}]`, while acknowledged, picking or dispatched, and to fill or close a backorder once delivered); 200 or 202 as for transitions |
//! | GET    | /api/v1/tickets/{id}/fhir         | pharmacist, admin  | the ticket as a FHIR R4 Bundle: a Task, a SupplyRequest per line, a SupplyDelivery per supplied line |
//! | POST   | /api/v1/tickets/{id}/transitions  | pharmacist, admin  | acknowledge, picking, dispatched, rejected (with a reason), resolve a conflict; 200 once reads show it, 202 if stored but not yet shown (distributed backend) |
//! | GET    | /api/v1/tickets/{id}/audit        | pharmacist, admin  | the ticket's trail: `format` `jsonl` (default) or `csv`; optional `from`, `to` |
//! | GET    | /api/v1/audit                     | pharmacist, admin  | a ward's trail: `ward`, `from`, `to` (ISO 8601, e.g. `2026-12-01T00:00:00Z`), `format`; at most `cloud_store::TRAIL_TICKETS_MAX` tickets (422 `range_too_large` beyond) |
//! | GET    | /api/v1/formulary                 | pharmacist, admin, edge nodes | the medication catalogue, by code, with an `ETag` (304 to a matching `If-None-Match`): edge nodes keep a copy |
//! | PUT    | /api/v1/formulary/{code}          | admin              | add (201) or replace (200) an entry: `{code, name, strength, form, unit, gtins, active}`; retire one with `active: false` |
//! | GET    | /api/v1/nodes                     | pharmacist, admin  | per-node sync diagnostics |
//! | GET    | /api/v1/events                    | pharmacist, admin  | live ticket changes (Server-Sent Events); `ward` filter |
//! | GET    | /sync                             | edge nodes         | WebSocket sync |
//! | GET    | /healthz, /readyz, /metrics       | anyone on the port | liveness, readiness (names the service that is down), Prometheus |
//!
//! Every refusal, the framework's own included, is
//! `{"error": {"code", "message"}}` with the statuses, codes and type-error
//! rule of the edge node's API (`edge-node/src/api.rs`), and these of its own:
//! 422 `over_supply`, `shortfall_required`, `not_short`, `invalid_substitute`,
//! `unknown_line`, `reason_required` for a supply the rules refuse;
//! 403 `forbidden_role` for a caller who is not pharmacy staff (or, on
//! `/sync`, not an edge node); 400 `websocket_upgrade_required` for `/sync`
//! without a valid WebSocket upgrade; 503 `storage_unavailable` while a
//! backing service is down.
//!
//! Sessions are bound to their tokens: the live feed ends with
//! `event: session_ended` (`token_expired`, `token_revoked`), and a sync
//! WebSocket with a `Refused { Unauthorized }` frame and a close, within one
//! second of the bridge learning it (revocations arrive every
//! `auth.refresh_interval_s`). A text frame on `/sync` is answered with
//! `Error { Malformed }` and a close.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use cloud_store::{NodeDiagnostics, QueueQuery, TicketView};
use std::convert::Infallible;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use service_kit::clock::now_ms;
use service_kit::http::{ApiError, ApiJson, TicketPath, live_feed, page_limit, parse_list};
use sha2::{Digest, Sha256};
use sync_protocol::document::{Mutation, TicketDocument, TicketEdit, TransitionRequest};
use sync_protocol::formulary::{FormularyIssue, Medication};
use sync_protocol::ids::{Role, TicketId, WardId};
use sync_protocol::ticket::{Priority, Status, Ticket, UnixMillis, utc_iso8601};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::AppState;
use crate::caller::{CatalogueReader, PharmacyCaller, PharmacySession, refusal};

const QUEUE_LIMIT_DEFAULT: usize = 100;
const QUEUE_LIMIT_MAX: usize = 500;

/// The pharmacy's routes, under `/api/v1`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/queue", get(queue))
        .route("/tickets/{id}", get(ticket).patch(edit))
        .route("/tickets/{id}/fhir", get(fhir))
        .route("/tickets/{id}/transitions", post(transition))
        .route("/tickets/{id}/audit", get(ticket_audit))
        .route("/audit", get(ward_audit))
        .route("/formulary", get(formulary))
        .route("/formulary/{code}", put(put_medication))
        .route("/nodes", get(nodes))
        .route("/events", get(live_events))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueParams {
    ward: Option<String>,
    status: Option<String>,
    priority: Option<String>,
    backorder: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct QueuePage {
    tickets: Vec<Box<RawValue>>,
    /// Tickets matching the filters, beyond the `limit` shown.
    total: u64,
}

async fn queue(
    State(state): State<AppState>,
    _caller: PharmacyCaller,
    params: Result<Query<QueueParams>, QueryRejection>,
) -> Result<Json<QueuePage>, ApiError> {
    let Query(params) = params?;
    let limit = page_limit(params.limit, QUEUE_LIMIT_DEFAULT, QUEUE_LIMIT_MAX)?;
    let query = QueueQuery {
        wards: parse_list(params.ward.as_deref(), |s| s.parse::<WardId>().ok(), "invalid_ward")?,
        statuses: parse_list(params.status.as_deref(), Status::parse, "invalid_status")?,
        priorities: parse_list(params.priority.as_deref(), Priority::parse, "invalid_priority")?,
        open_backorders: match params.backorder.as_deref() {
            None => false,
            Some("open") => true,
            Some(other) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_backorder",
                    format!("backorder={other:?}: only open"),
                ));
            }
        },
        limit,
    };
    let page = state.store.queue(query).await.map_err(refusal)?;
    let tickets =
        page.tickets.into_iter().map(RawValue::from_string).collect::<Result<_, _>>().map_err(ApiError::internal)?;
    Ok(Json(QueuePage { tickets, total: page.total }))
}

/// A ticket as the pharmacy reads it: with its trail, and the lines the
/// catalogue flags.
#[derive(Serialize)]
struct PharmacyTicket {
    #[serde(flatten)]
    view: TicketView,
    formulary_issues: Vec<FormularyIssue>,
}

async fn ticket(
    State(state): State<AppState>,
    _caller: PharmacyCaller,
    TicketPath(id): TicketPath,
) -> Result<Json<PharmacyTicket>, ApiError> {
    let view = state.store.ticket(id).await.map_err(refusal)?;
    let codes = view.ticket.items.iter().map(|item| item.medication_code.clone()).collect();
    let (entries, catalogue_size) = state.store.formulary(Some(codes)).await.map_err(refusal)?;
    let formulary_issues = if catalogue_size == 0 {
        Vec::new() // no catalogue loaded yet: nothing to check against
    } else {
        sync_protocol::formulary::check_items(&view.ticket.items, |code| entries.iter().find(|e| e.code == code))
    };
    Ok(Json(PharmacyTicket { view, formulary_issues }))
}

/// The whole catalogue with an ETag (a digest of it): an edge node asking
/// again with `If-None-Match` gets 304 while it is unchanged.
async fn formulary(
    State(state): State<AppState>,
    _caller: CatalogueReader,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let entries = state.store.formulary(None).await.map_err(refusal)?.0;
    let body = serde_json::to_vec(&entries).map_err(ApiError::internal)?;
    let etag = format!("\"{}\"", hex::encode(Sha256::digest(&body)));
    if headers.get(header::IF_NONE_MATCH).is_some_and(|held| held.as_bytes() == etag.as_bytes()) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Ok(([(header::CONTENT_TYPE, "application/json".to_owned()), (header::ETAG, etag)], body).into_response())
}

/// An admin adds or replaces an entry of the catalogue.
async fn put_medication(
    State(state): State<AppState>,
    PharmacyCaller(actor): PharmacyCaller,
    Path(code): Path<String>,
    ApiJson(medication): ApiJson<Medication>,
) -> Result<(StatusCode, Json<Medication>), ApiError> {
    if actor.role != Role::Admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_role",
            "the formulary is kept by a pharmacy admin",
        ));
    }
    if medication.code != code {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "code_mismatch",
            format!("the path names {code:?}, the body {:?}", medication.code),
        ));
    }
    medication.validate(&state.config.limits)?;
    let created = state.store.put_medication(medication.clone()).await.map_err(refusal)?;
    tracing::info!(user = %actor.user, code = %medication.code, active = medication.active, created, "formulary entry written");
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(medication)))
}

async fn fhir(
    State(state): State<AppState>,
    _caller: PharmacyCaller,
    TicketPath(id): TicketPath,
) -> Result<impl IntoResponse, ApiError> {
    let TicketView { ticket, .. } = state.store.ticket(id).await.map_err(refusal)?;
    Ok(([(header::CONTENT_TYPE, "application/fhir+json")], Json(sync_protocol::fhir::ticket_bundle(&ticket))))
}

async fn edit(
    State(state): State<AppState>,
    PharmacyCaller(actor): PharmacyCaller,
    TicketPath(id): TicketPath,
    ApiJson(edit): ApiJson<TicketEdit>,
) -> Result<(StatusCode, Json<Ticket>), ApiError> {
    let now = now_ms();
    let limits = state.config.limits.clone();
    let mutation = Box::new(move |doc: &mut TicketDocument| doc.edit(&edit, &actor, now, &limits));
    write(&state, id, mutation).await
}

async fn transition(
    State(state): State<AppState>,
    PharmacyCaller(actor): PharmacyCaller,
    TicketPath(id): TicketPath,
    ApiJson(request): ApiJson<TransitionRequest>,
) -> Result<(StatusCode, Json<Ticket>), ApiError> {
    let now = now_ms();
    let limits = state.config.limits.clone();
    let mutation = Box::new(move |doc: &mut TicketDocument| doc.transition(&request, &actor, now, &limits));
    write(&state, id, mutation).await
}

async fn write(state: &AppState, id: TicketId, mutation: Mutation) -> Result<(StatusCode, Json<Ticket>), ApiError> {
    let outcome = state.store.pharmacy_write(id, mutation).await.map_err(refusal)?;
    // Stored either way; 202 says the queue and the wards will show it shortly.
    let status = if outcome.visible { StatusCode::OK } else { StatusCode::ACCEPTED };
    Ok((status, Json(outcome.ticket)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    ward: Option<String>,
    from: Option<String>,
    to: Option<String>,
    format: Option<String>,
}

impl AuditParams {
    /// The range asked for, in ms; open ends are the whole history.
    fn range(&self) -> Result<(UnixMillis, UnixMillis), ApiError> {
        let at = |value: Option<&str>, default: UnixMillis| match value {
            None => Ok(default),
            Some(text) => time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as UnixMillis)
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_time",
                        format!("{text:?} is not an ISO 8601 time with a zone"),
                    )
                }),
        };
        let (from, to) = (at(self.from.as_deref(), UnixMillis::MIN)?, at(self.to.as_deref(), UnixMillis::MAX)?);
        if from > to {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_range", "from is after to"));
        }
        Ok((from, to))
    }

    fn export(&self, views: &[TicketView], from: UnixMillis, to: UnixMillis) -> Result<Response, ApiError> {
        let lines = crate::audit::lines(views, from, to);
        let (content_type, body) = match self.format.as_deref().unwrap_or("jsonl") {
            "jsonl" => ("application/x-ndjson", crate::audit::jsonl(&lines).map_err(ApiError::internal)?),
            "csv" => ("text/csv; charset=utf-8", crate::audit::csv(&lines).map_err(ApiError::internal)?),
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_format",
                    format!("format {other:?}: jsonl or csv"),
                ));
            }
        };
        Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
    }
}

/// One ticket's trail, for an auditor.
async fn ticket_audit(
    State(state): State<AppState>,
    _caller: PharmacyCaller,
    TicketPath(id): TicketPath,
    params: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params?;
    if params.ward.is_some() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", "a ticket's trail takes no ward"));
    }
    let (from, to) = params.range()?;
    let view = state.store.ticket(id).await.map_err(refusal)?;
    params.export(std::slice::from_ref(&view), from, to)
}

/// A ward's trail over a range, for an auditor.
async fn ward_audit(
    State(state): State<AppState>,
    _caller: PharmacyCaller,
    params: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params?;
    let ward: WardId = params
        .ward
        .as_deref()
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "invalid_ward", "a ward's trail needs `ward`"))?;
    if params.from.is_none() || params.to.is_none() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_range", "a ward's trail needs `from` and `to`"));
    }
    let (from, to) = params.range()?;
    let views = state.store.trail(&ward, from, to).await.map_err(refusal)?;
    params.export(&views, from, to)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventParams {
    ward: Option<String>,
}

/// Live ticket changes of all wards (or those named), as Server-Sent
/// Events: `event: ticket` with the ticket's JSON, or `event: resync` when
/// this subscriber fell behind and must read the queue again. Ends with
/// `event: session_ended` when the caller's token is revoked or expires.
async fn live_events(
    State(state): State<AppState>,
    session: PharmacySession,
    params: Result<Query<EventParams>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(params) = params?;
    let wards: Vec<WardId> = parse_list(params.ward.as_deref(), |s| s.parse::<WardId>().ok(), "invalid_ward")?;
    let events = BroadcastStream::new(state.store.subscribe()).filter_map(move |item| {
        std::future::ready(match item {
            Ok(notice) if wards.is_empty() || wards.contains(&notice.ward) => {
                Some(Event::default().event("ticket").data(&*notice.ticket_json))
            }
            Ok(_) => None,
            Err(BroadcastStreamRecvError::Lagged(missed)) => {
                Some(Event::default().event("resync").data(format!("{{\"missed\":{missed}}}")))
            }
        })
    });
    Ok(live_feed(events, Arc::clone(&state.verifier), session.principal, state.shutdown.clone()))
}

/// A node's diagnostics, with its times also in ISO 8601 UTC.
#[derive(Serialize)]
struct NodeView {
    #[serde(flatten)]
    node: NodeDiagnostics,
    last_seen_utc: String,
    taken_over_at_utc: Option<String>,
}

async fn nodes(State(state): State<AppState>, _caller: PharmacyCaller) -> Result<Json<Vec<NodeView>>, ApiError> {
    let nodes = state.store.diagnostics().await.map_err(refusal)?;
    let view = |node: NodeDiagnostics| NodeView {
        last_seen_utc: utc_iso8601(node.last_seen),
        taken_over_at_utc: node.taken_over_at.map(utc_iso8601),
        node,
    };
    Ok(Json(nodes.into_iter().map(view).collect()))
}

pub(crate) async fn ready(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state
        .store
        .ready()
        .await
        .map_err(|error| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", format!("not ready: {error}")))?;
    // Still ready without a projector: edges' changes are durable on the
    // brokers, and refusing them would only pile them up on the wards.
    match state.store.projectors_running() {
        Some(0) => Ok("ready; degraded: no projector running, so stored changes do not reach reads or feeds"),
        _ => Ok("ready"),
    }
}
