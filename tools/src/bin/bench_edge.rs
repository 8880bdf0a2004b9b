//! Benchmark of the edge node's durable write path: starts the release
//! binary on a temporary data directory, measures its idle RSS, then has
//! `--clients` concurrent clients create tickets over HTTP for `--seconds`
//! and reports creates per second and latency percentiles. The database is
//! encrypted as on a ward (SQLCipher); `--plaintext 1` runs it without a
//! key, to state what encryption costs.
//!
//! cargo build --release -p edge-node -p devtools && target/release/bench-edge [--plaintext 1]

use anyhow::Context;
use std::time::{Duration, Instant};

use devtools::bench::{cpu_ticks, percentile, status_kib};
use serde_json::json;
use test_fixtures::process::{edge_config, edge_key_file};
use test_fixtures::{EdgeNodeProcess, TestIssuer};

struct Args {
    clients: usize,
    seconds: u64,
    plaintext: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args { clients: 32, seconds: 10, plaintext: false };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        let value = words.next().with_context(|| format!("{flag} needs a value"))?;
        let number = value.parse().map_err(|_| anyhow::anyhow!("{flag} takes a number, got {value:?}"))?;
        match flag.as_str() {
            "--clients" => args.clients = number as usize,
            "--seconds" => args.seconds = number,
            "--plaintext" => args.plaintext = number != 0,
            other => anyhow::bail!("unknown flag {other}; use --clients N --seconds N --plaintext 0|1"),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let dir = tempfile::tempdir()?;
    let issuer = TestIssuer::new("bench");
    let mut config = edge_config(dir.path(), "edge-bench", "ward-bench", "");
    if args.plaintext {
        let key_line = format!("key_file = \"{}\"", edge_key_file(dir.path()).display());
        anyhow::ensure!(config.contains(&key_line), "the test configuration names no key file");
        config = config.replace(&key_line, "");
    }
    let node = EdgeNodeProcess::launch_with_config("edge-node", dir.path(), &issuer.jwks(), &config);
    let pid = node.pid().context("node has no pid")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = status_kib(pid, "VmRSS:").context("cannot read the node's RSS")?;

    let cpu_before = cpu_ticks(pid).unwrap_or(0);
    let token = issuer.nurse("ward-bench");
    let url = node.url("/api/v1/tickets");
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut workers = Vec::new();
    for client_index in 0..args.clients {
        // One client (and connection) per worker, as separate devices would.
        let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
        let (url, token) = (url.clone(), token.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0u64;
            let mut n = 0usize;
            while Instant::now() < deadline {
                n += 1;
                let body = json!({
                    "items": [{ "medication_code": format!("MED-{client_index}-{}", n % 1000), "quantity": 5, "unit": "vial" }],
                    "priority": "urgent",
                    "notes": "bench",
                });
                let started = Instant::now();
                match client.post(&url).bearer_auth(&token).json(&body).send().await {
                    Ok(response) if response.status() == 201 => {
                        let _ = response.bytes().await;
                        latencies.push(started.elapsed());
                    }
                    _ => failures += 1,
                }
            }
            (latencies, failures)
        }));
    }
    let mut latencies = Vec::new();
    let mut failures = 0;
    for worker in workers {
        let (mut l, f) = worker.await?;
        latencies.append(&mut l);
        failures += f;
    }
    let loaded_rss = status_kib(pid, "VmRSS:").unwrap_or(0);
    let server_cpu_s = cpu_ticks(pid).unwrap_or(0).saturating_sub(cpu_before) as f64 / 100.0;
    latencies.sort();
    if latencies.is_empty() {
        return Err(anyhow::anyhow!("no request succeeded"));
    }
    let rate = latencies.len() as f64 / args.seconds as f64;
    let storage = if args.plaintext { "plain SQLite" } else { "encrypted (SQLCipher)" };
    println!("edge node durable creates over HTTP: {} clients, {} s, {storage}", args.clients, args.seconds);
    println!("  creates/s      {rate:.0}  ({} ok, {failures} failed)", latencies.len());
    println!("  latency p50    {:.2} ms", percentile(&latencies, 0.50).as_secs_f64() * 1e3);
    println!("  latency p99    {:.2} ms", percentile(&latencies, 0.99).as_secs_f64() * 1e3);
    println!("  latency max    {:.2} ms", latencies[latencies.len() - 1].as_secs_f64() * 1e3);
    println!(
        "  server CPU     {:.0} us per create ({server_cpu_s:.1} s over the run)",
        server_cpu_s * 1e6 / latencies.len() as f64
    );
    println!("  idle RSS       {:.1} MiB", idle_rss as f64 / 1024.0);
    println!("  RSS under load {:.1} MiB", loaded_rss as f64 / 1024.0);
    Ok(())
}
