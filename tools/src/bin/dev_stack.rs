//! The development stack: the auth service, a cloud bridge and one ward's
//! edge node on loopback, with a bootstrap nurse and pharmacist, so a
//! newcomer can log in, create a ticket at the ward and watch it reach the
//! pharmacy queue. The edge node is enrolled as IT would enrol it (client
//! credentials from the auth service). Accounts and data persist in
//! `target/dev-stack` between runs.
//!
//! With `--distributed`, the cloud runs on the distributed backend instead:
//! two bridge instances and a projector on the Kafka, MongoDB and Redis the
//! `MEDSYNC_*` variables name (`scripts/run --distributed` starts local ones).
//!
//! scripts/run [--distributed]   (builds, then runs target/release/dev-stack)

use anyhow::Context;
use std::path::{Path, PathBuf};

use serde_json::Value;
use test_fixtures::Services;
use test_fixtures::process::{
    PROJECTOR, ServiceProcess, auth_admin, edge_config_with_auth, named_bridge_config, projector_config,
};

const WARD: &str = "ward-4b";
const NODE: &str = "edge-ward-4b";
const AUTH_LISTEN: &str = "127.0.0.1:8590";
const BRIDGE_LISTEN: &str = "127.0.0.1:8580";
/// The second bridge instance of the distributed stack.
const SECOND_BRIDGE_LISTEN: &str = "127.0.0.1:8582";
const PROJECTOR_LISTEN: &str = "127.0.0.1:8581";
/// The topic, consumer group, database and key prefix of the distributed stack.
const NAMESPACE: &str = "medsync-dev";
const EDGE_LISTEN: &str = "127.0.0.1:8480";
const USERS: [(&str, &str, &[&str]); 2] =
    [("n.okafor", "nurse", &["--ward", WARD]), ("p.lindqvist", "pharmacist", &[])];

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| path.display().to_string())
}

/// Creates the auth service's accounts on the first run; later runs reuse them.
fn bootstrap(root: &Path, auth_config: &Path) -> anyhow::Result<()> {
    let enrolled = root.join("edge").join("client.json");
    if enrolled.exists() {
        return Ok(());
    }
    for (user, role, wards) in USERS {
        let password = service_kit::secrets::generate_secret();
        let mut args = vec!["add-user", "--username", user, "--role", role];
        args.extend_from_slice(wards);
        auth_admin(auth_config, &args, &password);
        service_kit::keys::write_atomically(&root.join(format!("{role}.password")), &password)?;
    }
    let credentials = auth_admin(auth_config, &["add-edge-node", "--node", NODE, "--ward", WARD], "");
    Ok(service_kit::keys::write_atomically(&enrolled, credentials.trim())?)
}

fn main() -> anyhow::Result<()> {
    let distributed = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--distributed") => true,
        Some(other) => anyhow::bail!("unknown argument {other}; the one there is: --distributed"),
    };
    let root =
        std::env::var_os("DEV_STACK_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target/dev-stack"));
    let root = std::path::absolute(&root).with_context(|| root.display().to_string())?;
    let (auth_dir, bridge_dir, edge_dir) = (root.join("auth"), root.join("bridge"), root.join("edge"));
    for dir in [&auth_dir, &bridge_dir, &edge_dir] {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    let auth_config = auth_dir.join("auth-service.toml");
    // Development tokens last an hour rather than five minutes.
    let config = test_fixtures::process::auth_config(&auth_dir, AUTH_LISTEN) + "[tokens]\naccess_token_ttl_s = 3600\n";
    write(&auth_config, &config)?;
    bootstrap(&root, &auth_config)?;

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let auth = ServiceProcess::start_auth(&auth_dir, &auth_config);
    let jwks: Value = runtime.block_on(async {
        let response = reqwest::get(auth.url("/.well-known/jwks.json")).await?;
        response.json().await.map_err(anyhow::Error::from)
    })?;
    let auth_section = format!("url = \"{}\"", auth.url(""));
    let backend = match distributed {
        true => Services::from_env().sections(NAMESPACE, 4, &format!("{NAMESPACE}-projector")),
        false => String::new(),
    };
    let bridge_config = named_bridge_config("bridge-1", &bridge_dir, BRIDGE_LISTEN, &auth_section, &backend);
    let bridge = ServiceProcess::launch_with_config("cloud-bridge", &bridge_dir, &jwks, &bridge_config);
    let mut others = Vec::new();
    if distributed {
        let second_dir = root.join("bridge-2");
        let config = named_bridge_config("bridge-2", &second_dir, SECOND_BRIDGE_LISTEN, &auth_section, &backend);
        others.push(ServiceProcess::launch_with_config("cloud-bridge", &second_dir, &jwks, &config));
        let projector_dir = root.join("projector");
        let config = projector_config("projector-1", PROJECTOR_LISTEN, &backend);
        others.push(ServiceProcess::launch(PROJECTOR, &projector_dir, &jwks, &config));
    }
    let sync = format!("[sync]\nbridge_url = \"ws://{BRIDGE_LISTEN}/sync\"\n");
    let edge_config = edge_config_with_auth(&edge_dir, NODE, WARD, EDGE_LISTEN, &auth_section, &sync);
    let edge = ServiceProcess::launch_with_config("edge-node", &edge_dir, &jwks, &edge_config);

    let ticket = r#"{"items":[{"medication_code":"AMOX-500","description":"Amoxicillin 500 mg","quantity":20,"unit":"capsule"}],"priority":"urgent","notes":"Bed 12"}"#;
    println!(
        r#"
medsync development stack (data in {root})

  auth service          {auth}      POST /oauth/token, /.well-known/jwks.json
  edge node of {WARD}   {edge}      ward devices: /api/v1/tickets, /api/v1/events, /api/v1/sync
  cloud bridge          {bridge}      pharmacy: /api/v1/queue, /api/v1/tickets/ID/transitions; edges: /sync

Log in (password grant; tokens last an hour). The bootstrap users are the
nurse n.okafor of {WARD} and the pharmacist p.lindqvist; their passwords are
in {root}/nurse.password and pharmacist.password:
  export NURSE=$(scripts/token nurse)
  export PHARMACIST=$(scripts/token pharmacist)

Create a ticket at the ward:
  curl -s -X POST {edge}/api/v1/tickets -H "authorization: Bearer $NURSE" -H 'content-type: application/json' -d '{ticket}'
Watch it in the pharmacy queue (within a second or two):
  curl -s {bridge}/api/v1/queue -H "authorization: Bearer $PHARMACIST"
Acknowledge it from the pharmacy (ID from the queue), and watch the ward's live feed:
  curl -s -N {edge}/api/v1/events -H "authorization: Bearer $NURSE" &
  curl -s -X POST {bridge}/api/v1/tickets/ID/transitions -H "authorization: Bearer $PHARMACIST" -H 'content-type: application/json' -d '{{"to":"acknowledged"}}'

{distributed_note}Logs: {root}/*/*.log. Ctrl-C stops them all.
"#,
        distributed_note = match distributed {
            true => format!(
                "The cloud runs on the distributed backend (topic, database and keys {NAMESPACE}):\n  \
                 a second bridge     {second}      the same queue: curl -s {second}/api/v1/queue -H \"authorization: Bearer $PHARMACIST\"\n  \
                 the projector       http://{PROJECTOR_LISTEN}      /metrics (projector_lag_records), /readyz\n\n",
                second = format!("http://{SECOND_BRIDGE_LISTEN}"),
            ),
            false => String::new(),
        },
        root = root.display(),
        auth = auth.url(""),
        edge = edge.url(""),
        bridge = bridge.url(""),
    );
    runtime.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    println!("stopping");
    // SIGTERM: each drains and closes its database cleanly.
    for mut process in [edge, bridge].into_iter().chain(others).chain([auth]) {
        process.terminate();
    }
    Ok(())
}
