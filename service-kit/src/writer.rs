//! The group-commit writer both stores use: one thread owns the only write
//! connection, takes every job waiting (up to `batch_max`), and hands them
//! to the store's `commit` as one batch, so a burst costs one transaction
//! and one fsync. SQLite allows one writer anyway; a dedicated thread keeps
//! the blocking disk work off the async runtime.

use std::sync::Mutex;
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::mpsc;

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("the write queue is full")]
    Full,
    #[error("the writer has stopped")]
    Closed,
}

enum Queued<J> {
    Job(J),
    /// Commit what came before, then stop.
    Shutdown,
}

pub struct GroupWriter<J> {
    jobs: mpsc::Sender<Queued<J>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<J> std::fmt::Debug for GroupWriter<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupWriter").finish_non_exhaustive()
    }
}

impl<J: Send + 'static> GroupWriter<J> {
    /// Starts the writer thread on `conn`. `commit` receives batches of at
    /// most `batch_max` jobs, in the order they were queued.
    pub fn spawn(
        name: &str,
        mut conn: Connection,
        queue_max: usize,
        batch_max: usize,
        mut commit: impl FnMut(&mut Connection, Vec<J>) + Send + 'static,
    ) -> std::io::Result<Self> {
        assert!(queue_max > 0 && batch_max > 0, "writer bounds must be positive");
        let (jobs, mut queue) = mpsc::channel(queue_max);
        let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            let mut stopping = false;
            while !stopping {
                let Some(Queued::Job(first)) = queue.blocking_recv() else { break };
                let mut batch = vec![first];
                while batch.len() < batch_max {
                    match queue.try_recv() {
                        Ok(Queued::Job(job)) => batch.push(job),
                        Ok(Queued::Shutdown) => {
                            stopping = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                commit(&mut conn, batch);
            }
            // Jobs still queued are dropped with the queue: their callers see
            // their reply channel closed, and nothing unwritten was acknowledged.
            drop(queue);
            // Fold the WAL back into the database so a copy of the main file
            // alone is complete after a clean shutdown.
            if let Err(error) = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
                tracing::warn!(%error, "wal checkpoint at shutdown failed");
            }
        })?;
        Ok(Self { jobs, thread: Mutex::new(Some(thread)) })
    }

    /// Queues a job without waiting; a full queue is the caller's overload.
    pub fn try_send(&self, job: J) -> Result<(), QueueError> {
        self.jobs.try_send(Queued::Job(job)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => QueueError::Full,
            mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
        })
    }

    /// Queues a job, waiting for room.
    pub async fn send(&self, job: J) -> Result<(), QueueError> {
        self.jobs.send(Queued::Job(job)).await.map_err(|_| QueueError::Closed)
    }

    /// Jobs waiting for the writer.
    pub fn queued(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }

    /// Lets the writer commit what is queued, checkpoint the WAL and stop,
    /// and waits for it. Jobs queued after this are never run. Idempotent.
    pub async fn close(&self) {
        let thread = self.thread.lock().ok().and_then(|mut guard| guard.take());
        if let Some(thread) = thread {
            let _ = self.jobs.send(Queued::Shutdown).await;
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn jobs_before_close_are_committed_in_order_and_batched() {
        let committed = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&committed);
        let writer = GroupWriter::spawn(
            "test-writer",
            Connection::open_in_memory().unwrap(),
            64,
            4,
            move |_, batch: Vec<u32>| {
                sink.lock().unwrap().push(batch);
            },
        )
        .unwrap();
        for job in 0..10 {
            writer.send(job).await.unwrap();
        }
        writer.close().await;
        let batches = committed.lock().unwrap().clone();
        assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= 4), "{batches:?}");
        assert_eq!(batches.concat(), (0..10).collect::<Vec<_>>());
        assert_eq!(writer.send(11).await, Err(QueueError::Closed));
    }
}
