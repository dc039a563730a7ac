//! Node identity signatures on round messages (DESIGN.md §4.2).
//!
//! Each fragment node signs every round message it deals with the key of its cluster
//! certificate (ECDSA P-256), so that recipients can tell a message altered by the relay
//! (signature fails: [`crate::Error::Unauthentic`]) from a dealer that misbehaved (signed,
//! but wrong: [`crate::Error::PeerMisbehaved`]). Binding the public key to a certificate
//! chain is the service layer's job; here a [`Roster`] maps each party to its verified
//! identity and hybrid KEM public keys.

use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};

use crate::error::{Error, Result};
use crate::group::Point;
use crate::hash::Transcript;
use crate::params::{PartyIndex, PartySet};
use crate::seal::KemPublicKey;
use crate::secret::SecretScalar;

/// Length of an identity signature (raw `r || s`).
pub const SIGNATURE_LEN: usize = 64;

/// A node's identity signing key (the private key of its certificate).
pub struct IdentityKey(SigningKey);

impl IdentityKey {
    /// A fresh key.
    pub fn generate(rng: &mut (impl rand_core::CryptoRng + ?Sized)) -> Result<Self> {
        let s = SecretScalar::random(rng);
        Self::from_secret_bytes(&s.secret_bytes()[..])
    }

    /// From a 32-byte private scalar.
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self> {
        SigningKey::from_slice(bytes)
            .map(IdentityKey)
            .map_err(|_| Error::input("identity key must be a 32-byte non-zero scalar below q"))
    }

    /// The public key.
    pub fn public(&self) -> IdentityPublic {
        IdentityPublic(*self.0.verifying_key())
    }

    /// Signs `msg` under the domain `purpose`.
    pub fn sign(&self, purpose: &str, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
        let sig: Signature = self.0.sign(&signed_bytes(purpose, msg));
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(&sig.to_bytes());
        out
    }
}

impl core::fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("IdentityKey(<redacted>)")
    }
}

fn signed_bytes(purpose: &str, msg: &[u8]) -> Vec<u8> {
    let mut t = Transcript::new("quorate/identity-signature/v1");
    t.append("purpose", purpose.as_bytes()).append("msg", msg);
    t.digest().to_vec()
}

/// A node's identity public key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityPublic(VerifyingKey);

impl IdentityPublic {
    /// From a compressed SEC1 point.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let p = Point::from_bytes(bytes)?;
        VerifyingKey::from_sec1_bytes(&p.to_bytes())
            .map(IdentityPublic)
            .map_err(|_| Error::input("identity public key is not a valid P-256 key"))
    }

    /// Compressed SEC1 encoding.
    pub fn to_bytes(&self) -> [u8; 33] {
        let enc = self.0.to_sec1_point(true);
        let mut out = [0u8; 33];
        out.copy_from_slice(enc.as_bytes());
        out
    }

    /// Whether `sig` (raw `r || s`, [`SIGNATURE_LEN`] bytes) is this key's signature on
    /// `msg` under `purpose`. Verified by aws-lc (ECDSA P-256 with SHA-256, several
    /// times faster than p256's verification, which the tests keep as the reference):
    /// the coordinator checks one per signature share.
    pub fn verify(&self, purpose: &str, msg: &[u8], sig: &[u8]) -> bool {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
        if sig.len() != SIGNATURE_LEN {
            return false;
        }
        let public = self.0.to_sec1_point(false);
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public.as_bytes())
            .verify(&signed_bytes(purpose, msg), sig)
            .is_ok()
    }

    /// p256's verification of the same statement: the reference for [`Self::verify`].
    #[cfg(test)]
    fn verify_p256(&self, purpose: &str, msg: &[u8], sig: &[u8]) -> bool {
        use p256::ecdsa::signature::Verifier;
        let Ok(sig) = Signature::from_slice(sig) else {
            return false;
        };
        self.0.verify(&signed_bytes(purpose, msg), &sig).is_ok()
    }
}

/// The public material of one node, as verified by the service layer.
#[derive(Clone, Debug)]
pub struct NodePublic {
    /// Identity key (from its certificate).
    pub identity: IdentityPublic,
    /// Static hybrid KEM key for sealing shares to it.
    pub kem: KemPublicKey,
}

/// The verified public material of the nodes taking part in a run, by party index
/// (indices may have gaps: a key resharded onto `{1, 3, 4}`).
#[derive(Clone, Debug)]
pub struct Roster {
    /// Slot `k` belongs to party `k + 1`.
    nodes: Vec<Option<NodePublic>>,
}

impl Roster {
    /// A roster of parties `1..=nodes.len()`; entry `k` belongs to party `k + 1`.
    pub fn new(nodes: Vec<NodePublic>) -> Result<Self> {
        if nodes.is_empty() || nodes.len() > usize::from(crate::params::MAX_PARTIES) {
            return Err(Error::input("roster must list between 1 and 255 nodes"));
        }
        Ok(Roster {
            nodes: nodes.into_iter().map(Some).collect(),
        })
    }

    /// A roster of the given parties. Errors if it is empty or names a party twice.
    pub fn from_entries(entries: Vec<(PartyIndex, NodePublic)>) -> Result<Self> {
        let top = entries
            .iter()
            .map(|(i, _)| i.get())
            .max()
            .ok_or_else(|| Error::input("roster must list between 1 and 255 nodes"))?;
        let mut nodes: Vec<Option<NodePublic>> = vec![None; usize::from(top)];
        for (i, node) in entries {
            let slot = nodes
                .get_mut(usize::from(i.get()) - 1)
                .ok_or(Error::Bug("roster slot below the highest index"))?;
            if slot.replace(node).is_some() {
                return Err(Error::input(format!("roster lists node {i} twice")));
            }
        }
        Ok(Roster { nodes })
    }

    /// The node with index `i`.
    pub fn get(&self, i: PartyIndex) -> Result<&NodePublic> {
        self.nodes
            .get(usize::from(i.get()) - 1)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::input(format!("party {i} is not in the roster")))
    }

    /// Number of nodes listed.
    pub fn len(&self) -> usize {
        self.nodes.iter().flatten().count()
    }

    /// Whether the roster is empty (never: the constructors reject that).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that every member of `set` is in the roster.
    pub fn covers(&self, set: &PartySet) -> Result<()> {
        set.members()
            .iter()
            .try_for_each(|&p| self.get(p).map(|_| ()))
    }

    /// Seals `plain` to `recipient`'s KEM key under the context
    /// `(session, round, dealer, recipient)` (DESIGN.md §4.2).
    pub fn seal_to(
        &self,
        rng: &mut (impl rand_core::CryptoRng + ?Sized),
        session: crate::params::SessionId,
        round: u8,
        dealer: PartyIndex,
        recipient: PartyIndex,
        plain: &[u8],
    ) -> Result<crate::seal::Sealed> {
        let ctx = crate::seal::SealContext {
            session,
            round,
            dealer,
            recipient,
        };
        crate::seal::seal(rng, &self.get(recipient)?.kem, &ctx, plain)
    }

    /// Verifies `sig` by party `sender` on `msg` under `purpose`; a failure means the
    /// relay altered the message.
    pub fn verify_from(
        &self,
        sender: PartyIndex,
        purpose: &str,
        msg: &[u8],
        sig: &[u8],
    ) -> Result<()> {
        if self.get(sender)?.identity.verify(purpose, msg, sig) {
            Ok(())
        } else {
            Err(Error::Unauthentic {
                claimed_sender: sender,
            })
        }
    }
}

/// Gives a round message (a struct with a `sig` field and a [`crate::wire::Wire`]
/// encoding) its signing purpose, `sign`, `unsigned_bytes` (the encoding with a zeroed
/// signature, which is what is signed) and, for tests, `resign`.
macro_rules! signed_message {
    ($ty:ident, $purpose:literal) => {
        impl $ty {
            const PURPOSE: &'static str = $purpose;
            fn unsigned_bytes(&self) -> Vec<u8> {
                $crate::wire::Wire::to_bytes(&$ty {
                    sig: [0; $crate::identity::SIGNATURE_LEN],
                    ..self.clone()
                })
            }
            fn sign(&mut self, id: &$crate::identity::IdentityKey) {
                self.sig = id.sign(Self::PURPOSE, &self.unsigned_bytes());
            }
            /// Test support: re-signs the message after an adversary changed it, as a
            /// malicious sender would.
            #[cfg(any(test, feature = "test-support"))]
            pub fn resign(&mut self, id: &$crate::identity::IdentityKey) {
                self.sign(id);
            }
        }
    };
}
pub(crate) use signed_message;

#[cfg(test)]
mod tests {
    use super::*;

    /// aws-lc's verification against p256's on valid, altered and malformed signatures,
    /// including the high-s twin `(r, q − s)` of each valid one.
    #[test]
    fn verify_agrees_with_p256() {
        let mut rng = crate::sim::test_rng("identity-verify");
        for i in 0..40u8 {
            let key = IdentityKey::generate(&mut rng).unwrap();
            let public = IdentityPublic::from_bytes(&key.public().to_bytes()).unwrap();
            let msg = [i; 50];
            let sig = key.sign("round-1", &msg);
            let mut cases: Vec<(&str, Vec<u8>, Vec<u8>)> =
                vec![("round-1", msg.to_vec(), sig.to_vec())];
            let mut flipped = sig;
            flipped[usize::from(i) % SIGNATURE_LEN] ^= 1;
            cases.push(("round-1", msg.to_vec(), flipped.to_vec()));
            cases.push(("round-2", msg.to_vec(), sig.to_vec()));
            cases.push(("round-1", [i ^ 1; 50].to_vec(), sig.to_vec()));
            cases.push(("round-1", msg.to_vec(), sig[..63].to_vec()));
            cases.push(("round-1", msg.to_vec(), vec![0; SIGNATURE_LEN]));
            let s = crate::group::scalar_from_bytes(&sig[32..]).unwrap();
            let mut high = sig;
            high[32..].copy_from_slice(&crate::group::scalar_to_bytes(&-s));
            cases.push(("round-1", msg.to_vec(), high.to_vec()));
            for (n, (purpose, m, sg)) in cases.iter().enumerate() {
                assert_eq!(
                    public.verify(purpose, m, sg),
                    public.verify_p256(purpose, m, sg),
                    "key {i}, case {n}"
                );
            }
            assert!(public.verify("round-1", &msg, &sig));
            assert!(!public.verify("round-1", &msg, &flipped));
        }
    }
}
