//! The bridge's embedded storage in SQLite: the default for a single-site
//! install and for development. The Kafka/MongoDB backend of a later issue
//! takes its place behind the same methods.
//!
//! - `changes`: the change log. Every accepted Automerge change, once (its
//!   hash is unique), numbered by a global sequence. An edge's downstream
//!   cursor is a position in it, and its feed is the log filtered by ward.
//! - `tickets`: each ticket's merged document and materialized columns, for
//!   the pharmacy queue.
//! - `nodes`: per edge node, the highest upstream sequence durably processed
//!   (what `Welcome.acked_up_to` reports), last seen, rejected count.
//! - `rejected_changes`: changes refused by validation, for diagnostics.
//!
//! One writer thread applies upstream batches and pharmacy writes, each job
//! in the same transaction as the others waiting (group commit), and answers
//! only after the commit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use automerge::ActorId;
use rayon::prelude::*;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde_bytes::ByteBuf;
use service_kit::sqlite::{self, ReadPool};
use service_kit::writer::GroupWriter;
use sync_protocol::document::{DocumentError, HistoryEntry, Mutation, ReceivedChange, TicketDocument};
use sync_protocol::ids::{NodeId, Role, TicketId, WardId};
use sync_protocol::session::Rejection;
use sync_protocol::ticket::{Limits, Priority, Status, Ticket, UnixMillis};
use sync_protocol::wire::{Cursor, DownstreamChange, UpstreamChange};
use tokio::sync::{broadcast, oneshot};

const MIGRATIONS: &[&str] = &[r#"
    CREATE TABLE changes (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        hash       TEXT NOT NULL UNIQUE,
        ward       TEXT NOT NULL,
        ticket_id  TEXT NOT NULL,
        origin     TEXT NOT NULL,
        change     BLOB NOT NULL
    ) STRICT;
    CREATE INDEX changes_by_ward ON changes (ward, seq);
    CREATE TABLE tickets (
        id            TEXT PRIMARY KEY,
        ward          TEXT NOT NULL,
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
    CREATE INDEX tickets_by_ward ON tickets (ward, status);
    CREATE TABLE nodes (
        node         TEXT PRIMARY KEY,
        ward         TEXT NOT NULL,
        acked_up_to  INTEGER NOT NULL,
        last_seen    INTEGER NOT NULL,
        rejected     INTEGER NOT NULL DEFAULT 0,
        cursor       INTEGER
    ) STRICT;
    CREATE TABLE rejected_changes (
        node     TEXT NOT NULL,
        seq      INTEGER NOT NULL,
        ticket   TEXT NOT NULL,
        message  TEXT NOT NULL,
        at       INTEGER NOT NULL,
        PRIMARY KEY (node, seq)
    ) STRICT;
"#];

const NOTICES_CAPACITY: usize = 1_024;
/// Writer jobs committed in one transaction (each upstream job is a whole batch).
const WRITE_BATCH_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("ticket {0} not found")]
    NotFound(TicketId),
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error(transparent)]
    Migrate(#[from] sqlite::MigrateError),
    #[error(transparent)]
    ReadTask(#[from] sqlite::ReadTaskFailed),
    #[error("the store is shut down")]
    Closed,
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
}

/// A ward has new changes in the log: feeds of that ward should read on.
#[derive(Debug, Clone)]
pub struct WardNotice {
    pub ward: WardId,
    /// The ticket that changed, materialized, for live pharmacy views.
    pub ticket_json: Arc<str>,
}

enum Job {
    Upstream {
        node: NodeId,
        ward: WardId,
        changes: Vec<Staged>,
        reply: oneshot::Sender<Result<Vec<Rejection>, StoreError>>,
    },
    Pharmacy {
        id: TicketId,
        mutation: Mutation,
        reply: oneshot::Sender<Result<Ticket, StoreError>>,
    },
    /// A node applied the feed up to this log position (diagnostics).
    Cursor {
        node: NodeId,
        seq: u64,
    },
}

/// Filters of the pharmacy queue.
#[derive(Debug, Clone, Default)]
pub struct QueueQuery {
    pub wards: Vec<WardId>,
    pub statuses: Vec<Status>,
    pub priorities: Vec<Priority>,
    pub limit: usize,
}

/// Per-node sync diagnostics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeDiagnostics {
    pub node: String,
    pub ward: String,
    pub acked_up_to: u64,
    pub last_seen: UnixMillis,
    pub cursor: Option<u64>,
    /// Changes of the node's ward in the log after its cursor.
    pub backlog: u64,
    pub rejected: u64,
}

pub struct Store {
    writer: GroupWriter<Job>,
    readers: Arc<ReadPool>,
    notices: broadcast::Sender<WardNotice>,
    replica: ActorId,
    limits: Limits,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("replica", &self.replica).finish_non_exhaustive()
    }
}

/// Cursors are positions in the change log, eight bytes big-endian.
pub fn cursor_of(seq: u64) -> Cursor {
    Cursor::new(seq.to_be_bytes().to_vec())
}

pub fn seq_of(cursor: &Cursor) -> Option<u64> {
    <[u8; 8]>::try_from(cursor.as_bytes()).ok().map(u64::from_be_bytes)
}

impl Store {
    pub fn open(path: &Path, limits: Limits, replica: ActorId, write_queue_max: usize) -> Result<Self, StoreError> {
        let mut writer = Connection::open(path)?;
        sqlite::configure_writer(&writer)?;
        sqlite::migrate(&mut writer, MIGRATIONS)?;
        let readers = ReadPool::open(path, 4)?;
        let (notices, _) = broadcast::channel(NOTICES_CAPACITY);
        let writer_state = Writer { replica: replica.clone(), limits: limits.clone(), notices: notices.clone() };
        let writer =
            GroupWriter::spawn("bridge-writer", writer, write_queue_max, WRITE_BATCH_MAX, move |conn, batch| {
                writer_state.commit(conn, batch)
            })
            .map_err(|e| StoreError::Corrupt(format!("cannot start writer thread: {e}")))?;
        Ok(Self { writer, readers: Arc::new(readers), notices, replica, limits })
    }

    pub fn replica(&self) -> &ActorId {
        &self.replica
    }

    pub fn subscribe(&self) -> broadcast::Receiver<WardNotice> {
        self.notices.subscribe()
    }

    /// Validates and durably stores a node's upstream batch. Returns the
    /// changes refused by validation; every other one is stored (or was already).
    pub async fn store_upstream(
        &self,
        node: NodeId,
        ward: WardId,
        changes: Vec<UpstreamChange>,
    ) -> Result<Vec<Rejection>, StoreError> {
        // Decoding and checking a change needs no database: it runs on every
        // core here, so the single writer thread only loads, merges and writes.
        let (limits, replica, staging_node, staging_ward) =
            (self.limits.clone(), self.replica.clone(), node.clone(), ward.clone());
        let changes = tokio::task::spawn_blocking(move || {
            changes
                .into_par_iter()
                .map(|change| Staged::new(change, &staging_node, &staging_ward, &limits, &replica))
                .collect()
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("staging task failed: {e}")))?;
        let (reply, answer) = oneshot::channel();
        self.writer.send(Job::Upstream { node, ward, changes, reply }).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs a pharmacy edit or transition and stores the change.
    pub async fn pharmacy_write(&self, id: TicketId, mutation: Mutation) -> Result<Ticket, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer.send(Job::Pharmacy { id, mutation, reply }).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Records how far a node has applied the feed. Diagnostics only: the
    /// node's own cursor is the truth, so this is not waited for.
    pub fn note_cursor(&self, node: NodeId, seq: u64) {
        if self.writer.try_send(Job::Cursor { node, seq }).is_err() {
            tracing::debug!("writer busy; a cursor note was skipped");
        }
    }

    pub async fn read<R, F>(&self, read: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.readers.read(read).await
    }

    pub async fn close(&self) {
        self.writer.close().await;
    }
}

struct Writer {
    replica: ActorId,
    limits: Limits,
    notices: broadcast::Sender<WardNotice>,
}

/// An upstream change with the work that needs no database done before it
/// reaches the writer: decoded, its audit record checked against the node
/// that sent it, and, for a ticket's first change, the document it creates.
struct Staged {
    seq: u64,
    ticket: TicketId,
    /// The change, or why it was refused whatever the database holds.
    checked: Result<Checked, String>,
}

struct Checked {
    bytes: Vec<u8>,
    received: ReceivedChange,
    /// For a root change: the new ticket's row, or why it is refused.
    /// Used only if the ticket does not exist yet.
    created: Option<Result<TicketRow, String>>,
}

impl Staged {
    fn new(change: UpstreamChange, node: &NodeId, ward: &WardId, limits: &Limits, replica: &ActorId) -> Self {
        let UpstreamChange { seq, ticket, change } = change;
        let bytes = change.into_vec();
        let checked = ReceivedChange::decode(&bytes).map_err(|e| e.to_string()).and_then(|received| {
            let actor = &received.audit().actor;
            // The node speaks for its ward's people: the change must say it
            // came through this node, from a role that works at a ward.
            if actor.device != *node {
                return Err(format!("change claims device {}, but came from {node}", actor.device));
            }
            if !matches!(actor.role, Role::Nurse | Role::Admin) {
                return Err(format!("a {} may not make changes at a ward", actor.role));
            }
            let created = received.is_root().then(|| create_ticket(&received, ticket, ward, limits, replica));
            Ok(Checked { bytes, received, created })
        });
        Self { seq, ticket, checked }
    }
}

/// The row of the ticket a ticket's first change creates, if it is a valid
/// ticket of this id and ward. Saved here, not kept as a document: staging
/// a whole batch of live documents would cost far more memory.
fn create_ticket(
    received: &ReceivedChange,
    id: TicketId,
    ward: &WardId,
    limits: &Limits,
    replica: &ActorId,
) -> Result<TicketRow, String> {
    let (mut document, _) = TicketDocument::from_received(std::slice::from_ref(received), limits, replica.clone())
        .map_err(|e| e.to_string())?;
    let row = TicketRow::of(&mut document).map_err(|e| e.to_string())?;
    if row.ticket.ward != *ward || row.ticket.id != id {
        return Err(format!(
            "the change creates a ticket of another ward or id ({} in {})",
            row.ticket.id, row.ticket.ward
        ));
    }
    Ok(row)
}

/// A reply held until its batch commits: sent as computed if the commit
/// succeeded, as the failure if not, so nothing uncommitted is acknowledged.
type HeldReply = Box<dyn FnOnce(Option<&str>)>;

fn hold<T: 'static>(reply: oneshot::Sender<Result<T, StoreError>>, outcome: Result<T, StoreError>) -> HeldReply {
    Box::new(move |failure| {
        let _ = reply.send(match failure {
            None => outcome,
            Some(failure) => Err(StoreError::Corrupt(failure.to_owned())),
        });
    })
}

/// A ticket's row: its saved document and materialized columns.
struct TicketRow {
    ticket: Ticket,
    json: Arc<str>,
    document: Vec<u8>,
}

impl TicketRow {
    fn of(document: &mut TicketDocument) -> Result<Self, DocumentError> {
        let ticket = document.ticket()?;
        let json = serde_json::to_string(&ticket).map(Arc::from).unwrap_or_else(|_| Arc::from("{}"));
        Ok(Self { ticket, json, document: document.save() })
    }
}

/// What a transaction changed beyond the change log: the documents it
/// merged into (saved at the end of each job), and the notices to send
/// once it commits.
#[derive(Default)]
struct Pending {
    documents: HashMap<TicketId, TicketDocument>,
    notices: Vec<WardNotice>,
}

impl Pending {
    /// Writes a ticket's row and notes its ward for a notice.
    fn write(&mut self, conn: &Connection, row: TicketRow) -> Result<(), rusqlite::Error> {
        let TicketRow { ticket, json, document } = row;
        conn.prepare_cached(
            "INSERT INTO tickets (id, ward, status, priority, priority_rank, created_at, updated_at, conflicts, ticket, document)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (id) DO UPDATE SET status = ?3, priority = ?4, priority_rank = ?5, updated_at = ?7,
               conflicts = ?8, ticket = ?9, document = ?10",
        )?
        .execute(params![
            ticket.id.to_string(),
            ticket.ward.as_str(),
            ticket.status.as_str(),
            ticket.priority.as_str(),
            ticket.priority as i64,
            ticket.created_at,
            ticket.updated_at,
            ticket.conflicts.len() as i64,
            &*json,
            document
        ])?;
        self.notices.push(WardNotice { ward: ticket.ward, ticket_json: json });
        Ok(())
    }

    /// Writes every document merged into since the last flush.
    fn flush(&mut self, conn: &Connection) -> Result<(), rusqlite::Error> {
        let documents = std::mem::take(&mut self.documents);
        for (_, mut document) in documents {
            let row = TicketRow::of(&mut document).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            self.write(conn, row)?;
        }
        Ok(())
    }
}

/// Lets an SQLite error abort the whole batch; any other error belongs to its job.
fn raise<T>(outcome: Result<T, StoreError>) -> Result<Result<T, StoreError>, rusqlite::Error> {
    match outcome {
        Err(StoreError::Sqlite(error)) => Err(error),
        other => Ok(other),
    }
}

impl Writer {
    fn commit(&self, conn: &mut Connection, batch: Vec<Job>) {
        let mut pending = Pending::default();
        let mut replies: Vec<HeldReply> = Vec::new();
        let result = (|| -> Result<(), rusqlite::Error> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for job in batch {
                match job {
                    Job::Upstream { node, ward, changes, reply } => {
                        let outcome = raise(self.upstream(&tx, &mut pending, &node, &ward, changes))?;
                        // Written per job, not per batch: a batch of many
                        // large upstream jobs would otherwise hold every
                        // document it touched in memory until the commit.
                        pending.flush(&tx)?;
                        replies.push(hold(reply, outcome));
                    }
                    Job::Pharmacy { id, mutation, reply } => {
                        let outcome = raise(self.pharmacy(&tx, &mut pending, id, mutation))?;
                        replies.push(hold(reply, outcome));
                    }
                    Job::Cursor { node, seq } => {
                        tx.prepare_cached("UPDATE nodes SET cursor = max(coalesce(cursor, 0), ?2) WHERE node = ?1")?
                            .execute(params![node.as_str(), seq as i64])?;
                    }
                }
            }
            pending.flush(&tx)?;
            tx.commit()?;
            for notice in pending.notices {
                let _ = self.notices.send(notice);
            }
            Ok(())
        })();
        let failure = result.err().map(|error| {
            tracing::error!(%error, "bridge commit failed; nothing of the batch was acknowledged");
            "the write could not be committed".to_owned()
        });
        for reply in replies {
            reply(failure.as_deref());
        }
    }

    fn load<'t>(
        &self,
        conn: &Connection,
        pending: &'t mut Pending,
        id: TicketId,
    ) -> Result<Option<&'t mut TicketDocument>, StoreError> {
        if let std::collections::hash_map::Entry::Vacant(slot) = pending.documents.entry(id) {
            let bytes: Option<Vec<u8>> = conn
                .prepare_cached("SELECT document FROM tickets WHERE id = ?1")?
                .query_row([id.to_string()], |r| r.get(0))
                .optional()?;
            match bytes {
                Some(bytes) => {
                    slot.insert(TicketDocument::load(&bytes, self.replica.clone())?);
                }
                None => return Ok(None),
            }
        }
        Ok(pending.documents.get_mut(&id))
    }

    fn upstream(
        &self,
        conn: &Connection,
        pending: &mut Pending,
        node: &NodeId,
        ward: &WardId,
        changes: Vec<Staged>,
    ) -> Result<Vec<Rejection>, StoreError> {
        let mut rejections = Vec::new();
        let mut highest = 0;
        for staged in changes {
            let (seq, ticket) = (staged.seq, staged.ticket);
            highest = highest.max(seq);
            if let Err(message) = self.accept_one(conn, pending, node, ward, staged)? {
                rejections.push(Rejection { seq, ticket, message });
            }
        }
        let now = now_ms();
        for rejection in &rejections {
            conn.execute(
                "INSERT OR REPLACE INTO rejected_changes (node, seq, ticket, message, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![node.as_str(), rejection.seq as i64, rejection.ticket.to_string(), rejection.message, now],
            )?;
        }
        conn.prepare_cached(
            "INSERT INTO nodes (node, ward, acked_up_to, last_seen, rejected) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (node) DO UPDATE SET acked_up_to = max(acked_up_to, ?3), last_seen = ?4, rejected = rejected + ?5, ward = ?2",
        )?
        .execute(params![node.as_str(), ward.as_str(), highest as i64, now, rejections.len() as i64])?;
        Ok(rejections)
    }

    /// Merges one staged change from a node and logs it. The inner `Err` is
    /// the reason the change was refused; the outer one a storage failure.
    fn accept_one(
        &self,
        conn: &Connection,
        pending: &mut Pending,
        node: &NodeId,
        ward: &WardId,
        staged: Staged,
    ) -> Result<Result<(), String>, StoreError> {
        let refuse = |reason: String| Ok(Err(reason));
        let id = staged.ticket;
        let Checked { bytes, received, created } = match staged.checked {
            Ok(checked) => checked,
            Err(reason) => return refuse(reason),
        };
        // A document that cannot be loaded is a storage fault, not the
        // change's: it fails the batch, unacknowledged, and the edge resends.
        let is_new = match self.load(conn, pending, id)? {
            Some(document) => {
                if document.ticket()?.ward != *ward {
                    return refuse(format!("ticket {id} belongs to another ward"));
                }
                match document.apply_received(std::slice::from_ref(&received), &self.limits) {
                    Ok(applied) => !applied.is_empty(),
                    Err(e) => return refuse(e.to_string()),
                }
            }
            None => {
                let created =
                    created.unwrap_or_else(|| create_ticket(&received, id, ward, &self.limits, &self.replica));
                match created {
                    Ok(row) => {
                        pending.write(conn, row)?;
                        true
                    }
                    Err(reason) => return refuse(reason),
                }
            }
        };
        if is_new {
            conn.prepare_cached(
                "INSERT INTO changes (hash, ward, ticket_id, origin, change) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (hash) DO NOTHING",
            )?
            .execute(params![received.hash(), ward.as_str(), id.to_string(), node.as_str(), bytes])?;
        }
        Ok(Ok(()))
    }

    fn pharmacy(
        &self,
        conn: &Connection,
        pending: &mut Pending,
        id: TicketId,
        mutation: Mutation,
    ) -> Result<Ticket, StoreError> {
        let document = self.load(conn, pending, id)?.ok_or(StoreError::NotFound(id))?;
        // Work on a copy so a refused mutation leaves the batch's document untouched.
        let mut candidate = document.clone();
        let change = mutation(&mut candidate)?;
        let ticket = candidate.ticket()?;
        let hash = ReceivedChange::decode(&change)?.hash().to_owned();
        conn.prepare_cached(
            "INSERT INTO changes (hash, ward, ticket_id, origin, change) VALUES (?1, ?2, ?3, 'pharmacy', ?4)",
        )?
        .execute(params![hash, ticket.ward.as_str(), id.to_string(), change])?;
        *document = candidate;
        Ok(ticket)
    }
}

pub fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// The next changes of `ward` after `after` (exclusive) for `reader`, at
/// most `limit` and about `bytes_max` bytes. The reader's own changes are
/// skipped (it has them) except those logged up to the position given with
/// it. Returns the changes and the cursor after the last row read.
pub fn feed(
    conn: &Connection,
    ward: &WardId,
    (reader, own_until): (&NodeId, u64),
    after: u64,
    limit: usize,
    bytes_max: usize,
) -> Result<(Vec<DownstreamChange>, u64), StoreError> {
    let mut statement = conn.prepare_cached(
        "SELECT seq, ticket_id, origin, change FROM changes WHERE ward = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let mut rows = statement.query(params![ward.as_str(), after as i64, limit as i64])?;
    let mut changes = Vec::new();
    let (mut cursor, mut bytes) = (after, 0usize);
    while let Some(row) = rows.next()? {
        let change: Vec<u8> = row.get(3)?;
        if bytes + change.len() > bytes_max && !changes.is_empty() {
            break;
        }
        cursor = row.get::<_, i64>(0)? as u64;
        let origin: String = row.get(2)?;
        if origin != reader.as_str() || cursor <= own_until {
            bytes += change.len();
            let ticket: String = row.get(1)?;
            let ticket = ticket.parse().map_err(|e| StoreError::Corrupt(format!("ticket id in log: {e}")))?;
            changes.push(DownstreamChange { ticket, change: ByteBuf::from(change) });
        }
    }
    Ok((changes, cursor))
}

/// The position of the last change in the log.
pub fn log_end(conn: &Connection) -> Result<u64, StoreError> {
    Ok(conn.query_row("SELECT coalesce(max(seq), 0) FROM changes", [], |r| r.get::<_, i64>(0))? as u64)
}

pub fn acked_up_to(conn: &Connection, node: &NodeId) -> Result<u64, StoreError> {
    let acked: Option<i64> =
        conn.query_row("SELECT acked_up_to FROM nodes WHERE node = ?1", [node.as_str()], |r| r.get(0)).optional()?;
    Ok(acked.unwrap_or(0) as u64)
}

/// The pharmacy queue: priority first, then age; with the number of
/// tickets matching the filters.
pub fn queue(conn: &Connection, query: &QueueQuery) -> Result<(Vec<String>, u64), StoreError> {
    let mut filter = String::from(" WHERE 1 = 1");
    let mut args: Vec<String> = Vec::new();
    let mut in_list = |column: &str, values: Vec<String>| {
        if !values.is_empty() {
            filter.push_str(&format!(" AND {column} IN ({})", vec!["?"; values.len()].join(", ")));
            args.extend(values);
        }
    };
    in_list("ward", query.wards.iter().map(|w| w.as_str().to_owned()).collect());
    in_list("status", query.statuses.iter().map(|s| s.as_str().to_owned()).collect());
    in_list("priority", query.priorities.iter().map(|p| p.as_str().to_owned()).collect());
    let total: i64 =
        conn.query_row(&format!("SELECT count(*) FROM tickets{filter}"), rusqlite::params_from_iter(&args), |r| {
            r.get(0)
        })?;
    let sql =
        format!("SELECT ticket FROM tickets{filter} ORDER BY priority_rank DESC, created_at, id LIMIT {}", query.limit);
    let mut statement = conn.prepare_cached(&sql)?;
    let rows = statement.query_map(rusqlite::params_from_iter(&args), |row| row.get(0))?;
    Ok((rows.collect::<Result<_, _>>()?, total as u64))
}

pub fn ticket_with_history(
    conn: &Connection,
    id: TicketId,
    replica: &ActorId,
) -> Result<(Ticket, Vec<HistoryEntry>), StoreError> {
    let bytes: Vec<u8> = conn
        .query_row("SELECT document FROM tickets WHERE id = ?1", [id.to_string()], |r| r.get(0))
        .optional()?
        .ok_or(StoreError::NotFound(id))?;
    let mut document = TicketDocument::load(&bytes, replica.clone())?;
    Ok((document.ticket()?, document.history()?))
}

pub fn diagnostics(conn: &Connection) -> Result<Vec<NodeDiagnostics>, StoreError> {
    let mut statement = conn.prepare_cached(
        "SELECT n.node, n.ward, n.acked_up_to, n.last_seen, n.cursor, n.rejected,
                (SELECT count(*) FROM changes c WHERE c.ward = n.ward AND c.seq > coalesce(n.cursor, 0) AND c.origin != n.node)
         FROM nodes n ORDER BY n.node",
    )?;
    let rows = statement.query_map([], |r| {
        Ok(NodeDiagnostics {
            node: r.get(0)?,
            ward: r.get(1)?,
            acked_up_to: r.get::<_, i64>(2)? as u64,
            last_seen: r.get(3)?,
            cursor: r.get::<_, Option<i64>>(4)?.map(|c| c as u64),
            rejected: r.get::<_, i64>(5)? as u64,
            backlog: r.get::<_, i64>(6)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
