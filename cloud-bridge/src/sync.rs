//! The WebSocket endpoint edge nodes sync through: a thin driver of
//! [`BridgeSession`], which holds every protocol rule.
//!
//! The node's token is checked at the upgrade (an edge-node token, for the
//! node it names) and again against the `Hello` (same node, a ward the token
//! covers). Upstream batches are stored durably before they are
//! acknowledged. The downstream feed reads the ward's change log from the
//! node's cursor, wakes on notices of new changes, and falls back to polling
//! so a missed notice only delays, never loses, a change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use cloud_store::{Feed, FeedLimits, LeaseUpdate, StoreError};
use futures_util::{SinkExt, StreamExt};
use service_kit::clock::now_ms;
use sync_protocol::admission::{Admission, Claim};
use sync_protocol::ids::{NodeId, WardId};
use sync_protocol::session::{BridgeAction, BridgePhase, BridgeSession};
use sync_protocol::token::Principal;
use sync_protocol::wire::{self, DatabaseId, Lease, Message, RefusalReason, Refused};
use tokio::sync::Notify;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::AppState;
use crate::caller::EdgeCaller;

/// How often a feed looks for changes when no notice arrived.
const FEED_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Heartbeat checks.
const TICK_INTERVAL: Duration = Duration::from_millis(500);
/// How often an open session renews its presence (a third of how long it
/// holds in the distributed store).
const PRESENCE_RENEW_INTERVAL: Duration = Duration::from_secs(5);

/// The nodes with a sync session open on this bridge instance: a second
/// session of a node is refused while the first is open, and the first is
/// asked to take a new lease (a copy of its database started beside it;
/// see `sync_protocol::admission`).
#[derive(Debug, Default)]
pub struct OpenSessions(Mutex<HashMap<NodeId, Arc<Notify>>>);

/// A node's place in [`OpenSessions`], given up when its session ends.
#[derive(Debug)]
struct OpenSession {
    sessions: Arc<OpenSessions>,
    node: NodeId,
    /// Notified when another connection showed this database's lease.
    renew: Arc<Notify>,
}

impl OpenSessions {
    /// Takes the node's place; `Err` with the open session's renewal signal
    /// if another session of it holds the place.
    fn open(self: &Arc<Self>, node: &NodeId) -> Result<OpenSession, Arc<Notify>> {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(renew) = open.get(node) {
            return Err(Arc::clone(renew));
        }
        let renew = Arc::new(Notify::new());
        open.insert(node.clone(), Arc::clone(&renew));
        Ok(OpenSession { sessions: Arc::clone(self), node: node.clone(), renew })
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.sessions.0.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.node);
    }
}

/// Waits until the open session is asked to take a new lease; never, before admission.
async fn renewal_asked(admitted: &Option<(OpenSession, DatabaseId)>) -> DatabaseId {
    match admitted {
        Some((open, database)) => {
            open.renew.notified().await;
            *database
        }
        None => std::future::pending().await,
    }
}

/// Upgrades an edge node's request to the sync WebSocket and drives it.
pub async fn upgrade(
    State(state): State<AppState>,
    EdgeCaller(principal): EdgeCaller,
    ws: WebSocketUpgrade,
) -> Response {
    let limits = state.config.session.limits;
    ws.max_message_size(limits.frame_bytes_max)
        .max_frame_size(limits.frame_bytes_max)
        .on_upgrade(move |socket| async move {
            let node = principal.user.clone();
            let mut admitted = None;
            if let Err(error) = drive(socket, state.clone(), principal, &mut admitted).await {
                tracing::info!(%node, %error, "sync connection ended");
            }
            if let Some((open, _)) = admitted {
                // Before the place here is given up, so that a session
                // admitted after it on this instance keeps its presence.
                if let Err(error) = state.store.leave(&open.node).await {
                    tracing::debug!(%node, %error, "a session's presence was left to lapse");
                }
            }
        })
        .into_response()
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum DriveError {
    #[error("socket: {0}")]
    Socket(#[from] axum::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Runs one connection; `admitted` holds the node's place and database
/// once its hello was admitted.
async fn drive(
    socket: WebSocket,
    state: AppState,
    principal: Principal,
    admitted: &mut Option<(OpenSession, DatabaseId)>,
) -> Result<(), DriveError> {
    let config = state.config.session;
    let (mut sink, mut stream) = socket.split();
    let mut session = BridgeSession::new(config, now_ms());
    let mut notices = state.store.subscribe();
    let mut ticks = tokio::time::interval(TICK_INTERVAL);
    let mut poll = tokio::time::interval(FEED_POLL_INTERVAL);
    let mut presence = tokio::time::interval(PRESENCE_RENEW_INTERVAL);
    // The feed once started, and whether it may have more to read.
    let mut feed: Option<Feed> = None;
    let mut feed_wanted = false;
    let mut actions = Vec::new();
    loop {
        while let Some(action) = (!actions.is_empty()).then(|| actions.remove(0)) {
            match action {
                BridgeAction::Send(message) => {
                    let frame = wire::encode(&message, &config.limits).map_err(axum::Error::new)?;
                    sink.send(WsMessage::Binary(frame.into())).await?;
                }
                BridgeAction::Authenticate { node, ward, token, database, lease } => {
                    let result = match authenticate(&state, &principal, &node, &ward, &token) {
                        Ok(()) => admit(&state, &node, &ward, database, lease).await,
                        Err(refused) => Err(refused),
                    };
                    let result = result.map(|(open, lease)| {
                        *admitted = Some((open, database));
                        lease
                    });
                    actions.extend(session.authenticated(result, now_ms()));
                }
                BridgeAction::LeaseHeld { lease } => {
                    if let (Some((node, _)), Some((_, database))) = (session.peer(), &*admitted) {
                        let update = LeaseUpdate::Confirm { database: *database, lease };
                        state.store.update_lease(node.clone(), update).await?;
                    }
                }
                BridgeAction::Store { changes } => {
                    let (node, ward) =
                        session.peer().map(|(n, w)| (n.clone(), w.clone())).expect("stores only after hello");
                    let rejections = state.store.store_upstream(node, ward, changes).await?;
                    actions.extend(session.stored(rejections, now_ms()));
                }
                BridgeAction::CheckHeads { tickets, last } => {
                    let ward = session.peer().map(|(_, ward)| ward.clone()).expect("checks only after hello");
                    let missing = state.store.missing_heads(ward, tickets).await?;
                    if !missing.is_empty() {
                        tracing::warn!(node = %principal.user, tickets = missing.len(), "a node holds changes the cloud lacks");
                    }
                    actions.extend(session.heads_checked(missing, last, now_ms()));
                }
                BridgeAction::StartFeed { cursor } => {
                    let (node, ward) =
                        session.peer().map(|(n, w)| (n.clone(), w.clone())).expect("the feed starts after hello");
                    feed = Some(state.store.open_feed(node, ward, cursor.as_ref()).await?);
                    feed_wanted = true;
                }
                BridgeAction::DownstreamAcked { cursor } => {
                    if let Some((node, _)) = session.peer() {
                        state.store.note_cursor(node.clone(), &cursor);
                    }
                }
                BridgeAction::Close(reason) => {
                    tracing::info!(node = %principal.user, ?reason, "closing sync session");
                    let _ = sink.close().await;
                    return Ok(());
                }
            }
        }
        if let (Some(open), true, Some(demand)) = (feed.as_mut(), feed_wanted, session.downstream_demand()) {
            let limits = FeedLimits { changes_max: demand.changes_max, bytes_max: demand.change_bytes_max };
            match state.store.read_feed(open, limits).await? {
                // Sent even when every change read was the node's own (none
                // to apply): the node then keeps the position, and its next
                // session starts from it instead of without a cursor, which
                // would send its own changes back (see `Store::open_feed`).
                Some((changes, cursor)) => {
                    actions.extend(session.send_downstream(Message::Downstream { changes, cursor }, now_ms()));
                    continue;
                }
                None => feed_wanted = false,
            }
        }
        if session.phase() == BridgePhase::Closed {
            return Ok(());
        }
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(WsMessage::Binary(bytes))) => match wire::decode(&bytes, &config.limits) {
                    Ok(message) => actions.extend(session.on_message(message, now_ms())),
                    Err(error) => actions.extend(session.on_frame_error(&error)),
                },
                Some(Ok(WsMessage::Close(_))) | None => return Ok(()),
                Some(Ok(_)) => {} // ping/pong/text: the protocol's own heartbeats are binary
                Some(Err(error)) => return Err(error.into()),
            },
            notice = notices.recv() => {
                // A round of changes arrives as a burst of notices (one per
                // ticket): take every one already queued, then read once.
                let mut next = Some(notice);
                while let Some(notice) = next {
                    match notice {
                        Ok(notice) if session.peer().is_some_and(|(_, ward)| *ward == notice.ward) => feed_wanted = true,
                        Ok(_) => {}
                        Err(RecvError::Lagged(_)) => feed_wanted = true,
                        Err(RecvError::Closed) => return Ok(()),
                    }
                    next = match notices.try_recv() {
                        Ok(notice) => Some(Ok(notice)),
                        Err(TryRecvError::Lagged(missed)) => Some(Err(RecvError::Lagged(missed))),
                        Err(TryRecvError::Empty | TryRecvError::Closed) => None,
                    };
                }
            }
            database = renewal_asked(admitted) => {
                let node = session.peer().map(|(node, _)| node.clone()).expect("admitted after hello");
                let offer = LeaseUpdate::Offer { database, nonce: rand::random() };
                if let Some(lease) = state.store.update_lease(node, offer).await?.and_then(|record| record.offered) {
                    actions.extend(session.offer_lease(lease, now_ms()));
                }
            }
            _ = presence.tick(), if admitted.is_some() => {
                let node = session.peer().map(|(node, _)| node.clone()).expect("admitted after hello");
                if state.store.keep_present(&node).await?
                    && let Some((open, _)) = admitted.as_ref()
                {
                    open.renew.notify_one();
                }
            }
            _ = poll.tick() => feed_wanted = true,
            _ = ticks.tick() => actions.extend(session.on_tick(now_ms())),
            _ = state.shutdown.cancelled() => {
                let _ = sink.close().await;
                return Ok(());
            }
        }
    }
}

/// Checks the hello against the token of the upgrade.
fn authenticate(
    state: &AppState,
    principal: &Principal,
    node: &NodeId,
    ward: &WardId,
    token: &str,
) -> Result<(), Refused> {
    let refuse = |reason, detail: String| Refused { reason, detail };
    let hello_principal = state
        .verifier
        .verify(token, now_ms() / 1_000)
        .map_err(|e| refuse(RefusalReason::Unauthorized, e.code().to_owned()))?;
    if hello_principal.user != principal.user || principal.user.as_str() != node.as_str() {
        return Err(refuse(RefusalReason::Forbidden, format!("the token is not for node {node}")));
    }
    if !principal.wards.contains(ward) {
        return Err(refuse(RefusalReason::Forbidden, format!("the token does not cover {ward}")));
    }
    Ok(())
}

/// Admits the hello's database to speak for the node (the rule is
/// `sync_protocol::admission::admit`): takes the node's place on this
/// instance and stores the database's new lease, which is returned.
async fn admit(
    state: &AppState,
    node: &NodeId,
    ward: &WardId,
    database: DatabaseId,
    lease: Option<Lease>,
) -> Result<(OpenSession, Lease), Refused> {
    let open = state.sessions.open(node);
    let claim = Claim { database, lease, connected_elsewhere: open.is_err() };
    let admission = match state.store.admit(node.clone(), ward.clone(), claim, rand::random()).await {
        Ok(admission) => admission,
        Err(e) => {
            return Err(Refused {
                reason: RefusalReason::Unavailable,
                detail: format!("bridge storage unavailable: {e}"),
            });
        }
    };
    let record = match admission {
        Ok((Admission::Resumed, record)) => record,
        Ok((Admission::Recovered, record)) => {
            tracing::warn!(%node, %database, "the node shows a lease newer than its record here: was the store restored?");
            record
        }
        Ok((Admission::TookOver { replaced }, record)) => {
            let replaced = replaced.map(|id| id.to_string());
            tracing::warn!(%node, %database, ?replaced, "a database the node never used took it over");
            record
        }
        Err(refused) => {
            tracing::warn!(%node, %database, reason = ?refused.reason, detail = %refused.detail, "sync hello refused");
            if let (RefusalReason::AlreadyConnected, Err(renew)) = (refused.reason, &open) {
                // It showed a lease that admits: a copy of the open session's
                // database. That session takes a new one, voiding the copy's.
                renew.notify_one();
            }
            return Err(refused);
        }
    };
    let offered = record.offered.expect("an admission offers a lease");
    // Admitted only with the place: a refusal above released it, if it had it.
    Ok((open.expect("admission refuses a node connected elsewhere"), offered))
}
