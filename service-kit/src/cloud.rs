//! Clients of the cloud's shared services, set up one way for every
//! service that uses them (the distributed store, the projector, the auth
//! service): MongoDB (Atlas in production) and Redis. The edge node does
//! not enable this module's feature and builds neither driver.

use std::time::Duration;

use mongodb::options::{ClientOptions, DatabaseOptions, WriteConcern};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Deserialize;

/// How long a request waits for a usable MongoDB server before it fails:
/// a request or a projector round then fails fast and is retried.
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The `[mongodb]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoConfig {
    /// A MongoDB connection string (Atlas: `mongodb+srv://...`).
    pub uri: String,
    #[serde(default = "default_database")]
    pub database: String,
    /// Write concern of every write: `majority` (survives a primary's loss) or `1`.
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

/// The `[redis]` section.
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

fn default_database() -> String {
    "medsync".into()
}

fn default_key_prefix() -> String {
    "medsync".into()
}

fn default_cache_ttl_s() -> u64 {
    300
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("mongodb.uri is not usable: {0}")]
    MongoUri(mongodb::error::Error),
    #[error("redis.url is not usable: {0}")]
    RedisUrl(redis::RedisError),
}

/// The configured database, with its write concern, for a client named
/// `app_name` (it shows in MongoDB's logs and Atlas' metrics). Connects
/// lazily: MongoDB may be down now.
pub async fn mongo_database(config: &MongoConfig, app_name: &str) -> Result<mongodb::Database, ClientError> {
    let mut options = ClientOptions::parse(&config.uri).await.map_err(ClientError::MongoUri)?;
    options.app_name = Some(app_name.to_owned());
    options.server_selection_timeout = Some(SERVER_SELECTION_TIMEOUT);
    options.connect_timeout = Some(CONNECT_TIMEOUT);
    let client = mongodb::Client::with_options(options).map_err(ClientError::MongoUri)?;
    let write_concern = match config.write_concern {
        WriteConcernLevel::Majority => WriteConcern::majority(),
        WriteConcernLevel::Primary => WriteConcern::nodes(1),
    };
    Ok(client.database_with_options(&config.database, DatabaseOptions::builder().write_concern(write_concern).build()))
}

/// A client of `config.url` and a connection manager over it that gives up
/// on an answer after `timeout` and retries once. Connects lazily: Redis
/// may be down now, and callers degrade without it.
pub fn redis_connection(
    config: &RedisConfig,
    timeout: Duration,
) -> Result<(redis::Client, ConnectionManager), ClientError> {
    let client = redis::Client::open(config.url.as_str()).map_err(ClientError::RedisUrl)?;
    let manager = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    let connection = ConnectionManager::new_lazy_with_config(client.clone(), manager).map_err(ClientError::RedisUrl)?;
    Ok((client, connection))
}
