//! Secrets at rest: passwords and client secrets are kept only as argon2id
//! hashes (PHC strings), here and in the credentials an edge node caches
//! for offline logins.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Bytes of randomness in a generated client secret.
const GENERATED_SECRET_BYTES: usize = 32;

/// An argon2id hash of `secret` with a fresh salt, as a PHC string.
pub fn hash_secret(secret: &str) -> Result<String, HashError> {
    // password_hash's error is not a std error (no_std crate): kept as text.
    let failed = |e: argon2::password_hash::Error| HashError(e.to_string());
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(failed)?;
    Ok(Argon2::default().hash_password(secret.as_bytes(), &salt).map_err(failed)?.to_string())
}

/// A secret could not be hashed (argon2 refused its input).
#[derive(Debug, thiserror::Error)]
#[error("cannot hash the secret: {0}")]
pub struct HashError(String);

/// Whether `secret` matches the PHC string `hash`; a malformed hash matches nothing.
pub fn verify_secret(secret: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| Argon2::default().verify_password(secret.as_bytes(), &parsed).is_ok())
}

/// A hash of no one's secret, verified against when an account does not
/// exist, so that a failed login takes as long either way and does not tell
/// whether the account exists.
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_secret(&generate_secret()).unwrap_or_default())
}

/// A random secret for a client, URL-safe.
pub fn generate_secret() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; GENERATED_SECRET_BYTES]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_secret_only() {
        let hash = hash_secret("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_secret("correct horse", &hash));
        assert!(!verify_secret("correct horse!", &hash));
        assert!(!verify_secret("correct horse", "not a hash"));
        assert_ne!(hash, hash_secret("correct horse").unwrap(), "salted");
    }
}
