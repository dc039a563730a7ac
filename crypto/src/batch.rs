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

/// One claim `g·G + Σ s_k·P_k + Σ s_b·B_b = O`, where the `B_b` are shared bases.
struct Claim {
    culprit: PartyIndex,
    fault: Fault,
    g: Scalar,
    terms: Vec<(ProjectivePoint, Scalar)>,
    shared: Vec<(BaseId, Scalar)>,
}

/// A base registered with [`BatchVerifier::base`]: a point that many claims use (a
/// key's commitments, a batch's aggregated commitments). Terms on a shared base are
/// merged into one multi-scalar-multiplication term, which is what makes verifying a
/// whole presignature batch cheap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseId(usize);

/// Collects claims and verifies them together.
#[derive(Default)]
pub struct BatchVerifier {
    bases: Vec<ProjectivePoint>,
    claims: Vec<Claim>,
}

impl BatchVerifier {
    /// An empty batch.
    pub fn new() -> Self {
        BatchVerifier::default()
    }

    /// Registers a shared base.
    pub fn base(&mut self, p: ProjectivePoint) -> BaseId {
        self.bases.push(p);
        BaseId(self.bases.len() - 1)
    }

    /// Adds the claim `g·G + Σ terms = O`, blaming `culprit` for `fault` if it is false.
    pub fn push(
        &mut self,
        culprit: PartyIndex,
        fault: Fault,
        g: Scalar,
        terms: Vec<(ProjectivePoint, Scalar)>,
    ) {
        self.push_shared(culprit, fault, g, terms, Vec::new());
    }

    /// Adds the claim `g·G + Σ terms + Σ s·B = O` with terms on shared bases.
    pub fn push_shared(
        &mut self,
        culprit: PartyIndex,
        fault: Fault,
        g: Scalar,
        terms: Vec<(ProjectivePoint, Scalar)>,
        shared: Vec<(BaseId, Scalar)>,
    ) {
        self.claims.push(Claim {
            culprit,
            fault,
            g,
            terms,
            shared,
        });
    }

    fn holds(&self, c: &Claim) -> bool {
        let mut terms = c.terms.clone();
        terms.extend(
            c.shared
                .iter()
                .filter_map(|(b, s)| self.bases.get(b.0).map(|p| (*p, *s))),
        );
        let lhs = group::mul_g(&c.g) + group::msm(&terms);
        bool::from(lhs.is_identity())
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
        let mut terms = Vec::with_capacity(total + self.bases.len());
        let mut shared = vec![Scalar::ZERO; self.bases.len()];
        let mut g = Scalar::ZERO;
        for c in &self.claims {
            let rho = group::random_nonzero(rng);
            g += rho * c.g;
            terms.extend(c.terms.iter().map(|(p, s)| (*p, rho * s)));
            for (b, s) in &c.shared {
                let acc = shared
                    .get_mut(b.0)
                    .ok_or(Error::Bug("unknown shared base"))?;
                *acc += rho * s;
            }
        }
        terms.extend(self.bases.iter().copied().zip(shared));
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
            if !self.holds(c) {
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

/// A point written symbolically as `g·G + Σ s·P + Σ s·B` (B shared bases), so that a
/// verifier can state an equation about a point it never computes — a public share
/// `Σ_k i^k·C_k`, say — and let the batch merge the work.
#[derive(Clone, Debug, Default)]
pub struct Form {
    g: Scalar,
    terms: Vec<(ProjectivePoint, Scalar)>,
    shared: Vec<(BaseId, Scalar)>,
}

impl Form {
    /// The generator `G`.
    pub fn generator() -> Form {
        Form {
            g: Scalar::ONE,
            ..Form::default()
        }
    }

    /// `s·G`.
    pub fn g_times(s: Scalar) -> Form {
        Form {
            g: s,
            ..Form::default()
        }
    }

    /// A single point.
    pub fn point(p: &crate::group::Point) -> Form {
        Form {
            terms: vec![(p.projective(), Scalar::ONE)],
            ..Form::default()
        }
    }

    /// `Σ_k coeffs_k·B_k` over shared bases.
    pub fn shared(terms: Vec<(BaseId, Scalar)>) -> Form {
        Form {
            shared: terms,
            ..Form::default()
        }
    }

    /// `self += k·other`.
    pub fn add_scaled(&mut self, other: &Form, k: Scalar) {
        self.g += k * other.g;
        self.terms
            .extend(other.terms.iter().map(|(p, s)| (*p, k * s)));
        self.shared
            .extend(other.shared.iter().map(|(b, s)| (*b, k * s)));
    }

    /// `k·self`.
    pub fn scaled(&self, k: Scalar) -> Form {
        let mut f = Form::default();
        f.add_scaled(self, k);
        f
    }
}

impl BatchVerifier {
    /// Adds the claim `form = O`.
    pub fn push_form(&mut self, culprit: PartyIndex, fault: Fault, form: Form) {
        self.push_shared(culprit, fault, form.g, form.terms, form.shared);
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
