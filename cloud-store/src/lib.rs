//! The cloud's ticket storage behind one narrow interface, [`Store`], with
//! two backends chosen by configuration ([`config::Backend`]):
//!
//! - [`embedded`]: SQLite in the bridge's data directory. One process, no
//!   other service: a single-site install and development.
//! - [`distributed`]: Kafka (the change stream every accepted change is
//!   appended to), MongoDB (tickets and the wards' feeds, written by the
//!   projector) and Redis (cached reads, notices between bridge instances).
//!   Any number of bridge instances serve any ward.
//!
//! The bridge's sync endpoint and pharmacy API see only [`Store`] and the
//! types beside it; the projector process uses the distributed backend's
//! parts ([`distributed`]) and the merge pool ([`staging`]).
//!
//! This crate owns what is stored and how it merges. It must never speak
//! HTTP or decide what a caller may do: it has no HTTP types, and the
//! permission rules are the core's (`sync-protocol`).

pub mod config;
pub mod distributed;
pub mod embedded;
pub mod staging;

use std::path::Path;
use std::sync::Arc;

use automerge::ActorId;
use serde::{Deserialize, Serialize};
use sync_protocol::admission::{self, Admission, Claim, NodeLease};
use sync_protocol::document::{DocumentError, HistoryEntry, Mutation, TicketDocument};
use sync_protocol::formulary::Medication;
use sync_protocol::ids::{NodeId, TicketId, WardId};
use sync_protocol::session::Rejection;
use sync_protocol::ticket::{Priority, Status, Ticket, UnixMillis};
use sync_protocol::wire::{
    Cursor, DatabaseId, DownstreamChange, HEADS_PER_TICKET_MAX, Lease, Refused, TicketHeads, UpstreamChange,
};
use tokio::sync::broadcast;

use crate::config::{Backend, StoreOptions};

/// The most tickets one audit export covers.
pub const TRAIL_TICKETS_MAX: usize = 5_000;
pub use distributed::DistributedStore;
pub use embedded::EmbeddedStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("ticket {0} not found")]
    NotFound(TicketId),
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error(transparent)]
    Migrate(#[from] service_kit::sqlite::MigrateError),
    #[error(transparent)]
    ReadTask(#[from] service_kit::sqlite::ReadTaskFailed),
    #[error(transparent)]
    Open(#[from] service_kit::sqlite::OpenError),
    #[error("the store is shut down")]
    Closed,
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// What is stored cannot be read back: someone must look at the data.
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    /// A service the store needs (the broker, the database) is not
    /// answering; the operation can be retried later.
    #[error("{0}")]
    Unavailable(String),
    /// The configuration names something the services refuse (a topic of
    /// another partition count, unusable client settings).
    #[error("the store's configuration is not usable: {0}")]
    Config(String),
    #[error(transparent)]
    Client(#[from] service_kit::cloud::ClientError),
    /// The transaction holding this write failed; nothing of it is stored.
    #[error("the write was not committed: {0}")]
    NotCommitted(String),
    /// A read would cover more than its limit; a narrower one may not.
    #[error("more than {max} tickets match: narrow the range")]
    TooMany { max: usize },
    /// A thread or task of the store could not start or died.
    #[error("a storage task failed: {0}")]
    Task(String),
    /// A value could not be encoded for storage (a bug, not bad data).
    #[error("cannot encode for storage: {0}")]
    Encode(String),
    /// The store was used against its own rules (a bug).
    #[error("a store invariant was broken: {0}")]
    Invariant(&'static str),
}

impl StoreError {
    /// Whether retrying cannot help: the data, the configuration or the
    /// code is wrong, and someone must look (logged as an error, not a wait).
    pub fn needs_a_person(&self) -> bool {
        matches!(
            self,
            StoreError::Corrupt(_)
                | StoreError::Open(_)
                | StoreError::Config(_)
                | StoreError::Client(_)
                | StoreError::Encode(_)
                | StoreError::Invariant(_)
        )
    }
}

/// A ticket changed: feeds of its ward should read on, and live views show it.
#[derive(Debug, Clone)]
pub struct WardNotice {
    pub ward: WardId,
    /// The ticket that changed, materialized, for live pharmacy views.
    pub ticket_json: Arc<str>,
}

/// Filters of the pharmacy queue.
#[derive(Debug, Clone, Default)]
pub struct QueueQuery {
    pub wards: Vec<WardId>,
    pub statuses: Vec<Status>,
    pub priorities: Vec<Priority>,
    /// Only tickets with a line still owed (backordered).
    pub open_backorders: bool,
    pub limit: usize,
}

/// A page of the pharmacy queue: tickets as JSON, and how many match.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuePage {
    pub tickets: Vec<String>,
    pub total: u64,
}

/// A ticket with its audit trail.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TicketView {
    pub ticket: Ticket,
    pub history: Vec<HistoryEntry>,
}

impl TicketView {
    /// The ticket and its trail, from its stored document.
    pub fn read(document: &[u8], replica: ActorId) -> Result<Self, StoreError> {
        let mut document = TicketDocument::load(document, replica)?;
        Ok(TicketView { ticket: document.ticket()?, history: document.history()? })
    }
}

/// A pharmacy write, stored.
#[derive(Debug, Clone)]
pub struct PharmacyOutcome {
    pub ticket: Ticket,
    /// Whether reads (queue, ticket, feeds) already show it. Always so in
    /// the embedded store; the distributed store waits a bounded time for
    /// the projection and says if it is still on its way.
    pub visible: bool,
}

/// Where a node is in its ward's feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum FeedPosition {
    /// A position in the embedded change log.
    Log(u64),
    /// The offset of the last page read, per partition of the change topic
    /// (`-1`: none yet).
    Partitions(Vec<i64>),
}

/// Per-node sync diagnostics.
#[derive(Debug, Clone, Serialize)]
pub struct NodeDiagnostics {
    pub node: String,
    pub ward: String,
    /// The last upstream sequence stored from the node's current database
    /// (its outbox numbers; they start over with a new database).
    pub acked_up_to: u64,
    pub last_seen: UnixMillis,
    /// The id of the database that speaks for the node (hex).
    pub database: Option<String>,
    /// When a database the node never used last took it over (a restore,
    /// a new install).
    pub taken_over_at: Option<UnixMillis>,
    pub cursor: Option<FeedPosition>,
    /// Changes of the node's ward after its cursor (bounded count in the
    /// distributed store).
    pub backlog: u64,
    pub rejected: u64,
}

/// A hello's database admitted, with how and the node's record as stored
/// (its `offered` is the new lease), or the refusal.
pub type Admitted = Result<(Admission, NodeLease), Refused>;

/// A change to the lease of a node's database during its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseUpdate {
    /// It holds the lease offered (`admission::confirm`).
    Confirm { database: DatabaseId, lease: Lease },
    /// It is to take a new lease (`admission::offer`).
    Offer { database: DatabaseId, nonce: [u8; 16] },
}

impl LeaseUpdate {
    /// The record to store, or `None` to leave it as it is.
    pub fn apply(self, record: &NodeLease) -> Option<NodeLease> {
        match self {
            LeaseUpdate::Confirm { database, lease } => admission::confirm(record, database, lease),
            LeaseUpdate::Offer { database, nonce } => admission::offer(record, database, nonce),
        }
    }
}

/// A session's reading position in its ward's feed.
#[derive(Debug, Clone)]
pub struct Feed {
    pub node: NodeId,
    pub ward: WardId,
    position: FeedState,
}

#[derive(Debug, Clone)]
enum FeedState {
    Embedded(embedded::FeedState),
    Distributed(distributed::FeedState),
}

/// The next part of a feed, at most `changes_max` changes and about
/// `bytes_max` bytes.
#[derive(Debug, Clone, Copy)]
pub struct FeedLimits {
    pub changes_max: usize,
    pub bytes_max: usize,
}

#[derive(Debug)]
pub enum Store {
    Embedded(EmbeddedStore),
    Distributed(DistributedStore),
}

impl Store {
    /// Opens the configured backend; `database_path` is the embedded store's file.
    pub async fn open(
        backend: &Backend,
        options: &StoreOptions,
        database_path: &Path,
        replica: ActorId,
    ) -> Result<Self, StoreError> {
        Ok(match backend {
            Backend::Embedded => Store::Embedded(EmbeddedStore::open(
                database_path,
                options.limits.clone(),
                replica,
                options.write_queue_max,
            )?),
            Backend::Distributed(distributed) => {
                Store::Distributed(DistributedStore::open(distributed, options, replica).await?)
            }
        })
    }

    /// `embedded` or `distributed`, for logs.
    pub fn backend_name(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::Distributed(_) => "distributed",
        }
    }

    /// The Automerge actor of this process's pharmacy changes.
    pub fn replica(&self) -> &ActorId {
        match self {
            Store::Embedded(store) => store.replica(),
            Store::Distributed(store) => store.replica(),
        }
    }

    /// Notices of changed tickets, for feeds and live views.
    pub fn subscribe(&self) -> broadcast::Receiver<WardNotice> {
        match self {
            Store::Embedded(store) => store.subscribe(),
            Store::Distributed(store) => store.subscribe(),
        }
    }

    /// Nodes whose session on this instance another instance asked to take
    /// a new lease; `None` for the embedded store (one instance, whose
    /// sessions are asked directly).
    pub fn renewal_requests(&self) -> Option<broadcast::Receiver<NodeId>> {
        match self {
            Store::Embedded(_) => None,
            Store::Distributed(store) => Some(store.renewal_requests()),
        }
    }

    /// Validates a node's upstream batch and stores it durably; returns
    /// only then. The changes refused by validation are returned; every
    /// other one is stored (or already was).
    pub async fn store_upstream(
        &self,
        node: NodeId,
        ward: WardId,
        changes: Vec<UpstreamChange>,
    ) -> Result<Vec<Rejection>, StoreError> {
        match self {
            Store::Embedded(store) => store.store_upstream(node, ward, changes).await,
            Store::Distributed(store) => store.store_upstream(node, ward, changes).await,
        }
    }

    /// Runs a pharmacy edit or transition and stores the change.
    pub async fn pharmacy_write(&self, id: TicketId, mutation: Mutation) -> Result<PharmacyOutcome, StoreError> {
        match self {
            Store::Embedded(store) => store.pharmacy_write(id, mutation).await,
            Store::Distributed(store) => store.pharmacy_write(id, mutation).await,
        }
    }

    /// Decides whether the hello's database may speak for `node`
    /// (`admission::admit` against the node's stored record) and, if so,
    /// stores the record with the new lease (its `offered`) before
    /// answering. A database that takes the node over gets the node's own
    /// changes back in its feed, up to where the log stands now (see
    /// [`Self::open_feed`]).
    pub async fn admit(
        &self,
        node: NodeId,
        ward: WardId,
        claim: Claim,
        nonce: [u8; 16],
    ) -> Result<Admitted, StoreError> {
        match self {
            Store::Embedded(store) => store.admit(node, ward, claim, nonce).await,
            Store::Distributed(store) => store.admit(node, ward, claim, nonce).await,
        }
    }

    /// Changes the lease of the node's database during a session; returns
    /// the record stored, or `None` when it was left as it was (another
    /// database took the node over meanwhile, or there was nothing to change).
    pub async fn update_lease(&self, node: NodeId, update: LeaseUpdate) -> Result<Option<NodeLease>, StoreError> {
        match self {
            Store::Embedded(store) => store.update_lease(node, update).await,
            Store::Distributed(store) => store.update_lease(node, update).await,
        }
    }

    /// Renews the presence of an open session of `node` (the distributed
    /// store's: other instances refuse the node while it holds, and it lapses
    /// if not renewed, as when this instance dies); returns whether another
    /// instance refused a copy of the node's database meanwhile, so the
    /// session should take a new lease. The embedded store has one
    /// instance, whose open sessions `sync::OpenSessions` knows.
    pub async fn keep_present(&self, node: &NodeId) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(_) => Ok(false),
            Store::Distributed(store) => store.keep_present(node).await,
        }
    }

    /// Ends the presence of a session of `node` that closed.
    pub async fn leave(&self, node: &NodeId) -> Result<(), StoreError> {
        match self {
            Store::Embedded(_) => Ok(()),
            Store::Distributed(store) => store.leave(node).await,
        }
    }

    /// Starts a session's feed at the node's `cursor`. A node's own changes
    /// are skipped (it made them), except those logged before its database
    /// took the node over: that database may hold none of them (restored
    /// from a backup, or new hardware under the same name). The window is
    /// stored with the node, so a re-read cut short by a restart goes on
    /// sending them in the next session.
    pub async fn open_feed(&self, node: NodeId, ward: WardId, cursor: Option<&Cursor>) -> Result<Feed, StoreError> {
        let position = match self {
            Store::Embedded(store) => FeedState::Embedded(store.open_feed(&node, cursor).await?),
            Store::Distributed(store) => FeedState::Distributed(store.open_feed(&node, cursor).await?),
        };
        Ok(Feed { node, ward, position })
    }

    /// The next changes of the feed and the cursor after them, or `None`
    /// when the feed has nothing new. The cursor may move with no changes
    /// (all read were the node's own): it is still sent, so the node keeps
    /// its position.
    pub async fn read_feed(
        &self,
        feed: &mut Feed,
        limits: FeedLimits,
    ) -> Result<Option<(Vec<DownstreamChange>, Cursor)>, StoreError> {
        match (self, &mut feed.position) {
            (Store::Embedded(store), FeedState::Embedded(state)) => {
                store.read_feed(&feed.node, &feed.ward, state, limits).await
            }
            (Store::Distributed(store), FeedState::Distributed(state)) => {
                store.read_feed(&feed.node, &feed.ward, state, limits).await
            }
            _ => Err(StoreError::Invariant("a feed was opened on another store")),
        }
    }

    /// Of a node's tickets of `ward` and their heads as the node holds them
    /// (a reconciliation), those whose heads the cloud lacks some of, each
    /// with the cloud's heads (none: the cloud lacks the ticket). Tickets of
    /// other wards are left out: they are not the node's to compare.
    pub async fn missing_heads(&self, ward: WardId, tickets: Vec<TicketHeads>) -> Result<Vec<TicketHeads>, StoreError> {
        match self {
            Store::Embedded(store) => store.missing_heads(ward, tickets).await,
            Store::Distributed(store) => store.missing_heads(ward, tickets).await,
        }
    }

    /// Records how far a node has applied its feed. Diagnostics only: the
    /// node's own cursor is the truth, so this is not waited for.
    pub fn note_cursor(&self, node: NodeId, cursor: &Cursor) {
        match self {
            Store::Embedded(store) => store.note_cursor(node, cursor),
            Store::Distributed(store) => store.note_cursor(node, cursor),
        }
    }

    pub async fn queue(&self, query: QueueQuery) -> Result<QueuePage, StoreError> {
        match self {
            Store::Embedded(store) => store.queue(query).await,
            Store::Distributed(store) => store.queue(query).await,
        }
    }

    pub async fn ticket(&self, id: TicketId) -> Result<TicketView, StoreError> {
        match self {
            Store::Embedded(store) => store.ticket(id).await,
            Store::Distributed(store) => store.ticket(id).await,
        }
    }

    /// `ward`'s tickets with changes in `from..=to` (ms), each with its
    /// trail, oldest first: an audit export. More than `TRAIL_TICKETS_MAX`
    /// is refused (`TooMany`), not cut short: a partial export would read
    /// as complete.
    pub async fn trail(&self, ward: &WardId, from: UnixMillis, to: UnixMillis) -> Result<Vec<TicketView>, StoreError> {
        let limit = TRAIL_TICKETS_MAX + 1;
        let views = match self {
            Store::Embedded(store) => store.trail(ward, from, to, limit).await?,
            Store::Distributed(store) => store.trail(ward, from, to, limit).await?,
        };
        if views.len() > TRAIL_TICKETS_MAX {
            return Err(StoreError::TooMany { max: TRAIL_TICKETS_MAX });
        }
        Ok(views)
    }

    /// Adds or replaces an entry of the medication catalogue (checked by
    /// the caller); whether it was new.
    pub async fn put_medication(&self, medication: Medication) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(store) => store.put_medication(medication).await,
            Store::Distributed(store) => store.put_medication(medication).await,
        }
    }

    /// The medication catalogue's entries for `codes` (all of them for
    /// `None`), by code, and how many entries the catalogue has.
    pub async fn formulary(&self, codes: Option<Vec<String>>) -> Result<(Vec<Medication>, u64), StoreError> {
        match self {
            Store::Embedded(store) => store.formulary(codes).await,
            Store::Distributed(store) => store.formulary(codes).await,
        }
    }

    pub async fn diagnostics(&self) -> Result<Vec<NodeDiagnostics>, StoreError> {
        match self {
            Store::Embedded(store) => store.diagnostics().await,
            Store::Distributed(store) => store.diagnostics().await,
        }
    }

    /// Whether every service the store needs answers; the error names the one that does not.
    pub async fn ready(&self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(store) => store.ready().await,
            Store::Distributed(store) => store.ready().await,
        }
    }

    /// Projectors running, for a store that needs them (the distributed
    /// one, once it has counted); `None` for the embedded store.
    pub fn projectors_running(&self) -> Option<u64> {
        match self {
            Store::Embedded(_) => None,
            Store::Distributed(store) => store.projectors_running(),
        }
    }

    /// Stops taking writes and finishes those queued.
    pub async fn close(&self) {
        match self {
            Store::Embedded(store) => store.close().await,
            Store::Distributed(store) => store.close().await,
        }
    }
}

/// Compares a node's heads of a ticket with the cloud's document of it
/// (`None`: the cloud lacks the ticket): what the node should hear back,
/// if anything.
fn compare_heads(
    stored: Option<TicketDocument>,
    ward: &WardId,
    theirs: TicketHeads,
) -> Result<Option<TicketHeads>, StoreError> {
    let Some(mut document) = stored else {
        return Ok(Some(TicketHeads { ticket: theirs.ticket, heads: Vec::new() }));
    };
    // Heads checked first: most tickets compare equal, and those need no
    // materialization for the ward check.
    if !document.lacks_any(&theirs.heads) || document.ticket()?.ward != *ward {
        return Ok(None);
    }
    let mut heads = document.head_hashes();
    heads.truncate(HEADS_PER_TICKET_MAX);
    Ok(Some(TicketHeads { ticket: theirs.ticket, heads }))
}
