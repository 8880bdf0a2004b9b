//! The distributed store: Kafka, MongoDB and Redis behind the bridge's
//! [`Store`](super::Store) interface, so any number of bridge instances
//! serve any ward.
//!
//! ```text
//!  edge ──upstream──> bridge ──append (idempotent, acks=all)──> change topic (keyed by ticket)
//!                       │ validate against MongoDB                    │
//!                       │ ack the edge after the brokers did          v
//!  pharmacy API ──────> bridge ──append──────────────────────>   projector (consumer group)
//!                                                                     │ merge, then write:
//!  edge <──feed pages── bridge <──read── MongoDB <──pages, tickets, watermarks
//!                         ^                                            │
//!                         └──── Redis: "projected" notices, cache ─────┘
//! ```
//!
//! - Upstream: a batch is validated against the tickets in MongoDB (a
//!   change that builds on changes not projected yet waits for the
//!   projection to catch up), appended to the topic, and the node's
//!   position recorded in MongoDB; only then is the edge acknowledged.
//! - The projector ([`projector`]) merges each round of records into the
//!   tickets and writes, in this order: the round's feed pages (the changes
//!   new to their tickets), the tickets, the partitions' watermarks. So a
//!   change is in a ticket only if it is in a page first, and every page up
//!   to a watermark is readable once the watermark is.
//! - Downstream: a ward's feed is its pages up to the watermarks, read in
//!   partition and offset order; an edge's cursor is the last page offset
//!   per partition ([`record::PageCursor`]).
//! - Redis carries the projector's notices to every bridge (feeds wake,
//!   live views update) and caches queue pages and ticket views. Without
//!   Redis, bridges poll the watermarks.

pub mod cache;
pub mod kafka;
pub mod mongo;
pub mod record;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use automerge::ActorId;
use futures_util::StreamExt;
use serde_bytes::ByteBuf;
use sync_protocol::admission::{self, Admission, Claim, NodeLease};
use sync_protocol::document::{Mutation, TicketDocument};
use sync_protocol::formulary::Medication;
use sync_protocol::ids::{NodeId, TicketId, WardId};
use sync_protocol::session::Rejection;
use sync_protocol::ticket::{Limits, UnixMillis};
use sync_protocol::wire::{Cursor, DownstreamChange, RefusalReason, TicketHeads, UpstreamChange};
use tokio::sync::{Semaphore, broadcast, watch};
use tokio_util::sync::CancellationToken;

use self::cache::{Cache, Projected};
use self::kafka::ChangeLog;
use self::mongo::{AdmissionWrite, Db, PageDoc, Presence};
use self::record::{ChangeRecord, Origin, PageCursor, PartialPage};
use super::staging::{Outcome, Refusal, Staged, Stager, TicketRow};
use super::{
    Admitted, FeedLimits, FeedPosition, LeaseUpdate, NodeDiagnostics, PharmacyOutcome, QueuePage, QueueQuery,
    StoreError, TicketView, WardNotice, compare_heads,
};
use crate::config::{Distributed, StoreOptions};
use service_kit::clock::now_ms;

const NOTICES_CAPACITY: usize = 1_024;
/// How often a bridge reads the watermarks when no notice came: the
/// latency of everything a notice would have announced while Redis is down.
const WATERMARK_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Pages read for one downstream batch.
const PAGES_PER_READ: usize = 32;
/// Pages counted for a node's backlog in the diagnostics.
const BACKLOG_PAGES_MAX: usize = 1_000;
/// Pages read to announce changes found by polling (Redis down).
const POLLED_PAGES_MAX: usize = 256;
/// Between attempts to create or check the topic and indexes at start.
const SETUP_RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// Cursor notes written at once; more are dropped (diagnostics only).
const CURSOR_NOTES_IN_FLIGHT_MAX: usize = 8;
/// Renewal requests a slow subscriber may fall behind by (they are rare:
/// one per refused copy's hello).
const RENEWALS_CAPACITY: usize = 64;
/// Between attempts to resubscribe to the projector's notices.
const SUBSCRIBE_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Writes of a node's admission record tried before a hello is answered
/// unavailable: each retry follows a write by another hello of the node.
const ADMIT_ATTEMPTS_MAX: usize = 4;
/// How long a session's presence holds unless renewed: as long as a bridge
/// takes to notice a dead connection (the default heartbeat timeout).
const PRESENCE_TTL_MS: i64 = 15_000;
/// How often a bridge counts the projectors present (`bridge_projectors_running`).
const PROJECTOR_COUNT_INTERVAL: Duration = Duration::from_secs(2);

/// A ticket's document while a batch is checked: as stored, or as created
/// by a change earlier in the batch (kept saved until needed).
enum Slot {
    Stored(Box<TicketDocument>),
    Created(Box<TicketRow>),
}

impl Slot {
    fn document(&mut self, replica: &ActorId) -> Result<&mut TicketDocument, StoreError> {
        if let Slot::Created(row) = self {
            *self = Slot::Stored(Box::new(TicketDocument::load(&row.document, replica.clone())?));
        }
        match self {
            Slot::Stored(document) => Ok(document),
            Slot::Created(_) => unreachable!("converted above"),
        }
    }
}

/// What checking a batch against the stored tickets found.
#[derive(Default)]
struct Checked {
    records: Vec<ChangeRecord>,
    rejections: Vec<Rejection>,
    /// Whether some change builds on changes not (yet) projected.
    missing_dependencies: bool,
}

/// A session's feed position.
#[derive(Debug, Clone)]
pub struct FeedState {
    cursor: PageCursor,
    /// Per partition, the node's own changes in pages up to here are sent
    /// back (the database that took the node over may not hold them).
    own_until: Vec<i64>,
}

pub struct DistributedStore {
    shared: Arc<Shared>,
    tasks: CancellationToken,
}

struct Shared {
    replica: ActorId,
    limits: Limits,
    partitions: usize,
    stager: Stager,
    log: ChangeLog,
    db: Db,
    cache: Option<Cache>,
    notices: broadcast::Sender<WardNotice>,
    /// Nodes whose open session another instance asked to take a new lease.
    renewals: broadcast::Sender<NodeId>,
    /// The watermarks this instance knows of, from notices and polling.
    projected: watch::Sender<Vec<i64>>,
    /// Set once the topic and the indexes are known to be in place.
    set_up: AtomicBool,
    visible_wait: Duration,
    cursor_notes: Arc<Semaphore>,
    /// This instance's name, for the presence of the sessions it holds.
    bridge: String,
    /// Projectors present at the last count; -1 before one succeeded.
    projectors: AtomicI64,
}

impl std::fmt::Debug for DistributedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistributedStore").field("topic", &self.shared.log.topic()).finish_non_exhaustive()
    }
}

impl DistributedStore {
    /// Connects (lazily: services may come up later) and starts the
    /// background work: topic and index setup, notices, watermark polling.
    pub async fn open(backend: &Distributed, options: &StoreOptions, replica: ActorId) -> Result<Self, StoreError> {
        let Distributed { kafka, mongodb, redis } = backend;
        let name = format!("cloud-bridge/{}", options.instance);
        let cache = redis.as_ref().map(Cache::new).transpose()?;
        let partitions = usize::try_from(kafka.partitions).unwrap_or(1);
        let shared = Arc::new(Shared {
            stager: Stager::new(options.limits.clone(), replica.clone())?,
            replica,
            limits: options.limits.clone(),
            partitions,
            log: ChangeLog::new(kafka, &name)?,
            db: Db::connect(mongodb, &name).await?,
            cache,
            notices: broadcast::channel(NOTICES_CAPACITY).0,
            renewals: broadcast::channel(RENEWALS_CAPACITY).0,
            projected: watch::channel(vec![-1; partitions]).0,
            set_up: AtomicBool::new(false),
            visible_wait: Duration::from_millis(options.visible_wait_ms),
            cursor_notes: Arc::new(Semaphore::new(CURSOR_NOTES_IN_FLIGHT_MAX)),
            bridge: options.instance.to_string(),
            projectors: AtomicI64::new(-1),
        });
        let tasks = CancellationToken::new();
        tokio::spawn(Arc::clone(&shared).set_up(tasks.clone()));
        tokio::spawn(Arc::clone(&shared).poll_watermarks(tasks.clone()));
        tokio::spawn(Arc::clone(&shared).count_projectors(tasks.clone()));
        if shared.cache.is_some() {
            tokio::spawn(Arc::clone(&shared).follow_notices(tasks.clone()));
        }
        Ok(Self { shared, tasks })
    }

    pub fn replica(&self) -> &ActorId {
        &self.shared.replica
    }

    pub fn subscribe(&self) -> broadcast::Receiver<WardNotice> {
        self.shared.notices.subscribe()
    }

    /// Nodes whose open session on this instance should take a new lease,
    /// as other instances ask through Redis. Without Redis the request
    /// reaches the session at its next presence renewal instead.
    pub fn renewal_requests(&self) -> broadcast::Receiver<NodeId> {
        self.shared.renewals.subscribe()
    }

    pub async fn store_upstream(
        &self,
        node: NodeId,
        ward: WardId,
        changes: Vec<UpstreamChange>,
    ) -> Result<Vec<Rejection>, StoreError> {
        let shared = &self.shared;
        shared.require_set_up()?;
        let started = std::time::Instant::now();
        let highest = changes.iter().map(|c| c.seq).max().unwrap_or(0);
        let count = changes.len();
        let mut staged = shared.stager.stage(&node, &ward, changes).await?;
        let staged_at = started.elapsed();
        let mut checked = shared.check(&node, &ward, &mut staged, false).await?;
        let checked_at = started.elapsed();
        if checked.missing_dependencies {
            // Changes this batch builds on were accepted (by this bridge or
            // another) but not projected yet: wait until the projection
            // holds everything acknowledged so far, then check again.
            shared.wait_caught_up().await?;
            checked = shared.check(&node, &ward, &mut staged, true).await?;
        }
        shared.log.append(&checked.records).await?;
        let appended_at = started.elapsed();
        let rejections: Vec<(u64, String, String)> =
            checked.rejections.iter().map(|r| (r.seq, r.ticket.to_string(), r.message.clone())).collect();
        shared.db.record_upstream(node.as_str(), ward.as_str(), highest, &rejections, now_ms()).await?;
        tracing::debug!(
            changes = count,
            stage_ms = staged_at.as_millis() as u64,
            check_ms = (checked_at - staged_at).as_millis() as u64,
            append_ms = (appended_at - checked_at).as_millis() as u64,
            record_ms = (started.elapsed() - appended_at).as_millis() as u64,
            "stored an upstream batch"
        );
        Ok(checked.rejections)
    }

    pub async fn pharmacy_write(&self, id: TicketId, mutation: Mutation) -> Result<PharmacyOutcome, StoreError> {
        let shared = &self.shared;
        shared.require_set_up()?;
        let stored = shared.db.stored_ticket(&id.to_string()).await?.ok_or(StoreError::NotFound(id))?;
        // A fresh actor for every pharmacy change: two bridge instances, or
        // two requests on one, may edit a ticket from the same stored
        // version, and one actor must never write two changes with the same
        // sequence number.
        let mut document = TicketDocument::load(&stored.document, ActorId::random())?;
        let change = mutation(&mut document)?;
        let ticket = document.ticket()?;
        let record =
            ChangeRecord { ticket: id, ward: ticket.ward.clone(), origin: Origin::Pharmacy, change, created: None };
        let positions = shared.log.append(std::slice::from_ref(&record)).await?;
        let visible = shared.wait_projected(&positions, shared.visible_wait).await;
        Ok(PharmacyOutcome { ticket, visible })
    }

    pub fn note_cursor(&self, node: NodeId, cursor: &Cursor) {
        let Some(cursor) = PageCursor::decode(cursor) else { return };
        let Ok(permit) = Arc::clone(&self.shared.cursor_notes).try_acquire_owned() else {
            tracing::debug!("cursor notes busy; one was skipped");
            return;
        };
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(error) = shared.db.note_cursor(node.as_str(), &cursor.partitions).await {
                tracing::debug!(%error, "a cursor note was not written");
            }
        });
    }

    /// Decides a hello against the node's record and writes the new record
    /// over the version it read; a hello that raced another (on any bridge)
    /// is decided again against the record that won.
    pub async fn admit(
        &self,
        node: NodeId,
        ward: WardId,
        claim: Claim,
        nonce: [u8; 16],
    ) -> Result<Admitted, StoreError> {
        let db = &self.shared.db;
        let me = &self.shared.bridge;
        for _ in 0..ADMIT_ATTEMPTS_MAX {
            let stored = db.node(node.as_str()).await?;
            let admitted = stored.as_ref().map_or(0, |n| n.admitted);
            let now = now_ms();
            // A session of the node open on another instance counts as here.
            let presence = stored.as_ref().and_then(|n| n.presence.as_ref());
            let elsewhere = presence.is_some_and(|p| p.bridge != *me && p.until > now);
            let claim = Claim { connected_elsewhere: claim.connected_elsewhere || elsewhere, ..claim };
            let (record, admission) =
                match admission::admit(stored.as_ref().and_then(|n| n.admission.as_ref()), claim, nonce) {
                    Ok(admitted) => admitted,
                    Err(refused) => {
                        if refused.reason == RefusalReason::AlreadyConnected && elsewhere {
                            // The flag is read at the holder's next presence
                            // renewal; Redis, if there, tells it at once, so
                            // the copy's lease is void before the original
                            // can go offline.
                            db.request_renewal(node.as_str()).await?;
                            if let Some(cache) = &self.shared.cache
                                && let Err(error) = cache.request_renewal(node.as_str()).await
                            {
                                tracing::debug!(%node, %error, "renewal request left to the presence renewal");
                            }
                        }
                        return Ok(Err(refused));
                    }
                };
            let own_until = match admission {
                Admission::TookOver { .. } => Some(db.watermarks(self.shared.partitions).await?),
                Admission::Resumed | Admission::Recovered => None,
            };
            let presence = Presence { bridge: me.clone(), until: now + PRESENCE_TTL_MS };
            let own_until = own_until.as_deref();
            if db
                .store_admission(
                    node.as_str(),
                    admitted,
                    AdmissionWrite { ward: ward.as_str(), record: &record, own_until, presence: Some(&presence) },
                    now,
                )
                .await?
            {
                return Ok(Ok((admission, record)));
            }
        }
        Err(StoreError::Unavailable(format!("the record of node {node} kept changing during its hello")))
    }

    pub async fn update_lease(&self, node: NodeId, update: LeaseUpdate) -> Result<Option<NodeLease>, StoreError> {
        let db = &self.shared.db;
        for _ in 0..ADMIT_ATTEMPTS_MAX {
            let Some(stored) = db.node(node.as_str()).await? else { return Ok(None) };
            let Some(updated) = stored.admission.as_ref().and_then(|record| update.apply(record)) else {
                return Ok(None);
            };
            let write = AdmissionWrite { ward: &stored.ward, record: &updated, own_until: None, presence: None };
            if db.store_admission(node.as_str(), stored.admitted, write, now_ms()).await? {
                return Ok(Some(updated));
            }
        }
        Err(StoreError::Unavailable(format!("the record of node {node} kept changing during a lease update")))
    }

    pub async fn keep_present(&self, node: &NodeId) -> Result<bool, StoreError> {
        self.shared.db.keep_present(node.as_str(), &self.shared.bridge, now_ms() + PRESENCE_TTL_MS).await
    }

    pub async fn leave(&self, node: &NodeId) -> Result<(), StoreError> {
        self.shared.db.leave(node.as_str(), &self.shared.bridge).await
    }

    pub async fn open_feed(&self, node: &NodeId, cursor: Option<&Cursor>) -> Result<FeedState, StoreError> {
        let stored = self.shared.db.node(node.as_str()).await?;
        let own_until = stored.and_then(|n| n.own_until).unwrap_or_default();
        let cursor = cursor.and_then(PageCursor::decode).unwrap_or_default();
        Ok(FeedState { cursor, own_until })
    }

    pub async fn read_feed(
        &self,
        node: &NodeId,
        ward: &WardId,
        state: &mut FeedState,
        limits: FeedLimits,
    ) -> Result<Option<(Vec<DownstreamChange>, Cursor)>, StoreError> {
        let marks = self.shared.db.watermarks(self.shared.partitions).await?;
        let ranges: Vec<(usize, i64, i64)> = marks
            .iter()
            .enumerate()
            .filter(|&(p, &mark)| mark > state.cursor.last(p))
            .map(|(p, &mark)| (p, state.cursor.last(p), mark))
            .collect();
        if ranges.is_empty() {
            return Ok(None);
        }
        let reader = Some((node.as_str(), state.own_until.as_slice()));
        let pages = self.shared.db.pages(Some(ward.as_str()), &ranges, reader, PAGES_PER_READ).await?;
        let exhausted = pages.len() < PAGES_PER_READ;
        let before = state.cursor.clone();
        let changes = take_pages(&pages, node, state, limits)?;
        if exhausted && state.cursor.partial.is_none() {
            // Every page up to the watermarks was read: the cursor may pass
            // the offsets where this ward had nothing.
            for &(p, _, mark) in &ranges {
                state.cursor.set_last(p, mark);
            }
        }
        if state.cursor == before {
            return Ok(None);
        }
        Ok(Some((changes, state.cursor.encode())))
    }

    pub async fn missing_heads(&self, ward: WardId, tickets: Vec<TicketHeads>) -> Result<Vec<TicketHeads>, StoreError> {
        let ids: Vec<String> = tickets.iter().map(|t| t.ticket.to_string()).collect();
        let mut stored: HashMap<String, Vec<u8>> =
            self.shared.db.stored_tickets(&ids).await?.into_iter().map(|t| (t.id, t.document)).collect();
        let mut missing = Vec::new();
        for theirs in tickets {
            let document = stored
                .remove(&theirs.ticket.to_string())
                .map(|bytes| TicketDocument::load(&bytes, self.shared.replica.clone()))
                .transpose()?;
            missing.extend(compare_heads(document, &ward, theirs)?);
        }
        Ok(missing)
    }

    pub async fn queue(&self, query: QueueQuery) -> Result<QueuePage, StoreError> {
        let wards = query.wards.iter().map(|w| w.as_str().to_owned()).collect::<Vec<_>>();
        let statuses = query.statuses.iter().map(|s| s.as_str().to_owned()).collect::<Vec<_>>();
        let priorities = query.priorities.iter().map(|p| p.as_str().to_owned()).collect::<Vec<_>>();
        let name = format!(
            "w={};s={};p={};b={};l={}",
            wards.join(","),
            statuses.join(","),
            priorities.join(","),
            query.open_backorders,
            query.limit
        );
        let cache = self.shared.cache.as_ref();
        let key = match cache {
            Some(cache) => cache.queue_key(&name).await.inspect_err(|e| cache_failed("queue key", e)).ok(),
            None => None,
        };
        if let (Some(cache), Some(key)) = (cache, &key)
            && let Ok(Some(cached)) = cache.get(key).await.inspect_err(|e| cache_failed("queue read", e))
            && let Ok(page) = serde_json::from_str::<QueuePage>(&cached)
        {
            return Ok(page);
        }
        let (tickets, total) =
            self.shared.db.queue(&wards, &statuses, &priorities, query.open_backorders, query.limit).await?;
        let page = QueuePage { tickets, total };
        if let (Some(cache), Some(key)) = (cache, &key) {
            let _ = cache
                .put(key, &serde_json::to_string(&page).unwrap_or_default())
                .await
                .inspect_err(|e| cache_failed("queue write", e));
        }
        Ok(page)
    }

    pub async fn ticket(&self, id: TicketId) -> Result<TicketView, StoreError> {
        let id_text = id.to_string();
        let cache = self.shared.cache.as_ref();
        let key = match cache {
            Some(cache) => cache.ticket_key(&id_text).await.inspect_err(|e| cache_failed("ticket key", e)).ok(),
            None => None,
        };
        if let (Some(cache), Some(key)) = (cache, &key)
            && let Ok(Some(cached)) = cache.get(key).await.inspect_err(|e| cache_failed("ticket read", e))
            && let Ok(view) = serde_json::from_str::<TicketView>(&cached)
        {
            return Ok(view);
        }
        let stored = self.shared.db.stored_ticket(&id_text).await?.ok_or(StoreError::NotFound(id))?;
        let view = TicketView::read(&stored.document, self.shared.replica.clone())?;
        if let (Some(cache), Some(key)) = (cache, &key) {
            let _ = cache
                .put(key, &serde_json::to_string(&view).unwrap_or_default())
                .await
                .inspect_err(|e| cache_failed("ticket write", e));
        }
        Ok(view)
    }

    pub async fn trail(
        &self,
        ward: &WardId,
        from: UnixMillis,
        to: UnixMillis,
        limit: usize,
    ) -> Result<Vec<TicketView>, StoreError> {
        let documents = self.shared.db.ward_documents(ward.as_str(), from, to, limit).await?;
        let replica = self.shared.replica.clone();
        // Replaying every change of every ticket is CPU work: off the runtime.
        tokio::task::spawn_blocking(move || {
            documents.iter().map(|bytes| TicketView::read(bytes, replica.clone())).collect()
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("trail task failed: {e}")))?
    }

    pub async fn put_medication(&self, medication: Medication) -> Result<bool, StoreError> {
        let entry = serde_json::to_string(&medication).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.shared.db.put_medication(&medication.code, &entry, now_ms()).await
    }

    pub async fn formulary(&self, codes: Option<Vec<String>>) -> Result<(Vec<Medication>, u64), StoreError> {
        let (entries, size) = self.shared.db.formulary(codes.as_deref()).await?;
        let entries = entries
            .iter()
            .map(|entry| serde_json::from_str(entry).map_err(|e| StoreError::Corrupt(format!("formulary entry: {e}"))))
            .collect::<Result<_, _>>()?;
        Ok((entries, size))
    }

    pub async fn diagnostics(&self) -> Result<Vec<NodeDiagnostics>, StoreError> {
        let mut diagnostics = Vec::new();
        for node in self.shared.db.nodes().await? {
            let cursor = node.cursor.clone().unwrap_or_default();
            let backlog = self.shared.db.backlog(&node.ward, &cursor, BACKLOG_PAGES_MAX).await?;
            diagnostics.push(NodeDiagnostics {
                node: node.node,
                ward: node.ward,
                acked_up_to: u64::try_from(node.acked_up_to).unwrap_or(0),
                last_seen: node.last_seen,
                cursor: node.cursor.map(FeedPosition::Partitions),
                backlog,
                rejected: u64::try_from(node.rejected).unwrap_or(0),
                database: node.admission.map(|record| record.database.to_string()),
                taken_over_at: node.taken_over_at,
            });
        }
        Ok(diagnostics)
    }

    pub async fn ready(&self) -> Result<(), StoreError> {
        self.shared.require_set_up()?;
        self.shared.log.ready().await?;
        self.shared.db.ping().await
    }

    /// Projectors running at the last count (every 2 s), once one succeeded.
    pub fn projectors_running(&self) -> Option<u64> {
        u64::try_from(self.shared.projectors.load(Ordering::Relaxed)).ok()
    }

    pub async fn close(&self) {
        self.tasks.cancel();
        let shared = Arc::clone(&self.shared);
        let _ = tokio::task::spawn_blocking(move || shared.log.flush(Duration::from_secs(5))).await;
    }
}

fn cache_failed(what: &str, error: &cache::CacheError) {
    tracing::debug!(%error, what, "redis cache skipped");
}

/// Takes the changes of `pages` (in order) that fit `limits`, moving the
/// cursor past what it took. A page that does not fit whole is taken in
/// part and remembered in the cursor.
fn take_pages(
    pages: &[PageDoc],
    node: &NodeId,
    state: &mut FeedState,
    limits: FeedLimits,
) -> Result<Vec<DownstreamChange>, StoreError> {
    let mut changes = Vec::new();
    let mut bytes = 0usize;
    for page in pages {
        let p = usize::try_from(page.p).map_err(|_| StoreError::Corrupt(format!("page partition {}", page.p)))?;
        let page_id = page.id.bytes();
        let already_sent = match &state.cursor.partial {
            Some(partial) if partial.partition as usize == p && partial.page == page_id => partial.sent as usize,
            _ => 0,
        };
        // The query leaves out the node's own pages, but for those it may lack.
        let own = page.origin.as_deref() == Some(node.as_str());
        let echo_own = state.own_until.get(p).is_some_and(|&until| page.last <= until);
        for (index, entry) in page.changes.iter().enumerate().skip(already_sent) {
            let fits = changes.len() < limits.changes_max && bytes + entry.change.len() <= limits.bytes_max;
            if !fits && !changes.is_empty() {
                state.cursor.partial = Some(PartialPage {
                    partition: p as u32,
                    page: page_id,
                    last: page.last,
                    sent: u32::try_from(index).unwrap_or(u32::MAX),
                });
                return Ok(changes);
            }
            if own && !echo_own {
                continue;
            }
            bytes += entry.change.len();
            let ticket = entry.ticket.parse().map_err(|e| StoreError::Corrupt(format!("ticket id in page: {e}")))?;
            changes.push(DownstreamChange { ticket, change: ByteBuf::from(entry.change.clone()) });
        }
        if state.cursor.partial.as_ref().is_some_and(|q| q.partition as usize == p && q.page == page_id) {
            state.cursor.partial = None;
        }
        // Another page of this partition with the same `last` may still be
        // partly sent: the position must not pass it.
        let blocked = state.cursor.partial.as_ref().is_some_and(|q| q.partition as usize == p && q.last <= page.last);
        if !blocked && page.last > state.cursor.last(p) {
            state.cursor.set_last(p, page.last);
        }
    }
    Ok(changes)
}

impl Shared {
    fn require_set_up(&self) -> Result<(), StoreError> {
        match self.set_up.load(Ordering::Acquire) {
            true => Ok(()),
            false => Err(StoreError::Unavailable("the change topic and the database are not set up yet".into())),
        }
    }

    /// Checks a batch against the tickets as MongoDB holds them. On the
    /// second pass (`last_pass`) a change that still builds on missing
    /// changes is refused: the cloud never accepted what it builds on.
    async fn check(
        &self,
        node: &NodeId,
        ward: &WardId,
        staged: &mut [Staged],
        last_pass: bool,
    ) -> Result<Checked, StoreError> {
        let mut ids: Vec<String> = staged.iter().map(|s| s.ticket.to_string()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut slots: HashMap<TicketId, Slot> = HashMap::new();
        for stored in self.db.stored_tickets(&ids).await? {
            let id = stored.id.parse().map_err(|e| StoreError::Corrupt(format!("ticket id {}: {e}", stored.id)))?;
            slots.insert(id, Slot::Stored(Box::new(TicketDocument::load(&stored.document, self.replica.clone())?)));
        }
        let mut checked = Checked::default();
        for change in staged.iter_mut() {
            let (seq, id) = (change.seq, change.ticket);
            let staged_change = match &mut change.checked {
                Ok(staged_change) => staged_change,
                Err(reason) => {
                    checked.rejections.push(Rejection { seq, ticket: id, message: reason.to_string() });
                    continue;
                }
            };
            let document = match slots.get_mut(&id) {
                Some(slot) => Some(slot.document(&self.replica)?),
                None => None,
            };
            let mut created = None;
            match staged_change.merge_into(document, id, ward, &self.limits, &self.replica)? {
                Outcome::Created(row) => {
                    created = Some(row.json.to_string());
                    slots.insert(id, Slot::Created(row));
                }
                Outcome::Merged => {}
                Outcome::AlreadyHad => continue,
                Outcome::MissingDependencies if last_pass => {
                    let message = Refusal::Unaccepted("cloud").to_string();
                    checked.rejections.push(Rejection { seq, ticket: id, message });
                    continue;
                }
                Outcome::MissingDependencies => {
                    checked.missing_dependencies = true;
                    continue;
                }
                Outcome::Refused(refusal) => {
                    checked.rejections.push(Rejection { seq, ticket: id, message: refusal.to_string() });
                    continue;
                }
            }
            checked.records.push(ChangeRecord {
                ticket: id,
                ward: ward.clone(),
                origin: Origin::Node(node.clone()),
                change: staged_change.bytes.clone(),
                created,
            });
        }
        Ok(checked)
    }

    /// Waits until this instance knows the projection reached `positions`;
    /// returns whether it did within `timeout`.
    async fn wait_projected(&self, positions: &[(i32, i64)], timeout: Duration) -> bool {
        let reached = |marks: &Vec<i64>| {
            positions.iter().all(|&(p, offset)| {
                usize::try_from(p).ok().and_then(|p| marks.get(p)).is_some_and(|&mark| mark >= offset)
            })
        };
        let mut marks = self.projected.subscribe();
        tokio::time::timeout(timeout, marks.wait_for(reached)).await.is_ok_and(|r| r.is_ok())
    }

    /// Waits until the projection holds everything the brokers had
    /// acknowledged when this was called.
    async fn wait_caught_up(&self) -> Result<(), StoreError> {
        let ends = self.log.end_offsets().await?;
        let positions: Vec<(i32, i64)> = ends
            .iter()
            .enumerate()
            .filter(|&(_, &end)| end > 0)
            .map(|(p, &end)| (i32::try_from(p).unwrap_or(i32::MAX), end - 1))
            .collect();
        match self.wait_projected(&positions, self.visible_wait).await {
            true => Ok(()),
            false => Err(StoreError::Unavailable("the projection is behind; the batch will be sent again".into())),
        }
    }

    /// Raises the known watermarks; returns the partitions that moved, with
    /// their previous and new marks.
    fn learn_watermarks(&self, marks: impl IntoIterator<Item = (usize, i64)>) -> Vec<(usize, i64, i64)> {
        let mut moved = Vec::new();
        self.projected.send_if_modified(|known| {
            for (p, mark) in marks {
                if let Some(slot) = known.get_mut(p)
                    && mark > *slot
                {
                    moved.push((p, *slot, mark));
                    *slot = mark;
                }
            }
            !moved.is_empty()
        });
        moved
    }

    /// Creates the topic and the indexes, retrying until the services answer.
    async fn set_up(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let outcome = async {
                self.log.ensure_topic().await?;
                self.db.ensure_indexes().await?;
                let marks = self.db.watermarks(self.partitions).await?;
                self.learn_watermarks(marks.into_iter().enumerate());
                Ok::<(), StoreError>(())
            }
            .await;
            match outcome {
                Ok(()) => {
                    self.set_up.store(true, Ordering::Release);
                    tracing::info!(topic = self.log.topic(), "distributed store ready");
                    return;
                }
                Err(error) if error.needs_a_person() => {
                    tracing::error!(%error, "the distributed store cannot start; fix the configuration");
                }
                Err(error) => tracing::warn!(%error, "distributed store not set up yet; retrying"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(SETUP_RETRY_INTERVAL) => {}
            }
        }
    }

    /// Follows the projector's notices on Redis: wakes feeds, updates live
    /// views, and learns the watermarks at once.
    async fn follow_notices(self: Arc<Self>, stop: CancellationToken) {
        let Some(cache) = self.cache.clone() else { return };
        loop {
            match cache.subscribe().await {
                Ok(pubsub) => {
                    tracing::info!("following the projector's notices");
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            message = messages.next() => match message {
                                Some(message) if cache.is_renewal(message.get_channel_name()) => {
                                    self.on_renewal_request(message.get_payload_bytes());
                                }
                                Some(message) => self.on_projected(message.get_payload_bytes()),
                                None => break,
                            },
                        }
                    }
                    tracing::warn!("the projector's notices stopped; bridges poll until they are back");
                }
                Err(error) => tracing::debug!(%error, "cannot follow the projector's notices"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(SUBSCRIBE_RETRY_INTERVAL) => {}
            }
        }
    }

    fn on_renewal_request(&self, payload: &[u8]) {
        match std::str::from_utf8(payload).ok().and_then(|node| node.parse::<NodeId>().ok()) {
            Some(node) => {
                let _ = self.renewals.send(node);
            }
            None => tracing::warn!("unreadable lease renewal request"),
        }
    }

    fn on_projected(&self, payload: &[u8]) {
        let round: Projected = match serde_json::from_slice(payload) {
            Ok(round) => round,
            Err(error) => {
                tracing::warn!(%error, "unreadable notice from the projector");
                return;
            }
        };
        // Notices first: a woken feed reads MongoDB, which already holds the round.
        for ticket in round.tickets {
            let Ok(ward) = ticket.ward.parse() else { continue };
            let _ = self.notices.send(WardNotice { ward, ticket_json: Arc::from(ticket.ticket.get()) });
        }
        let marks = round.watermarks.into_iter().filter_map(|(p, mark)| usize::try_from(p).ok().map(|p| (p, mark)));
        self.learn_watermarks(marks);
    }

    /// Reads the watermarks now and then. When they moved further than the
    /// notices said (Redis down or a notice lost), announces what the pages
    /// in between changed, so live views and feeds still move.
    async fn poll_watermarks(self: Arc<Self>, stop: CancellationToken) {
        let mut interval = tokio::time::interval(WATERMARK_POLL_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = interval.tick() => {}
            }
            let marks = match self.db.watermarks(self.partitions).await {
                Ok(marks) => marks,
                Err(error) => {
                    tracing::debug!(%error, "cannot read the watermarks");
                    continue;
                }
            };
            let moved = self.learn_watermarks(marks.into_iter().enumerate());
            if !moved.is_empty()
                && let Err(error) = self.announce(&moved).await
            {
                tracing::debug!(%error, "cannot announce polled changes");
            }
        }
    }

    /// Counts the projectors present now and then: without one, changes are
    /// stored but nothing reaches reads or feeds, which operators must see.
    async fn count_projectors(self: Arc<Self>, stop: CancellationToken) {
        let mut interval = tokio::time::interval(PROJECTOR_COUNT_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = interval.tick() => {}
            }
            match self.db.projectors_present(now_ms()).await {
                Ok(count) => {
                    self.projectors.store(i64::try_from(count).unwrap_or(i64::MAX), Ordering::Relaxed);
                    metrics::gauge!("bridge_projectors_running").set(count as f64);
                }
                Err(error) => tracing::debug!(%error, "cannot count the projectors"),
            }
        }
    }

    async fn announce(&self, moved: &[(usize, i64, i64)]) -> Result<(), StoreError> {
        let pages = self.db.pages(None, moved, None, POLLED_PAGES_MAX).await?;
        let mut ids: Vec<String> =
            pages.iter().flat_map(|page| page.changes.iter().map(|c| c.ticket.clone())).collect();
        ids.sort_unstable();
        ids.dedup();
        for ticket in self.db.tickets(&ids).await? {
            let Ok(ward) = ticket.ward.parse() else { continue };
            let _ = self.notices.send(WardNotice { ward, ticket_json: Arc::from(ticket.ticket.as_str()) });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::oid::ObjectId;

    use self::mongo::PageChange;

    const TICKET: &str = "019ad1f0-0000-7000-8000-000000000001";

    fn page(p: i32, last: i64, origin: Option<&str>, changes: usize) -> PageDoc {
        PageDoc {
            id: ObjectId::new(),
            ward: "ward-4b".into(),
            p,
            origin: origin.map(str::to_owned),
            first: 0,
            last,
            n: changes as i32,
            changes: (0..changes).map(|n| PageChange { ticket: TICKET.into(), change: vec![n as u8; 10] }).collect(),
        }
    }

    fn node() -> NodeId {
        "edge-ward-4b".parse().unwrap()
    }

    fn limits(changes_max: usize) -> FeedLimits {
        FeedLimits { changes_max, bytes_max: 1 << 20 }
    }

    #[test]
    fn a_feed_skips_the_nodes_own_pages_unless_it_may_lack_them() {
        let pages = [page(0, 10, Some("edge-ward-4b"), 3), page(0, 20, None, 2), page(1, 15, Some("edge-ward-4b"), 1)];
        let mut state = FeedState { cursor: PageCursor::default(), own_until: Vec::new() };
        let changes = take_pages(&pages, &node(), &mut state, limits(100)).unwrap();
        assert_eq!(changes.len(), 2, "only the pharmacy's changes");
        assert_eq!((state.cursor.last(0), state.cursor.last(1)), (20, 15), "the position passes own pages too");

        // Without a cursor (restored from a backup), its own changes up to
        // the offsets noted at the session's start come back.
        let mut state = FeedState { cursor: PageCursor::default(), own_until: vec![10, -1] };
        let changes = take_pages(&pages, &node(), &mut state, limits(100)).unwrap();
        assert_eq!(changes.len(), 5, "own changes up to offset 10 of partition 0, and the pharmacy's");
    }

    #[test]
    fn a_page_larger_than_a_batch_is_sent_in_parts_and_never_skipped() {
        let pages = [page(0, 10, None, 5), page(0, 20, None, 2)];
        let mut state = FeedState { cursor: PageCursor::default(), own_until: Vec::new() };
        let mut sent = Vec::new();
        for _ in 0..3 {
            // Each read gets the pages after the position, as the query would.
            let after = state.cursor.last(0);
            let unread: Vec<PageDoc> = pages.iter().filter(|p| p.last > after).cloned().collect();
            let changes = take_pages(&unread, &node(), &mut state, limits(3)).unwrap();
            assert!(changes.len() <= 3);
            sent.extend(changes.into_iter().map(|c| c.change.into_vec()[0]));
        }
        assert_eq!(sent, [0, 1, 2, 3, 4, 0, 1], "every change once, in order");
        assert_eq!((state.cursor.last(0), state.cursor.partial.clone()), (20, None));
    }

    #[test]
    fn the_position_never_passes_a_page_sent_in_part() {
        // Two pages with the same `last` (another projector's, during a rebalance).
        let pages = [page(0, 10, None, 4), page(0, 10, None, 1)];
        let mut state = FeedState { cursor: PageCursor::default(), own_until: Vec::new() };
        take_pages(&pages[..1], &node(), &mut state, limits(2)).unwrap();
        assert!(state.cursor.partial.is_some());
        take_pages(&pages[1..], &node(), &mut state, limits(10)).unwrap();
        assert_eq!(state.cursor.last(0), -1, "the first page is not finished");
    }
}
