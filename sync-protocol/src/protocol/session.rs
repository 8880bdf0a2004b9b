//! Sans-I/O session state machines, one per side of a connection.
//!
//! Each takes events (a decoded message, a tick of the clock, the result of
//! work it asked the driver to do) and returns actions (messages to send,
//! work to do, the connection to close). They own no socket, read no clock
//! and touch no disk, so every protocol rule is tested without I/O and the
//! drivers in `edge-node` and `cloud-bridge` stay thin.
//!
//! Upstream (edge -> bridge) is pipelined: up to `batches_in_flight_max`
//! batches are unacknowledged at once, so a large backlog is limited by
//! bandwidth and disk, not round trips. Downstream is windowed the same way
//! with `DownstreamAck`.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, TicketId, WardId};
use crate::ticket::UnixMillis;
use crate::wire::{
    Cursor, DatabaseId, DownstreamChange, ErrorCode, HEADS_PER_TICKET_MAX, Hello, Lease, Message, PROTOCOL_VERSION,
    RefusalReason, Refused, TicketHeads, UpstreamChange, Welcome, WireError, WireLimits,
};

/// Timing and windowing of a session. Both sides use the same defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Send a ping when nothing was sent or received for this long.
    pub heartbeat_interval_ms: u64,
    /// Close when nothing was received for this long: the connection is half-open.
    pub heartbeat_timeout_ms: u64,
    /// Unacknowledged batches allowed in each direction.
    pub batches_in_flight_max: usize,
    pub limits: WireLimits,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 5_000,
            heartbeat_timeout_ms: 15_000,
            batches_in_flight_max: 4,
            limits: WireLimits::default(),
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The bridge refused the hello (or the edge refused the bridge's version).
    Refused(Refused),
    /// Nothing was heard from the peer within the heartbeat timeout.
    HeartbeatTimeout,
    /// The peer broke the protocol; the text says how.
    ProtocolViolation(String),
    /// The peer reported an error and closed.
    PeerError { code: ErrorCode, message: String },
}

/// The refusal of an edge that speaks protocol version `found`.
fn version_mismatch(found: u16) -> Refused {
    let upgrade = if found < PROTOCOL_VERSION { "upgrade the edge node" } else { "upgrade the cloud bridge" };
    Refused {
        reason: RefusalReason::VersionMismatch { supported_min: PROTOCOL_VERSION, supported_max: PROTOCOL_VERSION },
        detail: format!(
            "upgrade required: the edge speaks protocol version {found}, this bridge {PROTOCOL_VERSION}; {upgrade} \
             (until then the ward works offline and its outbox is kept)"
        ),
    }
}

impl CloseReason {
    /// Whether reconnecting without a human can help. A version mismatch or a
    /// refused token will not fix itself: retrying in a tight loop would only
    /// flood the logs and the bridge.
    pub fn retryable(&self) -> bool {
        !matches!(
            self,
            CloseReason::Refused(Refused {
                reason: RefusalReason::VersionMismatch { .. }
                    | RefusalReason::Forbidden
                    | RefusalReason::Superseded
                    | RefusalReason::AlreadyConnected,
                ..
            })
        )
    }
}

/// The delay before reconnect attempt `attempt` (0-based): exponential from
/// `base_ms`, capped at `cap_ms`, with "full jitter" (`jitter` in 0..1 drawn by
/// the caller) so a fleet of edges does not reconnect in lockstep after an outage.
pub fn reconnect_delay_ms(attempt: u32, base_ms: u64, cap_ms: u64, jitter: f64) -> u64 {
    let ceiling = base_ms.saturating_mul(1u64 << attempt.min(20)).min(cap_ms);
    let jitter = jitter.clamp(0.0, 1.0);
    // Never zero: at least half the ceiling keeps a broken peer from being hammered.
    ceiling / 2 + ((ceiling / 2) as f64 * jitter) as u64
}

/// Heartbeats shared by both sides.
#[derive(Debug, Clone)]
struct Liveness {
    last_received: UnixMillis,
    last_sent: UnixMillis,
    next_nonce: u64,
}

enum Pulse {
    Quiet,
    Ping(Message),
    Dead,
}

impl Liveness {
    fn new(now: UnixMillis) -> Self {
        Self { last_received: now, last_sent: now, next_nonce: 1 }
    }

    fn tick(&mut self, now: UnixMillis, config: &SessionConfig) -> Pulse {
        let silent_for = |since: UnixMillis| u64::try_from(now - since).unwrap_or(0);
        if silent_for(self.last_received) >= config.heartbeat_timeout_ms {
            return Pulse::Dead;
        }
        if silent_for(self.last_sent.max(self.last_received)) >= config.heartbeat_interval_ms {
            self.last_sent = now;
            self.next_nonce += 1;
            return Pulse::Ping(Message::Ping { nonce: self.next_nonce });
        }
        Pulse::Quiet
    }
}

/// What the edge driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeAction {
    Send(Message),
    /// Store this lease durably (it replaces the one held) before the next
    /// action, which tells the bridge it is held.
    HoldLease(Lease),
    /// Delete outbox entries up to `up_to_seq`, except those marked stuck.
    Acked {
        up_to_seq: u64,
    },
    /// Keep this outbox entry, mark it stuck and show it; do not send it again.
    Stuck {
        seq: u64,
        ticket: TicketId,
        code: ErrorCode,
        message: String,
    },
    /// Apply the changes and store `cursor` in one transaction, then call
    /// [`EdgeSession::downstream_applied`].
    ApplyDownstream {
        changes: Vec<DownstreamChange>,
        cursor: Cursor,
    },
    /// A reconciliation found changes the cloud lacks: put this node's
    /// changes of these tickets beyond the cloud's heads into the outbox
    /// again, before the next action.
    Resend {
        missing: Vec<TicketHeads>,
    },
    /// Every ticket was compared, and what was missing is in the outbox.
    ReconcileDone,
    Close(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgePhase {
    AwaitingWelcome,
    Established,
    Closed,
}

/// What the edge driver should read from its outbox for the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamDemand {
    /// Read entries with a sequence number above this.
    pub after_seq: u64,
    pub changes_max: usize,
    /// Budget for the sum of the changes' sizes (leaves room for framing).
    pub change_bytes_max: usize,
}

/// Framing cost per upstream change beyond its bytes: sequence, ticket id, lengths.
const UPSTREAM_CHANGE_OVERHEAD_BYTES: usize = 64;
/// Tickets compared per reconciliation message.
const RECONCILE_TICKETS_MAX: usize = 256;
/// The most one ticket's heads take in a reconciliation message.
const TICKET_HEADS_BYTES_MAX: usize = HEADS_PER_TICKET_MAX * 32 + 64;

/// What the edge driver should read for the next reconciliation message:
/// the heads of its tickets after `after` (in ticket order), at most `tickets_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileDemand {
    pub after: Option<TicketId>,
    pub tickets_max: usize,
}

/// A reconciliation in progress: the edge compares every ticket it holds
/// with the cloud, one message at a time.
#[derive(Debug, Clone, Default)]
struct Reconciling {
    after: Option<TicketId>,
    in_flight: bool,
    /// The message with the last tickets was sent.
    sent_last: bool,
}

/// The edge node's side of a connection.
#[derive(Debug, Clone)]
pub struct EdgeSession {
    config: SessionConfig,
    phase: EdgePhase,
    liveness: Liveness,
    limits: WireLimits,
    sent_up_to: u64,
    /// The last sequence of each batch sent and not yet acknowledged.
    in_flight: VecDeque<u64>,
    reconciling: Option<Reconciling>,
}

impl EdgeSession {
    /// Starts a session on a fresh connection by sending `hello`.
    pub fn start(hello: Hello, config: SessionConfig, now: UnixMillis) -> (Self, Vec<EdgeAction>) {
        let session = Self {
            config,
            phase: EdgePhase::AwaitingWelcome,
            liveness: Liveness::new(now),
            limits: config.limits,
            sent_up_to: 0,
            in_flight: VecDeque::new(),
            reconciling: None,
        };
        (session, vec![EdgeAction::Send(Message::Hello(hello))])
    }

    pub fn phase(&self) -> EdgePhase {
        self.phase
    }

    pub fn batches_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn close(&mut self, reason: CloseReason) -> Vec<EdgeAction> {
        self.phase = EdgePhase::Closed;
        vec![EdgeAction::Close(reason)]
    }

    fn violation(&mut self, what: String) -> Vec<EdgeAction> {
        let message = Message::Error { code: ErrorCode::UnexpectedMessage, message: what.clone() };
        let mut actions = vec![EdgeAction::Send(message)];
        actions.extend(self.close(CloseReason::ProtocolViolation(what)));
        actions
    }

    /// A frame from the bridge could not be decoded.
    pub fn on_frame_error(&mut self, error: &WireError) -> Vec<EdgeAction> {
        match error {
            WireError::Version { found, .. } => self.close(CloseReason::Refused(Refused {
                reason: RefusalReason::VersionMismatch {
                    supported_min: PROTOCOL_VERSION,
                    supported_max: PROTOCOL_VERSION,
                },
                detail: format!("the bridge speaks protocol version {found}"),
            })),
            other => self.violation(other.to_string()),
        }
    }

    pub fn on_message(&mut self, message: Message, now: UnixMillis) -> Vec<EdgeAction> {
        self.liveness.last_received = now;
        match (self.phase, message) {
            (EdgePhase::Closed, _) => Vec::new(),
            (EdgePhase::AwaitingWelcome, Message::Welcome(welcome)) => {
                if welcome.protocol_version != PROTOCOL_VERSION {
                    return self.violation(format!("welcome for protocol version {}", welcome.protocol_version));
                }
                self.phase = EdgePhase::Established;
                self.limits = tighter(self.config.limits, welcome.limits);
                // Acknowledgements cover only what this connection carried,
                // so the whole outbox is sent again: whatever the database
                // went through (a restore, a copy, a new disk), nothing is
                // dropped that this bridge did not just store. The bridge
                // skips by hash what it had already.
                self.hold_lease(welcome.lease, now)
            }
            (EdgePhase::Established, Message::NewLease { lease }) => self.hold_lease(lease, now),
            (EdgePhase::Established, Message::Reconciled { missing, last }) => self.on_reconciled(missing, last),
            (_, Message::Refused(refused)) => self.close(CloseReason::Refused(refused)),
            (_, Message::Error { code, message }) => self.close(CloseReason::PeerError { code, message }),
            (EdgePhase::Established, Message::Ack { up_to_seq }) => {
                if up_to_seq > self.sent_up_to {
                    return self.violation(format!("ack up to {up_to_seq}, but only {} was sent", self.sent_up_to));
                }
                while self.in_flight.front().is_some_and(|&last| last <= up_to_seq) {
                    self.in_flight.pop_front();
                }
                vec![EdgeAction::Acked { up_to_seq }]
            }
            (EdgePhase::Established, Message::Rejected { seq, ticket, code, message }) => {
                vec![EdgeAction::Stuck { seq, ticket, code, message }]
            }
            (EdgePhase::Established, Message::Downstream { changes, cursor }) => {
                vec![EdgeAction::ApplyDownstream { changes, cursor }]
            }
            (_, Message::Ping { nonce }) => self.sent(vec![EdgeAction::Send(Message::Pong { nonce })], now),
            (_, Message::Pong { .. }) => Vec::new(),
            (phase, other) => self.violation(format!("unexpected {} while {phase:?}", other.kind())),
        }
    }

    /// Whether the driver should look whether a reconciliation is asked
    /// for (a restore or an operator leaves that mark in the node's store):
    /// once the session is established (after `Welcome`) and none is under
    /// way. The driver answers with [`Self::request_reconcile`].
    pub fn wants_reconcile_request(&self) -> bool {
        self.phase == EdgePhase::Established && self.reconciling.is_none()
    }

    /// Starts comparing every ticket with the cloud (after a restore, or
    /// when an operator asks); nothing happens before `Welcome` or while one
    /// is under way.
    pub fn request_reconcile(&mut self) {
        if self.wants_reconcile_request() {
            self.reconciling = Some(Reconciling::default());
        }
    }

    pub fn reconciling(&self) -> bool {
        self.reconciling.is_some()
    }

    /// What to read for the next reconciliation message; `None` while one
    /// is answered, or when there is none to send.
    pub fn reconcile_demand(&self) -> Option<ReconcileDemand> {
        let reconciling = self.reconciling.as_ref().filter(|r| !r.in_flight && !r.sent_last)?;
        let fitting = self.limits.frame_bytes_max / TICKET_HEADS_BYTES_MAX;
        let tickets_max = RECONCILE_TICKETS_MAX.min(self.limits.changes_per_batch_max).min(fitting).max(1);
        Some(ReconcileDemand { after: reconciling.after, tickets_max })
    }

    /// Sends the heads read in answer to [`Self::reconcile_demand`]; fewer
    /// tickets than asked for means there are no more.
    pub fn send_reconcile(&mut self, tickets: Vec<TicketHeads>, now: UnixMillis) -> Vec<EdgeAction> {
        let demand = self.reconcile_demand().expect("send_reconcile called without demand");
        assert!(tickets.len() <= demand.tickets_max, "more tickets than the demand");
        let last = tickets.len() < demand.tickets_max;
        let reconciling = self.reconciling.as_mut().expect("a demand means a reconciliation");
        reconciling.after = tickets.last().map(|t| t.ticket).or(reconciling.after);
        reconciling.in_flight = true;
        reconciling.sent_last = last;
        self.sent(vec![EdgeAction::Send(Message::Reconcile { tickets, last })], now)
    }

    fn on_reconciled(&mut self, missing: Vec<TicketHeads>, last: bool) -> Vec<EdgeAction> {
        let Some(reconciling) = self.reconciling.as_mut().filter(|r| r.in_flight && r.sent_last == last) else {
            return self.violation("a reconciliation answer nothing asked for".into());
        };
        reconciling.in_flight = false;
        let mut actions = Vec::new();
        if !missing.is_empty() {
            actions.push(EdgeAction::Resend { missing });
        }
        if last {
            self.reconciling = None;
            actions.push(EdgeAction::ReconcileDone);
        }
        actions
    }

    /// Stores the lease, then tells the bridge it is held.
    fn hold_lease(&mut self, lease: Lease, now: UnixMillis) -> Vec<EdgeAction> {
        let held = Message::LeaseHeld { lease };
        self.sent(vec![EdgeAction::HoldLease(lease), EdgeAction::Send(held)], now)
    }

    pub fn on_tick(&mut self, now: UnixMillis) -> Vec<EdgeAction> {
        if self.phase == EdgePhase::Closed {
            return Vec::new();
        }
        match self.liveness.tick(now, &self.config) {
            Pulse::Quiet => Vec::new(),
            Pulse::Ping(ping) => vec![EdgeAction::Send(ping)],
            Pulse::Dead => self.close(CloseReason::HeartbeatTimeout),
        }
    }

    /// What to read from the outbox for the next batch; `None` while the
    /// window is full or the session is not established.
    pub fn upstream_demand(&self) -> Option<UpstreamDemand> {
        if self.phase != EdgePhase::Established || self.in_flight.len() >= self.config.batches_in_flight_max {
            return None;
        }
        Some(UpstreamDemand {
            after_seq: self.sent_up_to,
            changes_max: self.limits.changes_per_batch_max,
            change_bytes_max: self
                .limits
                .frame_bytes_max
                .saturating_sub(self.limits.changes_per_batch_max * UPSTREAM_CHANGE_OVERHEAD_BYTES),
        })
    }

    /// Sends a batch read from the outbox in answer to [`Self::upstream_demand`].
    pub fn send_upstream(&mut self, changes: Vec<UpstreamChange>, now: UnixMillis) -> Vec<EdgeAction> {
        let Some(last) = changes.last().map(|c| c.seq) else { return Vec::new() };
        assert!(self.upstream_demand().is_some(), "send_upstream called without demand");
        assert!(changes[0].seq > self.sent_up_to, "outbox sequence went backwards");
        self.sent_up_to = last;
        self.in_flight.push_back(last);
        self.sent(vec![EdgeAction::Send(Message::Upstream { changes })], now)
    }

    /// The driver applied a downstream batch or snapshot chunk durably.
    pub fn downstream_applied(&mut self, cursor: Cursor, now: UnixMillis) -> Vec<EdgeAction> {
        if self.phase == EdgePhase::Closed {
            return Vec::new();
        }
        self.sent(vec![EdgeAction::Send(Message::DownstreamAck { cursor })], now)
    }

    fn sent(&mut self, actions: Vec<EdgeAction>, now: UnixMillis) -> Vec<EdgeAction> {
        self.liveness.last_sent = now;
        actions
    }
}

fn tighter(ours: WireLimits, theirs: WireLimits) -> WireLimits {
    WireLimits {
        frame_bytes_max: ours.frame_bytes_max.min(theirs.frame_bytes_max),
        changes_per_batch_max: ours.changes_per_batch_max.min(theirs.changes_per_batch_max),
        change_bytes_max: ours.change_bytes_max.min(theirs.change_bytes_max),
        token_bytes_max: ours.token_bytes_max.min(theirs.token_bytes_max),
        cursor_bytes_max: ours.cursor_bytes_max.min(theirs.cursor_bytes_max),
        text_bytes_max: ours.text_bytes_max.min(theirs.text_bytes_max),
    }
}

/// How much the next downstream batch may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownstreamDemand {
    pub changes_max: usize,
    /// Budget for the sum of the changes' sizes (leaves room for framing).
    pub change_bytes_max: usize,
}

/// Framing overhead allowed per downstream change (ticket id, length prefix).
const DOWNSTREAM_CHANGE_OVERHEAD_BYTES: usize = 64;

/// What the bridge driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BridgeAction {
    Send(Message),
    /// Verify the token for this node and ward, admit the database
    /// (`admission::admit`), then call [`BridgeSession::authenticated`].
    Authenticate {
        node: NodeId,
        ward: WardId,
        token: String,
        database: DatabaseId,
        lease: Option<Lease>,
    },
    /// Validate and durably store these changes, in the order the actions
    /// were given, then call [`BridgeSession::stored`] for each.
    Store {
        changes: Vec<UpstreamChange>,
    },
    /// Start the downstream feed from `cursor`; `None`: send a snapshot first.
    StartFeed {
        cursor: Option<Cursor>,
    },
    /// Find which of these tickets of the session's ward the store lacks
    /// some heads of (with the heads it has; none for a ticket it lacks),
    /// then call [`BridgeSession::heads_checked`].
    CheckHeads {
        tickets: Vec<TicketHeads>,
        last: bool,
    },
    /// The edge applied downstream changes up to `cursor` (for diagnostics).
    DownstreamAcked {
        cursor: Cursor,
    },
    /// The edge holds the lease the welcome offered, durably: record that
    /// (`admission::confirm`).
    LeaseHeld {
        lease: Lease,
    },
    Close(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgePhase {
    AwaitingHello,
    Authenticating,
    Established,
    Closed,
}

/// A change the bridge could not accept, with the reason to send back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub seq: u64,
    pub ticket: TicketId,
    pub message: String,
}

/// The bridge's side of a connection.
#[derive(Debug, Clone)]
pub struct BridgeSession {
    config: SessionConfig,
    phase: BridgePhase,
    liveness: Liveness,
    hello: Option<Hello>,
    /// The lease the welcome offered, until the edge says it holds it.
    offered: Option<Lease>,
    /// Highest sequence this connection passed to `Store`.
    received_up_to: u64,
    /// Last sequence of each `Store` the driver has not finished.
    pending_stores: VecDeque<u64>,
    downstream_in_flight: usize,
}

impl BridgeSession {
    pub fn new(config: SessionConfig, now: UnixMillis) -> Self {
        Self {
            config,
            phase: BridgePhase::AwaitingHello,
            liveness: Liveness::new(now),
            hello: None,
            offered: None,
            received_up_to: 0,
            pending_stores: VecDeque::new(),
            downstream_in_flight: 0,
        }
    }

    pub fn phase(&self) -> BridgePhase {
        self.phase
    }

    /// The node and ward of an authenticated session.
    pub fn peer(&self) -> Option<(&NodeId, &WardId)> {
        match (self.phase, &self.hello) {
            (BridgePhase::Established, Some(hello)) => Some((&hello.node, &hello.ward)),
            _ => None,
        }
    }

    fn close(&mut self, reason: CloseReason) -> Vec<BridgeAction> {
        self.phase = BridgePhase::Closed;
        vec![BridgeAction::Close(reason)]
    }

    fn refuse(&mut self, refused: Refused) -> Vec<BridgeAction> {
        let mut actions = vec![BridgeAction::Send(Message::Refused(refused.clone()))];
        actions.extend(self.close(CloseReason::Refused(refused)));
        actions
    }

    fn violation(&mut self, code: ErrorCode, what: String) -> Vec<BridgeAction> {
        let mut actions = vec![BridgeAction::Send(Message::Error { code, message: what.clone() })];
        actions.extend(self.close(CloseReason::ProtocolViolation(what)));
        actions
    }

    /// A frame from the edge could not be decoded.
    ///
    /// An edge of another protocol version is refused, and told which side
    /// to upgrade. The rule for an edge left on an older release while the
    /// cloud is upgraded: it is refused at every connection (and does not
    /// retry faster than its reconnect cap), keeps serving its ward offline
    /// and keeps its outbox, and syncs all of it once it is upgraded.
    pub fn on_frame_error(&mut self, error: &WireError) -> Vec<BridgeAction> {
        match error {
            WireError::Version { found, .. } => self.refuse(version_mismatch(*found)),
            other => self.violation(ErrorCode::Malformed, other.to_string()),
        }
    }

    pub fn on_message(&mut self, message: Message, now: UnixMillis) -> Vec<BridgeAction> {
        self.liveness.last_received = now;
        match (self.phase, message) {
            (BridgePhase::Closed, _) => Vec::new(),
            (BridgePhase::AwaitingHello, Message::Hello(hello)) => {
                if hello.protocol_version != PROTOCOL_VERSION {
                    return self.refuse(version_mismatch(hello.protocol_version));
                }
                if hello.limits.changes_per_batch_max == 0 || hello.limits.frame_bytes_max == 0 {
                    return self.violation(ErrorCode::Malformed, "the hello's limits allow no downstream batch".into());
                }
                self.phase = BridgePhase::Authenticating;
                let action = BridgeAction::Authenticate {
                    node: hello.node.clone(),
                    ward: hello.ward.clone(),
                    token: hello.token.clone(),
                    database: hello.database,
                    lease: hello.lease,
                };
                self.hello = Some(hello);
                vec![action]
            }
            (BridgePhase::Established, Message::LeaseHeld { lease }) => {
                if self.offered != Some(lease) {
                    return self.violation(ErrorCode::UnexpectedMessage, "lease held is not the one offered".into());
                }
                self.offered = None;
                vec![BridgeAction::LeaseHeld { lease }]
            }
            (BridgePhase::Established, Message::Upstream { changes }) => self.on_upstream(changes),
            (BridgePhase::Established, Message::Reconcile { tickets, last }) => {
                vec![BridgeAction::CheckHeads { tickets, last }]
            }
            (BridgePhase::Established, Message::DownstreamAck { cursor }) => {
                if self.downstream_in_flight == 0 {
                    return self
                        .violation(ErrorCode::UnexpectedMessage, "downstream ack with nothing in flight".into());
                }
                self.downstream_in_flight -= 1;
                vec![BridgeAction::DownstreamAcked { cursor }]
            }
            (_, Message::Ping { nonce }) => {
                self.liveness.last_sent = now;
                vec![BridgeAction::Send(Message::Pong { nonce })]
            }
            (_, Message::Pong { .. }) => Vec::new(),
            (_, Message::Error { code, message }) => self.close(CloseReason::PeerError { code, message }),
            (phase, other) => {
                self.violation(ErrorCode::UnexpectedMessage, format!("unexpected {} while {phase:?}", other.kind()))
            }
        }
    }

    fn on_upstream(&mut self, changes: Vec<UpstreamChange>) -> Vec<BridgeAction> {
        if self.pending_stores.len() >= self.config.batches_in_flight_max {
            return self.violation(
                ErrorCode::UnexpectedMessage,
                format!("more than {} upstream batches in flight", self.config.batches_in_flight_max),
            );
        }
        // Sequences only grow on one connection: an ack must never cover a
        // change this connection did not carry.
        let (Some(first), Some(last)) = (changes.first().map(|c| c.seq), changes.last().map(|c| c.seq)) else {
            return self.violation(ErrorCode::Malformed, "an empty upstream batch".into());
        };
        if first <= self.received_up_to {
            return self.violation(
                ErrorCode::Malformed,
                format!("upstream sequence {first} after {} on this connection", self.received_up_to),
            );
        }
        self.received_up_to = last;
        self.pending_stores.push_back(last);
        vec![BridgeAction::Store { changes }]
    }

    /// The driver checked the hello's token and admitted its database
    /// (`admission::admit`). `Ok` carries the new lease the driver stored
    /// for the database, which the welcome hands over.
    pub fn authenticated(&mut self, result: Result<Lease, Refused>, now: UnixMillis) -> Vec<BridgeAction> {
        if self.phase != BridgePhase::Authenticating {
            return Vec::new();
        }
        let lease = match result {
            Ok(lease) => lease,
            Err(refused) => return self.refuse(refused),
        };
        self.phase = BridgePhase::Established;
        self.offered = Some(lease);
        self.liveness.last_sent = now;
        let welcome =
            Welcome { protocol_version: PROTOCOL_VERSION, server_time: now, limits: self.config.limits, lease };
        let cursor = self.hello.as_ref().and_then(|h| h.cursor.clone());
        vec![BridgeAction::Send(Message::Welcome(welcome)), BridgeAction::StartFeed { cursor }]
    }

    /// The token the edge connected with no longer holds (revoked, or
    /// expired after the leeway): a session lives no longer than its
    /// credentials. The edge is told why and the session ends; the edge
    /// may come back with a new token.
    pub fn credentials_lapsed(&mut self, why: &str) -> Vec<BridgeAction> {
        if self.phase == BridgePhase::Closed {
            return Vec::new();
        }
        self.refuse(Refused { reason: RefusalReason::Unauthorized, detail: why.to_owned() })
    }

    /// A text frame arrived: the protocol is binary frames only, so a
    /// peer sending text is not speaking it.
    pub fn on_text_frame(&mut self) -> Vec<BridgeAction> {
        self.violation(ErrorCode::Malformed, "text frames are not part of the sync protocol".into())
    }

    /// The driver finished the oldest pending `Store`: accepted changes are
    /// durable, and `rejected` ones failed validation.
    pub fn stored(&mut self, rejected: Vec<Rejection>, now: UnixMillis) -> Vec<BridgeAction> {
        let Some(up_to_seq) = self.pending_stores.pop_front() else {
            return self.violation(ErrorCode::Internal, "stored without a pending store".into());
        };
        if self.phase == BridgePhase::Closed {
            return Vec::new();
        }
        self.liveness.last_sent = now;
        let mut actions: Vec<BridgeAction> = rejected
            .into_iter()
            .map(|r| {
                BridgeAction::Send(Message::Rejected {
                    seq: r.seq,
                    ticket: r.ticket,
                    code: ErrorCode::ChangeRejected,
                    message: r.message,
                })
            })
            .collect();
        actions.push(BridgeAction::Send(Message::Ack { up_to_seq }));
        actions
    }

    /// The driver checked a reconciliation message's tickets.
    pub fn heads_checked(&mut self, missing: Vec<TicketHeads>, last: bool, now: UnixMillis) -> Vec<BridgeAction> {
        if self.phase != BridgePhase::Established {
            return Vec::new();
        }
        self.liveness.last_sent = now;
        vec![BridgeAction::Send(Message::Reconciled { missing, last })]
    }

    /// Hands the edge a new lease mid-session (the driver stored it as
    /// offered, `admission::offer`); its `LeaseHeld` confirms it.
    pub fn offer_lease(&mut self, lease: Lease, now: UnixMillis) -> Vec<BridgeAction> {
        if self.phase != BridgePhase::Established {
            return Vec::new();
        }
        self.offered = Some(lease);
        self.liveness.last_sent = now;
        vec![BridgeAction::Send(Message::NewLease { lease })]
    }

    /// Whether another downstream batch may be sent now.
    pub fn downstream_window_open(&self) -> bool {
        self.phase == BridgePhase::Established && self.downstream_in_flight < self.config.batches_in_flight_max
    }

    /// What the next downstream batch may carry, within the limits of both
    /// sides (the edge's arrive in its hello); `None` while the window is
    /// full or the session is not established.
    pub fn downstream_demand(&self) -> Option<DownstreamDemand> {
        let hello = self.hello.as_ref().filter(|_| self.downstream_window_open())?;
        let limits = tighter(self.config.limits, hello.limits);
        Some(DownstreamDemand {
            changes_max: limits.changes_per_batch_max,
            change_bytes_max: limits
                .frame_bytes_max
                .saturating_sub(limits.changes_per_batch_max * DOWNSTREAM_CHANGE_OVERHEAD_BYTES),
        })
    }

    /// Sends a downstream batch; call only while [`Self::downstream_window_open`].
    pub fn send_downstream(&mut self, message: Message, now: UnixMillis) -> Vec<BridgeAction> {
        assert!(matches!(message, Message::Downstream { .. }), "not a downstream message");
        assert!(self.downstream_window_open(), "downstream window is closed");
        self.downstream_in_flight += 1;
        self.liveness.last_sent = now;
        vec![BridgeAction::Send(message)]
    }

    pub fn on_tick(&mut self, now: UnixMillis) -> Vec<BridgeAction> {
        if self.phase == BridgePhase::Closed {
            return Vec::new();
        }
        match self.liveness.tick(now, &self.config) {
            Pulse::Quiet => Vec::new(),
            Pulse::Ping(ping) => vec![BridgeAction::Send(ping)],
            Pulse::Dead => self.close(CloseReason::HeartbeatTimeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_bytes::ByteBuf;

    fn hello() -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            node: "edge-ward-4b".parse().unwrap(),
            ward: "ward-4b".parse().unwrap(),
            token: "token".into(),
            cursor: None,
            limits: WireLimits::default(),
            database: DatabaseId([1; 16]),
            lease: None,
        }
    }

    const LEASE: Lease = Lease { generation: 1, nonce: [5; 16] };

    fn change(seq: u64) -> UpstreamChange {
        UpstreamChange { seq, ticket: TicketId::new(1, [0; 10]), change: ByteBuf::from(vec![1, 2, 3]) }
    }

    fn sent(actions: &[EdgeAction]) -> Vec<&Message> {
        actions.iter().filter_map(|a| if let EdgeAction::Send(m) = a { Some(m) } else { None }).collect()
    }

    fn bridge_sent(actions: &[BridgeAction]) -> Vec<&Message> {
        actions.iter().filter_map(|a| if let BridgeAction::Send(m) = a { Some(m) } else { None }).collect()
    }

    /// Runs an edge and a bridge session against each other, delivering
    /// every message the other sends.
    fn established() -> (EdgeSession, BridgeSession) {
        let config = SessionConfig::default();
        let (mut edge, actions) = EdgeSession::start(hello(), config, 0);
        let mut bridge = BridgeSession::new(config, 0);
        let hello = sent(&actions)[0].clone();
        let actions = bridge.on_message(hello, 1);
        assert!(matches!(&actions[0], BridgeAction::Authenticate { token, .. } if token == "token"));
        let actions = bridge.authenticated(Ok(LEASE), 2);
        assert_eq!(actions[1], BridgeAction::StartFeed { cursor: None });
        let welcome = bridge_sent(&actions)[0].clone();
        let actions = edge.on_message(welcome, 3);
        assert_eq!(actions[0], EdgeAction::HoldLease(LEASE), "stored before the bridge is told");
        let held = sent(&actions)[0].clone();
        assert_eq!(bridge.on_message(held, 4), vec![BridgeAction::LeaseHeld { lease: LEASE }]);
        (edge, bridge)
    }

    #[test]
    fn downstream_batches_fit_the_tighter_of_both_sides_limits() {
        let config = SessionConfig::default();
        let mut bridge = BridgeSession::new(config, 0);
        assert_eq!(bridge.downstream_demand(), None, "no demand before the hello");
        let small = WireLimits { changes_per_batch_max: 50, ..WireLimits::default() };
        bridge.on_message(Message::Hello(Hello { limits: small, ..hello() }), 1);
        bridge.authenticated(Ok(LEASE), 2);
        let demand = bridge.downstream_demand().unwrap();
        assert_eq!(demand.changes_max, 50);
        assert!(demand.change_bytes_max < config.limits.frame_bytes_max);

        let mut bridge = BridgeSession::new(config, 0);
        let none = WireLimits { changes_per_batch_max: 0, ..WireLimits::default() };
        let actions = bridge.on_message(Message::Hello(Hello { limits: none, ..hello() }), 1);
        assert!(matches!(bridge_sent(&actions)[0], Message::Error { code: ErrorCode::Malformed, .. }), "{actions:?}");
    }

    #[test]
    fn upstream_is_pipelined_up_to_the_window_and_acked_in_order() {
        let (mut edge, mut bridge) = established();
        let mut frames = Vec::new();
        let mut next = 1;
        while let Some(demand) = edge.upstream_demand() {
            assert_eq!(demand.after_seq, next - 1);
            frames.extend(sent(&edge.send_upstream(vec![change(next), change(next + 1)], 4)).into_iter().cloned());
            next += 2;
        }
        assert_eq!(frames.len(), SessionConfig::default().batches_in_flight_max);
        for frame in frames {
            assert!(matches!(&bridge.on_message(frame, 5)[0], BridgeAction::Store { .. }));
        }
        let rejection = Rejection { seq: 2, ticket: change(2).ticket, message: "illegal transition".into() };
        let acks = bridge.stored(vec![rejection], 6);
        let acks: Vec<Message> = bridge_sent(&acks).into_iter().cloned().collect();
        assert!(matches!(acks[0], Message::Rejected { seq: 2, .. }));
        assert_eq!(acks[1], Message::Ack { up_to_seq: 2 });
        assert!(matches!(edge.on_message(acks[0].clone(), 7)[0], EdgeAction::Stuck { seq: 2, .. }));
        assert_eq!(edge.on_message(acks[1].clone(), 7), vec![EdgeAction::Acked { up_to_seq: 2 }]);
        assert_eq!(edge.batches_in_flight(), 3);
        assert_eq!(edge.upstream_demand().map(|d| d.after_seq), Some(8));
    }

    #[test]
    fn a_new_connection_sends_the_whole_outbox_again_and_acks_only_what_it_carried() {
        // The edge's outbox holds 4..=6; whatever an earlier connection (or
        // another database of the node) had acknowledged, this one starts over.
        let (mut edge, mut bridge) = established();
        assert_eq!(edge.upstream_demand().map(|d| d.after_seq), Some(0));
        let frame = sent(&edge.send_upstream(vec![change(4), change(5), change(6)], 4))[0].clone();
        let actions = bridge.on_message(frame, 5);
        assert_eq!(actions[0], BridgeAction::Store { changes: vec![change(4), change(5), change(6)] });
        let ack = bridge_sent(&bridge.stored(Vec::new(), 6))[0].clone();
        assert_eq!(edge.on_message(ack, 7), vec![EdgeAction::Acked { up_to_seq: 6 }]);
        // A batch that goes back on the same connection is a violation, not a silent ack.
        let actions = bridge.on_message(Message::Upstream { changes: vec![change(6), change(7)] }, 8);
        assert!(matches!(actions.last(), Some(BridgeAction::Close(CloseReason::ProtocolViolation(_)))), "{actions:?}");
    }

    #[test]
    fn a_version_mismatch_is_refused_and_not_retried() {
        let mut bridge = BridgeSession::new(SessionConfig::default(), 0);
        let actions = bridge.on_message(Message::Hello(Hello { protocol_version: 99, ..hello() }), 1);
        let refused = bridge_sent(&actions)[0].clone();
        assert!(matches!(&refused, Message::Refused(r) if matches!(r.reason, RefusalReason::VersionMismatch { .. })));
        let (mut edge, _) = EdgeSession::start(hello(), SessionConfig::default(), 0);
        let actions = edge.on_message(refused, 2);
        let EdgeAction::Close(reason) = &actions[0] else { panic!("{actions:?}") };
        assert!(!reason.retryable());
        assert_eq!(edge.phase(), EdgePhase::Closed);
    }

    #[test]
    fn silence_closes_a_half_open_connection() {
        let (mut edge, _) = established();
        let config = SessionConfig::default();
        let ping_at = 3 + config.heartbeat_interval_ms as i64;
        assert!(matches!(sent(&edge.on_tick(ping_at))[..], [Message::Ping { .. }]));
        assert!(edge.on_tick(ping_at + 1).is_empty());
        let dead_at = 3 + config.heartbeat_timeout_ms as i64;
        assert_eq!(edge.on_tick(dead_at), vec![EdgeAction::Close(CloseReason::HeartbeatTimeout)]);
    }

    #[test]
    fn messages_out_of_place_are_violations() {
        let mut bridge = BridgeSession::new(SessionConfig::default(), 0);
        let actions = bridge.on_message(Message::Upstream { changes: vec![change(1)] }, 1);
        assert!(matches!(actions.last(), Some(BridgeAction::Close(CloseReason::ProtocolViolation(_)))));
        let (mut edge, mut bridge) = established();
        let actions = edge.on_message(Message::Ack { up_to_seq: 10 }, 1);
        assert!(matches!(actions.last(), Some(EdgeAction::Close(CloseReason::ProtocolViolation(_)))));
        let actions = bridge.on_message(Message::LeaseHeld { lease: LEASE }, 5);
        assert!(matches!(actions.last(), Some(BridgeAction::Close(_))), "a lease is confirmed once: {actions:?}");
    }

    #[test]
    fn a_reconciliation_compares_every_ticket_one_message_at_a_time() {
        let (mut edge, mut bridge) = established();
        assert_eq!(edge.reconcile_demand(), None, "none asked for");
        assert!(edge.wants_reconcile_request());
        edge.request_reconcile();
        assert!(!edge.wants_reconcile_request(), "one reconciliation at a time");
        let demand = edge.reconcile_demand().unwrap();
        assert_eq!((demand.after, demand.tickets_max), (None, RECONCILE_TICKETS_MAX));
        let heads = |n: usize| TicketHeads { ticket: TicketId::new(1 + n as i64, [0; 10]), heads: vec![[n as u8; 32]] };
        let full: Vec<TicketHeads> = (0..RECONCILE_TICKETS_MAX).map(heads).collect();
        let frame = sent(&edge.send_reconcile(full, 5))[0].clone();
        assert_eq!(edge.reconcile_demand(), None, "one message in flight");
        let BridgeAction::CheckHeads { tickets, last } = bridge.on_message(frame, 6).remove(0) else { panic!() };
        assert!(!last);
        let answer = bridge_sent(&bridge.heads_checked(vec![tickets[3].clone()], last, 7))[0].clone();
        assert_eq!(edge.on_message(answer, 8), vec![EdgeAction::Resend { missing: vec![heads(3)] }]);
        let demand = edge.reconcile_demand().unwrap();
        assert_eq!(demand.after, Some(heads(RECONCILE_TICKETS_MAX - 1).ticket));
        let frame = sent(&edge.send_reconcile(vec![heads(1_000)], 9))[0].clone();
        let BridgeAction::CheckHeads { last, .. } = bridge.on_message(frame, 10).remove(0) else { panic!() };
        let answer = bridge_sent(&bridge.heads_checked(Vec::new(), last, 11))[0].clone();
        assert_eq!(edge.on_message(answer.clone(), 12), vec![EdgeAction::ReconcileDone]);
        assert!(!edge.reconciling());
        let actions = edge.on_message(answer, 13);
        assert!(matches!(actions.last(), Some(EdgeAction::Close(CloseReason::ProtocolViolation(_)))), "unasked");
    }

    /// Before `Welcome` the edge does not know the bridge will have it, so a
    /// reconciliation asked for then waits for the established session.
    #[test]
    fn a_reconciliation_starts_only_once_the_session_is_established() {
        let (mut edge, _) = EdgeSession::start(hello(), SessionConfig::default(), 0);
        assert!(!edge.wants_reconcile_request());
        edge.request_reconcile();
        assert!(!edge.reconciling());
        let (mut edge, _) = established();
        edge.request_reconcile();
        assert!(edge.reconciling());
    }

    /// No bridge sends snapshots: the variant keeps its number on the wire,
    /// and an edge that receives one ends the session.
    #[test]
    fn a_snapshot_is_a_violation_at_the_edge() {
        let (mut edge, _) = established();
        let snapshot = Message::Snapshot { tickets: Vec::new(), cursor: Cursor::new(vec![1]), last: true };
        let actions = edge.on_message(snapshot, 9);
        assert!(matches!(actions.last(), Some(EdgeAction::Close(CloseReason::ProtocolViolation(_)))), "{actions:?}");
    }

    #[test]
    fn an_open_session_takes_a_new_lease_when_asked() {
        let (mut edge, mut bridge) = established();
        let renewed = Lease { generation: 2, nonce: [6; 16] };
        let offer = bridge_sent(&bridge.offer_lease(renewed, 5))[0].clone();
        let actions = edge.on_message(offer, 6);
        assert_eq!(actions[0], EdgeAction::HoldLease(renewed));
        let held = sent(&actions)[0].clone();
        assert_eq!(bridge.on_message(held, 7), vec![BridgeAction::LeaseHeld { lease: renewed }]);
    }

    /// A revoked or expired token ends an established session: the edge
    /// hears why, and may come back with a fresh token.
    #[test]
    fn lapsed_credentials_end_an_established_session_with_a_refusal() {
        let (mut edge, mut bridge) = established();
        let actions = bridge.credentials_lapsed("token_revoked");
        let refused = bridge_sent(&actions)[0].clone();
        assert!(
            matches!(&refused, Message::Refused(r) if r.reason == RefusalReason::Unauthorized && r.detail == "token_revoked")
        );
        assert_eq!(bridge.phase(), BridgePhase::Closed);
        assert!(bridge.credentials_lapsed("token_expired").is_empty(), "said once");
        let actions = edge.on_message(refused, 9);
        let Some(EdgeAction::Close(reason)) = actions.last() else { panic!("{actions:?}") };
        assert!(reason.retryable(), "a new token may be had without a person");
    }

    #[test]
    fn a_text_frame_is_a_malformed_frame() {
        let (_, mut bridge) = established();
        let actions = bridge.on_text_frame();
        assert!(matches!(bridge_sent(&actions)[0], Message::Error { code: ErrorCode::Malformed, .. }), "{actions:?}");
        assert_eq!(bridge.phase(), BridgePhase::Closed);
    }

    #[test]
    fn reconnect_delays_grow_to_a_cap_and_never_reach_zero() {
        assert_eq!(reconnect_delay_ms(0, 500, 30_000, 0.0), 250);
        assert_eq!(reconnect_delay_ms(3, 500, 30_000, 1.0), 4_000);
        assert_eq!(reconnect_delay_ms(40, 500, 30_000, 0.5), 22_500);
    }
}
