//! What a token opened ends with the token: a live feed at the edge or at
//! the bridge ends (with a last `session_ended` event) once its token is
//! revoked or expires, or its account is disabled, and a node's sync session
//! ends once its token is revoked or its client disabled, its next
//! connection refused until it holds a new token (and, disabled, it gets none).
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use test_fixtures::process::{ServiceProcess, auth_admin, auth_config, bridge_config_with_auth, edge_config_with_auth};
use test_fixtures::{TestIssuer, free_port, get_json, wait_for};

const WARD: &str = "ward-4b";
const NODE: &str = "edge-ward-4b";
const NURSE_PASSWORD: &str = "night shift on 4b, bay three";
const PHARMACIST_PASSWORD: &str = "central pharmacy early shift";

/// An open live feed.
struct Feed {
    chunks: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Vec<u8>>> + Send>>,
    text: String,
}

impl Feed {
    async fn open(client: &reqwest::Client, url: String, token: &str) -> Feed {
        let response = client.get(url).bearer_auth(token).send().await.unwrap();
        assert_eq!(response.status(), 200);
        Feed { chunks: Box::pin(response.bytes_stream().map(|chunk| chunk.map(|c| c.to_vec()))), text: String::new() }
    }

    /// Reads until an event named `name` arrived; its data.
    async fn event(&mut self, name: &str, timeout: Duration) -> Value {
        let marker = format!("event: {name}\n");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(start) = self.text.find(&marker) {
                let rest = &self.text[start + marker.len()..];
                if let Some(end) = rest.find("\n\n") {
                    let data: String = rest[..end]
                        .lines()
                        .filter_map(|line| line.strip_prefix("data: "))
                        .collect::<Vec<_>>()
                        .join("\n");
                    self.text = rest[end..].to_owned();
                    return serde_json::from_str(&data).unwrap();
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.chunks.next()).await {
                Ok(Some(Ok(chunk))) => self.text.push_str(&String::from_utf8_lossy(&chunk)),
                other => panic!("no {name} event within {timeout:?} ({other:?}); read: {}", self.text),
            }
        }
    }

    /// Whether the server ended the stream within `timeout`.
    async fn ends(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.chunks.next()).await {
                Ok(None) | Ok(Some(Err(_))) => return true,
                Ok(Some(Ok(_))) => continue,
                Err(_) => return false,
            }
        }
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

async fn create_ticket(client: &reqwest::Client, edge: &ServiceProcess, token: &str) -> String {
    let body = json!({ "items": [{ "medication_code": "AMOX-500", "quantity": 20, "unit": "capsule" }], "priority": "urgent" });
    let response = client.post(edge.url("/api/v1/tickets")).bearer_auth(token).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_live_feed_ends_when_its_token_expires_after_the_leeway() {
    const LEEWAY_S: u64 = 2;
    const LIFETIME_S: u64 = 4;
    let issuer = TestIssuer::new("key-1");
    let (edge_dir, bridge_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let auth_extra = format!("leeway_s = {LEEWAY_S}");
    let bridge_port = free_port();
    let bridge = ServiceProcess::launch_with_config(
        "cloud-bridge",
        bridge_dir.path(),
        &issuer.jwks(),
        &bridge_config_with_auth(bridge_dir.path(), &format!("127.0.0.1:{bridge_port}"), &auth_extra, ""),
    );
    std::fs::write(edge_dir.path().join("node-token"), issuer.token(NODE, &["edge-node"], &[WARD])).unwrap();
    let sync = format!(
        "[sync]\nbridge_url = \"ws://127.0.0.1:{bridge_port}/sync\"\nreconnect_base_ms = 50\nreconnect_cap_ms = 200\n"
    );
    let edge = ServiceProcess::launch_with_config(
        "edge-node",
        edge_dir.path(),
        &issuer.jwks(),
        &edge_config_with_auth(edge_dir.path(), NODE, WARD, "127.0.0.1:0", &auth_extra, &sync),
    );
    let client = reqwest::Client::new();
    wait_for("the node linked", Duration::from_secs(30), async || {
        get_json(&client, edge.url("/api/v1/sync"), &issuer.nurse(WARD)).await["connected"] == true
    })
    .await;
    let short_lived = |user: &str, roles: &[&str], wards: &[&str]| {
        let mut claims = issuer.claims(user, roles, wards);
        claims["exp"] = json!(now_s() + LIFETIME_S);
        (issuer.sign(&claims), claims["exp"].as_u64().unwrap())
    };
    let (nurse, nurse_expires) = short_lived("n.okafor", &["nurse"], &[WARD]);
    let (pharmacist, pharmacist_expires) = short_lived("p.lindqvist", &["pharmacist"], &[]);
    let mut at_ward = Feed::open(&client, edge.url("/api/v1/events"), &nurse).await;
    let mut at_pharmacy = Feed::open(&client, bridge.url("/api/v1/events"), &pharmacist).await;

    // The feeds work while the tokens hold...
    let id = create_ticket(&client, &edge, &issuer.nurse(WARD)).await;
    assert_eq!(at_ward.event("ticket", Duration::from_secs(5)).await["id"], id.as_str());
    assert_eq!(at_pharmacy.event("ticket", Duration::from_secs(15)).await["id"], id.as_str());

    // ...and end once the tokens expired and the leeway passed, not before.
    for (feed, expires) in [(&mut at_ward, nurse_expires), (&mut at_pharmacy, pharmacist_expires)] {
        let ended = feed.event("session_ended", Duration::from_secs(LIFETIME_S + LEEWAY_S + 5)).await;
        assert!(now_s() >= expires + LEEWAY_S, "ended at {} before the leeway after {expires}", now_s());
        assert_eq!(ended["code"], "token_expired", "{ended}");
        assert!(feed.ends(Duration::from_secs(2)).await, "the stream closes after its last event");
    }
}

/// How IT cuts a nurse, a pharmacist and an edge node off.
#[derive(Debug, Clone, Copy)]
enum CutOff {
    /// `POST /oauth/revoke` of their tokens: new tokens work again.
    RevokeTokens,
    /// `auth-service disable-account`: no new token either.
    DisableAccounts,
}

#[tokio::test]
async fn revoking_ends_open_feeds_and_the_nodes_sync_session() {
    cutting_off_ends_open_feeds_and_the_nodes_sync_session(CutOff::RevokeTokens).await;
}

#[tokio::test]
async fn disabling_the_accounts_ends_open_feeds_and_the_nodes_sync_session_for_good() {
    cutting_off_ends_open_feeds_and_the_nodes_sync_session(CutOff::DisableAccounts).await;
}

async fn cutting_off_ends_open_feeds_and_the_nodes_sync_session(cut: CutOff) {
    const REFRESH_INTERVAL_S: u64 = 1;
    let (auth_dir, bridge_dir, edge_dir) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let client = reqwest::Client::new();
    let auth_config_path = auth_dir.path().join("auth-service.toml");
    std::fs::write(&auth_config_path, auth_config(auth_dir.path(), &format!("127.0.0.1:{}", free_port()))).unwrap();
    let add_user = |name: &str, role: &str, password: &str| {
        let mut args = vec!["add-user", "--username", name, "--role", role];
        if role == "nurse" {
            args.extend(["--ward", WARD]);
        }
        auth_admin(auth_config_path.as_ref(), &args, password);
    };
    add_user("n.okafor", "nurse", NURSE_PASSWORD);
    add_user("n.mbeki", "nurse", NURSE_PASSWORD);
    add_user("p.lindqvist", "pharmacist", PHARMACIST_PASSWORD);
    let credentials = auth_admin(auth_config_path.as_ref(), &["add-edge-node", "--node", NODE, "--ward", WARD], "");
    let credentials: Value = serde_json::from_str(credentials.trim()).unwrap();
    let auth = ServiceProcess::start_auth(auth_dir.path(), &auth_config_path);
    let jwks: Value = client.get(auth.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    let token_for = async |form: &[(&str, &str)]| -> String {
        let response = client.post(auth.url("/oauth/token")).form(form).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned()
    };
    let login = |user: &'static str, password: &'static str| {
        [("grant_type", "password"), ("username", user), ("password", password)]
    };
    let (client_id, secret) =
        (credentials["client_id"].as_str().unwrap(), credentials["client_secret"].as_str().unwrap());
    let node_login = [("grant_type", "client_credentials"), ("client_id", client_id), ("client_secret", secret)];

    // IT placed the node's token itself (no client credentials on the node):
    // revoking it is how its sessions are cut off.
    let auth_section = format!("url = \"{}\"\nrefresh_interval_s = {REFRESH_INTERVAL_S}", auth.url(""));
    let bridge_port = free_port();
    let bridge = ServiceProcess::launch_with_config(
        "cloud-bridge",
        bridge_dir.path(),
        &jwks,
        &bridge_config_with_auth(bridge_dir.path(), &format!("127.0.0.1:{bridge_port}"), &auth_section, ""),
    );
    let node_token = token_for(&node_login).await;
    std::fs::write(edge_dir.path().join("node-token"), &node_token).unwrap();
    let sync = format!(
        "[sync]\nbridge_url = \"ws://127.0.0.1:{bridge_port}/sync\"\nreconnect_base_ms = 50\nreconnect_cap_ms = 200\n"
    );
    let edge = ServiceProcess::launch_with_config(
        "edge-node",
        edge_dir.path(),
        &jwks,
        &edge_config_with_auth(edge_dir.path(), NODE, WARD, "127.0.0.1:0", &auth_section, &sync),
    );
    let nurse = token_for(&login("n.okafor", NURSE_PASSWORD)).await;
    let pharmacist = token_for(&login("p.lindqvist", PHARMACIST_PASSWORD)).await;
    // Another nurse's view of the ward, which nothing below cuts off.
    let ward_view = token_for(&login("n.mbeki", NURSE_PASSWORD)).await;
    let linked = async |connected: bool| {
        let status = get_json(&client, edge.url("/api/v1/sync"), &ward_view).await;
        status["connected"] == connected
    };
    wait_for("the node linked", Duration::from_secs(30), async || linked(true).await).await;
    let mut at_ward = Feed::open(&client, edge.url("/api/v1/events"), &nurse).await;
    let mut at_pharmacy = Feed::open(&client, bridge.url("/api/v1/events"), &pharmacist).await;
    let id = create_ticket(&client, &edge, &ward_view).await;
    assert_eq!(at_ward.event("ticket", Duration::from_secs(5)).await["id"], id.as_str());
    assert_eq!(at_pharmacy.event("ticket", Duration::from_secs(15)).await["id"], id.as_str());

    // Cut off: the open feeds end within the refresh interval (and the
    // once-a-second check), with the reason.
    let code = match cut {
        CutOff::RevokeTokens => {
            for token in [&nurse, &pharmacist, &node_token] {
                let revoked =
                    client.post(auth.url("/oauth/revoke")).form(&[("token", token.as_str())]).send().await.unwrap();
                assert_eq!(revoked.status(), 200);
            }
            "token_revoked"
        }
        CutOff::DisableAccounts => {
            for name in ["n.okafor", "p.lindqvist", client_id] {
                auth_admin(auth_config_path.as_ref(), &["disable-account", "--name", name], "");
            }
            "account_disabled"
        }
    };
    let revoked_at = Instant::now();
    let bound = Duration::from_secs(REFRESH_INTERVAL_S + 4);
    for feed in [&mut at_ward, &mut at_pharmacy] {
        let ended = feed.event("session_ended", bound).await;
        assert_eq!(ended["code"], code, "{ended}");
        assert!(feed.ends(Duration::from_secs(2)).await);
    }
    assert!(revoked_at.elapsed() < bound, "feeds ended in {:?}", revoked_at.elapsed());

    // The node's session ends too, and the revoked token gets it no new one.
    wait_for("the node's session ended", bound, async || linked(false).await).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = get_json(&client, edge.url("/api/v1/sync"), &ward_view).await;
    assert_eq!(status["connected"], false, "reconnecting with the revoked token is refused: {status}");
    assert!(status["last_error"].as_str().unwrap().contains("refused"), "{status}");

    match cut {
        // A new token from IT, and the node is back.
        CutOff::RevokeTokens => {
            std::fs::write(edge_dir.path().join("node-token"), token_for(&node_login).await).unwrap();
            wait_for("the node linked again", Duration::from_secs(30), async || linked(true).await).await;
        }
        // Disabled, the node and the staff get no new token.
        CutOff::DisableAccounts => {
            let refused = client.post(auth.url("/oauth/token")).form(&node_login).send().await.unwrap();
            assert_eq!(refused.status(), 401, "a disabled client gets no token");
            let nurse_login = login("n.okafor", NURSE_PASSWORD);
            let refused = client.post(auth.url("/oauth/token")).form(&nurse_login).send().await.unwrap();
            assert_eq!(refused.status(), 400, "a disabled nurse cannot log in");
        }
    }
}
