//! Durable ticket storage in SQLite.
//!
//! One writer thread ([`GroupWriter`]) owns the only write connection.
//! Requests hand it jobs over a bounded queue; it takes every job waiting (up
//! to `group_commit_max`), applies them in one transaction (one fsync with
//! `synchronous=FULL`; a job the domain refuses is refused before it writes
//! anything), and only then answers.
//! So a write is acknowledged only once it is durable, and a burst of writes
//! costs one fsync, not one per request. Running every read-modify-write of a
//! ticket document on this one thread also means no edit can lose another.
//!
//! Reads use a small pool of read-only connections (WAL lets them run beside
//! the writer) and return the materialized ticket JSON stored with each
//! document, so listing never parses Automerge.

use std::sync::Arc;

use automerge::ActorId;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use service_kit::sqlite::{self, Database, ReadPool};
use service_kit::writer::{GroupWriter, QueueError};
use sync_protocol::document::{DocumentError, HistoryEntry, Mutation, TICKET_JSON_VERSION, TicketDocument};
use sync_protocol::formulary::Medication;
use sync_protocol::ids::{NodeId, TicketId};
use sync_protocol::ticket::{Limits, Priority, Status, Ticket, UnixMillis};
use sync_protocol::wire::{Cursor, DatabaseId, HEADS_PER_TICKET_MAX, Lease, TicketHeads};
use tokio::sync::{broadcast, oneshot};

use crate::config::StorageConfig;

/// Schema migrations, applied in order at start; `PRAGMA user_version` holds
/// how many have run. Never edit a released entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: tickets with their documents, the outbox of local changes, sync state.
    r#"
    CREATE TABLE tickets (
        id            TEXT PRIMARY KEY,
        status        TEXT NOT NULL,
        priority      TEXT NOT NULL,
        priority_rank INTEGER NOT NULL,
        created_at    INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL,
        conflicts     INTEGER NOT NULL,
        ticket        TEXT NOT NULL,
        document      BLOB NOT NULL
    ) STRICT;
    CREATE INDEX tickets_queue ON tickets (priority_rank DESC, created_at, id);
    CREATE INDEX tickets_by_status ON tickets (status, priority_rank DESC, created_at, id);
    CREATE TABLE outbox (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        ticket_id     TEXT NOT NULL REFERENCES tickets (id),
        change        BLOB NOT NULL,
        created_at    INTEGER NOT NULL,
        stuck_code    TEXT,
        stuck_message TEXT
    ) STRICT;
    CREATE TABLE sync_state (
        key   TEXT PRIMARY KEY,
        value BLOB NOT NULL
    ) STRICT;
    "#,
    // 2: the database's own id (see `DATABASE_KEY`), for databases made before it.
    r#"
    INSERT INTO sync_state (key, value) VALUES ('database', randomblob(16)) ON CONFLICT (key) DO NOTHING;
    "#,
    // 3: the medication catalogue, as last fetched from the cloud
    // (`formulary::Medication`, JSON, by code).
    r#"
    CREATE TABLE formulary (
        code   TEXT PRIMARY KEY,
        name   TEXT NOT NULL,
        active INTEGER NOT NULL,
        entry  TEXT NOT NULL
    ) STRICT;
    "#,
];

/// `sync_state` key of the database's id (`wire::DatabaseId`): 16 random
/// bytes, minted when the database is created and again by a restore, so
/// the bridge can tell this database's history from another's under the
/// same node (see `sync_protocol::admission`).
pub const DATABASE_KEY: &str = "database";
/// `sync_state` key of the lease the bridge last handed this database.
pub const LEASE_KEY: &str = "lease";
/// `sync_state` key set when every ticket is to be compared with the cloud
/// (after a restore, or at an operator's request), cleared when done.
pub const RECONCILE_KEY: &str = "reconcile";
/// `sync_state` key of when the last reconciliation finished (ms, big-endian).
pub const RECONCILED_AT_KEY: &str = "reconciled_at";

/// The schema version this build creates and reads.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// Subscribers that fall this far behind the live feed are told to resync.
const EVENTS_CAPACITY: usize = 1_024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("ticket {0} not found")]
    NotFound(TicketId),
    #[error("ticket {0} already exists")]
    Duplicate(TicketId),
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error(transparent)]
    Migrate(#[from] sqlite::MigrateError),
    /// The database could not be opened: a wrong or missing key, or no database.
    #[error(transparent)]
    Open(#[from] sqlite::OpenError),
    #[error(transparent)]
    ReadTask(#[from] sqlite::ReadTaskFailed),
    #[error("too many writes are waiting; retry shortly")]
    Overloaded,
    #[error("the store is shut down")]
    Closed,
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// What is stored cannot be read back: someone must look at the data.
    #[error("stored ticket is unreadable: {0}")]
    Corrupt(String),
    /// The transaction holding this write failed; nothing of it is stored.
    #[error("the write could not be committed: {0}")]
    NotCommitted(String),
    #[error("cannot start the writer thread: {0}")]
    Writer(std::io::Error),
    /// A value could not be encoded for storage (a bug, not bad data).
    #[error("cannot encode for storage: {0}")]
    Encode(#[from] serde_json::Error),
    /// The store was used against its own rules (a bug).
    #[error("a store invariant was broken: {0}")]
    Invariant(&'static str),
}

/// A ticket changed; sent to live subscribers after the change is durable.
#[derive(Debug, Clone)]
pub struct TicketEvent {
    pub id: TicketId,
    /// The materialized ticket as JSON, shared by every subscriber.
    pub ticket_json: Arc<str>,
}

/// What the writer can do.
pub enum Write {
    /// Insert a new ticket whose document was built by the caller.
    Create { ticket: Box<Ticket>, document: Vec<u8>, change: Vec<u8> },
    /// Load a ticket's document, run the mutation, store the result.
    Mutate { id: TicketId, mutation: Mutation },
    /// The bridge durably has every change up to this outbox sequence (all
    /// of them sent on the connection that acknowledged them).
    Acked { up_to_seq: u64 },
    /// The bridge refused this change; keep it, visibly, and stop sending it.
    Stuck { seq: u64, code: String, message: String },
    /// Changes from the cloud, applied with the feed cursor after them in
    /// one transaction, so a crash can neither lose nor repeat them.
    ApplyRemote { changes: Vec<(TicketId, Vec<u8>)>, cursor: Vec<u8> },
    /// The bridge handed this database a new lease; it replaces the one held.
    HoldLease { lease: Lease },
    /// Compare every ticket with the cloud on the next link (`RECONCILE_KEY`).
    RequestReconcile,
    /// A reconciliation found tickets whose changes the cloud lacks: this
    /// node's changes of them beyond the cloud's heads go into the outbox again.
    Resend { missing: Vec<TicketHeads>, node: NodeId },
    /// The reconciliation compared every ticket.
    ReconcileDone,
    /// The medication catalogue as fetched from the cloud replaces the copy
    /// held; `etag` names that version, for the next fetch.
    ReplaceFormulary { entries: Vec<Medication>, etag: String },
}

impl std::fmt::Debug for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Write::Create { ticket, .. } => f.debug_struct("Create").field("id", &ticket.id).finish_non_exhaustive(),
            Write::Mutate { id, .. } => f.debug_struct("Mutate").field("id", id).finish_non_exhaustive(),
            Write::Acked { up_to_seq } => f.debug_struct("Acked").field("up_to_seq", up_to_seq).finish(),
            Write::Stuck { seq, .. } => f.debug_struct("Stuck").field("seq", seq).finish_non_exhaustive(),
            Write::ApplyRemote { changes, .. } => {
                f.debug_struct("ApplyRemote").field("changes", &changes.len()).finish_non_exhaustive()
            }
            Write::HoldLease { .. } => f.debug_struct("HoldLease").finish_non_exhaustive(),
            Write::RequestReconcile => f.write_str("RequestReconcile"),
            Write::Resend { missing, .. } => f.debug_struct("Resend").field("tickets", &missing.len()).finish(),
            Write::ReconcileDone => f.write_str("ReconcileDone"),
            Write::ReplaceFormulary { entries, .. } => {
                f.debug_struct("ReplaceFormulary").field("entries", &entries.len()).finish_non_exhaustive()
            }
        }
    }
}

struct Job {
    write: Write,
    now: UnixMillis,
    reply: oneshot::Sender<Result<Vec<Ticket>, StoreError>>,
}

/// Filters and paging of the ticket list.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub statuses: Vec<Status>,
    pub priorities: Vec<Priority>,
    /// Return tickets after this position in the queue order.
    pub after: Option<QueuePosition>,
    pub limit: usize,
}

/// A position in the queue order: priority (highest first), then age
/// (oldest first), then id. Keyset paging on it is stable under inserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePosition {
    pub priority_rank: i64,
    pub created_at: UnixMillis,
    pub id: String,
}

impl QueuePosition {
    pub fn token(&self) -> String {
        format!("{}.{}.{}", self.priority_rank, self.created_at, self.id)
    }

    pub fn parse(token: &str) -> Option<Self> {
        let mut parts = token.splitn(3, '.');
        let priority_rank = parts.next()?.parse().ok()?;
        let created_at = parts.next()?.parse().ok()?;
        let id = parts.next()?.parse::<TicketId>().ok()?.to_string();
        Some(Self { priority_rank, created_at, id })
    }
}

#[derive(Debug, Clone)]
pub struct TicketPage {
    /// Materialized tickets as JSON, in queue order.
    pub tickets: Vec<String>,
    pub next: Option<QueuePosition>,
}

/// Counts for the sync status endpoint and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OutboxCounts {
    pub pending: u64,
    pub stuck: u64,
}

pub struct Store {
    writer: GroupWriter<Job>,
    readers: Arc<ReadPool>,
    events: broadcast::Sender<TicketEvent>,
    replica: ActorId,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("replica", &self.replica).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the database with its key, migrates it,
    /// and starts the writer thread.
    pub fn open(
        database: &Database,
        config: &StorageConfig,
        limits: Limits,
        replica: ActorId,
    ) -> Result<Self, StoreError> {
        let mut writer = database.open()?;
        sqlite::configure_writer(&writer)?;
        sqlite::migrate(&mut writer, MIGRATIONS)?;
        rematerialize(&mut writer, &replica)?;
        let readers = ReadPool::open(database, config.readers)?;
        let (events, _) = broadcast::channel(EVENTS_CAPACITY);
        let context = WriterContext { replica: replica.clone(), limits, events: events.clone() };
        let writer = GroupWriter::spawn(
            "sqlite-writer",
            writer,
            config.write_queue_max,
            config.group_commit_max,
            move |conn, batch| context.commit(conn, batch),
        )
        .map_err(StoreError::Writer)?;
        Ok(Self { writer, readers: Arc::new(readers), events, replica })
    }

    /// The Automerge actor id of this process; unique per process run.
    pub fn replica(&self) -> &ActorId {
        &self.replica
    }

    /// Queues a write of one ticket and waits until it is durable.
    pub async fn write(&self, write: Write, now: UnixMillis) -> Result<Ticket, StoreError> {
        self.write_all(write, now).await?.pop().ok_or(StoreError::Invariant("a ticket write changed no ticket"))
    }

    /// Queues any write and waits until it is durable; returns the tickets it changed.
    pub async fn write_all(&self, write: Write, now: UnixMillis) -> Result<Vec<Ticket>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer.try_send(Job { write, now, reply }).map_err(|e| match e {
            QueueError::Full => StoreError::Overloaded,
            QueueError::Closed => StoreError::Closed,
        })?;
        metrics::gauge!("edge_write_queue_depth").set(self.writer.queued() as f64);
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs a read on a pooled connection, off the async threads.
    pub async fn read<R, F>(&self, read: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.readers.read(read).await
    }

    pub fn subscribe(&self) -> broadcast::Receiver<TicketEvent> {
        self.events.subscribe()
    }

    /// Lets the writer commit what is queued, checkpoint the WAL and stop,
    /// and waits for it. Writes queued after this are answered `Closed`.
    /// Idempotent.
    pub async fn close(&self) {
        self.writer.close().await;
    }
}

struct WriterContext {
    replica: ActorId,
    limits: Limits,
    events: broadcast::Sender<TicketEvent>,
}

impl WriterContext {
    /// Commits a batch in one transaction. A job refused by the domain (or
    /// not found, or a duplicate) is refused before it writes anything, so
    /// it needs no savepoint and does not affect the others. An SQLite error
    /// fails the whole batch: nothing of it was durable, so nothing of it is
    /// acknowledged.
    fn commit(&self, conn: &mut Connection, batch: Vec<Job>) {
        metrics::histogram!("edge_group_commit_size").record(batch.len() as f64);
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut jobs = batch.into_iter();
        let result = (|| -> Result<(), rusqlite::Error> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for job in jobs.by_ref() {
                let outcome = match self.apply(&tx, job.write, job.now) {
                    Err(StoreError::Sqlite(error)) => return Err(error),
                    outcome => outcome,
                };
                outcomes.push((job.reply, outcome));
            }
            tx.commit()
        })();
        match result {
            Ok(()) => {
                for (reply, outcome) in outcomes {
                    for (ticket, json) in outcome.iter().flatten() {
                        // No subscriber is fine; the send only fails then.
                        let _ = self.events.send(TicketEvent { id: ticket.id, ticket_json: Arc::clone(json) });
                    }
                    let _ = reply.send(outcome.map(|changed| changed.into_iter().map(|(ticket, _)| ticket).collect()));
                }
            }
            Err(error) => {
                tracing::error!(%error, "group commit failed; no write of the batch was acknowledged");
                let unreached = jobs.map(|job| job.reply);
                for reply in outcomes.into_iter().map(|(reply, _)| reply).chain(unreached) {
                    let _ = reply.send(Err(StoreError::NotCommitted(error.to_string())));
                }
            }
        }
    }

    fn apply(&self, conn: &Connection, write: Write, now: UnixMillis) -> Result<Vec<(Ticket, Arc<str>)>, StoreError> {
        match write {
            Write::Create { ticket, document, change } => {
                let json = ticket_json(&ticket)?;
                let inserted = write_ticket_row(conn, &ticket, &json, &document, OnConflict::Refuse)?;
                if !inserted {
                    return Err(StoreError::Duplicate(ticket.id));
                }
                append_outbox(conn, ticket.id, &change, now)?;
                Ok(vec![(*ticket, json)])
            }
            Write::Mutate { id, mutation } => {
                let mut document = self.load(conn, id)?.ok_or(StoreError::NotFound(id))?;
                let change = mutation(&mut document)?;
                let changed = save_ticket(conn, &mut document)?;
                append_outbox(conn, id, &change, now)?;
                Ok(vec![changed])
            }
            Write::Acked { up_to_seq } => {
                conn.execute("DELETE FROM outbox WHERE seq <= ?1 AND stuck_code IS NULL", [up_to_seq as i64])?;
                set_sync_state(conn, "last_sync_at", &now.to_be_bytes())?;
                Ok(Vec::new())
            }
            Write::HoldLease { lease } => {
                set_sync_state(conn, LEASE_KEY, &lease.to_bytes())?;
                Ok(Vec::new())
            }
            Write::RequestReconcile => {
                set_sync_state(conn, RECONCILE_KEY, &now.to_be_bytes())?;
                Ok(Vec::new())
            }
            Write::Resend { missing, node } => {
                self.resend(conn, &missing, &node, now)?;
                Ok(Vec::new())
            }
            Write::ReconcileDone => {
                conn.execute("DELETE FROM sync_state WHERE key = ?1", [RECONCILE_KEY])?;
                set_sync_state(conn, RECONCILED_AT_KEY, &now.to_be_bytes())?;
                tracing::info!("reconciliation done: every ticket was compared with the cloud");
                Ok(Vec::new())
            }
            Write::Stuck { seq, code, message } => {
                conn.execute(
                    "UPDATE outbox SET stuck_code = ?2, stuck_message = ?3 WHERE seq = ?1",
                    params![seq as i64, code, message],
                )?;
                tracing::warn!(seq, %code, %message, "the bridge refused a local change; it is kept as stuck");
                Ok(Vec::new())
            }
            Write::ApplyRemote { changes, cursor } => self.apply_remote(conn, changes, &cursor, now),
            Write::ReplaceFormulary { entries, etag } => {
                replace_formulary(conn, &entries, &etag, now)?;
                Ok(Vec::new())
            }
        }
    }

    /// Merges changes from the cloud into their tickets and stores the
    /// feed's cursor with them, in the caller's transaction.
    fn apply_remote(
        &self,
        conn: &Connection,
        changes: Vec<(TicketId, Vec<u8>)>,
        cursor: &[u8],
        now: UnixMillis,
    ) -> Result<Vec<(Ticket, Arc<str>)>, StoreError> {
        let mut touched: Vec<(TicketId, TicketDocument)> = Vec::new();
        for (id, change) in changes {
            let position = match touched.iter().position(|(t, _)| *t == id) {
                Some(position) => position,
                None => match self.load(conn, id)? {
                    Some(document) => {
                        touched.push((id, document));
                        touched.len() - 1
                    }
                    None => {
                        match TicketDocument::from_untrusted_changes(
                            std::slice::from_ref(&change),
                            &self.limits,
                            self.replica.clone(),
                        ) {
                            Ok((document, _)) => touched.push((id, document)),
                            Err(error) => {
                                tracing::error!(ticket = %id, %error, "a change from the cloud could not be applied")
                            }
                        }
                        continue;
                    }
                },
            };
            if let Err(error) = touched[position].1.apply_untrusted(std::slice::from_ref(&change), &self.limits) {
                // The bridge validated it; failing here means a bug
                // or a missing dependency. Logged and counted, and
                // the feed moves on rather than stall every ward.
                metrics::counter!("edge_remote_changes_failed_total").increment(1);
                tracing::error!(ticket = %id, %error, "a change from the cloud could not be applied");
            }
        }
        let mut changed = Vec::with_capacity(touched.len());
        for (_, mut document) in touched {
            changed.push(save_ticket(conn, &mut document)?);
        }
        set_sync_state(conn, "cursor", cursor)?;
        set_sync_state(conn, "last_sync_at", &now.to_be_bytes())?;
        Ok(changed)
    }

    /// Puts this node's changes the cloud lacks back into the outbox, in an
    /// order the cloud can apply them; the bridge skips any it has by hash.
    /// Changes of others (the pharmacy's) are the cloud's to hold: a node
    /// may not relay them.
    fn resend(
        &self,
        conn: &Connection,
        missing: &[TicketHeads],
        node: &NodeId,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        let mut resent = 0usize;
        for ticket in missing {
            let Some(mut document) = self.load(conn, ticket.ticket)? else { continue };
            for change in document.changes_beyond(&ticket.heads) {
                if change.audit().actor.device == *node {
                    append_outbox(conn, ticket.ticket, change.bytes(), now)?;
                    resent += 1;
                }
            }
        }
        tracing::warn!(tickets = missing.len(), changes = resent, "the cloud lacked changes of this node; sent again");
        Ok(())
    }

    fn load(&self, conn: &Connection, id: TicketId) -> Result<Option<TicketDocument>, StoreError> {
        let bytes: Option<Vec<u8>> = conn
            .query_row("SELECT document FROM tickets WHERE id = ?1", [id.to_string()], |row| row.get(0))
            .optional()?;
        bytes.map(|bytes| TicketDocument::load(&bytes, self.replica.clone())).transpose().map_err(StoreError::from)
    }
}

/// What to do when a ticket row with the same id exists.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnConflict {
    /// Keep the stored row (a new ticket's id is never reused).
    Refuse,
    Replace,
}

/// Writes a ticket's row: its document and materialized columns. Returns
/// whether the row was written.
fn write_ticket_row(
    conn: &Connection,
    ticket: &Ticket,
    json: &str,
    document: &[u8],
    on_conflict: OnConflict,
) -> Result<bool, StoreError> {
    // Two fixed statements rather than one built per call, so each is
    // prepared once per connection and then taken from its cache.
    let sql = match on_conflict {
        OnConflict::Refuse => {
            "INSERT INTO tickets (id, status, priority, priority_rank, created_at, updated_at, conflicts, ticket, document)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (id) DO NOTHING"
        }
        OnConflict::Replace => {
            "INSERT INTO tickets (id, status, priority, priority_rank, created_at, updated_at, conflicts, ticket, document)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (id) DO UPDATE SET status = ?2, priority = ?3,
             priority_rank = ?4, updated_at = ?6, conflicts = ?7, ticket = ?8, document = ?9"
        }
    };
    let written = conn.prepare_cached(sql)?.execute(params![
        ticket.id.to_string(),
        ticket.status.as_str(),
        ticket.priority.as_str(),
        ticket.priority as i64,
        ticket.created_at,
        ticket.updated_at,
        ticket.open_conflicts() as i64,
        json,
        document
    ])?;
    Ok(written > 0)
}

/// Stores a ticket's document and its materialized columns, replacing the row.
fn save_ticket(conn: &Connection, document: &mut TicketDocument) -> Result<(Ticket, Arc<str>), StoreError> {
    let ticket = document.ticket()?;
    let json = ticket_json(&ticket)?;
    write_ticket_row(conn, &ticket, &json, &document.save(), OnConflict::Replace)?;
    Ok((ticket, json))
}

/// `sync_state` key of the shape the stored ticket JSON was written in
/// (`document::TICKET_JSON_VERSION`, big-endian).
const TICKET_JSON_KEY: &str = "ticket_json_version";
/// Rewrites every stored ticket's JSON and columns from its document when
/// they are of an older shape, so a list shows every ticket alike after an
/// upgrade. Runs at open, before serving.
fn rematerialize(conn: &mut Connection, replica: &ActorId) -> Result<(), StoreError> {
    let held = sync_state(conn, TICKET_JSON_KEY)?
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
        .map_or(0, u64::from_be_bytes);
    if held >= TICKET_JSON_VERSION {
        return Ok(());
    }
    sqlite::rewrite_tickets::<StoreError>(
        conn,
        TICKET_JSON_VERSION,
        |tx, _, document| {
            let ticket = TicketDocument::load(document, replica.clone())?.ticket()?;
            write_ticket_row(tx, &ticket, &ticket_json(&ticket)?, document, OnConflict::Replace).map(|_| ())
        },
        |tx| set_sync_state(tx, TICKET_JSON_KEY, &TICKET_JSON_VERSION.to_be_bytes()),
    )
}

fn set_sync_state(conn: &Connection, key: &str, value: &[u8]) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO sync_state (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2",
        params![key, value],
    )?;
    Ok(())
}

/// A value of the sync state (`cursor`, `last_sync_at`).
/// `sync_state` keys of the catalogue's version (the bridge's ETag) and of
/// when it was last fetched (ms, big-endian).
pub const FORMULARY_ETAG_KEY: &str = "formulary_etag";
pub const FORMULARY_AT_KEY: &str = "formulary_at";

fn replace_formulary(conn: &Connection, entries: &[Medication], etag: &str, now: UnixMillis) -> Result<(), StoreError> {
    conn.execute("DELETE FROM formulary", [])?;
    let mut insert =
        conn.prepare_cached("INSERT INTO formulary (code, name, active, entry) VALUES (?1, ?2, ?3, ?4)")?;
    for entry in entries {
        insert.execute(params![entry.code, entry.name, entry.active, serde_json::to_string(entry)?])?;
    }
    set_sync_state(conn, FORMULARY_ETAG_KEY, etag.as_bytes())?;
    set_sync_state(conn, FORMULARY_AT_KEY, &now.to_be_bytes())?;
    tracing::info!(entries = entries.len(), "medication catalogue updated from the cloud");
    Ok(())
}

/// The catalogue's entries for `codes`, and how many entries it holds.
pub fn formulary_entries(conn: &Connection, codes: &[&str]) -> Result<(Vec<Medication>, u64), StoreError> {
    let size: i64 = conn.query_row("SELECT count(*) FROM formulary", [], |row| row.get(0))?;
    let mut select = conn.prepare_cached("SELECT entry FROM formulary WHERE code = ?1")?;
    let mut found = Vec::new();
    for code in codes {
        if let Some(entry) = select.query_row([code], |row| row.get::<_, String>(0)).optional()? {
            found.push(serde_json::from_str(&entry).map_err(|e| StoreError::Corrupt(format!("formulary entry: {e}")))?);
        }
    }
    Ok((found, size as u64))
}

/// Catalogue entries whose code starts with, or whose name contains,
/// `query` (any case), active ones first, then by code.
pub fn search_formulary(conn: &Connection, query: &str, limit: usize) -> Result<Vec<Medication>, StoreError> {
    let escaped = query.to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
    let mut select = conn.prepare_cached(
        "SELECT entry FROM formulary
         WHERE lower(code) LIKE ?1 || '%' ESCAPE '\\' OR lower(name) LIKE '%' || ?1 || '%' ESCAPE '\\'
         ORDER BY active DESC, code LIMIT ?2",
    )?;
    let entries = select.query_map(params![escaped, limit as i64], |row| row.get::<_, String>(0))?;
    entries
        .map(|entry| serde_json::from_str(&entry?).map_err(|e| StoreError::Corrupt(format!("formulary entry: {e}"))))
        .collect()
}

pub fn sync_state(conn: &Connection, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(conn.query_row("SELECT value FROM sync_state WHERE key = ?1", [key], |row| row.get(0)).optional()?)
}

/// What a hello says of this database: its id, the lease it holds, and
/// where its feed resumes.
#[derive(Debug, Clone)]
pub struct SyncIdentity {
    pub database: DatabaseId,
    pub lease: Option<Lease>,
    pub cursor: Option<Cursor>,
}

pub fn sync_identity(conn: &Connection) -> Result<SyncIdentity, StoreError> {
    let corrupt = |key: &str| StoreError::Corrupt(format!("sync state {key}"));
    let database = sync_state(conn, DATABASE_KEY)?.ok_or_else(|| corrupt(DATABASE_KEY))?;
    let database = <[u8; 16]>::try_from(database).map_err(|_| corrupt(DATABASE_KEY))?;
    let lease = sync_state(conn, LEASE_KEY)?.map(|bytes| Lease::from_bytes(&bytes).ok_or_else(|| corrupt(LEASE_KEY)));
    Ok(SyncIdentity {
        database: DatabaseId(database),
        lease: lease.transpose()?,
        cursor: sync_state(conn, "cursor")?.map(Cursor::new),
    })
}

/// The heads of the tickets after `after`, in ticket order, at most `max`.
pub fn ticket_heads(
    conn: &Connection,
    replica: &ActorId,
    after: Option<TicketId>,
    max: usize,
) -> Result<Vec<TicketHeads>, StoreError> {
    let mut statement = conn.prepare_cached("SELECT id, document FROM tickets WHERE id > ?1 ORDER BY id LIMIT ?2")?;
    let after = after.map(|id| id.to_string()).unwrap_or_default();
    let mut rows = statement.query(params![after, max as i64])?;
    let mut tickets = Vec::with_capacity(max);
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        let ticket = id.parse().map_err(|e| StoreError::Corrupt(format!("ticket id: {e}")))?;
        let mut document = TicketDocument::load(&row.get::<_, Vec<u8>>(1)?, replica.clone())?;
        let mut heads = document.head_hashes();
        heads.truncate(HEADS_PER_TICKET_MAX);
        tickets.push(TicketHeads { ticket, heads });
    }
    Ok(tickets)
}

/// The next outbox entries to send: after `after_seq`, not stuck, at most
/// `changes_max` and `bytes_max` bytes of changes (always at least one).
pub fn outbox_batch(
    conn: &Connection,
    after_seq: u64,
    changes_max: usize,
    bytes_max: usize,
) -> Result<Vec<OutboxEntry>, StoreError> {
    let mut statement = conn.prepare_cached(
        "SELECT seq, ticket_id, change FROM outbox WHERE seq > ?1 AND stuck_code IS NULL ORDER BY seq LIMIT ?2",
    )?;
    let mut rows = statement.query(params![after_seq as i64, changes_max as i64])?;
    let mut batch = Vec::new();
    let mut bytes = 0;
    while let Some(row) = rows.next()? {
        let change: Vec<u8> = row.get(2)?;
        if bytes + change.len() > bytes_max && !batch.is_empty() {
            break;
        }
        bytes += change.len();
        let ticket: String = row.get(1)?;
        let ticket = ticket.parse().map_err(|e| StoreError::Corrupt(format!("outbox ticket id: {e}")))?;
        batch.push(OutboxEntry { seq: row.get::<_, i64>(0)? as u64, ticket, change });
    }
    Ok(batch)
}

/// One local change waiting for the cloud.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    pub seq: u64,
    pub ticket: TicketId,
    pub change: Vec<u8>,
}

fn ticket_json(ticket: &Ticket) -> Result<Arc<str>, StoreError> {
    Ok(serde_json::to_string(ticket).map(Arc::from)?)
}

fn append_outbox(conn: &Connection, id: TicketId, change: &[u8], now: UnixMillis) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT INTO outbox (ticket_id, change, created_at) VALUES (?1, ?2, ?3)")?.execute(params![
        id.to_string(),
        change,
        now
    ])?;
    Ok(())
}

/// One page of the ticket list in queue order.
pub fn list_tickets(conn: &Connection, query: &ListQuery) -> Result<TicketPage, StoreError> {
    let mut sql = String::from("SELECT priority_rank, created_at, id, ticket FROM tickets WHERE 1 = 1");
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    let mut in_list = |sql: &mut String, column: &str, values: Vec<String>| {
        if !values.is_empty() {
            let marks = vec!["?"; values.len()].join(", ");
            sql.push_str(&format!(" AND {column} IN ({marks})"));
            args.extend(values.into_iter().map(rusqlite::types::Value::Text));
        }
    };
    in_list(&mut sql, "status", query.statuses.iter().map(|s| s.as_str().to_owned()).collect());
    in_list(&mut sql, "priority", query.priorities.iter().map(|p| p.as_str().to_owned()).collect());
    if let Some(after) = &query.after {
        sql.push_str(
            " AND (priority_rank < ? OR (priority_rank = ? AND (created_at > ? OR (created_at = ? AND id > ?))))",
        );
        args.extend([
            rusqlite::types::Value::Integer(after.priority_rank),
            rusqlite::types::Value::Integer(after.priority_rank),
            rusqlite::types::Value::Integer(after.created_at),
            rusqlite::types::Value::Integer(after.created_at),
            rusqlite::types::Value::Text(after.id.clone()),
        ]);
    }
    sql.push_str(" ORDER BY priority_rank DESC, created_at, id LIMIT ?");
    // One more than asked tells whether there is a next page.
    args.push(rusqlite::types::Value::Integer(query.limit as i64 + 1));
    let mut statement = conn.prepare_cached(&sql)?;
    let mut rows = statement.query(rusqlite::params_from_iter(args))?;
    let mut tickets = Vec::with_capacity(query.limit);
    let mut last = None;
    while let Some(row) = rows.next()? {
        if tickets.len() == query.limit {
            return Ok(TicketPage { tickets, next: last });
        }
        last = Some(QueuePosition { priority_rank: row.get(0)?, created_at: row.get(1)?, id: row.get(2)? });
        tickets.push(row.get(3)?);
    }
    Ok(TicketPage { tickets, next: None })
}

/// A ticket and its audit trail, read from its document.
pub fn ticket_with_history(
    conn: &Connection,
    id: TicketId,
    replica: &ActorId,
) -> Result<(Ticket, Vec<HistoryEntry>), StoreError> {
    let bytes: Vec<u8> = conn
        .query_row("SELECT document FROM tickets WHERE id = ?1", [id.to_string()], |row| row.get(0))
        .optional()?
        .ok_or(StoreError::NotFound(id))?;
    let mut document = TicketDocument::load(&bytes, replica.clone())?;
    Ok((document.ticket()?, document.history()?))
}

pub fn outbox_counts(conn: &Connection) -> Result<OutboxCounts, StoreError> {
    let (pending, stuck): (i64, i64) = conn.query_row(
        "SELECT count(*) FILTER (WHERE stuck_code IS NULL), count(*) FILTER (WHERE stuck_code IS NOT NULL) FROM outbox",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    Ok(OutboxCounts { pending: pending as u64, stuck: stuck as u64 })
}
