//! Fixtures for tests that talk to real processes: a token issuer with real
//! Ed25519 keys, launchers for the service binaries, the services of the
//! distributed backend as the environment names them, a distributed
//! cloud, and FHIR R4 validation. A dev-dependency of the services' tests and of `tests/`; the
//! developer tools (`tools/`) start processes with it too.
//!
//! It must never be a dependency of a service's library or binary.

#[cfg(feature = "cloud")]
pub mod cloud;
pub mod fhir;
pub mod issuer;
pub mod process;
pub mod services;

pub use issuer::TestIssuer;
pub use process::{BridgeProcess, EdgeNodeProcess};
pub use services::Services;

use std::time::{Duration, Instant};

/// A free port on loopback for a process that will start later.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port on loopback");
    listener.local_addr().expect("a bound socket has an address").port()
}

/// Polls `check` every 100 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GETs `url` with `token` and returns the JSON body; panics (failing the
/// test) when the request fails or the body is not JSON.
pub async fn get_json(client: &reqwest::Client, url: impl reqwest::IntoUrl, token: &str) -> serde_json::Value {
    let response = client.get(url).bearer_auth(token).send().await.expect("the request is answered");
    response.json().await.expect("the answer is JSON")
}

/// `text` with one level of `#` taken off every line from `marker` on: an
/// example file's commented optional sections, switched on.
pub fn uncomment_from(text: &str, marker: &str) -> String {
    let (kept, commented) = text.split_at(text.find(marker).expect("the marker is in the text"));
    let uncommented: Vec<&str> =
        commented.lines().map(|line| line.strip_prefix("# ").unwrap_or(line.trim_start_matches('#'))).collect();
    format!("{kept}{}\n", uncommented.join("\n"))
}
