//! The edge node loses no acknowledged write when killed: the real binary,
//! a real socket, `kill -9` in the middle of a burst of concurrent writes.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use test_fixtures::{EdgeNodeProcess, TestIssuer};

const WARD: &str = "ward-4b";
const INITIAL_TICKETS: usize = 1_000;
const BURST_CLIENTS: usize = 32;

fn new_ticket(n: usize) -> Value {
    let priority = ["routine", "urgent", "asap", "stat"][n % 4];
    json!({
        "items": [{ "medication_code": format!("MED-{n}"), "description": "test stock", "quantity": 1 + n % 50, "unit": "vial" }],
        "priority": priority,
        "notes": format!("ticket {n}"),
    })
}

/// What a client knows about one ticket: the last state the node
/// acknowledged, and the state of a write that was in flight when the node
/// died (which may or may not have been committed).
#[derive(Debug, Default, Clone)]
struct Known {
    acknowledged: Option<Value>,
    in_flight: Option<Value>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_a_write_burst_loses_no_acknowledged_ticket() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new("key-1");
    let mut node = EdgeNodeProcess::start(dir.path(), "edge-ward-4b", WARD, &issuer.jwks(), "");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let token = issuer.nurse(WARD);

    // 1,000 tickets, 16 requests at a time.
    let known: Arc<Mutex<HashMap<String, Known>>> = Arc::default();
    let base = node.url("/api/v1/tickets");
    let mut tasks = Vec::new();
    for lane in 0..16 {
        let (client, token, base, known) = (client.clone(), token.clone(), base.clone(), Arc::clone(&known));
        tasks.push(tokio::spawn(async move {
            for n in (lane..INITIAL_TICKETS).step_by(16) {
                let response = client.post(&base).bearer_auth(&token).json(&new_ticket(n)).send().await.unwrap();
                assert_eq!(response.status(), 201);
                let ticket: Value = response.json().await.unwrap();
                let id = ticket["id"].as_str().unwrap().to_owned();
                known.lock().unwrap().insert(id, Known { acknowledged: Some(ticket), in_flight: None });
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(known.lock().unwrap().len(), INITIAL_TICKETS);

    // The burst: each client creates a ticket, then appends notes to it,
    // until the node dies under it.
    let mut burst = Vec::new();
    for lane in 0..BURST_CLIENTS {
        let (client, token, base, known) = (client.clone(), token.clone(), base.clone(), Arc::clone(&known));
        burst.push(tokio::spawn(async move {
            for round in 0.. {
                let Ok(response) =
                    client.post(&base).bearer_auth(&token).json(&new_ticket(lane * 1_000 + round)).send().await
                else {
                    return;
                };
                let Ok(ticket) = response.json::<Value>().await else { return };
                let id = ticket["id"].as_str().unwrap().to_owned();
                known.lock().unwrap().insert(id.clone(), Known { acknowledged: Some(ticket.clone()), in_flight: None });
                let mut notes = ticket["notes"].as_str().unwrap().to_owned();
                for edit in 0..3 {
                    let line = format!("edit {edit}");
                    notes = format!("{notes}\n{line}");
                    let mut expected = ticket.clone();
                    expected["notes"] = json!(notes);
                    known.lock().unwrap().get_mut(&id).unwrap().in_flight = Some(expected);
                    let url = format!("{base}/{id}");
                    let body = json!({ "notes": { "append": line } });
                    let Ok(response) = client.patch(&url).bearer_auth(&token).json(&body).send().await else { return };
                    let Ok(edited) = response.json::<Value>().await else { return };
                    let mut entry = known.lock().unwrap();
                    let entry = entry.get_mut(&id).unwrap();
                    entry.acknowledged = Some(edited);
                    entry.in_flight = None;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    node.kill9();
    for task in burst {
        task.await.unwrap();
    }
    let known = known.lock().unwrap().clone();
    let acknowledged_in_burst = known.len() - INITIAL_TICKETS;
    assert!(
        acknowledged_in_burst >= BURST_CLIENTS,
        "the burst was under way when the node died: {acknowledged_in_burst}"
    );

    node.restart();
    let mut checked = 0;
    for (id, known) in &known {
        let response = client.get(node.url(&format!("/api/v1/tickets/{id}"))).bearer_auth(&token).send().await.unwrap();
        assert_eq!(response.status(), 200, "acknowledged ticket {id} is missing after kill -9");
        let stored: Value = response.json().await.unwrap();
        let stored = &stored["ticket"];
        let acknowledged = known.acknowledged.as_ref().unwrap();
        let same = |expected: &Value| {
            stored["notes"] == expected["notes"]
                && stored["items"] == expected["items"]
                && stored["priority"] == expected["priority"]
                && stored["status"] == expected["status"]
        };
        assert!(
            same(acknowledged) || known.in_flight.as_ref().is_some_and(same),
            "ticket {id} changed: stored {stored}, acknowledged {acknowledged}"
        );
        checked += 1;
    }
    assert_eq!(checked, known.len());
    eprintln!("checked {checked} acknowledged tickets ({acknowledged_in_burst} written during the burst)");
}

#[tokio::test]
async fn sigterm_drains_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new("key-1");
    let mut node = EdgeNodeProcess::start(dir.path(), "edge-ward-4b", WARD, &issuer.jwks(), "");
    let client = reqwest::Client::new();
    let response = client
        .post(node.url("/api/v1/tickets"))
        .bearer_auth(issuer.nurse(WARD))
        .json(&new_ticket(1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let status = node.terminate().unwrap();
    assert!(status.success(), "the node exits 0 on SIGTERM: {status:?}");
    let log = std::fs::read_to_string(dir.path().join("edge-node.log")).unwrap();
    assert!(log.contains("edge node stopped"), "{log}");
}

#[tokio::test]
async fn environment_variables_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new("key-1");
    std::fs::write(dir.path().join("jwks.json"), issuer.jwks().to_string()).unwrap();
    let config = dir.path().join("edge-node.toml");
    std::fs::write(&config, test_fixtures::process::edge_config(dir.path(), "edge-ward-4b", WARD, "")).unwrap();
    let check = |env: &[(&str, &str)]| {
        let output = std::process::Command::new(test_fixtures::process::binary("edge-node"))
            .args(["check-config", "--config"])
            .arg(&config)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (ok, text) = check(&[("EDGE_NODE__NODE__WARD", "icu-2")]);
    assert!(ok && text.contains("of icu-2"), "{text}");
    let (ok, text) = check(&[("EDGE_NODE__HTTP__LISTN", "127.0.0.1:1")]);
    assert!(!ok && text.contains("listn"), "a misspelt override is refused: {text}");
}
