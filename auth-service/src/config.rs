//! The auth service's configuration: versioned TOML, `AUTH_SERVICE__`
//! environment overrides, unknown fields refused; loaded and checked by
//! [`ServiceConfig`] like every service's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use service_kit::cloud::{MongoConfig, RedisConfig};
use service_kit::config::{ConfigError, ServiceConfig};
use service_kit::logging::LogConfig;
use sync_protocol::token::TokenPolicy;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthServiceConfig {
    pub version: u32,
    /// The `iss` of every token, and the base URL the metadata advertises.
    pub issuer: String,
    /// The `aud` of every token: what the bridge and the edge nodes expect.
    pub audience: String,
    /// The embedded store's directory (absolute).
    pub data_dir: PathBuf,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub tokens: TokenLifetimes,
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The distributed mode: accounts, keys and tokens in MongoDB, shared by
    /// every instance (without it, SQLite in `data_dir`, and one instance).
    pub mongodb: Option<MongoConfig>,
    /// Rate limits counted in Redis, across instances (without it, or while
    /// it does not answer, each instance counts alone).
    pub redis: Option<RedisConfig>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8590))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenLifetimes {
    /// Access tokens are short-lived: revocation reaches resource servers by
    /// polling, and expiry bounds the damage of a stolen token.
    pub access_token_ttl_s: i64,
    pub refresh_token_ttl_s: i64,
    /// A rotated key is published this long before it signs.
    pub key_publish_ahead_s: i64,
}

impl Default for TokenLifetimes {
    fn default() -> Self {
        Self { access_token_ttl_s: 300, refresh_token_ttl_s: 12 * 3_600, key_publish_ahead_s: 600 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Token requests per minute for one client or one user name.
    pub token_requests_per_minute: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self { token_requests_per_minute: 30 }
    }
}

impl ServiceConfig for AuthServiceConfig {
    const VERSION: u32 = 1;
    const ENV_PREFIX: &'static str = "AUTH_SERVICE__";

    fn version(&self) -> u32 {
        self.version
    }

    fn data_dir(&self) -> Option<&Path> {
        Some(&self.data_dir)
    }

    fn log(&self) -> &LogConfig {
        &self.log
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.issuer.is_empty() || self.audience.is_empty() {
            return Err(ConfigError::invalid("issuer and audience must not be empty"));
        }
        let t = &self.tokens;
        if t.access_token_ttl_s <= 0 || t.refresh_token_ttl_s <= 0 || t.key_publish_ahead_s < 0 {
            return Err(ConfigError::invalid("tokens: lifetimes must be positive"));
        }
        if self.rate_limit.token_requests_per_minute == 0 {
            return Err(ConfigError::invalid("rate_limit.token_requests_per_minute must be positive"));
        }
        Ok(())
    }

    fn summary(&self) -> String {
        let store = if self.mongodb.is_some() { "mongodb" } else { "embedded store" };
        let limits = if self.redis.is_some() { ", rate limits in redis" } else { "" };
        format!("issuer {}, {store}{limits}", self.issuer)
    }
}

impl AuthServiceConfig {
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("auth.db")
    }

    pub(crate) fn policy(&self) -> TokenPolicy {
        TokenPolicy {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            algorithms: vec![jsonwebtoken::Algorithm::EdDSA],
            leeway_s: 30,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configuration_is_valid() {
        let example = include_str!("../../deploy/auth-service.example.toml");
        let config = AuthServiceConfig::from_toml(example).unwrap();
        assert_eq!(config.tokens.access_token_ttl_s, 300);
        assert_eq!(config.audience, "medsync");
        assert!(config.mongodb.is_none() && config.redis.is_none(), "embedded by default");
        let distributed = AuthServiceConfig::from_toml(&test_fixtures::uncomment_from(example, "# [mongodb]")).unwrap();
        assert_eq!(distributed.mongodb.unwrap().database, "medsync_auth");
        assert_eq!(distributed.redis.unwrap().key_prefix, "medsync");
    }

    #[test]
    fn unknown_fields_and_relative_paths_are_refused() {
        let base = "version = 1\nissuer = \"i\"\naudience = \"a\"\n";
        assert!(AuthServiceConfig::from_toml(&format!("{base}data_dir = \"/x\"\ntypo = 1\n")).is_err());
        assert!(AuthServiceConfig::from_toml(&format!("{base}data_dir = \"x\"\n")).is_err());
        assert!(AuthServiceConfig::from_toml(&format!("{base}data_dir = \"/x\"\n")).is_ok());
    }
}
