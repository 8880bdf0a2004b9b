//! The distributed backend while its services go down and come back, one
//! after the other, under load. Its own test binary: it stops the shared
//! services (through `MEDSYNC_SERVICES_CONTROL`), which no other test may
//! be using at the time.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use test_fixtures::cloud::Cloud;
use test_fixtures::{EdgeNodeProcess, get_json, wait_for};

/// Changes the wards make during the outages: creations and edits.
const CHANGES: usize = 5_000;
/// One change in this many is an edit of an earlier ticket.
const EDIT_EVERY: usize = 5;
/// The load's pace while services go down and come back; what is left when
/// they are all back follows at full speed.
const CHANGES_PER_SECOND: u64 = 60;

fn ticket(n: usize) -> Value {
    json!({
        "items": [{ "medication_code": format!("MED-{}", n % 89), "quantity": 1 + n % 30, "unit": "tablet" }],
        "priority": if n.is_multiple_of(9) { "urgent" } else { "routine" },
        "notes": format!("load ticket {n}"),
    })
}

/// The load of one ward: creations, and now and then an edit of one of its
/// earlier tickets. Returns the ids it created.
async fn ward_load(
    edge: Arc<EdgeNodeProcess>,
    nurse: String,
    changes: usize,
    made: Arc<AtomicUsize>,
    outages_over: Arc<AtomicBool>,
) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut ids: Vec<String> = Vec::new();
    let pace = Duration::from_micros(2_000_000 / CHANGES_PER_SECOND);
    for n in 0..changes {
        if !outages_over.load(Ordering::Relaxed) {
            tokio::time::sleep(pace).await;
        }
        // The last tenth waits for the outages to end, so every outage
        // falls inside the load however long the services take to restart.
        while n >= changes * 9 / 10 && !outages_over.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The edge never needs the cloud: every write must succeed.
        if n % EDIT_EVERY == EDIT_EVERY - 1 && !ids.is_empty() {
            let id = &ids[n % ids.len()];
            let edit = json!({ "notes": { "append": format!("edit {n}") } });
            let url = edge.url(&format!("/api/v1/tickets/{id}"));
            let response = client.patch(url).bearer_auth(&nurse).json(&edit).send().await.unwrap();
            assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        } else {
            let response =
                client.post(edge.url("/api/v1/tickets")).bearer_auth(&nurse).json(&ticket(n)).send().await.unwrap();
            assert_eq!(response.status(), 201);
            ids.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
        }
        made.fetch_add(1, Ordering::Relaxed);
    }
    ids
}

/// Every ticket of the edge, materialized, by id.
async fn edge_tickets(client: &reqwest::Client, edge: &EdgeNodeProcess, nurse: &str) -> HashMap<String, Value> {
    let mut tickets = HashMap::new();
    let mut page: Option<String> = None;
    loop {
        let mut url = edge.url("/api/v1/tickets?limit=200");
        if let Some(token) = &page {
            url.push_str(&format!("&page={token}"));
        }
        let list: Value = get_json(client, url, nurse).await;
        for ticket in list["tickets"].as_array().unwrap() {
            tickets.insert(ticket["id"].as_str().unwrap().to_owned(), ticket.clone());
        }
        match list["next_page"].as_str() {
            Some(token) => page = Some(token.to_owned()),
            None => return tickets,
        }
    }
}

/// Every ticket of `ward` in MongoDB, materialized, by id.
async fn cloud_tickets(database: &mongodb::Database, ward: &str) -> HashMap<String, Value> {
    let cursor = database.collection::<Document>("tickets").find(doc! { "ward": ward }).await.unwrap();
    let documents: Vec<Document> = cursor.try_collect().await.unwrap();
    documents
        .iter()
        .map(|d| (d.get_str("_id").unwrap().to_owned(), serde_json::from_str(d.get_str("ticket").unwrap()).unwrap()))
        .collect()
}

/// Polls `url` until it answers `status`; returns how long that took.
async fn answers(client: &reqwest::Client, url: &str, status: u16, what: &str) -> Duration {
    let started = Instant::now();
    wait_for(what, Duration::from_secs(60), async || {
        client.get(url).send().await.is_ok_and(|r| r.status().as_u16() == status)
    })
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarting_the_broker_mongodb_and_redis_under_load_loses_and_duplicates_nothing() {
    let cloud = Cloud::start("restarts", 2, 4);
    let _restore = cloud.services.restart_all_on_drop();
    let ward = Arc::new(cloud.edge("edge-ward-4b", "ward-4b", 0));
    let icu = Arc::new(cloud.edge("edge-icu-2", "icu-2", 1));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let pharmacist = cloud.pharmacist();
    let made = Arc::new(AtomicUsize::new(0));
    let outages_over = Arc::new(AtomicBool::new(false));
    let load = |edge: &Arc<EdgeNodeProcess>, ward: &str| {
        let nurse = cloud.issuer.nurse(ward);
        tokio::spawn(ward_load(Arc::clone(edge), nurse, CHANGES / 2, Arc::clone(&made), Arc::clone(&outages_over)))
    };
    let loads = [load(&ward, "ward-4b"), load(&icu, "icu-2")];

    // The pharmacy keeps acknowledging tickets through both instances; a
    // write refused while a service is down (503) is tried again.
    let done = Arc::new(AtomicBool::new(false));
    let pharmacy = {
        let (client, pharmacist, done) = (client.clone(), pharmacist.clone(), Arc::clone(&done));
        let bridges: Vec<String> = cloud.bridges.iter().map(|b| b.url("")).collect();
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut refused = 0;
            for round in 0.. {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                let bridge = &bridges[round % bridges.len()];
                let queue = client
                    .get(format!("{bridge}/api/v1/queue?status=requested&limit=1"))
                    .bearer_auth(&pharmacist)
                    .send()
                    .await;
                let Ok(queue) = queue else { continue };
                let Ok(queue) = queue.json::<Value>().await else { continue };
                let Some(id) = queue["tickets"][0]["id"].as_str().map(str::to_owned) else { continue };
                let url = format!("{bridge}/api/v1/tickets/{id}/transitions");
                match client.post(url).bearer_auth(&pharmacist).json(&json!({ "to": "acknowledged" })).send().await {
                    Ok(response) if response.status().is_success() => acknowledged.push(id),
                    Ok(response) if response.status() == 409 => {} // acknowledged meanwhile
                    Ok(response) => {
                        assert_eq!(response.status(), 503, "only unavailability may refuse a pharmacy write");
                        refused += 1;
                    }
                    Err(_) => refused += 1,
                }
            }
            (acknowledged, refused)
        })
    };

    // The outages, one after the other, while the load runs.
    let ready = cloud.bridges[0].url("/readyz");
    tokio::time::sleep(Duration::from_secs(3)).await;
    cloud.services.control("stop", "kafka");
    let noticed = answers(&client, &ready, 503, "the bridge to report the broker missing").await;
    eprintln!("broker down: bridge not ready after {noticed:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pending: Value = get_json(&client, ward.url("/api/v1/sync"), &cloud.issuer.nurse("ward-4b")).await;
    assert!(pending["outbox"]["pending"].as_u64().unwrap() > 0, "the ward keeps its changes while the broker is down");
    cloud.services.control("start", "kafka");
    eprintln!("broker back: bridge ready after {:?}", answers(&client, &ready, 200, "the bridge to recover").await);

    tokio::time::sleep(Duration::from_secs(3)).await;
    cloud.services.control("stop", "mongodb");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let projector_ready = cloud.projector.url("/readyz");
    answers(&client, &projector_ready, 503, "the projector to report mongodb missing").await;
    cloud.services.control("start", "mongodb");
    eprintln!(
        "mongodb back: projector ready after {:?}",
        answers(&client, &projector_ready, 200, "the projector to resume").await
    );

    tokio::time::sleep(Duration::from_secs(3)).await;
    cloud.services.control("stop", "redis");
    // Without Redis, the pharmacy sees no error: reads go to MongoDB.
    for bridge in &cloud.bridges {
        let queue = client.get(bridge.url("/api/v1/queue?limit=5")).bearer_auth(&pharmacist).send().await.unwrap();
        assert_eq!(queue.status(), 200, "the queue without redis");
    }
    // And a change through one instance still reaches a ward linked to the
    // other: its bridge learns of it by polling instead of by notice.
    let nurse = cloud.issuer.nurse("ward-4b");
    let list: Value = get_json(&client, ward.url("/api/v1/tickets?limit=1"), &nurse).await;
    let id = list["tickets"][0]["id"].as_str().unwrap().to_owned();
    let url = cloud.bridges[1].url(&format!("/api/v1/tickets/{id}/transitions"));
    let rejection = json!({ "to": "rejected", "reason": "recalled batch" });
    let response = client.post(url).bearer_auth(&pharmacist).json(&rejection).send().await.unwrap();
    assert!(response.status().is_success(), "a pharmacy write without redis: {}", response.status());
    let sent = Instant::now();
    wait_for("the rejection at the ward without redis", Duration::from_secs(20), async || {
        let at_edge: Value = get_json(&client, ward.url(&format!("/api/v1/tickets/{id}")), &nurse).await;
        at_edge["ticket"]["status"] == "rejected"
    })
    .await;
    eprintln!("redis down: a change through bridge 1 reached the ward on bridge 0 in {:?}", sent.elapsed());
    cloud.services.control("start", "redis");
    let made_during_outages = made.load(Ordering::Relaxed);
    outages_over.store(true, Ordering::Relaxed);
    eprintln!("outages over with {made_during_outages} of {CHANGES} changes made");
    assert!(made_during_outages < CHANGES, "the load outlasts the outages");

    let mut created: HashMap<&str, Vec<String>> = HashMap::new();
    let [ward_load, icu_load] = loads;
    created.insert("ward-4b", ward_load.await.unwrap());
    created.insert("icu-2", icu_load.await.unwrap());
    done.store(true, Ordering::Relaxed);
    let (acknowledged, refused) = pharmacy.await.unwrap();
    eprintln!("pharmacy: {} acknowledged, {refused} refused while services were down", acknowledged.len());
    assert!(!acknowledged.is_empty(), "the pharmacy worked through the outages");

    // Everything arrives: the outboxes drain, MongoDB holds each ticket
    // once and as the ward has it, acknowledgements included.
    let database = cloud.database().await;
    for (edge, ward_id) in [(&ward, "ward-4b"), (&icu, "icu-2")] {
        let nurse = cloud.issuer.nurse(ward_id);
        wait_for("the outbox to drain", Duration::from_secs(180), async || {
            let status: Value = get_json(&client, edge.url("/api/v1/sync"), &nurse).await;
            status["outbox"]["pending"] == 0 && status["outbox"]["stuck"] == 0
        })
        .await;
        let ids = &created[ward_id];
        wait_for("edge and cloud to agree on every ticket", Duration::from_secs(120), async || {
            let at_edge = edge_tickets(&client, edge, &nurse).await;
            let in_cloud = cloud_tickets(&database, ward_id).await;
            at_edge.len() == ids.len() && in_cloud == at_edge
        })
        .await;
    }
    for id in &acknowledged {
        let view: Value = get_json(&client, cloud.bridges[1].url(&format!("/api/v1/tickets/{id}")), &pharmacist).await;
        assert_ne!(view["ticket"]["status"], "requested", "acknowledgement of {id} lost");
    }
    let dead = database.collection::<Document>("dead_letters").count_documents(doc! {}).await.unwrap();
    let rejected = database.collection::<Document>("rejected_changes").count_documents(doc! {}).await.unwrap();
    assert_eq!((dead, rejected), (0, 0), "no record dead-lettered, no change rejected");
}
