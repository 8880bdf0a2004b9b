//! Benchmark of the distributed backend on the services the environment
//! names (`eval "$(scripts/services start)"` for the local ones):
//!
//! 1. Projector throughput. A ward's backlog of `--tickets` new tickets is
//!    appended to the change topic through a bridge while no projector
//!    runs; then a projector starts and its rate into MongoDB is timed. The
//!    same MongoDB server's raw rate, a plain client bulk-upserting the same
//!    ticket documents in batches of the projector's round size, is measured
//!    before and after it, into a collection with the same indexes: the
//!    projector's rate is reported as a share of it (and of raw inserts,
//!    the cheapest write a plain client can make of new documents).
//! 2. Latency. An edge node writes `--rate` new tickets a second for
//!    `--seconds`; each is timed from the edge's request to its arrival in
//!    MongoDB, seen on a change stream.
//! 3. Live status across instances: `--changes` pharmacy status changes
//!    through the second bridge, each timed to the ward device's live feed
//!    on the edge linked to the first.
//!
//! cargo build --release -p edge-node -p cloud-bridge -p projector -p devtools && target/release/bench-distributed

use anyhow::Context;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::ActorId;
use devtools::bench::{cpu_ticks, flag, live_status, ms, percentile, status_kib};
use futures_util::{StreamExt, TryStreamExt};
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::WriteConcern;
use serde_json::{Value, json};
use test_fixtures::cloud::Cloud;

const WARD: &str = "ward-bench";
const NODE: &str = "edge-bench";
/// The projector's round size (its default `batch_records_max`), used for the raw batches too.
const ROUND_RECORDS: usize = 2_000;

fn new_ticket(n: usize) -> Value {
    json!({
        "items": [{ "medication_code": format!("MED-{}", n % 500), "quantity": 1 + n % 20, "unit": "vial" }],
        "priority": if n.is_multiple_of(10) { "stat" } else { "routine" },
        "notes": format!("bench ticket {n}"),
    })
}

/// Ticket documents shaped as the projector stores them.
fn ticket_documents(count: usize) -> anyhow::Result<Vec<Document>> {
    use sync_protocol::document::TicketDocument;
    use sync_protocol::ticket::{Actor, NewTicket};
    let actor = Actor {
        user: "n.bench".parse().map_err(|e| anyhow::anyhow!("{e:?}"))?,
        role: sync_protocol::ids::Role::Nurse,
        device: NODE.parse().map_err(|e| anyhow::anyhow!("{e:?}"))?,
        offline_login: false,
    };
    let ward = WARD.parse().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    (0..count)
        .map(|n| {
            let new: NewTicket = serde_json::from_value(new_ticket(n))?;
            let id = sync_protocol::ids::TicketId::new(1_764_000_000_000 + n as i64, rand::random());
            let mut created = TicketDocument::create(id, &ward, &new, &actor, 1_764_000_000_000, &Default::default(), ActorId::random())
                ?;
            let ticket = &created.ticket;
            Ok(doc! {
                "_id": id.to_string(),
                "v": 1_i64,
                "ward": WARD,
                "status": ticket.status.as_str(),
                "priority": ticket.priority.as_str(),
                "priority_rank": ticket.priority as i32,
                "created_at": ticket.created_at,
                "updated_at": ticket.updated_at,
                "conflicts": 0,
                "ticket": serde_json::to_string(ticket)?,
                "document": Bson::Binary(mongodb::bson::Binary { subtype: mongodb::bson::spec::BinarySubtype::Generic, bytes: created.document.save() }),
                "held": [],
            })
        })
        .collect()
}

/// How a plain client writes the documents in the raw measurements.
#[derive(Clone, Copy)]
enum RawWrite {
    Upsert,
    Insert,
}

/// A plain client's bulk writes of `documents`, `ROUND_RECORDS` at a time,
/// into a fresh collection with the indexes of `tickets`, with the
/// projector's write concern (majority): documents per second.
async fn raw_writes(
    database: &mongodb::Database,
    collection: &str,
    documents: &[Document],
    write: RawWrite,
) -> anyhow::Result<f64> {
    let target = database.collection::<Document>(collection);
    target.drop().await?;
    let indexes: Vec<mongodb::IndexModel> =
        database.collection::<Document>("tickets").list_indexes().await?.try_collect().await?;
    for index in indexes {
        if index.keys != doc! { "_id": 1 } {
            target.create_index(mongodb::IndexModel::builder().keys(index.keys).build()).await?;
        }
    }
    let started = Instant::now();
    for batch in documents.chunks(ROUND_RECORDS) {
        match write {
            // The `update` command with a statement per document: the
            // fastest bulk upsert the server offers (the newer `bulkWrite`
            // command is slower on the server measured here).
            RawWrite::Upsert => {
                let statements: Vec<Document> = batch
                    .iter()
                    .map(|d| doc! { "q": { "_id": d.get("_id").cloned().unwrap_or(Bson::Null) }, "u": d.clone(), "upsert": true })
                    .collect();
                let command = doc! { "update": collection, "updates": statements, "ordered": false, "writeConcern": { "w": "majority" } };
                database.run_command(command).await?;
            }
            RawWrite::Insert => {
                target.insert_many(batch).ordered(false).write_concern(WriteConcern::majority()).await?;
            }
        }
    }
    Ok(documents.len() as f64 / started.elapsed().as_secs_f64())
}

async fn metric(process: &test_fixtures::process::ServiceProcess, name: &str) -> f64 {
    Cloud::metric(process, name).await.unwrap_or(-1.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tickets = flag("--tickets", 20_000)?;
    let rate = flag("--rate", 1_000)?;
    let seconds = flag("--seconds", 10)?;
    let partitions = flag("--partitions", 4)? as u32;

    // 1. The backlog reaches the topic with no projector running.
    let mut cloud = Cloud::start("bench", 2, partitions);
    cloud.projector.kill9();
    let database = cloud.database().await;
    let edge = cloud.edge(NODE, WARD, 0);
    let client = reqwest::Client::new();
    let nurse = cloud.issuer.nurse(WARD);
    let appended = Instant::now();
    let mut lanes = Vec::new();
    for lane in 0..32 {
        let (client, nurse, url) = (client.clone(), nurse.clone(), edge.url("/api/v1/tickets"));
        lanes.push(tokio::spawn(async move {
            for n in (lane..tickets).step_by(32) {
                let response = client.post(&url).bearer_auth(&nurse).json(&new_ticket(n)).send().await?;
                if response.status() != 201 {
                    anyhow::bail!("create: {}", response.status());
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for lane in lanes {
        lane.await??;
    }
    loop {
        let status: Value = client.get(edge.url("/api/v1/sync")).bearer_auth(&nurse).send().await?.json().await?;
        if status["outbox"]["pending"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let appended = appended.elapsed();

    // 2. Raw rate, projector rate, raw rate again.
    let documents = ticket_documents(tickets)?;
    let raw_before = raw_writes(&database, "raw_before", &documents, RawWrite::Upsert).await?;
    let projector = cloud.start_projector("bench-projector", None);
    let projector_pid = projector.pid().context("the projector has no pid")?;
    // Timed from its first round written to its last, so the consumer
    // group's join at start does not count as projection time.
    let started = Instant::now();
    let mut first_round: Option<(Instant, f64)> = None;
    loop {
        let records = metric(&projector, "projector_records_total").await;
        if records > 0.0 && first_round.is_none() {
            first_round = Some((Instant::now(), records));
        }
        if records >= tickets as f64 && metric(&projector, "projector_lag_records").await == 0.0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(anyhow::anyhow!("the projector did not finish within 10 minutes"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (first_at, first_records) = first_round.context("no round seen")?;
    let projected = first_at.elapsed();
    let steady_records = tickets as f64 - first_records;
    let projector_cpu = cpu_ticks(projector_pid).unwrap_or(0) as f64 / 100.0;
    let stored = database.collection::<Document>("tickets").count_documents(doc! {}).await?;
    if stored != tickets as u64 {
        anyhow::bail!("{stored} tickets in mongodb, {tickets} expected");
    }
    let raw_after = raw_writes(&database, "raw_after", &documents, RawWrite::Upsert).await?;
    let raw = (raw_before + raw_after) / 2.0;
    let raw_inserts = raw_writes(&database, "raw_inserts", &documents, RawWrite::Insert).await?;
    let projector_rate = steady_records / projected.as_secs_f64();

    // 3. Latency from an edge write to MongoDB, at `rate` writes a second.
    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut stream = database.collection::<Document>("tickets").watch().await?;
    let watcher = {
        let arrivals = Arc::clone(&arrivals);
        tokio::spawn(async move {
            while let Some(Ok(event)) = stream.next().await {
                if let Some(id) = event.document_key.as_ref().and_then(|key| key.get_str("_id").ok()) {
                    arrivals.lock().expect("arrivals lock").entry(id.to_owned()).or_insert_with(Instant::now);
                }
            }
        })
    };
    let total = rate * seconds;
    let lanes_count = 16;
    let mut lanes = Vec::new();
    let begin = tokio::time::Instant::now();
    for lane in 0..lanes_count {
        let (client, nurse, url) = (client.clone(), nurse.clone(), edge.url("/api/v1/tickets"));
        let interval = Duration::from_secs_f64(lanes_count as f64 / rate as f64);
        lanes.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut next = begin + interval.mul_f64(lane as f64 / lanes_count as f64);
            for n in (lane..total).step_by(lanes_count) {
                tokio::time::sleep_until(next).await;
                next += interval;
                let at = Instant::now();
                let response = client.post(&url).bearer_auth(&nurse).json(&new_ticket(n)).send().await?;
                let ticket: Value = response.json().await?;
                sent.push((ticket["id"].as_str().unwrap_or_default().to_owned(), at));
            }
            Ok::<_, anyhow::Error>(sent)
        }));
    }
    let mut sent = Vec::new();
    for lane in lanes {
        sent.extend(lane.await??);
    }
    let offered = begin.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while arrivals.lock().map_err(|_| anyhow::anyhow!("arrivals lock"))?.len() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watcher.abort();
    let arrivals = std::mem::take(&mut *arrivals.lock().map_err(|_| anyhow::anyhow!("arrivals lock"))?);
    let mut latencies: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, at)| arrivals.get(id).map(|arrived| arrived.saturating_duration_since(*at)))
        .collect();
    if latencies.len() != total {
        anyhow::bail!("{} of {total} writes reached mongodb within 2 minutes", latencies.len());
    }
    latencies.sort();
    // 4. A pharmacy status change through the other bridge instance, timed
    // to the ward device's live feed on the edge linked to the first.
    let ids: Vec<String> = sent.iter().take(100).map(|(id, _)| id.clone()).collect();
    let pharmacist = cloud.pharmacist();
    let live = live_status(
        &client,
        (&edge.url("/api/v1/events"), &nurse),
        (&cloud.bridges[1].url(""), &pharmacist),
        &ids,
        flag("--changes", 300)?,
    )
    .await?;
    let bridge_rss = cloud.bridges[0].pid().and_then(|pid| status_kib(pid, "VmHWM:")).unwrap_or(0);
    let projector_rss = status_kib(projector_pid, "VmHWM:").unwrap_or(0);

    println!("distributed backend: {partitions} partitions, the services of MEDSYNC_* (tansu, SecantusDB, Redis here)");
    println!("projector throughput ({tickets} new tickets in the topic, then the projector started)");
    println!("  backlog appended to the topic through the bridge  {:.0} ms", ms(appended));
    println!(
        "  projector into MongoDB                            {projector_rate:.0} changes/s ({steady_records:.0} after its first round in {:.0} ms; {projector_cpu:.1} s CPU in all)",
        ms(projected)
    );
    println!(
        "  raw bulk upserts, same server, documents, indexes {raw:.0} docs/s (before {raw_before:.0}, after {raw_after:.0})"
    );
    println!("  projector / raw bulk upserts                      {:.0} %", 100.0 * projector_rate / raw);
    println!(
        "  raw bulk inserts (the cheapest write of new docs) {raw_inserts:.0} docs/s; projector / raw inserts {:.0} %",
        100.0 * projector_rate / raw_inserts
    );
    println!("edge write -> MongoDB at {rate} writes/s for {seconds} s (offered in {:.1} s)", offered.as_secs_f64());
    println!(
        "  p50 {:.0} ms   p99 {:.0} ms   max {:.0} ms",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies[latencies.len() - 1])
    );
    println!("live status, pharmacy request through bridge 2 -> ward device on bridge 1 ({} changes)", live.len());
    println!(
        "  p50 {:.0} ms   p99 {:.0} ms   max {:.0} ms",
        ms(percentile(&live, 0.50)),
        ms(percentile(&live, 0.99)),
        ms(live[live.len() - 1])
    );
    println!(
        "  peak RSS: bridge {:.1} MiB, projector {:.1} MiB",
        bridge_rss as f64 / 1024.0,
        projector_rss as f64 / 1024.0
    );
    drop(cloud);
    Ok(())
}
