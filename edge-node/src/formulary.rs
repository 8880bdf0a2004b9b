//! The medication catalogue, fetched from the bridge while it is reachable
//! and kept in the node's database, so ward devices look codes up and lines
//! are checked against it when the cloud is out of reach.
//!
//! The bridge serves it at `/api/v1/formulary` (the sync URL's host, over
//! HTTP(S)) to the node's token, with an ETag: an unchanged catalogue costs
//! one small request per `sync.formulary_refresh_s`.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ETAG, IF_NONE_MATCH};
use sync_protocol::formulary::Medication;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::config::SyncConfig;
use crate::store::{self, Write};
use service_kit::clock::now_ms;

/// How long one fetch may take, the catalogue's transfer included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a fetch did not update the catalogue.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the bridge url {0:?} has no HTTP form")]
    Url(String),
    #[error("no node token: {0}")]
    Token(String),
    #[error("the bridge is not reachable: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the bridge answered {0}")]
    Status(StatusCode),
    #[error("an entry from the bridge is refused: {0}")]
    Invalid(String),
    #[error("the catalogue could not be stored: {0}")]
    Store(#[from] store::StoreError),
}

/// Keeps the node's copy of the catalogue fresh until `shutdown`.
pub async fn run(state: AppState, config: SyncConfig, shutdown: CancellationToken) {
    let client = match reqwest::Client::builder().timeout(FETCH_TIMEOUT).build() {
        Ok(client) => client,
        Err(error) => return tracing::error!(%error, "cannot build the catalogue's HTTP client"),
    };
    loop {
        match fetch_once(&state, &config, &client).await {
            Ok(Some(entries)) => tracing::debug!(entries, "catalogue fetched"),
            Ok(None) => tracing::debug!("catalogue unchanged"),
            Err(error) => tracing::warn!(%error, "catalogue not fetched; the copy held stays in use"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(config.formulary_refresh_s)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The catalogue's URL on the bridge whose sync endpoint is `bridge_url`.
pub fn catalogue_url(bridge_url: &str) -> Result<reqwest::Url, FetchError> {
    let mut url = reqwest::Url::parse(bridge_url).map_err(|_| FetchError::Url(bridge_url.to_owned()))?;
    let scheme = if url.scheme() == "wss" { "https" } else { "http" };
    url.set_scheme(scheme).map_err(|()| FetchError::Url(bridge_url.to_owned()))?;
    url.set_path("/api/v1/formulary");
    url.set_query(None);
    Ok(url)
}

/// Fetches the catalogue unless the bridge says the copy held is current;
/// the number of entries stored, or `None` when unchanged.
async fn fetch_once(
    state: &AppState,
    config: &SyncConfig,
    client: &reqwest::Client,
) -> Result<Option<usize>, FetchError> {
    let url = catalogue_url(&config.bridge_url)?;
    let token = state.cloud_auth.node_token(&config.token_file).await.map_err(|e| FetchError::Token(e.to_string()))?;
    let held = state.store.read(|conn| store::sync_state(conn, store::FORMULARY_ETAG_KEY)).await?;
    let mut request = client.get(url).bearer_auth(token);
    if let Some(etag) = held.and_then(|bytes| String::from_utf8(bytes).ok()) {
        request = request.header(IF_NONE_MATCH, etag);
    }
    let response = request.send().await?;
    match response.status() {
        StatusCode::NOT_MODIFIED => return Ok(None),
        StatusCode::OK => {}
        StatusCode::UNAUTHORIZED => {
            state.cloud_auth.forget_node_token().await;
            return Err(FetchError::Status(StatusCode::UNAUTHORIZED));
        }
        other => return Err(FetchError::Status(other)),
    }
    let etag = response.headers().get(ETAG).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let entries: Vec<Medication> = response.json().await?;
    for entry in &entries {
        entry.validate(&state.config.limits).map_err(|e| FetchError::Invalid(e.to_string()))?;
    }
    let count = entries.len();
    state.store.write_all(Write::ReplaceFormulary { entries, etag }, now_ms()).await?;
    Ok(Some(count))
}
