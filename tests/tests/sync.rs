//! Sync between real processes: an edge node of a ward and the cloud bridge.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::time::{Duration, Instant};

use e2e::{BridgeProcess, EdgeNodeProcess, TestIssuer};
use futures_util::StreamExt;
use serde_json::{Value, json};

const WARD: &str = "ward-4b";
const NODE: &str = "edge-ward-4b";

/// A free port on loopback for a process that will start later.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn offline_tickets() -> usize {
    std::env::var("E2E_OFFLINE_TICKETS").ok().and_then(|n| n.parse().ok()).unwrap_or(10_000)
}

fn ticket(n: usize) -> Value {
    json!({
        "items": [{ "medication_code": format!("MED-{}", n % 997), "quantity": 1 + n % 40, "unit": "ampoule" }],
        "priority": if n.is_multiple_of(10) { "stat" } else { "routine" },
        "notes": format!("offline ticket {n}"),
    })
}

async fn wait_for(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Site {
    issuer: TestIssuer,
    edge: EdgeNodeProcess,
    bridge_port: u16,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Site {
    /// An edge node configured to sync with a bridge that is not running yet.
    fn new() -> Self {
        let issuer = TestIssuer::new("key-1");
        let (edge_dir, bridge_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let bridge_port = free_port();
        std::fs::write(edge_dir.path().join("node-token"), issuer.token(NODE, &["edge-node"], &[WARD])).unwrap();
        let sync = format!(
            "[sync]\nbridge_url = \"ws://127.0.0.1:{bridge_port}/sync\"\nreconnect_base_ms = 100\nreconnect_cap_ms = 1000\n"
        );
        let edge = EdgeNodeProcess::start(edge_dir.path(), NODE, WARD, &issuer.jwks(), &sync);
        Site { issuer, edge, bridge_port, _dirs: (edge_dir, bridge_dir) }
    }

    fn start_bridge(&self) -> BridgeProcess {
        BridgeProcess::start_bridge(
            self._dirs.1.path(),
            &format!("127.0.0.1:{}", self.bridge_port),
            &self.issuer.jwks(),
            "",
        )
    }

    fn pharmacist(&self) -> String {
        self.issuer.token("p.lindqvist", &["pharmacist"], &[])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offline_backlog_arrives_exactly_once_and_the_pharmacy_reaches_the_ward_live() {
    let site = Site::new();
    let client = reqwest::Client::new();
    let nurse = site.issuer.nurse(WARD);
    let count = offline_tickets();

    // The ward works with no cloud.
    let created = Instant::now();
    let mut lanes = Vec::new();
    for lane in 0..16 {
        let (client, nurse, url) = (client.clone(), nurse.clone(), site.edge.url("/api/v1/tickets"));
        lanes.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in (lane..count).step_by(16) {
                let response = client.post(&url).bearer_auth(&nurse).json(&ticket(n)).send().await.unwrap();
                assert_eq!(response.status(), 201);
                ids.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for lane in lanes {
        ids.extend(lane.await.unwrap());
    }
    eprintln!("{count} tickets created offline in {:?}", created.elapsed());
    let status: Value =
        client.get(site.edge.url("/api/v1/sync")).bearer_auth(&nurse).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        (status["connected"].as_bool(), status["outbox"]["pending"].as_u64()),
        (Some(false), Some(count as u64)),
        "{status}"
    );

    // The bridge comes up; the backlog flows.
    let bridge = site.start_bridge();
    let started = Instant::now();
    let pharmacist = site.pharmacist();
    let queue_url = bridge.url(&format!("/api/v1/queue?ward={WARD}&limit=1"));
    wait_for("the backlog at the bridge", Duration::from_secs(300), async || {
        let queue: Value = client.get(&queue_url).bearer_auth(&pharmacist).send().await.unwrap().json().await.unwrap();
        queue["total"].as_u64() == Some(count as u64)
    })
    .await;
    eprintln!("backlog of {count} queryable at the bridge {:?} after it started", started.elapsed());
    wait_for("the edge outbox to drain", Duration::from_secs(60), async || {
        let status: Value =
            client.get(site.edge.url("/api/v1/sync")).bearer_auth(&nurse).send().await.unwrap().json().await.unwrap();
        status["outbox"]["pending"] == 0 && status["connected"] == true
    })
    .await;
    let nodes: Value =
        client.get(bridge.url("/api/v1/nodes")).bearer_auth(&pharmacist).send().await.unwrap().json().await.unwrap();
    assert_eq!(nodes[0]["rejected"], 0, "{nodes}");
    // The same tickets on both sides, field for field (a sample: every 97th).
    for id in ids.iter().step_by(97) {
        let at_edge: Value = client
            .get(site.edge.url(&format!("/api/v1/tickets/{id}")))
            .bearer_auth(&nurse)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let at_bridge: Value = client
            .get(bridge.url(&format!("/api/v1/tickets/{id}")))
            .bearer_auth(&pharmacist)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(at_edge["ticket"], at_bridge["ticket"], "ticket {id} differs");
    }

    // A ward device watches live while the pharmacy works a ticket.
    let events = client.get(site.edge.url("/api/v1/events")).bearer_auth(&nurse).send().await.unwrap();
    let mut events = events.bytes_stream();
    let id = &ids[0];
    for to in ["acknowledged", "picking", "dispatched"] {
        let url = bridge.url(&format!("/api/v1/tickets/{id}/transitions"));
        let response = client.post(&url).bearer_auth(&pharmacist).json(&json!({ "to": to })).send().await.unwrap();
        assert_eq!(response.status(), 200, "{to}: {}", response.text().await.unwrap());
    }
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        let mut text = String::new();
        while let Some(chunk) = events.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if text.contains(id.as_str()) && text.contains("\"status\":\"dispatched\"") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(seen, Ok(true), "the ward's live feed did not show the dispatch");
    // And the ward confirms receipt, which reaches the pharmacy.
    let receipt = client
        .post(site.edge.url(&format!("/api/v1/tickets/{id}/transitions")))
        .bearer_auth(&nurse)
        .json(&json!({ "to": "delivered" }))
        .send()
        .await
        .unwrap();
    assert_eq!(receipt.status(), 200);
    wait_for("the receipt at the pharmacy", Duration::from_secs(10), async || {
        let one: Value = client
            .get(bridge.url(&format!("/api/v1/tickets/{id}")))
            .bearer_auth(&pharmacist)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        one["ticket"]["status"] == "delivered"
    })
    .await;
}

#[tokio::test]
async fn a_node_token_cannot_reach_another_ward() {
    let site = Site::new();
    let bridge = site.start_bridge();
    let client = reqwest::Client::new();
    // Another ward's node token at the pharmacy API, and at the sync endpoint for this ward.
    let other_node = site.issuer.token("edge-icu-2", &["edge-node"], &["icu-2"]);
    let queue = client.get(bridge.url("/api/v1/queue")).bearer_auth(&other_node).send().await.unwrap();
    assert_eq!(queue.status(), 403);
    let nurse_of_other_ward = site.issuer.nurse("icu-2");
    let edge = client.get(site.edge.url("/api/v1/tickets")).bearer_auth(&nurse_of_other_ward).send().await.unwrap();
    assert_eq!(edge.status(), 403);
}
