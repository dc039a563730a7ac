//! RFC 9068 access tokens: the JWS the cluster signs by threshold, and the checks
//! introspection runs on tokens presented back to us.
//!
//! The coordinator only *assembles* tokens: it builds `BASE64URL(header).BASE64URL(claims)`,
//! the fragment nodes sign it (each node re-parses it against the key's token rules), and
//! the 64-byte `r || s` signature is appended. There is no local signing key.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use quorate_crypto::keys::KeyPublic;
use serde::{Deserialize, Serialize};

/// The JOSE `typ` of access tokens (RFC 9068 §2.1).
pub const TOKEN_TYP: &str = "at+jwt";

/// How the agent proved who it is, as recorded in the token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationClaim {
    /// The attestation's issuer (OIDC `iss`, or `spiffe://<trust domain>`).
    pub iss: String,
    /// The attestation's subject (OIDC `sub`, or the SVID).
    pub sub: String,
    /// `oidc` or `x509-svid`.
    pub method: String,
}

/// The claims of a Quorate access token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// Our issuer URL.
    pub iss: String,
    /// The agent's Quorate subject (`spiffe://<domain>/agent/<issuer>/<subject>`).
    pub sub: String,
    /// The audience (one resource server or MCP server).
    pub aud: String,
    /// The OAuth client: the agent itself.
    pub client_id: String,
    /// Issued at (unix seconds).
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Expiry.
    pub exp: i64,
    /// Unique token id (revocation handle).
    pub jti: String,
    /// Space-separated scopes.
    pub scope: String,
    /// The task the token serves, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The attestation the agent presented.
    pub attestation: AttestationClaim,
    /// RFC 8693 §4.1: the acting party of a delegated token, nesting earlier actors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
    /// RFC 9449 §6: the DPoP key the token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
}

/// An `act` claim: the current actor, and the actor before it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The actor's subject.
    pub sub: String,
    /// The previous actor, if the token was delegated more than once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// The chain's subjects, newest actor first.
    pub fn chain(&self) -> Vec<String> {
        let mut out = vec![self.sub.clone()];
        let mut at = self.act.as_deref();
        while let Some(a) = at {
            out.push(a.sub.clone());
            at = a.act.as_deref();
        }
        out
    }
}

/// A `cnf` claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// RFC 7638 SHA-256 thumbprint of the DPoP public key.
    pub jkt: String,
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    typ: &'static str,
    kid: &'a str,
}

/// `BASE64URL(header).BASE64URL(claims)` for `kid`.
pub fn signing_input(kid: &str, claims: &AccessClaims) -> Result<String, String> {
    let header = serde_json::to_vec(&Header {
        alg: "ES256",
        typ: TOKEN_TYP,
        kid,
    })
    .map_err(|e| format!("token header does not encode: {e}"))?;
    let payload =
        serde_json::to_vec(claims).map_err(|e| format!("token claims do not encode: {e}"))?;
    Ok(format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    ))
}

/// The compact JWS: the signing input and the raw `r || s` signature.
pub fn assemble(signing_input: &str, raw_signature: &[u8; 64]) -> String {
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(raw_signature))
}

/// A scope token (RFC 6749 §3.3: `%x21 / %x23-5B / %x5D-7E`), at most 128 characters.
pub fn valid_scope(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

/// The JWK of a signing key version: RFC 7517 EC P-256, `use: sig`, `alg: ES256`, `kid`.
pub fn jwk(key: &KeyPublic) -> serde_json::Value {
    let u = key.public_key().to_uncompressed();
    let x = URL_SAFE_NO_PAD.encode(u.get(1..33).unwrap_or(&[]));
    let y = URL_SAFE_NO_PAD.encode(u.get(33..65).unwrap_or(&[]));
    serde_json::json!({
        "kty": "EC", "crv": "P-256", "x": x, "y": y,
        "kid": key.key_id.to_string(), "use": "sig", "alg": "ES256",
    })
}

/// Why a presented token is not one of ours, or not valid now.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not a JWS we could have issued.
    #[error("not a Quorate access token: {0}")]
    Malformed(String),
    /// Its `kid` names no key in the JWKS.
    #[error("the token's kid {0} names no current or recently retired signing key")]
    UnknownKey(String),
    /// Signature, issuer, expiry or not-before failed.
    #[error("token invalid: {0}")]
    Invalid(String),
}

/// Verifies a token we issued: ES256 under the key its `kid` names (one of `keys`),
/// `typ: at+jwt`, our issuer, and `nbf <= now < exp` (no leeway: introspection answers
/// for this instant). Returns its claims.
pub fn verify(token: &str, keys: &[KeyPublic], issuer: &str) -> Result<AccessClaims, TokenError> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
    if header.alg != Algorithm::ES256 {
        return Err(TokenError::Malformed(format!(
            "alg {:?}, expected ES256",
            header.alg
        )));
    }
    if header.typ.as_deref() != Some(TOKEN_TYP) {
        return Err(TokenError::Malformed(format!(
            "typ {:?}, expected {TOKEN_TYP}",
            header.typ.unwrap_or_default()
        )));
    }
    let kid = header
        .kid
        .ok_or_else(|| TokenError::Malformed("no kid".into()))?;
    let key = keys
        .iter()
        .find(|k| k.key_id.to_string() == kid)
        .ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
    let jwk = jwk(key);
    let x = jwk.get("x").and_then(|v| v.as_str()).unwrap_or_default();
    let y = jwk.get("y").and_then(|v| v.as_str()).unwrap_or_default();
    let dk = DecodingKey::from_ec_components(x, y)
        .map_err(|e| TokenError::Invalid(format!("signing key does not decode: {e}")))?;
    let mut v = Validation::new(Algorithm::ES256);
    v.leeway = 0;
    v.validate_nbf = true;
    v.validate_aud = false;
    v.set_issuer(&[issuer]);
    v.set_required_spec_claims(&["exp", "iss", "sub", "aud", "nbf", "iat", "jti"]);
    let data = jsonwebtoken::decode::<AccessClaims>(token, &dk, &v)
        .map_err(|e| TokenError::Invalid(e.to_string()))?;
    Ok(data.claims)
}

/// A fresh token id: 16 random bytes, base64url.
pub fn new_jti(rng: &mut impl rand::CryptoRng) -> String {
    let mut b = [0u8; 16];
    rng.fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn scopes_follow_rfc6749() {
        assert!(valid_scope("tools:read"));
        assert!(valid_scope("a/b!#"));
        assert!(!valid_scope(""));
        assert!(!valid_scope("a b"));
        assert!(!valid_scope("a\"b"));
        assert!(!valid_scope("a\\b"));
        assert!(!valid_scope(&"x".repeat(129)));
    }

    #[test]
    fn signing_input_has_the_rfc9068_header() {
        let c = AccessClaims {
            iss: "https://i".into(),
            sub: "spiffe://d/agent/dev/a".into(),
            aud: "dev".into(),
            client_id: "spiffe://d/agent/dev/a".into(),
            iat: 1,
            nbf: 1,
            exp: 2,
            jti: "j".into(),
            scope: "a b".into(),
            task_id: None,
            attestation: AttestationClaim {
                iss: "https://dev".into(),
                sub: "a".into(),
                method: "oidc".into(),
            },
            act: None,
            cnf: None,
        };
        let input = signing_input("abc", &c).unwrap();
        let (h, p) = input.split_once('.').unwrap();
        let h: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap();
        assert_eq!(h["typ"], "at+jwt");
        assert_eq!(h["alg"], "ES256");
        assert_eq!(h["kid"], "abc");
        let p: AccessClaims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap();
        assert_eq!(p, c);
        assert!(!input.contains("task_id") || c.task_id.is_some());
    }
}
