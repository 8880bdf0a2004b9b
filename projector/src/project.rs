//! The projector's rounds: consume a batch of change records, merge each
//! ticket's records into its stored document, write pages, tickets,
//! watermarks and notices, then commit the offsets.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::ActorId;
use cloud_store::StoreError;
use cloud_store::config::{KafkaConfig, MongoConfig};
use cloud_store::distributed::cache::{Cache, Projected, ProjectedTicket};
use cloud_store::distributed::kafka::{ChangeLog, client_config};
use cloud_store::distributed::mongo::{Db, PageChange, PageDoc, StoredTicket, TicketDoc, TicketWrite};
use cloud_store::distributed::record::{ChangeRecord, Origin, RECORD_OVERHEAD_BYTES_MAX};
use cloud_store::staging::{TicketRow, automerge_pool};
use rayon::prelude::*;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::value::RawValue;
use sync_protocol::document::{ReceivedChange, TICKET_JSON_VERSION, TicketDocument};
use sync_protocol::ids::TicketId;
use sync_protocol::ticket::Ticket;
use tokio_util::sync::CancellationToken;

use service_kit::clock::now_ms;

use crate::Health;
use crate::config::ProjectorConfig;

/// Most changes in one feed page: well under an edge's batch limit, so a
/// page is usually sent whole.
const PAGE_CHANGES_MAX: usize = 256;
/// Most change bytes in one feed page (MongoDB documents stop at 16 MiB).
const PAGE_BYTES_MAX: usize = 1024 * 1024;
/// Attempts to write a ticket that concurrent projectors keep moving on.
const CONFLICT_ROUNDS_MAX: usize = 8;
/// Backoff between attempts of a round whose services failed.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(200);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Records the consumer reads ahead of the projection, in KiB.
const PREFETCH_KBYTES: &str = "16384";
/// How often `projector_lag_records` is brought up to date.
const LAG_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How long the lag query waits for the brokers.
const LAG_QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a projector renews its presence in MongoDB, and how long a
/// presence holds unless renewed: the bridges' `/readyz` says "no projector
/// running" within `PRESENCE_TTL_MS` of the last one dying.
const PRESENCE_INTERVAL: Duration = Duration::from_secs(2);
const PRESENCE_TTL_MS: i64 = 6_000;
/// How long a stopping projector tries to withdraw its presence.
const PRESENCE_WITHDRAW_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the kafka consumer: {0}")]
    Consumer(#[from] rdkafka::error::KafkaError),
}

/// A record as consumed.
#[derive(Debug, Clone)]
struct Incoming {
    partition: i32,
    offset: i64,
    payload: Vec<u8>,
}

/// A decoded record, ready to merge.
#[derive(Clone)]
pub(crate) struct Accepted {
    partition: i32,
    offset: i64,
    record: ChangeRecord,
    received: ReceivedChange,
}

/// What merging one ticket's records produced.
pub(crate) struct MergedTicket {
    pub(crate) write: Option<TicketWrite>,
    /// Changes new to the ticket.
    new: Vec<NewChange>,
    notice: Option<ProjectedTicket>,
    /// Records that cannot be projected, with the reason.
    dead: Vec<(i32, i64, Vec<u8>, String)>,
}

/// A change new to its ticket, for the round's pages.
#[derive(Debug)]
struct NewChange {
    ward: String,
    partition: i32,
    /// The node it came from; `None` for the pharmacy.
    origin: Option<String>,
    offset: i64,
    change: PageChange,
}

impl NewChange {
    /// The stream of pages it belongs to, then its place in it.
    fn key(&self) -> (&str, i32, Option<&str>, i64) {
        (&self.ward, self.partition, self.origin.as_deref(), self.offset)
    }
}

/// Runs the projector until `stop` is cancelled.
pub async fn run(config: &ProjectorConfig, health: Health, stop: CancellationToken) -> Result<(), ProjectorError> {
    let (kafka, mongodb): (&KafkaConfig, &MongoConfig) = (&config.kafka, &config.mongodb);
    let name = format!("projector/{}", config.projector.id);
    let db = Db::connect(mongodb, &name).await?;
    let cache = config.redis.as_ref().map(Cache::new).transpose().map_err(StoreError::from)?;
    if set_up(&ChangeLog::new(kafka, &name)?, &db, &health, &stop).await.is_err() {
        return Ok(());
    }
    let consumer = Arc::new(subscribe(kafka, &name, config.projector.session_timeout_ms)?);
    let mut preparer = Preparer {
        db: db.clone(),
        replica: ActorId::random(),
        record_bytes_max: config.projector.change_bytes_max + RECORD_OVERHEAD_BYTES_MAX,
        mergers: automerge_pool("projector-merge")?,
        next_round: 0,
    };
    let mut writer = Writer {
        db,
        cache,
        replica: ActorId::random(),
        mergers: Arc::clone(&preparer.mergers),
        owes_invalidation: false,
    };
    let presence = tokio::spawn(keep_present(writer.db.clone(), config.projector.id.to_string(), stop.clone()));
    let written = Written::default();
    report_lag(Arc::clone(&consumer), kafka.topic.clone(), Arc::clone(&written), stop.clone());
    tracing::info!(topic = %kafka.topic, group = %kafka.group_id, "projector running");
    let (batch_max, linger) =
        (config.projector.batch_records_max, Duration::from_millis(config.projector.batch_linger_ms));
    // One round after the other. Preparing the next round while one is
    // written was measured slower (SecantusDB: its writes took twice as
    // long beside the next round's reads), and the projector's own work is
    // a small part of a round (README, distributed benchmark).
    'rounds: while let Some(batch) = next_batch(&consumer, batch_max, linger, &stop).await {
        let started = Instant::now();
        let mut retry = Retry::new("prepare a round", &health, &stop);
        let round = loop {
            match retry.outcome(preparer.prepare(&batch).await).await {
                Ok(Some(round)) => break round,
                Ok(None) => continue,
                Err(Stopped) => break 'rounds,
            }
        };
        let mut retry = Retry::new("write a round", &health, &stop);
        loop {
            match retry.outcome(writer.write(&round).await).await {
                Ok(Some(())) => break,
                Ok(None) => continue,
                Err(Stopped) => break 'rounds,
            }
        }
        commit(&consumer, &kafka.topic, &round.ranges);
        {
            let mut written = written.lock().unwrap_or_else(|p| p.into_inner());
            for (&partition, &(_, last)) in &round.ranges {
                written.insert(partition, last + 1);
            }
        }
        metrics::counter!("projector_records_total").increment(round.records as u64);
        metrics::histogram!("projector_round_seconds").record(started.elapsed().as_secs_f64());
    }
    stop.cancel();
    let _ = presence.await;
    tracing::info!("projector stopped");
    Ok(())
}

/// Renews this projector's presence until `stop`, then withdraws it, so
/// the bridges can tell operators when no projector runs.
async fn keep_present(db: Db, id: String, stop: CancellationToken) {
    let mut interval = tokio::time::interval(PRESENCE_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = interval.tick() => {}
        }
        if let Err(error) = db.projector_present(&id, now_ms() + PRESENCE_TTL_MS).await {
            tracing::debug!(%error, "projector presence not renewed");
        }
    }
    match tokio::time::timeout(PRESENCE_WITHDRAW_TIMEOUT, db.projector_gone(&id)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "projector presence not withdrawn; it lapses by itself"),
        Err(_) => tracing::warn!("projector presence not withdrawn in time; it lapses by itself"),
    }
}

/// Creates the topic (the bridges do too; a projector that starts first
/// must) and the indexes, retrying until they exist or the projector stops.
async fn set_up(log: &ChangeLog, db: &Db, health: &Health, stop: &CancellationToken) -> Result<(), Stopped> {
    let mut retry = Retry::new("set up the topic and indexes", health, stop);
    loop {
        let set_up = async {
            log.ensure_topic().await?;
            db.ensure_indexes().await
        };
        if retry.outcome(set_up.await).await?.is_some() {
            return Ok(());
        }
    }
}

/// A member of the projectors' consumer group on the change topic; it
/// commits offsets itself, after each round is written. The session timeout
/// bounds how long a killed projector holds its partitions (librdkafka's
/// default, 45 s, held projection up that long after a crash); heartbeats
/// go three times per timeout, as Kafka advises.
fn subscribe(
    kafka: &KafkaConfig,
    name: &str,
    session_timeout_ms: u64,
) -> Result<StreamConsumer, rdkafka::error::KafkaError> {
    let consumer: StreamConsumer = client_config(kafka, name)
        .set("group.id", &kafka.group_id)
        .set("session.timeout.ms", session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (session_timeout_ms / 3).to_string())
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        // Read ahead a few rounds, not librdkafka's default 64 MiB.
        .set("queued.max.messages.kbytes", PREFETCH_KBYTES)
        .create()?;
    consumer.subscribe(&[&kafka.topic])?;
    Ok(consumer)
}

/// The projector's side of a failure: it reports unready, logs, and backs
/// off (doubling up to `RETRY_BACKOFF_MAX`) before the work is tried again.
struct Retry<'a> {
    what: &'static str,
    health: &'a Health,
    stop: &'a CancellationToken,
    backoff: Duration,
}

impl<'a> Retry<'a> {
    fn new(what: &'static str, health: &'a Health, stop: &'a CancellationToken) -> Self {
        Self { what, health, stop, backoff: RETRY_BACKOFF_MIN }
    }

    /// Notes the outcome of an attempt: `Some` when done, `None` to try
    /// again after the backoff; `Err` once stopped.
    async fn outcome<T>(&mut self, outcome: Result<T, StoreError>) -> Result<Option<T>, Stopped> {
        self.health.set(outcome.is_ok());
        let what = self.what;
        match outcome {
            Ok(done) => return Ok(Some(done)),
            Err(error) if error.needs_a_person() => tracing::error!(%error, what, "projector cannot proceed"),
            Err(error) => tracing::warn!(%error, what, "projector waiting for its services"),
        }
        tokio::select! {
            _ = self.stop.cancelled() => return Err(Stopped),
            _ = tokio::time::sleep(self.backoff) => {}
        }
        self.backoff = (self.backoff * 2).min(RETRY_BACKOFF_MAX);
        Ok(None)
    }
}

/// The projector was asked to stop.
struct Stopped;

/// The next round's records: at least one, then whatever arrives within
/// `linger`, at most `max`. `None` once stopped.
async fn next_batch(
    consumer: &StreamConsumer,
    max: usize,
    linger: Duration,
    stop: &CancellationToken,
) -> Option<Vec<Incoming>> {
    let incoming = |message: &rdkafka::message::BorrowedMessage<'_>| Incoming {
        partition: message.partition(),
        offset: message.offset(),
        payload: message.payload().unwrap_or_default().to_vec(),
    };
    let mut batch = Vec::new();
    while batch.is_empty() {
        tokio::select! {
            _ = stop.cancelled() => return None,
            message = consumer.recv() => match message {
                Ok(message) => batch.push(incoming(&message)),
                Err(error) => {
                    tracing::warn!(%error, "kafka consumer error");
                    tokio::time::sleep(RETRY_BACKOFF_MIN).await;
                }
            },
        }
    }
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => batch.push(incoming(&message)),
            Ok(Err(error)) => tracing::warn!(%error, "kafka consumer error"),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// The next offset after what rounds have written, per partition.
type Written = Arc<Mutex<BTreeMap<i32, i64>>>;

/// Keeps `projector_lag_records` current: records of the assigned
/// partitions not written yet (the alert that matters: a growing lag means
/// wards wait); and `projector_assigned_partitions`, this projector's share. Off the rounds' path: asking the brokers takes a round trip
/// per partition.
fn report_lag(consumer: Arc<StreamConsumer>, topic: String, written: Written, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(LAG_REPORT_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = interval.tick() => {}
            }
            let (consumer, topic, written) = (Arc::clone(&consumer), topic.clone(), Arc::clone(&written));
            let lag = tokio::task::spawn_blocking(move || -> Option<i64> {
                let assigned = consumer.assignment().ok()?;
                metrics::gauge!("projector_assigned_partitions").set(assigned.elements_for_topic(&topic).len() as f64);
                let positions = consumer.position().ok()?;
                let mut lag = 0;
                for element in assigned.elements_for_topic(&topic) {
                    let partition = element.partition();
                    // Written by this projector, or (after a rebalance gave
                    // it the partition) where the consumer took over.
                    let written = written.lock().unwrap_or_else(|p| p.into_inner()).get(&partition).copied();
                    let position = match positions.find_partition(&topic, partition).map(|e| e.offset()) {
                        Some(Offset::Offset(position)) => Some(position),
                        _ => None,
                    };
                    let done = written.max(position)?;
                    let (_, high) = consumer.fetch_watermarks(&topic, partition, LAG_QUERY_TIMEOUT).ok()?;
                    lag += (high - done).max(0);
                }
                Some(lag)
            })
            .await;
            if let Ok(Some(lag)) = lag {
                metrics::gauge!("projector_lag_records").set(lag as f64);
            }
        }
    });
}

/// Commits the offsets after the round (`ranges`: its first and last
/// offset per partition). A failed commit only means the round is seen
/// again, which changes nothing.
fn commit(consumer: &StreamConsumer, topic: &str, ranges: &BTreeMap<i32, (i64, i64)>) {
    let mut offsets = TopicPartitionList::new();
    for (&partition, &(_, last)) in ranges {
        if let Err(error) = offsets.add_partition_offset(topic, partition, Offset::Offset(last + 1)) {
            tracing::warn!(%error, partition, "cannot note an offset to commit");
        }
    }
    if let Err(error) = consumer.commit(&offsets, CommitMode::Async) {
        tracing::warn!(%error, "offsets not committed; the round will be seen again");
    }
}

/// A round merged and ready to write.
struct Round {
    number: u64,
    records: usize,
    /// First and last offset of the round's records, per partition.
    ranges: BTreeMap<i32, (i64, i64)>,
    dead: Vec<(i32, i64, Vec<u8>, String)>,
    pages: Vec<PageDoc>,
    writes: Vec<TicketWrite>,
    /// Each written ticket's records, to merge again after a conflict.
    records_of: HashMap<TicketId, Vec<Accepted>>,
    notices: Vec<ProjectedTicket>,
}

/// Reads a round's records, loads their tickets and merges.
struct Preparer {
    db: Db,
    replica: ActorId,
    record_bytes_max: usize,
    mergers: Arc<rayon::ThreadPool>,
    next_round: u64,
}

impl Preparer {
    async fn prepare(&mut self, batch: &[Incoming]) -> Result<Round, StoreError> {
        let started = Instant::now();
        let mut ranges: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        for record in batch {
            let range = ranges.entry(record.partition).or_insert((record.offset, record.offset));
            *range = (range.0.min(record.offset), range.1.max(record.offset));
        }
        let (by_ticket, mut dead) = self.decode(batch);
        let ids: Vec<String> = by_ticket.keys().map(ToString::to_string).collect();
        let stored: HashMap<String, StoredTicket> =
            self.db.stored_tickets(&ids).await?.into_iter().map(|doc| (doc.id.clone(), doc)).collect();
        let loaded = started.elapsed();
        let merged = merge_all(&self.mergers, by_ticket, stored, &self.replica).await?;
        let number = self.next_round;
        self.next_round += 1;
        let mut new = Vec::new();
        let mut writes = Vec::new();
        let mut notices = Vec::new();
        let mut records_of = HashMap::new();
        for (id, (result, records)) in merged {
            new.extend(result.new);
            dead.extend(result.dead);
            notices.extend(result.notice);
            if let Some(write) = result.write {
                writes.push(write);
                records_of.insert(id, records);
            }
        }
        tracing::debug!(
            round = number,
            records = batch.len(),
            tickets = writes.len(),
            load_ms = loaded.as_millis() as u64,
            merge_ms = (started.elapsed() - loaded).as_millis() as u64,
            "prepared a round"
        );
        Ok(Round {
            number,
            records: batch.len(),
            pages: pages(new, &ranges),
            ranges,
            dead,
            writes,
            records_of,
            notices,
        })
    }

    /// Decodes a round's records, grouped by ticket in offset order. A
    /// record that does not decode goes to the dead letters.
    #[allow(clippy::type_complexity)]
    fn decode(&self, batch: &[Incoming]) -> (BTreeMap<TicketId, Vec<Accepted>>, Vec<(i32, i64, Vec<u8>, String)>) {
        let mut by_ticket: BTreeMap<TicketId, Vec<Accepted>> = BTreeMap::new();
        let mut dead = Vec::new();
        for incoming in batch {
            let decoded =
                ChangeRecord::decode(&incoming.payload, self.record_bytes_max).map_err(|e| e.to_string()).and_then(
                    |record| ReceivedChange::decode(&record.change).map(|r| (record, r)).map_err(|e| e.to_string()),
                );
            match decoded {
                Ok((record, received)) => by_ticket.entry(record.ticket).or_default().push(Accepted {
                    partition: incoming.partition,
                    offset: incoming.offset,
                    record,
                    received,
                }),
                Err(error) => dead.push((incoming.partition, incoming.offset, incoming.payload.clone(), error)),
            }
        }
        (by_ticket, dead)
    }
}

/// Merges every ticket's records into its stored document, on `mergers`.
async fn merge_all(
    mergers: &Arc<rayon::ThreadPool>,
    by_ticket: BTreeMap<TicketId, Vec<Accepted>>,
    mut stored: HashMap<String, StoredTicket>,
    replica: &ActorId,
) -> Result<Vec<(TicketId, (MergedTicket, Vec<Accepted>))>, StoreError> {
    let work: Vec<(TicketId, Option<StoredTicket>, Vec<Accepted>)> =
        by_ticket.into_iter().map(|(id, records)| (id, stored.remove(&id.to_string()), records)).collect();
    let (replica, mergers) = (replica.clone(), Arc::clone(mergers));
    tokio::task::spawn_blocking(move || {
        mergers.install(|| {
            work.into_par_iter()
                .map(|(id, doc, records)| {
                    let merged = merge_ticket(id, doc, &records, &replica);
                    (id, (merged, records))
                })
                .collect()
        })
    })
    .await
    .map_err(|e| StoreError::Task(format!("merge: {e}")))
}

/// Writes a round, in the order the feeds rely on.
struct Writer {
    db: Db,
    cache: Option<Cache>,
    replica: ActorId,
    mergers: Arc<rayon::ThreadPool>,
    /// A round's Redis invalidation failed: the next one retires everything cached.
    owes_invalidation: bool,
}

impl Writer {
    async fn write(&mut self, round: &Round) -> Result<(), StoreError> {
        let started = Instant::now();
        for (partition, offset, record, error) in &round.dead {
            tracing::error!(partition, offset, %error, "record not projected; kept in dead_letters");
            self.db.dead_letter(*partition, *offset, record, error, now_ms()).await?;
        }
        self.db.insert_pages(&round.pages).await?;
        let paged = started.elapsed();
        self.write_tickets(round.writes.clone(), &round.records_of).await?;
        let written = started.elapsed();
        let watermarks: Vec<(i32, i64)> = round.ranges.iter().map(|(&p, &(_, last))| (p, last)).collect();
        self.db.raise_watermarks(&watermarks).await?;
        self.announce(Projected { watermarks, tickets: round.notices.clone() }).await;
        tracing::debug!(
            round = round.number,
            pages_ms = paged.as_millis() as u64,
            tickets_ms = (written - paged).as_millis() as u64,
            rest_ms = (started.elapsed() - written).as_millis() as u64,
            "wrote a round"
        );
        Ok(())
    }

    /// Writes tickets; those another projector moved on meanwhile are read
    /// again and merged again. Their new changes are already in pages.
    async fn write_tickets(
        &self,
        mut writes: Vec<TicketWrite>,
        records_of: &HashMap<TicketId, Vec<Accepted>>,
    ) -> Result<(), StoreError> {
        for _ in 0..CONFLICT_ROUNDS_MAX {
            let conflicts = self.db.write_tickets(writes).await?;
            if conflicts.is_empty() {
                return Ok(());
            }
            tracing::info!(tickets = conflicts.len(), "tickets changed under the projector; merging again");
            let stored: HashMap<String, StoredTicket> =
                self.db.stored_tickets(&conflicts).await?.into_iter().map(|doc| (doc.id.clone(), doc)).collect();
            let again: BTreeMap<TicketId, Vec<Accepted>> = conflicts
                .iter()
                .filter_map(|id| id.parse::<TicketId>().ok())
                .filter_map(|id| records_of.get(&id).map(|r| (id, r.clone())))
                .collect();
            writes = Vec::new();
            for (_, (merged, _)) in merge_all(&self.mergers, again, stored, &self.replica).await? {
                writes.extend(merged.write);
            }
        }
        Err(StoreError::Unavailable("tickets keep changing under the projector; the round is retried".into()))
    }

    /// Invalidates the cache and notifies the bridges; Redis is optional, so
    /// a failure is remembered and made up for by the next round.
    async fn announce(&mut self, round: Projected) {
        let Some(cache) = &self.cache else { return };
        match cache.projected(&round, self.owes_invalidation).await {
            Ok(()) => self.owes_invalidation = false,
            Err(error) => {
                if !self.owes_invalidation {
                    tracing::warn!(%error, "redis unreachable: cached reads expire by themselves, bridges poll");
                }
                self.owes_invalidation = true;
            }
        }
    }
}

/// Merges one ticket's records (in offset order) into its stored document.
fn merge_ticket(id: TicketId, stored: Option<StoredTicket>, records: &[Accepted], replica: &ActorId) -> MergedTicket {
    if let Some(created) = created_alone(id, stored.as_ref(), records) {
        return created;
    }
    let dead_all = |error: String| MergedTicket {
        write: None,
        new: Vec::new(),
        notice: None,
        dead: records.iter().map(|r| (r.partition, r.offset, r.record.encode(), error.clone())).collect(),
    };
    let (mut document, version, held_before) = match &stored {
        Some(doc) => match TicketDocument::load(&doc.document, replica.clone()) {
            Ok(document) => (document, doc.v, doc.held.clone()),
            Err(error) => return dead_all(format!("the stored document of {id} does not load: {error}")),
        },
        None => (TicketDocument::empty(replica.clone()), 0, Vec::new()),
    };
    let mut changes: Vec<ReceivedChange> =
        held_before.iter().filter_map(|bytes| ReceivedChange::decode(bytes).ok()).collect();
    changes.extend(records.iter().map(|r| r.received.clone()));
    let merged = match document.merge_accepted(changes) {
        Ok(merged) => merged,
        Err(error) => return dead_all(format!("the records of {id} do not merge: {error}")),
    };
    let held: Vec<serde_bytes::ByteBuf> =
        merged.held.iter().map(|change| serde_bytes::ByteBuf::from(change.bytes().to_vec())).collect();
    if merged.new.is_empty() && held == held_before {
        // Seen before (a replay, or a round repeated after a crash): nothing to write.
        return MergedTicket { write: None, new: Vec::new(), notice: None, dead: Vec::new() };
    }
    if stored.is_none() && merged.new.is_empty() {
        return dead_all(format!("the first change of {id} was never projected"));
    }
    let row = match TicketRow::of(&mut document) {
        Ok(row) => row,
        Err(error) => return dead_all(format!("ticket {id} does not materialize: {error}")),
    };
    let new: Vec<&Accepted> =
        records.iter().filter(|r| merged.new.iter().any(|hash| hash == r.received.hash())).collect();
    written(id, version, &row.ticket, &row.json, row.document, held, &new)
}

/// A ticket created by its first change alone, in this round: the bridge
/// that accepted the change materialized it already (the record carries
/// the JSON) and the change's bytes load as the whole document, so neither
/// is done again here. Materializing is most of a merge's cost, and
/// creation is the commonest change. `None` when this does not apply.
fn created_alone(id: TicketId, stored: Option<&StoredTicket>, records: &[Accepted]) -> Option<MergedTicket> {
    let [record] = records else { return None };
    let json = record.record.created.as_deref().filter(|_| stored.is_none() && record.received.is_root())?;
    let ticket: Ticket = serde_json::from_str(json).ok()?;
    if ticket.id != id || ticket.ward != record.record.ward {
        return None;
    }
    Some(written(id, 0, &ticket, json, record.record.change.clone(), Vec::new(), &[record]))
}

/// The write, page entries and notice of a ticket merged to `ticket`.
pub(crate) fn written(
    id: TicketId,
    version: i64,
    ticket: &Ticket,
    json: &str,
    document: Vec<u8>,
    held: Vec<serde_bytes::ByteBuf>,
    new: &[&Accepted],
) -> MergedTicket {
    let new = new
        .iter()
        .map(|r| {
            let origin = match &r.record.origin {
                Origin::Node(node) => Some(node.as_str().to_owned()),
                Origin::Pharmacy => None,
            };
            NewChange {
                ward: r.record.ward.as_str().to_owned(),
                partition: r.partition,
                origin,
                offset: r.offset,
                change: PageChange { ticket: id.to_string(), change: r.record.change.clone() },
            }
        })
        .collect();
    let notice = RawValue::from_string(json.to_owned()).ok().map(|json| ProjectedTicket {
        id: id.to_string(),
        ward: ticket.ward.as_str().to_owned(),
        ticket: json,
    });
    let doc = TicketDoc {
        id: id.to_string(),
        v: version + 1,
        ward: ticket.ward.as_str().to_owned(),
        status: ticket.status.as_str().to_owned(),
        priority: ticket.priority.as_str().to_owned(),
        priority_rank: ticket.priority as i32,
        created_at: ticket.created_at,
        updated_at: ticket.updated_at,
        conflicts: i32::try_from(ticket.open_conflicts()).unwrap_or(i32::MAX),
        ticket: json.to_owned(),
        document,
        held,
        backorders: i32::try_from(ticket.open_backorders().count()).unwrap_or(i32::MAX),
        m: TICKET_JSON_VERSION as i64,
    };
    MergedTicket { write: Some(TicketWrite { expected_v: version, doc }), new, notice, dead: Vec::new() }
}

/// The round's feed pages: per ward, partition and origin, its new changes
/// in offset order, split to bounded pages that together cover the round's
/// whole offset range of the partition.
fn pages(mut new: Vec<NewChange>, ranges: &BTreeMap<i32, (i64, i64)>) -> Vec<PageDoc> {
    new.sort_by(|a, b| a.key().cmp(&b.key()));
    let round_range = |partition: i32, offset: i64| ranges.get(&partition).copied().unwrap_or((offset, offset));
    let mut pages: Vec<PageDoc> = Vec::new();
    let mut open: Option<PageDoc> = None;
    let mut open_bytes = 0usize;
    for NewChange { ward, partition, origin, offset, change } in new {
        let same_stream =
            open.as_ref().is_some_and(|page| page.ward == ward && page.p == partition && page.origin == origin);
        let full = open_bytes + change.change.len() > PAGE_BYTES_MAX
            || open.as_ref().is_some_and(|page| page.changes.len() >= PAGE_CHANGES_MAX);
        if !same_stream || full {
            let first = match (&open, same_stream) {
                (Some(previous), true) => previous.last + 1,
                _ => round_range(partition, offset).0,
            };
            if let Some(mut page) = open.take() {
                if !same_stream {
                    page.last = round_range(page.p, page.last).1;
                }
                pages.push(page);
            }
            open = Some(PageDoc {
                id: mongodb::bson::oid::ObjectId::new(),
                ward,
                p: partition,
                origin,
                first,
                last: offset,
                n: 0,
                changes: Vec::new(),
            });
            open_bytes = 0;
        }
        let page = open.as_mut().expect("a page is open");
        page.last = offset;
        page.n += 1;
        open_bytes += change.change.len();
        page.changes.push(change);
    }
    if let Some(mut page) = open.take() {
        page.last = round_range(page.p, page.last).1;
        pages.push(page);
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ticket's first change, as a record a bridge appends (with or
    /// without the ticket it materialized).
    fn creation(materialized: bool) -> (TicketId, Accepted) {
        use sync_protocol::ticket::{Actor, NewTicket};
        let actor = Actor {
            user: "n.okafor".parse().unwrap(),
            role: sync_protocol::ids::Role::Nurse,
            device: "edge-ward-4b".parse().unwrap(),
            offline_login: false,
        };
        let new: NewTicket = serde_json::from_value(serde_json::json!({
            "items": [{ "medication_code": "AMOX-500", "quantity": 20, "unit": "capsule" }],
            "priority": "stat", "notes": "ALLERGY: PENICILLIN"
        }))
        .unwrap();
        let id = TicketId::new(1_764_000_000_000, [9; 10]);
        let ward = "ward-4b".parse().unwrap();
        let created =
            TicketDocument::create(id, &ward, &new, &actor, 1_764_000_000_000, &Default::default(), ActorId::random())
                .unwrap();
        let record = ChangeRecord {
            ticket: id,
            ward,
            origin: Origin::Node("edge-ward-4b".parse().unwrap()),
            created: materialized.then(|| serde_json::to_string(&created.ticket).unwrap()),
            change: created.change.clone(),
        };
        let received = ReceivedChange::decode(&created.change).unwrap();
        (id, Accepted { partition: 0, offset: 7, record, received })
    }

    #[test]
    fn a_ticket_created_alone_is_written_as_a_full_merge_would_write_it() {
        let replica = ActorId::random();
        let (id, fast) = creation(true);
        let (_, slow) = creation(false);
        let fast = merge_ticket(id, None, &[fast], &replica).write.unwrap().doc;
        let slow = merge_ticket(id, None, &[slow], &replica).write.unwrap().doc;
        assert_eq!(
            (&fast.ticket, &fast.status, fast.priority_rank, fast.created_at, fast.v),
            (&slow.ticket, &slow.status, slow.priority_rank, slow.created_at, slow.v)
        );
        let load = |bytes: &[u8]| TicketDocument::load(bytes, ActorId::random()).unwrap().ticket().unwrap();
        assert_eq!(load(&fast.document), load(&slow.document), "the change's bytes load as the document");
    }

    fn change(ward: &str, partition: i32, offset: i64, origin: Option<&str>) -> NewChange {
        NewChange {
            ward: ward.into(),
            partition,
            origin: origin.map(str::to_owned),
            offset,
            change: PageChange { ticket: "t".into(), change: vec![0; 10] },
        }
    }

    #[test]
    fn pages_cover_the_rounds_whole_range_of_each_partition_per_origin() {
        let ranges = BTreeMap::from([(0, (100, 199)), (1, (50, 80))]);
        let mut new = Vec::new();
        for offset in (100..=190).step_by(10) {
            new.push(change("ward-a", 0, offset, Some("edge-a")));
        }
        new.push(change("ward-a", 0, 155, None));
        new.push(change("ward-a", 1, 60, Some("edge-a")));
        new.push(change("ward-b", 0, 150, Some("edge-b")));
        let pages = pages(new, &ranges);
        let spans: Vec<String> = pages
            .iter()
            .map(|p| {
                format!(
                    "{} p{} {} {}..={} n{}",
                    p.ward,
                    p.p,
                    p.origin.as_deref().unwrap_or("pharmacy"),
                    p.first,
                    p.last,
                    p.n
                )
            })
            .collect();
        assert_eq!(
            spans,
            [
                "ward-a p0 pharmacy 100..=199 n1",
                "ward-a p0 edge-a 100..=199 n10",
                "ward-a p1 edge-a 50..=80 n1",
                "ward-b p0 edge-b 100..=199 n1",
            ]
        );
    }

    #[test]
    fn a_large_round_splits_into_contiguous_pages() {
        let ranges = BTreeMap::from([(0, (0, 999))]);
        let new: Vec<_> = (0..600).map(|offset| change("ward-a", 0, offset, Some("edge-a"))).collect();
        let pages = pages(new, &ranges);
        let spans: Vec<(i64, i64, i32)> = pages.iter().map(|p| (p.first, p.last, p.n)).collect();
        assert_eq!(spans, vec![(0, 255, 256), (256, 511, 256), (512, 999, 88)]);
    }
}
