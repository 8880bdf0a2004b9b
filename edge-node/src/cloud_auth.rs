//! The edge node's side of the auth service: its own client credentials
//! (from enrolment) and the access token they buy, the ward staff's
//! password hashes cached for outages, and offline logins.
//!
//! An offline login checks a password against the cached argon2 hash and
//! issues a token signed by this node's own key. Only this node knows that
//! key (it is pinned in its verifier, never published), so such a token is
//! worth nothing elsewhere; it carries `offline: true`, and every change
//! made with it is marked so in the audit trail.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use serde_json::json;
use service_kit::clock::now_s;
use service_kit::keys::{KeysError, write_atomically};
use service_kit::runtime::{ServeError, create_data_dir};
use service_kit::secrets;
use service_kit::signing::{SigningError, SigningKey};
use sync_protocol::ids::{NodeId, Role, UserId, WardId};
use sync_protocol::token::{self, AuthError, Verifier};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The node's OAuth2 client credentials, written by `edge-node enrol`.
pub const CLIENT_FILE: &str = "client.json";
/// The ward staff's password hashes, as last fetched.
pub const STAFF_FILE: &str = "staff-credentials.json";
/// This node's offline-login key (32 random bytes).
pub const OFFLINE_KEY_FILE: &str = "offline-signing.key";
/// An offline login lasts a shift.
const OFFLINE_TOKEN_TTL_S: i64 = 12 * 3_600;
/// The node's access token is renewed this long before it expires.
const NODE_TOKEN_RENEW_BEFORE_S: i64 = 60;
/// Offline login attempts per minute for one user name.
const OFFLINE_LOGINS_PER_MINUTE: u32 = 10;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCredentials {
    pub client_id: String,
    pub client_secret: String,
}

/// One staff member who may log in at this node during an outage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StaffCredential {
    pub username: UserId,
    pub roles: Vec<Role>,
    pub wards: Vec<WardId>,
    pub password_hash: String,
}

#[derive(Debug, Deserialize)]
struct StaffList {
    staff: Vec<StaffCredential>,
}

/// Why the node could not get a token, staff credentials or its enrolment.
#[derive(Debug, thiserror::Error)]
pub enum CloudAuthError {
    #[error("cannot read the node token {}: {source}", path.display())]
    TokenFile { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Credentials { path: PathBuf, source: serde_json::Error },
    #[error("{0}")]
    NoUrl(&'static str),
    #[error("auth service: {0}")]
    Http(#[from] reqwest::Error),
    #[error("auth service: {what}: {status}")]
    Status { what: &'static str, status: reqwest::StatusCode },
    #[error("auth service refused the node's credentials: {status} {error}")]
    Refused { status: reqwest::StatusCode, error: String },
    #[error("auth service answered without a token")]
    NoToken,
    #[error("staff credentials: {0}")]
    StaffList(serde_json::Error),
    #[error("the credentials are for {found}, but this node is {node}")]
    WrongNode { found: String, node: NodeId },
    #[error("the auth service's key set: {0}")]
    KeySet(#[from] AuthError),
    #[error(transparent)]
    Write(#[from] KeysError),
    #[error(transparent)]
    DataDir(#[from] ServeError),
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("invalid username or password")]
    Invalid,
    #[error("too many attempts; wait a minute")]
    Throttled,
    #[error("cannot check the password: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot issue a token: {0}")]
    Signing(#[from] SigningError),
}

pub struct CloudAuth {
    node: NodeId,
    ward: WardId,
    data_dir: PathBuf,
    url: Option<String>,
    issuer: String,
    audience: String,
    http: reqwest::Client,
    node_token: tokio::sync::Mutex<Option<(String, i64)>>,
    staff: RwLock<HashMap<UserId, StaffCredential>>,
    offline_key: SigningKey,
    logins: DefaultKeyedRateLimiter<String>,
}

impl std::fmt::Debug for CloudAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudAuth").field("node", &self.node).field("url", &self.url).finish_non_exhaustive()
    }
}

impl CloudAuth {
    /// Loads what is on disk (creating the offline-login key on first start)
    /// and pins the offline-login key in `verifier`.
    pub fn open(config: &Config, verifier: &Verifier) -> Result<Self, AuthError> {
        let data_dir = config.node.data_dir.clone();
        let offline_key = load_or_create_key(&data_dir.join(OFFLINE_KEY_FILE), &config.node.id)?;
        let jwks = json!({ "keys": [offline_key.public_jwk()] });
        verifier.pin_keys(&token::parse_jwks(&jwks.to_string())?)?;
        let staff = match std::fs::read_to_string(data_dir.join(STAFF_FILE)) {
            Ok(text) => {
                serde_json::from_str::<StaffList>(&text)
                    .map_err(|e| AuthError::Jwks(format!("{STAFF_FILE}: {e}")))?
                    .staff
            }
            Err(_) => Vec::new(),
        };
        let per_minute = NonZeroU32::new(OFFLINE_LOGINS_PER_MINUTE).unwrap_or(NonZeroU32::MIN);
        Ok(Self {
            node: config.node.id.clone(),
            ward: config.node.ward.clone(),
            url: config.auth.url.as_ref().map(|url| url.trim_end_matches('/').to_owned()),
            issuer: config.auth.policy.issuer.clone(),
            audience: config.auth.policy.audience.clone(),
            http: reqwest::Client::builder().timeout(FETCH_TIMEOUT).build().unwrap_or_default(),
            node_token: tokio::sync::Mutex::new(None),
            staff: RwLock::new(staff.into_iter().map(|s| (s.username.clone(), s)).collect()),
            offline_key,
            logins: RateLimiter::keyed(Quota::per_minute(per_minute)),
            data_dir,
        })
    }

    /// The node's bearer token: bought with its client credentials when it
    /// was enrolled, or read from `token_file` where IT placed one.
    pub async fn node_token(&self, token_file: &Path) -> Result<String, CloudAuthError> {
        let client_path = self.data_dir.join(CLIENT_FILE);
        let Ok(text) = std::fs::read_to_string(&client_path) else {
            let path = self.data_dir.join(token_file);
            return match std::fs::read_to_string(&path) {
                Ok(token) => Ok(token.trim().to_owned()),
                Err(source) => Err(CloudAuthError::TokenFile { path, source }),
            };
        };
        let mut cached = self.node_token.lock().await;
        if let Some((token, expires_at)) = cached.as_ref()
            && *expires_at - NODE_TOKEN_RENEW_BEFORE_S > now_s()
        {
            return Ok(token.clone());
        }
        let credentials: ClientCredentials = serde_json::from_str(&text)
            .map_err(|source| CloudAuthError::Credentials { path: client_path.clone(), source })?;
        let url = self
            .url
            .as_ref()
            .ok_or(CloudAuthError::NoUrl("the node has client credentials but [auth] url is not set"))?;
        let (token, expires_in) = client_token(&self.http, url, &credentials).await?;
        *cached = Some((token.clone(), now_s() + expires_in));
        Ok(token)
    }

    /// Drops the node token bought last: the bridge refused it (revoked,
    /// or expired early by a clock the node does not share), so the next
    /// connection buys a new one.
    pub async fn forget_node_token(&self) {
        *self.node_token.lock().await = None;
    }

    /// Fetches the ward staff's password hashes and keeps them on disk.
    async fn refresh_staff(&self, token_file: &Path) -> Result<usize, CloudAuthError> {
        let Some(url) = &self.url else { return Ok(0) };
        let token = self.node_token(token_file).await?;
        let response = self
            .http
            .get(format!("{url}/api/v1/wards/{}/staff-credentials", self.ward))
            .bearer_auth(token)
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(CloudAuthError::Status { what: "staff credentials", status: response.status() });
        }
        let text = response.text().await?;
        let list: StaffList = serde_json::from_str(&text).map_err(CloudAuthError::StaffList)?;
        write_atomically(&self.data_dir.join(STAFF_FILE), &text)?;
        let count = list.staff.len();
        if let Ok(mut staff) = self.staff.write() {
            *staff = list.staff.into_iter().map(|s| (s.username.clone(), s)).collect();
        }
        Ok(count)
    }

    /// Refreshes the staff credentials every `interval` until `stop`.
    pub fn spawn_refresh(self: &Arc<Self>, token_file: PathBuf, interval: Duration, stop: CancellationToken) {
        if self.url.is_none() {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = stop.cancelled() => return,
                }
                match this.refresh_staff(&token_file).await {
                    Ok(count) => tracing::debug!(count, "staff credentials refreshed"),
                    Err(error) => tracing::warn!(%error, "cannot refresh staff credentials; keeping the last ones"),
                }
            }
        });
    }

    /// Checks a password against the cached hash and issues an offline token.
    pub async fn offline_login(&self, username: &str, password: String) -> Result<(String, i64), LoginError> {
        self.logins.check_key(&username.to_owned()).map_err(|_| LoginError::Throttled)?;
        let found = username
            .parse::<UserId>()
            .ok()
            .and_then(|user| self.staff.read().ok().and_then(|staff| staff.get(&user).cloned()));
        let checked = found.clone();
        // As slow for an unknown name as for a wrong password.
        let matches = tokio::task::spawn_blocking(move || {
            let hash = checked.as_ref().map_or(secrets::decoy_hash(), |s| s.password_hash.as_str());
            secrets::verify_secret(&password, hash)
        })
        .await?;
        let staff = found.filter(|_| matches).ok_or(LoginError::Invalid)?;
        let now = now_s();
        let claims = json!({
            "iss": self.issuer, "aud": self.audience, "sub": staff.username, "roles": staff.roles,
            "wards": staff.wards, "iat": now, "nbf": now, "exp": now + OFFLINE_TOKEN_TTL_S,
            "jti": uuid::Uuid::now_v7().to_string(), "offline": true,
        });
        let token = self.offline_key.sign(&claims)?;
        tracing::info!(user = %staff.username, node = %self.node, "offline login");
        Ok((token, OFFLINE_TOKEN_TTL_S))
    }
}

/// An access token for the node from its client credentials, and its lifetime in seconds.
async fn client_token(
    http: &reqwest::Client,
    url: &str,
    credentials: &ClientCredentials,
) -> Result<(String, i64), CloudAuthError> {
    let response = http
        .post(format!("{url}/oauth/token"))
        .basic_auth(&credentials.client_id, Some(&credentials.client_secret))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await?;
    let status = response.status();
    let body: serde_json::Value = response.json().await?;
    if !status.is_success() {
        return Err(CloudAuthError::Refused { status, error: body["error"].to_string() });
    }
    let token = body["access_token"].as_str().ok_or(CloudAuthError::NoToken)?.to_owned();
    Ok((token, body["expires_in"].as_i64().unwrap_or(0)))
}

/// Enrols the node: checks its client credentials with the auth service,
/// and stores them and the auth service's key set in the data directory.
/// From then on the node serves and syncs with no manual step. Returns the
/// number of keys stored.
pub async fn enrol(config: &Config, credentials: &ClientCredentials) -> Result<usize, CloudAuthError> {
    let url = config
        .auth
        .url
        .as_deref()
        .ok_or(CloudAuthError::NoUrl("set [auth] url to the auth service before enrolling"))?;
    let url = url.trim_end_matches('/');
    if credentials.client_id != config.node.id.as_str() {
        return Err(CloudAuthError::WrongNode { found: credentials.client_id.clone(), node: config.node.id.clone() });
    }
    let http = reqwest::Client::builder().timeout(FETCH_TIMEOUT).build()?;
    client_token(&http, url, credentials).await?;
    let jwks = http.get(format!("{url}/.well-known/jwks.json")).send().await?.error_for_status()?.text().await?;
    let keys = token::parse_jwks(&jwks)?.keys.len();
    create_data_dir(&config.node.data_dir)?;
    write_atomically(&config.auth.jwks_path(&config.node.data_dir), &jwks)?;
    let credentials = json!({ "client_id": credentials.client_id, "client_secret": credentials.client_secret });
    write_atomically(&config.node.data_dir.join(CLIENT_FILE), &credentials.to_string())?;
    Ok(keys)
}

fn load_or_create_key(path: &Path, node: &NodeId) -> Result<SigningKey, AuthError> {
    let unreadable = |e: &dyn std::fmt::Display| AuthError::Jwks(format!("{}: {e}", path.display()));
    let seed: [u8; 32] = match std::fs::read(path) {
        Ok(bytes) => bytes.try_into().map_err(|_| unreadable(&"not a 32-byte key"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let seed: [u8; 32] = rand::random();
            write_private(path, &seed).map_err(|e| unreadable(&e))?;
            seed
        }
        Err(e) => return Err(unreadable(&e)),
    };
    SigningKey::from_seed(format!("offline-{node}"), &seed).map_err(|e| unreadable(&e))
}

/// Writes a file only its owner may read.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}
