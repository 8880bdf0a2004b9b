//! The development stack: a cloud bridge and one ward's edge node on
//! loopback, with a token for a nurse and one for a pharmacist, so a newcomer
//! can create a ticket at the ward and watch it reach the pharmacy queue.
//! Until the auth service exists, a development issuer signs the tokens
//! (real Ed25519 keys, published to both processes as their JWKS).
//!
//! scripts/run   (builds, then runs target/release/dev-stack)

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e::{BridgeProcess, EdgeNodeProcess, TestIssuer};
use serde_json::json;

const WARD: &str = "ward-4b";
const NODE: &str = "edge-ward-4b";
const BRIDGE_LISTEN: &str = "127.0.0.1:8580";
const EDGE_LISTEN: &str = "127.0.0.1:8480";
/// Development tokens last a working day.
const TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3_600);

fn main() -> Result<(), String> {
    let root =
        std::env::var_os("DEV_STACK_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target/dev-stack"));
    let root = std::path::absolute(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let issuer = TestIssuer::new("dev-key");
    let token = |user: &str, roles: &[&str], wards: &[&str]| {
        let mut claims = issuer.claims(user, roles, wards);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        claims["exp"] = json!(now + TOKEN_LIFETIME.as_secs());
        issuer.sign(&claims)
    };
    let nurse = token("n.okafor", &["nurse"], &[WARD]);
    let pharmacist = token("p.lindqvist", &["pharmacist"], &[]);
    let edge_dir = root.join("edge");
    std::fs::create_dir_all(&edge_dir).map_err(|e| format!("{}: {e}", edge_dir.display()))?;
    std::fs::write(edge_dir.join("node-token"), token(NODE, &["edge-node"], &[WARD])).map_err(|e| e.to_string())?;
    for (name, value) in [("nurse.token", &nurse), ("pharmacist.token", &pharmacist)] {
        std::fs::write(root.join(name), value).map_err(|e| e.to_string())?;
    }

    let bridge = BridgeProcess::start_bridge(&root.join("bridge"), BRIDGE_LISTEN, &issuer.jwks(), "");
    let sync = format!("[sync]\nbridge_url = \"ws://{BRIDGE_LISTEN}/sync\"\n");
    let edge = EdgeNodeProcess::start_on(&edge_dir, NODE, WARD, EDGE_LISTEN, &issuer.jwks(), &sync);

    let ticket = r#"{"items":[{"medication_code":"AMOX-500","description":"Amoxicillin 500 mg","quantity":20,"unit":"capsule"}],"priority":"urgent","notes":"Bed 12"}"#;
    println!(
        r#"
medsync development stack (data in {root})

  edge node of {WARD}   {edge}      ward devices: /api/v1/tickets, /api/v1/events, /api/v1/sync
  cloud bridge          {bridge}      pharmacy: /api/v1/queue, /api/v1/tickets/ID/transitions; edges: /sync

Tokens (valid 12 hours), also in {root}/nurse.token and pharmacist.token:
  export NURSE=$(cat {root}/nurse.token)
  export PHARMACIST=$(cat {root}/pharmacist.token)

Create a ticket at the ward:
  curl -s -X POST {edge}/api/v1/tickets -H "authorization: Bearer $NURSE" -H 'content-type: application/json' -d '{ticket}'
Watch it in the pharmacy queue (within a second or two):
  curl -s {bridge}/api/v1/queue -H "authorization: Bearer $PHARMACIST"
Acknowledge it from the pharmacy (ID from the queue), and watch the ward's live feed:
  curl -s -N {edge}/api/v1/events -H "authorization: Bearer $NURSE" &
  curl -s -X POST {bridge}/api/v1/tickets/ID/transitions -H "authorization: Bearer $PHARMACIST" -H 'content-type: application/json' -d '{{"to":"acknowledged"}}'

Logs: {root}/edge/edge-node.log, {root}/bridge/cloud-bridge.log. Ctrl-C stops both.
"#,
        root = root.display(),
        edge = edge.url(""),
        bridge = bridge.url(""),
    );
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    println!("stopping");
    // SIGTERM: both drain and close their databases cleanly.
    let (mut edge, mut bridge) = (edge, bridge);
    edge.terminate();
    bridge.terminate();
    Ok(())
}
