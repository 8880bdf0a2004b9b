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

use std::collections::VecDeque;
use std::convert::Infallible;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_bytes::ByteBuf;
use service_kit::clock::now_ms;
use sync_protocol::session::{CloseReason, EdgeAction, EdgePhase, EdgeSession, reconnect_delay_ms};
use sync_protocol::wire::{
    self, DatabaseId, Hello, PROTOCOL_VERSION, RefusalReason, Refused, UpstreamChange, WireLimits,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::config::SyncConfig;
use crate::store::{self, Write};

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

/// One connection's end: why, and whether reconnecting may help.
#[derive(Debug)]
struct Stop {
    reason: String,
    retryable: bool,
}

impl Stop {
    fn retry(reason: impl Into<String>) -> Self {
        Stop { reason: reason.into(), retryable: true }
    }
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect_once(
    state: &AppState,
    config: &SyncConfig,
    status: &SharedLinkStatus,
    shutdown: &CancellationToken,
) -> Ended {
    let (socket, hello) = match connect(state, config).await {
        Ok(connected) => connected,
        Err(Stop { reason, retryable }) => return Ended { reason, retryable, established: false },
    };
    let database = hello.database;
    let (session, actions) = EdgeSession::start(hello, config.session, now_ms());
    let (sink, stream) = socket.split();
    let mut link =
        Link { state, config, status, session, sink, limits: config.session.limits, database, established: false };
    let Err(Stop { reason, retryable }) = link.drive(stream, actions.into(), shutdown).await;
    Ended { reason, retryable, established: link.established }
}

/// Opens the WebSocket with the node's token and builds its `Hello` from
/// the stored sync state.
async fn connect(state: &AppState, config: &SyncConfig) -> Result<(Socket, Hello), Stop> {
    let token = state.cloud_auth.node_token(&config.token_file).await.map_err(|e| Stop::retry(e.to_string()))?;
    let identity = state
        .store
        .read(store::sync_identity)
        .await
        .map_err(|e| Stop::retry(format!("cannot read the sync state: {e}")))?;
    let mut request =
        config.bridge_url.as_str().into_client_request().map_err(|e| Stop::retry(format!("bad bridge url: {e}")))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| Stop::retry("the node token is not a valid header value"))?;
    request.headers_mut().insert("authorization", bearer);
    let limits = config.session.limits;
    let socket_config = WebSocketConfig::default()
        .max_message_size(Some(limits.frame_bytes_max))
        .max_frame_size(Some(limits.frame_bytes_max));
    let connecting = tokio_tungstenite::connect_async_with_config(request, Some(socket_config), true);
    let socket = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok((socket, _))) => socket,
        Ok(Err(tungstenite::Error::Http(response))) if response.status().as_u16() == 403 => {
            return Err(Stop { reason: "the bridge forbids this node's token".into(), retryable: false });
        }
        Ok(Err(tungstenite::Error::Http(response))) if response.status().as_u16() == 401 => {
            state.cloud_auth.forget_node_token().await;
            return Err(Stop::retry("the bridge refused the node's token (revoked or expired)"));
        }
        Ok(Err(e)) => return Err(Stop::retry(format!("cannot connect: {e}"))),
        Err(_) => return Err(Stop::retry("connecting timed out")),
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
    Ok((socket, hello))
}

/// The driver of one connection: it moves frames between the socket and
/// the session, and does what the session's actions say to the store.
/// Every protocol decision is the session's.
struct Link<'a> {
    state: &'a AppState,
    config: &'a SyncConfig,
    status: &'a SharedLinkStatus,
    session: EdgeSession,
    sink: SplitSink<Socket, WsMessage>,
    limits: WireLimits,
    database: DatabaseId,
    /// Whether the session got as far as holding its lease.
    established: bool,
}

impl Link<'_> {
    /// Runs the connection until it ends; only ever returns why.
    async fn drive(
        &mut self,
        mut stream: SplitStream<Socket>,
        mut queue: VecDeque<EdgeAction>,
        shutdown: &CancellationToken,
    ) -> Result<Infallible, Stop> {
        let mut events = self.state.store.subscribe();
        let mut ticks = tokio::time::interval(TICK_INTERVAL);
        loop {
            while let Some(action) = queue.pop_front() {
                queue.extend(self.perform(action).await?);
            }
            if let Some(more) = self.next_demand().await? {
                queue.extend(more);
                continue;
            }
            if self.session.phase() == EdgePhase::Closed {
                return Err(Stop::retry("session closed"));
            }
            tokio::select! {
                frame = stream.next() => queue.extend(self.receive(frame)?),
                // A local write: there may be something new to send.
                _ = events.recv() => {}
                _ = ticks.tick() => queue.extend(self.tick().await?),
                _ = shutdown.cancelled() => {
                    let _ = self.sink.close().await;
                    return Err(Stop::retry("shutting down"));
                }
            }
        }
    }

    /// Does one of the session's actions; returns the actions it leads to.
    async fn perform(&mut self, action: EdgeAction) -> Result<Vec<EdgeAction>, Stop> {
        let node = self.state.config.node.id.clone();
        let write = match action {
            EdgeAction::Send(message) => {
                let frame = wire::encode(&message, &self.limits).map_err(|e| Stop::retry(format!("encode: {e}")))?;
                self.sink.send(WsMessage::Binary(frame.into())).await.map_err(|e| Stop::retry(format!("send: {e}")))?;
                return Ok(Vec::new());
            }
            EdgeAction::HoldLease(lease) => {
                // Durable before anything else is sent: the next message confirms it.
                self.write(Write::HoldLease { lease }, "cannot store the lease").await?;
                self.mark_up();
                return Ok(Vec::new());
            }
            EdgeAction::ApplyDownstream { changes, cursor } => {
                let changes = changes.into_iter().map(|c| (c.ticket, c.change.into_vec())).collect();
                self.write(Write::ApplyRemote { changes, cursor: cursor.as_bytes().to_vec() }, "cannot apply").await?;
                return Ok(self.session.downstream_applied(cursor, now_ms()));
            }
            EdgeAction::Close(reason) => {
                let _ = self.sink.close().await;
                if let CloseReason::Refused(Refused { reason: RefusalReason::Unauthorized, .. }) = &reason {
                    self.state.cloud_auth.forget_node_token().await;
                }
                return Err(Stop { reason: format!("{reason:?}"), retryable: reason.retryable() });
            }
            EdgeAction::Resend { missing } => Write::Resend { missing, node },
            EdgeAction::ReconcileDone => Write::ReconcileDone,
            EdgeAction::Acked { up_to_seq } => Write::Acked { up_to_seq },
            EdgeAction::Stuck { seq, code, message, .. } => Write::Stuck { seq, code: format!("{code:?}"), message },
        };
        self.write(write, "cannot store").await?;
        Ok(Vec::new())
    }

    async fn write(&self, write: Write, what: &str) -> Result<(), Stop> {
        match self.state.store.write_all(write, now_ms()).await {
            Ok(_) => Ok(()),
            Err(e) => Err(Stop::retry(format!("{what}: {e}"))),
        }
    }

    fn mark_up(&mut self) {
        if self.established {
            return;
        }
        self.established = true;
        set_status(self.status, |s| {
            s.connected = true;
            s.last_error = None;
            s.needs_attention = false;
        });
        tracing::info!(bridge = %self.config.bridge_url, database = %self.database, "sync link up");
    }

    /// Reads what the session asks for next (the next tickets to reconcile,
    /// or the next outbox batch) and hands it over; `None` when it asks for nothing.
    async fn next_demand(&mut self) -> Result<Option<Vec<EdgeAction>>, Stop> {
        if let Some(demand) = self.session.reconcile_demand() {
            let replica = self.state.store.replica().clone();
            let read = move |conn: &_| store::ticket_heads(conn, &replica, demand.after, demand.tickets_max);
            let tickets = self
                .state
                .store
                .read(read)
                .await
                .map_err(|e| Stop::retry(format!("cannot read the tickets to reconcile: {e}")))?;
            return Ok(Some(self.session.send_reconcile(tickets, now_ms())));
        }
        let Some(demand) = self.session.upstream_demand() else { return Ok(None) };
        let read =
            move |conn: &_| store::outbox_batch(conn, demand.after_seq, demand.changes_max, demand.change_bytes_max);
        let batch =
            self.state.store.read(read).await.map_err(|e| Stop::retry(format!("cannot read the outbox: {e}")))?;
        if batch.is_empty() {
            return Ok(None);
        }
        let changes = batch
            .into_iter()
            .map(|entry| UpstreamChange { seq: entry.seq, ticket: entry.ticket, change: ByteBuf::from(entry.change) })
            .collect();
        Ok(Some(self.session.send_upstream(changes, now_ms())))
    }

    fn receive(&mut self, frame: Option<Result<WsMessage, tungstenite::Error>>) -> Result<Vec<EdgeAction>, Stop> {
        match frame {
            Some(Ok(WsMessage::Binary(bytes))) => Ok(match wire::decode(&bytes, &self.limits) {
                Ok(message) => self.session.on_message(message, now_ms()),
                Err(error) => self.session.on_frame_error(&error),
            }),
            Some(Ok(WsMessage::Close(_))) | None => Err(Stop::retry("the bridge closed the connection")),
            Some(Ok(_)) => Ok(Vec::new()),
            Some(Err(e)) => Err(Stop::retry(format!("receive: {e}"))),
        }
    }

    /// Heartbeats, and the reconciliation a restore or an operator asked
    /// for, when the session wants to know.
    async fn tick(&mut self) -> Result<Vec<EdgeAction>, Stop> {
        let actions = self.session.on_tick(now_ms());
        if self.session.wants_reconcile_request() {
            let asked = self.state.store.read(|conn| store::sync_state(conn, store::RECONCILE_KEY)).await;
            match asked {
                Ok(Some(_)) => self.session.request_reconcile(),
                Ok(None) => {}
                Err(e) => return Err(Stop::retry(format!("cannot read the sync state: {e}"))),
            }
        }
        Ok(actions)
    }
}
