//! The audit event format and the chain rules, shared by the coordinator (which appends)
//! and `quorate audit verify` (which checks a chain offline). It lives here, in the crate
//! both already link, so that neither has to link the other.
//!
//! Each event is one JSON line. Its `hash` is
//! `SHA-256("QUORATE-AUDIT-V1\n" || line-without-hash)` in hex, where
//! *line-without-hash* is the event serialised with `hash` left out; `prev` is the hash
//! of the event before it (64 zeros for the first). Serialisation is canonical: field
//! order is fixed, absent optional fields are omitted, maps are sorted, and the verifier
//! requires every line to be byte-identical to the re-serialisation of what it parsed —
//! so changing any byte of a line is detected, whatever the byte.
//!
//! A checkpoint is itself an event (`kind: "checkpoint"`) carrying a compact JWS, signed
//! by the threshold cluster with the audit key, over `{iss, seq, head, iat}`: the hash of
//! the event at `seq`. A verifier with the cluster's JWKS checks it offline.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The format version in every event (`v`).
pub const FORMAT: u32 = 1;
/// The `prev` of the first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The JOSE `typ` of checkpoint signatures.
pub const CHECKPOINT_TYP: &str = "quorate-audit-checkpoint+jwt";
const DOMAIN: &[u8] = b"QUORATE-AUDIT-V1\n";

/// What came of a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Allowed and done.
    Allow,
    /// Refused (policy, authentication, revocation, validation).
    Deny,
    /// Waiting for a human approval.
    Pending,
    /// An approver approved.
    Approved,
    /// An approver refused.
    Rejected,
    /// A pending approval ran out of time.
    Expired,
    /// Allowed, but the operation then failed.
    Error,
    /// A checkpoint.
    Signed,
}

impl Outcome {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Error => "error",
            Self::Signed => "signed",
        }
    }
}

/// A signed chain head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The sequence number of the event whose hash is signed.
    pub seq: u64,
    /// That event's hash.
    pub head: String,
    /// Compact JWS (ES256, typ [`CHECKPOINT_TYP`]) over [`CheckpointClaims`].
    pub jws: String,
}

/// The payload a checkpoint signs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointClaims {
    /// The coordinator's issuer URL.
    pub iss: String,
    /// The sequence number of the head.
    pub seq: u64,
    /// The head's hash.
    pub head: String,
    /// When it was signed (unix seconds).
    pub iat: i64,
}

/// What an event says, before it is chained.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fields {
    /// `token`, `exchange`, `credential`, `approval`, `revocation`, `task`, `key`,
    /// `policy`, `checkpoint`.
    pub kind: String,
    /// The action asked for (`issue_token`, `sign`, `approve`, ...).
    pub action: String,
    /// The agent (its Quorate subject) the decision is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The cluster client that made the call, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// How the agent authenticated (`oidc`, `x509-svid`, `token-exchange`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authn_method: Option<String>,
    /// The attestation's issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation_issuer: Option<String>,
    /// What is acted on (`Audience::"dev"`, `Key::"tokens"`, `Target::"db"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// The request's context (scopes, ttl, caller-supplied facts, delegation chain).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub context: BTreeMap<String, String>,
    /// The policies that decided.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_ids: Vec<String>,
    /// Why (for refusals and errors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The token id issued or revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    /// A fingerprint naming a credential, never the credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// The key operated on (name and key id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The fragment nodes that took part.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<u16>,
    /// For `kind: "checkpoint"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
}

/// A chained audit event: one JSON line.
/// Unknown fields are not refused while parsing; the canonical-form check of
/// [`verify_chain`] refuses them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Format version ([`FORMAT`]).
    pub v: u32,
    /// Position in the chain, from 0.
    pub seq: u64,
    /// Unique event id.
    pub id: String,
    /// When (RFC 3339, UTC, milliseconds).
    pub time: String,
    /// What came of it.
    pub outcome: Outcome,
    /// The decision.
    #[serde(flatten)]
    pub fields: Fields,
    /// The hash of the previous event.
    pub prev: String,
    /// This event's hash (see the module docs).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl Event {
    /// The hash this event must carry.
    pub fn compute_hash(&self) -> Result<String, String> {
        let mut unhashed = self.clone();
        unhashed.hash.clear();
        let body = serde_json::to_vec(&unhashed).map_err(|e| format!("event encoding: {e}"))?;
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(&body);
        Ok(hex::encode(h.finalize()))
    }

    /// The JSON line (without newline).
    pub fn to_line(&self) -> Result<String, String> {
        serde_json::to_string(self).map_err(|e| format!("event encoding: {e}"))
    }

    /// Chains `fields` after `prev`: fills `prev` and `hash`.
    pub fn chain(
        seq: u64,
        id: String,
        time: String,
        outcome: Outcome,
        fields: Fields,
        prev: &str,
    ) -> Result<Self, String> {
        let mut e = Event {
            v: FORMAT,
            seq,
            id,
            time,
            outcome,
            fields,
            prev: prev.to_owned(),
            hash: String::new(),
        };
        e.hash = e.compute_hash()?;
        Ok(e)
    }
}

/// RFC 3339 UTC time with milliseconds for unix milliseconds `ms`.
pub fn rfc3339_millis(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count from 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The JWS signing input of a checkpoint: `BASE64URL(header).BASE64URL(claims)`.
pub fn checkpoint_signing_input(kid: &str, claims: &CheckpointClaims) -> Result<String, String> {
    let header = serde_json::json!({ "alg": "ES256", "typ": CHECKPOINT_TYP, "kid": kid });
    let payload = serde_json::to_vec(claims).map_err(|e| format!("checkpoint encoding: {e}"))?;
    Ok(format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload)
    ))
}

/// What a verified chain holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Events checked.
    pub events: u64,
    /// Checkpoints whose signatures verified.
    pub checkpoints: u64,
    /// The last event's hash.
    pub head: String,
    /// The newest event a verified checkpoint covers.
    pub signed_through: Option<u64>,
}

impl Verified {
    /// Events after the last checkpoint: chained, but not yet under a signature.
    pub fn unsigned_tail(&self) -> u64 {
        match self.signed_through {
            Some(s) => self.events.saturating_sub(s.saturating_add(1)),
            None => self.events,
        }
    }
}

/// The first broken link of a chain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {why}", event.as_ref().map(|e| format!(" (event {e})")).unwrap_or_default())]
pub struct Broken {
    /// The 1-based line.
    pub line: usize,
    /// The event, as `seq N, id ...`, when it could be read.
    pub event: Option<String>,
    /// What is wrong.
    pub why: String,
}

/// Checks a chain: every line canonical, hashes, links, sequence numbers, and every
/// checkpoint's signature against `jwks` (a JWK set) and against the chain. Names the
/// first broken link.
pub fn verify_chain(text: &str, jwks: &jsonwebtoken::jwk::JwkSet) -> Result<Verified, Broken> {
    let mut prev = GENESIS.to_owned();
    let mut hashes: Vec<String> = Vec::new();
    let mut checkpoints = 0u64;
    let mut signed_through = None;
    let mut lines = text.split('\n').peekable();
    let mut number = 0usize;
    while let Some(line) = lines.next() {
        number += 1;
        if line.is_empty() && lines.peek().is_none() {
            break;
        }
        let expected = hashes.len() as u64;
        let broken = |event: Option<String>, why: String| Broken {
            line: number,
            event,
            why,
        };
        let ev: Event = serde_json::from_str(line).map_err(|e| {
            broken(
                Some(format!("seq {expected}")),
                format!("not an audit event: {e}"),
            )
        })?;
        let name = Some(format!("seq {}, id {}", ev.seq, ev.id));
        let canonical = ev.to_line().map_err(|e| broken(name.clone(), e))?;
        if canonical != line {
            return Err(broken(
                name,
                "the line is not in canonical form: its bytes were changed".into(),
            ));
        }
        if ev.v != FORMAT {
            return Err(broken(name, format!("unknown format version {}", ev.v)));
        }
        if ev.seq != expected {
            return Err(broken(
                name,
                format!("sequence number {} where {expected} was due", ev.seq),
            ));
        }
        if ev.prev != prev {
            return Err(broken(
                name,
                "its `prev` is not the hash of the event before it (an event was removed, inserted or changed)".into(),
            ));
        }
        let hash = ev.compute_hash().map_err(|e| broken(name.clone(), e))?;
        if hash != ev.hash {
            return Err(broken(
                name,
                "its hash does not match its content (the event was changed)".into(),
            ));
        }
        if let Some(cp) = &ev.fields.checkpoint {
            let claims = verify_checkpoint(&cp.jws, jwks).map_err(|e| broken(name.clone(), e))?;
            if claims.seq != cp.seq || claims.head != cp.head {
                return Err(broken(
                    name,
                    "the signed checkpoint does not say what the event says".into(),
                ));
            }
            let at = usize::try_from(cp.seq).ok().and_then(|i| hashes.get(i));
            match at {
                Some(h) if *h == cp.head => {}
                Some(_) => {
                    return Err(broken(
                        name,
                        format!(
                            "the signed head of event {} differs from the chain: events up to {} were changed",
                            cp.seq, cp.seq
                        ),
                    ));
                }
                None => {
                    return Err(broken(
                        name,
                        format!(
                            "the checkpoint covers event {}, which is not before it",
                            cp.seq
                        ),
                    ));
                }
            }
            checkpoints += 1;
            signed_through = Some(cp.seq);
        }
        prev = hash.clone();
        hashes.push(hash);
    }
    Ok(Verified {
        events: hashes.len() as u64,
        checkpoints,
        head: prev,
        signed_through,
    })
}

/// Verifies a checkpoint JWS with a key of `jwks` (by `kid`), using jsonwebtoken.
pub fn verify_checkpoint(
    jws: &str,
    jwks: &jsonwebtoken::jwk::JwkSet,
) -> Result<CheckpointClaims, String> {
    let header =
        jsonwebtoken::decode_header(jws).map_err(|e| format!("checkpoint signature: {e}"))?;
    if header.typ.as_deref() != Some(CHECKPOINT_TYP) {
        return Err(format!(
            "checkpoint signature has typ {:?}, not {CHECKPOINT_TYP}",
            header.typ
        ));
    }
    if header.alg != jsonwebtoken::Algorithm::ES256 {
        return Err(format!(
            "checkpoint signature has alg {:?}, not ES256",
            header.alg
        ));
    }
    let kid = header
        .kid
        .ok_or_else(|| "checkpoint signature has no kid".to_owned())?;
    let jwk = jwks
        .find(&kid)
        .ok_or_else(|| format!("checkpoint signed by kid {kid}, which the JWKS does not hold"))?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk)
        .map_err(|e| format!("JWKS key {kid} is unusable: {e}"))?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.validate_exp = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    jsonwebtoken::decode::<CheckpointClaims>(jws, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| format!("checkpoint signature by kid {kid} does not verify: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(kind: &str) -> Fields {
        Fields {
            kind: kind.into(),
            action: "issue_token".into(),
            subject: Some("spiffe://q/agent/a/b".into()),
            context: BTreeMap::from([("scopes".into(), "read write".into())]),
            policy_ids: vec!["dev-agents".into()],
            nodes: vec![1, 2],
            ..Fields::default()
        }
    }

    fn chain(n: u64) -> String {
        let mut prev = GENESIS.to_owned();
        let mut out = String::new();
        for seq in 0..n {
            let e = Event::chain(
                seq,
                format!("ev-{seq}"),
                rfc3339_millis(1_700_000_000_000 + seq as i64),
                Outcome::Allow,
                fields("token"),
                &prev,
            )
            .unwrap();
            prev = e.hash.clone();
            out.push_str(&e.to_line().unwrap());
            out.push('\n');
        }
        out
    }

    fn empty() -> jsonwebtoken::jwk::JwkSet {
        jsonwebtoken::jwk::JwkSet { keys: vec![] }
    }

    #[test]
    fn a_chain_verifies_and_every_byte_flip_is_caught_at_its_line_or_the_next() {
        let text = chain(4);
        let ok = verify_chain(&text, &empty()).unwrap();
        assert_eq!(ok.events, 4);
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            let mut t = bytes.to_vec();
            t[i] ^= 0x01;
            let Ok(s) = String::from_utf8(t) else {
                continue;
            };
            let line = text[..i].matches('\n').count() + 1;
            match verify_chain(&s, &empty()) {
                Ok(v) => panic!("flip at byte {i} (line {line}) verified: {v:?}"),
                Err(b) => assert!(b.line <= line + 1, "byte {i}: {b}"),
            }
        }
    }

    #[test]
    fn removing_or_reordering_events_is_caught() {
        let text = chain(3);
        let lines: Vec<&str> = text.lines().collect();
        let dropped = format!("{}\n{}\n", lines[0], lines[2]);
        let e = verify_chain(&dropped, &empty()).unwrap_err();
        assert_eq!(e.line, 2);
        let swapped = format!("{}\n{}\n{}\n", lines[0], lines[2], lines[1]);
        assert_eq!(verify_chain(&swapped, &empty()).unwrap_err().line, 2);
    }

    #[test]
    fn dates_format_as_rfc3339() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            rfc3339_millis(1_796_083_200_000),
            "2026-12-01T00:00:00.000Z"
        );
    }
}
