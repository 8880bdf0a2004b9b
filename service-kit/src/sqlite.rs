//! SQLite pieces the services use: where a database is and the key it is
//! encrypted with ([`Database`], [`DatabaseKey`]), connection settings, the
//! migration runner, a small pool of read-only connections, and the export
//! that re-encrypts a database into a new file.
//!
//! The build links SQLCipher (SQLite with page-level AES-256 encryption and
//! an HMAC per page). A database opened without a key is plain SQLite, as
//! the cloud's stores are; the edge's lives on ward hardware that can walk
//! out of the building, so it is opened with a key.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};
use zeroize::Zeroizing;

/// The first 16 bytes of every plain SQLite database file; an encrypted
/// one starts with its random salt instead.
const PLAIN_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Where a database, or a backup of it, was refused at open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{}: the configured key does not decrypt this database (wrong key file?); nothing was changed", path.display())]
    WrongKey { path: PathBuf },
    #[error("{}: the database is not encrypted but a key is configured; encrypt it once with `rotate-key --new-key-file KEY_FILE` (service stopped)", path.display())]
    NotEncrypted { path: PathBuf },
    #[error("{}: the database is encrypted (or is no SQLite database) and no key is configured", path.display())]
    Encrypted { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("key file {}: readable by others (mode {mode:o}); it must be 0600 or 0400", path.display())]
    Exposed { path: PathBuf, mode: u32 },
    #[error("key file {}: not a key (64 hexadecimal characters, as `generate-key` writes)", path.display())]
    Malformed { path: PathBuf },
    #[error("key file {} exists; choose a new file", path.display())]
    Exists { path: PathBuf },
}

/// The key a database is encrypted with: 32 random bytes, handed to
/// SQLCipher as a raw key. Being random already, it needs no passphrase
/// derivation, so every connection of the read pool opens in microseconds.
/// Wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseKey(Zeroizing<[u8; DatabaseKey::BYTES]>);

impl std::fmt::Debug for DatabaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseKey(..)")
    }
}

impl DatabaseKey {
    pub const BYTES: usize = 32;

    pub fn generate() -> Self {
        Self(Zeroizing::new(rand::random()))
    }

    /// Reads a key file: its 64 hexadecimal characters, and a mode that
    /// lets no group or other user read it (as ssh insists of its keys).
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io { path: path.to_owned(), source };
        let mut file = File::open(path).map_err(io)?;
        let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed { path: path.to_owned(), mode });
        }
        let mut text = Zeroizing::new(String::new());
        // One byte past a key's length is enough to tell it is too long.
        (&mut file).take(2 * Self::BYTES as u64 + 2).read_to_string(&mut text).map_err(io)?;
        let mut key = Zeroizing::new([0; Self::BYTES]);
        hex::decode_to_slice(text.trim_end_matches('\n'), key.as_mut_slice())
            .map_err(|_| KeyError::Malformed { path: path.to_owned() })?;
        Ok(Self(key))
    }

    /// Writes the key into the new file `path`, readable by its owner only.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let mut file = create_private(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::Exists { path: path.to_owned() },
            _ => KeyError::Io { path: path.to_owned(), source },
        })?;
        let text = Zeroizing::new(format!("{}\n", self.hex().as_str()));
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyError::Io { path: path.to_owned(), source })
    }

    fn hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.as_slice()))
    }

    /// SQLCipher's raw-key form, `x'<64 hex>'`: hexadecimal only, so it
    /// can stand in SQL text without escaping.
    fn sql(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("x'{}'", self.hex().as_str()))
    }
}

/// Creates the new file `path`, readable and writable by its owner only.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    File::options().write(true).create_new(true).mode(0o600).open(path)
}

/// A database file and the key it is encrypted with (none: plain SQLite).
#[derive(Debug, Clone)]
pub struct Database {
    pub path: PathBuf,
    pub key: Option<DatabaseKey>,
}

impl Database {
    pub fn plain(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), key: None }
    }

    /// This database as it is found on disk: without its key when its
    /// header shows plain SQLite (a database or backup from before the key
    /// was configured), which only a re-encryption may read that way.
    pub fn as_found(&self) -> Result<Self, OpenError> {
        let plain = self.header()?.is_some_and(|header| &header == PLAIN_HEADER);
        Ok(if plain { Self::plain(&self.path) } else { self.clone() })
    }

    /// Opens the database for reads and writes, creating it (readable by
    /// its owner only) if it is missing.
    pub fn open(&self) -> Result<Connection, OpenError> {
        match create_private(&self.path) {
            Err(error) if error.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(OpenError::Io { path: self.path.clone(), source: error });
            }
            _ => {}
        }
        self.open_with_flags(OpenFlags::default())
    }

    pub fn open_read_only(&self) -> Result<Connection, OpenError> {
        self.open_with_flags(OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
    }

    /// Opens with `flags`, keys the connection and proves the key by a
    /// read, so a wrong key is named here and never taken for corruption.
    /// Nothing is written before that read succeeds.
    fn open_with_flags(&self, flags: OpenFlags) -> Result<Connection, OpenError> {
        let header = self.header()?;
        match (&self.key, header) {
            (Some(_), Some(header)) if &header == PLAIN_HEADER => {
                return Err(OpenError::NotEncrypted { path: self.path.clone() });
            }
            (None, Some(header)) if &header != PLAIN_HEADER => {
                return Err(OpenError::Encrypted { path: self.path.clone() });
            }
            _ => {}
        }
        let conn = Connection::open_with_flags(&self.path, flags)?;
        if let Some(key) = &self.key {
            conn.execute_batch(&Zeroizing::new(format!("PRAGMA key = \"{}\"", key.sql().as_str())))?;
        }
        match conn.query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get::<_, i64>(0)) {
            Ok(_) => Ok(conn),
            Err(rusqlite::Error::SqliteFailure(error, _)) if error.code == ErrorCode::NotADatabase => {
                Err(OpenError::WrongKey { path: self.path.clone() })
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The file's first 16 bytes, or `None` while it is missing or shorter
    /// (a database not written yet).
    fn header(&self) -> Result<Option<[u8; 16]>, OpenError> {
        let mut header = [0; 16];
        match File::open(&self.path).and_then(|mut file| file.read_exact(&mut header)) {
            Ok(()) => Ok(Some(header)),
            Err(error) if matches!(error.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof) => {
                Ok(None)
            }
            Err(source) => Err(OpenError::Io { path: self.path.clone(), source }),
        }
    }
}

/// Copies every table, index and the schema version of `from` into the new
/// file `to.path`, encrypted with `to.key` (plain without one): SQLCipher's
/// `sqlcipher_export`. It is how a database is encrypted for the first
/// time, re-encrypted under a new key, or restored from a backup made
/// under an older key. `from` must be opened for writing (an attached
/// database inherits the connection's flags) and must not change meanwhile.
pub fn export(from: &Connection, to: &Database) -> Result<(), OpenError> {
    let io = |source| OpenError::Io { path: to.path.clone(), source };
    create_private(&to.path).map_err(io)?;
    let key = to.key.as_ref().map_or_else(|| Zeroizing::new(String::new()), DatabaseKey::sql);
    from.execute("ATTACH DATABASE ?1 AS export KEY ?2", [to.path.to_string_lossy().as_ref(), key.as_str()])?;
    // `sqlcipher_export` copies schema and rows, not the schema version.
    let exported = from.query_row("SELECT sqlcipher_export('export')", [], |_| Ok(())).and_then(|()| {
        let version: i64 = from.pragma_query_value(None, "user_version", |row| row.get(0))?;
        from.pragma_update(Some("export"), "user_version", version)
    });
    from.execute_batch("DETACH DATABASE export")?;
    exported?;
    File::open(&to.path).and_then(|file| file.sync_all()).map_err(io)
}

/// A read could not run: its blocking task panicked or was cancelled.
#[derive(Debug, thiserror::Error)]
#[error("read task failed: {0}")]
pub struct ReadTaskFailed(String);

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("the database has schema version {found}, newer than this build's {supported}: upgrade the binary")]
    Newer { found: usize, supported: usize },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// Settings of the write connection. WAL: readers never block the writer.
/// FULL: a commit survives power loss, which is what "acknowledged" means.
pub fn configure_writer(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "busy_timeout", 5_000)?;
    Ok(())
}

/// Applies the migrations not yet applied, each in its own transaction;
/// `PRAGMA user_version` counts those applied. A database newer than
/// `migrations` is refused, never guessed at.
pub fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<(), MigrateError> {
    let found: usize =
        conn.pragma_query_value(None, "user_version", |row| row.get::<_, i64>(0))?.try_into().unwrap_or(0);
    if found > migrations.len() {
        return Err(MigrateError::Newer { found, supported: migrations.len() });
    }
    for (index, sql) in migrations.iter().enumerate().skip(found) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = index + 1, "applied database migration");
    }
    Ok(())
}

/// Rows of a `tickets` table rewritten per transaction by [`rewrite_tickets`].
const REWRITE_BATCH_ROWS: usize = 500;

/// Calls `rewrite(tx, id, document)` for every row of the `tickets` table
/// (its `id` and `document` columns), in id order, a batch of rows per
/// committed transaction, then `done(tx)` in a last one (to record that
/// the rewrite is complete: an interrupted run starts over, harmlessly).
/// For rewriting what is derived from each stored document when its shape
/// changed, to `version` (logged).
pub fn rewrite_tickets<E: From<rusqlite::Error>>(
    conn: &mut Connection,
    version: u64,
    mut rewrite: impl FnMut(&rusqlite::Transaction<'_>, &str, &[u8]) -> Result<(), E>,
    done: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let (mut after, mut rewritten) = (String::new(), 0);
    loop {
        let tx = conn.transaction()?;
        let batch: Vec<(String, Vec<u8>)> = tx
            .prepare_cached("SELECT id, document FROM tickets WHERE id > ?1 ORDER BY id LIMIT ?2")?
            .query_map(rusqlite::params![after, REWRITE_BATCH_ROWS as i64], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (id, document) in &batch {
            rewrite(&tx, id, document)?;
        }
        rewritten += batch.len();
        let Some((last, _)) = batch.last() else {
            done(&tx)?;
            tx.commit()?;
            if rewritten > 0 {
                tracing::info!(tickets = rewritten, version, "stored tickets rewritten in this build's shape");
            }
            return Ok(());
        };
        after.clone_from(last);
        tx.commit()?;
    }
}

/// Read-only connections, used from blocking threads.
#[derive(Debug)]
pub struct ReadPool {
    connections: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

impl ReadPool {
    pub fn open(database: &Database, size: usize) -> Result<Self, OpenError> {
        let connections = (0..size.max(1))
            .map(|_| {
                let conn = database.open_read_only()?;
                conn.pragma_update(None, "busy_timeout", 5_000)?;
                Ok(Mutex::new(conn))
            })
            .collect::<Result<_, OpenError>>()?;
        Ok(Self { connections, next: AtomicUsize::new(0) })
    }

    /// Runs `read` on a pooled connection, off the async threads.
    pub async fn read<R, E, F>(self: &Arc<Self>, read: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<ReadTaskFailed> + Send + 'static,
        F: FnOnce(&Connection) -> Result<R, E> + Send + 'static,
    {
        let pool = Arc::clone(self);
        tokio::task::spawn_blocking(move || pool.with(read)).await.map_err(|e| ReadTaskFailed(e.to_string()))?
    }

    /// Runs `read` on a free connection, or waits for one.
    pub fn with<R>(&self, read: impl FnOnce(&Connection) -> R) -> R {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.connections.len();
        for offset in 0..n {
            if let Ok(conn) = self.connections[(start + offset) % n].try_lock() {
                return read(&conn);
            }
        }
        let conn = self.connections[start % n].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        read(&conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_newer_than_the_build_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, &["CREATE TABLE a (x INTEGER)", "CREATE TABLE b (y INTEGER)"]).unwrap();
        migrate(&mut conn, &["CREATE TABLE a (x INTEGER)", "CREATE TABLE b (y INTEGER)"]).unwrap();
        let err = migrate(&mut conn, &["CREATE TABLE a (x INTEGER)"]).unwrap_err();
        assert!(err.to_string().contains("schema version 2, newer than this build's 1"), "{err}");
    }
}
