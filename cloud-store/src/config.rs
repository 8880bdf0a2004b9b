//! The store's configuration: which backend, and the settings of the
//! distributed one's services. The sections keep the names they have in
//! the bridge's file (`[kafka]`, `[mongodb]`, `[redis]`).

use std::collections::BTreeMap;

use serde::Deserialize;
pub use service_kit::cloud::{MongoConfig, RedisConfig, WriteConcernLevel};
use service_kit::config::ConfigError;
use sync_protocol::ids::NodeId;
use sync_protocol::ticket::Limits;

/// Most partitions of the change topic. A feed cursor holds an offset per
/// partition, and it must fit the edges' `cursor_bytes_max` (256 bytes by
/// default): 16 offsets of at most 10 bytes each, with room to spare.
pub const PARTITIONS_MAX: i32 = 16;

/// Where the tickets are kept.
#[derive(Debug, Clone)]
pub enum Backend {
    /// SQLite in the bridge's data directory: one process, no other service.
    Embedded,
    /// Kafka, MongoDB and (optionally) Redis, shared by any number of bridges.
    Distributed(Box<Distributed>),
}

/// The services of the distributed backend.
#[derive(Debug, Clone)]
pub struct Distributed {
    pub kafka: KafkaConfig,
    pub mongodb: MongoConfig,
    /// Cached reads and notices between bridge instances; optional (without
    /// it, reads go to MongoDB and instances learn of changes by polling).
    pub redis: Option<RedisConfig>,
}

impl Backend {
    /// The backend the optional sections of a file name: none for the
    /// embedded store, `[kafka]` and `[mongodb]` (and maybe `[redis]`) for
    /// the distributed one; anything in between is refused by name.
    pub fn from_sections(
        kafka: Option<KafkaConfig>,
        mongodb: Option<MongoConfig>,
        redis: Option<RedisConfig>,
    ) -> Result<Self, ConfigError> {
        match (kafka, mongodb) {
            (Some(kafka), Some(mongodb)) => {
                kafka.validate()?;
                Ok(Backend::Distributed(Box::new(Distributed { kafka, mongodb, redis })))
            }
            (None, None) if redis.is_some() => {
                Err(ConfigError::invalid("[redis] serves the distributed backend: set [kafka] and [mongodb] too"))
            }
            (None, None) => Ok(Backend::Embedded),
            _ => Err(ConfigError::invalid("the distributed backend needs both [kafka] and [mongodb]")),
        }
    }

    /// For `check-config` and the start-up log.
    pub fn describe(&self) -> &'static str {
        match self {
            Backend::Embedded => "embedded store",
            Backend::Distributed(distributed) if distributed.redis.is_some() => {
                "distributed store: kafka, mongodb, redis"
            }
            Backend::Distributed(_) => "distributed store: kafka, mongodb (no redis)",
        }
    }
}

/// What a bridge's store needs to know besides its backend.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The bridge instance: the device of pharmacy changes, and the name of
    /// its clients in the services' logs.
    pub instance: NodeId,
    pub limits: Limits,
    /// How long a pharmacy write waits for the projection before it is
    /// answered 202 (stored, not yet shown) instead of 200.
    pub visible_wait_ms: u64,
    /// Writes (upstream batches, pharmacy writes) waiting for the embedded writer.
    pub write_queue_max: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port` separated by commas.
    pub brokers: String,
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Partitions of the change topic when the bridge creates it. A
    /// ticket's changes stay in one partition, in order; the count must
    /// never change once changes flow (the bridge refuses to start if the
    /// topic has another count).
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replicas of each partition when the bridge creates the topic (3 on a
    /// production cluster).
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// The projectors' consumer group.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// How long a change may wait for the broker before its batch fails
    /// (the edge keeps it and sends it again).
    #[serde(default = "default_delivery_timeout_ms")]
    pub delivery_timeout_ms: u64,
    /// More librdkafka properties (TLS, SASL, tuning), passed as they are.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=PARTITIONS_MAX).contains(&self.partitions) {
            return Err(ConfigError::invalid(format!(
                "kafka.partitions must be 1 to {PARTITIONS_MAX}, got {}",
                self.partitions
            )));
        }
        if self.replication_factor < 1 || self.topic.is_empty() || self.brokers.is_empty() {
            return Err(ConfigError::invalid("kafka needs brokers, a topic and a replication_factor of at least 1"));
        }
        Ok(())
    }
}

fn default_topic() -> String {
    "medsync.changes".into()
}
fn default_partitions() -> i32 {
    6
}
fn default_replication_factor() -> i32 {
    1
}
fn default_group_id() -> String {
    "medsync-projector".into()
}
pub fn default_delivery_timeout_ms() -> u64 {
    10_000
}
