//! One-round threshold ES256 signing (DESIGN.md §4.5).
//!
//! `h = SHA-256(msg)` reduced mod q (callers may pass the 32-byte digest directly).
//! `δ = H2S("rerand", key_id || presig_id || R || h || X)` re-randomises the presignature
//! (Groth–Shoup), `R' = δ·R`, `r = x(R') mod q`. Node `j ∈ S` answers with
//! `s_j = δ⁻¹(h·w_j + r·v_j)`; the coordinator sums `s = Σ λ_j^S s_j`, normalises to low-s
//! and verifies `(r, s)` against `X`. Only if that fails are the shares checked one by
//! one — `s_j·G = δ⁻¹(h·W_j + r·V_j)` — to name the culprit.
//!
//! The node's side is a pure state transition over its presignature record
//! ([`sign_step`]): `Unused → Consumed(h)`; the same `h` again returns the same share (an
//! idempotent retry); any other `h`, key or signing set is refused. The caller must
//! durably persist the returned record — which no longer holds `w_j, v_j` — *before*
//! releasing the share.

use elliptic_curve::Field;
use rand_core::CryptoRng;

use crate::batch::{BatchVerifier, Form};
use crate::error::{Error, Fault, Refusal, Result};
use crate::group::{self, Point, Scalar};
use crate::hash::Transcript;
use crate::keys::{KeyId, KeyPublic, KeyPurpose};
use crate::params::{PartyIndex, PartySet, one_from_each};
use crate::presign::{PresigId, PresignaturePublic, PresignatureShare};
use crate::wire::{Reader, Wire, Writer};

/// A request to sign a 32-byte digest with one presignature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignRequest {
    /// The key.
    pub key_id: KeyId,
    /// The presignature to use.
    pub presig_id: PresigId,
    /// The signing set the coordinator expects (must equal the presignature's).
    pub sset: PartySet,
    /// `SHA-256(msg)`.
    pub digest: [u8; 32],
}

/// One node's signature share. Public: it reveals nothing beyond the signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureShare {
    /// The node.
    pub index: PartyIndex,
    /// The presignature used.
    pub presig_id: PresigId,
    s: Scalar,
}

/// A node's presignature record.
#[derive(Debug)]
pub enum PresigRecord {
    /// Never used: holds the secret shares.
    Unused(PresignatureShare),
    /// Used for exactly one digest: holds only public data.
    Consumed(ConsumedPresig),
}

/// A consumed presignature: the digest it signed and the share released for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumedPresig {
    /// Its id.
    pub id: PresigId,
    /// The key.
    pub key_id: KeyId,
    /// Its signing set.
    pub sset: PartySet,
    /// The one digest it signs.
    pub digest: [u8; 32],
    /// The share released for that digest.
    pub share: SignatureShare,
}

/// The outcome of a signing step: the record to persist and the share to release
/// (only after the record is durable).
#[derive(Debug)]
pub struct SignStep {
    /// The record that must be durably stored before `share` is released.
    pub record: ConsumedPresig,
    /// The share.
    pub share: SignatureShare,
    /// `false` if this repeats an earlier answer for the same digest.
    pub fresh: bool,
}

/// `(δ, r)` for a presignature and digest, with `r ≠ 0`.
fn rerandomize(
    key: &KeyPublic,
    id: &PresigId,
    r_point: &Point,
    digest: &[u8; 32],
) -> Result<(Scalar, Scalar)> {
    let mut t = Transcript::new("quorate/sign/rerand/v1");
    t.append("key", &key.key_id.0)
        .append("presig", &id.0)
        .point("R", r_point)
        .append("h", digest)
        .point("X", &key.public_key());
    let delta = t.challenge("rerand");
    if bool::from(delta.is_zero()) {
        return Err(Error::input(
            "re-randomiser is zero; use another presignature",
        ));
    }
    // R' = δ·R is never the identity: δ ≠ 0 and R is a valid point of prime order. Only
    // x(R') is needed, which is an ECDH P-256 agreement (aws-lc, several times faster
    // than p256; δ and R are public anyway).
    let r = group::reduce_digest(&group::x_of_mul_public(r_point, &delta)?);
    if bool::from(r.is_zero()) {
        return Err(Error::input("r is zero; use another presignature"));
    }
    Ok((delta, r))
}

/// The node's signing step (§4.5) as a pure state transition.
pub fn sign_step(key: &KeyPublic, record: &PresigRecord, req: &SignRequest) -> Result<SignStep> {
    key.purpose.require(KeyPurpose::Sign)?;
    if req.key_id != key.key_id {
        return Err(Error::Refused(Refusal::WrongKey));
    }
    match record {
        PresigRecord::Consumed(c) => {
            if c.id != req.presig_id {
                return Err(Error::Refused(Refusal::WrongPresignature));
            }
            if c.key_id != req.key_id {
                return Err(Error::Refused(Refusal::WrongKey));
            }
            if c.sset != req.sset {
                return Err(Error::Refused(Refusal::WrongSigningSet));
            }
            if c.digest != req.digest {
                return Err(Error::Refused(Refusal::PresignatureConsumed(
                    c.id.to_string(),
                )));
            }
            Ok(SignStep {
                record: c.clone(),
                share: c.share.clone(),
                fresh: false,
            })
        }
        PresigRecord::Unused(p) => {
            if p.id != req.presig_id {
                return Err(Error::Refused(Refusal::WrongPresignature));
            }
            if p.key_id != req.key_id {
                return Err(Error::Refused(Refusal::WrongKey));
            }
            if p.sset != req.sset {
                return Err(Error::Refused(Refusal::WrongSigningSet));
            }
            let (delta, r) = rerandomize(key, &p.id, &p.r, &req.digest)?;
            let h = group::reduce_digest(&req.digest);
            // δ is public (a hash of public values): variable-time inversion is safe.
            let delta_inv = group::invert_public(&delta).ok_or(Error::Bug("δ is zero"))?;
            let s = delta_inv * (h * p.w.expose() + r * p.v.expose());
            let share = SignatureShare {
                index: p.index,
                presig_id: p.id,
                s,
            };
            Ok(SignStep {
                record: ConsumedPresig {
                    id: p.id,
                    key_id: p.key_id,
                    sset: p.sset.clone(),
                    digest: req.digest,
                    share: share.clone(),
                },
                share,
                fresh: true,
            })
        }
    }
}

/// An ECDSA P-256 signature `(r, s)` with low `s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signature {
    r: Scalar,
    s: Scalar,
}

impl Signature {
    /// Raw `r || s` (64 bytes), the JWS ES256 form.
    pub fn to_raw(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&group::scalar_to_bytes(&self.r));
        out[32..].copy_from_slice(&group::scalar_to_bytes(&self.s));
        out
    }

    /// ASN.1 DER `ECDSA-Sig-Value`.
    pub fn to_der(&self) -> Result<Vec<u8>> {
        Ok(self.as_ecdsa()?.to_der().as_bytes().to_vec())
    }

    fn as_ecdsa(&self) -> Result<p256::ecdsa::Signature> {
        p256::ecdsa::Signature::from_scalars(self.r.to_bytes(), self.s.to_bytes())
            .map_err(|_| Error::Bug("signature scalars out of range"))
    }

    /// Verifies against public key `x` and the SHA-256 digest of the message: ES256
    /// verification of a prehash, by aws-lc-rs (about four times faster than p256's
    /// verifier, which the tests keep as the reference). Like p256's, aws-lc's verifier
    /// accepts high `s` as well; a [`Signature`] always has low `s`.
    pub fn verify(&self, x: &Point, digest: &[u8; 32]) -> bool {
        use aws_lc_rs::digest::{Digest, SHA256};
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
        // Only fails for a digest of the wrong length, and ours has SHA-256's 32 bytes.
        let Ok(digest) = Digest::import_less_safe(digest, &SHA256) else {
            return false;
        };
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, x.to_uncompressed())
            .verify_digest(&digest, &self.to_raw())
            .is_ok()
    }

    /// The previous verifier, p256's `verify_prehash`: the reference for [`Self::verify`].
    #[cfg(test)]
    fn verify_p256(&self, x: &Point, digest: &[u8; 32]) -> bool {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        let Ok(vk) = p256::ecdsa::VerifyingKey::from_affine(x.projective().to_affine()) else {
            return false;
        };
        let Ok(sig) = self.as_ecdsa() else {
            return false;
        };
        vk.verify_prehash(digest, &sig).is_ok()
    }
}

/// Coordinator: combine the shares of `S`, normalise, verify; only on failure check each
/// share and name the culprits. Never returns an invalid signature.
pub fn combine(
    rng: &mut (impl CryptoRng + ?Sized),
    key: &KeyPublic,
    presig: &PresignaturePublic,
    digest: &[u8; 32],
    shares: &[SignatureShare],
) -> Result<Signature> {
    if presig.key_id != key.key_id {
        return Err(Error::input("presignature belongs to another key"));
    }
    let ordered = one_from_each(shares, &presig.sset, |s| s.index)?;
    for s in &ordered {
        if s.presig_id != presig.id {
            return Err(Error::blame_one(s.index, Fault::BadSignatureShare));
        }
    }
    let (delta, r) = rerandomize(key, &presig.id, &presig.r, digest)?;
    // `ordered` and `lagrange_all` both follow the members of S in increasing order.
    let mut s = Scalar::ZERO;
    for (sh, (i, lambda)) in ordered.iter().zip(presig.sset.lagrange_all()?) {
        if sh.index != i {
            return Err(Error::Bug("shares and Lagrange coefficients out of step"));
        }
        s += lambda * sh.s;
    }
    if group::is_high(&s) {
        s = -s;
    }
    let sig = Signature { r, s };
    if !bool::from(s.is_zero()) && sig.verify(&key.public_key(), digest) {
        return Ok(sig);
    }
    // Identify the culprits: s_j·G = δ⁻¹(h·W_j + r·V_j).
    let h = group::reduce_digest(digest);
    let delta_inv = group::invert_public(&delta).ok_or(Error::Bug("δ is zero"))?;
    let mut batch = BatchVerifier::new();
    for sh in &ordered {
        let (w, v) = presig
            .public_shares(sh.index)
            .ok_or(Error::Bug("presignature lacks a member's public shares"))?;
        let mut f = Form::g_times(sh.s);
        f.add_scaled(&Form::point(&w), -(delta_inv * h));
        f.add_scaled(&Form::point(&v), -(delta_inv * r));
        batch.push_form(sh.index, Fault::BadSignatureShare, f);
    }
    batch.verify(rng)?;
    Err(Error::Bug(
        "combined signature is invalid although every share checks",
    ))
}

impl SignatureShare {
    /// Test support: corrupts the share, as a malicious node would.
    #[cfg(any(test, feature = "test-support"))]
    pub fn corrupt(&mut self) {
        self.s += Scalar::ONE;
    }
}

impl Wire for SignatureShare {
    const TAG: u8 = 0x51;
    const NAME: &'static str = "SignatureShare";
    fn encode_body(&self, w: &mut Writer) {
        w.party(self.index);
        w.fixed(&self.presig_id.0);
        w.scalar(&self.s);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        Ok(SignatureShare {
            index: r.party()?,
            presig_id: PresigId(r.array()?),
            s: r.scalar()?,
        })
    }
}

impl Wire for SignRequest {
    const TAG: u8 = 0x52;
    const NAME: &'static str = "SignRequest";
    fn encode_body(&self, w: &mut Writer) {
        w.fixed(&self.key_id.0);
        w.fixed(&self.presig_id.0);
        w.party_set(&self.sset);
        w.fixed(&self.digest);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        Ok(SignRequest {
            key_id: KeyId(r.array()?),
            presig_id: PresigId(r.array()?),
            sset: r.party_set()?,
            digest: r.array()?,
        })
    }
}

impl Wire for ConsumedPresig {
    const TAG: u8 = 0x53;
    const NAME: &'static str = "ConsumedPresig";
    fn encode_body(&self, w: &mut Writer) {
        w.fixed(&self.id.0);
        w.fixed(&self.key_id.0);
        w.party_set(&self.sset);
        w.fixed(&self.digest);
        w.nested(&self.share);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        Ok(ConsumedPresig {
            id: PresigId(r.array()?),
            key_id: KeyId(r.array()?),
            sset: r.party_set()?,
            digest: r.array()?,
            share: r.nested()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::{mul_g, random_nonzero};
    use rand_core::Rng;

    /// A textbook ECDSA signature over `digest` with key `d` and nonce `k`, without low-s
    /// normalisation (so both halves of the `s` range occur).
    fn ecdsa(d: &Scalar, k: &Scalar, digest: &[u8; 32]) -> Option<Signature> {
        let r = group::reduce_digest(&Point::new(mul_g(k))?.x_bytes());
        let s = group::invert(k)? * (group::reduce_digest(digest) + r * d);
        (!bool::from(r.is_zero()) && !bool::from(s.is_zero())).then_some(Signature { r, s })
    }

    /// Both verifiers give `want`.
    fn check(sig: &Signature, x: &Point, digest: &[u8; 32], want: bool, what: &str) {
        assert_eq!(sig.verify(x, digest), want, "aws-lc: {what}");
        assert_eq!(sig.verify_p256(x, digest), want, "p256: {what}");
    }

    #[test]
    fn verify_agrees_with_p256_reference() {
        let mut rng = crate::sim::test_rng("verify_vs_p256");
        let (mut high, mut low) = (0, 0);
        for i in 0..200u32 {
            let d = random_nonzero(&mut rng);
            let x = Point::new(mul_g(&d)).unwrap();
            let mut digest = [0u8; 32];
            rng.fill_bytes(&mut digest);
            if i % 20 == 0 {
                // A digest >= q: bits2int reduces it the same way in both.
                digest = [0xff; 32];
            }
            let sig = ecdsa(&d, &random_nonzero(&mut rng), &digest).unwrap();
            // Valid, in both halves of the `s` range: neither verifier insists on low s
            // (`combine` normalises to low s before it verifies, so it never relies on
            // that either way).
            let flipped = Signature {
                r: sig.r,
                s: -sig.s,
            };
            check(&sig, &x, &digest, true, "valid");
            check(&flipped, &x, &digest, true, "valid, s negated");
            if group::is_high(&sig.s) {
                high += 1;
            } else {
                low += 1;
            }
            // Tampered r, s, digest, key.
            let bad_r = Signature {
                r: sig.r + Scalar::ONE,
                s: sig.s,
            };
            check(&bad_r, &x, &digest, false, "r + 1");
            let bad_s = Signature {
                r: sig.r,
                s: sig.s + Scalar::ONE,
            };
            check(&bad_s, &x, &digest, false, "s + 1");
            let mut bad_digest = digest;
            bad_digest[usize::try_from(i).unwrap() % 32] ^= 1 << (i % 8);
            check(&sig, &x, &bad_digest, false, "digest bit flipped");
            let other = Point::new(mul_g(&(d + Scalar::ONE))).unwrap();
            check(&sig, &other, &digest, false, "other key");
            check(
                &sig,
                &Point::new(-x.projective()).unwrap(),
                &digest,
                false,
                "-X",
            );
            // Zero scalars are out of range for both.
            check(
                &Signature {
                    r: Scalar::ZERO,
                    s: sig.s,
                },
                &x,
                &digest,
                false,
                "r = 0",
            );
            check(
                &Signature {
                    r: sig.r,
                    s: Scalar::ZERO,
                },
                &x,
                &digest,
                false,
                "s = 0",
            );
        }
        assert!(
            high > 0 && low > 0,
            "both halves of the s range were exercised"
        );
    }

    #[test]
    fn verify_accepts_p256_signatures() {
        use p256::ecdsa::signature::hazmat::PrehashSigner;
        let mut rng = crate::sim::test_rng("verify_p256_signed");
        for _ in 0..50 {
            let d = random_nonzero(&mut rng);
            let sk = p256::ecdsa::SigningKey::from_bytes(&d.to_bytes()).unwrap();
            let mut digest = [0u8; 32];
            rng.fill_bytes(&mut digest);
            let sig: p256::ecdsa::Signature = sk.sign_prehash(&digest).unwrap();
            let (r, s) = sig.split_scalars();
            let sig = Signature { r: *r, s: *s };
            check(
                &sig,
                &Point::new(mul_g(&d)).unwrap(),
                &digest,
                true,
                "p256-signed",
            );
        }
    }

    /// The simulated protocol's signatures, which go through `combine` (and so through
    /// `rerandomize` and [`Signature::verify`]), are low-s and pass both verifiers.
    #[test]
    fn combined_signatures_pass_both_verifiers() {
        use crate::keys::KeyPurpose;
        use crate::sim::{Attack, Cluster};
        let mut c = Cluster::new(3, 1, crate::sim::test_rng("combine_both")).unwrap();
        let key = c.dkg(KeyPurpose::Sign, Attack::None).unwrap();
        c.presign(key.key_id, &[1, 2, 3], &[1, 2], 20, Attack::None)
            .unwrap();
        for i in 0..20u8 {
            let digest = crate::hash::sha256(&[i]);
            let sig = c.sign(key.key_id, digest, Attack::None).unwrap();
            assert!(!group::is_high(&sig.s));
            check(&sig, &key.public_key(), &digest, true, "combined");
        }
    }
}
