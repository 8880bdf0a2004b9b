//! SQLite pieces both services use: connection settings, the migration
//! runner, and a small pool of read-only connections.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

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

/// Read-only connections, used from blocking threads.
#[derive(Debug)]
pub struct ReadPool {
    connections: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

impl ReadPool {
    pub fn open(path: &Path, size: usize) -> rusqlite::Result<Self> {
        let connections = (0..size.max(1))
            .map(|_| {
                let conn = Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                conn.pragma_update(None, "busy_timeout", 5_000)?;
                Ok(Mutex::new(conn))
            })
            .collect::<rusqlite::Result<_>>()?;
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
