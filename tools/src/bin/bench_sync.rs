//! Benchmark of sync: an edge node makes `--tickets` tickets while the bridge
//! is down; the bridge starts; how long until all are queryable in the
//! pharmacy queue, and the bridge's peak RSS. Then `--changes` pharmacy status
//! changes, each timed from the request to the ward device's live feed.
//!
//! cargo build --release -p edge-node -p cloud-bridge -p devtools && target/release/bench-sync

use anyhow::Context;
use std::time::{Duration, Instant};

use devtools::bench::{flag, live_status, ms, percentile, status_kib};
use serde_json::{Value, json};
use test_fixtures::{BridgeProcess, EdgeNodeProcess, TestIssuer};

const WARD: &str = "ward-bench";
const NODE: &str = "edge-bench";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tickets = flag("--tickets", 10_000)?;
    let changes = flag("--changes", 300)?;
    let issuer = TestIssuer::new("bench");
    let (edge_dir, bridge_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let bridge_port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr())?.port();
    std::fs::write(edge_dir.path().join("node-token"), issuer.token(NODE, &["edge-node"], &[WARD]))?;
    let sync = format!(
        "[sync]\nbridge_url = \"ws://127.0.0.1:{bridge_port}/sync\"\nreconnect_base_ms = 50\nreconnect_cap_ms = 100\n"
    );
    let edge = EdgeNodeProcess::start(edge_dir.path(), NODE, WARD, &issuer.jwks(), &sync);
    let client = reqwest::Client::new();
    let nurse = issuer.nurse(WARD);
    let pharmacist = issuer.token("p.bench", &["pharmacist"], &[]);

    let mut lanes = Vec::new();
    for lane in 0..32 {
        let (client, nurse, url) = (client.clone(), nurse.clone(), edge.url("/api/v1/tickets"));
        lanes.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in (lane..tickets).step_by(32) {
                let body = json!({ "items": [{ "medication_code": format!("MED-{}", n % 500), "quantity": 3, "unit": "vial" }], "priority": "routine" });
                let response = client.post(&url).bearer_auth(&nurse).json(&body).send().await?;
                let ticket: Value = response.json().await?;
                ids.push(ticket["id"].as_str().unwrap_or_default().to_owned());
            }
            Ok::<_, anyhow::Error>(ids)
        }));
    }
    let mut ids = Vec::new();
    for lane in lanes {
        ids.extend(lane.await??);
    }

    let started = Instant::now();
    let bridge =
        BridgeProcess::start_bridge(bridge_dir.path(), &format!("127.0.0.1:{bridge_port}"), &issuer.jwks(), "");
    let bridge_pid = bridge.pid().context("bridge has no pid")?;
    let queue = bridge.url(&format!("/api/v1/queue?ward={WARD}&limit=1"));
    loop {
        let page: Value = client.get(&queue).bearer_auth(&pharmacist).send().await?.json().await?;
        if page["total"].as_u64() == Some(tickets as u64) {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(anyhow::anyhow!("the backlog did not arrive within 10 minutes"));
        }
        // Counting the queue costs the bridge CPU; probing more often would
        // slow what is measured.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let backlog = started.elapsed();
    let peak_rss = status_kib(bridge_pid, "VmHWM:").unwrap_or(0);

    // Live status changes: pharmacy request -> ward device's feed.
    let latencies =
        live_status(&client, (&edge.url("/api/v1/events"), &nurse), (&bridge.url(""), &pharmacist), &ids, changes)
            .await?;
    println!("sync: {tickets} tickets made offline, then the bridge started");
    println!("  backlog queryable at the bridge  {:.0} ms after it started", ms(backlog));
    println!("  bridge peak RSS                  {:.1} MiB", peak_rss as f64 / 1024.0);
    println!("live status, pharmacy request -> ward device feed ({changes} changes)");
    println!(
        "  p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies[latencies.len() - 1])
    );
    Ok(())
}
