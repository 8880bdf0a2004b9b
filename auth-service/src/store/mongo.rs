//! The auth service's storage in MongoDB, for the distributed mode: any
//! number of auth service instances share it.
//!
//! | collection       | `_id`          | holds |
//! |------------------|----------------|-------|
//! | `signing_keys`   | key id         | seed, `activates_at` (unique: which key signs is never a tie), `retired_at` |
//! | `accounts`       | account name   | kind, argon2id hash, roles, wards |
//! | `refresh_tokens` | SHA-256 digest | family, subject, expiry, `used_at`, `revoked` |
//! | `revoked_tokens` | `jti`          | expiry |

use futures_util::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Collection, IndexModel};
use serde::{Deserialize, Serialize};
use sync_protocol::ids::{Role, WardId};

use super::{Account, AccountKind, AuthStoreError, RefreshUse, refresh_digest};
use crate::keys::StoredKey;
use service_kit::cloud::MongoConfig;

/// MongoDB's code for a duplicate key.
const DUPLICATE_KEY: i32 = 11_000;
/// Attempts at adding a key while another instance adds one at the same moment.
const ADD_KEY_ATTEMPTS_MAX: usize = 5;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyDoc {
    #[serde(rename = "_id")]
    kid: String,
    #[serde(with = "serde_bytes")]
    seed: Vec<u8>,
    activates_at: i64,
    retired_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AccountDoc {
    #[serde(rename = "_id")]
    name: String,
    kind: String,
    secret_hash: String,
    roles: Vec<Role>,
    wards: Vec<WardId>,
    created_at: i64,
    /// Set once the account is disabled; absent while it is enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    disabled_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RefreshDoc {
    #[serde(rename = "_id")]
    digest: String,
    family: String,
    subject: String,
    expires_at: i64,
    used_at: Option<i64>,
    revoked: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RevokedDoc {
    #[serde(rename = "_id")]
    jti: String,
    expires_at: i64,
}

/// The stored names of the roles that work at a ward.
fn ward_roles() -> Vec<&'static str> {
    Role::ward_roles().map(Role::as_str).collect()
}

/// Every document of `collection` that matches `filter`, in `sort` order.
async fn sorted<T>(collection: &Collection<T>, filter: Document, sort: Document) -> Result<Vec<T>, AuthStoreError>
where
    T: serde::de::DeserializeOwned + Send + Sync,
{
    collection.find(filter).sort(sort).await.map_err(failed)?.try_collect().await.map_err(failed)
}

fn failed(error: mongodb::error::Error) -> AuthStoreError {
    AuthStoreError::Mongo(error.to_string())
}

fn is_duplicate(error: &mongodb::error::Error) -> bool {
    matches!(&*error.kind, ErrorKind::Write(WriteFailure::WriteError(e)) if e.code == DUPLICATE_KEY)
}

#[derive(Debug, Clone)]
pub struct MongoAuthStore {
    keys: Collection<KeyDoc>,
    accounts: Collection<AccountDoc>,
    refresh: Collection<RefreshDoc>,
    revoked: Collection<RevokedDoc>,
}

impl MongoAuthStore {
    /// Connects (lazily) and creates the indexes.
    pub async fn connect(config: &MongoConfig) -> Result<Self, AuthStoreError> {
        let database = service_kit::cloud::mongo_database(config, "auth-service").await?;
        let store = Self {
            keys: database.collection("signing_keys"),
            accounts: database.collection("accounts"),
            refresh: database.collection("refresh_tokens"),
            revoked: database.collection("revoked_tokens"),
        };
        let unique = IndexOptions::builder().unique(true).build();
        store
            .keys
            .create_index(IndexModel::builder().keys(doc! { "activates_at": 1 }).options(unique).build())
            .await
            .map_err(failed)?;
        store.refresh.create_index(IndexModel::builder().keys(doc! { "family": 1 }).build()).await.map_err(failed)?;
        store.accounts.create_index(IndexModel::builder().keys(doc! { "wards": 1 }).build()).await.map_err(failed)?;
        Ok(store)
    }

    pub async fn keys(&self) -> Result<Vec<StoredKey>, AuthStoreError> {
        let docs: Vec<KeyDoc> = sorted(&self.keys, doc! {}, doc! { "activates_at": 1 }).await?;
        docs.into_iter()
            .map(|key| {
                let seed = <[u8; 32]>::try_from(key.seed.as_slice())
                    .map_err(|_| AuthStoreError::Corrupt(format!("signing key {} is not 32 bytes", key.kid)))?;
                Ok(StoredKey { kid: key.kid, seed, activates_at: key.activates_at, retired_at: key.retired_at })
            })
            .collect()
    }

    pub async fn add_key(&self, activates_at: i64) -> Result<(String, i64), AuthStoreError> {
        for _ in 0..ADD_KEY_ATTEMPTS_MAX {
            let latest = self.keys.find_one(doc! {}).sort(doc! { "activates_at": -1 }).await.map_err(failed)?;
            let at = latest.map_or(activates_at, |latest| activates_at.max(latest.activates_at + 1));
            let key = StoredKey::generate(at);
            let doc = KeyDoc { kid: key.kid.clone(), seed: key.seed.to_vec(), activates_at: at, retired_at: None };
            match self.keys.insert_one(&doc).await {
                Ok(_) => {
                    self.keys
                        .update_many(
                            doc! { "retired_at": Bson::Null, "activates_at": { "$lt": at } },
                            doc! { "$set": { "retired_at": at } },
                        )
                        .await
                        .map_err(failed)?;
                    return Ok((key.kid, at));
                }
                // Another instance took this moment: take the next one.
                Err(error) if is_duplicate(&error) => continue,
                Err(error) => return Err(failed(error)),
            }
        }
        Err(AuthStoreError::Mongo("other instances keep adding keys; try again".into()))
    }

    pub async fn add_account(&self, account: &Account, now: i64) -> Result<(), AuthStoreError> {
        let doc = AccountDoc {
            name: account.name.clone(),
            kind: account.kind.as_str().to_owned(),
            secret_hash: account.secret_hash.clone(),
            roles: account.roles.clone(),
            wards: account.wards.clone(),
            created_at: now,
            disabled_at: None,
        };
        match self.accounts.insert_one(&doc).await {
            Ok(_) => Ok(()),
            Err(error) if is_duplicate(&error) => Err(AuthStoreError::Exists(format!("account {}", account.name))),
            Err(error) => Err(failed(error)),
        }
    }

    pub async fn account(&self, name: &str, kind: AccountKind) -> Result<Option<Account>, AuthStoreError> {
        let enabled = doc! { "_id": name, "kind": kind.as_str(), "disabled_at": { "$exists": false } };
        let found = self.accounts.find_one(enabled).await.map_err(failed)?;
        found.map(account_of).transpose()
    }

    pub async fn ward_staff(&self, ward: &WardId) -> Result<Vec<Account>, AuthStoreError> {
        let staff: Vec<AccountDoc> = sorted(
            &self.accounts,
            doc! {
                "kind": "user", "wards": ward.as_str(), "roles": { "$in": ward_roles() },
                "disabled_at": { "$exists": false },
            },
            doc! { "_id": 1 },
        )
        .await?;
        staff.into_iter().map(account_of).collect()
    }

    pub async fn insert_refresh(
        &self,
        token: &str,
        family: &str,
        subject: &str,
        expires_at: i64,
    ) -> Result<(), AuthStoreError> {
        let doc = RefreshDoc {
            digest: refresh_digest(token),
            family: family.to_owned(),
            subject: subject.to_owned(),
            expires_at,
            used_at: None,
            revoked: false,
        };
        self.refresh.insert_one(&doc).await.map(|_| ()).map_err(failed)
    }

    pub async fn use_refresh(&self, token: &str, now: i64) -> Result<RefreshUse, AuthStoreError> {
        let digest = refresh_digest(token);
        // Spending is one atomic update: of two requests presenting the same
        // token at once, one spends it and the other finds it spent.
        let spent = self
            .refresh
            .find_one_and_update(
                doc! { "_id": &digest, "used_at": Bson::Null, "revoked": false, "expires_at": { "$gt": now } },
                doc! { "$set": { "used_at": now } },
            )
            .return_document(ReturnDocument::Before)
            .await
            .map_err(failed)?;
        if let Some(spent) = spent {
            return Ok(RefreshUse::Valid { family: spent.family, subject: spent.subject });
        }
        match self.refresh.find_one(doc! { "_id": &digest }).await.map_err(failed)? {
            Some(found) if found.used_at.is_some() || found.revoked => {
                self.refresh
                    .update_many(doc! { "family": &found.family }, doc! { "$set": { "revoked": true } })
                    .await
                    .map_err(failed)?;
                Ok(RefreshUse::Reused)
            }
            _ => Ok(RefreshUse::Invalid),
        }
    }

    pub async fn refresh_subject(&self, token: &str, now: i64) -> Result<Option<(String, i64)>, AuthStoreError> {
        let found = self
            .refresh
            .find_one(doc! {
                "_id": refresh_digest(token), "used_at": Bson::Null, "revoked": false, "expires_at": { "$gt": now }
            })
            .await
            .map_err(failed)?;
        Ok(found.map(|live| (live.subject, live.expires_at)))
    }

    pub async fn revoke_refresh_family(&self, token: &str) -> Result<bool, AuthStoreError> {
        let Some(found) = self.refresh.find_one(doc! { "_id": refresh_digest(token) }).await.map_err(failed)? else {
            return Ok(false);
        };
        self.refresh
            .update_many(doc! { "family": &found.family }, doc! { "$set": { "revoked": true } })
            .await
            .map_err(failed)?;
        Ok(true)
    }

    pub async fn disable_account(&self, name: &str, now: i64) -> Result<bool, AuthStoreError> {
        let exists = self.accounts.find_one(doc! { "_id": name }).await.map_err(failed)?.is_some();
        self.accounts
            .update_one(
                doc! { "_id": name, "disabled_at": { "$exists": false } },
                doc! { "$set": { "disabled_at": now } },
            )
            .await
            .map_err(failed)?;
        self.refresh
            .update_many(doc! { "subject": name }, doc! { "$set": { "revoked": true } })
            .await
            .map_err(failed)?;
        Ok(exists)
    }

    pub async fn disabled_accounts(&self) -> Result<Vec<String>, AuthStoreError> {
        let disabled: Vec<AccountDoc> =
            sorted(&self.accounts, doc! { "disabled_at": { "$exists": true } }, doc! { "_id": 1 }).await?;
        Ok(disabled.into_iter().map(|account| account.name).collect())
    }

    pub async fn revoke_access(&self, jti: &str, expires_at: i64) -> Result<(), AuthStoreError> {
        self.revoked
            .update_one(doc! { "_id": jti }, doc! { "$setOnInsert": { "expires_at": expires_at } })
            .upsert(true)
            .await
            .map(|_| ())
            .map_err(failed)
    }

    pub async fn revoked_access(&self, now: i64) -> Result<Vec<(String, i64)>, AuthStoreError> {
        self.revoked.delete_many(doc! { "expires_at": { "$lte": now } }).await.map_err(failed)?;
        let live: Vec<RevokedDoc> = sorted(&self.revoked, doc! {}, doc! { "_id": 1 }).await?;
        Ok(live.into_iter().map(|r| (r.jti, r.expires_at)).collect())
    }
}

fn account_of(doc: AccountDoc) -> Result<Account, AuthStoreError> {
    Ok(Account {
        kind: AccountKind::parse(&doc.kind)?,
        name: doc.name,
        secret_hash: doc.secret_hash,
        roles: doc.roles,
        wards: doc.wards,
    })
}
