//! Loading the token verifier from a JWKS file.

use std::path::Path;

use sync_protocol::token::{self, AuthError, TokenPolicy, Verifier};

pub fn load_verifier(policy: &TokenPolicy, jwks_path: &Path) -> Result<Verifier, AuthError> {
    let text =
        std::fs::read_to_string(jwks_path).map_err(|e| AuthError::Jwks(format!("{}: {e}", jwks_path.display())))?;
    Verifier::new(policy, &token::parse_jwks(&text)?)
}
