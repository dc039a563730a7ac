//! Batch verification with random linear combinations (DESIGN.md §4.1, §8).
//!
//! Every public check in the protocols — a Feldman share against its commitments, a
//! proof's verification equation, a signature share — is a *claim* of the form
//! `g·G + Σ s_k·P_k = O`. A [`BatchVerifier`] collects claims, each tagged with the party
//! to blame, and checks them all at once: with fresh random weights `ρ_c`,
//! `(Σ ρ_c g_c)·G + Σ_c Σ_k (ρ_c s_{c,k})·P_{c,k} = O` — one fixed-base multiplication and
//! one multi-scalar multiplication. A false claim survives only with probability `1/q`.
//! Only if the batch fails are the claims checked one by one, to name the culprits.

use elliptic_curve::group::Group;
use p256::ProjectivePoint;
use rand_core::CryptoRng;

use crate::error::{Error, Fault, Result};
use crate::group::{self, Scalar};
use crate::params::PartyIndex;

/// One claim `g·G + Σ s_k·P_k = O`.
struct Claim {
    culprit: PartyIndex,
    fault: Fault,
    g: Scalar,
    terms: Vec<(ProjectivePoint, Scalar)>,
}

impl Claim {
    fn holds(&self) -> bool {
        let lhs = group::mul_g(&self.g) + group::msm(&self.terms);
        bool::from(lhs.is_identity())
    }
}

/// Collects claims and verifies them together.
#[derive(Default)]
pub struct BatchVerifier {
    claims: Vec<Claim>,
}

impl BatchVerifier {
    /// An empty batch.
    pub fn new() -> Self {
        BatchVerifier::default()
    }

    /// Adds the claim `g·G + Σ terms = O`, blaming `culprit` for `fault` if it is false.
    pub fn push(
        &mut self,
        culprit: PartyIndex,
        fault: Fault,
        g: Scalar,
        terms: Vec<(ProjectivePoint, Scalar)>,
    ) {
        self.claims.push(Claim {
            culprit,
            fault,
            g,
            terms,
        });
    }

    /// Number of claims collected.
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    /// Whether no claim was collected.
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    /// Verifies every claim. On failure, names every party with a false claim and the
    /// fault of the first one.
    pub fn verify(self, rng: &mut (impl CryptoRng + ?Sized)) -> Result<()> {
        if self.claims.is_empty() {
            return Ok(());
        }
        let total: usize = self.claims.iter().map(|c| c.terms.len()).sum();
        let mut terms = Vec::with_capacity(total);
        let mut g = Scalar::ZERO;
        for c in &self.claims {
            let rho = group::random_nonzero(rng);
            g += rho * c.g;
            terms.extend(c.terms.iter().map(|(p, s)| (*p, rho * s)));
        }
        let lhs = group::mul_g(&g) + group::msm(&terms);
        if bool::from(lhs.is_identity()) {
            return Ok(());
        }
        self.blame_false_claims()
    }

    /// Checks each claim alone and blames the parties whose claims are false.
    fn blame_false_claims(self) -> Result<()> {
        let mut culprits = Vec::new();
        let mut first_fault = None;
        for c in &self.claims {
            if !c.holds() {
                culprits.push(c.culprit);
                first_fault.get_or_insert(c.fault);
            }
        }
        match first_fault {
            Some(fault) => Err(Error::blame(culprits, fault)),
            // The combination failed but every claim holds: only possible if the random
            // weights hit a 1/q event, which we treat as a bug rather than blame anyone.
            None => Err(Error::Bug(
                "batch verification failed but every claim holds",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use elliptic_curve::Field;

    #[test]
    fn batch_accepts_true_and_blames_false() {
        let mut rng = crate::sim::test_rng("batch");
        let p1 = PartyIndex::new(1).unwrap();
        let p2 = PartyIndex::new(2).unwrap();
        let x = Scalar::random(&mut rng);
        let xg = group::mul_g(&x);
        let mut b = BatchVerifier::new();
        b.push(p1, Fault::BadShare, x, vec![(xg, -Scalar::ONE)]);
        b.push(
            p2,
            Fault::BadShare,
            x + Scalar::ONE,
            vec![(xg, -Scalar::ONE)],
        );
        let err = b.verify(&mut rng).unwrap_err();
        assert_eq!(err.culprits(), &[p2]);

        let mut ok = BatchVerifier::new();
        ok.push(p1, Fault::BadShare, x, vec![(xg, -Scalar::ONE)]);
        assert!(ok.verify(&mut rng).is_ok());
    }
}
