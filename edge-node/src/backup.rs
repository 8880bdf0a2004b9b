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

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use crate::store;

/// A backup step held up by a lock is retried this often, this far apart.
const BUSY_RETRIES_MAX: u32 = 100;
const BUSY_RETRY_DELAY: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0} exists; choose a new file")]
    Exists(String),
    #[error("the node is running (its data directory is locked); stop it first")]
    Running,
    #[error("not a usable backup: {0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.display().to_string(), source }
}

/// What a backup or restore holds.
#[derive(Debug, Clone, Copy)]
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

/// Copies `from` into a new file `to` in one step of the backup API (all
/// pages at once), retrying a step the source's lock held up.
fn copy(from: &Connection, to: &Path) -> Result<(), BackupError> {
    let mut destination = Connection::open(to)?;
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
    File::open(to).and_then(|f| f.sync_all()).map_err(io(to))
}

/// Backs up the database at `database` into the new file `to`, while the node serves.
pub fn backup(database: &Path, to: &Path) -> Result<Summary, BackupError> {
    if to.exists() {
        return Err(BackupError::Exists(to.display().to_string()));
    }
    let source = Connection::open_with_flags(database, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    copy(&source, to)?;
    let written = Connection::open_with_flags(to, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    check(&written)?;
    summarize(&written)
}

/// Puts the backup `from` in place of the database at `database` (the node
/// must be stopped). The database it replaces is kept beside it, renamed.
pub fn restore(data_dir: &Path, database: &Path, from: &Path) -> Result<(Summary, Option<PathBuf>), BackupError> {
    let _lock = lock_data_dir(data_dir)?;
    let source = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    check(&source)?;
    let staged = database.with_extension("restoring");
    let _ = std::fs::remove_file(&staged);
    copy(&source, &staged)?;
    {
        let conn = Connection::open(&staged)?;
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
    let kept = if database.exists() {
        // Fold the old database's WAL in before moving it, so the kept copy is whole.
        Connection::open(database)?.pragma_update(None, "wal_checkpoint", "TRUNCATE")?;
        let stamp = service_kit::clock::now_ms();
        let kept = database.with_extension(format!("before-restore-{stamp}"));
        std::fs::rename(database, &kept).map_err(io(database))?;
        Some(kept)
    } else {
        None
    };
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", database.display()));
        let _ = std::fs::remove_file(side);
    }
    std::fs::rename(&staged, database).map_err(io(database))?;
    let restored = Connection::open_with_flags(database, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok((summarize(&restored)?, kept))
}
