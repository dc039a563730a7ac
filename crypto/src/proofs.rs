//! Zero-knowledge proofs (DESIGN.md §4.3–4.6), non-interactive by Fiat–Shamir.
//!
//! Proofs carry their commitment points (not the challenge), so verification is a set of
//! linear claims that a [`BatchVerifier`] checks together with everything else. The
//! verifier states the statement's points as [`Form`]s, so a public share or a batch's
//! aggregated commitment never has to be computed point by point.
//!
//! **Binding.** The challenge hashes the caller's `ctx` and the proof's commitments.
//! The caller's `ctx` must fix the statement: it binds the session, the party, and either
//! the statement's points or public data that determines them (every commitment a
//! dealer committed to, the μ values). Each protocol documents what its `ctx` binds.
//!
//! - [`SchnorrProof`]: knowledge of `x` with `X = x·G`.
//! - [`DleqProof`]: one `w` with `A = w·B1` and `C = w·B2`.
//! - [`LinearProof`]: knowledge of `(x, y)` with `X = x·G`, `Y = y·G`, `C = x·P + y·A`
//!   (the masked threshold-DH partial of §4.6).

use p256::ProjectivePoint;
use rand_core::CryptoRng;

use crate::batch::{BatchVerifier, Form};
use crate::error::{Fault, Result};
use crate::group::{self, Point, Scalar};
use crate::hash::Transcript;
use crate::params::PartyIndex;
use crate::secret::SecretScalar;
use crate::wire::{Reader, Writer};

fn challenge(tag: &str, ctx: &[u8], commitments: &[&Point]) -> Scalar {
    let mut t = Transcript::new(tag);
    t.append("ctx", ctx);
    for c in commitments {
        t.point("T", c);
    }
    t.challenge(tag)
}

/// Proof of knowledge of the discrete log of `X`. `ctx` must bind `X`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchnorrProof {
    r: Point,
    z: Scalar,
}

impl SchnorrProof {
    /// Proves knowledge of `secret`.
    pub fn prove(
        rng: &mut (impl CryptoRng + ?Sized),
        ctx: &[u8],
        secret: &SecretScalar,
    ) -> Result<Self> {
        let k = SecretScalar::random(rng);
        let r = Point::nonzero(k.public_image(), "schnorr nonce commitment is the identity")?;
        let c = challenge("schnorr", ctx, &[&r]);
        let z = *k.expose() + c * secret.expose();
        Ok(SchnorrProof { r, z })
    }

    /// Adds `z·G − R − c·X = O` to `batch`, blaming `culprit`.
    pub fn verify_into(
        &self,
        ctx: &[u8],
        public: &Form,
        batch: &mut BatchVerifier,
        culprit: PartyIndex,
        fault: Fault,
    ) {
        let c = challenge("schnorr", ctx, &[&self.r]);
        let mut f = Form::g_times(self.z);
        f.add_scaled(&Form::point(&self.r), -Scalar::ONE);
        f.add_scaled(public, -c);
        batch.push_form(culprit, fault, f);
    }

    /// Encodes the proof.
    pub fn encode(&self, w: &mut Writer) {
        w.point(&self.r);
        w.scalar(&self.z);
    }

    /// Decodes a proof.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(SchnorrProof {
            r: r.point()?,
            z: r.scalar()?,
        })
    }
}

/// A base as the prover knows it: the generator, a point, or a point `s·G` whose
/// discrete log `s` the prover holds — then `k·(s·G)` is computed as `(k·s)·G` with the
/// fixed-base table, which is several times cheaper than a variable-base
/// multiplication.
#[derive(Clone, Copy, Debug)]
pub enum Base<'a> {
    /// The generator `G`.
    G,
    /// Another point.
    Point(Point),
    /// `s·G` for a secret `s` the prover knows.
    KnownLog(&'a SecretScalar),
}

impl Base<'_> {
    fn mul(&self, k: &Scalar) -> ProjectivePoint {
        match self {
            Base::G => group::mul_g(k),
            Base::Point(p) => group::mul(p, k),
            Base::KnownLog(s) => group::mul_g(&(*k * s.expose())),
        }
    }
}

/// Proof that `log_{B1} A = log_{B2} C`. `ctx` must bind `B1, A, B2, C`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DleqProof {
    t1: Point,
    t2: Point,
    z: Scalar,
}

/// The verifier's view of a DLEQ statement `A = w·B1`, `C = w·B2`.
pub struct DleqForms<'a> {
    /// First base.
    pub b1: &'a Form,
    /// First image.
    pub a: &'a Form,
    /// Second base.
    pub b2: &'a Form,
    /// Second image.
    pub c: &'a Form,
}

impl DleqProof {
    /// Proves `A = w·B1`, `C = w·B2` with witness `w`.
    pub fn prove(
        rng: &mut (impl CryptoRng + ?Sized),
        ctx: &[u8],
        b1: Base<'_>,
        b2: Base<'_>,
        w: &SecretScalar,
    ) -> Result<Self> {
        let k = SecretScalar::random(rng);
        let t1 = Point::nonzero(b1.mul(k.expose()), "dleq commitment is the identity")?;
        let t2 = Point::nonzero(b2.mul(k.expose()), "dleq commitment is the identity")?;
        let c = challenge("dleq", ctx, &[&t1, &t2]);
        let z = *k.expose() + c * w.expose();
        Ok(DleqProof { t1, t2, z })
    }

    /// Adds `z·B1 − T1 − c·A = O` and `z·B2 − T2 − c·C = O` to `batch`.
    pub fn verify_into(
        &self,
        ctx: &[u8],
        s: &DleqForms<'_>,
        batch: &mut BatchVerifier,
        culprit: PartyIndex,
        fault: Fault,
    ) {
        let c = challenge("dleq", ctx, &[&self.t1, &self.t2]);
        for (base, t, img) in [(s.b1, &self.t1, s.a), (s.b2, &self.t2, s.c)] {
            let mut f = base.scaled(self.z);
            f.add_scaled(&Form::point(t), -Scalar::ONE);
            f.add_scaled(img, -c);
            batch.push_form(culprit, fault, f);
        }
    }

    /// Encodes the proof.
    pub fn encode(&self, w: &mut Writer) {
        w.point(&self.t1);
        w.point(&self.t2);
        w.scalar(&self.z);
    }

    /// Decodes a proof.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(DleqProof {
            t1: r.point()?,
            t2: r.point()?,
            z: r.scalar()?,
        })
    }
}

/// Proof of knowledge of `(x, y)` with `X = x·G`, `Y = y·G`, `C = x·P + y·A`.
/// `ctx` must bind `X, Y, P, A, C`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearProof {
    t1: Point,
    t2: Point,
    t3: Point,
    z1: Scalar,
    z2: Scalar,
}

/// The verifier's view of a [`LinearProof`] statement.
pub struct LinearForms<'a> {
    /// `X`.
    pub x: &'a Form,
    /// `Y`.
    pub y: &'a Form,
    /// `P`.
    pub p: &'a Form,
    /// `A`.
    pub a: &'a Form,
    /// `C`.
    pub c: &'a Form,
}

impl LinearProof {
    /// Proves the statement for input point `p` and requester point `a`.
    pub fn prove(
        rng: &mut (impl CryptoRng + ?Sized),
        ctx: &[u8],
        p: &Point,
        a: &Point,
        x: &SecretScalar,
        y: &SecretScalar,
    ) -> Result<Self> {
        let k1 = SecretScalar::random(rng);
        let k2 = SecretScalar::random(rng);
        let t1 = Point::nonzero(k1.public_image(), "linear commitment is the identity")?;
        let t2 = Point::nonzero(k2.public_image(), "linear commitment is the identity")?;
        let t3 = Point::nonzero(
            group::mul(p, k1.expose()) + group::mul(a, k2.expose()),
            "linear commitment is the identity",
        )?;
        let c = challenge("linear", ctx, &[&t1, &t2, &t3]);
        Ok(LinearProof {
            t1,
            t2,
            t3,
            z1: *k1.expose() + c * x.expose(),
            z2: *k2.expose() + c * y.expose(),
        })
    }

    /// Adds the three verification equations to `batch`.
    pub fn verify_into(
        &self,
        ctx: &[u8],
        s: &LinearForms<'_>,
        batch: &mut BatchVerifier,
        culprit: PartyIndex,
        fault: Fault,
    ) {
        let c = challenge("linear", ctx, &[&self.t1, &self.t2, &self.t3]);
        let m1 = -Scalar::ONE;
        let mut f1 = Form::g_times(self.z1);
        f1.add_scaled(&Form::point(&self.t1), m1);
        f1.add_scaled(s.x, -c);
        batch.push_form(culprit, fault, f1);
        let mut f2 = Form::g_times(self.z2);
        f2.add_scaled(&Form::point(&self.t2), m1);
        f2.add_scaled(s.y, -c);
        batch.push_form(culprit, fault, f2);
        let mut f3 = s.p.scaled(self.z1);
        f3.add_scaled(s.a, self.z2);
        f3.add_scaled(&Form::point(&self.t3), m1);
        f3.add_scaled(s.c, -c);
        batch.push_form(culprit, fault, f3);
    }

    /// Encodes the proof.
    pub fn encode(&self, w: &mut Writer) {
        w.point(&self.t1);
        w.point(&self.t2);
        w.point(&self.t3);
        w.scalar(&self.z1);
        w.scalar(&self.z2);
    }

    /// Decodes a proof.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self> {
        Ok(LinearProof {
            t1: r.point()?,
            t2: r.point()?,
            t3: r.point()?,
            z1: r.scalar()?,
            z2: r.scalar()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(i: u16) -> PartyIndex {
        PartyIndex::new(i).unwrap()
    }

    fn rand_point(rng: &mut impl CryptoRng) -> Point {
        Point::new(SecretScalar::random(rng).public_image()).unwrap()
    }

    #[test]
    fn schnorr_accepts_and_rejects() {
        let mut rng = crate::sim::test_rng("schnorr");
        let x = SecretScalar::random(&mut rng);
        let xp = Point::new(x.public_image()).unwrap();
        let proof = SchnorrProof::prove(&mut rng, b"ctx", &x).unwrap();
        let mut b = BatchVerifier::new();
        proof.verify_into(
            b"ctx",
            &Form::point(&xp),
            &mut b,
            p(1),
            Fault::BadProofOfKnowledge,
        );
        assert!(b.verify(&mut rng).is_ok());
        let mut b = BatchVerifier::new();
        proof.verify_into(
            b"other",
            &Form::point(&xp),
            &mut b,
            p(1),
            Fault::BadProofOfKnowledge,
        );
        assert_eq!(b.verify(&mut rng).unwrap_err().culprits(), &[p(1)]);
        let other = rand_point(&mut rng);
        let mut b = BatchVerifier::new();
        proof.verify_into(
            b"ctx",
            &Form::point(&other),
            &mut b,
            p(2),
            Fault::BadProofOfKnowledge,
        );
        assert_eq!(b.verify(&mut rng).unwrap_err().culprits(), &[p(2)]);
    }

    #[test]
    fn dleq_accepts_and_rejects() {
        let mut rng = crate::sim::test_rng("dleq");
        let w = SecretScalar::random(&mut rng);
        let b2 = rand_point(&mut rng);
        let a = Point::new(w.public_image()).unwrap();
        let c = Point::new(group::mul(&b2, w.expose())).unwrap();
        let proof = DleqProof::prove(&mut rng, b"c", Base::G, Base::Point(b2), &w).unwrap();
        let (fg, fa, fb2, fc) = (
            Form::generator(),
            Form::point(&a),
            Form::point(&b2),
            Form::point(&c),
        );
        let forms = DleqForms {
            b1: &fg,
            a: &fa,
            b2: &fb2,
            c: &fc,
        };
        let mut b = BatchVerifier::new();
        proof.verify_into(b"c", &forms, &mut b, p(1), Fault::BadMuProof);
        assert!(b.verify(&mut rng).is_ok());
        let wrong = Form::point(&rand_point(&mut rng));
        let bad = DleqForms { c: &wrong, ..forms };
        let mut b = BatchVerifier::new();
        proof.verify_into(b"c", &bad, &mut b, p(3), Fault::BadMuProof);
        assert_eq!(b.verify(&mut rng).unwrap_err().culprits(), &[p(3)]);
    }

    #[test]
    fn linear_accepts_and_rejects() {
        let mut rng = crate::sim::test_rng("linear");
        let x = SecretScalar::random(&mut rng);
        let y = SecretScalar::random(&mut rng);
        let pp = rand_point(&mut rng);
        let a = rand_point(&mut rng);
        let c = group::mul(&pp, x.expose()) + group::mul(&a, y.expose());
        let proof = LinearProof::prove(&mut rng, b"c", &pp, &a, &x, &y).unwrap();
        let fx = Form::point(&Point::new(x.public_image()).unwrap());
        let fy = Form::point(&Point::new(y.public_image()).unwrap());
        let (fp, fa) = (Form::point(&pp), Form::point(&a));
        let fc = Form::point(&Point::new(c).unwrap());
        let forms = LinearForms {
            x: &fx,
            y: &fy,
            p: &fp,
            a: &fa,
            c: &fc,
        };
        let mut b = BatchVerifier::new();
        proof.verify_into(b"c", &forms, &mut b, p(1), Fault::BadDhPartial);
        assert!(b.verify(&mut rng).is_ok());
        let wrong = Form::point(&Point::new(c + ProjectivePoint::GENERATOR).unwrap());
        let bad = LinearForms { c: &wrong, ..forms };
        let mut b = BatchVerifier::new();
        proof.verify_into(b"c", &bad, &mut b, p(2), Fault::BadDhPartial);
        assert_eq!(b.verify(&mut rng).unwrap_err().culprits(), &[p(2)]);
    }
}
