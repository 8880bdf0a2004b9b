//! The bridge's embedded storage in SQLite: the default for a single-site
//! install and for development.
//!
//! - `changes`: the change log. Every accepted Automerge change, once (its
//!   hash is unique), numbered by a global sequence. An edge's downstream
//!   cursor is a position in it, and its feed is the log filtered by ward.
//! - `tickets`: each ticket's merged document and materialized columns, for
//!   the pharmacy queue.
//! - `nodes`: per edge node, the last upstream sequence stored (of the
//!   node's current database; diagnostics), last seen, rejected count, which
//!   database speaks for it (`admission`) and its own-change window.
//! - `rejected_changes`: changes refused by validation, for diagnostics.
//!
//! One writer thread applies upstream batches and pharmacy writes, each job
//! in the same transaction as the others waiting (group commit), and answers
//! only after the commit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use automerge::ActorId;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde_bytes::ByteBuf;
use service_kit::sqlite::{self, Database, ReadPool};
use service_kit::writer::GroupWriter;
use sync_protocol::admission::{self, Admission, Claim, NodeLease};
use sync_protocol::document::{Mutation, ReceivedChange, TICKET_JSON_VERSION, TicketDocument};
use sync_protocol::formulary::Medication;
use sync_protocol::ids::{NodeId, TicketId, WardId};
use sync_protocol::session::Rejection;
use sync_protocol::ticket::{Limits, Ticket, UnixMillis};
use sync_protocol::wire::{Cursor, DownstreamChange, TicketHeads, UpstreamChange};
use tokio::sync::{broadcast, oneshot};

use super::staging::{Outcome, Refusal, Staged, Stager, TicketRow};
use super::{
    Admitted, FeedLimits, FeedPosition, LeaseUpdate, NodeDiagnostics, PharmacyOutcome, QueuePage, QueueQuery,
    StoreError, TicketView, WardNotice, compare_heads,
};
use service_kit::clock::now_ms;

const MIGRATIONS: &[&str] = &[
    r#"
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
"#,
    // 2: which database speaks for each node (`admission::NodeLease`, JSON), the
    // log position up to which its feed sends the node's own changes back, and
    // when a database last took the node over.
    r#"
    ALTER TABLE nodes ADD COLUMN admission TEXT;
    ALTER TABLE nodes ADD COLUMN own_until INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN taken_over_at INTEGER;
"#,
    // 3: the medication catalogue (`formulary::Medication`, JSON, by code).
    r#"
    CREATE TABLE formulary (
        code        TEXT PRIMARY KEY,
        entry       TEXT NOT NULL,
        updated_at  INTEGER NOT NULL
    ) STRICT;
    -- Lines still owed (backordered), for the queue's filter.
    ALTER TABLE tickets ADD COLUMN backorders INTEGER NOT NULL DEFAULT 0;
    -- The shape the stored ticket JSON was written in (`document::TICKET_JSON_VERSION`).
    CREATE TABLE meta (
        key    TEXT PRIMARY KEY,
        value  INTEGER NOT NULL
    ) STRICT;
"#,
];

/// Rewrites every stored ticket's JSON and columns from its document when
/// they are of an older shape, so the queue shows every ticket alike after
/// an upgrade. Runs at open, before serving.
fn rematerialize(conn: &mut Connection, replica: &ActorId) -> Result<(), StoreError> {
    let held: Option<i64> =
        conn.query_row("SELECT value FROM meta WHERE key = 'ticket_json_version'", [], |row| row.get(0)).optional()?;
    if held.is_some_and(|held| held >= TICKET_JSON_VERSION as i64) {
        return Ok(());
    }
    sqlite::rewrite_tickets::<StoreError>(
        conn,
        TICKET_JSON_VERSION,
        |tx, id, document| {
            let ticket = TicketDocument::load(document, replica.clone())?.ticket()?;
            let json = serde_json::to_string(&ticket).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.prepare_cached(
                "UPDATE tickets SET status = ?2, priority = ?3, priority_rank = ?4, updated_at = ?5, conflicts = ?6,
                 ticket = ?7, backorders = ?8 WHERE id = ?1",
            )?
            .execute(params![
                id,
                ticket.status.as_str(),
                ticket.priority.as_str(),
                ticket.priority as i64,
                ticket.updated_at,
                ticket.open_conflicts() as i64,
                json,
                ticket.open_backorders().count() as i64
            ])?;
            Ok(())
        },
        |tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('ticket_json_version', ?1) ON CONFLICT (key) DO UPDATE SET value = ?1",
                [TICKET_JSON_VERSION as i64],
            )?;
            Ok(())
        },
    )
}

const NOTICES_CAPACITY: usize = 1_024;
/// Writer jobs committed in one transaction (each upstream job is a whole batch).
const WRITE_BATCH_MAX: usize = 64;
/// Read-only connections for queries and feeds.
const READERS: usize = 4;

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
    Admit {
        node: NodeId,
        ward: WardId,
        claim: Claim,
        nonce: [u8; 16],
        reply: oneshot::Sender<Result<Admitted, StoreError>>,
    },
    UpdateLease {
        node: NodeId,
        update: LeaseUpdate,
        reply: oneshot::Sender<Result<Option<NodeLease>, StoreError>>,
    },
    /// Adds or replaces a catalogue entry; replies whether it was new.
    PutMedication {
        medication: Medication,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
}

pub struct EmbeddedStore {
    writer: GroupWriter<Job>,
    readers: Arc<ReadPool>,
    notices: broadcast::Sender<WardNotice>,
    replica: ActorId,
    stager: Stager,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").field("replica", &self.replica).finish_non_exhaustive()
    }
}

/// A session's feed: the last log position read, and the position up to
/// which the node's own changes are sent back to it.
#[derive(Debug, Clone)]
pub struct FeedState {
    after: u64,
    own_until: u64,
}

/// Cursors are positions in the change log, eight bytes big-endian.
fn cursor_of(seq: u64) -> Cursor {
    Cursor::new(seq.to_be_bytes().to_vec())
}

fn seq_of(cursor: &Cursor) -> Option<u64> {
    <[u8; 8]>::try_from(cursor.as_bytes()).ok().map(u64::from_be_bytes)
}

impl EmbeddedStore {
    pub fn open(path: &Path, limits: Limits, replica: ActorId, write_queue_max: usize) -> Result<Self, StoreError> {
        // The cloud's disks are the hospital's data centre's: plain SQLite.
        let database = Database::plain(path);
        let mut writer = database.open()?;
        sqlite::configure_writer(&writer)?;
        sqlite::migrate(&mut writer, MIGRATIONS)?;
        rematerialize(&mut writer, &replica)?;
        let readers = ReadPool::open(&database, READERS)?;
        let (notices, _) = broadcast::channel(NOTICES_CAPACITY);
        let stager = Stager::new(limits.clone(), replica.clone())?;
        let writer_state = Writer { replica: replica.clone(), limits, notices: notices.clone() };
        let writer =
            GroupWriter::spawn("bridge-writer", writer, write_queue_max, WRITE_BATCH_MAX, move |conn, batch| {
                writer_state.commit(conn, batch)
            })
            .map_err(|e| StoreError::Task(format!("cannot start the writer thread: {e}")))?;
        Ok(Self { writer, readers: Arc::new(readers), notices, replica, stager })
    }

    pub fn replica(&self) -> &ActorId {
        &self.replica
    }

    pub fn subscribe(&self) -> broadcast::Receiver<WardNotice> {
        self.notices.subscribe()
    }

    pub async fn store_upstream(
        &self,
        node: NodeId,
        ward: WardId,
        changes: Vec<UpstreamChange>,
    ) -> Result<Vec<Rejection>, StoreError> {
        // Decoding and checking a change needs no database: it runs on every
        // core first, so the single writer thread only loads, merges and writes.
        let changes = self.stager.stage(&node, &ward, changes).await?;
        let (reply, answer) = oneshot::channel();
        self.writer.send(Job::Upstream { node, ward, changes, reply }).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    pub async fn pharmacy_write(&self, id: TicketId, mutation: Mutation) -> Result<PharmacyOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer.send(Job::Pharmacy { id, mutation, reply }).await.map_err(|_| StoreError::Closed)?;
        let ticket = answer.await.map_err(|_| StoreError::Closed)??;
        Ok(PharmacyOutcome { ticket, visible: true })
    }

    pub fn note_cursor(&self, node: NodeId, cursor: &Cursor) {
        let Some(seq) = seq_of(cursor) else { return };
        if self.writer.try_send(Job::Cursor { node, seq }).is_err() {
            tracing::debug!("writer busy; a cursor note was skipped");
        }
    }

    /// Runs on the writer thread, so two hellos of one node are decided one
    /// after the other.
    pub async fn admit(
        &self,
        node: NodeId,
        ward: WardId,
        claim: Claim,
        nonce: [u8; 16],
    ) -> Result<Admitted, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer.send(Job::Admit { node, ward, claim, nonce, reply }).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    pub async fn update_lease(&self, node: NodeId, update: LeaseUpdate) -> Result<Option<NodeLease>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer.send(Job::UpdateLease { node, update, reply }).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    pub async fn open_feed(&self, node: &NodeId, cursor: Option<&Cursor>) -> Result<FeedState, StoreError> {
        let node = node.clone();
        let own_until = self
            .read(move |conn| {
                let own_until: Option<i64> = conn
                    .query_row("SELECT own_until FROM nodes WHERE node = ?1", [node.as_str()], |r| r.get(0))
                    .optional()?;
                Ok(own_until.unwrap_or(0) as u64)
            })
            .await?;
        Ok(FeedState { after: cursor.and_then(seq_of).unwrap_or(0), own_until })
    }

    pub async fn read_feed(
        &self,
        node: &NodeId,
        ward: &WardId,
        state: &mut FeedState,
        limits: FeedLimits,
    ) -> Result<Option<(Vec<DownstreamChange>, Cursor)>, StoreError> {
        let (node, ward, read_state) = (node.clone(), ward.clone(), state.clone());
        let (changes, after) = self.read(move |conn| feed(conn, &ward, &node, &read_state, limits)).await?;
        if after == state.after {
            return Ok(None);
        }
        state.after = after;
        Ok(Some((changes, cursor_of(after))))
    }

    pub async fn missing_heads(&self, ward: WardId, tickets: Vec<TicketHeads>) -> Result<Vec<TicketHeads>, StoreError> {
        let replica = self.replica.clone();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached("SELECT document FROM tickets WHERE id = ?1")?;
            let mut missing = Vec::new();
            for theirs in tickets {
                let bytes: Option<Vec<u8>> =
                    statement.query_row([theirs.ticket.to_string()], |r| r.get(0)).optional()?;
                let stored = bytes.map(|bytes| TicketDocument::load(&bytes, replica.clone())).transpose()?;
                missing.extend(compare_heads(stored, &ward, theirs)?);
            }
            Ok(missing)
        })
        .await
    }

    pub async fn queue(&self, query: QueueQuery) -> Result<QueuePage, StoreError> {
        self.read(move |conn| queue(conn, &query)).await
    }

    pub async fn ticket(&self, id: TicketId) -> Result<TicketView, StoreError> {
        let replica = self.replica.clone();
        self.read(move |conn| {
            let bytes: Vec<u8> = conn
                .query_row("SELECT document FROM tickets WHERE id = ?1", [id.to_string()], |r| r.get(0))
                .optional()?
                .ok_or(StoreError::NotFound(id))?;
            TicketView::read(&bytes, replica)
        })
        .await
    }

    pub async fn trail(
        &self,
        ward: &WardId,
        from: UnixMillis,
        to: UnixMillis,
        limit: usize,
    ) -> Result<Vec<TicketView>, StoreError> {
        let (replica, ward) = (self.replica.clone(), ward.to_string());
        self.read(move |conn| {
            let mut statement = conn.prepare(
                "SELECT document FROM tickets WHERE ward = ?1 AND updated_at >= ?2 AND created_at <= ?3
                 ORDER BY created_at, id LIMIT ?4",
            )?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let documents =
                statement.query_map(rusqlite::params![ward, from, to, limit], |row| row.get::<_, Vec<u8>>(0))?;
            documents.map(|bytes| TicketView::read(&bytes?, replica.clone())).collect()
        })
        .await
    }

    pub async fn diagnostics(&self) -> Result<Vec<NodeDiagnostics>, StoreError> {
        self.read(diagnostics).await
    }

    pub async fn put_medication(&self, medication: Medication) -> Result<bool, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer.send(Job::PutMedication { medication, reply }).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// The catalogue's entries for `codes` (all of it for `None`), by code,
    /// and how many entries it has.
    pub async fn formulary(&self, codes: Option<Vec<String>>) -> Result<(Vec<Medication>, u64), StoreError> {
        self.read(move |conn| {
            let size: i64 = conn.query_row("SELECT count(*) FROM formulary", [], |row| row.get(0))?;
            let entries: Vec<String> = match codes {
                None => conn
                    .prepare("SELECT entry FROM formulary ORDER BY code")?
                    .query_map([], |row| row.get(0))?
                    .collect::<Result<_, _>>()?,
                Some(codes) => {
                    let mut statement = conn.prepare_cached("SELECT entry FROM formulary WHERE code = ?1")?;
                    let mut found = Vec::new();
                    for code in codes {
                        found.extend(statement.query_row([code], |row| row.get(0)).optional()?);
                    }
                    found
                }
            };
            let entries = entries
                .iter()
                .map(|entry| {
                    serde_json::from_str(entry).map_err(|e| StoreError::Corrupt(format!("formulary entry: {e}")))
                })
                .collect::<Result<_, _>>()?;
            Ok((entries, size as u64))
        })
        .await
    }

    pub async fn ready(&self) -> Result<(), StoreError> {
        self.read(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?)).await
    }

    pub async fn close(&self) {
        self.writer.close().await;
    }

    async fn read<R: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.readers.read(read).await
    }
}

struct Writer {
    replica: ActorId,
    limits: Limits,
    notices: broadcast::Sender<WardNotice>,
}

/// A reply held until its batch commits: sent as computed if the commit
/// succeeded, as the failure if not, so nothing uncommitted is acknowledged.
type HeldReply = Box<dyn FnOnce(Option<&str>)>;

fn hold<T: 'static>(reply: oneshot::Sender<Result<T, StoreError>>, outcome: Result<T, StoreError>) -> HeldReply {
    Box::new(move |failure| {
        let _ = reply.send(match failure {
            None => outcome,
            Some(failure) => Err(StoreError::NotCommitted(failure.to_owned())),
        });
    })
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
            "INSERT INTO tickets (id, ward, status, priority, priority_rank, created_at, updated_at, conflicts, ticket,
                document, backorders)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (id) DO UPDATE SET status = ?3, priority = ?4, priority_rank = ?5, updated_at = ?7,
               conflicts = ?8, ticket = ?9, document = ?10, backorders = ?11",
        )?
        .execute(params![
            ticket.id.to_string(),
            ticket.ward.as_str(),
            ticket.status.as_str(),
            ticket.priority.as_str(),
            ticket.priority as i64,
            ticket.created_at,
            ticket.updated_at,
            ticket.open_conflicts() as i64,
            &*json,
            document,
            ticket.open_backorders().count() as i64
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

/// Adds or replaces a catalogue entry; whether it was new.
fn put_medication(tx: &Connection, medication: &Medication) -> Result<bool, StoreError> {
    let entry = serde_json::to_string(medication).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let existed = tx.prepare_cached("SELECT 1 FROM formulary WHERE code = ?1")?.exists([medication.code.as_str()])?;
    tx.prepare_cached(
        "INSERT INTO formulary (code, entry, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (code) DO UPDATE SET entry = ?2, updated_at = ?3",
    )?
    .execute(params![medication.code, entry, now_ms()])?;
    Ok(!existed)
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
                    Job::Admit { node, ward, claim, nonce, reply } => {
                        let outcome = raise(admit(&tx, &node, &ward, claim, nonce))?;
                        replies.push(hold(reply, outcome));
                    }
                    Job::UpdateLease { node, update, reply } => {
                        let outcome = raise(update_lease(&tx, &node, update))?;
                        replies.push(hold(reply, outcome));
                    }
                    Job::PutMedication { medication, reply } => {
                        let outcome = raise(put_medication(&tx, &medication))?;
                        replies.push(hold(reply, outcome));
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
            if let Err(refusal) = self.accept_one(conn, pending, node, ward, staged)? {
                rejections.push(Rejection { seq, ticket, message: refusal.to_string() });
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
             ON CONFLICT (node) DO UPDATE SET acked_up_to = ?3, last_seen = ?4, rejected = rejected + ?5, ward = ?2",
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
    ) -> Result<Result<(), Refusal>, StoreError> {
        let id = staged.ticket;
        let mut checked = match staged.checked {
            Ok(checked) => checked,
            Err(reason) => return Ok(Err(reason)),
        };
        // A document that cannot be loaded is a storage fault, not the
        // change's: it fails the batch, unacknowledged, and the edge resends.
        let document = self.load(conn, pending, id)?;
        let is_new = match checked.merge_into(document, id, ward, &self.limits, &self.replica)? {
            Outcome::Created(row) => {
                pending.write(conn, *row)?;
                true
            }
            Outcome::Merged => true,
            Outcome::AlreadyHad => false,
            // This store holds every change it accepted.
            Outcome::MissingDependencies => {
                return Ok(Err(Refusal::Unaccepted("bridge")));
            }
            Outcome::Refused(reason) => return Ok(Err(reason)),
        };
        if is_new {
            conn.prepare_cached(
                "INSERT INTO changes (hash, ward, ticket_id, origin, change) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (hash) DO NOTHING",
            )?
            .execute(params![checked.received.hash(), ward.as_str(), id.to_string(), node.as_str(), checked.bytes])?;
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

fn node_lease(conn: &Connection, node: &NodeId) -> Result<Option<NodeLease>, StoreError> {
    let stored: Option<Option<String>> = conn
        .prepare_cached("SELECT admission FROM nodes WHERE node = ?1")?
        .query_row([node.as_str()], |r| r.get(0))
        .optional()?;
    stored
        .flatten()
        .map(|json| serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(format!("node {node}: {e}"))))
        .transpose()
}

fn lease_json(record: &NodeLease) -> Result<String, StoreError> {
    serde_json::to_string(record).map_err(|e| StoreError::Encode(format!("node record: {e}")))
}

/// Decides a hello (`admission::admit`) and stores the node's new record;
/// a database that takes the node over gets its own changes sent back up
/// to the log's end now.
fn admit(
    conn: &Connection,
    node: &NodeId,
    ward: &WardId,
    claim: Claim,
    nonce: [u8; 16],
) -> Result<Admitted, StoreError> {
    let (record, admission) = match admission::admit(node_lease(conn, node)?.as_ref(), claim, nonce) {
        Ok(admitted) => admitted,
        Err(refused) => return Ok(Err(refused)),
    };
    let now = now_ms();
    let json = lease_json(&record)?;
    conn.prepare_cached(
        "INSERT INTO nodes (node, ward, acked_up_to, last_seen, admission) VALUES (?1, ?2, 0, ?3, ?4)
         ON CONFLICT (node) DO UPDATE SET ward = ?2, last_seen = ?3, admission = ?4",
    )?
    .execute(params![node.as_str(), ward.as_str(), now, json])?;
    if let Admission::TookOver { .. } = admission {
        conn.prepare_cached(
            "UPDATE nodes SET own_until = (SELECT coalesce(max(seq), 0) FROM changes), taken_over_at = ?2, acked_up_to = 0
             WHERE node = ?1",
        )?
        .execute(params![node.as_str(), now])?;
    }
    Ok(Ok((admission, record)))
}

fn update_lease(conn: &Connection, node: &NodeId, update: LeaseUpdate) -> Result<Option<NodeLease>, StoreError> {
    let Some(updated) = node_lease(conn, node)?.and_then(|record| update.apply(&record)) else { return Ok(None) };
    conn.prepare_cached("UPDATE nodes SET admission = ?2 WHERE node = ?1")?
        .execute(params![node.as_str(), lease_json(&updated)?])?;
    Ok(Some(updated))
}

/// The next changes of `ward` after the feed's position for `reader`. The
/// reader's own changes are skipped (it has them) except those logged up to
/// `own_until`. Returns the changes and the position after the last row read.
fn feed(
    conn: &Connection,
    ward: &WardId,
    reader: &NodeId,
    state: &FeedState,
    limits: FeedLimits,
) -> Result<(Vec<DownstreamChange>, u64), StoreError> {
    let mut statement = conn.prepare_cached(
        "SELECT seq, ticket_id, origin, change FROM changes WHERE ward = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let mut rows = statement.query(params![ward.as_str(), state.after as i64, limits.changes_max as i64])?;
    let mut changes = Vec::new();
    let (mut position, mut bytes) = (state.after, 0usize);
    while let Some(row) = rows.next()? {
        let change: Vec<u8> = row.get(3)?;
        if bytes + change.len() > limits.bytes_max && !changes.is_empty() {
            break;
        }
        position = row.get::<_, i64>(0)? as u64;
        let origin: String = row.get(2)?;
        if origin != reader.as_str() || position <= state.own_until {
            bytes += change.len();
            let ticket: String = row.get(1)?;
            let ticket = ticket.parse().map_err(|e| StoreError::Corrupt(format!("ticket id in log: {e}")))?;
            changes.push(DownstreamChange { ticket, change: ByteBuf::from(change) });
        }
    }
    Ok((changes, position))
}

/// The pharmacy queue: priority first, then age; with the number of
/// tickets matching the filters.
fn queue(conn: &Connection, query: &QueueQuery) -> Result<QueuePage, StoreError> {
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
    if query.open_backorders {
        filter.push_str(" AND backorders > 0");
    }
    let total: i64 =
        conn.query_row(&format!("SELECT count(*) FROM tickets{filter}"), rusqlite::params_from_iter(&args), |r| {
            r.get(0)
        })?;
    let sql =
        format!("SELECT ticket FROM tickets{filter} ORDER BY priority_rank DESC, created_at, id LIMIT {}", query.limit);
    let mut statement = conn.prepare_cached(&sql)?;
    let rows = statement.query_map(rusqlite::params_from_iter(&args), |row| row.get(0))?;
    Ok(QueuePage { tickets: rows.collect::<Result<_, _>>()?, total: total as u64 })
}

fn diagnostics(conn: &Connection) -> Result<Vec<NodeDiagnostics>, StoreError> {
    let mut statement = conn.prepare_cached(
        "SELECT n.node, n.ward, n.acked_up_to, n.last_seen, n.cursor, n.rejected,
                (SELECT count(*) FROM changes c WHERE c.ward = n.ward AND c.seq > coalesce(n.cursor, 0) AND c.origin != n.node),
                n.admission, n.taken_over_at
         FROM nodes n ORDER BY n.node",
    )?;
    let rows = statement.query_map([], |r| {
        let diagnostics = NodeDiagnostics {
            node: r.get(0)?,
            ward: r.get(1)?,
            acked_up_to: r.get::<_, i64>(2)? as u64,
            last_seen: r.get(3)?,
            cursor: r.get::<_, Option<i64>>(4)?.map(|c| FeedPosition::Log(c as u64)),
            rejected: r.get::<_, i64>(5)? as u64,
            backlog: r.get::<_, i64>(6)? as u64,
            database: None,
            taken_over_at: r.get(8)?,
        };
        Ok((diagnostics, r.get::<_, Option<String>>(7)?))
    })?;
    rows.map(|row| {
        let (mut diagnostics, admission) = row?;
        let record: Option<NodeLease> = admission
            .map(|json| serde_json::from_str(&json))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("node {}: {e}", diagnostics.node)))?;
        diagnostics.database = record.map(|r| r.database.to_string());
        Ok(diagnostics)
    })
    .collect()
}
