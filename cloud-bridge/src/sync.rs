//! The WebSocket endpoint edge nodes sync through: a thin driver of
//! [`BridgeSession`], which holds every protocol rule.
//!
//! The node's token is checked at the upgrade (an edge-node token, for the
//! node it names) and again against the `Hello` (same node, a ward the token
//! covers); the session ends when that token is revoked or expires. Upstream batches are stored durably before they are
//! acknowledged. The downstream feed reads the ward's change log from the
//! node's cursor, wakes on notices of new changes, and falls back to polling
//! so a missed notice only delays, never loses, a change.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use cloud_store::{Feed, FeedLimits, LeaseUpdate, StoreError, WardNotice};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use service_kit::clock::now_ms;
use service_kit::http::ApiError;
use service_kit::keys::token_lapses;
use sync_protocol::admission::{Admission, Claim};
use sync_protocol::ids::{NodeId, WardId};
use sync_protocol::session::{BridgeAction, BridgePhase, BridgeSession};
use sync_protocol::token::Principal;
use sync_protocol::wire::{self, DatabaseId, Lease, Message, RefusalReason, Refused};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{Notify, broadcast};

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
    /// Has `node`'s session here, if it has one, take a new lease: another
    /// instance refused a hello that showed its lease (a copy).
    pub fn ask_renewal(&self, node: &NodeId) {
        if let Some(renew) = self.0.lock().unwrap_or_else(PoisonError::into_inner).get(node) {
            renew.notify_one();
        }
    }

    /// Passes the renewal requests of other instances to the sessions
    /// here, until the store closes the stream.
    pub async fn follow_renewals(self: Arc<Self>, mut requests: broadcast::Receiver<NodeId>) {
        loop {
            match requests.recv().await {
                Ok(node) => self.ask_renewal(&node),
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "lease renewal requests missed; the presence renewal catches them");
                }
                Err(RecvError::Closed) => return,
            }
        }
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
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            let message = format!("{}; the sync endpoint speaks WebSocket only", rejection.body_text());
            return ApiError::new(rejection.status(), "websocket_upgrade_required", message).into_response();
        }
    };
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
    let (sink, mut stream) = socket.split();
    let mut link = Link {
        session: BridgeSession::new(state.config.session, now_ms()),
        state,
        principal,
        admitted,
        sink,
        feed: None,
        feed_wanted: false,
    };
    let mut notices = link.state.store.subscribe();
    let mut ticks = tokio::time::interval(TICK_INTERVAL);
    let mut poll = tokio::time::interval(FEED_POLL_INTERVAL);
    let mut presence = tokio::time::interval(PRESENCE_RENEW_INTERVAL);
    let mut actions = VecDeque::new();
    // A session lives no longer than the token the node connected with.
    let lapsed = {
        let (verifier, principal) = (Arc::clone(&link.state.verifier), link.principal.clone());
        async move { token_lapses(&verifier, &principal).await }
    };
    tokio::pin!(lapsed);
    loop {
        while let Some(action) = actions.pop_front() {
            match link.perform(action).await? {
                Some(more) => actions.extend(more),
                None => return Ok(()),
            }
        }
        if let Some(more) = link.next_downstream().await? {
            actions.extend(more);
            continue;
        }
        if link.session.phase() == BridgePhase::Closed {
            return Ok(());
        }
        tokio::select! {
            frame = stream.next() => match link.receive(frame)? {
                Some(more) => actions.extend(more),
                None => return Ok(()),
            },
            notice = notices.recv() => {
                if !link.take_notices(notice, &mut notices) {
                    return Ok(());
                }
            }
            database = renewal_asked(link.admitted) => actions.extend(link.offer_lease(database).await?),
            _ = presence.tick(), if link.admitted.is_some() => link.keep_present().await?,
            error = &mut lapsed => {
                tracing::info!(node = %link.principal.user, code = error.code(), "the node's token lapsed; ending its session");
                actions.extend(link.session.credentials_lapsed(error.code()));
            }
            _ = poll.tick() => link.feed_wanted = true,
            _ = ticks.tick() => actions.extend(link.session.on_tick(now_ms())),
            _ = link.state.shutdown.cancelled() => {
                let _ = link.sink.close().await;
                return Ok(());
            }
        }
    }
}

/// The driver of one connection: it moves frames between the socket and
/// the session and does what the session's actions say to the store.
/// Every protocol decision is the session's.
struct Link<'a> {
    state: AppState,
    principal: Principal,
    admitted: &'a mut Option<(OpenSession, DatabaseId)>,
    session: BridgeSession,
    sink: SplitSink<WebSocket, WsMessage>,
    /// The feed once started, and whether it may have more to read.
    feed: Option<Feed>,
    feed_wanted: bool,
}

impl Link<'_> {
    /// The node and ward of the hello; the session asks for nothing that
    /// needs them before it.
    fn peer(&self) -> (NodeId, WardId) {
        let (node, ward) = self.session.peer().expect("the session acts on a peer only after its hello");
        (node.clone(), ward.clone())
    }

    /// Does one of the session's actions; returns the actions it leads to,
    /// or `None` once the connection is closed.
    async fn perform(&mut self, action: BridgeAction) -> Result<Option<Vec<BridgeAction>>, DriveError> {
        let now = now_ms();
        let more = match action {
            BridgeAction::Send(message) => {
                let frame = wire::encode(&message, &self.state.config.session.limits).map_err(axum::Error::new)?;
                self.sink.send(WsMessage::Binary(frame.into())).await?;
                Vec::new()
            }
            BridgeAction::Authenticate { node, ward, token, database, lease } => {
                let result = match authenticate(&self.state, &self.principal, &node, &ward, &token) {
                    Ok(()) => admit(&self.state, &node, &ward, database, lease).await,
                    Err(refused) => Err(refused),
                };
                let result = result.map(|(open, lease)| {
                    *self.admitted = Some((open, database));
                    lease
                });
                self.session.authenticated(result, now)
            }
            BridgeAction::LeaseHeld { lease } => {
                if let Some((_, database)) = self.admitted.as_ref() {
                    let update = LeaseUpdate::Confirm { database: *database, lease };
                    self.state.store.update_lease(self.peer().0, update).await?;
                }
                Vec::new()
            }
            BridgeAction::Store { changes } => {
                let (node, ward) = self.peer();
                let rejections = self.state.store.store_upstream(node, ward, changes).await?;
                self.session.stored(rejections, now)
            }
            BridgeAction::CheckHeads { tickets, last } => {
                let missing = self.state.store.missing_heads(self.peer().1, tickets).await?;
                if !missing.is_empty() {
                    tracing::warn!(node = %self.principal.user, tickets = missing.len(), "a node holds changes the cloud lacks");
                }
                self.session.heads_checked(missing, last, now)
            }
            BridgeAction::StartFeed { cursor } => {
                let (node, ward) = self.peer();
                self.feed = Some(self.state.store.open_feed(node, ward, cursor.as_ref()).await?);
                self.feed_wanted = true;
                Vec::new()
            }
            BridgeAction::DownstreamAcked { cursor } => {
                self.state.store.note_cursor(self.peer().0, &cursor);
                Vec::new()
            }
            BridgeAction::Close(reason) => {
                tracing::info!(node = %self.principal.user, ?reason, "closing sync session");
                let _ = self.sink.close().await;
                return Ok(None);
            }
        };
        Ok(Some(more))
    }

    /// Reads the next part of the feed when the session's window is open
    /// and there may be more; `None` when there is nothing to send.
    async fn next_downstream(&mut self) -> Result<Option<Vec<BridgeAction>>, DriveError> {
        let (Some(feed), true, Some(demand)) = (self.feed.as_mut(), self.feed_wanted, self.session.downstream_demand())
        else {
            return Ok(None);
        };
        let limits = FeedLimits { changes_max: demand.changes_max, bytes_max: demand.change_bytes_max };
        match self.state.store.read_feed(feed, limits).await? {
            // Sent even when every change read was the node's own (none
            // to apply): the node then keeps the position, and its next
            // session starts from it instead of without a cursor, which
            // would send its own changes back (see `Store::open_feed`).
            Some((changes, cursor)) => {
                Ok(Some(self.session.send_downstream(Message::Downstream { changes, cursor }, now_ms())))
            }
            None => {
                self.feed_wanted = false;
                Ok(None)
            }
        }
    }

    /// What a frame from the node leads to; `None` once the node closed.
    fn receive(
        &mut self,
        frame: Option<Result<WsMessage, axum::Error>>,
    ) -> Result<Option<Vec<BridgeAction>>, DriveError> {
        let limits = self.state.config.session.limits;
        match frame {
            Some(Ok(WsMessage::Binary(bytes))) => Ok(Some(match wire::decode(&bytes, &limits) {
                Ok(message) => self.session.on_message(message, now_ms()),
                Err(error) => self.session.on_frame_error(&error),
            })),
            Some(Ok(WsMessage::Text(_))) => Ok(Some(self.session.on_text_frame())),
            Some(Ok(WsMessage::Close(_))) | None => Ok(None),
            // WebSocket pings and pongs: the protocol's own heartbeats are binary.
            Some(Ok(_)) => Ok(Some(Vec::new())),
            Some(Err(error)) => Err(error.into()),
        }
    }

    /// A round of changes arrives as a burst of notices (one per ticket):
    /// takes every one already queued, and notes whether the feed should
    /// read. `false` once the store stopped sending notices.
    fn take_notices(
        &mut self,
        first: Result<WardNotice, RecvError>,
        notices: &mut broadcast::Receiver<WardNotice>,
    ) -> bool {
        let mut next = Some(first);
        while let Some(notice) = next {
            match notice {
                Ok(notice) if self.session.peer().is_some_and(|(_, ward)| *ward == notice.ward) => {
                    self.feed_wanted = true
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => self.feed_wanted = true,
                Err(RecvError::Closed) => return false,
            }
            next = match notices.try_recv() {
                Ok(notice) => Some(Ok(notice)),
                Err(TryRecvError::Lagged(missed)) => Some(Err(RecvError::Lagged(missed))),
                Err(TryRecvError::Empty | TryRecvError::Closed) => None,
            };
        }
        true
    }

    /// Another connection showed this session's lease: offers a new one.
    async fn offer_lease(&mut self, database: DatabaseId) -> Result<Vec<BridgeAction>, DriveError> {
        let offer = LeaseUpdate::Offer { database, nonce: rand::random() };
        match self.state.store.update_lease(self.peer().0, offer).await?.and_then(|record| record.offered) {
            Some(lease) => Ok(self.session.offer_lease(lease, now_ms())),
            None => Ok(Vec::new()),
        }
    }

    async fn keep_present(&mut self) -> Result<(), DriveError> {
        if self.state.store.keep_present(&self.peer().0).await?
            && let Some((open, _)) = self.admitted.as_ref()
        {
            open.renew.notify_one();
        }
        Ok(())
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
