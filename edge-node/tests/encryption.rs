//! Data at rest on ward hardware: the database, its WAL and its backups
//! hold no medication code or note in the clear; a wrong key is named as
//! such and changes nothing; a key rotation re-encrypts the database, and
//! a backup made under the old key restores with that key; a database from
//! before encryption is encrypted once by `rotate-key`.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use automerge::ActorId;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use edge_node::backup::{self, BackupError};
use edge_node::config::Config;
use edge_node::open_state;
use edge_node::store::{Store, StoreError};
use serde_json::json;
use service_kit::config::ServiceConfig;
use service_kit::sqlite::{Database, DatabaseKey, KeyError, OpenError};
use sync_protocol::ticket::Limits;
use test_fixtures::TestIssuer;
use test_fixtures::process::{edge_config, edge_key_file};
use tower::ServiceExt;

const WARD: &str = "ward-4b";
const CODE: &str = "AMOX-500";
const NOTE: &str = "ALLERGY: PENICILLIN";
const TICKETS: usize = 20;

/// A node's configuration in `dir`, encrypted with the test key, or plain.
fn node_config(dir: &Path, encrypted: bool) -> Config {
    let mut text = edge_config(dir, "edge-ward-4b", WARD, "");
    if !encrypted {
        text = text.replace(&format!("key_file = \"{}\"", edge_key_file(dir).display()), "");
    }
    Config::from_toml(&text).unwrap()
}

/// Makes [`TICKETS`] tickets naming [`CODE`] and [`NOTE`] through the
/// device API; `before_close` runs while the node is still open (its WAL
/// unfolded); then the store is closed.
async fn make_tickets(config: &Config, before_close: impl FnOnce(&Config)) {
    let issuer = TestIssuer::new("key-1");
    std::fs::write(config.node.data_dir.join("jwks.json"), issuer.jwks().to_string()).unwrap();
    let state = open_state(config.clone()).unwrap();
    let nurse = issuer.nurse(WARD);
    for n in 0..TICKETS {
        let body = json!({
            "items": [{ "medication_code": CODE, "quantity": n + 1, "unit": "capsule" }],
            "priority": "urgent",
            "notes": format!("{NOTE} (bed {n})"),
        });
        let request = Request::post("/api/v1/tickets")
            .header(header::AUTHORIZATION, format!("Bearer {nurse}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = edge_node::api::router(state.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    before_close(config);
    state.store.close().await;
}

/// Whether the file at `path`, if there is one, holds `needle` in its bytes.
fn holds(path: &Path, needle: &str) -> bool {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes.windows(needle.len()).any(|window| window == needle.as_bytes())
}

fn any_holds(files: &[PathBuf], needle: &str) -> bool {
    files.iter().any(|path| holds(path, needle))
}

fn with_wal(database: &Path) -> Vec<PathBuf> {
    vec![database.to_owned(), PathBuf::from(format!("{}-wal", database.display()))]
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// How many tickets `database` opens with (through the store, as the node would).
async fn tickets_in(database: &Database) -> Result<i64, StoreError> {
    let store = Store::open(database, &Default::default(), Limits::default(), ActorId::random())?;
    let count = store.read(|conn| Ok(conn.query_row("SELECT count(*) FROM tickets", [], |r| r.get(0))?)).await;
    store.close().await;
    count
}

#[tokio::test]
async fn the_database_its_wal_and_a_backup_hold_no_code_or_note_in_the_clear() {
    for encrypted in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let config = node_config(dir.path(), encrypted);
        let database = config.database().unwrap();
        let live_backup = dir.path().join("while-serving.sqlite3");
        make_tickets(&config, |config| {
            // Under load the pages are in the WAL, not yet in the file.
            let files = with_wal(&config.database_path());
            assert_eq!(any_holds(&files, CODE) || any_holds(&files, NOTE), !encrypted, "encrypted: {encrypted}");
            backup::backup(&config.database().unwrap(), &live_backup).unwrap();
        })
        .await;
        let files = with_wal(&database.path);
        for needle in [CODE, NOTE] {
            // The plain node is the control: the search finds what is there.
            assert_eq!(any_holds(&files, needle), !encrypted, "{needle} in the database, encrypted: {encrypted}");
            assert_eq!(holds(&live_backup, needle), !encrypted, "{needle} in the backup");
        }
        assert_eq!(mode(&database.path), 0o600, "the database is its owner's alone");
        assert_eq!(mode(&live_backup), 0o600, "a backup is its owner's alone");
        let summary = backup::backup(&database, &dir.path().join("after.sqlite3")).unwrap();
        assert_eq!(summary.tickets, TICKETS as u64);
    }
}

#[tokio::test]
async fn a_wrong_or_missing_key_is_named_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(dir.path(), true);
    make_tickets(&config, |_| {}).await;
    let database = config.database().unwrap();
    let before = std::fs::read(&database.path).unwrap();

    let wrong = Database { path: database.path.clone(), key: Some(DatabaseKey::generate()) };
    let error = tickets_in(&wrong).await.unwrap_err();
    assert!(matches!(error, StoreError::Open(OpenError::WrongKey { .. })), "{error}");
    assert!(error.to_string().contains("does not decrypt"), "{error}");
    let error = tickets_in(&Database::plain(&database.path)).await.unwrap_err();
    assert!(matches!(error, StoreError::Open(OpenError::Encrypted { .. })), "{error}");
    let error = backup::backup(&wrong, &dir.path().join("b.sqlite3")).unwrap_err();
    assert!(matches!(error, BackupError::Open(OpenError::WrongKey { .. })), "{error}");
    assert!(!dir.path().join("b.sqlite3").exists(), "no half backup is left");
    let error = backup::restore(dir.path(), &database, &Database { path: database.path.clone(), ..wrong }).unwrap_err();
    assert!(matches!(error, BackupError::Open(OpenError::WrongKey { .. })), "{error}");

    assert_eq!(std::fs::read(&database.path).unwrap(), before, "the database was not touched");
    assert_eq!(tickets_in(&database).await.unwrap(), TICKETS as i64, "and opens with its key");

    // A key configured over a plain database names the way to encrypt it.
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = node_config(plain_dir.path(), false);
    make_tickets(&plain, |_| {}).await;
    let keyed = Database { path: plain.database_path(), key: database.key.clone() };
    let error = tickets_in(&keyed).await.unwrap_err();
    assert!(error.to_string().contains("not encrypted") && error.to_string().contains("rotate-key"), "{error}");
}

#[tokio::test]
async fn a_rotation_re_encrypts_and_a_backup_restores_with_the_key_it_was_made_under() {
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(dir.path(), true);
    make_tickets(&config, |_| {}).await;
    let old = config.database().unwrap();
    let old_backup = dir.path().join("before-rotation.sqlite3");
    backup::backup(&old, &old_backup).unwrap();

    let new_key = DatabaseKey::generate();
    let error = backup::rotate_key(dir.path(), &old, old.key.clone().unwrap()).unwrap_err();
    assert!(matches!(error, BackupError::SameKey), "{error}");
    let summary = backup::rotate_key(dir.path(), &old, new_key.clone()).unwrap();
    assert_eq!(summary.tickets, TICKETS as u64);
    let new = Database { path: old.path.clone(), key: Some(new_key) };
    let error = tickets_in(&old).await.unwrap_err();
    assert!(matches!(error, StoreError::Open(OpenError::WrongKey { .. })), "{error}");
    assert_eq!(tickets_in(&new).await.unwrap(), TICKETS as i64);
    assert!(!any_holds(&with_wal(&new.path), CODE));

    // The old backup needs its own key; restored, it is under the new one.
    let error = backup::restore(dir.path(), &new, &Database { path: old_backup.clone(), key: new.key.clone() });
    assert!(matches!(error, Err(BackupError::Open(OpenError::WrongKey { .. }))), "{error:?}");
    let (restored, kept) = backup::restore(dir.path(), &new, &Database { path: old_backup, key: old.key }).unwrap();
    assert_eq!(restored.tickets, TICKETS as u64);
    assert_eq!(tickets_in(&new).await.unwrap(), TICKETS as i64);
    let kept = Database { path: kept.unwrap(), key: new.key.clone() };
    assert_eq!(tickets_in(&kept).await.unwrap(), TICKETS as i64, "the replaced database is kept whole");
    assert!(!any_holds(&with_wal(&new.path), CODE) && !any_holds(&with_wal(&new.path), NOTE));
}

#[tokio::test]
async fn a_database_from_before_encryption_is_encrypted_once_by_rotate_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge-node.sqlite3");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/edge-node-schema-1.sqlite3"), &path)
        .unwrap();
    assert!(holds(&path, "schema 1 fixture ticket"), "the released file is plain");
    let key = DatabaseKey::generate();
    let configured = Database { path: path.clone(), key: Some(key.clone()) };
    backup::rotate_key(dir.path(), &configured, key).unwrap();
    assert!(!any_holds(&with_wal(&path), "schema 1 fixture ticket"));
    assert_eq!(tickets_in(&configured).await.unwrap(), 3, "every ticket of the released database");
}

#[test]
fn a_key_file_must_be_private_and_well_formed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("database.key");
    DatabaseKey::generate().write_new(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
    DatabaseKey::read(&path).unwrap();
    assert!(matches!(DatabaseKey::generate().write_new(&path), Err(KeyError::Exists { .. })), "never overwritten");

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let error = DatabaseKey::read(&path).unwrap_err();
    assert!(error.to_string().contains("readable by others (mode 644)"), "{error}");
    for text in ["", "abc", &"g".repeat(64), &"a".repeat(66)] {
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(matches!(DatabaseKey::read(&path), Err(KeyError::Malformed { .. })), "{text:?}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let missing = dir.path().join("missing.key");
    assert!(matches!(DatabaseKey::read(&missing), Err(KeyError::Io { .. })));
}
