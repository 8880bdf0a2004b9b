//! Backup of a serving node under write load, restore into a new data
//! directory, and convergence with the bridge afterwards: every ticket
//! acknowledged before the backup began is in it; what the node made after
//! the backup comes back from the cloud; what the restored node makes before
//! it reconnects reaches the cloud; nothing is duplicated.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use test_fixtures::process::{ServiceProcess, binary, edge_config};
use test_fixtures::{BridgeProcess, EdgeNodeProcess, TestIssuer, free_port, get_json, wait_for};

const WARD: &str = "ward-4b";
const NODE: &str = "edge-ward-4b";

fn ticket(n: usize) -> Value {
    json!({ "items": [{ "medication_code": format!("MED-{}", n % 300), "quantity": 2, "unit": "vial" }], "priority": "routine", "notes": format!("load {n}") })
}

fn edge_command(config: &Path, args: &[&str]) -> String {
    let output =
        std::process::Command::new(binary("edge-node")).arg("--config").arg(config).args(args).output().unwrap();
    assert!(output.status.success(), "edge-node {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// Every ticket id a server lists, paging through.
async fn ids(client: &reqwest::Client, url: &str, token: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut page: Option<String> = None;
    loop {
        let paged = match &page {
            Some(page) => format!("{url}?limit=200&page={page}"),
            None => format!("{url}?limit=200"),
        };
        let body: Value = get_json(client, &paged, token).await;
        ids.extend(body["tickets"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_owned()));
        match body["next_page"].as_str() {
            Some(next) => page = Some(next.to_owned()),
            None => return ids,
        }
    }
}

/// How many tickets of the ward the bridge holds, and whether it holds each of `expected`.
async fn bridge_holds(
    client: &reqwest::Client,
    bridge: &BridgeProcess,
    token: &str,
    expected: &BTreeSet<String>,
) -> bool {
    let queue: Value = get_json(client, bridge.url(&format!("/api/v1/queue?ward={WARD}&limit=1")), token).await;
    if queue["total"].as_u64() != Some(expected.len() as u64) {
        return false;
    }
    for id in expected {
        let response =
            client.get(bridge.url(&format!("/api/v1/tickets/{id}"))).bearer_auth(token).send().await.unwrap();
        if response.status() != 200 {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_load_restores_and_converges_with_the_cloud_without_duplicates() {
    let issuer = TestIssuer::new("key-1");
    let (bridge_dir, edge_dir, restored_dir) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let nurse = issuer.nurse(WARD);
    let pharmacist = issuer.token("p.lindqvist", &["pharmacist"], &[]);
    let bridge_port = free_port();
    let bridge =
        BridgeProcess::start_bridge(bridge_dir.path(), &format!("127.0.0.1:{bridge_port}"), &issuer.jwks(), "");
    let sync = format!(
        "[sync]\nbridge_url = \"ws://127.0.0.1:{bridge_port}/sync\"\nreconnect_base_ms = 50\nreconnect_cap_ms = 200\n"
    );
    for dir in [edge_dir.path(), restored_dir.path()] {
        std::fs::write(dir.join("node-token"), issuer.token(NODE, &["edge-node"], &[WARD])).unwrap();
    }
    let mut edge = EdgeNodeProcess::start(edge_dir.path(), NODE, WARD, &issuer.jwks(), &sync);

    // Nurses keep creating tickets; each lane notes when each was acknowledged.
    let acknowledged: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut lanes = Vec::new();
    for lane in 0..8 {
        let (client, nurse, url) = (client.clone(), nurse.clone(), edge.url("/api/v1/tickets"));
        let (acknowledged, stop) = (Arc::clone(&acknowledged), Arc::clone(&stop));
        lanes.push(tokio::spawn(async move {
            let mut n = lane;
            while !stop.load(Ordering::Relaxed) {
                let response = client.post(&url).bearer_auth(&nurse).json(&ticket(n)).send().await.unwrap();
                assert_eq!(response.status(), 201);
                let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
                acknowledged.lock().unwrap().push((id, Instant::now()));
                n += 8;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let backup_file = edge_dir.path().join("backup.sqlite3");
    let backup_began = Instant::now();
    let printed = edge_command(&edge_dir.path().join("edge-node.toml"), &["backup", backup_file.to_str().unwrap()]);
    eprintln!("{printed}");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, Ordering::Relaxed);
    for lane in lanes {
        lane.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let before_backup: BTreeSet<String> =
        acknowledged.iter().filter(|(_, at)| *at < backup_began).map(|(id, _)| id.clone()).collect();
    let all_made: BTreeSet<String> = acknowledged.iter().map(|(id, _)| id.clone()).collect();
    assert!(before_backup.len() > 50 && all_made.len() > before_backup.len() + 50, "load on both sides of the backup");

    // The cloud gets everything; then the node's disk dies.
    wait_for("the node's outbox to reach the cloud", Duration::from_secs(60), async || {
        bridge_holds(&client, &bridge, &pharmacist, &all_made).await
    })
    .await;
    edge.terminate();

    // A new data directory, the backup restored into it, started offline first.
    let restored_config = restored_dir.path().join("edge-node.toml");
    std::fs::write(&restored_config, edge_config(restored_dir.path(), NODE, WARD, "")).unwrap();
    std::fs::write(restored_dir.path().join("jwks.json"), issuer.jwks().to_string()).unwrap();
    eprintln!("{}", edge_command(&restored_config, &["restore", backup_file.to_str().unwrap()]));
    let mut restored = ServiceProcess::launch_with_config(
        "edge-node",
        restored_dir.path(),
        &issuer.jwks(),
        &edge_config(restored_dir.path(), NODE, WARD, ""),
    );
    let in_backup: BTreeSet<String> =
        ids(&client, &restored.url("/api/v1/tickets"), &nurse).await.into_iter().collect();
    let missing: Vec<_> = before_backup.difference(&in_backup).collect();
    assert!(missing.is_empty(), "{} tickets acknowledged before the backup are missing", missing.len());
    // The ward works on before the link is back.
    let mut made_after_restore = BTreeSet::new();
    for n in 0..5 {
        let response = client
            .post(restored.url("/api/v1/tickets"))
            .bearer_auth(&nurse)
            .json(&ticket(100_000 + n))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        made_after_restore.insert(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    restored.terminate();

    // Linked again: both sides converge on the same tickets, each once.
    let restored = ServiceProcess::launch_with_config(
        "edge-node",
        restored_dir.path(),
        &issuer.jwks(),
        &edge_config(restored_dir.path(), NODE, WARD, &sync),
    );
    let expected: BTreeSet<String> = all_made.union(&made_after_restore).cloned().collect();
    wait_for("the restored node and the cloud to converge", Duration::from_secs(60), async || {
        let at_edge = ids(&client, &restored.url("/api/v1/tickets"), &nurse).await;
        at_edge.len() == expected.len()
            && at_edge.iter().cloned().collect::<BTreeSet<_>>() == expected
            && bridge_holds(&client, &bridge, &pharmacist, &expected).await
    })
    .await;
    let status: Value = get_json(&client, restored.url("/api/v1/sync"), &nurse).await;
    assert_eq!(status["outbox"]["pending"], 0, "{status}");
    assert_eq!(status["outbox"]["stuck"], 0, "{status}");
    let (last_sync, reconciled) = (status["last_sync_at_utc"].as_str(), status["reconciled_at_utc"].as_str());
    assert!(
        last_sync.is_some_and(|at| at.ends_with('Z')) && reconciled.is_some_and(|at| at.ends_with('Z')),
        "{status}"
    );
    let nodes: Value = get_json(&client, bridge.url("/api/v1/nodes"), &pharmacist).await;
    assert_eq!(nodes[0]["rejected"], 0, "{nodes}");
    eprintln!(
        "{} tickets before the backup, {} after it, {} made on the restored node: all on both sides once",
        before_backup.len(),
        all_made.len() - before_backup.len(),
        made_after_restore.len()
    );
}
