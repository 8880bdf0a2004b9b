//! The auth service with a real bridge and edge node: tokens from each
//! grant work where they should, revocations reach both resource servers,
//! the node syncs with its client credentials, and with the cloud gone the
//! edge still verifies tokens and lets ward staff log in offline, marking
//! their changes so in the audit trail.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::time::Duration;

use serde_json::{Value, json};
use test_fixtures::process::{
    ServiceProcess, auth_admin, auth_config, binary, bridge_config_with_auth, edge_config_with_auth,
};
use test_fixtures::{free_port, get_json, wait_for};

const WARD: &str = "ward-4b";
const NODE: &str = "edge-ward-4b";
const NURSE_PASSWORD: &str = "night shift on 4b, bay three";
const PHARMACIST_PASSWORD: &str = "central pharmacy early shift";

async fn password_login(client: &reqwest::Client, auth: &ServiceProcess, user: &str, password: &str) -> String {
    let form = [("grant_type", "password"), ("username", user), ("password", password)];
    let response = client.post(auth.url("/oauth/token")).form(&form).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned()
}

async fn create_ticket(client: &reqwest::Client, edge: &ServiceProcess, token: &str) -> reqwest::Response {
    let body = json!({ "items": [{ "medication_code": "AMOX-500", "quantity": 20, "unit": "capsule" }], "priority": "urgent" });
    client.post(edge.url("/api/v1/tickets")).bearer_auth(token).json(&body).send().await.unwrap()
}

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["error"]["code"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn tokens_from_the_auth_service_work_are_revocable_and_the_edge_logs_staff_in_offline() {
    assert!(binary("auth-service").exists());
    let (auth_dir, bridge_dir, edge_dir) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let client = reqwest::Client::new();

    // IT sets up the auth service, its users and the ward's edge node.
    let auth_port = free_port();
    let auth_config_path = auth_dir.path().join("auth-service.toml");
    std::fs::write(&auth_config_path, auth_config(auth_dir.path(), &format!("127.0.0.1:{auth_port}"))).unwrap();
    auth_admin(
        auth_config_path.as_ref(),
        &["add-user", "--username", "n.okafor", "--role", "nurse", "--ward", WARD],
        NURSE_PASSWORD,
    );
    auth_admin(
        auth_config_path.as_ref(),
        &["add-user", "--username", "p.lindqvist", "--role", "pharmacist"],
        PHARMACIST_PASSWORD,
    );
    let credentials = auth_admin(auth_config_path.as_ref(), &["add-edge-node", "--node", NODE, "--ward", WARD], "");
    let credentials: Value = serde_json::from_str(credentials.trim()).unwrap();
    assert_eq!(credentials["client_id"], NODE);
    std::fs::write(edge_dir.path().join("client.json"), credentials.to_string()).unwrap();
    let mut auth = ServiceProcess::start_auth(auth_dir.path(), &auth_config_path);
    let jwks: Value = client.get(auth.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();

    let auth_section = format!("url = \"{}\"\nrefresh_interval_s = 1", auth.url(""));
    let bridge_port = free_port();
    let mut bridge = ServiceProcess::launch_with_config(
        "cloud-bridge",
        bridge_dir.path(),
        &jwks,
        &bridge_config_with_auth(bridge_dir.path(), &format!("127.0.0.1:{bridge_port}"), &auth_section, ""),
    );
    let sync = format!(
        "[sync]\nbridge_url = \"ws://127.0.0.1:{bridge_port}/sync\"\nreconnect_base_ms = 50\nreconnect_cap_ms = 200\n"
    );
    let edge = ServiceProcess::launch_with_config(
        "edge-node",
        edge_dir.path(),
        &jwks,
        &edge_config_with_auth(edge_dir.path(), NODE, WARD, "127.0.0.1:0", &auth_section, &sync),
    );

    // Password grant tokens work where the role belongs.
    let nurse = password_login(&client, &auth, "n.okafor", NURSE_PASSWORD).await;
    let pharmacist = password_login(&client, &auth, "p.lindqvist", PHARMACIST_PASSWORD).await;
    let created = create_ticket(&client, &edge, &nurse).await;
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    // The node syncs with the token its client credentials bought.
    wait_for("the ticket at the bridge", Duration::from_secs(30), async || {
        let response =
            client.get(bridge.url(&format!("/api/v1/tickets/{id}"))).bearer_auth(&pharmacist).send().await.unwrap();
        response.status() == 200
    })
    .await;
    let login = client
        .post(edge.url("/api/v1/login"))
        .json(&json!({ "username": "n.okafor", "password": NURSE_PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(login).await, (409, "cloud_reachable".into()), "offline login only while the cloud is away");

    // Revoked at the auth service: refused at the edge and at the bridge.
    for token in [&nurse, &pharmacist] {
        let revoked = client.post(auth.url("/oauth/revoke")).form(&[("token", token.as_str())]).send().await.unwrap();
        assert_eq!(revoked.status(), 200);
    }
    wait_for("the revocation at the edge", Duration::from_secs(30), async || {
        error_code(create_ticket(&client, &edge, &nurse).await).await == (401, "token_revoked".into())
    })
    .await;
    wait_for("the revocation at the bridge", Duration::from_secs(30), async || {
        let response = client.get(bridge.url("/api/v1/queue")).bearer_auth(&pharmacist).send().await.unwrap();
        error_code(response).await == (401, "token_revoked".into())
    })
    .await;

    // The cloud goes away. The edge keeps verifying the tokens it knows...
    let nurse = password_login(&client, &auth, "n.okafor", NURSE_PASSWORD).await;
    wait_for("staff credentials cached at the edge", Duration::from_secs(30), async || {
        edge_dir.path().join("staff-credentials.json").exists()
    })
    .await;
    auth.kill9();
    bridge.kill9();
    wait_for("the edge to notice the bridge is gone", Duration::from_secs(30), async || {
        let status: Value = get_json(&client, edge.url("/api/v1/sync"), &nurse).await;
        status["connected"] == false
    })
    .await;
    assert_eq!(create_ticket(&client, &edge, &nurse).await.status(), 201, "a token from before the outage still works");

    // ...and lets the ward's staff log in against the cached hashes.
    for (user, password) in
        [("n.okafor", "wrong password"), ("n.nobody", NURSE_PASSWORD), ("p.lindqvist", PHARMACIST_PASSWORD)]
    {
        let login = client
            .post(edge.url("/api/v1/login"))
            .json(&json!({ "username": user, "password": password }))
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(login).await, (401, "invalid_credentials".into()), "{user}");
    }
    let login: Value = client
        .post(edge.url("/api/v1/login"))
        .json(&json!({ "username": "n.okafor", "password": NURSE_PASSWORD }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let offline = login["access_token"].as_str().unwrap();
    let created = create_ticket(&client, &edge, offline).await;
    assert_eq!(created.status(), 201);
    let offline_id = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let ticket: Value = get_json(&client, edge.url(&format!("/api/v1/tickets/{offline_id}")), offline).await;
    assert_eq!(ticket["history"][0]["offline_login"], true, "{ticket}");
    assert_eq!(ticket["history"][0]["user"], "n.okafor");

    // The bridge returns (the auth service still away): the offline change
    // reaches it with its mark, and the offline token is no good there.
    bridge.restart();
    let pharmacist_again = {
        // The auth service is down: sign in once it is back.
        auth.restart();
        password_login(&client, &auth, "p.lindqvist", PHARMACIST_PASSWORD).await
    };
    wait_for("the offline ticket at the bridge", Duration::from_secs(30), async || {
        let response = client
            .get(bridge.url(&format!("/api/v1/tickets/{offline_id}")))
            .bearer_auth(&pharmacist_again)
            .send()
            .await
            .unwrap();
        response.status() == 200
    })
    .await;
    let at_bridge: Value =
        get_json(&client, bridge.url(&format!("/api/v1/tickets/{offline_id}")), &pharmacist_again).await;
    assert_eq!(at_bridge["history"][0]["offline_login"], true, "{at_bridge}");
    let response = client.get(bridge.url("/api/v1/queue")).bearer_auth(offline).send().await.unwrap();
    assert_eq!(response.status(), 401, "an offline token is worth nothing at the bridge");
}

#[tokio::test]
async fn the_admin_commands_and_two_instances_work_on_mongodb() {
    let services = test_fixtures::Services::from_env();
    let namespace = test_fixtures::services::namespace("auth-admin");
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let distributed = format!(
        "[mongodb]\nuri = \"{}\"\ndatabase = \"{namespace}\"\n[redis]\nurl = \"{}\"\nkey_prefix = \"{namespace}\"\n",
        services.mongodb_uri, services.redis_url
    );
    let config_for = |name: &str, port: u16| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, auth_config(&dir.path().join(name), &format!("127.0.0.1:{port}")) + &distributed)
            .unwrap();
        path
    };
    let first_config = config_for("first", free_port());
    auth_admin(
        &first_config,
        &["add-user", "--username", "n.okafor", "--role", "nurse", "--ward", WARD],
        NURSE_PASSWORD,
    );
    let credentials: Value =
        serde_json::from_str(auth_admin(&first_config, &["add-edge-node", "--node", NODE, "--ward", WARD], "").trim())
            .unwrap();
    assert!(auth_admin(&first_config, &["rotate-key"], "").contains("published"));

    // Two instances on the one store: what one issues, the other honours.
    let first = ServiceProcess::start_auth(&dir.path().join("first"), &first_config);
    let second_config = config_for("second", free_port());
    let second = ServiceProcess::start_auth(&dir.path().join("second"), &second_config);
    for auth in [&first, &second] {
        assert_eq!(client.get(auth.url("/readyz")).send().await.unwrap().status(), 200);
        let jwks: Value = client.get(auth.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 2, "the first key and the rotated one: {jwks}");
        password_login(&client, auth, "n.okafor", NURSE_PASSWORD).await;
    }
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", credentials["client_id"].as_str().unwrap()),
        ("client_secret", credentials["client_secret"].as_str().unwrap()),
    ];
    let response = client.post(second.url("/oauth/token")).form(&form).send().await.unwrap();
    assert_eq!(response.status(), 200, "the node enrolled through the first instance gets a token from the second");
    // A name already taken is refused, whichever instance's store holds it.
    let mut duplicate = std::process::Command::new(binary("auth-service"))
        .arg("--config")
        .arg(&second_config)
        .args(["add-user", "--username", "n.okafor", "--role", "nurse"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    duplicate.stdin.take().unwrap().write_all(b"another long password\n").unwrap();
    let output = duplicate.wait_with_output().unwrap();
    assert!(!output.status.success() && String::from_utf8_lossy(&output.stderr).contains("already exists"));
}
