//! The projector process: a consumer-group member that merges the change
//! topic into MongoDB, so the bridges (which only append to the topic) can
//! serve reads and feeds from there. Run as many as there are partitions to
//! share; each round is idempotent, so a record seen twice (after a crash,
//! a rebalance, or a replay from offset 0) changes nothing.
//!
//! A round takes up to `batch_records_max` records, merges each ticket's
//! records into its stored document, then writes in this order:
//!
//! 1. the feed pages: per ward and partition, the changes new to their
//!    tickets (a page covers the round's whole offset range);
//! 2. the tickets, each only over the version it read (a conflict with a
//!    concurrent projector is merged again, never overwritten);
//! 3. the partitions' watermarks (`$max`);
//! 4. Redis: invalidations and the notice every bridge follows;
//!
//! and only then commits the consumer offsets. A crash anywhere repeats the
//! round; a change is in a ticket only if a page holding it was written
//! first, which is what lets feeds trust the pages.
//!
//! This crate owns the rounds and the process around them (health, metrics,
//! configuration). It must never answer edges or the pharmacy: that is the
//! bridge's, and the stored shapes are `cloud-store`'s.

pub mod config;
mod project;
mod rewrite;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use service_kit::http::ApiError;
use service_kit::runtime::ServeError;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::config::ProjectorConfig;
pub use crate::project::ProjectorError;

/// Whether the projector's last attempt at its work succeeded: what
/// `/readyz` reports, so an orchestrator sees a projector stuck on its services.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<AtomicBool>);

impl Health {
    fn set(&self, healthy: bool) {
        self.0.store(healthy, Ordering::Relaxed);
    }

    fn is_healthy(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// `/healthz` (the process runs), `/readyz` (its services answer), `/metrics`.
pub fn router(health: Health, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let healthy = health.is_healthy();
                async move {
                    match healthy {
                        true => Ok("ready"),
                        false => Err(ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not_ready",
                            "the projector is waiting for kafka or mongodb",
                        )),
                    }
                }
            }),
        )
        .route("/metrics", get(move || std::future::ready(metrics.render())))
}

/// Runs the projector, with its health and metrics on `listener`, until
/// `shutdown` completes; then finishes the round in hand and returns.
pub async fn run(
    config: ProjectorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let stop = CancellationToken::new();
    service_kit::shutdown::cancel_when(stop.clone(), shutdown);
    let health = Health::default();
    let address = listener.local_addr()?;
    tracing::info!(%address, projector = %config.projector.id, "projector serving");
    let router = router(health.clone(), service_kit::telemetry::prometheus());
    let grace = Duration::from_millis(config.projector.shutdown_grace_ms);
    let server = tokio::spawn(service_kit::shutdown::serve_until(listener, router, stop.clone(), grace));
    let rewrite = tokio::spawn(rewrite::rematerialize(config.clone(), stop.clone()));
    let outcome = project::run(&config, health, stop.clone()).await;
    stop.cancel();
    let _ = rewrite.await;
    let _ = server.await;
    outcome.map_err(ServeError::store)
}
