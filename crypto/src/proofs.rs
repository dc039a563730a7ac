//! Zero-knowledge proofs (DESIGN.md §4.3–4.6), non-interactive by Fiat–Shamir.
//!
//! Proofs carry their commitment points (not the challenge), so verification is a set of
//! linear claims that a [`BatchVerifier`] checks together with everything else. Every
//! challenge hashes the caller's context (session id, party, round), the statement and
//! the commitments through a [`Transcript`].
//!
//! - [`SchnorrProof`]: knowledge of `x` with `X = x·G`.
//! - [`DleqProof`]: one `w` with `A = w·B1` and `C = w·B2` (B1 is often `G`).
//! - [`LinearProof`]: knowledge of `(x, y)` with `X = x·G`, `Y = y·G`, `C = x·P + y·A`
//!   (the masked threshold-DH partial of §4.6).

use p256::ProjectivePoint;
use rand_core::CryptoRng;

use crate::batch::BatchVerifier;
use crate::error::{Fault, Result};
use crate::group::{self, Point, Scalar};
use crate::hash::Transcript;
use crate::params::PartyIndex;
use crate::secret::SecretScalar;
use crate::wire::{Reader, Writer};

/// Proof of knowledge of the discrete log of `X`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchnorrProof {
    r: Point,
    z: Scalar,
}

impl SchnorrProof {
    fn challenge(ctx: &[u8], x: &Point, r: &Point) -> Scalar {
        let mut t = Transcript::new("schnorr-pok");
        t.append("ctx", ctx).point("X", x).point("R", r);
        t.challenge("schnorr")
    }

    /// Proves knowledge of `secret` (with `public = secret·G`) bound to `ctx`.
    pub fn prove(
        rng: &mut (impl CryptoRng + ?Sized),
        ctx: &[u8],
        secret: &SecretScalar,
        public: &Point,
    ) -> Result<Self> {
        let k = SecretScalar::random(rng);
        let r = Point::nonzero(k.public_image(), "schnorr nonce commitment is the identity")?;
        let c = Self::challenge(ctx, public, &r);
        let z = *k.expose() + c * secret.expose();
        Ok(SchnorrProof { r, z })
    }

    /// Adds `z·G − R − c·X = O` to `batch`, blaming `culprit`.
    pub fn verify_into(
        &self,
        ctx: &[u8],
        public: &Point,
        batch: &mut BatchVerifier,
        culprit: PartyIndex,
        fault: Fault,
    ) {
        let c = Self::challenge(ctx, public, &self.r);
        batch.push(
            culprit,
            fault,
            self.z,
            vec![
                (self.r.projective(), -Scalar::ONE),
                (public.projective(), -c),
            ],
        );
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

/// A base for a DLEQ statement: the generator or a point.
#[derive(Clone, Copy, Debug)]
pub enum Base {
    /// The generator `G`.
    G,
    /// Another point.
    Point(Point),
}

impl Base {
    fn point(&self) -> Point {
        match self {
            Base::G => Point::GENERATOR,
            Base::Point(p) => *p,
        }
    }
    fn mul(&self, k: &Scalar) -> ProjectivePoint {
        match self {
            Base::G => group::mul_g(k),
            Base::Point(p) => group::mul(&p.projective(), k),
        }
    }
}

/// Proof that `log_{B1} A = log_{B2} C`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DleqProof {
    t1: Point,
    t2: Point,
    z: Scalar,
}

/// A DLEQ statement `A = w·B1`, `C = w·B2`.
#[derive(Clone, Copy, Debug)]
pub struct DleqStatement {
    /// First base.
    pub b1: Base,
    /// First image.
    pub a: Point,
    /// Second base.
    pub b2: Base,
    /// Second image.
    pub c: Point,
}

impl DleqStatement {
    fn challenge(&self, ctx: &[u8], t1: &Point, t2: &Point) -> Scalar {
        let mut t = Transcript::new("dleq");
        t.append("ctx", ctx)
            .point("B1", &self.b1.point())
            .point("A", &self.a)
            .point("B2", &self.b2.point())
            .point("C", &self.c)
            .point("T1", t1)
            .point("T2", t2);
        t.challenge("dleq")
    }
}

impl DleqProof {
    /// Proves the statement with witness `w`.
    pub fn prove(
        rng: &mut (impl CryptoRng + ?Sized),
        ctx: &[u8],
        stmt: &DleqStatement,
        w: &SecretScalar,
    ) -> Result<Self> {
        let k = SecretScalar::random(rng);
        let t1 = Point::nonzero(stmt.b1.mul(k.expose()), "dleq commitment is the identity")?;
        let t2 = Point::nonzero(stmt.b2.mul(k.expose()), "dleq commitment is the identity")?;
        let c = stmt.challenge(ctx, &t1, &t2);
        let z = *k.expose() + c * w.expose();
        Ok(DleqProof { t1, t2, z })
    }

    /// Adds `z·B1 − T1 − c·A = O` and `z·B2 − T2 − c·C = O` to `batch`.
    pub fn verify_into(
        &self,
        ctx: &[u8],
        stmt: &DleqStatement,
        batch: &mut BatchVerifier,
        culprit: PartyIndex,
        fault: Fault,
    ) {
        let c = stmt.challenge(ctx, &self.t1, &self.t2);
        for (base, t, img) in [(stmt.b1, self.t1, stmt.a), (stmt.b2, self.t2, stmt.c)] {
            let mut terms = vec![(t.projective(), -Scalar::ONE), (img.projective(), -c)];
            let g = match base {
                Base::G => self.z,
                Base::Point(p) => {
                    terms.push((p.projective(), self.z));
                    Scalar::ZERO
                }
            };
            batch.push(culprit, fault, g, terms);
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

/// The statement of a [`LinearProof`]: `X = x·G`, `Y = y·G`, `C = x·P + y·A`.
#[derive(Clone, Copy, Debug)]
pub struct LinearStatement {
    /// `X = x·G` (the prover's public key share).
    pub x: Point,
    /// `Y = y·G` (the prover's fresh mask).
    pub y: Point,
    /// The input point `P`.
    pub p: Point,
    /// The requester's ephemeral `A`.
    pub a: Point,
    /// `C = x·P + y·A`.
    pub c: Point,
}

/// Proof of knowledge of `(x, y)` for a [`LinearStatement`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearProof {
    t1: Point,
    t2: Point,
    t3: Point,
    z1: Scalar,
    z2: Scalar,
}

impl LinearStatement {
    fn challenge(&self, ctx: &[u8], t1: &Point, t2: &Point, t3: &Point) -> Scalar {
        let mut t = Transcript::new("linear");
        t.append("ctx", ctx)
            .point("X", &self.x)
            .point("Y", &self.y)
            .point("P", &self.p)
            .point("A", &self.a)
            .point("C", &self.c)
            .point("T1", t1)
            .point("T2", t2)
            .point("T3", t3);
        t.challenge("linear")
    }
}

impl LinearProof {
    /// Proves the statement with witnesses `x`, `y`.
    pub fn prove(
        rng: &mut (impl CryptoRng + ?Sized),
        ctx: &[u8],
        stmt: &LinearStatement,
        x: &SecretScalar,
        y: &SecretScalar,
    ) -> Result<Self> {
        let k1 = SecretScalar::random(rng);
        let k2 = SecretScalar::random(rng);
        let t1 = Point::nonzero(k1.public_image(), "linear commitment is the identity")?;
        let t2 = Point::nonzero(k2.public_image(), "linear commitment is the identity")?;
        let t3 = Point::nonzero(
            group::mul(&stmt.p.projective(), k1.expose())
                + group::mul(&stmt.a.projective(), k2.expose()),
            "linear commitment is the identity",
        )?;
        let c = stmt.challenge(ctx, &t1, &t2, &t3);
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
        stmt: &LinearStatement,
        batch: &mut BatchVerifier,
        culprit: PartyIndex,
        fault: Fault,
    ) {
        let c = stmt.challenge(ctx, &self.t1, &self.t2, &self.t3);
        let m1 = -Scalar::ONE;
        batch.push(
            culprit,
            fault,
            self.z1,
            vec![(self.t1.projective(), m1), (stmt.x.projective(), -c)],
        );
        batch.push(
            culprit,
            fault,
            self.z2,
            vec![(self.t2.projective(), m1), (stmt.y.projective(), -c)],
        );
        batch.push(
            culprit,
            fault,
            Scalar::ZERO,
            vec![
                (stmt.p.projective(), self.z1),
                (stmt.a.projective(), self.z2),
                (self.t3.projective(), m1),
                (stmt.c.projective(), -c),
            ],
        );
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

    #[test]
    fn schnorr_accepts_and_rejects() {
        let mut rng = crate::sim::test_rng("schnorr");
        let x = SecretScalar::random(&mut rng);
        let xp = Point::new(x.public_image()).unwrap();
        let proof = SchnorrProof::prove(&mut rng, b"ctx", &x, &xp).unwrap();
        let mut b = BatchVerifier::new();
        proof.verify_into(b"ctx", &xp, &mut b, p(1), Fault::BadProofOfKnowledge);
        assert!(b.verify(&mut rng).is_ok());
        // wrong context
        let mut b = BatchVerifier::new();
        proof.verify_into(b"other", &xp, &mut b, p(1), Fault::BadProofOfKnowledge);
        assert_eq!(b.verify(&mut rng).unwrap_err().culprits(), &[p(1)]);
        // wrong statement
        let other = Point::new(SecretScalar::random(&mut rng).public_image()).unwrap();
        let mut b = BatchVerifier::new();
        proof.verify_into(b"ctx", &other, &mut b, p(2), Fault::BadProofOfKnowledge);
        assert_eq!(b.verify(&mut rng).unwrap_err().culprits(), &[p(2)]);
    }

    #[test]
    fn dleq_accepts_and_rejects() {
        let mut rng = crate::sim::test_rng("dleq");
        let w = SecretScalar::random(&mut rng);
        let b2 = Point::new(SecretScalar::random(&mut rng).public_image()).unwrap();
        let stmt = DleqStatement {
            b1: Base::G,
            a: Point::new(w.public_image()).unwrap(),
            b2: Base::Point(b2),
            c: Point::new(group::mul(&b2.projective(), w.expose())).unwrap(),
        };
        let proof = DleqProof::prove(&mut rng, b"c", &stmt, &w).unwrap();
        let mut b = BatchVerifier::new();
        proof.verify_into(b"c", &stmt, &mut b, p(1), Fault::BadMuProof);
        assert!(b.verify(&mut rng).is_ok());
        let bad = DleqStatement {
            c: Point::new(stmt.c.projective() + ProjectivePoint::GENERATOR).unwrap(),
            ..stmt
        };
        let mut b = BatchVerifier::new();
        proof.verify_into(b"c", &bad, &mut b, p(3), Fault::BadMuProof);
        assert_eq!(b.verify(&mut rng).unwrap_err().culprits(), &[p(3)]);
    }

    #[test]
    fn linear_accepts_and_rejects() {
        let mut rng = crate::sim::test_rng("linear");
        let x = SecretScalar::random(&mut rng);
        let y = SecretScalar::random(&mut rng);
        let pp = Point::new(SecretScalar::random(&mut rng).public_image()).unwrap();
        let a = Point::new(SecretScalar::random(&mut rng).public_image()).unwrap();
        let c = group::mul(&pp.projective(), x.expose()) + group::mul(&a.projective(), y.expose());
        let stmt = LinearStatement {
            x: Point::new(x.public_image()).unwrap(),
            y: Point::new(y.public_image()).unwrap(),
            p: pp,
            a,
            c: Point::new(c).unwrap(),
        };
        let proof = LinearProof::prove(&mut rng, b"c", &stmt, &x, &y).unwrap();
        let mut b = BatchVerifier::new();
        proof.verify_into(b"c", &stmt, &mut b, p(1), Fault::BadDhPartial);
        assert!(b.verify(&mut rng).is_ok());
        let bad = LinearStatement {
            c: Point::new(c + ProjectivePoint::GENERATOR).unwrap(),
            ..stmt
        };
        let mut b = BatchVerifier::new();
        proof.verify_into(b"c", &bad, &mut b, p(2), Fault::BadDhPartial);
        assert_eq!(b.verify(&mut rng).unwrap_err().culprits(), &[p(2)]);
    }
}
