//! **INSECURE — TEST ONLY.** Rebuilds a whole private key from shares.
//!
//! This module exists only with the `insecure-test-only-key-reconstruction` feature,
//! which no binary enables (CI checks the dependency graph). Tests use it to compute
//! reference values — the key itself, a credential derived directly from `x` — against
//! which the threshold protocols are checked. Nothing else may call it.

use crate::error::{Error, Result};
use crate::group::{self, Point, Scalar};
use crate::keys::KeyShare;
use crate::params::PartySet;
use crate::secret::SecretScalar;
use crate::tdh::{self, Credential, SharedPoint};

/// `x = Σ λ_i x_i` over the given shares (which must be at least `t + 1` of one key and
/// epoch).
pub fn reconstruct_key(shares: &[&KeyShare]) -> Result<SecretScalar> {
    let first = shares.first().ok_or_else(|| Error::input("no shares"))?;
    let set = PartySet::new(shares.iter().map(|s| s.index).collect())?;
    let mut x = Scalar::ZERO;
    for s in shares {
        x += set.lagrange(s.index)? * s.secret.expose();
    }
    let _ = first;
    Ok(SecretScalar::new(x))
}

/// `x·G` for a reconstructed secret.
pub fn public_of(x: &SecretScalar) -> Option<Point> {
    Point::new(x.public_image())
}

/// The credential for `context` computed directly from a reconstructed key.
pub fn reference_credential(x: &SecretScalar, context: &[u8]) -> Result<Credential> {
    let p = crate::hash::h2c("derive", context)?;
    let xp = Point::new(group::mul(&p, x.expose())).ok_or(Error::Bug("x·P is the identity"))?;
    tdh::derive_credential(&SharedPoint::from_point(&xp), context)
}
