//! Token requests per minute, per client and per user name. With Redis the
//! count is shared by every auth service instance (a fixed window per
//! minute: `INCR` and `EXPIRE`); without it, or while Redis does not
//! answer, each instance counts alone, so a limit still holds per instance.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use redis::aio::ConnectionManager;
use service_kit::clock::now_s;
use service_kit::cloud::{ClientError, RedisConfig};
use tokio_util::sync::CancellationToken;

/// How long the local limiter remembers an idle key.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// A Redis answer later than this counts as none: the local limiter decides.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// The window of a Redis count, and how long its key lives after.
const WINDOW_S: i64 = 60;

#[derive(Clone)]
pub struct Throttle {
    per_minute: u32,
    local: Arc<DefaultKeyedRateLimiter<String>>,
    shared: Option<(ConnectionManager, String)>,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle").field("per_minute", &self.per_minute).finish_non_exhaustive()
    }
}

impl Throttle {
    pub fn new(per_minute: u32, redis: Option<&RedisConfig>) -> Result<Self, ClientError> {
        let quota = Quota::per_minute(NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN));
        let shared = match redis {
            Some(config) => {
                let (_, connection) = service_kit::cloud::redis_connection(config, REDIS_TIMEOUT)?;
                Some((connection, config.key_prefix.clone()))
            }
            None => None,
        };
        Ok(Self { per_minute, local: Arc::new(RateLimiter::keyed(quota)), shared })
    }

    /// Whether one more request under `key` is allowed now.
    pub async fn allow(&self, key: &str) -> bool {
        if let Some((connection, prefix)) = &self.shared {
            let window = now_s() / WINDOW_S;
            let counter = format!("{{{prefix}}}:auth-rate:{key}:{window}");
            let mut connection = connection.clone();
            let mut count = redis::pipe();
            count.incr(&counter, 1).expire(&counter, WINDOW_S * 2).ignore();
            match tokio::time::timeout(REDIS_TIMEOUT, count.query_async::<(u32,)>(&mut connection)).await {
                Ok(Ok((count,))) => return count <= self.per_minute,
                Ok(Err(error)) => tracing::debug!(%error, "redis rate limit unavailable; counting locally"),
                Err(_) => tracing::debug!("redis rate limit too slow; counting locally"),
            }
        }
        self.local.check_key(&key.to_owned()).is_ok()
    }

    /// Forgets idle local keys now and then, until `stop`.
    pub fn sweep_until(&self, stop: CancellationToken) {
        let local = Arc::clone(&self.local);
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = sweep.tick() => local.retain_recent(),
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
}
