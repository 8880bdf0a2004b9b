//! The token checks a service makes, from its configuration.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sync_protocol::token::{self, AuthError, TokenPolicy, Verifier};

/// The `[auth]` section of a service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(flatten)]
    pub policy: TokenPolicy,
    /// The auth service's JWKS; a relative path is inside the data directory.
    #[serde(default = "default_jwks_file")]
    pub jwks_file: PathBuf,
}

fn default_jwks_file() -> PathBuf {
    PathBuf::from("jwks.json")
}

impl AuthConfig {
    pub fn jwks_path(&self, data_dir: &Path) -> PathBuf {
        data_dir.join(&self.jwks_file)
    }

    /// A verifier with the key set found under `data_dir`.
    pub fn verifier(&self, data_dir: &Path) -> Result<Verifier, AuthError> {
        let path = self.jwks_path(data_dir);
        let text = std::fs::read_to_string(&path).map_err(|e| AuthError::Jwks(format!("{}: {e}", path.display())))?;
        Verifier::new(&self.policy, &token::parse_jwks(&text)?)
    }
}
