//! Upgrades: a database written by every released schema opens with this
//! build (migrations run at start) with its tickets, history and outbox
//! intact; a database newer than this build is refused with a message that
//! says so, and is left untouched.
//!
//! Each `fixtures/edge-node-schema-N.sqlite3` was written by the edge node
//! of schema N (three tickets, one cancelled, nothing synced; their notes
//! say "schema N fixture ticket"). When a migration is added, the database
//! of the schema before it is added here. (Schema 2's holds ticket
//! documents of document schema 1: this build writes schema 2 into them.)
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::path::{Path, PathBuf};

use automerge::ActorId;
use edge_node::config::StorageConfig;
use edge_node::store::{self, ListQuery, SCHEMA_VERSION, Store, StoreError};
use rusqlite::Connection;
use service_kit::sqlite::Database;
use sync_protocol::ticket::{Limits, Status};

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.file_name().unwrap().to_string_lossy().starts_with("edge-node-schema-"))
        .collect();
    found.sort();
    found
}

fn copy_into(dir: &Path, fixture: &Path) -> PathBuf {
    let path = dir.join("edge-node.sqlite3");
    std::fs::copy(fixture, &path).unwrap();
    path
}

#[tokio::test]
async fn every_released_schema_opens_with_its_tickets_and_outbox() {
    let fixtures = fixtures();
    assert!(!fixtures.is_empty());
    for fixture in fixtures {
        let dir = tempfile::tempdir().unwrap();
        let path = copy_into(dir.path(), &fixture);
        let store =
            Store::open(&Database::plain(&path), &StorageConfig::default(), Limits::default(), ActorId::random())
                .unwrap_or_else(|e| panic!("{}: {e}", fixture.display()));
        let (tickets, outbox) = store
            .read(|conn| {
                let page = store::list_tickets(conn, &ListQuery { limit: 50, ..ListQuery::default() })?;
                Ok((page.tickets, store::outbox_counts(conn)?))
            })
            .await
            .unwrap();
        // Lists serve the stored JSON: rewritten at open in this build's shape.
        for json in &tickets {
            let raw: serde_json::Value = serde_json::from_str(json).unwrap();
            assert!(raw["created_at_utc"].as_str().is_some_and(|at| at.ends_with('Z')), "{json}");
            assert!(raw["supply"].is_array() && raw["order_conflicts"].is_array(), "{json}");
        }
        let tickets: Vec<sync_protocol::ticket::Ticket> =
            tickets.iter().map(|json| serde_json::from_str(json).unwrap()).collect();
        assert_eq!(tickets.len(), 3, "{}", fixture.display());
        assert_eq!(tickets.iter().filter(|t| t.status == Status::Cancelled).count(), 1);
        let schema = fixture.file_stem().unwrap().to_string_lossy().trim_start_matches("edge-node-schema-").to_owned();
        let notes = format!("schema {schema} fixture ticket");
        assert!(tickets.iter().all(|t| t.notes.starts_with(&notes)), "{}", fixture.display());
        assert_eq!((outbox.pending, outbox.stuck), (4, 0), "three creates and a cancel still to sync");
        let cancelled = tickets.iter().find(|t| t.status == Status::Cancelled).unwrap().id;
        let replica = store.replica().clone();
        let (_, history) = store.read(move |conn| store::ticket_with_history(conn, cancelled, &replica)).await.unwrap();
        assert_eq!(history.len(), 2, "created, then cancelled");
        store.close().await;
        let version: i64 =
            Connection::open(&path).unwrap().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version as usize, SCHEMA_VERSION, "migrated to this build's schema");
    }
}

#[tokio::test]
async fn a_database_newer_than_this_build_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = copy_into(dir.path(), &fixtures()[0]);
    Connection::open(&path).unwrap().pragma_update(None, "user_version", SCHEMA_VERSION as i64 + 1).unwrap();
    let before = std::fs::read(&path).unwrap();
    let error = Store::open(&Database::plain(&path), &StorageConfig::default(), Limits::default(), ActorId::random())
        .unwrap_err();
    assert!(matches!(error, StoreError::Migrate(_)), "{error}");
    assert!(error.to_string().contains("newer than this build"), "{error}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "the database was not touched");
}
