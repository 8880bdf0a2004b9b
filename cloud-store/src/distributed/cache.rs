//! Redis: a cache of the pharmacy's hot reads, the channel on which the
//! projector tells every bridge instance what it projected, and the one on
//! which a bridge asks the instance holding a node's session to have it
//! take a new lease (a copy of its database knocked elsewhere).
//!
//! Invalidation is by generation, not deletion: a cached value's key holds
//! the generation counters current when it was read, and the projector
//! increments them after its MongoDB writes are acknowledged. A reader that
//! raced a write can only store its stale value under the old generation,
//! which no later reader asks for. The counters:
//!
//! - `{P}:qgen`: bumped by every projected round (any change may move the queue);
//! - `{P:<ticket>}:tgen`: bumped when the ticket changed;
//! - `{P}:epoch`: bumped when a round could not invalidate (Redis was
//!   unreachable from the projector), which retires every cached value.
//!
//! Every value also expires (`cache_ttl_s`), which bounds staleness if
//! Redis loses an increment. Redis is never required: any failure here
//! makes the caller read MongoDB, and the bridges poll for progress.
//! The hash tags (`{...}`) keep each operation's keys in one slot.

use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use service_kit::cloud::{ClientError, RedisConfig};

/// Every Redis request gives up after this: a cache that does not answer
/// must cost a request little more than not having one.
const OPERATION_TIMEOUT: Duration = Duration::from_millis(250);

/// What the projector publishes after each round.
#[derive(Debug, Serialize, Deserialize)]
pub struct Projected {
    /// `(partition, last offset projected)` of the round.
    pub watermarks: Vec<(i32, i64)>,
    pub tickets: Vec<ProjectedTicket>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProjectedTicket {
    pub id: String,
    pub ward: String,
    /// The materialized ticket.
    pub ticket: Box<RawValue>,
}

#[derive(Clone)]
pub struct Cache {
    client: redis::Client,
    connection: ConnectionManager,
    prefix: String,
    ttl_s: u64,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer in time")]
    Timeout,
}

async fn bounded<T>(operation: impl Future<Output = redis::RedisResult<T>>) -> Result<T, CacheError> {
    match tokio::time::timeout(OPERATION_TIMEOUT, operation).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(CacheError::Timeout),
    }
}

impl Cache {
    /// A cache on `config.url`; connects lazily, so Redis may be down now.
    pub fn new(config: &RedisConfig) -> Result<Self, ClientError> {
        let (client, connection) = service_kit::cloud::redis_connection(config, OPERATION_TIMEOUT)?;
        Ok(Self { client, connection, prefix: config.key_prefix.clone(), ttl_s: config.cache_ttl_s })
    }

    fn epoch_key(&self) -> String {
        format!("{{{}}}:epoch", self.prefix)
    }

    fn queue_generation_key(&self) -> String {
        format!("{{{}}}:qgen", self.prefix)
    }

    fn ticket_generation_key(&self, ticket: &str) -> String {
        format!("{{{}:{ticket}}}:tgen", self.prefix)
    }

    pub fn channel(&self) -> String {
        format!("{{{}}}:projected", self.prefix)
    }

    fn renewals_channel(&self) -> String {
        format!("{{{}}}:renew", self.prefix)
    }

    /// Whether a message on `channel` asks for a lease renewal (its payload
    /// is the node id); otherwise it is a projected round.
    pub fn is_renewal(&self, channel: &str) -> bool {
        channel == self.renewals_channel()
    }

    /// Asks every bridge instance to have `node`'s open session take a new lease.
    pub async fn request_renewal(&self, node: &str) -> Result<(), CacheError> {
        let mut connection = self.connection.clone();
        bounded(connection.publish::<_, _, ()>(self.renewals_channel(), node)).await
    }

    /// The key a queue page is cached under now: `query` names the filters.
    pub async fn queue_key(&self, query: &str) -> Result<String, CacheError> {
        let mut connection = self.connection.clone();
        let (epoch, generation): (Option<u64>, Option<u64>) =
            bounded(redis::pipe().get(self.epoch_key()).get(self.queue_generation_key()).query_async(&mut connection))
                .await?;
        Ok(format!("{{{}}}:queue:{}:{}:{query}", self.prefix, epoch.unwrap_or(0), generation.unwrap_or(0)))
    }

    /// The key a ticket's view is cached under now.
    pub async fn ticket_key(&self, ticket: &str) -> Result<String, CacheError> {
        let mut connection = self.connection.clone();
        let (epoch, generation): (Option<u64>, Option<u64>) = bounded(
            redis::pipe().get(self.epoch_key()).get(self.ticket_generation_key(ticket)).query_async(&mut connection),
        )
        .await?;
        Ok(format!("{{{}:{ticket}}}:view:{}:{}", self.prefix, epoch.unwrap_or(0), generation.unwrap_or(0)))
    }

    pub async fn get(&self, key: &str) -> Result<Option<String>, CacheError> {
        let mut connection = self.connection.clone();
        bounded(connection.get(key)).await
    }

    pub async fn put(&self, key: &str, value: &str) -> Result<(), CacheError> {
        let mut connection = self.connection.clone();
        bounded(connection.set_ex(key, value, self.ttl_s)).await
    }

    /// After a projected round: retires the cached reads it changed and
    /// tells every bridge. `retire_all` also retires every cached value (an
    /// earlier round could not invalidate).
    pub async fn projected(&self, round: &Projected, retire_all: bool) -> Result<(), CacheError> {
        let mut pipe = redis::pipe();
        if retire_all {
            pipe.incr(self.epoch_key(), 1).ignore();
        }
        pipe.incr(self.queue_generation_key(), 1).ignore();
        // A generation outlives every value cached under it, so one that
        // expired and restarts at 0 cannot revive a stale value.
        let generation_ttl_s = i64::try_from(self.ttl_s.saturating_mul(2)).unwrap_or(i64::MAX);
        let mut seen = std::collections::HashSet::new();
        for ticket in &round.tickets {
            if seen.insert(ticket.id.as_str()) {
                let key = self.ticket_generation_key(&ticket.id);
                pipe.incr(&key, 1).ignore().expire(&key, generation_ttl_s).ignore();
            }
        }
        let message = serde_json::to_string(round).unwrap_or_default();
        pipe.publish(self.channel(), message).ignore();
        let mut connection = self.connection.clone();
        bounded(pipe.query_async::<()>(&mut connection)).await
    }

    /// Retires every cached value, announcing nothing: for tickets
    /// rewritten outside a projected round (an upgrade's new JSON shape).
    pub async fn retire_all(&self) -> Result<(), CacheError> {
        let mut connection = self.connection.clone();
        bounded(connection.incr::<_, _, ()>(self.epoch_key(), 1)).await
    }

    /// A subscription to the projector's rounds and to lease renewal
    /// requests (its own connection).
    pub async fn subscribe(&self) -> Result<redis::aio::PubSub, CacheError> {
        let mut pubsub = bounded(self.client.get_async_pubsub()).await?;
        bounded(pubsub.subscribe(&[self.channel(), self.renewals_channel()])).await?;
        Ok(pubsub)
    }
}
