//! The auth service through its router, without a socket: every grant,
//! refresh rotation and reuse detection, revocation, introspection, key
//! rotation, rate limits and the staff credentials an edge node caches.
//! Each test runs on both stores: SQLite (embedded) and MongoDB with Redis
//! (distributed: the services `MEDSYNC_MONGODB_URI` and `MEDSYNC_REDIS_URL` name).
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use auth_service::store::{Account, AccountKind, AuthStore};
use auth_service::{self as auth, AuthServiceConfig, AuthState};
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http_body_util::BodyExt;
use serde_json::Value;
use service_kit::config::ServiceConfig;
use service_kit::secrets;
use sync_protocol::ids::Role;
use sync_protocol::token::{self, AuthError, TokenPolicy, Verifier};
use tower::ServiceExt;

const PASSWORD: &str = "ward four b night shift";
const EDGE_SECRET: &str = "edge-secret-for-tests-0123456789";

struct Service {
    state: AuthState,
    store: AuthStore,
    config: AuthServiceConfig,
    _dir: tempfile::TempDir,
}

/// Where a service under test keeps its data.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Embedded,
    /// MongoDB and Redis, in a namespace of the test's own.
    Distributed,
}

impl Service {
    /// The service on each store, with `requests_per_minute` token requests allowed.
    async fn each(requests_per_minute: u32) -> Vec<Service> {
        vec![
            Service::new(Backend::Embedded, requests_per_minute, None).await,
            Service::new(Backend::Distributed, requests_per_minute, None).await,
        ]
    }

    /// A service on `backend`; on the distributed one, in `namespace` if
    /// given (instances sharing it share accounts and rate limits).
    async fn new(backend: Backend, requests_per_minute: u32, namespace: Option<&str>) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let mut text = format!(
            "version = 1\nissuer = \"https://auth.test.invalid\"\naudience = \"medsync\"\ndata_dir = \"{}\"\n\
             [rate_limit]\ntoken_requests_per_minute = {requests_per_minute}\n[tokens]\nkey_publish_ahead_s = 0\n",
            dir.path().display()
        );
        let shared = namespace.is_some();
        if let Backend::Distributed = backend {
            let services = test_fixtures::Services::from_env();
            let namespace = namespace.map_or_else(|| test_fixtures::services::namespace("auth"), str::to_owned);
            text.push_str(&format!(
                "[mongodb]\nuri = \"{}\"\ndatabase = \"{namespace}\"\n[redis]\nurl = \"{}\"\nkey_prefix = \"{namespace}\"\n",
                services.mongodb_uri, services.redis_url
            ));
        }
        let config = AuthServiceConfig::from_toml(&text).unwrap();
        let store = auth::open_store(&config).await.unwrap();
        let accounts = [
            ("n.okafor", AccountKind::User, PASSWORD, vec![Role::Nurse], vec!["ward-4b"]),
            ("n.icu", AccountKind::User, PASSWORD, vec![Role::Nurse], vec!["icu-2"]),
            ("p.lindqvist", AccountKind::User, PASSWORD, vec![Role::Pharmacist], vec![]),
            ("edge-ward-4b", AccountKind::Client, EDGE_SECRET, vec![Role::EdgeNode], vec!["ward-4b"]),
        ];
        for (name, kind, secret, roles, wards) in accounts {
            let account = Account {
                name: name.into(),
                kind,
                secret_hash: secrets::hash_secret(secret).unwrap(),
                roles,
                wards: wards.into_iter().map(|w| w.parse().unwrap()).collect(),
            };
            match store.add_account(&account, 0).await {
                Ok(()) => {}
                // A second instance on a shared namespace finds them made.
                Err(auth_service::store::AuthStoreError::Exists(_)) if shared => {}
                Err(error) => panic!("{backend:?}: {error}"),
            }
        }
        Service { state: AuthState::new(config.clone(), store.clone()).unwrap(), store, config, _dir: dir }
    }

    async fn call(&self, method: &str, path: &str, headers: &[(&str, String)], form: &str) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        if method == "POST" {
            request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        let response =
            auth::router(self.state.clone()).oneshot(request.body(Body::from(form.to_owned())).unwrap()).await.unwrap();
        let status = response.status();
        if response.headers().contains_key(header::CACHE_CONTROL) && path.starts_with("/oauth/token") {
            assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        }
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn token(&self, form: &str) -> (StatusCode, Value) {
        self.call("POST", "/oauth/token", &[], form).await
    }

    async fn edge_token(&self) -> String {
        let (status, body) = self
            .token(&format!("grant_type=client_credentials&client_id=edge-ward-4b&client_secret={EDGE_SECRET}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    async fn login(&self, user: &str) -> Value {
        let (status, body) =
            self.token(&format!("grant_type=password&username={user}&password={}", encode(PASSWORD))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// A resource server's verifier, from the published JWKS and revocation list.
    async fn verifier(&self) -> Verifier {
        let (_, jwks) = self.call("GET", "/.well-known/jwks.json", &[], "").await;
        let policy = TokenPolicy {
            issuer: self.config.issuer.clone(),
            audience: self.config.audience.clone(),
            algorithms: vec![jsonwebtoken::Algorithm::EdDSA],
            leeway_s: 0,
        };
        let verifier = Verifier::new(&policy, &token::parse_jwks(&jwks.to_string()).unwrap()).unwrap();
        let (_, revoked) = self.call("GET", "/oauth/revocations", &[], "").await;
        verifier.replace_revoked(
            revoked["revoked"].as_array().unwrap().iter().map(|r| r["jti"].as_str().unwrap().to_owned()),
            revoked["disabled_accounts"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()),
        );
        verifier
    }
}

fn encode(text: &str) -> String {
    text.replace(' ', "+")
}

fn basic(id: &str, secret: &str) -> (&'static str, String) {
    ("authorization", format!("Basic {}", STANDARD.encode(format!("{id}:{secret}"))))
}

fn now() -> i64 {
    service_kit::clock::now_s()
}

#[tokio::test]
async fn client_credentials_give_an_edge_node_a_token_its_resource_servers_verify() {
    for service in Service::each(100).await {
        let token = service.edge_token().await;
        let principal = service.verifier().await.verify(&token, now()).unwrap();
        assert_eq!(principal.user.as_str(), "edge-ward-4b");
        assert_eq!(principal.roles, vec![Role::EdgeNode]);
        assert_eq!(principal.wards, vec!["ward-4b".parse().unwrap()]);
        // HTTP Basic works as well as the form.
        let (status, body) = service
            .call("POST", "/oauth/token", &[basic("edge-ward-4b", EDGE_SECRET)], "grant_type=client_credentials")
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.get("refresh_token").is_none(), "no refresh token for a client: {body}");

        for (case, form) in [
            ("wrong secret", "grant_type=client_credentials&client_id=edge-ward-4b&client_secret=nope"),
            ("unknown client", "grant_type=client_credentials&client_id=edge-ward-9&client_secret=nope"),
            (
                "a user as a client",
                &*format!("grant_type=client_credentials&client_id=n.okafor&client_secret={}", encode(PASSWORD)),
            ),
            ("no credentials", "grant_type=client_credentials"),
        ] {
            let (status, body) = service.token(form).await;
            assert_eq!(
                (status, body["error"].as_str()),
                (StatusCode::UNAUTHORIZED, Some("invalid_client")),
                "{case}: {body}"
            );
        }
    }
}

#[tokio::test]
async fn a_failed_password_login_does_not_tell_whether_the_user_exists() {
    for service in Service::each(100).await {
        let body = service.login("n.okafor").await;
        let principal = service.verifier().await.verify(body["access_token"].as_str().unwrap(), now()).unwrap();
        assert_eq!((principal.user.as_str(), principal.roles.as_slice()), ("n.okafor", [Role::Nurse].as_slice()));
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 300);

        let wrong_password = service.token("grant_type=password&username=n.okafor&password=guess").await;
        let unknown_user = service.token("grant_type=password&username=n.nobody&password=guess").await;
        assert_eq!(wrong_password.0, StatusCode::BAD_REQUEST);
        assert_eq!(wrong_password.1["error"], "invalid_grant");
        assert_eq!(wrong_password, unknown_user, "the answers must not differ");
    }
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_reused_one_revokes_its_family() {
    for service in Service::each(100).await {
        let first = service.login("n.okafor").await["refresh_token"].as_str().unwrap().to_owned();
        let (status, second) = service.token(&format!("grant_type=refresh_token&refresh_token={first}")).await;
        assert_eq!(status, StatusCode::OK, "{second}");
        let second = second["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(first, second, "rotated on use");

        // Someone replays the spent token: refused, and the live successor dies with it.
        let (status, body) = service.token(&format!("grant_type=refresh_token&refresh_token={first}")).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{body}");
        let (status, body) = service.token(&format!("grant_type=refresh_token&refresh_token={second}")).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{body}");
    }
}

#[tokio::test]
async fn revoked_tokens_are_listed_for_resource_servers_and_inactive_on_introspection() {
    for service in Service::each(100).await {
        let session = service.login("n.okafor").await;
        let access = session["access_token"].as_str().unwrap().to_owned();
        let refresh = session["refresh_token"].as_str().unwrap().to_owned();
        let edge = basic("edge-ward-4b", EDGE_SECRET);

        let (status, body) =
            service.call("POST", "/oauth/introspect", std::slice::from_ref(&edge), &format!("token={access}")).await;
        assert_eq!(
            (status, body["active"].as_bool(), body["sub"].as_str()),
            (StatusCode::OK, Some(true), Some("n.okafor"))
        );
        let (status, body) = service.call("POST", "/oauth/introspect", &[], &format!("token={access}")).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_client")), "{body}");

        assert_eq!(service.call("POST", "/oauth/revoke", &[], &format!("token={access}")).await.0, StatusCode::OK);
        assert_eq!(service.call("POST", "/oauth/revoke", &[], &format!("token={refresh}")).await.0, StatusCode::OK);
        assert_eq!(service.call("POST", "/oauth/revoke", &[], "token=never-issued").await.0, StatusCode::OK);

        assert!(matches!(service.verifier().await.verify(&access, now()), Err(AuthError::Revoked)));
        let (_, body) =
            service.call("POST", "/oauth/introspect", std::slice::from_ref(&edge), &format!("token={access}")).await;
        assert_eq!(body["active"], false);
        let (_, body) = service.call("POST", "/oauth/introspect", &[edge], &format!("token={refresh}")).await;
        assert_eq!(body["active"], false);
        let (status, _) = service.token(&format!("grant_type=refresh_token&refresh_token={refresh}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn a_disabled_account_gets_no_token_and_its_tokens_are_refused_everywhere() {
    for service in Service::each(100).await {
        let session = service.login("n.okafor").await;
        let (access, refresh) =
            (session["access_token"].as_str().unwrap().to_owned(), session["refresh_token"].as_str().unwrap());
        let node = service.edge_token().await;
        for name in ["n.okafor", "edge-ward-4b"] {
            assert!(service.store.disable_account(name, now()).await.unwrap(), "{name} exists");
        }
        assert!(!service.store.disable_account("nobody", now()).await.unwrap(), "no such account");
        assert!(service.store.disable_account("n.okafor", now()).await.unwrap(), "disabling twice is harmless");

        // Resource servers learn it from the revocation list: every token of
        // the account is refused, whatever its id.
        let (_, list) = service.call("GET", "/oauth/revocations", &[], "").await;
        assert_eq!(list["disabled_accounts"], serde_json::json!(["edge-ward-4b", "n.okafor"]), "{list}");
        let verifier = service.verifier().await;
        for token in [&access, &node] {
            let refused = verifier.verify(token, now());
            assert!(matches!(refused, Err(AuthError::AccountDisabled)), "{refused:?}");
        }
        assert_eq!(AuthError::AccountDisabled.code(), "account_disabled");
        let (status, _) = service.token(&format!("grant_type=refresh_token&refresh_token={refresh}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "its refresh tokens are revoked");
        let password = format!("grant_type=password&username=n.okafor&password={}", encode(PASSWORD));
        let (status, body) = service.token(&password).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{body}");
        let client = format!("grant_type=client_credentials&client_id=edge-ward-4b&client_secret={EDGE_SECRET}");
        let (status, body) = service.token(&client).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_client")), "{body}");
        // Nor can the nurse log in at the edge offline: its hash is gone from there.
        let staff = service.store.ward_staff(&"ward-4b".parse().unwrap()).await.unwrap();
        assert!(staff.is_empty(), "{staff:?}");
        let edge = basic("edge-ward-4b", EDGE_SECRET);
        let (_, body) = service.call("POST", "/oauth/introspect", &[edge], &format!("token={access}")).await;
        assert_eq!(body["error"], "invalid_client", "the disabled node cannot introspect either: {body}");
        service.login("p.lindqvist").await;
    }
}

#[tokio::test]
async fn a_rotated_key_signs_new_tokens_while_tokens_of_the_old_key_stay_valid() {
    for service in Service::each(100).await {
        let before = service.edge_token().await;
        let (new_kid, _) = service.store.add_key(now()).await.unwrap();
        // A key made in the same second as the first one starts a second later.
        tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
        let after = service.edge_token().await;
        assert_eq!(jsonwebtoken::decode_header(&after).unwrap().kid.as_deref(), Some(new_kid.as_str()));
        assert_ne!(jsonwebtoken::decode_header(&before).unwrap().kid, jsonwebtoken::decode_header(&after).unwrap().kid);
        let verifier = service.verifier().await;
        verifier.verify(&before, now()).unwrap();
        verifier.verify(&after, now()).unwrap();
    }
}

#[tokio::test]
async fn token_requests_are_rate_limited_per_user() {
    for service in Service::each(3).await {
        for _ in 0..3 {
            assert_eq!(
                service.token("grant_type=password&username=n.okafor&password=guess").await.0,
                StatusCode::BAD_REQUEST
            );
        }
        let (status, body) = service.token("grant_type=password&username=n.okafor&password=guess").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::TOO_MANY_REQUESTS, Some("too_many_requests")),
            "{body}"
        );
        // Another user is not held back by the first one's attempts.
        service.login("p.lindqvist").await;
    }
}

#[tokio::test]
async fn malformed_requests_get_rfc_6749_errors() {
    for service in Service::each(100).await {
        let cases = [
            ("no grant type", "username=n.okafor", "invalid_request"),
            ("unknown grant", "grant_type=authorization_code&code=x", "unsupported_grant_type"),
            ("password grant without password", "grant_type=password&username=n.okafor", "invalid_request"),
            ("a scope", "grant_type=password&username=n.okafor&password=x&scope=admin", "invalid_scope"),
            ("refresh without token", "grant_type=refresh_token", "invalid_request"),
        ];
        for (case, form, error) in cases {
            let (status, body) = service.token(form).await;
            assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some(error)), "{case}: {body}");
        }
        let request = Request::post("/oauth/token")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .unwrap();
        let response = auth::router(service.state.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn an_edge_node_gets_the_password_hashes_of_its_wards_staff_only() {
    for service in Service::each(100).await {
        let edge = ("authorization", format!("Bearer {}", service.edge_token().await));
        let (status, body) =
            service.call("GET", "/api/v1/wards/ward-4b/staff-credentials", std::slice::from_ref(&edge), "").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let staff = body["staff"].as_array().unwrap();
        assert_eq!(staff.len(), 1, "{body}");
        assert_eq!(staff[0]["username"], "n.okafor");
        assert!(secrets::verify_secret(PASSWORD, staff[0]["password_hash"].as_str().unwrap()));
        let (status, _) = service.call("GET", "/api/v1/wards/icu-2/staff-credentials", &[edge], "").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let nurse =
            ("authorization", format!("Bearer {}", service.login("n.okafor").await["access_token"].as_str().unwrap()));
        let (status, _) = service.call("GET", "/api/v1/wards/ward-4b/staff-credentials", &[nurse], "").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
}

#[tokio::test]
async fn the_metadata_names_the_endpoints() {
    for service in Service::each(100).await {
        let (status, body) = service.call("GET", "/.well-known/oauth-authorization-server", &[], "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["issuer"], "https://auth.test.invalid");
        assert_eq!(body["token_endpoint"], "https://auth.test.invalid/oauth/token");
        assert_eq!(body["jwks_uri"], "https://auth.test.invalid/.well-known/jwks.json");
    }
}

#[tokio::test]
async fn instances_sharing_redis_share_the_rate_limit() {
    let namespace = test_fixtures::services::namespace("auth-shared");
    let first = Service::new(Backend::Distributed, 3, Some(&namespace)).await;
    let second = Service::new(Backend::Distributed, 3, Some(&namespace)).await;
    let guess = "grant_type=password&username=n.okafor&password=guess";
    assert_eq!(first.token(guess).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(first.token(guess).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(second.token(guess).await.0, StatusCode::BAD_REQUEST);
    let (status, body) = second.token(guess).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("too_many_requests")), "{body}");
    // And what one instance issued, the other knows: a refresh token from
    // the second is spent at the first.
    let refresh = second.login("p.lindqvist").await["refresh_token"].as_str().unwrap().to_owned();
    let (status, body) = first.token(&format!("grant_type=refresh_token&refresh_token={refresh}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
