//! The device API through the router, without a socket: happy paths, and
//! every kind of bad input answered with its documented status and code
//! while the database stays unchanged.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use edge_node::config::Config;
use edge_node::{AppState, open_state};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use service_kit::config::ServiceConfig;
use test_fixtures::TestIssuer;
use test_fixtures::issuer::{hs256_with_public_key, tampered, unsigned_token};
use tower::ServiceExt;

const WARD: &str = "ward-4b";

type Snapshot = (Vec<(String, String, Vec<u8>)>, Vec<(i64, Vec<u8>)>);

struct Node {
    state: AppState,
    issuer: TestIssuer,
    _dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let issuer = TestIssuer::new("key-1");
        std::fs::write(dir.path().join("jwks.json"), issuer.jwks().to_string()).unwrap();
        let toml = test_fixtures::process::edge_config(dir.path(), "edge-ward-4b", WARD, "")
            .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:0\"\nbody_bytes_max = 4096");
        let config = Config::from_toml(&toml).unwrap();
        Node { state: open_state(config).unwrap(), issuer, _dir: dir }
    }

    fn router(&self) -> Router {
        edge_node::api::router(self.state.clone())
    }

    async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Body>) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = match body {
            Some(body) => request.header(header::CONTENT_TYPE, "application/json").body(body).unwrap(),
            None => request.body(Body::empty()).unwrap(),
        };
        let response = self.router().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn json(&self, method: &str, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(method, path, Some(token), Some(Body::from(body.to_string()))).await
    }

    /// Everything stored: tickets with their documents, and the outbox.
    async fn snapshot(&self) -> Snapshot {
        self.state
            .store
            .read(|conn| {
                let mut tickets = conn.prepare("SELECT id, ticket, document FROM tickets ORDER BY id")?;
                let tickets =
                    tickets.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?;
                let mut outbox = conn.prepare("SELECT seq, change FROM outbox ORDER BY seq")?;
                let outbox = outbox.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
                Ok((tickets, outbox))
            })
            .await
            .unwrap()
    }
}

fn request_body(priority: &str) -> Value {
    json!({
        "items": [{ "medication_code": "AMOX-500", "description": "Amoxicillin 500 mg", "quantity": 20, "unit": "capsule" }],
        "priority": priority,
        "notes": "Bed 12."
    })
}

#[tokio::test]
async fn a_ward_creates_edits_lists_and_cancels_tickets() {
    let node = Node::new();
    let nurse = node.issuer.nurse(WARD);
    let (status, routine) = node.json("POST", "/api/v1/tickets", &nurse, request_body("routine")).await;
    assert_eq!(status, StatusCode::CREATED, "{routine}");
    assert_eq!(routine["status"], "requested");
    assert_eq!(routine["requested_by"], "n.okafor");
    assert_eq!(routine["requested_on"], "edge-ward-4b");
    let (_, stat) = node.json("POST", "/api/v1/tickets", &nurse, request_body("stat")).await;
    let (_, urgent) = node.json("POST", "/api/v1/tickets", &nurse, request_body("urgent")).await;

    // Priority first (stat, urgent, routine), then age; two per page.
    let (status, page) = node.call("GET", "/api/v1/tickets?limit=2", Some(&nurse), None).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&Value> = page["tickets"].as_array().unwrap().iter().map(|t| &t["id"]).collect();
    assert_eq!(ids, [&stat["id"], &urgent["id"]]);
    let next = page["next_page"].as_str().unwrap();
    let (_, page) = node.call("GET", &format!("/api/v1/tickets?limit=2&page={next}"), Some(&nurse), None).await;
    assert_eq!(page["tickets"][0]["id"], routine["id"]);
    assert_eq!(page["next_page"], Value::Null);
    let (_, filtered) = node.call("GET", "/api/v1/tickets?priority=stat,urgent", Some(&nurse), None).await;
    assert_eq!(filtered["tickets"].as_array().unwrap().len(), 2);

    let id = routine["id"].as_str().unwrap();
    let edit = json!({ "notes": { "append": "ALLERGY: PENICILLIN" }, "priority": "asap" });
    let (status, edited) = node.json("PATCH", &format!("/api/v1/tickets/{id}"), &nurse, edit).await;
    assert_eq!(status, StatusCode::OK, "{edited}");
    assert_eq!(edited["notes"], "Bed 12.\nALLERGY: PENICILLIN");
    assert_eq!(edited["priority"], "asap");

    let cancel = json!({ "to": "cancelled", "reason": "patient discharged" });
    let (status, cancelled) = node.json("POST", &format!("/api/v1/tickets/{id}/transitions"), &nurse, cancel).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["status_reason"], "patient discharged");

    let (status, one) = node.call("GET", &format!("/api/v1/tickets/{id}"), Some(&nurse), None).await;
    assert_eq!(status, StatusCode::OK);
    let actions: Vec<&str> =
        one["history"].as_array().unwrap().iter().map(|h| h["action"]["kind"].as_str().unwrap()).collect();
    assert_eq!(actions, ["create", "edit", "transition"]);
    assert_eq!(one["history"][2]["user"], "n.okafor");
    assert_eq!(one["history"][2]["device"], "edge-ward-4b");

    let (_, sync) = node.call("GET", "/api/v1/sync", Some(&nurse), None).await;
    assert_eq!(sync["outbox"]["pending"], 5, "every local change waits for the cloud");
}

#[tokio::test]
async fn live_subscribers_see_changes() {
    let node = Node::new();
    let nurse = node.issuer.nurse(WARD);
    let request = Request::get("/api/v1/events")
        .header(header::AUTHORIZATION, format!("Bearer {nurse}"))
        .body(Body::empty())
        .unwrap();
    let response = node.router().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let (_, created) = node.json("POST", "/api/v1/tickets", &nurse, request_body("stat")).await;
    let frame = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame()).await.unwrap().unwrap().unwrap();
    let text = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
    assert!(text.starts_with("event: ticket\n"), "{text}");
    assert!(text.contains(created["id"].as_str().unwrap()), "{text}");
}

/// One bad request and what it must be answered with.
struct Case {
    name: &'static str,
    method: &'static str,
    path: String,
    token: Option<String>,
    body: Option<Value>,
    status: StatusCode,
    code: &'static str,
}

#[tokio::test]
async fn bad_input_is_refused_with_its_code_and_changes_nothing() {
    let node = Node::new();
    let nurse = node.issuer.nurse(WARD);
    let admin = node.issuer.token("a.admin", &["admin"], &[WARD]);
    let (_, existing) = node.json("POST", "/api/v1/tickets", &nurse, request_body("routine")).await;
    let id = existing["id"].as_str().unwrap().to_owned();
    let before = node.snapshot().await;

    let claims = node.issuer.claims("n.okafor", &["nurse"], &[WARD]);
    let mut expired = claims.clone();
    expired["exp"] = json!(1_000_000);
    let mut wrong_audience = claims.clone();
    wrong_audience["aud"] = json!("another-system");
    let same_kid_other_key = TestIssuer::new("key-1");
    let unknown_kid = TestIssuer::new("key-9");
    let other_ward_ticket = sync_protocol::ids::TicketId::new(1, [9; 10]).to_string();
    let with = |change: &dyn Fn(&mut Value)| {
        let mut body = request_body("routine");
        change(&mut body);
        Some(body)
    };
    let create = |name, token: Option<&str>, body: Option<Value>, status, code| Case {
        name,
        method: "POST",
        path: "/api/v1/tickets".into(),
        token: token.map(String::from),
        body,
        status,
        code,
    };
    let unauthorized =
        |name, token: String, code| create(name, Some(&token), with(&|_| {}), StatusCode::UNAUTHORIZED, code);
    let invalid = |name, change: &dyn Fn(&mut Value), code| {
        create(name, Some(&nurse), with(change), StatusCode::UNPROCESSABLE_ENTITY, code)
    };
    let get = |name, path: String, status, code| Case {
        name,
        method: "GET",
        path,
        token: Some(nurse.clone()),
        body: None,
        status,
        code,
    };
    let on_ticket = |name, method, path: String, token: &str, body: Value, status, code| Case {
        name,
        method,
        path,
        token: Some(token.to_owned()),
        body: Some(body),
        status,
        code,
    };
    let cases = vec![
        invalid("wrong type", &|v| v["items"][0]["quantity"] = json!("ten"), "invalid_body"),
        invalid("unknown field", &|v| v["colour"] = json!("red"), "invalid_body"),
        invalid("empty items", &|v| v["items"] = json!([]), "empty_items"),
        invalid("zero quantity", &|v| v["items"][0]["quantity"] = json!(0), "quantity_zero"),
        invalid("negative quantity", &|v| v["items"][0]["quantity"] = json!(-3), "invalid_body"),
        invalid("quantity over the maximum", &|v| v["items"][0]["quantity"] = json!(10_001), "quantity_over_max"),
        invalid(
            "malformed medication code",
            &|v| v["items"][0]["medication_code"] = json!("amox 500"),
            "malformed_medication_code",
        ),
        invalid("unknown priority", &|v| v["priority"] = json!("whenever"), "invalid_body"),
        create(
            "oversized body",
            Some(&nurse),
            with(&|v| v["notes"] = json!("x".repeat(5_000))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        create("no token", None, with(&|_| {}), StatusCode::UNAUTHORIZED, "missing_token"),
        unauthorized("expired token", node.issuer.sign(&expired), "token_expired"),
        unauthorized("forged token", same_kid_other_key.sign(&claims), "invalid_token"),
        unauthorized("alg=none token", unsigned_token(&claims), "invalid_token"),
        unauthorized("hs256 keyed with the public key", hs256_with_public_key(&node.issuer, &claims), "invalid_token"),
        unauthorized("tampered payload", tampered(&nurse), "invalid_token"),
        unauthorized("unknown kid", unknown_kid.sign(&claims), "invalid_token"),
        unauthorized("wrong audience", node.issuer.sign(&wrong_audience), "invalid_token"),
        create(
            "token of another ward",
            Some(&node.issuer.nurse("icu-2")),
            with(&|_| {}),
            StatusCode::FORBIDDEN,
            "wrong_ward",
        ),
        create(
            "pharmacist at the ward api",
            Some(&node.issuer.token("p.lindqvist", &["pharmacist"], &[WARD])),
            with(&|_| {}),
            StatusCode::FORBIDDEN,
            "forbidden_role",
        ),
        on_ticket(
            "illegal transition for the role",
            "POST",
            format!("/api/v1/tickets/{id}/transitions"),
            &nurse,
            json!({ "to": "acknowledged" }),
            StatusCode::CONFLICT,
            "illegal_transition",
        ),
        on_ticket(
            "entered-in-error without a reason",
            "POST",
            format!("/api/v1/tickets/{id}/transitions"),
            &admin,
            json!({ "to": "entered-in-error" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "reason_required",
        ),
        on_ticket(
            "empty edit",
            "PATCH",
            format!("/api/v1/tickets/{id}"),
            &nurse,
            json!({}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "empty_edit",
        ),
        on_ticket(
            "a nurse assigning a ticket",
            "PATCH",
            format!("/api/v1/tickets/{id}"),
            &nurse,
            json!({ "assignee": "n.okafor" }),
            StatusCode::FORBIDDEN,
            "forbidden_role",
        ),
        on_ticket(
            "edit of another ward's ticket",
            "PATCH",
            format!("/api/v1/tickets/{other_ward_ticket}"),
            &nurse,
            json!({ "priority": "stat" }),
            StatusCode::NOT_FOUND,
            "ticket_not_found",
        ),
        get(
            "another ward's ticket",
            format!("/api/v1/tickets/{other_ward_ticket}"),
            StatusCode::NOT_FOUND,
            "ticket_not_found",
        ),
        get("not a ticket id", "/api/v1/tickets/12".into(), StatusCode::BAD_REQUEST, "invalid_ticket_id"),
        get("unknown status filter", "/api/v1/tickets?status=lost".into(), StatusCode::BAD_REQUEST, "invalid_status"),
        get("limit out of range", "/api/v1/tickets?limit=0".into(), StatusCode::BAD_REQUEST, "invalid_limit"),
        get("bad page token", "/api/v1/tickets?page=zzz".into(), StatusCode::BAD_REQUEST, "invalid_page"),
        get("unknown query parameter", "/api/v1/tickets?sort=name".into(), StatusCode::BAD_REQUEST, "invalid_query"),
    ];
    for case in cases {
        let body = case.body.map(|b| Body::from(b.to_string()));
        let (status, got) = node.call(case.method, &case.path, case.token.as_deref(), body).await;
        assert_eq!((status, got["error"]["code"].as_str()), (case.status, Some(case.code)), "{}: {got}", case.name);
        assert!(got["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}: no message", case.name);
    }
    let malformed = node.call("POST", "/api/v1/tickets", Some(&nurse), Some(Body::from("{\"items\": ["))).await;
    assert_eq!((malformed.0, malformed.1["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("malformed_json")));
    let no_content_type = Request::post("/api/v1/tickets")
        .header(header::AUTHORIZATION, format!("Bearer {nurse}"))
        .body(Body::from(request_body("stat").to_string()))
        .unwrap();
    assert_eq!(node.router().oneshot(no_content_type).await.unwrap().status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    assert!(node.snapshot().await == before, "a refused request changed the database");
}

#[tokio::test]
async fn health_readiness_and_metrics_answer_without_a_token() {
    let node = Node::new();
    assert_eq!(node.call("GET", "/healthz", None, None).await.0, StatusCode::OK);
    assert_eq!(node.call("GET", "/readyz", None, None).await.0, StatusCode::OK);
    let nurse = node.issuer.nurse(WARD);
    node.json("POST", "/api/v1/tickets", &nurse, request_body("stat")).await;
    let response = node.router().oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
    let text = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.contains("edge_outbox_pending"), "{text}");
    assert!(text.contains("edge_http_requests_total"), "{text}");
}
