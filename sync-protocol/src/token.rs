//! Bearer token verification with public keys only, shared by every
//! service that accepts tokens (edge nodes, the bridge).
//!
//! Resource servers never hold a signing key. They verify JWTs issued by the
//! auth service against a JWKS (an edge node keeps it on disk, so
//! verification keeps working while the cloud is unreachable). A token is accepted only when: its header
//! names an algorithm from the configured (asymmetric) list and a `kid` in the
//! JWKS whose key type matches that algorithm; the signature verifies; `iss`,
//! `aud`, `exp` (and `nbf` if present) hold, with a small leeway for clock
//! drift; and `sub` and `roles` are well formed. `alg=none` cannot be
//! expressed (the header does not parse), and an HMAC token signed with the
//! public key as secret is refused because HMAC is never configured.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::ids::{Role, UserId, WardId};

/// What a token must satisfy besides its signature.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPolicy {
    /// The `iss` every token must carry.
    pub issuer: String,
    /// The `aud` every token must carry.
    pub audience: String,
    /// Accepted signature algorithms; asymmetric only (see [`TokenPolicy::validate`]).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp` and `nbf`: ward hardware clocks drift.
    #[serde(default = "default_leeway_s")]
    pub leeway_s: u64,
}

fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::EdDSA, Algorithm::ES256]
}

fn default_leeway_s() -> u64 {
    30
}

impl TokenPolicy {
    /// Refuses a policy that could be tricked: an HMAC algorithm would let
    /// anyone holding the public JWKS forge tokens.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.issuer.is_empty() || self.audience.is_empty() {
            return Err(PolicyError::Unnamed);
        }
        if self.algorithms.is_empty() {
            return Err(PolicyError::NoAlgorithm);
        }
        match self.algorithms.iter().find(|a| !matches!(a, Algorithm::EdDSA | Algorithm::ES256 | Algorithm::ES384)) {
            Some(alg) => Err(PolicyError::AlgorithmNotAllowed(*alg)),
            None => Ok(()),
        }
    }
}

/// Why a [`TokenPolicy`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("issuer and audience must not be empty")]
    Unnamed,
    #[error("algorithms must name at least one algorithm")]
    NoAlgorithm,
    #[error("algorithm {0:?} is not allowed; use EdDSA, ES256 or ES384")]
    AlgorithmNotAllowed(Algorithm),
}

/// Why a token was refused. Deliberately coarse towards the caller (see
/// [`AuthError::code`]); the log gets the detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("the authorization header is not a bearer token")]
    NotBearer,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token algorithm {0:?} is not accepted")]
    AlgorithmNotAllowed(Algorithm),
    #[error("token names no key id")]
    MissingKeyId,
    #[error("token names unknown key id {0:?}")]
    UnknownKey(String),
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token has been revoked")]
    Revoked,
    #[error("the account has been disabled")]
    AccountDisabled,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token is for another audience")]
    WrongAudience,
    #[error("token is from another issuer")]
    WrongIssuer,
    #[error("token claims are invalid: {0}")]
    Claims(String),
    #[error("cannot load the JWKS: {0}")]
    Jwks(String),
}

impl AuthError {
    /// The code given to the caller: enough to act on (log in again, or not),
    /// not enough to probe which check failed.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::NotBearer => "unsupported_auth_scheme",
            AuthError::Expired => "token_expired",
            AuthError::Revoked => "token_revoked",
            AuthError::AccountDisabled => "account_disabled",
            _ => "invalid_token",
        }
    }
}

/// The claims this system puts in its tokens.
#[derive(Debug, Clone, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    roles: Vec<Role>,
    #[serde(default)]
    wards: Vec<WardId>,
    #[serde(default)]
    jti: Option<String>,
    exp: i64,
    /// Set only by an edge node's offline login (see [`Principal::offline_login`]).
    #[serde(default)]
    offline: bool,
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: UserId,
    pub roles: Vec<Role>,
    pub wards: Vec<WardId>,
    pub jti: Option<String>,
    pub expires_at: i64,
    /// The token came from an edge node's offline login, not the auth
    /// service: changes made with it are marked so in the audit trail.
    pub offline_login: bool,
}

impl Principal {
    /// The strongest of the principal's roles among `accepted`, if any:
    /// a user who is both nurse and admin acts as admin.
    pub fn acting_role(&self, accepted: impl Fn(Role) -> bool) -> Option<Role> {
        [Role::Admin, Role::Pharmacist, Role::Nurse, Role::EdgeNode]
            .into_iter()
            .find(|role| self.roles.contains(role) && accepted(*role))
    }
}

struct Key {
    key: DecodingKey,
    algorithm: Option<Algorithm>,
}

/// Verified tokens kept to skip the signature check on the next request
/// with the same token; a ward's devices send the same token for its
/// lifetime. Cleared when full, which bounds memory without bookkeeping.
const VERIFIED_TOKENS_MAX: usize = 4_096;

/// The revocation list as a verifier holds it.
#[derive(Debug, Default)]
struct Revoked {
    tokens: HashSet<String>,
    accounts: HashSet<String>,
}

pub struct Verifier {
    keys: RwLock<HashMap<String, Key>>,
    /// Keys that stay when the key set is replaced: an edge node's own
    /// offline-login key, which the auth service never publishes.
    pinned: RwLock<HashMap<String, Key>>,
    /// Exact token text -> what it verified to. Entries are only ever made
    /// by a full verification with the current keys.
    verified: Mutex<HashMap<String, Principal>>,
    /// Token ids revoked before their expiry, and accounts disabled, from
    /// the auth service.
    revoked: RwLock<Revoked>,
    algorithms: Vec<Algorithm>,
    issuer: String,
    audience: String,
    leeway_s: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<String> = self.keys.read().map(|keys| keys.keys().cloned().collect()).unwrap_or_default();
        f.debug_struct("Verifier").field("kids", &kids).field("algorithms", &self.algorithms).finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new(config: &TokenPolicy, jwks: &JwkSet) -> Result<Self, AuthError> {
        let verifier = Self {
            keys: RwLock::new(HashMap::new()),
            pinned: RwLock::new(HashMap::new()),
            verified: Mutex::new(HashMap::new()),
            revoked: RwLock::new(Revoked::default()),
            algorithms: config.algorithms.clone(),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway_s: config.leeway_s,
        };
        verifier.replace_keys(jwks)?;
        Ok(verifier)
    }

    /// Swaps in a new key set (after a refresh from the auth service).
    /// Keys without a `kid` are skipped: a token could not name them.
    pub fn replace_keys(&self, jwks: &JwkSet) -> Result<usize, AuthError> {
        let keys = decode_keys(jwks)?;
        if keys.is_empty() {
            return Err(AuthError::Jwks("the key set has no key with a key id".into()));
        }
        let count = keys.len();
        *self.keys.write().map_err(|_| AuthError::Jwks("key store poisoned".into()))? = keys;
        // A key that was removed must stop vouching for tokens at once.
        if let Ok(mut verified) = self.verified.lock() {
            verified.clear();
        }
        Ok(count)
    }

    /// Adds keys that [`Self::replace_keys`] keeps.
    pub fn pin_keys(&self, jwks: &JwkSet) -> Result<(), AuthError> {
        let keys = decode_keys(jwks)?;
        self.pinned.write().map_err(|_| AuthError::Jwks("key store poisoned".into()))?.extend(keys);
        Ok(())
    }

    /// Replaces the revocation list: the revoked token ids (`jti`) and the
    /// disabled accounts, whose every token is refused (`sub`).
    pub fn replace_revoked(
        &self,
        tokens: impl IntoIterator<Item = String>,
        disabled_accounts: impl IntoIterator<Item = String>,
    ) {
        if let Ok(mut revoked) = self.revoked.write() {
            *revoked =
                Revoked { tokens: tokens.into_iter().collect(), accounts: disabled_accounts.into_iter().collect() };
        }
    }

    fn check_not_revoked(&self, principal: &Principal) -> Result<(), AuthError> {
        let revoked = self.revoked.read().map_err(|_| AuthError::Jwks("revocation list poisoned".into()))?;
        if revoked.accounts.contains(principal.user.as_str()) {
            return Err(AuthError::AccountDisabled);
        }
        match &principal.jti {
            Some(jti) if revoked.tokens.contains(jti) => Err(AuthError::Revoked),
            _ => Ok(()),
        }
    }

    /// Whether a token verified earlier still holds at `now_s`: not revoked
    /// since, not expired (after the leeway). A session opened with a token
    /// (a live feed, a sync link) asks this while it lasts, so that revoking
    /// or expiring the token ends it too.
    pub fn still_valid(&self, principal: &Principal, now_s: i64) -> Result<(), AuthError> {
        self.check_not_revoked(principal)?;
        if now_s >= self.valid_until(principal) {
            return Err(AuthError::Expired);
        }
        Ok(())
    }

    /// The first second at which `principal`'s token no longer holds: its
    /// expiry plus the leeway.
    pub fn valid_until(&self, principal: &Principal) -> i64 {
        principal.expires_at.saturating_add(self.leeway_s as i64)
    }

    /// Verifies `token` at time `now_s` (seconds since the epoch).
    pub fn verify(&self, token: &str, now_s: i64) -> Result<Principal, AuthError> {
        let cached = self.verified.lock().ok().and_then(|verified| verified.get(token).cloned());
        if let Some(principal) = cached {
            // Checked on every use, not only the first: a revocation must
            // reach tokens already verified.
            return self.still_valid(&principal, now_s).map(|()| principal);
        }
        let principal = self.verify_signed(token)?;
        self.check_not_revoked(&principal)?;
        if let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= VERIFIED_TOKENS_MAX {
                verified.clear();
            }
            verified.insert(token.to_owned(), principal.clone());
        }
        Ok(principal)
    }

    fn verify_signed(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::AlgorithmNotAllowed(header.alg));
        }
        let kid = header.kid.ok_or(AuthError::MissingKeyId)?;
        let keys = self.keys.read().map_err(|_| AuthError::Jwks("key store poisoned".into()))?;
        let pinned = self.pinned.read().map_err(|_| AuthError::Jwks("key store poisoned".into()))?;
        let key = keys.get(&kid).or_else(|| pinned.get(&kid)).ok_or_else(|| AuthError::UnknownKey(kid.clone()))?;
        if key.algorithm.is_some_and(|alg| alg != header.alg) {
            return Err(AuthError::AlgorithmNotAllowed(header.alg));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[&self.audience]);
        validation.set_issuer(&[&self.issuer]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway_s;
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidAudience => AuthError::WrongAudience,
            ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm => AuthError::AlgorithmNotAllowed(header.alg),
            other => AuthError::Malformed(format!("{other:?}")),
        })?;
        let claims = data.claims;
        if claims.roles.is_empty() {
            return Err(AuthError::Claims("no roles".into()));
        }
        Ok(Principal {
            user: claims.sub.parse().map_err(|e| AuthError::Claims(format!("sub: {e}")))?,
            roles: claims.roles,
            wards: claims.wards,
            jti: claims.jti,
            expires_at: claims.exp,
            offline_login: claims.offline,
        })
    }
}

/// The keys of a key set that name a key id.
fn decode_keys(jwks: &JwkSet) -> Result<HashMap<String, Key>, AuthError> {
    let mut keys = HashMap::new();
    for jwk in &jwks.keys {
        let Some(kid) = jwk.common.key_id.clone() else { continue };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| AuthError::Jwks(format!("key {kid:?}: {e}")))?;
        let algorithm = jwk.common.key_algorithm.and_then(|a| Algorithm::try_from(a).ok());
        keys.insert(kid, Key { key, algorithm });
    }
    Ok(keys)
}

/// Parses a JWKS document.
pub fn parse_jwks(text: &str) -> Result<JwkSet, AuthError> {
    serde_json::from_str(text).map_err(|e| AuthError::Jwks(e.to_string()))
}
