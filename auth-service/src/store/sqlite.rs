//! The auth service's embedded storage: SQLite in its data directory.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use service_kit::sqlite;
use sync_protocol::ids::WardId;

use super::{Account, AccountKind, AuthStoreError, RefreshUse, refresh_digest};
use crate::keys::StoredKey;

const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE signing_keys (
        kid          TEXT PRIMARY KEY,
        seed         BLOB NOT NULL,
        activates_at INTEGER NOT NULL,
        retired_at   INTEGER
    ) STRICT;
    CREATE TABLE accounts (
        name         TEXT PRIMARY KEY,
        kind         TEXT NOT NULL CHECK (kind IN ('user', 'client')),
        secret_hash  TEXT NOT NULL,
        roles        TEXT NOT NULL,
        wards        TEXT NOT NULL,
        created_at   INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE refresh_tokens (
        digest      TEXT PRIMARY KEY,
        family      TEXT NOT NULL,
        subject     TEXT NOT NULL,
        expires_at  INTEGER NOT NULL,
        used_at     INTEGER,
        revoked     INTEGER NOT NULL DEFAULT 0
    ) STRICT;
    CREATE INDEX refresh_tokens_by_family ON refresh_tokens (family);
    CREATE TABLE revoked_tokens (
        jti         TEXT PRIMARY KEY,
        expires_at  INTEGER NOT NULL
    ) STRICT;
"#,
    r#"
    -- Set once an account is disabled: it gets no token and its tokens are refused.
    ALTER TABLE accounts ADD COLUMN disabled_at INTEGER;
"#,
];

#[derive(Clone, Debug)]
pub struct SqliteAuthStore {
    conn: Arc<Mutex<Connection>>,
}

fn json_list<T: serde::Serialize>(values: &[T]) -> String {
    serde_json::to_string(values).unwrap_or_else(|_| "[]".into())
}

fn parse_list<T: serde::de::DeserializeOwned>(text: &str) -> Result<Vec<T>, AuthStoreError> {
    serde_json::from_str(text).map_err(|e| AuthStoreError::Corrupt(e.to_string()))
}

impl SqliteAuthStore {
    pub fn open(path: &Path) -> Result<Self, AuthStoreError> {
        // Created readable by the service alone: it holds the signing keys.
        let mut conn = sqlite::Database::plain(path).open()?;
        sqlite::configure_writer(&conn)?;
        sqlite::migrate(&mut conn, MIGRATIONS)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    /// Runs `work` on a blocking thread with the connection.
    pub async fn run<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<R, AuthStoreError> + Send + 'static,
    ) -> Result<R, AuthStoreError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().map_err(|_| AuthStoreError::Task("connection lock poisoned".into()))?;
            work(&mut conn)
        })
        .await
        .map_err(|e| AuthStoreError::Task(e.to_string()))?
    }
}

pub fn keys(conn: &Connection) -> Result<Vec<StoredKey>, AuthStoreError> {
    let mut statement =
        conn.prepare_cached("SELECT kid, seed, activates_at, retired_at FROM signing_keys ORDER BY activates_at")?;
    let rows = statement
        .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?, row.get(2)?, row.get(3)?)))?;
    let mut keys = Vec::new();
    for row in rows {
        let (kid, seed, activates_at, retired_at) = row?;
        let seed = <[u8; 32]>::try_from(seed.as_slice())
            .map_err(|_| AuthStoreError::Corrupt(format!("signing key {kid} is not 32 bytes")))?;
        keys.push(StoredKey { kid, seed, activates_at, retired_at });
    }
    Ok(keys)
}

/// Adds a key that starts signing at `activates_at`, and retires the keys
/// before it from that moment. Returns the new key's id and when it signs.
pub fn add_key(conn: &mut Connection, activates_at: i64) -> Result<(String, i64), AuthStoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Strictly after every existing key, so which key signs is never a tie.
    let latest: Option<i64> = tx.query_row("SELECT max(activates_at) FROM signing_keys", [], |row| row.get(0))?;
    let activates_at = latest.map_or(activates_at, |latest| activates_at.max(latest + 1));
    let key = StoredKey::generate(activates_at);
    tx.execute(
        "UPDATE signing_keys SET retired_at = ?1 WHERE retired_at IS NULL AND activates_at < ?1",
        [activates_at],
    )?;
    tx.execute(
        "INSERT INTO signing_keys (kid, seed, activates_at) VALUES (?1, ?2, ?3)",
        params![key.kid, key.seed.as_slice(), activates_at],
    )?;
    tx.commit()?;
    Ok((key.kid, activates_at))
}

pub fn add_account(conn: &Connection, account: &Account, now: i64) -> Result<(), AuthStoreError> {
    let inserted = conn.execute(
        "INSERT INTO accounts (name, kind, secret_hash, roles, wards, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (name) DO NOTHING",
        params![
            account.name,
            account.kind.as_str(),
            account.secret_hash,
            json_list(&account.roles),
            json_list(&account.wards),
            now
        ],
    )?;
    if inserted == 0 {
        return Err(AuthStoreError::Exists(format!("account {}", account.name)));
    }
    Ok(())
}

fn account_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String, String, String)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
}

fn parse_account(
    (name, kind, secret_hash, roles, wards): (String, String, String, String, String),
) -> Result<Account, AuthStoreError> {
    let kind = AccountKind::parse(&kind)?;
    Ok(Account { name, kind, secret_hash, roles: parse_list(&roles)?, wards: parse_list(&wards)? })
}

pub fn account(conn: &Connection, name: &str, kind: AccountKind) -> Result<Option<Account>, AuthStoreError> {
    let row = conn
        .prepare_cached(
            "SELECT name, kind, secret_hash, roles, wards FROM accounts
         WHERE name = ?1 AND kind = ?2 AND disabled_at IS NULL",
        )?
        .query_row(params![name, kind.as_str()], account_of)
        .optional()?;
    row.map(parse_account).transpose()
}

/// The staff of `ward` who may log in at its edge node during an outage.
pub fn ward_staff(conn: &Connection, ward: &WardId) -> Result<Vec<Account>, AuthStoreError> {
    let mut statement = conn.prepare_cached(
        "SELECT name, kind, secret_hash, roles, wards FROM accounts
         WHERE kind = 'user' AND disabled_at IS NULL
           AND EXISTS (SELECT 1 FROM json_each(accounts.wards) WHERE value = ?1)
         ORDER BY name",
    )?;
    let rows = statement.query_map([ward.as_str()], account_of)?;
    let mut staff = Vec::new();
    for row in rows {
        let account = parse_account(row?)?;
        if account.roles.iter().any(|role| role.works_at_ward()) {
            staff.push(account);
        }
    }
    Ok(staff)
}

pub fn insert_refresh(
    conn: &Connection,
    token: &str,
    family: &str,
    subject: &str,
    expires_at: i64,
) -> Result<(), AuthStoreError> {
    conn.prepare_cached("INSERT INTO refresh_tokens (digest, family, subject, expires_at) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![refresh_digest(token), family, subject, expires_at])?;
    Ok(())
}

/// Spends a refresh token: valid once. Presenting a spent or revoked one
/// revokes its family, since either the legitimate holder or a thief now
/// holds a successor and there is no telling which.
pub fn use_refresh(conn: &mut Connection, token: &str, now: i64) -> Result<RefreshUse, AuthStoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: Option<(String, String, i64, Option<i64>, i64)> = tx
        .query_row(
            "SELECT family, subject, expires_at, used_at, revoked FROM refresh_tokens WHERE digest = ?1",
            [refresh_digest(token)],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
        )
        .optional()?;
    let outcome = match found {
        None => RefreshUse::Invalid,
        Some((family, _, _, used_at, revoked)) if used_at.is_some() || revoked != 0 => {
            tx.execute("UPDATE refresh_tokens SET revoked = 1 WHERE family = ?1", [&family])?;
            RefreshUse::Reused
        }
        Some((_, _, expires_at, _, _)) if expires_at <= now => RefreshUse::Invalid,
        Some((family, subject, ..)) => {
            tx.execute(
                "UPDATE refresh_tokens SET used_at = ?2 WHERE digest = ?1",
                params![refresh_digest(token), now],
            )?;
            RefreshUse::Valid { family, subject }
        }
    };
    tx.commit()?;
    Ok(outcome)
}

/// The subject of a live refresh token (for introspection).
pub fn refresh_subject(conn: &Connection, token: &str, now: i64) -> Result<Option<(String, i64)>, AuthStoreError> {
    Ok(conn
        .query_row(
            "SELECT subject, expires_at FROM refresh_tokens
             WHERE digest = ?1 AND used_at IS NULL AND revoked = 0 AND expires_at > ?2",
            params![refresh_digest(token), now],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?)
}

/// Revokes the family of a refresh token. Returns whether it was one.
pub fn revoke_refresh_family(conn: &Connection, token: &str) -> Result<bool, AuthStoreError> {
    let revoked = conn.execute(
        "UPDATE refresh_tokens SET revoked = 1
         WHERE family = (SELECT family FROM refresh_tokens WHERE digest = ?1)",
        [refresh_digest(token)],
    )?;
    Ok(revoked > 0)
}

/// Disables the account `name` and revokes its refresh tokens. Returns
/// whether there is such an account (disabled now or before).
pub fn disable_account(conn: &mut Connection, name: &str, now: i64) -> Result<bool, AuthStoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let exists = tx.query_row("SELECT count(*) FROM accounts WHERE name = ?1", [name], |row| row.get::<_, i64>(0))? > 0;
    tx.execute("UPDATE accounts SET disabled_at = ?2 WHERE name = ?1 AND disabled_at IS NULL", params![name, now])?;
    tx.execute("UPDATE refresh_tokens SET revoked = 1 WHERE subject = ?1", [name])?;
    tx.commit()?;
    Ok(exists)
}

/// The names of the disabled accounts.
pub fn disabled_accounts(conn: &Connection) -> Result<Vec<String>, AuthStoreError> {
    let mut statement = conn.prepare_cached("SELECT name FROM accounts WHERE disabled_at IS NOT NULL ORDER BY name")?;
    let rows = statement.query_map([], |row| row.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn revoke_access(conn: &Connection, jti: &str, expires_at: i64) -> Result<(), AuthStoreError> {
    conn.execute(
        "INSERT INTO revoked_tokens (jti, expires_at) VALUES (?1, ?2) ON CONFLICT (jti) DO NOTHING",
        params![jti, expires_at],
    )?;
    Ok(())
}

/// Access tokens revoked and not yet expired; forgets the expired ones.
pub fn revoked_access(conn: &Connection, now: i64) -> Result<Vec<(String, i64)>, AuthStoreError> {
    conn.execute("DELETE FROM revoked_tokens WHERE expires_at <= ?1", [now])?;
    let mut statement = conn.prepare_cached("SELECT jti, expires_at FROM revoked_tokens ORDER BY jti")?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}
