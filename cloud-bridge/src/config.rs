//! The bridge's configuration: versioned TOML, `CLOUD_BRIDGE__` environment
//! overrides (`CLOUD_BRIDGE__HTTP__LISTEN=...`), unknown fields rejected,
//! validated at start.

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
        Ok(config)
    }

    pub fn jwks_path(&self) -> PathBuf {
        self.auth.jwks_path(&self.bridge.data_dir)
    }

    pub fn database_path(&self) -> PathBuf {
        self.bridge.data_dir.join("cloud-bridge.sqlite3")
    }
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
