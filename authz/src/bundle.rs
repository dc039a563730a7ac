//! Operator-signed statements that every fragment node checks itself (DESIGN.md §9,
//! "Evidence"): the **policy bundle** a token is decided under, and the **approval**
//! of a request that policy holds for a human.
//!
//! Both are compact JWS (RFC 7515) signed with ES256 (RFC 7518 §3.4):
//! - a [`PolicyBundle`] is signed by the operator key, which no cluster process holds
//!   (`quorate dev` keeps it in its directory; `quorate policy apply --operator-key`
//!   signs with it). Nodes verify it against the operator public key of their own
//!   ceiling; its `seq` only grows, so a node refuses an older bundle (rollback);
//! - an [`ApprovalStatement`] is signed by an approver whose public key the bundle
//!   lists, and binds exactly one request: agent, action, resource, scopes, lifetime,
//!   task, context and DPoP key.
//!
//! Parsing is strict: duplicate member names anywhere are refused, unknown members
//! are refused, every member has one JSON type. Errors name what is wrong and never
//! carry key material.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _, EncodePublicKey as _, LineEnding};
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};

/// The JOSE `typ` of a policy bundle.
pub const BUNDLE_TYP: &str = "quorate-policy-bundle+jwt";

/// The JOSE `typ` of an approval statement.
pub const APPROVAL_TYP: &str = "quorate-approval+jwt";

/// The words of a node's refusal because it holds another bundle than the one the
/// request was decided under: the coordinator installs its bundle and tries again.
pub const BUNDLE_MISMATCH: &str = "this node holds policy bundle";

/// The longest an approval statement may be valid for, seconds (a pending request's
/// lifetime is at most a day).
pub const MAX_APPROVAL_LIFETIME_SECONDS: i64 = 86_400;

/// The most policy files and approvers a bundle may carry.
const MAX_FILES: usize = 256;
const MAX_APPROVERS: usize = 64;

/// Why a signed statement was refused: one sentence naming what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StatementError(String);

impl StatementError {
    fn new(what: &str, why: impl std::fmt::Display) -> Self {
        Self(format!("{what}: {why}"))
    }
}

/// Reads an ES256 signing key (PKCS#8 PEM, `-----BEGIN PRIVATE KEY-----`): the operator
/// key or an approver key. The error names the file, never the key.
pub fn signing_key_from_file(path: &Path) -> Result<SigningKey, StatementError> {
    let pem = std::fs::read_to_string(path).map_err(|e| {
        StatementError::new(&path.display().to_string(), format!("cannot read: {e}"))
    })?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|_| {
        StatementError::new(
            &path.display().to_string(),
            "not a P-256 private key in PKCS#8 PEM (-----BEGIN PRIVATE KEY-----)",
        )
    })
}

/// Reads a P-256 public key (SPKI PEM, `-----BEGIN PUBLIC KEY-----`).
pub fn public_key_from_file(path: &Path) -> Result<p256::PublicKey, StatementError> {
    let pem = std::fs::read_to_string(path).map_err(|e| {
        StatementError::new(&path.display().to_string(), format!("cannot read: {e}"))
    })?;
    p256::PublicKey::from_public_key_pem(&pem).map_err(|e| {
        StatementError::new(
            &path.display().to_string(),
            format!("not a P-256 public key in SPKI PEM: {e}"),
        )
    })
}

/// The SPKI PEM of a public key.
pub fn public_key_pem(key: &p256::PublicKey) -> String {
    key.to_public_key_pem(LineEnding::LF).unwrap_or_default()
}

/// The public half of a signing key.
pub fn public_of(key: &SigningKey) -> p256::PublicKey {
    p256::PublicKey::from(key.verifying_key())
}

/// Signs `payload` as a compact JWS with header `{"alg":"ES256","typ":typ,"kid":kid}`.
fn sign_jws(typ: &str, kid: &str, payload: &Value, key: &SigningKey) -> String {
    let header = json!({"alg": "ES256", "typ": typ, "kid": kid});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string())
    );
    let sig: Signature = key.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

/// A compact JWS split and decoded, not yet verified.
struct Opened<'a> {
    kid: String,
    payload: Map<String, Value>,
    input: &'a str,
    sig: Signature,
}

/// Splits and strictly parses a compact ES256 JWS of `typ`; `what` names it in errors.
fn open<'a>(jws: &'a str, typ: &str, what: &str) -> Result<Opened<'a>, StatementError> {
    let bad = |why: &str| StatementError::new(what, why);
    let jws = jws.trim();
    let (input, sig) = jws
        .rsplit_once('.')
        .ok_or_else(|| bad("not a compact JWS"))?;
    let (h, p) = input
        .split_once('.')
        .ok_or_else(|| bad("not a compact JWS"))?;
    let decode = |part: &str, name: &str| -> Result<Map<String, Value>, StatementError> {
        let raw = URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| bad(&format!("its {name} is not base64url")))?;
        quorate_proto::json::parse_object_unique(&raw).map_err(|e| {
            bad(&format!(
                "its {name} is not a JSON object with unique members: {e}"
            ))
        })
    };
    let header = decode(h, "header")?;
    let payload = decode(p, "payload")?;
    for name in header.keys() {
        if !["alg", "typ", "kid"].contains(&name.as_str()) {
            return Err(bad(&format!(
                "its header has the unknown member \"{}\"",
                name.escape_debug()
            )));
        }
    }
    if header.get("alg").and_then(Value::as_str) != Some("ES256") {
        return Err(bad("it is not signed with ES256"));
    }
    if header.get("typ").and_then(Value::as_str) != Some(typ) {
        return Err(bad(&format!("its typ is not {typ}")));
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("its header has no string kid"))?
        .to_owned();
    let raw = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| bad("its signature is not base64url"))?;
    let sig = Signature::from_slice(&raw)
        .map_err(|_| bad("its signature is not ES256 (r || s, 64 bytes)"))?;
    Ok(Opened {
        kid,
        payload,
        input,
        sig,
    })
}

fn verify_sig(o: &Opened<'_>, key: &p256::PublicKey, what: &str) -> Result<(), StatementError> {
    VerifyingKey::from(key)
        .verify(o.input.as_bytes(), &o.sig)
        .map_err(|_| StatementError::new(what, "its signature does not verify"))
}

/// Strict typed reads of a statement's members.
struct Members<'a> {
    map: &'a Map<String, Value>,
    what: &'a str,
}

impl Members<'_> {
    fn only(&self, allowed: &[&str]) -> Result<(), StatementError> {
        match self.map.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(StatementError::new(
                self.what,
                format!("unknown member \"{}\"", k.escape_debug()),
            )),
            None => Ok(()),
        }
    }
    fn get(&self, name: &str) -> Result<&Value, StatementError> {
        self.map
            .get(name)
            .ok_or_else(|| StatementError::new(self.what, format!("no \"{name}\"")))
    }
    fn string(&self, name: &str) -> Result<String, StatementError> {
        self.get(name)?
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| StatementError::new(self.what, format!("\"{name}\" is not a string")))
    }
    fn opt_string(&self, name: &str) -> Result<Option<String>, StatementError> {
        match self.map.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.string(name).map(Some),
        }
    }
    fn int(&self, name: &str) -> Result<i64, StatementError> {
        self.get(name)?
            .as_i64()
            .ok_or_else(|| StatementError::new(self.what, format!("\"{name}\" is not an integer")))
    }
    fn uint(&self, name: &str) -> Result<u64, StatementError> {
        self.get(name)?.as_u64().ok_or_else(|| {
            StatementError::new(
                self.what,
                format!("\"{name}\" is not a non-negative integer"),
            )
        })
    }
    fn object(&self, name: &str) -> Result<&Map<String, Value>, StatementError> {
        self.get(name)?
            .as_object()
            .ok_or_else(|| StatementError::new(self.what, format!("\"{name}\" is not an object")))
    }
    fn strings(&self, name: &str) -> Result<Vec<String>, StatementError> {
        let not =
            || StatementError::new(self.what, format!("\"{name}\" is not an array of strings"));
        self.get(name)?
            .as_array()
            .ok_or_else(not)?
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(not))
            .collect()
    }
    fn string_map(&self, name: &str) -> Result<BTreeMap<String, String>, StatementError> {
        self.object(name)?
            .iter()
            .map(|(k, v)| {
                v.as_str()
                    .map(|s| (k.clone(), s.to_owned()))
                    .ok_or_else(|| {
                        StatementError::new(
                            self.what,
                            format!("\"{name}\".\"{}\" is not a string", k.escape_debug()),
                        )
                    })
            })
            .collect()
    }
}

/// A policy set signed by the operator (DESIGN.md §9): the Cedar files every node and
/// the coordinator decide under, and the approvers whose signed approvals count.
#[derive(Clone)]
pub struct PolicyBundle {
    id: String,
    seq: u64,
    iat: i64,
    files: Vec<(String, String)>,
    approvers: BTreeMap<String, p256::PublicKey>,
    jws: String,
}

impl std::fmt::Debug for PolicyBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyBundle")
            .field("id", &self.id)
            .field(
                "files",
                &self.files.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("approvers", &self.approvers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PolicyBundle {
    /// Signs a bundle of `files` ((name, text), `*.cedar` and an optional schema) and
    /// `approvers` (name → P-256 public key) with the operator key. `seq` must exceed
    /// the seq of every bundle the nodes hold; `iat` is unix seconds.
    pub fn sign(
        operator: &SigningKey,
        seq: u64,
        iat: i64,
        mut files: Vec<(String, String)>,
        approvers: BTreeMap<String, p256::PublicKey>,
    ) -> Result<Self, StatementError> {
        files.sort();
        let payload = json!({
            "seq": seq,
            "iat": iat,
            "files": files.iter().map(|(n, t)| (n.clone(), Value::String(t.clone()))).collect::<Map<_, _>>(),
            "approvers": approvers.iter().map(|(n, k)| (n.clone(), Value::String(public_key_pem(k)))).collect::<Map<_, _>>(),
        });
        let jws = sign_jws(
            BUNDLE_TYP,
            &key_thumbprint(&public_of(operator)),
            &payload,
            operator,
        );
        Self::verify(&jws, &public_of(operator))
    }

    /// Verifies a bundle against the operator public key and parses it strictly.
    /// Checks the signature and the shape only; whether its Cedar files compile is the
    /// policy engine's ([`crate::policy::PolicyEngine::from_bundle`]).
    pub fn verify(jws: &str, operator: &p256::PublicKey) -> Result<Self, StatementError> {
        const WHAT: &str = "policy bundle";
        let o = open(jws, BUNDLE_TYP, WHAT)?;
        verify_sig(
            &o,
            operator,
            "policy bundle (signed by another key than this operator key?)",
        )?;
        let m = Members {
            map: &o.payload,
            what: WHAT,
        };
        m.only(&["seq", "iat", "files", "approvers"])?;
        let seq = m.uint("seq")?;
        let iat = m.int("iat")?;
        let files: Vec<(String, String)> = m.string_map("files")?.into_iter().collect();
        if files.is_empty() || files.len() > MAX_FILES {
            return Err(StatementError::new(
                WHAT,
                format!("it must carry 1 to {MAX_FILES} files, not {}", files.len()),
            ));
        }
        let approvers_pem = m.string_map("approvers")?;
        if approvers_pem.len() > MAX_APPROVERS {
            return Err(StatementError::new(
                WHAT,
                format!("at most {MAX_APPROVERS} approvers"),
            ));
        }
        let mut approvers = BTreeMap::new();
        for (name, pem) in approvers_pem {
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                return Err(StatementError::new(
                    WHAT,
                    format!(
                        "approver name \"{}\" must be 1-128 printable characters",
                        name.escape_debug()
                    ),
                ));
            }
            let key = p256::PublicKey::from_public_key_pem(&pem).map_err(|_| {
                StatementError::new(
                    WHAT,
                    format!(
                        "approver \"{}\" has no P-256 public key in SPKI PEM",
                        name.escape_debug()
                    ),
                )
            })?;
            approvers.insert(name, key);
        }
        let digest = hex::encode(Sha256::digest(o.input.as_bytes()));
        Ok(Self {
            id: format!("{seq}-{}", digest.get(..16).unwrap_or_default()),
            seq,
            iat,
            files,
            approvers,
            jws: jws.trim().to_owned(),
        })
    }

    /// `<seq>-<16 hex digits of SHA-256 over the signing input>`: names the bundle in
    /// evidence, audit events and refusals.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The bundle's sequence number; a node only moves to a larger one.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// When the operator signed it, unix seconds.
    pub fn issued_at(&self) -> i64 {
        self.iat
    }

    /// The policy files, sorted by name.
    pub fn files(&self) -> &[(String, String)] {
        &self.files
    }

    /// The approvers whose signed approvals count, by name.
    pub fn approvers(&self) -> &BTreeMap<String, p256::PublicKey> {
        &self.approvers
    }

    /// The compact JWS as signed.
    pub fn jws(&self) -> &str {
        &self.jws
    }

    /// Whether a node holding `self` may move to `next`: a larger seq, or the very same
    /// bundle again. The error names both.
    pub fn may_move_to(&self, next: &PolicyBundle) -> Result<(), StatementError> {
        if next.seq > self.seq || next.id == self.id {
            Ok(())
        } else {
            Err(StatementError(format!(
                "policy bundle {} is not newer than the held bundle {} (seq {} <= {}): a rollback is refused; sign the set again with a larger seq",
                next.id, self.id, next.seq, self.seq
            )))
        }
    }
}

/// Names a public key as a `kid`: the first 16 bytes (hex) of SHA-256 over its SPKI DER.
pub fn key_thumbprint(key: &p256::PublicKey) -> String {
    let der = key
        .to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .unwrap_or_default();
    hex::encode(Sha256::digest(&der).get(..16).unwrap_or_default())
}

/// An approver's signed yes to one pending request (DESIGN.md §9): every member must
/// match the token the nodes are asked to sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalStatement {
    /// The pending request's id.
    pub approval_id: String,
    /// The approver's name as the bundle lists it (also the JWS `kid`).
    pub approver: String,
    /// The agent's SPIFFE ID (the token's `sub`).
    pub sub: String,
    /// The Cedar action, `issue_token`.
    pub action: String,
    /// The Cedar resource, `Audience::"<aud>"`.
    pub resource: String,
    /// The requested scopes, in request order.
    pub scopes: Vec<String>,
    /// The requested lifetime, seconds.
    pub ttl_seconds: u64,
    /// The task the token serves, if any.
    pub task_id: Option<String>,
    /// The caller's `--context` pairs.
    pub context: BTreeMap<String, String>,
    /// The DPoP key thumbprint the token is bound to, if any.
    pub jkt: Option<String>,
    /// When the approver signed, unix seconds.
    pub iat: i64,
    /// Until when the approval may be used, unix seconds.
    pub exp: i64,
}

impl ApprovalStatement {
    /// Signs the statement with the approver's key.
    pub fn sign(&self, key: &SigningKey) -> String {
        let payload = json!({
            "approval_id": self.approval_id,
            "approver": self.approver,
            "sub": self.sub,
            "action": self.action,
            "resource": self.resource,
            "scopes": self.scopes,
            "ttl_seconds": self.ttl_seconds,
            "task_id": self.task_id,
            "context": self.context,
            "jkt": self.jkt,
            "iat": self.iat,
            "exp": self.exp,
        });
        sign_jws(APPROVAL_TYP, &self.approver, &payload, key)
    }

    /// Verifies a statement against the approvers of `bundle` and checks that it is
    /// valid at `now` (unix seconds, `leeway` seconds of clock skew).
    pub fn verify(
        jws: &str,
        bundle: &PolicyBundle,
        now: i64,
        leeway: i64,
    ) -> Result<Self, StatementError> {
        const WHAT: &str = "approval";
        let o = open(jws, APPROVAL_TYP, WHAT)?;
        let key = bundle.approvers().get(&o.kid).ok_or_else(|| {
            StatementError::new(
                WHAT,
                format!(
                    "signed by \"{}\", who is no approver in policy bundle {}",
                    o.kid.escape_debug(),
                    bundle.id()
                ),
            )
        })?;
        verify_sig(&o, key, WHAT)?;
        let m = Members {
            map: &o.payload,
            what: WHAT,
        };
        m.only(&[
            "approval_id",
            "approver",
            "sub",
            "action",
            "resource",
            "scopes",
            "ttl_seconds",
            "task_id",
            "context",
            "jkt",
            "iat",
            "exp",
        ])?;
        let s = Self {
            approval_id: m.string("approval_id")?,
            approver: m.string("approver")?,
            sub: m.string("sub")?,
            action: m.string("action")?,
            resource: m.string("resource")?,
            scopes: m.strings("scopes")?,
            ttl_seconds: m.uint("ttl_seconds")?,
            task_id: m.opt_string("task_id")?,
            context: m.string_map("context")?,
            jkt: m.opt_string("jkt")?,
            iat: m.int("iat")?,
            exp: m.int("exp")?,
        };
        if s.approver != o.kid {
            return Err(StatementError::new(
                WHAT,
                "its approver differs from its kid",
            ));
        }
        if s.exp <= s.iat || s.exp - s.iat > MAX_APPROVAL_LIFETIME_SECONDS {
            return Err(StatementError::new(
                WHAT,
                format!("its lifetime must be 1 s to {MAX_APPROVAL_LIFETIME_SECONDS} s"),
            ));
        }
        if s.iat > now.saturating_add(leeway) {
            return Err(StatementError::new(
                WHAT,
                format!("issued in the future (iat {})", s.iat),
            ));
        }
        if s.exp.saturating_add(leeway) <= now {
            return Err(StatementError::new(WHAT, format!("expired at {}", s.exp)));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn files() -> Vec<(String, String)> {
        vec![(
            "a.cedar".into(),
            "permit (principal, action, resource);".into(),
        )]
    }

    fn bundle(op: &SigningKey, seq: u64) -> PolicyBundle {
        let mut approvers = BTreeMap::new();
        approvers.insert("alice".to_owned(), public_of(&key(9)));
        PolicyBundle::sign(op, seq, 1_700_000_000, files(), approvers).unwrap()
    }

    /// Re-signs `payload` under the bundle typ with `signer`.
    fn forge(payload: &Value, signer: &SigningKey) -> String {
        sign_jws(BUNDLE_TYP, "x", payload, signer)
    }

    #[test]
    fn a_bundle_verifies_only_under_the_operator_key() {
        let op = key(1);
        let b = bundle(&op, 3);
        let again = PolicyBundle::verify(b.jws(), &public_of(&op)).unwrap();
        assert_eq!(again.id(), b.id());
        assert!(again.id().starts_with("3-"));
        assert_eq!(again.files(), files().as_slice());
        assert!(again.approvers().contains_key("alice"));
        let e = PolicyBundle::verify(b.jws(), &public_of(&key(2))).unwrap_err();
        assert!(e.to_string().contains("signature does not verify"), "{e}");
    }

    #[test]
    fn tampered_unsigned_and_malformed_bundles_are_refused() {
        let op = key(1);
        let b = bundle(&op, 3);
        let (input, sig) = b.jws().rsplit_once('.').unwrap();
        let (h, _) = input.split_once('.').unwrap();
        // Another payload under the same header and signature.
        let evil = json!({"seq": 3, "iat": 1, "files": {"a.cedar": "permit (principal, action, resource);"}, "approvers": {}});
        let tampered = format!("{h}.{}.{sig}", URL_SAFE_NO_PAD.encode(evil.to_string()));
        let e = PolicyBundle::verify(&tampered, &public_of(&op)).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
        // alg none, no signature.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"quorate-policy-bundle+jwt","kid":"x"}"#),
            URL_SAFE_NO_PAD.encode(evil.to_string())
        );
        let e = PolicyBundle::verify(&none, &public_of(&op)).unwrap_err();
        assert!(e.to_string().contains("ES256"), "{e}");
        // Signed by the operator, but a duplicate member or an unknown one.
        let dup = r#"{"seq":3,"iat":1,"files":{"a.cedar":"permit (principal, action, resource);"},"approvers":{},"seq":9}"#;
        let header = URL_SAFE_NO_PAD
            .encode(r#"{"alg":"ES256","typ":"quorate-policy-bundle+jwt","kid":"x"}"#);
        let input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(dup));
        let sig: Signature = op.sign(input.as_bytes());
        let dup_jws = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()));
        let e = PolicyBundle::verify(&dup_jws, &public_of(&op)).unwrap_err();
        assert!(e.to_string().contains("unique"), "{e}");
        let mut extra = evil.clone();
        extra["admin"] = json!(true);
        let e = PolicyBundle::verify(&forge(&extra, &op), &public_of(&op)).unwrap_err();
        assert!(e.to_string().contains("unknown member \"admin\""), "{e}");
        let mut no_files = evil;
        no_files["files"] = json!({});
        let e = PolicyBundle::verify(&forge(&no_files, &op), &public_of(&op)).unwrap_err();
        assert!(e.to_string().contains("1 to"), "{e}");
    }

    #[test]
    fn a_node_moves_only_forward() {
        let op = key(1);
        let b3 = bundle(&op, 3);
        let b4 = bundle(&op, 4);
        assert!(b3.may_move_to(&b4).is_ok());
        assert!(b3.may_move_to(&b3.clone()).is_ok());
        let e = b4.may_move_to(&b3).unwrap_err();
        assert!(e.to_string().contains("rollback"), "{e}");
        // Same seq, other content: refused too.
        let other = PolicyBundle::sign(&op, 4, 5, files(), BTreeMap::new()).unwrap();
        assert!(b4.may_move_to(&other).is_err());
    }

    fn statement() -> ApprovalStatement {
        ApprovalStatement {
            approval_id: "ap1".into(),
            approver: "alice".into(),
            sub: "spiffe://d/agent/x".into(),
            action: "issue_token".into(),
            resource: "Audience::\"prod\"".into(),
            scopes: vec!["read".into()],
            ttl_seconds: 300,
            task_id: None,
            context: BTreeMap::new(),
            jkt: None,
            iat: 1000,
            exp: 1600,
        }
    }

    #[test]
    fn approvals_verify_only_by_a_listed_approver_within_their_window() {
        let b = bundle(&key(1), 1);
        let good = statement().sign(&key(9));
        assert_eq!(
            ApprovalStatement::verify(&good, &b, 1100, 60).unwrap(),
            statement()
        );
        // Another key claiming to be alice.
        let e = ApprovalStatement::verify(&statement().sign(&key(8)), &b, 1100, 60).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
        // Someone the bundle does not list.
        let mut bob = statement();
        bob.approver = "bob".into();
        let e = ApprovalStatement::verify(&bob.sign(&key(9)), &b, 1100, 60).unwrap_err();
        assert!(e.to_string().contains("no approver"), "{e}");
        let e = ApprovalStatement::verify(&good, &b, 1700, 60).unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
        let e = ApprovalStatement::verify(&good, &b, 800, 60).unwrap_err();
        assert!(e.to_string().contains("future"), "{e}");
        // A bundle is no approval.
        let e = ApprovalStatement::verify(b.jws(), &b, 1100, 60).unwrap_err();
        assert!(e.to_string().contains("typ"), "{e}");
    }
}
