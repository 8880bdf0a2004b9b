//! The auth service's storage: signing keys, users, clients, refresh tokens
//! and revoked access tokens, in SQLite (`sqlite`, the embedded mode) or in
//! MongoDB (`mongo`, the distributed mode, beside the tickets' backend).
//! Secrets are stored only as argon2id hashes and refresh tokens only as
//! SHA-256 digests, so a copy of either database lets no one log in.

mod mongo;
mod sqlite;

use sha2::{Digest, Sha256};
use sync_protocol::ids::{Role, WardId};

use self::mongo::MongoAuthStore;
use self::sqlite::SqliteAuthStore;
use crate::keys::StoredKey;

#[derive(Debug, thiserror::Error)]
pub enum AuthStoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Migrate(#[from] service_kit::sqlite::MigrateError),
    #[error(transparent)]
    Open(#[from] service_kit::sqlite::OpenError),
    #[error("mongodb: {0}")]
    Mongo(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Client(#[from] service_kit::cloud::ClientError),
    #[error("storage task failed: {0}")]
    Task(String),
}

/// A user (staff) or a client (edge node, integration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountKind {
    User,
    Client,
}

impl AccountKind {
    fn as_str(self) -> &'static str {
        match self {
            AccountKind::User => "user",
            AccountKind::Client => "client",
        }
    }

    fn parse(kind: &str) -> Result<Self, AuthStoreError> {
        match kind {
            "user" => Ok(AccountKind::User),
            "client" => Ok(AccountKind::Client),
            other => Err(AuthStoreError::Corrupt(format!("account kind {other}"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub kind: AccountKind,
    pub secret_hash: String,
    pub roles: Vec<Role>,
    pub wards: Vec<WardId>,
}

/// What presenting a refresh token found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshUse {
    /// Valid and now spent: issue a successor in the same family.
    Valid { family: String, subject: String },
    /// Already spent or revoked: someone replayed it, so its whole family
    /// is now revoked.
    Reused,
    /// Unknown or expired.
    Invalid,
}

/// The digest a refresh token is stored under.
pub fn refresh_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The auth service's store, embedded or in MongoDB.
#[derive(Debug, Clone)]
pub enum AuthStore {
    Sqlite(SqliteAuthStore),
    Mongo(MongoAuthStore),
}

impl AuthStore {
    /// The embedded store in the SQLite file at `path`.
    pub fn sqlite(path: &std::path::Path) -> Result<Self, AuthStoreError> {
        Ok(AuthStore::Sqlite(SqliteAuthStore::open(path)?))
    }

    /// The store in MongoDB; connects lazily.
    pub async fn mongo(config: &service_kit::cloud::MongoConfig) -> Result<Self, AuthStoreError> {
        Ok(AuthStore::Mongo(MongoAuthStore::connect(config).await?))
    }

    pub async fn keys(&self) -> Result<Vec<StoredKey>, AuthStoreError> {
        match self {
            AuthStore::Sqlite(store) => store.run(|conn| sqlite::keys(conn)).await,
            AuthStore::Mongo(store) => store.keys().await,
        }
    }

    /// Adds a key that starts signing at `activates_at` (or just after the
    /// newest key, so which key signs is never a tie) and retires the keys
    /// before it from that moment. Returns the new key's id and when it signs.
    pub async fn add_key(&self, activates_at: i64) -> Result<(String, i64), AuthStoreError> {
        match self {
            AuthStore::Sqlite(store) => store.run(move |conn| sqlite::add_key(conn, activates_at)).await,
            AuthStore::Mongo(store) => store.add_key(activates_at).await,
        }
    }

    /// Creates an account; an existing name is [`AuthStoreError::Exists`].
    pub async fn add_account(&self, account: &Account, now: i64) -> Result<(), AuthStoreError> {
        match self {
            AuthStore::Sqlite(store) => {
                let account = account.clone();
                store.run(move |conn| sqlite::add_account(conn, &account, now)).await
            }
            AuthStore::Mongo(store) => store.add_account(account, now).await,
        }
    }

    /// The enabled account `name` of `kind`.
    pub async fn account(&self, name: &str, kind: AccountKind) -> Result<Option<Account>, AuthStoreError> {
        match self {
            AuthStore::Sqlite(store) => {
                let name = name.to_owned();
                store.run(move |conn| sqlite::account(conn, &name, kind)).await
            }
            AuthStore::Mongo(store) => store.account(name, kind).await,
        }
    }

    /// The staff of `ward` who may log in at its edge node during an outage.
    pub async fn ward_staff(&self, ward: &WardId) -> Result<Vec<Account>, AuthStoreError> {
        match self {
            AuthStore::Sqlite(store) => {
                let ward = ward.clone();
                store.run(move |conn| sqlite::ward_staff(conn, &ward)).await
            }
            AuthStore::Mongo(store) => store.ward_staff(ward).await,
        }
    }

    pub async fn insert_refresh(
        &self,
        token: &str,
        family: &str,
        subject: &str,
        expires_at: i64,
    ) -> Result<(), AuthStoreError> {
        match self {
            AuthStore::Sqlite(store) => {
                let (token, family, subject) = (token.to_owned(), family.to_owned(), subject.to_owned());
                store.run(move |conn| sqlite::insert_refresh(conn, &token, &family, &subject, expires_at)).await
            }
            AuthStore::Mongo(store) => store.insert_refresh(token, family, subject, expires_at).await,
        }
    }

    /// Spends a refresh token: valid once. Presenting a spent or revoked one
    /// revokes its family, since either the legitimate holder or a thief now
    /// holds a successor and there is no telling which.
    pub async fn use_refresh(&self, token: &str, now: i64) -> Result<RefreshUse, AuthStoreError> {
        match self {
            AuthStore::Sqlite(store) => {
                let token = token.to_owned();
                store.run(move |conn| sqlite::use_refresh(conn, &token, now)).await
            }
            AuthStore::Mongo(store) => store.use_refresh(token, now).await,
        }
    }

    /// The subject and expiry of a live refresh token (for introspection).
    pub async fn refresh_subject(&self, token: &str, now: i64) -> Result<Option<(String, i64)>, AuthStoreError> {
        match self {
            AuthStore::Sqlite(store) => {
                let token = token.to_owned();
                store.run(move |conn| sqlite::refresh_subject(conn, &token, now)).await
            }
            AuthStore::Mongo(store) => store.refresh_subject(token, now).await,
        }
    }

    /// Revokes the family of a refresh token. Returns whether it was one.
    pub async fn revoke_refresh_family(&self, token: &str) -> Result<bool, AuthStoreError> {
        match self {
            AuthStore::Sqlite(store) => {
                let token = token.to_owned();
                store.run(move |conn| sqlite::revoke_refresh_family(conn, &token)).await
            }
            AuthStore::Mongo(store) => store.revoke_refresh_family(token).await,
        }
    }

    pub async fn revoke_access(&self, jti: &str, expires_at: i64) -> Result<(), AuthStoreError> {
        match self {
            AuthStore::Sqlite(store) => {
                let jti = jti.to_owned();
                store.run(move |conn| sqlite::revoke_access(conn, &jti, expires_at)).await
            }
            AuthStore::Mongo(store) => store.revoke_access(jti, expires_at).await,
        }
    }

    /// Disables the account `name` (a user or a client): it gets no token
    /// and logs in nowhere, its refresh tokens are revoked, and the
    /// revocation list names it, so every service refuses its tokens.
    /// Returns whether there is such an account.
    pub async fn disable_account(&self, name: &str, now: i64) -> Result<bool, AuthStoreError> {
        match self {
            AuthStore::Sqlite(store) => {
                let name = name.to_owned();
                store.run(move |conn| sqlite::disable_account(conn, &name, now)).await
            }
            AuthStore::Mongo(store) => store.disable_account(name, now).await,
        }
    }

    pub async fn disabled_accounts(&self) -> Result<Vec<String>, AuthStoreError> {
        match self {
            AuthStore::Sqlite(store) => store.run(|conn| sqlite::disabled_accounts(conn)).await,
            AuthStore::Mongo(store) => store.disabled_accounts().await,
        }
    }

    /// Access tokens revoked and not yet expired; forgets the expired ones.
    pub async fn revoked_access(&self, now: i64) -> Result<Vec<(String, i64)>, AuthStoreError> {
        match self {
            AuthStore::Sqlite(store) => store.run(move |conn| sqlite::revoked_access(conn, now)).await,
            AuthStore::Mongo(store) => store.revoked_access(now).await,
        }
    }
}
