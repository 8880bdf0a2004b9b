//! The token checks a service makes, from its configuration: the auth
//! service's key set (JWKS) and revocation list, kept on disk so a service
//! verifies tokens with no network, and refreshed from the auth service
//! while it is reachable.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sync_protocol::token::{self, AuthError, Principal, TokenPolicy, Verifier};
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;

/// The revocation list as last fetched, beside the key set.
const REVOCATIONS_FILE: &str = "revocations.json";
/// A first start without a key set waits this long for the auth service.
const FIRST_FETCH_ATTEMPTS_MAX: u32 = 30;
const FIRST_FETCH_RETRY_DELAY: Duration = Duration::from_secs(2);
/// How long one fetch from the auth service may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the key set or revocation list could not be fetched or kept.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{url}: {source}")]
    Fetch { url: String, source: reqwest::Error },
    #[error("{url}: answered {status}")]
    Status { url: String, status: reqwest::StatusCode },
    #[error("the fetched key set is unusable: {0}")]
    KeySet(#[from] AuthError),
    #[error("the revocation list is unreadable: {0}")]
    Revocations(serde_json::Error),
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot start an http client: {0}")]
    Client(reqwest::Error),
}

/// The `[auth]` section of a service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(flatten)]
    pub policy: TokenPolicy,
    /// The auth service's JWKS; a relative path is inside the data directory.
    #[serde(default = "default_jwks_file")]
    pub jwks_file: PathBuf,
    /// The auth service's base URL. When set, the key set and the revocation
    /// list are refreshed from it every `refresh_interval_s`; when not, the
    /// key set on disk is all there is and no token can be revoked early.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default = "default_refresh_interval_s")]
    pub refresh_interval_s: u64,
}

fn default_jwks_file() -> PathBuf {
    PathBuf::from("jwks.json")
}

fn default_refresh_interval_s() -> u64 {
    60
}

/// The revocation list as the auth service serves it.
#[derive(Debug, Deserialize)]
struct Revocations {
    revoked: Vec<Revoked>,
    /// Accounts whose every token is refused; absent from lists of
    /// auth services before accounts could be disabled.
    #[serde(default)]
    disabled_accounts: Vec<String>,
}

impl Revocations {
    fn apply(self, verifier: &Verifier) {
        verifier.replace_revoked(self.revoked.into_iter().map(|r| r.jti), self.disabled_accounts);
    }
}

#[derive(Debug, Deserialize)]
struct Revoked {
    jti: String,
}

impl AuthConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: &dyn std::fmt::Display| ConfigError::invalid(format!("auth: {message}"));
        self.policy.validate().map_err(|e| invalid(&e))?;
        if self.url.as_deref().is_some_and(|url| !url.starts_with("http://") && !url.starts_with("https://")) {
            return Err(invalid(&"url must start with http:// or https://"));
        }
        if self.refresh_interval_s == 0 {
            return Err(invalid(&"refresh_interval_s must be positive"));
        }
        Ok(())
    }

    pub fn jwks_path(&self, data_dir: &Path) -> PathBuf {
        data_dir.join(&self.jwks_file)
    }

    /// A verifier with the key set and revocation list found under `data_dir`.
    pub fn verifier(&self, data_dir: &Path) -> Result<Verifier, AuthError> {
        let path = self.jwks_path(data_dir);
        let text = std::fs::read_to_string(&path).map_err(|e| AuthError::Jwks(format!("{}: {e}", path.display())))?;
        let verifier = Verifier::new(&self.policy, &token::parse_jwks(&text)?)?;
        if let Ok(text) = std::fs::read_to_string(data_dir.join(REVOCATIONS_FILE)) {
            let revocations: Revocations =
                serde_json::from_str(&text).map_err(|e| AuthError::Jwks(format!("{REVOCATIONS_FILE}: {e}")))?;
            revocations.apply(&verifier);
        }
        Ok(verifier)
    }

    /// Fetches the key set from the auth service if none is on disk yet (a
    /// cloud service's first start), retrying while the auth service starts.
    pub async fn fetch_jwks_if_missing(&self, data_dir: &Path) -> Result<(), KeysError> {
        let (path, Some(url)) = (self.jwks_path(data_dir), self.url.as_deref()) else { return Ok(()) };
        if path.exists() {
            return Ok(());
        }
        let client = reqwest::Client::builder().timeout(FETCH_TIMEOUT).build().map_err(KeysError::Client)?;
        let url = format!("{}/.well-known/jwks.json", url.trim_end_matches('/'));
        let mut attempt = 0;
        loop {
            match fetch(&client, &url).await.and_then(|jwks| {
                token::parse_jwks(&jwks)?;
                Ok(jwks)
            }) {
                Ok(jwks) => return write_atomically(&path, &jwks),
                Err(error) if attempt < FIRST_FETCH_ATTEMPTS_MAX => {
                    tracing::warn!(%error, attempt, "no key set on disk yet and the auth service did not answer; retrying");
                    attempt += 1;
                    tokio::time::sleep(FIRST_FETCH_RETRY_DELAY).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Refreshes the key set and revocation list from the auth service
    /// every `refresh_interval_s` until `stop`, if a URL is configured. A
    /// failed refresh keeps what was last fetched.
    pub fn spawn_refresh(&self, data_dir: &Path, verifier: Arc<Verifier>, stop: CancellationToken) {
        let Some(url) = self.url.clone() else { return };
        let (jwks_path, data_dir) = (self.jwks_path(data_dir), data_dir.to_path_buf());
        let interval = Duration::from_secs(self.refresh_interval_s);
        tokio::spawn(async move {
            let client = reqwest::Client::builder().timeout(FETCH_TIMEOUT).build().unwrap_or_default();
            let base = url.trim_end_matches('/');
            let mut ticks = tokio::time::interval(interval);
            let mut healthy = true;
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let refreshed = refresh_once(&client, base, &jwks_path, &data_dir, &verifier).await;
                match (&refreshed, healthy) {
                    (Err(error), true) => {
                        tracing::warn!(%error, "cannot refresh the auth service's keys; keeping the last ones")
                    }
                    (Ok(()), false) => tracing::info!("auth service keys refreshed again"),
                    _ => {}
                }
                healthy = refreshed.is_ok();
            }
        });
    }
}

async fn refresh_once(
    client: &reqwest::Client,
    base: &str,
    jwks_path: &Path,
    data_dir: &Path,
    verifier: &Verifier,
) -> Result<(), KeysError> {
    let jwks = fetch(client, &format!("{base}/.well-known/jwks.json")).await?;
    verifier.replace_keys(&token::parse_jwks(&jwks)?)?;
    write_atomically(jwks_path, &jwks)?;
    let revocations = fetch(client, &format!("{base}/oauth/revocations")).await?;
    let parsed: Revocations = serde_json::from_str(&revocations).map_err(KeysError::Revocations)?;
    parsed.apply(verifier);
    write_atomically(&data_dir.join(REVOCATIONS_FILE), &revocations)
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<String, KeysError> {
    let failed = |source| KeysError::Fetch { url: url.to_owned(), source };
    let response = client.get(url).send().await.map_err(failed)?;
    if !response.status().is_success() {
        return Err(KeysError::Status { url: url.to_owned(), status: response.status() });
    }
    response.text().await.map_err(failed)
}

/// Writes `contents` to `path` through a temporary file and a rename, so a
/// crash leaves the old file or the new one, never half of one. Readable by
/// the owner only: these files hold credentials and password hashes.
pub fn write_atomically(path: &Path, contents: &str) -> Result<(), KeysError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temporary = path.with_extension("tmp");
    let written = (|| {
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    written.map_err(|source| KeysError::Write { path: path.to_owned(), source })
}

/// How often an open session (a live feed, a sync link) checks its token
/// against the revocation list. The list itself changes at most once per
/// `refresh_interval_s`, so a revoked token's sessions end within that
/// interval plus this one; the check is a set lookup.
pub const SESSION_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Completes, with the reason, once the token `principal` was verified from
/// no longer holds: revoked since, or expired (after the leeway). A session
/// opened with a token lives no longer than the token.
pub async fn token_lapses(verifier: &Verifier, principal: &Principal) -> AuthError {
    loop {
        let now = crate::clock::now_s();
        if let Err(error) = verifier.still_valid(principal, now) {
            return error;
        }
        let until_expiry = u64::try_from(verifier.valid_until(principal) - now).unwrap_or(0);
        tokio::time::sleep(SESSION_CHECK_INTERVAL.min(Duration::from_secs(until_expiry))).await;
    }
}
