//! The cloud bridge: the sync endpoint for edge nodes and the pharmacy API,
//! over the store `cloud-store` provides (embedded, or Kafka, MongoDB and
//! Redis). See ARCHITECTURE.md for the map.
//!
//! This crate owns the bridge's two HTTP edges and who may call them. It
//! must never decide a protocol question (the session machines in
//! `sync-protocol` do) or know how tickets are stored (`cloud-store` does).

pub mod api;
mod audit;
pub mod caller;
pub mod config;
pub mod sync;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use automerge::ActorId;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use cloud_store::Store;
use metrics_exporter_prometheus::PrometheusHandle;
use service_kit::http::{ApiError, api_refusals, log_refusals};
use service_kit::runtime::{ServeError, create_data_dir};
use sync_protocol::token::Verifier;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Clone, Debug)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub verifier: Arc<Verifier>,
    pub shutdown: CancellationToken,
    pub metrics: PrometheusHandle,
    /// The nodes with a sync session open on this instance.
    pub sessions: Arc<sync::OpenSessions>,
}

pub async fn open_state(config: Config) -> Result<AppState, ServeError> {
    create_data_dir(&config.bridge.data_dir)?;
    let verifier = config.auth.verifier(&config.bridge.data_dir)?;
    let store = Store::open(&config.backend, &config.store_options(), &config.database_path(), ActorId::random())
        .await
        .map_err(ServeError::store)?;
    Ok(AppState {
        config: Arc::new(config),
        store: Arc::new(store),
        verifier: Arc::new(verifier),
        shutdown: CancellationToken::new(),
        metrics: service_kit::telemetry::prometheus(),
        sessions: Arc::default(),
    })
}

/// Every route of the bridge: the pharmacy API under `/api/v1`, the sync
/// endpoint, health and metrics.
pub fn router(state: AppState) -> Router {
    Router::new()
        .nest("/api/v1", api::routes())
        .route("/sync", get(sync::upgrade))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(api::ready))
        .route("/metrics", get(|State(state): State<AppState>| std::future::ready(state.metrics.render())))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(axum::extract::DefaultBodyLimit::max(state.config.http.body_bytes_max))
        .layer(axum::middleware::from_fn(api_refusals))
        .layer(axum::middleware::from_fn(log_refusals))
        .with_state(state)
}

/// Serves until `shutdown` completes, then drains (at most
/// `http.shutdown_grace_ms`) and lets the store commit what is queued.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    create_data_dir(&config.bridge.data_dir)?;
    config.auth.fetch_jwks_if_missing(&config.bridge.data_dir).await?;
    let state = open_state(config).await?;
    let grace = Duration::from_millis(state.config.http.shutdown_grace_ms);
    let address = listener.local_addr()?;
    let backend = state.store.backend_name();
    tracing::info!(%address, bridge = %state.config.bridge.id, backend, "cloud bridge serving");
    service_kit::shutdown::cancel_when(state.shutdown.clone(), shutdown);
    state.config.auth.spawn_refresh(&state.config.bridge.data_dir, Arc::clone(&state.verifier), state.shutdown.clone());
    if let Some(requests) = state.store.renewal_requests() {
        tokio::spawn(Arc::clone(&state.sessions).follow_renewals(requests));
    }
    service_kit::shutdown::serve_until(listener, router(state.clone()), state.shutdown.clone(), grace).await?;
    state.store.close().await;
    tracing::info!("cloud bridge stopped");
    Ok(())
}
