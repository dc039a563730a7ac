//! Evidence a node checks itself before it signs an access token (DESIGN.md §9,
//! "Evidence"): the coordinator decides, but a node signs a token only for an agent whose
//! attestation the node itself verifies, against the identity providers the node itself
//! trusts.
//!
//! A node checks evidence when its ceiling names a `trust_config` (the same JSON format
//! as the coordinator's `--trust-config`, read by [`quorate_authz::authn`]; keys come
//! from files, or are fetched by the node itself over HTTPS, never relayed by the
//! coordinator). The attestation it verifies is a JWT of one of three kinds, each
//! checked as [`quorate_authz::authn::Authenticator::verify_jwt`] describes (signature,
//! `aud`, `exp`, `nbf`, `iat`, strict parsing):
//! - an **OIDC JWT** of a configured issuer; the agent is
//!   `spiffe://<domain>/agent/<issuer name>/<sub>`;
//! - a **JWT-SVID** of a trust domain the node holds a JWT bundle for (`svid` entries
//!   with `jwt_bundle_file` or `jwt_bundle_url`); the agent is the SPIFFE ID itself;
//! - a **client assertion** (`private_key_jwt`) of a registered client (`clients`); the
//!   agent is `spiffe://<domain>/client/<client_id>`. Its `aud` must name this node's
//!   token service: one of the ceiling's `token_issuers` `I`, or `I/token` — what the
//!   coordinator accepts for its own issuer URL. A node does not remember `jti`s: it may
//!   see one assertion once per signature, so one-time use is the coordinator's check.
//!
//! Then, for every token of a token key:
//! - **issuance**: [`TokenEvidence::attestation`] must verify now, and the token's `sub`
//!   and `client_id` must both be the agent's SPIFFE ID derived from it (for a client
//!   assertion too: `client_id` is the client's SPIFFE ID, not its bare id), with no
//!   `act`;
//! - **exchange** (RFC 8693): [`TokenEvidence::subject_token`] must be an ES256 token of a
//!   token key this node holds a share of, of that key's issuer and `typ`, not expired;
//!   the attestation is the actor's; the new token's `sub` is the subject token's,
//!   `client_id` the actor's SPIFFE ID, and `act` is `{sub: actor, act: <the subject
//!   token's act>}` exactly.
//!
//! When the ceiling also names the operator's public key, the node then decides the
//! request again under the operator-signed policy bundle it holds, and checks signed
//! approvals ([`crate::policy`]).
//!
//! What this does not cover (stated in the README): an agent authenticated by an
//! X.509-SVID has no evidence a node can verify (the SVID proves possession to the
//! coordinator's TLS listener only), so such tokens are refused by a node that checks
//! evidence; and a coordinator that has seen a bearer attestation (an OIDC JWT, a
//! JWT-SVID, a client assertion) can replay it to the nodes until it expires, within
//! what policy allows that agent.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::Verifier as _;
use quorate_authz::authn::{
    Attestation, Authenticator, AuthnConfig, client_assertion_audiences_for,
};
use quorate_crypto::keys::{KeyId, KeyPublic};
use quorate_proto::fragment::TokenEvidence;
use quorate_proto::rules::{CLOCK_SKEW_SECONDS, TokenRules};
use serde_json::{Map, Value};

/// The node's own verifier of agent attestations.
#[derive(Clone)]
pub struct EvidenceCheck {
    authn: Arc<Authenticator>,
}

impl std::fmt::Debug for EvidenceCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvidenceCheck")
            .field("issuers", &self.authn.issuers())
            .field("clients", &self.authn.clients())
            .finish()
    }
}

/// What a node learnt from a request's evidence.
#[derive(Debug)]
pub struct Verified {
    /// The agent (issuance) or actor (exchange) the attestation vouches for.
    pub agent: Attestation,
    /// For an exchange: the subject token's claims.
    pub subject: Option<Map<String, Value>>,
}

/// What a subject token must be: where to find its key, and that key's rules.
pub trait TokenKeys {
    /// The public data and rules of the token key `id`, if this node holds it.
    fn token_key(&self, id: &KeyId) -> Option<(KeyPublic, TokenRules)>;
}

impl EvidenceCheck {
    /// Loads the trust configuration at `path` (every problem at once) and builds the
    /// verifier for the cluster `domain` (agents' SPIFFE IDs are in it). Client
    /// assertions must be addressed to one of `token_issuers` (the ceiling's) or its
    /// `/token` endpoint.
    pub async fn load(
        path: &std::path::Path,
        domain: &str,
        token_issuers: &[String],
    ) -> Result<Self, Vec<String>> {
        let cfg = AuthnConfig::from_file(path).map_err(|e| {
            e.into_iter()
                .map(|m| format!("trust_config {}: {m}", path.display()))
                .collect::<Vec<_>>()
        })?;
        let audiences = client_assertion_audiences_for(token_issuers.iter().map(String::as_str));
        let authn = Authenticator::new(cfg, domain)
            .await
            .map_err(|e| vec![format!("trust_config {}: {e}", path.display())])?
            .with_client_assertion_audiences(audiences);
        Ok(EvidenceCheck {
            authn: Arc::new(authn),
        })
    }

    /// Checks the evidence of one token whose claims are `payload` (already checked
    /// against the key's rules). Blocks on JWKS refreshes: call it from a blocking
    /// thread inside the runtime. The error is a sentence naming what is missing or
    /// wrong.
    pub fn check(
        &self,
        payload: &Map<String, Value>,
        evidence: Option<&TokenEvidence>,
        keys: &dyn TokenKeys,
        now_unix: i64,
    ) -> Result<Verified, String> {
        let ev = evidence.ok_or(
            "evidence: the request carries none; this node signs a token only for an attested agent",
        )?;
        if ev.attestation.trim().is_empty() {
            return Err("evidence: no attestation (this node verifies the agent's OIDC JWT, JWT-SVID or client assertion itself; an X.509-SVID is not evidence a node can check)".into());
        }
        let agent = self.attestation(&ev.attestation)?;
        let string = |name: &str| match payload.get(name) {
            Some(Value::String(s)) => Ok(s.as_str()),
            _ => Err(format!("evidence: the token has no string \"{name}\"")),
        };
        if ev.subject_token.is_empty() {
            expect("sub", string("sub")?, &agent.subject)?;
            expect("client_id", string("client_id")?, &agent.subject)?;
            if payload.contains_key("act") {
                return Err("evidence: an issued token carries no \"act\" (delegation needs a subject token)".into());
            }
            return Ok(Verified {
                agent,
                subject: None,
            });
        }
        let subject = own_token(&ev.subject_token, keys, now_unix, "the subject token")?;
        let subject_sub = match subject.get("sub") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err("evidence: the subject token has no \"sub\"".into()),
        };
        expect("sub", string("sub")?, &subject_sub)?;
        expect("client_id", string("client_id")?, &agent.subject)?;
        let mut want = Map::new();
        want.insert("sub".into(), Value::String(agent.subject.clone()));
        if let Some(prior) = subject.get("act") {
            want.insert("act".into(), prior.clone());
        }
        if payload.get("act") != Some(&Value::Object(want)) {
            return Err(format!(
                "evidence: the token's act must name the actor {} over the subject token's chain",
                agent.subject
            ));
        }
        Ok(Verified {
            agent,
            subject: Some(subject),
        })
    }

    /// Verifies an agent's attestation (an OIDC JWT, a JWT-SVID or a client assertion)
    /// against this node's own trust configuration. Blocks: call it from a blocking
    /// thread inside the runtime.
    pub fn attestation(&self, jwt: &str) -> Result<Attestation, String> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| "evidence: no runtime to verify the attestation on".to_string())?;
        handle
            .block_on(self.authn.verify_jwt(jwt.trim()))
            .map_err(|e| format!("evidence: the attestation does not verify on this node: {e}"))
    }
}

fn expect(claim: &str, got: &str, want: &str) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "evidence: the token's {claim} is \"{}\", but the attestation makes it \"{}\"",
            got.escape_debug(),
            want.escape_debug()
        ))
    }
}

/// Verifies an access token of this cluster (`what` names it in errors): ES256 under a
/// token key this node holds, that key's `typ` and issuer, not expired (with the nodes'
/// clock skew). Returns its claims.
pub fn own_token(
    token: &str,
    keys: &dyn TokenKeys,
    now_unix: i64,
    what: &str,
) -> Result<Map<String, Value>, String> {
    let bad = |why: &str| format!("evidence: {what} {why}");
    let (input, sig) = token
        .trim()
        .rsplit_once('.')
        .ok_or_else(|| bad("is not a compact JWS"))?;
    let (h, p) = input
        .split_once('.')
        .ok_or_else(|| bad("is not a compact JWS"))?;
    let decode = |part: &str| -> Result<Map<String, Value>, String> {
        let raw = URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| bad("is not base64url"))?;
        quorate_proto::json::parse_object_unique(&raw).map_err(|e| bad(&e))
    };
    let header = decode(h)?;
    let claims = decode(p)?;
    if header.get("alg").and_then(Value::as_str) != Some("ES256") {
        return Err(bad("is not ES256"));
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("has no kid"))?;
    let id = hex_key_id(kid).ok_or_else(|| bad("names a kid that is no key id"))?;
    let (key, rules) = keys.token_key(&id).ok_or_else(|| {
        bad(&format!(
            "names key {kid}, which is no token key of this node"
        ))
    })?;
    if header.get("typ").and_then(Value::as_str) != Some(rules.typ()) {
        return Err(bad(&format!("is not of typ {}", rules.typ())));
    }
    let raw = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| bad("has a signature that is not base64url"))?;
    let sig = p256::ecdsa::Signature::from_slice(&raw)
        .map_err(|_| bad("has a signature that is not ES256 (r || s)"))?;
    let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&key.public_key().to_bytes())
        .map_err(|_| bad("names a key whose public key does not decode"))?;
    vk.verify(input.as_bytes(), &sig)
        .map_err(|_| bad("has a signature that does not verify"))?;
    if claims.get("iss").and_then(Value::as_str) != Some(rules.issuer()) {
        return Err(bad(&format!("is not of issuer {}", rules.issuer())));
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or_else(|| bad("has no integer exp"))?;
    if exp.saturating_add(CLOCK_SKEW_SECONDS) <= now_unix {
        return Err(bad(&format!("expired at {exp}")));
    }
    Ok(claims)
}

fn hex_key_id(kid: &str) -> Option<KeyId> {
    if kid.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(kid.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(KeyId(out))
}
