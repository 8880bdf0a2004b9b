//! The pharmacy API through the router, without a socket.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use cloud_bridge::config::Config;
use cloud_bridge::{AppState, open_state};
use http_body_util::BodyExt;
use serde_bytes::ByteBuf;
use serde_json::{Value, json};
use service_kit::config::ServiceConfig;
use sync_protocol::document::TicketDocument;
use sync_protocol::ids::{Role, TicketId};
use sync_protocol::ticket::{Actor, NewTicket};
use sync_protocol::wire::UpstreamChange;
use test_fixtures::TestIssuer;
use tower::ServiceExt;

struct Bridge {
    state: AppState,
    issuer: TestIssuer,
    _dir: tempfile::TempDir,
}

impl Bridge {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let issuer = TestIssuer::new("key-1");
        std::fs::write(dir.path().join("jwks.json"), issuer.jwks().to_string()).unwrap();
        let config = Config::from_toml(&test_fixtures::process::bridge_config(dir.path(), "127.0.0.1:0", "")).unwrap();
        Bridge { state: open_state(config).await.unwrap(), issuer, _dir: dir }
    }

    async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = match body {
            Some(body) => {
                request.header(header::CONTENT_TYPE, "application/json").body(Body::from(body.to_owned())).unwrap()
            }
            None => request.body(Body::empty()).unwrap(),
        };
        let response = cloud_bridge::router(self.state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// A ticket of ward-4b as its edge node would send it.
    async fn ticket_from_the_ward(&self) -> TicketId {
        let nurse = Actor {
            user: "n.okafor".parse().unwrap(),
            role: Role::Nurse,
            device: "edge-ward-4b".parse().unwrap(),
            offline_login: false,
        };
        let new: NewTicket = serde_json::from_value(json!({ "items": [{ "medication_code": "AMOX-500", "quantity": 20, "unit": "capsule" }], "priority": "stat" })).unwrap();
        let id = TicketId::new(1_764_000_000_000, rand_bytes());
        let created = TicketDocument::create(
            id,
            &"ward-4b".parse().unwrap(),
            &new,
            &nurse,
            1_764_000_000_000,
            &Default::default(),
            automerge::ActorId::random(),
        )
        .unwrap();
        let change = UpstreamChange { seq: 1, ticket: id, change: ByteBuf::from(created.change) };
        let rejected = self
            .state
            .store
            .store_upstream("edge-ward-4b".parse().unwrap(), "ward-4b".parse().unwrap(), vec![change])
            .await
            .unwrap();
        assert!(rejected.is_empty(), "{rejected:?}");
        id
    }

    /// Tickets and logged changes, read from the embedded store's file.
    fn counts(&self) -> (i64, i64) {
        let conn = rusqlite::Connection::open(self.state.config.database_path()).unwrap();
        conn.query_row("SELECT (SELECT count(*) FROM tickets), (SELECT count(*) FROM changes)", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap()
    }
}

fn rand_bytes() -> [u8; 10] {
    std::array::from_fn(|i| (std::process::id() as u8).wrapping_add(i as u8))
}

#[tokio::test]
async fn the_pharmacy_works_a_ticket_and_exports_it() {
    let bridge = Bridge::new().await;
    let id = bridge.ticket_from_the_ward().await;
    let pharmacist = bridge.issuer.token("p.lindqvist", &["pharmacist"], &[]);
    let (status, queue) =
        bridge.call("GET", "/api/v1/queue?ward=ward-4b&status=requested", Some(&pharmacist), None).await;
    assert_eq!((status, queue["total"].as_u64()), (StatusCode::OK, Some(1)), "{queue}");
    let path = format!("/api/v1/tickets/{id}/transitions");
    let (status, ticket) = bridge.call("POST", &path, Some(&pharmacist), Some(r#"{"to":"acknowledged"}"#)).await;
    assert_eq!((status, ticket["status"].as_str()), (StatusCode::OK, Some("acknowledged")), "{ticket}");
    let (status, one) = bridge.call("GET", &format!("/api/v1/tickets/{id}"), Some(&pharmacist), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["history"][1]["device"], "bridge-1", "the pharmacy's change names the bridge as its device");
    let (status, fhir) = bridge.call("GET", &format!("/api/v1/tickets/{id}/fhir"), Some(&pharmacist), None).await;
    assert_eq!((status, fhir["resourceType"].as_str()), (StatusCode::OK, Some("Bundle")));
    assert_eq!(fhir["entry"][0]["resource"]["priority"], "stat");
    let (status, nodes) = bridge.call("GET", "/api/v1/nodes", Some(&pharmacist), None).await;
    assert_eq!(
        (status, nodes[0]["node"].as_str(), nodes[0]["acked_up_to"].as_u64()),
        (StatusCode::OK, Some("edge-ward-4b"), Some(1))
    );
    assert!(nodes[0]["last_seen_utc"].as_str().is_some_and(|at| at.ends_with('Z')), "{nodes}");
}

#[tokio::test]
async fn a_pharmacist_writes_notes_and_takes_a_ticket() {
    let bridge = Bridge::new().await;
    let id = bridge.ticket_from_the_ward().await;
    let pharmacist = bridge.issuer.token("p.lindqvist", &["pharmacist"], &[]);
    let path = format!("/api/v1/tickets/{id}");
    let take = r#"{"notes": {"append": "Checking stock at the satellite."}, "assignee": "p.lindqvist"}"#;
    let (status, ticket) = bridge.call("PATCH", &path, Some(&pharmacist), Some(take)).await;
    assert_eq!(status, StatusCode::OK, "{ticket}");
    assert_eq!(
        (ticket["notes"].as_str(), ticket["assignee"].as_str()),
        (Some("Checking stock at the satellite."), Some("p.lindqvist"))
    );
    let hand_over = r#"{"assignee": "a.haddad"}"#;
    let (status, ticket) = bridge.call("PATCH", &path, Some(&pharmacist), Some(hand_over)).await;
    assert_eq!((status, ticket["assignee"].as_str()), (StatusCode::OK, Some("a.haddad")), "{ticket}");
    let (_, view) = bridge.call("GET", &path, Some(&pharmacist), None).await;
    let edits: Vec<&Value> =
        view["history"].as_array().unwrap().iter().filter(|e| e["action"]["kind"] == "edit").collect();
    assert_eq!(edits.len(), 2, "{view}");
    assert_eq!((edits[1]["user"].as_str(), edits[1]["role"].as_str()), (Some("p.lindqvist"), Some("pharmacist")));
    // Releasing it and refusals of what is not the pharmacy's to change.
    let (status, ticket) = bridge.call("PATCH", &path, Some(&pharmacist), Some(r#"{"assignee": null}"#)).await;
    assert_eq!((status, &ticket["assignee"]), (StatusCode::OK, &Value::Null), "{ticket}");
    let order = r#"{"items": [{"medication_code": "AMOX-500", "quantity": 40, "unit": "capsule"}]}"#;
    let cases = [
        (order, StatusCode::FORBIDDEN, "forbidden_role"),
        (r#"{"priority": "routine"}"#, StatusCode::FORBIDDEN, "forbidden_role"),
        (r#"{"assignee": null}"#, StatusCode::UNPROCESSABLE_ENTITY, "empty_edit"),
        (r#"{"assignee": "not a user id!"}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
    ];
    for (body, status, code) in cases {
        let (got, answer) = bridge.call("PATCH", &path, Some(&pharmacist), Some(body)).await;
        assert_eq!((got, answer["error"]["code"].as_str()), (status, Some(code)), "{body}: {answer}");
    }
}

/// A ward that ordered offline against a catalogue it did not have: its
/// ticket is accepted (a nurse's order is never dropped) and the lines the
/// catalogue does not know, or counts in another unit, are flagged for the
/// pharmacy; nothing is flagged before a catalogue is loaded.
#[tokio::test]
async fn an_admin_keeps_the_formulary_and_the_pharmacy_sees_lines_it_flags() {
    let bridge = Bridge::new().await;
    let id = bridge.ticket_from_the_ward().await; // AMOX-500, 20 capsules
    let (admin, pharmacist) =
        (bridge.issuer.token("a.haddad", &["admin"], &[]), bridge.issuer.token("p.lindqvist", &["pharmacist"], &[]));
    let ticket = format!("/api/v1/tickets/{id}");
    let (status, view) = bridge.call("GET", &ticket, Some(&pharmacist), None).await;
    assert_eq!((status, &view["formulary_issues"]), (StatusCode::OK, &json!([])), "no catalogue, no flags");

    let entry = |code: &str, unit: &str, active: bool| {
        json!({ "code": code, "name": "Amoxicillin", "strength": "500 mg", "form": "capsule", "unit": unit,
                "gtins": ["09506000134352"], "active": active })
        .to_string()
    };
    let put = |code: &str| format!("/api/v1/formulary/{code}");
    let (status, _) =
        bridge.call("PUT", &put("AMOX-500"), Some(&admin), Some(&entry("AMOX-500", "tablet", true))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, view) = bridge.call("GET", &ticket, Some(&pharmacist), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        view["formulary_issues"],
        json!([{ "code": "wrong_unit", "medication_code": "AMOX-500", "expected": "tablet", "got": "capsule" }])
    );
    // Corrected, the line is clean; retired, it is flagged again.
    let (status, _) =
        bridge.call("PUT", &put("AMOX-500"), Some(&admin), Some(&entry("AMOX-500", "capsule", true))).await;
    assert_eq!(status, StatusCode::OK, "replaced");
    assert_eq!(bridge.call("GET", &ticket, Some(&pharmacist), None).await.1["formulary_issues"], json!([]));
    bridge.call("PUT", &put("AMOX-500"), Some(&admin), Some(&entry("AMOX-500", "capsule", false))).await;
    let issues = bridge.call("GET", &ticket, Some(&pharmacist), None).await.1["formulary_issues"].clone();
    assert_eq!(issues[0]["code"], "inactive_medication");
    // A code the catalogue lacks.
    bridge.call("PUT", &put("CLAR-250"), Some(&admin), Some(&entry("CLAR-250", "tablet", true))).await;
    let (_, list) = bridge.call("GET", "/api/v1/formulary", Some(&pharmacist), None).await;
    let codes: Vec<&str> = list.as_array().unwrap().iter().map(|m| m["code"].as_str().unwrap()).collect();
    assert_eq!(codes, ["AMOX-500", "CLAR-250"]);
    // An edge node keeps a copy: asked again with the ETag it holds, 304 until it changes.
    let node = bridge.issuer.token("edge-ward-4b", &["edge-node"], &["ward-4b"]);
    let fetch = async |etag: Option<&str>| {
        let mut request =
            Request::builder().uri("/api/v1/formulary").header(header::AUTHORIZATION, format!("Bearer {node}"));
        if let Some(etag) = etag {
            request = request.header(header::IF_NONE_MATCH, etag);
        }
        let response =
            cloud_bridge::router(bridge.state.clone()).oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
        (response.status(), response.headers()[header::ETAG].to_str().unwrap().to_owned())
    };
    let (status, etag) = fetch(None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetch(Some(&etag)).await, (StatusCode::NOT_MODIFIED, etag.clone()));
    bridge.call("PUT", &put("CLAR-250"), Some(&admin), Some(&entry("CLAR-250", "capsule", true))).await;
    assert_eq!(fetch(Some(&etag)).await.0, StatusCode::OK, "changed since");

    let refusals = [
        (put("CLAR-250"), &pharmacist, entry("CLAR-250", "tablet", true), StatusCode::FORBIDDEN, "forbidden_role"),
        (put("CLAR-500"), &admin, entry("CLAR-250", "tablet", true), StatusCode::UNPROCESSABLE_ENTITY, "code_mismatch"),
        (
            put("clar"),
            &admin,
            entry("clar", "tablet", true),
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed_medication_code",
        ),
        (put("CLAR-250"), &admin, entry("CLAR-250", "spoon", true), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
    ];
    for (path, token, body, status, code) in refusals {
        let (got, answer) = bridge.call("PUT", &path, Some(token), Some(&body)).await;
        assert_eq!((got, answer["error"]["code"].as_str()), (status, Some(code)), "{path} {body}: {answer}");
    }
}

/// After an upgrade that changed the ticket's JSON, the embedded store
/// rewrites the tickets it holds in the old shape when it opens, so the
/// queue shows every ticket alike.
#[tokio::test]
async fn the_embedded_store_rewrites_tickets_stored_in_the_previous_shape() {
    let bridge = Bridge::new().await;
    let id = bridge.ticket_from_the_ward().await;
    let old_shape = r#"{"id":"ID","ward":"ward-4b","items":[],"priority":"stat","status":"requested","status_reason":null,"requested_by":"n.okafor","requested_on":"edge-ward-4b","created_at":0,"updated_at":0,"notes":"","assignee":null,"conflicts":[]}"#
        .replace("ID", &id.to_string());
    {
        let conn = rusqlite::Connection::open(bridge.state.config.database_path()).unwrap();
        conn.execute("UPDATE tickets SET ticket = ?1", [&old_shape]).unwrap();
        conn.execute("DELETE FROM meta", []).unwrap();
    }
    bridge.state.store.close().await;
    let reopened = open_state((*bridge.state.config).clone()).await.unwrap();
    let pharmacist = bridge.issuer.token("p.lindqvist", &["pharmacist"], &[]);
    let request = Request::builder()
        .uri("/api/v1/queue")
        .header(header::AUTHORIZATION, format!("Bearer {pharmacist}"))
        .body(Body::empty())
        .unwrap();
    let response = cloud_bridge::router(reopened).oneshot(request).await.unwrap();
    let queue: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let ticket = &queue["tickets"][0];
    assert_eq!(
        (ticket["created_at_utc"].as_str(), ticket["items"][0]["quantity"].as_u64()),
        (Some("2025-11-24T16:00:00Z"), Some(20)),
        "{queue}"
    );
}

/// The raw body of a GET, for exports that are not JSON.
async fn text(bridge: &Bridge, path: &str, token: &str) -> (StatusCode, String, String) {
    let request = Request::builder()
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    let response = cloud_bridge::router(bridge.state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let content_type =
        response.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, content_type, String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test]
async fn an_auditor_exports_a_ticket_and_a_ward_as_json_lines_and_csv() {
    let bridge = Bridge::new().await;
    let id = bridge.ticket_from_the_ward().await;
    let pharmacist = bridge.issuer.token("p.lindqvist", &["pharmacist"], &[]);
    let path = format!("/api/v1/tickets/{id}");
    bridge.call("POST", &format!("{path}/transitions"), Some(&pharmacist), Some(r#"{"to":"acknowledged"}"#)).await;
    let note = r#"{"notes": {"append": "call bed 4"}, "assignee": "p.lindqvist"}"#;
    assert_eq!(bridge.call("PATCH", &path, Some(&pharmacist), Some(note)).await.0, StatusCode::OK);

    let (status, content_type, body) = text(&bridge, &format!("{path}/audit"), &pharmacist).await;
    assert_eq!((status, content_type.as_str()), (StatusCode::OK, "application/x-ndjson"));
    let lines: Vec<Value> = body.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{body}");
    assert_eq!(
        (lines[0]["ticket"].as_str(), lines[0]["ward"].as_str()),
        (Some(id.to_string().as_str()), Some("ward-4b"))
    );
    assert_eq!(lines[0]["at_utc"], "2025-11-24T16:00:00Z", "ISO 8601 UTC beside the milliseconds");
    assert_eq!(lines[2]["changes"][1], json!({ "field": "notes", "removed": "", "inserted": "call bed 4" }));

    // The ward over a range that holds only the creation, as CSV.
    let ward = "/api/v1/audit?ward=ward-4b&from=2025-11-24T00:00:00Z&to=2025-11-24T23:59:59Z&format=csv";
    let (status, content_type, body) = text(&bridge, ward, &pharmacist).await;
    assert_eq!((status, content_type.as_str()), (StatusCode::OK, "text/csv; charset=utf-8"), "{body}");
    let rows: Vec<&str> = body.lines().collect();
    assert!(rows[0].starts_with("ticket,ward,change,at_utc,at_ms,user,role,device"), "{body}");
    assert_eq!(rows.len(), 2, "the header and the creation: {body}");
    assert!(rows[1].contains(",n.okafor,nurse,edge-ward-4b,false,create,"), "{body}");
    // All of it: one row per value changed (notes, assignee), one per transition.
    let (_, _, body) = text(
        &bridge,
        "/api/v1/audit?ward=ward-4b&from=2025-01-01T00:00:00Z&to=2099-01-01T00:00:00Z&format=csv",
        &pharmacist,
    )
    .await;
    let fields: Vec<&str> = body.lines().skip(1).map(|row| row.split(',').nth(10).unwrap()).collect();
    assert_eq!(fields, ["", "status", "assignee", "notes"], "{body}");

    let refusals = [
        ("/api/v1/audit?ward=ward-4b&from=2025-11-24T00:00:00Z", "invalid_range"),
        ("/api/v1/audit?ward=ward-4b&from=yesterday&to=2025-11-24T00:00:00Z", "invalid_time"),
        ("/api/v1/audit?ward=ward-4b&from=2025-11-25T00:00:00Z&to=2025-11-24T00:00:00Z", "invalid_range"),
        ("/api/v1/audit?from=2025-11-24T00:00:00Z&to=2025-11-25T00:00:00Z", "invalid_ward"),
        ("/api/v1/audit?ward=ward-4b&from=2025-11-24T00:00:00Z&to=2025-11-25T00:00:00Z&format=xlsx", "invalid_format"),
    ];
    for (path, code) in refusals {
        let (status, answer) = bridge.call("GET", path, Some(&pharmacist), None).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{path}: {answer}"
        );
    }
    let nurse = bridge.issuer.nurse("ward-4b");
    assert_eq!(bridge.call("GET", &format!("{path}/audit"), Some(&nurse), None).await.0, StatusCode::FORBIDDEN);
}

/// A refused request: name, method, path, token, body, and the status and code answered.
type Case<'a> = (&'a str, &'a str, String, Option<&'a str>, Option<&'a str>, StatusCode, &'a str);

#[tokio::test]
async fn bad_requests_are_refused_with_their_code_and_change_nothing() {
    let bridge = Bridge::new().await;
    let id = bridge.ticket_from_the_ward().await;
    let before = bridge.counts();
    let pharmacist = bridge.issuer.token("p.lindqvist", &["pharmacist"], &[]);
    let nurse = bridge.issuer.nurse("ward-4b");
    let node = bridge.issuer.token("edge-ward-4b", &["edge-node"], &["ward-4b"]);
    let unknown = TicketId::new(1, [1; 10]);
    let transitions = format!("/api/v1/tickets/{id}/transitions");
    let cases: Vec<Case> = vec![
        ("no token", "GET", "/api/v1/queue".into(), None, None, StatusCode::UNAUTHORIZED, "missing_token"),
        ("a nurse", "GET", "/api/v1/queue".into(), Some(&nurse), None, StatusCode::FORBIDDEN, "forbidden_role"),
        ("an edge node", "GET", "/api/v1/queue".into(), Some(&node), None, StatusCode::FORBIDDEN, "forbidden_role"),
        (
            "limit out of range",
            "GET",
            "/api/v1/queue?limit=0".into(),
            Some(&pharmacist),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_limit",
        ),
        (
            "unknown status",
            "GET",
            "/api/v1/queue?status=lost".into(),
            Some(&pharmacist),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_status",
        ),
        (
            "unknown parameter",
            "GET",
            "/api/v1/queue?sort=age".into(),
            Some(&pharmacist),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "not a ticket id",
            "GET",
            "/api/v1/tickets/12".into(),
            Some(&pharmacist),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_ticket_id",
        ),
        (
            "unknown ticket",
            "GET",
            format!("/api/v1/tickets/{unknown}"),
            Some(&pharmacist),
            None,
            StatusCode::NOT_FOUND,
            "ticket_not_found",
        ),
        (
            "transition of an unknown ticket",
            "POST",
            format!("/api/v1/tickets/{unknown}/transitions"),
            Some(&pharmacist),
            Some(r#"{"to":"acknowledged"}"#),
            StatusCode::NOT_FOUND,
            "ticket_not_found",
        ),
        (
            "malformed json",
            "POST",
            transitions.clone(),
            Some(&pharmacist),
            Some(r#"{"to":"#),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "unknown status value",
            "POST",
            transitions.clone(),
            Some(&pharmacist),
            Some(r#"{"to":"lost"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            "reject without a reason",
            "POST",
            transitions.clone(),
            Some(&pharmacist),
            Some(r#"{"to":"rejected"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "reason_required",
        ),
        (
            "the ward's transition",
            "POST",
            transitions.clone(),
            Some(&pharmacist),
            Some(r#"{"to":"delivered"}"#),
            StatusCode::CONFLICT,
            "illegal_transition",
        ),
        (
            "a nurse transitioning",
            "POST",
            transitions.clone(),
            Some(&nurse),
            Some(r#"{"to":"cancelled"}"#),
            StatusCode::FORBIDDEN,
            "forbidden_role",
        ),
        (
            "a nurse editing at the bridge",
            "PATCH",
            format!("/api/v1/tickets/{id}"),
            Some(&nurse),
            Some(r#"{"notes":{"append":"x"}}"#),
            StatusCode::FORBIDDEN,
            "forbidden_role",
        ),
        ("sync without a token", "GET", "/sync".into(), None, None, StatusCode::UNAUTHORIZED, "missing_token"),
        ("sync with a nurse token", "GET", "/sync".into(), Some(&nurse), None, StatusCode::FORBIDDEN, "forbidden_role"),
    ];
    for (case, method, path, token, body, status, code) in cases {
        let (got, answer) = bridge.call(method, &path, token, body).await;
        assert_eq!((got, answer["error"]["code"].as_str()), (status, Some(code)), "{case}: {answer}");
    }
    assert_eq!(bridge.counts(), before, "a refused request changed the store");
}

#[tokio::test]
async fn forged_expired_and_foreign_tokens_are_refused() {
    use test_fixtures::issuer::{hs256_with_public_key, tampered, unsigned_token};
    let bridge = Bridge::new().await;
    let claims = bridge.issuer.claims("p.lindqvist", &["pharmacist"], &[]);
    let mut expired = claims.clone();
    expired["exp"] = json!(1_700_000_000);
    let mut wrong_audience = claims.clone();
    wrong_audience["aud"] = json!("another-service");
    let valid = bridge.issuer.sign(&claims);
    let cases = [
        ("expired", bridge.issuer.sign(&expired), "token_expired"),
        ("alg=none", unsigned_token(&claims), "invalid_token"),
        ("hs256 keyed with the public key", hs256_with_public_key(&bridge.issuer, &claims), "invalid_token"),
        ("tampered payload", tampered(&valid), "invalid_token"),
        ("unknown kid", TestIssuer::new("key-2").sign(&claims), "invalid_token"),
        ("same kid, another key", TestIssuer::new("key-1").sign(&claims), "invalid_token"),
        ("wrong audience", bridge.issuer.sign(&wrong_audience), "invalid_token"),
    ];
    for (case, token, code) in cases {
        let (status, body) = bridge.call("GET", "/api/v1/queue", Some(&token), None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some(code)), "{case}: {body}");
    }
    let (status, _) = bridge.call("GET", "/api/v1/queue", Some(&valid), None).await;
    assert_eq!(status, StatusCode::OK);
}
