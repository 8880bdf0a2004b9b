//! The cloud bridge: the sync endpoint for edge nodes and the pharmacy API,
//! over the embedded store or the distributed one (Kafka, MongoDB, Redis),
//! and the projector of the distributed store. See ARCHITECTURE.md for the map.

pub mod api;
pub mod auth;
pub mod config;
pub mod store;
pub mod sync;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use automerge::ActorId;
use metrics_exporter_prometheus::PrometheusHandle;
use sync_protocol::token::{AuthError, Verifier};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::{DistributedStore, EmbeddedStore, Store, StoreError};

pub use crate::store::now_ms;

/// Writes (upstream batches, pharmacy writes) waiting for the writer.
const WRITE_QUEUE_MAX: usize = 1_024;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot load the token keys: {0}")]
    Keys(#[from] AuthError),
    #[error("http server failed: {0}")]
    Http(#[from] std::io::Error),
}

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
    let data_dir = &config.bridge.data_dir;
    std::fs::create_dir_all(data_dir)
        .map_err(|source| ServeError::DataDir { path: data_dir.display().to_string(), source })?;
    let verifier = config.auth.verifier(&config.bridge.data_dir)?;
    let store = match config.kafka {
        Some(_) => Store::Distributed(DistributedStore::open(&config, ActorId::random()).await?),
        None => Store::Embedded(EmbeddedStore::open(
            &config.database_path(),
            config.limits.clone(),
            ActorId::random(),
            WRITE_QUEUE_MAX,
        )?),
    };
    Ok(AppState {
        config: Arc::new(config),
        store: Arc::new(store),
        verifier: Arc::new(verifier),
        shutdown: CancellationToken::new(),
        metrics: service_kit::telemetry::prometheus(),
        sessions: Arc::default(),
    })
}

/// Serves until `shutdown` completes, then drains (at most
/// `http.shutdown_grace_ms`) and lets the store commit what is queued.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config
        .auth
        .fetch_jwks_if_missing(&config.bridge.data_dir)
        .await
        .map_err(|e| ServeError::Keys(AuthError::Jwks(e)))?;
    let state = open_state(config).await?;
    let grace = Duration::from_millis(state.config.http.shutdown_grace_ms);
    let address = listener.local_addr()?;
    let backend = match &*state.store {
        Store::Embedded(_) => "embedded",
        Store::Distributed(_) => "distributed",
    };
    tracing::info!(%address, bridge = %state.config.bridge.id, backend, "cloud bridge serving");
    service_kit::shutdown::cancel_when(state.shutdown.clone(), shutdown);
    state.config.auth.spawn_refresh(&state.config.bridge.data_dir, Arc::clone(&state.verifier), state.shutdown.clone());
    service_kit::shutdown::serve_until(listener, api::router(state.clone()), state.shutdown.clone(), grace).await?;
    state.store.close().await;
    tracing::info!("cloud bridge stopped");
    Ok(())
}

/// Runs the projector of the distributed store, with its health and
/// metrics on `listener`, until `shutdown` completes.
pub async fn project(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), store::distributed::projector::ProjectorError> {
    let stop = CancellationToken::new();
    service_kit::shutdown::cancel_when(stop.clone(), shutdown);
    let health = store::distributed::projector::Health::default();
    let address = listener.local_addr()?;
    tracing::info!(%address, "projector serving");
    let router = store::distributed::projector::router(health.clone(), service_kit::telemetry::prometheus());
    let grace = Duration::from_millis(config.http.shutdown_grace_ms);
    let server = tokio::spawn(service_kit::shutdown::serve_until(listener, router, stop.clone(), grace));
    let outcome = store::distributed::projector::run(&config, health, stop.clone()).await;
    stop.cancel();
    let _ = server.await;
    outcome
}
