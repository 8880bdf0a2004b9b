//! The ward's edge node: an offline-first ticket server for the ward's
//! devices. See ARCHITECTURE.md for the map.
//!
//! This crate owns the ward's HTTP API, its SQLite store, backups and the
//! link to the bridge. It must never decide a protocol or lifecycle rule
//! (the core's session machines and lifecycle do) and never builds a
//! cloud client (MongoDB, Redis, Kafka): it runs on ward hardware alone.

pub mod api;
pub mod backup;
pub mod cloud_auth;
pub mod config;
pub mod formulary;
pub mod listener;
pub mod store;
pub mod sync;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use automerge::ActorId;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use service_kit::runtime::{ServeError, create_data_dir};
use sync_protocol::token::{AuthError, Verifier};

use crate::config::Config;
use crate::store::Store;

/// Shared by every request handler.
#[derive(Clone, Debug)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub verifier: Arc<Verifier>,
    pub metrics: PrometheusHandle,
    /// Cancelled when the node starts shutting down; ends live streams.
    pub shutdown: CancellationToken,
    /// The state of the link to the bridge, kept by the sync task.
    pub link: sync::SharedLinkStatus,
    pub cloud_auth: Arc<cloud_auth::CloudAuth>,
}

/// Opens the store and the key set of `config`.
pub fn open_state(config: Config) -> Result<AppState, ServeError> {
    create_data_dir(&config.node.data_dir)?;
    let verifier = config.auth.verifier(&config.node.data_dir).map_err(|error| {
        ServeError::Keys(AuthError::Jwks(format!("{error}; run `edge-node enrol` or place the JWKS there")))
    })?;
    let cloud_auth = cloud_auth::CloudAuth::open(&config, &verifier)?;
    let database = config.database().map_err(ServeError::store)?;
    if database.key.is_none() {
        tracing::warn!(path = %database.path.display(), "the database is not encrypted at rest: set storage.key_file");
    }
    // A fresh actor id per process: see ARCHITECTURE.md, "actor ids".
    let store =
        Store::open(&database, &config.storage, config.limits.clone(), ActorId::random()).map_err(ServeError::store)?;
    Ok(AppState {
        config: Arc::new(config),
        store: Arc::new(store),
        verifier: Arc::new(verifier),
        metrics: service_kit::telemetry::prometheus(),
        shutdown: CancellationToken::new(),
        link: sync::SharedLinkStatus::default(),
        cloud_auth: Arc::new(cloud_auth),
    })
}

/// Serves the node on `listener` until `shutdown` completes, then drains
/// in-flight requests (at most `http.shutdown_grace_ms`), lets the store
/// commit what is queued, and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Held while serving: a restore refuses to run under a live node.
    let _lock = backup::lock_data_dir(&config.node.data_dir).map_err(ServeError::store)?;
    let state = open_state(config)?;
    let grace = Duration::from_millis(state.config.http.shutdown_grace_ms);
    let listener = listener::LimitedListener::new(listener, state.config.http.connections_max);
    let address = axum::serve::Listener::local_addr(&listener)?;
    tracing::info!(%address, node = %state.config.node.id, ward = %state.config.node.ward, "edge node serving");
    service_kit::shutdown::cancel_when(state.shutdown.clone(), shutdown);
    let auth = &state.config.auth;
    auth.spawn_refresh(&state.config.node.data_dir, Arc::clone(&state.verifier), state.shutdown.clone());
    let token_file = state.config.sync.as_ref().map_or_else(config::default_token_file, |s| s.token_file.clone());
    state.cloud_auth.spawn_refresh(token_file, Duration::from_secs(auth.refresh_interval_s), state.shutdown.clone());
    let sync_tasks = state.config.sync.clone().map(|sync_config| {
        let catalogue = tokio::spawn(formulary::run(state.clone(), sync_config.clone(), state.shutdown.clone()));
        let link = tokio::spawn(sync::run(state.clone(), sync_config, Arc::clone(&state.link), state.shutdown.clone()));
        [link, catalogue]
    });
    service_kit::shutdown::serve_until(listener, api::router(state.clone()), state.shutdown.clone(), grace).await?;
    for task in sync_tasks.into_iter().flatten() {
        let _ = task.await;
    }
    state.store.close().await;
    tracing::info!("edge node stopped");
    Ok(())
}
