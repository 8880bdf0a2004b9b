//! The auth service: an OAuth2 token endpoint, separate from the tickets
//! API. It issues short-lived EdDSA-signed JWTs; the bridge and the edge
//! nodes verify them with the public keys it publishes (JWKS) and never
//! call it per request, so an edge keeps verifying while the cloud is away.
//!
//! Endpoints:
//! - `POST /oauth/token` (RFC 6749), form-encoded, grants:
//!   `client_credentials` (edge nodes, integrations; client secret by HTTP
//!   Basic or in the form), `password` (first-party staff apps: the legacy
//!   grant, kept because ward devices have no browser flow; it answers the
//!   same whether the user is unknown or the password wrong) and
//!   `refresh_token` (rotated on every use; presenting a spent one revokes
//!   its whole family). Rate limited per client and per user.
//! - `POST /oauth/revoke` (RFC 7009): a refresh token (its family) or an
//!   access token (its `jti`, published in the revocation list).
//! - `POST /oauth/introspect` (RFC 7662), for authenticated clients.
//! - `GET /.well-known/jwks.json`, `GET /.well-known/oauth-authorization-server` (RFC 8414).
//! - `GET /oauth/revocations`: access tokens revoked before expiry (ids and
//!   expiry only) and the disabled accounts (`auth-service disable-account`),
//!   which resource servers poll.
//! - `GET /api/v1/wards/{ward}/staff-credentials`: for the edge node of
//!   that ward, the argon2 hashes of its staff's passwords, so staff can log
//!   in at the edge during an outage.
//! - `GET /healthz` (alive), `GET /readyz` (its store answers).
//!
//! Storage: SQLite in `data_dir` (one instance), or with `[mongodb]` the
//! accounts, keys and tokens in MongoDB and with `[redis]` the rate limits
//! in Redis, shared by any number of instances.
//!
//! This crate owns accounts, keys and tokens. It must never hold ticket
//! data or build the CRDT or the change stream (it uses the core without its
//! `document` feature; `tests/tests/layout.rs` checks its dependencies), and
//! never stores a secret in a form that logs anyone in.

pub mod config;
pub mod keys;
pub mod store;
mod throttle;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::{Value, json};
use service_kit::clock::now_s;
use service_kit::http::{Refusal, Severity, ShapedRefusal, log_refusals, reshape_refusals};
use service_kit::runtime::{ServeError, create_data_dir};
use service_kit::secrets;
use sync_protocol::ids::{Role, WardId};
use sync_protocol::token::{self, Principal, Verifier};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::store::{Account, AccountKind, AuthStore, AuthStoreError, RefreshUse};
use self::throttle::Throttle;
pub use crate::config::AuthServiceConfig;

/// Largest form a token, revoke or introspect request may send.
const FORM_BYTES_MAX: usize = 8 * 1024;
/// How long shutdown waits for in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Opens the store (MongoDB with `[mongodb]`, else SQLite in the data
/// directory, which is created), and adds a first signing key if it has none.
pub async fn open_store(config: &AuthServiceConfig) -> Result<AuthStore, ServeError> {
    let store = match &config.mongodb {
        Some(mongodb) => AuthStore::mongo(mongodb).await.map_err(ServeError::store)?,
        None => {
            create_data_dir(&config.data_dir)?;
            AuthStore::sqlite(&config.database_path()).map_err(ServeError::store)?
        }
    };
    if store.keys().await.map_err(ServeError::store)?.is_empty() {
        let (kid, _) = store.add_key(now_s()).await.map_err(ServeError::store)?;
        tracing::info!(%kid, "created the first signing key");
    }
    Ok(store)
}

#[derive(Clone)]
pub struct AuthState {
    config: Arc<AuthServiceConfig>,
    store: AuthStore,
    throttle: Throttle,
}

impl std::fmt::Debug for AuthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthState").field("issuer", &self.config.issuer).finish_non_exhaustive()
    }
}

impl AuthState {
    pub fn new(config: AuthServiceConfig, store: AuthStore) -> Result<Self, ServeError> {
        let throttle = Throttle::new(config.rate_limit.token_requests_per_minute, config.redis.as_ref())
            .map_err(ServeError::store)?;
        Ok(Self { config: Arc::new(config), store, throttle })
    }
}

pub async fn run(
    config: AuthServiceConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let store = open_store(&config).await?;
    let state = AuthState::new(config, store)?;
    let stop = CancellationToken::new();
    service_kit::shutdown::cancel_when(stop.clone(), shutdown);
    state.throttle.sweep_until(stop.clone());
    tracing::info!(address = %listener.local_addr()?, issuer = %state.config.issuer, "auth service serving");
    service_kit::shutdown::serve_until(listener, router(state), stop, SHUTDOWN_GRACE).await?;
    tracing::info!("auth service stopped");
    Ok(())
}

pub fn router(state: AuthState) -> Router {
    Router::new()
        .route("/oauth/token", post(token_endpoint))
        .route("/oauth/revoke", post(revoke_endpoint))
        .route("/oauth/introspect", post(introspect_endpoint))
        .route("/oauth/revocations", get(revocations))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/api/v1/wards/{ward}/staff-credentials", get(staff_credentials))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .layer(axum::extract::DefaultBodyLimit::max(FORM_BYTES_MAX))
        .layer(axum::middleware::from_fn(|request, next| {
            // RFC 6749's shape; its own name for a failure on this side.
            reshape_refusals(request, next, |status, code, message| {
                let code = if status.is_server_error() { "server_error" } else { code };
                OAuthError::new(status, code, message).into_response()
            })
        }))
        .layer(axum::middleware::from_fn(log_refusals))
        .with_state(state)
}

/// Ready when the store answers (it holds the signing keys every token needs).
async fn ready(State(state): State<AuthState>) -> Result<&'static str, OAuthError> {
    match state.store.keys().await {
        Ok(keys) if !keys.is_empty() => Ok("ready"),
        _ => Err(OAuthError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "the store is not answering",
        )),
    }
}

/// An RFC 6749 error response: `{"error", "error_description"}`.
#[derive(Debug)]
pub struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
    /// What the log gets (by the `log_refusals` layer) and the caller does not.
    detail: Option<Refusal>,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Self { status, error, description: description.into(), detail: None }
    }

    fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    fn invalid_client() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", "client authentication failed")
    }

    fn invalid_grant(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }

    fn internal(error: impl std::fmt::Display) -> Self {
        let mut refusal =
            Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal error; it has been logged");
        refusal.detail = Some(Refusal { severity: Severity::Error, code: "server_error", detail: error.to_string() });
        refusal
    }
}

impl From<AuthStoreError> for OAuthError {
    fn from(error: AuthStoreError) -> Self {
        Self::internal(error)
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.error, "error_description": self.description }));
        let mut response = (self.status, no_store(), body).into_response();
        match self.status {
            StatusCode::UNAUTHORIZED => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"medsync\""));
            }
            StatusCode::TOO_MANY_REQUESTS => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            }
            _ => {}
        }
        response.extensions_mut().insert(ShapedRefusal);
        if let Some(refusal) = self.detail {
            response.extensions_mut().insert(refusal);
        }
        response
    }
}

fn no_store() -> [(header::HeaderName, HeaderValue); 2] {
    [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (header::PRAGMA, HeaderValue::from_static("no-cache")),
    ]
}

/// The fields of the token, revoke and introspect forms.
#[derive(Debug, Default, Deserialize)]
struct Form {
    grant_type: Option<String>,
    username: Option<String>,
    password: Option<String>,
    refresh_token: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    scope: Option<String>,
    token: Option<String>,
    token_type_hint: Option<String>,
}

fn parse_form(headers: &HeaderMap, body: &Bytes) -> Result<Form, OAuthError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        return Err(OAuthError::invalid_request("send the request as application/x-www-form-urlencoded"));
    }
    serde_urlencoded::from_bytes(body).map_err(|e| OAuthError::invalid_request(format!("malformed form: {e}")))
}

/// Client credentials from HTTP Basic or the form, if any were sent.
fn client_credentials(headers: &HeaderMap, form: &Form) -> Result<Option<(String, String)>, OAuthError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let encoded =
            value.to_str().ok().and_then(|v| v.strip_prefix("Basic ")).ok_or_else(OAuthError::invalid_client)?;
        let decoded = STANDARD.decode(encoded.trim()).map_err(|_| OAuthError::invalid_client())?;
        let text = String::from_utf8(decoded).map_err(|_| OAuthError::invalid_client())?;
        let (id, secret) = text.split_once(':').ok_or_else(OAuthError::invalid_client)?;
        return Ok(Some((id.to_owned(), secret.to_owned())));
    }
    match (&form.client_id, &form.client_secret) {
        (Some(id), Some(secret)) => Ok(Some((id.clone(), secret.clone()))),
        _ => Ok(None),
    }
}

impl AuthState {
    async fn throttle(&self, key: String) -> Result<(), OAuthError> {
        if self.throttle.allow(&key).await {
            return Ok(());
        }
        tracing::warn!(%key, "token requests rate limited");
        Err(OAuthError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", "too many attempts; wait a minute"))
    }

    /// Checks a secret against an account, taking as long whether or not the
    /// account exists.
    async fn authenticate(
        &self,
        name: String,
        secret: String,
        kind: AccountKind,
    ) -> Result<Option<Account>, OAuthError> {
        let account = {
            let name = name.clone();
            self.store.account(&name, kind).await?
        };
        tokio::task::spawn_blocking(move || {
            let hash = account.as_ref().map_or(secrets::decoy_hash(), |a| a.secret_hash.as_str());
            let matches = secrets::verify_secret(&secret, hash);
            account.filter(|_| matches)
        })
        .await
        .map_err(OAuthError::internal)
    }

    async fn authenticate_client(&self, headers: &HeaderMap, form: &Form) -> Result<Option<Account>, OAuthError> {
        let Some((id, secret)) = client_credentials(headers, form)? else { return Ok(None) };
        self.throttle(format!("client:{id}")).await?;
        match self.authenticate(id, secret, AccountKind::Client).await? {
            Some(client) => Ok(Some(client)),
            None => Err(OAuthError::invalid_client()),
        }
    }

    /// Signs an access token for `account`.
    async fn access_token(&self, account: &Account, client_id: Option<&str>) -> Result<(String, String), OAuthError> {
        let now = now_s();
        let keys = self.store.keys().await?;
        let key = keys::active(&keys, now).ok_or_else(|| OAuthError::internal("no active signing key"))?;
        let signer = key.signing_key().map_err(OAuthError::internal)?;
        let jti = uuid::Uuid::now_v7().to_string();
        let claims = json!({
            "iss": self.config.issuer, "aud": self.config.audience, "sub": account.name,
            "roles": account.roles, "wards": account.wards, "client_id": client_id,
            "iat": now, "nbf": now, "exp": now + self.config.tokens.access_token_ttl_s, "jti": jti,
        });
        Ok((signer.sign(&claims).map_err(OAuthError::internal)?, jti))
    }

    async fn refresh_token(&self, family: String, subject: String) -> Result<String, OAuthError> {
        let token = secrets::generate_secret();
        let (stored, expires_at) = (token.clone(), now_s() + self.config.tokens.refresh_token_ttl_s);
        self.store.insert_refresh(&stored, &family, &subject, expires_at).await?;
        Ok(token)
    }

    /// Spends a refresh token (rotation: a spent one presented again
    /// revokes its family) and returns its user as the account is now, not
    /// as it was at login, with the token's family.
    async fn refreshed(&self, presented: &str) -> Result<(Account, String), OAuthError> {
        self.throttle(format!("refresh:{}", &store::refresh_digest(presented)[..16])).await?;
        let (family, subject) = match self.store.use_refresh(presented, now_s()).await? {
            RefreshUse::Valid { family, subject } => (family, subject),
            RefreshUse::Reused => {
                tracing::warn!("a spent refresh token was presented again; its family is revoked");
                return Err(OAuthError::invalid_grant("the refresh token was already used; log in again"));
            }
            RefreshUse::Invalid => return Err(OAuthError::invalid_grant("the refresh token is invalid or expired")),
        };
        let user = self.store.account(&subject, AccountKind::User).await?;
        let user = user.ok_or_else(|| OAuthError::invalid_grant("the account no longer exists or is disabled"))?;
        Ok((user, family))
    }

    /// A verifier of this service's own tokens, with the keys published now.
    async fn own_verifier(&self) -> Result<Verifier, OAuthError> {
        let keys = self.store.keys().await?;
        let jwks = keys::jwks(&keys, now_s(), self.config.tokens.access_token_ttl_s);
        let jwks = token::parse_jwks(&jwks.to_string()).map_err(OAuthError::internal)?;
        let verifier = Verifier::new(&self.config.policy(), &jwks).map_err(OAuthError::internal)?;
        let revoked = self.store.revoked_access(now_s()).await?;
        verifier.replace_revoked(revoked.into_iter().map(|(jti, _)| jti), self.store.disabled_accounts().await?);
        Ok(verifier)
    }
}

async fn token_endpoint(
    State(state): State<AuthState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let form = parse_form(&headers, &body)?;
    if form.scope.as_deref().is_some_and(|scope| !scope.trim().is_empty()) {
        return Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "scopes are not used: roles and wards come from the account",
        ));
    }
    let client = state.authenticate_client(&headers, &form).await?;
    let client_id = client.as_ref().map(|c| c.name.clone());
    let (account, family) = match form.grant_type.as_deref() {
        Some("client_credentials") => {
            let client = client.ok_or_else(OAuthError::invalid_client)?;
            (client, None)
        }
        Some("password") => {
            let (Some(username), Some(password)) = (form.username, form.password) else {
                return Err(OAuthError::invalid_request("the password grant needs username and password"));
            };
            state.throttle(format!("user:{username}")).await?;
            let user = state.authenticate(username.clone(), password, AccountKind::User).await?;
            let user = user.ok_or_else(|| {
                tracing::info!(%username, "password login failed");
                OAuthError::invalid_grant("invalid username or password")
            })?;
            let family = uuid::Uuid::now_v7().to_string();
            (user, Some(family))
        }
        Some("refresh_token") => {
            let presented =
                form.refresh_token.ok_or_else(|| OAuthError::invalid_request("refresh_token is missing"))?;
            let (user, family) = state.refreshed(&presented).await?;
            (user, Some(family))
        }
        Some(other) => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                format!("grant type {other:?} is not supported"),
            ));
        }
        None => return Err(OAuthError::invalid_request("grant_type is missing")),
    };
    let (access_token, _) = state.access_token(&account, client_id.as_deref()).await?;
    let mut body = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": state.config.tokens.access_token_ttl_s,
    });
    if let Some(family) = family {
        body["refresh_token"] = Value::from(state.refresh_token(family, account.name.clone()).await?);
    }
    tracing::info!(subject = %account.name, grant = form.grant_type.as_deref().unwrap_or_default(), "token issued");
    Ok((no_store(), Json(body)).into_response())
}

/// RFC 7009: answers 200 whether or not the token was known.
async fn revoke_endpoint(
    State(state): State<AuthState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let form = parse_form(&headers, &body)?;
    state.authenticate_client(&headers, &form).await?;
    let token = form.token.ok_or_else(|| OAuthError::invalid_request("token is missing"))?;
    let presented = token.clone();
    let was_refresh = state.store.revoke_refresh_family(&presented).await?;
    if !was_refresh
        && let Ok(principal) = state.own_verifier().await?.verify(&token, now_s())
        && let Some(jti) = principal.jti
    {
        let expires_at = principal.expires_at;
        state.store.revoke_access(&jti, expires_at).await?;
        tracing::info!(subject = %principal.user, "access token revoked");
    }
    Ok((StatusCode::OK, no_store()).into_response())
}

/// RFC 7662, for authenticated clients only.
async fn introspect_endpoint(
    State(state): State<AuthState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let form = parse_form(&headers, &body)?;
    state.authenticate_client(&headers, &form).await?.ok_or_else(OAuthError::invalid_client)?;
    let token = form.token.ok_or_else(|| OAuthError::invalid_request("token is missing"))?;
    let inactive = || Ok((no_store(), Json(json!({ "active": false }))).into_response());
    if form.token_type_hint.as_deref() != Some("access_token") {
        let presented = token.clone();
        if let Some((subject, exp)) = state.store.refresh_subject(&presented, now_s()).await? {
            let body = json!({ "active": true, "token_type": "refresh_token", "sub": subject, "exp": exp, "iss": state.config.issuer });
            return Ok((no_store(), Json(body)).into_response());
        }
    }
    let Ok(principal) = state.own_verifier().await?.verify(&token, now_s()) else { return inactive() };
    let Principal { user, roles, wards, jti, expires_at, .. } = principal;
    let body = json!({
        "active": true, "token_type": "Bearer", "sub": user, "roles": roles, "wards": wards, "jti": jti,
        "exp": expires_at, "iss": state.config.issuer, "aud": state.config.audience,
    });
    Ok((no_store(), Json(body)).into_response())
}

async fn jwks(State(state): State<AuthState>) -> Result<Response, OAuthError> {
    let keys = state.store.keys().await?;
    let body = keys::jwks(&keys, now_s(), state.config.tokens.access_token_ttl_s);
    Ok(([(header::CACHE_CONTROL, HeaderValue::from_static("max-age=60"))], Json(body)).into_response())
}

async fn revocations(State(state): State<AuthState>) -> Result<Json<Value>, OAuthError> {
    let revoked = state.store.revoked_access(now_s()).await?;
    let revoked: Vec<Value> = revoked.into_iter().map(|(jti, exp)| json!({ "jti": jti, "exp": exp })).collect();
    let disabled = state.store.disabled_accounts().await?;
    Ok(Json(json!({ "revoked": revoked, "disabled_accounts": disabled })))
}

async fn metadata(State(state): State<AuthState>) -> Json<Value> {
    let base = state.config.issuer.trim_end_matches('/');
    Json(json!({
        "issuer": state.config.issuer,
        "token_endpoint": format!("{base}/oauth/token"),
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "revocation_endpoint": format!("{base}/oauth/revoke"),
        "introspection_endpoint": format!("{base}/oauth/introspect"),
        "grant_types_supported": ["client_credentials", "password", "refresh_token"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "token_endpoint_auth_signing_alg_values_supported": ["EdDSA"],
        // No authorization endpoint: there is no browser flow.
        "response_types_supported": [],
    }))
}

/// For the edge node of `ward`: its staff's password hashes, for logins at
/// the edge while the cloud is unreachable.
async fn staff_credentials(
    State(state): State<AuthState>,
    UrlPath(ward): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, OAuthError> {
    let ward: WardId = ward.parse().map_err(|e| OAuthError::invalid_request(format!("ward: {e}")))?;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            OAuthError::new(StatusCode::UNAUTHORIZED, "invalid_token", "send the edge node's bearer token")
        })?;
    let principal = state
        .own_verifier()
        .await?
        .verify(bearer, now_s())
        .map_err(|e| OAuthError::new(StatusCode::UNAUTHORIZED, "invalid_token", e.to_string()))?;
    if principal.acting_role(|role| role == Role::EdgeNode).is_none() || !principal.wards.contains(&ward) {
        return Err(OAuthError::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            format!("not the edge node of {ward}"),
        ));
    }
    let lookup = ward.clone();
    let staff = state.store.ward_staff(&lookup).await?;
    let staff: Vec<Value> = staff
        .into_iter()
        .map(|a| json!({ "username": a.name, "roles": a.roles, "wards": a.wards, "password_hash": a.secret_hash }))
        .collect();
    Ok(Json(json!({ "ward": ward, "staff": staff })))
}
