//! Stored tickets written in an older JSON shape (an upgrade changed
//! `Ticket`) are rewritten from their documents when a projector starts,
//! so the queue shows every ticket alike. Each is written over the version
//! it was read at, like any merge: one projected meanwhile is already in
//! the new shape and is left as it is.

use automerge::ActorId;
use cloud_store::StoreError;
use cloud_store::distributed::cache::Cache;
use cloud_store::distributed::mongo::{Db, StoredTicket, TicketWrite};
use sync_protocol::document::{TICKET_JSON_VERSION, TicketDocument};
use tokio_util::sync::CancellationToken;

use crate::config::ProjectorConfig;
use crate::project::written;

/// Tickets read and rewritten per round.
const REWRITE_BATCH: usize = 200;

/// Rewrites every stale ticket, round by round, until none is left or
/// `stop`; a failure is logged and ends the run (the next start resumes).
/// Its own clients: it runs beside the projection, once.
pub async fn rematerialize(config: ProjectorConfig, stop: CancellationToken) {
    let name = format!("projector/{}/rewrite", config.projector.id);
    let connected = async {
        let db = Db::connect(&config.mongodb, &name).await?;
        let cache = config.redis.as_ref().map(Cache::new).transpose().map_err(StoreError::from)?;
        Ok::<_, StoreError>((db, cache))
    };
    let (db, cache) = match connected.await {
        Ok(clients) => clients,
        Err(error) => {
            return tracing::error!(%error, "cannot reach MongoDB to rewrite stored tickets; retried at the next start");
        }
    };
    let replica = ActorId::random();
    let mut rewritten = 0usize;
    while !stop.is_cancelled() {
        match round(&db, &replica).await {
            Ok(0) => break,
            Ok(count) => rewritten += count,
            Err(error) => {
                tracing::error!(%error, "stored tickets could not be rewritten in this build's shape; retried at the next start");
                return;
            }
        }
    }
    if rewritten > 0
        && let Some(cache) = &cache
        && let Err(error) = cache.retire_all().await
    {
        tracing::warn!(%error, "cached reads not retired; they expire by themselves");
    }
    if rewritten > 0 {
        tracing::info!(
            tickets = rewritten,
            version = TICKET_JSON_VERSION,
            "stored tickets rewritten in this build's shape"
        );
    }
}

/// One batch: the number of tickets rewritten (0 when none is left, or
/// none of those found could be: another writer, say a projector of the
/// release before still running, keeps writing them in the old shape).
async fn round(db: &Db, replica: &ActorId) -> Result<usize, StoreError> {
    let stale = db.stale_tickets(TICKET_JSON_VERSION as i64, REWRITE_BATCH).await?;
    let writes: Vec<TicketWrite> = stale
        .into_iter()
        .map(|stored| rewrite(stored, replica))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    let attempted = writes.len();
    // Conflicts are tickets written since they were read.
    let conflicts = db.write_tickets(writes).await?;
    Ok(attempted - conflicts.len())
}

fn rewrite(stored: StoredTicket, replica: &ActorId) -> Result<Option<TicketWrite>, StoreError> {
    let ticket = TicketDocument::load(&stored.document, replica.clone())?.ticket()?;
    let json = serde_json::to_string(&ticket).map_err(|e| StoreError::Encode(e.to_string()))?;
    Ok(written(ticket.id, stored.v, &ticket, &json, stored.document, stored.held, &[]).write)
}
