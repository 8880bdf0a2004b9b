//! Backup and restore of the node's database.
//!
//! A backup is taken while the node serves, through SQLite's backup API in
//! one step: a single read transaction, so it holds exactly what was
//! committed when it began (WAL mode lets writers go on meanwhile).
//!
//! A restore puts a backup in place of the database while the node is
//! stopped, as a new database: it gets a new id (`store::DATABASE_KEY`) and
//! no lease, and its feed starts over (the cursor is cleared). On its next
//! link the bridge sees a database the node never used, which takes the
//! node over (`sync_protocol::admission`): the database it replaces is
//! refused from then on, and the feed sends the node's own changes back, up
//! to where the log stood, so what it made after the backup comes back;
//! applying a change twice is harmless. Its outbox is sent whole, and an
//! acknowledgement covers only what that connection carried, so no outbox
//! number the backup shares with the replaced database can drop a change.
//! And it compares every ticket with the cloud (a reconciliation), putting
//! what the cloud lacks of its changes into the outbox again.
//!
//! A backup is encrypted with the database's key (the backup API copies
//! between two connections keyed alike) and created readable by its owner
//! only. A restore re-encrypts what it restores under the current key
//! (`sqlite::export`), so a backup made under an older key, or before the
//! node had one, is restored by naming its key. [`rotate_key`] re-encrypts
//! the database under a new key the same way.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::backup::{Backup, StepResult};
use service_kit::sqlite::{self, Database, DatabaseKey, KeyError, OpenError};

use crate::store;

/// A backup step held up by a lock is retried this often, this far apart.
const BUSY_RETRIES_MAX: u32 = 100;
const BUSY_RETRY_DELAY: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0} exists; choose a new file")]
    Exists(String),
    #[error("the node is running (its data directory is locked); stop it first")]
    Running,
    #[error("not a usable backup: {0}")]
    Invalid(String),
    #[error("the database is already encrypted with that key")]
    SameKey,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.display().to_string(), source }
}

/// What a backup or restore holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub tickets: u64,
    pub outbox: u64,
}

/// The lock a serving node holds on its data directory; a restore takes it
/// too, so the two never overlap.
pub fn lock_data_dir(data_dir: &Path) -> Result<File, BackupError> {
    let path = data_dir.join("edge-node.lock");
    let file = File::options().create(true).truncate(false).write(true).open(&path).map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(BackupError::Running),
        Err(std::fs::TryLockError::Error(e)) => Err(io(&path)(e)),
    }
}

fn summarize(conn: &Connection) -> Result<Summary, BackupError> {
    let count = |table: &str| -> Result<u64, BackupError> {
        Ok(conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0))? as u64)
    };
    Ok(Summary { tickets: count("tickets")?, outbox: count("outbox")? })
}

/// Checks that `path` holds an intact edge-node database this build can read.
fn check(conn: &Connection) -> Result<(), BackupError> {
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if integrity != "ok" {
        return Err(BackupError::Invalid(format!("integrity check: {integrity}")));
    }
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version < 1 || version as usize > store::SCHEMA_VERSION {
        return Err(BackupError::Invalid(format!(
            "schema version {version}; this build reads 1 to {}",
            store::SCHEMA_VERSION
        )));
    }
    Ok(())
}

/// Opens a database that must already exist (opening creates one).
fn open_existing(database: &Database) -> Result<Connection, BackupError> {
    if !database.path.is_file() {
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        return Err(io(&database.path)(missing));
    }
    Ok(database.open()?)
}

/// Copies `from` into the new, empty file of `to` (keyed alike) in one
/// step of the backup API (all pages at once), retrying a step the
/// source's lock held up.
fn copy(from: &Connection, to: &Database) -> Result<(), BackupError> {
    let mut destination = to.open()?;
    {
        let backup = Backup::new(from, &mut destination)?;
        let mut attempts = 0;
        loop {
            match backup.step(-1)? {
                StepResult::Done => break,
                StepResult::More => continue,
                StepResult::Busy | StepResult::Locked if attempts < BUSY_RETRIES_MAX => {
                    attempts += 1;
                    std::thread::sleep(BUSY_RETRY_DELAY);
                }
                busy => return Err(BackupError::Invalid(format!("the database stayed {busy:?}"))),
            }
        }
    }
    destination.pragma_update(None, "journal_mode", "DELETE")?;
    File::open(&to.path).and_then(|f| f.sync_all()).map_err(io(&to.path))
}

/// Backs up `database` into the new file `to`, encrypted with the same
/// key and readable by its owner only, while the node serves.
pub fn backup(database: &Database, to: &Path) -> Result<Summary, BackupError> {
    sqlite::create_private(to).map_err(|error| match error.kind() {
        std::io::ErrorKind::AlreadyExists => BackupError::Exists(to.display().to_string()),
        _ => io(to)(error),
    })?;
    let target = Database { path: to.to_owned(), key: database.key.clone() };
    let written = database.open_read_only().map_err(BackupError::from).and_then(|source| {
        copy(&source, &target)?;
        let written = target.open_read_only()?;
        check(&written)?;
        summarize(&written)
    });
    if written.is_err() {
        // An unfinished backup must not pass for one later.
        let _ = std::fs::remove_file(to);
    }
    written
}

/// Puts the backup `from` (opened with the key it was made under, or as
/// plain SQLite if it predates encryption) in place of `database` (the
/// node must be stopped), re-encrypted under the database's key. The
/// database it replaces is kept beside it, renamed, with its WAL.
pub fn restore(
    data_dir: &Path,
    database: &Database,
    from: &Database,
) -> Result<(Summary, Option<PathBuf>), BackupError> {
    let _lock = lock_data_dir(data_dir)?;
    let source = open_existing(&from.as_found()?)?;
    check(&source)?;
    let staged = Database { path: database.path.with_extension("restoring"), key: database.key.clone() };
    let _ = std::fs::remove_file(&staged.path);
    sqlite::export(&source, &staged)?;
    drop(source);
    {
        let conn = staged.open()?;
        conn.execute("DELETE FROM sync_state WHERE key IN ('cursor', ?1)", [store::LEASE_KEY])?;
        conn.execute(
            "INSERT INTO sync_state (key, value) VALUES (?1, randomblob(16)) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [store::DATABASE_KEY],
        )?;
        // The cloud may lack what the backup holds and the replaced database
        // had not sent: compare every ticket on the next link.
        conn.execute(
            "INSERT INTO sync_state (key, value) VALUES (?1, x'01') ON CONFLICT (key) DO UPDATE SET value = x'01'",
            [store::RECONCILE_KEY],
        )?;
    }
    // The replaced database is moved with its WAL, not opened: it may be
    // unreadable with the current key (a lost key is one reason to restore).
    let kept = if database.path.exists() {
        let kept = database.path.with_extension(format!("before-restore-{}", service_kit::clock::now_ms()));
        move_with_wal(&database.path, &kept)?;
        Some(kept)
    } else {
        None
    };
    put_in_place(&staged.path, &database.path)?;
    let restored = database.open_read_only()?;
    Ok((summarize(&restored)?, kept))
}

/// Re-encrypts `database` (the node must be stopped) under `new_key`: a
/// first encryption of a plain database, or a key rotation. Backups made
/// before it still need the key they were made under.
pub fn rotate_key(data_dir: &Path, database: &Database, new_key: DatabaseKey) -> Result<Summary, BackupError> {
    let _lock = lock_data_dir(data_dir)?;
    let current = database.as_found()?;
    if current.key.as_ref() == Some(&new_key) {
        return Err(BackupError::SameKey);
    }
    let conn = open_existing(&current)?;
    conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")?;
    let before = summarize(&conn)?;
    let staged = Database { path: database.path.with_extension("rekeying"), key: Some(new_key) };
    let _ = std::fs::remove_file(&staged.path);
    sqlite::export(&conn, &staged)?;
    drop(conn);
    let after = {
        let conn = staged.open_read_only()?;
        check(&conn)?;
        summarize(&conn)?
    };
    if after != before {
        let _ = std::fs::remove_file(&staged.path);
        return Err(BackupError::Invalid(format!("the re-encrypted copy holds {after:?}, the database {before:?}")));
    }
    // Checkpointed above: the WAL holds nothing the file lacks.
    put_in_place(&staged.path, &database.path)?;
    Ok(after)
}

/// Renames `from` to `to`, and its WAL along with it (SQLite finds a
/// database's WAL by its name), dropping the shared-memory index.
fn move_with_wal(from: &Path, to: &Path) -> Result<(), BackupError> {
    std::fs::rename(from, to).map_err(io(from))?;
    let wal = side_file(from, "-wal");
    if wal.exists() {
        std::fs::rename(&wal, side_file(to, "-wal")).map_err(io(&wal))?;
    }
    let _ = std::fs::remove_file(side_file(from, "-shm"));
    Ok(())
}

/// Puts the finished file `staged` in place of `database`, whose WAL and
/// index (if any are left) belong to the file it replaces.
fn put_in_place(staged: &Path, database: &Path) -> Result<(), BackupError> {
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(side_file(database, suffix));
    }
    std::fs::rename(staged, database).map_err(io(database))?;
    let directory = database.parent().unwrap_or(Path::new("."));
    File::open(directory).and_then(|dir| dir.sync_all()).map_err(io(directory))
}

fn side_file(database: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", database.display()))
}
