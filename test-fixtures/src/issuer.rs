//! A stand-in for the auth service: real Ed25519 keys, a JWKS with their
//! public halves, and tokens signed as the auth service signs them.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub const ISSUER: &str = "https://auth.test.invalid";
pub const AUDIENCE: &str = "medsync";

#[derive(Clone)]
pub struct TestIssuer {
    pub kid: String,
    signing: EncodingKey,
    public_key: [u8; 32],
}

impl std::fmt::Debug for TestIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestIssuer").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl TestIssuer {
    /// A fresh key pair under key id `kid`.
    pub fn new(kid: &str) -> Self {
        let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let der = key.to_pkcs8_der().expect("an ed25519 key encodes as pkcs8");
        Self {
            kid: kid.into(),
            signing: EncodingKey::from_ed_der(der.as_bytes()),
            public_key: key.verifying_key().to_bytes(),
        }
    }

    /// This issuer's public key as a JWK.
    pub fn jwk(&self) -> Value {
        json!({ "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": self.kid, "x": URL_SAFE_NO_PAD.encode(self.public_key) })
    }

    /// A JWKS holding this issuer's key.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk()] })
    }

    /// The claims of a valid token for `user` with `roles` in `wards`, for an hour.
    pub fn claims(&self, user: &str, roles: &[&str], wards: &[&str]) -> Value {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": user, "roles": roles, "wards": wards,
            "iat": now, "exp": now + 3_600, "jti": format!("{:032x}", rand::random::<u128>()),
        })
    }

    /// Signs any claims with this issuer's key, as the auth service would.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.signing).expect("signing with a valid key succeeds")
    }

    pub fn token(&self, user: &str, roles: &[&str], wards: &[&str]) -> String {
        self.sign(&self.claims(user, roles, wards))
    }

    /// A nurse of `ward`.
    pub fn nurse(&self, ward: &str) -> String {
        self.token("n.okafor", &["nurse"], &[ward])
    }
}

/// An unsigned token (`alg: none`), as an attacker would send it.
pub fn unsigned_token(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    format!("{header}.{}.", URL_SAFE_NO_PAD.encode(claims.to_string()))
}

/// An HS256 token keyed with the issuer's public key: the classic
/// algorithm-confusion forgery.
pub fn hs256_with_public_key(issuer: &TestIssuer, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(issuer.kid.clone());
    let key = EncodingKey::from_secret(issuer.jwk()["x"].as_str().unwrap_or_default().as_bytes());
    jsonwebtoken::encode(&header, claims, &key).expect("hmac signing succeeds")
}

/// A valid token whose payload was edited after signing: it claims the
/// admin role and another subject.
pub fn tampered(token: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    let payload = URL_SAFE_NO_PAD.decode(&parts[1]).unwrap_or_default();
    let mut claims: Value = serde_json::from_slice(&payload).unwrap_or_default();
    claims["roles"] = json!(["admin"]);
    claims["sub"] = json!("mallory");
    parts[1] = URL_SAFE_NO_PAD.encode(claims.to_string());
    assert_ne!(parts[1], URL_SAFE_NO_PAD.encode(&payload), "the payload changed");
    parts.join(".")
}
