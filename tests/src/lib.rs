//! Fixtures for tests that talk to real processes: a token issuer with real
//! Ed25519 keys, and launchers for the service binaries.

pub mod issuer;
pub mod process;

pub use issuer::TestIssuer;
pub use process::{BridgeProcess, EdgeNodeProcess};
