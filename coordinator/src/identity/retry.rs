//! Retry-safe token requests (`IssueTokenRequest.request_id`,
//! `ExchangeTokenRequest.request_id`).
//!
//! A client that may retry a token request (after a timeout, or on another coordinator
//! after one failed) sends a fresh `request_id` with it and the same id on every retry.
//! The coordinator keys the request by `(caller, request_id)` and records, in the shared
//! store ([`IdentityStore::issuance_begin`](super::store::IdentityStore::issuance_begin)):
//! the request's digest, the claims chosen for it, and the answer given. So:
//!
//! - every retry of one request signs the same claims (one `jti`), and once one attempt
//!   has answered, every later retry gets that same token without signing again;
//! - the one-use `jti`s the request spent (its client assertion, its DPoP proof) and its
//!   approval are marked with the request's key, so a retry is not refused as its own
//!   replay, while any other request reusing them still is;
//! - a different request under a used id is refused.
//!
//! The recorded answer holds the token, a bearer credential, so it is sealed
//! (AES-256-GCM) under a key derived from the caller and the `request_id`, which the store
//! never holds (it keys the record by another hash of them): a reader of the store learns
//! claims, not tokens. The seal is as strong as the id is unguessable (the client library
//! sends 132 random bits). Records are kept for [`RETRY_WINDOW_SECONDS`].

use std::collections::BTreeMap;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use super::IdentityError;

/// How long a retry-safe request's record is kept (seconds): retries after that are new
/// requests.
pub const RETRY_WINDOW_SECONDS: i64 = 900;

/// The shortest and longest `request_id` accepted.
const ID_LEN: std::ops::RangeInclusive<usize> = 16..=64;

/// A retry-safe request's identity and content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    /// The id the client sent.
    pub request_id: String,
    /// Hex SHA-256 of (caller, request id): the store's key.
    pub key: String,
    /// Hex SHA-256 of the request's content.
    pub digest: String,
    /// Seals the recorded answer; derived from (caller, request id), never stored.
    seal_key: SealKey,
}

/// An AES-256 key that `Debug` does not print, zeroized on drop.
#[derive(Clone, PartialEq, Eq)]
struct SealKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(<redacted>)")
    }
}

/// The content of a token request that a retry must repeat exactly: everything but the
/// approval id and how long to wait (a poll is a retry of the same request). `Debug`
/// does not print the credentials or the DPoP proof.
pub struct Content<'a> {
    /// `issue` or `exchange`.
    pub kind: &'a str,
    /// The attestation (or, for an exchange, the subject token and the actor's
    /// attestation), as sent.
    pub credentials: &'a [&'a str],
    /// The audience.
    pub audience: &'a str,
    /// The scopes, in order.
    pub scopes: &'a [String],
    /// Seconds.
    pub ttl_seconds: u64,
    /// The task id, or empty.
    pub task_id: &'a str,
    /// Policy context.
    pub context: &'a BTreeMap<String, String>,
    /// The DPoP proof, or empty.
    pub dpop_proof: &'a str,
}

impl std::fmt::Debug for Content<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Content")
            .field("kind", &self.kind)
            .field(
                "credentials",
                &format_args!("<{} redacted>", self.credentials.len()),
            )
            .field("audience", &self.audience)
            .field("scopes", &self.scopes)
            .field("ttl_seconds", &self.ttl_seconds)
            .field("task_id", &self.task_id)
            .field("context", &self.context)
            .field("dpop_proof", &format_args!("<redacted>"))
            .finish()
    }
}

impl Retry {
    /// `None` for an empty `request_id` (no retry safety); the request's retry identity
    /// otherwise. `caller` is who sent it: the cluster client's id, or the agent's SPIFFE
    /// ID on the agent listener.
    ///
    /// Errors: [`IdentityError::Invalid`] naming `request_id` when it is not 16 to 64
    /// characters of `[A-Za-z0-9_-]`.
    pub fn new(
        caller: &str,
        request_id: &str,
        content: &Content<'_>,
    ) -> Result<Option<Self>, IdentityError> {
        if request_id.is_empty() {
            return Ok(None);
        }
        if !ID_LEN.contains(&request_id.len())
            || !request_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(IdentityError::Invalid(format!(
                "request_id must be {} to {} characters of [A-Za-z0-9_-] (got {} characters); use a fresh random id per request, the same on every retry",
                ID_LEN.start(),
                ID_LEN.end(),
                request_id.chars().count()
            )));
        }
        let mut key = Sha256::new();
        field(&mut key, b"quorate-request-key-v1");
        field(&mut key, caller.as_bytes());
        field(&mut key, request_id.as_bytes());
        let mut seal = Sha256::new();
        field(&mut seal, b"quorate-request-seal-v1");
        field(&mut seal, caller.as_bytes());
        field(&mut seal, request_id.as_bytes());
        let mut d = Sha256::new();
        field(&mut d, b"quorate-request-v1");
        field(&mut d, content.kind.as_bytes());
        field(&mut d, &(content.credentials.len() as u64).to_be_bytes());
        for c in content.credentials {
            field(&mut d, c.as_bytes());
        }
        field(&mut d, content.audience.as_bytes());
        field(&mut d, &(content.scopes.len() as u64).to_be_bytes());
        for s in content.scopes {
            field(&mut d, s.as_bytes());
        }
        field(&mut d, &content.ttl_seconds.to_be_bytes());
        field(&mut d, content.task_id.as_bytes());
        field(&mut d, &(content.context.len() as u64).to_be_bytes());
        for (k, v) in content.context {
            field(&mut d, k.as_bytes());
            field(&mut d, v.as_bytes());
        }
        field(&mut d, content.dpop_proof.as_bytes());
        Ok(Some(Retry {
            request_id: request_id.to_owned(),
            key: hex::encode(key.finalize()),
            digest: hex::encode(d.finalize()),
            seal_key: SealKey(Zeroizing::new(seal.finalize().into())),
        }))
    }

    fn cipher(&self) -> Result<Aes256Gcm, IdentityError> {
        Aes256Gcm::new_from_slice(&self.seal_key.0[..])
            .map_err(|_| IdentityError::Invalid("AES-256-GCM key length".into()))
    }

    /// Seals `answer` for the store: hex of `nonce (12 bytes) || ciphertext || tag`, the
    /// record's key as associated data. `nonce` must be fresh (random) per call.
    pub fn seal(&self, answer: &str, nonce: [u8; 12]) -> Result<String, IdentityError> {
        let ct = self
            .cipher()?
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: answer.as_bytes(),
                    aad: self.key.as_bytes(),
                },
            )
            .map_err(|_| IdentityError::Invalid("sealing the recorded answer failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(hex::encode(out))
    }

    /// Opens an answer [`Self::seal`]ed for this request. Errors
    /// ([`IdentityError::Store`]) if it was not sealed for it or was altered.
    pub fn open(&self, sealed: &str) -> Result<String, IdentityError> {
        let bad = || {
            IdentityError::Store(format!(
                "request {}: the recorded answer does not open",
                self.request_id
            ))
        };
        let bytes = hex::decode(sealed).map_err(|_| bad())?;
        let (nonce, ct) = bytes.split_at_checked(12).ok_or_else(bad)?;
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| bad())?;
        let plain = self
            .cipher()?
            .decrypt(
                &nonce.into(),
                Payload {
                    msg: ct,
                    aad: self.key.as_bytes(),
                },
            )
            .map_err(|_| bad())?;
        String::from_utf8(plain).map_err(|_| bad())
    }

    /// The refusal of a different request sent under this id.
    pub fn reused(&self) -> IdentityError {
        IdentityError::Invalid(format!(
            "request_id {} was already used for a different request: a retry must repeat the request exactly; send a new request with a fresh request_id",
            self.request_id
        ))
    }
}

/// Length-prefixed, so that no two field lists hash alike.
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn content<'a>(scopes: &'a [String], ctx: &'a BTreeMap<String, String>) -> Content<'a> {
        Content {
            kind: "issue",
            credentials: &["att"],
            audience: "tools",
            scopes,
            ttl_seconds: 60,
            task_id: "",
            context: ctx,
            dpop_proof: "",
        }
    }

    #[test]
    fn ids_are_checked_and_keys_bind_caller_and_content() {
        let ctx = BTreeMap::new();
        let read = vec!["read".to_owned()];
        let write = vec!["write".to_owned()];
        assert_eq!(Retry::new("c", "", &content(&read, &ctx)).unwrap(), None);
        for bad in ["short", "has space in it!!!!", &"x".repeat(65)] {
            let e = Retry::new("c", bad, &content(&read, &ctx)).unwrap_err();
            assert!(e.to_string().contains("request_id must be"), "{e}");
        }
        let id = "0123456789abcdef-_";
        let a = Retry::new("c", id, &content(&read, &ctx)).unwrap().unwrap();
        let again = Retry::new("c", id, &content(&read, &ctx)).unwrap().unwrap();
        assert_eq!(a, again);
        let other_caller = Retry::new("d", id, &content(&read, &ctx)).unwrap().unwrap();
        assert_ne!(a.key, other_caller.key);
        assert_eq!(a.digest, other_caller.digest);
        let other_scope = Retry::new("c", id, &content(&write, &ctx))
            .unwrap()
            .unwrap();
        assert_eq!(a.key, other_scope.key);
        assert_ne!(a.digest, other_scope.digest);
        // The answer is sealed for this caller and id only.
        let sealed = a.seal("token", [7; 12]).unwrap();
        assert!(!sealed.contains(&hex::encode("token")));
        assert_eq!(again.open(&sealed).unwrap(), "token");
        assert!(other_caller.open(&sealed).is_err());
        let mut altered = sealed.clone().into_bytes();
        altered[30] = if altered[30] == b'0' { b'1' } else { b'0' };
        assert!(a.open(&String::from_utf8(altered).unwrap()).is_err());
        assert!(!format!("{a:?}").contains(&hex::encode(&a.seal_key.0[..])));
    }
}
