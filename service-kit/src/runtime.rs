//! What every service's `main` does before its own work: logs, the async
//! runtime, the listening socket, the stop signal; and the one error type
//! of a service that could not start or stopped with an error.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use sync_protocol::token::AuthError;
use tokio::net::TcpListener;

use crate::config::ServiceConfig;
use crate::logging::{self, LogError};

/// Why a service could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the data directory {}: {source}", path.display())]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("cannot load the token keys: {0}")]
    Keys(#[from] AuthError),
    #[error("cannot fetch the token keys: {0}")]
    KeyFetch(#[from] crate::keys::KeysError),
    /// The service's storage (its database, broker or cache) failed.
    #[error(transparent)]
    Store(Box<dyn std::error::Error + Send + Sync>),
    #[error("http server failed: {0}")]
    Http(#[from] std::io::Error),
}

impl ServeError {
    pub fn store(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        ServeError::Store(Box::new(error))
    }
}

/// Creates the data directory (and its parents) if it is missing.
pub fn create_data_dir(path: &Path) -> Result<(), ServeError> {
    std::fs::create_dir_all(path).map_err(|source| ServeError::DataDir { path: path.to_owned(), source })
}

/// Threads of the async runtime.
#[derive(Debug, Clone, Copy, Default)]
pub struct Threads {
    /// Worker threads; `None` is one per core.
    pub workers: Option<usize>,
    /// Most threads for blocking work (SQLite reads, password hashes).
    pub blocking_max: Option<usize>,
}

/// The future that completes on SIGTERM or Ctrl-C.
pub type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Installs the logger, starts the runtime, binds `listen`, and runs
/// `service` on the listener until the stop signal, which it is given.
pub fn serve<C, F, Fut>(config: C, listen: SocketAddr, threads: Threads, service: F) -> Result<(), ServeError>
where
    C: ServiceConfig,
    F: FnOnce(C, TcpListener, StopSignal) -> Fut,
    Fut: Future<Output = Result<(), ServeError>>,
{
    logging::init(config.log())?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = threads.workers {
        builder.worker_threads(workers);
    }
    if let Some(blocking_max) = threads.blocking_max {
        builder.max_blocking_threads(blocking_max);
    }
    let runtime = builder.enable_all().build().map_err(ServeError::Runtime)?;
    runtime.block_on(async {
        let listener =
            TcpListener::bind(listen).await.map_err(|source| ServeError::Bind { address: listen, source })?;
        service(config, listener, Box::pin(crate::shutdown::signal())).await
    })
}

/// Runs a one-off command's async work (an admin command, an enrolment)
/// on a runtime of one thread.
pub fn block_on<T>(work: impl Future<Output = T>) -> Result<T, ServeError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ServeError::Runtime)?;
    Ok(runtime.block_on(work))
}
