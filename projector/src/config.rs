//! The projector's configuration: versioned TOML, `PROJECTOR__` environment
//! overrides, unknown fields refused. Its `[kafka]`, `[mongodb]` and
//! `[redis]` sections are the bridges' (the same text can be shared).

use std::net::SocketAddr;
use std::path::Path;

use cloud_store::config::{KafkaConfig, MongoConfig, RedisConfig};
use serde::Deserialize;
use service_kit::config::{ConfigError, ServiceConfig};
use service_kit::logging::LogConfig;
use sync_protocol::ids::NodeId;
use sync_protocol::wire::WireLimits;

/// Upper bound of `projector.batch_records_max`: a round holds its records
/// and their documents in memory.
const BATCH_RECORDS_LIMIT: usize = 20_000;
/// Bounds of `projector.session_timeout_ms`. Apache Kafka's brokers refuse
/// less than their `group.min.session.timeout.ms` (6 s by default) and more
/// than `group.max.session.timeout.ms` (30 minutes).
const SESSION_TIMEOUT_MS_MIN: u64 = 1_000;
const SESSION_TIMEOUT_MS_MAX: u64 = 1_800_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorConfig {
    pub version: u32,
    pub projector: ProjectorSection,
    pub kafka: KafkaConfig,
    pub mongodb: MongoConfig,
    /// Invalidations and the notice every bridge follows; optional (without
    /// it, bridges learn of projected changes by polling the watermarks).
    pub redis: Option<RedisConfig>,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorSection {
    /// This projector: names its clients in Kafka's and MongoDB's logs.
    pub id: NodeId,
    /// Health and metrics (`/healthz`, `/readyz`, `/metrics`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Most change records projected in one round of MongoDB writes.
    #[serde(default = "default_batch_records_max")]
    pub batch_records_max: usize,
    /// How long a round waits for more records after the first.
    #[serde(default = "default_batch_linger_ms")]
    pub batch_linger_ms: u64,
    /// Largest change a bridge accepts (its `session.limits.change_bytes_max`):
    /// a record larger than this and its envelope is dead-lettered.
    #[serde(default = "default_change_bytes_max")]
    pub change_bytes_max: usize,
    /// How long the consumer group waits for a projector that stopped
    /// answering before its partitions go to the others (or to it again,
    /// restarted): the longest a crash holds projection up.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// How long shutdown waits for the health endpoint's requests.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8581))
}
fn default_batch_records_max() -> usize {
    2_000
}
fn default_batch_linger_ms() -> u64 {
    20
}
fn default_change_bytes_max() -> usize {
    WireLimits::default().change_bytes_max
}
fn default_session_timeout_ms() -> u64 {
    6_000
}
fn default_shutdown_grace_ms() -> u64 {
    5_000
}

impl ServiceConfig for ProjectorConfig {
    const VERSION: u32 = 1;
    const ENV_PREFIX: &'static str = "PROJECTOR__";

    fn version(&self) -> u32 {
        self.version
    }

    fn data_dir(&self) -> Option<&Path> {
        None
    }

    fn log(&self) -> &LogConfig {
        &self.log
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        let batch = self.projector.batch_records_max;
        if batch == 0 || batch > BATCH_RECORDS_LIMIT {
            return Err(ConfigError::invalid(format!(
                "projector.batch_records_max must be 1 to {BATCH_RECORDS_LIMIT}"
            )));
        }
        if !(SESSION_TIMEOUT_MS_MIN..=SESSION_TIMEOUT_MS_MAX).contains(&self.projector.session_timeout_ms) {
            return Err(ConfigError::invalid(format!(
                "projector.session_timeout_ms must be {SESSION_TIMEOUT_MS_MIN} to {SESSION_TIMEOUT_MS_MAX}"
            )));
        }
        if self.projector.change_bytes_max == 0 {
            return Err(ConfigError::invalid("projector.change_bytes_max must be positive"));
        }
        Ok(())
    }

    fn summary(&self) -> String {
        let redis = if self.redis.is_some() { ", notices in redis" } else { "" };
        format!("projector {}, topic {}, group {}{redis}", self.projector.id, self.kafka.topic, self.kafka.group_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../deploy/projector.example.toml");

    #[test]
    fn the_shipped_example_is_valid_and_spells_out_the_defaults() {
        let config = ProjectorConfig::from_toml(EXAMPLE).unwrap();
        let p = &config.projector;
        assert_eq!(p.id.as_str(), "projector-1");
        assert_eq!((p.listen, p.batch_records_max, p.batch_linger_ms), (default_listen(), 2_000, 20));
        assert_eq!(p.change_bytes_max, WireLimits::default().change_bytes_max);
        assert_eq!(p.session_timeout_ms, default_session_timeout_ms());
        assert_eq!(
            (config.kafka.topic.as_str(), config.kafka.group_id.as_str()),
            ("medsync.changes", "medsync-projector")
        );
        assert_eq!(config.mongodb.database, "medsync");
        assert!(config.redis.is_some());
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (EXAMPLE.replace("version = 1", "version = 2"), "version is 2"),
            (EXAMPLE.replace("batch_records_max = 2000", "batch_records_max = 0"), "batch_records_max"),
            (EXAMPLE.replace("partitions = 6", "partitions = 17"), "kafka.partitions must be 1 to 16"),
            (EXAMPLE.replace("session_timeout_ms = 6000", "session_timeout_ms = 500"), "session_timeout_ms must be"),
            (EXAMPLE.replace("[projector]", "[projector]\nthreads = 2"), "threads"),
        ];
        for (text, expected) in cases {
            let err = ProjectorConfig::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }
}
