//! The auth service's signing keys: Ed25519, named by `kid`. A new key is
//! published in the JWKS `publish_ahead_s` before it signs anything, so
//! resource servers (edge nodes refresh their copy periodically) know it
//! before they meet it; a retired key stays published until the last token
//! it signed has expired.

use serde_json::{Value, json};
use service_kit::signing::{SigningError, SigningKey};

/// One key as stored.
#[derive(Clone)]
pub struct StoredKey {
    pub kid: String,
    pub seed: [u8; 32],
    /// When it starts signing (seconds since the epoch).
    pub activates_at: i64,
    /// When its successor took over, if one has.
    pub retired_at: Option<i64>,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("kid", &self.kid)
            .field("activates_at", &self.activates_at)
            .field("retired_at", &self.retired_at)
            .finish_non_exhaustive()
    }
}

impl StoredKey {
    pub fn generate(activates_at: i64) -> Self {
        let kid = format!("ed25519-{activates_at}-{:08x}", rand::random::<u32>());
        Self { kid, seed: rand::random(), activates_at, retired_at: None }
    }

    pub fn signing_key(&self) -> Result<SigningKey, SigningError> {
        SigningKey::from_seed(self.kid.clone(), &self.seed)
    }

    /// Whether resource servers still need this key at `now`.
    pub fn is_published(&self, now: i64, access_token_ttl_s: i64) -> bool {
        self.retired_at.is_none_or(|retired| retired + access_token_ttl_s > now)
    }
}

/// The key that signs at `now`: the newest one already active.
pub fn active(keys: &[StoredKey], now: i64) -> Option<&StoredKey> {
    keys.iter().filter(|key| key.activates_at <= now).max_by_key(|key| key.activates_at)
}

/// The JWKS document: every key that is published at `now`.
pub fn jwks(keys: &[StoredKey], now: i64, access_token_ttl_s: i64) -> Value {
    let published: Vec<Value> = keys
        .iter()
        .filter(|key| key.is_published(now, access_token_ttl_s))
        .filter_map(|key| key.signing_key().ok().map(|key| key.public_jwk()))
        .collect();
    json!({ "keys": published })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_key_is_published_before_it_signs_and_until_its_tokens_expire() {
        let mut old = StoredKey::generate(1_000);
        let new = StoredKey::generate(2_000);
        old.retired_at = Some(new.activates_at);
        let keys = [old.clone(), new.clone()];
        let ttl = 300;
        assert_eq!(active(&keys, 1_500).map(|k| k.kid.as_str()), Some(old.kid.as_str()));
        assert_eq!(jwks(&keys, 1_500, ttl)["keys"].as_array().map(Vec::len), Some(2), "new key published ahead");
        assert_eq!(active(&keys, 2_000).map(|k| k.kid.as_str()), Some(new.kid.as_str()));
        assert_eq!(
            jwks(&keys, 2_299, ttl)["keys"].as_array().map(Vec::len),
            Some(2),
            "old key until its tokens expire"
        );
        assert_eq!(jwks(&keys, 2_300, ttl)["keys"][0]["kid"], new.kid);
        assert_eq!(jwks(&keys, 2_300, ttl)["keys"].as_array().map(Vec::len), Some(1));
    }
}
