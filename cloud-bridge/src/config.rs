//! The bridge's configuration: versioned TOML, `CLOUD_BRIDGE__` environment
//! overrides (`CLOUD_BRIDGE__HTTP__LISTEN=...`), unknown fields refused;
//! loaded and checked by [`ServiceConfig`] like every service's.
//!
//! The file names the backend by its optional sections (`[kafka]`,
//! `[mongodb]`, `[redis]`); [`Config`] holds it as one [`Backend`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cloud_store::config::{Backend, KafkaConfig, MongoConfig, RedisConfig, StoreOptions};
use serde::Deserialize;
use service_kit::config::{ConfigError, ServiceConfig};
use service_kit::keys::AuthConfig;
use service_kit::logging::LogConfig;
use sync_protocol::ids::NodeId;
use sync_protocol::session::SessionConfig;
use sync_protocol::ticket::Limits;

/// Writes (upstream batches, pharmacy writes) waiting for the embedded writer.
const WRITE_QUEUE_MAX: usize = 1_024;

#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "ConfigFile")]
pub struct Config {
    pub version: u32,
    pub bridge: BridgeSection,
    pub http: HttpConfig,
    pub auth: AuthConfig,
    pub session: SessionConfig,
    pub limits: Limits,
    pub log: LogConfig,
    /// Where the tickets are: the embedded store, or Kafka, MongoDB and Redis.
    pub backend: Backend,
    pub projector: ProjectorWait,
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    version: u32,
    bridge: BridgeSection,
    #[serde(default)]
    http: HttpConfig,
    auth: AuthConfig,
    #[serde(default)]
    session: SessionConfig,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    log: LogConfig,
    kafka: Option<KafkaConfig>,
    mongodb: Option<MongoConfig>,
    redis: Option<RedisConfig>,
    #[serde(default)]
    projector: ProjectorSection,
}

impl TryFrom<ConfigFile> for Config {
    type Error = ConfigError;

    fn try_from(file: ConfigFile) -> Result<Self, ConfigError> {
        let ConfigFile { version, bridge, http, auth, session, limits, log, kafka, mongodb, redis, projector } = file;
        Ok(Config {
            backend: Backend::from_sections(kafka, mongodb, redis)?,
            projector: projector.into_wait()?,
            version,
            bridge,
            http,
            auth,
            session,
            limits,
            log,
        })
    }
}

/// The bridge's `[projector]` section: how long it waits for the projector.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ProjectorSection {
    visible_wait_ms: u64,
    /// Keys of the projector process, which has its own file since the
    /// projector became a binary of its own: refused here by name.
    listen: Option<serde::de::IgnoredAny>,
    batch_records_max: Option<serde::de::IgnoredAny>,
    batch_linger_ms: Option<serde::de::IgnoredAny>,
}

impl Default for ProjectorSection {
    fn default() -> Self {
        Self {
            visible_wait_ms: ProjectorWait::default().visible_wait_ms,
            listen: None,
            batch_records_max: None,
            batch_linger_ms: None,
        }
    }
}

impl ProjectorSection {
    fn into_wait(self) -> Result<ProjectorWait, ConfigError> {
        let moved = [
            ("listen", self.listen.is_some()),
            ("batch_records_max", self.batch_records_max.is_some()),
            ("batch_linger_ms", self.batch_linger_ms.is_some()),
        ];
        match moved.iter().find(|(_, set)| *set) {
            Some((key, _)) => Err(ConfigError::invalid(format!(
                "projector.{key} is a setting of the projector process, which reads its own file now \
                 (deploy/projector.example.toml): move it there"
            ))),
            None => Ok(ProjectorWait { visible_wait_ms: self.visible_wait_ms }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectorWait {
    /// How long a pharmacy write waits for the projection before it is
    /// answered 202 (stored, not yet shown) instead of 200.
    pub visible_wait_ms: u64,
}

impl Default for ProjectorWait {
    fn default() -> Self {
        Self { visible_wait_ms: 5_000 }
    }
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

impl ServiceConfig for Config {
    const VERSION: u32 = 1;
    const ENV_PREFIX: &'static str = "CLOUD_BRIDGE__";
    const DATA_DIR_KEY: &'static str = "bridge.data_dir";

    fn version(&self) -> u32 {
        self.version
    }

    fn data_dir(&self) -> Option<&Path> {
        Some(&self.bridge.data_dir)
    }

    fn log(&self) -> &LogConfig {
        &self.log
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.session.batches_in_flight_max == 0 || self.session.heartbeat_interval_ms == 0 {
            return Err(ConfigError::invalid(
                "session.batches_in_flight_max and session.heartbeat_interval_ms must be positive",
            ));
        }
        self.auth.validate()
    }

    fn summary(&self) -> String {
        format!("bridge {}, {}", self.bridge.id, self.backend.describe())
    }
}

impl Config {
    pub fn jwks_path(&self) -> PathBuf {
        self.auth.jwks_path(&self.bridge.data_dir)
    }

    pub fn database_path(&self) -> PathBuf {
        self.bridge.data_dir.join("cloud-bridge.sqlite3")
    }

    /// What the store needs besides its backend.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            instance: self.bridge.id.clone(),
            limits: self.limits.clone(),
            visible_wait_ms: self.projector.visible_wait_ms,
            write_queue_max: WRITE_QUEUE_MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use cloud_store::config::{Distributed, WriteConcernLevel, default_delivery_timeout_ms};
    use sync_protocol::wire::WireLimits;
    use test_fixtures::uncomment_from;

    use super::*;

    const EXAMPLE: &str = include_str!("../../deploy/cloud-bridge.example.toml");

    #[test]
    fn the_shipped_example_is_valid_and_spells_out_the_defaults() {
        let config = Config::from_toml(EXAMPLE).unwrap();
        assert_eq!(config.bridge.id.as_str(), "bridge-1");
        assert_eq!(config.session, SessionConfig::default());
        assert_eq!(config.session.limits, WireLimits::default());
        assert_eq!(config.limits, Limits::default());
        assert!(matches!(config.backend, Backend::Embedded));
    }

    /// The example with its commented distributed sections switched on.
    fn distributed_example() -> String {
        uncomment_from(EXAMPLE, "# [kafka]")
    }

    #[test]
    fn the_shipped_distributed_sections_are_valid_and_spell_out_the_defaults() {
        let config = Config::from_toml(&distributed_example()).unwrap();
        let Backend::Distributed(distributed) = config.backend else {
            panic!("the distributed sections name the distributed backend")
        };
        let Distributed { kafka, mongodb, redis } = *distributed;
        assert_eq!(
            (kafka.topic.as_str(), kafka.partitions, kafka.group_id.as_str()),
            ("medsync.changes", 6, "medsync-projector")
        );
        assert_eq!(kafka.delivery_timeout_ms, default_delivery_timeout_ms());
        assert_eq!(kafka.properties.len(), 2);
        assert_eq!((mongodb.database.as_str(), mongodb.write_concern), ("medsync", WriteConcernLevel::Majority));
        assert_eq!(redis.unwrap().cache_ttl_s, 300);
        assert_eq!(config.projector, ProjectorWait::default());
    }

    /// Files written before the projector had its own: its keys are refused
    /// with where they went, `visible_wait_ms` still reads.
    #[test]
    fn the_projector_keys_of_older_files_are_refused_by_name() {
        let older = format!("{EXAMPLE}\n[projector]\nlisten = \"127.0.0.1:8581\"\nbatch_records_max = 2000\n");
        let err = Config::from_toml(&older).unwrap_err().to_string();
        assert!(err.contains("projector.listen is a setting of the projector process"), "{err}");
        let kept = Config::from_toml(&format!("{EXAMPLE}\n[projector]\nvisible_wait_ms = 900\n")).unwrap();
        assert_eq!(kept.projector.visible_wait_ms, 900);
    }

    #[test]
    fn a_half_configured_distributed_backend_is_refused_by_name() {
        let distributed = distributed_example();
        let cases = [
            (distributed[..distributed.find("\n[mongodb]").unwrap()].to_owned(), "both [kafka] and [mongodb]"),
            (distributed.replace("partitions = 6", "partitions = 17"), "kafka.partitions must be 1 to 16"),
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
