//! Sync between real processes: an edge node of a ward and the cloud bridge.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use test_fixtures::{BridgeProcess, EdgeNodeProcess, TestIssuer, free_port, get_json, wait_for};

const WARD: &str = "ward-4b";
const NODE: &str = "edge-ward-4b";

fn offline_tickets() -> usize {
    std::env::var("E2E_OFFLINE_TICKETS").ok().and_then(|n| n.parse().ok()).unwrap_or(10_000)
}

fn ticket(n: usize) -> Value {
    json!({
        "items": [{ "medication_code": format!("MED-{}", n % 997), "quantity": 1 + n % 40, "unit": "ampoule" }],
        "priority": if n.is_multiple_of(10) { "stat" } else { "routine" },
        "notes": format!("offline ticket {n}"),
    })
}

struct Site {
    issuer: TestIssuer,
    edge: EdgeNodeProcess,
    bridge_port: u16,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Site {
    /// An edge node configured to sync with a bridge that is not running yet.
    fn new() -> Self {
        let issuer = TestIssuer::new("key-1");
        let (edge_dir, bridge_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let bridge_port = free_port();
        std::fs::write(edge_dir.path().join("node-token"), issuer.token(NODE, &["edge-node"], &[WARD])).unwrap();
        let sync = format!(
            "[sync]\nbridge_url = \"ws://127.0.0.1:{bridge_port}/sync\"\nreconnect_base_ms = 100\nreconnect_cap_ms = 1000\n"
        );
        let edge = EdgeNodeProcess::start(edge_dir.path(), NODE, WARD, &issuer.jwks(), &sync);
        Site { issuer, edge, bridge_port, _dirs: (edge_dir, bridge_dir) }
    }

    fn start_bridge(&self) -> BridgeProcess {
        BridgeProcess::start_bridge(
            self._dirs.1.path(),
            &format!("127.0.0.1:{}", self.bridge_port),
            &self.issuer.jwks(),
            "",
        )
    }

    fn pharmacist(&self) -> String {
        self.issuer.token("p.lindqvist", &["pharmacist"], &[])
    }

    /// The edge node of another ward, icu-2, syncing with the same bridge.
    fn other_ward(&self, dir: &std::path::Path) -> EdgeNodeProcess {
        std::fs::write(dir.join("node-token"), self.issuer.token("edge-icu-2", &["edge-node"], &["icu-2"])).unwrap();
        let sync = format!(
            "[sync]\nbridge_url = \"ws://127.0.0.1:{}/sync\"\nreconnect_base_ms = 100\nreconnect_cap_ms = 1000\n",
            self.bridge_port
        );
        EdgeNodeProcess::start(dir, "edge-icu-2", "icu-2", &self.issuer.jwks(), &sync)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offline_backlog_arrives_exactly_once_and_the_pharmacy_reaches_the_ward_live() {
    let site = Site::new();
    let client = reqwest::Client::new();
    let nurse = site.issuer.nurse(WARD);
    let count = offline_tickets();
    // A second ward works offline too, beside the first.
    let icu_dir = tempfile::tempdir().unwrap();
    let icu = site.other_ward(icu_dir.path());
    let icu_nurse = site.issuer.nurse("icu-2");
    let mut icu_ids = Vec::new();
    for n in 0..20 {
        let response =
            client.post(icu.url("/api/v1/tickets")).bearer_auth(&icu_nurse).json(&ticket(n)).send().await.unwrap();
        assert_eq!(response.status(), 201);
        icu_ids.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }

    // The ward works with no cloud.
    let created = Instant::now();
    let mut lanes = Vec::new();
    for lane in 0..16 {
        let (client, nurse, url) = (client.clone(), nurse.clone(), site.edge.url("/api/v1/tickets"));
        lanes.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in (lane..count).step_by(16) {
                let response = client.post(&url).bearer_auth(&nurse).json(&ticket(n)).send().await.unwrap();
                assert_eq!(response.status(), 201);
                ids.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for lane in lanes {
        ids.extend(lane.await.unwrap());
    }
    eprintln!("{count} tickets created offline in {:?}", created.elapsed());
    // Some are edited while still offline: the bridge then receives a
    // ticket's creation and its later edits in one batch.
    let edited: Vec<&String> = ids.iter().step_by(50).collect();
    for id in &edited {
        let edit = json!({ "notes": { "append": "ALLERGY: PENICILLIN" }, "priority": "asap" });
        let url = site.edge.url(&format!("/api/v1/tickets/{id}"));
        let response = client.patch(&url).bearer_auth(&nurse).json(&edit).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let status: Value = get_json(&client, site.edge.url("/api/v1/sync"), &nurse).await;
    assert_eq!(
        (status["connected"].as_bool(), status["outbox"]["pending"].as_u64()),
        (Some(false), Some((count + edited.len()) as u64)),
        "{status}"
    );

    // The bridge comes up; the backlog flows.
    let bridge = site.start_bridge();
    let started = Instant::now();
    let pharmacist = site.pharmacist();
    let queue_url = bridge.url(&format!("/api/v1/queue?ward={WARD}&limit=1"));
    wait_for("the backlog at the bridge", Duration::from_secs(300), async || {
        let queue: Value = get_json(&client, &queue_url, &pharmacist).await;
        queue["total"].as_u64() == Some(count as u64)
    })
    .await;
    eprintln!("backlog of {count} queryable at the bridge {:?} after it started", started.elapsed());
    wait_for("the edge outbox to drain", Duration::from_secs(60), async || {
        let status: Value = get_json(&client, site.edge.url("/api/v1/sync"), &nurse).await;
        status["outbox"]["pending"] == 0 && status["connected"] == true
    })
    .await;
    let nodes: Value = get_json(&client, bridge.url("/api/v1/nodes"), &pharmacist).await;
    assert_eq!(nodes[0]["rejected"], 0, "{nodes}");
    // Each ward's tickets reached the pharmacy, and no ward got the other's.
    let icu_queue = bridge.url("/api/v1/queue?ward=icu-2&limit=1");
    wait_for("icu-2's tickets at the bridge", Duration::from_secs(60), async || {
        let queue: Value = get_json(&client, &icu_queue, &pharmacist).await;
        queue["total"] == 20
    })
    .await;
    let icu_list: Value = get_json(&client, icu.url("/api/v1/tickets?limit=200"), &icu_nurse).await;
    assert_eq!(icu_list["tickets"].as_array().unwrap().len(), 20, "icu-2 holds its own tickets only");
    let other = client.get(site.edge.url(&format!("/api/v1/tickets/{}", icu_ids[0]))).bearer_auth(&nurse).send().await;
    assert_eq!(other.unwrap().status(), 404, "ward-4b never received an icu-2 ticket");
    // The same tickets on both sides, field for field: a sample (every
    // 97th) and every ticket edited offline.
    for id in ids.iter().step_by(97).chain(edited.iter().copied()) {
        let at_edge: Value = get_json(&client, site.edge.url(&format!("/api/v1/tickets/{id}")), &nurse).await;
        let at_bridge: Value = get_json(&client, bridge.url(&format!("/api/v1/tickets/{id}")), &pharmacist).await;
        assert_eq!(at_edge["ticket"], at_bridge["ticket"], "ticket {id} differs");
    }

    // A ward device watches live while the pharmacy works a ticket.
    let events = client.get(site.edge.url("/api/v1/events")).bearer_auth(&nurse).send().await.unwrap();
    let mut events = events.bytes_stream();
    let id = &ids[0];
    for to in ["acknowledged", "picking", "dispatched"] {
        let url = bridge.url(&format!("/api/v1/tickets/{id}/transitions"));
        let response = client.post(&url).bearer_auth(&pharmacist).json(&json!({ "to": to })).send().await.unwrap();
        assert_eq!(response.status(), 200, "{to}: {}", response.text().await.unwrap());
    }
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        let mut text = String::new();
        while let Some(chunk) = events.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if text.contains(id.as_str()) && text.contains("\"status\":\"dispatched\"") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(seen, Ok(true), "the ward's live feed did not show the dispatch");
    // And the ward confirms receipt, which reaches the pharmacy's live feed.
    let pharmacy_events =
        client.get(bridge.url(&format!("/api/v1/events?ward={WARD}"))).bearer_auth(&pharmacist).send().await.unwrap();
    assert_eq!(pharmacy_events.status(), 200);
    let mut pharmacy_events = pharmacy_events.bytes_stream();
    let receipt = client
        .post(site.edge.url(&format!("/api/v1/tickets/{id}/transitions")))
        .bearer_auth(&nurse)
        .json(&json!({ "to": "delivered" }))
        .send()
        .await
        .unwrap();
    assert_eq!(receipt.status(), 200);
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        let mut text = String::new();
        while let Some(chunk) = pharmacy_events.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if text.contains(id.as_str()) && text.contains("\"status\":\"delivered\"") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(seen, Ok(true), "the pharmacy's live feed did not show the receipt");
}

/// Speaks the wire protocol directly, as a node of `ward` would.
/// A sync session opened by hand: the hello sent in a frame of protocol
/// version `version`, and the bridge's answer.
async fn raw_session(
    port: u16,
    token: &str,
    node: &str,
    ward: &str,
    version: u16,
) -> (
    futures_util::stream::SplitSink<
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
        tokio_tungstenite::tungstenite::Message,
    >,
    futures_util::stream::SplitStream<
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    >,
    sync_protocol::wire::Message,
) {
    use futures_util::SinkExt;
    use sync_protocol::wire::{self, DatabaseId, Hello, Message, PROTOCOL_VERSION, WireLimits};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://127.0.0.1:{port}/sync").into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let (mut sink, mut stream) = socket.split();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        node: node.parse().unwrap(),
        ward: ward.parse().unwrap(),
        token: token.into(),
        cursor: None,
        limits: WireLimits::default(),
        database: DatabaseId([7; 16]),
        lease: None,
    };
    let mut frame = wire::encode(&Message::Hello(hello), &WireLimits::default()).unwrap();
    frame[2..4].copy_from_slice(&version.to_be_bytes()); // the header: magic, then the version
    sink.send(tokio_tungstenite::tungstenite::Message::Binary(frame.into())).await.unwrap();
    let answer = next_message(&mut stream).await;
    (sink, stream, answer)
}

async fn next_message(
    stream: &mut futures_util::stream::SplitStream<
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    >,
) -> sync_protocol::wire::Message {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap().unwrap().unwrap();
        if let tokio_tungstenite::tungstenite::Message::Binary(bytes) = frame {
            return sync_protocol::wire::decode(&bytes, &sync_protocol::wire::WireLimits::default()).unwrap();
        }
    }
}

#[tokio::test]
async fn a_node_cannot_sync_for_another_ward() {
    use futures_util::SinkExt;
    use sync_protocol::wire::{self, Message, PROTOCOL_VERSION, RefusalReason, UpstreamChange, WireLimits};
    let site = Site::new();
    let bridge = site.start_bridge();
    let other = site.issuer.token("edge-icu-2", &["edge-node"], &["icu-2"]);

    // Hello for a ward the token does not cover.
    let (_, _, answer) = raw_session(site.bridge_port, &other, "edge-icu-2", WARD, PROTOCOL_VERSION).await;
    assert!(matches!(&answer, Message::Refused(r) if r.reason == RefusalReason::Forbidden), "{answer:?}");

    // Its own ward, but a change that creates a ticket of ward-4b.
    let (mut sink, mut stream, answer) =
        raw_session(site.bridge_port, &other, "edge-icu-2", "icu-2", PROTOCOL_VERSION).await;
    assert!(matches!(answer, Message::Welcome(_)), "{answer:?}");
    let actor = sync_protocol::ticket::Actor {
        user: "n.okafor".parse().unwrap(),
        role: sync_protocol::ids::Role::Nurse,
        device: "edge-icu-2".parse().unwrap(),
        offline_login: false,
    };
    let new: sync_protocol::ticket::NewTicket = serde_json::from_value(ticket(1)).unwrap();
    let id = sync_protocol::ids::TicketId::new(1_764_000_000_000, [3; 10]);
    let created = sync_protocol::document::TicketDocument::create(
        id,
        &WARD.parse().unwrap(),
        &new,
        &actor,
        1_764_000_000_000,
        &Default::default(),
        automerge::ActorId::random(),
    )
    .unwrap();
    let upstream = Message::Upstream {
        changes: vec![UpstreamChange { seq: 1, ticket: id, change: serde_bytes::ByteBuf::from(created.change) }],
    };
    sink.send(tokio_tungstenite::tungstenite::Message::Binary(
        wire::encode(&upstream, &WireLimits::default()).unwrap().into(),
    ))
    .await
    .unwrap();
    let answer = next_message(&mut stream).await;
    assert!(
        matches!(&answer, Message::Rejected { seq: 1, message, .. } if message.contains("another ward")),
        "{answer:?}"
    );
    assert_eq!(next_message(&mut stream).await, Message::Ack { up_to_seq: 1 });
    let client = reqwest::Client::new();
    let found =
        client.get(bridge.url(&format!("/api/v1/tickets/{id}"))).bearer_auth(site.pharmacist()).send().await.unwrap();
    assert_eq!(found.status(), 404, "the rejected ticket was not stored");
}

/// The rule for an edge node left on the previous release while the cloud
/// is upgraded: the bridge refuses its hello, saying what to upgrade (the
/// node then retries no faster than its reconnect cap, serves its ward
/// offline and keeps its outbox: `a_version_mismatch_is_refused_and_not_retried`).
#[tokio::test]
async fn an_edge_of_the_previous_protocol_is_told_to_upgrade() {
    use sync_protocol::wire::{Message, PROTOCOL_VERSION, RefusalReason};
    let site = Site::new();
    let _bridge = site.start_bridge();
    let token = site.issuer.token(NODE, &["edge-node"], &[WARD]);
    let (_, _, answer) = raw_session(site.bridge_port, &token, NODE, WARD, PROTOCOL_VERSION - 1).await;
    let Message::Refused(refused) = answer else { panic!("{answer:?}") };
    assert!(matches!(refused.reason, RefusalReason::VersionMismatch { .. }), "{refused:?}");
    assert!(
        refused.detail.contains("upgrade required") && refused.detail.contains("upgrade the edge node"),
        "{refused:?}"
    );
}

/// The catalogue a pharmacy admin keeps in the cloud reaches the ward's
/// edge, where devices look codes up and lines are checked against it with
/// the cloud out of reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_formulary_reaches_the_ward_and_checks_offline_orders() {
    let issuer = TestIssuer::new("key-1");
    let (edge_dir, bridge_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let bridge_port = free_port();
    let mut bridge =
        BridgeProcess::start_bridge(bridge_dir.path(), &format!("127.0.0.1:{bridge_port}"), &issuer.jwks(), "");
    let client = reqwest::Client::new();
    let admin = issuer.token("a.haddad", &["admin"], &[]);
    for (code, name, unit) in
        [("AMOX-500", "Amoxicillin 500 mg", "capsule"), ("NACL-09", "Sodium chloride 0.9%", "bag")]
    {
        let entry = json!({ "code": code, "name": name, "unit": unit, "active": true });
        let url = bridge.url(&format!("/api/v1/formulary/{code}"));
        assert_eq!(client.put(url).bearer_auth(&admin).json(&entry).send().await.unwrap().status(), 201);
    }
    std::fs::write(edge_dir.path().join("node-token"), issuer.token(NODE, &["edge-node"], &[WARD])).unwrap();
    let sync = format!(
        "[sync]\nbridge_url = \"ws://127.0.0.1:{bridge_port}/sync\"\nreconnect_base_ms = 100\nreconnect_cap_ms = 1000\nformulary_refresh_s = 10\n"
    );
    let edge = EdgeNodeProcess::start(edge_dir.path(), NODE, WARD, &issuer.jwks(), &sync);
    let nurse = issuer.nurse(WARD);
    wait_for("the catalogue at the edge", Duration::from_secs(30), async || {
        get_json(&client, edge.url("/api/v1/formulary"), &nurse).await["entries"].as_array().map(Vec::len) == Some(2)
    })
    .await;

    bridge.kill9(); // the cloud is out of reach from here on
    let found = get_json(&client, edge.url("/api/v1/formulary?q=chloride"), &nurse).await;
    assert_eq!(found["entries"][0]["code"], "NACL-09", "{found}");
    assert!(found["synced_at_utc"].as_str().is_some_and(|at| at.ends_with('Z')), "{found}");
    let order = |code: &str, unit: &str| json!({ "items": [{ "medication_code": code, "quantity": 2, "unit": unit }], "priority": "routine" });
    let cases = [
        (order("AMOX-500", "capsule"), 201, None),
        (order("AMOX-250", "capsule"), 422, Some("unknown_medication")),
        (order("NACL-09", "vial"), 422, Some("wrong_unit")),
    ];
    for (body, status, code) in cases {
        let response = client.post(edge.url("/api/v1/tickets")).bearer_auth(&nurse).json(&body).send().await.unwrap();
        let got = response.status().as_u16();
        let answer: Value = response.json().await.unwrap();
        assert_eq!((got, answer["error"]["code"].as_str()), (status, code), "{body}: {answer}");
    }
}

#[tokio::test]
async fn a_node_token_cannot_reach_another_ward() {
    let site = Site::new();
    let bridge = site.start_bridge();
    let client = reqwest::Client::new();
    // Another ward's node token at the pharmacy API, and at the sync endpoint for this ward.
    let other_node = site.issuer.token("edge-icu-2", &["edge-node"], &["icu-2"]);
    let queue = client.get(bridge.url("/api/v1/queue")).bearer_auth(&other_node).send().await.unwrap();
    assert_eq!(queue.status(), 403);
    let nurse_of_other_ward = site.issuer.nurse("icu-2");
    let edge = client.get(site.edge.url("/api/v1/tickets")).bearer_auth(&nurse_of_other_ward).send().await.unwrap();
    assert_eq!(edge.status(), 403);
}

/// A TCP proxy on loopback whose connections the test can cut at will, or
/// hold down (a partition: connections refused until it is lifted).
struct CuttableProxy {
    port: u16,
    cut: tokio::sync::watch::Sender<u64>,
    down: Arc<AtomicBool>,
}

impl CuttableProxy {
    async fn start(target_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let down = Arc::new(AtomicBool::new(false));
        let partitioned = Arc::clone(&down);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if partitioned.load(Ordering::SeqCst) {
                    continue; // dropped: the peer sees its connection reset
                }
                let mut cuts = cuts.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    cuts.mark_unchanged();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {} // dropping both ends cuts the link mid-whatever
                    }
                });
            }
        });
        CuttableProxy { port, cut, down }
    }

    fn cut_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Cuts every link and refuses new ones until [`Self::heal`].
    fn partition(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cut_all();
    }

    fn heal(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// The ward's edge node, syncing through this proxy, reconnecting fast;
    /// `extra` is more configuration after its `[sync]` section.
    fn edge(&self, dir: &std::path::Path, issuer: &TestIssuer, extra: &str) -> EdgeNodeProcess {
        std::fs::write(dir.join("node-token"), issuer.token(NODE, &["edge-node"], &[WARD])).unwrap();
        let sync = format!(
            "[sync]\nbridge_url = \"ws://127.0.0.1:{}/sync\"\nreconnect_base_ms = 50\nreconnect_cap_ms = 500\n{extra}",
            self.port
        );
        EdgeNodeProcess::start(dir, NODE, WARD, &issuer.jwks(), &sync)
    }
}

/// A ward and the bridge with a link the test can partition, and one
/// ticket of the ward that the bridge holds.
struct Partitioned {
    proxy: CuttableProxy,
    edge: EdgeNodeProcess,
    /// Runs until the test ends; reached through `at_bridge`.
    _bridge: BridgeProcess,
    client: reqwest::Client,
    nurse: String,
    pharmacist: String,
    at_edge: String,
    at_bridge: String,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Partitioned {
    async fn start() -> Self {
        let issuer = TestIssuer::new("key-1");
        let (edge_dir, bridge_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let bridge_port = free_port();
        let proxy = CuttableProxy::start(bridge_port).await;
        let edge = proxy.edge(edge_dir.path(), &issuer, "");
        let bridge =
            BridgeProcess::start_bridge(bridge_dir.path(), &format!("127.0.0.1:{bridge_port}"), &issuer.jwks(), "");
        let client = reqwest::Client::new();
        let (nurse, pharmacist) = (issuer.nurse(WARD), issuer.token("p.lindqvist", &["pharmacist"], &[]));
        let new = json!({
            "items": [{ "medication_code": "AMOX-500", "quantity": 20, "unit": "capsule" }],
            "priority": "urgent",
            "notes": "Bed 4, post-op.",
        });
        let response = client.post(edge.url("/api/v1/tickets")).bearer_auth(&nurse).json(&new).send().await.unwrap();
        assert_eq!(response.status(), 201);
        let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
        let (at_edge, at_bridge) =
            (edge.url(&format!("/api/v1/tickets/{id}")), bridge.url(&format!("/api/v1/tickets/{id}")));
        wait_for("the ticket at the bridge", Duration::from_secs(30), async || {
            client.get(&at_bridge).bearer_auth(&pharmacist).send().await.unwrap().status() == 200
        })
        .await;
        let _dirs = (edge_dir, bridge_dir);
        Partitioned { proxy, edge, _bridge: bridge, client, nurse, pharmacist, at_edge, at_bridge, _dirs }
    }

    /// The bridge's queue URL.
    fn bridge_queue(&self) -> String {
        let base = self.at_bridge.split("/api/v1/").next().unwrap_or_default();
        format!("{base}/api/v1/queue")
    }

    async fn partition(&self) {
        self.proxy.partition();
        wait_for("the edge to see the link down", Duration::from_secs(10), async || {
            get_json(&self.client, self.edge.url("/api/v1/sync"), &self.nurse).await["connected"] == false
        })
        .await;
    }

    /// Heals the link and waits until both sides show the same ticket and history.
    async fn heal(&self) -> Value {
        self.proxy.heal();
        wait_for("both sides to agree", Duration::from_secs(30), async || {
            let at_edge = get_json(&self.client, &self.at_edge, &self.nurse).await;
            let at_bridge = get_json(&self.client, &self.at_bridge, &self.pharmacist).await;
            at_edge["ticket"] == at_bridge["ticket"] && at_edge["history"] == at_bridge["history"]
        })
        .await;
        get_json(&self.client, &self.at_edge, &self.nurse).await["ticket"].clone()
    }

    async fn at_edge(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let url = format!("{}{path}", self.at_edge);
        let response = self.client.request(method, url).bearer_auth(&self.nurse).json(&body).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn at_bridge(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let url = format!("{}{path}", self.at_bridge);
        let response = self.client.request(method, url).bearer_auth(&self.pharmacist).json(&body).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }
}

/// The case the notes' character-level merge exists for, over HTTP: during
/// a partition a nurse appends an allergy at the ward while a pharmacist
/// appends to the same notes (and takes the ticket) at the bridge; after
/// the link heals both texts are on both sides and the tickets are equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn penicillin_over_http_both_notes_survive_a_partition() {
    use reqwest::Method;
    let site = Partitioned::start().await;
    site.partition().await;
    let (status, _) = site.at_edge(Method::PATCH, "", json!({ "notes": { "append": "ALLERGY: PENICILLIN" } })).await;
    assert_eq!(status, 200);
    let pharmacy_edit =
        json!({ "notes": { "append": "Pharmacy: amoxicillin held, calling the ward." }, "assignee": "p.lindqvist" });
    let (status, answer) = site.at_bridge(Method::PATCH, "", pharmacy_edit).await;
    assert_eq!(status, 200, "{answer}");
    let edge_notes = get_json(&site.client, &site.at_edge, &site.nurse).await["ticket"]["notes"].clone();
    assert_eq!(edge_notes, "Bed 4, post-op.\nALLERGY: PENICILLIN", "the partition held");

    let ticket = site.heal().await;
    let notes = ticket["notes"].as_str().unwrap();
    for line in ["Bed 4, post-op.", "ALLERGY: PENICILLIN", "Pharmacy: amoxicillin held, calling the ward."] {
        assert_eq!(notes.matches(line).count(), 1, "{line:?} once in {notes:?}");
    }
    assert_eq!(ticket["assignee"], "p.lindqvist");
}

/// The ward doubles a quantity while cut off, as the pharmacy starts
/// picking: after the link heals both sides show one order conflict naming
/// both, with their reasons; a resolution with a reason clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offline_order_edit_concurrent_with_picking_is_a_conflict_for_a_person() {
    use reqwest::Method;
    let site = Partitioned::start().await;
    site.partition().await;
    let edit = json!({
        "items": [{ "medication_code": "AMOX-500", "quantity": 40, "unit": "capsule" }],
        "reason": "dose doubled by Dr Berg",
    });
    assert_eq!(site.at_edge(Method::PATCH, "", edit).await.0, 200);
    let pick = json!({ "to": "picking", "reason": "bench 2" });
    assert_eq!(site.at_bridge(Method::POST, "/transitions", pick).await.0, 200);

    let ticket = site.heal().await;
    assert_eq!((ticket["status"].as_str(), ticket["items"][0]["quantity"].as_u64()), (Some("picking"), Some(40)));
    let conflicts = ticket["order_conflicts"].as_array().unwrap();
    assert_eq!(conflicts.len(), 1, "{ticket}");
    let (edit, progress) = (&conflicts[0]["edit"], &conflicts[0]["progress"]);
    assert_eq!((edit["user"].as_str(), edit["reason"].as_str()), (Some("n.okafor"), Some("dose doubled by Dr Berg")));
    assert_eq!((progress["user"].as_str(), progress["reason"].as_str()), (Some("p.lindqvist"), Some("bench 2")));

    let change = edit["change"].as_str().unwrap();
    let (status, answer) =
        site.at_bridge(Method::POST, "/transitions", json!({ "to": "picking", "resolves": [change] })).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (422, Some("reason_required")), "{answer}");
    let resolve = json!({ "to": "picking", "resolves": [change], "reason": "re-picking 40" });
    assert_eq!(site.at_bridge(Method::POST, "/transitions", resolve).await.0, 200);
    wait_for("the resolution at the ward", Duration::from_secs(30), async || {
        let at_edge = get_json(&site.client, &site.at_edge, &site.nurse).await;
        at_edge["ticket"]["order_conflicts"] == json!([])
    })
    .await;
}

/// The pharmacy supplies one line as a substitute and part of another (the
/// rest backordered), dispatches; the ward receives one line short with a
/// note and the other from a scanned GS1 string, and confirms delivery. Edge
/// and bridge then show the same ticket, supply, receipt and trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partial_supply_substitute_backorder_and_receipt_cross_the_link() {
    use reqwest::Method;
    let site = Partitioned::start().await;
    let order = json!({ "items": [
        { "medication_code": "AMOX-500", "quantity": 20, "unit": "capsule" },
        { "medication_code": "NACL-09", "quantity": 4, "unit": "bag" },
    ] });
    assert_eq!(site.at_edge(Method::PATCH, "", order).await.0, 200);
    wait_for("the order at the bridge", Duration::from_secs(30), async || {
        get_json(&site.client, &site.at_bridge, &site.pharmacist).await["ticket"]["items"].as_array().map(Vec::len)
            == Some(2)
    })
    .await;
    assert_eq!(site.at_bridge(Method::POST, "/transitions", json!({ "to": "picking" })).await.0, 200);
    let supply = json!({ "supply": [
        { "medication_code": "AMOX-500", "quantity": 20,
          "substitute": { "medication_code": "CLAR-250", "description": "Clarithromycin 250 mg", "reason": "penicillin allergy" } },
        { "medication_code": "NACL-09", "quantity": 2, "shortfall": "backorder" },
    ] });
    let (status, answer) = site.at_bridge(Method::PATCH, "", supply).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(site.at_bridge(Method::POST, "/transitions", json!({ "to": "dispatched" })).await.0, 200);
    wait_for("the dispatch at the ward", Duration::from_secs(30), async || {
        get_json(&site.client, &site.at_edge, &site.nurse).await["ticket"]["status"] == "dispatched"
    })
    .await;

    let line = |gs1: &str| json!({ "receipt": [{ "medication_code": "NACL-09", "quantity": 2, "gs1": gs1 }] });
    let refusals = [
        (line("(01)09506000134353(17)280131(10)S1"), "gs1_check_digit"),
        (line("(01)09506000134352(17)240131(10)S1"), "expired_product"),
        (line("(01)09506000134352(10)S1"), "gs1_missing_identifier"),
    ];
    for (body, code) in refusals {
        let (status, answer) = site.at_edge(Method::PATCH, "", body).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (422, Some(code)), "{answer}");
    }
    let receipt = json!({ "receipt": [
        { "medication_code": "AMOX-500", "quantity": 19, "discrepancy": "damaged", "note": "one blister crushed",
          "lot": "C-2231", "expiry": "2027-09-30" },
        { "medication_code": "NACL-09", "quantity": 2, "gs1": "]C1010950600013435217280100\u{1d}10S-0912" },
    ] });
    let (status, answer) = site.at_edge(Method::PATCH, "", receipt).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(site.at_edge(Method::POST, "/transitions", json!({ "to": "delivered" })).await.0, 200);

    let ticket = site.heal().await;
    assert_eq!(ticket["status"], "delivered");
    let backordered = get_json(&site.client, format!("{}?backorder=open", site.bridge_queue()), &site.pharmacist).await;
    assert_eq!(backordered["total"], 1, "delivered, and still owed a line: {backordered}");
    assert_eq!(ticket["supply"][0]["substitute"]["medication_code"], "CLAR-250");
    assert_eq!(ticket["supply"][1]["shortfall"], "backorder", "open until filled or closed");
    let received = &ticket["receipt"];
    assert_eq!((received[0]["discrepancy"].as_str(), received[0]["quantity"].as_u64()), (Some("damaged"), Some(19)));
    assert_eq!((received[1]["lot"].as_str(), received[1]["expiry"].as_str()), (Some("S-0912"), Some("2028-01-31")));
    assert_eq!(received[1]["gtin"], "09506000134352");
    let history = get_json(&site.client, &site.at_bridge, &site.pharmacist).await["history"].clone();
    let fields: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|entry| entry["changes"].as_array().unwrap())
        .filter_map(|change| change["field"].as_str())
        .collect();
    assert_eq!(fields.iter().filter(|f| ["supply", "receipt"].contains(f)).count(), 4, "{fields:?}");

    // The FHIR export: a Task, a SupplyRequest per line, a SupplyDelivery per
    // supplied line, each valid against HL7's R4 definitions.
    let bundle = get_json(&site.client, format!("{}/fhir", site.at_bridge), &site.pharmacist).await;
    let kinds: Vec<&str> =
        bundle["entry"].as_array().unwrap().iter().filter_map(|e| e["resource"]["resourceType"].as_str()).collect();
    assert_eq!(kinds, ["Task", "SupplyRequest", "SupplyRequest", "SupplyDelivery", "SupplyDelivery"]);
    test_fixtures::fhir::validate_r4(&bundle).unwrap_or_else(|issues| panic!("{issues}\n{bundle:#}"));
    let mut broken = bundle.clone();
    broken["entry"][0]["resource"].as_object_mut().unwrap().remove("intent"); // 1..1 in R4
    broken["entry"][3]["resource"]["suppliedItem"]["quantity"]["value"] = json!("twenty");
    let issues = test_fixtures::fhir::validate_r4(&broken).expect_err("the validator refuses what R4 does not allow");
    assert!(issues.contains("intent") && issues.contains("quantity"), "{issues}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_links_and_a_killed_bridge_lose_and_duplicate_nothing() {
    let issuer = TestIssuer::new("key-1");
    let (edge_dir, bridge_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let bridge_port = free_port();
    let proxy = CuttableProxy::start(bridge_port).await;
    // Small batches, so a cut lands mid-backlog many times.
    let edge = proxy.edge(edge_dir.path(), &issuer, "[sync.session.limits]\nchanges_per_batch_max = 50\n");
    // No pooled connections: the bridge is killed and restarted on the same
    // port, and a request on a connection to the dead process would fail.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let nurse = issuer.nurse(WARD);
    let pharmacist = issuer.token("p.lindqvist", &["pharmacist"], &[]);
    let count = offline_tickets().min(3_000);
    let mut ids = Vec::new();
    for n in 0..count {
        let response =
            client.post(edge.url("/api/v1/tickets")).bearer_auth(&nurse).json(&ticket(n)).send().await.unwrap();
        ids.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }

    let mut bridge =
        BridgeProcess::start_bridge(bridge_dir.path(), &format!("127.0.0.1:{bridge_port}"), &issuer.jwks(), "");
    // Chaos while the backlog flows: cut every link now and then, and kill
    // the bridge once, hard, while batches are in flight.
    for round in 0..12 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        proxy.cut_all();
        if round == 5 {
            bridge.kill9();
            tokio::time::sleep(Duration::from_millis(200)).await;
            bridge.restart();
        }
        // The pharmacy works tickets that have arrived, through the cuts.
        let id = &ids[round * 7];
        let _ = client
            .post(bridge.url(&format!("/api/v1/tickets/{id}/transitions")))
            .bearer_auth(&pharmacist)
            .json(&json!({ "to": "acknowledged" }))
            .send()
            .await;
    }

    let queue_url = bridge.url(&format!("/api/v1/queue?ward={WARD}&limit=1"));
    let total = async || {
        let queue: Value = get_json(&client, &queue_url, &pharmacist).await;
        queue["total"].as_u64().unwrap_or(0)
    };
    eprintln!("{} of {count} tickets at the bridge when the chaos ended", total().await);
    wait_for("the backlog at the bridge", Duration::from_secs(300), async || total().await == count as u64).await;
    wait_for("the edge outbox to drain", Duration::from_secs(60), async || {
        let status: Value = get_json(&client, edge.url("/api/v1/sync"), &nurse).await;
        status["outbox"]["pending"] == 0
    })
    .await;
    let log = std::fs::read_to_string(edge_dir.path().join("edge-node.log")).unwrap();
    let drops = log.matches("sync link down").count();
    assert!(drops >= 6, "the links were cut while in use: {drops} drops seen by the edge");
    // Both sides converge on identical tickets: compare every one, allowing
    // the last pharmacy changes a moment to flow down.
    wait_for("both sides to agree on every ticket", Duration::from_secs(60), async || {
        for id in &ids {
            let at_edge: Value = get_json(&client, edge.url(&format!("/api/v1/tickets/{id}")), &nurse).await;
            let at_bridge: Value = get_json(&client, bridge.url(&format!("/api/v1/tickets/{id}")), &pharmacist).await;
            if at_edge["ticket"] != at_bridge["ticket"]
                || at_edge["history"].as_array().map(Vec::len) != at_bridge["history"].as_array().map(Vec::len)
            {
                return false;
            }
        }
        true
    })
    .await;
    let edge_list: Value = get_json(&client, edge.url("/api/v1/tickets?limit=1"), &nurse).await;
    assert!(edge_list["tickets"].as_array().is_some_and(|t| t.len() == 1));
    let nodes: Value = get_json(&client, bridge.url("/api/v1/nodes"), &pharmacist).await;
    assert_eq!(nodes[0]["rejected"], 0, "{nodes}");
}
