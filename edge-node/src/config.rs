//! The edge node's configuration: a versioned TOML file, every field
//! overridable by an environment variable, unknown fields rejected, and
//! validated as a whole at start ([`ServiceConfig`], as every service's) so
//! a mistake stops the node with a clear message instead of surfacing at 3 a.m.
//!
//! Environment overrides use the prefix `EDGE_NODE__` and `__` between
//! levels: `EDGE_NODE__HTTP__LISTEN=0.0.0.0:8480` sets `http.listen`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use service_kit::config::{ConfigError, ServiceConfig};
use service_kit::keys::AuthConfig;
use service_kit::logging::LogConfig;
use service_kit::sqlite::{Database, DatabaseKey, KeyError};
use sync_protocol::ids::{NodeId, WardId};
use sync_protocol::ticket::Limits;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Must be [`ServiceConfig::VERSION`]; a file written for another version is refused.
    pub version: u32,
    pub node: NodeConfig,
    #[serde(default)]
    pub http: HttpConfig,
    pub auth: AuthConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub log: LogConfig,
    /// The link to the cloud; without it the node works alone.
    #[serde(default)]
    pub sync: Option<SyncConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// The bridge's sync endpoint, `ws://` or `wss://`.
    pub bridge_url: String,
    /// The node's bearer token, relative to `node.data_dir` (written at enrolment).
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
    /// First reconnect delay; doubles up to the cap, with jitter.
    #[serde(default = "default_reconnect_base_ms")]
    pub reconnect_base_ms: u64,
    #[serde(default = "default_reconnect_cap_ms")]
    pub reconnect_cap_ms: u64,
    /// How often the medication catalogue is fetched from the bridge
    /// while it is reachable (an unchanged one costs one small request).
    #[serde(default = "default_formulary_refresh_s")]
    pub formulary_refresh_s: u64,
    #[serde(default)]
    pub session: sync_protocol::session::SessionConfig,
}

fn default_formulary_refresh_s() -> u64 {
    300
}

/// Bounds of `sync.formulary_refresh_s`: not a busy loop, not stale for a day.
pub const FORMULARY_REFRESH_S_MIN: u64 = 10;
pub const FORMULARY_REFRESH_S_MAX: u64 = 86_400;

pub fn default_token_file() -> PathBuf {
    PathBuf::from("node-token")
}

fn default_reconnect_base_ms() -> u64 {
    500
}

fn default_reconnect_cap_ms() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: NodeId,
    pub ward: WardId,
    /// Holds the database, the cached JWKS and the node's credentials.
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Largest request body; a ticket is a few kilobytes.
    pub body_bytes_max: usize,
    /// Open connections beyond this wait in the kernel's accept queue.
    pub connections_max: usize,
    pub request_timeout_ms: u64,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8480)),
            body_bytes_max: 64 * 1024,
            connections_max: 512,
            request_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Most writes committed in one transaction (one fsync).
    pub group_commit_max: usize,
    /// Writes waiting for the writer; beyond this, requests get 503.
    pub write_queue_max: usize,
    /// Read connections.
    pub readers: usize,
    /// The key the database and its backups are encrypted with: a file of
    /// 64 hexadecimal characters (`edge-node generate-key FILE`) that no
    /// group or other user may read. Read when `key_credential` is not
    /// handed over (the admin commands, run from a shell).
    pub key_file: Option<PathBuf>,
    /// The same key as a systemd credential of this name
    /// (`LoadCredential=NAME:PATH` in the unit), read from
    /// `$CREDENTIALS_DIRECTORY` when systemd sets it.
    pub key_credential: Option<String>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { group_commit_max: 256, write_queue_max: 4_096, readers: 4, key_file: None, key_credential: None }
    }
}

impl StorageConfig {
    /// Where the key is read from: the systemd credential when systemd
    /// handed credentials over, else the key file; `None` without either
    /// (the database is then plain SQLite, and the node says so at start).
    pub fn key_path(&self) -> Option<PathBuf> {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        match (&self.key_credential, credentials) {
            (Some(name), Some(directory)) => Some(directory.join(name)),
            _ => self.key_file.clone(),
        }
    }
}

impl ServiceConfig for Config {
    const VERSION: u32 = 1;
    const ENV_PREFIX: &'static str = "EDGE_NODE__";
    const DATA_DIR_KEY: &'static str = "node.data_dir";

    fn version(&self) -> u32 {
        self.version
    }

    fn data_dir(&self) -> Option<&Path> {
        Some(&self.node.data_dir)
    }

    fn log(&self) -> &LogConfig {
        &self.log
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        self.auth.validate()?;
        let positive = [
            ("http.body_bytes_max", self.http.body_bytes_max),
            ("http.connections_max", self.http.connections_max),
            ("storage.group_commit_max", self.storage.group_commit_max),
            ("storage.write_queue_max", self.storage.write_queue_max),
            ("storage.readers", self.storage.readers),
            ("limits.quantity_max", self.limits.quantity_max as usize),
            ("limits.items_per_ticket_max", self.limits.items_per_ticket_max),
            ("limits.transitions_per_ticket_max", self.limits.transitions_per_ticket_max),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return invalid(format!("{name} must be greater than 0"));
        }
        if let Some(sync) = &self.sync {
            if !(sync.bridge_url.starts_with("ws://") || sync.bridge_url.starts_with("wss://")) {
                return invalid(format!("sync.bridge_url must start with ws:// or wss://, got {:?}", sync.bridge_url));
            }
            if sync.reconnect_base_ms == 0 || sync.reconnect_cap_ms < sync.reconnect_base_ms {
                return invalid("sync.reconnect_base_ms must be positive and at most sync.reconnect_cap_ms".into());
            }
            if !(FORMULARY_REFRESH_S_MIN..=FORMULARY_REFRESH_S_MAX).contains(&sync.formulary_refresh_s) {
                return invalid(format!(
                    "sync.formulary_refresh_s must be {FORMULARY_REFRESH_S_MIN} to {FORMULARY_REFRESH_S_MAX}"
                ));
            }
        }
        if self.storage.key_file.as_ref().is_some_and(|path| !path.is_absolute()) {
            return invalid("storage.key_file must be an absolute path".into());
        }
        let credential_name = |name: &String| {
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) && name != ".."
        };
        if self.storage.key_credential.as_ref().is_some_and(|name| !credential_name(name)) {
            return invalid("storage.key_credential must be a credential name (letters, digits, - _ .)".into());
        }
        if self.storage.readers > 64 || self.storage.group_commit_max > 10_000 {
            return invalid("storage.readers must be at most 64 and storage.group_commit_max at most 10000".into());
        }
        Ok(())
    }

    fn summary(&self) -> String {
        format!("node {} of {}", self.node.id, self.node.ward)
    }
}

impl Config {
    pub fn jwks_path(&self) -> PathBuf {
        self.auth.jwks_path(&self.node.data_dir)
    }

    pub fn database_path(&self) -> PathBuf {
        self.node.data_dir.join("edge-node.sqlite3")
    }

    /// The database and the key it is encrypted with, read from the key
    /// file or credential (`storage.key_path`).
    pub fn database(&self) -> Result<Database, KeyError> {
        let key = self.storage.key_path().map(|path| DatabaseKey::read(&path)).transpose()?;
        Ok(Database { path: self.database_path(), key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        version = 1
        [node]
        id = "edge-ward-4b"
        ward = "ward-4b"
        data_dir = "/var/lib/edge-node"
        [auth]
        issuer = "https://auth.hospital.example"
        audience = "medsync"
    "#;

    #[test]
    fn a_minimal_file_gets_defaults() {
        let config = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(config.http.listen.to_string(), "127.0.0.1:8480");
        assert_eq!(config.jwks_path(), PathBuf::from("/var/lib/edge-node/jwks.json"));
        assert_eq!(config.limits, Limits::default());
    }

    #[test]
    fn the_shipped_example_is_valid_and_complete() {
        let text = include_str!("../../deploy/edge-node.example.toml");
        let config = Config::from_toml(text).unwrap();
        assert_eq!(config.node.ward.as_str(), "ward-4b");
        // Every default is spelled out, so the example documents them all.
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.http.body_bytes_max, HttpConfig::default().body_bytes_max);
        assert_eq!(config.storage.group_commit_max, StorageConfig::default().group_commit_max);
        // The commented [sync] section parses once uncommented.
        let with_sync = text
            .replace("# [sync]", "[sync]")
            .replace("# bridge_url", "bridge_url")
            .replace("# token_file", "token_file");
        let sync = Config::from_toml(&with_sync).unwrap().sync.unwrap();
        assert_eq!((sync.bridge_url.as_str(), sync.reconnect_cap_ms), ("wss://bridge.hospital.example/sync", 30_000));
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (MINIMAL.replace("version = 1", "version = 2"), "version is 2"),
            (MINIMAL.replace("/var/lib/edge-node", "data"), "absolute path"),
            (MINIMAL.replace("audience = \"medsync\"", "audience = \"medsync\"\nalgorithms = [\"HS256\"]"), "HS256"),
            (MINIMAL.replace("[auth]", "[auth]\ncolour = \"blue\""), "colour"),
            (MINIMAL.replace("ward = \"ward-4b\"", "ward = \"Ward 4B\""), "ward id"),
            (format!("{MINIMAL}\n[storage]\nreaders = 0"), "storage.readers"),
        ];
        for (text, expected) in cases {
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }
}
