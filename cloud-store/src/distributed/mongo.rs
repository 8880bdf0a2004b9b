//! The distributed store's MongoDB collections, their documents and the
//! queries on them. The projector writes tickets, feed pages and
//! watermarks; bridges read them and write what they own (node positions,
//! rejections).
//!
//! | collection         | one document per                    | written by |
//! |--------------------|-------------------------------------|------------|
//! | `tickets`          | ticket: saved Automerge document, materialized fields, version `v` | projector |
//! | `feed_pages`       | ward, partition and projector round: the changes new to their tickets | projector |
//! | `watermarks`       | partition: the last offset projected (`projected_to`) | projector |
//! | `nodes`            | edge node: upstream position, last seen, rejections, cursor | bridges |
//! | `rejected_changes` | refused upstream change             | bridges |
//! | `dead_letters`     | record the projector could not use  | projector |

use futures_util::TryStreamExt;
use mongodb::bson::{self, Bson, Document, doc, oid::ObjectId};
use mongodb::error::ErrorKind;
use mongodb::options::{ReturnDocument, WriteConcern};
use mongodb::{Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};
use service_kit::cloud::MongoConfig;
use sync_protocol::admission::NodeLease;

use crate::StoreError;

/// MongoDB's code for a duplicate key.
const DUPLICATE_KEY: i32 = 11_000;
/// Ids in one `$in` query: some servers' cost grows with the square of the
/// list (measured on SecantusDB: 200 ids 47 ms, 2,000 ids 2.9 s).
const IDS_PER_QUERY: usize = 200;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TicketDoc {
    #[serde(rename = "_id")]
    pub id: String,
    /// Bumped by every write: a projector writes only over the version it
    /// read, so two projectors of one partition (during a rebalance) cannot
    /// overwrite each other's merges.
    pub v: i64,
    pub ward: String,
    pub status: String,
    pub priority: String,
    pub priority_rank: i32,
    pub created_at: i64,
    pub updated_at: i64,
    pub conflicts: i32,
    /// The materialized ticket, as JSON (what the API serves).
    pub ticket: String,
    #[serde(with = "serde_bytes")]
    pub document: Vec<u8>,
    /// Accepted changes waiting for changes they depend on.
    #[serde(default)]
    pub held: Vec<serde_bytes::ByteBuf>,
    /// Lines still owed (backordered), for the queue's filter.
    #[serde(default)]
    pub backorders: i32,
    /// The shape `ticket` was written in (`document::TICKET_JSON_VERSION`);
    /// 0 for tickets written before it was recorded.
    #[serde(default)]
    pub m: i64,
}

/// What merging into a ticket needs of it: its version and its documents.
#[derive(Debug, Clone, Deserialize)]
pub struct StoredTicket {
    #[serde(rename = "_id")]
    pub id: String,
    pub v: i64,
    #[serde(with = "serde_bytes")]
    pub document: Vec<u8>,
    #[serde(default)]
    pub held: Vec<serde_bytes::ByteBuf>,
}

/// Changes new to their tickets, of one ward, from one partition and one
/// origin, projected in one round. `first..=last` is the round's offset
/// range in the partition, so a reader that has every page of its ward up
/// to `last` (but its own) has every change it lacks up to that offset.
/// Pages are split by origin so a node's feed never reads its own changes
/// back (a busy ward's edge would otherwise pull all it sent).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PageDoc {
    #[serde(rename = "_id")]
    pub id: ObjectId,
    pub ward: String,
    pub p: i32,
    /// The node the changes came from; `None` for the pharmacy.
    pub origin: Option<String>,
    pub first: i64,
    pub last: i64,
    /// Number of changes (for backlog counts without reading them).
    pub n: i32,
    pub changes: Vec<PageChange>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PageChange {
    pub ticket: String,
    #[serde(with = "serde_bytes")]
    pub change: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WatermarkDoc {
    #[serde(rename = "_id")]
    partition: i32,
    projected_to: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeDoc {
    #[serde(rename = "_id")]
    pub node: String,
    pub ward: String,
    pub acked_up_to: i64,
    pub last_seen: i64,
    #[serde(default)]
    pub rejected: i64,
    #[serde(default)]
    pub cursor: Option<Vec<i64>>,
    /// Which database speaks for the node (`admission::NodeLease`).
    #[serde(default)]
    pub admission: Option<NodeLease>,
    /// How many times `admission` was written: a hello's write applies only
    /// over the version it read, so two bridges cannot both admit one node.
    #[serde(default)]
    pub admitted: i64,
    /// Per partition, the offset up to which the node's feed sends its own
    /// changes back (set when a database took the node over).
    #[serde(default)]
    pub own_until: Option<Vec<i64>>,
    #[serde(default)]
    pub taken_over_at: Option<i64>,
    /// The bridge instance with a session of the node open, while it
    /// renews this (see `DistributedStore::keep_present`).
    #[serde(default)]
    pub presence: Option<Presence>,
    /// Another instance refused a copy of the node's database: the one with
    /// the session open gives it a new lease.
    #[serde(default)]
    pub renew_requested: bool,
}

/// What a hello (or a lease update) writes of a node.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionWrite<'a> {
    pub ward: &'a str,
    pub record: &'a NodeLease,
    /// For a takeover: the offsets up to which its feed sends its own changes back.
    pub own_until: Option<&'a [i64]>,
    /// For an admitted hello: its session's presence.
    pub presence: Option<&'a Presence>,
}

/// A node's session, open on bridge instance `bridge` until `until` (ms)
/// unless renewed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Presence {
    pub bridge: String,
    pub until: i64,
}

/// The reply of an `update` command.
#[derive(Debug, Deserialize)]
struct UpdateReply {
    #[serde(default, rename = "writeErrors")]
    write_errors: Vec<StatementError>,
    #[serde(default, rename = "writeConcernError")]
    write_concern_error: Option<Document>,
}

#[derive(Debug, Deserialize)]
struct StatementError {
    index: usize,
    code: i32,
    #[serde(default)]
    errmsg: String,
}

/// The part of a ticket the queue shows.
#[derive(Debug, Clone, Deserialize)]
struct QueueRow {
    ticket: String,
}

/// A page's position and size, for backlog counts.
#[derive(Debug, Clone, Deserialize)]
struct PageSize {
    p: i32,
    last: i64,
    n: i32,
}

pub fn mongo_error(error: mongodb::error::Error) -> StoreError {
    match *error.kind {
        ErrorKind::BsonDeserialization(_) | ErrorKind::BsonSerialization(_) => {
            StoreError::Corrupt(format!("mongodb document: {error}"))
        }
        _ => StoreError::Unavailable(format!("mongodb: {error}")),
    }
}

/// The positions of an unordered `insert_many`'s documents that failed as
/// duplicate keys; any other failure is an error.
fn duplicates<T>(outcome: mongodb::error::Result<T>) -> Result<Vec<usize>, StoreError> {
    let Err(error) = outcome else { return Ok(Vec::new()) };
    match &*error.kind {
        ErrorKind::InsertMany(failure)
            if failure.write_concern_error.is_none()
                && failure.write_errors.iter().flatten().all(|e| e.code == DUPLICATE_KEY) =>
        {
            Ok(failure.write_errors.iter().flatten().map(|e| e.index).collect())
        }
        _ => Err(mongo_error(error)),
    }
}

/// A write of a ticket over the version it was read at (`0`: a new ticket).
#[derive(Debug, Clone)]
pub struct TicketWrite {
    pub expected_v: i64,
    pub doc: TicketDoc,
}

#[derive(Debug, Clone)]
pub struct Db {
    database: Database,
    write_concern: WriteConcern,
    tickets: Collection<TicketDoc>,
    pages: Collection<PageDoc>,
    watermarks: Collection<WatermarkDoc>,
    nodes: Collection<NodeDoc>,
    projectors: Collection<Document>,
    rejected: Collection<Document>,
    dead_letters: Collection<Document>,
    formulary: Collection<Document>,
}

impl Db {
    /// A handle on the database; connects lazily, so a bridge starts (not
    /// ready) while MongoDB is down.
    pub async fn connect(config: &MongoConfig, app_name: &str) -> Result<Self, StoreError> {
        let database = service_kit::cloud::mongo_database(config, app_name).await?;
        // Raw commands name it; the collections inherit it from the database.
        let write_concern = database.write_concern().cloned().unwrap_or_default();
        let collection = |name: &str| database.collection::<Document>(name);
        Ok(Self {
            tickets: collection("tickets").clone_with_type(),
            pages: collection("feed_pages").clone_with_type(),
            watermarks: collection("watermarks").clone_with_type(),
            nodes: collection("nodes").clone_with_type(),
            projectors: collection("projectors"),
            rejected: collection("rejected_changes"),
            dead_letters: collection("dead_letters"),
            formulary: collection("formulary"),
            database,
            write_concern,
        })
    }

    /// The indexes of the pharmacy queue and the wards' feeds.
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let index = |keys: Document, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(mongodb::options::IndexOptions::builder().name(name.to_owned()).build())
                .build()
        };
        self.tickets
            .create_indexes([
                index(doc! { "priority_rank": -1, "created_at": 1, "_id": 1 }, "queue"),
                index(doc! { "ward": 1, "status": 1 }, "ward_status"),
                index(doc! { "ward": 1, "updated_at": 1 }, "ward_trail"),
            ])
            .await
            .map_err(mongo_error)?;
        self.pages
            .create_indexes([
                index(doc! { "ward": 1, "p": 1, "last": 1, "_id": 1 }, "feed"),
                index(doc! { "p": 1, "last": 1 }, "progress"),
            ])
            .await
            .map_err(mongo_error)?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.database
            .run_command(doc! { "ping": 1 })
            .await
            .map(|_| ())
            .map_err(|_| StoreError::Unavailable("mongodb is not answering".into()))
    }

    /// What merging into ticket `id` needs, if it is stored.
    pub async fn stored_ticket(&self, id: &str) -> Result<Option<StoredTicket>, StoreError> {
        Ok(self.stored_tickets(&[id.to_owned()]).await?.pop())
    }

    /// What merging into tickets `ids` needs, of those stored.
    pub async fn stored_tickets(&self, ids: &[String]) -> Result<Vec<StoredTicket>, StoreError> {
        let stored = self.tickets.clone_with_type::<StoredTicket>();
        let mut found = Vec::new();
        for chunk in ids.chunks(IDS_PER_QUERY) {
            let cursor = stored
                .find(doc! { "_id": { "$in": chunk } })
                .projection(doc! { "v": 1, "document": 1, "held": 1 })
                .await
                .map_err(mongo_error)?;
            found.extend(cursor.try_collect::<Vec<_>>().await.map_err(mongo_error)?);
        }
        Ok(found)
    }

    /// Tickets `ids` as stored, of those that are.
    pub async fn tickets(&self, ids: &[String]) -> Result<Vec<TicketDoc>, StoreError> {
        let mut found = Vec::new();
        for chunk in ids.chunks(IDS_PER_QUERY) {
            let cursor = self.tickets.find(doc! { "_id": { "$in": chunk } }).await.map_err(mongo_error)?;
            found.extend(cursor.try_collect::<Vec<_>>().await.map_err(mongo_error)?);
        }
        Ok(found)
    }

    /// Up to `limit` tickets whose JSON is of a shape older than `version`,
    /// as a merge reads them.
    pub async fn stale_tickets(&self, version: i64, limit: usize) -> Result<Vec<StoredTicket>, StoreError> {
        let stored = self.tickets.clone_with_type::<StoredTicket>();
        let filter = doc! { "$or": [{ "m": { "$exists": false } }, { "m": { "$lt": version } }] };
        let cursor = stored
            .find(filter)
            .projection(doc! { "v": 1, "document": 1, "held": 1 })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(mongo_error)?;
        cursor.try_collect().await.map_err(mongo_error)
    }

    /// The documents of `ward`'s tickets with changes in `from..=to` (ms),
    /// oldest first; at most `limit`.
    pub async fn ward_documents(
        &self,
        ward: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let stored = self.tickets.clone_with_type::<StoredTicket>();
        let filter = doc! { "ward": ward, "updated_at": { "$gte": from }, "created_at": { "$lte": to } };
        let cursor = stored
            .find(filter)
            .projection(doc! { "v": 1, "document": 1, "held": 1 })
            .sort(doc! { "created_at": 1, "_id": 1 })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(mongo_error)?;
        let found: Vec<StoredTicket> = cursor.try_collect().await.map_err(mongo_error)?;
        Ok(found.into_iter().map(|ticket| ticket.document).collect())
    }

    /// Adds or replaces a catalogue entry (JSON, by code); whether it was new.
    pub async fn put_medication(&self, code: &str, entry: &str, now: i64) -> Result<bool, StoreError> {
        let result = self
            .formulary
            .update_one(doc! { "_id": code }, doc! { "$set": { "entry": entry, "updated_at": now } })
            .upsert(true)
            .await
            .map_err(mongo_error)?;
        Ok(result.upserted_id.is_some())
    }

    /// The catalogue's entries (JSON) for `codes` (all of it for `None`),
    /// by code, and how many entries it has.
    pub async fn formulary(&self, codes: Option<&[String]>) -> Result<(Vec<String>, u64), StoreError> {
        let size = self.formulary.count_documents(doc! {}).await.map_err(mongo_error)?;
        let filter = codes.map_or_else(|| doc! {}, |codes| doc! { "_id": { "$in": codes } });
        let cursor = self.formulary.find(filter).sort(doc! { "_id": 1 }).await.map_err(mongo_error)?;
        let documents: Vec<Document> = cursor.try_collect().await.map_err(mongo_error)?;
        documents
            .iter()
            .map(|d| {
                d.get_str("entry").map(str::to_owned).map_err(|e| StoreError::Corrupt(format!("formulary entry: {e}")))
            })
            .collect::<Result<_, _>>()
            .map(|entries| (entries, size))
    }

    /// The pharmacy queue (priority, then age) and how many tickets match.
    pub async fn queue(
        &self,
        wards: &[String],
        statuses: &[String],
        priorities: &[String],
        open_backorders: bool,
        limit: usize,
    ) -> Result<(Vec<String>, u64), StoreError> {
        let mut filter = Document::new();
        for (field, values) in [("ward", wards), ("status", statuses), ("priority", priorities)] {
            if !values.is_empty() {
                filter.insert(field, doc! { "$in": values });
            }
        }
        if open_backorders {
            filter.insert("backorders", doc! { "$gt": 0 });
        }
        let rows: Vec<QueueRow> = self
            .tickets
            .clone_with_type::<QueueRow>()
            .find(filter.clone())
            .projection(doc! { "ticket": 1, "_id": 0 })
            .sort(doc! { "priority_rank": -1, "created_at": 1, "_id": 1 })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(mongo_error)?
            .try_collect()
            .await
            .map_err(mongo_error)?;
        let total = self.tickets.count_documents(filter).await.map_err(mongo_error)?;
        Ok((rows.into_iter().map(|row| row.ticket).collect(), total))
    }

    /// Writes tickets, each only over the version it was read at. Returns
    /// the ids whose stored version had moved on (to be merged again).
    ///
    /// New tickets are inserted (`insert`), stored ones replaced (`update`
    /// with many statements). Both are the classic commands every MongoDB
    /// version has; the newer `bulkWrite` command (8.0 and later) measured
    /// a third slower here. Another projector's write in between fails a
    /// statement as a duplicate key: an insert hits the `_id`, and so does
    /// the insert an upsert on `{_id, v}` falls back to when `v` moved on.
    pub async fn write_tickets(&self, writes: Vec<TicketWrite>) -> Result<Vec<String>, StoreError> {
        let (new, stored): (Vec<TicketWrite>, Vec<TicketWrite>) = writes.into_iter().partition(|w| w.expected_v == 0);
        let mut conflicts = self.insert_tickets(new).await?;
        conflicts.extend(self.replace_tickets(stored).await?);
        Ok(conflicts)
    }

    async fn insert_tickets(&self, writes: Vec<TicketWrite>) -> Result<Vec<String>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = writes.iter().map(|w| w.doc.id.clone()).collect();
        let documents: Vec<&TicketDoc> = writes.iter().map(|w| &w.doc).collect();
        let duplicates = duplicates(self.tickets.insert_many(documents).ordered(false).await)?;
        Ok(duplicates.into_iter().filter_map(|index| ids.get(index).cloned()).collect())
    }

    async fn replace_tickets(&self, writes: Vec<TicketWrite>) -> Result<Vec<String>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(writes.len());
        let mut statements = Vec::with_capacity(writes.len());
        for TicketWrite { expected_v, doc } in writes {
            let replacement = bson::to_document(&doc).map_err(|e| StoreError::Encode(e.to_string()))?;
            statements.push(doc! { "q": { "_id": &doc.id, "v": expected_v }, "u": replacement, "upsert": true });
            ids.push(doc.id);
        }
        let command = doc! {
            "update": self.tickets.name(),
            "updates": statements,
            "ordered": false,
            "writeConcern": bson::to_bson(&self.write_concern).map_err(|e| StoreError::Encode(e.to_string()))?,
        };
        let reply: UpdateReply = bson::from_document(self.database.run_command(command).await.map_err(mongo_error)?)
            .map_err(|e| StoreError::Unavailable(format!("mongodb: unreadable update reply: {e}")))?;
        if let Some(error) = reply.write_concern_error {
            return Err(StoreError::Unavailable(format!("mongodb write concern: {error}")));
        }
        let mut conflicts = Vec::new();
        for error in reply.write_errors {
            if error.code != DUPLICATE_KEY {
                return Err(StoreError::Unavailable(format!("mongodb: ticket write failed: {}", error.errmsg)));
            }
            conflicts.extend(ids.get(error.index).cloned());
        }
        Ok(conflicts)
    }

    /// Inserts a round's pages. A page already there (same id: an earlier
    /// attempt at this round wrote it before failing) is left as it is.
    pub async fn insert_pages(&self, pages: &[PageDoc]) -> Result<(), StoreError> {
        if pages.is_empty() {
            return Ok(());
        }
        duplicates(self.pages.insert_many(pages).ordered(false).await).map(|_| ())
    }

    /// Raises the projected offsets of partitions (never lowers them), in one command.
    pub async fn raise_watermarks(&self, raised: &[(i32, i64)]) -> Result<(), StoreError> {
        if raised.is_empty() {
            return Ok(());
        }
        let statements: Vec<Document> = raised
            .iter()
            .map(|&(partition, last)| {
                doc! { "q": { "_id": partition }, "u": { "$max": { "projected_to": last } }, "upsert": true }
            })
            .collect();
        let command = doc! {
            "update": self.watermarks.name(),
            "updates": statements,
            "ordered": false,
            "writeConcern": bson::to_bson(&self.write_concern).map_err(|e| StoreError::Encode(e.to_string()))?,
        };
        let reply: UpdateReply = bson::from_document(self.database.run_command(command).await.map_err(mongo_error)?)
            .map_err(|e| StoreError::Unavailable(format!("mongodb: unreadable update reply: {e}")))?;
        match (reply.write_errors.first(), reply.write_concern_error) {
            (None, None) => Ok(()),
            (Some(error), _) => {
                Err(StoreError::Unavailable(format!("mongodb: watermark not raised: {}", error.errmsg)))
            }
            (None, Some(error)) => Err(StoreError::Unavailable(format!("mongodb write concern: {error}"))),
        }
    }

    /// The last offset projected of each of `partitions` partitions (`-1`: none).
    pub async fn watermarks(&self, partitions: usize) -> Result<Vec<i64>, StoreError> {
        let docs: Vec<WatermarkDoc> =
            self.watermarks.find(doc! {}).await.map_err(mongo_error)?.try_collect().await.map_err(mongo_error)?;
        let mut marks = vec![-1; partitions];
        for mark in docs {
            if let Some(slot) = usize::try_from(mark.partition).ok().and_then(|p| marks.get_mut(p)) {
                *slot = mark.projected_to;
            }
        }
        Ok(marks)
    }

    /// Pages with `last` in `(after, up_to]` of each `(partition, after,
    /// up_to)`, of `ward` or (`None`) of every ward, in partition and offset
    /// order; at most `limit`. With a `reader`, its own pages are left out
    /// but for those up to its `own_until` offsets (see `FeedState`).
    pub async fn pages(
        &self,
        ward: Option<&str>,
        ranges: &[(usize, i64, i64)],
        reader: Option<(&str, &[i64])>,
        limit: usize,
    ) -> Result<Vec<PageDoc>, StoreError> {
        let mut alternatives: Vec<Document> = Vec::new();
        for &(p, after, up_to) in ranges {
            let Some((node, own_until)) = reader else {
                alternatives.push(doc! { "p": p as i32, "last": { "$gt": after, "$lte": up_to } });
                continue;
            };
            alternatives
                .push(doc! { "p": p as i32, "last": { "$gt": after, "$lte": up_to }, "origin": { "$ne": node } });
            let echo_up_to = own_until.get(p).copied().unwrap_or(-1).min(up_to);
            if echo_up_to > after {
                alternatives.push(doc! { "p": p as i32, "last": { "$gt": after, "$lte": echo_up_to }, "origin": node });
            }
        }
        if alternatives.is_empty() {
            return Ok(Vec::new());
        }
        let mut filter = doc! { "$or": alternatives };
        if let Some(ward) = ward {
            filter.insert("ward", ward);
        }
        self.pages
            .find(filter)
            .sort(doc! { "p": 1, "last": 1, "_id": 1 })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(mongo_error)?
            .try_collect()
            .await
            .map_err(mongo_error)
    }

    /// Changes of `ward` in pages after `cursor`, counting at most `pages_max` pages.
    pub async fn backlog(&self, ward: &str, cursor: &[i64], pages_max: usize) -> Result<u64, StoreError> {
        let sizes: Vec<PageSize> = self
            .pages
            .clone_with_type::<PageSize>()
            .find(doc! { "ward": ward })
            .projection(doc! { "p": 1, "last": 1, "n": 1, "_id": 0 })
            .sort(doc! { "p": 1, "last": -1 })
            .limit(i64::try_from(pages_max).unwrap_or(i64::MAX))
            .await
            .map_err(mongo_error)?
            .try_collect()
            .await
            .map_err(mongo_error)?;
        let after = |p: i32| usize::try_from(p).ok().and_then(|p| cursor.get(p)).copied().unwrap_or(-1);
        Ok(sizes.iter().filter(|page| page.last > after(page.p)).map(|page| page.n.max(0) as u64).sum())
    }

    pub async fn node(&self, node: &str) -> Result<Option<NodeDoc>, StoreError> {
        self.nodes.find_one(doc! { "_id": node }).await.map_err(mongo_error)
    }

    pub async fn nodes(&self) -> Result<Vec<NodeDoc>, StoreError> {
        self.nodes
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .await
            .map_err(mongo_error)?
            .try_collect()
            .await
            .map_err(mongo_error)
    }

    /// Records that `node` has handed over a batch up to its sequence
    /// `acked_up_to` (diagnostics), and the changes of it that were refused.
    pub async fn record_upstream(
        &self,
        node: &str,
        ward: &str,
        acked_up_to: u64,
        rejections: &[(u64, String, String)],
        now: i64,
    ) -> Result<(), StoreError> {
        for (seq, ticket, message) in rejections {
            self.rejected
                .replace_one(
                    doc! { "_id": format!("{node}/{seq}") },
                    doc! { "node": node, "seq": *seq as i64, "ticket": ticket, "message": message, "at": now },
                )
                .upsert(true)
                .await
                .map_err(mongo_error)?;
        }
        self.nodes
            .update_one(
                doc! { "_id": node },
                doc! {
                    "$set": {
                        "ward": ward,
                        "last_seen": now,
                        "acked_up_to": i64::try_from(acked_up_to).unwrap_or(i64::MAX),
                    },
                    "$inc": { "rejected": rejections.len() as i64 },
                },
            )
            .upsert(true)
            .await
            .map(|_| ())
            .map_err(mongo_error)
    }

    /// Writes the node's admission record over the version `admitted` it
    /// was read at. `false`: another write came first.
    pub async fn store_admission(
        &self,
        node: &str,
        admitted: i64,
        write: AdmissionWrite<'_>,
        now: i64,
    ) -> Result<bool, StoreError> {
        let AdmissionWrite { ward, record, own_until, presence } = write;
        let filter = match admitted {
            // A record from before admissions has no counter yet.
            0 => doc! { "_id": node, "$or": [{ "admitted": 0 }, { "admitted": { "$exists": false } }] },
            _ => doc! { "_id": node, "admitted": admitted },
        };
        let record = bson::to_bson(record).map_err(|e| StoreError::Encode(e.to_string()))?;
        let mut set = doc! { "ward": ward, "last_seen": now, "admission": record, "admitted": admitted + 1 };
        let mut on_insert = doc! { "rejected": 0_i64 };
        if let Some(presence) = presence {
            set.insert("presence", doc! { "bridge": &presence.bridge, "until": presence.until });
        }
        match own_until {
            // A takeover: a new database numbers its changes from 1.
            Some(own_until) => {
                set.insert("own_until", own_until);
                set.insert("taken_over_at", now);
                set.insert("acked_up_to", 0_i64);
            }
            None => {
                on_insert.insert("acked_up_to", 0_i64);
            }
        }
        let update = doc! { "$set": set, "$setOnInsert": on_insert };
        match self.nodes.update_one(filter, update).upsert(true).await {
            Ok(_) => Ok(true),
            // The upsert found the node under another version and tried to insert it again.
            Err(error) if matches!(&*error.kind, ErrorKind::Write(mongodb::error::WriteFailure::WriteError(e)) if e.code == DUPLICATE_KEY) => {
                Ok(false)
            }
            Err(error) => Err(mongo_error(error)),
        }
    }

    /// Renews `bridge`'s presence for `node` until `until`; returns whether
    /// another instance asked for the node's lease to be renewed.
    pub async fn keep_present(&self, node: &str, bridge: &str, until: i64) -> Result<bool, StoreError> {
        let before = self
            .nodes
            .find_one_and_update(
                doc! { "_id": node, "presence.bridge": bridge },
                doc! { "$set": { "presence.until": until, "renew_requested": false } },
            )
            .return_document(ReturnDocument::Before)
            .await
            .map_err(mongo_error)?;
        Ok(before.is_some_and(|node| node.renew_requested))
    }

    pub async fn request_renewal(&self, node: &str) -> Result<(), StoreError> {
        self.nodes
            .update_one(doc! { "_id": node }, doc! { "$set": { "renew_requested": true } })
            .await
            .map(|_| ())
            .map_err(mongo_error)
    }

    /// Ends `bridge`'s presence for `node`.
    pub async fn leave(&self, node: &str, bridge: &str) -> Result<(), StoreError> {
        self.nodes
            .update_one(doc! { "_id": node, "presence.bridge": bridge }, doc! { "$unset": { "presence": "" } })
            .await
            .map(|_| ())
            .map_err(mongo_error)
    }

    /// Records that projector `id` runs, until `until` (ms) unless renewed.
    pub async fn projector_present(&self, id: &str, until: i64) -> Result<(), StoreError> {
        self.projectors
            .update_one(doc! { "_id": id }, doc! { "$set": { "until": until } })
            .upsert(true)
            .await
            .map(|_| ())
            .map_err(mongo_error)
    }

    /// Ends projector `id`'s presence (it stopped cleanly).
    pub async fn projector_gone(&self, id: &str) -> Result<(), StoreError> {
        self.projectors.delete_one(doc! { "_id": id }).await.map(|_| ()).map_err(mongo_error)
    }

    /// How many projectors are present at `now` (ms).
    pub async fn projectors_present(&self, now: i64) -> Result<u64, StoreError> {
        self.projectors.count_documents(doc! { "until": { "$gt": now } }).await.map_err(mongo_error)
    }

    pub async fn note_cursor(&self, node: &str, cursor: &[i64]) -> Result<(), StoreError> {
        self.nodes
            .update_one(doc! { "_id": node }, doc! { "$set": { "cursor": cursor } })
            .await
            .map(|_| ())
            .map_err(mongo_error)
    }

    /// Keeps a record the projector could not use, so it is never lost
    /// silently: operators find it here, with the reason.
    pub async fn dead_letter(
        &self,
        partition: i32,
        offset: i64,
        record: &[u8],
        error: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.dead_letters
            .replace_one(
                doc! { "_id": format!("{partition}/{offset}") },
                doc! {
                    "partition": partition,
                    "offset": offset,
                    "record": Bson::Binary(bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: record.to_vec() }),
                    "error": error,
                    "at": now,
                },
            )
            .upsert(true)
            .await
            .map(|_| ())
            .map_err(mongo_error)
    }
}
