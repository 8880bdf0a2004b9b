//! The distributed backend with real services (Kafka protocol, MongoDB,
//! Redis; see `scripts/services`): two bridge instances and two projectors.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use test_fixtures::cloud::Cloud;
use test_fixtures::get_json;
use test_fixtures::wait_for;

fn ticket(n: usize) -> Value {
    json!({
        "items": [{ "medication_code": format!("MED-{}", n % 97), "quantity": 1 + n % 40, "unit": "vial" }],
        "priority": if n.is_multiple_of(7) { "stat" } else { "routine" },
        "notes": format!("ticket {n}"),
    })
}

async fn create(client: &reqwest::Client, edge: &test_fixtures::EdgeNodeProcess, nurse: &str, n: usize) -> String {
    let response = client.post(edge.url("/api/v1/tickets")).bearer_auth(nurse).json(&ticket(n)).send().await.unwrap();
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

async fn queue_total(client: &reqwest::Client, bridge: &test_fixtures::BridgeProcess, token: &str, ward: &str) -> u64 {
    let url = bridge.url(&format!("/api/v1/queue?ward={ward}&limit=1"));
    let queue: Value = get_json(client, url, token).await;
    queue["total"].as_u64().unwrap_or(0)
}

/// Waits until the SSE stream shows `id` with `status`; returns when it did.
async fn sees<B: AsRef<[u8]>>(
    events: &mut (impl futures_util::Stream<Item = reqwest::Result<B>> + Unpin),
    id: &str,
    status: &str,
) -> Option<Instant> {
    let wanted = format!("\"status\":\"{status}\"");
    let mut text = String::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = events.next().await {
            text.push_str(&String::from_utf8_lossy(chunk.unwrap().as_ref()));
            if text.lines().any(|line| line.contains(id) && line.contains(&wanted)) {
                return Instant::now();
            }
        }
        panic!("the live feed ended");
    })
    .await;
    found.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_through_either_bridge_and_either_projector_reach_every_ward_and_a_replay_changes_nothing() {
    let cloud = Cloud::start("either", 2, 4);
    // Two projectors of one consumer group share the topic's partitions.
    let second_projector = cloud.start_projector("projector-2", None);
    wait_for("the two projectors to share the partitions", Duration::from_secs(60), async || {
        let mut shares = 0.0;
        for projector in [&cloud.projector, &second_projector] {
            let share = Cloud::metric(projector, "projector_assigned_partitions").await.unwrap_or(0.0);
            if share == 0.0 {
                return false;
            }
            shares += share;
        }
        shares == 4.0
    })
    .await;
    let ward_edge = cloud.edge("edge-ward-4b", "ward-4b", 0);
    let icu_edge = cloud.edge("edge-icu-2", "icu-2", 1);
    let client = reqwest::Client::new();
    let (ward_nurse, icu_nurse) = (cloud.issuer.nurse("ward-4b"), cloud.issuer.nurse("icu-2"));
    let pharmacist = cloud.pharmacist();

    // Each ward works through its own bridge instance.
    let mut ward_ids = Vec::new();
    let mut icu_ids = Vec::new();
    for n in 0..60 {
        ward_ids.push(create(&client, &ward_edge, &ward_nurse, n).await);
        icu_ids.push(create(&client, &icu_edge, &icu_nurse, 1_000 + n).await);
    }
    // Both wards' tickets are in the queue of either instance.
    for bridge in &cloud.bridges {
        wait_for("both wards at every bridge", Duration::from_secs(60), async || {
            queue_total(&client, bridge, &pharmacist, "ward-4b").await == 60
                && queue_total(&client, bridge, &pharmacist, "icu-2").await == 60
        })
        .await;
    }

    // The pharmacy works a ward-4b ticket through bridge 1; the ward's edge
    // (linked to bridge 0) shows it live, and so does the other instance's
    // pharmacy feed.
    let mut ward_events =
        client.get(ward_edge.url("/api/v1/events")).bearer_auth(&ward_nurse).send().await.unwrap().bytes_stream();
    let mut pharmacy_events = client
        .get(cloud.bridges[0].url("/api/v1/events?ward=ward-4b"))
        .bearer_auth(&pharmacist)
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let id = &ward_ids[3];
    let sent = Instant::now();
    for to in ["acknowledged", "picking", "dispatched"] {
        let url = cloud.bridges[1].url(&format!("/api/v1/tickets/{id}/transitions"));
        let response = client.post(url).bearer_auth(&pharmacist).json(&json!({ "to": to })).send().await.unwrap();
        assert_eq!(response.status(), 200, "{to}: {}", response.text().await.unwrap());
    }
    let at_ward = sees(&mut ward_events, id, "dispatched").await.expect("the ward's device saw the dispatch");
    eprintln!("a dispatch through bridge 1 reached the ward on bridge 0 in {:?}", at_ward - sent);
    assert!(sees(&mut pharmacy_events, id, "dispatched").await.is_some(), "bridge 0's pharmacy feed saw it");

    // And the other way round: an icu-2 ticket through bridge 0.
    let id = &icu_ids[5];
    let url = cloud.bridges[0].url(&format!("/api/v1/tickets/{id}/transitions"));
    let response = client
        .post(url)
        .bearer_auth(&pharmacist)
        .json(&json!({ "to": "rejected", "reason": "out of stock" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    wait_for("the rejection at the icu edge", Duration::from_secs(20), async || {
        let at_edge = get_json(&client, icu_edge.url(&format!("/api/v1/tickets/{id}")), &icu_nurse).await;
        at_edge["ticket"]["status"] == "rejected"
    })
    .await;

    // Each ward holds its own tickets only, identical at both sides.
    let icu_list: Value = get_json(&client, icu_edge.url("/api/v1/tickets?limit=200"), &icu_nurse).await;
    assert_eq!(icu_list["tickets"].as_array().unwrap().len(), 60, "icu-2 holds only its own tickets");
    for (edge, nurse, ids) in [(&ward_edge, &ward_nurse, &ward_ids), (&icu_edge, &icu_nurse, &icu_ids)] {
        wait_for("edge and cloud to agree", Duration::from_secs(30), async || {
            for id in ids.iter() {
                let at_edge = get_json(&client, edge.url(&format!("/api/v1/tickets/{id}")), nurse).await;
                let at_cloud =
                    get_json(&client, cloud.bridges[0].url(&format!("/api/v1/tickets/{id}")), &pharmacist).await;
                if at_edge["ticket"] != at_cloud["ticket"] || at_edge["history"] != at_cloud["history"] {
                    return false;
                }
            }
            true
        })
        .await;
    }

    // The auditor's export of a ward reads MongoDB: every icu-2 ticket, and
    // each change of its trail, from either bridge.
    let export = client
        .get(cloud.bridges[1].url("/api/v1/audit?ward=icu-2&from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z"))
        .bearer_auth(&pharmacist)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<Value> = export.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(lines.len(), 61, "60 creations and one rejection");
    assert!(lines.iter().all(|line| line["ward"] == "icu-2"));
    assert_eq!(lines.iter().filter(|line| line["action"]["kind"] == "transition").count(), 1);

    // A line backordered on a dispatched ticket keeps it in the queue's
    // backorder view, whichever bridge serves it.
    let supply = json!({ "supply": [{ "medication_code": "MED-3", "quantity": 1, "shortfall": "backorder" }] });
    let response = client
        .patch(cloud.bridges[0].url(&format!("/api/v1/tickets/{}", ward_ids[3])))
        .bearer_auth(&pharmacist)
        .json(&supply)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    wait_for("the backorder in the other bridge's queue", Duration::from_secs(20), async || {
        let page = get_json(&client, cloud.bridges[1].url("/api/v1/queue?backorder=open"), &pharmacist).await;
        page["total"] == 1 && page["tickets"][0]["id"] == ward_ids[3].as_str()
    })
    .await;

    // The formulary lives in MongoDB: kept through one bridge, read and
    // applied through the other.
    let admin = cloud.issuer.token("a.haddad", &["admin"], &[]);
    let first_code = get_json(&client, cloud.bridges[1].url(&format!("/api/v1/tickets/{}", icu_ids[0])), &pharmacist)
        .await["ticket"]["items"][0]["medication_code"]
        .as_str()
        .unwrap()
        .to_owned();
    let entry = json!({ "code": first_code, "name": "Saline", "unit": "ampoule", "active": true });
    let response = client
        .put(cloud.bridges[0].url(&format!("/api/v1/formulary/{first_code}")))
        .bearer_auth(&admin)
        .json(&entry)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let catalogue = get_json(&client, cloud.bridges[1].url("/api/v1/formulary"), &pharmacist).await;
    assert_eq!(catalogue.as_array().map(Vec::len), Some(1));
    let view = get_json(&client, cloud.bridges[1].url(&format!("/api/v1/tickets/{}", icu_ids[0])), &pharmacist).await;
    assert_eq!(view["formulary_issues"][0]["code"], "wrong_unit", "{view}");

    for projector in [&cloud.projector, &second_projector] {
        let records = Cloud::metric(projector, "projector_records_total").await.unwrap_or(0.0);
        assert!(records > 0.0, "each projector of the group projected a share of the records");
    }

    // Replaying the whole topic (a projector of a new consumer group
    // starts from offset 0) leaves MongoDB as it was.
    let database = cloud.database().await;
    let snapshot = async || {
        let mut collections = Vec::new();
        for name in ["tickets", "feed_pages", "watermarks", "dead_letters"] {
            let cursor = database.collection::<Document>(name).find(doc! {}).sort(doc! { "_id": 1 }).await.unwrap();
            let documents: Vec<Document> = futures_util::TryStreamExt::try_collect(cursor).await.unwrap();
            collections.push((name, documents));
        }
        collections
    };
    let before = snapshot().await;
    assert!(before[0].1.len() == 120 && before[3].1.is_empty(), "120 tickets, no dead letters");
    let replay = cloud.start_projector("replayer", Some(&format!("{}-replay", cloud.namespace)));
    wait_for("the replay to reach the end of the topic", Duration::from_secs(60), async || {
        Cloud::metric(&replay, "projector_records_total").await.unwrap_or(0.0) > 0.0
            && Cloud::metric(&replay, "projector_lag_records").await == Some(0.0)
    })
    .await;
    assert_eq!(snapshot().await, before, "the replay changed MongoDB");
}

/// The bridge's `/readyz` body (200 in every case here).
async fn readiness(client: &reqwest::Client, bridge: &test_fixtures::BridgeProcess) -> String {
    let response = client.get(bridge.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), 200, "the bridge stays ready without a projector");
    response.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_projector_resumes_in_seconds_and_one_that_stops_hands_over_at_once() {
    const RESUME_WITHIN: Duration = Duration::from_secs(10);
    let mut cloud = Cloud::start("projector_resume", 1, 2);
    let edge = cloud.edge("edge-ward-7", "ward-7", 0);
    let client = reqwest::Client::new();
    let (nurse, pharmacist) = (cloud.issuer.nurse("ward-7"), cloud.pharmacist());
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(create(&client, &edge, &nurse, n).await);
    }
    let bridge = &cloud.bridges[0];
    wait_for("the first tickets in the queue", Duration::from_secs(60), async || {
        queue_total(&client, bridge, &pharmacist, "ward-7").await == 20
    })
    .await;
    wait_for("the bridge to count the projector", Duration::from_secs(10), async || {
        readiness(&client, bridge).await == "ready"
    })
    .await;

    // Under load (a ward creating a ticket every 50 ms throughout), a crash:
    // the bridge says so within the presence's lifetime, and a restart takes
    // the partitions back after the 6 s session timeout, not librdkafka's
    // default 45 s.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (client, url, nurse, stop) =
            (client.clone(), edge.url("/api/v1/tickets"), nurse.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut made = Vec::new();
            for n in 20.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let response = client.post(&url).bearer_auth(&nurse).json(&ticket(n)).send().await.unwrap();
                assert_eq!(response.status(), 201);
                made.push((response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned(), Instant::now()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            made
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    cloud.projector.kill9();
    wait_for("the bridge to report no projector", Duration::from_secs(15), async || {
        readiness(&client, bridge).await.contains("degraded: no projector running")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cloud.projector.restart();
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let made = load.await.unwrap();
    let after_restart: Vec<&String> = made.iter().filter(|(_, at)| *at > restarted).map(|(id, _)| id).collect();
    assert!(!after_restart.is_empty(), "tickets were made after the restart");
    ids.extend(made.iter().map(|(id, _)| id.clone()));
    let database = cloud.database().await;
    let tickets = database.collection::<Document>("tickets");
    let newest = after_restart[after_restart.len() - 1].as_str();
    wait_for("a ticket made after the restart in MongoDB", RESUME_WITHIN * 2, async || {
        tickets.count_documents(doc! { "_id": newest }).await.unwrap() == 1
    })
    .await;
    let resumed = restarted.elapsed();
    eprintln!(
        "a projector killed under load and restarted 2 s later projected new tickets {resumed:?} after its restart"
    );
    assert!(resumed < RESUME_WITHIN, "resumed in {resumed:?}, not after a 45 s session timeout");
    wait_for("the bridge to see the projector again", Duration::from_secs(10), async || {
        readiness(&client, bridge).await == "ready"
    })
    .await;

    // A clean stop leaves the group at once: the other member takes every
    // partition without waiting for the session timeout.
    let mut second = cloud.start_projector("projector-2", None);
    wait_for("the two projectors to share the partitions", Duration::from_secs(60), async || {
        Cloud::metric(&second, "projector_assigned_partitions").await == Some(1.0)
    })
    .await;
    assert!(cloud.projector.terminate().is_some_and(|status| status.success()), "the projector stopped cleanly");
    let stopped = Instant::now();
    wait_for("the remaining projector to take both partitions", Duration::from_secs(20), async || {
        Cloud::metric(&second, "projector_assigned_partitions").await == Some(2.0)
    })
    .await;
    let handed_over = stopped.elapsed();
    eprintln!("a stopped projector's partitions were taken over in {handed_over:?}");
    assert!(handed_over < Duration::from_secs(5), "handed over in {handed_over:?}, not after the session timeout");
    second.terminate();
    wait_for("the bridge to report no projector once the last one stopped", Duration::from_secs(5), async || {
        readiness(&client, bridge).await.contains("degraded: no projector running")
    })
    .await;

    // Nothing lost, nothing projected twice.
    let stored = tickets.count_documents(doc! { "ward": "ward-7" }).await.unwrap();
    assert_eq!(stored, ids.len() as u64, "every ticket projected exactly once");
    for id in &ids {
        let at_cloud = get_json(&client, bridge.url(&format!("/api/v1/tickets/{id}")), &pharmacist).await;
        let at_edge = get_json(&client, edge.url(&format!("/api/v1/tickets/{id}")), &nurse).await;
        assert_eq!(at_cloud["ticket"], at_edge["ticket"], "{id} is the same at both sides");
    }
}

/// An upgrade changed the ticket's JSON: a ticket MongoDB holds in the
/// shape of the release before (here the document and JSON that release
/// saved) is rewritten by a projector of this build when it starts, and the
/// pharmacy's queue serves it in the new shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_rewrites_tickets_stored_in_the_previous_shape() {
    let cloud = Cloud::start("reshape", 1, 2);
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../sync-protocol/tests/fixtures");
    let document = std::fs::read(format!("{fixtures}/ticket-schema-1.automerge")).unwrap();
    let stored_json = std::fs::read_to_string(format!("{fixtures}/ticket-schema-1.json")).unwrap();
    let old: Value = serde_json::from_str(&stored_json).unwrap();
    let id = old["id"].as_str().unwrap().to_owned();
    let tickets = cloud.database().await.collection::<Document>("tickets");
    let row = doc! {
        "_id": &id, "v": 1_i64, "ward": "ward-4b", "status": "dispatched", "priority": "urgent", "priority_rank": 1,
        "created_at": old["created_at"].as_i64().unwrap(), "updated_at": old["updated_at"].as_i64().unwrap(),
        "conflicts": 1, "ticket": &stored_json,
        "document": mongodb::bson::Binary { subtype: mongodb::bson::spec::BinarySubtype::Generic, bytes: document },
        "held": [],
    };
    tickets.insert_one(row).await.unwrap();

    // Read once before the upgrade, so the old shape is in the bridge's cache too.
    let client = reqwest::Client::new();
    let pharmacist = cloud.pharmacist();
    let queue = get_json(&client, cloud.bridges[0].url("/api/v1/queue?ward=ward-4b"), &pharmacist).await;
    assert_eq!(queue["tickets"][0]["created_at_utc"], Value::Null, "stored as that release stored it");
    let _upgraded = cloud.start_projector("projector-upgraded", None);
    wait_for("the ticket rewritten in the new shape", Duration::from_secs(60), async || {
        let queue = get_json(&client, cloud.bridges[0].url("/api/v1/queue?ward=ward-4b"), &pharmacist).await;
        let ticket = &queue["tickets"][0];
        ticket["created_at_utc"] == "2025-11-24T16:00:00Z"
            && ticket["conflicts"][0]["overridden"]["reason"] == "patient transferred to ICU"
    })
    .await;
    let row = tickets.find_one(doc! { "_id": &id }).await.unwrap().unwrap();
    assert_eq!((row.get_i64("v").unwrap(), row.get_i64("m").unwrap()), (2, 2), "written once, over the version read");
}
