//! Feldman verifiable secret sharing (DESIGN.md §4.1): the primitive every protocol
//! reuses.
//!
//! A dealer picks `f(z) = σ + a_1 z + … + a_t z^t`, publishes `C_k = a_k·G`, and sends
//! `f(j)` sealed to each recipient `j`. The recipient checks `f(j)·G = Σ_k j^k·C_k`
//! (pushed as a claim into a [`BatchVerifier`]), and rejects commitment vectors whose
//! length is not the one the threshold requires — a longer vector would raise the
//! threshold. Anyone can compute the public share `F_j = Σ_k j^k·C_k`.
//!
//! For refresh, dealings share zero: `σ = 0`, so `C_0` is the identity and is not sent.

use p256::ProjectivePoint;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::batch::BatchVerifier;
use crate::error::{Error, Fault, Result};
use crate::group::{self, Point, Scalar};
use crate::params::PartyIndex;
use crate::secret::SecretScalar;

/// A secret polynomial of degree `t`.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Polynomial {
    coeffs: Vec<Scalar>,
}

impl Polynomial {
    /// A random polynomial of degree `t` with constant term `secret`.
    pub fn random(
        rng: &mut (impl rand_core::CryptoRng + ?Sized),
        secret: &SecretScalar,
        t: u16,
    ) -> Self {
        let mut coeffs = Vec::with_capacity(usize::from(t) + 1);
        coeffs.push(*secret.expose());
        coeffs.extend((0..t).map(|_| group::random_nonzero(rng)));
        Polynomial { coeffs }
    }

    /// A random polynomial of degree `t` with constant term zero (refresh).
    pub fn random_zero(rng: &mut (impl rand_core::CryptoRng + ?Sized), t: u16) -> Self {
        let mut p = Self::random(rng, &SecretScalar::new(Scalar::ONE), t);
        if let Some(c0) = p.coeffs.first_mut() {
            *c0 = Scalar::ZERO;
        }
        p
    }

    /// `f(i)`.
    pub fn eval(&self, i: PartyIndex) -> SecretScalar {
        let x = i.scalar();
        let mut acc = Scalar::ZERO;
        for c in self.coeffs.iter().rev() {
            acc = acc * x + c;
        }
        SecretScalar::new(acc)
    }

    /// The constant term `f(0)`.
    pub fn constant(&self) -> SecretScalar {
        SecretScalar::new(self.coeffs.first().copied().unwrap_or(Scalar::ZERO))
    }

    /// Commitments `C_k = a_k·G` for every coefficient (including `C_0`).
    ///
    /// Coefficients `k >= 1` are non-zero by construction; `C_0` is the identity only
    /// for a zero-sharing, where [`Commitments::zero_constant`] applies.
    pub fn commit(&self) -> Commitments {
        Commitments(self.coeffs.iter().map(group::mul_g).collect())
    }
}

impl core::fmt::Debug for Polynomial {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Polynomial(<redacted>)")
    }
}

/// Public commitments to a polynomial's coefficients, `C_0 .. C_t`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commitments(Vec<ProjectivePoint>);

impl Commitments {
    /// Commitments received on the wire (all of `C_0..C_t`), checked to have length
    /// `expected_len`; a wrong length blames `dealer`.
    pub fn received(points: &[Point], expected_len: usize, dealer: PartyIndex) -> Result<Self> {
        if points.len() != expected_len {
            return Err(Error::blame_one(
                dealer,
                Fault::WrongCommitmentLength {
                    expected: expected_len,
                    got: points.len(),
                },
            ));
        }
        Ok(Commitments(points.iter().map(Point::projective).collect()))
    }

    /// Commitments from already-validated points (e.g. stored group commitments).
    pub(crate) fn from_points(points: &[Point]) -> Self {
        Commitments(points.iter().map(Point::projective).collect())
    }

    /// Commitments of a zero-sharing received on the wire (`C_1..C_t`; `C_0 = O` is
    /// implicit), checked to have length `expected_len - 1`.
    pub fn zero_constant(
        points: &[Point],
        expected_len: usize,
        dealer: PartyIndex,
    ) -> Result<Self> {
        if points.len() + 1 != expected_len {
            return Err(Error::blame_one(
                dealer,
                Fault::WrongCommitmentLength {
                    expected: expected_len.saturating_sub(1),
                    got: points.len(),
                },
            ));
        }
        let mut v = Vec::with_capacity(expected_len);
        v.push(ProjectivePoint::IDENTITY);
        v.extend(points.iter().map(Point::projective));
        Ok(Commitments(v))
    }

    /// The coefficients as wire points, all of them (`skip_constant = false`) or without
    /// `C_0` (zero-sharings). Fails if a sent coefficient is the identity.
    pub fn to_points(&self, skip_constant: bool) -> Result<Vec<Point>> {
        Point::batch(self.0.get(usize::from(skip_constant)..).unwrap_or(&[]))
            .ok_or(Error::Bug("commitment coefficient is the identity"))
    }

    /// Number of coefficients (`t + 1`).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true for a valid vector.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `C_0 = σ·G`.
    pub fn constant(&self) -> ProjectivePoint {
        self.0.first().copied().unwrap_or(ProjectivePoint::IDENTITY)
    }

    /// The public share `F_j = Σ_k j^k·C_k`.
    pub fn eval(&self, j: PartyIndex) -> ProjectivePoint {
        group::msm(&self.eval_terms(j, Scalar::ONE))
    }

    /// The terms `(C_k, w·j^k)` of `w·F_j`.
    pub fn eval_terms(&self, j: PartyIndex, w: Scalar) -> Vec<(ProjectivePoint, Scalar)> {
        let x = j.scalar();
        let mut pow = w;
        self.0
            .iter()
            .map(|c| {
                let t = (*c, pow);
                pow *= x;
                t
            })
            .collect()
    }

    /// Adds the claim `share·G = F_j` to `batch`, blaming `dealer`.
    pub fn verify_share_into(
        &self,
        j: PartyIndex,
        share: &Scalar,
        batch: &mut BatchVerifier,
        dealer: PartyIndex,
        fault: Fault,
    ) {
        batch.push(dealer, fault, *share, self.eval_terms(j, -Scalar::ONE));
    }

    /// Element-wise sum of commitment vectors of equal length.
    pub fn sum<'a>(items: impl IntoIterator<Item = &'a Commitments>) -> Result<Commitments> {
        let mut acc: Option<Vec<ProjectivePoint>> = None;
        for c in items {
            match &mut acc {
                None => acc = Some(c.0.clone()),
                Some(a) => {
                    if a.len() != c.0.len() {
                        return Err(Error::Bug("summing commitment vectors of unequal length"));
                    }
                    for (x, y) in a.iter_mut().zip(&c.0) {
                        *x += y;
                    }
                }
            }
        }
        acc.map(Commitments)
            .ok_or(Error::Bug("summing an empty list of commitments"))
    }

    /// `self + other` element-wise.
    pub fn add(&self, other: &Commitments) -> Result<Commitments> {
        Commitments::sum([self, other])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(i: u16) -> PartyIndex {
        PartyIndex::new(i).unwrap()
    }

    #[test]
    fn shares_verify_and_tampered_share_blames_dealer() {
        let mut rng = crate::sim::test_rng("feldman");
        let secret = SecretScalar::random(&mut rng);
        let f = Polynomial::random(&mut rng, &secret, 2);
        let c = f.commit();
        assert_eq!(c.constant(), secret.public_image());
        let mut batch = BatchVerifier::new();
        for j in 1..=5 {
            c.verify_share_into(
                p(j),
                f.eval(p(j)).expose(),
                &mut batch,
                p(4),
                Fault::BadShare,
            );
        }
        assert!(batch.verify(&mut rng).is_ok());

        let mut batch = BatchVerifier::new();
        let bad = *f.eval(p(2)).expose() + Scalar::ONE;
        c.verify_share_into(p(2), &bad, &mut batch, p(4), Fault::BadShare);
        let err = batch.verify(&mut rng).unwrap_err();
        assert_eq!(err.culprits(), &[p(4)]);
        assert!(matches!(
            err,
            Error::PeerMisbehaved {
                fault: Fault::BadShare,
                ..
            }
        ));
    }

    #[test]
    fn wrong_commitment_length_blames_dealer() {
        let pts = vec![Point::GENERATOR; 4];
        let err = Commitments::received(&pts, 3, p(2)).unwrap_err();
        assert_eq!(err.culprits(), &[p(2)]);
        assert!(matches!(
            err,
            Error::PeerMisbehaved {
                fault: Fault::WrongCommitmentLength {
                    expected: 3,
                    got: 4
                },
                ..
            }
        ));
    }
}
