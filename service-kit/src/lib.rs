//! Plumbing shared by `edge-node` and `cloud-bridge`. The services may not
//! depend on each other (ARCHITECTURE.md), so what both need beyond the
//! protocol lives here instead of being copied: the HTTP error type, the
//! SQLite read pool and migration runner, JWKS loading, log setup and the Prometheus recorder.

pub mod config;
pub mod http;
pub mod keys;
pub mod logging;
pub mod secrets;
pub mod shutdown;
pub mod signing;
pub mod sqlite;
pub mod telemetry;
pub mod writer;
