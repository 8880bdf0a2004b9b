//! The bridge's configuration: versioned TOML, `CLOUD_BRIDGE__` environment
//! overrides (`CLOUD_BRIDGE__HTTP__LISTEN=...`), unknown fields rejected,
//! validated at start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use service_kit::config::Source;
use service_kit::keys::AuthConfig;
use service_kit::logging::LogConfig;
use sync_protocol::ids::NodeId;
use sync_protocol::session::SessionConfig;
use sync_protocol::ticket::Limits;

pub const CONFIG_VERSION: u32 = 1;
/// Upper bound of `projector.batch_records_max`: a round holds its records
/// and their documents in memory.
const BATCH_RECORDS_LIMIT: usize = 20_000;
pub const ENV_PREFIX: &str = "CLOUD_BRIDGE__";

pub use service_kit::config::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub version: u32,
    pub bridge: BridgeSection,
    #[serde(default)]
    pub http: HttpConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub session: SessionConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub log: LogConfig,
    /// The distributed backend: with `[kafka]` and `[mongodb]` set, the
    /// bridge keeps no tickets of its own. Without, it uses its embedded store.
    pub kafka: Option<KafkaConfig>,
    pub mongodb: Option<MongoConfig>,
    /// Cached reads and notices between bridge instances; optional (without
    /// it, reads go to MongoDB and instances learn of changes by polling).
    pub redis: Option<RedisConfig>,
    #[serde(default)]
    pub projector: ProjectorConfig,
}

/// Most partitions of the change topic. A feed cursor holds an offset per
/// partition, and it must fit the edges' `cursor_bytes_max` (256 bytes by
/// default): 16 offsets of at most 10 bytes each, with room to spare.
pub const PARTITIONS_MAX: i32 = 16;

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoConfig {
    /// A MongoDB connection string (Atlas: `mongodb+srv://...`).
    pub uri: String,
    #[serde(default = "default_database")]
    pub database: String,
    /// Write concern of the projector's writes and the bridge's node
    /// positions: `majority` (survives a primary's loss) or `1`.
    #[serde(default)]
    pub write_concern: WriteConcernLevel,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum WriteConcernLevel {
    #[default]
    #[serde(rename = "majority")]
    Majority,
    #[serde(rename = "1")]
    Primary,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: String,
    /// Prefix of every key and channel, so deployments can share a Redis.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Lifetime of a cached read: the bound on staleness should an
    /// invalidation be lost while Redis was unreachable.
    #[serde(default = "default_cache_ttl_s")]
    pub cache_ttl_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorConfig {
    /// Health and metrics of `cloud-bridge project` (`/healthz`, `/readyz`, `/metrics`).
    pub listen: SocketAddr,
    /// Most change records projected in one round of MongoDB writes.
    pub batch_records_max: usize,
    /// How long a round waits for more records after the first.
    pub batch_linger_ms: u64,
    /// How long a pharmacy write waits for the projection before it is
    /// answered 202 (stored, not yet shown) instead of 200.
    pub visible_wait_ms: u64,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8581)),
            batch_records_max: 2_000,
            batch_linger_ms: 20,
            visible_wait_ms: 5_000,
        }
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
fn default_delivery_timeout_ms() -> u64 {
    10_000
}
fn default_database() -> String {
    "medsync".into()
}
fn default_key_prefix() -> String {
    "medsync".into()
}
fn default_cache_ttl_s() -> u64 {
    300
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeSection {
    /// This bridge instance; recorded as the device of pharmacy changes.
    pub id: NodeId,
    /// The embedded store's directory (absolute).
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub body_bytes_max: usize,
    pub shutdown_grace_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 8580)), body_bytes_max: 64 * 1024, shutdown_grace_ms: 10_000 }
    }
}

impl Config {
    /// Reads `path`, applies environment overrides, and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::validated(service_kit::config::extract(Source::File(path), ENV_PREFIX)?)
    }

    /// Parses TOML text with environment overrides, and validates.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::validated(service_kit::config::extract(Source::Text(text), ENV_PREFIX)?)
    }

    fn validated(config: Config) -> Result<Self, ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if config.version != CONFIG_VERSION {
            return invalid(format!("version is {}, this build reads version {CONFIG_VERSION}", config.version));
        }
        if !config.bridge.data_dir.is_absolute() {
            return invalid(format!(
                "bridge.data_dir must be an absolute path, got {}",
                config.bridge.data_dir.display()
            ));
        }
        if config.session.batches_in_flight_max == 0 || config.session.heartbeat_interval_ms == 0 {
            return invalid("session.batches_in_flight_max and session.heartbeat_interval_ms must be positive".into());
        }
        config.auth.validate().map_err(|e| ConfigError::Invalid(format!("auth: {e}")))?;
        match (&config.kafka, &config.mongodb) {
            (Some(kafka), Some(_)) => {
                if !(1..=PARTITIONS_MAX).contains(&kafka.partitions) {
                    return invalid(format!(
                        "kafka.partitions must be 1 to {PARTITIONS_MAX}, got {}",
                        kafka.partitions
                    ));
                }
                if kafka.replication_factor < 1 || kafka.topic.is_empty() || kafka.brokers.is_empty() {
                    return invalid("kafka needs brokers, a topic and a replication_factor of at least 1".into());
                }
            }
            (None, None) if config.redis.is_some() => {
                return invalid("[redis] serves the distributed backend: set [kafka] and [mongodb] too".into());
            }
            (None, None) => {}
            _ => return invalid("the distributed backend needs both [kafka] and [mongodb]".into()),
        }
        let projector = &config.projector;
        if projector.batch_records_max == 0 || projector.batch_records_max > BATCH_RECORDS_LIMIT {
            return invalid(format!("projector.batch_records_max must be 1 to {BATCH_RECORDS_LIMIT}"));
        }
        Ok(config)
    }

    pub fn jwks_path(&self) -> PathBuf {
        self.auth.jwks_path(&self.bridge.data_dir)
    }

    pub fn database_path(&self) -> PathBuf {
        self.bridge.data_dir.join("cloud-bridge.sqlite3")
    }
}

/// `text` with one level of `#` taken off every line from `marker` on: an
/// example file's commented optional sections, switched on.
#[cfg(test)]
pub(crate) fn uncomment_from(text: &str, marker: &str) -> String {
    let (kept, commented) = text.split_at(text.find(marker).expect("the marker is in the text"));
    let uncommented: Vec<&str> =
        commented.lines().map(|line| line.strip_prefix("# ").unwrap_or(line.trim_start_matches('#'))).collect();
    format!("{kept}{}\n", uncommented.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sync_protocol::wire::WireLimits;

    const EXAMPLE: &str = include_str!("../../deploy/cloud-bridge.example.toml");

    #[test]
    fn the_shipped_example_is_valid_and_spells_out_the_defaults() {
        let config = Config::from_toml(EXAMPLE).unwrap();
        assert_eq!(config.bridge.id.as_str(), "bridge-1");
        assert_eq!(config.session, SessionConfig::default());
        assert_eq!(config.session.limits, WireLimits::default());
        assert_eq!(config.limits, Limits::default());
    }

    /// The example with its commented distributed sections switched on.
    fn distributed_example() -> String {
        uncomment_from(EXAMPLE, "# [kafka]")
    }

    #[test]
    fn the_shipped_distributed_sections_are_valid_and_spell_out_the_defaults() {
        let config = Config::from_toml(&distributed_example()).unwrap();
        let kafka = config.kafka.unwrap();
        assert_eq!(
            (kafka.topic.as_str(), kafka.partitions, kafka.group_id.as_str()),
            ("medsync.changes", 6, "medsync-projector")
        );
        assert_eq!(kafka.delivery_timeout_ms, default_delivery_timeout_ms());
        assert_eq!(kafka.properties.len(), 2);
        let mongodb = config.mongodb.unwrap();
        assert_eq!((mongodb.database.as_str(), mongodb.write_concern), ("medsync", WriteConcernLevel::Majority));
        assert_eq!(config.redis.unwrap().cache_ttl_s, default_cache_ttl_s());
        let defaults = ProjectorConfig::default();
        assert_eq!(
            (config.projector.batch_records_max, config.projector.batch_linger_ms, config.projector.visible_wait_ms),
            (defaults.batch_records_max, defaults.batch_linger_ms, defaults.visible_wait_ms)
        );
    }

    #[test]
    fn a_half_configured_distributed_backend_is_refused_by_name() {
        let distributed = distributed_example();
        let cases = [
            (distributed[..distributed.find("\n[mongodb]").unwrap()].to_owned(), "both [kafka] and [mongodb]"),
            (distributed.replace("partitions = 6", "partitions = 17"), "kafka.partitions must be 1 to 16"),
            (distributed.replace("batch_records_max = 2000", "batch_records_max = 0"), "batch_records_max"),
            (format!("{EXAMPLE}\n[redis]\nurl = \"redis://127.0.0.1\"\n"), "set [kafka] and [mongodb] too"),
            (distributed.replace("write_concern = \"majority\"", "write_concern = \"2\""), "write_concern"),
        ];
        for (text, expected) in cases {
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (EXAMPLE.replace("version = 1", "version = 3"), "version is 3"),
            (EXAMPLE.replace("/var/lib/cloud-bridge", "relative"), "absolute path"),
            (EXAMPLE.replace("[\"EdDSA\", \"ES256\"]", "[\"HS256\"]"), "HS256"),
            (EXAMPLE.replace("batches_in_flight_max = 4", "batches_in_flight_max = 0"), "batches_in_flight_max"),
            (EXAMPLE.replace("[session]", "[session]\nretries = 3"), "retries"),
        ];
        for (text, expected) in cases {
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }
}
