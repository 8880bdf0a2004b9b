//! Every refusal of every service has the service's documented error body,
//! including the ones the HTTP framework makes itself (no such method,
//! header limits, body limits, bad path encoding, failed upgrades): one
//! table, three real processes.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};
use service_kit::http::{HEADER_BYTES_MAX, HEADER_COUNT_MAX};
use sync_protocol::wire::{self, ErrorCode, Message, WireLimits};
use test_fixtures::process::{ServiceProcess, auth_config};
use test_fixtures::{BridgeProcess, EdgeNodeProcess, TestIssuer, free_port};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const WARD: &str = "ward-4b";
const NODE: &str = "edge-ward-4b";
/// A ticket id that parses (a UUIDv7).
const TICKET: &str = "0190b6a4-7c3e-7d2a-9f3e-1a2b3c4d5e6f";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Service {
    Edge,
    Bridge,
    Auth,
}

/// One request and the refusal it must get.
struct Case {
    service: Service,
    what: &'static str,
    method: Method,
    path: String,
    token: Option<String>,
    headers: HeaderMap,
    body: Option<(&'static str, Vec<u8>)>,
    status: u16,
    code: &'static str,
}

impl Case {
    fn new(service: Service, what: &'static str, method: Method, path: &str, status: u16, code: &'static str) -> Self {
        Case {
            service,
            what,
            method,
            path: path.to_owned(),
            token: None,
            headers: HeaderMap::new(),
            body: None,
            status,
            code,
        }
    }

    fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        self
    }

    fn many_headers(mut self, count: usize) -> Self {
        for n in 0..count {
            let name = HeaderName::from_bytes(format!("x-filler-{n}").as_bytes()).unwrap();
            self.headers.insert(name, HeaderValue::from_static("1"));
        }
        self
    }

    fn body(mut self, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some((content_type, body.into()));
        self
    }
}

/// The error code of a body in the service's documented shape, or why it is not in it.
fn code_of(service: Service, body: &Value) -> Result<String, String> {
    let (code, message) = match service {
        // RFC 6749: {"error": code, "error_description": text}.
        Service::Auth => (&body["error"], &body["error_description"]),
        Service::Edge | Service::Bridge => (&body["error"]["code"], &body["error"]["message"]),
    };
    match (code.as_str(), message.as_str()) {
        (Some(code), Some(message)) if !message.is_empty() => Ok(code.to_owned()),
        _ => Err(format!("not the documented shape: {body}")),
    }
}

#[tokio::test]
async fn every_refusal_of_every_service_has_the_documented_json_body() {
    let issuer = TestIssuer::new("key-1");
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let edge = EdgeNodeProcess::start(dirs[0].path(), NODE, WARD, &issuer.jwks(), "");
    let bridge = BridgeProcess::start_bridge(dirs[1].path(), "127.0.0.1:0", &issuer.jwks(), "");
    let auth_config_path = dirs[2].path().join("auth-service.toml");
    std::fs::write(&auth_config_path, auth_config(dirs[2].path(), &format!("127.0.0.1:{}", free_port()))).unwrap();
    let auth = ServiceProcess::start_auth(dirs[2].path(), &auth_config_path);

    let nurse = issuer.nurse(WARD);
    let pharmacist = issuer.token("p.lindqvist", &["pharmacist"], &[]);
    let node = issuer.token(NODE, &["edge-node"], &[WARD]);
    let huge = "h".repeat(HEADER_BYTES_MAX + 1);
    let too_many = HEADER_COUNT_MAX + 1;
    let big_json = format!("{{\"notes\": \"{}\"}}", "n".repeat(128 * 1024));
    let ticket_path = format!("/api/v1/tickets/{TICKET}");
    use Service::{Auth, Bridge, Edge};
    let cases = vec![
        // Unknown methods, on every service.
        Case::new(Edge, "PUT on the ticket list", Method::PUT, "/api/v1/tickets", 405, "method_not_allowed")
            .token(&nurse),
        Case::new(Bridge, "DELETE on a ticket", Method::DELETE, &ticket_path, 405, "method_not_allowed")
            .token(&pharmacist),
        Case::new(Bridge, "POST on the sync endpoint", Method::POST, "/sync", 405, "method_not_allowed"),
        Case::new(Auth, "GET on the token endpoint", Method::GET, "/oauth/token", 405, "method_not_allowed"),
        // No such endpoint.
        Case::new(Edge, "an unknown path", Method::GET, "/nowhere", 404, "not_found"),
        Case::new(Bridge, "an unknown path", Method::GET, "/nowhere", 404, "not_found"),
        Case::new(Auth, "an unknown path", Method::GET, "/nowhere", 404, "not_found"),
        // Header limits.
        Case::new(Edge, "a huge header", Method::GET, "/healthz", 431, "headers_too_large").header("x-huge", &huge),
        Case::new(Bridge, "a huge header", Method::GET, "/healthz", 431, "headers_too_large").header("x-huge", &huge),
        Case::new(Auth, "a huge header", Method::GET, "/healthz", 431, "headers_too_large").header("x-huge", &huge),
        Case::new(Edge, "too many headers", Method::GET, "/healthz", 431, "headers_too_large").many_headers(too_many),
        Case::new(Bridge, "too many headers", Method::GET, "/healthz", 431, "headers_too_large")
            .many_headers(too_many),
        Case::new(Auth, "too many headers", Method::GET, "/healthz", 431, "headers_too_large").many_headers(too_many),
        // Body limits.
        Case::new(Edge, "a body over the limit", Method::POST, "/api/v1/tickets", 413, "body_too_large")
            .token(&nurse)
            .body("application/json", big_json.clone()),
        Case::new(Bridge, "a body over the limit", Method::POST, &format!("{ticket_path}/transitions"), 413, "body_too_large")
            .token(&pharmacist)
            .body("application/json", big_json),
        Case::new(Auth, "a form over the limit", Method::POST, "/oauth/token", 413, "body_too_large")
            .body("application/x-www-form-urlencoded", format!("grant_type=password&username={}", "u".repeat(64 * 1024))),
        // A path that is not UTF-8 once decoded.
        Case::new(Edge, "a path of bad bytes", Method::GET, "/api/v1/tickets/%FF%FE", 400, "invalid_ticket_id")
            .token(&nurse),
        Case::new(Bridge, "a path of bad bytes", Method::GET, "/api/v1/tickets/%FF%FE", 400, "invalid_ticket_id")
            .token(&pharmacist),
        // A sync request that is no WebSocket upgrade.
        Case::new(Bridge, "a plain GET of the sync endpoint", Method::GET, "/sync", 400, "websocket_upgrade_required")
            .token(&node),
        // Credentials of the wrong kind or role.
        Case::new(Edge, "HTTP Basic credentials", Method::GET, "/api/v1/tickets", 401, "unsupported_auth_scheme")
            .header("authorization", "Basic bi5va2Fmb3I6c2VjcmV0"),
        Case::new(Bridge, "HTTP Basic credentials", Method::GET, "/api/v1/queue", 401, "unsupported_auth_scheme")
            .header("authorization", "Basic bi5va2Fmb3I6c2VjcmV0"),
        Case::new(Edge, "no credentials", Method::GET, "/api/v1/tickets", 401, "missing_token"),
        Case::new(Edge, "a pharmacist at the ward's node", Method::GET, "/api/v1/tickets", 403, "forbidden_role")
            .token(&pharmacist),
        // The one rule for bodies: JSON that does not parse is 400
        // malformed_json; JSON of the wrong shape or types is 422 invalid_body.
        Case::new(Edge, "JSON cut short", Method::POST, "/api/v1/tickets", 400, "malformed_json")
            .token(&nurse)
            .body("application/json", r#"{"items": ["#),
        Case::new(Edge, "a string for a list", Method::POST, "/api/v1/tickets", 422, "invalid_body")
            .token(&nurse)
            .body("application/json", r#"{"items": "AMOX-500", "priority": "stat"}"#),
        Case::new(Edge, "a string for a number", Method::POST, "/api/v1/tickets", 422, "invalid_body")
            .token(&nurse)
            .body(
                "application/json",
                r#"{"items": [{"medication_code": "AMOX-500", "quantity": "20", "unit": "capsule"}], "priority": "stat"}"#,
            ),
        Case::new(Edge, "an unknown priority", Method::POST, "/api/v1/tickets", 422, "invalid_body")
            .token(&nurse)
            .body(
                "application/json",
                r#"{"items": [{"medication_code": "AMOX-500", "quantity": 20, "unit": "capsule"}], "priority": "soon"}"#,
            ),
        Case::new(Bridge, "a number for a status", Method::POST, &format!("{ticket_path}/transitions"), 422, "invalid_body")
            .token(&pharmacist)
            .body("application/json", r#"{"to": 3}"#),
        Case::new(Edge, "no JSON content type", Method::POST, "/api/v1/tickets", 415, "unsupported_media_type")
            .token(&nurse)
            .body("text/plain", "{}"),
    ];

    let client = reqwest::Client::new();
    let mut failures = Vec::new();
    for case in cases {
        let base = match case.service {
            Edge => edge.url(""),
            Bridge => bridge.url(""),
            Auth => auth.url(""),
        };
        let mut request = client.request(case.method.clone(), format!("{base}{}", case.path)).headers(case.headers);
        if let Some(token) = &case.token {
            request = request.bearer_auth(token);
        }
        if let Some((content_type, body)) = case.body {
            request = request.header("content-type", content_type).body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let is_json = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let allow = response.headers().get("allow").is_some();
        let text = response.text().await.unwrap();
        let body: Value = serde_json::from_str(&text).unwrap_or(json!({ "unparsed": text }));
        let outcome = code_of(case.service, &body);
        let ok = status == case.status && is_json && outcome.as_deref() == Ok(case.code) && (status != 405 || allow);
        if !ok {
            failures.push(format!(
                "{:?} {}: want {} {}, got {status} {outcome:?} (json: {is_json}, allow: {allow})",
                case.service, case.what, case.status, case.code
            ));
        }
    }
    assert!(failures.is_empty(), "refusals not as documented:\n{}", failures.join("\n"));
}

/// A text frame on the sync endpoint is a protocol violation, answered at
/// once with a binary `Error` and a close, not left to the heartbeat.
#[tokio::test]
async fn a_text_frame_on_the_sync_endpoint_ends_the_session_at_once() {
    let issuer = TestIssuer::new("key-1");
    let dir = tempfile::tempdir().unwrap();
    let bridge = BridgeProcess::start_bridge(dir.path(), "127.0.0.1:0", &issuer.jwks(), "");
    let mut request = bridge.url("/sync").replace("http://", "ws://").into_client_request().unwrap();
    let bearer = format!("Bearer {}", issuer.token(NODE, &["edge-node"], &[WARD]));
    request.headers_mut().insert("authorization", bearer.parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket.send(WsMessage::Text("hello?".into())).await.unwrap();
    let answer =
        tokio::time::timeout(Duration::from_secs(3), socket.next()).await.expect("an answer before the heartbeat");
    let Some(Ok(WsMessage::Binary(frame))) = answer else { panic!("{answer:?}") };
    let message = wire::decode(&frame, &WireLimits::default()).unwrap();
    assert!(matches!(message, Message::Error { code: ErrorCode::Malformed, .. }), "{message:?}");
    let closed = tokio::time::timeout(Duration::from_secs(3), socket.next()).await.expect("closed at once");
    assert!(matches!(closed, Some(Ok(WsMessage::Close(_))) | None | Some(Err(_))), "{closed:?}");
}
