//! What the benchmark binaries share: flags, /proc readings, percentiles.

use anyhow::Context;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

/// The number after `name` on the command line, or `default`.
pub fn flag(name: &str, default: usize) -> anyhow::Result<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args.get(i + 1).and_then(|v| v.parse().ok()).with_context(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}

/// A `kB` field of `/proc/PID/status` (`VmRSS:`, `VmHWM:`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

/// CPU time (user and system) a process has used, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields start after its ')'.
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// The `p` quantile (0 to 1) of `sorted`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Pharmacy status changes of `ids` (acknowledged, picking, dispatched in
/// turn), `changes` of them, each timed from the request to `pharmacy`'s
/// transitions endpoint until the ward device's live feed (`events`, read
/// as `nurse`) shows it. Returns the latencies, sorted.
pub async fn live_status(
    client: &reqwest::Client,
    (events, nurse): (&str, &str),
    (pharmacy, pharmacist): (&str, &str),
    ids: &[String],
    changes: usize,
) -> anyhow::Result<Vec<Duration>> {
    let events = client.get(events).bearer_auth(nurse).send().await?;
    let mut events = events.bytes_stream();
    let mut buffer = String::new();
    let mut latencies = Vec::with_capacity(changes);
    for (i, id) in ids.iter().cycle().take(changes).enumerate() {
        let to = ["acknowledged", "picking", "dispatched"][i / ids.len() % 3];
        let expected = format!("\"status\":\"{to}\"");
        let sent = Instant::now();
        let url = format!("{pharmacy}/api/v1/tickets/{id}/transitions");
        let response = client.post(&url).bearer_auth(pharmacist).json(&json!({ "to": to })).send().await?;
        if !response.status().is_success() {
            anyhow::bail!("transition {to} of {id}: {}", response.status());
        }
        // Read the feed until this ticket shows the new status.
        loop {
            if let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                if event.contains(id.as_str()) && event.contains(&expected) {
                    break;
                }
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
                Ok(Some(Ok(chunk))) => buffer.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return Err(anyhow::anyhow!("the ward's live feed stalled")),
            }
        }
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    Ok(latencies)
}
