//! The skeleton every medsync service shares, so none copies another (the
//! services may not depend on each other, see ARCHITECTURE.md):
//!
//! - [`config`]: the one loader and the shared checks of every service's configuration;
//! - [`runtime`]: what a `main` sets up (logs, runtime, socket, stop signal) and [`runtime::ServeError`];
//! - [`clock`]: the services' one clock;
//! - [`keys`], [`signing`], [`secrets`]: token keys, signing, password hashes;
//! - [`sqlite`], [`writer`]: the SQLite read pool, migrations and group-commit writer;
//! - [`logging`], [`telemetry`], [`shutdown`]: logs, the Prometheus recorder, stopping;
//! - [`http`] (feature `http`): the HTTP edge's error type and extractors;
//! - [`cloud`] (feature `cloud`): MongoDB and Redis client set-up, which the edge never builds.
//!
//! It holds no product rule (those are in `sync-protocol`) and serves no route.

pub mod clock;
#[cfg(feature = "cloud")]
pub mod cloud;
pub mod config;
#[cfg(feature = "http")]
pub mod http;
pub mod keys;
pub mod logging;
pub mod runtime;
pub mod secrets;
pub mod shutdown;
pub mod signing;
pub mod sqlite;
pub mod telemetry;
pub mod writer;
