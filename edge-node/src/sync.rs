//! The edge node's link to the cloud bridge: a thin driver of
//! [`EdgeSession`], which holds every protocol rule.
//!
//! It connects with the node's token, resumes the downstream feed from the
//! stored cursor, sends the outbox in pipelined batches, removes from the
//! outbox only what the bridge acknowledged, applies downstream changes with
//! the cursor in one transaction, and reconnects with capped exponential
//! backoff and jitter. A refusal that retrying cannot fix (a protocol
//! version mismatch, a forbidden token) is logged once, shown in the status,
//! and retried only at the cap, never in a tight loop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_bytes::ByteBuf;
use sync_protocol::session::{EdgeAction, EdgePhase, EdgeSession, reconnect_delay_ms};
use sync_protocol::wire::{self, Hello, PROTOCOL_VERSION, UpstreamChange};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::config::SyncConfig;
use crate::store::{self, Write};
use service_kit::clock::now_ms;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const TICK_INTERVAL: Duration = Duration::from_millis(500);

/// What the sync status endpoint and metrics show.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkStatus {
    pub connected: bool,
    /// Why the last connection ended or could not start.
    pub last_error: Option<String>,
    /// Whether the last error needs a person (version mismatch, forbidden token).
    pub needs_attention: bool,
}

pub type SharedLinkStatus = Arc<Mutex<LinkStatus>>;

fn set_status(status: &SharedLinkStatus, update: impl FnOnce(&mut LinkStatus)) {
    if let Ok(mut status) = status.lock() {
        update(&mut status);
        metrics::gauge!("edge_sync_connected").set(if status.connected { 1.0 } else { 0.0 });
    }
}

/// Why one connection ended.
#[derive(Debug)]
struct Ended {
    reason: String,
    /// Whether reconnecting may help without a person.
    retryable: bool,
    /// Whether the session got as far as `Welcome` (resets the backoff).
    established: bool,
}

/// Keeps the node linked to the bridge until `shutdown`.
pub async fn run(state: AppState, config: SyncConfig, status: SharedLinkStatus, shutdown: CancellationToken) {
    let mut attempt = 0u32;
    while !shutdown.is_cancelled() {
        let ended = connect_once(&state, &config, &status, &shutdown).await;
        set_status(&status, |s| {
            s.connected = false;
            s.last_error = Some(ended.reason.clone());
            s.needs_attention = !ended.retryable;
        });
        if ended.established {
            attempt = 0;
        }
        let delay = if ended.retryable {
            tracing::info!(reason = %ended.reason, attempt, "sync link down; reconnecting");
            reconnect_delay_ms(attempt, config.reconnect_base_ms, config.reconnect_cap_ms, rand::random())
        } else {
            tracing::error!(reason = %ended.reason, "the bridge refused this node; a person must act (see /api/v1/sync)");
            config.reconnect_cap_ms
        };
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

async fn connect_once(
    state: &AppState,
    config: &SyncConfig,
    status: &SharedLinkStatus,
    shutdown: &CancellationToken,
) -> Ended {
    let failed = |reason: String| Ended { reason, retryable: true, established: false };
    let token = match state.cloud_auth.node_token(&config.token_file).await {
        Ok(token) => token,
        Err(reason) => return failed(reason.to_string()),
    };
    let identity = match state.store.read(store::sync_identity).await {
        Ok(identity) => identity,
        Err(e) => return failed(format!("cannot read the sync state: {e}")),
    };
    let mut request = match config.bridge_url.as_str().into_client_request() {
        Ok(request) => request,
        Err(e) => return failed(format!("bad bridge url: {e}")),
    };
    match HeaderValue::from_str(&format!("Bearer {token}")) {
        Ok(value) => request.headers_mut().insert("authorization", value),
        Err(_) => return failed("the node token is not a valid header value".into()),
    };
    let limits = config.session.limits;
    let socket_config = WebSocketConfig::default()
        .max_message_size(Some(limits.frame_bytes_max))
        .max_frame_size(Some(limits.frame_bytes_max));
    let connecting = tokio_tungstenite::connect_async_with_config(request, Some(socket_config), true);
    let socket = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok((socket, _))) => socket,
        Ok(Err(tungstenite::Error::Http(response))) if response.status().as_u16() == 403 => {
            return Ended {
                reason: "the bridge forbids this node's token".into(),
                retryable: false,
                established: false,
            };
        }
        Ok(Err(e)) => return failed(format!("cannot connect: {e}")),
        Err(_) => return failed("connecting timed out".into()),
    };
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        node: state.config.node.id.clone(),
        ward: state.config.node.ward.clone(),
        token,
        cursor: identity.cursor,
        limits,
        database: identity.database,
        lease: identity.lease,
    };
    let (mut session, actions) = EdgeSession::start(hello, config.session, now_ms());
    let (mut sink, mut stream) = socket.split();
    let mut events = state.store.subscribe();
    let mut ticks = tokio::time::interval(TICK_INTERVAL);
    let mut queue: std::collections::VecDeque<EdgeAction> = actions.into();
    let mut established = false;
    let ended = |reason: String, retryable: bool, established: bool| Ended { reason, retryable, established };
    loop {
        while let Some(action) = queue.pop_front() {
            let now = now_ms();
            let outcome: Result<Vec<EdgeAction>, String> = match action {
                EdgeAction::Send(message) => match wire::encode(&message, &limits) {
                    Ok(frame) => sink
                        .send(WsMessage::Binary(frame.into()))
                        .await
                        .map(|_| Vec::new())
                        .map_err(|e| format!("send: {e}")),
                    Err(e) => Err(format!("encode: {e}")),
                },
                EdgeAction::HoldLease(lease) => {
                    // Durable before anything else is sent: the next message confirms it.
                    let held = state.store.write_all(Write::HoldLease { lease }, now).await;
                    if held.is_ok() && !established {
                        established = true;
                        set_status(status, |s| {
                            s.connected = true;
                            s.last_error = None;
                            s.needs_attention = false;
                        });
                        tracing::info!(bridge = %config.bridge_url, database = %identity.database, "sync link up");
                    }
                    held.map(|_| Vec::new()).map_err(|e| format!("cannot store the lease: {e}"))
                }
                EdgeAction::Resend { missing } => {
                    let resend = Write::Resend { missing, node: state.config.node.id.clone() };
                    state.store.write_all(resend, now).await.map(|_| Vec::new()).map_err(|e| e.to_string())
                }
                EdgeAction::ReconcileDone => state
                    .store
                    .write_all(Write::ReconcileDone, now)
                    .await
                    .map(|_| Vec::new())
                    .map_err(|e| e.to_string()),
                EdgeAction::Acked { up_to_seq } => state
                    .store
                    .write_all(Write::Acked { up_to_seq }, now)
                    .await
                    .map(|_| Vec::new())
                    .map_err(|e| e.to_string()),
                EdgeAction::Stuck { seq, code, message, .. } => state
                    .store
                    .write_all(Write::Stuck { seq, code: format!("{code:?}"), message }, now)
                    .await
                    .map(|_| Vec::new())
                    .map_err(|e| e.to_string()),
                EdgeAction::ApplyDownstream { changes, cursor } => {
                    let changes = changes.into_iter().map(|c| (c.ticket, c.change.into_vec())).collect();
                    let applied = state
                        .store
                        .write_all(Write::ApplyRemote { changes, cursor: cursor.as_bytes().to_vec() }, now)
                        .await;
                    applied.map(|_| session.downstream_applied(cursor, now_ms())).map_err(|e| e.to_string())
                }
                EdgeAction::ApplySnapshot { tickets, cursor, .. } => {
                    // Snapshots arrive as whole documents; their changes are applied like any other.
                    let mut changes = Vec::new();
                    for snapshot in tickets {
                        match sync_protocol::document::TicketDocument::load(
                            &snapshot.document,
                            state.store.replica().clone(),
                        ) {
                            Ok(mut document) => {
                                changes.extend(document.all_changes().into_iter().map(|c| (snapshot.ticket, c)))
                            }
                            Err(e) => tracing::error!(ticket = %snapshot.ticket, error = %e, "unreadable snapshot"),
                        }
                    }
                    let applied = state
                        .store
                        .write_all(Write::ApplyRemote { changes, cursor: cursor.as_bytes().to_vec() }, now)
                        .await;
                    applied.map(|_| session.downstream_applied(cursor, now_ms())).map_err(|e| e.to_string())
                }
                EdgeAction::Close(reason) => {
                    let _ = sink.close().await;
                    return ended(format!("{reason:?}"), reason.retryable(), established);
                }
            };
            match outcome {
                Ok(more) => queue.extend(more),
                Err(reason) => return ended(reason, true, established),
            }
        }
        // Compare the next tickets with the cloud, while a reconciliation runs.
        if let Some(demand) = session.reconcile_demand() {
            let replica = state.store.replica().clone();
            let read = move |conn: &_| store::ticket_heads(conn, &replica, demand.after, demand.tickets_max);
            match state.store.read(read).await {
                Ok(tickets) => queue.extend(session.send_reconcile(tickets, now_ms())),
                Err(e) => return ended(format!("cannot read the tickets to reconcile: {e}"), true, established),
            }
            continue;
        }
        // Fill the upstream window from the outbox.
        if let Some(demand) = session.upstream_demand() {
            let batch = state
                .store
                .read(move |conn| {
                    store::outbox_batch(conn, demand.after_seq, demand.changes_max, demand.change_bytes_max)
                })
                .await;
            match batch {
                Ok(batch) if !batch.is_empty() => {
                    let changes = batch
                        .into_iter()
                        .map(|entry| UpstreamChange {
                            seq: entry.seq,
                            ticket: entry.ticket,
                            change: ByteBuf::from(entry.change),
                        })
                        .collect();
                    queue.extend(session.send_upstream(changes, now_ms()));
                    continue;
                }
                Ok(_) => {}
                Err(e) => return ended(format!("cannot read the outbox: {e}"), true, established),
            }
        }
        if session.phase() == EdgePhase::Closed {
            return ended("session closed".into(), true, established);
        }
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(WsMessage::Binary(bytes))) => match wire::decode(&bytes, &limits) {
                    Ok(message) => queue.extend(session.on_message(message, now_ms())),
                    Err(error) => queue.extend(session.on_frame_error(&error)),
                },
                Some(Ok(WsMessage::Close(_))) | None => return ended("the bridge closed the connection".into(), true, established),
                Some(Ok(_)) => {}
                Some(Err(e)) => return ended(format!("receive: {e}"), true, established),
            },
            // A local write: there may be something new to send.
            _ = events.recv() => {}
            _ = ticks.tick() => {
                queue.extend(session.on_tick(now_ms()));
                if established && !session.reconciling() {
                    match state.store.read(|conn| store::sync_state(conn, store::RECONCILE_KEY)).await {
                        Ok(Some(_)) => session.start_reconcile(),
                        Ok(None) => {}
                        Err(e) => return ended(format!("cannot read the sync state: {e}"), true, established),
                    }
                }
            }
            _ = shutdown.cancelled() => {
                let _ = sink.close().await;
                return ended("shutting down".into(), true, established);
            }
        }
    }
}
