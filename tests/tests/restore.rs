//! What an edge database can go through, on both cloud backends: restored
//! from a backup taken before its first ticket, mid-burst or after; replaced
//! by an empty one under the same node id; copied to a second machine and
//! started beside the original; restored and re-read from the cloud while
//! the bridge restarts. In each, every ticket made at the edge, before or
//! after, reaches the cloud exactly once and comes back to the edge, and a
//! copy is refused.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use service_kit::sqlite::{Database, DatabaseKey};
use test_fixtures::cloud::Cloud;
use test_fixtures::process::{ServiceProcess, binary, edge_config, edge_key_file};
use test_fixtures::{BridgeProcess, EdgeNodeProcess, TestIssuer, free_port, get_json, wait_for};

const WARD: &str = "ward-4b";
const NODE: &str = "edge-ward-4b";
/// How long the cloud and an edge may take to converge.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(90);

/// The cloud side: the embedded bridge, or a bridge and a projector on
/// Kafka, MongoDB and Redis.
enum Side {
    Embedded { issuer: TestIssuer, bridge: BridgeProcess, dir: tempfile::TempDir },
    Distributed(Cloud),
}

impl Side {
    fn embedded() -> Self {
        let issuer = TestIssuer::new("key-1");
        let dir = tempfile::tempdir().unwrap();
        let bridge = BridgeProcess::start_bridge(dir.path(), &format!("127.0.0.1:{}", free_port()), &issuer.jwks(), "");
        Side::Embedded { issuer, bridge, dir }
    }

    fn distributed(test: &str) -> Self {
        Side::Distributed(Cloud::start(test, 1, 2))
    }

    /// Two bridge instances on one distributed store.
    fn distributed_pair(test: &str) -> Self {
        Side::Distributed(Cloud::start(test, 2, 2))
    }

    fn issuer(&self) -> &TestIssuer {
        match self {
            Side::Embedded { issuer, .. } => issuer,
            Side::Distributed(cloud) => &cloud.issuer,
        }
    }

    fn bridge(&mut self) -> &mut BridgeProcess {
        self.bridge_at(0)
    }

    fn bridge_at(&mut self, index: usize) -> &mut BridgeProcess {
        match self {
            Side::Embedded { bridge, .. } => bridge,
            Side::Distributed(cloud) => &mut cloud.bridges[index],
        }
    }

    fn pharmacist(&self) -> String {
        self.issuer().token("p.lindqvist", &["pharmacist"], &[])
    }

    fn nurse(&self) -> String {
        self.issuer().nurse(WARD)
    }

    /// The `[sync]` section of an edge of this cloud; `limits` is TOML of `[sync.session.limits]`.
    fn sync(&mut self, limits: &str) -> String {
        self.sync_at(0, limits)
    }

    fn sync_at(&mut self, bridge: usize, limits: &str) -> String {
        let addr = self.bridge_at(bridge).addr;
        format!(
            "[sync]\nbridge_url = \"ws://{addr}/sync\"\nreconnect_base_ms = 50\nreconnect_cap_ms = 300\n\
             [sync.session.limits]\n{limits}\n"
        )
    }

    /// Starts an edge node of `NODE` in `dir` (a new one, or the one there).
    fn edge(&mut self, dir: &Path, limits: &str) -> EdgeNodeProcess {
        self.edge_at(0, dir, limits)
    }

    /// An edge node syncing through bridge instance `bridge`.
    fn edge_at(&mut self, bridge: usize, dir: &Path, limits: &str) -> EdgeNodeProcess {
        std::fs::write(dir.join("node-token"), self.issuer().token(NODE, &["edge-node"], &[WARD])).unwrap();
        let config = edge_config(dir, NODE, WARD, &self.sync_at(bridge, limits));
        ServiceProcess::launch_with_config("edge-node", dir, &self.issuer().jwks(), &config)
    }
}

fn ticket(n: usize) -> Value {
    json!({ "items": [{ "medication_code": format!("MED-{}", n % 300), "quantity": 2, "unit": "vial" }], "priority": "routine", "notes": format!("ticket {n}") })
}

fn edge_command(dir: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new(binary("edge-node"))
        .arg("--config")
        .arg(dir.join("edge-node.toml"))
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "edge-node {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn database(dir: &Path) -> PathBuf {
    dir.join("edge-node.sqlite3")
}

/// Backs the serving node's database up into `to`.
fn backup(dir: &Path, to: &Path) {
    eprintln!("{}", edge_command(dir, &["backup", to.to_str().unwrap()]));
}

/// Makes `count` tickets at the edge; returns their ids.
async fn make(client: &reqwest::Client, edge: &EdgeNodeProcess, nurse: &str, from: usize, count: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for n in from..from + count {
        let response =
            client.post(edge.url("/api/v1/tickets")).bearer_auth(nurse).json(&ticket(n)).send().await.unwrap();
        assert_eq!(response.status(), 201);
        ids.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// Every ticket id the edge lists, paging through.
async fn edge_ids(client: &reqwest::Client, edge: &EdgeNodeProcess, nurse: &str) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let mut page: Option<String> = None;
    loop {
        let url = match &page {
            Some(page) => edge.url(&format!("/api/v1/tickets?limit=200&page={page}")),
            None => edge.url("/api/v1/tickets?limit=200"),
        };
        let body: Value = get_json(client, url, nurse).await;
        ids.extend(body["tickets"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_owned()));
        match body["next_page"].as_str() {
            Some(next) => page = Some(next.to_owned()),
            None => return ids,
        }
    }
}

/// How many tickets of the ward the bridge holds.
async fn cloud_total(client: &reqwest::Client, side: &mut Side, pharmacist: &str) -> Option<u64> {
    let url = side.bridge().url(&format!("/api/v1/queue?ward={WARD}&limit=1"));
    let response = client.get(url).bearer_auth(pharmacist).send().await.ok()?;
    response.json::<Value>().await.ok()?["total"].as_u64()
}

async fn sync_status(client: &reqwest::Client, edge: &EdgeNodeProcess, nurse: &str) -> Value {
    get_json(client, edge.url("/api/v1/sync"), nurse).await
}

/// Waits until the cloud holds exactly `expected` of the ward (each once)
/// and the edge holds each of them, with nothing left to send.
async fn converged(
    client: &reqwest::Client,
    side: &mut Side,
    edge: &EdgeNodeProcess,
    nurse: &str,
    expected: &BTreeSet<String>,
) {
    let pharmacist = side.pharmacist();
    wait_for("the edge and the cloud to converge", CONVERGE_TIMEOUT, async || {
        cloud_total(client, side, &pharmacist).await == Some(expected.len() as u64)
            && edge_ids(client, edge, nurse).await == *expected
            && sync_status(client, edge, nurse).await["outbox"]["pending"] == 0
    })
    .await;
    for id in expected {
        let response =
            client.get(side.bridge().url(&format!("/api/v1/tickets/{id}"))).bearer_auth(&pharmacist).send().await;
        assert_eq!(response.unwrap().status(), 200, "ticket {id} is in the cloud");
    }
    let status = sync_status(client, edge, nurse).await;
    assert_eq!(status["outbox"]["stuck"], 0, "{status}");
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap()
}

async fn linked(client: &reqwest::Client, edge: &EdgeNodeProcess, nurse: &str) {
    wait_for("the edge to link", Duration::from_secs(30), async || {
        sync_status(client, edge, nurse).await["connected"] == true
    })
    .await;
}

/// When the backup is taken, against the node's tickets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackupAt {
    /// Linked, nothing made yet (the case that lost tickets).
    BeforeFirstTicket,
    /// In the middle of a burst, with changes not yet synced.
    MidBurst,
    /// After everything made had reached the cloud.
    AfterSync,
}

const BURST: usize = 120;

/// The node makes tickets on both sides of a backup, which is then restored
/// in place; the restored node makes more. Everything ends up on both
/// sides once, also after the node restarts.
async fn a_restore_loses_nothing(mut side: Side, at: BackupAt) {
    let dir = tempfile::tempdir().unwrap();
    let (client, nurse) = (client(), side.nurse());
    let mut edge = side.edge(dir.path(), "");
    linked(&client, &edge, &nurse).await;
    let file = dir.path().join("backup.sqlite3");
    let mut made = BTreeSet::new();
    if at == BackupAt::BeforeFirstTicket {
        backup(dir.path(), &file);
    }
    made.extend(make(&client, &edge, &nurse, 0, BURST / 2).await);
    if at == BackupAt::MidBurst {
        backup(dir.path(), &file);
    }
    made.extend(make(&client, &edge, &nurse, BURST / 2, BURST / 2).await);
    converged(&client, &mut side, &edge, &nurse, &made).await;
    if at == BackupAt::AfterSync {
        backup(dir.path(), &file);
    }
    made.extend(make(&client, &edge, &nurse, BURST, BURST).await);
    converged(&client, &mut side, &edge, &nurse, &made).await;

    edge.terminate();
    eprintln!("{}", edge_command(dir.path(), &["restore", file.to_str().unwrap()]));
    edge.restart();
    // Made once linked again: protocol 2 numbered them at or below what
    // the bridge had acknowledged of the node, and dropped them.
    linked(&client, &edge, &nurse).await;
    made.extend(make(&client, &edge, &nurse, 10_000, 3).await);
    converged(&client, &mut side, &edge, &nurse, &made).await;
    // The fault this guards against showed only after a restart.
    edge.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    converged(&client, &mut side, &edge, &nurse, &made).await;
    eprintln!("{at:?}: {} tickets on both sides, each once", made.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_restore_of_a_backup_taken_before_the_first_ticket_loses_nothing() {
    a_restore_loses_nothing(Side::embedded(), BackupAt::BeforeFirstTicket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_restore_of_a_backup_taken_mid_burst_loses_nothing() {
    a_restore_loses_nothing(Side::embedded(), BackupAt::MidBurst).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_restore_of_a_backup_taken_after_sync_loses_nothing() {
    a_restore_loses_nothing(Side::embedded(), BackupAt::AfterSync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_a_restore_of_a_backup_taken_before_the_first_ticket_loses_nothing() {
    a_restore_loses_nothing(Side::distributed("restore-before"), BackupAt::BeforeFirstTicket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_a_restore_of_a_backup_taken_mid_burst_loses_nothing() {
    a_restore_loses_nothing(Side::distributed("restore-mid"), BackupAt::MidBurst).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_a_restore_of_a_backup_taken_after_sync_loses_nothing() {
    a_restore_loses_nothing(Side::distributed("restore-after"), BackupAt::AfterSync).await;
}

/// A new disk (an empty data directory) under a node id that has synced:
/// its first changes are numbered from 1 again, and none is dropped; it
/// gets the node's earlier tickets back from the cloud.
async fn a_node_id_reused_with_an_empty_database_loses_nothing(mut side: Side) {
    let (old_dir, new_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (client, nurse) = (client(), side.nurse());
    let mut old = side.edge(old_dir.path(), "");
    let mut made: BTreeSet<String> = make(&client, &old, &nurse, 0, BURST).await.into_iter().collect();
    converged(&client, &mut side, &old, &nurse, &made).await;
    old.terminate();

    let mut new = side.edge(new_dir.path(), "");
    made.extend(make(&client, &new, &nurse, 10_000, 3).await);
    converged(&client, &mut side, &new, &nurse, &made).await;
    new.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    converged(&client, &mut side, &new, &nurse, &made).await;
    let nodes: Value = get_json(&client, side.bridge().url("/api/v1/nodes"), &side.pharmacist()).await;
    assert!(nodes[0]["taken_over_at"].is_i64(), "the takeover is shown: {nodes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_node_id_reused_with_an_empty_database_loses_nothing() {
    a_node_id_reused_with_an_empty_database_loses_nothing(Side::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_a_node_id_reused_with_an_empty_database_loses_nothing() {
    a_node_id_reused_with_an_empty_database_loses_nothing(Side::distributed("reused-id")).await;
}

/// A copy of a running node's database (a file copy, not a restore) started
/// on a second machine under the same node id is refused, and stays refused
/// once the original has reconnected, even while the original is offline;
/// what the copy made is kept in its outbox, not lost and not merged. The
/// copy syncs through bridge instance `copy_bridge`.
async fn a_copy_beside_the_original_is_refused(mut side: Side, copy_bridge: usize) {
    let (dir, copy_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (client, nurse) = (client(), side.nurse());
    let mut original = side.edge(dir.path(), "");
    let mut made: BTreeSet<String> = make(&client, &original, &nurse, 0, 20).await.into_iter().collect();
    converged(&client, &mut side, &original, &nurse, &made).await;
    let file = dir.path().join("copy.sqlite3");
    backup(dir.path(), &file);
    std::fs::copy(&file, database(copy_dir.path())).unwrap();

    let copy = side.edge_at(copy_bridge, copy_dir.path(), "");
    let refused_for = async |reasons: &[&str]| {
        wait_for(&format!("the copy to be refused ({reasons:?})"), Duration::from_secs(30), async || {
            let status = sync_status(&client, &copy, &nurse).await;
            status["needs_attention"] == true
                && status["last_error"].as_str().is_some_and(|error| reasons.iter().any(|r| error.contains(r)))
        })
        .await;
    };
    // Refused while the original is connected, which takes a new lease at
    // that, so the copy's next tries find its lease outdated.
    refused_for(&["AlreadyConnected", "Superseded"]).await;
    let status = sync_status(&client, &original, &nurse).await;
    assert!(status["connected"] == true && status["needs_attention"] == false, "the original syncs on: {status}");
    let copy_made = make(&client, &copy, &nurse, 5_000, 2).await;
    made.extend(make(&client, &original, &nurse, 100, 5).await);
    converged(&client, &mut side, &original, &nurse, &made).await;

    // The original reconnects (taking a new lease; its next ticket reaching
    // the cloud shows the bridge has recorded it) and goes offline: the copy
    // is refused for good, not let in.
    original.restart();
    made.extend(make(&client, &original, &nurse, 200, 1).await);
    converged(&client, &mut side, &original, &nurse, &made).await;
    original.terminate();
    refused_for(&["Superseded"]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pharmacist = side.pharmacist();
    assert_eq!(
        cloud_total(&client, &mut side, &pharmacist).await,
        Some(made.len() as u64),
        "the copy's tickets stay out"
    );
    let status = sync_status(&client, &copy, &nurse).await;
    assert_eq!(status["outbox"]["pending"], copy_made.len(), "the copy keeps what it made: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_copy_beside_the_original_is_refused() {
    a_copy_beside_the_original_is_refused(Side::embedded(), 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_a_copy_beside_the_original_is_refused() {
    a_copy_beside_the_original_is_refused(Side::distributed("copy"), 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_a_copy_through_another_bridge_instance_is_refused() {
    a_copy_beside_the_original_is_refused(Side::distributed_pair("copy-elsewhere"), 1).await;
}

/// A restored node re-reads its own tickets from the cloud in small
/// batches, and the bridge restarts in the middle of it: the re-read goes
/// on where it stopped and the node ends up with every one of them.
async fn a_re_read_cut_by_a_bridge_restart_completes(mut side: Side, tickets: usize) {
    const SMALL_BATCHES: &str = "changes_per_batch_max = 16";
    let (dir, restored_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (client, nurse) = (client(), side.nurse());
    let mut edge = side.edge(dir.path(), SMALL_BATCHES);
    linked(&client, &edge, &nurse).await;
    let file = dir.path().join("backup.sqlite3");
    backup(dir.path(), &file);
    let mut made: BTreeSet<String> = make(&client, &edge, &nurse, 0, tickets).await.into_iter().collect();
    converged(&client, &mut side, &edge, &nurse, &made).await;
    edge.terminate();

    // The backup goes onto new hardware; its feed starts over.
    std::fs::copy(dir.path().join("node-token"), restored_dir.path().join("node-token")).unwrap();
    let config = edge_config(restored_dir.path(), NODE, WARD, &side.sync(SMALL_BATCHES));
    std::fs::write(restored_dir.path().join("edge-node.toml"), &config).unwrap();
    std::fs::write(restored_dir.path().join("jwks.json"), side.issuer().jwks().to_string()).unwrap();
    eprintln!("{}", edge_command(restored_dir.path(), &["restore", file.to_str().unwrap()]));
    let restored = ServiceProcess::launch_with_config("edge-node", restored_dir.path(), &side.issuer().jwks(), &config);
    let restored_database = Database {
        path: database(restored_dir.path()),
        key: Some(DatabaseKey::read(&edge_key_file(restored_dir.path())).unwrap()),
    };
    let count = || {
        let conn = restored_database.open_read_only().unwrap();
        conn.query_row("SELECT count(*) FROM tickets", [], |r| r.get::<_, i64>(0)).unwrap() as usize
    };
    wait_for("the re-read to begin", Duration::from_secs(30), async || count() > 0).await;
    side.bridge().restart();
    let at_restart = count();
    assert!(at_restart < tickets, "the restart came before the re-read ended ({at_restart} of {tickets})");
    made.extend(make(&client, &restored, &nurse, 10_000, 3).await);
    converged(&client, &mut side, &restored, &nurse, &made).await;
    eprintln!("re-read cut at {at_restart} of {tickets} tickets; all {} on both sides", made.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_re_read_cut_by_a_bridge_restart_completes() {
    a_re_read_cut_by_a_bridge_restart_completes(Side::embedded(), 1_500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_a_re_read_cut_by_a_bridge_restart_completes() {
    a_re_read_cut_by_a_bridge_restart_completes(Side::distributed("re-read"), 1_000).await;
}

/// Removes a ticket's changes from the cloud's store behind the bridge's
/// back, as a restore of the cloud from an older backup would.
async fn cloud_loses(side: &mut Side, ids: &[String]) {
    match side {
        Side::Embedded { bridge, dir, .. } => {
            bridge.terminate();
            let conn = rusqlite::Connection::open(dir.path().join("cloud-bridge.sqlite3")).unwrap();
            for id in ids {
                conn.execute("DELETE FROM tickets WHERE id = ?1", [id]).unwrap();
                conn.execute("DELETE FROM changes WHERE ticket_id = ?1", [id]).unwrap();
            }
            drop(conn);
            bridge.restart();
        }
        Side::Distributed(cloud) => {
            let tickets = cloud.database().await.collection::<mongodb::bson::Document>("tickets");
            tickets.delete_many(mongodb::bson::doc! { "_id": { "$in": ids } }).await.unwrap();
        }
    }
}

/// How many of `ids` the cloud's store holds (behind the bridge: the
/// distributed store's cached reads may still show what it lost).
async fn held_by_cloud(client: &reqwest::Client, side: &mut Side, ids: &[String]) -> usize {
    match side {
        Side::Embedded { .. } => {
            let pharmacist = side.pharmacist();
            let mut held = 0;
            for id in ids {
                let url = side.bridge().url(&format!("/api/v1/tickets/{id}"));
                held += usize::from(client.get(url).bearer_auth(&pharmacist).send().await.unwrap().status() == 200);
            }
            held
        }
        Side::Distributed(cloud) => {
            let tickets = cloud.database().await.collection::<mongodb::bson::Document>("tickets");
            tickets.count_documents(mongodb::bson::doc! { "_id": { "$in": ids } }).await.unwrap() as usize
        }
    }
}

/// The cloud lost tickets the edge had synced (its outbox is empty, so the
/// edge cannot know): an admin asks the edge to reconcile, and what the
/// cloud lacks of the node's changes reaches it again.
async fn a_reconciliation_sends_again_what_the_cloud_lost(mut side: Side) {
    let dir = tempfile::tempdir().unwrap();
    let (client, nurse) = (client(), side.nurse());
    let admin = side.issuer().token("it.admin", &["admin"], &[WARD]);
    let edge = side.edge(dir.path(), "");
    let made: BTreeSet<String> = make(&client, &edge, &nurse, 0, 60).await.into_iter().collect();
    converged(&client, &mut side, &edge, &nurse, &made).await;
    let lost: Vec<String> = made.iter().take(25).cloned().collect();
    cloud_loses(&mut side, &lost).await;
    assert_eq!(held_by_cloud(&client, &mut side, &lost).await, 0, "the cloud lost them");
    assert_eq!(sync_status(&client, &edge, &nurse).await["outbox"]["pending"], 0, "the edge has nothing to send");

    let reconcile = |token: &str| client.post(edge.url("/api/v1/sync/reconcile")).bearer_auth(token.to_owned()).send();
    assert_eq!(reconcile(&nurse).await.unwrap().status(), 403, "an admin's to ask for");
    assert_eq!(reconcile(&admin).await.unwrap().status(), 202);
    wait_for("the cloud to hold what it lost", CONVERGE_TIMEOUT, async || {
        held_by_cloud(&client, &mut side, &lost).await == lost.len()
    })
    .await;
    converged(&client, &mut side, &edge, &nurse, &made).await;
    wait_for("the reconciliation to finish", Duration::from_secs(30), async || {
        let status = sync_status(&client, &edge, &nurse).await;
        status["reconcile_requested"] == false && status["reconciled_at"].is_i64()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_reconciliation_sends_again_what_the_cloud_lost() {
    a_reconciliation_sends_again_what_the_cloud_lost(Side::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_a_reconciliation_sends_again_what_the_cloud_lost() {
    a_reconciliation_sends_again_what_the_cloud_lost(Side::distributed("reconcile")).await;
}
