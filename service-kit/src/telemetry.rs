//! Metrics: the process-wide Prometheus recorder every service renders at `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Installs the process-wide Prometheus recorder once and returns its handle.
/// Later calls (tests that start several servers in one process) share it.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency_buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("seconds".into()), &latency_buckets)
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Suffix("size".into()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
                    )
                })
                .and_then(|builder| builder.install_recorder())
                .unwrap_or_else(|error| {
                    // Another recorder is installed: metrics go there, and
                    // this handle renders an empty page rather than failing.
                    tracing::warn!(%error, "prometheus recorder not installed");
                    PrometheusBuilder::new().build_recorder().handle()
                })
        })
        .clone()
}
