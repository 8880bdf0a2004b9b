//! Stopping a service: the signal (SIGTERM from systemd or `kill`, or
//! Ctrl-C), and serving until told to stop with a bounded drain.

use std::future::Future;

use tokio_util::sync::CancellationToken;

pub async fn signal() {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the service");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// Cancels `token` once `signal` completes.
pub fn cancel_when(token: CancellationToken, signal: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(async move {
        signal.await;
        token.cancel();
    });
}

/// Serves `router` on `listener` until `stop` is cancelled, then lets
/// in-flight requests finish for at most `grace` and returns; requests still
/// running after that are cut off (long-lived streams watch `stop` themselves).
#[cfg(feature = "http")]
pub async fn serve_until<L>(
    listener: L,
    router: axum::Router,
    stop: CancellationToken,
    grace: std::time::Duration,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let drained = stop.clone();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move { drained.cancelled().await });
    let server = tokio::spawn(async move { server.await });
    stop.cancelled().await;
    tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down: draining requests");
    match tokio::time::timeout(grace, server).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => {
            tracing::error!(%join, "http server task failed");
            Ok(())
        }
        Err(_) => {
            tracing::warn!("requests still running after the grace period were cut off");
            Ok(())
        }
    }
}
