//! Ed25519 token signing: the auth service's keys, and an edge node's own
//! key for offline logins. Verification is `sync_protocol::token`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("cannot encode the signing key: {0}")]
    Encode(String),
    #[error("cannot sign the token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

pub struct SigningKey {
    kid: String,
    key: ed25519_dalek::SigningKey,
    encoding: EncodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn from_seed(kid: impl Into<String>, seed: &[u8; 32]) -> Result<Self, SigningError> {
        let key = ed25519_dalek::SigningKey::from_bytes(seed);
        let der = key.to_pkcs8_der().map_err(|e| SigningError::Encode(e.to_string()))?;
        Ok(Self { kid: kid.into(), encoding: EncodingKey::from_ed_der(der.as_bytes()), key })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half as a JWK, for a JWKS.
    pub fn public_jwk(&self) -> Value {
        let x = URL_SAFE_NO_PAD.encode(self.key.verifying_key().to_bytes());
        json!({ "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": self.kid, "x": x })
    }

    /// A JWT of `claims`, with this key's id in the header.
    pub fn sign(&self, claims: &Value) -> Result<String, SigningError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.encoding)?)
    }
}
